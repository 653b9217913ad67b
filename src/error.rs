//! The crate's one error type.

use std::io;
use std::path::{Path, PathBuf};

/// A specialised `Result` for agentbus operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in agentbus.
///
/// Every variant that touches the file system names the path and the operation, so a
/// message like `fdatasync .agentbus/mailboxes/main/log/00000000000000000001.jsonl:
/// Input/output error` tells an operator exactly where to look. [`Error::code`] gives a
/// stable, machine-readable code (the CLI prints it as `{"error": code, ...}`).
///
/// The receivers' errors convert with `?` ([`TryRecvError`](crate::TryRecvError) and
/// [`RecvTimeoutError`](crate::RecvTimeoutError) become [`Error::Empty`] and
/// [`Error::Timeout`]). There is deliberately no `From<std::io::Error>` or
/// `From<serde_json::Error>`: an agentbus error always names what it was doing, which a
/// bare conversion cannot. In a function that mixes agentbus with other I/O, return
/// `Box<dyn std::error::Error>` (or `anyhow::Result`): `Error` converts into both.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An I/O operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done (`"open"`, `"append"`, `"fdatasync"`, ...).
        op: &'static str,
        /// The file or directory involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// A mailbox, group, lease, bucket or agent name breaks the naming rule
    /// `[A-Za-z0-9][A-Za-z0-9._-]{0,127}`, or a key-value key (kind `"key"`) breaks the
    /// key rule of [`validate_kv_key`](crate::validate_kv_key).
    #[error("invalid {kind} name {name:?}: {reason}")]
    InvalidName {
        /// What the name was for (`"mailbox"`, `"agent"`, ...).
        kind: &'static str,
        /// The rejected name.
        name: String,
        /// Which part of the rule it breaks.
        reason: &'static str,
    },

    /// The mailbox does not exist. Mailboxes are created explicitly, so a misspelled
    /// recipient is an error rather than a silently created orphan.
    #[error(
        "mailbox {name:?} does not exist (existing mailboxes: {})",
        list_or_none(existing)
    )]
    MailboxNotFound {
        /// The name that was asked for.
        name: String,
        /// The mailboxes that do exist, sorted.
        existing: Vec<String>,
    },

    /// The consumer group does not exist on this mailbox.
    #[error(
        "group {name:?} does not exist on mailbox {mailbox:?} (existing groups: {})",
        list_or_none(existing)
    )]
    GroupNotFound {
        /// The mailbox.
        mailbox: String,
        /// The group that was asked for.
        name: String,
        /// The groups that do exist, sorted.
        existing: Vec<String>,
    },

    /// `create_group` was asked for a name that is taken.
    #[error("group {name:?} already exists on mailbox {mailbox:?}")]
    GroupExists {
        /// The mailbox.
        mailbox: String,
        /// The group.
        name: String,
    },

    /// The message was never delivered to this group, so it cannot be acked or nacked.
    #[error("seq {seq} has not been delivered to group {group:?}")]
    NotDelivered {
        /// The group.
        group: String,
        /// The seq.
        seq: u64,
    },

    /// The delivery is no longer this caller's to settle: its claim expired and the
    /// message was redelivered, or it was already acked, nacked or dead-lettered.
    #[error("delivery of seq {seq} to group {group:?} is stale: {reason}")]
    StaleDelivery {
        /// The group.
        group: String,
        /// The seq.
        seq: u64,
        /// What happened to it.
        reason: String,
    },

    /// The lease is held by someone else.
    #[error("lease {name:?} is held by {holder:?} (token {token}) until {expires_at}")]
    LeaseHeld {
        /// The lease.
        name: String,
        /// Its holder.
        holder: String,
        /// The holder's fencing token.
        token: u64,
        /// When the holder's grant expires unless renewed.
        expires_at: time::OffsetDateTime,
    },

    /// A renew, release or transfer named a grant that is not the current one (it
    /// expired, was released, or someone else holds the lease now).
    #[error("lease {name:?}: {reason} (held by {}, token {token})", holder.as_deref().unwrap_or("nobody"))]
    StaleLease {
        /// The lease.
        name: String,
        /// The real holder now, if any.
        holder: Option<String>,
        /// The current token.
        token: u64,
        /// What is wrong.
        reason: String,
    },

    /// `create_mailbox` was asked for a name that is taken.
    #[error("mailbox {name:?} already exists")]
    MailboxExists {
        /// The name.
        name: String,
    },

    /// The directory is not an agentbus directory (no `agentbus.json`).
    #[error("{} is not an agentbus directory (no agentbus.json; create one with `agentbus init`)", path.display())]
    NotABus {
        /// The directory.
        path: PathBuf,
    },

    /// The bus was written by a newer, incompatible version of agentbus.
    #[error("{}: format {found} is not supported (this build reads format {supported})", path.display())]
    UnsupportedFormat {
        /// The marker or metadata file.
        path: PathBuf,
        /// The format found there.
        found: u64,
        /// The format this build understands.
        supported: u64,
    },

    /// A record is larger than the configured limit; nothing was written.
    #[error("record of {size} bytes exceeds the limit of {limit} bytes")]
    RecordTooLarge {
        /// The encoded size of the record, in bytes.
        size: u64,
        /// The limit.
        limit: u64,
    },

    /// A stored record is damaged: its checksum does not match, it is not valid JSON,
    /// its `seq` is out of order, or it is longer than the record limit.
    #[error("{}:{line}: damaged record: {reason}", path.display())]
    Corrupt {
        /// The file holding the record.
        path: PathBuf,
        /// The 1-based line number of the record in that file.
        line: u64,
        /// What is wrong with it.
        reason: String,
    },

    /// A batch was only partly written (for example, the disk filled up): the records
    /// in `committed` are stored, the rest are not.
    #[error("append {}: only {} message(s) of the batch were stored: {source}", path.display(), committed.len())]
    BatchIncomplete {
        /// The segment file.
        path: PathBuf,
        /// Receipts of the messages that were stored.
        committed: Vec<crate::Receipt>,
        /// Why the rest was not.
        #[source]
        source: io::Error,
    },

    /// The message (or another input) is not valid; nothing was written.
    #[error("invalid message: {0}")]
    InvalidMessage(String),

    /// A reader fell behind compaction: the segments holding seqs `missed_from` to
    /// `first_available - 1` were removed (every group had settled them) before it got
    /// to them. Nothing is damaged: the reader goes on at `first_available`. A reader
    /// that must see every message needs a consumer group, which compaction waits for.
    #[error(
        "seqs {missed_from} to {} of {} were compacted away before this reader got to \
         them (every group had settled them); reading goes on at seq {first_available}",
        first_available - 1,
        path.display()
    )]
    Compacted {
        /// The log directory.
        path: PathBuf,
        /// The first seq the reader missed.
        missed_from: u64,
        /// The oldest seq still stored, where reading goes on.
        first_available: u64,
    },

    /// A request to the NATS server failed (the `nats` backend), or a `nats://` URL is
    /// not valid.
    #[error("NATS: {operation}: {reason}")]
    Nats {
        /// What was being done.
        operation: String,
        /// What the client or the server said.
        reason: String,
    },

    /// The NATS server could not answer now: no server answered in time, or the one
    /// that must answer is being elected (a JetStream cluster lost a server, or a leader
    /// stepped down). Nothing is known to have happened: the request may or may not have
    /// been applied. [`Error::is_retryable`] is true: repeat the same request after a
    /// moment (a send with the same idempotency key, so a send that did land is not
    /// stored twice). README "Scaling out" says how long a failover refuses requests.
    #[error("NATS: {operation}: the server is unavailable now ({reason}); retry")]
    Unavailable {
        /// What was being done.
        operation: String,
        /// What the client or the server said.
        reason: String,
    },

    /// The NATS server's version has a bug that breaks a guarantee this bus would need,
    /// so agentbus refuses to use what depends on it, for example a replicated lease
    /// bucket on a server before 2.9.21, whose compare-and-set is not atomic. Upgrade
    /// the servers to `needed`, or open the bus without `?replicas`.
    #[error(
        "NATS server {version} cannot serve {what}: {why}; it needs nats-server {needed} or later"
    )]
    UnsupportedServer {
        /// The version the server reported.
        version: String,
        /// What was refused.
        what: String,
        /// Which guarantee the version breaks.
        why: String,
        /// The first version that works.
        needed: &'static str,
    },

    /// The operation has no equivalent on this bus's backend (for example `doctor` on
    /// NATS JetStream, which checks its own storage). README "Scaling out" lists them.
    #[error("{operation} is not supported on the {backend} backend: {hint}")]
    Unsupported {
        /// The operation.
        operation: &'static str,
        /// The backend: `"nats"` or `"directory"`.
        backend: &'static str,
        /// What to do instead.
        hint: &'static str,
    },

    /// A group exists with other settings than the ones asked for
    /// ([`Mailbox::create_or_open_group`](crate::Mailbox::create_or_open_group)). Open
    /// it with [`Mailbox::group`](crate::Mailbox::group) to use its settings, or give it
    /// another name.
    #[error("group {name:?} of mailbox {mailbox:?} exists with other settings: {differences}")]
    GroupSettingsDiffer {
        /// The mailbox.
        mailbox: String,
        /// The group.
        name: String,
        /// Each setting that differs, as `name: existing (asked: new)`.
        differences: String,
    },

    /// Nothing arrived before the deadline: a
    /// [`RecvTimeoutError::Timeout`](crate::RecvTimeoutError::Timeout) passed on with `?`.
    #[error("timed out waiting for a message")]
    Timeout,

    /// Nothing was waiting: a [`TryRecvError::Empty`](crate::TryRecvError::Empty) passed
    /// on with `?`.
    #[error("no message is waiting")]
    Empty,
    /// The bus cannot be trusted: its directory, or a file or directory in it, belongs
    /// to another user (another group, for a bus shared with a group), or is writable
    /// by others beyond the bus's sharing mode. Nothing was read or written through it.
    /// `fix` says what to change (README "Sharing a bus between users").
    #[error("{}: {problem}; {fix}", path.display())]
    Untrusted {
        /// The file or directory.
        path: PathBuf,
        /// What is wrong with it, such as `owned by uid 1001, not by uid 1000`.
        problem: String,
        /// What to do about it.
        fix: String,
    },

    /// A path inside the bus is not a plain file or directory of the bus: a symlink
    /// (or a symlink on its way), a file with more than one hard link, a FIFO, a
    /// device or a socket, or a directory where a file belongs (or the reverse).
    /// Nothing was opened through it.
    #[error("{}: {problem}; {fix}", path.display())]
    UnsafeFile {
        /// The path.
        path: PathBuf,
        /// What it is, such as `a FIFO, not a regular file`.
        problem: String,
        /// What to do about it.
        fix: String,
    },

    /// An artifact named by a message does not exist (or is not a regular file).
    #[error("artifact {} is missing", path.display())]
    ArtifactMissing {
        /// The artifact's path.
        path: PathBuf,
    },

    /// An artifact's path names something other than a regular file: a directory, a
    /// FIFO, a device or a socket. Nothing is opened that could block (a FIFO is never
    /// read).
    #[error("artifact {} is a {kind}, not a regular file", path.display())]
    ArtifactNotAFile {
        /// The artifact's path.
        path: PathBuf,
        /// What is there instead: `"directory"`, `"FIFO"`, `"character device"`,
        /// `"block device"`, `"socket"` or `"special file"`.
        kind: &'static str,
    },

    /// A setting is out of range, for example a consumer group's `max_deliveries` of 0
    /// or a zero visibility timeout; nothing was created or changed.
    #[error("invalid {setting}: {reason}")]
    InvalidSetting {
        /// The setting, as the API names it (`"max_deliveries"`, `"visibility"`, ...).
        setting: &'static str,
        /// What the valid range is, and what was given.
        reason: String,
    },

    /// The key-value bucket does not exist. Buckets are created explicitly
    /// ([`Bus::create_kv`](crate::Bus::create_kv), `agentbus kv create`), like mailboxes.
    #[error(
        "key-value bucket {bucket:?} does not exist (existing buckets: {}); create it with `agentbus kv create`",
        list_or_none(existing)
    )]
    BucketNotFound {
        /// The bucket that was asked for.
        bucket: String,
        /// The buckets that do exist, sorted.
        existing: Vec<String>,
    },

    /// [`Bus::create_kv`](crate::Bus::create_kv) was asked for a bucket that exists.
    #[error("key-value bucket {bucket:?} already exists")]
    BucketExists {
        /// The bucket.
        bucket: String,
    },

    /// A compare-and-set lost: [`Kv::update`](crate::Kv::update) expected another
    /// revision, or [`Kv::create`](crate::Kv::create) found the key present. Nothing
    /// was written. Read the current value (it is here), compute again, and retry with
    /// `current_revision`.
    #[error(
        "key {key:?} of bucket {bucket:?} is {}, not {}; nothing was written: read it again and retry",
        revision_or_absent(*current_revision),
        revision_or_absent(*expected_revision)
    )]
    KvConflict {
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        /// The revision the write expected; `None` for a create (expected absent).
        expected_revision: Option<u64>,
        /// The revision of the key's current value; `None` if it is absent or deleted.
        current_revision: Option<u64>,
        /// The key's current value; `None` if it is absent or deleted.
        current_value: Option<serde_json::Value>,
    },

    /// An artifact's size differs from the size recorded when it was sent.
    #[error("artifact {} has {actual} bytes, expected {expected}", path.display())]
    ArtifactSizeMismatch {
        /// The artifact's path.
        path: PathBuf,
        /// The size recorded in the message.
        expected: u64,
        /// The size found on disk.
        actual: u64,
    },

    /// An artifact's SHA-256 differs from the digest recorded when it was sent.
    #[error("artifact {} has sha256 {actual}, expected {expected}", path.display())]
    ArtifactDigestMismatch {
        /// The artifact's path.
        path: PathBuf,
        /// The digest recorded in the message.
        expected: String,
        /// The digest of the file on disk.
        actual: String,
    },
}

