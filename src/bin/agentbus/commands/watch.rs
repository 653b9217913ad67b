//! `watch`: stream messages as they arrive, or run a handler per message
//! (`--exec`), until `--max`, `--idle-timeout` or a signal stops it. Damage and
//! compaction met on the way are reported on stderr and watching goes on. README
//! "watch --exec: the handler contract" is the user's side of this file.

mod handler;
mod stop;

use std::io::Write;
use std::time::{Duration, Instant};

use agentbus::{Delivery, Error, Message, RecvTimeoutError, RetryOutcome, RetryPolicy};
use clap::Args;
use serde_json::{json, Value};

use super::{agent_or_cli, open_writer, secs, CoalesceArgs, Durable, TypeArgs};
use crate::lines::MessageLine;
use crate::output::{emit, error_json, Failure};
use crate::Cli;
use handler::{Ended, Ending, Heartbeat, Run};
use stop::Stop;

/// The handler's exit code for "retry later": the message is given back for
/// redelivery after `--retry-delay`, or the group's retry policy's delay (sysexits'
/// `EX_TEMPFAIL`).
pub const EXIT_RETRY_LATER: i32 = 75;

/// The handler's exit code for "do not retry": the message goes to the group's
/// dead-letter mailbox at once, whatever attempt it is (sysexits' `EX_DATAERR`).
pub const EXIT_DEAD_LETTER: i32 = 65;

/// The longest value an `AGENTBUS_*` variable is given; a longer one is omitted (and
/// named in `AGENTBUS_OMITTED`), never cut: the message on stdin has it whole.
const MAX_ENV_VALUE: usize = 32 * 1024;

/// How long one wait for a message lasts before `watch` looks at stop requests again.
const SLICE: Duration = Duration::from_millis(200);

/// Stream messages as they arrive (woken by file-system events, with a polling
/// fallback); with `--exec`, run a handler per message. SIGINT or SIGTERM stops it
/// cleanly (the message in hand is finished first; a second signal gives it back).
#[derive(Args, Debug)]
pub struct WatchArgs {
    /// The mailbox.
    mailbox: String,
    /// Claim for this consumer group (at-least-once, acked per message) instead of
    /// just reading.
    #[arg(long)]
    group: Option<String>,
    /// The consumer name for claims (default: `--agent`, else `cli`).
    #[arg(long, requires = "group")]
    consumer: Option<String>,
    /// Without `--group` only (a group filters with `group create --type`).
    #[command(flatten)]
    types: TypeArgs,
    /// Without `--group` only, in memory (a group coalesces for all its consumers and
    /// across restarts: `group create --coalesce`); coalesced messages are not printed
    /// nor handled, and stay in the log.
    #[command(flatten)]
    coalesce: CoalesceArgs,
    /// Without `--group`: start at this seq instead of the end (new messages only).
    #[arg(long)]
    from_seq: Option<u64>,
    /// Run this shell command per message, in a process group of its own: the message
    /// JSON on its stdin, fields in AGENTBUS_* environment variables, its stdout and
    /// stderr to watch's stderr. With `--group`: exit 0 acks, 75 retries later, 65
    /// dead-letters at once, anything else retries; one JSON line per outcome. While the
    /// bus is unavailable (a failover) the settlement is retried until the claim runs
    /// out, then the line says `"unsettled"` (the message comes again).
    #[arg(long)]
    exec: Option<String>,
    /// Seconds before the message of a failed handler is redelivered, whatever the
    /// attempt. Default: the group's retry policy (`group create --backoff`), or at
    /// once for a group without one.
    #[arg(long)]
    retry_delay: Option<f64>,
    /// Kill a handler that runs longer than this many seconds (its process group:
    /// SIGTERM, then SIGKILL 2 s later); with `--group` that counts as a failure.
    #[arg(long, requires = "exec")]
    handler_timeout: Option<f64>,
    /// Visibility timeout of the claims, in seconds (default: the group's). A running
    /// handler's claim is extended every third of it.
    #[arg(long)]
    visibility: Option<f64>,
    /// Stop after this many messages.
    #[arg(long)]
    max: Option<usize>,
    /// Stop after this many seconds without a message.
    #[arg(long)]
    idle_timeout: Option<f64>,
    /// Poll only (no file-system events), e.g. on a network file system.
    #[arg(long)]
    poll: bool,
    /// With `--group`: how settlements are written.
    #[command(flatten)]
    durable: Durable,
}

