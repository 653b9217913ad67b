//! Coalescing groups on the directory, with real processes: a burst of same-key
//! messages sent by another process is delivered once (to whichever consumer process
//! claims, across restarts), the rest counted `coalesced`, every message still in the
//! log and delivered to a second group; messages after the window come again; other
//! keys are never coalesced; the leaders survive a state rotation. The exact rule is
//! unit-tested in `src/coalesce.rs`; JetStream's refusal is in `backends/filters.rs`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use agentbus::{Coalesce, CoalesceBy, GroupOptions, Message, NewMessage};

/// Sends one message per entry of `$KINDS` (comma-separated; `type` or
/// `type/header-value` for a `host` header), `$PAUSE_MS` apart, then exits.
#[test]
#[ignore = "runs only as a child process of another test"]
fn burst_sender() {
    if !common::is_child() {
        return;
    }
    let bus = common::open_flush_bus(common::env("BUS"));
    let mb = bus.mailbox("alerts").unwrap();
    let pause: u64 = common::env("PAUSE_MS").parse().unwrap();
    for entry in common::env("KINDS").split(',') {
        let mut m = NewMessage::new(entry.split('/').next().unwrap());
        if let Some(host) = entry.split('/').nth(1) {
            m = m.header("host", host);
        }
        mb.send(m).unwrap();
        std::thread::sleep(Duration::from_millis(pause));
    }
}

