//! Leases: exclusive, expiring ownership of a named resource, with fencing tokens.
//!
//! Files, in `<bus>/leases/`:
//!
//! - `<name>.jsonl`: the lease's records (`grant`, `renew`, `release`, and after
//!   compaction one `state`). Small: it is rewritten as a single `state` record once it
//!   passes 16 KiB. Every operation re-reads it under the lock, so nothing is cached
//!   across operations and a rewrite can never strand a reader.
//! - `<name>.lock`: the `flock` every change of the lease holds.
//! - `<name>.<token>.alive`: for process-bound leases, the holder keeps an exclusive
//!   `flock` on this file for as long as it holds the lease. The kernel releases that
//!   lock when the process dies, so a contender that can take it knows the holder is
//!   gone: no PID files, no guessing.

use std::fs::File;
use std::io::{self, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::IoContext;
use crate::fsutil::Flock;
use crate::group::now_ms;
use crate::log::{self, Line};
use crate::watch::Watch;
use crate::{fsutil, record, validate_name, Bus, Error, Result};

/// Lease files larger than this are rewritten as one `state` record.
const COMPACT_BYTES: u64 = 16 * 1024;

/// How long after its recorded expiry a lease is still treated as held by contenders,
/// to absorb small adjustments of the wall clock.
pub const CLOCK_GRACE: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Op {
    Grant,
    Renew,
    Release,
    State,
}

/// One record of a lease file.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Rec {
    seq: u64,
    op: Op,
    t: i64,
    token: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    holder: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    acquired_at: Option<i64>,
    #[serde(default, skip_serializing_if = "is_zero")]
    renewals: u32,
    #[serde(default, skip_serializing_if = "is_false")]
    process_bound: bool,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The folded state of a lease file.
#[derive(Debug, Clone, Default)]
struct State {
    seq: u64,
    token: u64,
    holder: Option<String>,
    acquired_at: i64,
    expires_at: i64,
    renewals: u32,
    process_bound: bool,
}

impl State {
    fn apply(&mut self, r: &Rec) {
        self.seq = r.seq;
        match r.op {
            Op::Grant | Op::State => {
                self.token = r.token;
                self.holder = r.holder.clone();
                self.acquired_at = r.acquired_at.unwrap_or(r.t);
                self.expires_at = r.expires_at.unwrap_or(r.t);
                self.renewals = r.renewals;
                self.process_bound = r.process_bound;
            }
            Op::Renew if r.token == self.token => {
                self.expires_at = r.expires_at.unwrap_or(self.expires_at);
                self.renewals += 1;
            }
            Op::Release if r.token == self.token => self.holder = None,
            Op::Renew | Op::Release => {}
        }
    }

    /// Held, as far as the records and the clock say (process liveness aside).
    fn held_at(&self, now: i64) -> bool {
        self.holder.is_some()
            && now
                < self
                    .expires_at
                    .saturating_add(CLOCK_GRACE.as_millis() as i64)
    }

    fn info(&self, name: &str, now: i64) -> LeaseInfo {
        LeaseInfo {
            name: name.to_owned(),
            holder: self.holder.clone().filter(|_| self.held_at(now)),
            token: self.token,
            acquired_at: ms_to_datetime(self.acquired_at),
            expires_at: ms_to_datetime(self.expires_at),
            renewals: self.renewals,
            process_bound: self.process_bound,
        }
    }
}

fn ms_to_datetime(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn ttl_ms(ttl: Duration) -> i64 {
    i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)
}

/// What a supervisor sees of a lease: [`Bus::lease_info`], [`Bus::leases`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct LeaseInfo {
    /// The lease (resource) name.
    pub name: String,
    /// The current holder; `None` when free, released or expired.
    pub holder: Option<String>,
    /// The fencing token of the latest grant (0 if never granted).
    pub token: u64,
    /// When the latest grant was made.
    #[serde(with = "time::serde::rfc3339")]
    pub acquired_at: OffsetDateTime,
    /// When the latest grant expires unless renewed.
    #[serde(with = "time::serde::rfc3339")]
    pub expires_at: OffsetDateTime,
    /// How often the latest grant was renewed.
    pub renewals: u32,
    /// Whether the holder's death frees the lease at once.
    pub process_bound: bool,
}

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
    /// [`Error::InvalidName`], [`Error::Corrupt`], [`Error::Io`].
    pub fn lease_info(&self, name: &str) -> Result<Option<LeaseInfo>> {
        validate_name("lease", name)?;
        #[cfg(feature = "nats")]
        if let Some(nats) = self.inner.remote() {
            let state = kv::state(nats, name)?;
            let now = now_ms();
            return Ok((state.token != 0).then(|| state.info(name, now)));
        }
        let files = LeaseFiles::new(self, name);
        let _guard = files.lock()?;
        let state = files.load()?;
        if state.token == 0 {
            return Ok(None);
        }
        let now = now_ms();
        let mut info = state.info(name, now);
        info.holder = files.live_holder(&state, now)?;
        Ok(Some(info))
    }

    /// All leases ever granted on this bus, sorted by name.
    ///
    /// # Errors
    ///
    /// [`Error::Io`], [`Error::Corrupt`].
    pub fn leases(&self) -> Result<Vec<LeaseInfo>> {
        let mut out = Vec::new();
        for name in self.lease_names()? {
            out.extend(self.lease_info(&name)?);
        }
        Ok(out)
    }

    /// The names of all lease files, sorted.
    pub(crate) fn lease_names(&self) -> Result<Vec<String>> {
        #[cfg(feature = "nats")]
        if let Some(nats) = self.inner.remote() {
            return Ok(nats.lease_entries()?.into_iter().map(|e| e.0).collect());
        }
        let dir = self.inner.root.join("leases");
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("list", dir, e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let name = entry.ctx("list", &dir)?.file_name();
            if let Some(n) = name.to_str().and_then(|n| n.strip_suffix(".jsonl")) {
                if crate::name::is_valid(n) {
                    names.push(n.to_owned());
                }
            }
        }
        names.sort();
        Ok(names)
    }

    /// Renews a lease held by `holder` with `token` for `ttl` from now: for holders that
    /// keep only the token (another process, a shell script).
    ///
    /// # Errors
    ///
    /// [`Error::StaleLease`] naming the real holder if `token` is not the current grant
    /// to `holder`, or it has expired or been released.
    pub fn renew_lease(
        &self,
        name: &str,
        holder: &str,
        token: u64,
        ttl: Duration,
    ) -> Result<LeaseInfo> {
        validate_name("lease", name)?;
        #[cfg(feature = "nats")]
        if let Some(nats) = self.inner.remote() {
            return kv::change(nats, name, holder, token, kv::Change::Renew(ttl));
        }
        let files = LeaseFiles::new(self, name);
        let _guard = files.lock()?;
        let mut state = files.load()?;
        let now = now_ms();
        files.check_holder(&state, holder, token, Some(now))?;
        let r = Rec {
            expires_at: Some(now.saturating_add(ttl_ms(ttl))),
            ..files.rec(&state, Op::Renew, token, now)
        };
        files.append(&mut state, &r)?;
        Ok(state.info(name, now))
    }

    /// Releases a lease held by `holder` with `token`.
    ///
    /// # Errors
    ///
    /// [`Error::StaleLease`] if `token` is not the current grant to `holder`.
    pub fn release_lease(&self, name: &str, holder: &str, token: u64) -> Result<()> {
        validate_name("lease", name)?;
        #[cfg(feature = "nats")]
        if let Some(nats) = self.inner.remote() {
            return kv::change(nats, name, holder, token, kv::Change::Release).map(drop);
        }
        let files = LeaseFiles::new(self, name);
        let _guard = files.lock()?;
        let mut state = files.load()?;
        // Releasing an expired lease nobody took over is harmless and allowed.
        files.check_holder(&state, holder, token, None)?;
        files.release(&mut state, token)
    }

    /// Hands a lease held by `holder` with `token` to `to`, atomically: one new grant
    /// with a new, higher token, never a moment when the lease is free. The new grant
    /// is not process-bound.
    ///
    /// # Errors
    ///
    /// [`Error::StaleLease`] if `token` is not the current, live grant to `holder`;
    /// [`Error::InvalidName`] for a bad `to`.
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
        #[cfg(feature = "nats")]
        if let Some(nats) = self.inner.remote() {
            let change = kv::Change::Transfer(to.to_owned(), ttl);
            return kv::change(nats, name, holder, token, change);
        }
        let files = LeaseFiles::new(self, name);
        let _guard = files.lock()?;
        let mut state = files.load()?;
        let now = now_ms();
        files.check_holder(&state, holder, token, Some(now))?;
        files.grant(&mut state, to, ttl, false, now)?;
        Ok(state.info(name, now))
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
    /// [`Error::LeaseHeld`] naming the holder and its expiry; [`Error::InvalidName`];
    /// [`Error::Io`].
    pub fn try_acquire(self) -> Result<Lease> {
        validate_name("lease", &self.name)?;
        validate_name("agent", &self.holder)?;
        self.attempt()?.map_err(|held| self.held(&held))
    }

    /// Takes the lease, waiting up to `timeout` for it to be released or to expire.
    /// The wait is woken by file-system events on the lease directory (and, for a
    /// process-bound holder, by the holder's death), with a timer as the fallback.
    ///
    /// # Errors
    ///
    /// As [`try_acquire`](Self::try_acquire); [`Error::LeaseHeld`] when `timeout` ran
    /// out.
    pub fn acquire(self, timeout: Duration) -> Result<Lease> {
        validate_name("lease", &self.name)?;
        validate_name("agent", &self.holder)?;
        let deadline = Instant::now() + timeout;
        #[cfg(feature = "nats")]
        let watch = match self.bus.inner.remote() {
            Some(nats) => {
                let opts = &self.bus.inner.opts;
                let subjects = vec![nats.lease_subject(&self.name)];
                Watch::subjects(nats, subjects, opts.watch_mode, opts.poll_interval)
            }
            None => self.dir_watch()?,
        };
        #[cfg(not(feature = "nats"))]
        let watch = self.dir_watch()?;
        loop {
            let seen = watch.generation();
            match self.attempt()? {
                Ok(lease) => return Ok(lease),
                Err(held) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(self.held(&held));
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

    fn dir_watch(&self) -> Result<Watch> {
        let opts = &self.bus.inner.opts;
        let dir = self.bus.inner.root.join("leases");
        fsutil::create_dir(&dir, opts.dir_mode)?;
        Ok(Watch::new(&[dir], opts.watch_mode, opts.poll_interval))
    }

    fn held(&self, state: &State) -> Error {
        Error::LeaseHeld {
            name: self.name.clone(),
            holder: state.holder.clone().unwrap_or_default(),
            token: state.token,
            expires_at: ms_to_datetime(state.expires_at),
        }
    }

    /// One attempt: the lease, or (inner `Err`) the state of the holder that has it.
    fn attempt(&self) -> Result<std::result::Result<Lease, State>> {
        let bus = self.bus;
        #[cfg(feature = "nats")]
        if let Some(nats) = bus.inner.remote() {
            if self.process_bound {
                return Err(Error::unsupported(
                    "a process-bound lease",
                    "no lock spans machines: use a TTL and renew it",
                ));
            }
            let started = Instant::now();
            return Ok(
                kv::grant(nats, &self.name, &self.holder, self.ttl)?.map(|(token, v)| Lease {
                    bus: bus.clone(),
                    name: self.name.clone(),
                    holder: self.holder.clone(),
                    token,
                    expires_at: ms_to_datetime(v.expires_at),
                    valid_until: started + self.ttl,
                    ttl: self.ttl,
                    alive: None,
                    done: false,
                }),
            );
        }
        let files = LeaseFiles::new(bus, &self.name);
        let _guard = files.lock()?;
        let mut state = files.load()?;
        // Read the monotonic clock first: the holder's own deadline must never be
        // later than the one recorded for everybody else.
        let started = Instant::now();
        let now = now_ms();
        if files.is_held(&state, now)? {
            return Ok(Err(state));
        }
        // For a process-bound lease, lock the new token's `.alive` file before the
        // grant is written: the grant never exists without its liveness lock.
        let token = state.token + 1;
        let alive = if self.process_bound {
            let path = files.alive(token);
            let f = fsutil::open_lock(&path, files.file_mode)?;
            f.try_lock()
                .map_err(|e| Error::io("lock", &path, io::Error::other(e.to_string())))?;
            Some(f)
        } else {
            None
        };
        if let Err(e) = files.grant(&mut state, &self.holder, self.ttl, self.process_bound, now) {
            let _ = std::fs::remove_file(files.alive(token));
            return Err(e);
        }
        Ok(Ok(Lease {
            bus: bus.clone(),
            name: self.name.clone(),
            holder: self.holder.clone(),
            token: state.token,
            expires_at: ms_to_datetime(state.expires_at),
            valid_until: started + self.ttl,
            ttl: self.ttl,
            alive,
            done: false,
        }))
    }
}

impl Lease {
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
    /// [`Error::StaleLease`] if it expired or was taken over meanwhile.
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
    /// [`Error::StaleLease`] if someone else holds it now (it had expired).
    pub fn release(mut self) -> Result<()> {
        self.done = true;
        self.bus.release_lease(&self.name, &self.holder, self.token)
    }

    /// Hands the lease to `to` (see [`Bus::transfer_lease`]) and returns the new grant.
    ///
    /// # Errors
    ///
    /// [`Error::StaleLease`] if this grant is no longer current.
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
        if self.done {
            return;
        }
        #[cfg(feature = "nats")]
        if let Some(nats) = self.bus.inner.remote() {
            // Never blocking: the release runs on the bus's runtime.
            let (bus, name, holder, token) = (
                nats.clone(),
                self.name.clone(),
                self.holder.clone(),
                self.token,
            );
            nats.detach(async move {
                let _ = tokio::task::spawn_blocking(move || {
                    kv::change(&bus, &name, &holder, token, kv::Change::Release)
                })
                .await;
            });
            return;
        }
        // Best effort and never blocking: only if the lease file is free right now.
        let files = LeaseFiles::new(&self.bus, &self.name);
        let Ok(lock) = fsutil::open_lock(&files.lock_path(), files.file_mode) else {
            return;
        };
        let Some(_guard) = Flock::try_exclusive(lock) else {
            return;
        };
        if let Ok(mut state) = files.load() {
            if files
                .check_holder(&state, &self.holder, self.token, None)
                .is_ok()
            {
                let _ = files.release(&mut state, self.token);
            }
        }
    }
}

/// Paths of one lease, and the operations on its files (all under its lock).
struct LeaseFiles {
    dir: PathBuf,
    name: String,
    file_mode: u32,
    dir_mode: u32,
}

impl LeaseFiles {
    fn new(bus: &Bus, name: &str) -> LeaseFiles {
        LeaseFiles {
            dir: bus.inner.root.join("leases"),
            name: name.to_owned(),
            file_mode: bus.inner.opts.file_mode,
            dir_mode: bus.inner.opts.dir_mode,
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("{}.jsonl", self.name))
    }

    fn lock_path(&self) -> PathBuf {
        self.dir.join(format!("{}.lock", self.name))
    }

    fn alive(&self, token: u64) -> PathBuf {
        self.dir.join(format!("{}.{token}.alive", self.name))
    }

    fn lock(&self) -> Result<Flock<File>> {
        let path = self.lock_path();
        if !self.dir.exists() {
            fsutil::create_dir(&self.dir, self.dir_mode)?;
        }
        let f = fsutil::open_lock(&path, self.file_mode)?;
        Flock::exclusive(f, &path)
    }

    /// Reads the whole (small) lease file; cuts a torn tail (we hold the lock).
    fn load(&self) -> Result<State> {
        let path = self.log_path();
        let file = match fsutil::open_read(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(State::default()),
            Err(e) => return Err(Error::io("open", path, e)),
        };
        let mut state = State::default();
        let mut reader = log::LineReader::new(0, 64 * 1024);
        let mut line = 0;
        loop {
            match reader.next(&file).ctx("read", &path)? {
                Line::Complete { start, end, .. } => {
                    line += 1;
                    let r: Rec = log::decode(reader.bytes(start, end), &path, line)?;
                    state.apply(&r);
                }
                Line::TooLong { .. } => {
                    return Err(Error::Corrupt {
                        path,
                        line: line + 1,
                        reason: "lease record too long".into(),
                    })
                }
                Line::Partial { offset } => {
                    let w = fsutil::open_append(&path, self.file_mode)?;
                    w.set_len(offset).ctx("truncate torn tail", &path)?;
                    return Ok(state);
                }
                Line::Eof => return Ok(state),
            }
        }
    }

    fn rec(&self, state: &State, op: Op, token: u64, now: i64) -> Rec {
        Rec {
            seq: state.seq + 1,
            op,
            t: now,
            token,
            holder: None,
            expires_at: None,
            acquired_at: None,
            renewals: 0,
            process_bound: false,
        }
    }

    fn grant(
        &self,
        state: &mut State,
        holder: &str,
        ttl: Duration,
        process_bound: bool,
        now: i64,
    ) -> Result<()> {
        let previous = state.token;
        let r = Rec {
            holder: Some(holder.to_owned()),
            expires_at: Some(now.saturating_add(ttl_ms(ttl))),
            acquired_at: Some(now),
            process_bound,
            ..self.rec(state, Op::Grant, state.token + 1, now)
        };
        self.append(state, &r)?;
        if previous > 0 {
            let _ = std::fs::remove_file(self.alive(previous));
        }
        Ok(())
    }

    /// Whether the process that holds (held) grant `token` is gone: its `.alive` lock
    /// can be taken (or the file is missing).
    fn holder_died(&self, token: u64) -> Result<bool> {
        let path = self.alive(token);
        let f = match fsutil::open_read(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(Error::io("open", path, e)),
        };
        match f.try_lock() {
            Ok(()) => {
                let _ = f.unlock();
                Ok(true)
            }
            Err(std::fs::TryLockError::WouldBlock) => Ok(false),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io("lock", path, e)),
        }
    }

    /// Whether the lease is held now: its grant has not expired (give or take
    /// [`CLOCK_GRACE`]) and, if process-bound, its process still holds the `.alive` lock.
    fn is_held(&self, state: &State, now: i64) -> Result<bool> {
        Ok(state.held_at(now) && !(state.process_bound && self.holder_died(state.token)?))
    }

    /// The holder, if the lease [`is_held`](Self::is_held).
    fn live_holder(&self, state: &State, now: i64) -> Result<Option<String>> {
        Ok(if self.is_held(state, now)? {
            state.holder.clone()
        } else {
            None
        })
    }

    /// Checks that `token` is the current grant to `holder`; given `now`, also that the
    /// grant is live: not expired and, if process-bound, its process still there.
    fn check_holder(
        &self,
        state: &State,
        holder: &str,
        token: u64,
        now: Option<i64>,
    ) -> Result<()> {
        let stale = |reason: &str| Error::StaleLease {
            name: self.name.clone(),
            holder: self
                .live_holder(state, now.unwrap_or_else(now_ms))
                .unwrap_or(None),
            token: state.token,
            reason: reason.to_owned(),
        };
        if token != state.token || state.holder.as_deref() != Some(holder) {
            return Err(stale(&format!(
                "token {token} of {holder:?} is not the current grant"
            )));
        }
        let Some(now) = now else {
            return Ok(());
        };
        if now >= state.expires_at {
            return Err(stale("the lease has expired; acquire it again"));
        }
        if state.process_bound && self.holder_died(token)? {
            return Err(stale(
                "the holder's process has let go of its process-bound lease",
            ));
        }
        Ok(())
    }

    /// Releases grant `token` (checked by the caller) and removes its liveness file,
    /// which has nothing left to say.
    fn release(&self, state: &mut State, token: u64) -> Result<()> {
        let r = self.rec(state, Op::Release, token, now_ms());
        self.append(state, &r)?;
        let _ = std::fs::remove_file(self.alive(token));
        Ok(())
    }

    /// Appends one record, and compacts the file when it has grown. Always synced,
    /// whatever the bus's durability: a grant lost to a power cut could hand its token
    /// out twice, and leases change rarely enough for the fsync not to matter.
    fn append(&self, state: &mut State, r: &Rec) -> Result<()> {
        let path = self.log_path();
        let created = !path.exists();
        let file = fsutil::open_append(&path, self.file_mode)?;
        let mut line = Vec::with_capacity(200);
        record::encode_value(r, &mut line);
        (&file).write_all(&line).ctx("append", &path)?;
        file.sync_data().ctx("fdatasync", &path)?;
        if created {
            // The lease file's entry, and `leases/`'s own (created lazily).
            fsutil::sync_dir(&self.dir)?;
            if let Some(root) = self.dir.parent() {
                fsutil::sync_dir(root)?;
            }
        }
        state.apply(r);
        if file.metadata().ctx("stat", &path)?.len() > COMPACT_BYTES {
            self.compact(state)?;
        }
        Ok(())
    }

    /// Rewrites the lease file as one `state` record holding the current token, so the
    /// token keeps increasing whatever is removed.
    fn compact(&self, state: &State) -> Result<()> {
        let r = Rec {
            holder: state.holder.clone(),
            expires_at: Some(state.expires_at),
            acquired_at: Some(state.acquired_at),
            renewals: state.renewals,
            process_bound: state.process_bound,
            ..self.rec(state, Op::State, state.token, now_ms())
        };
        let mut line = Vec::new();
        record::encode_value(&r, &mut line);
        fsutil::write_atomic(&self.log_path(), &line, self.file_mode, true)
    }
}

