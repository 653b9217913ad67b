//! Consumer groups: durable, competing consumption of a mailbox.
//!
//! A group's state is a fold over append-only records (`claim`, `claim_range`, `ack`,
//! `ack_upto`, `nack`, `extend`, `term`, `dead`, `skip`) in `state.<gen>.jsonl`, plus
//! `checkpoint.json`, the folded state at the start of that file. When the state file
//! grows past [`ROTATE_BYTES`], the holder of the group lock writes a checkpoint and
//! starts the next generation, so opening a group reads one small checkpoint and a
//! bounded tail, never the whole history. Other processes notice a rotation because the
//! checkpoint's inode is no longer the one they loaded (which they keep open, so it is
//! not reused).
//!
//! The in-memory state holds the cursor (`next`, the first never-delivered seq, and its
//! byte position in the log) and one entry per delivered but unsettled message: its
//! size is bounded by the work in flight, not by history.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::error::IoContext;
use crate::fsutil::Flock;
use crate::log::{self, Line};
use crate::read::Position;
use crate::{
    fsutil, record, validate_name, Error, Filter, Mailbox, Message, Messages, NewMessage, Result,
};

/// The longest state record accepted (reasons are capped far below it).
const STATE_LINE_LIMIT: usize = 64 * 1024;

/// State files larger than this are checkpointed and rotated. Opening a group replays
/// at most this much (a few hundred records, well under a millisecond), and a rotation
/// (one small checkpoint write) happens every few hundred records.
pub(crate) const ROTATE_BYTES: u64 = 64 * 1024;

/// Where a new group starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum StartAt {
    /// Deliver every message the mailbox holds, from the oldest (the default).
    #[default]
    Beginning,
    /// Deliver only messages sent after the group was created.
    End,
}

/// Settings of a consumer group, fixed when it is created.
///
/// ```
/// use std::time::Duration;
/// let opts = agentbus::GroupOptions::new()
///     .max_deliveries(3)
///     .visibility(Duration::from_secs(60));
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct GroupOptions {
    max_deliveries: u32,
    visibility: Duration,
    dead_letter: Option<String>,
    start: StartAt,
    filter: Filter,
}

impl Default for GroupOptions {
    fn default() -> Self {
        GroupOptions {
            max_deliveries: 5,
            visibility: Duration::from_secs(30),
            dead_letter: None,
            start: StartAt::Beginning,
            filter: Filter::new(),
        }
    }
}

impl GroupOptions {
    /// Defaults: 5 deliveries, 30 s visibility, dead letters to `<mailbox>.dlq`, start
    /// at the beginning.
    pub fn new() -> Self {
        GroupOptions::default()
    }

    /// How many times a message is delivered before it is dead-lettered (at least 1).
    pub fn max_deliveries(mut self, n: u32) -> Self {
        self.max_deliveries = n.max(1);
        self
    }

    /// Default visibility timeout of a claim: how long a consumer has to ack, nack or
    /// extend before the message is redelivered.
    pub fn visibility(mut self, timeout: Duration) -> Self {
        self.visibility = timeout;
        self
    }

    /// The mailbox that receives dead letters (created if missing); default
    /// `<mailbox>.dlq`.
    pub fn dead_letter(mut self, mailbox: impl Into<String>) -> Self {
        self.dead_letter = Some(mailbox.into());
        self
    }

    /// Where the group starts reading.
    pub fn start(mut self, start: StartAt) -> Self {
        self.start = start;
        self
    }

    /// Only messages passing `filter` are delivered to this group; the others are
    /// skipped (counted in [`GroupStats::skipped`]) as the cursor passes them, for every
    /// consumer of the group. Like a JetStream consumer's filter subject.
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filter = filter;
        self
    }
}

/// `group.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct GroupMeta {
    format: u64,
    max_deliveries: u32,
    visibility_ms: u64,
    dead_letter: String,
    #[serde(default, skip_serializing_if = "Filter::is_empty")]
    filter: Filter,
}

impl GroupMeta {
    fn new(opts: &GroupOptions, dead_letter: String) -> GroupMeta {
        GroupMeta {
            format: crate::FORMAT_VERSION,
            max_deliveries: opts.max_deliveries,
            visibility_ms: opts.visibility.as_millis() as u64,
            dead_letter,
            filter: opts.filter.clone(),
        }
    }
}

/// One delivered, unsettled message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Entry {
    pub(crate) attempt: u32,
    /// The consumer holding the claim; `None` after a nack.
    pub(crate) consumer: Option<String>,
    /// When the message may be delivered again (ms since the Unix epoch).
    pub(crate) visible_at: i64,
    /// Where the message starts in the log.
    pub(crate) at: Position,
    /// The message's own timestamp (ms), for the oldest-unacked age; `None` when the
    /// state records do not say (all but the first message of a `claim_range`), and
    /// then read from the log when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ts: Option<i64>,
    /// How earlier attempts ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) history: Vec<AttemptNote>,
}

/// How one delivery attempt ended without an ack.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct AttemptNote {
    pub(crate) attempt: u32,
    pub(crate) consumer: Option<String>,
    pub(crate) outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
    pub(crate) at: i64,
}

/// The folded state of a group.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct GroupState {
    /// The first seq never delivered.
    pub(crate) next: u64,
    /// Where `next` is in the log, when known.
    pub(crate) next_pos: Option<Position>,
    pub(crate) entries: BTreeMap<u64, Entry>,
    pub(crate) delivered: u64,
    pub(crate) redelivered: u64,
    pub(crate) acked: u64,
    pub(crate) nacked: u64,
    pub(crate) termed: u64,
    pub(crate) dead: u64,
    #[serde(default)]
    pub(crate) skipped: u64,
}

/// One state record. Flat, with optional fields, to keep lines short.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Rec {
    pub(crate) seq: u64,
    pub(crate) op: Op,
    /// When the record was written (ms).
    pub(crate) t: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) attempt: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) consumer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) until: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) at: Option<Position>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) next: Option<Position>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ts: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
    /// For a `dead` record at the cursor (damaged records): the first seq of the range
    /// that ends at `seq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) first: Option<u64>,
    /// For a `claim_range` record: the last seq of the range that starts at `seq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) last: Option<u64>,
}

/// Reasons are kept short so that a state record always stays far below the state
/// file's line limit and a dead letter below the record limit.
pub(crate) const MAX_REASON_BYTES: usize = 1024;

fn cap_reason(reason: &str) -> String {
    if reason.len() <= MAX_REASON_BYTES {
        return reason.to_owned();
    }
    let mut end = MAX_REASON_BYTES - 3;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &reason[..end])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Op {
    Claim,
    /// New messages `seq..=last`, delivered to one consumer in one claim.
    ClaimRange,
    Ack,
    AckUpto,
    Nack,
    Extend,
    Term,
    Dead,
    /// Passed over by the group's filter.
    Skip,
}

impl Rec {
    fn new(seq: u64, op: Op, t: i64) -> Rec {
        Rec {
            seq,
            op,
            t,
            attempt: None,
            consumer: None,
            until: None,
            at: None,
            next: None,
            ts: None,
            reason: None,
            first: None,
            last: None,
        }
    }

    /// Records whose loss in a power cut would undo a settled outcome. Claims and
    /// extends are not among them (losing one only makes a redelivery come earlier),
    /// nor are skips (the filter passes over the same messages again).
    fn needs_sync(&self) -> bool {
        !matches!(self.op, Op::Claim | Op::ClaimRange | Op::Extend | Op::Skip)
    }
}

