//! Key-value buckets: a revisioned map of JSON values with compare-and-set.
//!
//! Files, in `<bus>/kv/<bucket>/` (FORMAT.md, "Key-value buckets"):
//!
//! - `bucket.json`: `{"format":1,"history":N,"max_record_bytes":M}`, fixed at creation.
//! - `log.jsonl`: the bucket's records, one per write, in revision order, in the line
//!   format of the whole bus (`{"crc":...,"seq":<revision>,...}`). A record's `seq` is
//!   its revision, so the next revision is the last record's plus one: revisions are
//!   never reused, whatever a compaction removed (it always keeps each key's latest
//!   record, and so the bucket's latest).
//! - `lock`: the `flock` every write holds. Reads take no lock: they fold the log as
//!   it is, and a partial last line (a write in progress, or a torn tail a crash left)
//!   is not a record yet. The next writer cuts a torn tail under the lock, as the lease
//!   files do.
//!
//! Every operation folds the whole log: its cost grows with the records stored, which
//! the compaction keeps to about twice the `history` revisions of each key.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::fsutil::{Flock, Fs};
use super::segment::{self as log, Line};
use super::{check_format, record, Bus, FORMAT_VERSION};
use crate::backend::{Backend, Expect, KvBackend};
use crate::clock::{datetime_ms, now_ms};
use crate::error::IoContext;
use crate::report::KvEntry;
use crate::{Error, Result};

/// A log smaller than this is never compacted by a write.
const COMPACT_BYTES: u64 = 16 * 1024;

/// `bucket.json`: settings fixed when the bucket is created.
#[derive(Debug, Serialize, Deserialize)]
struct BucketMeta {
    format: u64,
    history: u32,
    max_record_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Op {
    Put,
    Del,
}

/// One record of `log.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Rec {
    /// The revision.
    seq: u64,
    op: Op,
    key: String,
    /// When it was written, ms since the epoch.
    t: i64,
    /// When the key got its value after being absent (a put), ms since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    created: Option<i64>,
    /// The value (`null` for a deletion).
    #[serde(default)]
    value: Value,
}

impl Rec {
    fn entry(&self) -> KvEntry {
        KvEntry {
            key: self.key.clone(),
            value: self.value.clone(),
            revision: self.seq,
            deleted: self.op == Op::Del,
            created_at: datetime_ms(self.created.unwrap_or(self.t)),
            updated_at: datetime_ms(self.t),
        }
    }

    fn live(&self) -> bool {
        self.op == Op::Put
    }
}

/// The log, read: every record in order, and where the complete records end.
struct Folded {
    recs: Vec<Rec>,
    /// Byte length of the complete records; a longer file has a partial tail there.
    end: u64,
    partial: bool,
}

impl Folded {
    /// The latest record of each key (its index in `recs`).
    fn latest(&self) -> HashMap<&str, usize> {
        let mut latest = HashMap::new();
        for (i, r) in self.recs.iter().enumerate() {
            latest.insert(r.key.as_str(), i);
        }
        latest
    }

    fn last_of(&self, key: &str) -> Option<&Rec> {
        self.recs.iter().rev().find(|r| r.key == key)
    }

    fn last_seq(&self) -> u64 {
        self.recs.last().map_or(0, |r| r.seq)
    }
}

/// The names of all buckets in `dir`, sorted.
pub(crate) fn names(fs: &Fs, dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = fs
        .list(dir, true)?
        .into_iter()
        .filter(|(_, is_dir)| *is_dir)
        .filter_map(|(n, _)| n.to_str().map(str::to_owned))
        .filter(|n| crate::name::is_valid(n))
        .collect();
    names.sort();
    Ok(names)
}

/// Creates bucket `name` in `parent` (`<bus>/kv`): built under a temporary name and
/// renamed into place, so other processes see all of it or nothing.
pub(crate) fn create(bus: &Bus, parent: &Path, name: &str, history: u32) -> Result<()> {
    let exists = || Error::BucketExists {
        bucket: name.to_owned(),
    };
    let fs = bus.fs();
    let dir = parent.join(name);
    if fs.exists(&dir) {
        return Err(exists());
    }
    let sync = bus.opts().sync();
    fs.create_dir(parent)?;
    if sync {
        if let Some(root) = parent.parent() {
            fs.sync_dir(root)?;
        }
    }
    fs.build_dir(&dir, sync, exists, |tmp| {
        let meta = BucketMeta {
            format: FORMAT_VERSION,
            history: history.max(1),
            max_record_bytes: bus.opts().max_record_bytes,
        };
        let bytes = serde_json::to_vec(&meta).expect("meta serializes");
        fs.write_atomic(&tmp.join("bucket.json"), &bytes, sync)?;
        fs.open_lock(&tmp.join("lock"))?;
        let log_path = tmp.join("log.jsonl");
        let log = fs.open_append(&log_path)?;
        if sync {
            log.sync_all().ctx("fsync", &log_path)?;
            fs.sync_dir(tmp)?;
        }
        Ok(())
    })
}

