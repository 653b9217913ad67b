//! Messages: what is stored, what a sender builds, what a sender gets back.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::error::IoContext;
use crate::{Error, Result};

/// A stored message: one record of a mailbox's log.
///
/// Field order is the on-disk order; `seq` comes first so outside tools can find it with
/// a prefix match (see FORMAT.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Message {
    /// Position in the mailbox: 1, 2, 3, ... without gaps, assigned under the lock.
    pub seq: u64,
    /// Unique id (UUIDv7 when written by agentbus).
    pub id: Uuid,
    /// When the message was sent (RFC 3339, UTC).
    #[serde(with = "time::serde::rfc3339")]
    pub ts: OffsetDateTime,
    /// The sending agent.
    pub from: String,
    /// What kind of message this is, for example `"task"` or `"review.request"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short subject line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Structured data, any JSON value (`Some(Value::Null)` when the payload is JSON
    /// `null`; `None` when there is none).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub payload: Option<serde_json::Value>,
    /// Files the message refers to, with their size and SHA-256 at send time.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub artifacts: Vec<Artifact>,
    /// Groups the messages of one conversation or task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The id of the message that caused this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
    /// The sender's deduplication key, if it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// Priority, higher is more urgent; 0 (the default) is normal.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
    /// Free-form string headers.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

impl Message {
    /// The payload as a `T`: the typed form of [`payload`](Self::payload), for messages
    /// sent with [`NewMessage::json`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidMessage`] when there is no payload or it is not a `T`, naming
    /// the message.
    pub fn payload_as<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        let payload = self.payload.as_ref().ok_or_else(|| {
            Error::InvalidMessage(format!(
                "message {} (seq {}) has no payload",
                self.id, self.seq
            ))
        })?;
        T::deserialize(payload).map_err(|e| {
            Error::InvalidMessage(format!(
                "the payload of message {} (seq {}) is not the type asked for: {e}",
                self.id, self.seq
            ))
        })
    }
}

/// A member that is present is `Some`, even when it is `null` (serde's default reads a
/// present `null` as `None`, which would turn a `null` payload into no payload).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<serde_json::Value>, D::Error> {
    serde_json::Value::deserialize(d).map(Some)
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

/// A file a message refers to, pinned by size and SHA-256 when the message was sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Absolute path of the file.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Lower-case hex SHA-256 of the contents.
    pub sha256: String,
}

impl Artifact {
    /// Reads the file at `path` and records its absolute path, size and SHA-256.
    ///
    /// An empty file is refused, and so is a file that changes while it is read (its
    /// size or modification time differ before and after): an artifact still being
    /// written is never pinned half-way.
    ///
    /// ```
    /// # fn main() -> agentbus::Result<()> {
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("draft.md");
    /// std::fs::write(&path, "hello").unwrap();
    /// let artifact = agentbus::Artifact::capture(&path)?;
    /// assert_eq!(artifact.size, 5);
    /// artifact.verify()?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::ArtifactMissing`] when the file does not exist;
    /// [`Error::ArtifactNotAFile`] for a directory, FIFO, device or socket (never
    /// opened, so a FIFO cannot block the call); [`Error::InvalidMessage`] when it is
    /// empty or changed while being read, or when its absolute path is not UTF-8
    /// (a message stores paths as JSON text); [`Error::Io`] when it cannot be read.
    pub fn capture(path: impl AsRef<Path>) -> Result<Artifact> {
        let path = path.as_ref();
        let abs = std::fs::canonicalize(path).map_err(|e| missing_or_io(path, e))?;
        if abs.to_str().is_none() {
            return Err(Error::InvalidMessage(format!(
                "artifact path {} is not valid UTF-8, and a message stores paths as JSON \
                 text: rename the file",
                abs.display()
            )));
        }
        let stamp = |p: &Path| -> Result<(u64, Option<std::time::SystemTime>)> {
            let m = regular_file(p)?;
            Ok((m.len(), m.modified().ok()))
        };
        let before = stamp(&abs)?;
        let (size, sha256) = digest_file(&abs)?;
        let after = stamp(&abs)?;
        if before != after || size != after.0 {
            return Err(Error::InvalidMessage(format!(
                "artifact {} changed while it was being read (still being written?)",
                abs.display()
            )));
        }
        if size == 0 {
            return Err(Error::InvalidMessage(format!(
                "artifact {} is empty",
                abs.display()
            )));
        }
        Ok(Artifact {
            path: abs,
            size,
            sha256,
        })
    }

