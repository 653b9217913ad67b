//! Torn tails, damaged records and oversized records: never delivered as valid,
//! always reported with file and line, nothing else lost.

mod common;

use std::path::PathBuf;

use agentbus::{Bus, Error, Mailbox, NewMessage, ProblemKind};
use common::append;

fn bus(dir: &std::path::Path) -> Bus {
    common::flush_builder()
        .max_record_bytes(4096)
        .init(dir)
        .unwrap()
}

/// A bus at `dir` like [`bus`]'s, with mailbox `main` holding a message of type `t` for
/// each of `bodies`; and the path of its first segment.
fn main_with(dir: &tempfile::TempDir, bodies: &[&str]) -> (Bus, Mailbox, PathBuf) {
    let bus = bus(dir.path());
    let mb = common::mailbox_with(&bus, "main", bodies);
    (bus, mb, common::first_segment(dir.path(), "main"))
}

fn bodies(mb: &agentbus::Mailbox) -> Vec<String> {
    mb.messages()
        .map(|m| m.unwrap().body.unwrap_or_default())
        .collect()
}

#[test]
fn torn_tail_is_not_delivered_and_the_next_writer_repairs_it() {
    let dir = tempfile::tempdir().unwrap();
    let (bus, mb, seg) = main_with(&dir, &["one", "two"]);
    let good_len = std::fs::metadata(&seg).unwrap().len();
    append(&seg, br#"{"crc":"00000000","seq":3,"body":"thr"#);

    // Readers stop before the torn line, without an error.
    assert_eq!(bodies(&mb), ["one", "two"]);
    let report = bus.doctor(false).unwrap();
    assert_eq!(report.problems.len(), 1);
    let p = &report.problems[0];
    assert_eq!(
        (p.kind, p.line, p.repaired),
        (ProblemKind::TornTail, 3, false)
    );
    assert_eq!(p.path, seg);

    // A writer from a fresh handle (as after a restart) cuts it and continues at 3.
    let fresh = Bus::open(dir.path()).unwrap().mailbox("main").unwrap();
    assert_eq!(
        fresh.send(NewMessage::new("t").body("three")).unwrap().seq,
        3
    );
    assert_eq!(bodies(&mb), ["one", "two", "three"]);
    let text = std::fs::read_to_string(&seg).unwrap();
    assert!(!text.contains("\"thr\""), "torn bytes survived: {text}");
    assert!(std::fs::metadata(&seg).unwrap().len() > good_len);
    assert!(bus.doctor(false).unwrap().problems.is_empty());

    // And a handle with a cached tail notices the change too.
    append(&seg, b"{\"seq\":4,");
    assert_eq!(mb.send(NewMessage::new("t").body("four")).unwrap().seq, 4);
    assert_eq!(bodies(&mb), ["one", "two", "three", "four"]);
}

#[test]
fn doctor_repair_truncates_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (bus, mb, seg) = main_with(&dir, &[]);
    mb.send(NewMessage::new("t")).unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    append(&seg, b"{\"seq\":2");
    let report = bus.doctor(true).unwrap();
    assert!(report.is_clean());
    assert!(report.problems[0].repaired);
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), len);
    assert!(bus.doctor(false).unwrap().problems.is_empty());
}

