//! Leases: exclusive, expiring ownership of a named resource, with fencing tokens.
//!
//! How they are stored is the backend's: lease files in the directory (see
//! `dir/lease.rs` and FORMAT.md), or a KV bucket on JetStream.

use std::fs::File;
use std::time::{Duration, Instant};

use time::OffsetDateTime;

use crate::backend::{LeaseChange, LeaseGrant, LeaseState, CLOCK_GRACE};
use crate::clock::now_ms;
use crate::report::LeaseInfo;
use crate::{validate_name, Bus, Result};

/// A held lease. Release it with [`release`](Lease::release); dropping it releases it
/// too, on a best-effort, non-blocking basis (if the lease file is busy at that moment,
/// the lease simply runs out at its TTL).
///
/// The [`token`](Lease::token) is a fencing token: it strictly increases across every
/// grant of this lease, forever. Pass it along with every write to the resource the
/// lease protects, and have the resource reject tokens lower than the highest it has
/// seen; a holder that was paused past its expiry then cannot overwrite the work of
/// the next holder. See the crate docs for an example.
#[derive(Debug)]
pub struct Lease {
    bus: Bus,
    name: String,
    holder: String,
    token: u64,
    expires_at: OffsetDateTime,
    /// The holder's own view of the deadline, on the monotonic clock.
    valid_until: Instant,
    ttl: Duration,
    /// For process-bound leases: the locked `.alive` file.
    alive: Option<File>,
    done: bool,
}

/// Options for taking a lease: [`Bus::lease`].
#[derive(Debug)]
#[must_use]
pub struct LeaseRequest<'a> {
    bus: &'a Bus,
    name: String,
    holder: String,
    ttl: Duration,
    process_bound: bool,
}

impl Bus {
    /// Starts a request for the lease `name`, held by the bus's agent name for 30 s
    /// unless changed.
    ///
    /// ```
    /// # fn main() -> agentbus::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use std::time::Duration;
    /// let bus = agentbus::Bus::init(dir.path())?;
    /// let lease = bus.lease("chapter-3").holder("writer").ttl(Duration::from_secs(60)).try_acquire()?;
    /// assert_eq!(lease.token(), 1);
    /// let other = bus.lease("chapter-3").holder("reviewer").try_acquire();
    /// assert!(matches!(other, Err(agentbus::Error::LeaseHeld { .. })));
    /// lease.release()?;
    /// assert_eq!(bus.lease("chapter-3").holder("reviewer").try_acquire()?.token(), 2);
    /// # Ok(()) }
    /// ```
    pub fn lease(&self, name: &str) -> LeaseRequest<'_> {
        LeaseRequest {
            bus: self,
            name: name.to_owned(),
            holder: self.inner.opts.agent.clone(),
            ttl: Duration::from_secs(30),
            process_bound: false,
        }
    }

    /// The current state of a lease; `None` if it was never granted.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`](crate::Error::InvalidName), [`Error::Corrupt`](crate::Error::Corrupt), [`Error::Io`](crate::Error::Io).
    pub fn lease_info(&self, name: &str) -> Result<Option<LeaseInfo>> {
        validate_name("lease", name)?;
        self.inner.imp.lease_info(name)
    }

    /// All leases ever granted on this bus, sorted by name.
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io), [`Error::Corrupt`](crate::Error::Corrupt).
    pub fn leases(&self) -> Result<Vec<LeaseInfo>> {
        let mut out = Vec::new();
        for name in self.lease_names()? {
            out.extend(self.lease_info(&name)?);
        }
        Ok(out)
    }

    /// The names of all lease files, sorted.
    pub(crate) fn lease_names(&self) -> Result<Vec<String>> {
        self.inner.imp.lease_names()
    }

    /// Renews a lease held by `holder` with `token` for `ttl` from now: for holders that
    /// keep only the token (another process, a shell script).
    ///
    /// # Errors
    ///
    /// [`Error::StaleLease`](crate::Error::StaleLease) naming the real holder if `token` is not the current grant
    /// to `holder`, or it has expired or been released.
    pub fn renew_lease(
        &self,
        name: &str,
        holder: &str,
        token: u64,
        ttl: Duration,
    ) -> Result<LeaseInfo> {
        validate_name("lease", name)?;
        let change = LeaseChange::Renew(ttl);
        self.inner.imp.change_lease(name, holder, token, change)
    }

    /// Releases a lease held by `holder` with `token`.
    ///
    /// # Errors
    ///
    /// [`Error::StaleLease`](crate::Error::StaleLease) if `token` is not the current grant to `holder`.
    pub fn release_lease(&self, name: &str, holder: &str, token: u64) -> Result<()> {
        validate_name("lease", name)?;
        let change = LeaseChange::Release;
        self.inner
            .imp
            .change_lease(name, holder, token, change)
            .map(drop)
    }

    /// Hands a lease held by `holder` with `token` to `to`, atomically: one new grant
    /// with a new, higher token, never a moment when the lease is free. The new grant
    /// is not process-bound.
    ///
    /// # Errors
    ///
    /// [`Error::StaleLease`](crate::Error::StaleLease) if `token` is not the current, live grant to `holder`;
    /// [`Error::InvalidName`](crate::Error::InvalidName) for a bad `to`.
    pub fn transfer_lease(
        &self,
        name: &str,
        holder: &str,
        token: u64,
        to: &str,
        ttl: Duration,
    ) -> Result<LeaseInfo> {
        validate_name("lease", name)?;
        validate_name("agent", to)?;
        let change = LeaseChange::Transfer(to.to_owned(), ttl);
        self.inner.imp.change_lease(name, holder, token, change)
    }
}

