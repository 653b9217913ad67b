//! A consumer group in a directory: `groups/<name>/` of its mailbox.
//!
//! A group's state is a fold over append-only records (see `state`) in
//! `state.<gen>.jsonl`, plus `checkpoint.json`, the folded state at the start of that
//! file. When the state file grows past [`ROTATE_BYTES`], the holder of the group lock
//! writes a checkpoint and starts the next generation, so opening a group reads one
//! small checkpoint and a bounded tail, never the whole history. Other processes notice
//! a rotation because the checkpoint's inode is no longer the one they loaded (which
//! they keep open, so it is not reused).
//!
//! | file | what it holds |
//! | --- | --- |
//! | `mod.rs` | the engine: lock, load, replay, write, rotate; settlements, counters |
//! | `state.rs` | the records and their fold |
//! | `claim.rs` | claims: redeliveries, then new messages |
//! | `create.rs` | creating a group |

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use super::fsutil::{Flock, Fs};
use super::read::{LogSpec, Position, Reader};
use super::segment::{self as log, Line};
use super::{record, Mailbox, FORMAT_VERSION};
use crate::backend::{
    cap_reason, AttemptNote, Backend, Claimed, DeadLetterTo, GroupBackend, GroupMeta, Settle,
};
use crate::clock::{ms, now_ms, ts_ms};
use crate::error::IoContext;
use crate::report::GroupStats;
use crate::watch::{Watch, WatchMode};
use crate::{Error, Message, Result};

mod claim;
mod create;
mod state;

pub(crate) use create::{create, groups_lock};
use state::{Checkpoint, Entry, GroupState, Op, Rec};

/// The longest state record accepted (reasons are capped far below it).
const STATE_LINE_LIMIT: usize = 64 * 1024;

/// State files larger than this are checkpointed and rotated. Opening a group replays
/// at most this much (a few hundred records, well under a millisecond), and a rotation
/// (one small checkpoint write) happens every few hundred records.
pub(crate) const ROTATE_BYTES: u64 = 64 * 1024;

/// A group directory. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Group {
    inner: Arc<GroupInner>,
}

#[derive(Debug)]
struct GroupInner {
    mailbox: Mailbox,
    name: String,
    dir: PathBuf,
    /// `dir/checkpoint.json`, stat'ed by every locked operation.
    checkpoint_path: PathBuf,
    meta: GroupMeta,
    cache: Mutex<Cache>,
}

#[derive(Debug)]
struct Cache {
    lock_path: PathBuf,
    lock: File,
    loaded: Option<Loaded>,
}

/// The group state as of byte `off` of the state file of generation `gen`.
#[derive(Debug)]
struct Loaded {
    state: GroupState,
    gen: u64,
    file: File,
    path: PathBuf,
    off: u64,
    /// A reader positioned at `state.next`, kept across claims.
    reader: Option<Reader>,
    /// Reads the state file; kept so each refresh does not allocate a buffer.
    lines: log::LineReader,
    /// Which `checkpoint.json` this state was loaded from (or last wrote).
    checkpoint: FileId,
    /// That checkpoint, kept open: while it is, its inode cannot be freed, so no later
    /// checkpoint can get its number and `checkpoint` identifies it exactly.
    _pinned: Option<File>,
}

/// The identity of a file: device and inode. `checkpoint.json` is only ever replaced
/// by an atomic rename, so its identity changes exactly when a rotation takes effect:
/// one `stat` tells a process whether it must reload. The loaded checkpoint is kept
/// open, so its inode number cannot be handed to a newer one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId(u64, u64);

impl FileId {
    fn at(fs: &Fs, path: &Path) -> Result<FileId> {
        let meta = fs.stat(path).ctx("stat", path)?;
        Ok(FileId(meta.dev, meta.ino))
    }

    /// Opens `path` and identifies it through that descriptor (which pins it).
    fn open(fs: &Fs, path: &Path) -> Result<(FileId, File)> {
        use std::os::unix::fs::MetadataExt;
        let file = fs.open_read(path)?;
        let meta = file.metadata().ctx("stat", path)?;
        Ok((FileId(meta.dev(), meta.ino()), file))
    }
}

