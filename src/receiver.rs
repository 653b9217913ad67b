//! Blocking receivers shaped like `crossbeam-channel`: [`Follower`] reads mailboxes,
//! [`Consumer`] claims from a consumer group.
//!
//! # When events are lost, and why nothing is
//!
//! Receivers sleep until a `notify` event on the directories they read (a new record,
//! a state change) or a timer, whichever comes first, and every wake-up re-reads from
//! the receiver's durable position to the end of the file. Events are only hints. An
//! event can be missed: inotify's queue overflows under load (notify reports a
//! *rescan*), the watch limit is reached, the watcher cannot start, or the file system
//! sends none (NFS and other network file systems). None of these loses a message: the
//! timer (the poll interval, 100 ms by default) makes the receiver look again anyway,
//! so a lost event costs at most one poll interval of delay. [`WatchMode::PollOnly`]
//! drops the watcher altogether.

use std::time::{Duration, Instant};

use crate::coalesce::{Decision, Leaders};
use crate::watch::{Watch, WatchMode};
use crate::{
    Bus, Coalesce, Delivery, Error, Filter, Group, Mailbox, Message, Messages, Result, Waker,
};

/// Why [`try_recv`](Follower::try_recv) returned nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TryRecvError {
    /// Nothing is waiting right now.
    #[error("no message is waiting")]
    Empty,
    /// Reading failed.
    #[error(transparent)]
    Bus(#[from] Error),
}

impl TryRecvError {
    /// True when nothing was waiting.
    pub fn is_empty(&self) -> bool {
        matches!(self, TryRecvError::Empty)
    }

    /// True when reading failed.
    pub fn is_bus(&self) -> bool {
        matches!(self, TryRecvError::Bus(_))
    }
}

/// Why [`recv_timeout`](Follower::recv_timeout) returned nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecvTimeoutError {
    /// Nothing arrived in time.
    #[error("timed out waiting for a message")]
    Timeout,
    /// Reading failed.
    #[error(transparent)]
    Bus(#[from] Error),
}

impl RecvTimeoutError {
    /// True when nothing arrived in time.
    pub fn is_timeout(&self) -> bool {
        matches!(self, RecvTimeoutError::Timeout)
    }

    /// True when reading failed.
    pub fn is_bus(&self) -> bool {
        matches!(self, RecvTimeoutError::Bus(_))
    }
}

/// `?` in a function returning [`Result`]: [`TryRecvError::Empty`] becomes
/// [`Error::Empty`].
impl From<TryRecvError> for Error {
    fn from(e: TryRecvError) -> Error {
        match e {
            TryRecvError::Empty => Error::Empty,
            TryRecvError::Bus(e) => e,
        }
    }
}

/// `?` in a function returning [`Result`]: [`RecvTimeoutError::Timeout`] becomes
/// [`Error::Timeout`].
///
/// ```
/// # fn main() -> agentbus::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// use std::time::Duration;
/// let bus = agentbus::Bus::init(dir.path())?;
/// bus.create_mailbox("main")?;
/// let mut rx = bus.follow(&["main"])?;
/// let waited = (|| -> agentbus::Result<agentbus::Envelope> {
///     Ok(rx.recv_timeout(Duration::from_millis(10))?)
/// })();
/// assert!(matches!(waited, Err(agentbus::Error::Timeout)));
/// # Ok(()) }
/// ```
impl From<RecvTimeoutError> for Error {
    fn from(e: RecvTimeoutError) -> Error {
        match e {
            RecvTimeoutError::Timeout => Error::Timeout,
            RecvTimeoutError::Bus(e) => e,
        }
    }
}

/// A `Stream` of a receiver's items, from `into_stream` (feature `tokio`).
#[cfg(feature = "tokio")]
pub struct RecvStream<R, T> {
    next: std::pin::Pin<Box<dyn std::future::Future<Output = (R, Result<T>)> + Send>>,
}

#[cfg(feature = "tokio")]
impl<R, T> std::fmt::Debug for RecvStream<R, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecvStream")
    }
}

