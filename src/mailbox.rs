//! Mailboxes: append-only logs of messages.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::bus::{BusInner, FORMAT_VERSION};
use crate::error::IoContext;
use crate::log::{self, Line, RecordHead};
use crate::read::Messages;
use crate::{fsutil, record, Error, NewMessage, Receipt, Result};

/// `mailbox.json`: settings fixed when the mailbox is created.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct MailboxMeta {
    pub(crate) format: u64,
    pub(crate) segment_bytes: u64,
}

/// A named, append-only log of messages. Cheap to clone; `Send + Sync`.
///
/// Any number of threads and processes may send to one mailbox at once: each append
/// holds an exclusive `flock` on the mailbox's `lock` file and writes the whole record
/// with one `write()`, so records never interleave and `seq` is contiguous.
///
/// ```
/// # fn main() -> agentbus::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// use agentbus::{Bus, NewMessage};
/// let bus = Bus::init(dir.path())?;
/// let tasks = bus.create_mailbox("project.tasks")?;
/// tasks.send(NewMessage::new("task").from("planner").body("write chapter 1"))?;
/// tasks.send(NewMessage::new("note").from("planner").body("chapter 1 is urgent"))?;
///
/// let task_bodies: Vec<String> = tasks
///     .messages()
///     .of_type("task")
///     .map(|m| m.map(|m| m.body.unwrap_or_default()))
///     .collect::<agentbus::Result<_>>()?;
/// assert_eq!(task_bodies, ["write chapter 1"]);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Mailbox {
    inner: Arc<MailboxInner>,
}

#[derive(Debug)]
struct MailboxInner {
    bus: Arc<BusInner>,
    name: String,
    dir: PathBuf,
    log_dir: PathBuf,
    keys_dir: PathBuf,
    segment_bytes: u64,
    writer: Mutex<Writer>,
}

/// Per-handle append state. Everything here is a cache of what is on disk, checked
/// against the file size under the lock before each append.
#[derive(Debug)]
struct Writer {
    lock_path: PathBuf,
    lock: File,
    tail: Option<Tail>,
    buf: Vec<u8>,
}

#[derive(Debug)]
struct Tail {
    first: u64,
    path: PathBuf,
    file: File,
    /// The file length we last saw (after our own appends).
    len: u64,
    next_seq: u64,
}

/// A message serialized outside the lock, waiting for its `seq`.
struct Prepared {
    id: Uuid,
    key: Option<String>,
    /// The JSON object without `{"seq":0,`: the rest of the members and the closing `}`.
    tail: Vec<u8>,
}

const SEQ0_PREFIX: &[u8] = b"{\"seq\":0,";

impl Mailbox {
    pub(crate) fn open(
        bus: Arc<BusInner>,
        name: &str,
        existing: impl FnOnce() -> Result<Vec<String>>,
    ) -> Result<Mailbox> {
        let dir = bus.mailboxes_dir().join(name);
        match std::fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(Error::io(
                    "open mailbox",
                    &dir,
                    io::Error::other("not a directory (symlinks are not followed)"),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(Error::MailboxNotFound {
                    name: name.to_owned(),
                    existing: existing()?,
                })
            }
            Err(e) => return Err(Error::io("open mailbox", dir, e)),
        }
        let meta_path = dir.join("mailbox.json");
        let file = fsutil::open_read(&meta_path).ctx("open", &meta_path)?;
        let meta: MailboxMeta =
            serde_json::from_reader(io::BufReader::new(file)).map_err(|e| Error::Corrupt {
                path: meta_path.clone(),
                line: 1,
                reason: format!("not valid mailbox metadata: {e}"),
            })?;
        if meta.format != FORMAT_VERSION {
            return Err(Error::UnsupportedFormat {
                path: meta_path,
                found: meta.format,
                supported: FORMAT_VERSION,
            });
        }
        let lock_path = dir.join("lock");
        let lock = fsutil::open_lock(&lock_path, bus.opts.file_mode)?;
        Ok(Mailbox {
            inner: Arc::new(MailboxInner {
                name: name.to_owned(),
                log_dir: dir.join("log"),
                keys_dir: dir.join("keys"),
                dir,
                segment_bytes: meta.segment_bytes.max(1),
                writer: Mutex::new(Writer {
                    lock_path,
                    lock,
                    tail: None,
                    buf: Vec::new(),
                }),
                bus,
            }),
        })
    }