/// What every message of one `watch` shares.
struct Watch<'a> {
    stop: Stop,
    idle: Option<Duration>,
    max: usize,
    exec: Option<&'a str>,
    timeout: Option<Duration>,
    /// `--retry-delay`; `None`: the group's retry policy.
    retry: Option<Duration>,
}

/// `watch`: stream messages (or run a handler per message) as they arrive.
pub fn run(cli: &Cli, args: &WatchArgs, out: &mut impl Write) -> Result<(), Failure> {
    let mode = if args.poll {
        agentbus::WatchMode::PollOnly
    } else {
        agentbus::WatchMode::Auto
    };
    let w = Watch {
        stop: Stop::install().map_err(|source| Error::Io {
            op: "catch SIGINT and SIGTERM",
            path: "<signals>".into(),
            source,
        })?,
        idle: args.idle_timeout.map(secs).transpose()?,
        max: args.max.unwrap_or(usize::MAX),
        exec: args.exec.as_deref(),
        timeout: args.handler_timeout.map(secs).transpose()?,
        retry: args.retry_delay.map(secs).transpose()?,
    };
    let bus = open_writer(cli, &args.durable)?;
    match &args.group {
        Some(group) => {
            if !args.types.is_empty() || args.from_seq.is_some() || args.coalesce.is_set() {
                return Err(Failure::Usage(
                    "with --group, filter and coalesce with `group create --type`, \
                     `--not-type` and `--coalesce`, and the group decides where to start"
                        .into(),
                ));
            }
            let group = bus.mailbox(&args.mailbox)?.group(group)?;
            let visibility = match args.visibility {
                Some(v) => secs(v)?,
                None => group.visibility(),
            };
            let mut rx = group
                .consumer_with(agent_or_cli(cli, &args.consumer), mode)?
                .visibility(visibility);
            let mut since = Instant::now();
            for _ in 0..w.max {
                let Some(d) = next(&w, since, |t| rx.recv_timeout(t))? else {
                    break;
                };
                match w.exec {
                    None => emit(out, &MessageLine::delivery(&d))?,
                    Some(cmd) => emit(out, &handle_delivery(&w, cmd, &d, visibility)?)?,
                }
                out.flush().ok();
                since = Instant::now();
            }
            Ok(())
        }
        None => {
            let filter = args.types.narrow(agentbus::Filter::new())?;
            let mut rx = bus
                .follow_with(&[args.mailbox.as_str()], mode)?
                .filter(filter);
            if let Some(seq) = args.from_seq {
                rx = rx.from_seq(seq);
            }
            if let Some(c) = args.coalesce.get()? {
                rx = rx.coalesce(c);
            }
            let (mut handled, mut damaged, mut since) = (0, false, Instant::now());
            while handled < w.max {
                match next(&w, since, |t| rx.recv_timeout(t)) {
                    Ok(Some(env)) => {
                        match w.exec {
                            None => emit(out, &MessageLine::new(&env.message))?,
                            Some(cmd) => {
                                emit(out, &handle_message(&w, cmd, &env.message, &env.mailbox))?
                            }
                        }
                        out.flush().ok();
                        handled += 1;
                    }
                    Ok(None) => break,
                    // Reported where they are, and the follower goes on after them:
                    // damage (and the exit status says so at the end), or a part of
                    // the log compacted away before we read it (not damage).
                    Err(e @ (Error::Corrupt { .. } | Error::Compacted { .. })) => {
                        out.flush().ok();
                        eprintln!("{}", error_json(&e));
                        damaged |= matches!(e, Error::Corrupt { .. });
                    }
                    Err(e) => return Err(e.into()),
                }
                since = Instant::now();
            }
            if damaged {
                Err(Failure::Reported)
            } else {
                Ok(())
            }
        }
    }
}

