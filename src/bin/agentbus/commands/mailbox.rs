use std::io::Write;

use agentbus::Error;
use clap::Subcommand;
use serde_json::json;

use super::{open_bus, open_writer, Durable};
use crate::output::{emit, Failure};
use crate::Cli;

/// Create or list mailboxes.
#[derive(Subcommand, Debug)]
pub enum MailboxCommand {
    /// Create mailboxes.
    Create {
        /// Mailbox names.
        #[arg(required = true)]
        names: Vec<String>,
        /// Succeed if the mailbox already exists.
        #[arg(long)]
        exist_ok: bool,
        #[command(flatten)]
        durable: Durable,
    },
    /// List mailboxes.
    List,
}

pub fn run(cli: &Cli, cmd: &MailboxCommand, out: &mut impl Write) -> Result<(), Failure> {
    match cmd {
        MailboxCommand::Create {
            names,
            exist_ok,
            durable,
        } => {
            let bus = open_writer(cli, durable)?;
            for name in names {
                let created = match bus.create_mailbox(name) {
                    Ok(_) => true,
                    Err(Error::MailboxExists { .. }) if *exist_ok => false,
                    Err(e) => return Err(e.into()),
                };
                emit(out, &json!({"mailbox": name, "created": created}))?;
            }
            Ok(())
        }
        MailboxCommand::List => {
            for name in open_bus(cli)?.mailboxes()? {
                emit(out, &json!({ "mailbox": name }))?;
            }
            Ok(())
        }
    }
}
