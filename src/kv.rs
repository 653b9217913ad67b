//! Agent state: durable key-value buckets with revisions, compare-and-set and history.
//!
//! How they are stored is the backend's: `kv/<bucket>/` in the directory (see
//! `dir/kv.rs` and FORMAT.md, "Key-value buckets"). The JetStream backend does not
//! offer them yet ([`Error::Unsupported`]).

use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;

use crate::backend::{Expect, KvImp};
use crate::report::KvEntry;
use crate::{validate_name, Bus, Error, Result};

/// The longest key accepted, in bytes.
pub const MAX_KV_KEY_LEN: usize = 256;

/// How many revisions per key a bucket keeps by default when it is compacted.
pub const DEFAULT_KV_HISTORY: u32 = 16;

/// Checks a key against the key rule: one or more tokens of ASCII letters, digits,
/// `_` and `-`, separated by `/` or `.` (no empty token: no leading, trailing or
/// doubled separator), at most [`MAX_KV_KEY_LEN`] bytes. Separated keys make
/// namespaces: [`Kv::keys`] lists the keys under a prefix such as `"phase1/"`.
///
/// ```
/// use agentbus::validate_kv_key;
/// assert!(validate_kv_key("phase1/output").is_ok());
/// assert!(validate_kv_key("agents.alice.memory-2").is_ok());
/// assert!(validate_kv_key("a//b").is_err());
/// assert!(validate_kv_key("../etc").is_err());
/// assert!(validate_kv_key("").is_err());
/// ```
///
/// # Errors
///
/// [`Error::InvalidName`] (kind `"key"`) naming the part of the rule the key breaks.
pub fn validate_kv_key(key: &str) -> Result<()> {
    let reason = if key.is_empty() {
        "must not be empty"
    } else if key.len() > MAX_KV_KEY_LEN {
        "must be at most 256 bytes"
    } else if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'/' | b'.'))
    {
        "may contain only ASCII letters, digits, '_', '-' and the separators '/' and '.'"
    } else if key.split(['/', '.']).any(str::is_empty) {
        "must not start or end with a separator or have two in a row"
    } else {
        return Ok(());
    };
    Err(Error::InvalidName {
        kind: "key",
        name: key.to_owned(),
        reason,
    })
}

/// A key-value bucket: [`Bus::kv`]. Cheap to clone.
///
/// Every write gets the next revision of the bucket: revisions strictly increase across
/// every key of the bucket, forever (never reused after a restart or a compaction), so
/// a revision can serve as a fencing token. [`update`](Kv::update) is a
/// compare-and-set on it.
#[derive(Debug, Clone)]
pub struct Kv {
    imp: Arc<KvImp>,
}

impl Bus {
    /// Creates the key-value bucket `bucket`, keeping [`DEFAULT_KV_HISTORY`] revisions
    /// per key.
    ///
    /// # Errors
    ///
    /// [`Error::BucketExists`]; [`Error::InvalidName`] (bucket names follow the rule of
    /// mailbox names); [`Error::Unsupported`] on JetStream; [`Error::Io`].
    pub fn create_kv(&self, bucket: &str) -> Result<Kv> {
        self.create_kv_with_history(bucket, DEFAULT_KV_HISTORY)
    }

    /// Creates the key-value bucket `bucket`, keeping `history` revisions per key (at
    /// least 1) when it is compacted.
    ///
    /// # Errors
    ///
    /// As [`create_kv`](Bus::create_kv).
    pub fn create_kv_with_history(&self, bucket: &str, history: u32) -> Result<Kv> {
        validate_name("bucket", bucket)?;
        self.inner.imp.create_kv(bucket, history)?;
        self.kv(bucket)
    }

    /// Opens the key-value bucket `bucket`, creating it first if it does not exist.
    ///
    /// # Errors
    ///
    /// As [`create_kv`](Bus::create_kv), but never [`Error::BucketExists`].
    pub fn create_or_open_kv(&self, bucket: &str) -> Result<Kv> {
        validate_name("bucket", bucket)?;
        match self.inner.imp.create_kv(bucket, DEFAULT_KV_HISTORY) {
            Ok(()) | Err(Error::BucketExists { .. }) => self.kv(bucket),
            Err(e) => Err(e),
        }
    }

