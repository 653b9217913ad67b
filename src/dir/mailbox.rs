//! A directory mailbox: the append path.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use uuid::Uuid;

use super::fsutil::Flock;
use super::keys::KeyIndex;
use super::read::{LogSpec, Reader};
use super::segment as log;
use super::{record, reserve, Bus};
use crate::backend::{Backend, GroupImp, GroupMeta, MailboxBackend, Prepared, ReaderImp};
use crate::error::IoContext;
use crate::report::CompactReport;
use crate::{Error, Receipt, Result};

/// A mailbox directory. Cheap to clone.
///
/// Any number of threads and processes may append at once: each append holds an
/// exclusive `flock` on the mailbox's `lock` file and writes the whole record with one
/// `write()`, so records never interleave and `seq` is contiguous.
#[derive(Debug, Clone)]
pub(crate) struct Mailbox {
    inner: Arc<MailboxInner>,
}

#[derive(Debug)]
struct MailboxInner {
    bus: Bus,
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
    /// Seqs up to this one may be handed out unsynced during this boot (`None`: the
    /// reservation file was not read yet; see `reserve`).
    reserved: Option<u64>,
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

impl Mailbox {
    pub(crate) fn open(
        bus: Bus,
        name: &str,
        dir: PathBuf,
        segment_bytes: u64,
        max_record_bytes: usize,
    ) -> Result<Mailbox> {
        let lock_path = dir.join("lock");
        let lock = bus.fs().open_lock(&lock_path)?;
        Ok(Mailbox {
            inner: Arc::new(MailboxInner {
                name: name.to_owned(),
                log_dir: dir.join("log"),
                keys_dir: dir.join("keys"),
                dir,
                segment_bytes,
                max_record_bytes,
                writer: Mutex::new(Writer {
                    lock_path,
                    lock,
                    tail: None,
                    buf: Vec::new(),
                    indexed: None,
                    reserved: None,
                }),
                bus,
            }),
        })
    }

    pub(crate) fn bus(&self) -> &Bus {
        &self.inner.bus
    }

