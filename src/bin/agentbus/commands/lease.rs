use std::io::Write;

use agentbus::LeaseInfo;
use clap::Subcommand;
use serde_json::json;

use super::{agent, open_bus, open_writer, secs, Durable};
use crate::lines::LeaseLine;
use crate::output::{emit, Failure};
use crate::Cli;

/// Take, renew, release or inspect leases (exclusive, expiring ownership with a
/// fencing token).
#[derive(Subcommand, Debug)]
pub enum LeaseCommand {
    /// Take a lease; prints it (as `lease show` does). Exit 3 if held.
    Acquire {
        /// The lease (resource) name.
        name: String,
        /// Who takes it (default: `--agent`).
        #[arg(long)]
        holder: Option<String>,
        /// Seconds until it expires unless renewed.
        #[arg(long)]
        ttl: f64,
        /// Wait up to SECS for it to be released or to expire (0: do not wait).
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        wait: f64,
        #[command(flatten)]
        durable: Durable,
    },
    /// Extend a lease you hold.
    Renew {
        /// The lease.
        name: String,
        /// The holder (default: `--agent`).
        #[arg(long)]
        holder: Option<String>,
        /// The fencing token of your grant.
        #[arg(long)]
        token: u64,
        /// New TTL from now, in seconds.
        #[arg(long)]
        ttl: f64,
        #[command(flatten)]
        durable: Durable,
    },
    /// Release a lease you hold.
    Release {
        /// The lease.
        name: String,
        /// The holder (default: `--agent`).
        #[arg(long)]
        holder: Option<String>,
        /// The fencing token of your grant.
        #[arg(long)]
        token: u64,
        #[command(flatten)]
        durable: Durable,
    },
    /// Show one lease: {"name","holder","token","acquired_at","expires_at","renewals",
    /// "process_bound"}; a lease never granted has token 0 and null holder and times.
    Show {
        /// The lease.
        name: String,
    },
    /// List all leases, one per line, as `show` prints them.
    List,
}

/// The grant `kept` as the bus has it: the time it was made and its expiry as stored
/// (a handle's own view of them is approximate).
pub fn as_held(bus: &agentbus::Bus, kept: LeaseInfo) -> Result<LeaseInfo, Failure> {
    let stored = bus.lease_info(&kept.name)?;
    Ok(stored.filter(|i| i.token == kept.token).unwrap_or(kept))
}

pub fn run(cli: &Cli, cmd: &LeaseCommand, out: &mut impl Write) -> Result<(), Failure> {
    match cmd {
        LeaseCommand::Acquire {
            name,
            holder,
            ttl,
            wait,
            durable,
        } => {
            let holder = agent(cli, holder, "lease acquire")?;
            let (ttl, wait) = (secs(*ttl)?, secs(*wait)?);
            let bus = open_writer(cli, durable)?;
            let request = bus.lease(name).holder(holder).ttl(ttl);
            let lease = if !wait.is_zero() {
                request.acquire(wait)?
            } else {
                request.try_acquire()?
            };
            // This process ends now: keep the lease for its TTL (renew or release by
            // token), and print it as the bus has it.
            let info = as_held(&bus, lease.keep())?;
            emit(out, &LeaseLine::new(name, Some(&info)))
        }
        LeaseCommand::Renew {
            name,
            holder,
            token,
            ttl,
            durable,
        } => {
            let holder = agent(cli, holder, "lease renew")?;
            let bus = open_writer(cli, durable)?;
            let info = bus.renew_lease(name, holder, *token, secs(*ttl)?)?;
            emit(out, &LeaseLine::new(name, Some(&info)))
        }
        LeaseCommand::Release {
            name,
            holder,
            token,
            durable,
        } => {
            let holder = agent(cli, holder, "lease release")?;
            open_writer(cli, durable)?.release_lease(name, holder, *token)?;
            emit(
                out,
                &json!({"name": name, "released": true, "token": token}),
            )
        }
        LeaseCommand::Show { name } => {
            let info = open_bus(cli)?.lease_info(name)?;
            emit(out, &LeaseLine::new(name, info.as_ref()))
        }
        LeaseCommand::List => {
            for info in open_bus(cli)?.leases()? {
                emit(out, &LeaseLine::new(&info.name, Some(&info)))?;
            }
            Ok(())
        }
    }
}
