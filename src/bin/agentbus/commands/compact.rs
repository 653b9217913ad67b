use std::io::Write;

use clap::Args;

use super::{mailboxes, open_writer, secs, Durable};
use crate::output::{emit, Failure};
use crate::Cli;

/// Remove segments that every group has settled.
#[derive(Args, Debug)]
pub struct CompactArgs {
    /// Only this mailbox.
    mailbox: Option<String>,
    /// Keep segments written in the last SECS seconds.
    #[arg(long)]
    retention: Option<f64>,
    #[command(flatten)]
    durable: Durable,
}

pub fn run(cli: &Cli, args: &CompactArgs, out: &mut impl Write) -> Result<(), Failure> {
    let retention = args.retention.map(secs).transpose()?;
    for mb in mailboxes(&open_writer(cli, &args.durable)?, args.mailbox.as_deref())? {
        let mut report = mb.compact(retention)?;
        // Printed as `path_json` prints paths: JSON text cannot hold bytes that are not UTF-8.
        for path in &mut report.removed {
            *path = path.to_string_lossy().into_owned().into();
        }
        emit(out, &report)?;
    }
    Ok(())
}