#[cfg(feature = "tokio")]
macro_rules! stream_impl {
    ($receiver:ty, $item:ty) => {
        impl $receiver {
            /// Turns the receiver into a `Stream` of items (it never ends on its own).
            pub fn into_stream(self) -> RecvStream<$receiver, $item> {
                RecvStream {
                    next: Box::pin(Self::recv_owned(self)),
                }
            }

            async fn recv_owned(mut self) -> ($receiver, Result<$item>) {
                let item = self.recv_async().await;
                (self, item)
            }
        }

        impl futures_core::Stream for RecvStream<$receiver, $item> {
            type Item = Result<$item>;

            fn poll_next(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<Option<Self::Item>> {
                match self.next.as_mut().poll(cx) {
                    std::task::Poll::Ready((rx, item)) => {
                        self.next = Box::pin(<$receiver>::recv_owned(rx));
                        std::task::Poll::Ready(Some(item))
                    }
                    std::task::Poll::Pending => std::task::Poll::Pending,
                }
            }
        }
    };
}

#[cfg(feature = "tokio")]
stream_impl!(Follower, Envelope);
#[cfg(feature = "tokio")]
stream_impl!(Consumer, Delivery);

/// A message read by a [`Follower`], with the mailbox it came from.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Envelope {
    /// The mailbox.
    pub mailbox: String,
    /// The message.
    pub message: Message,
}

/// How long a receiver keeps retrying while the server is unavailable (an
/// [`Error::is_retryable`] error, such as a JetStream cluster electing a new leader),
/// before it returns the error: longer than a failover takes (README "Scaling out").
pub(crate) const OUTAGE_PATIENCE: Duration = Duration::from_secs(30);

/// How soon a receiver looks again after a retryable error.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// A receiver's view of an outage: retryable errors are waited out (logged once) for up
/// to [`OUTAGE_PATIENCE`], or until the caller's deadline; others are returned at once.
#[derive(Debug, Default)]
struct Outage {
    since: Option<Instant>,
}

impl Outage {
    /// The item of a look, `None` for nothing (yet), or the error to return.
    fn look<T>(
        &mut self,
        looked: Result<Option<T>>,
        deadline: Instant,
    ) -> std::result::Result<Option<T>, RecvTimeoutError> {
        match looked {
            Ok(item) => {
                if self.since.take().is_some() {
                    log::info!("agentbus: the bus answers again; receiving goes on");
                }
                Ok(item)
            }
            Err(e) if e.is_retryable() => {
                let now = Instant::now();
                let since = *self.since.get_or_insert_with(|| {
                    log::warn!("agentbus: {e}; retrying for up to {OUTAGE_PATIENCE:?}");
                    now
                });
                if now.duration_since(since) >= OUTAGE_PATIENCE || now >= deadline {
                    return Err(RecvTimeoutError::Bus(e));
                }
                Ok(None)
            }
            Err(e) => Err(RecvTimeoutError::Bus(e)),
        }
    }

    /// When to look again, during an outage.
    fn retry_at(&self) -> Option<Instant> {
        self.since.map(|_| Instant::now() + RETRY_PAUSE)
    }
}

