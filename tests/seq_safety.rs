//! A seq is never handed out twice: not after a power cut took a tail that `Flush`
//! sends had receipts for, not after an outside writer broke the sequence.
//!
//! A power cut is modelled by cutting a segment back to the last byte that was synced,
//! and the machine's restart by a new `AGENTBUS_BOOT_ID` for the processes after it.

mod common;

use std::path::Path;

use agentbus::{Bus, Error, NewMessage, ProblemKind, LOST_TYPE};
use common::{cli, first_segment, ok};

fn segment_len(dir: &Path) -> u64 {
    std::fs::metadata(first_segment(dir, "main")).unwrap().len()
}

/// Cuts the segment back to `len` bytes: what a power cut leaves of a file whose data
/// after `len` was never synced.
fn power_cut(dir: &Path, len: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(first_segment(dir, "main"))
        .unwrap();
    f.set_len(len).unwrap();
}

/// `agentbus send main` in a process started after the machine restarted.
fn send_after_restart(dir: &Path, extra: &[&str]) -> serde_json::Value {
    let mut cmd = cli(dir);
    cmd.env("AGENTBUS_BOOT_ID", "the-boot-after-the-cut")
        .args(["send", "main", "--type", "t", "--body", "after"])
        .args(extra);
    ok(cmd.output().unwrap()).remove(0)
}

/// 1-10 sent with Sync, 11-15 with Flush (keys `k1`..`k15`), then the cut takes 11-15.
fn lose_a_flush_tail(dir: &Path) -> Bus {
    let bus = Bus::builder().agent("w").init(dir).unwrap();
    let mb = bus.create_mailbox("main").unwrap();
    for i in 1..=10 {
        mb.send(NewMessage::new("t").idempotency_key(format!("k{i}")))
            .unwrap();
    }
    let synced = segment_len(dir);
    let flush = common::open_flush_bus(dir);
    let fm = flush.mailbox("main").unwrap();
    for i in 11..=15 {
        let r = fm
            .send(NewMessage::new("t").idempotency_key(format!("k{i}")))
            .unwrap();
        assert_eq!(r.seq, i);
    }
    power_cut(dir, synced);
    bus
}

#[test]
fn seqs_of_flush_sends_lost_in_a_power_cut_are_never_handed_out_again() {
    let dir = tempfile::tempdir().unwrap();
    let bus = lose_a_flush_tail(dir.path());

    let mut new = Vec::new();
    for _ in 0..5 {
        new.push(send_after_restart(dir.path(), &[])["seq"].as_u64().unwrap());
    }
    assert!(
        new.iter().all(|&s| s > 15),
        "seqs 11-15 went out before the cut; after it the sends got {new:?}"
    );
    assert!(new.windows(2).all(|w| w[1] == w[0] + 1), "{new:?}");

    // A reader goes from 10 to a notice that stands for the lost seqs, then on.
    let mb = bus.mailbox("main").unwrap();
    let all: Vec<_> = mb.messages().map(|m| m.unwrap()).collect();
    let seqs: Vec<u64> = all.iter().map(|m| m.seq).collect();
    assert_eq!(&seqs[..10], &(1..=10).collect::<Vec<_>>()[..]);
    let notice = &all[10];
    assert_eq!(notice.kind, LOST_TYPE);
    let lost = notice.lost_seqs().expect("a lost-seqs notice");
    assert_eq!(*lost.start(), 11);
    assert!(*lost.end() >= 15 && *lost.end() + 1 == notice.seq);
    assert_eq!(&seqs[11..], &new[..]);
    assert!(bus.doctor(false).unwrap().is_clean());

    // Another restart finds nothing new to account for.
    let next = send_after_restart(dir.path(), &[]);
    assert_eq!(next["seq"].as_u64().unwrap(), new[4] + 1);
}

