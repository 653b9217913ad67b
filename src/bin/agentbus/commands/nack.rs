use std::io::Write;

use clap::Args;
use serde_json::json;

use super::{secs, target_delivery, Target};
use crate::output::{emit, Failure};
use crate::Cli;

/// Give a claimed message back for redelivery, optionally after a delay.
#[derive(Args, Debug)]
pub struct NackArgs {
    #[command(flatten)]
    target: Target,
    /// Redeliver after this many seconds.
    #[arg(long, default_value_t = 0.0)]
    delay: f64,
    /// Why, kept in the message's delivery history.
    #[arg(long)]
    reason: Option<String>,
}

pub fn run(cli: &Cli, args: &NackArgs, out: &mut impl Write) -> Result<(), Failure> {
    let target = &args.target;
    let (delay, reason) = (secs(args.delay)?, args.reason.as_deref());
    match target_delivery(cli, target)? {
        (_, Some(d)) => d.nack(delay, reason)?,
        (group, None) => group.nack(target.seq, delay, reason)?,
    }
    emit(out, &json!({"seq": target.seq, "nacked": true}))
}