/// The receiving methods, the same on both receivers.
macro_rules! receiver_methods {
    ($item:ty) => {
        /// Takes the next item if one is waiting; never blocks (except briefly on a
        /// file lock).
        ///
        /// # Errors
        ///
        /// [`TryRecvError::Empty`] when nothing is waiting; [`TryRecvError::Bus`] when
        /// reading failed.
        pub fn try_recv(&mut self) -> std::result::Result<$item, TryRecvError> {
            self.poll()?.ok_or(TryRecvError::Empty)
        }

        /// Blocks until an item arrives.
        ///
        /// While the bus is unavailable (an [`Error::is_retryable`] error: a JetStream
        /// cluster electing a new leader after a server was lost), it keeps looking
        /// every 200 ms for up to 30 s, so a failover only delays it.
        ///
        /// # Errors
        ///
        /// The crate error when reading fails, or when the bus stayed unavailable for
        /// 30 s.
        pub fn recv(&mut self) -> Result<$item> {
            loop {
                match self.recv_deadline(Instant::now() + Duration::from_secs(3600)) {
                    Ok(item) => return Ok(item),
                    Err(RecvTimeoutError::Timeout) => continue,
                    Err(RecvTimeoutError::Bus(e)) => return Err(e),
                }
            }
        }

        /// Blocks until an item arrives or `timeout` passes.
        ///
        /// # Errors
        ///
        /// [`RecvTimeoutError::Timeout`], or [`RecvTimeoutError::Bus`].
        pub fn recv_timeout(
            &mut self,
            timeout: Duration,
        ) -> std::result::Result<$item, RecvTimeoutError> {
            self.recv_deadline(Instant::now() + timeout)
        }

        /// Blocks until an item arrives or `deadline` passes. A retryable error (the
        /// bus unavailable for a moment) is retried as by [`recv`](Self::recv), until
        /// `deadline`.
        ///
        /// # Errors
        ///
        /// [`RecvTimeoutError::Timeout`], or [`RecvTimeoutError::Bus`] (also when the
        /// bus was still unavailable at `deadline`).
        pub fn recv_deadline(
            &mut self,
            deadline: Instant,
        ) -> std::result::Result<$item, RecvTimeoutError> {
            let mut outage = Outage::default();
            loop {
                // Read the hint generation before looking, so a change that lands
                // between the look and the wait still wakes us.
                let seen = self.watch.generation();
                let until = match outage.look(self.poll(), deadline)? {
                    Some(item) => return Ok(item),
                    None => outage.retry_at(),
                };
                if Instant::now() >= deadline {
                    return Err(RecvTimeoutError::Timeout);
                }
                let until = until
                    .or_else(|| self.due())
                    .map_or(deadline, |d| d.min(deadline));
                self.watch.wait(seen, Some(until));
            }
        }

        /// A blocking iterator: each `next()` is a [`recv`](Self::recv).
        pub fn iter(&mut self) -> impl Iterator<Item = Result<$item>> + '_ {
            std::iter::from_fn(move || Some(self.recv()))
        }

        /// A non-blocking iterator over what is waiting now; ends when nothing is (or
        /// after an error, which it yields).
        pub fn try_iter(&mut self) -> impl Iterator<Item = Result<$item>> + '_ {
            let mut failed = false;
            std::iter::from_fn(move || {
                if failed {
                    return None;
                }
                match self.poll() {
                    Ok(item) => item.map(Ok),
                    Err(e) => {
                        failed = true;
                        Some(Err(e))
                    }
                }
            })
        }

        /// Waits for the next item without blocking the thread: the task sleeps until
        /// an event, the poll interval or a due redelivery. The look itself (a few
        /// syscalls; for a consumer, a brief wait on the group's file lock) runs inline.
        ///
        /// # Errors
        ///
        /// The crate error when reading fails.
        #[cfg(feature = "tokio")]
        pub async fn recv_async(&mut self) -> Result<$item> {
            let mut outage = Outage::default();
            loop {
                let seen = self.watch.generation();
                let far = Instant::now() + Duration::from_secs(3600);
                let retry = match outage.look(self.poll(), far).map_err(Error::from)? {
                    Some(item) => return Ok(item),
                    None => outage.retry_at(),
                };
                self.watch
                    .wait_async(seen, retry.or_else(|| self.due()))
                    .await;
            }
        }

        /// A handle that wakes this receiver by hand (see [`WatchMode::Manual`]).
        pub fn waker(&self) -> Waker {
            Waker(self.watch.hints().clone())
        }

        /// Whether file-system events are arriving (false when polling or manual).
        pub fn has_events(&self) -> bool {
            self.watch.has_events()
        }
    };
}

/// Follows one or more mailboxes, in seq order per mailbox, without changing any
/// state: from [`Bus::follow`].
///
/// ```
/// # fn main() -> agentbus::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// use std::time::Duration;
/// use agentbus::{Bus, NewMessage};
/// let bus = Bus::init(dir.path())?;
/// let main = bus.create_mailbox("main")?;
/// let mut rx = bus.follow(&["main"])?.of_type("draft.ready");
///
/// let writer = std::thread::spawn(move || {
///     main.send(NewMessage::new("draft.ready").body("chapter 1")).unwrap();
/// });
/// let got = rx.recv_timeout(Duration::from_secs(10)).expect("woken by the send");
/// assert_eq!(got.message.body.as_deref(), Some("chapter 1"));
/// writer.join().unwrap();
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Follower {
    sources: Vec<(Mailbox, Messages)>,
    filter: Filter,
    turn: usize,
    watch: Watch,
    /// How to coalesce, and the leaders of each followed mailbox (seqs are per mailbox).
    coalesce: Option<(Coalesce, Vec<Leaders>)>,
    coalesced: u64,
}

