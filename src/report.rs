//! What the bus reports: counters, compaction and doctor results, lease states. Plain
//! data, filled in by either backend and re-exported from the crate root.

use std::path::PathBuf;

use serde::Serialize;
use time::OffsetDateTime;

/// Counters of one group, from [`Group::stats`](crate::Group::stats).
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
    /// Messages coalesced into an earlier one with the same key
    /// ([`GroupOptions::coalesce`](crate::GroupOptions::coalesce)): settled, never
    /// delivered.
    pub coalesced: u64,
    /// Messages published but never delivered to this group.
    pub lag: u64,
    /// The first seq not yet delivered.
    pub next_seq: u64,
    /// Age of the oldest message not yet settled, in milliseconds.
    pub oldest_unacked_ms: Option<u64>,
}

/// What [`Mailbox::compact`](crate::Mailbox::compact) removed.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct CompactReport {
    /// The mailbox.
    pub mailbox: String,
    /// The lowest seq still unsettled in some group (`None` without groups).
    pub floor: Option<u64>,
    /// The segment files removed.
    pub removed: Vec<PathBuf>,
    /// Their total size in bytes.
    pub bytes: u64,
}

/// Counters of one mailbox and its groups, from [`Mailbox::stats`](crate::Mailbox::stats).
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct MailboxStats {
    /// The mailbox.
    pub mailbox: String,
    /// Messages ever published: the newest seq.
    pub published: u64,
    /// The oldest seq still stored (compaction removes older ones).
    pub first_seq: u64,
    /// Segment files.
    pub segments: u64,
    /// Bytes stored in segments.
    pub bytes: u64,
    /// One entry per consumer group.
    pub groups: Vec<GroupStats>,
}

/// What [`Bus::doctor`](crate::Bus::doctor) found.
#[derive(Debug, Clone, Default, Serialize)]
#[non_exhaustive]
pub struct DoctorReport {
    /// Mailboxes checked.
    pub mailboxes: u64,
    /// Records read and verified.
    pub records: u64,
    /// Every problem found, in the order found.
    pub problems: Vec<Problem>,
}

impl DoctorReport {
    /// True when nothing is wrong, or everything wrong was repaired.
    pub fn is_clean(&self) -> bool {
        self.problems.iter().all(|p| p.repaired)
    }
}

/// One problem found by [`Bus::doctor`](crate::Bus::doctor).
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct Problem {
    /// The mailbox.
    pub mailbox: String,
    /// The file.
    pub path: PathBuf,
    /// The 1-based line.
    pub line: u64,
    /// What kind of problem.
    pub kind: ProblemKind,
    /// Details.
    pub detail: String,
    /// Whether `--repair` fixed it.
    pub repaired: bool,
}

/// Kinds of [`Problem`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ProblemKind {
    /// An incomplete final line, left by a writer that crashed mid-append. Readers never
    /// deliver it and the next writer removes it; `repair` removes it now.
    TornTail,
    /// A damaged record: bad checksum, invalid JSON, out-of-order seq, over the size
    /// limit, or an unreachable segment. Never repaired automatically: the bytes may be
    /// someone's message.
    Damaged,
    /// A group has read further than its log now reaches: the log lost records the
    /// group had seen (a power cut took a tail that was not synced). See FORMAT.md,
    /// "Power loss".
    AheadOfLog,
}

/// What a supervisor sees of a lease: [`Bus::lease_info`](crate::Bus::lease_info), [`Bus::leases`](crate::Bus::leases).
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

/// One revision of a key in a key-value bucket: [`Kv::get`](crate::Kv::get) (the
/// current value), [`Kv::history`](crate::Kv::history) (every revision kept, deletions
/// included).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[non_exhaustive]
pub struct KvEntry {
    /// The key.
    pub key: String,
    /// The value; `null` for a deletion.
    pub value: serde_json::Value,
    /// The bucket-wide revision of this write: strictly increasing across every write
    /// of the bucket, forever (never reused after a restart or a compaction).
    pub revision: u64,
    /// Whether this revision is a deletion (a tombstone).
    pub deleted: bool,
    /// When the key got its value after being absent (or deleted).
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    /// When this revision was written.
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl KvEntry {
    /// The value as a `T`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidMessage`](crate::Error::InvalidMessage) if the value does not
    /// deserialize as a `T`.
    pub fn value_as<T: serde::de::DeserializeOwned>(&self) -> crate::Result<T> {
        T::deserialize(&self.value).map_err(|e| {
            crate::Error::InvalidMessage(format!(
                "the value of key {:?} (revision {}) is not the type asked for: {e}",
                self.key, self.revision
            ))
        })
    }
}
