//! One module per verb, each with its clap arguments beside the `run` that carries them
//! out, and the few helpers more than one verb needs.

pub mod ack;
pub mod compact;
pub mod doctor;
pub mod extend;
pub mod group;
pub mod handoff;
pub mod init;
pub mod lease;
pub mod mailbox;
pub mod nack;
pub mod recv;
pub mod replay;
pub mod send;
pub mod stats;
pub mod term;
pub mod watch;

use std::time::Duration;

use agentbus::{Bus, Durability, Mailbox};
use clap::Args;
use serde_json::{json, Value};

use crate::output::{rfc3339, Failure};
use crate::{Cli, DurabilityArg};

/// The claimed message that `nack`, `extend` and `term` act on.
#[derive(Args, Debug)]
pub struct Target {
    /// The mailbox.
    mailbox: String,
    /// The consumer group.
    #[arg(long)]
    group: String,
    /// The message's seq.
    seq: u64,
    /// The attempt your claim was (from `recv`'s `delivery.attempt`): refuse with exit 5
    /// if the message has been redelivered since, instead of acting on someone else's
    /// claim.
    #[arg(long)]
    attempt: Option<u32>,
}

/// The group, and with `--attempt` the exact delivery (checked to be current).
fn target_delivery(
    cli: &Cli,
    t: &Target,
) -> Result<(agentbus::Group, Option<agentbus::Delivery>), Failure> {
    let group = open_bus(cli)?.mailbox(&t.mailbox)?.group(&t.group)?;
    let delivery = t.attempt.map(|a| group.delivery(t.seq, a)).transpose()?;
    Ok((group, delivery))
}

pub fn open_bus(cli: &Cli) -> Result<Bus, Failure> {
    Ok(bus_builder(cli).open(&cli.dir)?)
}

pub fn bus_builder(cli: &Cli) -> agentbus::BusBuilder {
    Bus::builder().durability(match cli.durability {
        DurabilityArg::Sync => Durability::Sync,
        DurabilityArg::Flush => Durability::Flush,
    })
}

/// A duration given in seconds: finite and not negative (NaN, -1 and inf are usage
/// errors, never "no wait" or "forever").
pub fn secs(s: f64) -> Result<Duration, Failure> {
    Duration::try_from_secs_f64(s).map_err(|_| {
        Failure::Usage(format!(
            "{s} is not a number of seconds (give a finite number, 0 or more)"
        ))
    })
}

/// The message `seq` of `mailbox`, if it is stored.
pub fn stored(mailbox: &Mailbox, seq: u64) -> Result<Option<agentbus::Message>, Failure> {
    let first = mailbox.messages().from_seq(seq).next().transpose()?;
    Ok(first.filter(|m| m.seq == seq))
}

/// `only`, or every mailbox of the bus.
pub fn mailboxes(bus: &Bus, only: Option<&str>) -> Result<Vec<Mailbox>, Failure> {
    let names = match only {
        Some(name) => vec![name.to_owned()],
        None => bus.mailboxes()?,
    };
    Ok(names
        .iter()
        .map(|n| bus.mailbox(n))
        .collect::<Result<_, _>>()?)
}

/// `Ok(None)` for a timeout, the crate error for anything else.
pub fn timed_out<T>(r: Result<T, agentbus::RecvTimeoutError>) -> Result<Option<T>, Failure> {
    match r {
        Ok(item) => Ok(Some(item)),
        Err(agentbus::RecvTimeoutError::Bus(e)) => Err(Failure::Bus(e)),
        Err(_) => Ok(None),
    }
}

/// A delivery as the CLI prints it: the message, plus who holds it until when.
pub fn delivery_json(d: &agentbus::Delivery) -> Value {
    let mut line = serde_json::to_value(&d.message).expect("message serializes");
    line["delivery"] = json!({
        "group": d.group().name(),
        "consumer": d.consumer,
        "attempt": d.attempt,
        "deadline": rfc3339(d.deadline),
    });
    line
}