impl Bus {
    /// Follows `mailboxes` from their current end: only messages sent from now on.
    /// Use [`Follower::from_seq`] to start earlier.
    ///
    /// # Errors
    ///
    /// [`Error::MailboxNotFound`], [`Error::InvalidName`], [`Error::Io`].
    pub fn follow(&self, mailboxes: &[&str]) -> Result<Follower> {
        self.follow_mode(mailboxes, self.inner.opts.watch_mode)
    }

    /// Like [`follow`](Self::follow) with an explicit [`WatchMode`] (for example
    /// [`WatchMode::Manual`] in tests).
    ///
    /// # Errors
    ///
    /// As [`follow`](Self::follow).
    pub fn follow_with(&self, mailboxes: &[&str], mode: WatchMode) -> Result<Follower> {
        self.follow_mode(mailboxes, mode)
    }

    fn follow_mode(&self, mailboxes: &[&str], mode: WatchMode) -> Result<Follower> {
        let mut sources = Vec::new();
        for name in mailboxes {
            let mb = self.mailbox(name)?;
            let next = mb.last_seq()? + 1;
            let messages = mb.messages().from_seq(next);
            sources.push((mb, messages));
        }
        Ok(Follower {
            sources,
            filter: Filter::new(),
            turn: 0,
            watch: self.inner.imp.watch_mailboxes(mailboxes, mode),
            coalesce: None,
            coalesced: 0,
        })
    }
}

impl Follower {
    /// Starts every followed mailbox at `seq` instead of its end.
    pub fn from_seq(mut self, seq: u64) -> Self {
        for (mb, m) in &mut self.sources {
            *m = mb.messages().from_seq(seq);
        }
        self
    }

    /// Only messages of this type (call again for several); `kind` may be a pattern
    /// such as `draft.>` ([`Filter`], "Type patterns").
    pub fn of_type(mut self, kind: impl Into<String>) -> Self {
        self.filter = self.filter.of_type(kind);
        self
    }

    /// Every message but those of this type (call again for several), including
    /// types added later; `kind` may be a pattern.
    ///
    /// ```
    /// # fn main() -> agentbus::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use std::time::Duration;
    /// use agentbus::{Bus, NewMessage};
    /// let bus = Bus::init(dir.path())?;
    /// let main = bus.create_mailbox("main")?;
    /// let mut rx = bus.follow(&["main"])?.not_type("debug.>");
    /// main.send(NewMessage::new("debug.trace"))?;
    /// main.send(NewMessage::new("task"))?;
    /// let got = rx.recv_timeout(Duration::from_secs(10)).expect("the task");
    /// assert_eq!(got.message.kind, "task");
    /// # Ok(()) }
    /// ```
    pub fn not_type(mut self, kind: impl Into<String>) -> Self {
        self.filter = self.filter.not_type(kind);
        self
    }

