//! The storage seam: what a backend provides for a bus, a mailbox, a group and the
//! leases, written down once.
//!
//! The public types ([`Bus`](crate::Bus), [`Mailbox`](crate::Mailbox),
//! [`Group`](crate::Group), [`Lease`](crate::Lease), [`Messages`](crate::Messages)) are
//! facades: they hold the docs, the validation and the fields both backends share, and
//! forward each operation through one of the enums below. Each enum has one arm per
//! backend and dereferences to the backend's trait, so a forward is one line and a new
//! backend is one arm per enum (crossbeam-channel's flavors, notify's `Watcher`).
//!
//! An operation a backend cannot express has no code in that backend: the trait's
//! default answers [`Error::Unsupported`] with the backend's own hint
//! ([`Backend::hint`]), from one place.
//!
//! Below this seam, `dir/` and `nats/` import only this module's vocabulary and the
//! backend-free modules (`message`, `filter`, `report`, `clock`, `error`, `name`,
//! `encode`, `watch`'s hints), never a facade.

use std::fmt::Debug;
use std::fs::File;
use std::ops::{Deref, DerefMut};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::report::{CompactReport, DoctorReport, GroupStats, KvEntry, LeaseInfo};
use crate::watch::{Watch, WatchMode};
use crate::{dir, Durability, Error, Filter, Message, NewMessage, Receipt, Result, RetryPolicy};

#[cfg(feature = "nats")]
use crate::nats;

/// Settings of a bus handle, from [`BusBuilder`](crate::BusBuilder).
#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) durability: Durability,
    pub(crate) file_mode: u32,
    pub(crate) dir_mode: u32,
    pub(crate) max_record_bytes: usize,
    pub(crate) segment_bytes: u64,
    pub(crate) agent: String,
    pub(crate) watch_mode: WatchMode,
    pub(crate) poll_interval: Duration,
}

impl Options {
    pub(crate) fn sync(&self) -> bool {
        self.durability == Durability::Sync
    }
}

/// The URL scheme that selects the JetStream backend.
const NATS_SCHEME: &str = "nats://";

/// Opens (`create`: creates if needed) the bus at `location`: a directory, or a
/// `nats://` URL. The one place that picks a backend.
pub(crate) fn open_bus(location: &std::path::Path, opts: &Options, create: bool) -> Result<BusImp> {
    match location.to_str().filter(|s| s.starts_with(NATS_SCHEME)) {
        #[cfg(feature = "nats")]
        Some(url) => nats::Bus::connect(url, opts.clone()).map(BusImp::Nats),
        #[cfg(not(feature = "nats"))]
        Some(_) => Err(Error::Unsupported {
            operation: "a nats:// bus",
            backend: "directory",
            hint: "build agentbus with the `nats` feature",
        }),
        None => dir::Bus::open(location, opts.clone(), create).map(BusImp::Dir),
    }
}

