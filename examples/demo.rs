//! The README demonstration: the `writer` and `watcher` examples run side by side as
//! two real processes on a fresh bus. The writer drafts a chapter and hands it off with
//! its lease; the watcher wakes, verifies the artifact by size and SHA-256, resumes
//! from the writer's state and accepts, taking over the lease with a higher fencing
//! token.
//!
//! ```sh
//! cargo run --example demo            # in a temporary directory
//! cargo run --example demo -- /tmp/bus   # keep the bus: agentbus --dir /tmp/bus recv main
//! ```

#[path = "watcher.rs"]
mod watcher;
#[path = "writer.rs"]
mod writer;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("--writer") => writer::run(Path::new(&args[1])),
        Some("--watcher") => watcher::run(Path::new(&args[1]), true),
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

fn run(dir: Option<PathBuf>) -> Result<()> {
    let temp;
    let root = match dir {
        Some(dir) => dir,
        None => {
            temp = tempfile::tempdir()?;
            temp.path().join(".agentbus")
        }
    };
    agentbus::Bus::init(&root)?.create_or_open_mailbox("main")?;
    println!("bus at {}\n", root.display());
    let me = std::env::current_exe()?;
    let mut watcher = Command::new(&me).arg("--watcher").arg(&root).spawn()?;
    let writer = Command::new(&me).arg("--writer").arg(&root).status()?;
    let watcher = watcher.wait()?;
    if !(writer.success() && watcher.success()) {
        return Err("an agent failed".into());
    }
    let bus = agentbus::Bus::open(&root)?;
    println!("\nwhat the bus recorded:");
    for name in bus.mailboxes()? {
        for m in bus.mailbox(&name)?.messages() {
            let m = m?;
            println!(
                "  {name:<7} seq {} {:<17} from {:<8} {}",
                m.seq,
                m.kind,
                m.from,
                m.subject.unwrap_or_default()
            );
        }
    }
    for lease in bus.leases()? {
        println!(
            "  lease {} held by {} with token {}",
            lease.name,
            lease.holder.as_deref().unwrap_or("nobody"),
            lease.token
        );
    }
    Ok(())
}