impl GroupState {
    fn new(next: u64) -> GroupState {
        GroupState {
            next,
            ..GroupState::default()
        }
    }

    /// Every seq below the floor is settled.
    pub(crate) fn floor(&self) -> u64 {
        self.entries.keys().next().copied().unwrap_or(self.next)
    }

    /// Folds one record into the state. Records for seqs that are already settled are
    /// ignored, so replaying is safe whatever the interleaving of writers was.
    pub(crate) fn apply(&mut self, r: &Rec) {
        match r.op {
            Op::Claim => {
                let attempt = r.attempt.unwrap_or(1);
                if r.seq >= self.next {
                    self.next = r.seq + 1;
                    self.next_pos = r.next;
                    self.delivered += 1;
                } else if !self.entries.contains_key(&r.seq) {
                    return;
                }
                if attempt > 1 {
                    self.redelivered += 1;
                }
                let entry = self.entries.entry(r.seq).or_insert_with(|| Entry {
                    attempt,
                    consumer: None,
                    visible_at: 0,
                    at: r.at.unwrap_or(Position {
                        segment: 0,
                        offset: 0,
                        line: 0,
                        seq: r.seq,
                    }),
                    ts: r.ts,
                    history: Vec::new(),
                });
                if attempt > 1 && entry.consumer.is_some() {
                    // The previous claim ran out.
                    entry.history.push(AttemptNote {
                        attempt: entry.attempt,
                        consumer: entry.consumer.take(),
                        outcome: "expired".into(),
                        reason: None,
                        at: entry.visible_at,
                    });
                }
                entry.attempt = attempt;
                entry.consumer = r.consumer.clone();
                entry.visible_at = r.until.unwrap_or(r.t);
            }
            Op::ClaimRange => {
                // Each message as if claimed alone, all at the first one's position (a
                // redelivery reads forward from there to its seq).
                let last = r.last.unwrap_or(r.seq);
                for seq in r.seq.max(self.next)..=last {
                    let mut claim = Rec::new(seq, Op::Claim, r.t);
                    claim.attempt = Some(1);
                    claim.consumer = r.consumer.clone();
                    claim.until = r.until;
                    claim.at = r.at;
                    claim.ts = r.ts.filter(|_| seq == r.seq);
                    claim.next = r.next.filter(|_| seq == last);
                    self.apply(&claim);
                }
            }
            Op::Ack => {
                if self.entries.remove(&r.seq).is_some() {
                    self.acked += 1;
                }
            }
            Op::AckUpto => {
                let keep = match r.seq.checked_add(1) {
                    Some(above) => self.entries.split_off(&above),
                    None => BTreeMap::new(),
                };
                self.acked += self.entries.len() as u64;
                self.entries = keep;
            }
            Op::Nack => {
                if let Some(e) = self.entries.get_mut(&r.seq) {
                    self.nacked += 1;
                    e.history.push(AttemptNote {
                        attempt: e.attempt,
                        consumer: e.consumer.take(),
                        outcome: "nacked".into(),
                        reason: r.reason.clone(),
                        at: r.t,
                    });
                    e.visible_at = r.until.unwrap_or(r.t);
                }
            }
            Op::Extend => {
                if let Some(e) = self.entries.get_mut(&r.seq) {
                    e.visible_at = r.until.unwrap_or(e.visible_at);
                }
            }
            Op::Term => {
                if self.entries.remove(&r.seq).is_some() {
                    self.termed += 1;
                }
            }
            Op::Skip => {
                if r.seq >= self.next {
                    self.next = r.seq + 1;
                    self.next_pos = r.next;
                    self.skipped += 1;
                }
            }
            Op::Dead => match r.first {
                // Damaged records at the cursor: skipped with the reason, never delivered.
                Some(first) => {
                    if r.seq >= self.next {
                        self.dead += r.seq + 1 - first.max(self.next);
                        self.next = r.seq + 1;
                        self.next_pos = r.next;
                    }
                }
                // A delivered message moved to the dead-letter mailbox.
                None => {
                    if self.entries.remove(&r.seq).is_some() {
                        self.dead += 1;
                    }
                }
            },
        }
    }
}

/// `checkpoint.json`: the state at offset `offset` of `state.<gen>.jsonl`.
#[derive(Debug, Serialize, Deserialize)]
struct Checkpoint {
    format: u64,
    gen: u64,
    offset: u64,
    state: GroupState,
}

/// A durable consumer group on a mailbox. Cheap to clone; `Send + Sync`.
///
/// Every group sees every message of its mailbox (pub/sub); consumers inside one group
/// compete for them (work queue): a [`claim`](Group::claim) hands a message to one
/// consumer for a visibility timeout, during which no other consumer of the group gets
/// it. A message is done when it is acked; a claim that runs out is redelivered with
/// `attempt + 1`, and after `max_deliveries` the message moves to the dead-letter
/// mailbox with the reason and its attempt history.
///
/// ```
/// # fn main() -> agentbus::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// use agentbus::{Bus, NewMessage};
/// let bus = Bus::init(dir.path())?;
/// let tasks = bus.create_mailbox("tasks")?;
/// let workers = tasks.create_group("workers")?;
/// tasks.send(NewMessage::new("task").body("resize image 1"))?;
///
/// let delivery = workers.claim_one("worker-1")?.expect("one task waiting");
/// assert_eq!(delivery.attempt, 1);
/// // ... do the work ...
/// delivery.ack()?;
/// assert!(workers.claim_one("worker-2")?.is_none());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Group {
    imp: Imp,
}

/// Where a group lives: the storage seam (see [`Mailbox`]'s).
#[derive(Debug, Clone)]
enum Imp {
    Dir(Arc<GroupInner>),
    #[cfg(feature = "nats")]
    Nats(Arc<NatsGroup>),
}

/// A group on NATS JetStream: a durable pull consumer of the mailbox's stream.
#[cfg(feature = "nats")]
#[derive(Debug)]
struct NatsGroup {
    mailbox: Mailbox,
    name: String,
    meta: GroupMeta,
    /// The consumer's `ack_wait`: the visibility timeout of every claim.
    ack_wait: Duration,
    /// The consumer handle, opened on first use.
    consumer: std::sync::OnceLock<crate::nats::PullConsumer>,
    /// The live deliveries this handle claimed, by seq. A settled or superseded claim
    /// is removed.
    held: Mutex<std::collections::HashMap<u64, Held>>,
}

/// A delivery a NATS group handle holds: what [`Group::in_flight`] reports, and the
/// reply subject its acks go to.
#[cfg(feature = "nats")]
#[derive(Debug, Clone)]
struct Held {
    attempt: u32,
    consumer: String,
    deadline: OffsetDateTime,
    reply: String,
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
    reader: Option<Messages>,
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
    fn of(meta: &std::fs::Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId(meta.dev(), meta.ino())
    }

    fn at(path: &Path) -> Result<FileId> {
        Ok(FileId::of(
            &std::fs::symlink_metadata(path).ctx("stat", path)?,
        ))
    }

    /// Opens `path` and identifies it through that descriptor (which pins it).
    fn open(path: &Path) -> Result<(FileId, File)> {
        let file = fsutil::open_read(path).ctx("open", path)?;
        let id = FileId::of(&file.metadata().ctx("stat", path)?);
        Ok((id, file))
    }
}

