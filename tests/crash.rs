//! Writers killed with SIGKILL at random moments: the mailbox stays readable, every
//! receipt a writer was handed is on disk, and torn tails are repaired by the next
//! writer.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::process::Stdio;
use std::time::Duration;

use agentbus::{Bus, Durability, NewMessage, ProblemKind};

#[test]
fn sigkilled_writers_lose_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bus");
    let bus = Bus::builder()
        .segment_bytes(256 * 1024)
        .init(&root)
        .unwrap();
    bus.create_mailbox("main").unwrap();
    let (mut rng, seed) = common::Rng::seeded_from_time();
    eprintln!("seed {seed}");

    // seq -> id, from the receipts the writers printed after `send` returned.
    let mut acknowledged: HashMap<u64, String> = HashMap::new();
    let mut torn_tails_seen = 0;
    for round in 0..12 {
        let mut children: Vec<_> = (0..3)
            .map(|w| {
                common::child("crash_writer")
                    .env("BUS", &root)
                    .env("SEED", (seed ^ (round * 16 + w)).to_string())
                    .env("DURABILITY", if w == 0 { "sync" } else { "flush" })
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20 + rng.below(120)));
        for c in &mut children {
            c.kill().unwrap(); // SIGKILL
        }
        for c in children {
            let out = c.wait_with_output().unwrap();
            for line in out.stdout.lines() {
                let line = line.unwrap();
                if let Some(rest) = line.strip_prefix("RECEIPT ") {
                    let (seq, id) = rest.split_once(' ').unwrap();
                    let old = acknowledged.insert(seq.parse().unwrap(), id.to_owned());
                    assert!(old.is_none(), "seq {seq} handed out twice");
                }
            }
        }
        // Readers must cope with whatever the kill left behind, between rounds too.
        let report = bus.doctor(false).unwrap();
        for p in &report.problems {
            assert_eq!(p.kind, ProblemKind::TornTail, "damage after a kill: {p:?}");
            torn_tails_seen += 1;
        }
    }
    eprintln!(
        "{} acknowledged messages, {torn_tails_seen} torn tail(s) observed",
        acknowledged.len()
    );
    assert!(
        acknowledged.len() > 50,
        "writers made too little progress to test anything"
    );

    let mailbox = bus.mailbox("main").unwrap();
    let stored: Vec<_> = mailbox.messages().collect::<agentbus::Result<_>>().unwrap();
    let seqs: Vec<u64> = stored.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, (1..=stored.len() as u64).collect::<Vec<_>>());
    let by_seq: HashMap<u64, String> = stored.iter().map(|m| (m.seq, m.id.to_string())).collect();
    for (seq, id) in &acknowledged {
        assert_eq!(
            by_seq.get(seq),
            Some(id),
            "acknowledged seq {seq} missing or different"
        );
    }

    // The next writer repairs any torn tail and continues the sequence.
    let r = mailbox.send(NewMessage::new("after")).unwrap();
    assert_eq!(r.seq, stored.len() as u64 + 1);
    let report = bus.doctor(false).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

#[test]
#[ignore = "runs only as a child process of another test"]
fn crash_writer() {
    let Some(seed) = common::child_env("SEED") else {
        return;
    };
    let mut rng = common::Rng::new(seed.parse().unwrap());
    let durability = match common::env("DURABILITY").as_str() {
        "sync" => Durability::Sync,
        _ => Durability::Flush,
    };
    let bus = Bus::builder()
        .durability(durability)
        .agent("crasher")
        .open(common::env("BUS"))
        .unwrap();
    let mailbox = bus.mailbox("main").unwrap();
    let mut out = std::io::stdout().lock();
    loop {
        // Mostly small records, some large ones so a kill can land inside write().
        let size = if rng.below(4) == 0 { 200_000 } else { 100 };
        let body = "x".repeat(size + rng.below(100) as usize);
        let msg = NewMessage::new("crash.test").body(body);
        let receipts = if rng.below(3) == 0 {
            mailbox.send_batch([msg.clone(), msg]).unwrap()
        } else {
            vec![mailbox.send(msg).unwrap()]
        };
        for r in receipts {
            writeln!(out, "RECEIPT {} {}", r.seq, r.id).unwrap();
        }
        out.flush().unwrap();
    }
}

#[test]
fn a_writer_killed_mid_append_leaves_no_stale_lock_and_its_torn_record_is_cut() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bus");
    let bus = Bus::init(&root).unwrap();
    let mailbox = bus.create_mailbox("main").unwrap();
    mailbox.send(NewMessage::new("before")).unwrap();

    let (mut child, mut lines) =
        common::spawn_lines(common::child("half_writer").env("BUS", &root));
    // Wait for the child's signal (the test harness prints its own lines first); keep
    // the pipe open so the child is not killed by SIGPIPE.
    assert!(
        lines.any(|l| l.trim() == "LOCKED"),
        "child never took the lock"
    );

    // The child holds the lock with half a record written: a send has to wait.
    let (tx, rx) = std::sync::mpsc::channel();
    let sender = std::thread::spawn(move || {
        tx.send(mailbox.send(NewMessage::new("after"))).unwrap();
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "send ignored the lock"
    );

    child.kill().unwrap(); // SIGKILL while holding the flock
    child.wait().unwrap();
    drop(lines);
    let receipt = rx.recv_timeout(Duration::from_secs(30)).unwrap().unwrap();
    sender.join().unwrap();
    assert_eq!(receipt.seq, 2);

    let kinds: Vec<_> = bus
        .mailbox("main")
        .unwrap()
        .messages()
        .map(|m| m.unwrap().kind)
        .collect();
    assert_eq!(kinds, ["before", "after"]);
    let text = std::fs::read_to_string(common::first_segment(&root, "main")).unwrap();
    assert!(!text.contains("half"), "torn bytes survived: {text}");
    assert!(bus.doctor(false).unwrap().problems.is_empty());
}

#[test]
#[ignore = "runs only as a child process of another test"]
fn half_writer() {
    let Some(root) = common::child_env("BUS").map(std::path::PathBuf::from) else {
        return;
    };
    let lock = std::fs::File::open(root.join("mailboxes/main/lock")).unwrap();
    lock.lock().unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(common::first_segment(&root, "main"))
        .unwrap()
        .write_all(br#"{"crc":"00000000","seq":2,"type":"half"#)
        .unwrap();
    println!("LOCKED");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(600));
}
