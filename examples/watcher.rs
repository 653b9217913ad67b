//! The watcher agent: sleeps until a handoff arrives in `main` (woken by a file-system
//! event), verifies every artifact by size and SHA-256, processes it, and accepts,
//! taking over the lease; a handoff whose artifacts do not verify is rejected with the
//! reason. `--once` stops after one handoff.
//!
//! ```sh
//! cargo run --example watcher -- /tmp/bus --once
//! ```

use std::path::Path;
use std::time::Duration;

use agentbus::Bus;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The watcher's work; `main` below and the demo both call it.
pub fn run(root: &Path, once: bool) -> Result<()> {
    let bus = Bus::builder().agent("watcher").init(root)?;
    bus.create_or_open_mailbox("main")?;
    let mut inbox = bus.handoff_inbox("main")?;
    println!("[watcher] waiting for handoffs in main");
    loop {
        let handoff = match inbox.recv_timeout(Duration::from_secs(60)) {
            Ok(h) => h,
            Err(e) if e.is_timeout() => return Err("no handoff within 60 s".into()),
            Err(e) => return Err(e.into()),
        };
        println!(
            "[watcher] woke on handoff seq {} from {}: {:?}",
            handoff.seq(),
            handoff.message.from,
            handoff.handoff.summary
        );
        if let Err(e) = handoff.verify() {
            println!("[watcher] rejecting: {e}");
            handoff.reject("watcher", &e.to_string())?;
        } else {
            let words: usize = handoff
                .message
                .artifacts
                .iter()
                .map(|a| {
                    std::fs::read_to_string(&a.path).map_or(0, |t| t.split_whitespace().count())
                })
                .sum();
            println!(
                "[watcher] verified {} artifact(s) ({words} words); resuming from state {} at {:?}",
                handoff.message.artifacts.len(),
                handoff.handoff.state,
                handoff.handoff.next_step.as_deref().unwrap_or("?")
            );
            let lease = handoff.accept("watcher")?;
            if let Some(l) = lease {
                println!(
                    "[watcher] accepted; now holding lease {} with token {}",
                    l.name, l.token
                );
            }
        }
        if once {
            return Ok(());
        }
    }
}

#[allow(dead_code)]
fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let dir = args.next().unwrap_or_else(|| ".agentbus".into());
    let once = args.any(|a| a == "--once");
    run(Path::new(&dir), once)
}