    pub(crate) fn bus(&self) -> &Arc<BusInner> {
        &self.inner.bus
    }

    /// The seq of the newest complete message, 0 for an empty mailbox. Reads only the
    /// end of the newest segment.
    ///
    /// # Errors
    ///
    /// [`Error::Corrupt`] if the last record is damaged; [`Error::Io`].
    pub fn last_seq(&self) -> Result<u64> {
        let log_dir = &self.inner.log_dir;
        for first in log::list_segments(log_dir)?.into_iter().rev() {
            let path = log_dir.join(log::segment_name(first));
            let file = match fsutil::open_read(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("open", path, e)),
            };
            let size = file.metadata().ctx("stat", &path)?.len();
            let limit = self.inner.bus.opts.max_record_bytes;
            let tail = log::read_tail(&file, &path, size, limit)?;
            return Ok(tail.last.map_or(first.saturating_sub(1), |r| r.seq));
        }
        Ok(0)
    }

    /// The mailbox name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The mailbox directory.
    pub fn path(&self) -> &Path {
        &self.inner.dir
    }

    /// Appends one message and returns its receipt once it is durable (see
    /// [`Durability`](crate::Durability)).
    ///
    /// With an [idempotency key](NewMessage::idempotency_key) that this mailbox has seen
    /// before, nothing is written and the original receipt comes back with
    /// `duplicate: true`.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] or [`Error::InvalidMessage`] for bad fields,
    /// [`Error::RecordTooLarge`] over the record limit (nothing written),
    /// [`Error::Corrupt`] if the last record of the log is damaged (run `doctor`),
    /// [`Error::Io`] if the append or the sync fails. A failed sync is reported, never
    /// retried: the record may or may not be on disk.
    pub fn send(&self, message: NewMessage) -> Result<Receipt> {
        let prepared = [self.prepare(message)?];
        let mut receipts = self.append(&prepared)?;
        Ok(receipts.pop().expect("one receipt per message"))
    }

    /// Appends several messages under one lock, with one `write()` and one sync. The
    /// batch is all or nothing: if any message is invalid or too large, none is written.
    ///
    /// ```
    /// # fn main() -> agentbus::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let bus = agentbus::Bus::init(dir.path())?;
    /// # let mb = bus.create_mailbox("jobs")?;
    /// use agentbus::NewMessage;
    /// let receipts = mb.send_batch((0..3).map(|i| NewMessage::new("job").body(i.to_string())))?;
    /// assert_eq!(receipts.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`send`](Self::send).
    pub fn send_batch(
        &self,
        messages: impl IntoIterator<Item = NewMessage>,
    ) -> Result<Vec<Receipt>> {
        let prepared = messages
            .into_iter()
            .map(|m| self.prepare(m))
            .collect::<Result<Vec<_>>>()?;
        if prepared.is_empty() {
            return Ok(Vec::new());
        }
        self.append(&prepared)
    }

    /// Reads the mailbox from the start, without changing any state. Narrow it with the
    /// methods of [`Messages`].
    pub fn messages(&self) -> Messages {
        Messages::new(
            self.inner.log_dir.clone(),
            self.inner.bus.opts.max_record_bytes,
        )
    }

    /// Runs `f` while holding this mailbox's append lock (in-process mutex and `flock`),
    /// so no writer can append meanwhile. The cached tail is dropped afterwards, since
    /// `f` may have changed the files.
    pub(crate) fn with_append_lock<R>(&self, f: impl FnOnce() -> R) -> Result<R> {
        let mut guard = self.lock_writer();
        let w = &mut *guard;
        w.lock.lock().ctx("lock", &w.lock_path)?;
        let _unlock = Unlock(&w.lock);
        let result = f();
        w.tail = None;
        Ok(result)
    }

    /// Validates and serializes a message; no lock is held.
    fn prepare(&self, message: NewMessage) -> Result<Prepared> {
        let message = message.into_message(&self.inner.bus.opts.agent)?;
        let json = serde_json::to_vec(&message)
            .map_err(|e| Error::InvalidMessage(format!("cannot serialize: {e}")))?;
        debug_assert!(json.starts_with(SEQ0_PREFIX));
        let limit = self.inner.bus.opts.max_record_bytes;
        let size = record::encoded_len(u64::MAX, json.len() - SEQ0_PREFIX.len());
        if size > limit {
            return Err(Error::RecordTooLarge {
                size: size as u64,
                limit: limit as u64,
            });
        }
        Ok(Prepared {
            id: message.id,
            key: message.idempotency_key,
            tail: json[SEQ0_PREFIX.len()..].to_vec(),
        })
    }

    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        self.inner.writer.lock().unwrap_or_else(|poisoned| {
            // A panic mid-append: forget the cached tail, the next append re-reads it.
            let mut w = poisoned.into_inner();
            w.tail = None;
            w
        })
    }

    fn append(&self, batch: &[Prepared]) -> Result<Vec<Receipt>> {
        let inner = &*self.inner;
        let opts = &inner.bus.opts;
        let mut guard = self.lock_writer();
        let w = &mut *guard;
        w.lock.lock().ctx("lock", &w.lock_path)?;
        let _unlock = Unlock(&w.lock);

        let tail = self.sync_tail(&mut w.tail)?;
        let keys = KeyIndex {
            dir: &inner.keys_dir,
            mode: opts.file_mode,
            sync: opts.sync(),
        };

        w.buf.clear();
        let mut receipts: Vec<Receipt> = Vec::with_capacity(batch.len());
        let mut new_keys: HashMap<&str, usize> = HashMap::new();
        let mut seq = tail.next_seq;
        for p in batch {
            if let Some(key) = p.key.as_deref() {
                if let Some(&i) = new_keys.get(key) {
                    let original = Receipt {
                        duplicate: true,
                        ..receipts[i].clone()
                    };
                    receipts.push(original);
                    continue;
                }
                if let Some((seq, id)) = keys.lookup(key)? {
                    receipts.push(self.receipt(id, seq, true));
                    continue;
                }
                new_keys.insert(key, receipts.len());
            }
            record::encode_line(seq, &p.tail, &mut w.buf);
            receipts.push(self.receipt(p.id, seq, false));
            seq += 1;
        }
        if w.buf.is_empty() {
            return Ok(receipts);
        }

        let written = (&tail.file).write_all(&w.buf);
        if let Err(e) = written {
            // Remove whatever part of the batch reached the file, so no torn record is
            // left behind; if even that fails, the next writer repairs it.
            let err = Error::io("append", &tail.path, e);
            if tail.file.set_len(tail.len).is_err() {
                w.tail = None;
            }
            return Err(err);
        }
        if opts.sync() {
            if let Err(e) = tail.file.sync_data() {
                let err = Error::io("fdatasync", &tail.path, e);
                w.tail = None;
                return Err(err);
            }
        }
        tail.len += w.buf.len() as u64;
        tail.next_seq = seq;

        // The messages are in the log. Index their keys; should that fail, the messages
        // still stand (reporting an error would invite a duplicate retry), and dropping
        // the cached tail makes the next writer re-check and re-index the last record.
        for (key, &i) in &new_keys {
            if keys.insert(key, receipts[i].seq, receipts[i].id).is_err() {
                w.tail = None;
                break;
            }
        }
        Ok(receipts)
    }

    fn receipt(&self, id: Uuid, seq: u64, duplicate: bool) -> Receipt {
        Receipt {
            id,
            seq,
            mailbox: self.inner.name.clone(),
            duplicate,
        }
    }

    /// Brings the cached tail up to date with the file system. Called with the lock
    /// held; repairs a torn final line left by a writer that crashed mid-append.
    fn sync_tail<'t>(&self, cached: &'t mut Option<Tail>) -> Result<&'t mut Tail> {
        let inner = &*self.inner;
        let opts = &inner.bus.opts;
        let mut tail = match cached.take() {
            Some(t) => t,
            None => {
                let first = log::list_segments(&inner.log_dir)?
                    .last()
                    .copied()
                    .unwrap_or(1);
                self.open_segment(first, u64::MAX)?
            }
        };
        loop {
            let size = tail.file.metadata().ctx("stat", &tail.path)?.len();
            if size != tail.len {
                let info = log::read_tail(&tail.file, &tail.path, size, opts.max_record_bytes)?;
                if info.complete_len < size {
                    tail.file
                        .set_len(info.complete_len)
                        .ctx("truncate torn tail", &tail.path)?;
                    if opts.sync() {
                        tail.file.sync_data().ctx("fdatasync", &tail.path)?;
                    }
                }
                tail.len = info.complete_len;
                tail.next_seq = info.last.as_ref().map_or(tail.first, |r| r.seq + 1);
                if let Some(last) = info.last {
                    self.reindex(&last)?;
                }
            }
            if tail.len < inner.segment_bytes {
                return Ok(cached.insert(tail));
            }
            // Full: move on to the segment named after the next seq (another writer may
            // have created it and written to it already).
            let created = !inner
                .log_dir
                .join(log::segment_name(tail.next_seq))
                .exists();
            tail = self.open_segment(tail.next_seq, u64::MAX)?;
            if created && opts.sync() {
                fsutil::sync_dir(&inner.log_dir)?;
            }
        }
    }

    fn open_segment(&self, first: u64, len: u64) -> Result<Tail> {
        let path = self.inner.log_dir.join(log::segment_name(first));
        let file = fsutil::open_append(&path, self.inner.bus.opts.file_mode)?;
        Ok(Tail {
            first,
            path,
            file,
            len,
            next_seq: first,
        })
    }

    /// Makes sure the key of the last record (written by a writer that may have died
    /// before indexing it) is in the index.
    fn reindex(&self, last: &RecordHead) -> Result<()> {
        let (Some(key), Some(id)) = (last.idempotency_key.as_deref(), last.id) else {
            return Ok(());
        };
        let keys = KeyIndex {
            dir: &self.inner.keys_dir,
            mode: self.inner.bus.opts.file_mode,
            sync: self.inner.bus.opts.sync(),
        };
        if keys.lookup(key)?.is_none() {
            keys.insert(key, last.seq, id)?;
        }
        Ok(())
    }
}