/// Leases on NATS JetStream: one KV entry per lease, changed only by compare-and-set on
/// its revision. The revision of the write that granted a lease is its token, so tokens
/// strictly increase across every grant for as long as the bucket exists.
#[cfg(feature = "nats")]
mod kv {
    use std::time::Duration;

    use serde::{Deserialize, Serialize};

    use super::{ms_to_datetime, now_ms, ttl_ms, LeaseInfo, State};
    use crate::nats::NatsBus;
    use crate::{Error, Result};

    /// The value of a lease entry.
    #[derive(Debug, Clone, Serialize, Deserialize)]
    pub(super) struct Value {
        holder: Option<String>,
        /// The grant's token; 0 in the write that grants, whose revision is the token.
        #[serde(default)]
        token: u64,
        acquired_at: i64,
        pub(super) expires_at: i64,
        #[serde(default)]
        renewals: u32,
    }

    fn parse(name: &str, current: Option<(u64, &[u8])>) -> Result<State> {
        let Some((revision, bytes)) = current else {
            return Ok(State::default());
        };
        let v: Value = serde_json::from_slice(bytes).map_err(|e| Error::Corrupt {
            path: format!("lease {name}").into(),
            line: revision,
            reason: format!("not a lease value: {e}"),
        })?;
        Ok(State {
            seq: revision,
            token: if v.token == 0 { revision } else { v.token },
            holder: v.holder,
            acquired_at: v.acquired_at,
            expires_at: v.expires_at,
            renewals: v.renewals,
            process_bound: false,
        })
    }

