//! The bus: a directory holding mailboxes (and later groups and leases).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::IoContext;
use crate::mailbox::{Mailbox, MailboxMeta};
use crate::watch::WatchMode;
use crate::{fsutil, log, validate_name, Error, Result};

/// The on-disk format major version this build reads and writes.
pub const FORMAT_VERSION: u64 = 1;

/// Name of the marker file at the root of a bus directory.
pub const MARKER_FILE: &str = "agentbus.json";

/// Default record limit: 1 MiB per record, newline included.
pub const DEFAULT_MAX_RECORD_BYTES: usize = 1024 * 1024;

/// Default interval of the polling fallback.
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Default size at which a mailbox's log rolls over to a new segment.
pub const DEFAULT_SEGMENT_BYTES: u64 = 16 * 1024 * 1024;

/// When a write counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// `fdatasync` after every append, plus a directory fsync when a file is created:
    /// a returned receipt survives power loss. The default.
    #[default]
    Sync,
    /// The record is handed to the kernel with `write()` before returning (no user-space
    /// buffering), so it survives a crash of the process, but not of the machine.
    Flush,
}

#[derive(Debug, Clone)]
pub(crate) struct Options {
    pub(crate) durability: Durability,
    pub(crate) file_mode: u32,
    pub(crate) dir_mode: u32,
    pub(crate) max_record_bytes: usize,
    pub(crate) segment_bytes: u64,
    pub(crate) agent: String,
    pub(crate) watch_mode: WatchMode,
    pub(crate) poll_interval: Duration,
}

impl Options {
    pub(crate) fn sync(&self) -> bool {
        self.durability == Durability::Sync
    }
}

#[derive(Debug)]
pub(crate) struct BusInner {
    /// The bus directory; for a NATS bus, its URL.
    pub(crate) root: PathBuf,
    pub(crate) opts: Options,
    /// The JetStream connection of a bus opened from a `nats://` URL.
    #[cfg(feature = "nats")]
    pub(crate) nats: Option<Arc<crate::nats::NatsBus>>,
}

impl BusInner {
    /// The JetStream connection, if this bus lives on NATS.
    #[cfg(feature = "nats")]
    pub(crate) fn remote(&self) -> Option<&Arc<crate::nats::NatsBus>> {
        self.nats.as_ref()
    }

    pub(crate) fn mailboxes_dir(&self) -> PathBuf {
        self.root.join("mailboxes")
    }
}

/// A handle on a bus directory. Cheap to clone; `Send + Sync`.
///
/// ```
/// # fn main() -> agentbus::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// use agentbus::{Bus, NewMessage};
///
/// let bus = Bus::init(dir.path().join("bus"))?;
/// let inbox = bus.create_mailbox("main")?;
/// let receipt = inbox.send(NewMessage::new("task").from("writer").body("draft ready"))?;
/// assert_eq!(receipt.seq, 1);
///
/// let first = inbox.messages().next().unwrap()?;
/// assert_eq!(first.body.as_deref(), Some("draft ready"));
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Bus {
    pub(crate) inner: Arc<BusInner>,
}

/// Options for opening a bus; see [`Bus::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct BusBuilder {
    opts: Options,
}

impl Default for BusBuilder {
    fn default() -> Self {
        BusBuilder {
            opts: Options {
                durability: Durability::Sync,
                file_mode: 0o600,
                dir_mode: 0o700,
                max_record_bytes: DEFAULT_MAX_RECORD_BYTES,
                segment_bytes: DEFAULT_SEGMENT_BYTES,
                agent: "anonymous".to_owned(),
                watch_mode: WatchMode::Auto,
                poll_interval: DEFAULT_POLL_INTERVAL,
            },
        }
    }
}

impl BusBuilder {
    /// When a send counts as done; default [`Durability::Sync`].
    pub fn durability(mut self, durability: Durability) -> Self {
        self.opts.durability = durability;
        self
    }

    /// Mode of files this handle creates; default `0o600`. Use `0o660` (with a matching
    /// [`dir_mode`](Self::dir_mode)) to share a bus within a Unix group.
    pub fn file_mode(mut self, mode: u32) -> Self {
        self.opts.file_mode = mode & 0o7777;
        self
    }

    /// Mode of directories this handle creates; default `0o700`.
    pub fn dir_mode(mut self, mode: u32) -> Self {
        self.opts.dir_mode = mode & 0o7777;
        self
    }

