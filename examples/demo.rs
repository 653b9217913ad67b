//! The README demonstration: a writer agent and a watcher agent, two real processes,
//! hand work to each other through a bus directory.
//!
//! The writer drafts a file and sends a `draft.ready` message to the `main` mailbox,
//! pinning the draft by size and SHA-256. The watcher follows `main`, verifies the
//! artifact before acting, and answers in the writer's mailbox. Run it with:
//!
//! ```sh
//! cargo run --example demo
//! ```
//!
//! Pass a directory to keep the bus afterwards (`cargo run --example demo -- /tmp/bus`)
//! and inspect it with `agentbus --dir /tmp/bus recv main`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use agentbus::{Artifact, Bus, Mailbox, Message, NewMessage};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("--writer") => writer(Path::new(&args[1])),
        Some("--watcher") => watcher(Path::new(&args[1])),
        dir => run(dir.map(PathBuf::from)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Sets up a bus and runs the two agents side by side as separate processes.
fn run(dir: Option<PathBuf>) -> Result<()> {
    let temp;
    let root = match dir {
        Some(dir) => dir,
        None => {
            temp = tempfile::tempdir()?;
            temp.path().join(".agentbus")
        }
    };
    let bus = Bus::init(&root)?;
    for name in ["main", "writer"] {
        bus.create_or_open_mailbox(name)?;
    }
    println!("bus at {}", root.display());
    let me = std::env::current_exe()?;
    let mut watcher = Command::new(&me).arg("--watcher").arg(&root).spawn()?;
    let writer = Command::new(&me).arg("--writer").arg(&root).status()?;
    let watcher = watcher.wait()?;
    if !(writer.success() && watcher.success()) {
        return Err("an agent failed".into());
    }
    println!("\nthe full history of `main`, as `agentbus recv main` prints it:");
    for message in bus.mailbox("main")?.messages() {
        println!("{}", serde_json::to_string(&message?)?);
    }
    Ok(())
}

fn writer(root: &Path) -> Result<()> {
    let bus = Bus::builder().agent("writer").open(root)?;
    let draft = root.parent().unwrap_or(root).join("chapter-1.md");
    std::fs::write(
        &draft,
        "# Chapter 1\n\nIt was a bright cold day in April.\n",
    )?;
    let artifact = Artifact::capture(&draft)?;
    println!(
        "[writer]  drafted {} ({} bytes, sha256 {}..)",
        draft.display(),
        artifact.size,
        &artifact.sha256[..12]
    );
    let receipt = bus.mailbox("main")?.send(
        NewMessage::new("draft.ready")
            .subject("chapter 1 is ready for review")
            .artifact(artifact)
            .correlation_id("book-1/ch-1")
            .idempotency_key("book-1/ch-1/draft-1"),
    )?;
    println!(
        "[writer]  sent draft.ready as seq {} (id {})",
        receipt.seq, receipt.id
    );

    let reply = wait_for(&bus.mailbox("writer")?, "book-1/ch-1")?;
    println!(
        "[writer]  got {} from {}: {}",
        reply.kind,
        reply.from,
        reply.body.unwrap_or_default()
    );
    Ok(())
}

fn watcher(root: &Path) -> Result<()> {
    let bus = Bus::builder().agent("watcher").open(root)?;
    println!("[watcher] following mailbox main");
    let message = wait_for(&bus.mailbox("main")?, "book-1/ch-1")?;
    println!(
        "[watcher] woke on seq {} {:?} from {}",
        message.seq, message.kind, message.from
    );
    let verdict = message.artifacts.iter().try_for_each(Artifact::verify);
    let reply = match verdict {
        Ok(()) => {
            println!(
                "[watcher] verified {} artifact(s): size and sha256 match",
                message.artifacts.len()
            );
            NewMessage::new("draft.accepted").body("artifact verified, taking over")
        }
        Err(e) => {
            println!("[watcher] rejecting: {e}");
            NewMessage::new("draft.rejected").body(e.to_string())
        }
    };
    bus.mailbox("writer")?.send(
        reply
            .correlation_id("book-1/ch-1")
            .causation_id(message.id.to_string()),
    )?;
    Ok(())
}

/// Follows `mailbox` until a message with `correlation_id` arrives. (A polling loop
/// for now; the notify-driven receiver replaces it.)
fn wait_for(mailbox: &Mailbox, correlation_id: &str) -> Result<Message> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut follower = mailbox.messages().correlation_id(correlation_id);
    loop {
        if let Some(message) = follower.next() {
            return Ok(message?);
        }
        if Instant::now() > deadline {
            return Err(format!("nothing arrived in {} within 30 s", mailbox.name()).into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
