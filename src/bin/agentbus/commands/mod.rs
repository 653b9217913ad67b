//! One module per verb, each with its clap arguments beside the `run` that carries them
//! out, and the few helpers more than one verb needs.

pub mod ack;
pub mod compact;
pub mod doctor;
pub mod extend;
pub mod group;
pub mod handoff;
pub mod init;
pub mod kv;
pub mod lease;
pub mod mailbox;
pub mod nack;
pub mod recv;
pub mod replay;
pub mod send;
pub mod stats;
pub mod term;
pub mod verify;
pub mod watch;

use std::time::Duration;

use agentbus::{Bus, Durability, Mailbox};
use clap::{Args, ValueEnum};

use crate::output::Failure;
use crate::Cli;

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
    #[command(flatten)]
    durable: Durable,
}

/// The type filter flags of `recv`, `watch` and `group create`.
#[derive(Args, Debug, Default)]
pub struct TypeArgs {
    /// Only this type (repeatable: any of them). A pattern matches by `.`-separated
    /// tokens: `draft.*` one more token (draft.ready, not draft.ready.v2), `draft.>`
    /// one or more (every type that starts with `draft.`); README "Type patterns".
    /// On `recv` and `watch` only without `--group` (a group filters with `group
    /// create --type`).
    #[arg(long = "type", value_name = "TYPE")]
    kinds: Vec<String>,
    /// Every type but this one (repeatable), including types added later; patterns
    /// as for `--type`.
    #[arg(long = "not-type", value_name = "TYPE")]
    not_kinds: Vec<String>,
}

impl TypeArgs {
    /// Whether any type flag was given.
    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty() && self.not_kinds.is_empty()
    }

    /// `filter` narrowed to these types; an entry that can match no type (`draft*`,
    /// `a.>.b`) is refused ([`agentbus::Filter::check`]).
    pub fn narrow(&self, mut filter: agentbus::Filter) -> Result<agentbus::Filter, Failure> {
        for kind in &self.kinds {
            filter = filter.of_type(kind);
        }
        for kind in &self.not_kinds {
            filter = filter.not_type(kind);
        }
        filter.check()?;
        Ok(filter)
    }
}

/// The coalescing flags of `watch` and `group create`.
#[derive(Args, Debug, Default)]
pub struct CoalesceArgs {
    /// Coalesce bursts by this key: `type`, `correlation` (the correlation id) or
    /// `header:NAME`. Of the messages with one key sent within `--window` of the
    /// first, only the first is delivered (README "Coalescing bursts").
    #[arg(long, value_name = "KEY", requires = "window")]
    coalesce: Option<String>,
    /// The coalescing window, in seconds.
    #[arg(long, value_name = "SECS", requires = "coalesce")]
    window: Option<f64>,
}

impl CoalesceArgs {
    /// Whether `--coalesce` was given.
    pub fn is_set(&self) -> bool {
        self.coalesce.is_some()
    }

    /// The coalescing asked for, if any.
    pub fn get(&self) -> Result<Option<agentbus::Coalesce>, Failure> {
        let (Some(key), Some(window)) = (&self.coalesce, self.window) else {
            return Ok(None);
        };
        let by = match key.as_str() {
            "type" => agentbus::CoalesceBy::Type,
            "correlation" | "correlation_id" => agentbus::CoalesceBy::CorrelationId,
            _ => match key.strip_prefix("header:") {
                Some(name) if !name.is_empty() => agentbus::CoalesceBy::Header(name.to_owned()),
                _ => {
                    return Err(Failure::Usage(format!(
                        "--coalesce {key:?}: give `type`, `correlation` or `header:NAME`"
                    )))
                }
            },
        };
        Ok(Some(agentbus::Coalesce::new(by, secs(window)?)))
    }
}

/// The group, and with `--attempt` the exact delivery (checked to be current).
fn target_delivery(
    cli: &Cli,
    t: &Target,
) -> Result<(agentbus::Group, Option<agentbus::Delivery>), Failure> {
    let group = open_writer(cli, &t.durable)?
        .mailbox(&t.mailbox)?
        .group(&t.group)?;
    let delivery = t.attempt.map(|a| group.delivery(t.seq, a)).transpose()?;
    Ok((group, delivery))
}

/// `--durability`, on the commands that write (the others take no such flag).
#[derive(Args, Debug, Clone, Copy)]
pub struct Durable {
    /// When a write counts as done: `sync` (fdatasync, survives power loss) or `flush`
    /// (survives a crash of this process).
    #[arg(long, env = "AGENTBUS_DURABILITY", default_value = "sync")]
    durability: DurabilityArg,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum DurabilityArg {
    Sync,
    Flush,
}

/// The bus, for a command that only reads.
pub fn open_bus(cli: &Cli) -> Result<Bus, Failure> {
    Ok(builder(cli).open(&cli.dir)?)
}

/// The bus, for a command that writes with `d`'s durability.
pub fn open_writer(cli: &Cli, d: &Durable) -> Result<Bus, Failure> {
    Ok(writer(cli, d).open(&cli.dir)?)
}

/// The builder [`open_writer`] opens with.
pub fn writer(cli: &Cli, d: &Durable) -> agentbus::BusBuilder {
    builder(cli).durability(match d.durability {
        DurabilityArg::Sync => Durability::Sync,
        DurabilityArg::Flush => Durability::Flush,
    })
}

fn builder(cli: &Cli) -> agentbus::BusBuilder {
    match &cli.agent {
        Some(agent) => Bus::builder().agent(agent.clone()),
        None => Bus::builder(),
    }
}

/// Who acts: `flag` (`--from`, `--consumer`, `--holder`) if given, else `--agent` /
/// `AGENTBUS_AGENT`, else `cli`.
pub fn agent_or_cli<'a>(cli: &'a Cli, flag: &'a Option<String>) -> &'a str {
    flag.as_deref().or(cli.agent.as_deref()).unwrap_or("cli")
}

/// Who acts, where the bus must know for sure (a lease holder, the agent answering a
/// handoff): `flag` if given, else `--agent` / `AGENTBUS_AGENT`, else a usage error.
pub fn agent<'a>(cli: &'a Cli, flag: &'a Option<String>, what: &str) -> Result<&'a str, Failure> {
    flag.as_deref().or(cli.agent.as_deref()).ok_or_else(|| {
        Failure::Usage(format!(
            "{what} needs to know who you are: give --agent NAME (or set AGENTBUS_AGENT)"
        ))
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
