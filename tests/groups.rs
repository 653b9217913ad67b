//! Consumer groups: competing workers (real processes), redelivery after a crash,
//! dead letters, nack/extend/term, cumulative ack, state rotation, compaction, stats.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use agentbus::{Bus, Durability, Error, GroupOptions, NewMessage, StartAt, DEAD_LETTER_HEADER};

/// A bus whose mailboxes roll over every `bytes`, so tests can work across segments.
fn segmented_bus(dir: &std::path::Path, bytes: u64) -> Bus {
    Bus::builder()
        .durability(Durability::Flush)
        .segment_bytes(bytes)
        .init(dir)
        .unwrap()
}

/// Sends `n` messages one by one (a batch never rolls over in the middle).
fn send_each(mb: &agentbus::Mailbox, n: usize) {
    for i in 0..n {
        mb.send(NewMessage::new("job").body(format!("{i:0>60}")))
            .unwrap();
    }
}

/// The names of a group's state files (`state.<generation>.jsonl`), sorted.
fn state_files(group_dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<_> = std::fs::read_dir(group_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("state."))
        .collect();
    v.sort();
    v
}

fn send_n(mb: &agentbus::Mailbox, n: usize) {
    let batch: Vec<_> = (0..n)
        .map(|i| NewMessage::new("job").body(i.to_string()))
        .collect();
    for chunk in batch.chunks(1000) {
        mb.send_batch(chunk.to_vec()).unwrap();
    }
}

#[test]
fn consumers_in_a_group_compete_and_every_group_sees_everything() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_bus(dir.path());
    let mb = bus.create_mailbox("tasks").unwrap();
    let workers = mb.create_group("workers").unwrap();
    let audit = mb.create_group("audit").unwrap();
    send_n(&mb, 10);

    let a = workers.claim("a", 4).unwrap();
    let b = workers.claim("b", 100).unwrap();
    let seqs = |ds: &[agentbus::Delivery]| ds.iter().map(|d| d.seq()).collect::<Vec<_>>();
    assert_eq!(seqs(&a), [1, 2, 3, 4]);
    assert_eq!(seqs(&b), [5, 6, 7, 8, 9, 10]);
    assert!(
        workers.claim("c", 10).unwrap().is_empty(),
        "claims are exclusive"
    );
    assert!(a.iter().chain(&b).all(|d| d.attempt == 1));
    assert_eq!(b[0].consumer, "b");

    // The other group gets all ten, independently.
    assert_eq!(
        seqs(&audit.claim("x", 100).unwrap()),
        (1..=10).collect::<Vec<_>>()
    );

    // Reading without a group changes nothing.
    assert_eq!(mb.messages().count(), 10);
    let stats = workers.stats().unwrap();
    assert_eq!((stats.delivered, stats.acked, stats.in_flight), (10, 0, 10));

    for d in a.iter().chain(&b) {
        d.ack().unwrap();
    }
    let stats = workers.stats().unwrap();
    assert_eq!(
        (stats.acked, stats.in_flight, stats.pending, stats.lag),
        (10, 0, 0, 0)
    );
    // Groups are listed, and a misspelled one is an error listing the real ones.
    assert_eq!(mb.groups().unwrap(), ["audit", "workers"]);
    match mb.group("wokers") {
        Err(Error::GroupNotFound { existing, .. }) => assert_eq!(existing, ["audit", "workers"]),
        other => panic!("expected GroupNotFound, got {other:?}"),
    }
    assert!(matches!(
        mb.create_group("audit"),
        Err(Error::GroupExists { .. })
    ));
}

const MESSAGES: usize = 10_000;