    /// Checks that the file still exists with the recorded size and SHA-256.
    ///
    /// # Errors
    ///
    /// [`Error::ArtifactMissing`], [`Error::ArtifactNotAFile`] (something else now has
    /// its path; a FIFO is never opened), [`Error::ArtifactSizeMismatch`] or
    /// [`Error::ArtifactDigestMismatch`], each naming the path; [`Error::Io`] when the
    /// file cannot be read.
    pub fn verify(&self) -> Result<()> {
        let meta = regular_file(&self.path)?;
        if meta.len() != self.size {
            return Err(Error::ArtifactSizeMismatch {
                path: self.path.clone(),
                expected: self.size,
                actual: meta.len(),
            });
        }
        let (size, sha256) = digest_file(&self.path)?;
        if size != self.size {
            return Err(Error::ArtifactSizeMismatch {
                path: self.path.clone(),
                expected: self.size,
                actual: size,
            });
        }
        if !sha256.eq_ignore_ascii_case(&self.sha256) {
            return Err(Error::ArtifactDigestMismatch {
                path: self.path.clone(),
                expected: self.sha256.clone(),
                actual: sha256,
            });
        }
        Ok(())
    }
}

fn missing_or_io(path: &Path, e: std::io::Error) -> Error {
    if e.kind() == std::io::ErrorKind::NotFound {
        Error::ArtifactMissing {
            path: path.to_owned(),
        }
    } else {
        Error::io("read artifact", path, e)
    }
}

/// The metadata of `path` (symlinks followed) if it is a regular file;
/// [`Error::ArtifactNotAFile`] naming what it is otherwise.
fn regular_file(path: &Path) -> Result<std::fs::Metadata> {
    let meta = std::fs::metadata(path).map_err(|e| missing_or_io(path, e))?;
    not_a_file(path, &meta).map_or(Ok(meta), Err)
}

fn not_a_file(path: &Path, meta: &std::fs::Metadata) -> Option<Error> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    let kind = if t.is_file() {
        return None;
    } else if t.is_dir() {
        "directory"
    } else if t.is_fifo() {
        "FIFO"
    } else if t.is_char_device() {
        "character device"
    } else if t.is_block_device() {
        "block device"
    } else if t.is_socket() {
        "socket"
    } else {
        "special file"
    };
    Some(Error::ArtifactNotAFile {
        path: path.to_owned(),
        kind,
    })
}

/// Size and SHA-256 of the regular file at `path`. Opened with `O_NONBLOCK`, so that a
/// FIFO put there since the caller looked cannot block the open; the type is checked
/// again on the open file before anything is read.
fn digest_file(path: &Path) -> Result<(u64, String)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| missing_or_io(path, e))?;
    if let Some(e) = not_a_file(path, &file.metadata().ctx("stat", path)?) {
        return Err(e);
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf).ctx("read artifact", path)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    let digest = hasher.finalize();
    let mut hex = String::with_capacity(64);
    for b in digest {
        use fmt::Write;
        let _ = write!(hex, "{b:02x}");
    }
    Ok((size, hex))
}

/// What [`Mailbox::send`](crate::Mailbox::send) returns: where the message landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The message's id.
    pub id: Uuid,
    /// The message's seq in the mailbox.
    pub seq: u64,
    /// The mailbox name.
    pub mailbox: String,
    /// True when this send carried an idempotency key that had been used before, so no
    /// new message was written and this is the original receipt.
    pub duplicate: bool,
}

/// A message to send, built with chained setters.
///
/// ```
/// use agentbus::NewMessage;
/// let msg = NewMessage::new("review.request")
///     .from("writer")
///     .subject("chapter 3")
///     .body("please check the tone")
///     .payload(serde_json::json!({"chapter": 3}))
///     .correlation_id("book-42")
///     .idempotency_key("review-ch3-v1")
///     .header("lang", "en");
/// assert_eq!(msg.kind(), "review.request");
/// ```
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub struct NewMessage {
    pub(crate) kind: String,
    pub(crate) from: Option<String>,
    pub(crate) subject: Option<String>,
    pub(crate) body: Option<String>,
    pub(crate) payload: Option<serde_json::Value>,
    pub(crate) artifacts: Vec<Artifact>,
    pub(crate) correlation_id: Option<String>,
    pub(crate) causation_id: Option<String>,
    pub(crate) idempotency_key: Option<String>,
    pub(crate) priority: i32,
    pub(crate) headers: BTreeMap<String, String>,
}

