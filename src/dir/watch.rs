//! Wake-ups for the directory backend: a `notify` watcher on directories.
//!
//! Directories are watched, not files, because a file replaced by rename would orphan
//! a file watch. Every event is only a hint (see [`crate::watch`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

use crate::backend::WatchSource;
use crate::watch::{Hints, Watch, WatchMode};

/// A watch on `dirs`: `notify` events plus the timer in [`WatchMode::Auto`], falling
/// back to the timer alone, with a logged warning, when the watcher cannot start.
pub(crate) fn watch_dirs(dirs: &[PathBuf], mode: WatchMode, poll: Duration) -> Watch {
    Watch::start(mode, poll, |hints| match start_watcher(dirs, hints) {
        Ok(w) => Some(WatchSource::Notify(w)),
        Err(e) => {
            log::warn!("agentbus: cannot watch {dirs:?} ({e}); polling every {poll:?} instead");
            None
        }
    })
}

fn start_watcher(
    dirs: &[PathBuf],
    hints: Arc<Hints>,
) -> notify::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        // A change, a rescan request (queue overflow) or an error: all are hints. Mere
        // accesses (open, close, read) are not: a waiter opening files in the watched
        // directory would otherwise wake itself, again and again. Every write also
        // produces a Modify event, so nothing that matters is lost by skipping them.
        if let Ok(e) = &event {
            if matches!(e.kind, notify::EventKind::Access(_)) && !e.need_rescan() {
                return;
            }
        }
        hints.bump();
    })?;
    for dir in dirs {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    Ok(watcher)
}