impl LeaseRequest<'_> {
    /// Who holds the lease (an agent name); default: the bus's agent name.
    pub fn holder(mut self, holder: impl Into<String>) -> Self {
        self.holder = holder.into();
        self
    }

    /// How long the lease lasts unless renewed; default 30 s.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Ties the lease to this process as well: if the process dies, the next contender
    /// takes the lease at once instead of waiting for the TTL. Default false.
    pub fn process_bound(mut self, yes: bool) -> Self {
        self.process_bound = yes;
        self
    }

    /// Takes the lease if it is free, expired, or held by a process-bound holder whose
    /// process has died.
    ///
    /// # Errors
    ///
    /// [`Error::LeaseHeld`](crate::Error::LeaseHeld) naming the holder and its expiry; [`Error::InvalidName`](crate::Error::InvalidName);
    /// [`Error::Io`](crate::Error::Io).
    pub fn try_acquire(self) -> Result<Lease> {
        validate_name("lease", &self.name)?;
        validate_name("agent", &self.holder)?;
        self.attempt()?.map_err(|held| held.held_error(&self.name))
    }

    /// Takes the lease, waiting up to `timeout` for it to be released or to expire.
    /// The wait is woken by file-system events on the lease directory (and, for a
    /// process-bound holder, by the holder's death), with a timer as the fallback.
    ///
    /// # Errors
    ///
    /// As [`try_acquire`](Self::try_acquire); [`Error::LeaseHeld`](crate::Error::LeaseHeld) when `timeout` ran
    /// out. A retryable error ([`Error::is_retryable`](crate::Error::is_retryable): the
    /// bus unavailable during a failover) is retried until `timeout`, then returned.
    pub fn acquire(self, timeout: Duration) -> Result<Lease> {
        validate_name("lease", &self.name)?;
        validate_name("agent", &self.holder)?;
        let deadline = Instant::now() + timeout;
        let watch = self
            .bus
            .inner
            .imp
            .watch_lease(&self.name, self.bus.inner.opts.watch_mode)?;
        loop {
            let seen = watch.generation();
            let attempt = match self.attempt() {
                // The bus is unavailable for a moment (a failover): look again soon,
                // within the caller's timeout.
                Err(e) if e.is_retryable() && Instant::now() < deadline => {
                    let again = Instant::now() + Duration::from_millis(200);
                    watch.wait(seen, Some(again.min(deadline)));
                    continue;
                }
                other => other?,
            };
            match attempt {
                Ok(lease) => return Ok(lease),
                Err(held) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(held.held_error(&self.name));
                    }
                    // Wake at the holder's expiry at the latest. A process-bound holder's
                    // death makes no file-system event (the kernel just drops its lock):
                    // `wait` re-checks at the poll interval anyway.
                    let expiry = held
                        .expires_at
                        .saturating_add(CLOCK_GRACE.as_millis() as i64);
                    let until =
                        now + Duration::from_millis(expiry.saturating_sub(now_ms()).max(1) as u64);
                    watch.wait(seen, Some(until.min(deadline)));
                }
            }
        }
    }

    /// One attempt: the lease, or (inner `Err`) the state of the holder that has it.
    fn attempt(&self) -> Result<std::result::Result<Lease, LeaseState>> {
        let request = LeaseGrant {
            name: &self.name,
            holder: &self.holder,
            ttl: self.ttl,
            process_bound: self.process_bound,
        };
        Ok(self.bus.inner.imp.grant_lease(&request)?.map(|g| Lease {
            bus: self.bus.clone(),
            name: self.name.clone(),
            holder: self.holder.clone(),
            token: g.token,
            expires_at: g.expires_at,
            valid_until: g.started + self.ttl,
            ttl: self.ttl,
            alive: g.alive,
            done: false,
        }))
    }
}