impl Group {
    /// Opens the group `name` of `mailbox`; `None` if it does not exist.
    pub(crate) fn open(mailbox: &Mailbox, name: &str) -> Result<Option<Group>> {
        let fs = mailbox.bus().fs();
        let groups = mailbox.dir().join("groups");
        let dir = groups.join(name);
        // Both directories are checked once per handle; everything in them is opened
        // beneath the bus directory, never through a symlink.
        if !fs.dir_exists(&groups)? || !fs.dir_exists(&dir)? {
            return Ok(None);
        }
        let meta_path = dir.join("group.json");
        let meta: GroupMeta = read_json(fs, &meta_path)?;
        meta.check_format(&meta_path)?;
        let lock_path = dir.join("lock");
        let lock = fs.open_lock(&lock_path)?;
        Ok(Some(Group {
            inner: Arc::new(GroupInner {
                mailbox: mailbox.clone(),
                name: name.to_owned(),
                checkpoint_path: dir.join("checkpoint.json"),
                dir,
                meta,
                cache: Mutex::new(Cache {
                    lock_path,
                    lock,
                    loaded: None,
                }),
            }),
        }))
    }

    pub(crate) fn meta(&self) -> &GroupMeta {
        &self.inner.meta
    }

    fn name(&self) -> &str {
        &self.inner.name
    }

    fn fs(&self) -> &Fs {
        self.inner.mailbox.bus().fs()
    }

    fn spec(&self) -> LogSpec {
        self.inner.mailbox.log_spec()
    }