#[test]
fn four_worker_processes_drain_10000_messages_each_acked_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bus");
    let bus = common::flush_bus(&root);
    let mb = bus.create_mailbox("jobs").unwrap();
    mb.create_group_with(
        "workers",
        GroupOptions::new().visibility(Duration::from_secs(300)),
    )
    .unwrap();
    send_n(&mb, MESSAGES);

    let children: Vec<_> = (0..4)
        .map(|w| {
            common::child("drain_worker")
                .env("BUS", &root)
                .env("WORKER", format!("w{w}"))
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut claims: HashMap<u64, Vec<String>> = HashMap::new();
    let mut acks: HashMap<u64, Vec<String>> = HashMap::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "a worker failed");
        for line in out.stdout.lines() {
            let line = line.unwrap();
            // The test harness prints lines of its own; ours are "CLAIM|ACK worker seq".
            let parts: Vec<&str> = line.split(' ').collect();
            let map = match parts[..] {
                ["CLAIM", _, _] => &mut claims,
                ["ACK", _, _] => &mut acks,
                _ => continue,
            };
            map.entry(parts[2].parse().unwrap())
                .or_default()
                .push(parts[1].to_owned());
        }
    }
    for seq in 1..=MESSAGES as u64 {
        let c = claims.get(&seq).map_or(0, Vec::len);
        let a = acks.get(&seq).map_or(0, Vec::len);
        assert_eq!(
            (c, a),
            (1, 1),
            "seq {seq}: claimed {c} times, acked {a} times"
        );
    }
    let per_worker = |w: &str| acks.values().filter(|v| v[0] == w).count();
    let counts: Vec<_> = (0..4).map(|w| per_worker(&format!("w{w}"))).collect();
    eprintln!("acks per worker: {counts:?}");
    assert!(
        counts.iter().filter(|&&n| n > 0).count() >= 2,
        "workers did not compete: {counts:?}"
    );

    let stats = bus
        .mailbox("jobs")
        .unwrap()
        .group("workers")
        .unwrap()
        .stats()
        .unwrap();
    assert_eq!(stats.acked, MESSAGES as u64);
    assert_eq!(
        (stats.in_flight, stats.pending, stats.redelivered),
        (0, 0, 0)
    );
    // The state was checkpointed and rotated along the way.
    let gen_files = state_files(&root.join("mailboxes/jobs/groups/workers"));
    assert_eq!(gen_files.len(), 1, "{gen_files:?}");
    assert_ne!(
        gen_files[0], "state.0.jsonl",
        "expected at least one rotation"
    );
}

#[test]
#[ignore = "runs only as a child process of another test"]
fn drain_worker() {
    if !common::is_child() {
        return;
    }
    let worker = common::env("WORKER");
    let bus = common::open_flush_bus(common::env("BUS"));
    let group = bus.mailbox("jobs").unwrap().group("workers").unwrap();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    loop {
        let batch = group.claim(&worker, 20).unwrap();
        if batch.is_empty() {
            break;
        }
        for d in batch {
            writeln!(out, "CLAIM {worker} {}", d.seq()).unwrap();
            d.ack().unwrap();
            writeln!(out, "ACK {worker} {}", d.seq()).unwrap();
        }
    }
    out.flush().unwrap();
}

#[test]
fn a_worker_killed_between_claim_and_ack_is_redelivered_after_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bus");
    let bus = Bus::init(&root).unwrap();
    let mb = bus.create_mailbox("jobs").unwrap();
    let group = mb
        .create_group_with(
            "workers",
            GroupOptions::new().visibility(Duration::from_secs(2)),
        )
        .unwrap();
    mb.send(NewMessage::new("job").body("important")).unwrap();

    let mut child = common::child("claim_and_hang")
        .env("BUS", &root)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let claimed = lines
        .by_ref()
        .map(Result::unwrap)
        .find_map(|l| l.strip_prefix("CLAIMED ").map(str::to_owned))
        .expect("child never claimed");
    let claimed_at = Instant::now();
    assert_eq!(claimed, "1");
    child.kill().unwrap(); // SIGKILL between claim and ack
    child.wait().unwrap();
    drop(lines);

    // While the dead worker's claim is live, nobody else gets the message...
    let early = group.claim_one("survivor").unwrap();
    if claimed_at.elapsed() < Duration::from_millis(1500) {
        assert!(early.is_none(), "redelivered before the visibility timeout");
    }
    // ...afterwards the survivor gets it, as attempt 2.
    let deadline = Instant::now() + Duration::from_secs(20);
    let d = loop {
        if let Some(d) = group.claim_one("survivor").unwrap() {
            break d;
        }
        assert!(Instant::now() < deadline, "never redelivered");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(claimed_at.elapsed() >= Duration::from_millis(1500));
    assert_eq!((d.seq(), d.attempt), (1, 2));
    assert_eq!(d.message.body.as_deref(), Some("important"));
    d.ack().unwrap();
    let stats = group.stats().unwrap();
    assert_eq!((stats.acked, stats.redelivered, stats.pending), (1, 1, 0));
}

#[test]
#[ignore = "runs only as a child process of another test"]
fn claim_and_hang() {
    if !common::is_child() {
        return;
    }
    let bus = Bus::open(common::env("BUS")).unwrap();
    let group = bus.mailbox("jobs").unwrap().group("workers").unwrap();
    let d = group.claim_one("doomed").unwrap().unwrap();
    println!("CLAIMED {}", d.seq());
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(600));
}

