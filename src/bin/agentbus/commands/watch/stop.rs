//! A clean stop on SIGINT and SIGTERM. The first signal asks `watch` to finish the
//! message in hand (its handler runs to its end and the outcome is settled and
//! printed) and take no more; the second asks it to give that message back now (the
//! handler's process group gets SIGTERM, then SIGKILL); the third ends `watch` at once
//! (after SIGKILL to the handler's group), leaving the claim to run out.

use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::Arc;

use rustix::process::{kill_process_group, Pid, Signal};
use serde_json::json;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

/// What the signals asked for so far; cheap to share with the thread that counts them.
#[derive(Clone)]
pub struct Stop {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    /// How many SIGINT/SIGTERM arrived.
    count: AtomicUsize,
    /// The last one.
    last: AtomicI32,
    /// The running handler's process group, 0 when none runs.
    handler: AtomicI32,
}

impl Stop {
    /// Catches SIGINT and SIGTERM from now on, on a thread of its own.
    pub fn install() -> std::io::Result<Stop> {
        let stop = Stop {
            inner: Arc::new(Inner::default()),
        };
        let mut signals = Signals::new([SIGINT, SIGTERM])?;
        let inner = stop.inner.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    inner.last.store(sig, Ordering::SeqCst);
                    let n = inner.count.fetch_add(1, Ordering::SeqCst) + 1;
                    let handler = inner.handler.load(Ordering::SeqCst);
                    let name = signal_name(sig);
                    match n {
                        1 if handler != 0 => warn(format!(
                            "{name}: finishing the current message, then stopping \
                             ({name} again gives it back now)"
                        )),
                        2 if handler != 0 => {
                            warn(format!("{name} again: giving the current message back"))
                        }
                        1 | 2 => {}
                        _ => {
                            if let Some(pgid) = Pid::from_raw(handler) {
                                let _ = kill_process_group(pgid, Signal::KILL);
                            }
                            warn(format!("{name} a third time: exiting now"));
                            std::process::exit(128 + sig);
                        }
                    }
                }
            })?;
        Ok(stop)
    }

    /// A signal asked to stop after the current message.
    pub fn requested(&self) -> bool {
        self.inner.count.load(Ordering::SeqCst) >= 1
    }

    /// A second signal asked to give the current message back now.
    pub fn at_once(&self) -> bool {
        self.inner.count.load(Ordering::SeqCst) >= 2
    }

    /// The name of the last signal (`SIGINT` or `SIGTERM`).
    pub fn signal(&self) -> &'static str {
        signal_name(self.inner.last.load(Ordering::SeqCst))
    }

    /// Records the running handler's process group (`None`: none runs now).
    pub fn running(&self, pgid: Option<Pid>) {
        let raw = pgid.map_or(0, |p| p.as_raw_nonzero().get());
        self.inner.handler.store(raw, Ordering::SeqCst);
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// A warning on stderr, in the CLI's JSON style.
fn warn(message: String) {
    eprintln!("{}", json!({ "warning": message }));
}