/// Forwards a backend enum to its arm: `match self { Dir(b) => b, Nats(b) => b }`.
macro_rules! backend_enum {
    ($(#[$doc:meta])* $name:ident: $trait:ident { Dir($dir:ty), Nats($nats:ty) }) => {
        $(#[$doc])*
        // Held inline, not boxed: the directory arm is the hot path of every send and
        // claim, and each enum lives behind an `Arc` or in a long-lived reader.
        #[allow(clippy::large_enum_variant)]
        #[derive(Debug)]
        pub(crate) enum $name {
            /// The directory backend (FORMAT.md).
            Dir($dir),
            /// The JetStream backend.
            #[cfg(feature = "nats")]
            Nats($nats),
        }

        impl Deref for $name {
            type Target = dyn $trait;

            fn deref(&self) -> &Self::Target {
                match self {
                    $name::Dir(b) => b,
                    #[cfg(feature = "nats")]
                    $name::Nats(b) => b,
                }
            }
        }

        impl DerefMut for $name {
            fn deref_mut(&mut self) -> &mut Self::Target {
                match self {
                    $name::Dir(b) => b,
                    #[cfg(feature = "nats")]
                    $name::Nats(b) => b,
                }
            }
        }
    };
}

backend_enum! {
    /// The backend of a bus.
    BusImp: BusBackend { Dir(dir::Bus), Nats(nats::Bus) }
}
backend_enum! {
    /// The backend of a mailbox.
    MailboxImp: MailboxBackend { Dir(dir::Mailbox), Nats(nats::Mailbox) }
}
backend_enum! {
    /// The backend of a consumer group.
    GroupImp: GroupBackend { Dir(dir::Group), Nats(nats::Group) }
}
backend_enum! {
    /// A backend's reader of a mailbox.
    ReaderImp: ReadBackend { Dir(dir::Reader), Nats(nats::Reader) }
}

/// What keeps a [`Watch`]'s hints coming, kept alive as long as the watch.
#[derive(Debug)]
pub(crate) enum WatchSource {
    /// `notify` events on directories.
    Notify(#[allow(dead_code)] notify::RecommendedWatcher),
    /// A subscription to the JetStream subjects.
    #[cfg(feature = "nats")]
    Nats(#[allow(dead_code)] nats::HintTask),
}

/// What every backend trait has: a name and hints for what it cannot do.
pub(crate) trait Backend {
    /// `"directory"` or `"nats"`, for [`Error::Unsupported`].
    fn kind(&self) -> &'static str;

    /// What to do instead of `operation`, which this backend does not offer.
    fn hint(&self, operation: &'static str) -> &'static str {
        let _ = operation;
        "not offered by this backend"
    }

    /// The error for an operation this backend does not offer.
    fn unsupported(&self, operation: &'static str) -> Error {
        Error::Unsupported {
            operation,
            backend: self.kind(),
            hint: self.hint(operation),
        }
    }
}

/// A bus: where mailboxes and leases live.
pub(crate) trait BusBackend: Backend + Debug + Send + Sync {
    /// Creates a mailbox: [`Error::MailboxExists`] if it exists.
    fn create_mailbox(&self, name: &str) -> Result<()>;
    /// Opens a mailbox; `None` if it does not exist.
    fn open_mailbox(&self, name: &str) -> Result<Option<OpenMailbox>>;
    /// The names of all mailboxes, sorted.
    fn mailbox_names(&self) -> Result<Vec<String>>;
    /// A watch woken by new messages in these (existing) mailboxes.
    fn watch_mailboxes(&self, names: &[&str], mode: WatchMode) -> Watch;

    /// The current state of a lease; `None` if it was never granted.
    fn lease_info(&self, name: &str) -> Result<Option<LeaseInfo>>;
    /// The names of all leases ever granted, sorted.
    fn lease_names(&self) -> Result<Vec<String>>;
    /// Grants the lease unless it is held: the grant, or the holder's state.
    fn grant_lease(&self, request: &LeaseGrant<'_>) -> Result<Result<Granted, LeaseState>>;
    /// Renews, releases or transfers grant `token` of `holder`.
    fn change_lease(
        &self,
        name: &str,
        holder: &str,
        token: u64,
        change: LeaseChange,
    ) -> Result<LeaseInfo>;
    /// Releases a grant without blocking the caller, on a best-effort basis (a
    /// dropped [`Lease`](crate::Lease)).
    fn release_lease_in_background(&self, name: &str, holder: &str, token: u64);
    /// A watch woken by changes of the lease.
    fn watch_lease(&self, name: &str, mode: WatchMode) -> Result<Watch>;

    /// Creates a key-value bucket keeping `history` revisions per key:
    /// [`Error::BucketExists`] if it exists.
    fn create_kv(&self, bucket: &str, history: u32) -> Result<()> {
        let _ = (bucket, history);
        Err(self.unsupported(KV))
    }
    /// Opens a key-value bucket; `None` if it does not exist.
    fn open_kv(&self, bucket: &str) -> Result<Option<KvImp>> {
        let _ = bucket;
        Err(self.unsupported(KV))
    }
    /// The names of all key-value buckets, sorted.
    fn kv_names(&self) -> Result<Vec<String>> {
        Err(self.unsupported(KV))
    }

    /// Verifies every record, repairing torn tails with `repair`.
    fn doctor(&self, repair: bool) -> Result<DoctorReport> {
        let _ = repair;
        Err(self.unsupported("doctor"))
    }
}

/// The operation [`BusBackend`]'s key-value defaults refuse.
const KV: &str = "key-value buckets";

/// The backend of a key-value bucket. One arm for now: the JetStream backend answers
/// [`Error::Unsupported`] from [`BusBackend`]'s defaults.
#[derive(Debug)]
pub(crate) enum KvImp {
    /// The directory backend (FORMAT.md, "Key-value buckets").
    Dir(dir::Kv),
}

impl Deref for KvImp {
    type Target = dyn KvBackend;

    fn deref(&self) -> &Self::Target {
        match self {
            KvImp::Dir(b) => b,
        }
    }
}

/// What a write of a key expects to find: the compare in compare-and-set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expect {
    /// Anything: a plain put or delete.
    Any,
    /// The key absent or deleted: a create.
    Absent,
    /// The key's current value at exactly this revision: an update.
    Revision(u64),
}

/// A key-value bucket: revisions, compare-and-set, history.
pub(crate) trait KvBackend: Backend + Debug + Send + Sync {
    /// The bucket's name.
    fn bucket(&self) -> &str;
    /// How many revisions per key a compaction keeps.
    fn history_depth(&self) -> u32;
    /// The key's current value; `None` if absent or deleted.
    fn get(&self, key: &str) -> Result<Option<KvEntry>>;
    /// Writes `value` (`None`: a tombstone) if the key is as `expect` says: the new
    /// revision, or [`Error::KvConflict`]. A delete of an absent key writes nothing
    /// and is `None`.
    fn write(
        &self,
        key: &str,
        value: Option<&serde_json::Value>,
        expect: Expect,
    ) -> Result<Option<u64>>;
    /// The keys with a current value that start with `prefix`, sorted.
    fn keys(&self, prefix: &str) -> Result<Vec<String>>;
    /// Every revision of `key` still stored, oldest first, tombstones included.
    fn history(&self, key: &str) -> Result<Vec<KvEntry>>;
    /// Drops all but the last `history_depth` revisions of each key: how many
    /// revisions were removed.
    fn compact(&self) -> Result<u64>;
}

/// An open mailbox: the fields its facade keeps, and its backend.
#[derive(Debug)]
pub(crate) struct OpenMailbox {
    /// The mailbox directory, or `<url>/<name>` on JetStream.
    pub(crate) path: std::path::PathBuf,
    /// The largest record it accepts, newline included.
    pub(crate) max_record_bytes: usize,
    pub(crate) imp: MailboxImp,
}

/// A mailbox: an append-only log, and the groups that consume it.
pub(crate) trait MailboxBackend: Backend + Debug + Send + Sync {
    /// The stored size of a message whose encoding (without `{"seq":N,`) is
    /// `tail_len` bytes, for the record limit.
    fn record_len(&self, tail_len: usize) -> usize;
    /// Appends the batch in order under one lock; duplicates of known idempotency keys
    /// get their original receipts.
    fn append(&self, batch: Vec<Prepared>) -> Result<Vec<Receipt>>;
    /// The seq of the oldest stored message.
    fn first_seq(&self) -> Result<u64>;
    /// The seq of the newest complete message, 0 when empty.
    fn last_seq(&self) -> Result<u64>;
    /// A reader from the start, without a filter.
    fn reader(&self) -> ReaderImp;
    /// The receipt of the message sent with idempotency `key`, if any.
    fn find_key(&self, key: &str) -> Result<Option<(u64, Uuid)>>;
    /// Segment files and bytes stored (0 and 0 where the server keeps the storage).
    fn storage(&self) -> Result<(u64, u64)>;
    /// Removes what every group has settled.
    fn compact(&self, retention: Option<Duration>) -> Result<CompactReport> {
        let _ = retention;
        Err(self.unsupported("compact"))
    }

    /// Whether this backend's groups can coalesce ([`Coalesce`](crate::Coalesce)):
    /// asked before a coalescing group is created or opened.
    fn coalescing(&self) -> Result<()> {
        Err(self.unsupported("coalescing groups"))
    }

    /// Creates a group (its dead-letter mailbox exists already): [`Error::GroupExists`]
    /// if it exists.
    fn create_group(&self, name: &str, meta: &GroupMeta, from_end: bool) -> Result<()>;
    /// Opens a group; `None` if it does not exist.
    fn open_group(&self, name: &str) -> Result<Option<(GroupMeta, GroupImp)>>;
    /// The names of the mailbox's groups, sorted.
    fn group_names(&self) -> Result<Vec<String>>;
}

/// A reader of a mailbox, in seq order.
pub(crate) trait ReadBackend:
    Iterator<Item = Result<Message>> + Debug + Send + Sync
{
    /// Starts at `seq` instead of the beginning (before the first `next`).
    fn set_from_seq(&mut self, seq: u64);
    /// The filter messages must pass.
    fn filter_mut(&mut self) -> &mut Filter;
}

/// A consumer group: claims, settlements and counters.
pub(crate) trait GroupBackend: Backend + Debug + Send + Sync {
    /// Claims up to `max` messages for `consumer`: redeliveries first, then new ones.
    fn claim(&self, consumer: &str, max: usize, visibility: Duration) -> Result<Vec<Claimed>>;
    /// Claims exactly `seq`, if it can be delivered now without jumping the queue.
    fn claim_seq(&self, consumer: &str, seq: u64, visibility: Duration) -> Result<Option<Claimed>> {
        let _ = (consumer, seq, visibility);
        Err(self.unsupported("claiming one message by seq"))
    }
    /// The live delivery of `seq` as `attempt`, through any handle.
    fn delivery(&self, seq: u64, attempt: u32) -> Result<Claimed> {
        let _ = (seq, attempt);
        Err(self.unsupported("acting on a delivery claimed through another handle"))
    }
    /// The live delivery of `seq`, whoever holds it.
    fn in_flight(&self, seq: u64) -> Result<Option<Claimed>>;
    /// Acks `seq` (as `attempt`, from a [`Delivery`](crate::Delivery)): `false` if it
    /// was already settled.
    fn ack(&self, seq: u64, attempt: Option<u32>) -> Result<bool>;
    /// Acks every delivered message up to `seq`; how many were newly acked.
    fn ack_upto(&self, seq: u64) -> Result<u64> {
        let _ = seq;
        Err(self.unsupported("ack_upto"))
    }
    /// Delivers settled message `seq` again (attempt 1): `false` if it is not
    /// settled.
    fn requeue(&self, seq: u64) -> Result<bool> {
        let _ = seq;
        Err(self.unsupported("requeue"))
    }
    /// Nacks, extends or terms the live claim of `seq` (as `attempt`, if given).
    fn settle(&self, seq: u64, attempt: Option<u32>, how: Settle) -> Result<()>;
    /// The attempt of the live claim of `seq`, for settling it by seq: the errors
    /// [`settle`](Self::settle) without an attempt gives when there is none.
    fn live_attempt(&self, seq: u64) -> Result<u32>;
    /// The group's counters.
    fn stats(&self) -> Result<GroupStats>;
    /// The earliest time (ms) an unsettled message becomes deliverable again, when
    /// the backend knows it (the directory does; a server redelivers by itself).
    fn next_due_ms(&self) -> Result<Option<i64>>;
    /// A watch woken by new messages and group changes.
    fn watch(&self, mode: WatchMode) -> Watch;
}

/// A message validated and serialized outside any lock, waiting for its `seq`.
#[derive(Debug)]
pub(crate) struct Prepared {
    pub(crate) id: Uuid,
    pub(crate) key: Option<String>,
    /// The JSON object without `{"seq":N,`: the rest of the members and the closing `}`.
    pub(crate) tail: Vec<u8>,
}

/// Validates and serializes `message` for `mailbox` (whose limit is `limit`).
pub(crate) fn prepare(
    message: NewMessage,
    agent: &str,
    mailbox: &dyn MailboxBackend,
    limit: usize,
) -> Result<Prepared> {
    let message = message.into_message(agent)?;
    let mut tail = Vec::with_capacity(256 + message.body.as_ref().map_or(0, String::len));
    crate::encode::encode_tail(&message, &mut tail)
        .map_err(|e| Error::InvalidMessage(format!("cannot encode the message: {e}")))?;
    let size = mailbox.record_len(tail.len());
    if size > limit {
        return Err(Error::RecordTooLarge {
            size: size as u64,
            limit: limit as u64,
        });
    }
    Ok(Prepared {
        id: message.id,
        key: message.idempotency_key,
        tail,
    })
}

/// A group's settings: `group.json` in a directory, the consumer's description on
/// JetStream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct GroupMeta {
    pub(crate) format: u64,
    pub(crate) max_deliveries: u32,
    pub(crate) visibility_ms: u64,
    pub(crate) dead_letter: String,
    #[serde(default, skip_serializing_if = "Filter::is_empty")]
    pub(crate) filter: Filter,
    /// Coalescing, where the group does it (group format 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) coalesce: Option<crate::Coalesce>,
    /// Read as `None` from a group made before retry policies; a group with one is
    /// format 2, which those releases refuse (they would retry at once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) retry: Option<RetryPolicy>,
}

/// The newest group format this build reads. A group is written with format 1 unless
/// releases that know only format 1 would misread its settings (they ignore fields
/// they do not know, and read a type pattern as a plain type): then with 2, which
/// they refuse to open (`unsupported_format`) instead. See FORMAT.md, "Consumer
/// groups".
pub(crate) const GROUP_FORMAT: u64 = 2;

impl GroupMeta {
    /// The format these settings need: 2 if a release before [`GROUP_FORMAT`] would
    /// misread them, else 1 (which every release reads).
    pub(crate) fn needed_format(&self) -> u64 {
        if self.filter.misread_by_old_releases() || self.coalesce.is_some() || self.retry.is_some()
        {
            GROUP_FORMAT
        } else {
            1
        }
    }

    /// Refuses settings stored in a format this build does not read (`path` names
    /// where they are).
    pub(crate) fn check_format(&self, path: &std::path::Path) -> Result<()> {
        if (1..=GROUP_FORMAT).contains(&self.format) {
            return Ok(());
        }
        Err(Error::UnsupportedFormat {
            path: path.to_owned(),
            found: self.format,
            supported: GROUP_FORMAT,
        })
    }
}

/// A message handed to a consumer; the facade makes it a [`Delivery`](crate::Delivery).
#[derive(Debug)]
pub(crate) struct Claimed {
    pub(crate) message: Message,
    pub(crate) attempt: u32,
    pub(crate) consumer: String,
    pub(crate) deadline: OffsetDateTime,
}

/// How a live claim is settled, other than by an ack.
#[derive(Debug, Clone)]
pub(crate) enum Settle {
    /// Back for redelivery after `delay`, noting `reason`.
    Nack {
        delay: Duration,
        reason: Option<String>,
    },
    /// Keep the claim for this long from now.
    Extend(Duration),
    /// Given up for good.
    Term { reason: Option<String> },
    /// Sent to the dead-letter mailbox now: given up on by the consumer
    /// ([`Delivery::dead_letter`](crate::Delivery::dead_letter)), or a nack whose
    /// reason the group's retry policy does not retry (`not_retryable`).
    DeadLetter { reason: String, not_retryable: bool },
}

/// How one delivery attempt ended without an ack (a dead letter lists them).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct AttemptNote {
    pub(crate) attempt: u32,
    pub(crate) consumer: Option<String>,
    pub(crate) outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
    pub(crate) at: i64,
}

/// Reasons are kept short so that a state record always stays far below the state
/// file's line limit and a dead letter below the record limit.
pub(crate) const MAX_REASON_BYTES: usize = 1024;

/// `reason`, cut to [`MAX_REASON_BYTES`] at a character boundary.
pub(crate) fn cap_reason(reason: &str) -> String {
    if reason.len() <= MAX_REASON_BYTES {
        return reason.to_owned();
    }
    let mut end = MAX_REASON_BYTES - 3;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &reason[..end])
}

/// The reason recorded for a message that ran out of `max` deliveries, the last one
/// failing for `reason`.
pub(crate) fn exhausted_reason(max: u32, reason: &str) -> String {
    format!("max deliveries ({max}) reached: {reason}")
}

/// The outcome of the last attempt and the reason recorded for a message dead-lettered
/// at once: given up on by its consumer, or nacked for a reason not retried.
pub(crate) fn at_once_reason(reason: &str, not_retryable: bool) -> (&'static str, String) {
    if not_retryable {
        ("nacked", format!("not retryable: {reason}"))
    } else {
        ("rejected", format!("rejected by the consumer: {reason}"))
    }
}

/// Where a group sends a message that ran out of deliveries.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DeadLetterTo<'a> {
    pub(crate) bus: &'a dyn BusBackend,
    pub(crate) agent: &'a str,
    pub(crate) mailbox: &'a str,
    pub(crate) group: &'a str,
    pub(crate) meta: &'a GroupMeta,
}

impl DeadLetterTo<'_> {
    /// The reason recorded for a message that ran out of deliveries: `reason` said why
    /// the last one failed.
    pub(crate) fn exhausted(&self, reason: &str) -> String {
        exhausted_reason(self.meta.max_deliveries, reason)
    }

    /// The outcome of the last attempt and the reason recorded for a message
    /// dead-lettered at once: one its consumer gave up on
    /// ([`Delivery::dead_letter`](crate::Delivery::dead_letter)), or a nack the retry
    /// policy does not retry.
    pub(crate) fn at_once(&self, reason: &str, not_retryable: bool) -> (&'static str, String) {
        at_once_reason(reason, not_retryable)
    }

    /// Copies `message` to the dead-letter mailbox (created if missing), exactly once
    /// whatever crashes (its idempotency key), with `reason` (capped); returns the
    /// reason recorded.
    pub(crate) fn send(
        &self,
        message: &Message,
        history: &[AttemptNote],
        reason: &str,
    ) -> Result<String> {
        let dlq = open_or_create_mailbox(self.bus, &self.meta.dead_letter)?;
        let reason = cap_reason(reason);
        let info = serde_json::json!({
            "mailbox": self.mailbox,
            "group": self.group,
            "seq": message.seq,
            "id": message.id,
            "reason": reason,
            "attempts": history,
        });
        let mut copy = NewMessage::replay_of(message)
            .causation_id(message.id.to_string())
            .idempotency_key(bounded_key(format!(
                "dead/{}/{}/{}",
                self.mailbox, self.group, message.id
            )));
        copy.headers
            .insert(crate::DEAD_LETTER_HEADER.into(), info.to_string());
        let prepared = prepare(copy, self.agent, &*dlq.imp, dlq.max_record_bytes)?;
        dlq.imp.append(vec![prepared])?;
        Ok(reason)
    }
}

