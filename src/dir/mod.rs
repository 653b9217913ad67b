//! The directory backend: everything that touches files, in the format of FORMAT.md.
//!
//! | file | what it holds |
//! | --- | --- |
//! | `fsutil` | [`fsutil::Fs`]: every open beneath the bus directory, no symlinks, checked owners, modes and types; `flock` guards, directory fsync, atomic replace |
//! | `record` | the line codec: `{"crc":"<8 hex>",...}` |
//! | `segment` | segment files: names, listing, bounded line reading, the tail |
//! | `read` | [`Reader`]: a mailbox's records in seq order, with byte positions |
//! | `mailbox` | [`Mailbox`]: the append path |
//! | `keys` | the idempotency index |
//! | `group/` | [`Group`]: state records and their fold, checkpoints, claims |
//! | `lease` | lease files |
//! | `kv` | [`Kv`]: key-value buckets |
//! | `compact`, `doctor`, `watch` | compaction, verification, `notify` wake-ups |

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::backend::{
    Backend, BusBackend, Granted, KvImp, LeaseChange, LeaseGrant, LeaseState, MailboxImp,
    OpenMailbox, Options,
};
use crate::error::IoContext;
use crate::report::{DoctorReport, LeaseInfo};
use crate::watch::{Watch, WatchMode};
use crate::{Error, Result};

mod compact;
mod doctor;
pub(crate) mod fsutil;
mod group;
mod keys;
mod kv;
mod lease;
mod mailbox;
mod read;
mod record;
mod reserve;
mod segment;
mod watch;

pub(crate) use group::Group;
pub(crate) use kv::Kv;
pub(crate) use mailbox::Mailbox;
pub(crate) use read::Reader;

/// The on-disk format major version this build reads and writes.
pub const FORMAT_VERSION: u64 = 1;

/// Name of the marker file at the root of a bus directory.
pub const MARKER_FILE: &str = "agentbus.json";

/// A bus directory. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Bus {
    inner: Arc<BusInner>,
}

#[derive(Debug)]
struct BusInner {
    root: PathBuf,
    fs: fsutil::Fs,
    opts: Options,
}

#[derive(Serialize, Deserialize)]
struct Marker {
    format: u64,
    #[serde(
        default,
        with = "time::serde::rfc3339::option",
        skip_serializing_if = "Option::is_none"
    )]
    created: Option<time::OffsetDateTime>,
}

/// `mailbox.json`: settings fixed when the mailbox is created.
#[derive(Debug, Serialize, Deserialize)]
struct MailboxMeta {
    format: u64,
    segment_bytes: u64,
    #[serde(default = "default_max_record")]
    max_record_bytes: usize,
}

fn default_max_record() -> usize {
    crate::DEFAULT_MAX_RECORD_BYTES
}

impl Bus {
    /// Opens the bus at `root`; with `create`, makes it first if needed (like
    /// `mkdir -p`, safe to race). The bus directory and everything opened in it are
    /// checked (see [`fsutil`]): a bus of another user, or one writable beyond its
    /// sharing mode, is [`Error::Untrusted`].
    pub(crate) fn open(root: &Path, opts: Options, create: bool) -> Result<Bus> {
        let root = root.to_owned();
        if create {
            if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).ctx("create directory", parent)?;
            }
        }
        let fs = fsutil::Fs::open_root(&root, &opts, create)?;
        if create {
            let sync = opts.sync();
            match read_marker(&fs, &root) {
                Ok(()) => {}
                Err(Error::NotABus { .. }) => {
                    let marker = Marker {
                        format: FORMAT_VERSION,
                        created: Some(time::OffsetDateTime::now_utc()),
                    };
                    let bytes = serde_json::to_vec(&marker).expect("marker serializes");
                    fs.write_atomic(&root.join(MARKER_FILE), &bytes, sync)?;
                }
                Err(e) => return Err(e),
            }
            fs.create_dir(&root.join("mailboxes"))?;
            if sync {
                fs.sync_dir(&root)?;
            }
        } else {
            read_marker(&fs, &root)?;
            fs.ensure_dir(&root.join("mailboxes"))?;
        }
        Ok(Bus {
            inner: Arc::new(BusInner { root, fs, opts }),
        })
    }

    /// The bus directory, through which every file of the bus is opened.
    pub(crate) fn fs(&self) -> &fsutil::Fs {
        &self.inner.fs
    }

    pub(crate) fn root(&self) -> &Path {
        &self.inner.root
    }

    pub(crate) fn opts(&self) -> &Options {
        &self.inner.opts
    }

    fn mailboxes_dir(&self) -> PathBuf {
        self.inner.root.join("mailboxes")
    }

    fn leases_dir(&self) -> PathBuf {
        self.inner.root.join("leases")
    }

    fn kv_dir(&self) -> PathBuf {
        self.inner.root.join("kv")
    }

    /// Opens the directory mailbox `name`; `None` if it does not exist.
    pub(crate) fn mailbox(&self, name: &str) -> Result<Option<Mailbox>> {
        let dir = self.mailboxes_dir().join(name);
        if !self.fs().dir_exists(&dir)? {
            return Ok(None);
        }
        // Checked once per handle: everything later opened in them is opened beneath
        // the bus directory without following symlinks, so a swap is refused too.
        self.fs().ensure_dir(&dir.join("log"))?;
        self.fs().dir_exists(&dir.join("keys"))?;
        let meta_path = dir.join("mailbox.json");
        let file = self.fs().open_read(&meta_path)?;
        let meta: MailboxMeta =
            serde_json::from_reader(io::BufReader::new(file)).map_err(|e| Error::Corrupt {
                path: meta_path.clone(),
                line: 1,
                reason: format!("not valid mailbox metadata: {e}"),
            })?;
        check_format(&meta_path, meta.format)?;
        Mailbox::open(
            self.clone(),
            name,
            dir,
            meta.segment_bytes.max(1),
            meta.max_record_bytes.max(256),
        )
        .map(Some)
    }

    /// Every mailbox, opened.
    pub(crate) fn all_mailboxes(&self) -> Result<Vec<Mailbox>> {
        let mut out = Vec::new();
        for name in self.mailbox_names()? {
            out.extend(self.mailbox(&name)?);
        }
        Ok(out)
    }
}

