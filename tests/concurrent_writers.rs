//! Concurrent appends from real processes and from threads: no interleaving, no gaps,
//! no duplicate ids, also across segment rollovers.

mod common;

use std::collections::HashSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use agentbus::{Bus, NewMessage};

const WRITERS: usize = 8;
const PER_WRITER: usize = 2_000;

/// Starts `n` writer processes, each sending [`PER_WRITER`] messages to `main` of the
/// bus at `root`.
fn spawn_writers(root: &std::path::Path, n: usize) -> Vec<std::process::Child> {
    (0..n)
        .map(|w| {
            common::child("writer_process")
                .env("BUS", root)
                .env("WRITER", w.to_string())
                .env("COUNT", PER_WRITER.to_string())
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect()
}

#[test]
fn eight_writer_processes_give_contiguous_seqs_and_unique_ids() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bus");
    // Small segments so the writers also race on rollovers.
    let bus = Bus::builder().segment_bytes(64 * 1024).init(&root).unwrap();
    bus.create_mailbox("main").unwrap();

    let children = spawn_writers(&root, WRITERS);
    for mut c in children {
        assert!(c.wait().unwrap().success(), "a writer process failed");
    }

    let mailbox = bus.mailbox("main").unwrap();
    let messages: Vec<_> = mailbox.messages().collect::<agentbus::Result<_>>().unwrap();
    assert_eq!(messages.len(), WRITERS * PER_WRITER);
    let seqs: Vec<u64> = messages.iter().map(|m| m.seq).collect();
    assert_eq!(
        seqs,
        (1..=(WRITERS * PER_WRITER) as u64).collect::<Vec<_>>()
    );
    let ids: HashSet<_> = messages.iter().map(|m| m.id).collect();
    assert_eq!(ids.len(), messages.len(), "duplicate ids");

    // Each writer's messages appear exactly once and in the order it sent them.
    let mut next = [0usize; WRITERS];
    for m in &messages {
        let w: usize = m.from.strip_prefix("writer-").unwrap().parse().unwrap();
        assert_eq!(m.body.as_deref(), Some(format!("{w}-{}", next[w]).as_str()));
        next[w] += 1;
    }
    assert!(next.iter().all(|&n| n == PER_WRITER));

    let segments = std::fs::read_dir(root.join("mailboxes/main/log"))
        .unwrap()
        .count();
    assert!(
        segments > 10,
        "expected rollovers, got {segments} segment(s)"
    );
    let report = bus.doctor(false).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.records, (WRITERS * PER_WRITER) as u64);
}

#[test]
fn a_reader_and_a_group_at_the_tail_keep_up_with_writers_rolling_segments() {
    const TOTAL: u64 = 2 * PER_WRITER as u64;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bus");
    // Two or three records per segment: a reader at the tail meets a rollover at
    // almost every record, with writers racing it.
    let bus = common::segmented_bus(&root, 512);
    let mailbox = bus.create_mailbox("main").unwrap();
    let group = mailbox.create_group("g").unwrap();
    let children = spawn_writers(&root, 2);
    let deadline = Instant::now() + Duration::from_secs(120);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut messages = mailbox.messages();
            let mut next = 1;
            while next <= TOTAL && Instant::now() < deadline {
                match messages.next() {
                    Some(m) => {
                        let m = m.unwrap_or_else(|e| panic!("reader at seq {next}: {e}"));
                        assert_eq!(m.seq, next);
                        next += 1;
                    }
                    None => std::hint::spin_loop(),
                }
            }
            assert_eq!(next, TOTAL + 1, "the reader fell behind");
        });
        s.spawn(|| {
            let mut acked = 0;
            while acked < TOTAL && Instant::now() < deadline {
                for d in group.claim("c", 10).unwrap() {
                    d.ack().unwrap();
                    acked += 1;
                }
            }
            assert_eq!(acked, TOTAL, "the group fell behind");
        });
    });
    for mut c in children {
        assert!(c.wait().unwrap().success(), "a writer process failed");
    }
    let stats = group.stats().unwrap();
    assert_eq!((stats.acked, stats.dead), (TOTAL, 0));
}

#[test]
#[ignore = "runs only as a child process of another test"]
fn writer_process() {
    let Some(w) = common::child_env("WRITER") else {
        return;
    };
    let count: usize = common::env("COUNT").parse().unwrap();
    let bus = common::flush_builder()
        .agent(format!("writer-{w}"))
        .open(common::env("BUS"))
        .unwrap();
    let mailbox = bus.mailbox("main").unwrap();
    let mut last = 0;
    for i in 0..count {
        let r = mailbox
            .send(NewMessage::new("note").body(format!("{w}-{i}")))
            .unwrap();
        assert!(r.seq > last, "seq went backwards within one writer");
        last = r.seq;
    }
}

#[test]
fn threads_sharing_and_not_sharing_a_handle() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::segmented_bus(dir.path(), 16 * 1024);
    let shared = bus.create_mailbox("main").unwrap();
    std::thread::scope(|s| {
        for t in 0..4 {
            let shared = shared.clone();
            let bus = bus.clone();
            s.spawn(move || {
                // Even threads share one handle; odd threads open their own.
                let own;
                let mb = if t % 2 == 0 {
                    &shared
                } else {
                    own = bus.mailbox("main").unwrap();
                    &own
                };
                for i in 0..500 {
                    mb.send(NewMessage::new("note").body(format!("{t}-{i}")))
                        .unwrap();
                }
            });
        }
    });
    let seqs: Vec<u64> = shared.messages().map(|m| m.unwrap().seq).collect();
    assert_eq!(seqs, (1..=2000).collect::<Vec<_>>());
}