#[test]
fn a_retry_of_a_send_lost_in_a_power_cut_is_stored_not_taken_for_another_message() {
    let dir = tempfile::tempdir().unwrap();
    let bus = lose_a_flush_tail(dir.path());

    // k12's message is gone: its retry stores it again.
    let retry = send_after_restart(dir.path(), &["--idempotency-key", "k12"]);
    assert_eq!(retry["duplicate"], false, "{retry}");
    let seq = retry["seq"].as_u64().unwrap();
    assert!(seq > 15);
    let mb = bus.mailbox("main").unwrap();
    let stored = mb.messages().map(|m| m.unwrap()).find(|m| m.seq == seq);
    assert_eq!(stored.unwrap().idempotency_key.as_deref(), Some("k12"));
    // Once more: now it is a duplicate of the resend.
    let again = send_after_restart(dir.path(), &["--idempotency-key", "k12"]);
    assert_eq!(
        (again["duplicate"].as_bool(), again["seq"].as_u64()),
        (Some(true), Some(seq))
    );
    // A synced send's key still answers with its original.
    let k3 = send_after_restart(dir.path(), &["--idempotency-key", "k3"]);
    assert_eq!(
        (k3["duplicate"].as_bool(), k3["seq"].as_u64()),
        (Some(true), Some(3))
    );
}

#[test]
fn a_group_that_saw_records_a_power_cut_took_still_gets_every_later_send() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::builder().agent("w").init(dir.path()).unwrap();
    let mb = bus.create_mailbox("main").unwrap();
    mb.create_group("workers").unwrap();
    for _ in 1..=10 {
        mb.send(NewMessage::new("t")).unwrap();
    }
    let synced = segment_len(dir.path());
    let flush = common::open_flush_bus(dir.path());
    for _ in 11..=15 {
        flush
            .mailbox("main")
            .unwrap()
            .send(NewMessage::new("t"))
            .unwrap();
    }
    // The group (synced state) takes and acks all fifteen.
    let group = mb.group("workers").unwrap();
    let got = group.claim("c", 15).unwrap();
    assert_eq!(got.len(), 15);
    for d in got {
        d.ack().unwrap();
    }
    // The cut keeps the group's state but takes the unsynced records (as a release
    // that did not sync the log before moving a group's cursor could leave it).
    power_cut(dir.path(), synced);
    drop((group, mb, flush));
    let report = Bus::open(dir.path()).unwrap().doctor(false).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.kind == ProblemKind::AheadOfLog),
        "doctor must see the group ahead of its log: {report:?}"
    );

    let new: Vec<u64> = (0..5)
        .map(|_| send_after_restart(dir.path(), &[])["seq"].as_u64().unwrap())
        .collect();
    let bus = Bus::open(dir.path()).unwrap();
    let group = bus.mailbox("main").unwrap().group("workers").unwrap();
    let got = group.claim("c", 10).unwrap();
    let kinds: Vec<&str> = got.iter().map(|d| d.message.kind.as_str()).collect();
    assert_eq!(kinds[0], LOST_TYPE, "{kinds:?}");
    let seqs: Vec<u64> = got[1..].iter().map(|d| d.message.seq).collect();
    assert_eq!(seqs, new, "every send after the cut reaches the group");
    assert!(bus.doctor(false).unwrap().is_clean());
}

/// Writes one record as an outside writer would (FORMAT.md), with seq `seq`.
fn outside_record(dir: &Path, seq: u64) {
    use std::io::Write;
    let line = format!(
        "{{\"seq\":{seq},\"id\":\"{}\",\"ts\":\"2026-12-02T00:00:00Z\",\"from\":\"py\",\"type\":\"t\"}}\n",
        uuid_like(seq)
    );
    std::fs::OpenOptions::new()
        .append(true)
        .open(first_segment(dir, "main"))
        .unwrap()
        .write_all(line.as_bytes())
        .unwrap();
}

fn uuid_like(n: u64) -> String {
    format!("01890000-0000-7000-8000-{n:012}")
}