/// Where damage stands in a group's path: the seqs it covers (none for a duplicate
/// record, which hides no seq) and the line.
#[derive(Debug)]
pub(crate) struct Damage<'a> {
    pub(crate) seqs: Option<(u64, u64)>,
    pub(crate) path: &'a std::path::Path,
    pub(crate) line: u64,
    pub(crate) reason: &'a str,
    /// The record's bytes, where the damage notice is the only copy left (JetStream
    /// terms a record that is not a message): the notice's body if they are UTF-8,
    /// else its payload as `{"raw_hex": ...}`.
    pub(crate) raw: Option<&'a [u8]>,
}

impl DeadLetterTo<'_> {
    /// Tells the dead-letter mailbox (created if missing) about damage the group passed
    /// over, exactly once per place (its idempotency key), and logs a warning.
    pub(crate) fn send_damage(&self, damage: &Damage<'_>) -> Result<()> {
        let (first, last) = damage.seqs.unzip();
        let info = serde_json::json!({
            "mailbox": self.mailbox,
            "group": self.group,
            "first_seq": first,
            "last_seq": last,
            "path": damage.path,
            "line": damage.line,
            "reason": cap_reason(damage.reason),
            "raw_bytes": damage.raw.map(<[u8]>::len),
        });
        log::warn!(
            "agentbus: group {} of mailbox {} passed over damage: {info}",
            self.group,
            self.mailbox
        );
        let place = match damage.seqs {
            Some((first, last)) => format!("{first}-{last}"),
            None => format!("{}:{}", damage.path.display(), damage.line),
        };
        let mut notice = NewMessage::new(crate::DAMAGED_TYPE)
            .subject(format!("damaged record in mailbox {}", self.mailbox))
            .idempotency_key(bounded_key(format!(
                "damaged/{}/{}/{place}",
                self.mailbox, self.group
            )));
        notice
            .headers
            .insert(crate::DEAD_LETTER_HEADER.into(), info.to_string());
        if let Some(raw) = damage.raw {
            // At most MAX_RAW_BYTES of it, so the notice stays below the record limit.
            let kept = &raw[..raw.len().min(MAX_RAW_BYTES)];
            match std::str::from_utf8(kept) {
                Ok(text) => notice = notice.body(text),
                Err(_) => {
                    let hex: String = kept.iter().map(|b| format!("{b:02x}")).collect();
                    notice = notice.payload(serde_json::json!({ "raw_hex": hex }));
                }
            }
        }
        let dlq = open_or_create_mailbox(self.bus, &self.meta.dead_letter)?;
        let prepared = prepare(notice, self.agent, &*dlq.imp, dlq.max_record_bytes)?;
        dlq.imp.append(vec![prepared])?;
        Ok(())
    }
}