/// A message handed to a consumer by [`Group::claim`]. Settle it with
/// [`ack`](Delivery::ack), [`nack`](Delivery::nack) or [`term`](Delivery::term), or keep
/// it longer with [`extend`](Delivery::extend).
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// 1 for the first delivery, 2 for the first redelivery, ...
    pub attempt: u32,
    /// The consumer that holds the claim.
    pub consumer: String,
    /// When the claim runs out unless extended.
    pub deadline: OffsetDateTime,
    group: Group,
}

impl Delivery {
    /// The message's seq.
    pub fn seq(&self) -> u64 {
        self.message.seq
    }

    /// The group this delivery belongs to.
    pub fn group(&self) -> &Group {
        &self.group
    }

    /// Marks the message done. Acking a message whose claim already ran out is still
    /// accepted (the work was done), as is acking it twice.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the record cannot be written.
    pub fn ack(&self) -> Result<()> {
        #[cfg(feature = "nats")]
        if let Some(g) = self.group.remote() {
            let attempt = Some(self.attempt);
            return g.settle(&self.group, self.seq(), attempt, Op::Ack, Duration::ZERO);
        }
        self.group.ack(self.seq()).map(drop)
    }

    /// Gives the message back for redelivery after `delay` (zero: at once), noting
    /// `reason` in its history.
    ///
    /// # Errors
    ///
    /// [`Error::StaleDelivery`] if this claim ran out or was settled meanwhile.
    pub fn nack(&self, delay: Duration, reason: Option<&str>) -> Result<()> {
        self.group
            .settle(self.seq(), Some(self.attempt), Op::Nack, delay, reason)
    }

    /// Keeps the claim for `by` from now ("still working").
    ///
    /// # Errors
    ///
    /// [`Error::StaleDelivery`] if this claim ran out or was settled meanwhile.
    pub fn extend(&self, by: Duration) -> Result<()> {
        self.group
            .settle(self.seq(), Some(self.attempt), Op::Extend, by, None)
    }

    /// Gives up on the message for good: it is settled without being acked and is not
    /// redelivered.
    ///
    /// # Errors
    ///
    /// [`Error::StaleDelivery`] if this claim ran out or was settled meanwhile.
    pub fn term(&self, reason: Option<&str>) -> Result<()> {
        self.group.settle(
            self.seq(),
            Some(self.attempt),
            Op::Term,
            Duration::ZERO,
            reason,
        )
    }
}

/// Counters of one group, from [`Group::stats`].
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupStats {
    /// The group.
    pub group: String,
    /// Messages delivered at least once ("read").
    pub delivered: u64,
    /// Messages acked.
    pub acked: u64,
    /// Messages claimed right now, with a live claim.
    pub in_flight: u64,
    /// Messages waiting for a (re)delivery: never delivered, nacked, or with an
    /// expired claim.
    pub pending: u64,
    /// Deliveries after the first.
    pub redelivered: u64,
    /// Messages moved to the dead-letter mailbox.
    pub dead: u64,
    /// Messages given up with `term`.
    pub termed: u64,
    /// Messages the group's filter passed over.
    pub skipped: u64,
    /// Messages published but never delivered to this group.
    pub lag: u64,
    /// The first seq not yet delivered.
    pub next_seq: u64,
    /// Age of the oldest message not yet settled, in milliseconds.
    pub oldest_unacked_ms: Option<u64>,
}

pub(crate) fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn datetime_ms(ms: i64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn ts_ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

fn state_path(dir: &Path, gen: u64) -> PathBuf {
    dir.join(format!("state.{gen}.jsonl"))
}

impl Mailbox {
    /// Creates a consumer group with default [`GroupOptions`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`], [`Error::GroupExists`], [`Error::Io`].
    pub fn create_group(&self, name: &str) -> Result<Group> {
        self.create_group_with(name, GroupOptions::default())
    }

    /// Creates a consumer group, and its dead-letter mailbox if that does not exist.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] (for the group or the dead-letter mailbox),
    /// [`Error::GroupExists`], [`Error::Io`].
    pub fn create_group_with(&self, name: &str, opts: GroupOptions) -> Result<Group> {
        validate_name("group", name)?;
        let dead_letter = opts
            .dead_letter
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.name()));
        validate_name("mailbox", &dead_letter)?;
        #[cfg(feature = "nats")]
        if let Some(m) = self.remote() {
            let bus = crate::Bus {
                inner: self.bus().clone(),
            };
            if dead_letter != self.name() {
                bus.create_or_open_mailbox(&dead_letter)?;
            }
            let meta = GroupMeta::new(&opts, dead_letter);
            let config = crate::nats::ConsumerConfig {
                description: serde_json::to_string(&meta).expect("metadata serializes"),
                start_seq: match opts.start {
                    StartAt::Beginning => None,
                    StartAt::End => Some(self.last_seq()? + 1),
                },
                ack_wait: opts.visibility.max(Duration::from_millis(1)),
                // Unlimited on the server: a delivery past `max_deliveries` is buried
                // by the client that sees it, and one that dies first leaves it to
                // be redelivered and buried by the next.
                max_deliver: -1,
            };
            if !m.nats.create_consumer(&m.name, name, config)? {
                return Err(self.group_exists(name));
            }
            return self.group(name);
        }
        let groups = self.path().join("groups");
        let bus = self.bus();
        fsutil::create_dir(&groups, bus.opts.dir_mode)?;
        let dir = groups.join(name);
        if std::fs::symlink_metadata(&dir).is_ok() {
            return Err(self.group_exists(name));
        }
        // Compaction holds this lock shared while it decides what to remove: a group
        // created meanwhile would otherwise lose the segments it starts in.
        let _creating = self.groups_lock(true)?;
        if dead_letter != self.name() {
            crate::Bus { inner: bus.clone() }.create_or_open_mailbox(&dead_letter)?;
        }
        let start = match opts.start {
            StartAt::Beginning => self.first_seq()?,
            StartAt::End => self.last_seq()? + 1,
        };
        let sync = bus.opts.sync();
        let tmp = groups.join(format!(".new-{}", uuid::Uuid::now_v7().simple()));
        let built = (|| {
            fsutil::create_dir(&tmp, bus.opts.dir_mode)?;
            let meta = GroupMeta::new(&opts, dead_letter);
            let write = |file: &str, value: &dyn erased::Json| {
                fsutil::write_atomic(&tmp.join(file), &value.to_json(), bus.opts.file_mode, sync)
            };
            write("group.json", &meta)?;
            let cp = Checkpoint {
                format: crate::FORMAT_VERSION,
                gen: 0,
                offset: 0,
                state: GroupState::new(start),
            };
            write("checkpoint.json", &cp)?;
            fsutil::open_append(&state_path(&tmp, 0), bus.opts.file_mode)?;
            fsutil::open_lock(&tmp.join("lock"), bus.opts.file_mode)?;
            if sync {
                fsutil::sync_dir(&tmp)?;
            }
            Ok(())
        })();
        let renamed = built.and_then(|()| match std::fs::rename(&tmp, &dir) {
            Ok(()) => Ok(()),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST)) => {
                Err(self.group_exists(name))
            }
            Err(e) => Err(Error::io("rename", &dir, e)),
        });
        if let Err(e) = renamed {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if sync {
            fsutil::sync_dir(&groups)?;
        }
        self.group(name)
    }

    /// Takes `groups/.lock` (exclusive when creating a group, shared when compacting).
    pub(crate) fn groups_lock(&self, exclusive: bool) -> Result<Flock<File>> {
        let groups = self.path().join("groups");
        fsutil::create_dir(&groups, self.bus().opts.dir_mode)?;
        let path = groups.join(".lock");
        let file = fsutil::open_lock(&path, self.bus().opts.file_mode)?;
        if exclusive {
            Flock::exclusive(file, &path)
        } else {
            Flock::shared(file, &path)
        }
    }

    fn group_exists(&self, name: &str) -> Error {
        Error::GroupExists {
            mailbox: self.name().to_owned(),
            name: name.to_owned(),
        }
    }

    /// Opens an existing consumer group.
    ///
    /// # Errors
    ///
    /// [`Error::GroupNotFound`] (listing the groups that exist), [`Error::InvalidName`],
    /// [`Error::Io`].
    pub fn group(&self, name: &str) -> Result<Group> {
        validate_name("group", name)?;
        #[cfg(feature = "nats")]
        if let Some(m) = self.remote() {
            let Some(state) = m.nats.consumer_state(&m.name, name)? else {
                return Err(Error::GroupNotFound {
                    mailbox: self.name().to_owned(),
                    name: name.to_owned(),
                    existing: self.groups()?,
                });
            };
            let meta: GroupMeta = state
                .description
                .as_deref()
                .and_then(|d| serde_json::from_str(d).ok())
                .ok_or_else(|| Error::Corrupt {
                    path: self.path().join(name),
                    line: 1,
                    reason: "the consumer was not made by agentbus (no group settings)".into(),
                })?;
            return Ok(Group {
                imp: Imp::Nats(Arc::new(NatsGroup {
                    mailbox: self.clone(),
                    name: name.to_owned(),
                    meta,
                    ack_wait: state.ack_wait,
                    consumer: Default::default(),
                    held: Mutex::new(Default::default()),
                })),
            });
        }
        let dir = self.path().join("groups").join(name);
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(Error::io(
                    "open group",
                    &dir,
                    io::Error::other("not a directory (symlinks are not followed)"),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::GroupNotFound {
                    mailbox: self.name().to_owned(),
                    name: name.to_owned(),
                    existing: self.groups()?,
                })
            }
            Err(e) => return Err(Error::io("open group", dir, e)),
        }
        let meta_path = dir.join("group.json");
        let meta: GroupMeta = read_json(&meta_path)?;
        if meta.format != crate::FORMAT_VERSION {
            return Err(Error::UnsupportedFormat {
                path: meta_path,
                found: meta.format,
                supported: crate::FORMAT_VERSION,
            });
        }
        let lock_path = dir.join("lock");
        let lock = fsutil::open_lock(&lock_path, self.bus().opts.file_mode)?;
        Ok(Group {
            imp: Imp::Dir(Arc::new(GroupInner {
                mailbox: self.clone(),
                name: name.to_owned(),
                checkpoint_path: dir.join("checkpoint.json"),
                dir,
                meta,
                cache: Mutex::new(Cache {
                    lock_path,
                    lock,
                    loaded: None,
                }),
            })),
        })
    }

    /// The names of this mailbox's consumer groups, sorted.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the groups directory cannot be listed.
    pub fn groups(&self) -> Result<Vec<String>> {
        #[cfg(feature = "nats")]
        if let Some(m) = self.remote() {
            return m.nats.consumer_names(&m.name);
        }
        fsutil::list_names(&self.path().join("groups"), true)
    }
}

