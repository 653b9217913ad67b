use std::io::Write;
use std::time::Duration;

use agentbus::Error;
use clap::Args;
use serde_json::{json, Value};

use super::{delivery_json, open_bus, secs, timed_out};
use crate::output::{emit, Failure};
use crate::Cli;

/// Stream messages as they arrive (woken by file-system events, with a polling
/// fallback); with `--exec`, run a handler per message.
#[derive(Args, Debug)]
pub struct WatchArgs {
    /// The mailbox.
    mailbox: String,
    /// Claim for this consumer group (at-least-once, acked per message) instead of
    /// just reading.
    #[arg(long)]
    group: Option<String>,
    /// Consumer name for claims.
    #[arg(long, env = "AGENTBUS_AGENT", default_value = "cli")]
    consumer: String,
    /// Only this type (repeatable). Without `--group` only; a group filters with
    /// `group create --type`.
    #[arg(long = "type")]
    kinds: Vec<String>,
    /// Without `--group`: start at this seq instead of the end (new messages only).
    #[arg(long)]
    from_seq: Option<u64>,
    /// Run this shell command per message: the message JSON on stdin, fields in
    /// AGENTBUS_* environment variables. With `--group`, exit 0 acks and anything else
    /// nacks (the message is redelivered). While the bus is unavailable (a failover),
    /// the ack or nack is retried until the claim runs out; a line with `"unsettled"`
    /// says it was not settled (the message comes again).
    #[arg(long)]
    exec: Option<String>,
    /// Seconds before a failed handler's message is redelivered.
    #[arg(long, default_value_t = 0.0)]
    retry_delay: f64,
    /// Visibility timeout of the claims, in seconds (default: the group's).
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
}

/// `watch`: stream messages (or run a handler per message) as they arrive.
pub fn run(cli: &Cli, args: &WatchArgs, out: &mut impl Write) -> Result<(), Failure> {
    let mode = if args.poll {
        agentbus::WatchMode::PollOnly
    } else {
        agentbus::WatchMode::Auto
    };
    let bus = open_bus(cli)?;
    let idle = args.idle_timeout.map(secs).transpose()?;
    let max = args.max.unwrap_or(usize::MAX);
    let retry = secs(args.retry_delay)?;
    let patience = idle.unwrap_or(Duration::from_secs(3600));
    match &args.group {
        Some(group) => {
            if !args.kinds.is_empty() || args.from_seq.is_some() {
                return Err(Failure::Usage(
                    "with --group, filter with `group create --type` and the group decides \
                     where to start"
                        .into(),
                ));
            }
            let group = bus.mailbox(&args.mailbox)?.group(group)?;
            let mut rx = group.consumer_with(&args.consumer, mode)?;
            if let Some(v) = args.visibility {
                rx = rx.visibility(secs(v)?);
            }
            pump(max, idle.is_some(), out, || {
                Ok(match timed_out(rx.recv_timeout(patience))? {
                    Some(d) => Some(handle_delivery(&d, args.exec.as_deref(), retry)?),
                    None => None,
                })
            })?;
        }
        None => {
            let mut rx = bus.follow_with(&[args.mailbox.as_str()], mode)?;
            if let Some(seq) = args.from_seq {
                rx = rx.from_seq(seq);
            }
            for k in &args.kinds {
                rx = rx.of_type(k);
            }
            pump(max, idle.is_some(), out, || {
                Ok(match timed_out(rx.recv_timeout(patience))? {
                    Some(env) => Some(handle_message(
                        &env.message,
                        &args.mailbox,
                        args.exec.as_deref(),
                    )?),
                    None => None,
                })
            })?;
        }
    }
    Ok(())
}

/// Emits what `next` yields, one line each, until `max` lines, or until `next` times out
/// when `stop_when_idle`.
fn pump(
    max: usize,
    stop_when_idle: bool,
    out: &mut impl Write,
    mut next: impl FnMut() -> Result<Option<Value>, Failure>,
) -> Result<(), Failure> {
    let mut handled = 0;
    while handled < max {
        match next()? {
            Some(line) => {
                emit(out, &line)?;
                out.flush().ok();
                handled += 1;
            }
            None if stop_when_idle => break,
            None => {}
        }
    }
    Ok(())
}