/// How much of a record's raw bytes a damage notice carries.
const MAX_RAW_BYTES: usize = 64 * 1024;

/// `key` if it fits [`MAX_KEY_LEN`](crate::MAX_KEY_LEN) (long mailbox and group names
/// can make it longer), else a digest of it that does.
fn bounded_key(key: String) -> String {
    if key.len() <= crate::MAX_KEY_LEN {
        return key;
    }
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("{}/sha256:{hex}", &key[..key.find('/').unwrap_or(0)])
}

/// Opens mailbox `name` of `bus`, creating it if it does not exist yet.
pub(crate) fn open_or_create_mailbox(bus: &dyn BusBackend, name: &str) -> Result<OpenMailbox> {
    match bus.create_mailbox(name) {
        Ok(()) | Err(Error::MailboxExists { .. }) => {}
        Err(e) => return Err(e),
    }
    bus.open_mailbox(name)?
        .ok_or_else(|| Error::MailboxNotFound {
            name: name.to_owned(),
            existing: Vec::new(),
        })
}

/// A request for a lease grant.
#[derive(Debug)]
pub(crate) struct LeaseGrant<'a> {
    pub(crate) name: &'a str,
    pub(crate) holder: &'a str,
    pub(crate) ttl: Duration,
    pub(crate) process_bound: bool,
}

