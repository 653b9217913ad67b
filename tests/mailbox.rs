//! Mailbox behaviour through the library: receipts, reading and filters, idempotent
//! send, segment rollover, the format marker, permissions and symlinks.

mod common;

use std::os::unix::fs::PermissionsExt;

use agentbus::{Bus, Error, NewMessage};

#[test]
fn an_empty_newest_segment_ends_reading_and_is_written_into() {
    // A writer that dies right after rolling over leaves an empty segment behind.
    let dir = tempfile::tempdir().unwrap();
    let (bus, mb) = common::flush_mailbox(dir.path(), "main");
    mb.send(NewMessage::new("t")).unwrap();
    std::fs::File::create(mb.path().join("log/00000000000000000002.jsonl")).unwrap();
    assert_eq!(mb.messages().count(), 1);
    let fresh = Bus::open(dir.path()).unwrap().mailbox("main").unwrap();
    assert_eq!(fresh.send(NewMessage::new("t")).unwrap().seq, 2);
    let seqs: Vec<_> = mb.messages().map(|m| m.unwrap().seq).collect();
    assert_eq!(seqs, [1, 2]);
    assert!(bus.doctor(false).unwrap().problems.is_empty());
}

#[test]
fn writers_with_fresh_handles_continue_after_rollover() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::segmented_bus(dir.path(), 1000);
    bus.create_mailbox("main").unwrap();
    for i in 1..=50u64 {
        // A new handle each time: like one CLI process per send.
        let mb = Bus::open(dir.path()).unwrap().mailbox("main").unwrap();
        assert_eq!(
            mb.send(NewMessage::new("t").body("y".repeat(90)))
                .unwrap()
                .seq,
            i
        );
    }
    let mb = bus.mailbox("main").unwrap();
    let names: Vec<String> = {
        let mut v: Vec<_> = std::fs::read_dir(mb.path().join("log"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert!(names.len() >= 4, "{names:?}");
    // Each segment is named after the seq of its first record.
    for name in &names {
        let first: u64 = name[..20].parse().unwrap();
        let m = mb.messages().from_seq(first).next().unwrap().unwrap();
        let text = std::fs::read_to_string(mb.path().join("log").join(name)).unwrap();
        assert!(text.contains(&format!("\"seq\":{},", m.seq)));
        assert_eq!(m.seq, first);
    }
    // The segment size is a property of the mailbox, not of the handle.
    let other = Bus::builder()
        .segment_bytes(1 << 30)
        .open(dir.path())
        .unwrap();
    let other = other.mailbox("main").unwrap();
    other
        .send(NewMessage::new("t").body("y".repeat(2000)))
        .unwrap();
    let after_full = other.send(NewMessage::new("t")).unwrap();
    let seg = mb
        .path()
        .join("log")
        .join(format!("{:020}.jsonl", after_full.seq));
    assert!(
        seg.exists(),
        "a full segment must roll over whatever the handle's setting"
    );
}

#[test]
fn a_key_whose_index_entry_was_lost_in_a_crash_is_recovered() {
    let dir = tempfile::tempdir().unwrap();
    let (_bus, mb) = common::flush_mailbox(dir.path(), "main");
    let first = mb.send(NewMessage::new("t").idempotency_key("k")).unwrap();
    // Simulate a crash between the message append and the index append.
    for e in std::fs::read_dir(mb.path().join("keys")).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let fresh = Bus::open(dir.path()).unwrap().mailbox("main").unwrap();
    let again = fresh
        .send(NewMessage::new("t").idempotency_key("k"))
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.seq, first.seq);
    assert_eq!(mb.messages().count(), 1);
}

#[test]
fn format_marker_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(Bus::open(dir.path()), Err(Error::NotABus { .. })));
    Bus::init(dir.path()).unwrap();
    Bus::init(dir.path()).unwrap(); // idempotent
    let marker = dir.path().join("agentbus.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&marker).unwrap()).unwrap();
    assert_eq!(v["format"], 1);
    std::fs::write(&marker, r#"{"format":2}"#).unwrap();
    match Bus::open(dir.path()) {
        Err(Error::UnsupportedFormat {
            found,
            supported,
            path,
        }) => {
            assert_eq!((found, supported), (2, 1));
            assert_eq!(path, marker);
        }
        other => panic!("expected UnsupportedFormat, got {other:?}"),
    }
    assert!(matches!(
        Bus::init(dir.path()),
        Err(Error::UnsupportedFormat { .. })
    ));
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn files_are_private_by_default_and_shareable_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("private");
    let mb = Bus::init(&root).unwrap().create_mailbox("main").unwrap();
    mb.send(NewMessage::new("t").idempotency_key("k")).unwrap();
    assert_eq!(mode(&root), 0o700);
    assert_eq!(mode(mb.path()), 0o700);
    assert_eq!(mode(&mb.path().join("log")), 0o700);
    assert_eq!(mode(&root.join("agentbus.json")), 0o600);
    assert_eq!(mode(&mb.path().join("lock")), 0o600);
    assert_eq!(
        mode(&mb.path().join("log/00000000000000000001.jsonl")),
        0o600
    );
    for e in std::fs::read_dir(mb.path().join("keys")).unwrap() {
        assert_eq!(mode(&e.unwrap().path()), 0o600);
    }

    let shared = dir.path().join("shared");
    let bus = Bus::builder()
        .file_mode(0o660)
        .dir_mode(0o770)
        .init(&shared)
        .unwrap();
    let mb = bus.create_mailbox("main").unwrap();
    assert_eq!(mode(&shared), 0o770);
    assert_eq!(mode(mb.path()), 0o770);
    assert_eq!(
        mode(&mb.path().join("log/00000000000000000001.jsonl")),
        0o660
    );
}

#[test]
fn symlinks_inside_the_bus_are_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bus");
    let bus = Bus::init(&root).unwrap();
    let mb = bus.create_mailbox("main").unwrap();
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();

    // A segment replaced by a symlink to a file outside the bus.
    let seg = mb.path().join("log/00000000000000000001.jsonl");
    std::fs::remove_file(&seg).unwrap();
    std::os::unix::fs::symlink(&victim, &seg).unwrap();
    let fresh = Bus::open(&root).unwrap().mailbox("main").unwrap();
    let err = fresh.send(NewMessage::new("t")).unwrap_err();
    assert!(matches!(err, Error::UnsafeFile { .. }), "{err:?}");
    assert!(fresh.messages().next().unwrap().is_err());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");

    // A mailbox directory replaced by a symlink to a directory outside the bus.
    let outside = dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, root.join("mailboxes/evil")).unwrap();
    assert!(bus.mailbox("evil").is_err());
    assert!(!bus.mailboxes().unwrap().contains(&"evil".to_owned()));
}

