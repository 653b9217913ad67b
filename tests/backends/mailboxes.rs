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

    /// A repeated idempotency key returns the original receipt and stores nothing.
    fn idempotent_send_returns_the_original_receipt(env: &Env) {
        let bus = env.bus("writer");
        let mb = bus.create_mailbox("main").unwrap();
        mb.send(NewMessage::new("other")).unwrap();
        let first = mb
            .send(NewMessage::new("task").idempotency_key("job-7"))
            .unwrap();
        let again = mb
            .send(NewMessage::new("task").idempotency_key("job-7"))
            .unwrap();
        assert!(!first.duplicate);
        assert!(again.duplicate);
        assert_eq!((again.seq, again.id), (first.seq, first.id));
        assert_eq!(mb.messages().count(), 2);
    }

    /// Mailboxes are created explicitly; a wrong name is an error naming those that exist.
    fn mailboxes_are_explicit(env: &Env) {
        let bus = env.bus("writer");
        bus.create_mailbox("main").unwrap();
        bus.create_mailbox("a.b_c").unwrap();
        assert!(matches!(bus.create_mailbox("main"), Err(Error::MailboxExists { .. })));
        match bus.mailbox("mian") {
            Err(Error::MailboxNotFound { existing, .. }) => assert_eq!(existing, ["a.b_c", "main"]),
            other => panic!("{other:?}"),
        }
        assert!(matches!(bus.mailbox("../x"), Err(Error::InvalidName { .. })));
        assert_eq!(bus.mailboxes().unwrap(), ["a.b_c", "main"]);
        // Another handle (another agent) sees the same mailboxes.
        assert_eq!(env.bus("reader").mailbox("a.b_c").unwrap().name(), "a.b_c");
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
    if !common::is_child() {
        return;
    }
    let bus = Bus::builder()
        .agent(common::env("AGENTBUS_TEST_AGENT"))
        .durability(Durability::Flush)
        .open(common::env("AGENTBUS_TEST_BUS"))
        .unwrap();
    let mb = bus.mailbox("main").unwrap();
    for i in 0..100 {
        mb.send(NewMessage::new("n").body(i.to_string())).unwrap();
    }
}