#[test]
fn a_damaged_middle_record_is_reported_with_file_and_line_and_nothing_else_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (bus, mb, seg) = main_with(&dir, &["alpha", "bravo", "charlie"]);
    common::edit_first_segment(dir.path(), "main", "bravo", "brave");

    let items: Vec<_> = mb.messages().collect();
    assert_eq!(items.len(), 3);
    assert_eq!(items[0].as_ref().unwrap().body.as_deref(), Some("alpha"));
    match &items[1] {
        Err(Error::Corrupt { path, line, reason }) => {
            assert_eq!((path, *line), (&seg, 2));
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(items[2].as_ref().unwrap().body.as_deref(), Some("charlie"));

    let report = bus.doctor(true).unwrap();
    assert!(!report.is_clean(), "damage must not be 'repaired' away");
    assert_eq!(report.problems.len(), 1);
    assert_eq!(report.problems[0].kind, ProblemKind::Damaged);
    assert_eq!(report.problems[0].line, 2);
    // Still on disk for a human to look at.
    assert!(std::fs::read_to_string(&seg).unwrap().contains("brave"));

    // Sending still works: the damage is not at the tail.
    assert_eq!(mb.send(NewMessage::new("t").body("delta")).unwrap().seq, 4);
}

#[test]
fn a_damaged_last_record_stops_writers_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let (_bus, _mb, seg) = main_with(&dir, &["alpha", "bravo"]);
    common::edit_first_segment(dir.path(), "main", "bravo", "brave");
    let before = std::fs::read(&seg).unwrap();

    let fresh = Bus::open(dir.path()).unwrap().mailbox("main").unwrap();
    match fresh.send(NewMessage::new("t")) {
        Err(Error::Corrupt { path, line, .. }) => assert_eq!((path, line), (seg.clone(), 2)),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(
        std::fs::read(&seg).unwrap(),
        before,
        "nothing may be written"
    );
}

#[test]
fn oversized_records_are_refused_on_write_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (_bus, mb, seg) = main_with(&dir, &["small"]);
    let before = std::fs::read(&seg).unwrap();

    let big = NewMessage::new("t").body("x".repeat(5000));
    match mb.send(big.clone()) {
        Err(Error::RecordTooLarge { size, limit }) => {
            assert!(size > 5000);
            assert_eq!(limit, 4096);
        }
        other => panic!("expected RecordTooLarge, got {other:?}"),
    }
    // A batch with one oversized message writes none of them.
    let batch = [NewMessage::new("t").body("ok"), big];
    assert!(matches!(
        mb.send_batch(batch),
        Err(Error::RecordTooLarge { .. })
    ));
    assert_eq!(std::fs::read(&seg).unwrap(), before);
    assert_eq!(mb.send(NewMessage::new("t").body("next")).unwrap().seq, 2);
}

#[test]
fn oversized_records_are_reported_on_read_and_reading_continues() {
    let dir = tempfile::tempdir().unwrap();
    let (_bus, mb, seg) = main_with(&dir, &["one"]);
    // An outside tool wrote a 10 KB record.
    append(&seg, common::raw_record(2, "t", &"y".repeat(10_000)));
    let items: Vec<_> = mb.messages().collect();
    assert_eq!(items.len(), 2);
    let reason = common::corrupt_reason(&items[1], 2);
    assert!(reason.contains("exceeds the limit"), "{reason}");
}

#[test]
fn records_with_wrong_field_types_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (_bus, mb, seg) = main_with(&dir, &[]);
    append(
        &seg,
        b"{\"seq\":1,\"id\":42,\"type\":[]}\nnot json at all\n",
    );
    let items: Vec<_> = mb.messages().collect();
    assert_eq!(items.len(), 2);
    for (i, item) in items.iter().enumerate() {
        common::corrupt_reason(item, i as u64 + 1);
    }
}

#[test]
fn a_follower_that_saw_a_torn_tail_reads_the_repaired_record() {
    let dir = tempfile::tempdir().unwrap();
    let (_bus, mb, seg) = main_with(&dir, &["one"]);
    let mut follower = mb.messages();
    assert_eq!(
        follower.next().unwrap().unwrap().body.as_deref(),
        Some("one")
    );
    append(
        &seg,
        br#"{"crc":"00000000","seq":2,"body":"torn torn torn torn"#,
    );
    assert!(follower.next().is_none(), "a torn tail is never delivered");

    // A writer repairs the tail and writes a different (shorter) record there.
    let fresh = Bus::open(dir.path()).unwrap().mailbox("main").unwrap();
    fresh.send(NewMessage::new("t").body("two")).unwrap();
    let m = follower.next().unwrap().unwrap();
    assert_eq!((m.seq, m.body.as_deref()), (2, Some("two")));
    assert!(follower.next().is_none());
}

#[test]
fn a_gap_between_segments_is_reported_and_reading_continues_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::segmented_bus(dir.path(), 600);
    let mb = bus.create_mailbox("main").unwrap();
    for i in 0..30 {
        mb.send(NewMessage::new("t").body(format!("{i:0>100}")))
            .unwrap();
    }
    let log = mb.path().join("log");
    let mut segments: Vec<_> = std::fs::read_dir(&log)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segments.sort();
    assert!(segments.len() >= 4);
    let lost: u64 = segments[1].file_name().unwrap().to_str().unwrap()[..20]
        .parse()
        .unwrap();
    let after: u64 = segments[2].file_name().unwrap().to_str().unwrap()[..20]
        .parse()
        .unwrap();
    std::fs::remove_file(&segments[1]).unwrap();

    let items: Vec<_> = mb.messages().collect();
    let errors: Vec<_> = items.iter().filter_map(|i| i.as_ref().err()).collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0]
        .to_string()
        .contains(&format!("seqs {lost} to {} are missing", after - 1)));
    let seqs: Vec<u64> = items
        .iter()
        .filter_map(|i| i.as_ref().ok())
        .map(|m| m.seq)
        .collect();
    let expected: Vec<u64> = (1..lost).chain(after..=30).collect();
    assert_eq!(
        seqs, expected,
        "everything after the gap is still delivered"
    );
    let report = bus.doctor(false).unwrap();
    assert!(report
        .problems
        .iter()
        .any(|p| p.kind == ProblemKind::Damaged));
}