/// Runs [`burst_sender`] as its own process and waits for it.
fn send_burst(dir: &std::path::Path, kinds: &[&str], pause_ms: u64) {
    let out = common::child("burst_sender")
        .env("BUS", dir)
        .env("KINDS", kinds.join(","))
        .env("PAUSE_MS", pause_ms.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `recv --group G --max 1000` as a process: the seqs it was given.
fn claim_all(dir: &std::path::Path, group: &str) -> Vec<u64> {
    let out = common::cli(dir)
        .args(["recv", "alerts", "--group", group, "--consumer", "worker"])
        .args(["--max", "1000"])
        .output()
        .unwrap();
    common::ok(out)
        .iter()
        .map(|l| l["seq"].as_u64().unwrap())
        .collect()
}

/// A group's counters from `agentbus stats` (a process).
fn stats(dir: &std::path::Path, group: &str) -> serde_json::Value {
    let out = common::cli(dir).args(["stats", "alerts"]).output().unwrap();
    let lines = common::ok(out);
    lines[0]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["group"] == group)
        .unwrap_or_else(|| panic!("no group {group} in {lines:?}"))
        .clone()
}

/// The seqs the documented rule delivers, read from the stored timestamps (the
/// senders' clocks decide, not the timing of this test): per key, the first message,
/// then each one sent `window` or more after the last one delivered.
fn oracle(messages: &[Message], key: impl Fn(&Message) -> String, window: Duration) -> Vec<u64> {
    let mut leaders: std::collections::HashMap<String, time::OffsetDateTime> = Default::default();
    let mut out = Vec::new();
    for m in messages {
        let k = key(m);
        if leaders.get(&k).is_none_or(|&t| m.ts - t >= window) {
            leaders.insert(k, m.ts);
            out.push(m.seq);
        }
    }
    out
}

/// A consumer process takes the first message of a burst; the rest, sent by another
/// process while it is gone, is coalesced by the next consumer process (the leader is
/// in the group's state, not in a process); nothing is lost.
#[test]
fn a_burst_is_delivered_once_across_consumer_processes_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_bus(dir.path());
    let mb = bus.create_mailbox("alerts").unwrap();
    common::ok(
        common::cli(dir.path())
            .args(["group", "create", "alerts", "pager", "--coalesce", "type"])
            .args(["--window", "120"])
            .output()
            .unwrap(),
    );
    mb.create_group("audit").unwrap();
    let listed = common::ok(
        common::cli(dir.path())
            .args(["group", "list", "alerts"])
            .output()
            .unwrap(),
    );
    assert_eq!(listed[1]["group"], "pager");
    assert_eq!(
        listed[1]["coalesce"],
        serde_json::json!({"by": "type", "window_ms": 120_000})
    );
    assert_eq!(listed[0]["coalesce"], serde_json::Value::Null);

    let mut watch = common::cli(dir.path())
        .args(["watch", "alerts", "--group", "pager", "--max", "1"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    const N: usize = 12;
    send_burst(dir.path(), &["disk.full"], 0);
    let mut line = String::new();
    BufReader::new(watch.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(watch.wait().unwrap().success());
    let first: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        (first["seq"].as_u64(), first["type"].as_str()),
        (Some(1), Some("disk.full"))
    );

    // The rest of the burst, from another process, well within the window.
    send_burst(dir.path(), &["disk.full"; N - 1], 0);
    assert_eq!(claim_all(dir.path(), "pager"), Vec::<u64>::new());
    let pager = stats(dir.path(), "pager");
    assert_eq!(
        (pager["delivered"].as_u64(), pager["coalesced"].as_u64()),
        (Some(1), Some(N as u64 - 1))
    );
    // Only the leader is unsettled (watch printed it without acking).
    assert_eq!(
        (pager["lag"].as_u64(), pager["in_flight"].as_u64()),
        (Some(0), Some(1))
    );

    // All N are in the log, and the other group gets every one of them.
    let log: Vec<u64> = mb.messages().map(|m| m.unwrap().seq).collect();
    assert_eq!(log, (1..=N as u64).collect::<Vec<_>>());
    assert_eq!(claim_all(dir.path(), "audit"), log);
    assert_eq!(stats(dir.path(), "audit")["coalesced"], 0);
    // A coalesced message is settled; requeue delivers it after all.
    let group = mb.group("pager").unwrap();
    assert!(group.requeue(2).unwrap());
    assert_eq!(common::seqs(&group.claim("w", 10).unwrap()), [2]);
}

/// Messages sent a window after their key's leader are delivered again; other keys
/// (type, or a header) never coalesce with each other; and what is delivered is
/// exactly what the rule says of the stored timestamps.
#[test]
fn after_the_window_a_key_is_delivered_again_and_keys_stay_apart() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_bus(dir.path());
    let mb = bus.create_mailbox("alerts").unwrap();
    let window = Duration::from_millis(1_000);
    let by_type = Coalesce::new(CoalesceBy::Type, window);
    let by_host = Coalesce::new(CoalesceBy::Header("host".into()), window);
    mb.create_group_with("by-type", GroupOptions::new().coalesce(by_type))
        .unwrap();
    mb.create_group_with("by-host", GroupOptions::new().coalesce(by_host))
        .unwrap();

    let burst = [
        "disk.full/web-1",
        "cpu.hot/web-1",
        "disk.full/web-2",
        "disk.full/web-1",
    ];
    send_burst(dir.path(), &burst, 0);
    // Past the window (slept for, so the timestamps are at least this far apart).
    std::thread::sleep(window + Duration::from_millis(300));
    send_burst(dir.path(), &burst, 0);

    let messages: Vec<Message> = mb.messages().map(|m| m.unwrap()).collect();
    assert_eq!(messages.len(), 8);
    let by_type = claim_all(dir.path(), "by-type");
    let by_host = claim_all(dir.path(), "by-host");
    assert_eq!(by_type, oracle(&messages, |m| m.kind.clone(), window));
    assert_eq!(
        by_host,
        oracle(&messages, |m| m.headers["host"].clone(), window)
    );
    // Whatever the machine's load: each key's first message of each burst.
    for seq in [1, 2, 5, 6] {
        assert!(by_type.contains(&seq), "{by_type:?}");
    }
    for seq in [1, 3, 5, 7] {
        assert!(by_host.contains(&seq), "{by_host:?}");
    }
    for (group, got) in [("by-type", &by_type), ("by-host", &by_host)] {
        let s = stats(dir.path(), group);
        assert_eq!(
            s["coalesced"].as_u64().unwrap() + got.len() as u64,
            8,
            "{group}: {s}"
        );
    }
}

/// The leaders live in the group's state: a handle opened after the state file was
/// checkpointed and rotated (many records) still coalesces into them, and the
/// checkpoint keeps only the leaders whose window is open.
#[test]
fn leaders_survive_a_state_rotation_and_stay_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_bus(dir.path());
    let mb = bus.create_mailbox("alerts").unwrap();
    let hour = Coalesce::new(CoalesceBy::CorrelationId, Duration::from_secs(3_600));
    let group = mb
        .create_group_with("g", GroupOptions::new().coalesce(hour))
        .unwrap();
    let batch: Vec<_> = (0..2_000)
        .map(|i| NewMessage::new("tick").correlation_id(format!("job-{}", i % 3)))
        .collect();
    mb.send_batch(batch).unwrap();
    mb.send(NewMessage::new("no-key")).unwrap();
    let got = common::seqs(&group.claim("w", 100).unwrap());
    assert_eq!(got, [1, 2, 3, 2_001]);
    let files = common::state_files(&dir.path().join("mailboxes/alerts/groups/g"));
    assert!(
        !files.contains(&"state.0.jsonl".to_owned()),
        "rotated: {files:?}"
    );

    mb.send(NewMessage::new("tick").correlation_id("job-1"))
        .unwrap();
    let fresh = common::open_flush_bus(dir.path())
        .mailbox("alerts")
        .unwrap()
        .group("g")
        .unwrap();
    assert!(fresh.claim("w", 10).unwrap().is_empty());
    assert_eq!(fresh.stats().unwrap().coalesced, 1_998);
    let checkpoint: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("mailboxes/alerts/groups/g/checkpoint.json")).unwrap(),
    )
    .unwrap();
    let leaders = checkpoint["state"]["leaders"].as_object().unwrap();
    assert_eq!(leaders.len(), 3, "{leaders:?}");
    assert_eq!(leaders["job-1"]["seq"], 2);
}
