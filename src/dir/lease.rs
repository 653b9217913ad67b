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
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::fsutil::{Flock, Fs};
use super::segment::{self as log, Line};
use super::{record, Bus};
use crate::backend::{Granted, LeaseChange, LeaseGrant, LeaseState};
use crate::clock::{datetime_ms, ms, now_ms};
use crate::error::IoContext;
use crate::report::LeaseInfo;
use crate::{Error, Result};

/// Lease files larger than this are rewritten as one `state` record.
const COMPACT_BYTES: u64 = 16 * 1024;

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

/// Folds one record into the state of a lease file.
fn apply(state: &mut LeaseState, r: &Rec) {
    state.seq = r.seq;
    match r.op {
        Op::Grant | Op::State => {
            state.token = r.token;
            state.holder = r.holder.clone();
            state.acquired_at = r.acquired_at.unwrap_or(r.t);
            state.expires_at = r.expires_at.unwrap_or(r.t);
            state.renewals = r.renewals;
            state.process_bound = r.process_bound;
        }
        Op::Renew if r.token == state.token => {
            state.expires_at = r.expires_at.unwrap_or(state.expires_at);
            state.renewals += 1;
        }
        Op::Release if r.token == state.token => state.holder = None,
        Op::Renew | Op::Release => {}
    }
}

/// A grant (or renewal) lasts its TTL from when it was written, whatever the writer's
/// clock said: a process whose clock is an hour ahead records an expiry an hour late,
/// and would hold the lease for everyone for an extra hour. The kernel's modification
/// time of the file (the write of its last record, or a later one) bounds it: the
/// expiry is at most that time plus the span the record asked for. With a correct
/// clock the record's own expiry is the earlier one, and nothing changes.
fn bound_by_write_time(state: &mut LeaseState, last: Option<&Rec>, file: &std::fs::File) {
    let Some(r) = last.filter(|_| state.holder.is_some()) else {
        return;
    };
    let Some(recorded) = r.expires_at else { return };
    let Ok(written) = file.metadata().and_then(|m| m.modified()) else {
        return;
    };
    let Ok(since_epoch) = written.duration_since(std::time::UNIX_EPOCH) else {
        return;
    };
    let span = recorded.saturating_sub(r.t).max(0);
    let bound = (since_epoch.as_millis() as i64).saturating_add(span);
    state.expires_at = state.expires_at.min(bound);
}

