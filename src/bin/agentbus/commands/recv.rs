use std::io::Write;
use std::time::Instant;

use agentbus::Error;
use clap::Args;

use super::{delivery_json, open_bus, secs, timed_out};
use crate::output::{emit, error_json, Failure};
use crate::Cli;

/// Read messages without changing any state; prints one message per line.
#[derive(Args, Debug)]
pub struct RecvArgs {
    /// The mailbox.
    mailbox: String,
    /// Start at this seq.
    #[arg(long, default_value_t = 1)]
    from_seq: u64,
    /// Print at most this many messages.
    #[arg(long)]
    max: Option<usize>,
    /// Only this type (repeatable).
    #[arg(long = "type")]
    kinds: Vec<String>,
    /// Only messages from this agent.
    #[arg(long)]
    from: Option<String>,
    /// Only messages with this correlation id.
    #[arg(long)]
    correlation_id: Option<String>,
    /// Claim for this consumer group instead of just reading.
    #[arg(long)]
    group: Option<String>,
    /// Consumer name for claims.
    #[arg(long, env = "AGENTBUS_AGENT", default_value = "cli")]
    consumer: String,
    /// Visibility timeout of the claims, in seconds (default: the group's).
    #[arg(long, requires = "group")]
    visibility: Option<f64>,
    /// Wait up to SECS for a message when none is waiting.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    wait: f64,
}

pub fn run(cli: &Cli, args: &RecvArgs, out: &mut impl Write) -> Result<(), Failure> {
    if args.group.is_some() {
        claim(cli, args, out)
    } else {
        read(cli, args, out)
    }
}

/// How a `recv` waits: woken by file-system events when it waits at all, otherwise
/// without starting a watcher.
fn recv_mode(wait: f64) -> agentbus::WatchMode {
    if wait > 0.0 {
        agentbus::WatchMode::Auto
    } else {
        agentbus::WatchMode::Manual
    }
}

/// `recv` without `--group`: prints the stored messages from `--from-seq` on, waiting
/// up to `--wait` seconds for the first one when none is there.
fn read(cli: &Cli, args: &RecvArgs, out: &mut impl Write) -> Result<(), Failure> {
    let bus = open_bus(cli)?;
    let mut filter = agentbus::Filter::new();
    for kind in &args.kinds {
        filter = filter.of_type(kind);
    }
    if let Some(from) = &args.from {
        filter = filter.sender(from);
    }
    if let Some(id) = &args.correlation_id {
        filter = filter.correlation_id(id);
    }
    let mut rx = bus
        .follow_with(&[args.mailbox.as_str()], recv_mode(args.wait))?
        .from_seq(args.from_seq)
        .filter(filter);
    let deadline = Instant::now() + secs(args.wait)?;
    let max = args.max.unwrap_or(usize::MAX);
    // Damaged records (and seqs compacted away before we got to them) are reported on
    // stderr as they come, and reading goes on; the exit status says whether there
    // were any. They do not count against `--max`.
    let (mut printed, mut damaged) = (0, false);
    while printed < max {
        let until = if printed == 0 {
            deadline
        } else {
            Instant::now()
        };
        match rx.recv_deadline(until) {
            Ok(envelope) => {
                emit(out, &envelope.message)?;
                printed += 1;
            }
            Err(agentbus::RecvTimeoutError::Bus(
                e @ (Error::Corrupt { .. } | Error::Compacted { .. }),
            )) => {
                let _ = out.flush();
                eprintln!("{}", error_json(&e));
                damaged = true;
            }
            Err(agentbus::RecvTimeoutError::Bus(e)) => return Err(Failure::Bus(e)),
            Err(_) => break,
        }
    }
    if damaged {
        Err(Failure::Reported)
    } else {
        Ok(())
    }
}

/// `recv --group`: claims up to `--max` (default 1), waiting up to `--wait` seconds
/// for the first message.
fn claim(cli: &Cli, args: &RecvArgs, out: &mut impl Write) -> Result<(), Failure> {
    let group = open_bus(cli)?
        .mailbox(&args.mailbox)?
        .group(args.group.as_deref().expect("checked by caller"))?;
    let visibility = match args.visibility {
        Some(v) => secs(v)?,
        None => group.visibility(),
    };
    let deadline = Instant::now() + secs(args.wait)?;
    let max = args.max.unwrap_or(1);
    if max == 0 {
        return Ok(());
    }
    let mut rx = group
        .consumer_with(&args.consumer, recv_mode(args.wait))?
        .visibility(visibility);
    let Some(first) = timed_out(rx.recv_deadline(deadline))? else {
        return Ok(());
    };
    // Printed before claiming more, so that a failure there cannot hide a claim.
    emit(out, &delivery_json(&first))?;
    for d in group.claim_for(&args.consumer, max - 1, visibility)? {
        emit(out, &delivery_json(&d))?;
    }
    Ok(())
}