    /// The entry of delivered, unsettled message `seq`.
    fn unsettled<'l>(&self, loaded: &'l Loaded, seq: u64) -> Result<&'l Entry> {
        if seq >= loaded.state.next {
            return Err(self.not_delivered(seq));
        }
        loaded
            .state
            .entries
            .get(&seq)
            .ok_or_else(|| self.stale(seq, "already settled"))
    }

    /// When unsettled message `seq` may be delivered again: a nacked one when its
    /// delay is over; one whose claim ran out when the retry policy's delay for that
    /// attempt is over too (none without a policy, or when it has no delivery left:
    /// then it is dead-lettered as soon as its claim runs out).
    fn due_at(&self, seq: u64, e: &Entry) -> i64 {
        let meta = &self.inner.meta;
        match &meta.retry {
            Some(p) if e.consumer.is_some() && e.attempt < meta.max_deliveries => {
                e.visible_at.saturating_add(ms(p.delay_for(seq, e.attempt)))
            }
            _ => e.visible_at,
        }
    }

    /// Where this group's dead letters and damage notices go.
    fn dead_letter_to(&self) -> DeadLetterTo<'_> {
        let bus = self.inner.mailbox.bus();
        DeadLetterTo {
            bus,
            agent: &bus.opts().agent,
            mailbox: self.inner.mailbox.name(),
            group: self.name(),
            meta: &self.inner.meta,
        }
    }

    fn stale(&self, seq: u64, why: impl Into<String>) -> Error {
        Error::StaleDelivery {
            group: self.name().to_owned(),
            seq,
            reason: why.into(),
        }
    }

    /// Acks one message; `false` if it was already settled.
    fn ack_seq(&self, seq: u64) -> Result<bool> {
        self.locked(|g, loaded| {
            if seq >= loaded.state.next {
                return Err(g.not_delivered(seq));
            }
            if !loaded.state.entries.contains_key(&seq) {
                return Ok(false);
            }
            g.append(loaded, &[Rec::new(seq, Op::Ack, now_ms())])?;
            Ok(true)
        })
    }

    /// Acks every delivered message up to `seq`; how many were newly acked.
    fn ack_through(&self, seq: u64) -> Result<u64> {
        self.locked(|g, loaded| {
            let n = loaded.state.entries.range(..=seq).count() as u64;
            if n > 0 {
                g.append(loaded, &[Rec::new(seq, Op::AckUpto, now_ms())])?;
            }
            Ok(n)
        })
    }

    /// Nacks, extends, terms or dead-letters the live claim of `seq`. A nack of the
    /// last delivery a message gets dead-letters it.
    fn settle_claim(&self, seq: u64, attempt: Option<u32>, how: Settle) -> Result<()> {
        let mut not_retryable = false;
        let (op, delay, reason) = match how {
            Settle::Nack { delay, reason } => (Op::Nack, delay, reason),
            Settle::Extend(by) => (Op::Extend, by, None),
            Settle::Term { reason } => (Op::Term, Duration::ZERO, reason),
            Settle::DeadLetter {
                reason,
                not_retryable: n,
            } => {
                not_retryable = n;
                (Op::Dead, Duration::ZERO, Some(reason))
            }
        };
        self.locked(|g, loaded| {
            let now = now_ms();
            let entry = g.unsettled(loaded, seq)?;
            if attempt.is_some_and(|a| a != entry.attempt) {
                return Err(g.stale(
                    seq,
                    format!("redelivered meanwhile (now attempt {})", entry.attempt),
                ));
            }
            if entry.consumer.is_none() || entry.visible_at <= now {
                return Err(g.stale(seq, "the claim ran out or was given back"));
            }
            let reason = reason.as_deref().map(cap_reason);
            let last_delivery = entry.attempt >= g.inner.meta.max_deliveries;
            if op == Op::Dead || (op == Op::Nack && last_delivery) {
                // Given up on, or that was the last delivery it gets: dead-letter it now.
                let to = g.dead_letter_to();
                let (outcome, reason, recorded) = match op {
                    Op::Dead => {
                        let reason = reason.unwrap_or_default();
                        let (outcome, recorded) = to.at_once(&reason, not_retryable);
                        (outcome, reason, recorded)
                    }
                    _ => {
                        let reason = reason.unwrap_or_else(|| "nacked".into());
                        let recorded = to.exhausted(&reason);
                        ("nacked", reason, recorded)
                    }
                };
                let mut last = entry.clone();
                last.history.push(AttemptNote {
                    attempt: entry.attempt,
                    consumer: entry.consumer.clone(),
                    outcome: outcome.into(),
                    reason: Some(reason),
                    at: now,
                });
                let message = read_at(&g.spec(), entry.at, seq)?;
                return g.bury(loaded, &message, &last.history, &recorded, now);
            }
            let mut r = Rec::new(seq, op, now);
            r.attempt = Some(entry.attempt);
            r.until = Some(now.saturating_add(ms(delay)));
            r.reason = reason;
            g.append(loaded, &[r])
        })
    }

    /// Delivers settled message `seq` again, from its place in the log, which must
    /// hold it intact now.
    fn requeue_seq(&self, seq: u64) -> Result<bool> {
        let spec = self.spec();
        self.locked(|g, loaded| {
            if seq >= loaded.state.next {
                return Err(g.not_delivered(seq));
            }
            if loaded.state.entries.contains_key(&seq) {
                return Ok(false);
            }
            let mut reader = Reader::new(spec).starting_at(seq);
            let message = match reader.next() {
                Some(Ok(m)) if m.seq == seq => m,
                Some(Err(e @ Error::Corrupt { .. })) => return Err(e),
                _ => {
                    return Err(Error::Corrupt {
                        path: g.spec().dir,
                        line: 0,
                        reason: format!("seq {seq} is not in the log (compacted, or missing)"),
                    })
                }
            };
            let mut r = Rec::new(seq, Op::Requeue, now_ms());
            r.at = reader.last_start();
            r.ts = Some(ts_ms(message.ts));
            g.append(loaded, &[r])?;
            Ok(true)
        })
    }

    /// The group's counters.
    fn counters(&self) -> Result<GroupStats> {
        let published = self.inner.mailbox.last_seq()?;
        let spec = self.spec();
        self.locked(|g, loaded| {
            let now = now_ms();
            let st = &loaded.state;
            let in_flight = st
                .entries
                .values()
                .filter(|e| e.consumer.is_some() && e.visible_at > now)
                .count() as u64;
            let lag = (published + 1).saturating_sub(st.next);
            let waiting = st.entries.len() as u64 - in_flight;
            let oldest_ts = match st.entries.iter().next() {
                Some((_, Entry { ts: Some(ts), .. })) => Some(*ts),
                Some((&seq, e)) => read_at(&spec, e.at, seq).ok().map(|m| ts_ms(m.ts)),
                None if lag > 0 => reader_at(&spec, st.next, st.next_pos)
                    .find_map(|m| m.ok())
                    .map(|m| ts_ms(m.ts)),
                None => None,
            };
            Ok(GroupStats {
                group: g.name().to_owned(),
                delivered: st.delivered,
                acked: st.acked,
                in_flight,
                pending: lag + waiting,
                redelivered: st.redelivered,
                dead: st.dead,
                termed: st.termed,
                skipped: st.skipped,
                coalesced: st.coalesced,
                lag,
                next_seq: st.next,
                oldest_unacked_ms: oldest_ts.map(|ts| now.saturating_sub(ts).max(0) as u64),
            })
        })
    }

    /// Every seq below the returned one is settled in this group.
    pub(crate) fn floor(&self) -> Result<u64> {
        self.locked(|_, loaded| Ok(loaded.state.floor()))
    }

    fn not_delivered(&self, seq: u64) -> Error {
        Error::NotDelivered {
            group: self.name().to_owned(),
            seq,
        }
    }

    fn lock_cache(&self) -> MutexGuard<'_, Cache> {
        self.inner.cache.lock().unwrap_or_else(|poisoned| {
            let mut c = poisoned.into_inner();
            c.loaded = None;
            c
        })
    }

    /// Runs `f` with the group lock held and the state brought up to date.
    fn locked<R>(&self, f: impl FnOnce(&Group, &mut Loaded) -> Result<R>) -> Result<R> {
        let mut guard = self.lock_cache();
        let cache = &mut *guard;
        let _flock = Flock::exclusive(&cache.lock, &cache.lock_path)?;
        let result = self
            .refresh(&mut cache.loaded)
            .and_then(|loaded| f(self, loaded));
        if result.is_err() {
            // Whatever failed, re-read the state from disk next time.
            cache.loaded = None;
        }
        result
    }

    /// Brings the cached state up to date with the state file (or loads it).
    fn refresh<'c>(&self, cached: &'c mut Option<Loaded>) -> Result<&'c mut Loaded> {
        // Another process rotated (once or more; completely, or dying after its new
        // checkpoint was in place) if the checkpoint is not the one we loaded: start
        // again from it. A rotation that died before its checkpoint changed nothing.
        let mut loaded = match cached.take() {
            Some(l) if FileId::at(self.fs(), &self.inner.checkpoint_path)? == l.checkpoint => l,
            _ => self.load()?,
        };
        self.replay(&mut loaded)?;
        Ok(cached.insert(loaded))
    }

    fn load(&self) -> Result<Loaded> {
        let dir = &self.inner.dir;
        // Identify the checkpoint through the descriptor we read it from.
        let cp_path = &self.inner.checkpoint_path;
        let fs = self.fs();
        let (checkpoint, cp_file) = FileId::open(fs, cp_path)?;
        let cp: Checkpoint = parse_json(&cp_file, cp_path)?;
        // Remove state files of other generations: older ones are covered by the
        // checkpoint; a newer one is left over from a rotation that died before its
        // checkpoint was written, and nothing was ever appended to it.
        for (name, _) in fs.list(dir, false)? {
            let gen = name
                .to_str()
                .and_then(|n| n.strip_prefix("state."))
                .and_then(|n| n.strip_suffix(".jsonl"))
                .and_then(|n| n.parse::<u64>().ok());
            // Also the temporary file of a checkpoint write that died half-way.
            let stray_checkpoint = name
                .to_str()
                .is_some_and(|n| n.starts_with(".checkpoint.json.") && n.ends_with(".tmp"));
            if gen.is_some_and(|g| g != cp.gen) || stray_checkpoint {
                let _ = fs.remove_file(&dir.join(&name));
            }
        }
        let path = state_path(dir, cp.gen);
        let file = fs.open_append(&path)?;
        Ok(Loaded {
            state: cp.state,
            gen: cp.gen,
            file,
            path,
            off: cp.offset,
            reader: None,
            lines: log::LineReader::new(cp.offset, STATE_LINE_LIMIT),
            checkpoint,
            _pinned: Some(cp_file),
        })
    }

    /// Applies the records written since `loaded.off`, cutting a torn tail.
    fn replay(&self, loaded: &mut Loaded) -> Result<()> {
        let reader = &mut loaded.lines;
        reader.reset(loaded.off);
        loop {
            match reader.next(&loaded.file).ctx("read", &loaded.path)? {
                Line::Complete { start, end, .. } => {
                    let r: Rec = log::decode(reader.bytes(start, end), &loaded.path, 0)?;
                    loaded.state.apply(&r);
                    loaded.off = reader.position();
                }
                Line::TooLong { offset, .. } => {
                    return Err(Error::Corrupt {
                        path: loaded.path.clone(),
                        line: log::line_number_at(&loaded.file, offset).unwrap_or(0) + 1,
                        reason: "state record too long".into(),
                    })
                }
                Line::Partial { offset } => {
                    // A group writer died mid-append; we hold the lock, so cut it.
                    loaded
                        .file
                        .set_len(offset)
                        .ctx("truncate torn tail", &loaded.path)?;
                    return Ok(());
                }
                Line::Eof => return Ok(()),
            }
        }
    }

    /// The cached reader, positioned at `state.next`.
    fn reader<'l>(&self, loaded: &'l mut Loaded) -> &'l mut Reader {
        let next = loaded.state.next;
        let stale = loaded.reader.as_ref().is_none_or(|r| r.next_seq() != next);
        if stale {
            loaded.reader = Some(reader_at(&self.spec(), next, loaded.state.next_pos));
        }
        loaded.reader.as_mut().expect("reader just set")
    }

    /// Applies `records` and writes them.
    fn append(&self, loaded: &mut Loaded, records: &[Rec]) -> Result<()> {
        for r in records {
            loaded.state.apply(r);
        }
        self.write(loaded, records)
    }

    /// Writes already-applied records with one `write()`, syncing when one of them
    /// settles a message, then rotates the state file if it has grown too large.
    fn write(&self, loaded: &mut Loaded, records: &[Rec]) -> Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(records.len() * 160);
        for r in records {
            record::encode_value(r, &mut buf);
        }
        let opts = self.inner.mailbox.bus().opts();
        // A cursor moved past records must never be durable before the records are:
        // after a power cut the group would be ahead of its log (and skip the seqs
        // written after it). The reader that read them makes them durable first.
        if opts.sync() && records.iter().any(|r| r.next.is_some()) {
            if let Some(reader) = loaded.reader.as_mut() {
                reader.sync_read()?;
            }
        }
        if let Err(e) = (&loaded.file).write_all(&buf) {
            let _ = loaded.file.set_len(loaded.off);
            return Err(Error::io("append", &loaded.path, e));
        }
        if opts.sync() && records.iter().any(Rec::needs_sync) {
            loaded.file.sync_data().ctx("fdatasync", &loaded.path)?;
        }
        loaded.off += buf.len() as u64;
        if loaded.off > ROTATE_BYTES {
            // The records are written; a failed rotation only postpones compaction of
            // the state file (the next write tries again), so it is not this call's error.
            if let Err(e) = self.rotate(loaded) {
                ::log::warn!(
                    "agentbus: group {}: cannot rotate the state file: {e}",
                    self.name()
                );
                // It may have failed after its new checkpoint took effect (fsyncing the
                // directory): then take the state from disk again, so no later write in
                // this call goes to a file that is no longer current.
                if FileId::at(self.fs(), &self.inner.checkpoint_path).ok()
                    != Some(loaded.checkpoint)
                {
                    let mut fresh = self.load()?;
                    self.replay(&mut fresh)?;
                    *loaded = fresh;
                }
            }
        }
        Ok(())
    }

    /// Checkpoints the state and starts the next generation of the state file. Each
    /// step leaves a consistent group if the process dies after it: the new file is
    /// empty until the checkpoint names it, and the old one is only removed after.
    fn rotate(&self, loaded: &mut Loaded) -> Result<()> {
        let dir = &self.inner.dir;
        let opts = self.inner.mailbox.bus().opts();
        let gen = loaded.gen + 1;
        let path = state_path(dir, gen);
        let fs = self.fs();
        let file = fs.open_append(&path)?;
        let cp = Checkpoint {
            format: FORMAT_VERSION,
            gen,
            offset: 0,
            state: loaded.state.clone(),
        };
        let bytes = serde_json::to_vec(&cp).expect("checkpoint serializes");
        fs.write_atomic(&self.inner.checkpoint_path, &bytes, opts.sync())?;
        let _ = fs.remove_file(&loaded.path);
        loaded.gen = gen;
        loaded.file = file;
        loaded.path = path;
        loaded.off = 0;
        // The checkpoint we just wrote, pinned; if it cannot be opened, the next
        // refresh simply reloads.
        match FileId::open(fs, &self.inner.checkpoint_path) {
            Ok((id, file)) => {
                loaded.checkpoint = id;
                loaded._pinned = Some(file);
            }
            Err(_) => {
                loaded.checkpoint = FileId(0, 0);
                loaded._pinned = None;
            }
        }
        Ok(())
    }

    /// Moves a message that ran out of deliveries (or that its consumer gave up on) to
    /// the dead-letter mailbox with `reason` as given, then records it as dead. The idempotency key makes the copy exactly-once even if we
    /// die between the two steps.
    fn bury(
        &self,
        loaded: &mut Loaded,
        message: &Message,
        history: &[AttemptNote],
        reason: &str,
        now: i64,
    ) -> Result<()> {
        let reason = self.dead_letter_to().send(message, history, reason)?;
        let mut r = Rec::new(message.seq, Op::Dead, now);
        r.reason = Some(reason);
        self.append(loaded, &[r])
    }
}

