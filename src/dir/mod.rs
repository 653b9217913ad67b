//! The directory backend: everything that touches files, in the format of FORMAT.md.
//!
//! | file | what it holds |
//! | --- | --- |
//! | `fsutil` | no-follow opens, modes, `flock` guards, directory fsync, atomic replace |
//! | `record` | the line codec: `{"crc":"<8 hex>",...}` |
//! | `segment` | segment files: names, listing, bounded line reading, the tail |
//! | `read` | [`Reader`]: a mailbox's records in seq order, with byte positions |
//! | `mailbox` | [`Mailbox`]: the append path |
//! | `keys` | the idempotency index |
//! | `group/` | [`Group`]: state records and their fold, checkpoints, claims |
//! | `lease` | lease files |
//! | `compact`, `doctor`, `watch` | compaction, verification, `notify` wake-ups |

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::backend::{
    Backend, BusBackend, Granted, LeaseChange, LeaseGrant, LeaseState, MailboxImp, OpenMailbox,
    Options,
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
mod lease;
mod mailbox;
mod read;
mod record;
mod segment;
mod watch;

pub(crate) use group::Group;
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
    /// `mkdir -p`, safe to race).
    pub(crate) fn open(root: &Path, opts: Options, create: bool) -> Result<Bus> {
        let root = root.to_owned();
        if create {
            let sync = opts.sync();
            if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).ctx("create directory", parent)?;
            }
            fsutil::create_dir(&root, opts.dir_mode)?;
            match read_marker(&root) {
                Ok(()) => {}
                Err(Error::NotABus { .. }) => {
                    let marker = Marker {
                        format: FORMAT_VERSION,
                        created: Some(time::OffsetDateTime::now_utc()),
                    };
                    let bytes = serde_json::to_vec(&marker).expect("marker serializes");
                    fsutil::write_atomic(&root.join(MARKER_FILE), &bytes, opts.file_mode, sync)?;
                }
                Err(e) => return Err(e),
            }
            fsutil::create_dir(&root.join("mailboxes"), opts.dir_mode)?;
            if sync {
                fsutil::sync_dir(&root)?;
            }
        } else {
            read_marker(&root)?;
            fsutil::ensure_dir(&root.join("mailboxes"))?;
        }
        Ok(Bus {
            inner: Arc::new(BusInner { root, opts }),
        })
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

    /// Opens the directory mailbox `name`; `None` if it does not exist.
    pub(crate) fn mailbox(&self, name: &str) -> Result<Option<Mailbox>> {
        let dir = self.mailboxes_dir().join(name);
        match std::fs::symlink_metadata(&dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(Error::io(
                    "open mailbox",
                    &dir,
                    io::Error::other("not a directory (symlinks are not followed)"),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
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
        if std::fs::symlink_metadata(&dir).is_ok() {
            return Err(exists());
        }
        let opts = &self.inner.opts;
        let tmp = parent.join(format!(".new-{}", uuid::Uuid::now_v7().simple()));
        let built = (|| {
            fsutil::create_dir(&tmp, opts.dir_mode)?;
            let meta = MailboxMeta {
                format: FORMAT_VERSION,
                segment_bytes: opts.segment_bytes,
                max_record_bytes: opts.max_record_bytes,
            };
            let bytes = serde_json::to_vec(&meta).expect("meta serializes");
            fsutil::write_atomic(&tmp.join("mailbox.json"), &bytes, opts.file_mode, false)?;
            fsutil::open_lock(&tmp.join("lock"), opts.file_mode)?;
            for sub in ["log", "keys"] {
                fsutil::create_dir(&tmp.join(sub), opts.dir_mode)?;
            }
            let first = tmp.join("log").join(segment::segment_name(1));
            let seg = fsutil::open_append(&first, opts.file_mode)?;
            if opts.sync() {
                seg.sync_all().ctx("fsync", &first)?;
                for d in ["log", "keys", ""] {
                    fsutil::sync_dir(&tmp.join(d))?;
                }
            }
            Ok(())
        })();
        let renamed = built.and_then(|()| fsutil::rename_new_dir(&tmp, &dir, exists));
        if let Err(e) = renamed {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if opts.sync() {
            fsutil::sync_dir(&parent)?;
        }
        Ok(())
    }

    fn open_mailbox(&self, name: &str) -> Result<Option<OpenMailbox>> {
        Ok(self.mailbox(name)?.map(|m| OpenMailbox {
            path: m.dir().to_owned(),
            max_record_bytes: m.max_record_bytes(),
            imp: MailboxImp::Dir(m),
        }))
    }

    fn mailbox_names(&self) -> Result<Vec<String>> {
        fsutil::list_names(&self.mailboxes_dir(), false)
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
        lease::names(&self.leases_dir())
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
        let opts = &self.inner.opts;
        let dir = self.leases_dir();
        fsutil::create_dir(&dir, opts.dir_mode)?;
        Ok(watch::watch_dirs(&[dir], mode, opts.poll_interval))
    }

    fn doctor(&self, repair: bool) -> Result<DoctorReport> {
        doctor::run(self, repair)
    }
}

fn read_marker(root: &Path) -> Result<()> {
    let path = root.join(MARKER_FILE);
    let bytes = match fsutil::open_read(&path) {
        Ok(file) => {
            let mut bytes = Vec::new();
            io::Read::read_to_end(&mut &file, &mut bytes).ctx("read", &path)?;
            bytes
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(Error::NotABus {
                path: root.to_owned(),
            })
        }
        Err(e) => return Err(Error::io("open", path, e)),
    };
    let marker: Marker = serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
        path: path.clone(),
        line: 1,
        reason: format!("not a valid marker: {e}"),
    })?;
    if marker.format != FORMAT_VERSION {
        return Err(Error::UnsupportedFormat {
            path,
            found: marker.format,
            supported: FORMAT_VERSION,
        });
    }
    Ok(())
}
