//! The idempotency index of a mailbox.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::fsutil::Fs;
use super::read::{LogSpec, Reader};
use super::record;
use super::segment::{self as log, Line};
use crate::error::IoContext;
use crate::{Error, Result};

/// The idempotency index: `keys/<hh>.jsonl`, 256 buckets by CRC-32C of the key, each
/// line `{"crc":..,"seq":N,"key":K,"id":U}`. Only touched under the mailbox lock.
pub(crate) struct KeyIndex<'a> {
    pub(crate) fs: &'a Fs,
    pub(crate) dir: &'a Path,
    pub(crate) sync: bool,
}

#[derive(Serialize, Deserialize)]
struct KeyEntry<'a> {
    seq: u64,
    #[serde(borrow)]
    key: std::borrow::Cow<'a, str>,
    id: Uuid,
}

/// A line of `keys/lost.jsonl`: seqs `from..=seq` were lost in a power cut.
#[derive(Serialize, Deserialize)]
struct LostRange {
    seq: u64,
    from: u64,
}

impl KeyIndex<'_> {
    fn scanned_path(&self) -> PathBuf {
        self.dir.join("scanned")
    }

    /// The watermark: every keyed record up to this seq is indexed. 0 when unknown
    /// (missing or unreadable), which only costs a longer scan; a FIFO, symlink or
    /// another user's file in its place is an error.
    pub(crate) fn scanned(&self) -> Result<u64> {
        let Some(file) = self.fs.open_read_opt(&self.scanned_path())? else {
            return Ok(0);
        };
        let mut buf = [0u8; 21];
        Ok(
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, 0)
                .ok()
                .and_then(|()| std::str::from_utf8(&buf[..20]).ok()?.parse().ok())
                .unwrap_or(0),
        )
    }

    /// Moves the watermark. Not synced: a watermark lost to a power cut only makes the
    /// next keyed send scan a little more.
    pub(crate) fn set_scanned(&self, seq: u64) {
        let path = self.scanned_path();
        if let Ok(f) = self.fs.open_lock(&path) {
            let line = format!("{seq:020}\n");
            let _ = std::os::unix::fs::FileExt::write_all_at(&f, line.as_bytes(), 0);
        }
    }

    /// Indexes the keyed records with seqs in `(from, to]` that are not indexed yet.
    pub(crate) fn catch_up(&self, spec: &LogSpec, from: u64, to: u64) -> Result<()> {
        for item in Reader::new(spec.clone()).starting_at(from + 1) {
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
                // cannot be known. Compaction indexes every key before it removes a
                // segment: a watermark that lags (it is not synced) only starts here
                // below what is left.
                Err(Error::Corrupt { .. } | Error::Compacted { .. }) => {}
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

    pub(crate) fn lookup(&self, key: &str) -> Result<Option<(u64, Uuid)>> {
        let path = self.bucket(key);
        self.find_line(&path, 64 * 1024, |bytes, line| {
            // The index is derived data: a damaged entry is skipped here (and reported
            // by `doctor`) rather than stopping every keyed send. An entry for a seq a
            // power cut took (see `mark_lost`) is void: a later one may be its resend.
            match log::decode::<KeyEntry<'_>>(bytes, &path, line) {
                Ok(e) if e.key == key && !self.is_lost(e.seq)? => Ok(Some((e.seq, e.id))),
                _ => Ok(None),
            }
        })
    }

    /// The first answer `f` gives for a complete line (its bytes and 1-based number) of
    /// the small file at `path`; lines longer than `limit` are passed over.
    fn find_line<R>(
        &self,
        path: &Path,
        limit: usize,
        mut f: impl FnMut(&[u8], u64) -> Result<Option<R>>,
    ) -> Result<Option<R>> {
        let Some(file) = self.fs.open_read_opt(path)? else {
            return Ok(None);
        };
        let mut reader = log::LineReader::new(0, limit);
        let mut line = 0;
        loop {
            match reader.next(&file).ctx("read", path)? {
                Line::Complete { start, end, .. } => {
                    line += 1;
                    if let Some(found) = f(reader.bytes(start, end), line)? {
                        return Ok(Some(found));
                    }
                }
                Line::TooLong { .. } => line += 1,
                Line::Partial { .. } | Line::Eof => return Ok(None),
            }
        }
    }

    fn lost_path(&self) -> PathBuf {
        self.dir.join("lost.jsonl")
    }

    /// Records (durably) that seqs `from..=through` may have been handed out and were
    /// lost in a power cut: entries for them no longer answer a keyed send, so a retry
    /// of a lost send stores the message instead of pointing at another one.
    pub(crate) fn mark_lost(&self, from: u64, through: u64) -> Result<()> {
        let path = self.lost_path();
        let (file, created) = self.fs.open_append_created(&path)?;
        let mut line = Vec::new();
        record::encode_value(&LostRange { seq: through, from }, &mut line);
        (&file).write_all(&line).ctx("append", &path)?;
        file.sync_data().ctx("fdatasync", &path)?;
        if created {
            self.fs.sync_dir(self.dir)?;
        }
        Ok(())
    }

    /// Whether `seq` is in a range [`KeyIndex::mark_lost`] recorded. Asked only when a
    /// key matches, so the file (usually absent) is read only then.
    fn is_lost(&self, seq: u64) -> Result<bool> {
        let path = self.lost_path();
        let found = self.find_line(&path, 4096, |bytes, line| {
            let lost = log::decode::<LostRange>(bytes, &path, line)
                .is_ok_and(|r| (r.from..=r.seq).contains(&seq));
            Ok(lost.then_some(()))
        })?;
        Ok(found.is_some())
    }

    pub(crate) fn insert(&self, key: &str, seq: u64, id: Uuid) -> Result<()> {
        let path = self.bucket(key);
        let (file, created) = self.fs.open_append_created(&path)?;
        // A torn line left by a crash would glue onto ours: cut it first.
        let size = file.metadata().ctx("stat", &path)?.len();
        if size > 0 {
            let info = log::read_tail(&file, &path, size, 64 * 1024).unwrap_or(log::TailInfo {
                complete_len: size,
                last: None,
                prev: None,
                first_line: false,
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
                self.fs.sync_dir(self.dir)?;
            }
        }
        Ok(())
    }
}
