//! Mailboxes on both backends: sending and reading back, idempotency keys, explicit
//! mailboxes, followers woken by a send, and concurrent sender processes.

use std::time::Duration;

use agentbus::{Bus, Durability, Error, NewMessage};

use crate::{common, Env};

behaviours! {
    /// Messages read back as sent, in seq order, with contiguous seqs.
    fn messages_read_back_as_sent(env: &Env) {
        let bus = env.bus("writer");
        let mb = bus.create_mailbox("project.tasks").unwrap();
        assert_eq!((mb.first_seq().unwrap(), mb.last_seq().unwrap()), (1, 0));
        let r1 = mb
            .send(
                NewMessage::new("task")
                    .subject("chapter 1")
                    .body("write it")
                    .payload(serde_json::json!({"words": 1200, "tags": ["a", null]}))
                    .correlation_id("book-1")
                    .priority(3)
                    .header("lang", "en"),
            )
            .unwrap();
        let batch = mb
            .send_batch((0..3).map(|i| NewMessage::new("note").body(i.to_string())))
            .unwrap();
        assert_eq!(r1.seq, 1);
        assert_eq!(batch.iter().map(|r| r.seq).collect::<Vec<_>>(), [2, 3, 4]);
        assert_eq!(mb.last_seq().unwrap(), 4);

        let all: Vec<_> = mb.messages().collect::<agentbus::Result<_>>().unwrap();
        assert_eq!(all.iter().map(|m| m.seq).collect::<Vec<_>>(), [1, 2, 3, 4]);
        let first = &all[0];
        assert_eq!(first.id, r1.id);
        assert_eq!(first.from, "writer");
        assert_eq!(first.kind, "task");
        assert_eq!(first.subject.as_deref(), Some("chapter 1"));
        assert_eq!(first.payload, Some(serde_json::json!({"words": 1200, "tags": ["a", null]})));
        assert_eq!(first.priority, 3);
        assert_eq!(first.headers.get("lang").map(String::as_str), Some("en"));
        let notes: Vec<_> = mb
            .messages()
            .of_type("note")
            .from_seq(3)
            .map(|m| m.unwrap().body.unwrap())
            .collect();
        assert_eq!(notes, ["1", "2"]);
    }

    /// Receipts carry contiguous seqs and UUIDv7 ids, which sort by time; the stored
    /// messages carry the same ids.
    fn receipts_carry_contiguous_seqs_and_v7_ids(env: &Env) {
        let mb = env.bus("writer").create_mailbox("main").unwrap();
        let a = mb.send(NewMessage::new("t")).unwrap();
        let b = mb.send(NewMessage::new("t")).unwrap();
        assert_eq!((a.seq, b.seq), (1, 2));
        assert_eq!((a.mailbox.as_str(), a.duplicate), ("main", false));
        assert_eq!(a.id.get_version_num(), 7);
        assert!(a.id < b.id, "UUIDv7 ids sort by time");
        let stored: Vec<_> = mb.messages().map(Result::unwrap).collect();
        assert_eq!(stored[0].id, a.id);
        assert_eq!(stored[1].id, b.id);
    }

    /// Every field of a message, artifacts included, reads back as sent.
    fn all_fields_round_trip(env: &Env) {
        let bus = env.bus("writer");
        let mb = bus.create_mailbox("main").unwrap();
        let file = env.scratch.path().join("draft.md");
        std::fs::write(&file, "draft").unwrap();
        let artifact = agentbus::Artifact::capture(&file).unwrap();
        mb.send(
            NewMessage::new("review.request")
                .subject("ch 1")
                .body("please review")
                .payload(serde_json::json!({"chapter": 1, "tags": ["a", "b"]}))
                .artifact(artifact.clone())
                .correlation_id("book-1")
                .causation_id("msg-0")
                .idempotency_key("k")
                .priority(5)
                .header("lang", "en"),
        )
        .unwrap();
        let m = mb.messages().next().unwrap().unwrap();
        assert_eq!(m.from, "writer");
        assert_eq!(m.kind, "review.request");
        assert_eq!(m.subject.as_deref(), Some("ch 1"));
        assert_eq!(m.body.as_deref(), Some("please review"));
        assert_eq!(m.payload.unwrap()["tags"][1], "b");
        assert_eq!(m.artifacts, [artifact]);
        assert_eq!(m.correlation_id.as_deref(), Some("book-1"));
        assert_eq!(m.causation_id.as_deref(), Some("msg-0"));
        assert_eq!(m.idempotency_key.as_deref(), Some("k"));
        assert_eq!(m.priority, 5);
        assert_eq!(m.headers["lang"], "en");
        assert!(m.ts <= time::OffsetDateTime::now_utc());
    }

    /// Payloads read back exactly, including null and extreme floats (both found by
    /// the property tests).
    fn payloads_read_back_exactly_including_null_and_extreme_floats(env: &Env) {
        let mb = env.bus("writer").create_mailbox("main").unwrap();
        let cases = [
            serde_json::Value::Null,
            serde_json::json!(1.3018768194955705e299),
            serde_json::json!({"x": [0.1, -2.5e-308, null]}),
        ];
        for p in &cases {
            mb.send(NewMessage::new("t").payload(p.clone())).unwrap();
        }
        mb.send(NewMessage::new("t")).unwrap();
        let got: Vec<_> = mb.messages().map(|m| m.unwrap().payload).collect();
        assert_eq!(got[..3], cases.iter().cloned().map(Some).collect::<Vec<_>>()[..]);
        assert_eq!(got[3], None);
    }

    /// Reading filters by type, sender and correlation id and starts at any seq, and
    /// reading twice gives the same answer (on the directory, across segments).
    fn reading_filters_and_starts_anywhere_without_changing_state(env: &Env) {
        let bus = env.builder("writer").segment_bytes(500).init(&env.location).unwrap();
        let mb = bus.create_mailbox("main").unwrap();
        for i in 1..=30u64 {
            let kind = if i % 3 == 0 { "task" } else { "note" };
            let from = if i % 2 == 0 { "alice" } else { "bob" };
            let mut m = NewMessage::new(kind).from(from).body(i.to_string());
            if i % 5 == 0 {
                m = m.correlation_id("c5");
            }
            mb.send(m).unwrap();
        }
        let seqs = |it: agentbus::Messages| -> Vec<u64> { it.map(|m| m.unwrap().seq).collect() };
        assert_eq!(seqs(mb.messages()), (1..=30).collect::<Vec<_>>());
        assert_eq!(seqs(mb.messages().from_seq(17)), (17..=30).collect::<Vec<_>>());
        assert_eq!(seqs(mb.messages().from_seq(31)), Vec::<u64>::new());
        assert_eq!(seqs(mb.messages().of_type("task")), [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]);
        assert_eq!(seqs(mb.messages().of_type("task").sender("alice")), [6, 12, 18, 24, 30]);
        assert_eq!(seqs(mb.messages().correlation_id("c5").from_seq(11)), [15, 20, 25, 30]);
        // The log spans several segments and reading twice gives the same answer.
        if env.dir_path().is_some() {
            assert!(std::fs::read_dir(mb.path().join("log")).unwrap().count() > 3);
        }
        assert_eq!(seqs(mb.messages()), (1..=30).collect::<Vec<_>>());
    }

    /// An iterator that ran dry yields the messages sent after, in order.
    fn an_iterator_picks_up_messages_sent_after_it_ran_dry(env: &Env) {
        let bus = env.builder("writer").segment_bytes(300).init(&env.location).unwrap();
        let mb = bus.create_mailbox("main").unwrap();
        let mut follower = mb.messages();
        assert!(follower.next().is_none());
        let mut seen = Vec::new();
        for round in 0..5 {
            for _ in 0..3 {
                mb.send(NewMessage::new("t").body("x".repeat(100))).unwrap();
            }
            seen.extend(follower.by_ref().map(|m| m.unwrap().seq));
            assert_eq!(seen.len(), (round + 1) * 3);
        }
        assert_eq!(seen, (1..=15).collect::<Vec<_>>());
    }

    /// A repeated idempotency key returns the original receipt and stores nothing, also
    /// through another handle and inside one batch; keys are per mailbox.
    fn a_repeated_idempotency_key_returns_the_original_receipt(env: &Env) {
        let bus = env.bus("writer");
        let mb = bus.create_mailbox("main").unwrap();
        mb.send(NewMessage::new("other")).unwrap();
        let first = mb.send(NewMessage::new("t").idempotency_key("job-7")).unwrap();
        mb.send(NewMessage::new("t").idempotency_key("job-8")).unwrap();
        let again = mb
            .send(NewMessage::new("t").body("retry").idempotency_key("job-7"))
            .unwrap();
        assert!(!first.duplicate);
        assert!(again.duplicate);
        assert_eq!((again.id, again.seq), (first.id, first.seq));
        assert_eq!(mb.messages().count(), 3);

        // Through another handle (another process), and inside one batch.
        let other = env.bus("other").mailbox("main").unwrap();
        assert!(other.send(NewMessage::new("t").idempotency_key("job-7")).unwrap().duplicate);
        let batch = other
            .send_batch([
                NewMessage::new("t").idempotency_key("job-9"),
                NewMessage::new("t").idempotency_key("job-9"),
                NewMessage::new("t").idempotency_key("job-8"),
            ])
            .unwrap();
        let got: Vec<_> = batch.iter().map(|r| (r.seq, r.duplicate)).collect();
        assert_eq!(got, [(4, false), (4, true), (3, true)]);
        assert_eq!(mb.messages().count(), 4);

        // The same key in another mailbox is independent.
        let other_mb = bus.create_mailbox("other").unwrap();
        assert!(!other_mb.send(NewMessage::new("t").idempotency_key("job-7")).unwrap().duplicate);
    }

    /// Mailboxes are created explicitly; a wrong name is an error naming those that exist.
    fn mailboxes_are_explicit(env: &Env) {
        let bus = env.bus("writer");
        bus.create_mailbox("main").unwrap();
        bus.create_mailbox("a.b_c").unwrap();
        assert!(matches!(bus.create_mailbox("main"), Err(Error::MailboxExists { .. })));
        match bus.mailbox("mian") {
            Err(Error::MailboxNotFound { name, existing }) => {
                assert_eq!(name, "mian");
                assert_eq!(existing, ["a.b_c", "main"]);
            }
            other => panic!("expected MailboxNotFound, got {other:?}"),
        }
        assert!(matches!(bus.mailbox("../x"), Err(Error::InvalidName { .. })));
        assert_eq!(bus.mailboxes().unwrap(), ["a.b_c", "main"]);
        if let Some(root) = env.dir_path() {
            assert!(!root.join("mailboxes/mian").exists(), "a lookup creates nothing");
        }
        // Another handle (another agent) sees the same mailboxes.
        assert_eq!(env.bus("reader").mailbox("a.b_c").unwrap().name(), "a.b_c");
    }

    /// Eight threads create the same mailbox at once: exactly one succeeds.
    #[nats_bug = "create_mailbox on JetStream checks for the stream, then creates it: \
                  racing creators all succeed (creating an identical stream is a no-op)"]
    fn concurrent_creates_of_one_mailbox_yield_one_winner(env: &Env) {
        let bus = env.bus("writer");
        let wins: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| bus.create_mailbox("race").is_ok() as usize))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(wins, 1);
        assert_eq!(bus.mailboxes().unwrap(), ["race"]);
        if let Some(root) = env.dir_path() {
            let leftovers = std::fs::read_dir(root.join("mailboxes")).unwrap().count();
            assert_eq!(leftovers, 1, "temporary directories left behind");
        }
    }

    /// A follower wakes on a send from another handle, by event, not by the poll timer.
    fn followers_wake_on_send(env: &Env) {
        let bus = env.builder("reader").poll_interval(Duration::from_secs(60)).init(&env.location).unwrap();
        bus.create_mailbox("main").unwrap();
        bus.create_mailbox("side").unwrap();
        let mut rx = bus.follow(&["main", "side"]).unwrap();
        assert!(rx.try_recv().unwrap_err().is_empty());
        let location = env.location.clone();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let bus = Bus::builder().agent("writer").init(&location).unwrap();
            bus.mailbox("side").unwrap().send(NewMessage::new("ping").body("hi")).unwrap();
        });
        let got = rx.recv_timeout(Duration::from_secs(10)).expect("woken by the send");
        assert_eq!((got.mailbox.as_str(), got.message.body.as_deref()), ("side", Some("hi")));
        assert_eq!(got.message.from, "writer");
        writer.join().unwrap();
        assert!(rx.try_recv().unwrap_err().is_empty());
    }

    /// Four processes send at once: seqs stay contiguous and every message is stored once.
    fn concurrent_processes_never_lose_or_reorder(env: &Env) {
        env.bus("parent").create_mailbox("main").unwrap();
        let children: Vec<_> = (0..4)
            .map(|i| {
                common::child("mailboxes::child_sender")
                    .env("AGENTBUS_TEST_BUS", &env.location)
                    .env("AGENTBUS_TEST_AGENT", format!("sender-{i}"))
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut c in children {
            assert!(c.wait().unwrap().success());
        }
        let bus = env.bus("parent");
        let all: Vec<_> = bus.mailbox("main").unwrap().messages().map(|m| m.unwrap()).collect();
        assert_eq!(all.iter().map(|m| m.seq).collect::<Vec<_>>(), (1..=400).collect::<Vec<_>>());
        for i in 0..4 {
            let mine: Vec<u64> = all
                .iter()
                .filter(|m| m.from == format!("sender-{i}"))
                .map(|m| m.body.as_deref().unwrap().parse().unwrap())
                .collect();
            assert_eq!(mine, (0..100).collect::<Vec<_>>(), "sender-{i} out of order");
        }
    }
}

/// The body of one sender process of `concurrent_processes_never_lose_or_reorder`.
#[test]
#[ignore = "run as a child process"]
fn child_sender() {
    let Some(agent) = common::child_env("AGENTBUS_TEST_AGENT") else {
        return;
    };
    let bus = Bus::builder()
        .agent(agent)
        .durability(Durability::Flush)
        .open(common::env("AGENTBUS_TEST_BUS"))
        .unwrap();
    let mb = bus.mailbox("main").unwrap();
    for i in 0..100 {
        mb.send(NewMessage::new("n").body(i.to_string())).unwrap();
    }
}