/// Runs `cmd` for one message; returns its exit code and the last of its stderr.
fn run_handler(
    cmd: &str,
    message: &agentbus::Message,
    env: &[(&str, String)],
) -> Result<(i32, String), Failure> {
    use std::process::{Command, Stdio};
    let json = serde_json::to_vec(message).expect("message serializes");
    let mut command = Command::new("sh");
    command.arg("-c").arg(cmd);
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().map_err(|e| Error::Io {
        op: "run handler",
        path: cmd.into(),
        source: e,
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&json);
    }
    let output = child.wait_with_output().map_err(|e| Error::Io {
        op: "wait for handler",
        path: cmd.into(),
        source: e,
    })?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: String = stderr
        .chars()
        .rev()
        .take(500)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Ok((output.status.code().unwrap_or(-1), tail.trim().to_owned()))
}

fn message_env(m: &agentbus::Message, mailbox: &str) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("AGENTBUS_MAILBOX", mailbox.to_owned()),
        ("AGENTBUS_SEQ", m.seq.to_string()),
        ("AGENTBUS_ID", m.id.to_string()),
        ("AGENTBUS_TYPE", m.kind.clone()),
        ("AGENTBUS_FROM", m.from.clone()),
    ];
    if let Some(s) = &m.subject {
        env.push(("AGENTBUS_SUBJECT", s.clone()));
    }
    if let Some(c) = &m.correlation_id {
        env.push(("AGENTBUS_CORRELATION_ID", c.clone()));
    }
    env
}

fn handle_message(
    m: &agentbus::Message,
    mailbox: &str,
    exec: Option<&str>,
) -> Result<Value, Failure> {
    let Some(cmd) = exec else {
        return Ok(serde_json::to_value(m).expect("message serializes"));
    };
    let (code, _) = run_handler(cmd, m, &message_env(m, mailbox))?;
    Ok(json!({"mailbox": mailbox, "seq": m.seq, "exit": code}))
}

fn handle_delivery(
    d: &agentbus::Delivery,
    exec: Option<&str>,
    retry: Duration,
) -> Result<Value, Failure> {
    let group = d.group();
    let Some(cmd) = exec else {
        return Ok(delivery_json(d));
    };
    let mailbox = group.mailbox().name().to_owned();
    let mut env = message_env(&d.message, &mailbox);
    env.push(("AGENTBUS_GROUP", group.name().to_owned()));
    env.push(("AGENTBUS_ATTEMPT", d.attempt.to_string()));
    let (code, stderr) = run_handler(cmd, &d.message, &env)?;
    let acked = code == 0;
    let unsettled = if acked {
        settle_retrying(d, || d.ack())?
    } else {
        let reason = format!("handler exited with {code}: {stderr}");
        settle_retrying(d, || d.nack(retry, Some(&reason)))?
    };
    let mut line = json!({"mailbox": mailbox, "group": group.name(), "seq": d.seq(),
                          "attempt": d.attempt, "exit": code, "acked": acked && unsettled.is_none()});
    if let Some(e) = unsettled {
        line["unsettled"] = json!(e);
    }
    Ok(line)
}

/// Acks or nacks `d` with `settle`, retrying while the bus is unavailable (a failover)
/// until the claim runs out. Then, or when the claim ran out while the handler ran
/// (stale), the message is redelivered anyway: the watch goes on, and the line says
/// why it is not settled (`"unsettled"`).
fn settle_retrying(
    d: &agentbus::Delivery,
    settle: impl Fn() -> agentbus::Result<()>,
) -> Result<Option<String>, Failure> {
    loop {
        match settle() {
            Ok(()) => return Ok(None),
            Err(e @ Error::StaleDelivery { .. }) => return Ok(Some(e.to_string())),
            Err(e) if e.is_retryable() => {
                if time::OffsetDateTime::now_utc() >= d.deadline {
                    return Ok(Some(e.to_string()));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(e.into()),
        }
    }
}
