//! Damage is reported where it is and never hides the intact records around it; a
//! reader that fell behind compaction is told so, not told of damage.

mod common;

use std::time::Duration;

use agentbus::{Bus, Durability, Error, NewMessage};

/// A mailbox `main` holding `alpha`, then a damaged `bravo` as its last record.
fn with_damaged_last_record(dir: &std::path::Path) -> Bus {
    let bus = common::flush_bus(dir);
    let mb = bus.create_mailbox("main").unwrap();
    mb.send(NewMessage::new("t").body("alpha")).unwrap();
    mb.send(NewMessage::new("t").body("bravo")).unwrap();
    let seg = common::first_segment(dir, "main");
    let text = std::fs::read_to_string(&seg).unwrap();
    std::fs::write(&seg, text.replacen("bravo", "brave", 1)).unwrap();
    bus
}

#[test]
fn a_damaged_last_record_hides_nothing_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let bus = with_damaged_last_record(dir.path());
    let mb = bus.mailbox("main").unwrap();
    // The damaged record still holds its seq.
    assert_eq!(mb.last_seq().unwrap(), 2);
    assert_eq!(mb.stats().unwrap().published, 2);

    // A follower from the start sees the intact record, then the damage, where it is.
    let mut rx = bus.follow(&["main"]).unwrap().from_seq(1);
    let first = rx.try_recv().unwrap();
    assert_eq!(first.message.body.as_deref(), Some("alpha"));
    match rx.try_recv() {
        Err(agentbus::TryRecvError::Bus(Error::Corrupt { line, .. })) => assert_eq!(line, 2),
        other => panic!("expected the damage at line 2, got {other:?}"),
    }
    assert!(rx.try_recv().unwrap_err().is_empty());

    // The CLI prints the intact record, reports the damaged one on stderr, and the
    // bus-wide stats still answer for every mailbox.
    let out = common::cli(dir.path())
        .args(["recv", "main"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("\"alpha\""), "stdout: {stdout}");
    assert!(stderr.contains("\"corrupt\""), "stderr: {stderr}");
    assert!(
        !out.status.success(),
        "damage is reported in the exit status"
    );
    let stats = common::ok(common::cli(dir.path()).arg("stats").output().unwrap());
    assert_eq!(stats[0]["mailbox"], "main");
    assert_eq!(stats[0]["published"], 2);
}

#[test]
fn a_follower_behind_compaction_is_told_so_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::builder()
        .durability(Durability::Flush)
        .segment_bytes(1024)
        .init(dir.path())
        .unwrap();
    let mb = bus.create_mailbox("main").unwrap();
    let group = mb.create_group("workers").unwrap();
    mb.send(NewMessage::new("t").body("0")).unwrap();

    // The follower opens the first segment, then falls behind.
    let mut rx = bus.follow(&["main"]).unwrap().from_seq(1);
    assert_eq!(rx.try_recv().unwrap().message.seq, 1);
    for i in 1..60 {
        mb.send(NewMessage::new("t").body(i.to_string())).unwrap();
    }
    for d in group.claim("w", 100).unwrap() {
        d.ack().unwrap();
    }
    let report = mb.compact(None).unwrap();
    assert!(report.removed.len() >= 2, "{report:?}");
    let first_available = mb.first_seq().unwrap();
    assert!(bus.doctor(false).unwrap().is_clean());

    // It reads what its open segment still holds, then learns it was compacted past.
    let mut seqs = Vec::new();
    let err = loop {
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(e) => seqs.push(e.message.seq),
            Err(agentbus::RecvTimeoutError::Bus(e)) => break e,
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(err.code(), "compacted");
    match err {
        Error::Compacted {
            missed_from,
            first_available: at,
            ..
        } => {
            assert_eq!(missed_from, seqs.last().unwrap() + 1);
            assert_eq!(at, first_available);
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    // And goes on at the oldest seq still stored, to the end.
    let next = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(next.message.seq, first_available);
    let mut last = next.message.seq;
    while let Ok(e) = rx.try_recv() {
        assert_eq!(e.message.seq, last + 1);
        last = e.message.seq;
    }
    assert_eq!(last, 60);
}