#[test]
fn a_message_that_always_fails_is_dead_lettered_with_its_history_and_can_be_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_bus(dir.path());
    let mb = bus.create_mailbox("jobs").unwrap();
    let group = mb
        .create_group_with("workers", GroupOptions::new().max_deliveries(3))
        .unwrap();
    assert_eq!(group.dead_letter_mailbox(), "jobs.dlq");
    mb.send(NewMessage::new("job").body("poison").correlation_id("c1"))
        .unwrap();
    mb.send(NewMessage::new("job").body("fine")).unwrap();

    let mut attempts = Vec::new();
    while let Some(d) = group.claim_one("w").unwrap() {
        if d.message.body.as_deref() == Some("poison") {
            attempts.push(d.attempt);
            d.nack(Duration::ZERO, Some("parser exploded")).unwrap();
        } else {
            d.ack().unwrap();
        }
    }
    assert_eq!(attempts, [1, 2, 3]);
    let stats = group.stats().unwrap();
    assert_eq!(
        (stats.dead, stats.acked, stats.pending, stats.in_flight),
        (1, 1, 0, 0)
    );

    let dlq = bus.mailbox("jobs.dlq").unwrap();
    let dead: Vec<_> = dlq.messages().map(Result::unwrap).collect();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].body.as_deref(), Some("poison"));
    assert_eq!(dead[0].correlation_id.as_deref(), Some("c1"));
    let info: serde_json::Value =
        serde_json::from_str(&dead[0].headers[DEAD_LETTER_HEADER]).unwrap();
    assert_eq!(
        (info["mailbox"].as_str(), info["group"].as_str()),
        (Some("jobs"), Some("workers"))
    );
    assert_eq!(info["seq"], 1);
    assert!(
        info["reason"].as_str().unwrap().contains("parser exploded"),
        "{info}"
    );
    let history = info["attempts"].as_array().unwrap();
    assert_eq!(history.len(), 3);
    assert!(history.iter().all(|a| a["outcome"] == "nacked"));

    // Replay: back into the mailbox, delivered afresh.
    let r = mb.send(NewMessage::replay_of(&dead[0])).unwrap();
    let d = group.claim_one("w").unwrap().unwrap();
    assert_eq!((d.seq(), d.attempt), (r.seq, 1));
    assert_eq!(d.message.body.as_deref(), Some("poison"));
    assert!(!d.message.headers.contains_key(DEAD_LETTER_HEADER));
}

#[test]
fn expired_claims_count_towards_max_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_bus(dir.path());
    let mb = bus.create_mailbox("jobs").unwrap();
    let group = mb
        .create_group_with(
            "g",
            GroupOptions::new()
                .max_deliveries(2)
                .dead_letter("graveyard"),
        )
        .unwrap();
    mb.send(NewMessage::new("job")).unwrap();
    for attempt in 1..=2 {
        let d = group.claim_for("w", 1, Duration::from_millis(1)).unwrap();
        assert_eq!(d[0].attempt, attempt);
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(
        group.claim_one("w").unwrap().is_none(),
        "dead-lettered instead"
    );
    let dead = bus
        .mailbox("graveyard")
        .unwrap()
        .messages()
        .next()
        .unwrap()
        .unwrap();
    let info: serde_json::Value = serde_json::from_str(&dead.headers[DEAD_LETTER_HEADER]).unwrap();
    assert!(
        info["reason"].as_str().unwrap().contains("claim expired"),
        "{info}"
    );
    assert_eq!(group.stats().unwrap().dead, 1);
}