impl Lease {
    /// A handle on the grant `info` to `holder`, for `ttl` from `started` (read before
    /// the grant was made).
    pub(crate) fn held(
        bus: &Bus,
        info: &LeaseInfo,
        holder: &str,
        ttl: Duration,
        started: Instant,
    ) -> Lease {
        Lease {
            bus: bus.clone(),
            name: info.name.clone(),
            holder: holder.to_owned(),
            token: info.token,
            expires_at: info.expires_at,
            valid_until: started + ttl,
            ttl,
            alive: None,
            done: false,
        }
    }

    /// The lease name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The holder.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// The fencing token of this grant.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// When this grant expires unless renewed (wall clock, as recorded).
    pub fn expires_at(&self) -> OffsetDateTime {
        self.expires_at
    }

    /// Whether the holder should still act under this lease: the grant has not expired
    /// by this process's monotonic clock, minus a safety margin of a tenth of the TTL
    /// (at most 1 s). Check it before each step of work; renew well before it turns
    /// false. It cannot know about a wall-clock jump that made others see the lease as
    /// expired earlier: the fencing token is what protects the resource then.
    pub fn is_valid(&self) -> bool {
        let left = self.valid_until.saturating_duration_since(Instant::now());
        left > self.margin()
    }

    fn margin(&self) -> Duration {
        (self.ttl / 10).min(Duration::from_secs(1))
    }

    /// Extends the lease to `ttl` from now.
    ///
    /// # Errors
    ///
    /// [`Error::StaleLease`](crate::Error::StaleLease) if it expired or was taken over meanwhile.
    pub fn renew(&mut self, ttl: Duration) -> Result<()> {
        let started = Instant::now();
        let info = self
            .bus
            .renew_lease(&self.name, &self.holder, self.token, ttl)?;
        self.expires_at = info.expires_at;
        self.valid_until = started + ttl;
        self.ttl = ttl;
        Ok(())
    }

    /// Releases the lease.
    ///
    /// # Errors
    ///
    /// [`Error::StaleLease`](crate::Error::StaleLease) if someone else holds it now (it had expired).
    pub fn release(mut self) -> Result<()> {
        self.done = true;
        self.bus.release_lease(&self.name, &self.holder, self.token)
    }

    /// Hands the lease to `to` (see [`Bus::transfer_lease`]) and returns the new grant.
    ///
    /// # Errors
    ///
    /// [`Error::StaleLease`](crate::Error::StaleLease) if this grant is no longer current.
    pub fn transfer(mut self, to: &str, ttl: Duration) -> Result<LeaseInfo> {
        self.done = true;
        self.bus
            .transfer_lease(&self.name, &self.holder, self.token, to, ttl)
    }

    /// Lets go of this handle for a handoff, keeping the lease held by token until its
    /// TTL. A process-bound grant, which would end with this handle, is first re-granted
    /// to the same holder without the binding (a new token).
    pub(crate) fn pass_on(self) -> Result<LeaseInfo> {
        if self.alive.is_some() {
            let (holder, ttl) = (self.holder.clone(), self.ttl);
            self.transfer(&holder, ttl)
        } else {
            Ok(self.keep())
        }
    }

    /// Lets go of this handle without releasing the lease: it stays held until its TTL,
    /// and can be renewed or released later by token ([`Bus::renew_lease`],
    /// [`Bus::release_lease`]), by this or another process. A process-bound lease
    /// becomes free at once (its liveness lock is dropped).
    pub fn keep(mut self) -> LeaseInfo {
        self.done = true;
        LeaseInfo {
            name: self.name.clone(),
            holder: Some(self.holder.clone()),
            token: self.token,
            acquired_at: OffsetDateTime::now_utc(),
            expires_at: self.expires_at,
            renewals: 0,
            process_bound: self.alive.is_some(),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if !self.done {
            let imp = &self.bus.inner.imp;
            imp.release_lease_in_background(&self.name, &self.holder, self.token);
        }
    }
}
