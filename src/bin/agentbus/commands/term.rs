use std::io::Write;

use clap::Args;
use serde_json::json;

use super::{target_delivery, Target};
use crate::output::{emit, Failure};
use crate::Cli;

/// Give up on a claimed message for good (no redelivery).
#[derive(Args, Debug)]
pub struct TermArgs {
    #[command(flatten)]
    target: Target,
    /// Why.
    #[arg(long)]
    reason: Option<String>,
}

pub fn run(cli: &Cli, args: &TermArgs, out: &mut impl Write) -> Result<(), Failure> {
    let (target, reason) = (&args.target, args.reason.as_deref());
    match target_delivery(cli, target)? {
        (_, Some(d)) => d.term(reason)?,
        (group, None) => group.term(target.seq, reason)?,
    }
    emit(out, &json!({"seq": target.seq, "terminated": true}))
}