/// A lease just granted.
#[derive(Debug)]
pub(crate) struct Granted {
    pub(crate) token: u64,
    pub(crate) expires_at: OffsetDateTime,
    /// Read before the grant's wall-clock time: the holder's own deadline is never
    /// later than the one recorded for everybody else.
    pub(crate) started: Instant,
    /// For a process-bound grant: the locked liveness file, held as long as the lease.
    pub(crate) alive: Option<File>,
}

/// A change to a grant, by its holder.
#[derive(Debug, Clone)]
pub(crate) enum LeaseChange {
    Renew(Duration),
    Release,
    Transfer(String, Duration),
}

/// How long after its recorded expiry a lease is still treated as held by contenders,
/// to absorb small adjustments of the wall clock.
pub const CLOCK_GRACE: Duration = Duration::from_millis(100);

/// The state of a lease, as either backend stores it.
#[derive(Debug, Clone, Default)]
pub(crate) struct LeaseState {
    /// The record (directory) or revision (JetStream) this state is as of.
    pub(crate) seq: u64,
    pub(crate) token: u64,
    pub(crate) holder: Option<String>,
    pub(crate) acquired_at: i64,
    pub(crate) expires_at: i64,
    pub(crate) renewals: u32,
    pub(crate) process_bound: bool,
}

impl LeaseState {
    /// Held, as far as the records and the clock say (process liveness aside).
    pub(crate) fn held_at(&self, now: i64) -> bool {
        self.holder.is_some()
            && now
                < self
                    .expires_at
                    .saturating_add(CLOCK_GRACE.as_millis() as i64)
    }

    pub(crate) fn info(&self, name: &str, now: i64) -> LeaseInfo {
        LeaseInfo {
            name: name.to_owned(),
            holder: self.holder.clone().filter(|_| self.held_at(now)),
            token: self.token,
            acquired_at: crate::clock::datetime_ms(self.acquired_at),
            expires_at: crate::clock::datetime_ms(self.expires_at),
            renewals: self.renewals,
            process_bound: self.process_bound,
        }
    }

    /// The error for a contender when this state's holder has the lease.
    pub(crate) fn held_error(&self, name: &str) -> Error {
        Error::LeaseHeld {
            name: name.to_owned(),
            holder: self.holder.clone().unwrap_or_default(),
            token: self.token,
            expires_at: crate::clock::datetime_ms(self.expires_at),
        }
    }
}
