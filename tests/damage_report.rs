//! Damage is reported where it is and never hides the intact records around it; a
//! reader that fell behind compaction is told so, not told of damage.

mod common;

use std::time::Duration;

use agentbus::{Bus, Error, NewMessage};

/// A mailbox `main` holding `alpha`, then a damaged `bravo` as its last record.
fn with_damaged_last_record(dir: &std::path::Path) -> Bus {
    let bus = common::flush_bus(dir);
    common::mailbox_with(&bus, "main", &["alpha", "bravo"]);
    common::edit_first_segment(dir, "main", "bravo", "brave");
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
    let stats = common::run_ok(dir.path(), ["stats"]);
    assert_eq!(stats[0]["mailbox"], "main");
    assert_eq!(stats[0]["published"], 2);
}

#[test]
fn a_follower_behind_compaction_is_told_so_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (bus, mb, group) = common::main_with_workers(dir.path());

    // The follower opens the first segment, then falls behind.
    let mut rx = bus.follow(&["main"]).unwrap().from_seq(1);
    assert_eq!(rx.try_recv().unwrap().message.seq, 1);
    let first_available = common::grow_settle_and_compact(&mb, &group);
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

/// The notices in `mailbox`'s dead-letter mailbox, as their `dead_letter` headers.
fn damage_notices(bus: &Bus, mailbox: &str) -> Vec<serde_json::Value> {
    let Ok(dlq) = bus.mailbox(&format!("{mailbox}.dlq")) else {
        return Vec::new();
    };
    dlq.messages()
        .map(Result::unwrap)
        .filter(|m| m.kind == agentbus::DAMAGED_TYPE)
        .map(|m| serde_json::from_str(&m.headers[agentbus::DEAD_LETTER_HEADER]).unwrap())
        .collect()
}

#[test]
fn a_group_reports_damage_in_its_path_and_delivers_the_record_once_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let (bus, mb, group) = common::with_group(common::flush_bus(dir.path()), "main", "workers");
    common::send_bodies(&mb, "t", &["alpha", "bravo", "charlie"]);
    let seg = common::first_segment(dir.path(), "main");
    let intact = std::fs::read_to_string(&seg).unwrap();
    common::edit_first_segment(dir.path(), "main", "bravo", "brave");

    assert_eq!(common::seqs(&group.claim("w", 10).unwrap()), [1, 3]);
    assert_eq!(group.stats().unwrap().dead, 1);
    let notices = damage_notices(&bus, "main");
    assert_eq!(notices.len(), 1, "{notices:?}");
    let n = &notices[0];
    assert_eq!(
        (n["group"].as_str(), n["first_seq"].as_u64()),
        (Some("workers"), Some(2))
    );
    assert_eq!(
        (n["last_seq"].as_u64(), n["line"].as_u64()),
        (Some(2), Some(2))
    );
    assert!(n["reason"].as_str().unwrap().contains("checksum"), "{n}");
    assert!(group.claim("w", 10).unwrap().is_empty());
    assert_eq!(damage_notices(&bus, "main").len(), 1, "reported once");

    // Still damaged: requeueing says so.
    assert!(matches!(group.requeue(2), Err(Error::Corrupt { .. })));
    // Repaired: requeued, it is delivered as a first attempt.
    std::fs::write(&seg, &intact).unwrap();
    assert!(group.requeue(2).unwrap());
    assert!(!group.requeue(2).unwrap(), "already waiting");
    let d = group.claim_one("w").unwrap().expect("the repaired record");
    assert_eq!((d.seq(), d.attempt), (2, 1));
    assert_eq!(d.message.body.as_deref(), Some("bravo"));
    d.ack().unwrap();
    let st = group.stats().unwrap();
    assert_eq!((st.acked, st.pending, st.in_flight), (1, 0, 2));
    assert!(matches!(group.requeue(9), Err(Error::NotDelivered { .. })));
}

#[test]
fn a_group_reports_a_duplicate_record_that_hides_no_seq() {
    let dir = tempfile::tempdir().unwrap();
    let (bus, mb, group) = common::with_group(common::flush_bus(dir.path()), "main", "workers");
    mb.send(NewMessage::new("t").body("alpha")).unwrap();
    let seg = common::first_segment(dir.path(), "main");
    // An outside tool appends a copy of record 1 (seq 1 again).
    common::append(&seg, std::fs::read(&seg).unwrap());

    assert_eq!(common::seqs(&group.claim("w", 10).unwrap()), [1]);
    let notices = damage_notices(&bus, "main");
    assert_eq!(notices.len(), 1, "{notices:?}");
    assert!(notices[0]["first_seq"].is_null());
    assert_eq!(notices[0]["line"], 2);
    assert!(notices[0]["reason"].as_str().unwrap().contains("found 1"));
}

#[test]
fn the_cli_warns_of_damage_a_group_passes_over_and_requeues_it_once_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let bus = with_damaged_last_record(dir.path());
    bus.mailbox("main").unwrap().create_group("g").unwrap();

    let out = common::cli(dir.path())
        .args(["recv", "main", "--group", "g", "--max", "5"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("\"warning\"") && stderr.contains("passed over damage"),
        "{stderr}"
    );
    assert_eq!(common::ok(out)[0]["seq"], 1);

    common::edit_first_segment(dir.path(), "main", "brave", "bravo");
    let requeued = common::run_ok(dir.path(), ["group", "requeue", "main", "g", "2"]);
    assert_eq!(requeued[0]["requeued"], true);
    let got = common::run_ok(dir.path(), ["recv", "main", "--group", "g"]);
    assert_eq!(
        (got[0]["seq"].as_u64(), got[0]["body"].as_str()),
        (Some(2), Some("bravo"))
    );
}
