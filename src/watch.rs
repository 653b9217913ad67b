//! Wake-ups: hints from a backend (a `notify` watcher on directories, a JetStream
//! subscription), with a timer fallback.
//!
//! Every wake-up is only a hint: whoever waits re-reads durable state (a file from its
//! stored offset, a lease file, a stream) after waking, so an event that never arrives
//! (dropped, queue overflow, a file system without events) can only delay a wake-up by
//! at most the poll interval, never lose one.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::backend::WatchSource;

/// How a waiter learns that something changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum WatchMode {
    /// Watch with `notify` (inotify on Linux) and also re-check on a timer; falls back to
    /// polling alone, with a logged warning, when the watcher cannot start (for example
    /// when the inotify watch limit is reached). The default.
    #[default]
    Auto,
    /// Re-check on a timer only: for network file systems, which deliver no events.
    PollOnly,
    /// No events and no timer: waiters wake only when told to, through a [`Waker`].
    /// For tests that need to control exactly when a receiver looks.
    Manual,
}

/// Wakes a waiting receiver by hand (any mode; the only way in [`WatchMode::Manual`]).
/// Cheap to clone, `Send + Sync`.
#[derive(Debug, Clone)]
pub struct Waker(pub(crate) Arc<Hints>);

impl Waker {
    /// Makes the receiver look again now.
    pub fn wake(&self) {
        self.0.bump();
    }
}

/// A counter bumped on every hint, with a condvar to wait for the next bump.
#[derive(Debug, Default)]
pub(crate) struct Hints {
    generation: Mutex<u64>,
    changed: Condvar,
    #[cfg(feature = "tokio")]
    async_changed: tokio::sync::Notify,
}

impl Hints {
    pub(crate) fn bump(&self) {
        let mut g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        *g += 1;
        self.changed.notify_all();
        #[cfg(feature = "tokio")]
        self.async_changed.notify_waiters();
    }

    pub(crate) fn generation(&self) -> u64 {
        *self.generation.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the generation differs from `seen` or `until` passes.
    fn wait(&self, seen: u64, until: Instant) -> u64 {
        let mut g = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        while *g == seen {
            let now = Instant::now();
            if now >= until {
                break;
            }
            g = self
                .changed
                .wait_timeout(g, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *g
    }
}

/// What a waiter sleeps on: hints from a backend's source, and the timer.
#[derive(Debug)]
pub(crate) struct Watch {
    hints: Arc<Hints>,
    /// Kept alive for its hints; `None` when polling or manual.
    source: Option<WatchSource>,
    poll: Duration,
}

/// How long "never" is for the timer of a [`WatchMode::Manual`] watch.
const MANUAL_POLL: Duration = Duration::from_secs(86_400 * 365);

impl Watch {
    /// A watch in `mode`, re-checking every `poll`; in [`WatchMode::Auto`], `source`
    /// starts what bumps the hints (`None`: it could not, and the timer alone serves).
    pub(crate) fn start(
        mode: WatchMode,
        poll: Duration,
        source: impl FnOnce(Arc<Hints>) -> Option<WatchSource>,
    ) -> Watch {
        let hints = Arc::new(Hints::default());
        let (source, poll) = match mode {
            WatchMode::Manual => (None, MANUAL_POLL),
            WatchMode::PollOnly => (None, poll),
            WatchMode::Auto => (source(hints.clone()), poll),
        };
        Watch {
            hints,
            source,
            poll,
        }
    }

    pub(crate) fn hints(&self) -> &Arc<Hints> {
        &self.hints
    }

    /// Whether events are arriving (false when polling or manual).
    pub(crate) fn has_events(&self) -> bool {
        self.source.is_some()
    }

    /// The current hint generation; read it *before* checking state, then pass it to
    /// [`wait`](Self::wait), so a change between the check and the wait is not missed.
    pub(crate) fn generation(&self) -> u64 {
        self.hints.generation()
    }

    /// The async [`wait`](Self::wait): parks the task, not the thread.
    #[cfg(feature = "tokio")]
    pub(crate) async fn wait_async(&self, seen: u64, deadline: Option<Instant>) {
        let poll_until = Instant::now() + self.poll;
        let until = deadline.map_or(poll_until, |d| d.min(poll_until));
        let notified = self.hints.async_changed.notified();
        tokio::pin!(notified);
        // Register before re-checking, so a bump in between is not missed.
        notified.as_mut().enable();
        if self.hints.generation() != seen {
            return;
        }
        let left = until.saturating_duration_since(Instant::now());
        let _ = tokio::time::timeout(left, notified).await;
    }

    /// Sleeps until a hint newer than `seen` arrives, the poll interval passes, or
    /// `deadline` passes, whichever is first. The caller then re-checks.
    pub(crate) fn wait(&self, seen: u64, deadline: Option<Instant>) {
        let poll_until = Instant::now() + self.poll;
        let until = deadline.map_or(poll_until, |d| d.min(poll_until));
        self.hints.wait(seen, until);
    }
}
