//! A bus written by an earlier build (format 1, commit ae59c6b; see
//! `tests/fixtures/make-bus-v1.sh`) opens, reads and drains with this one, byte for
//! byte as that build left it.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use agentbus::{Bus, Error, NewMessage, DEAD_LETTER_HEADER, HANDOFF_GROUP};

/// Lays out `tests/fixtures/bus-v1.json` at `root`, with its modes.
fn lay_out(root: &Path) {
    let dump = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/bus-v1.json"),
    )
    .unwrap();
    let tree: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&dump).unwrap();
    std::fs::create_dir_all(root).unwrap();
    for (path, entry) in &tree {
        let mode = u32::from_str_radix(entry["mode"].as_str().unwrap().trim_start_matches("0o"), 8)
            .unwrap();
        let target = root.join(path.trim_end_matches('/'));
        match entry.get("text") {
            None => std::fs::create_dir_all(&target).unwrap(),
            Some(text) => std::fs::write(&target, text.as_str().unwrap()).unwrap(),
        }
        std::fs::set_permissions(&target, std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

#[test]
fn a_bus_written_by_the_previous_build_opens_reads_and_drains() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bus");
    lay_out(&root);
    let bus = Bus::builder().agent("new-build").open(&root).unwrap();

    // Every record verifies.
    let report = bus.doctor(false).unwrap();
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!((report.mailboxes, report.records), (5, 8));
    assert_eq!(
        bus.mailboxes().unwrap(),
        ["main", "main.dlq", "tasks", "tasks.dlq", "writer"]
    );

    // Messages read back with every field.
    let tasks = bus.mailbox("tasks").unwrap();
    let all: Vec<_> = tasks.messages().map(Result::unwrap).collect();
    assert_eq!(all.len(), 6);
    for (i, m) in all.iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(m.seq, n);
        assert_eq!(m.body.as_deref(), Some(format!("task {n}").as_str()));
        assert_eq!(m.payload, Some(serde_json::json!({ "n": n })));
        assert_eq!(m.headers["n"], n.to_string());
        assert_eq!(m.correlation_id.as_deref(), Some("book-1"));
        assert_eq!(
            m.idempotency_key.as_deref(),
            Some(format!("task-{n}").as_str())
        );
    }

    // The old key index still answers; a new send continues the sequence.
    let again = tasks
        .send(NewMessage::new("task").idempotency_key("task-3"))
        .unwrap();
    assert!(again.duplicate);
    assert_eq!((again.seq, again.id), (3, all[2].id));
    assert_eq!(tasks.send(NewMessage::new("task")).unwrap().seq, 7);

    // The group's state: 1 acked, 2 dead after two nacks, 3's claim ran out.
    let workers = tasks.group("workers").unwrap();
    assert_eq!(
        (workers.max_deliveries(), workers.visibility()),
        (2, Duration::from_secs(1))
    );
    // A group.json from before retry policies: a group without one.
    assert!(workers.retry_policy().is_none());
    let st = workers.stats().unwrap();
    assert_eq!(
        (
            st.delivered,
            st.acked,
            st.dead,
            st.redelivered,
            st.in_flight
        ),
        (3, 1, 1, 1, 0)
    );
    assert_eq!(
        st.pending, 5,
        "3 waiting for redelivery, 4 to 7 never delivered"
    );
    let claimed = workers.claim("w3", 10).unwrap();
    let got: Vec<(u64, u32)> = claimed.iter().map(|d| (d.seq(), d.attempt)).collect();
    assert_eq!(got, [(3, 2), (4, 1), (5, 1), (6, 1), (7, 1)]);
    for d in &claimed {
        d.ack().unwrap();
    }
    let st = workers.stats().unwrap();
    assert_eq!((st.acked, st.pending, st.in_flight), (6, 0, 0));

    // The dead letter, with its history.
    let dlq: Vec<_> = bus
        .mailbox("tasks.dlq")
        .unwrap()
        .messages()
        .map(Result::unwrap)
        .collect();
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].body.as_deref(), Some("task 2"));
    let info: serde_json::Value =
        serde_json::from_str(&dlq[0].headers[DEAD_LETTER_HEADER]).unwrap();
    assert_eq!(info["seq"], 2);
    assert!(info["reason"]
        .as_str()
        .unwrap()
        .contains("second try failed"));

    // Leases: the expired grant keeps its token, the next one is higher.
    let lease = bus.lease_info("chapter-1").unwrap().unwrap();
    assert_eq!((lease.token, lease.holder), (2, None));
    let next = bus
        .lease("chapter-1")
        .holder("editor")
        .try_acquire()
        .unwrap();
    assert_eq!(next.token(), 3);
    next.release().unwrap();

    // The handoff waits; its artifact (removed since) is reported missing.
    let main = bus.mailbox("main").unwrap();
    assert_eq!(
        main.group(HANDOFF_GROUP).unwrap().stats().unwrap().pending,
        1
    );
    let mut inbox = bus.handoff_inbox("main").unwrap();
    let handoff = inbox.try_recv().unwrap().expect("the old handoff");
    assert_eq!(handoff.handoff.summary, "chapter 1 drafted");
    assert!(matches!(
        handoff.verify(),
        Err(Error::ArtifactMissing { .. })
    ));

    // Compaction and the doctor are happy with the drained bus.
    bus.compact(None).unwrap();
    assert!(bus.doctor(false).unwrap().is_clean());
}
