use std::io::Write;
use std::path::PathBuf;

use agentbus::{Artifact, Error};
use clap::Subcommand;
use serde_json::{json, Value};

use super::{bus_builder, secs, stored};
use crate::output::{emit, error_json, Failure};
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
        /// The sending agent.
        #[arg(long, env = "AGENTBUS_AGENT")]
        from: String,
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
    },
    /// Take the next handoff waiting in a mailbox (prints it, with "verified").
    Recv {
        /// The mailbox.
        mailbox: String,
        /// Wait up to SECS for one.
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        wait: f64,
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
    /// Accept a handoff: verify, take over its lease, answer the sender.
    Accept {
        /// The mailbox.
        mailbox: String,
        /// The handoff's seq.
        seq: u64,
    },
    /// Reject a handoff; the sender sees the reason.
    Reject {
        /// The mailbox.
        mailbox: String,
        /// The handoff's seq.
        seq: u64,
        /// Why.
        #[arg(long)]
        reason: String,
    },
}

pub fn run(cli: &Cli, cmd: &HandoffCommand, out: &mut impl Write) -> Result<(), Failure> {
    let agent = std::env::var("AGENTBUS_AGENT").unwrap_or_else(|_| "cli".into());
    let bus = bus_builder(cli).agent(agent.clone()).open(&cli.dir)?;
    let show = |m: &agentbus::Message, verified: Option<&Error>| {
        let mut v = serde_json::to_value(m).expect("message serializes");
        if let Some(obj) = v.as_object_mut() {
            obj.insert("verified".into(), json!(verified.is_none()));
            if let Some(e) = verified {
                obj.insert("verify_error".into(), error_json(e));
            }
        }
        v
    };
    let read = |mailbox: &str, seq: u64| -> Result<agentbus::Message, Failure> {
        stored(&bus.mailbox(mailbox)?, seq)?
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
        } => {
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
        HandoffCommand::Recv { mailbox, wait } => {
            let mut inbox = bus.handoff_inbox(mailbox)?;
            let got = match inbox.recv_timeout(secs(*wait)?) {
                Ok(h) => Some(h),
                Err(agentbus::RecvTimeoutError::Bus(e)) => return Err(e.into()),
                Err(_) => None,
            };
            if let Some(h) = got {
                emit(out, &show(&h.message, h.verify().err().as_ref()))?;
            }
            Ok(())
        }
        HandoffCommand::Show { mailbox, seq } => emit(out, &read(mailbox, *seq)?),
        HandoffCommand::Verify { mailbox, seq } => {
            let m = read(mailbox, *seq)?;
            m.artifacts.iter().try_for_each(Artifact::verify)?;
            emit(
                out,
                &json!({"seq": seq, "verified": true, "artifacts": m.artifacts.len()}),
            )
        }
        HandoffCommand::Accept { mailbox, seq } => {
            let h = bus.handoff_inbox(mailbox)?.take(*seq)?;
            let lease = h.accept(&agent)?;
            emit(out, &json!({"seq": seq, "accepted": true, "lease": lease}))
        }
        HandoffCommand::Reject {
            mailbox,
            seq,
            reason,
        } => {
            bus.handoff_inbox(mailbox)?
                .take(*seq)?
                .reject(&agent, reason)?;
            emit(
                out,
                &json!({"seq": seq, "rejected": true, "reason": reason}),
            )
        }
    }
}
