//! Mailboxes: append-only logs of messages.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;

use crate::backend::{self, MailboxImp, OpenMailbox};
use crate::bus::BusInner;
use crate::read::Messages;
use crate::{NewMessage, Receipt, Result};

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
    path: PathBuf,
    max_record_bytes: usize,
    imp: MailboxImp,
}

impl Mailbox {
    pub(crate) fn new(bus: Arc<BusInner>, name: &str, open: OpenMailbox) -> Mailbox {
        Mailbox {
            inner: Arc::new(MailboxInner {
                bus,
                name: name.to_owned(),
                path: open.path,
                max_record_bytes: open.max_record_bytes,
                imp: open.imp,
            }),
        }
    }

    pub(crate) fn bus(&self) -> &Arc<BusInner> {
        &self.inner.bus
    }

    pub(crate) fn imp(&self) -> &MailboxImp {
        &self.inner.imp
    }

    /// The largest record this mailbox accepts, newline included (fixed when it was
    /// created).
    pub fn max_record_bytes(&self) -> usize {
        self.inner.max_record_bytes
    }

    /// The seq of the oldest message still stored (compaction removes older ones).
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io).
    pub fn first_seq(&self) -> Result<u64> {
        self.inner.imp.first_seq()
    }

    /// The seq of the newest complete record, 0 for an empty mailbox. Reads only the
    /// end of the newest segment. A damaged last record counts (readers report it as
    /// [`Error::Corrupt`](crate::Error::Corrupt) at its seq and go on), so the intact
    /// records before it stay readable and followable.
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io).
    pub fn last_seq(&self) -> Result<u64> {
        self.inner.imp.last_seq()
    }

    /// The mailbox name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The mailbox directory (on NATS: `<url>/<name>`, which names it in messages).
    pub fn path(&self) -> &Path {
        &self.inner.path
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
    /// [`Error::InvalidName`](crate::Error::InvalidName) or
    /// [`Error::InvalidMessage`](crate::Error::InvalidMessage) for bad fields,
    /// [`Error::RecordTooLarge`](crate::Error::RecordTooLarge) over the record limit
    /// (nothing written), [`Error::Corrupt`](crate::Error::Corrupt) if the last record
    /// of the log is damaged (run `doctor`), [`Error::Io`](crate::Error::Io) if the
    /// append or the sync fails. A failed sync is reported, never retried: the record
    /// may or may not be on disk.
    pub fn send(&self, message: NewMessage) -> Result<Receipt> {
        let prepared = vec![self.prepare(message)?];
        let mut receipts = self.inner.imp.append(prepared)?;
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
        self.inner.imp.append(prepared)
    }

    /// Reads the mailbox from the start, without changing any state. Narrow it with the
    /// methods of [`Messages`].
    pub fn messages(&self) -> Messages {
        Messages::new(self.inner.imp.reader())
    }

    /// The receipt of the message sent with idempotency `key`, if any (the index is
    /// brought up to date first, as for a keyed send).
    pub(crate) fn find_key(&self, key: &str) -> Result<Option<(u64, Uuid)>> {
        self.inner.imp.find_key(key)
    }

    /// Validates and serializes a message; no lock is held.
    fn prepare(&self, message: NewMessage) -> Result<backend::Prepared> {
        backend::prepare(
            message,
            &self.inner.bus.opts.agent,
            &*self.inner.imp,
            self.inner.max_record_bytes,
        )
    }
}