impl Backend for Bus {
    fn kind(&self) -> &'static str {
        "directory"
    }
}

impl BusBackend for Bus {
    /// Creation is atomic: the mailbox is built under a temporary name and renamed
    /// into place, so other processes see all of it or nothing.
    fn create_mailbox(&self, name: &str) -> Result<()> {
        let exists = || Error::MailboxExists {
            name: name.to_owned(),
        };
        let parent = self.mailboxes_dir();
        let dir = parent.join(name);
        let fs = self.fs();
        if fs.exists(&dir) {
            return Err(exists());
        }
        let opts = &self.inner.opts;
        fs.build_dir(&dir, opts.sync(), exists, |tmp| {
            let meta = MailboxMeta {
                format: FORMAT_VERSION,
                segment_bytes: opts.segment_bytes,
                max_record_bytes: opts.max_record_bytes,
            };
            let bytes = serde_json::to_vec(&meta).expect("meta serializes");
            fs.write_atomic(&tmp.join("mailbox.json"), &bytes, opts.sync())?;
            fs.open_lock(&tmp.join("lock"))?;
            for sub in ["log", "keys"] {
                fs.create_dir(&tmp.join(sub))?;
            }
            let first = tmp.join("log").join(segment::segment_name(1));
            let seg = fs.open_append(&first)?;
            if opts.sync() {
                seg.sync_all().ctx("fsync", &first)?;
                for d in ["log", "keys", ""] {
                    fs.sync_dir(&tmp.join(d))?;
                }
            }
            Ok(())
        })
    }

    fn open_mailbox(&self, name: &str) -> Result<Option<OpenMailbox>> {
        Ok(self.mailbox(name)?.map(|m| OpenMailbox {
            path: m.dir().to_owned(),
            max_record_bytes: m.max_record_bytes(),
            imp: MailboxImp::Dir(m),
        }))
    }

    fn mailbox_names(&self) -> Result<Vec<String>> {
        self.fs().list_names(&self.mailboxes_dir(), false)
    }

    fn watch_mailboxes(&self, names: &[&str], mode: WatchMode) -> Watch {
        let dirs: Vec<PathBuf> = names
            .iter()
            .map(|n| self.mailboxes_dir().join(n).join("log"))
            .collect();
        watch::watch_dirs(&dirs, mode, self.inner.opts.poll_interval)
    }

    fn lease_info(&self, name: &str) -> Result<Option<LeaseInfo>> {
        lease::LeaseFiles::new(self, name).info()
    }

    fn lease_names(&self) -> Result<Vec<String>> {
        lease::names(self.fs(), &self.leases_dir())
    }

    fn grant_lease(&self, request: &LeaseGrant<'_>) -> Result<Result<Granted, LeaseState>> {
        lease::LeaseFiles::new(self, request.name).grant_if_free(request)
    }

    fn change_lease(
        &self,
        name: &str,
        holder: &str,
        token: u64,
        change: LeaseChange,
    ) -> Result<LeaseInfo> {
        lease::LeaseFiles::new(self, name).change(holder, token, change)
    }

    fn release_lease_in_background(&self, name: &str, holder: &str, token: u64) {
        lease::LeaseFiles::new(self, name).try_release(holder, token);
    }

    fn watch_lease(&self, name: &str, mode: WatchMode) -> Result<Watch> {
        let _ = name;
        let dir = self.leases_dir();
        self.fs().create_dir(&dir)?;
        Ok(watch::watch_dirs(
            &[dir],
            mode,
            self.inner.opts.poll_interval,
        ))
    }

    fn create_kv(&self, bucket: &str, history: u32) -> Result<()> {
        kv::create(self, &self.kv_dir(), bucket, history)
    }

    fn open_kv(&self, bucket: &str) -> Result<Option<KvImp>> {
        Ok(Kv::open(self, &self.kv_dir(), bucket)?.map(KvImp::Dir))
    }

    fn kv_names(&self) -> Result<Vec<String>> {
        kv::names(self.fs(), &self.kv_dir())
    }

    fn doctor(&self, repair: bool) -> Result<DoctorReport> {
        doctor::run(self, repair)
    }
}

fn read_marker(fs: &fsutil::Fs, root: &Path) -> Result<()> {
    let path = root.join(MARKER_FILE);
    let Some(file) = fs.open_read_opt(&path)? else {
        return Err(Error::NotABus {
            path: root.to_owned(),
        });
    };
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut &file, &mut bytes).ctx("read", &path)?;
    let marker: Marker = serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
        path: path.clone(),
        line: 1,
        reason: format!("not a valid marker: {e}"),
    })?;
    check_format(&path, marker.format)
}

/// Refuses a file (the marker, a mailbox's or a group's metadata) of a format version
/// other than this build's.
pub(crate) fn check_format(path: &Path, found: u64) -> Result<()> {
    if found != FORMAT_VERSION {
        return Err(Error::UnsupportedFormat {
            path: path.to_owned(),
            found,
            supported: FORMAT_VERSION,
        });
    }
    Ok(())
}