/// A tiny object-safe "serialize to JSON bytes", so one closure can write both files.
mod erased {
    pub(super) trait Json {
        fn to_json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Vec<u8> {
            serde_json::to_vec(self).expect("metadata serializes")
        }
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let file = fsutil::open_read(path).ctx("open", path)?;
    parse_json(&file, path)
}

fn parse_json<T: serde::de::DeserializeOwned>(file: &File, path: &Path) -> Result<T> {
    serde_json::from_reader(io::BufReader::new(file)).map_err(|e| Error::Corrupt {
        path: path.to_owned(),
        line: 1,
        reason: format!("not valid JSON for this file: {e}"),
    })
}

impl Group {
    /// The directory group. Only reached from the directory's own code paths: every
    /// public entry point has already dispatched a NATS group to its backend.
    fn inner(&self) -> &GroupInner {
        match &self.imp {
            Imp::Dir(inner) => inner,
            #[cfg(feature = "nats")]
            Imp::Nats(g) => unreachable!("directory operation on NATS group {}", g.name),
        }
    }

    #[cfg(feature = "nats")]
    fn remote(&self) -> Option<&NatsGroup> {
        match &self.imp {
            Imp::Nats(g) => Some(g),
            Imp::Dir(_) => None,
        }
    }

    fn meta(&self) -> &GroupMeta {
        match &self.imp {
            Imp::Dir(inner) => &inner.meta,
            #[cfg(feature = "nats")]
            Imp::Nats(g) => &g.meta,
        }
    }

    /// The group name.
    pub fn name(&self) -> &str {
        match &self.imp {
            Imp::Dir(inner) => &inner.name,
            #[cfg(feature = "nats")]
            Imp::Nats(g) => &g.name,
        }
    }

    /// The mailbox the group consumes.
    pub fn mailbox(&self) -> &Mailbox {
        match &self.imp {
            Imp::Dir(inner) => &inner.mailbox,
            #[cfg(feature = "nats")]
            Imp::Nats(g) => &g.mailbox,
        }
    }

    /// How many deliveries a message gets before it is dead-lettered.
    pub fn max_deliveries(&self) -> u32 {
        self.meta().max_deliveries
    }

    /// The default visibility timeout of a claim.
    pub fn visibility(&self) -> Duration {
        Duration::from_millis(self.meta().visibility_ms)
    }

    /// The group's filter (empty: every message).
    pub fn filter(&self) -> &Filter {
        &self.meta().filter
    }

    /// The mailbox that receives this group's dead letters.
    pub fn dead_letter_mailbox(&self) -> &str {
        &self.meta().dead_letter
    }

    /// Claims up to `max` messages for `consumer`, for the group's visibility timeout.
    /// Redeliveries (expired claims, nacked messages whose delay is over) come first,
    /// then new messages in seq order. Returns an empty vector when nothing is waiting;
    /// it does not block.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] for a bad consumer name, [`Error::Io`].
    pub fn claim(&self, consumer: &str, max: usize) -> Result<Vec<Delivery>> {
        self.claim_for(consumer, max, self.visibility())
    }

    /// Claims at most one message; see [`claim`](Self::claim).
    ///
    /// # Errors
    ///
    /// As [`claim`](Self::claim).
    pub fn claim_one(&self, consumer: &str) -> Result<Option<Delivery>> {
        Ok(self.claim(consumer, 1)?.pop())
    }

