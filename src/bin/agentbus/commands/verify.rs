use std::io::Write;

use agentbus::Message;
use clap::Args;
use serde::Serialize;

use super::{open_bus, stored};
use crate::lines::verify;
use crate::output::{emit, Failure};
use crate::Cli;

/// Check a message's artifacts: each file exists, is a regular file, and has the size
/// and SHA-256 it was sent with. Prints {"mailbox","seq","verified","artifacts"}
/// (the number checked); exit 6, with the first failure, if one differs.
#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// The mailbox.
    mailbox: String,
    /// The message's seq.
    seq: u64,
}

/// What `verify` and `handoff verify` print when every artifact is intact.
#[derive(Serialize)]
pub struct Verified<'a> {
    mailbox: &'a str,
    seq: u64,
    verified: bool,
    artifacts: usize,
}

pub fn verified<'a>(mailbox: &'a str, m: &Message) -> Verified<'a> {
    Verified {
        mailbox,
        seq: m.seq,
        verified: true,
        artifacts: m.artifacts.len(),
    }
}

pub fn run(cli: &Cli, args: &VerifyArgs, out: &mut impl Write) -> Result<(), Failure> {
    let mailbox = open_bus(cli)?.mailbox(&args.mailbox)?;
    let m = stored(&mailbox, args.seq)?
        .ok_or_else(|| Failure::Usage(format!("{} has no message {}", args.mailbox, args.seq)))?;
    verify(&m)?;
    emit(out, &verified(&args.mailbox, &m))
}
