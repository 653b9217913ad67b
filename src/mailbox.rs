//! Mailboxes: append-only logs of messages.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::bus::{BusInner, FORMAT_VERSION};
use crate::error::IoContext;
use crate::fsutil::Flock;
use crate::log::{self, Line};
use crate::read::Messages;
use crate::{fsutil, record, Error, NewMessage, Receipt, Result};

/// `mailbox.json`: settings fixed when the mailbox is created.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct MailboxMeta {
    pub(crate) format: u64,
    pub(crate) segment_bytes: u64,
    #[serde(default = "default_max_record")]
    pub(crate) max_record_bytes: usize,
}

fn default_max_record() -> usize {
    crate::DEFAULT_MAX_RECORD_BYTES
}

/// What a reader needs to know about a mailbox's log.
#[derive(Debug, Clone)]
pub(crate) struct LogSpec {
    pub(crate) dir: PathBuf,
    pub(crate) limit: usize,
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
    imp: Imp,
}

/// Where a mailbox lives: the storage seam. Every public method of [`Mailbox`] picks
/// its backend here; the directory's private helpers below only ever see `Dir`.
#[derive(Debug, Clone)]
enum Imp {
    Dir(Arc<MailboxInner>),
    #[cfg(feature = "nats")]
    Nats(Arc<NatsMailbox>),
}

/// A mailbox on NATS JetStream: a stream with one subject.
#[cfg(feature = "nats")]
#[derive(Debug)]
pub(crate) struct NatsMailbox {
    pub(crate) bus: Arc<BusInner>,
    pub(crate) nats: Arc<crate::nats::NatsBus>,
    pub(crate) name: String,
    /// `<url>/<name>`, for [`Mailbox::path`] and error messages.
    path: PathBuf,
    max_record_bytes: usize,
}