/// The next item from `recv`, waiting in slices so that a stop request is seen within
/// one; `None` when a signal asked to stop or nothing came for `--idle-timeout`.
fn next<T>(
    w: &Watch<'_>,
    since: Instant,
    mut recv: impl FnMut(Duration) -> Result<T, RecvTimeoutError>,
) -> Result<Option<T>, Error> {
    loop {
        if w.stop.requested() {
            return Ok(None);
        }
        let left = w
            .idle
            .map(|idle| (since + idle).saturating_duration_since(Instant::now()));
        match recv(left.map_or(SLICE, |l| l.min(SLICE))) {
            Ok(item) => return Ok(Some(item)),
            Err(RecvTimeoutError::Bus(e)) => return Err(e),
            Err(_) if left.is_some_and(|l| l <= SLICE) => return Ok(None),
            Err(_) => {}
        }
    }
}

/// The handler's environment: each `AGENTBUS_*` variable set to its field, or removed
/// (so none is inherited from watch's own environment) when the message has no such
/// field or the value cannot be held losslessly (a NUL byte, or over
/// [`MAX_ENV_VALUE`] bytes); `AGENTBUS_OMITTED` names the ones withheld.
fn message_env(
    m: &Message,
    mailbox: &str,
    claim: Option<(&str, u32)>,
) -> Vec<(&'static str, Option<String>)> {
    let fields = [
        ("AGENTBUS_MAILBOX", Some(mailbox.to_owned())),
        ("AGENTBUS_SEQ", Some(m.seq.to_string())),
        ("AGENTBUS_ID", Some(m.id.to_string())),
        ("AGENTBUS_TYPE", Some(m.kind.clone())),
        ("AGENTBUS_FROM", Some(m.from.clone())),
        ("AGENTBUS_SUBJECT", m.subject.clone()),
        ("AGENTBUS_CORRELATION_ID", m.correlation_id.clone()),
        ("AGENTBUS_GROUP", claim.map(|(g, _)| g.to_owned())),
        ("AGENTBUS_ATTEMPT", claim.map(|(_, a)| a.to_string())),
    ];
    let mut omitted = Vec::new();
    let mut env: Vec<_> = fields
        .into_iter()
        .map(|(name, value)| {
            let value = value.filter(|v| {
                let holdable = !v.as_bytes().contains(&0) && v.len() <= MAX_ENV_VALUE;
                if !holdable {
                    omitted.push(name);
                }
                holdable
            });
            (name, value)
        })
        .collect();
    env.push((
        "AGENTBUS_OMITTED",
        (!omitted.is_empty()).then(|| omitted.join(" ")),
    ));
    env
}

/// `--exec` without a group: runs the handler, and reports how it ended.
fn handle_message(w: &Watch<'_>, cmd: &str, m: &Message, mailbox: &str) -> Value {
    let env = message_env(m, mailbox, None);
    let run = Run {
        command: cmd,
        input: serde_json::to_vec(&MessageLine::new(m)).expect("message serializes"),
        env: &env,
        timeout: w.timeout,
    };
    let ended = handler::run(run, &w.stop, None);
    let mut line = json!({"mailbox": mailbox, "seq": m.seq});
    describe(&mut line, &ended);
    line
}

