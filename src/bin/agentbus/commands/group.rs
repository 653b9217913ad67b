use std::io::Write;

use agentbus::{Error, GroupOptions, StartAt};
use clap::Subcommand;
use serde_json::json;

use super::{open_bus, open_writer, secs, CoalesceArgs, Durable, TypeArgs};
use crate::output::{emit, Failure};
use crate::Cli;

/// Create or list consumer groups.
#[derive(Subcommand, Debug)]
pub enum GroupCommand {
    /// Create a consumer group on a mailbox.
    Create {
        /// The mailbox.
        mailbox: String,
        /// The group.
        group: String,
        /// Deliveries before a message is dead-lettered.
        #[arg(long, default_value_t = 5)]
        max_deliveries: u32,
        /// Default visibility timeout of a claim, in seconds.
        #[arg(long, default_value_t = 30.0)]
        visibility: f64,
        /// Dead-letter mailbox (default `<mailbox>.dlq`).
        #[arg(long)]
        dead_letter: Option<String>,
        /// Deliver only messages sent from now on.
        #[arg(long)]
        from_end: bool,
        /// Succeed if the group already exists.
        #[arg(long)]
        exist_ok: bool,
        /// The types the group delivers (the others are skipped).
        #[command(flatten)]
        types: TypeArgs,
        /// Coalescing, stored with the group (every consumer of it coalesces).
        #[command(flatten)]
        coalesce: CoalesceArgs,
        /// Only deliver messages from this agent to the group (repeatable).
        #[arg(long = "from")]
        senders: Vec<String>,
        #[command(flatten)]
        durable: Durable,
    },
    /// List the groups of a mailbox.
    List {
        /// The mailbox.
        mailbox: String,
    },
    /// Deliver a settled message again, as attempt 1: a damaged record once repaired
    /// (see the `agentbus.damaged` notice in the dead-letter mailbox), or a dead letter
    /// once its consumer is fixed. Prints `{"requeued": false}` if it was not settled.
    Requeue {
        /// The mailbox.
        mailbox: String,
        /// The group.
        group: String,
        /// The message's seq.
        seq: u64,
        #[command(flatten)]
        durable: Durable,
    },
}

pub fn run(cli: &Cli, cmd: &GroupCommand, out: &mut impl Write) -> Result<(), Failure> {
    match cmd {
        GroupCommand::Create {
            mailbox,
            group,
            max_deliveries,
            visibility,
            dead_letter,
            from_end,
            exist_ok,
            types,
            coalesce,
            senders,
            durable,
        } => {
            let mut filter = types.narrow(agentbus::Filter::new())?;
            let mailbox = open_writer(cli, durable)?.mailbox(mailbox)?;
            for f in senders {
                filter = filter.sender(f);
            }
            let mut opts = GroupOptions::new()
                .filter(filter)
                .max_deliveries(*max_deliveries)
                .visibility(secs(*visibility)?)
                .start(if *from_end {
                    StartAt::End
                } else {
                    StartAt::Beginning
                });
            if let Some(dl) = dead_letter {
                opts = opts.dead_letter(dl);
            }
            if let Some(c) = coalesce.get()? {
                opts = opts.coalesce(c);
            }
            let created = match mailbox.create_group_with(group, opts) {
                Ok(_) => true,
                Err(Error::GroupExists { .. }) if *exist_ok => false,
                Err(e) => return Err(e.into()),
            };
            emit(
                out,
                &json!({"mailbox": mailbox.name(), "group": group, "created": created}),
            )
        }
        GroupCommand::List { mailbox } => {
            let mailbox = open_bus(cli)?.mailbox(mailbox)?;
            for name in mailbox.groups()? {
                let g = mailbox.group(&name)?;
                emit(
                    out,
                    &json!({
                        "mailbox": mailbox.name(),
                        "group": name,
                        "max_deliveries": g.max_deliveries(),
                        "visibility_ms": g.visibility().as_millis() as u64,
                        "dead_letter": g.dead_letter_mailbox(),
                        "filter": g.filter(),
                        "coalesce": g.coalesce(),
                    }),
                )?;
            }
            Ok(())
        }
        GroupCommand::Requeue {
            mailbox,
            group,
            seq,
            durable,
        } => {
            let group = open_writer(cli, durable)?.mailbox(mailbox)?.group(group)?;
            let requeued = group.requeue(*seq)?;
            emit(
                out,
                &json!({"mailbox": mailbox, "group": group.name(), "seq": seq, "requeued": requeued}),
            )
        }
    }
}