#[test]
fn nack_delay_extend_term_and_stale_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_bus(dir.path());
    let mb = bus.create_mailbox("jobs").unwrap();
    let group = mb.create_group("g").unwrap();
    send_n(&mb, 3);

    // nack with a delay: not redelivered before it.
    let d1 = group.claim_one("a").unwrap().unwrap();
    d1.nack(Duration::from_millis(400), Some("later")).unwrap();
    let started = Instant::now();
    let rest = group.claim("b", 10).unwrap();
    let rest_seqs: Vec<u64> = rest.iter().map(|d| d.seq()).collect();
    assert_eq!(rest_seqs, [2, 3], "the nacked message waits for its delay");
    let again = loop {
        if let Some(d) = group.claim_one("b").unwrap() {
            break d;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(started.elapsed() >= Duration::from_millis(350));
    assert_eq!((again.seq(), again.attempt), (1, 2));
    // The old delivery is stale now.
    assert!(matches!(
        d1.nack(Duration::ZERO, None),
        Err(Error::StaleDelivery { .. })
    ));
    assert!(matches!(
        d1.extend(Duration::from_secs(1)),
        Err(Error::StaleDelivery { .. })
    ));

    // extend keeps a short claim alive.
    mb.send(NewMessage::new("job")).unwrap();
    let short = group
        .claim_for("c", 1, Duration::from_millis(200))
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(short.seq(), 4);
    short.extend(Duration::from_secs(30)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        group.claim_one("d").unwrap().is_none(),
        "extended claim was taken"
    );

    // term settles without ack and is never redelivered.
    short.term(Some("not worth it")).unwrap();
    for d in rest.iter().chain([&again]) {
        d.ack().unwrap();
    }
    assert!(group.claim_one("d").unwrap().is_none());
    let stats = group.stats().unwrap();
    assert_eq!(
        (stats.acked, stats.termed, stats.pending, stats.in_flight),
        (3, 1, 0, 0)
    );

    // Acking twice is harmless; acking what was never delivered is an error.
    assert!(!group.ack(2).unwrap());
    assert!(matches!(
        group.ack(99),
        Err(Error::NotDelivered { seq: 99, .. })
    ));
    assert!(matches!(
        group.nack(4, Duration::ZERO, None),
        Err(Error::StaleDelivery { .. })
    ));
}

#[test]
fn cumulative_ack_settles_everything_delivered_up_to_a_seq() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_bus(dir.path());
    let mb = bus.create_mailbox("jobs").unwrap();
    let group = mb.create_group("g").unwrap();
    send_n(&mb, 10);
    assert_eq!(group.claim("w", 6).unwrap().len(), 6);
    assert_eq!(group.ack_upto(4).unwrap(), 4);
    assert_eq!(
        group.ack_upto(100).unwrap(),
        2,
        "only delivered messages are acked"
    );
    let stats = group.stats().unwrap();
    assert_eq!((stats.acked, stats.in_flight, stats.lag), (6, 0, 4));
    assert_eq!(group.claim_one("w").unwrap().unwrap().seq(), 7);
}

#[test]
fn a_group_created_at_the_end_skips_history() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_bus(dir.path());
    let mb = bus.create_mailbox("events").unwrap();
    send_n(&mb, 5);
    let late = mb
        .create_group_with("late", GroupOptions::new().start(StartAt::End))
        .unwrap();
    assert!(late.claim_one("w").unwrap().is_none());
    mb.send(NewMessage::new("new")).unwrap();
    assert_eq!(late.claim_one("w").unwrap().unwrap().seq(), 6);
}

#[test]
fn state_survives_rotation_reopening_and_an_interrupted_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_bus(dir.path());
    let mb = bus.create_mailbox("jobs").unwrap();
    let group = mb.create_group("g").unwrap();
    send_n(&mb, 12_000);
    // Claim and ack one by one: ~2 MB of state records.
    for _ in 0..6_000 {
        group.claim_one("w").unwrap().unwrap().ack().unwrap();
    }
    let held = group.claim("w", 5).unwrap();
    let gdir = mb.path().join("groups/g");
    let files = state_files(&gdir);
    assert_eq!(files.len(), 1);
    assert_ne!(files[0], "state.0.jsonl");
    let checkpoint_size = std::fs::metadata(gdir.join("checkpoint.json"))
        .unwrap()
        .len();
    assert!(
        checkpoint_size < 4096,
        "checkpoint holds no history: {checkpoint_size} bytes"
    );

    // A fresh handle (another process) sees the same state.
    let timeless = |mut s: agentbus::GroupStats| {
        s.oldest_unacked_ms = None;
        s
    };
    let before = timeless(group.stats().unwrap());
    let fresh = Bus::open(dir.path())
        .unwrap()
        .mailbox("jobs")
        .unwrap()
        .group("g")
        .unwrap();
    assert_eq!(timeless(fresh.stats().unwrap()), before);
    assert_eq!((before.acked, before.in_flight), (6_000, 5));

    // A rotation that died after creating the next file but before its checkpoint:
    // nothing is lost, and the stray (empty) file is removed by the next load.
    let n: u64 = files[0]["state.".len()..files[0].len() - ".jsonl".len()]
        .parse()
        .unwrap();
    std::fs::write(gdir.join(format!("state.{}.jsonl", n + 1)), b"").unwrap();
    held[0].ack().unwrap();
    let after = fresh.stats().unwrap();
    assert_eq!((after.acked, after.in_flight), (6_001, 4));
    assert_eq!(fresh.claim_one("w").unwrap().unwrap().seq(), 6_006);
    let reloaded = Bus::open(dir.path())
        .unwrap()
        .mailbox("jobs")
        .unwrap()
        .group("g")
        .unwrap();
    assert_eq!(reloaded.stats().unwrap().acked, 6_001);
    assert_eq!(state_files(&gdir), files);
}