    /// Claims up to `max` messages with an explicit visibility timeout.
    ///
    /// # Errors
    ///
    /// As [`claim`](Self::claim).
    pub fn claim_for(
        &self,
        consumer: &str,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<Delivery>> {
        validate_name("consumer", consumer)?;
        if max == 0 {
            return Ok(Vec::new());
        }
        #[cfg(feature = "nats")]
        if let Some(g) = self.remote() {
            return g.claim(self, consumer, max);
        }
        let spec = self.inner().mailbox.log_spec();
        self.locked(|g, loaded| {
            let now = now_ms();
            let until = now.saturating_add(ms(visibility));
            let mut records = Vec::new();
            let mut out = Vec::new();

            // Redeliveries first, oldest seq first.
            let due: Vec<(u64, Entry)> = loaded
                .state
                .entries
                .iter()
                .filter(|(_, e)| e.visible_at <= now)
                .map(|(s, e)| (*s, e.clone()))
                .collect();
            for (seq, entry) in due {
                if out.len() >= max {
                    break;
                }
                let message = match read_at(&spec, entry.at, seq) {
                    Ok(m) => m,
                    // Damaged (or gone) since it was delivered: it can never be delivered
                    // again, so it is dead, with the reason, rather than a claim error
                    // for ever.
                    Err(Error::Corrupt { reason, .. }) => {
                        let mut r = Rec::new(seq, Op::Dead, now);
                        r.reason = Some(cap_reason(&format!("undeliverable: {reason}")));
                        g.append(loaded, &[r])?;
                        continue;
                    }
                    Err(e) => return Err(e),
                };
                if entry.attempt >= g.inner().meta.max_deliveries {
                    let mut history = entry.history.clone();
                    if entry.consumer.is_some() {
                        history.push(AttemptNote {
                            attempt: entry.attempt,
                            consumer: entry.consumer.clone(),
                            outcome: "expired".into(),
                            reason: None,
                            at: entry.visible_at,
                        });
                    }
                    let reason = history
                        .last()
                        .and_then(|n| n.reason.clone())
                        .unwrap_or_else(|| "claim expired".into());
                    g.bury(loaded, &message, &history, &reason, now)?;
                    continue;
                }
                let mut r = Rec::new(seq, Op::Claim, now);
                r.attempt = Some(entry.attempt + 1);
                r.consumer = Some(consumer.to_owned());
                r.until = Some(until);
                records.push(r);
                out.push((message, entry.attempt + 1));
            }

            // Then new messages from the cursor. Their claims are applied one by one
            // (with each message's position), and written as one `claim_range` record
            // per run of consecutive seqs.
            let mut run: Vec<Rec> = Vec::new();
            while out.len() < max {
                let reader = g.reader(loaded);
                match reader.next() {
                    None => break,
                    Some(Ok(message)) if !g.inner().meta.filter.matches(&message) => {
                        let mut r = Rec::new(message.seq, Op::Skip, now);
                        r.next = reader.cursor();
                        loaded.state.apply(&r);
                        flush_run(&mut run, &mut records);
                        records.push(r);
                    }
                    Some(Ok(message)) => {
                        let mut r = Rec::new(message.seq, Op::Claim, now);
                        r.attempt = Some(1);
                        r.consumer = Some(consumer.to_owned());
                        r.until = Some(until);
                        r.at = reader.last_start();
                        r.next = reader.cursor();
                        r.ts = Some(ts_ms(message.ts));
                        loaded.state.apply(&r);
                        run.push(r);
                        out.push((message, 1));
                    }
                    Some(Err(Error::Corrupt { path, line, reason })) => {
                        // Never silently skipped: the seqs the damage covers are recorded
                        // as dead with the reason (and `doctor` reports the damage). A
                        // duplicate hides no seq and needs no record.
                        let Some((first, last)) = reader.last_gap() else {
                            continue;
                        };
                        let mut r = Rec::new(last, Op::Dead, now);
                        r.first = Some(first);
                        r.reason = Some(cap_reason(&format!(
                            "damaged record at {}:{line}: {reason}",
                            path.display()
                        )));
                        r.next = reader.cursor();
                        loaded.state.apply(&r);
                        flush_run(&mut run, &mut records);
                        records.push(r);
                    }
                    Some(Err(e)) => return Err(e),
                }
            }
            flush_run(&mut run, &mut records);
            // New-message claims were applied as they were read (the reader moved on);
            // apply the redelivery claims now, then write everything at once.
            for r in &records {
                if r.op == Op::Claim && r.attempt.unwrap_or(1) > 1 {
                    loaded.state.apply(r);
                }
            }
            g.write(loaded, &records)?;
            Ok(out
                .into_iter()
                .map(|(message, attempt)| Delivery {
                    message,
                    attempt,
                    consumer: consumer.to_owned(),
                    deadline: datetime_ms(until),
                    group: g.clone(),
                })
                .collect())
        })
    }

    /// The live delivery of `seq` as `attempt`, for settling it in another process or
    /// after a restart (the CLI's `--attempt`): it checks that this claim is still the
    /// current one, so a consumer whose claim ran out cannot nack or extend the claim
    /// of whoever got the message next.
    ///
    /// # Errors
    ///
    /// [`Error::NotDelivered`]; [`Error::StaleDelivery`] if that claim ran out, was
    /// settled, or the message was redelivered since.
    pub fn delivery(&self, seq: u64, attempt: u32) -> Result<Delivery> {
        #[cfg(feature = "nats")]
        if self.remote().is_some() {
            return Err(Error::unsupported(
                "acting on a delivery claimed through another handle",
                "settle it with the Delivery that claim returned",
            ));
        }
        let spec = self.inner().mailbox.log_spec();
        self.locked(|g, loaded| {
            if seq >= loaded.state.next {
                return Err(g.not_delivered(seq));
            }
            let stale = |why: String| Error::StaleDelivery {
                group: g.name().to_owned(),
                seq,
                reason: why,
            };
            let entry = loaded
                .state
                .entries
                .get(&seq)
                .ok_or_else(|| stale("already settled".into()))?;
            if entry.attempt != attempt {
                return Err(stale(format!(
                    "the current delivery is attempt {}",
                    entry.attempt
                )));
            }
            let consumer = match &entry.consumer {
                Some(c) if entry.visible_at > now_ms() => c.clone(),
                _ => return Err(stale("the claim ran out or was given back".into())),
            };
            Ok(Delivery {
                message: read_at(&spec, entry.at, seq)?,
                attempt,
                consumer,
                deadline: datetime_ms(entry.visible_at),
                group: g.clone(),
            })
        })
    }

    /// The live delivery of `seq`, whoever holds it; `None` if it is not claimed right
    /// now (not delivered yet, waiting for redelivery, or settled).
    ///
    /// # Errors
    ///
    /// [`Error::Io`].
    pub fn in_flight(&self, seq: u64) -> Result<Option<Delivery>> {
        #[cfg(feature = "nats")]
        if let Some(g) = self.remote() {
            return Ok(g.held_delivery(self, seq));
        }
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
            Some(a) => match self.delivery(seq, a) {
                Ok(d) => Ok(Some(d)),
                Err(Error::StaleDelivery { .. }) => Ok(None),
                Err(e) => Err(e),
            },
        }
    }

