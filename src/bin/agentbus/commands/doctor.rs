use std::io::Write;

use clap::Args;
use serde_json::json;

use super::{open_writer, Durable};
use crate::output::{emit, path_json, Failure};
use crate::Cli;

/// Verify every record of every mailbox; `--repair` truncates torn tails.
#[derive(Args, Debug)]
pub struct DoctorArgs {
    /// Truncate torn final lines (left by crashed writers).
    #[arg(long)]
    repair: bool,
    #[command(flatten)]
    durable: Durable,
}

pub fn run(cli: &Cli, args: &DoctorArgs, out: &mut impl Write) -> Result<(), Failure> {
    let report = open_writer(cli, &args.durable)?.doctor(args.repair)?;
    for p in &report.problems {
        emit(
            out,
            &json!({"problem": p.kind, "mailbox": p.mailbox, "path": path_json(&p.path),
            "line": p.line, "detail": p.detail, "repaired": p.repaired}),
        )?;
    }
    let repaired = report.problems.iter().filter(|p| p.repaired).count();
    emit(
        out,
        &json!({
            "doctor": if report.is_clean() { "clean" } else { "problems" },
            "mailboxes": report.mailboxes,
            "records": report.records,
            "problems": report.problems.len(),
            "repaired": repaired,
        }),
    )?;
    if report.is_clean() {
        Ok(())
    } else {
        Err(Failure::Unclean)
    }
}
