use std::io::Write;

use clap::Subcommand;
use serde_json::json;

use super::{open_bus, secs};
use crate::output::{emit, rfc3339, Failure};
use crate::Cli;

/// Take, renew, release or inspect leases (exclusive, expiring ownership with a
/// fencing token).
#[derive(Subcommand, Debug)]
pub enum LeaseCommand {
    /// Take a lease; prints {"name","holder","token","expires_at"}. Exit 3 if held.
    Acquire {
        /// The lease (resource) name.
        name: String,
        /// Who takes it.
        #[arg(long, env = "AGENTBUS_AGENT")]
        holder: String,
        /// Seconds until it expires unless renewed.
        #[arg(long)]
        ttl: f64,
        /// Wait up to SECS for it to be released or to expire (0: do not wait).
        #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
        wait: f64,
    },
    /// Extend a lease you hold.
    Renew {
        /// The lease.
        name: String,
        /// The holder.
        #[arg(long, env = "AGENTBUS_AGENT")]
        holder: String,
        /// The fencing token of your grant.
        #[arg(long)]
        token: u64,
        /// New TTL from now, in seconds.
        #[arg(long)]
        ttl: f64,
    },
    /// Release a lease you hold.
    Release {
        /// The lease.
        name: String,
        /// The holder.
        #[arg(long, env = "AGENTBUS_AGENT")]
        holder: String,
        /// The fencing token of your grant.
        #[arg(long)]
        token: u64,
    },
    /// Show one lease.
    Show {
        /// The lease.
        name: String,
    },
    /// List all leases.
    List,
}

pub fn run(cli: &Cli, cmd: &LeaseCommand, out: &mut impl Write) -> Result<(), Failure> {
    let bus = open_bus(cli)?;
    let grant = |name: &str, holder: &str, token: u64, expires_at| json!({"name": name, "holder": holder, "token": token, "expires_at": rfc3339(expires_at)});
    match cmd {
        LeaseCommand::Acquire {
            name,
            holder,
            ttl,
            wait,
        } => {
            let (ttl, wait) = (secs(*ttl)?, secs(*wait)?);
            let request = bus.lease(name).holder(holder).ttl(ttl);
            let lease = if !wait.is_zero() {
                request.acquire(wait)?
            } else {
                request.try_acquire()?
            };
            // This process ends now: keep the lease for its TTL (renew or release by token).
            let info = lease.keep();
            emit(out, &grant(name, holder, info.token, info.expires_at))
        }
        LeaseCommand::Renew {
            name,
            holder,
            token,
            ttl,
        } => {
            let info = bus.renew_lease(name, holder, *token, secs(*ttl)?)?;
            emit(out, &grant(name, holder, info.token, info.expires_at))
        }
        LeaseCommand::Release {
            name,
            holder,
            token,
        } => {
            bus.release_lease(name, holder, *token)?;
            emit(
                out,
                &json!({"name": name, "released": true, "token": token}),
            )
        }
        LeaseCommand::Show { name } => match bus.lease_info(name)? {
            Some(info) => emit(out, &info),
            None => emit(out, &json!({"name": name, "holder": null, "token": 0})),
        },
        LeaseCommand::List => {
            for info in bus.leases()? {
                emit(out, &info)?;
            }
            Ok(())
        }
    }
}