    /// Claims exactly message `seq` for `consumer`, if it can be delivered now without
    /// jumping the queue: a message waiting for redelivery, or the next deliverable
    /// message at the cursor (passing over what the group's filter skips). `None` if it
    /// is settled, claimed by someone else, or another message comes first.
    pub(crate) fn claim_seq(
        &self,
        consumer: &str,
        seq: u64,
        visibility: Duration,
    ) -> Result<Option<Delivery>> {
        validate_name("consumer", consumer)?;
        #[cfg(feature = "nats")]
        if self.remote().is_some() {
            let _ = (seq, visibility);
            return Err(Error::unsupported(
                "claiming one message by seq",
                "a JetStream consumer delivers in its own order: receive with recv_timeout",
            ));
        }
        let spec = self.inner().mailbox.log_spec();
        self.locked(|g, loaded| {
            let now = now_ms();
            let until = now.saturating_add(ms(visibility));
            let delivery = |message, attempt| Delivery {
                message,
                attempt,
                consumer: consumer.to_owned(),
                deadline: datetime_ms(until),
                group: g.clone(),
            };
            if seq < loaded.state.next {
                let Some(entry) = loaded.state.entries.get(&seq).cloned() else {
                    return Ok(None);
                };
                // Claimed by someone, or nacked with a delay not yet over; or out of
                // deliveries (a normal claim dead-letters it).
                if entry.visible_at > now || entry.attempt >= g.inner().meta.max_deliveries {
                    return Ok(None);
                }
                let message = read_at(&spec, entry.at, seq)?;
                let mut r = Rec::new(seq, Op::Claim, now);
                r.attempt = Some(entry.attempt + 1);
                r.consumer = Some(consumer.to_owned());
                r.until = Some(until);
                g.append(loaded, &[r])?;
                return Ok(Some(delivery(message, entry.attempt + 1)));
            }
            let mut records = Vec::new();
            let found = loop {
                let reader = g.reader(loaded);
                match reader.next() {
                    Some(Ok(m)) if m.seq < seq && !g.inner().meta.filter.matches(&m) => {
                        let mut r = Rec::new(m.seq, Op::Skip, now);
                        r.next = reader.cursor();
                        loaded.state.apply(&r);
                        records.push(r);
                    }
                    Some(Ok(m)) if m.seq == seq && g.inner().meta.filter.matches(&m) => {
                        let mut r = Rec::new(seq, Op::Claim, now);
                        r.attempt = Some(1);
                        r.consumer = Some(consumer.to_owned());
                        r.until = Some(until);
                        r.at = reader.last_start();
                        r.next = reader.cursor();
                        r.ts = Some(ts_ms(m.ts));
                        loaded.state.apply(&r);
                        records.push(r);
                        break Some(m);
                    }
                    // Something else comes first (or damage a normal claim will record):
                    // leave it, and forget how far this reader got.
                    Some(Ok(_)) | Some(Err(Error::Corrupt { .. })) | None => {
                        loaded.reader = None;
                        break None;
                    }
                    Some(Err(e)) => return Err(e),
                }
            };
            g.write(loaded, &records)?;
            Ok(found.map(|m| delivery(m, 1)))
        })
    }