#[test]
fn a_backwards_or_repeated_seq_from_an_outside_writer_is_refused_not_built_on() {
    for (case, bad) in [("backwards", 3), ("repeated", 5)] {
        let dir = tempfile::tempdir().unwrap();
        let (_bus, mb) = common::flush_mailbox(dir.path(), "main");
        for _ in 1..=5 {
            mb.send(NewMessage::new("t")).unwrap();
        }
        outside_record(dir.path(), bad);
        // The same handle (which saw seq 5) and a new process both refuse.
        match mb.send(NewMessage::new("t")) {
            Err(Error::Corrupt { reason, .. }) => {
                assert!(reason.contains("sequence is broken"), "{case}: {reason}")
            }
            other => panic!("{case}: appended after a broken sequence: {other:?}"),
        }
        let out = cli(dir.path())
            .args(["send", "main", "--type", "t"])
            .output()
            .unwrap();
        let err = common::fails(out, 1);
        assert_eq!(err["error"], "corrupt", "{case}: {err}");
        // Nothing was appended: the log still ends with the outside record.
        assert_eq!(mb.last_seq().unwrap(), bad, "{case}");
    }
}

#[test]
fn a_damaged_last_record_that_still_parses_its_seq_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_bus, mb) = common::flush_mailbox(dir.path(), "main");
    mb.send(NewMessage::new("t").body("alpha")).unwrap();
    // The next seq, but a checksum that does not match: damaged, though its seq reads.
    let line = format!(
        "{{\"crc\":\"00000000\",\"seq\":2,\"id\":\"{}\",\"ts\":\"2026-12-02T00:00:00Z\",\"from\":\"py\",\"type\":\"t\"}}\n",
        uuid_like(2)
    );
    let seg = first_segment(dir.path(), "main");
    let mut text = std::fs::read_to_string(&seg).unwrap();
    text.push_str(&line);
    std::fs::write(&seg, &text).unwrap();
    assert!(matches!(
        mb.send(NewMessage::new("t")),
        Err(Error::Corrupt { .. })
    ));
    let out = cli(dir.path())
        .args(["send", "main", "--type", "t"])
        .output()
        .unwrap();
    assert_eq!(common::fails(out, 1)["error"], "corrupt");
    assert_eq!(
        std::fs::read_to_string(&seg).unwrap(),
        text,
        "nothing appended"
    );
}

#[test]
fn an_outside_writer_that_continues_the_sequence_is_built_on() {
    // (A jump forward hands out no seq twice: readers report the seqs missing, and
    // sends go on after it; see tests/damage.rs.)
    let dir = tempfile::tempdir().unwrap();
    let (_bus, mb) = common::flush_mailbox(dir.path(), "main");
    mb.send(NewMessage::new("t")).unwrap();
    outside_record(dir.path(), 2);
    assert_eq!(mb.send(NewMessage::new("t")).unwrap().seq, 3);
    outside_record(dir.path(), 4);
    outside_record(dir.path(), 5);
    assert_eq!(mb.send(NewMessage::new("t")).unwrap().seq, 6);
}

/// An outside writer's keyed record is indexed by agentbus only at the next keyed send;
/// compaction must not take its key away with its segment.
#[test]
fn compaction_keeps_the_keys_of_records_nobody_indexed_yet() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_builder()
        .agent("w")
        .segment_bytes(400)
        .init(dir.path())
        .unwrap();
    let mb = bus.create_mailbox("main").unwrap();
    let group = mb.create_group("g").unwrap();
    mb.send(NewMessage::new("t")).unwrap();
    let line = format!(
        "{{\"seq\":2,\"id\":\"{}\",\"ts\":\"2026-12-02T00:00:00Z\",\"from\":\"py\",\"type\":\"t\",\"idempotency_key\":\"from-python\"}}\n",
        uuid_like(2)
    );
    std::fs::OpenOptions::new()
        .append(true)
        .open(first_segment(dir.path(), "main"))
        .unwrap()
        .write_all(line.as_bytes())
        .unwrap();
    for _ in 0..20 {
        mb.send(NewMessage::new("t").body("x".repeat(100))).unwrap();
    }
    for d in group.claim("c", 100).unwrap() {
        d.ack().unwrap();
    }
    let report = mb.compact(None).unwrap();
    assert!(
        report.removed.contains(&first_segment(dir.path(), "main")),
        "{report:?}"
    );
    // The retry of the outside writer's send, through agentbus: the original.
    let again = mb
        .send(NewMessage::new("t").idempotency_key("from-python"))
        .unwrap();
    assert_eq!((again.duplicate, again.seq), (true, 2));
}
