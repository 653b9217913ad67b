//! Resource figures that are not throughput: peak memory while draining a large
//! mailbox, and the wall time of one `agentbus send` CLI call.
//!
//! `cargo bench --bench resources` (set `AGENTBUS_DRAIN_MB` to change the mailbox size
//! from its default of 1024 MB).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use agentbus::{Bus, Durability, NewMessage};

fn main() {
    if let Ok(dir) = std::env::var("AGENTBUS_DRAIN_CHILD") {
        drain(Path::new(&dir));
        return;
    }
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` and test discovery
    }
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cli_ms = cli_send(tmp.path());
    let (drained_mib, peak_kib) = peak_memory(tmp.path());
    // For benches/ratios.py.
    let json = serde_json::json!({
        "cli_send_median_ms": cli_ms,
        "drained_mib": drained_mib,
        "peak_rss_mib": peak_kib as f64 / 1024.0,
    });
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../criterion/agentbus-resources.json");
    let _ = std::fs::create_dir_all(out.parent().unwrap());
    let _ = std::fs::write(out, json.to_string());
}

fn cli_send(tmp: &Path) -> f64 {
    let root = tmp.join("cli");
    let bus = Bus::init(&root).unwrap();
    bus.create_mailbox("main").unwrap();
    let cli = env!("CARGO_BIN_EXE_agentbus");
    let mut times = Vec::new();
    for i in 0..60 {
        let started = Instant::now();
        let out = Command::new(cli)
            .arg("--dir")
            .arg(&root)
            .args([
                "send", "main", "--type", "note", "--from", "bench", "--body",
            ])
            .arg(format!("message {i}"))
            .output()
            .unwrap();
        assert!(out.status.success());
        times.push(started.elapsed());
    }
    times.sort();
    println!(
        "cli send (Sync, one process per call): median {:.2} ms, p90 {:.2} ms over {} calls",
        ms(times[times.len() / 2]),
        ms(times[times.len() * 9 / 10]),
        times.len()
    );
    ms(times[times.len() / 2])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn peak_memory(tmp: &Path) -> (u64, u64) {
    let mb: u64 = std::env::var("AGENTBUS_DRAIN_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let root = tmp.join("drain");
    let bus = Bus::builder()
        .durability(Durability::Flush)
        .init(&root)
        .unwrap();
    let mailbox = bus.create_mailbox("big").unwrap();
    mailbox.create_group("workers").unwrap();
    let body = "x".repeat(150);
    let chunk: Vec<_> = (0..1000)
        .map(|_| NewMessage::new("job").body(body.clone()))
        .collect();
    let started = Instant::now();
    while mailbox.stats().unwrap().bytes < mb * 1024 * 1024 {
        for _ in 0..100 {
            mailbox.send_batch(chunk.clone()).unwrap();
        }
    }
    let stats = mailbox.stats().unwrap();
    println!(
        "filled {} MB ({} messages) in {:.1?}",
        stats.bytes / (1024 * 1024),
        stats.published,
        started.elapsed()
    );
    let out = Command::new(std::env::current_exe().unwrap())
        .env("AGENTBUS_DRAIN_CHILD", &root)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{stdout}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let peak_kib = stdout
        .split("VmHWM) ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    (stats.bytes / (1024 * 1024), peak_kib)
}

/// In a fresh process: drain the mailbox through a group, then report the peak RSS.
fn drain(root: &Path) {
    let bus = Bus::builder()
        .durability(Durability::Flush)
        .open(root)
        .unwrap();
    let group = bus.mailbox("big").unwrap().group("workers").unwrap();
    let started = Instant::now();
    let mut n = 0u64;
    loop {
        let batch = group.claim("drainer", 1000).unwrap();
        let Some(last) = batch.last() else { break };
        n += batch.len() as u64;
        group.ack_upto(last.seq()).unwrap();
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .unwrap_or("VmHWM: ?");
    println!(
        "drained {n} messages in {:.1?}; peak memory (VmHWM) {}",
        started.elapsed(),
        hwm.trim_start_matches("VmHWM:").trim()
    );
}