#[test]
fn a_record_after_a_seq_gap_is_reported_then_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let (_bus, mb, seg) = main_with(&dir, &["one"]);
    // An outside writer skipped seq 2 and 3.
    append(&seg, common::raw_record(4, "t", "four"));
    let items: Vec<_> = mb.messages().collect();
    assert_eq!(items.len(), 3);
    assert!(items[0].is_ok());
    let reason = common::corrupt_reason(&items[1], 2);
    assert!(reason.contains("expected seq 2, found 4"), "{reason}");
    assert_eq!(items[2].as_ref().unwrap().body.as_deref(), Some("four"));
    assert_eq!(mb.send(NewMessage::new("t")).unwrap().seq, 5);
}

#[test]
fn doctor_checks_key_index_group_state_and_lease_files_too() {
    let dir = tempfile::tempdir().unwrap();
    let bus = bus(dir.path());
    let mb = bus.create_mailbox("main").unwrap();
    mb.send(NewMessage::new("t").idempotency_key("k")).unwrap();
    let group = mb.create_group("g").unwrap();
    group.claim_one("w").unwrap().unwrap().ack().unwrap();
    let other = mb.create_group("g2").unwrap();
    other.claim_one("w").unwrap().unwrap().ack().unwrap();
    bus.lease("res").try_acquire().unwrap().release().unwrap();
    assert!(bus.doctor(false).unwrap().problems.is_empty());

    let flip = |path: std::path::PathBuf| {
        let text = std::fs::read_to_string(&path).unwrap();
        let i = text.find("\"seq\":").unwrap() + 6;
        let mut bytes = text.into_bytes();
        bytes[i] = if bytes[i] == b'9' { b'8' } else { b'9' };
        std::fs::write(&path, bytes).unwrap();
    };
    let bucket = std::fs::read_dir(mb.path().join("keys"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .unwrap();
    flip(bucket.clone());
    let state = mb.path().join("groups/g/state.0.jsonl");
    flip(state.clone());
    let lease = dir.path().join("leases/res.jsonl");
    flip(lease.clone());
    // Torn tails in undamaged files (their writers died mid-append): group state, a
    // key bucket, a lease file.
    let torn = mb.path().join("groups/g2/state.0.jsonl");
    append(&torn, b"{\"seq\":9");
    mb.send(NewMessage::new("t").idempotency_key("other"))
        .unwrap();
    let torn_bucket = std::fs::read_dir(mb.path().join("keys"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "jsonl") && *p != bucket)
        .unwrap();
    append(&torn_bucket, b"{\"seq\":9");
    bus.lease("other").try_acquire().unwrap().release().unwrap();
    let torn_lease = dir.path().join("leases/other.jsonl");
    append(&torn_lease, b"{\"seq\":9");

    let report = bus.doctor(false).unwrap();
    let damaged: Vec<_> = report
        .problems
        .iter()
        .filter(|p| p.kind == ProblemKind::Damaged)
        .map(|p| p.path.clone())
        .collect();
    for path in [&bucket, &state, &lease] {
        assert!(
            damaged.contains(path),
            "{path:?} not reported: {:?}",
            report.problems
        );
    }
    for path in [&torn, &torn_bucket, &torn_lease] {
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.kind == ProblemKind::TornTail && p.path == *path),
            "{path:?} not reported: {:?}",
            report.problems
        );
    }
    // Repair cuts every torn tail, even with a damaged lease file beside it; damage
    // stays reported, never silently fixed.
    let repaired = bus.doctor(true).unwrap();
    assert!(!repaired
        .problems
        .iter()
        .any(|p| p.kind == ProblemKind::TornTail && !p.repaired));
    assert!(!repaired.is_clean());
    let after = bus.doctor(false).unwrap();
    assert!(
        !after
            .problems
            .iter()
            .any(|p| p.kind == ProblemKind::TornTail),
        "{:?}",
        after.problems
    );
}