impl Backend for Group {
    fn kind(&self) -> &'static str {
        "directory"
    }
}

impl GroupBackend for Group {
    fn claim(&self, consumer: &str, max: usize, visibility: Duration) -> Result<Vec<Claimed>> {
        self.claim_batch(consumer, max, visibility)
    }

    fn claim_seq(&self, consumer: &str, seq: u64, visibility: Duration) -> Result<Option<Claimed>> {
        self.claim_exactly(consumer, seq, visibility)
    }

    fn delivery(&self, seq: u64, attempt: u32) -> Result<Claimed> {
        self.live_claim(seq, attempt)
    }

    fn in_flight(&self, seq: u64) -> Result<Option<Claimed>> {
        let attempt = self.locked(|_, loaded| {
            Ok(loaded
                .state
                .entries
                .get(&seq)
                .filter(|e| e.consumer.is_some() && e.visible_at > now_ms())
                .map(|e| e.attempt))
        })?;
        match attempt {
            None => Ok(None),
            Some(a) => match self.live_claim(seq, a) {
                Ok(d) => Ok(Some(d)),
                Err(Error::StaleDelivery { .. }) => Ok(None),
                Err(e) => Err(e),
            },
        }
    }

    /// Acking a message whose claim already ran out is still accepted (the work was
    /// done), whatever the attempt.
    fn ack(&self, seq: u64, attempt: Option<u32>) -> Result<bool> {
        let _ = attempt;
        self.ack_seq(seq)
    }