/// The longest accepted idempotency key, correlation id or causation id, in bytes.
pub const MAX_KEY_LEN: usize = 256;

impl NewMessage {
    /// A message of type `kind` (for example `"task"`). The type follows the naming rule
    /// of [`validate_name`](crate::validate_name); it is checked when sending.
    pub fn new(kind: impl Into<String>) -> Self {
        NewMessage {
            kind: kind.into(),
            from: None,
            subject: None,
            body: None,
            payload: None,
            artifacts: Vec::new(),
            correlation_id: None,
            causation_id: None,
            idempotency_key: None,
            priority: 0,
            headers: BTreeMap::new(),
        }
    }

    /// The message type.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The sending agent; defaults to the bus's agent name.
    pub fn from(mut self, agent: impl Into<String>) -> Self {
        self.from = Some(agent.into());
        self
    }

    /// A short subject line.
    pub fn subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = Some(subject.into());
        self
    }

    /// Free text.
    pub fn body(mut self, body: impl Into<String>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Structured data.
    pub fn payload(mut self, payload: serde_json::Value) -> Self {
        self.payload = Some(payload);
        self
    }

    /// Structured data from any serializable value: the typed form of
    /// [`payload`](Self::payload). Read it back with [`Message::payload_as`].
    ///
    /// ```
    /// # fn main() -> agentbus::Result<()> {
    /// #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    /// struct Review { chapter: u32, tone: String }
    ///
    /// # let dir = tempfile::tempdir().unwrap();
    /// let bus = agentbus::Bus::init(dir.path())?;
    /// let inbox = bus.create_mailbox("reviews")?;
    /// let review = Review { chapter: 3, tone: "warm".into() };
    /// inbox.send(agentbus::NewMessage::new("review").json(&review)?)?;
    ///
    /// let got: Review = inbox.messages().next().unwrap()?.payload_as()?;
    /// assert_eq!(got, review);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::InvalidMessage`] if `value` does not serialize to JSON (a map with
    /// non-string keys, say).
    pub fn json<T: Serialize + ?Sized>(self, value: &T) -> Result<Self> {
        let value = serde_json::to_value(value)
            .map_err(|e| Error::InvalidMessage(format!("the payload does not serialize: {e}")))?;
        Ok(self.payload(value))
    }

    /// Attaches an artifact captured with [`Artifact::capture`].
    pub fn artifact(mut self, artifact: Artifact) -> Self {
        self.artifacts.push(artifact);
        self
    }

    /// Groups this message with others of the same conversation or task.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// The id of the message that caused this one.
    pub fn causation_id(mut self, id: impl Into<String>) -> Self {
        self.causation_id = Some(id.into());
        self
    }

    /// A key that makes the send idempotent: sending again with the same key to the
    /// same mailbox returns the original [`Receipt`] (with `duplicate: true`) and writes
    /// nothing.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Priority, higher is more urgent.
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    /// Adds a string header.
    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(key.into(), value.into());
        self
    }

    /// Checks the fields and builds the stored form with `seq` 0 (assigned later).
    pub(crate) fn into_message(self, default_from: &str) -> Result<Message> {
        crate::validate_name("message type", &self.kind)?;
        let from = self.from.unwrap_or_else(|| default_from.to_owned());
        crate::validate_name("agent", &from)?;
        for (what, value) in [
            ("idempotency_key", &self.idempotency_key),
            ("correlation_id", &self.correlation_id),
            ("causation_id", &self.causation_id),
        ] {
            if let Some(v) = value {
                if v.is_empty() || v.len() > MAX_KEY_LEN {
                    return Err(Error::InvalidMessage(format!(
                        "{what} must be 1 to {MAX_KEY_LEN} bytes long, got {}",
                        v.len()
                    )));
                }
            }
        }
        let ts = OffsetDateTime::now_utc();
        let unix_ms = (ts.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
        Ok(Message {
            seq: 0,
            id: crate::encode::new_id(unix_ms),
            ts,
            from,
            kind: self.kind,
            subject: self.subject,
            body: self.body,
            payload: self.payload,
            artifacts: self.artifacts,
            correlation_id: self.correlation_id,
            causation_id: self.causation_id,
            idempotency_key: self.idempotency_key,
            priority: self.priority,
            headers: self.headers,
        })
    }
}