    /// Acks one message. Returns `false` if it was already settled.
    ///
    /// # Errors
    ///
    /// [`Error::NotDelivered`] if the seq was never delivered to this group;
    /// [`Error::Io`].
    pub fn ack(&self, seq: u64) -> Result<bool> {
        #[cfg(feature = "nats")]
        if let Some(g) = self.remote() {
            return g
                .settle(self, seq, None, Op::Ack, Duration::ZERO)
                .map(|()| true);
        }
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

    /// Acks every delivered message up to and including `seq` (cumulative ack).
    /// Returns how many were newly acked. Messages not yet delivered are not touched.
    ///
    /// # Errors
    ///
    /// [`Error::Io`].
    pub fn ack_upto(&self, seq: u64) -> Result<u64> {
        #[cfg(feature = "nats")]
        if self.remote().is_some() {
            let _ = seq;
            return Err(Error::unsupported(
                "ack_upto",
                "a JetStream consumer with explicit acks takes one ack per message",
            ));
        }
        self.locked(|g, loaded| {
            let n = loaded.state.entries.range(..=seq).count() as u64;
            if n > 0 {
                g.append(loaded, &[Rec::new(seq, Op::AckUpto, now_ms())])?;
            }
            Ok(n)
        })
    }

    /// Gives a claimed message back for redelivery after `delay`.
    ///
    /// # Errors
    ///
    /// [`Error::NotDelivered`]; [`Error::StaleDelivery`] if it has no live claim.
    pub fn nack(&self, seq: u64, delay: Duration, reason: Option<&str>) -> Result<()> {
        self.settle(seq, None, Op::Nack, delay, reason)
    }

    /// Extends the claim on a message by `by` from now.
    ///
    /// # Errors
    ///
    /// [`Error::NotDelivered`]; [`Error::StaleDelivery`] if it has no live claim.
    pub fn extend(&self, seq: u64, by: Duration) -> Result<()> {
        self.settle(seq, None, Op::Extend, by, None)
    }

    /// Gives up on a claimed message for good.
    ///
    /// # Errors
    ///
    /// [`Error::NotDelivered`]; [`Error::StaleDelivery`] if it has no live claim.
    pub fn term(&self, seq: u64, reason: Option<&str>) -> Result<()> {
        self.settle(seq, None, Op::Term, Duration::ZERO, reason)
    }

    fn settle(
        &self,
        seq: u64,
        attempt: Option<u32>,
        op: Op,
        delay: Duration,
        reason: Option<&str>,
    ) -> Result<()> {
        #[cfg(feature = "nats")]
        if let Some(g) = self.remote() {
            let _ = reason;
            return g.settle(self, seq, attempt, op, delay);
        }
        self.locked(|g, loaded| {
            let now = now_ms();
            if seq >= loaded.state.next {
                return Err(g.not_delivered(seq));
            }
            let stale = |why: &str| Error::StaleDelivery {
                group: g.name().to_owned(),
                seq,
                reason: why.to_owned(),
            };
            let entry = loaded
                .state
                .entries
                .get(&seq)
                .ok_or_else(|| stale("already settled"))?;
            if attempt.is_some_and(|a| a != entry.attempt) {
                return Err(stale(&format!(
                    "redelivered meanwhile (now attempt {})",
                    entry.attempt
                )));
            }
            if entry.consumer.is_none() || entry.visible_at <= now {
                return Err(stale("the claim ran out or was given back"));
            }
            let reason = reason.map(cap_reason);
            let reason = reason.as_deref();
            if op == Op::Nack && entry.attempt >= g.inner().meta.max_deliveries {
                // That was the last delivery it gets: dead-letter it now.
                let reason = reason.unwrap_or("nacked");
                let mut last = entry.clone();
                last.history.push(AttemptNote {
                    attempt: entry.attempt,
                    consumer: entry.consumer.clone(),
                    outcome: "nacked".into(),
                    reason: Some(reason.to_owned()),
                    at: now,
                });
                let message = read_at(&g.inner().mailbox.log_spec(), entry.at, seq)?;
                return g.bury(loaded, &message, &last.history, reason, now);
            }
            let mut r = Rec::new(seq, op, now);
            r.attempt = Some(entry.attempt);
            r.until = Some(now.saturating_add(ms(delay)));
            r.reason = reason.map(str::to_owned);
            g.append(loaded, &[r])
        })
    }

    /// The group's counters.
    ///
    /// # Errors
    ///
    /// [`Error::Io`].
    pub fn stats(&self) -> Result<GroupStats> {
        #[cfg(feature = "nats")]
        if let Some(g) = self.remote() {
            return g.stats();
        }
        let published = self.inner().mailbox.last_seq()?;
        let spec = self.inner().mailbox.log_spec();
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
                None if lag > 0 => {
                    let mut reader = match st.next_pos {
                        Some(pos) if pos.seq == st.next => Messages::at(spec.clone(), pos),
                        _ => Messages::new(spec.clone()).from_seq(st.next),
                    };
                    reader.find_map(|m| m.ok()).map(|m| ts_ms(m.ts))
                }
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
                lag,
                next_seq: st.next,
                oldest_unacked_ms: oldest_ts.map(|ts| now.saturating_sub(ts).max(0) as u64),
            })
        })
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.inner().dir
    }

    /// The earliest time (ms) an unsettled message becomes deliverable again: a claim
    /// running out, or a nack's delay ending.
    pub(crate) fn next_due_ms(&self) -> Result<Option<i64>> {
        #[cfg(feature = "nats")]
        if self.remote().is_some() {
            // The server redelivers; the consumer's poll timer looks for it.
            return Ok(None);
        }
        self.locked(|_, loaded| Ok(loaded.state.entries.values().map(|e| e.visible_at).min()))
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
        self.inner().cache.lock().unwrap_or_else(|poisoned| {
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
            Some(l) if FileId::at(&self.inner().checkpoint_path)? == l.checkpoint => l,
            _ => self.load()?,
        };
        self.replay(&mut loaded)?;
        Ok(cached.insert(loaded))
    }

    fn load(&self) -> Result<Loaded> {
        let dir = &self.inner().dir;
        // Identify the checkpoint through the descriptor we read it from.
        let cp_path = &self.inner().checkpoint_path;
        let (checkpoint, cp_file) = FileId::open(cp_path)?;
        let cp: Checkpoint = parse_json(&cp_file, cp_path)?;
        // Remove state files of other generations: older ones are covered by the
        // checkpoint; a newer one is left over from a rotation that died before its
        // checkpoint was written, and nothing was ever appended to it.
        for entry in std::fs::read_dir(dir).ctx("list", dir)? {
            let entry = entry.ctx("list", dir)?;
            let name = entry.file_name();
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
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let path = state_path(dir, cp.gen);
        let file = fsutil::open_append(&path, self.inner().mailbox.bus().opts.file_mode)?;
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
    fn reader<'l>(&self, loaded: &'l mut Loaded) -> &'l mut Messages {
        let next = loaded.state.next;
        let stale = loaded.reader.as_ref().is_none_or(|r| r.next_seq() != next);
        if stale {
            let spec = self.inner().mailbox.log_spec();
            loaded.reader = Some(match loaded.state.next_pos {
                Some(pos) if pos.seq == next => Messages::at(spec, pos),
                _ => Messages::new(spec).from_seq(next),
            });
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
        let opts = &self.inner().mailbox.bus().opts;
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
                if FileId::at(&self.inner().checkpoint_path).ok() != Some(loaded.checkpoint) {
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
        let dir = &self.inner().dir;
        let opts = &self.inner().mailbox.bus().opts;
        let gen = loaded.gen + 1;
        let path = state_path(dir, gen);
        let file = fsutil::open_append(&path, opts.file_mode)?;
        let cp = Checkpoint {
            format: crate::FORMAT_VERSION,
            gen,
            offset: 0,
            state: loaded.state.clone(),
        };
        let bytes = serde_json::to_vec(&cp).expect("checkpoint serializes");
        fsutil::write_atomic(
            &self.inner().checkpoint_path,
            &bytes,
            opts.file_mode,
            opts.sync(),
        )?;
        let _ = std::fs::remove_file(&loaded.path);
        loaded.gen = gen;
        loaded.file = file;
        loaded.path = path;
        loaded.off = 0;
        // The checkpoint we just wrote, pinned; if it cannot be opened, the next
        // refresh simply reloads.
        match FileId::open(&self.inner().checkpoint_path) {
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

    /// Moves a message that ran out of deliveries to the dead-letter mailbox, then
    /// records it as dead. The idempotency key makes the copy exactly-once even if we
    /// die between the two steps.
    fn bury(
        &self,
        loaded: &mut Loaded,
        message: &Message,
        history: &[AttemptNote],
        reason: &str,
        now: i64,
    ) -> Result<()> {
        let reason = self.dead_letter(message, history, reason)?;
        let mut r = Rec::new(message.seq, Op::Dead, now);
        r.reason = Some(reason);
        self.append(loaded, &[r])
    }
}

impl Group {
    /// Copies a message that ran out of deliveries to the dead-letter mailbox, exactly
    /// once (its idempotency key); returns the reason recorded.
    fn dead_letter(
        &self,
        message: &Message,
        history: &[AttemptNote],
        reason: &str,
    ) -> Result<String> {
        let bus = crate::Bus {
            inner: self.mailbox().bus().clone(),
        };
        let dlq = bus.create_or_open_mailbox(self.dead_letter_mailbox())?;
        let reason = cap_reason(&format!(
            "max deliveries ({}) reached: {reason}",
            self.max_deliveries()
        ));
        let info = serde_json::json!({
            "mailbox": self.mailbox().name(),
            "group": self.name(),
            "seq": message.seq,
            "id": message.id,
            "reason": reason,
            "attempts": history,
        });
        let mut copy = NewMessage::replay_of(message)
            .causation_id(message.id.to_string())
            .idempotency_key(format!(
                "dead/{}/{}/{}",
                self.mailbox().name(),
                self.name(),
                message.id
            ));
        copy.headers
            .insert(DEAD_LETTER_HEADER.into(), info.to_string());
        dlq.send(copy)?;
        Ok(reason)
    }
}

#[cfg(feature = "nats")]
impl NatsGroup {
    fn nats(&self) -> &crate::nats::NatsBus {
        &self
            .mailbox
            .remote()
            .expect("a NATS group has a NATS mailbox")
            .nats
    }

    /// Fetches until `max` deliveries are in hand or nothing is waiting. Messages past
    /// `max_deliveries` are buried on the way, messages the filter passes over are
    /// acked (skipped), and records that are not messages are termed with a warning.
    fn claim(&self, group: &Group, consumer: &str, max: usize) -> Result<Vec<Delivery>> {
        let mut out = Vec::new();
        let mut fetched = Vec::new();
        match self.claim_into(group, consumer, max, &mut out, &mut fetched) {
            Ok(()) => Ok(out),
            Err(e) => {
                // Give back at once what will not be handed out, so no attempt is
                // spent on a claim nobody saw.
                let nats = self.nats();
                for d in &out {
                    let held = self.held_map().remove(&d.seq());
                    if let Some(h) = held {
                        let _ = nats.settle(&h.reply, async_nats::jetstream::AckKind::Nak(None));
                    }
                }
                for f in fetched {
                    let _ = nats.settle(&f.reply, async_nats::jetstream::AckKind::Nak(None));
                }
                Err(e)
            }
        }
    }

    fn claim_into(
        &self,
        group: &Group,
        consumer: &str,
        max: usize,
        out: &mut Vec<Delivery>,
        pending: &mut Vec<crate::nats::Fetched>,
    ) -> Result<()> {
        let nats = self.nats();
        while out.len() < max {
            let handle = match self.consumer.get() {
                Some(c) => c,
                None => {
                    let c = nats.consumer(self.mailbox.name(), &self.name)?;
                    self.consumer.get_or_init(|| c)
                }
            };
            *pending = nats.fetch(handle, max - out.len())?;
            if pending.is_empty() {
                break;
            }
            pending.reverse();
            while let Some(f) = pending.pop() {
                let message =
                    match crate::nats::decode(nats.url(), self.mailbox.name(), f.seq, &f.payload) {
                        Ok(m) => m,
                        Err(e) => {
                            ::log::warn!("agentbus: group {}: {e}; terminating it", self.name);
                            nats.settle(&f.reply, async_nats::jetstream::AckKind::Term)?;
                            continue;
                        }
                    };
                if f.attempt > self.meta.max_deliveries {
                    group.dead_letter(&message, &[], "the last claim ran out or was nacked")?;
                    nats.settle(&f.reply, async_nats::jetstream::AckKind::Term)?;
                    continue;
                }
                if !self.meta.filter.matches(&message) {
                    nats.settle(&f.reply, async_nats::jetstream::AckKind::Ack)?;
                    continue;
                }
                let held = Held {
                    attempt: f.attempt,
                    consumer: consumer.to_owned(),
                    deadline: OffsetDateTime::now_utc() + self.ack_wait,
                    reply: f.reply,
                };
                out.push(Delivery {
                    message,
                    attempt: held.attempt,
                    consumer: held.consumer.clone(),
                    deadline: held.deadline,
                    group: group.clone(),
                });
                self.held_map().insert(f.seq, held);
            }
        }
        Ok(())
    }

    fn held_map(&self) -> MutexGuard<'_, std::collections::HashMap<u64, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn held_delivery(&self, group: &Group, seq: u64) -> Option<Delivery> {
        let held = self.held_map().get(&seq).cloned()?;
        let message = self.nats().get(self.mailbox.name(), seq).ok()??;
        Some(Delivery {
            message,
            attempt: held.attempt,
            consumer: held.consumer,
            deadline: held.deadline,
            group: group.clone(),
        })
    }

    /// Acks, naks, extends or terms a delivery this handle holds, and waits for the
    /// server to confirm it.
    fn settle(
        &self,
        group: &Group,
        seq: u64,
        attempt: Option<u32>,
        op: Op,
        delay: Duration,
    ) -> Result<()> {
        use async_nats::jetstream::AckKind;
        let stale = |why: String| Error::StaleDelivery {
            group: group.name().to_owned(),
            seq,
            reason: why,
        };
        let reply = match self.held_map().get(&seq) {
            Some(Held { attempt: a, .. }) if attempt.is_some_and(|want| want != *a) => {
                return Err(stale(format!("redelivered meanwhile (now attempt {a})")))
            }
            Some(h) => h.reply.clone(),
            // A delivery acked twice (it was settled through this handle).
            None if op == Op::Ack && attempt.is_some() => return Ok(()),
            None if attempt.is_none() => {
                return Err(Error::unsupported(
                    "settling by seq a message this handle has not claimed",
                    "settle it with the Delivery its claim returned",
                ))
            }
            None => return Err(stale("already settled".into())),
        };
        let kind = match op {
            Op::Ack => AckKind::Ack,
            Op::Nack if delay.is_zero() => AckKind::Nak(None),
            Op::Nack => AckKind::Nak(Some(delay)),
            Op::Extend => AckKind::Progress,
            Op::Term => AckKind::Term,
            other => unreachable!("{other:?} is not a settlement"),
        };
        self.nats().settle(&reply, kind)?;
        let mut held = self.held_map();
        if op == Op::Extend {
            // +WPI restarts the whole ack_wait.
            if let Some(h) = held.get_mut(&seq) {
                h.deadline = OffsetDateTime::now_utc() + self.ack_wait;
            }
        } else {
            held.remove(&seq);
        }
        Ok(())
    }

    /// The consumer's counters. JetStream counts by stream sequence, so `delivered`
    /// and `acked` are the highest delivered and fully acked seqs, and `dead`,
    /// `termed` and `skipped` are not tracked (0); see README "Scaling out".
    fn stats(&self) -> Result<GroupStats> {
        let st = self
            .nats()
            .consumer_state(self.mailbox.name(), &self.name)?
            .ok_or_else(|| Error::GroupNotFound {
                mailbox: self.mailbox.name().to_owned(),
                name: self.name.clone(),
                existing: Vec::new(),
            })?;
        Ok(GroupStats {
            group: self.name.clone(),
            delivered: st.delivered_seq,
            acked: st.ack_floor_seq,
            in_flight: st.ack_pending,
            pending: st.num_pending,
            redelivered: st.redelivered,
            dead: 0,
            termed: 0,
            skipped: 0,
            lag: st.num_pending,
            next_seq: st.delivered_seq + 1,
            oldest_unacked_ms: None,
        })
    }
}

/// The header a dead letter carries: JSON with the source mailbox, group, seq, id, the
/// reason and every attempt.
pub const DEAD_LETTER_HEADER: &str = "dead_letter";

impl NewMessage {
    /// A new message with the same content as `message` (type, from, subject, body,
    /// payload, artifacts, correlation id, priority, headers other than
    /// [`DEAD_LETTER_HEADER`]): for replaying a dead letter into its mailbox.
    pub fn replay_of(message: &Message) -> NewMessage {
        let mut m = NewMessage::new(message.kind.clone()).from(message.from.clone());
        m.subject = message.subject.clone();
        m.body = message.body.clone();
        m.payload = message.payload.clone();
        m.artifacts = message.artifacts.clone();
        m.correlation_id = message.correlation_id.clone();
        m.causation_id = message.causation_id.clone();
        m.priority = message.priority;
        m.headers = message.headers.clone();
        m.headers.remove(DEAD_LETTER_HEADER);
        m
    }
}

/// Moves a run of new-message claims (consecutive seqs, one consumer, one deadline)
/// into `records`: as it is for a single claim, as one `claim_range` record otherwise.
fn flush_run(run: &mut Vec<Rec>, records: &mut Vec<Rec>) {
    if run.len() < 2 {
        records.append(run);
        return;
    }
    let (first, last) = (&run[0], &run[run.len() - 1]);
    let mut r = Rec::new(first.seq, Op::ClaimRange, first.t);
    r.last = Some(last.seq);
    r.consumer = first.consumer.clone();
    r.until = first.until;
    r.at = first.at;
    r.ts = first.ts;
    r.next = last.next;
    records.push(r);
    run.clear();
}

/// Reads the message `seq`, starting the search at `at`.
fn read_at(spec: &crate::mailbox::LogSpec, at: Position, seq: u64) -> Result<Message> {
    let mut reader = Messages::at(spec.clone(), at);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A replayed `claim_range` gives every message the first one's log position (so a
    /// redelivery reads forward from there, never the whole segment), the first one's
    /// timestamp, and the cursor after the last.
    #[test]
    fn a_claim_range_replays_as_claims_at_its_first_position() {
        let at = Position {
            segment: 1,
            offset: 4_096,
            line: 20,
            seq: 21,
        };
        let next = Position {
            offset: 4_500,
            line: 23,
            seq: 24,
            ..at
        };
        let mut r = Rec::new(21, Op::ClaimRange, 1_000);
        r.last = Some(23);
        r.consumer = Some("w".into());
        r.until = Some(31_000);
        r.at = Some(at);
        r.next = Some(next);
        r.ts = Some(900);
        let mut state = GroupState::new(21);
        state.apply(&r);

        assert_eq!(
            (state.next, state.next_pos, state.delivered),
            (24, Some(next), 3)
        );
        let seqs: Vec<u64> = state.entries.keys().copied().collect();
        assert_eq!(seqs, [21, 22, 23]);
        for (seq, e) in &state.entries {
            assert_eq!((e.attempt, e.consumer.as_deref()), (1, Some("w")));
            assert_eq!((e.visible_at, e.at), (31_000, at));
            assert_eq!(e.ts, (*seq == 21).then_some(900));
        }
    }
}