#[derive(Debug)]
struct MailboxInner {
    bus: Arc<BusInner>,
    name: String,
    dir: PathBuf,
    log_dir: PathBuf,
    keys_dir: PathBuf,
    segment_bytes: u64,
    max_record_bytes: usize,
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
    /// Every keyed record up to this seq is in the key index (`None`: unknown, read
    /// `keys/scanned`).
    indexed: Option<u64>,
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
            imp: Imp::Dir(Arc::new(MailboxInner {
                name: name.to_owned(),
                log_dir: dir.join("log"),
                keys_dir: dir.join("keys"),
                dir,
                segment_bytes: meta.segment_bytes.max(1),
                max_record_bytes: meta.max_record_bytes.max(256),
                writer: Mutex::new(Writer {
                    lock_path,
                    lock,
                    tail: None,
                    buf: Vec::new(),
                    indexed: None,
                }),
                bus,
            })),
        })
    }

    /// Opens the mailbox `name` of a bus on NATS.
    #[cfg(feature = "nats")]
    pub(crate) fn open_nats(
        bus: Arc<BusInner>,
        nats: Arc<crate::nats::NatsBus>,
        name: &str,
        existing: impl FnOnce() -> Result<Vec<String>>,
    ) -> Result<Mailbox> {
        let Some(limit) = nats.stream_limit(name)? else {
            return Err(Error::MailboxNotFound {
                name: name.to_owned(),
                existing: existing()?,
            });
        };
        Ok(Mailbox {
            imp: Imp::Nats(Arc::new(NatsMailbox {
                path: PathBuf::from(format!("{}/{name}", nats.url())),
                max_record_bytes: if limit == 0 { usize::MAX } else { limit },
                name: name.to_owned(),
                nats,
                bus,
            })),
        })
    }

    /// The directory mailbox. Only reached from the directory's own code paths: every
    /// public entry point has already dispatched a NATS mailbox to its backend.
    fn inner(&self) -> &MailboxInner {
        match &self.imp {
            Imp::Dir(inner) => inner,
            #[cfg(feature = "nats")]
            Imp::Nats(m) => unreachable!("directory operation on NATS mailbox {}", m.name),
        }
    }

    /// The NATS side of this mailbox, if it lives there.
    #[cfg(feature = "nats")]
    pub(crate) fn remote(&self) -> Option<&Arc<NatsMailbox>> {
        match &self.imp {
            Imp::Nats(m) => Some(m),
            Imp::Dir(_) => None,
        }
    }

    pub(crate) fn bus(&self) -> &Arc<BusInner> {
        match &self.imp {
            Imp::Dir(inner) => &inner.bus,
            #[cfg(feature = "nats")]
            Imp::Nats(m) => &m.bus,
        }
    }

    pub(crate) fn log_spec(&self) -> LogSpec {
        LogSpec {
            dir: self.inner().log_dir.clone(),
            limit: self.inner().max_record_bytes,
            segment_bytes: self.inner().segment_bytes,
        }
    }

    /// The largest record this mailbox accepts, newline included (fixed when it was
    /// created).
    pub fn max_record_bytes(&self) -> usize {
        match &self.imp {
            Imp::Dir(inner) => inner.max_record_bytes,
            #[cfg(feature = "nats")]
            Imp::Nats(m) => m.max_record_bytes,
        }
    }

    /// The seq of the oldest message still stored (compaction removes older ones).
    ///
    /// # Errors
    ///
    /// [`Error::Io`].
    pub fn first_seq(&self) -> Result<u64> {
        #[cfg(feature = "nats")]
        if let Some(m) = self.remote() {
            return Ok(m.nats.bounds(&m.name)?.0);
        }
        Ok(log::list_segments(&self.inner().log_dir)?
            .first()
            .copied()
            .unwrap_or(1))
    }

    /// The seq of the newest complete message, 0 for an empty mailbox. Reads only the
    /// end of the newest segment.
    ///
    /// # Errors
    ///
    /// [`Error::Corrupt`] if the last record is damaged; [`Error::Io`].
    pub fn last_seq(&self) -> Result<u64> {
        #[cfg(feature = "nats")]
        if let Some(m) = self.remote() {
            return Ok(m.nats.bounds(&m.name)?.1);
        }
        let log_dir = &self.inner().log_dir;
        for first in log::list_segments(log_dir)?.into_iter().rev() {
            let path = log_dir.join(log::segment_name(first));
            let file = match fsutil::open_read(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io("open", path, e)),
            };
            let size = file.metadata().ctx("stat", &path)?.len();
            let limit = self.inner().max_record_bytes;
            let tail = log::read_tail(&file, &path, size, limit)?;
            return Ok(tail.last.map_or(first.saturating_sub(1), |r| r.seq));
        }
        Ok(0)
    }

    /// The mailbox name.
    pub fn name(&self) -> &str {
        match &self.imp {
            Imp::Dir(inner) => &inner.name,
            #[cfg(feature = "nats")]
            Imp::Nats(m) => &m.name,
        }
    }

    /// The mailbox directory (on NATS: `<url>/<name>`, which names it in messages).
    pub fn path(&self) -> &Path {
        match &self.imp {
            Imp::Dir(inner) => &inner.dir,
            #[cfg(feature = "nats")]
            Imp::Nats(m) => &m.path,
        }
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
        #[cfg(feature = "nats")]
        if let Some(m) = self.remote() {
            return Ok(m.publish(prepared)?.pop().expect("one receipt per message"));
        }
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
        #[cfg(feature = "nats")]
        if let Some(m) = self.remote() {
            return m.publish(prepared);
        }
        self.append(&prepared)
    }

    /// Reads the mailbox from the start, without changing any state. Narrow it with the
    /// methods of [`Messages`].
    pub fn messages(&self) -> Messages {
        #[cfg(feature = "nats")]
        if let Some(m) = self.remote() {
            return Messages::remote(m.clone());
        }
        Messages::new(self.log_spec())
    }

    /// The receipt of the message sent with idempotency `key`, if any (the index is
    /// brought up to date first, as for a keyed send).
    pub(crate) fn find_key(&self, key: &str) -> Result<Option<(u64, Uuid)>> {
        #[cfg(feature = "nats")]
        if self.remote().is_some() {
            // JetStream answers a duplicate `Nats-Msg-Id` only on publish: look for it.
            for m in self.messages() {
                let m = m?;
                if m.idempotency_key.as_deref() == Some(key) {
                    return Ok(Some((m.seq, m.id)));
                }
            }
            return Ok(None);
        }
        let mut guard = self.lock_writer();
        let w = &mut *guard;
        let _flock = Flock::exclusive(&w.lock, &w.lock_path)?;
        let last = self.sync_tail(&mut w.tail)?.next_seq - 1;
        let keys = self.key_index();
        self.index_keys_through(&keys, &mut w.indexed, last)?;
        keys.lookup(key)
    }

    fn key_index(&self) -> KeyIndex<'_> {
        let opts = &self.inner().bus.opts;
        KeyIndex {
            dir: &self.inner().keys_dir,
            mode: opts.file_mode,
            sync: opts.sync(),
        }
    }

    /// Indexes the keys of records up to `last` that no writer indexed (it died in
    /// between, or it does not index: an outside writer). Called with the lock held.
    fn index_keys_through(
        &self,
        keys: &KeyIndex<'_>,
        indexed: &mut Option<u64>,
        last: u64,
    ) -> Result<()> {
        let from = indexed.unwrap_or_else(|| keys.scanned());
        if from < last {
            keys.catch_up(&self.log_spec(), from, last)?;
        }
        *indexed = Some(last);
        Ok(())
    }

    /// Runs `f` while holding this mailbox's append lock (in-process mutex and `flock`),
    /// so no writer can append meanwhile. The cached tail is dropped afterwards, since
    /// `f` may have changed the files.
    pub(crate) fn with_append_lock<R>(&self, f: impl FnOnce() -> R) -> Result<R> {
        let mut guard = self.lock_writer();
        let w = &mut *guard;
        let _flock = Flock::exclusive(&w.lock, &w.lock_path)?;
        let result = f();
        w.tail = None;
        Ok(result)
    }

    /// Validates and serializes a message; no lock is held.
    fn prepare(&self, message: NewMessage) -> Result<Prepared> {
        let message = message.into_message(&self.bus().opts.agent)?;
        let mut tail = Vec::with_capacity(256 + message.body.as_ref().map_or(0, String::len));
        crate::encode::encode_tail(&message, &mut tail)
            .map_err(|e| Error::InvalidMessage(format!("cannot encode the message: {e}")))?;
        let limit = self.max_record_bytes();
        let size = record::encoded_len(u64::MAX, tail.len());
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

    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        self.inner().writer.lock().unwrap_or_else(|poisoned| {
            // A panic mid-append: forget the cached tail, the next append re-reads it.
            let mut w = poisoned.into_inner();
            w.tail = None;
            w
        })
    }

    fn append(&self, batch: &[Prepared]) -> Result<Vec<Receipt>> {
        let inner = self.inner();
        let opts = &inner.bus.opts;
        let mut guard = self.lock_writer();
        let w = &mut *guard;
        let _flock = Flock::exclusive(&w.lock, &w.lock_path)?;

        let tail = self.sync_tail(&mut w.tail)?;
        let keys = self.key_index();
        let last = tail.next_seq - 1;
        let keyed = batch.iter().any(|p| p.key.is_some());
        if keyed {
            self.index_keys_through(&keys, &mut w.indexed, last)?;
        }

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

        // One write() in the normal case; more only if the kernel takes part of it
        // (which happens on errors such as a full disk).
        let mut written = 0;
        let failure = loop {
            match (&tail.file).write(&w.buf[written..]) {
                Ok(0) => break Some(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) if written + n == w.buf.len() => break None,
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Some(e),
            }
        };
        let mut committed = w.buf.len();
        if let Some(e) = &failure {
            // Keep the records that reached the file whole (a reader may have seen them
            // already); cut only the incomplete one.
            committed = memchr::memrchr(b'\n', &w.buf[..written]).map_or(0, |i| i + 1);
            if tail.file.set_len(tail.len + committed as u64).is_err() {
                let err = Error::io("append", &tail.path, clone_io(e));
                w.tail = None;
                w.indexed = None;
                return Err(err);
            }
        }
        if committed > 0 && opts.sync() {
            if let Err(e) = tail.file.sync_data() {
                let err = Error::io("fdatasync", &tail.path, e);
                w.tail = None;
                w.indexed = None;
                return Err(err);
            }
        }
        let count = memchr::memchr_iter(b'\n', &w.buf[..committed]).count() as u64;
        tail.len += committed as u64;
        tail.next_seq += count;
        let new_last = tail.next_seq - 1;
        let stored = |r: &Receipt| !r.duplicate && r.seq <= new_last;

        // The messages are in the log; index their keys. Should that fail, the messages
        // still stand (an error would invite a duplicating retry): the watermark stays
        // behind, and the next keyed send indexes them from the log.
        let mut indexed = true;
        for (key, &i) in &new_keys {
            let r = &receipts[i];
            if stored(r) && keys.insert(key, r.seq, r.id).is_err() {
                indexed = false;
                break;
            }
        }
        if w.indexed == Some(last) && indexed {
            w.indexed = Some(new_last);
            if keyed {
                keys.set_scanned(new_last);
            }
        } else {
            w.indexed = None;
        }

        match failure {
            None => Ok(receipts),
            Some(source) => {
                let path = tail.path.clone();
                let committed: Vec<Receipt> = receipts.into_iter().filter(stored).collect();
                if committed.is_empty() {
                    Err(Error::io("append", path, source))
                } else {
                    Err(Error::BatchIncomplete {
                        path,
                        committed,
                        source,
                    })
                }
            }
        }
    }

    fn receipt(&self, id: Uuid, seq: u64, duplicate: bool) -> Receipt {
        Receipt {
            id,
            seq,
            mailbox: self.inner().name.clone(),
            duplicate,
        }
    }

    /// Brings the cached tail up to date with the file system. Called with the lock
    /// held; repairs a torn final line left by a writer that crashed mid-append.
    fn sync_tail<'t>(&self, cached: &'t mut Option<Tail>) -> Result<&'t mut Tail> {
        let inner = self.inner();
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
            let size = file_len(&tail.file).ctx("stat", &tail.path)?;
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
            }
            if tail.len < inner.segment_bytes {
                return Ok(cached.insert(tail));
            }
            // Full: move on to the segment named after the next seq (another writer may
            // have created it and written to it already).
            tail = self.open_segment(tail.next_seq, u64::MAX)?;
        }
    }

    /// Opens a segment for appending. Under `Sync`, also fsyncs the log directory: the
    /// segment may have been created by a writer that died before doing so, and records
    /// in a file whose directory entry is not durable are not durable either. This
    /// happens once per segment per handle.
    fn open_segment(&self, first: u64, len: u64) -> Result<Tail> {
        let path = self.inner().log_dir.join(log::segment_name(first));
        let file = fsutil::open_append(&path, self.inner().bus.opts.file_mode)?;
        if self.inner().bus.opts.sync() {
            fsutil::sync_dir(&self.inner().log_dir)?;
        }
        Ok(Tail {
            first,
            path,
            file,
            len,
            next_seq: first,
        })
    }
}

