use std::io::Write;

use clap::Args;
use serde_json::json;

use super::{open_writer, Durable};
use crate::output::{emit, Failure};
use crate::Cli;

/// Acknowledge delivered messages (done).
#[derive(Args, Debug)]
pub struct AckArgs {
    /// The mailbox.
    mailbox: String,
    /// The consumer group.
    #[arg(long)]
    group: String,
    /// Seqs to ack.
    #[arg(required_unless_present = "upto")]
    seqs: Vec<u64>,
    /// Ack every delivered message up to and including this seq.
    #[arg(long)]
    upto: Option<u64>,
    #[command(flatten)]
    durable: Durable,
}

pub fn run(cli: &Cli, args: &AckArgs, out: &mut impl Write) -> Result<(), Failure> {
    let group = open_writer(cli, &args.durable)?
        .mailbox(&args.mailbox)?
        .group(&args.group)?;
    if let Some(upto) = args.upto {
        let n = group.ack_upto(upto)?;
        emit(out, &json!({"upto": upto, "acked": n}))?;
    }
    for &seq in &args.seqs {
        let acked = group.ack(seq)?;
        emit(out, &json!({"seq": seq, "acked": acked}))?;
    }
    Ok(())
}
