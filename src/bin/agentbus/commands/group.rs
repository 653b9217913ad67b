use std::io::Write;

use std::time::Duration;

use agentbus::{Error, GroupOptions, RetryPolicy, StartAt};
use clap::Subcommand;
use serde_json::json;

use super::{open_bus, open_writer, secs, CoalesceArgs, Durable, TypeArgs};
use crate::output::{emit, Failure};
use crate::Cli;

/// Create or list consumer groups.
// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// Create a consumer group on a mailbox.
    Create {
        /// The mailbox.
        mailbox: String,
        /// The group.
        group: String,
        /// Deliveries before a message is dead-lettered.
        #[arg(long, default_value_t = 5)]
        max_deliveries: u32,
        /// Default visibility timeout of a claim, in seconds.
        #[arg(long, default_value_t = 30.0)]
        visibility: f64,
        /// Dead-letter mailbox (default `<mailbox>.dlq`).
        #[arg(long)]
        dead_letter: Option<String>,
        /// Deliver only messages sent from now on.
        #[arg(long)]
        from_end: bool,
        /// Succeed if the group already exists.
        #[arg(long)]
        exist_ok: bool,
        /// The types the group delivers (the others are skipped).
        #[command(flatten)]
        types: TypeArgs,
        /// Coalescing, stored with the group (every consumer of it coalesces).
        #[command(flatten)]
        coalesce: CoalesceArgs,
        /// Only deliver messages from this agent to the group (repeatable).
        #[arg(long = "from")]
        senders: Vec<String>,
        #[command(flatten)]
        durable: Durable,
        /// Retry policy: `INITIAL,MULTIPLIER,MAX`, e.g. `1s,2,30s` (1 s, 2 s, 4 s, ...
        /// up to 30 s). Durations take `ms`, `s`, `m` or `h` (a bare number is
        /// seconds). It sets the delay of `nack` without `--delay`, of `watch --exec`
        /// without `--retry-delay`, and after a claim runs out.
        #[arg(long, value_name = "INITIAL,MULTIPLIER,MAX")]
        backoff: Option<String>,
        /// Shorten each retry delay by up to this fraction of it (0 to 1).
        #[arg(long, requires = "backoff")]
        jitter: Option<f64>,
        /// A reason class not to retry (repeatable): a nack whose reason starts with
        /// `CLASS:` dead-letters the message at once.
        #[arg(long, value_name = "CLASS", requires = "backoff")]
        no_retry_on: Vec<String>,
    },
    /// List the groups of a mailbox.
    List {
        /// The mailbox.
        mailbox: String,
    },
    /// Deliver a settled message again, as attempt 1: a damaged record once repaired
    /// (see the `agentbus.damaged` notice in the dead-letter mailbox), or a dead letter
    /// once its consumer is fixed. Prints `{"requeued": false}` if it was not settled.
    Requeue {
        /// The mailbox.
        mailbox: String,
        /// The group.
        group: String,
        /// The message's seq.
        seq: u64,
        #[command(flatten)]
        durable: Durable,
    },
}

pub fn run(cli: &Cli, cmd: &GroupCommand, out: &mut impl Write) -> Result<(), Failure> {
    match cmd {
        GroupCommand::Create {
            mailbox,
            group,
            max_deliveries,
            visibility,
            dead_letter,
            from_end,
            exist_ok,
            types,
            coalesce,
            senders,
            durable,
            backoff,
            jitter,
            no_retry_on,
        } => {
            let mut filter = types.narrow(agentbus::Filter::new())?;
            let mailbox = open_writer(cli, durable)?.mailbox(mailbox)?;
            for f in senders {
                filter = filter.sender(f);
            }
            let mut opts = GroupOptions::new()
                .filter(filter)
                .max_deliveries(*max_deliveries)
                .visibility(secs(*visibility)?)
                .start(if *from_end {
                    StartAt::End
                } else {
                    StartAt::Beginning
                });
            if let Some(dl) = dead_letter {
                opts = opts.dead_letter(dl);
            }
            if let Some(c) = coalesce.get()? {
                opts = opts.coalesce(c);
            }
            if let Some(spec) = backoff {
                let mut policy = parse_backoff(spec)?.jitter(jitter.unwrap_or(0.0));
                for class in no_retry_on {
                    policy = policy.no_retry_on(class);
                }
                opts = opts.retry(policy);
            }
            let created = match mailbox.create_group_with(group, opts) {
                Ok(_) => true,
                Err(Error::GroupExists { .. }) if *exist_ok => false,
                Err(e) => return Err(e.into()),
            };
            emit(
                out,
                &json!({"mailbox": mailbox.name(), "group": group, "created": created}),
            )
        }
        GroupCommand::List { mailbox } => {
            let mailbox = open_bus(cli)?.mailbox(mailbox)?;
            for name in mailbox.groups()? {
                let g = mailbox.group(&name)?;
                emit(
                    out,
                    &json!({
                        "mailbox": mailbox.name(),
                        "group": name,
                        "max_deliveries": g.max_deliveries(),
                        "visibility_ms": g.visibility().as_millis() as u64,
                        "dead_letter": g.dead_letter_mailbox(),
                        "filter": g.filter(),
                        "coalesce": g.coalesce(),
                        "retry": g.retry_policy().map(policy_json),
                    }),
                )?;
            }
            Ok(())
        }
        GroupCommand::Requeue {
            mailbox,
            group,
            seq,
            durable,
        } => {
            let group = open_writer(cli, durable)?.mailbox(mailbox)?.group(group)?;
            let requeued = group.requeue(*seq)?;
            emit(
                out,
                &json!({"mailbox": mailbox, "group": group.name(), "seq": seq, "requeued": requeued}),
            )
        }
    }
}

/// A retry policy as `group list` shows it: `null` without one.
fn policy_json(p: &RetryPolicy) -> serde_json::Value {
    json!({
        "initial_ms": p.initial_delay().as_millis() as u64,
        "multiplier": p.multiplier(),
        "max_ms": p.max_delay().as_millis() as u64,
        "jitter": p.jitter_fraction(),
        "no_retry_on": p.non_retryable(),
    })
}

/// `--backoff INITIAL,MULTIPLIER,MAX`.
fn parse_backoff(spec: &str) -> Result<RetryPolicy, Failure> {
    let usage = |why: String| {
        Failure::Usage(format!(
            "--backoff {spec:?}: {why}; give INITIAL,MULTIPLIER,MAX such as 1s,2,30s"
        ))
    };
    let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
    let [initial, multiplier, max] = parts[..] else {
        return Err(usage(format!("{} parts, not 3", parts.len())));
    };
    let multiplier: f64 = multiplier
        .parse()
        .map_err(|_| usage(format!("{multiplier:?} is not a number")))?;
    Ok(RetryPolicy::exponential(
        duration(initial).map_err(usage)?,
        multiplier,
        duration(max).map_err(usage)?,
    ))
}

/// A duration such as `250ms`, `1.5s`, `2m`, `1h`, or a bare number of seconds.
fn duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| c.is_ascii_alphabetic()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let scale = match unit {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("{text:?} has an unknown unit (use ms, s, m or h)")),
    };
    number
        .parse::<f64>()
        .ok()
        .and_then(|n| Duration::try_from_secs_f64(n * scale).ok())
        .ok_or_else(|| format!("{text:?} is not a duration"))
}