    /// Largest record, newline included, of mailboxes created through this handle;
    /// default 1 MiB. Stored with the mailbox, so every writer and reader of it agrees.
    pub fn max_record_bytes(mut self, bytes: usize) -> Self {
        self.opts.max_record_bytes = bytes.max(256);
        self
    }

    /// Segment size for mailboxes created through this handle; default 16 MiB. Stored
    /// with the mailbox, so every writer rolls over at the same point.
    pub fn segment_bytes(mut self, bytes: u64) -> Self {
        self.opts.segment_bytes = bytes.max(1);
        self
    }

    /// The agent name used as `from` when a message does not set one; default
    /// `"anonymous"`. Checked when the bus is opened.
    pub fn agent(mut self, name: impl Into<String>) -> Self {
        self.opts.agent = name.into();
        self
    }

    /// How waiting receivers and lease contenders learn about changes; default
    /// [`WatchMode::Auto`] (`notify`, plus the timer). Choose [`WatchMode::PollOnly`] on
    /// network file systems.
    pub fn watch_mode(mut self, mode: WatchMode) -> Self {
        self.opts.watch_mode = mode;
        self
    }

    /// How often waiters re-check even without an event: the upper bound on the delay a
    /// lost event can cause; default 100 ms.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.opts.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Opens an existing bus.
    ///
    /// # Errors
    ///
    /// [`Error::NotABus`] when `path` has no `agentbus.json`;
    /// [`Error::UnsupportedFormat`] when it was written by an incompatible version;
    /// [`Error::InvalidName`] for a bad agent name; [`Error::Io`] otherwise.
    pub fn open(self, path: impl AsRef<Path>) -> Result<Bus> {
        validate_name("agent", &self.opts.agent)?;
        if let Some(url) = nats_url(path.as_ref()) {
            return self.connect(url);
        }
        let root = path.as_ref().to_owned();
        read_marker(&root)?;
        fsutil::ensure_dir(&root.join("mailboxes"))?;
        Ok(self.into_bus(root))
    }

    /// Creates the bus directory if needed (like `mkdir -p`), then opens it. Safe to
    /// call concurrently and on an existing bus.
    ///
    /// # Errors
    ///
    /// As [`open`](Self::open), plus [`Error::Io`] if the directory cannot be created.
    pub fn init(self, path: impl AsRef<Path>) -> Result<Bus> {
        validate_name("agent", &self.opts.agent)?;
        if let Some(url) = nats_url(path.as_ref()) {
            return self.connect(url);
        }
        let root = path.as_ref().to_owned();
        let sync = self.opts.sync();
        if let Some(parent) = root.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).ctx("create directory", parent)?;
        }
        fsutil::create_dir(&root, self.opts.dir_mode)?;
        match read_marker(&root) {
            Ok(()) => {}
            Err(Error::NotABus { .. }) => {
                let marker = Marker {
                    format: FORMAT_VERSION,
                    created: Some(time::OffsetDateTime::now_utc()),
                };
                let bytes = serde_json::to_vec(&marker).expect("marker serializes");
                fsutil::write_atomic(&root.join(MARKER_FILE), &bytes, self.opts.file_mode, sync)?;
            }
            Err(e) => return Err(e),
        }
        fsutil::create_dir(&root.join("mailboxes"), self.opts.dir_mode)?;
        if sync {
            fsutil::sync_dir(&root)?;
        }
        Ok(self.into_bus(root))
    }

    fn into_bus(self, root: PathBuf) -> Bus {
        Bus {
            inner: Arc::new(BusInner {
                root,
                opts: self.opts,
                #[cfg(feature = "nats")]
                nats: None,
            }),
        }
    }

    /// A bus on a NATS JetStream server (feature `nats`). Nothing needs creating: the
    /// streams, consumers and KV bucket are made as mailboxes, groups and leases are.
    #[cfg(feature = "nats")]
    fn connect(self, url: &str) -> Result<Bus> {
        let nats = crate::nats::NatsBus::connect(url)?;
        Ok(Bus {
            inner: Arc::new(BusInner {
                root: PathBuf::from(url),
                opts: self.opts,
                nats: Some(Arc::new(nats)),
            }),
        })
    }

    #[cfg(not(feature = "nats"))]
    fn connect(self, _url: &str) -> Result<Bus> {
        Err(Error::Unsupported {
            operation: "a nats:// bus",
            backend: "directory",
            hint: "build agentbus with the `nats` feature",
        })
    }
}