/// An open bucket.
#[derive(Debug)]
pub(crate) struct Kv {
    fs: Fs,
    dir: PathBuf,
    bucket: String,
    sync: bool,
    history: u32,
    max_record_bytes: usize,
}

impl Kv {
    /// Opens bucket `name` in `parent`; `None` if it does not exist. Creates nothing.
    pub(crate) fn open(bus: &Bus, parent: &Path, name: &str) -> Result<Option<Kv>> {
        let fs = bus.fs();
        let dir = parent.join(name);
        if !fs.dir_exists(parent)? || !fs.dir_exists(&dir)? {
            return Ok(None);
        }
        let meta_path = dir.join("bucket.json");
        let file = fs.open_read(&meta_path)?;
        let meta: BucketMeta =
            serde_json::from_reader(std::io::BufReader::new(file)).map_err(|e| Error::Corrupt {
                path: meta_path.clone(),
                line: 1,
                reason: format!("not valid bucket metadata: {e}"),
            })?;
        check_format(&meta_path, meta.format)?;
        Ok(Some(Kv {
            fs: fs.clone(),
            dir,
            bucket: name.to_owned(),
            sync: bus.opts().sync(),
            history: meta.history.max(1),
            max_record_bytes: meta.max_record_bytes.max(256),
        }))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("log.jsonl")
    }

    fn lock(&self) -> Result<Flock<File>> {
        let path = self.dir.join("lock");
        let f = self.fs.open_lock(&path)?;
        Flock::exclusive(f, &path)
    }

    /// Reads every complete record of the log.
    fn fold(&self) -> Result<Folded> {
        let path = self.log_path();
        let mut folded = Folded {
            recs: Vec::new(),
            end: 0,
            partial: false,
        };
        let Some(file) = self.fs.open_read_opt(&path)? else {
            return Ok(folded);
        };
        let mut reader = log::LineReader::new(0, self.max_record_bytes);
        let mut line = 0;
        loop {
            match reader.next(&file).ctx("read", &path)? {
                Line::Complete { start, end, offset } => {
                    line += 1;
                    let r: Rec = log::decode(reader.bytes(start, end), &path, line)?;
                    if r.seq <= folded.last_seq() {
                        return Err(Error::Corrupt {
                            path,
                            line,
                            reason: format!(
                                "revision {} after revision {}",
                                r.seq,
                                folded.last_seq()
                            ),
                        });
                    }
                    folded.end = offset + (end - start) as u64 + 1;
                    folded.recs.push(r);
                }
                Line::TooLong { .. } => {
                    return Err(Error::Corrupt {
                        path,
                        line: line + 1,
                        reason: "key-value record longer than the bucket's record limit".into(),
                    })
                }
                Line::Partial { .. } => {
                    folded.partial = true;
                    return Ok(folded);
                }
                Line::Eof => return Ok(folded),
            }
        }
    }

    /// Appends `rec` (we hold the lock; `folded` is the log as read under it).
    fn append(&self, folded: &mut Folded, rec: Rec) -> Result<()> {
        let path = self.log_path();
        let mut line = Vec::with_capacity(256);
        record::encode_value(&rec, &mut line);
        if line.len() > self.max_record_bytes {
            return Err(Error::RecordTooLarge {
                size: line.len() as u64,
                limit: self.max_record_bytes as u64,
            });
        }
        let file = self.fs.open_append(&path)?;
        if folded.partial {
            // A torn tail a crash left: not a record, and never acknowledged.
            file.set_len(folded.end).ctx("truncate torn tail", &path)?;
            folded.partial = false;
        }
        (&file).write_all(&line).ctx("append", &path)?;
        if self.sync {
            file.sync_data().ctx("fdatasync", &path)?;
        }
        folded.end += line.len() as u64;
        folded.recs.push(rec);
        if folded.end > COMPACT_BYTES && folded.recs.len() as u64 > 2 * kept(folded, self.history) {
            self.rewrite(folded)?;
        }
        Ok(())
    }