pub(crate) struct Unlock<'a>(pub(crate) &'a File);

impl Drop for Unlock<'_> {
    fn drop(&mut self) {
        let _ = self.0.unlock();
    }
}

/// The idempotency index: `keys/<hh>.jsonl`, 256 buckets by CRC-32C of the key, each
/// line `{"crc":..,"seq":N,"key":K,"id":U}`. Only touched under the mailbox lock.
struct KeyIndex<'a> {
    dir: &'a Path,
    mode: u32,
    sync: bool,
}

#[derive(Serialize, Deserialize)]
struct KeyEntry<'a> {
    seq: u64,
    #[serde(borrow)]
    key: std::borrow::Cow<'a, str>,
    id: Uuid,
}

impl KeyIndex<'_> {
    fn bucket(&self, key: &str) -> PathBuf {
        self.dir.join(format!(
            "{:02x}.jsonl",
            crc32c::crc32c(key.as_bytes()) & 0xff
        ))
    }

    fn lookup(&self, key: &str) -> Result<Option<(u64, Uuid)>> {
        let path = self.bucket(key);
        let file = match fsutil::open_read(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("open", path, e)),
        };
        let mut reader = log::LineReader::new(0, 64 * 1024);
        let mut line_no = 0;
        loop {
            match reader.next(&file).ctx("read", &path)? {
                Line::Complete { start, end, .. } => {
                    line_no += 1;
                    let entry: KeyEntry<'_> =
                        log::decode(reader.bytes(start, end), &path, line_no)?;
                    if entry.key == key {
                        return Ok(Some((entry.seq, entry.id)));
                    }
                }
                Line::TooLong { .. } => line_no += 1,
                Line::Partial { .. } | Line::Eof => return Ok(None),
            }
        }
    }

    fn insert(&self, key: &str, seq: u64, id: Uuid) -> Result<()> {
        let path = self.bucket(key);
        let created = !path.exists();
        let file = fsutil::open_append(&path, self.mode)?;
        // A torn line left by a crash would glue onto ours: cut it first.
        let size = file.metadata().ctx("stat", &path)?.len();
        if size > 0 {
            let info = log::read_tail(&file, &path, size, 64 * 1024).unwrap_or(log::TailInfo {
                complete_len: size,
                last: None,
            });
            if info.complete_len < size {
                file.set_len(info.complete_len).ctx("truncate", &path)?;
            }
        }
        let entry = KeyEntry {
            seq: 0,
            key: key.into(),
            id,
        };
        let json = serde_json::to_vec(&entry).expect("key entry serializes");
        let mut line = Vec::with_capacity(json.len() + 32);
        record::encode_line(seq, &json[SEQ0_PREFIX.len()..], &mut line);
        (&file).write_all(&line).ctx("append", &path)?;
        if self.sync {
            file.sync_data().ctx("fdatasync", &path)?;
            if created {
                fsutil::sync_dir(self.dir)?;
            }
        }
        Ok(())
    }
}