/// The URL, when `path` is a `nats://` URL rather than a directory.
fn nats_url(path: &Path) -> Option<&str> {
    path.to_str().filter(|s| s.starts_with("nats://"))
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

impl Bus {
    /// Options for opening a bus.
    ///
    /// ```
    /// # fn main() -> agentbus::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use agentbus::{Bus, Durability};
    /// let bus = Bus::builder()
    ///     .durability(Durability::Flush)
    ///     .agent("reviewer")
    ///     .init(dir.path())?;
    /// # Ok(()) }
    /// ```
    pub fn builder() -> BusBuilder {
        BusBuilder::default()
    }

    /// Opens an existing bus with default options.
    ///
    /// # Errors
    ///
    /// See [`BusBuilder::open`].
    pub fn open(path: impl AsRef<Path>) -> Result<Bus> {
        Bus::builder().open(path)
    }

    /// Creates (if needed) and opens a bus with default options.
    ///
    /// # Errors
    ///
    /// See [`BusBuilder::init`].
    pub fn init(path: impl AsRef<Path>) -> Result<Bus> {
        Bus::builder().init(path)
    }

    /// The bus directory (for a bus on NATS, the URL it was opened with).
    pub fn path(&self) -> &Path {
        &self.inner.root
    }

    /// The configured durability.
    pub fn durability(&self) -> Durability {
        self.inner.opts.durability
    }

    /// Creates a mailbox. Creation is atomic: the mailbox is built under a temporary
    /// name and renamed into place, so other processes see all of it or nothing.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`], [`Error::MailboxExists`], [`Error::Io`].
    pub fn create_mailbox(&self, name: &str) -> Result<Mailbox> {
        validate_name("mailbox", name)?;
        #[cfg(feature = "nats")]
        if let Some(nats) = self.inner.remote() {
            if !nats.create_stream(name, self.inner.opts.max_record_bytes)? {
                return Err(Error::MailboxExists {
                    name: name.to_owned(),
                });
            }
            return self.mailbox(name);
        }
        let parent = self.inner.mailboxes_dir();
        let dir = parent.join(name);
        if std::fs::symlink_metadata(&dir).is_ok() {
            return Err(Error::MailboxExists {
                name: name.to_owned(),
            });
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
            let first = tmp.join("log").join(log::segment_name(1));
            let seg = fsutil::open_append(&first, opts.file_mode)?;
            if opts.sync() {
                seg.sync_all().ctx("fsync", &first)?;
                for d in ["log", "keys", ""] {
                    fsutil::sync_dir(&tmp.join(d))?;
                }
            }
            Ok(())
        })();
        let renamed = built.and_then(|()| match std::fs::rename(&tmp, &dir) {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST))
                    || e.kind() == io::ErrorKind::AlreadyExists =>
            {
                Err(Error::MailboxExists {
                    name: name.to_owned(),
                })
            }
            Err(e) => Err(Error::io("rename", &dir, e)),
        });
        if let Err(e) = renamed {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        if opts.sync() {
            fsutil::sync_dir(&parent)?;
        }
        self.mailbox(name)
    }

    /// Opens an existing mailbox.
    ///
    /// # Errors
    ///
    /// [`Error::MailboxNotFound`] (listing the mailboxes that exist),
    /// [`Error::InvalidName`], [`Error::Io`].
    pub fn mailbox(&self, name: &str) -> Result<Mailbox> {
        validate_name("mailbox", name)?;
        #[cfg(feature = "nats")]
        if let Some(nats) = self.inner.remote() {
            return Mailbox::open_nats(self.inner.clone(), nats.clone(), name, || self.mailboxes());
        }
        Mailbox::open(self.inner.clone(), name, || self.mailboxes())
    }

    /// Opens a mailbox, creating it if it does not exist yet.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`], [`Error::Io`].
    pub fn create_or_open_mailbox(&self, name: &str) -> Result<Mailbox> {
        match self.create_mailbox(name) {
            Err(Error::MailboxExists { .. }) => self.mailbox(name),
            other => other,
        }
    }

    /// The names of all mailboxes, sorted.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the mailboxes directory cannot be listed.
    pub fn mailboxes(&self) -> Result<Vec<String>> {
        #[cfg(feature = "nats")]
        if let Some(nats) = self.inner.remote() {
            return nats.mailbox_names();
        }
        fsutil::list_names(&self.inner.mailboxes_dir(), false)
    }
}
