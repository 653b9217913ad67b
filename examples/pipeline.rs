//! A two-phase pipeline: phase 1 (one process) processes part of a batch and hands off
//! with its state; phase 2 (another process) resumes from that state instead of
//! reprocessing, and accepts.
//!
//! ```sh
//! cargo run --example pipeline
//! ```

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use agentbus::Bus;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const ITEMS: u64 = 10;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match &args[..] {
        [phase, dir] if phase == "phase1" => return phase1(Path::new(dir)),
        [phase, dir] if phase == "phase2" => return phase2(Path::new(dir)),
        _ => {}
    }
    let tmp = tempfile::tempdir()?;
    let root = tmp.path().join(".agentbus");
    Bus::init(&root)?.create_or_open_mailbox("phase2")?;
    let me = std::env::current_exe()?;
    let mut second = Command::new(&me).arg("phase2").arg(&root).spawn()?;
    let first = Command::new(&me).arg("phase1").arg(&root).status()?;
    if !(first.success() && second.wait()?.success()) {
        return Err("a phase failed".into());
    }
    Ok(())
}

fn phase1(root: &Path) -> Result<()> {
    let bus = Bus::builder().agent("phase1").open(root)?;
    let results = root.join("results.txt");
    let mut done = Vec::new();
    for item in 1..=ITEMS / 2 {
        done.push(item * item);
    }
    std::fs::write(&results, format!("{done:?}\n"))?;
    println!(
        "[phase1] processed items 1..={} and stopped (time budget)",
        ITEMS / 2
    );
    let sent = bus
        .handoff("phase2")
        .summary("squares: first half done")
        .state(serde_json::json!({"next_item": ITEMS / 2 + 1, "last_item": ITEMS, "results": done}))
        .remaining(format!("items {}..={ITEMS}", ITEMS / 2 + 1))
        .next_step("continue from next_item")
        .artifact(&results)
        .send()?;
    let answer = sent
        .wait_answer(Duration::from_secs(30))?
        .ok_or("no answer")?;
    println!(
        "[phase1] phase 2 answered: accepted = {}",
        answer.is_accepted()
    );
    Ok(())
}

fn phase2(root: &Path) -> Result<()> {
    let bus = Bus::builder().agent("phase2").open(root)?;
    let mut inbox = bus.handoff_inbox("phase2")?;
    let h = inbox.recv_timeout(Duration::from_secs(30))?;
    h.verify()?;
    let state = &h.handoff.state;
    let next = state["next_item"].as_u64().ok_or("state lacks next_item")?;
    let last = state["last_item"].as_u64().ok_or("state lacks last_item")?;
    let mut results: Vec<u64> = serde_json::from_value(state["results"].clone())?;
    println!(
        "[phase2] resuming at item {next} with {} results carried over",
        results.len()
    );
    for item in next..=last {
        results.push(item * item);
    }
    println!("[phase2] all {} results: {results:?}", results.len());
    h.accept("phase2")?;
    Ok(())
}
