use std::io::Write;
use std::time::Instant;

use agentbus::Error;
use clap::Args;

use super::{agent_or_cli, open_bus, open_writer, secs, timed_out, Durable, TypeArgs};
use crate::lines::{verify, MessageLine};
use crate::output::{emit, error_json, Failure};
use crate::Cli;

/// Read messages without changing any state, or with `--group` claim them; prints one
/// message per line.
#[derive(Args, Debug)]
pub struct RecvArgs {
    /// The mailbox.
    mailbox: String,
    /// Start at this seq.
    #[arg(long, default_value_t = 1)]
    from_seq: u64,
    /// At most this many messages. Without `--group`: print at most N (default: every
    /// stored message from `--from-seq` on). With `--group`: claim at most N (default
    /// 1: claim one, handle it, ack it, run `recv` again; README "Session-start drain").
    #[arg(long)]
    max: Option<usize>,
    #[command(flatten)]
    types: TypeArgs,
    /// Only messages from this agent.
    #[arg(long)]
    from: Option<String>,
    /// Only messages with this correlation id.
    #[arg(long)]
    correlation_id: Option<String>,
    /// Claim for this consumer group instead of just reading.
    #[arg(long)]
    group: Option<String>,
    /// The consumer name for claims (default: `--agent`, else `cli`).
    #[arg(long, requires = "group")]
    consumer: Option<String>,
    /// Visibility timeout of the claims, in seconds (default: the group's).
    #[arg(long, requires = "group")]
    visibility: Option<f64>,
    /// Wait up to SECS for a message when none is waiting.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    wait: f64,
    /// Check each message's artifacts (size and SHA-256) and say so in it:
    /// `"verified"` true or false, `"verify_error"` the first failure or null.
    #[arg(long)]
    verify: bool,
    /// With `--group`: how the claims are written.
    #[command(flatten)]
    durable: Durable,
}

pub fn run(cli: &Cli, args: &RecvArgs, out: &mut impl Write) -> Result<(), Failure> {
    if args.group.is_some() {
        if !args.types.is_empty() {
            return Err(Failure::Usage(
                "with --group, filter with `group create --type` or `--not-type`".into(),
            ));
        }
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
    let mut filter = args.types.narrow(agentbus::Filter::new())?;
    let bus = open_bus(cli)?;
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
                emit(out, &line(args, MessageLine::new(&envelope.message)))?;
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
    let group = open_writer(cli, &args.durable)?
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
    let consumer = agent_or_cli(cli, &args.consumer);
    let mut rx = group
        .consumer_with(consumer, recv_mode(args.wait))?
        .visibility(visibility);
    let Some(first) = timed_out(rx.recv_deadline(deadline))? else {
        return Ok(());
    };
    // Printed before claiming more, so that a failure there cannot hide a claim.
    emit(out, &line(args, MessageLine::delivery(&first)))?;
    for d in group.claim_for(consumer, max - 1, visibility)? {
        emit(out, &line(args, MessageLine::delivery(&d)))?;
    }
    Ok(())
}

/// `m`, with `--verify` its artifacts checked.
fn line<'a>(args: &RecvArgs, m: MessageLine<'a>) -> MessageLine<'a> {
    if args.verify {
        let checked = verify(m.message());
        m.verified(checked.as_ref().map(|_| ()))
    } else {
        m
    }
}