    /// Rewrites the log with the last `history` records of each key (we hold the
    /// lock): a temporary file, fsynced, renamed over the log, the directory fsynced.
    fn rewrite(&self, folded: &Folded) -> Result<u64> {
        let mut seen: HashMap<&str, u32> = HashMap::new();
        let mut keep = vec![false; folded.recs.len()];
        for (i, r) in folded.recs.iter().enumerate().rev() {
            let n = seen.entry(r.key.as_str()).or_default();
            if *n < self.history {
                *n += 1;
                keep[i] = true;
            }
        }
        let mut bytes = Vec::with_capacity(folded.end as usize);
        let mut removed = 0;
        for (r, keep) in folded.recs.iter().zip(keep) {
            if keep {
                record::encode_value(r, &mut bytes);
            } else {
                removed += 1;
            }
        }
        if removed > 0 || folded.partial {
            self.fs.write_atomic(&self.log_path(), &bytes, true)?;
        }
        Ok(removed)
    }

    fn conflict(&self, key: &str, expect: Expect, current: Option<&Rec>) -> Error {
        let live = current.filter(|r| r.live());
        Error::KvConflict {
            bucket: self.bucket.clone(),
            key: key.to_owned(),
            expected_revision: match expect {
                Expect::Revision(r) => Some(r),
                Expect::Any | Expect::Absent => None,
            },
            current_revision: live.map(|r| r.seq),
            current_value: live.map(|r| r.value.clone()),
        }
    }
}

/// How many records a compaction of `folded` would keep.
fn kept(folded: &Folded, history: u32) -> u64 {
    let mut per_key: HashMap<&str, u64> = HashMap::new();
    for r in &folded.recs {
        *per_key.entry(r.key.as_str()).or_default() += 1;
    }
    per_key.values().map(|&n| n.min(u64::from(history))).sum()
}

impl Backend for Kv {
    fn kind(&self) -> &'static str {
        "directory"
    }
}

impl KvBackend for Kv {
    fn bucket(&self) -> &str {
        &self.bucket
    }

    fn history_depth(&self) -> u32 {
        self.history
    }

    fn get(&self, key: &str) -> Result<Option<KvEntry>> {
        let folded = self.fold()?;
        Ok(folded.last_of(key).filter(|r| r.live()).map(Rec::entry))
    }

    fn write(&self, key: &str, value: Option<&Value>, expect: Expect) -> Result<Option<u64>> {
        let _guard = self.lock()?;
        let mut folded = self.fold()?;
        let current = folded.last_of(key);
        let live = current.filter(|r| r.live());
        let ok = match expect {
            Expect::Any => true,
            Expect::Absent => live.is_none(),
            Expect::Revision(rev) => live.is_some_and(|r| r.seq == rev),
        };
        if !ok {
            return Err(self.conflict(key, expect, current));
        }
        if value.is_none() && live.is_none() {
            return Ok(None);
        }
        let now = now_ms();
        let created = value.map(|_| live.and_then(|r| r.created).unwrap_or(now));
        let rec = Rec {
            seq: folded.last_seq() + 1,
            op: if value.is_some() { Op::Put } else { Op::Del },
            key: key.to_owned(),
            t: now,
            created,
            value: value.cloned().unwrap_or(Value::Null),
        };
        let revision = rec.seq;
        self.append(&mut folded, rec)?;
        Ok(Some(revision))
    }

    fn keys(&self, prefix: &str) -> Result<Vec<String>> {
        let folded = self.fold()?;
        let latest = folded.latest();
        let keys: BTreeMap<&str, ()> = latest
            .into_iter()
            .filter(|(k, i)| k.starts_with(prefix) && folded.recs[*i].live())
            .map(|(k, _)| (k, ()))
            .collect();
        Ok(keys.into_keys().map(str::to_owned).collect())
    }

    fn history(&self, key: &str) -> Result<Vec<KvEntry>> {
        let folded = self.fold()?;
        Ok(folded
            .recs
            .iter()
            .filter(|r| r.key == key)
            .map(Rec::entry)
            .collect())
    }

    fn compact(&self) -> Result<u64> {
        let _guard = self.lock()?;
        let folded = self.fold()?;
        self.rewrite(&folded)
    }
}
