use std::io::Write;

use clap::Args;

use super::{mailboxes, open_bus};
use crate::output::{emit, Failure};
use crate::Cli;

/// Counters per mailbox and group: published, delivered, acked, in flight,
/// pending, redelivered, dead, lag, oldest unacked age.
#[derive(Args, Debug)]
pub struct StatsArgs {
    /// Only this mailbox.
    mailbox: Option<String>,
}

pub fn run(cli: &Cli, args: &StatsArgs, out: &mut impl Write) -> Result<(), Failure> {
    for mb in mailboxes(&open_bus(cli)?, args.mailbox.as_deref())? {
        emit(out, &mb.stats()?)?;
    }
    Ok(())
}
