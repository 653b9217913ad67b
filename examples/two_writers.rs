//! Two writers, one main agent: a drafter and an auditor (separate processes) both send
//! to `main` at once. The main agent consumes `main` through a consumer group and sees
//! every message exactly once, in one order, with nothing lost or interleaved: the
//! failure of shared markdown files that this replaces.
//!
//! ```sh
//! cargo run --example two_writers
//! ```

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use agentbus::{Bus, NewMessage};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const EACH: usize = 50;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [role, dir] = &args[..] {
        return write(role, Path::new(dir));
    }
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join(".agentbus");
    let bus = Bus::builder().agent("main-agent").init(&root)?;
    let main = bus.create_mailbox("main")?;
    let mut inbox = main.create_group("main-agent")?.consumer("main-agent")?;

    let me = std::env::current_exe()?;
    let writers: Vec<_> = ["drafter", "auditor"]
        .iter()
        .map(|role| Command::new(&me).arg(role).arg(&root).spawn())
        .collect::<std::result::Result<_, _>>()?;
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..2 * EACH {
        let d = inbox.recv_timeout(Duration::from_secs(30))?;
        *counts.entry(d.message.from.clone()).or_insert(0) += 1;
        d.ack()?;
    }
    for mut w in writers {
        w.wait()?;
    }
    println!(
        "main-agent received {counts:?}, {} messages in all",
        2 * EACH
    );
    let stats = main.stats()?;
    println!(
        "mailbox main: published {}, acked {}, pending {}",
        stats.published, stats.groups[0].acked, stats.groups[0].pending
    );
    Ok(())
}

fn write(role: &str, root: &Path) -> Result<()> {
    let bus = Bus::builder().agent(role).open(root)?;
    let main = bus.mailbox("main")?;
    let kind = if role == "drafter" {
        "draft.section"
    } else {
        "audit.finding"
    };
    for i in 0..EACH {
        main.send(NewMessage::new(kind).body(format!("{role} item {i}")))?;
    }
    Ok(())
}