#[test]
fn keys_of_a_whole_batch_are_recovered_when_indexing_was_lost() {
    let dir = tempfile::tempdir().unwrap();
    let (_bus, mb) = common::flush_mailbox(dir.path(), "main");
    let receipts = mb
        .send_batch([
            NewMessage::new("t").idempotency_key("k1"),
            NewMessage::new("t"),
            NewMessage::new("t").idempotency_key("k2"),
        ])
        .unwrap();
    // As if the writer died after its append and before indexing.
    std::fs::remove_dir_all(mb.path().join("keys")).unwrap();
    std::fs::create_dir(mb.path().join("keys")).unwrap();
    // Others append meanwhile, so the keyed records are not the last ones.
    mb.send(NewMessage::new("t")).unwrap();

    let fresh = Bus::open(dir.path()).unwrap().mailbox("main").unwrap();
    for (key, original) in [("k1", &receipts[0]), ("k2", &receipts[2])] {
        let again = fresh
            .send(NewMessage::new("t").idempotency_key(key))
            .unwrap();
        assert!(again.duplicate, "{key} was sent twice");
        assert_eq!(again.seq, original.seq);
    }
    assert_eq!(mb.messages().count(), 4);
}

#[test]
fn keys_written_by_outside_writers_are_deduplicated() {
    let dir = tempfile::tempdir().unwrap();
    let (_bus, mb) = common::flush_mailbox(dir.path(), "main");
    mb.send(NewMessage::new("t").idempotency_key("first"))
        .unwrap();
    let seg = mb.path().join("log/00000000000000000001.jsonl");
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    std::io::Write::write_all(
        &mut f,
        format!(
            "{{\"seq\":2,\"id\":\"{}\",\"ts\":\"2026-01-01T00:00:00Z\",\"from\":\"py\",\"type\":\"t\",\"idempotency_key\":\"outside\"}}\n",
            uuid::Uuid::now_v7()
        )
        .as_bytes(),
    )
    .unwrap();
    let again = mb
        .send(NewMessage::new("t").idempotency_key("outside"))
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.seq, 2);
    assert!(
        mb.send(NewMessage::new("t").idempotency_key("first"))
            .unwrap()
            .duplicate
    );
}
