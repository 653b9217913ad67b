use std::io::{self, Read, Write};
use std::path::PathBuf;

use agentbus::{Artifact, Error, NewMessage};
use clap::Args;
use serde_json::Value;

use super::{agent_or_cli, open_writer, Durable};
use crate::output::{emit, Failure};
use crate::Cli;

/// Send a message; prints its receipt.
#[derive(Args, Debug)]
pub struct SendArgs {
    /// The mailbox.
    mailbox: String,
    /// Message type, for example `task`.
    #[arg(long = "type")]
    kind: String,
    /// The sending agent (default: `--agent`, else `cli`).
    #[arg(long)]
    from: Option<String>,
    /// Subject line.
    #[arg(long)]
    subject: Option<String>,
    /// Body text.
    #[arg(long, conflicts_with = "body_file")]
    body: Option<String>,
    /// Read the body from a file (`-` for stdin).
    #[arg(long)]
    body_file: Option<PathBuf>,
    /// Structured payload, as JSON.
    #[arg(long)]
    payload: Option<String>,
    /// A file to attach by path, size and SHA-256 (repeatable).
    #[arg(long = "artifact")]
    artifacts: Vec<PathBuf>,
    /// Correlation id.
    #[arg(long)]
    correlation_id: Option<String>,
    /// Causation id.
    #[arg(long)]
    causation_id: Option<String>,
    /// Idempotency key: a repeated key returns the original receipt.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Priority (higher is more urgent).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// A header, `KEY=VALUE` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
    #[command(flatten)]
    durable: Durable,
}

pub fn run(cli: &Cli, args: &SendArgs, out: &mut impl Write) -> Result<(), Failure> {
    let bus = open_writer(cli, &args.durable)?;
    let mailbox = bus.mailbox(&args.mailbox)?;
    let receipt = mailbox.send(build_message(agent_or_cli(cli, &args.from), args)?)?;
    emit(out, &receipt)
}

fn build_message(from: &str, args: &SendArgs) -> Result<NewMessage, Failure> {
    let mut msg = NewMessage::new(&args.kind)
        .from(from)
        .priority(args.priority);
    if let Some(s) = &args.subject {
        msg = msg.subject(s);
    }
    if let Some(b) = &args.body {
        msg = msg.body(b);
    }
    if let Some(path) = &args.body_file {
        let mut body = Vec::new();
        let read = if path.as_os_str() == "-" {
            io::stdin().read_to_end(&mut body)
        } else {
            std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut body))
        };
        read.map_err(|e| Error::Io {
            op: "read body",
            path: path.clone(),
            source: e,
        })?;
        let body = String::from_utf8(body).map_err(|e| {
            Error::InvalidMessage(format!(
                "--body-file {}: a body is text, and this is not UTF-8 ({}); send the \
                 file as an --artifact instead",
                path.display(),
                e.utf8_error()
            ))
        })?;
        msg = msg.body(body);
    }
    if let Some(p) = &args.payload {
        let value: Value = serde_json::from_str(p)
            .map_err(|e| Error::InvalidMessage(format!("--payload is not valid JSON: {e}")))?;
        msg = msg.payload(value);
    }
    for path in &args.artifacts {
        msg = msg.artifact(Artifact::capture(path)?);
    }
    if let Some(id) = &args.correlation_id {
        msg = msg.correlation_id(id);
    }
    if let Some(id) = &args.causation_id {
        msg = msg.causation_id(id);
    }
    if let Some(k) = &args.idempotency_key {
        msg = msg.idempotency_key(k);
    }
    for h in &args.headers {
        let (k, v) = h
            .split_once('=')
            .ok_or_else(|| Failure::Usage(format!("--header {h:?} is not KEY=VALUE")))?;
        if k.is_empty() {
            return Err(Error::InvalidMessage(format!(
                "--header {h:?} has no name: write KEY=VALUE with a non-empty KEY"
            ))
            .into());
        }
        msg = msg.header(k, v);
    }
    Ok(msg)
}
