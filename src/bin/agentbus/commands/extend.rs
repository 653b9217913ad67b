use std::io::Write;

use clap::Args;
use serde_json::json;

use super::{secs, target_delivery, Target};
use crate::output::{emit, Failure};
use crate::Cli;

/// Keep the claim on a message for longer ("still working").
#[derive(Args, Debug)]
pub struct ExtendArgs {
    #[command(flatten)]
    target: Target,
    /// Seconds from now.
    #[arg(long, default_value_t = 30.0)]
    by: f64,
}

pub fn run(cli: &Cli, args: &ExtendArgs, out: &mut impl Write) -> Result<(), Failure> {
    let target = &args.target;
    let by = secs(args.by)?;
    match target_delivery(cli, target)? {
        (_, Some(d)) => d.extend(by)?,
        (group, None) => group.extend(target.seq, by)?,
    }
    emit(out, &json!({"seq": target.seq, "extended": true}))
}
