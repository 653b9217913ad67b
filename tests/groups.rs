//! Consumer groups on the directory only: the group's state files (rotation,
//! checkpoints, batch claim records), damaged logs under a group, and compaction. The
//! behaviours both backends share (competing worker processes, redelivery after a
//! crash, dead letters, nack/extend/term, cumulative ack, stats) are in `backends.rs`.

mod common;

use std::time::Duration;

use common::{
    append, first_segment, jobs_group, raw_record, segmented_bus, send_n, seqs, state_files,
};

use agentbus::{Group, GroupOptions, Mailbox, NewMessage, StartAt};

/// A fresh handle on group `g` of `jobs` in the bus at `dir` (like another process).
fn fresh_group(dir: &tempfile::TempDir) -> Group {
    common::open_group(dir.path(), "jobs", "g")
}

/// The generation a state file's name (`state.<generation>.jsonl`) gives.
fn generation(file: &str) -> u64 {
    file["state.".len()..file.len() - ".jsonl".len()]
        .parse()
        .unwrap()
}

/// The text of group `g`'s (one) state file.
fn state_text(mb: &Mailbox) -> String {
    let gdir = mb.path().join("groups/g");
    std::fs::read_to_string(gdir.join(&state_files(&gdir)[0])).unwrap()
}

/// Replaces `from` by `to` in line `index` (from 0) of the first segment of `jobs`.
fn damage_line(dir: &tempfile::TempDir, index: usize, from: &str, to: &str) {
    let seg = first_segment(dir.path(), "jobs");
    let text = std::fs::read_to_string(&seg).unwrap();
    let line = text.lines().nth(index).unwrap().to_owned();
    std::fs::write(&seg, text.replacen(&line, &line.replace(from, to), 1)).unwrap();
}

/// A bus at `dir` rolling over every `bytes`, with mailbox `jobs` and its group `group`,
/// and `n` messages sent one by one (a batch never rolls over in the middle) with bodies
/// `0...0`, `0...1`, ... (60 characters each).
fn segmented_jobs(dir: &tempfile::TempDir, bytes: u64, group: &str, n: usize) -> (Mailbox, Group) {
    let bus = segmented_bus(dir.path(), bytes);
    let mb = bus.create_mailbox("jobs").unwrap();
    let group = mb.create_group(group).unwrap();
    for i in 0..n {
        mb.send(NewMessage::new("job").body(format!("{i:0>60}")))
            .unwrap();
    }
    (mb, group)
}

#[test]
fn state_survives_rotation_reopening_and_an_interrupted_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let (_bus, mb, group) = jobs_group(dir.path(), 12_000);
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
    let fresh = fresh_group(&dir);
    assert_eq!(timeless(fresh.stats().unwrap()), before);
    assert_eq!((before.acked, before.in_flight), (6_000, 5));

    // A rotation that died after creating the next file but before its checkpoint:
    // nothing is lost, and the stray (empty) file is removed by the next load.
    let n = generation(&files[0]);
    std::fs::write(gdir.join(format!("state.{}.jsonl", n + 1)), b"").unwrap();
    held[0].ack().unwrap();
    let after = fresh.stats().unwrap();
    assert_eq!((after.acked, after.in_flight), (6_001, 4));
    assert_eq!(fresh.claim_one("w").unwrap().unwrap().seq(), 6_006);
    assert_eq!(fresh_group(&dir).stats().unwrap().acked, 6_001);
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
    let rest = seqs(&slow.claim("w", 1000).unwrap());
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
fn a_handle_that_slept_through_several_rotations_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let (_bus, mb, _) = jobs_group(dir.path(), 3_000);
    // Two handles with their own caches, like two processes.
    let sleeper = fresh_group(&dir);
    let busy = fresh_group(&dir);
    let held = sleeper.claim_one("sleeper").unwrap().unwrap();
    for _ in 0..2_000 {
        busy.claim_one("busy").unwrap().unwrap().ack().unwrap();
    }
    let gen = generation(&state_files(&mb.path().join("groups/g"))[0]);
    assert!(gen >= 3, "expected several rotations, got generation {gen}");

    held.ack().unwrap();
    let stats = fresh_group(&dir).stats().unwrap();
    assert_eq!(
        (stats.acked, stats.in_flight, stats.next_seq),
        (2_001, 0, 2_002)
    );
    assert_eq!(sleeper.claim_one("sleeper").unwrap().unwrap().seq(), 2_002);
}

