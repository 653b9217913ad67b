use std::io::Write;

use agentbus::RetryOutcome;
use clap::Args;
use serde_json::json;

use super::{secs, target_delivery, Target};
use crate::output::{emit, Failure};
use crate::Cli;

/// Give a claimed message back for redelivery, after `--delay` or the group's retry
/// policy (`group create --backoff`; at once without one).
#[derive(Args, Debug)]
pub struct NackArgs {
    #[command(flatten)]
    target: Target,
    /// Redeliver after this many seconds (default: the group's retry policy's delay
    /// for this attempt; at once without one). Prints `delay_ms` without it.
    #[arg(long)]
    delay: Option<f64>,
    /// Why, kept in the message's delivery history. Starting with a class (`CLASS:
    /// ...`) the group's policy does not retry, it dead-letters the message at once.
    #[arg(long)]
    reason: Option<String>,
}

pub fn run(cli: &Cli, args: &NackArgs, out: &mut impl Write) -> Result<(), Failure> {
    let target = &args.target;
    let reason = args.reason.as_deref();
    let (group, delivery) = target_delivery(cli, target)?;
    let Some(delay) = args.delay else {
        let outcome = match delivery {
            Some(d) => d.retry(reason)?,
            None => group.retry(target.seq, reason)?,
        };
        let mut line = json!({"seq": target.seq, "nacked": true});
        match outcome {
            RetryOutcome::Scheduled { delay } => line["delay_ms"] = json!(delay.as_millis() as u64),
            RetryOutcome::DeadLettered { reason } => {
                line["dead_lettered"] = json!(true);
                line["reason"] = json!(reason);
            }
            _ => {}
        }
        return emit(out, &line);
    };
    let delay = secs(delay)?;
    match delivery {
        Some(d) => d.nack(delay, reason)?,
        None => group.nack(target.seq, delay, reason)?,
    }
    emit(out, &json!({"seq": target.seq, "nacked": true}))
}