/// The file's length. `lseek(SEEK_END)` is cheaper than `fstat` (which fills a whole
/// `statx`), and the send path asks once per append. Moving the file offset is harmless:
/// appends use `O_APPEND` and every read is positional.
fn file_len(mut file: &File) -> io::Result<u64> {
    file.seek(io::SeekFrom::End(0))
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

fn clone_io(e: &io::Error) -> io::Error {
    io::Error::new(e.kind(), e.to_string())
}

impl KeyIndex<'_> {
    fn scanned_path(&self) -> PathBuf {
        self.dir.join("scanned")
    }

    /// The watermark: every keyed record up to this seq is indexed. 0 when unknown,
    /// which only costs a longer scan.
    fn scanned(&self) -> u64 {
        let mut buf = [0u8; 21];
        fsutil::open_read(&self.scanned_path())
            .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, 0))
            .ok()
            .and_then(|()| std::str::from_utf8(&buf[..20]).ok()?.parse().ok())
            .unwrap_or(0)
    }

    /// Moves the watermark. Not synced: a watermark lost to a power cut only makes the
    /// next keyed send scan a little more.
    fn set_scanned(&self, seq: u64) {
        let path = self.scanned_path();
        if let Ok(f) = fsutil::open_lock(&path, self.mode) {
            let line = format!("{seq:020}\n");
            let _ = std::os::unix::fs::FileExt::write_all_at(&f, line.as_bytes(), 0);
        }
    }

    /// Indexes the keyed records with seqs in `(from, to]` that are not indexed yet.
    fn catch_up(&self, spec: &LogSpec, from: u64, to: u64) -> Result<()> {
        for item in Messages::new(spec.clone()).from_seq(from + 1) {
            match item {
                Ok(m) if m.seq > to => break,
                Ok(m) => {
                    if let Some(key) = m.idempotency_key.as_deref() {
                        if self.lookup(key)?.is_none() {
                            self.insert(key, m.seq, m.id)?;
                        }
                    }
                }
                // Damage is reported by readers and `doctor`; a damaged record's key
                // cannot be known.
                Err(Error::Corrupt { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

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
                    // The index is derived data: a damaged entry is skipped here (and
                    // reported by `doctor`) rather than stopping every keyed send.
                    let bytes = reader.bytes(start, end);
                    if let Ok(entry) = log::decode::<KeyEntry<'_>>(bytes, &path, line_no) {
                        if entry.key == key {
                            return Ok(Some((entry.seq, entry.id)));
                        }
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
            seq,
            key: key.into(),
            id,
        };
        let mut line = Vec::with_capacity(key.len() + 120);
        record::encode_value(&entry, &mut line);
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

#[cfg(feature = "nats")]
impl NatsMailbox {
    fn publish(&self, batch: impl IntoIterator<Item = Prepared>) -> Result<Vec<Receipt>> {
        let batch = batch
            .into_iter()
            .map(|p| {
                let mut payload = Vec::with_capacity(9 + p.tail.len());
                payload.extend_from_slice(b"{\"seq\":0,");
                payload.extend_from_slice(&p.tail);
                crate::nats::Outgoing {
                    payload,
                    id: p.id,
                    key: p.key,
                }
            })
            .collect();
        self.nats.publish(&self.name, batch)
    }
}