    pub(crate) fn name(&self) -> &str {
        &self.inner.name
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub(crate) fn log_dir(&self) -> &Path {
        &self.inner.log_dir
    }

    pub(crate) fn max_record_bytes(&self) -> usize {
        self.inner.max_record_bytes
    }

    pub(crate) fn log_spec(&self) -> LogSpec {
        LogSpec {
            fs: self.inner.bus.fs().clone(),
            dir: self.inner.log_dir.clone(),
            limit: self.inner.max_record_bytes,
            segment_bytes: self.inner.segment_bytes,
        }
    }

    pub(crate) fn first_seq(&self) -> Result<u64> {
        let segments = log::list_segments(self.inner.bus.fs(), &self.inner.log_dir)?;
        Ok(segments.first().copied().unwrap_or(1))
    }

    /// Reads only the end of the newest segment (all of it when its last record is
    /// damaged).
    pub(crate) fn last_seq(&self) -> Result<u64> {
        let log_dir = &self.inner.log_dir;
        let fs = self.inner.bus.fs();
        for first in log::list_segments(fs, log_dir)?.into_iter().rev() {
            let path = log_dir.join(log::segment_name(first));
            let Some(file) = fs.open_read_opt(&path)? else {
                continue;
            };
            let size = file.metadata().ctx("stat", &path)?.len();
            let limit = self.inner.max_record_bytes;
            return match log::read_tail(&file, &path, size, limit) {
                Ok(tail) => Ok(tail.last.map_or(first.saturating_sub(1), |r| r.seq)),
                // A damaged last record still holds a seq (readers report it and go
                // on): count to where a reader of this segment gets.
                Err(Error::Corrupt { .. }) => {
                    let mut reader = Reader::new(self.log_spec()).starting_at(first);
                    for _ in reader.by_ref() {}
                    Ok(reader.next_seq() - 1)
                }
                Err(e) => Err(e),
            };
        }
        Ok(0)
    }

    /// The receipt of the message sent with idempotency `key`, if any (the index is
    /// brought up to date first, as for a keyed send).
    fn find_key_locked(&self, key: &str) -> Result<Option<(u64, Uuid)>> {
        let mut guard = self.lock_writer();
        let w = &mut *guard;
        let _flock = Flock::exclusive(&w.lock, &w.lock_path)?;
        let tail = self.sync_tail(&mut w.tail)?;
        self.settle_lost(tail, &mut w.reserved)?;
        let last = tail.next_seq - 1;
        let keys = self.key_index();
        self.index_keys_through(&keys, &mut w.indexed, last)?;
        keys.lookup(key)
    }

    /// Runs `f` (compaction removing segments) with the append lock held, after every
    /// keyed record up to the end of the log is in the key index and the index's
    /// watermark says so: keys are never lost with the segments that held them, and a
    /// keyed send never has to read a removed segment.
    pub(crate) fn with_keys_indexed<R>(&self, f: impl FnOnce() -> Result<R>) -> Result<R> {
        let mut guard = self.lock_writer();
        let w = &mut *guard;
        let _flock = Flock::exclusive(&w.lock, &w.lock_path)?;
        // Read, not opened for appending: that would start a segment after a full one.
        let last = self.last_seq()?;
        let keys = self.key_index();
        self.index_keys_through(&keys, &mut w.indexed, last)?;
        keys.set_scanned(last);
        let result = f();
        w.tail = None;
        result
    }

    fn key_index(&self) -> KeyIndex<'_> {
        let opts = self.inner.bus.opts();
        KeyIndex {
            fs: self.inner.bus.fs(),
            dir: &self.inner.keys_dir,
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
        let from = match *indexed {
            Some(seq) => seq,
            None => keys.scanned()?,
        };
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

    fn lock_writer(&self) -> MutexGuard<'_, Writer> {
        self.inner.writer.lock().unwrap_or_else(|poisoned| {
            // A panic mid-append: forget the cached tail, the next append re-reads it.
            let mut w = poisoned.into_inner();
            w.tail = None;
            w
        })
    }

    pub(crate) fn append_batch(&self, batch: &[Prepared]) -> Result<Vec<Receipt>> {
        let inner = &*self.inner;
        let opts = inner.bus.opts();
        let mut guard = self.lock_writer();
        let w = &mut *guard;
        let _flock = Flock::exclusive(&w.lock, &w.lock_path)?;

        let tail = self.sync_tail(&mut w.tail)?;
        self.settle_lost(tail, &mut w.reserved)?;
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
        // Unsynced seqs go out only within a durable reservation (see `reserve`).
        if !opts.sync() && seq - 1 > w.reserved.unwrap_or(0) {
            let through = seq - 1 + reserve::RESERVE;
            reserve::write(inner.bus.fs(), &self.reservation_path(), through)?;
            w.reserved = Some(through);
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
            mailbox: self.inner.name.clone(),
            duplicate,
        }
    }

    /// Brings the cached tail up to date with the file system. Called with the lock
    /// held; repairs a torn final line left by a writer that crashed mid-append.
    fn sync_tail<'t>(&self, cached: &'t mut Option<Tail>) -> Result<&'t mut Tail> {
        let inner = &*self.inner;
        let opts = inner.bus.opts();
        let mut tail = match cached.take() {
            Some(t) if t.len != u64::MAX => {
                // Another writer appended since: it must have continued after us.
                let size = file_len(&t.file).ctx("stat", &t.path)?;
                if size < t.len {
                    return Err(self.broken(
                        &t,
                        format!(
                            "the segment is shorter ({size} bytes) than this writer saw \
                             it ({} bytes): records that were handed out are gone",
                            t.len
                        ),
                    ));
                }
                t
            }
            Some(t) => t,
            None => {
                let first = log::list_segments(inner.bus.fs(), &inner.log_dir)?
                    .last()
                    .copied()
                    .unwrap_or(1);
                self.open_segment(first, u64::MAX)?
            }
        };
        loop {
            let size = file_len(&tail.file).ctx("stat", &tail.path)?;
            if size != tail.len {
                let info = log::read_tail(&tail.file, &tail.path, size, inner.max_record_bytes)?;
                if info.complete_len < size {
                    tail.file
                        .set_len(info.complete_len)
                        .ctx("truncate torn tail", &tail.path)?;
                    if opts.sync() {
                        tail.file.sync_data().ctx("fdatasync", &tail.path)?;
                    }
                }
                let seen = (tail.len != u64::MAX).then_some(tail.next_seq);
                tail.len = info.complete_len;
                if let Some(last) = &info.last {
                    let goes_on = match (info.first_line, info.prev) {
                        (true, _) => last.follows(None, tail.first),
                        (false, Some(prev)) => last.follows(Some(prev), tail.first),
                        // The record before it is damaged: readers report that.
                        (false, None) => true,
                    };
                    // This writer's own last record is still there, or one after it.
                    let behind = seen.is_some_and(|next| last.seq + 1 < next);
                    if !goes_on || behind {
                        let after = match (info.first_line, info.prev, seen) {
                            (true, _, _) => {
                                format!("as the first record of a segment named {}", tail.first)
                            }
                            (false, Some(prev), _) => format!("after seq {prev}"),
                            (false, None, Some(next)) => {
                                format!("after this writer's seq {}", next - 1)
                            }
                            (false, None, None) => String::new(),
                        };
                        let reason = format!(
                            "the last record has seq {} {after}: the sequence is broken \
                             (an outside writer must continue it, see FORMAT.md), and \
                             appending after it would hand out seqs twice",
                            last.seq
                        );
                        return Err(self.broken(&tail, reason));
                    }
                }
                tail.next_seq = info.last.as_ref().map_or(tail.first, |r| r.seq + 1);
            }
            if tail.len < inner.segment_bytes {
                return Ok(cached.insert(tail));
            }
            // Full: move on to the segment named after the next seq (another writer may
            // have created it and written to it already). Under `Sync`, what `Flush`
            // sends left unsynced here is made durable first: records synced in the next
            // segment must not outlive a gap before them.
            if opts.sync() {
                tail.file.sync_data().ctx("fdatasync", &tail.path)?;
            }
            tail = self.open_segment(tail.next_seq, u64::MAX)?;
        }
    }