    fn encode(v: &Value) -> Vec<u8> {
        serde_json::to_vec(v).expect("a lease value serializes")
    }

    /// The lease's current state (a default one if it was never granted).
    pub(super) fn state(nats: &NatsBus, name: &str) -> Result<State> {
        let owned = name.to_owned();
        let (_, state) = nats.lease_update(name, move |cur| Ok((None, parse(&owned, cur)?)))?;
        Ok(state)
    }

    /// Grants the lease to `holder` unless someone holds it: `Ok((token, value))`, or
    /// the holder's state.
    pub(super) fn grant(
        nats: &NatsBus,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<std::result::Result<(u64, Value), State>> {
        let (owned, holder) = (name.to_owned(), holder.to_owned());
        let (revision, outcome) = nats.lease_update(name, move |cur| {
            let state = parse(&owned, cur)?;
            let now = now_ms();
            if state.held_at(now) {
                return Ok((None, Err(state)));
            }
            let v = Value {
                holder: Some(holder.clone()),
                token: 0,
                acquired_at: now,
                expires_at: now.saturating_add(ttl_ms(ttl)),
                renewals: 0,
            };
            Ok((Some(encode(&v)), Ok(v)))
        })?;
        Ok(outcome.map(|v| (revision, v)))
    }

    /// A change to a grant, by its holder.
    pub(super) enum Change {
        Renew(Duration),
        Release,
        Transfer(String, Duration),
    }

    /// Renews, releases or transfers grant `token` of `holder`, under the same checks
    /// as the directory's: only the current grant may change, and only a release is
    /// allowed after expiry.
    pub(super) fn change(
        nats: &NatsBus,
        name: &str,
        holder: &str,
        token: u64,
        change: Change,
    ) -> Result<LeaseInfo> {
        let (owned, holder) = (name.to_owned(), holder.to_owned());
        let release = matches!(change, Change::Release);
        let (revision, v) = nats.lease_update(name, move |cur| {
            let state = parse(&owned, cur)?;
            let now = now_ms();
            let stale = |reason: String| Error::StaleLease {
                name: owned.clone(),
                holder: state.holder.clone().filter(|_| state.held_at(now)),
                token: state.token,
                reason,
            };
            if token != state.token || state.holder.as_deref() != Some(holder.as_str()) {
                return Err(stale(format!(
                    "token {token} of {holder:?} is not the current grant"
                )));
            }
            if !release && now >= state.expires_at {
                return Err(stale("the lease has expired; acquire it again".into()));
            }
            let v = match &change {
                Change::Renew(ttl) => Value {
                    holder: Some(holder.clone()),
                    token,
                    acquired_at: state.acquired_at,
                    expires_at: now.saturating_add(ttl_ms(*ttl)),
                    renewals: state.renewals + 1,
                },
                Change::Release => Value {
                    holder: None,
                    token,
                    acquired_at: state.acquired_at,
                    expires_at: state.expires_at,
                    renewals: state.renewals,
                },
                Change::Transfer(to, ttl) => Value {
                    holder: Some(to.clone()),
                    token: 0,
                    acquired_at: now,
                    expires_at: now.saturating_add(ttl_ms(*ttl)),
                    renewals: 0,
                },
            };
            Ok((Some(encode(&v)), v))
        })?;
        Ok(LeaseInfo {
            name: name.to_owned(),
            token: if v.token == 0 { revision } else { v.token },
            holder: v.holder,
            acquired_at: ms_to_datetime(v.acquired_at),
            expires_at: ms_to_datetime(v.expires_at),
            renewals: v.renewals,
            process_bound: false,
        })
    }
}