/// `--exec` with a group: runs the handler while extending the claim, then settles
/// the message as its exit code says.
fn handle_delivery(
    w: &Watch<'_>,
    cmd: &str,
    d: &Delivery,
    visibility: Duration,
) -> Result<Value, Failure> {
    let group = d.group();
    let mailbox = group.mailbox().name();
    let env = message_env(&d.message, mailbox, Some((group.name(), d.attempt)));
    // Extend every third of the claim (the real one: on JetStream every claim is for
    // the group's visibility, whatever `--visibility` says).
    let left = std::time::Duration::try_from(d.deadline - time::OffsetDateTime::now_utc())
        .unwrap_or(Duration::ZERO);
    let every = (left.min(visibility) / 3).max(Duration::from_millis(10));
    let mut beat = || match d.extend(visibility) {
        Ok(()) => true,
        Err(e) => {
            let mut warning = error_json(&e);
            warning["warning"] = json!(format!(
                "could not extend the claim of seq {} while its handler runs",
                d.seq()
            ));
            warning["seq"] = json!(d.seq());
            eprintln!("{warning}");
            // A claim that is gone stays gone; anything else may pass.
            !matches!(e, Error::StaleDelivery { .. })
        }
    };
    let run = Run {
        command: cmd,
        input: serde_json::to_vec(&MessageLine::delivery(d)).expect("message serializes"),
        env: &env,
        timeout: w.timeout,
    };
    let heartbeat = Heartbeat {
        every,
        beat: &mut beat,
    };
    let ended = handler::run(run, &w.stop, Some(heartbeat));
    settle(w, d, &ended)
}

/// Adds how the handler ended to an outcome line: `exit` (-1 when it did not exit),
/// and `signal`, `timed_out` or `error` when they apply.
fn describe(line: &mut Value, ended: &Ended) {
    line["exit"] = json!(ended.code().unwrap_or(-1));
    match &ended.ending {
        Ending::Exited(_) => {}
        Ending::Signaled(sig) => line["signal"] = json!(sig),
        Ending::NotStarted(e) => line["error"] = json!(e),
    }
    if ended.timed_out {
        line["timed_out"] = json!(true);
    }
}

/// Why a handler run did not ack, for the nack or dead letter and the outcome line.
fn failure(w: &Watch<'_>, ended: &Ended) -> String {
    let what = match &ended.ending {
        _ if ended.timed_out => format!(
            "handler timed out after {}s and was killed",
            w.timeout.unwrap_or_default().as_secs_f64()
        ),
        _ if ended.stopped => format!(
            "watch was stopped ({}) before the handler finished",
            w.stop.signal()
        ),
        Ending::Exited(EXIT_RETRY_LATER) => "handler asked to retry later (exit 75)".into(),
        Ending::Exited(EXIT_DEAD_LETTER) => "handler refused the message (exit 65)".into(),
        Ending::Exited(code) => format!("handler exited with {code}"),
        Ending::Signaled(sig) => format!("handler was killed by signal {sig}"),
        Ending::NotStarted(e) => format!("handler did not start: {e}"),
    };
    if ended.stderr_tail.is_empty() {
        what
    } else {
        format!("{what}: {}", ended.stderr_tail)
    }
}