#[test]
fn compaction_removes_settled_segments_and_keeps_readers_going() {
    let dir = tempfile::tempdir().unwrap();
    let bus = segmented_bus(dir.path(), 4096);
    let mb = bus.create_mailbox("jobs").unwrap();
    let fast = mb.create_group("fast").unwrap();
    let slow = mb.create_group("slow").unwrap();
    for i in 0..500 {
        mb.send(NewMessage::new("job").body(i.to_string())).unwrap();
    }
    let segments = || std::fs::read_dir(mb.path().join("log")).unwrap().count();
    let before = segments();
    assert!(before > 10);

    for d in fast.claim("w", 500).unwrap() {
        d.ack().unwrap();
    }
    // `slow` has settled nothing: nothing may go.
    assert!(mb.compact(None).unwrap().removed.is_empty());
    // Settle the first 250 in `slow` too.
    slow.claim("w", 250).unwrap();
    slow.ack_upto(250).unwrap();

    let mut reader = mb.messages();
    let first_read = reader.next().unwrap().unwrap();
    assert_eq!(first_read.seq, 1);
    let report = mb.compact(None).unwrap();
    assert!(!report.removed.is_empty());
    assert_eq!(report.floor, Some(251));
    assert_eq!(segments(), before - report.removed.len());

    // A reader in the middle of a removed segment goes on reading.
    assert_eq!(reader.next().unwrap().unwrap().seq, 2);
    // A new reader starts at the oldest segment left; all unsettled messages are there.
    let stats = mb.stats().unwrap();
    assert!(
        stats.first_seq > 1 && stats.first_seq <= 251,
        "{}",
        stats.first_seq
    );
    assert_eq!(mb.messages().next().unwrap().unwrap().seq, stats.first_seq);
    let rest: Vec<u64> = slow
        .claim("w", 1000)
        .unwrap()
        .iter()
        .map(|d| d.seq())
        .collect();
    assert_eq!(rest, (251..=500).collect::<Vec<_>>());
    assert_eq!(stats.published, 500);

    // Retention keeps recent segments even when settled.
    slow.ack_upto(500).unwrap();
    let kept = mb.compact(Some(Duration::from_secs(3600))).unwrap();
    assert!(kept.removed.is_empty());
    let all = mb.compact(None).unwrap();
    assert!(!all.removed.is_empty());
    assert_eq!(segments(), 1, "everything but the newest segment");
    mb.send(NewMessage::new("job")).unwrap();
    assert_eq!(fast.claim_one("w").unwrap().unwrap().seq(), 501);
}

#[test]
fn stats_report_oldest_unacked_age_and_lag() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_bus(dir.path());
    let mb = bus.create_mailbox("jobs").unwrap();
    let group = mb.create_group("g").unwrap();
    assert_eq!(group.stats().unwrap().oldest_unacked_ms, None);
    send_n(&mb, 3);
    std::thread::sleep(Duration::from_millis(50));
    let s = group.stats().unwrap();
    assert_eq!((s.lag, s.pending, s.next_seq), (3, 3, 1));
    assert!(s.oldest_unacked_ms.unwrap() >= 50);
    let stats = mb.stats().unwrap();
    assert_eq!((stats.published, stats.groups.len()), (3, 1));
}

#[test]
fn a_handle_that_slept_through_several_rotations_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_bus(dir.path());
    let mb = bus.create_mailbox("jobs").unwrap();
    mb.create_group("g").unwrap();
    send_n(&mb, 3_000);
    // Two handles with their own caches, like two processes.
    let sleeper = Bus::open(dir.path())
        .unwrap()
        .mailbox("jobs")
        .unwrap()
        .group("g")
        .unwrap();
    let busy = Bus::open(dir.path())
        .unwrap()
        .mailbox("jobs")
        .unwrap()
        .group("g")
        .unwrap();
    let held = sleeper.claim_one("sleeper").unwrap().unwrap();
    for _ in 0..2_000 {
        busy.claim_one("busy").unwrap().unwrap().ack().unwrap();
    }
    let gen_file = state_files(&mb.path().join("groups/g")).remove(0);
    let gen: u64 = gen_file["state.".len()..gen_file.len() - ".jsonl".len()]
        .parse()
        .unwrap();
    assert!(gen >= 3, "expected several rotations, got generation {gen}");

    held.ack().unwrap();
    let fresh = Bus::open(dir.path())
        .unwrap()
        .mailbox("jobs")
        .unwrap()
        .group("g")
        .unwrap();
    let stats = fresh.stats().unwrap();
    assert_eq!(
        (stats.acked, stats.in_flight, stats.next_seq),
        (2_001, 0, 2_002)
    );
    assert_eq!(sleeper.claim_one("sleeper").unwrap().unwrap().seq(), 2_002);
}