    /// The refusal to append after a sequence this writer cannot continue.
    fn broken(&self, tail: &Tail, reason: String) -> Error {
        let line = log::line_number_at(&tail.file, u64::MAX).unwrap_or(0);
        Error::Corrupt {
            path: tail.path.clone(),
            line,
            reason: format!(
                "{reason}; no message can be sent to {:?} until the record is removed or \
                 fixed (`agentbus doctor` names it)",
                self.inner.name
            ),
        }
    }

    fn reservation_path(&self) -> PathBuf {
        self.inner.dir.join(reserve::FILE)
    }

    /// Once per handle, with the lock held and the tail up to date: if the machine
    /// restarted since `Flush` sends reserved seqs beyond the end of the log, appends a
    /// lost-seqs notice after all of them, so none is handed out again.
    fn settle_lost(&self, tail: &mut Tail, reserved: &mut Option<u64>) -> Result<()> {
        if reserved.is_some() {
            return Ok(());
        }
        let fs = self.inner.bus.fs();
        let path = self.reservation_path();
        let through = match reserve::read(fs, &path)? {
            None => 0,
            Some(r) if r.boot == reserve::boot_id() => r.through,
            Some(r) => {
                let last = tail.next_seq - 1;
                if r.through > last {
                    self.append_lost_notice(tail, last + 1, r.through)?;
                }
                let through = tail.next_seq - 1;
                reserve::write(fs, &path, through)?;
                through
            }
        };
        *reserved = Some(through);
        Ok(())
    }

