//! The bus: where mailboxes and leases live (a directory, or a JetStream server).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::backend::{self, BusImp, Options};
use crate::mailbox::Mailbox;
use crate::watch::WatchMode;
use crate::{validate_name, Error, Result};

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

#[derive(Debug)]
pub(crate) struct BusInner {
    /// The bus directory; for a bus on NATS, its URL.
    pub(crate) root: PathBuf,
    pub(crate) opts: Options,
    pub(crate) imp: BusImp,
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

    /// Applies the environment the CLI reads, where set: `AGENTBUS_AGENT` (the agent
    /// name, [`agent`](Self::agent)) and `AGENTBUS_DURABILITY` (`sync` or `flush`), so
    /// a Rust agent and a shell script in one project share a bus and an identity
    /// without glue code. See also [`Bus::from_env`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidSetting`] for an `AGENTBUS_DURABILITY` other than `sync` or
    /// `flush`.
    pub fn with_env(mut self) -> Result<Self> {
        if let Ok(agent) = std::env::var("AGENTBUS_AGENT") {
            self.opts.agent = agent;
        }
        if let Ok(value) = std::env::var("AGENTBUS_DURABILITY") {
            self.opts.durability = match value.as_str() {
                "sync" => Durability::Sync,
                "flush" => Durability::Flush,
                _ => {
                    return Err(Error::InvalidSetting {
                        setting: "AGENTBUS_DURABILITY",
                        reason: format!("must be sync or flush, not {value:?}"),
                    })
                }
            };
        }
        Ok(self)
    }

    /// Opens an existing bus.
    ///
    /// # Errors
    ///
    /// [`Error::NotABus`] when `path` has no `agentbus.json`;
    /// [`Error::UnsupportedFormat`] when it was written by an incompatible version;
    /// [`Error::InvalidName`] for a bad agent name; [`Error::Io`] otherwise.
    pub fn open(self, path: impl AsRef<Path>) -> Result<Bus> {
        self.open_or_init(path.as_ref(), false)
    }

    /// Creates the bus directory if needed (like `mkdir -p`), then opens it. Safe to
    /// call concurrently and on an existing bus.
    ///
    /// # Errors
    ///
    /// As [`open`](Self::open), plus [`Error::Io`] if the directory cannot be created.
    pub fn init(self, path: impl AsRef<Path>) -> Result<Bus> {
        self.open_or_init(path.as_ref(), true)
    }

    fn open_or_init(self, path: &Path, create: bool) -> Result<Bus> {
        validate_name("agent", &self.opts.agent)?;
        let imp = backend::open_bus(path, &self.opts, create)?;
        Ok(Bus {
            inner: Arc::new(BusInner {
                root: path.to_owned(),
                opts: self.opts,
                imp,
            }),
        })
    }
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

    /// Opens the bus the CLI would: the directory (or `nats://` URL) in
    /// `AGENTBUS_DIR`, else `.agentbus`, with the agent name and durability from the
    /// environment ([`BusBuilder::with_env`]).
    ///
    /// ```no_run
    /// # fn main() -> agentbus::Result<()> {
    /// // AGENTBUS_DIR=/srv/project/.agentbus AGENTBUS_AGENT=reviewer ./my-agent
    /// let bus = agentbus::Bus::from_env()?;
    /// let inbox = bus.mailbox("reviewer")?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As [`BusBuilder::with_env`] and [`BusBuilder::open`].
    pub fn from_env() -> Result<Bus> {
        let dir = std::env::var_os("AGENTBUS_DIR").unwrap_or_else(|| ".agentbus".into());
        Bus::builder().with_env()?.open(PathBuf::from(dir))
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
        self.inner.imp.create_mailbox(name)?;
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
        match self.inner.imp.open_mailbox(name)? {
            Some(open) => Ok(Mailbox::new(self.inner.clone(), name, open)),
            None => Err(Error::MailboxNotFound {
                name: name.to_owned(),
                existing: self.mailboxes()?,
            }),
        }
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
        self.inner.imp.mailbox_names()
    }
}