/// Settles a delivery as its handler's ending says, and returns the outcome line:
/// `acked`, `retried` (with `delay_ms`), `dead_lettered` (with `reason` and
/// `dead_letter`), `given_back` (watch was told to stop at once), or `expired` (the
/// claim was lost meanwhile; the group redelivers the message).
fn settle(w: &Watch<'_>, d: &Delivery, ended: &Ended) -> Result<Value, Failure> {
    let group = d.group();
    let mut line = json!({
        "mailbox": group.mailbox().name(),
        "group": group.name(),
        "seq": d.seq(),
        "attempt": d.attempt,
        "acked": false,
    });
    describe(&mut line, ended);
    if ended.code() == Some(0) {
        match confirmed(d, || d.ack()) {
            Ok(()) => {
                line["acked"] = json!(true);
                line["outcome"] = json!("acked");
            }
            Err(e @ Error::StaleDelivery { .. }) => {
                line["outcome"] = json!("expired");
                line["reason"] = json!(e.to_string());
            }
            Err(e) if e.is_retryable() => unsettled(&mut line, &e),
            Err(e) => return Err(e.into()),
        }
        return Ok(line);
    }
    let mut why = failure(w, ended);
    let mut retry_delay = Duration::ZERO;
    let last = d.attempt >= group.max_deliveries();
    let exhausted = || format!("max deliveries ({}) reached: {why}", group.max_deliveries());
    let (settled, outcome, reason) = if ended.stopped {
        let outcome = if last { "dead_lettered" } else { "given_back" };
        let nack = confirmed(d, || d.nack(Duration::ZERO, Some(&why)));
        (nack, outcome, exhausted())
    } else if ended.code() == Some(EXIT_DEAD_LETTER) {
        let reason = format!("rejected by the consumer: {why}");
        (
            confirmed(d, || d.dead_letter(&why)),
            "dead_lettered",
            reason,
        )
    } else if let Some(delay) = w.retry {
        retry_delay = delay;
        let nack = confirmed(d, || d.nack(delay, Some(&why)));
        let outcome = if last { "dead_lettered" } else { "retried" };
        (nack, outcome, if last { exhausted() } else { why.clone() })
    } else {
        // The group's retry policy, which may not retry the class of the failure.
        if group.retry_policy().is_some() {
            why = classed(ended, why);
        }
        match confirmed(d, || d.retry(Some(&why))) {
            Ok(RetryOutcome::Scheduled { delay }) => {
                retry_delay = delay;
                (Ok(()), "retried", why.clone())
            }
            Ok(RetryOutcome::DeadLettered { reason }) => (Ok(()), "dead_lettered", reason),
            Ok(_) => (Ok(()), "retried", why.clone()),
            Err(e) => (Err(e), "retried", why.clone()),
        }
    };
    match settled {
        Ok(()) => {
            line["outcome"] = json!(outcome);
            match outcome {
                "retried" => line["delay_ms"] = json!(retry_delay.as_millis() as u64),
                "dead_lettered" => line["dead_letter"] = json!(group.dead_letter_mailbox()),
                _ => {}
            }
            line["reason"] = json!(if outcome == "dead_lettered" {
                reason
            } else {
                why
            });
        }
        // The claim ran out while the handler ran (watch was paused, say): the group
        // redelivers the message anyway.
        Err(Error::StaleDelivery { .. }) => {
            line["outcome"] = json!("expired");
            line["reason"] = json!(why);
        }
        Err(e) if e.is_retryable() => {
            unsettled(&mut line, &e);
            line["reason"] = json!(why);
        }
        Err(e) => return Err(e.into()),
    }
    Ok(line)
}

/// The reason of a failed handler for the group's retry policy: with the class of the
/// handler's last stderr line in front (`CLASS: handler exited with 1: ...`) when that
/// line has one (`invalid_payload: no url`, Python's `ValueError: ...`), so that
/// `--no-retry-on` can match it. "Retry later" (exit 75) never has a class.
fn classed(ended: &Ended, why: String) -> String {
    if ended.code() == Some(EXIT_RETRY_LATER) || ended.timed_out || ended.stopped {
        return why;
    }
    let last_line = ended
        .stderr_tail
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty());
    match last_line.and_then(RetryPolicy::class_of) {
        Some(class) => format!("{class}: {why}"),
        None => why,
    }
}

/// Runs `settle` until the server confirms it, retrying while the bus is unavailable
/// (a JetStream failover) and the claim lasts.
fn confirmed<T>(d: &Delivery, settle: impl Fn() -> agentbus::Result<T>) -> agentbus::Result<T> {
    loop {
        match settle() {
            Err(e) if e.is_retryable() && time::OffsetDateTime::now_utc() < d.deadline => {
                std::thread::sleep(Duration::from_millis(200))
            }
            other => return other,
        }
    }
}

/// The claim ran out while the bus was unavailable: nothing was settled, the group
/// delivers the message again, and watch goes on (`"unsettled"` says why).
fn unsettled(line: &mut Value, e: &Error) {
    line["outcome"] = json!("unsettled");
    line["unsettled"] = json!(e.to_string());
}