    fn ack_upto(&self, seq: u64) -> Result<u64> {
        self.ack_through(seq)
    }

    fn requeue(&self, seq: u64) -> Result<bool> {
        self.requeue_seq(seq)
    }

    fn settle(&self, seq: u64, attempt: Option<u32>, how: Settle) -> Result<()> {
        self.settle_claim(seq, attempt, how)
    }

    fn live_attempt(&self, seq: u64) -> Result<u32> {
        self.locked(|g, loaded| {
            let entry = g.unsettled(loaded, seq)?;
            if entry.consumer.is_none() || entry.visible_at <= now_ms() {
                return Err(g.stale(seq, "the claim ran out or was given back"));
            }
            Ok(entry.attempt)
        })
    }

    fn stats(&self) -> Result<GroupStats> {
        self.counters()
    }

    fn next_due_ms(&self) -> Result<Option<i64>> {
        self.locked(|g, loaded| {
            let entries = loaded.state.entries.iter();
            Ok(entries.map(|(seq, e)| g.due_at(*seq, e)).min())
        })
    }

    fn watch(&self, mode: WatchMode) -> Watch {
        let dirs = [
            self.inner.mailbox.log_dir().to_owned(),
            self.inner.dir.clone(),
        ];
        let poll = self.inner.mailbox.bus().opts().poll_interval;
        super::watch::watch_dirs(&dirs, mode, poll)
    }
}