fn raw_record(seq: u64, body: &str) -> String {
    format!(
        "{{\"seq\":{seq},\"id\":\"{}\",\"ts\":\"2026-01-01T00:00:00Z\",\"from\":\"x\",\"type\":\"job\",\"body\":\"{body}\"}}\n",
        uuid::Uuid::now_v7()
    )
}

fn append_raw(path: &std::path::Path, text: &str) {
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}

fn claim_all(group: &agentbus::Group) -> Vec<u64> {
    let seqs: Vec<u64> = group
        .claim("w", 10_000)
        .unwrap()
        .iter()
        .map(|d| d.seq())
        .collect();
    group.ack_upto(u64::MAX).unwrap();
    seqs
}

#[test]
fn damaged_records_under_a_group_are_counted_dead_and_never_block_it() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_bus(dir.path());
    let mb = bus.create_mailbox("jobs").unwrap();
    let group = mb.create_group("g").unwrap();
    send_n(&mb, 5);
    let seg = mb.path().join("log/00000000000000000001.jsonl");
    let text = std::fs::read_to_string(&seg).unwrap();
    let third = text.lines().nth(2).unwrap().to_owned();
    std::fs::write(&seg, text.replace(&third, &third.replace("\"2\"", "\"X\""))).unwrap();

    assert_eq!(claim_all(&group), [1, 2, 4, 5]);
    let stats = group.stats().unwrap();
    assert_eq!(
        (stats.dead, stats.acked, stats.pending, stats.next_seq),
        (1, 4, 0, 6)
    );
}

#[test]
fn a_duplicate_or_skipped_seq_loses_no_valid_message_in_a_group() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_bus(dir.path());
    let mb = bus.create_mailbox("jobs").unwrap();
    let group = mb.create_group("g").unwrap();
    send_n(&mb, 3);
    let seg = mb.path().join("log/00000000000000000001.jsonl");
    // A duplicate of 3, then 4, then a jump to 7 (5 and 6 missing), then 8.
    append_raw(&seg, &raw_record(3, "dup"));
    append_raw(&seg, &raw_record(4, "four"));
    append_raw(&seg, &raw_record(7, "seven"));
    append_raw(&seg, &raw_record(8, "eight"));
    let delivered = group.claim("w", 100).unwrap();
    let seqs: Vec<u64> = delivered.iter().map(|d| d.seq()).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 7, 8]);
    assert_eq!(
        delivered[2].message.body.as_deref(),
        Some("2"),
        "the original 3, not the duplicate"
    );
    let stats = group.stats().unwrap();
    assert_eq!((stats.dead, stats.next_seq), (2, 9));
    // A fresh handle (another process) agrees and finds nothing more.
    let fresh = Bus::open(dir.path())
        .unwrap()
        .mailbox("jobs")
        .unwrap()
        .group("g")
        .unwrap();
    assert!(fresh.claim("w", 100).unwrap().is_empty());
}

#[test]
fn a_gap_between_segments_under_a_group_skips_exactly_the_missing_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let bus = segmented_bus(dir.path(), 1024);
    let mb = bus.create_mailbox("jobs").unwrap();
    let group = mb.create_group("g").unwrap();
    send_each(&mb, 60);
    let mut segs: Vec<u64> = std::fs::read_dir(mb.path().join("log"))
        .unwrap()
        .map(|e| {
            e.unwrap().file_name().to_str().unwrap()[..20]
                .parse()
                .unwrap()
        })
        .collect();
    segs.sort();
    assert!(segs.len() >= 4);
    std::fs::remove_file(mb.path().join(format!("log/{:020}.jsonl", segs[1]))).unwrap();
    let got = claim_all(&group);
    let expected: Vec<u64> = (1..segs[1]).chain(segs[2]..=60).collect();
    assert_eq!(got, expected);
    assert_eq!(group.stats().unwrap().dead, segs[2] - segs[1]);
}

#[test]
fn a_group_started_at_the_end_gets_past_a_damaged_first_record() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_bus(dir.path());
    let mb = bus.create_mailbox("jobs").unwrap();
    send_n(&mb, 3);
    let late = mb
        .create_group_with("late", GroupOptions::new().start(StartAt::End))
        .unwrap();
    let seg = mb.path().join("log/00000000000000000001.jsonl");
    append_raw(&seg, "{\"seq\":4,\"this is not json\n");
    append_raw(&seg, &raw_record(5, "five"));
    assert_eq!(claim_all(&late), [5]);
    assert_eq!(late.stats().unwrap().dead, 1);
}