/// The names of all lease files in `dir`, sorted.
pub(crate) fn names(fs: &Fs, dir: &Path) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for (name, _) in fs.list(dir, true)? {
        if let Some(n) = name.to_str().and_then(|n| n.strip_suffix(".jsonl")) {
            if crate::name::is_valid(n) {
                names.push(n.to_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Paths of one lease, and the operations on its files (all under its lock).
pub(crate) struct LeaseFiles {
    fs: Fs,
    dir: PathBuf,
    name: String,
}

impl LeaseFiles {
    /// The lease's state, with a process-bound holder that died shown as no holder.
    /// A lease never granted has no file: reading it creates nothing (no `leases/`
    /// folder, no lock file).
    pub(crate) fn info(&self) -> Result<Option<LeaseInfo>> {
        if self.fs.open_read_opt(&self.log_path())?.is_none() {
            return Ok(None);
        }
        let _guard = self.lock()?;
        let state = self.load()?;
        if state.token == 0 {
            return Ok(None);
        }
        let now = now_ms();
        let mut info = state.info(&self.name, now);
        info.holder = self.live_holder(&state, now)?;
        Ok(Some(info))
    }

    /// Grants the lease unless it is held: the grant, or the holder's state.
    pub(crate) fn grant_if_free(
        &self,
        request: &LeaseGrant<'_>,
    ) -> Result<Result<Granted, LeaseState>> {
        let _guard = self.lock()?;
        let mut state = self.load()?;
        // Read the monotonic clock first: the holder's own deadline must never be
        // later than the one recorded for everybody else.
        let started = Instant::now();
        let now = now_ms();
        if self.is_held(&state, now)? {
            return Ok(Err(state));
        }
        // For a process-bound lease, lock the new token's `.alive` file before the
        // grant is written: the grant never exists without its liveness lock.
        let token = state.token + 1;
        let alive = if request.process_bound {
            let path = self.alive(token);
            let f = self.fs.open_lock(&path)?;
            f.try_lock()
                .map_err(|e| Error::io("lock", &path, io::Error::other(e.to_string())))?;
            Some(f)
        } else {
            None
        };
        let granted = self.grant(
            &mut state,
            request.holder,
            request.ttl,
            request.process_bound,
            now,
        );
        if let Err(e) = granted {
            let _ = self.fs.remove_file(&self.alive(token));
            return Err(e);
        }
        Ok(Ok(Granted {
            token: state.token,
            expires_at: datetime_ms(state.expires_at),
            started,
            alive,
        }))
    }

    /// Renews, releases or transfers grant `token` of `holder`. Releasing an expired
    /// lease nobody took over is harmless and allowed; the others need a live grant.
    pub(crate) fn change(
        &self,
        holder: &str,
        token: u64,
        change: LeaseChange,
    ) -> Result<LeaseInfo> {
        let _guard = self.lock()?;
        let mut state = self.load()?;
        let now = now_ms();
        let live = !matches!(change, LeaseChange::Release);
        self.check_holder(&state, holder, token, live.then_some(now))?;
        match change {
            LeaseChange::Renew(ttl) => {
                let r = Rec {
                    expires_at: Some(now.saturating_add(ms(ttl))),
                    ..self.rec(&state, Op::Renew, token, now)
                };
                self.append(&mut state, &r)?;
            }
            LeaseChange::Release => self.release(&mut state, token)?,
            LeaseChange::Transfer(to, ttl) => self.grant(&mut state, &to, ttl, false, now)?,
        }
        Ok(state.info(&self.name, now))
    }

    /// Releases grant `token` of `holder` if the lease file is free right now; never
    /// blocks (a busy lease simply runs out at its TTL).
    pub(crate) fn try_release(&self, holder: &str, token: u64) {
        let Ok(lock) = self.fs.open_lock(&self.lock_path()) else {
            return;
        };
        let Some(_guard) = Flock::try_exclusive(lock) else {
            return;
        };
        if let Ok(mut state) = self.load() {
            if self.check_holder(&state, holder, token, None).is_ok() {
                let _ = self.release(&mut state, token);
            }
        }
    }

    pub(crate) fn new(bus: &Bus, name: &str) -> LeaseFiles {
        LeaseFiles {
            fs: bus.fs().clone(),
            dir: bus.root().join("leases"),
            name: name.to_owned(),
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
        // Creates `leases/` if needed, and checks it (its owner and mode; a symlink is
        // refused) before anything in it is opened.
        if !self.fs.dir_exists(&self.dir)? {
            self.fs.create_dir(&self.dir)?;
        }
        let f = self.fs.open_lock(&path)?;
        Flock::exclusive(f, &path)
    }

    /// Reads the whole (small) lease file; cuts a torn tail (we hold the lock).
    fn load(&self) -> Result<LeaseState> {
        let path = self.log_path();
        let Some(file) = self.fs.open_read_opt(&path)? else {
            return Ok(LeaseState::default());
        };
        let mut state = LeaseState::default();
        let mut reader = log::LineReader::new(0, 64 * 1024);
        let mut line = 0;
        let mut last: Option<Rec> = None;
        loop {
            match reader.next(&file).ctx("read", &path)? {
                Line::Complete { start, end, .. } => {
                    line += 1;
                    let r: Rec = log::decode(reader.bytes(start, end), &path, line)?;
                    apply(&mut state, &r);
                    last = Some(r);
                }
                Line::TooLong { .. } => {
                    return Err(Error::Corrupt {
                        path,
                        line: line + 1,
                        reason: "lease record too long".into(),
                    })
                }
                Line::Partial { offset } => {
                    bound_by_write_time(&mut state, last.as_ref(), &file);
                    let w = self.fs.open_append(&path)?;
                    w.set_len(offset).ctx("truncate torn tail", &path)?;
                    return Ok(state);
                }
                Line::Eof => {
                    bound_by_write_time(&mut state, last.as_ref(), &file);
                    return Ok(state);
                }
            }
        }
    }

    fn rec(&self, state: &LeaseState, op: Op, token: u64, now: i64) -> Rec {
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
        state: &mut LeaseState,
        holder: &str,
        ttl: Duration,
        process_bound: bool,
        now: i64,
    ) -> Result<()> {
        let previous = state.token;
        let r = Rec {
            holder: Some(holder.to_owned()),
            expires_at: Some(now.saturating_add(ms(ttl))),
            acquired_at: Some(now),
            process_bound,
            ..self.rec(state, Op::Grant, state.token + 1, now)
        };
        self.append(state, &r)?;
        if previous > 0 {
            let _ = self.fs.remove_file(&self.alive(previous));
        }
        Ok(())
    }

    /// Whether the process that holds (held) grant `token` is gone: its `.alive` lock
    /// can be taken (or the file is missing).
    fn holder_died(&self, token: u64) -> Result<bool> {
        let path = self.alive(token);
        let Some(f) = self.fs.open_read_opt(&path)? else {
            return Ok(true);
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
    fn is_held(&self, state: &LeaseState, now: i64) -> Result<bool> {
        Ok(state.held_at(now) && !(state.process_bound && self.holder_died(state.token)?))
    }

    /// The holder, if the lease [`is_held`](Self::is_held).
    fn live_holder(&self, state: &LeaseState, now: i64) -> Result<Option<String>> {
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
        state: &LeaseState,
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
    fn release(&self, state: &mut LeaseState, token: u64) -> Result<()> {
        let r = self.rec(state, Op::Release, token, now_ms());
        self.append(state, &r)?;
        let _ = self.fs.remove_file(&self.alive(token));
        Ok(())
    }

    /// Appends one record, and compacts the file when it has grown. Always synced,
    /// whatever the bus's durability: a grant lost to a power cut could hand its token
    /// out twice, and leases change rarely enough for the fsync not to matter.
    fn append(&self, state: &mut LeaseState, r: &Rec) -> Result<()> {
        let path = self.log_path();
        let (file, created) = self.fs.open_append_created(&path)?;
        let mut line = Vec::with_capacity(200);
        record::encode_value(r, &mut line);
        (&file).write_all(&line).ctx("append", &path)?;
        file.sync_data().ctx("fdatasync", &path)?;
        if created {
            // The lease file's entry, and `leases/`'s own (created lazily).
            self.fs.sync_dir(&self.dir)?;
            if let Some(root) = self.dir.parent() {
                self.fs.sync_dir(root)?;
            }
        }
        apply(state, r);
        if file.metadata().ctx("stat", &path)?.len() > COMPACT_BYTES {
            self.compact(state)?;
        }
        Ok(())
    }

    /// Rewrites the lease file as one `state` record holding the current token, so the
    /// token keeps increasing whatever is removed.
    fn compact(&self, state: &LeaseState) -> Result<()> {
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
        self.fs.write_atomic(&self.log_path(), &line, true)
    }
}