fn read_json<T: serde::de::DeserializeOwned>(fs: &Fs, path: &Path) -> Result<T> {
    let file = fs.open_read(path)?;
    parse_json(&file, path)
}

fn parse_json<T: serde::de::DeserializeOwned>(file: &File, path: &Path) -> Result<T> {
    serde_json::from_reader(io::BufReader::new(file)).map_err(|e| Error::Corrupt {
        path: path.to_owned(),
        line: 1,
        reason: format!("not valid JSON for this file: {e}"),
    })
}

/// Reads the message `seq`, starting the search at `at`.
fn read_at(spec: &LogSpec, at: Position, seq: u64) -> Result<Message> {
    let mut reader = Reader::at(spec.clone(), at);
    for item in reader.by_ref() {
        match item {
            Ok(m) if m.seq == seq => return Ok(m),
            Ok(m) if m.seq > seq => break,
            _ => {}
        }
    }
    Err(Error::Corrupt {
        path: spec.dir.join(log::segment_name(at.segment)),
        line: at.line + 1,
        reason: format!("delivered message seq {seq} is no longer readable"),
    })
}

/// A reader at seq `next`, starting from its known position `pos` when it has one.
fn reader_at(spec: &LogSpec, next: u64, pos: Option<Position>) -> Reader {
    match pos {
        Some(pos) if pos.seq == next => Reader::at(spec.clone(), pos),
        _ => Reader::new(spec.clone()).starting_at(next),
    }
    .syncing()
}

fn state_path(dir: &Path, gen: u64) -> PathBuf {
    dir.join(format!("state.{gen}.jsonl"))
}
