//! Wake-ups on JetStream: a core subscription to the subjects whose messages are the
//! hints, plus the timer.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;

use super::{nats_err, NatsBus, REQUEST_TIMEOUT};
use crate::backend::WatchSource;
use crate::watch::{Hints, Watch, WatchMode};
use crate::{Error, Result};

/// A subscription that bumps a [`Hints`] on every message; unsubscribes when dropped.
#[derive(Debug)]
pub(crate) struct HintTask(tokio::task::AbortHandle);

impl Drop for HintTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A watch on `subjects`: every message published on them is a hint. Falls back to
/// polling, with a logged warning, if the subscription cannot be made. Subscribed
/// before it returns, so nothing published after is missed.
pub(crate) fn watch_subjects(
    conn: &NatsBus,
    subjects: Vec<String>,
    mode: WatchMode,
    poll: Duration,
) -> Watch {
    Watch::start(mode, poll, |hints| {
        match conn.hint(subjects.clone(), hints) {
            Ok(task) => Some(WatchSource::Nats(task)),
            Err(e) => {
                log::warn!(
                    "agentbus: cannot subscribe to {subjects:?} ({e}); polling every {poll:?} instead"
                );
                None
            }
        }
    })
}

impl NatsBus {
    /// Subscribes to `subjects` (confirmed by the server before this returns) and
    /// bumps `hints` on every message.
    pub(crate) fn hint(&self, subjects: Vec<String>, hints: Arc<Hints>) -> Result<HintTask> {
        let client = self.client.clone();
        let subs = self.run(REQUEST_TIMEOUT, async move {
            let mut subs = Vec::new();
            for s in subjects {
                subs.push(
                    client
                        .subscribe(s.clone())
                        .await
                        .map_err(|e| nats_err(format!("subscribe to {s}"), e))?,
                );
            }
            client.flush().await.map_err(|e| nats_err("flush", e))?;
            Ok::<_, Error>(subs)
        })?;
        let rt = self
            .rt
            .as_ref()
            .expect("the runtime lives as long as the bus");
        let task = rt.spawn(async move {
            let mut all = futures_util::stream::select_all(subs);
            while all.next().await.is_some() {
                hints.bump();
            }
        });
        Ok(HintTask(task.abort_handle()))
    }
}
