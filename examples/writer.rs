//! The writer agent: drafts a chapter, takes the chapter's lease, and hands both to
//! the `main` mailbox, then waits for the answer. Run it next to `watcher`:
//!
//! ```sh
//! cargo run --example watcher -- /tmp/bus &
//! cargo run --example writer -- /tmp/bus
//! ```
//!
//! (`cargo run --example demo` runs both for you.)

use std::path::Path;
use std::time::Duration;

use agentbus::{Answer, Bus};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// The writer's work; `main` below and the demo both call it.
pub fn run(root: &Path) -> Result<()> {
    let bus = Bus::builder().agent("writer").init(root)?;
    bus.create_or_open_mailbox("main")?;
    let lease = bus
        .lease("chapter-1")
        .ttl(Duration::from_secs(120))
        .try_acquire()?;
    println!("[writer]  took lease chapter-1 (token {})", lease.token());

    // The draft goes beside a bus directory; for a bus on NATS (a URL), into the
    // working directory.
    let work = if root.to_str().is_some_and(|r| r.starts_with("nats://")) {
        std::env::current_dir()?
    } else {
        root.parent().unwrap_or(root).to_owned()
    };
    let draft = work.join("chapter-1.md");
    std::fs::write(
        &draft,
        "# Chapter 1\n\nIt was a bright cold day in April.\n",
    )?;
    let sent = bus
        .handoff("main")
        .summary("chapter 1 drafted, ready for review")
        .state(serde_json::json!({"chapter": 1, "paragraphs": 1}))
        .changed("wrote the opening paragraph")
        .remaining("paragraphs 2-5")
        .next_step("review the opening for tone")
        .artifact(&draft)
        .with_lease(lease)
        .correlation_id("book-1/chapter-1")
        .send()?;
    println!(
        "[writer]  handed off {} as seq {} with its lease",
        draft.display(),
        sent.receipt.seq
    );
    match sent.wait_answer(Duration::from_secs(60))? {
        Some(Answer::Accepted { lease, message }) => println!(
            "[writer]  {} accepted; lease chapter-1 now held by {} with token {}",
            message.from,
            lease
                .as_ref()
                .and_then(|l| l.holder.as_deref())
                .unwrap_or("?"),
            lease.as_ref().map_or(0, |l| l.token)
        ),
        Some(Answer::Rejected { reason, message }) => {
            println!("[writer]  {} rejected the handoff: {reason}", message.from)
        }
        Some(_) => println!("[writer]  unexpected answer"),
        None => return Err("no answer within 60 s".into()),
    }
    Ok(())
}

#[allow(dead_code)]
fn main() -> Result<()> {
    let dir = std::env::args()
        .nth(1)
        .unwrap_or_else(|| ".agentbus".into());
    run(Path::new(&dir))
}