#[test]
fn a_huge_nack_reason_is_capped_and_does_not_wedge_the_group() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_bus(dir.path());
    let mb = bus.create_mailbox("jobs").unwrap();
    let group = mb
        .create_group_with("g", GroupOptions::new().max_deliveries(2))
        .unwrap();
    send_n(&mb, 1);
    let reason = "x".repeat(2_000_000);
    group
        .claim_one("w")
        .unwrap()
        .unwrap()
        .nack(Duration::ZERO, Some(&reason))
        .unwrap();
    group
        .claim_one("w")
        .unwrap()
        .unwrap()
        .nack(Duration::ZERO, Some(&reason))
        .unwrap();
    // Another process can still read the state, and the dead letter was written.
    let fresh = Bus::open(dir.path())
        .unwrap()
        .mailbox("jobs")
        .unwrap()
        .group("g")
        .unwrap();
    assert_eq!(fresh.stats().unwrap().dead, 1);
    let dead = bus
        .mailbox("jobs.dlq")
        .unwrap()
        .messages()
        .next()
        .unwrap()
        .unwrap();
    assert!(dead.headers[DEAD_LETTER_HEADER].len() < 8_000);
}

#[test]
fn a_delivery_can_be_resumed_by_seq_and_attempt_only_while_it_is_current() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_bus(dir.path());
    let mb = bus.create_mailbox("jobs").unwrap();
    let group = mb.create_group("g").unwrap();
    send_n(&mb, 1);
    group.claim_for("bob", 1, Duration::from_millis(1)).unwrap();
    std::thread::sleep(Duration::from_millis(5));
    let alice = group.claim_one("alice").unwrap().unwrap();
    assert_eq!(alice.attempt, 2);
    // Bob's claim ran out: he cannot act on attempt 1 any more.
    assert!(matches!(
        group.delivery(1, 1),
        Err(Error::StaleDelivery { .. })
    ));
    let resumed = group.delivery(1, 2).unwrap();
    assert_eq!(resumed.consumer, "alice");
    resumed.extend(Duration::from_secs(60)).unwrap();
    resumed.ack().unwrap();
    assert!(matches!(
        group.delivery(1, 2),
        Err(Error::StaleDelivery { .. })
    ));
}

#[test]
fn a_group_created_after_compaction_starts_at_the_oldest_stored_message() {
    let dir = tempfile::tempdir().unwrap();
    let bus = segmented_bus(dir.path(), 1024);
    let mb = bus.create_mailbox("jobs").unwrap();
    let first = mb.create_group("first").unwrap();
    send_each(&mb, 60);
    first.claim("w", 100).unwrap();
    first.ack_upto(60).unwrap();
    assert!(!mb.compact(None).unwrap().removed.is_empty());
    let oldest = mb.first_seq().unwrap();
    assert!(oldest > 1);
    let late = mb.create_group("late").unwrap();
    let stats = late.stats().unwrap();
    assert_eq!((stats.next_seq, stats.lag), (oldest, 60 - oldest + 1));
    assert_eq!(claim_all(&late), (oldest..=60).collect::<Vec<_>>());
}

#[test]
fn a_checkpoint_write_that_died_half_way_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_bus(dir.path());
    let mb = bus.create_mailbox("jobs").unwrap();
    mb.create_group("g").unwrap();
    let gdir = mb.path().join("groups/g");
    std::fs::write(gdir.join(".checkpoint.json.0123abcd.tmp"), b"{\"half").unwrap();
    send_n(&mb, 1);
    let fresh = Bus::open(dir.path())
        .unwrap()
        .mailbox("jobs")
        .unwrap()
        .group("g")
        .unwrap();
    assert_eq!(fresh.claim_one("w").unwrap().unwrap().seq(), 1);
    assert!(!gdir.join(".checkpoint.json.0123abcd.tmp").exists());
}

#[test]
fn a_delivered_message_damaged_afterwards_is_counted_dead_not_a_claim_error_forever() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_bus(dir.path());
    let mb = bus.create_mailbox("jobs").unwrap();
    let group = mb.create_group("g").unwrap();
    send_n(&mb, 2);
    let d = group.claim_one("w").unwrap().unwrap();
    d.nack(Duration::ZERO, Some("later")).unwrap();
    // The record of seq 1 is damaged after it was delivered.
    let seg = mb.path().join("log/00000000000000000001.jsonl");
    let text = std::fs::read_to_string(&seg).unwrap();
    let first = text.lines().next().unwrap().to_owned();
    std::fs::write(
        &seg,
        text.replacen(&first, &first.replace("\"0\"", "\"X\""), 1),
    )
    .unwrap();
    let next = group.claim("w", 10).unwrap();
    assert_eq!(next.iter().map(|d| d.seq()).collect::<Vec<_>>(), [2]);
    let stats = group.stats().unwrap();
    assert_eq!((stats.dead, stats.in_flight), (1, 1));
}