fn claim_all(group: &Group) -> Vec<u64> {
    let seqs = seqs(&group.claim("w", 10_000).unwrap());
    group.ack_upto(u64::MAX).unwrap();
    seqs
}

#[test]
fn damaged_records_under_a_group_are_counted_dead_and_never_block_it() {
    let dir = tempfile::tempdir().unwrap();
    let (_bus, _mb, group) = jobs_group(dir.path(), 5);
    damage_line(&dir, 2, "\"2\"", "\"X\"");

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
    let (_bus, _mb, group) = jobs_group(dir.path(), 3);
    let seg = first_segment(dir.path(), "jobs");
    // A duplicate of 3, then 4, then a jump to 7 (5 and 6 missing), then 8.
    for (seq, body) in [(3, "dup"), (4, "four"), (7, "seven"), (8, "eight")] {
        append(&seg, raw_record(seq, "job", body));
    }
    let delivered = group.claim("w", 100).unwrap();
    assert_eq!(seqs(&delivered), [1, 2, 3, 4, 7, 8]);
    assert_eq!(
        delivered[2].message.body.as_deref(),
        Some("2"),
        "the original 3, not the duplicate"
    );
    let stats = group.stats().unwrap();
    assert_eq!((stats.dead, stats.next_seq), (2, 9));
    // A fresh handle (another process) agrees and finds nothing more.
    assert!(fresh_group(&dir).claim("w", 100).unwrap().is_empty());
}

#[test]
fn a_gap_between_segments_under_a_group_skips_exactly_the_missing_seqs() {
    let dir = tempfile::tempdir().unwrap();
    let (mb, group) = segmented_jobs(&dir, 1024, "g", 60);
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
    let (_bus, mb) = common::flush_mailbox(dir.path(), "jobs");
    send_n(&mb, 3);
    let late = mb
        .create_group_with("late", GroupOptions::new().start(StartAt::End))
        .unwrap();
    let seg = first_segment(dir.path(), "jobs");
    append(&seg, "{\"seq\":4,\"this is not json\n");
    append(&seg, raw_record(5, "job", "five"));
    assert_eq!(claim_all(&late), [5]);
    assert_eq!(late.stats().unwrap().dead, 1);
}

#[test]
fn a_group_created_after_compaction_starts_at_the_oldest_stored_message() {
    let dir = tempfile::tempdir().unwrap();
    let (mb, first) = segmented_jobs(&dir, 1024, "first", 60);
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
    let (_bus, mb, _) = jobs_group(dir.path(), 0);
    let gdir = mb.path().join("groups/g");
    std::fs::write(gdir.join(".checkpoint.json.0123abcd.tmp"), b"{\"half").unwrap();
    send_n(&mb, 1);
    assert_eq!(fresh_group(&dir).claim_one("w").unwrap().unwrap().seq(), 1);
    assert!(!gdir.join(".checkpoint.json.0123abcd.tmp").exists());
}

#[test]
fn a_delivered_message_damaged_afterwards_is_counted_dead_not_a_claim_error_forever() {
    let dir = tempfile::tempdir().unwrap();
    let (_bus, _mb, group) = jobs_group(dir.path(), 2);
    let d = group.claim_one("w").unwrap().unwrap();
    d.nack(Duration::ZERO, Some("later")).unwrap();
    // The record of seq 1 is damaged after it was delivered.
    damage_line(&dir, 0, "\"0\"", "\"X\"");
    let next = group.claim("w", 10).unwrap();
    assert_eq!(seqs(&next), [2]);
    let stats = group.stats().unwrap();
    assert_eq!((stats.dead, stats.in_flight), (1, 1));
}