fn revision_or_absent(revision: Option<u64>) -> String {
    match revision {
        Some(r) => format!("at revision {r}"),
        None => "absent".to_owned(),
    }
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".to_owned()
    } else {
        names.join(", ")
    }
}

impl Error {
    /// A stable, machine-readable code for this error, such as `"mailbox_not_found"`.
    ///
    /// The CLI prints it as the `error` field of its JSON error object; scripts can
    /// match on it.
    ///
    /// ```
    /// let err = agentbus::Error::MailboxExists { name: "main".into() };
    /// assert_eq!(err.code(), "mailbox_exists");
    /// ```
    pub fn code(&self) -> &'static str {
        match self {
            Error::Io { .. } => "io",
            Error::InvalidName { .. } => "invalid_name",
            Error::MailboxNotFound { .. } => "mailbox_not_found",
            Error::MailboxExists { .. } => "mailbox_exists",
            Error::LeaseHeld { .. } => "lease_held",
            Error::StaleLease { .. } => "stale_lease",
            Error::GroupNotFound { .. } => "group_not_found",
            Error::GroupExists { .. } => "group_exists",
            Error::NotDelivered { .. } => "not_delivered",
            Error::StaleDelivery { .. } => "stale_delivery",
            Error::NotABus { .. } => "not_a_bus",
            Error::UnsupportedFormat { .. } => "unsupported_format",
            Error::RecordTooLarge { .. } => "record_too_large",
            Error::Corrupt { .. } => "corrupt",
            Error::Compacted { .. } => "compacted",
            Error::InvalidMessage(_) => "invalid_message",
            Error::Nats { .. } => "nats",
            Error::Unavailable { .. } => "unavailable",
            Error::UnsupportedServer { .. } => "unsupported_server",
            Error::Unsupported { .. } => "unsupported",
            Error::GroupSettingsDiffer { .. } => "group_settings_differ",
            Error::Timeout => "timeout",
            Error::Empty => "empty",
            Error::BatchIncomplete { .. } => "batch_incomplete",
            Error::Untrusted { .. } => "untrusted",
            Error::UnsafeFile { .. } => "unsafe_file",
            Error::ArtifactMissing { .. } => "artifact_missing",
            Error::ArtifactNotAFile { .. } => "artifact_not_a_file",
            Error::InvalidSetting { .. } => "invalid_setting",
            Error::ArtifactSizeMismatch { .. } => "artifact_size_mismatch",
            Error::ArtifactDigestMismatch { .. } => "artifact_digest_mismatch",
            Error::BucketNotFound { .. } => "bucket_not_found",
            Error::BucketExists { .. } => "bucket_exists",
            Error::KvConflict { .. } => "kv_conflict",
        }
    }

    /// The file or directory this error is about, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Error::Io { path, .. }
            | Error::BatchIncomplete { path, .. }
            | Error::NotABus { path }
            | Error::UnsupportedFormat { path, .. }
            | Error::Corrupt { path, .. }
            | Error::Compacted { path, .. }
            | Error::Untrusted { path, .. }
            | Error::UnsafeFile { path, .. }
            | Error::ArtifactMissing { path }
            | Error::ArtifactNotAFile { path, .. }
            | Error::ArtifactSizeMismatch { path, .. }
            | Error::ArtifactDigestMismatch { path, .. } => Some(path),
            _ => None,
        }
    }

    /// True when the request itself was wrong and nothing was written: a bad name, an
    /// invalid or oversized message, a setting out of range, a mailbox or key-value
    /// bucket that does not exist (or already does), or a directory that is not a bus.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Error::InvalidName { .. }
                | Error::NotABus { .. }
                | Error::InvalidMessage(_)
                | Error::InvalidSetting { .. }
                | Error::RecordTooLarge { .. }
                | Error::MailboxNotFound { .. }
                | Error::MailboxExists { .. }
                | Error::GroupNotFound { .. }
                | Error::GroupExists { .. }
                | Error::GroupSettingsDiffer { .. }
                | Error::NotDelivered { .. }
                | Error::BucketNotFound { .. }
                | Error::BucketExists { .. }
        )
    }

    /// True when the same request may succeed if repeated in a moment: the server was
    /// unavailable ([`Error::Unavailable`], a failover in a JetStream cluster). Such a
    /// request may or may not have been applied, so repeat it as it was: a send with
    /// the same idempotency key (its receipt then says `duplicate` if the first one
    /// landed), an ack, nack or extend of the same delivery (a
    /// [`StaleDelivery`](Error::StaleDelivery) then means the claim ran out meanwhile),
    /// a lease call while [`Lease::is_valid`](crate::Lease::is_valid) says it still holds.
    /// Receivers ([`Consumer`](crate::Consumer), [`Follower`](crate::Follower)) retry
    /// by themselves while they wait.
    ///
    /// ```
    /// let err = agentbus::Error::Unavailable {
    ///     operation: "publish to mailbox main".into(),
    ///     reason: "no responders".into(),
    /// };
    /// assert!(err.is_retryable());
    /// assert!(!agentbus::Error::MailboxExists { name: "main".into() }.is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }

    /// The underlying I/O error, if this is an I/O failure.
    pub fn io_error(&self) -> Option<&io::Error> {
        match self {
            Error::Io { source, .. } | Error::BatchIncomplete { source, .. } => Some(source),
            _ => None,
        }
    }

    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}

/// `result.ctx("open", &path)?` turns an `io::Result` into a crate [`Result`] that names
/// the operation and the path.
pub(crate) trait IoContext<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, op: &'static str, path: &Path) -> Result<T> {
        self.map_err(|e| Error::io(op, path, e))
    }
}