    /// Appends (and syncs) the notice that seqs `from..=through` may have gone out and
    /// were lost; its own seq is `through + 1`. The key index forgets their keys first.
    fn append_lost_notice(&self, tail: &mut Tail, from: u64, through: u64) -> Result<()> {
        self.key_index().mark_lost(from, through)?;
        let notice = crate::NewMessage::new(crate::LOST_TYPE)
            .from("agentbus")
            .subject(format!(
                "seqs {from} to {through} may have been handed out by Flush sends and \
                 were lost when the machine stopped"
            ))
            .header(crate::LOST_FROM_HEADER, from.to_string())
            .payload(serde_json::json!({ "first": from, "last": through }));
        let p = crate::backend::prepare(notice, "agentbus", self, self.inner.max_record_bytes)?;
        let mut line = Vec::new();
        record::encode_line(through + 1, &p.tail, &mut line);
        (&tail.file).write_all(&line).ctx("append", &tail.path)?;
        tail.file.sync_data().ctx("fdatasync", &tail.path)?;
        tail.len += line.len() as u64;
        tail.next_seq = through + 2;
        ::log::warn!(
            "mailbox {:?}: seqs {from} to {through} may have been handed out by Flush \
             sends before the machine stopped, and are lost; a notice with seq {} says so",
            self.inner.name,
            through + 1
        );
        Ok(())
    }

    /// Opens a segment for appending. Under `Sync`, also fsyncs the log directory: the
    /// segment may have been created by a writer that died before doing so, and records
    /// in a file whose directory entry is not durable are not durable either. This
    /// happens once per segment per handle.
    fn open_segment(&self, first: u64, len: u64) -> Result<Tail> {
        let path = self.inner.log_dir.join(log::segment_name(first));
        let fs = self.inner.bus.fs();
        let file = fs.open_append(&path)?;
        if self.inner.bus.opts().sync() {
            fs.sync_dir(&self.inner.log_dir)?;
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

fn clone_io(e: &io::Error) -> io::Error {
    io::Error::new(e.kind(), e.to_string())
}

impl Backend for Mailbox {
    fn kind(&self) -> &'static str {
        "directory"
    }
}

impl MailboxBackend for Mailbox {
    fn record_len(&self, tail_len: usize) -> usize {
        record::encoded_len(u64::MAX, tail_len)
    }

    fn append(&self, batch: Vec<Prepared>) -> Result<Vec<Receipt>> {
        self.append_batch(&batch)
    }

    fn first_seq(&self) -> Result<u64> {
        Mailbox::first_seq(self)
    }

    fn last_seq(&self) -> Result<u64> {
        Mailbox::last_seq(self)
    }

    fn reader(&self) -> ReaderImp {
        ReaderImp::Dir(Reader::new(self.log_spec()))
    }

    fn find_key(&self, key: &str) -> Result<Option<(u64, Uuid)>> {
        self.find_key_locked(key)
    }

    fn storage(&self) -> Result<(u64, u64)> {
        let fs = self.inner.bus.fs();
        let segments = log::list_segments(fs, &self.inner.log_dir)?;
        let mut bytes = 0;
        for first in &segments {
            let path = self.inner.log_dir.join(log::segment_name(*first));
            if let Ok(meta) = fs.stat(&path) {
                bytes += meta.len;
            }
        }
        Ok((segments.len() as u64, bytes))
    }

    fn compact(&self, retention: Option<Duration>) -> Result<CompactReport> {
        super::compact::compact(self, retention)
    }

    fn coalescing(&self) -> Result<()> {
        Ok(())
    }

    fn create_group(&self, name: &str, meta: &GroupMeta, from_end: bool) -> Result<()> {
        super::group::create(self, name, meta, from_end)
    }

    fn open_group(&self, name: &str) -> Result<Option<(GroupMeta, GroupImp)>> {
        Ok(super::Group::open(self, name)?.map(|g| (g.meta().clone(), GroupImp::Dir(g))))
    }

    fn group_names(&self) -> Result<Vec<String>> {
        self.inner
            .bus
            .fs()
            .list_names(&self.inner.dir.join("groups"), true)
    }
}