    /// Only messages passing `filter` (replacing the filter so far).
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filter = filter;
        self
    }

    /// Coalesce bursts, as a group does ([`Coalesce`] has the rule): of the messages
    /// passing the filter with the same key sent within the window, only the first is
    /// received. Decided per mailbox, by this follower alone and in memory: nothing is
    /// recorded (a follower changes no state), the log keeps every message, and
    /// [`coalesced`](Self::coalesced) counts what was passed over. For coalescing that
    /// survives restarts and is shared by competing consumers, use
    /// [`GroupOptions::coalesce`](crate::GroupOptions::coalesce).
    ///
    /// ```
    /// # fn main() -> agentbus::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use std::time::Duration;
    /// use agentbus::{Bus, Coalesce, CoalesceBy, NewMessage};
    /// let bus = Bus::init(dir.path())?;
    /// let main = bus.create_mailbox("main")?;
    /// let by_host = Coalesce::new(CoalesceBy::Header("host".into()), Duration::from_secs(30));
    /// let mut rx = bus.follow(&["main"])?.coalesce(by_host);
    /// for host in ["web-1", "web-1", "web-2", "web-1"] {
    ///     main.send(NewMessage::new("alert").header("host", host))?;
    /// }
    /// let got: Vec<u64> = rx.try_iter().map(|e| e.map(|e| e.message.seq)).collect::<Result<_, _>>()?;
    /// assert_eq!(got, [1, 3]);
    /// assert_eq!(rx.coalesced(), 2);
    /// # Ok(()) }
    /// ```
    pub fn coalesce(mut self, coalesce: Coalesce) -> Self {
        let leaders = vec![Leaders::default(); self.sources.len()];
        self.coalesce = Some((coalesce, leaders));
        self
    }

    /// How many messages [`coalesce`](Self::coalesce) passed over so far.
    pub fn coalesced(&self) -> u64 {
        self.coalesced
    }

    /// Whether coalescing passes over `message` of source `k` (and if not, what it
    /// remembers of it).
    fn coalesces(&mut self, k: usize, message: &Message) -> bool {
        let Some((c, leaders)) = &mut self.coalesce else {
            return false;
        };
        match c.decide(&leaders[k], message) {
            Decision::Coalesce(_) => {
                self.coalesced += 1;
                true
            }
            Decision::Lead { key, quiet_until } => {
                let ts = crate::clock::ts_ms(message.ts);
                leaders[k].lead(&key, message.seq, ts, quiet_until);
                false
            }
            Decision::Deliver => false,
        }
    }

    fn poll(&mut self) -> Result<Option<Envelope>> {
        let n = self.sources.len();
        for i in 0..n {
            let k = (self.turn + i) % n;
            while let Some(item) = self.sources[k].1.next() {
                let message = item?;
                if self.filter.matches(&message) && !self.coalesces(k, &message) {
                    let mailbox = &self.sources[k].0;
                    self.turn = (k + 1) % n;
                    return Ok(Some(Envelope {
                        mailbox: mailbox.name().to_owned(),
                        message,
                    }));
                }
            }
        }
        Ok(None)
    }

    fn due(&self) -> Option<Instant> {
        None
    }

    receiver_methods!(Envelope);
}

/// Claims messages of a consumer group as they arrive: from [`Group::consumer`].
///
/// ```
/// # fn main() -> agentbus::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// use std::time::Duration;
/// use agentbus::{Bus, NewMessage};
/// let bus = Bus::init(dir.path())?;
/// let jobs = bus.create_mailbox("jobs")?;
/// let mut worker = jobs.create_group("workers")?.consumer("worker-1")?;
/// jobs.send(NewMessage::new("job").body("resize"))?;
/// let job = worker.recv_timeout(Duration::from_secs(10)).expect("a job");
/// job.ack()?;
/// assert!(worker.try_recv().unwrap_err().is_empty());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Consumer {
    group: Group,
    name: String,
    visibility: Duration,
    watch: Watch,
}

impl Group {
    /// A receiver that claims for `consumer` with the group's visibility timeout.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] for a bad consumer name.
    pub fn consumer(&self, consumer: &str) -> Result<Consumer> {
        self.consumer_with(consumer, self.mailbox().bus().opts.watch_mode)
    }

    /// Like [`consumer`](Self::consumer) with an explicit [`WatchMode`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] for a bad consumer name.
    pub fn consumer_with(&self, consumer: &str, mode: WatchMode) -> Result<Consumer> {
        crate::validate_name("consumer", consumer)?;
        Ok(Consumer {
            group: self.clone(),
            name: consumer.to_owned(),
            visibility: self.visibility(),
            watch: self.imp().watch(mode),
        })
    }
}

impl Consumer {
    /// Claims with this visibility timeout instead of the group's.
    #[must_use]
    pub fn visibility(mut self, timeout: Duration) -> Self {
        self.visibility = timeout;
        self
    }

    /// The group.
    pub fn group(&self) -> &Group {
        &self.group
    }

    fn poll(&mut self) -> Result<Option<Delivery>> {
        Ok(self.group.claim_for(&self.name, 1, self.visibility)?.pop())
    }

    /// When a nacked or expired message becomes due again, if that is the next thing
    /// to wake for (redeliveries produce no file-system event).
    fn due(&self) -> Option<Instant> {
        let due_ms = self.group.imp().next_due_ms().ok().flatten()?;
        let wait = due_ms.saturating_sub(crate::clock::now_ms()).max(0) as u64;
        Some(Instant::now() + Duration::from_millis(wait))
    }

    receiver_methods!(Delivery);
}