#[test]
fn a_batch_claim_is_one_record_and_its_messages_redeliver_from_another_handle() {
    let dir = tempfile::tempdir().unwrap();
    let (mb, group) = segmented_jobs(&dir, 2048, "g", 50);
    assert_eq!(group.claim("w", 50).unwrap().len(), 50);
    let state = state_text(&mb);
    assert_eq!(state.lines().count(), 1, "one claim_range record: {state}");
    assert!(state.contains("\"op\":\"claim_range\""));

    // Another process replays the range (without positions) and redelivers by seq.
    let fresh = fresh_group(&dir);
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
    let (_bus, mb) = common::flush_mailbox(dir.path(), "jobs");
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
    let state = state_text(&mb);
    assert!(state.contains(r#""op":"claim_range""#), "{state}");
    batch[0].ack().unwrap();
    let sent = batch[1].message.ts;

    // Another handle (like another process) knows the batch only from its one record.
    let other = fresh_group(&dir);
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
    let (_bus, mb, group) = jobs_group(dir.path(), 2_000);
    let gdir = mb.path().join("groups/g");
    assert_eq!(state_files(&gdir), ["state.0.jsonl"]);
    // The next generation's file cannot be created: a directory stands in its place.
    std::fs::create_dir(gdir.join("state.1.jsonl")).unwrap();
    for _ in 0..1_000 {
        group.claim_one("w").unwrap().unwrap().ack().unwrap();
    }
    let size = std::fs::metadata(gdir.join("state.0.jsonl")).unwrap().len();
    assert!(size > 64 * 1024, "past the rotation size: {size} bytes");
    assert_eq!(fresh_group(&dir).stats().unwrap().acked, 1_000);

    // Once the obstacle is gone, the next write rotates.
    std::fs::remove_dir(gdir.join("state.1.jsonl")).unwrap();
    group.claim_one("w").unwrap().unwrap().ack().unwrap();
    assert_eq!(state_files(&gdir), ["state.1.jsonl"]);
    let stats = fresh_group(&dir).stats().unwrap();
    assert_eq!((stats.acked, stats.next_seq), (1_001, 1_002));
}

/// A group whose filter releases before type patterns would misread (a pattern read
/// as a plain type matches nothing, so they would pass over every message; a
/// `not_types` they ignore) is written with group format 2, which those releases
/// refuse to open; every other group keeps format 1. This build reads both, and
/// refuses a format from the future by name.
#[test]
fn a_filter_old_releases_would_misread_marks_the_group_format_2() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_bus(dir.path());
    let mb = bus.create_mailbox("main").unwrap();
    let with = |filter| GroupOptions::new().filter(filter);
    use agentbus::Filter;
    for (group, opts, format) in [
        ("plain", GroupOptions::new(), 1),
        ("typed", with(Filter::new().of_type("draft.ready")), 1),
        ("prefix", with(Filter::new().of_type("draft.>")), 2),
        ("one", with(Filter::new().of_type("*.done")), 2),
        ("but", with(Filter::new().not_type("alert")), 2),
    ] {
        mb.create_group_with(group, opts).unwrap();
        let path = dir
            .path()
            .join(format!("mailboxes/main/groups/{group}/group.json"));
        let meta: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(meta["format"], format, "{group}: {meta}");
    }
    let prefix = dir.path().join("mailboxes/main/groups/prefix/group.json");
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(&prefix).unwrap()).unwrap();
    assert_eq!(meta["filter"]["types"], serde_json::json!(["draft.>"]));

    // A `not_types` group written before the marker (format 1) still opens and filters.
    let but = dir.path().join("mailboxes/main/groups/but/group.json");
    let mut old: serde_json::Value = serde_json::from_slice(&std::fs::read(&but).unwrap()).unwrap();
    old["format"] = 1.into();
    std::fs::write(&but, old.to_string()).unwrap();
    mb.send(NewMessage::new("alert")).unwrap();
    mb.send(NewMessage::new("task")).unwrap();
    let got = mb.group("but").unwrap().claim("w", 5).unwrap();
    assert_eq!(common::seqs(&got), [2]);

    old["format"] = 3.into();
    std::fs::write(&but, old.to_string()).unwrap();
    match mb.group("but") {
        Err(agentbus::Error::UnsupportedFormat {
            found: 3,
            supported: 2,
            path,
        }) => assert_eq!(path, but),
        other => panic!("expected unsupported_format, got {other:?}"),
    }
}
