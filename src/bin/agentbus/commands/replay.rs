use std::io::Write;

use agentbus::NewMessage;
use clap::Args;
use serde_json::{json, Value};

use super::{open_writer, stored, Durable};
use crate::output::{emit, Failure};
use crate::Cli;

/// Send dead letters back to the mailbox they came from.
#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// The dead-letter mailbox.
    mailbox: String,
    /// Seqs of the dead letters to replay.
    #[arg(required = true)]
    seqs: Vec<u64>,
    #[command(flatten)]
    durable: Durable,
}

pub fn run(cli: &Cli, args: &ReplayArgs, out: &mut impl Write) -> Result<(), Failure> {
    let mailbox = &args.mailbox;
    let bus = open_writer(cli, &args.durable)?;
    let dlq = bus.mailbox(mailbox)?;
    for &seq in &args.seqs {
        let dead = stored(&dlq, seq)?
            .ok_or_else(|| Failure::Usage(format!("{mailbox} has no message {seq}")))?;
        let origin = dead
            .headers
            .get(agentbus::DEAD_LETTER_HEADER)
            .and_then(|h| serde_json::from_str::<Value>(h).ok())
            .and_then(|v| v["mailbox"].as_str().map(str::to_owned))
            .ok_or_else(|| Failure::Usage(format!("{mailbox} {seq} is not a dead letter")))?;
        let receipt = bus.mailbox(&origin)?.send(NewMessage::replay_of(&dead))?;
        emit(out, &json!({"replayed": seq, "receipt": receipt}))?;
    }
    Ok(())
}