#[test]
fn a_batch_claim_is_one_record_and_its_messages_redeliver_from_another_handle() {
    let dir = tempfile::tempdir().unwrap();
    let bus = segmented_bus(dir.path(), 2048);
    let mb = bus.create_mailbox("jobs").unwrap();
    let group = mb.create_group("g").unwrap();
    send_each(&mb, 50);
    assert_eq!(group.claim("w", 50).unwrap().len(), 50);
    let state = std::fs::read_to_string(
        mb.path()
            .join("groups/g")
            .join(&state_files(&mb.path().join("groups/g"))[0]),
    )
    .unwrap();
    assert_eq!(state.lines().count(), 1, "one claim_range record: {state}");
    assert!(state.contains("\"op\":\"claim_range\""));

    // Another process replays the range (without positions) and redelivers by seq.
    let fresh = Bus::open(dir.path())
        .unwrap()
        .mailbox("jobs")
        .unwrap()
        .group("g")
        .unwrap();
    fresh.nack(37, Duration::ZERO, Some("again")).unwrap();
    let d = fresh.claim_one("w2").unwrap().unwrap();
    assert_eq!((d.seq(), d.attempt), (37, 2));
    assert_eq!(
        d.message.body.as_deref(),
        Some(format!("{:0>60}", 36).as_str())
    );
    assert_eq!(fresh.ack_upto(50).unwrap(), 50);
    assert_eq!(fresh.stats().unwrap().acked, 50);
}

#[test]
fn a_batch_claim_replayed_by_another_handle_keeps_each_message_age_and_redelivers_it() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_bus(dir.path());
    let mb = bus.create_mailbox("jobs").unwrap();
    let group = mb
        .create_group_with(
            "g",
            GroupOptions::new().visibility(Duration::from_millis(300)),
        )
        .unwrap();
    mb.send(NewMessage::new("job").body("old")).unwrap();
    std::thread::sleep(Duration::from_millis(1_000));
    mb.send(NewMessage::new("job").body("new")).unwrap();
    let batch = group.claim("w", 10).unwrap();
    assert_eq!(batch.len(), 2);
    let state = std::fs::read_to_string(
        mb.path()
            .join("groups/g")
            .join(&state_files(&mb.path().join("groups/g"))[0]),
    )
    .unwrap();
    assert!(state.contains(r#""op":"claim_range""#), "{state}");
    batch[0].ack().unwrap();
    let sent = batch[1].message.ts;

    // Another handle (like another process) knows the batch only from its one record.
    let other = Bus::open(dir.path())
        .unwrap()
        .mailbox("jobs")
        .unwrap()
        .group("g")
        .unwrap();
    let oldest = other.stats().unwrap().oldest_unacked_ms.unwrap();
    let age = (time::OffsetDateTime::now_utc() - sent).whole_milliseconds() as u64;
    assert!(
        oldest <= age + 5,
        "oldest unacked is {oldest} ms old, but seq 2 was sent {age} ms ago"
    );
    std::thread::sleep(Duration::from_millis(400));
    let again = other.claim_one("v").unwrap().unwrap();
    assert_eq!(
        (again.seq(), again.attempt, again.message.body.as_deref()),
        (2, 2, Some("new"))
    );
}

#[test]
fn a_rotation_that_keeps_failing_fails_no_call_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_bus(dir.path());
    let mb = bus.create_mailbox("jobs").unwrap();
    let group = mb.create_group("g").unwrap();
    send_n(&mb, 2_000);
    let gdir = mb.path().join("groups/g");
    assert_eq!(state_files(&gdir), ["state.0.jsonl"]);
    // The next generation's file cannot be created: a directory stands in its place.
    std::fs::create_dir(gdir.join("state.1.jsonl")).unwrap();
    for _ in 0..1_000 {
        group.claim_one("w").unwrap().unwrap().ack().unwrap();
    }
    let size = std::fs::metadata(gdir.join("state.0.jsonl")).unwrap().len();
    assert!(size > 64 * 1024, "past the rotation size: {size} bytes");
    let fresh = || {
        Bus::open(dir.path())
            .unwrap()
            .mailbox("jobs")
            .unwrap()
            .group("g")
            .unwrap()
    };
    assert_eq!(fresh().stats().unwrap().acked, 1_000);

    // Once the obstacle is gone, the next write rotates.
    std::fs::remove_dir(gdir.join("state.1.jsonl")).unwrap();
    group.claim_one("w").unwrap().unwrap().ack().unwrap();
    assert_eq!(state_files(&gdir), ["state.1.jsonl"]);
    let stats = fresh().stats().unwrap();
    assert_eq!((stats.acked, stats.next_seq), (1_001, 1_002));
}