    /// Opens the existing key-value bucket `bucket`. Creates nothing.
    ///
    /// ```
    /// # fn main() -> agentbus::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let bus = agentbus::Bus::init(dir.path())?;
    /// assert!(matches!(bus.kv("state"), Err(agentbus::Error::BucketNotFound { .. })));
    /// bus.create_kv("state")?;
    /// assert_eq!(bus.kv("state")?.bucket(), "state");
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::BucketNotFound`] listing the buckets that exist; [`Error::InvalidName`];
    /// [`Error::Unsupported`] on JetStream; [`Error::Corrupt`] for damaged metadata.
    pub fn kv(&self, bucket: &str) -> Result<Kv> {
        validate_name("bucket", bucket)?;
        match self.inner.imp.open_kv(bucket)? {
            Some(imp) => Ok(Kv { imp: Arc::new(imp) }),
            None => Err(Error::BucketNotFound {
                bucket: bucket.to_owned(),
                existing: self.kv_buckets().unwrap_or_default(),
            }),
        }
    }

    /// The names of all key-value buckets, sorted.
    ///
    /// # Errors
    ///
    /// [`Error::Io`]; [`Error::Unsupported`] on JetStream.
    pub fn kv_buckets(&self) -> Result<Vec<String>> {
        self.inner.imp.kv_names()
    }
}

impl Kv {
    /// The bucket's name.
    pub fn bucket(&self) -> &str {
        self.imp.bucket()
    }

    /// How many revisions per key [`compact`](Kv::compact) keeps.
    pub fn history_depth(&self) -> u32 {
        self.imp.history_depth()
    }

    /// The key's current value; `None` if it was never set or is deleted.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] for a key that breaks [the key rule](validate_kv_key);
    /// [`Error::Corrupt`]; [`Error::Io`].
    pub fn get(&self, key: &str) -> Result<Option<KvEntry>> {
        validate_kv_key(key)?;
        self.imp.get(key)
    }

    /// Sets the key, whatever it holds: the new revision.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`]; [`Error::RecordTooLarge`] for a value over the bus's
    /// record limit; [`Error::Io`].
    pub fn put(&self, key: &str, value: Value) -> Result<u64> {
        self.write(key, Some(&value), Expect::Any)
    }

    /// Sets the key to `value` serialized as JSON: the new revision.
    ///
    /// # Errors
    ///
    /// As [`put`](Kv::put); [`Error::InvalidMessage`] if `value` does not serialize.
    pub fn put_json<T: Serialize + ?Sized>(&self, key: &str, value: &T) -> Result<u64> {
        self.put(key, to_value(value)?)
    }

    /// Sets the key only if it is absent (never set, or deleted): the new revision.
    ///
    /// # Errors
    ///
    /// [`Error::KvConflict`] (with `expected_revision: None`) carrying the current
    /// revision and value if the key has one; as [`put`](Kv::put).
    pub fn create(&self, key: &str, value: Value) -> Result<u64> {
        self.write(key, Some(&value), Expect::Absent)
    }

    /// Sets the key only if its current value is at `expected_revision`: a
    /// compare-and-set. Returns the new revision.
    ///
    /// ```
    /// # fn main() -> agentbus::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use serde_json::json;
    /// let bus = agentbus::Bus::init(dir.path())?;
    /// let kv = bus.create_kv("state")?;
    /// let first = kv.create("counter", json!(0))?;
    /// let second = kv.update("counter", json!(1), first)?;
    /// match kv.update("counter", json!(99), first) {
    ///     Err(agentbus::Error::KvConflict { current_revision, current_value, .. }) => {
    ///         assert_eq!(current_revision, Some(second));
    ///         assert_eq!(current_value, Some(json!(1)));
    ///     }
    ///     other => panic!("expected a conflict, got {other:?}"),
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::KvConflict`] carrying the current revision and value (`None` if the
    /// key is absent or deleted); as [`put`](Kv::put).
    pub fn update(&self, key: &str, value: Value, expected_revision: u64) -> Result<u64> {
        self.write(key, Some(&value), Expect::Revision(expected_revision))
    }

    /// Deletes the key: a tombstone with its own revision, which
    /// [`history`](Kv::history) keeps. `None` if the key was absent (nothing written).
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`]; [`Error::Io`].
    pub fn delete(&self, key: &str) -> Result<Option<u64>> {
        validate_kv_key(key)?;
        self.imp.write(key, None, Expect::Any)
    }

    /// The keys with a current value that start with `prefix` (`""`: all), sorted.
    ///
    /// # Errors
    ///
    /// [`Error::Corrupt`]; [`Error::Io`].
    pub fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        self.imp.keys(prefix)
    }

    /// Every stored revision of the key, oldest first, deletions included (as entries
    /// with `deleted: true`). A compaction keeps the last
    /// [`history_depth`](Kv::history_depth) of them.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`]; [`Error::Corrupt`]; [`Error::Io`].
    pub fn history(&self, key: &str) -> Result<Vec<KvEntry>> {
        validate_kv_key(key)?;
        self.imp.history(key)
    }

    /// Drops all but the last [`history_depth`](Kv::history_depth) revisions of each
    /// key (writes do this by themselves once the log has grown to twice that):
    /// how many revisions were removed. The latest revision of every key, deletions
    /// included, is always kept, so revisions never go back.
    ///
    /// # Errors
    ///
    /// [`Error::Io`].
    pub fn compact(&self) -> Result<u64> {
        self.imp.compact()
    }

    fn write(&self, key: &str, value: Option<&Value>, expect: Expect) -> Result<u64> {
        validate_kv_key(key)?;
        let written = self.imp.write(key, value, expect)?;
        Ok(written.expect("a put always writes a revision"))
    }
}

fn to_value<T: Serialize + ?Sized>(value: &T) -> Result<Value> {
    serde_json::to_value(value)
        .map_err(|e| Error::InvalidMessage(format!("cannot serialize the value: {e}")))
}
