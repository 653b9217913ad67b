use std::io::Write;
use std::path::PathBuf;

use agentbus::Error;
use clap::Subcommand;
use serde::Serialize;
use serde_json::{json, Value};

use super::lease::as_held;
use super::verify::verified;
use super::{agent, open_bus, open_writer, secs, stored, Durable};
use crate::lines::{verify, LeaseLine, MessageLine};
use crate::output::{emit, Failure};
use crate::Cli;

// Parsed once per process: the size of the largest variant does not matter.
/// Hand work to another agent with verified artifacts, or answer a handoff.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum HandoffCommand {
    /// Send a handoff; prints its receipt.
    Send {
        /// The receiving mailbox.
        mailbox: String,
        /// The sending agent (default: `--agent`).
        #[arg(long)]
        from: Option<String>,
        /// One line: what this handoff is.
        #[arg(long)]
        summary: String,
        /// State to resume from, as JSON.
        #[arg(long)]
        state: Option<String>,
        /// Something that changed (repeatable).
        #[arg(long)]
        changed: Vec<String>,
        /// Something that remains (repeatable).
        #[arg(long)]
        remaining: Vec<String>,
        /// The next step.
        #[arg(long)]
        next_step: Option<String>,
        /// A blocker or assumption (repeatable).
        #[arg(long)]
        blocker: Vec<String>,
        /// A file to hand over, pinned by size and SHA-256 (repeatable).
        #[arg(long = "artifact")]
        artifacts: Vec<PathBuf>,
        /// A lease you hold that goes with the work.
        #[arg(long, requires = "token")]
        lease: Option<String>,
        /// Your token for `--lease`.
        #[arg(long)]
        token: Option<u64>,
        /// Mailbox for the answer (default: your agent name).
        #[arg(long)]
        reply_to: Option<String>,
        /// Correlation id.
        #[arg(long)]
        correlation_id: Option<String>,
        #[command(flatten)]
        durable: Durable,
    },
    /// Take the next handoff waiting in a mailbox, as `--agent` (prints it, with
    /// "verified" and "verify_error").
    Recv {
        /// The mailbox.
        mailbox: String,
        /// Wait up to SECS for one.
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        wait: f64,
        #[command(flatten)]
        durable: Durable,
    },
    /// Print a handoff (read-only).
    Show {
        /// The mailbox.
        mailbox: String,
        /// The handoff's seq.
        seq: u64,
    },
    /// Check a handoff's artifacts (exists, size, SHA-256). Exit 6 if one fails.
    Verify {
        /// The mailbox.
        mailbox: String,
        /// The handoff's seq.
        seq: u64,
    },
    /// Accept a handoff as `--agent`: verify, take over its lease, answer the sender.
    /// Prints {"seq","accepted","lease"} (the lease as `lease show` prints it, or null).
    Accept {
        /// The mailbox.
        mailbox: String,
        /// The handoff's seq.
        seq: u64,
        /// Seconds the lease you take over lasts unless renewed (default 300).
        #[arg(long)]
        ttl: Option<f64>,
        #[command(flatten)]
        durable: Durable,
    },
    /// Reject a handoff as `--agent`; the sender sees the reason.
    Reject {
        /// The mailbox.
        mailbox: String,
        /// The handoff's seq.
        seq: u64,
        /// Why.
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        durable: Durable,
    },
}

/// What `handoff accept` prints.
#[derive(Serialize)]
struct Accepted<'a> {
    seq: u64,
    accepted: bool,
    lease: Option<LeaseLine<'a>>,
}

pub fn run(cli: &Cli, cmd: &HandoffCommand, out: &mut impl Write) -> Result<(), Failure> {
    let read = |mailbox: &str, seq: u64| -> Result<agentbus::Message, Failure> {
        stored(&open_bus(cli)?.mailbox(mailbox)?, seq)?
            .filter(|m| m.kind == agentbus::HANDOFF_TYPE)
            .ok_or_else(|| Failure::Usage(format!("{mailbox} has no handoff {seq}")))
    };
    match cmd {
        HandoffCommand::Send {
            mailbox,
            from,
            summary,
            state,
            changed,
            remaining,
            next_step,
            blocker,
            artifacts,
            lease,
            token,
            reply_to,
            correlation_id,
            durable,
        } => {
            let from = agent(cli, from, "handoff send")?;
            let bus = open_writer(cli, durable)?;
            let mut h = bus.handoff(mailbox).from(from).summary(summary);
            if let Some(s) = state {
                let v: Value = serde_json::from_str(s).map_err(|e| {
                    Error::InvalidMessage(format!("--state is not valid JSON: {e}"))
                })?;
                h = h.state(v);
            }
            for c in changed {
                h = h.changed(c);
            }
            for r in remaining {
                h = h.remaining(r);
            }
            if let Some(n) = next_step {
                h = h.next_step(n);
            }
            for b in blocker {
                h = h.blocker(b);
            }
            for a in artifacts {
                h = h.artifact(a);
            }
            if let (Some(l), Some(t)) = (lease, token) {
                h = h.lease(l, from, *t);
            }
            if let Some(r) = reply_to {
                h = h.reply_to(r);
            }
            if let Some(c) = correlation_id {
                h = h.correlation_id(c);
            }
            emit(out, &h.send()?.receipt)
        }
        HandoffCommand::Recv {
            mailbox,
            wait,
            durable,
        } => {
            agent(cli, &None, "handoff recv")?;
            let mut inbox = open_writer(cli, durable)?.handoff_inbox(mailbox)?;
            let got = match inbox.recv_timeout(secs(*wait)?) {
                Ok(h) => Some(h),
                Err(agentbus::RecvTimeoutError::Bus(e)) => return Err(e.into()),
                Err(_) => None,
            };
            if let Some(h) = got {
                emit(
                    out,
                    &MessageLine::new(&h.message).verified(h.verify().as_ref().map(|_| ())),
                )?;
            }
            Ok(())
        }
        HandoffCommand::Show { mailbox, seq } => {
            emit(out, &MessageLine::new(&read(mailbox, *seq)?))
        }
        HandoffCommand::Verify { mailbox, seq } => {
            let m = read(mailbox, *seq)?;
            verify(&m)?;
            emit(out, &verified(mailbox, &m))
        }
        HandoffCommand::Accept {
            mailbox,
            seq,
            ttl,
            durable,
        } => {
            let me = agent(cli, &None, "handoff accept")?;
            let bus = open_writer(cli, durable)?;
            let h = bus.handoff_inbox(mailbox)?.take(*seq)?;
            let lease = match ttl {
                Some(ttl) => h.accept_lease(me, secs(*ttl)?)?.map(agentbus::Lease::keep),
                None => h.accept(me)?,
            };
            let lease = lease.map(|l| as_held(&bus, l)).transpose()?;
            let lease = lease.as_ref().map(|l| LeaseLine::new(&l.name, Some(l)));
            emit(
                out,
                &Accepted {
                    seq: *seq,
                    accepted: true,
                    lease,
                },
            )
        }
        HandoffCommand::Reject {
            mailbox,
            seq,
            reason,
            durable,
        } => {
            let me = agent(cli, &None, "handoff reject")?;
            open_writer(cli, durable)?
                .handoff_inbox(mailbox)?
                .take(*seq)?
                .reject(me, reason)?;
            emit(
                out,
                &json!({"seq": seq, "rejected": true, "reason": reason}),
            )
        }
    }
}
