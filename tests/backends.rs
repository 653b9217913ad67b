//! One behaviour suite, run on both backends: every test below runs once on a bus
//! directory (`dir::*`) and once on NATS JetStream (`nats::*`). The JetStream half
//! needs a server with JetStream enabled, named by `AGENTBUS_NATS_URL` (for example
//! `nats://127.0.0.1:4222`); `.ci/run` starts one. Where the variable is unset, the
//! JetStream tests print why and pass without running.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use agentbus::{
    Answer, Bus, Durability, Error, Filter, GroupOptions, NewMessage, StartAt, WatchMode,
    DEAD_LETTER_HEADER,
};

/// Where a test's bus lives, plus a scratch directory for its files.
struct Env {
    location: String,
    scratch: tempfile::TempDir,
}

impl Env {
    fn dir() -> Env {
        let scratch = tempfile::tempdir().unwrap();
        let location = scratch.path().join("bus").to_str().unwrap().to_owned();
        Env { location, scratch }
    }

    /// A fresh namespace on the server, so tests never see each other's state.
    fn nats() -> Option<Env> {
        let Ok(url) = std::env::var("AGENTBUS_NATS_URL") else {
            eprintln!(
                "skipped: AGENTBUS_NATS_URL is not set (run `nats-server -js` and set it \
                 to nats://127.0.0.1:4222 to test the JetStream backend)"
            );
            return None;
        };
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let ns = format!(
            "t{}-{}-{}",
            std::process::id(),
            nanos % 1_000_000_000_000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        Some(Env {
            location: format!("{}/{ns}", url.trim_end_matches('/')),
            scratch: tempfile::tempdir().unwrap(),
        })
    }

    fn bus(&self, agent: &str) -> Bus {
        self.builder(agent).init(&self.location).unwrap()
    }

    fn builder(&self, agent: &str) -> agentbus::BusBuilder {
        Bus::builder()
            .agent(agent)
            .durability(Durability::Flush)
            .poll_interval(Duration::from_millis(50))
    }
}

/// Defines each behaviour once and a `#[test]` for it per backend.
macro_rules! behaviours {
    ($($(#[doc = $doc:literal])* fn $name:ident($env:ident: &Env) $body:block)*) => {
        $( $(#[doc = $doc])* fn $name($env: &Env) $body )*

        mod dir {
            $( #[test] fn $name() { super::$name(&super::Env::dir()) } )*
        }

        mod nats {
            $( #[test] fn $name() {
                if let Some(env) = super::Env::nats() {
                    super::$name(&env)
                }
            } )*
        }
    };
}

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

    /// Every group sees every message; consumers within a group compete.
    fn groups_each_get_every_message_once(env: &Env) {
        let bus = env.bus("writer");
        let mb = bus.create_mailbox("jobs").unwrap();
        let workers = mb.create_group("workers").unwrap();
        let audit = mb.create_group("audit").unwrap();
        assert!(matches!(mb.create_group("workers"), Err(Error::GroupExists { .. })));
        assert_eq!(mb.groups().unwrap(), ["audit", "workers"]);
        mb.send_batch((1..=6).map(|i| NewMessage::new("job").body(i.to_string())))
            .unwrap();

        let a = workers.claim("w1", 4).unwrap();
        let b = workers.claim("w2", 4).unwrap();
        assert_eq!(a.len() + b.len(), 6);
        let mut seqs: Vec<u64> = a.iter().chain(&b).map(|d| d.seq()).collect();
        seqs.sort();
        assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
        assert!(a.iter().chain(&b).all(|d| d.attempt == 1));
        for d in a.iter().chain(&b) {
            d.ack().unwrap();
        }
        assert!(workers.claim("w1", 10).unwrap().is_empty());
        assert_eq!(workers.stats().unwrap().in_flight, 0);

        let audited = audit.claim("auditor", 10).unwrap();
        assert_eq!(audited.len(), 6);
        // The reopened group is the same durable group.
        let again = env.bus("other").mailbox("jobs").unwrap().group("workers").unwrap();
        assert_eq!(again.max_deliveries(), workers.max_deliveries());
        assert!(again.claim("w3", 10).unwrap().is_empty());
    }

    /// A nacked message comes back with the next attempt number; a termed one never.
    fn nack_redelivers_and_term_ends(env: &Env) {
        let bus = env.bus("writer");
        let mb = bus.create_mailbox("jobs").unwrap();
        let g = mb.create_group("workers").unwrap();
        mb.send(NewMessage::new("job").body("flaky")).unwrap();
        mb.send(NewMessage::new("job").body("hopeless")).unwrap();
        let first = g.claim("w1", 2).unwrap();
        assert_eq!(first.len(), 2);
        first[0].nack(Duration::ZERO, Some("try again")).unwrap();
        first[1].term(Some("cannot be done")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let again = loop {
            if let Some(d) = g.claim_one("w2").unwrap() {
                break d;
            }
            assert!(Instant::now() < deadline, "the nacked message never came back");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!((again.seq(), again.attempt), (1, 2));
        assert_eq!(again.message.body.as_deref(), Some("flaky"));
        again.ack().unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(g.claim("w1", 5).unwrap().is_empty(), "the termed message came back");
    }

    /// A claim that is neither acked nor extended runs out and is redelivered, not before.
    fn expired_claims_are_redelivered(env: &Env) {
        let bus = env.bus("writer");
        let mb = bus.create_mailbox("jobs").unwrap();
        let g = mb
            .create_group_with("workers", GroupOptions::new().visibility(Duration::from_millis(600)))
            .unwrap();
        mb.send(NewMessage::new("job")).unwrap();
        let claimed = g.claim_one("crashy").unwrap().unwrap();
        let claimed_at = Instant::now();
        assert!(g.claim_one("w2").unwrap().is_none(), "redelivered while claimed");
        let again = loop {
            if let Some(d) = g.claim_one("w2").unwrap() {
                break d;
            }
            assert!(claimed_at.elapsed() < Duration::from_secs(10), "never redelivered");
            std::thread::sleep(Duration::from_millis(25));
        };
        assert!(claimed_at.elapsed() >= Duration::from_millis(550), "redelivered too early");
        assert_eq!((again.seq(), again.attempt), (claimed.seq(), 2));
        again.ack().unwrap();
    }

    /// After max_deliveries the message moves to the dead-letter mailbox, with its reason.
    fn poison_messages_are_dead_lettered(env: &Env) {
        let bus = env.bus("writer");
        let mb = bus.create_mailbox("jobs").unwrap();
        let g = mb
            .create_group_with("workers", GroupOptions::new().max_deliveries(2))
            .unwrap();
        let sent = mb.send(NewMessage::new("job").body("poison")).unwrap();
        mb.send(NewMessage::new("job").body("fine")).unwrap();
        let mut attempts = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut fine = None;
        while Instant::now() < deadline && (fine.is_none() || attempts.len() < 2) {
            for d in g.claim("w", 2).unwrap() {
                if d.message.body.as_deref() == Some("poison") {
                    attempts.push(d.attempt);
                    d.nack(Duration::ZERO, Some("boom")).unwrap();
                } else {
                    fine = Some(d.seq());
                    d.ack().unwrap();
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(attempts, [1, 2]);
        assert_eq!(fine, Some(2));
        // The next claim buries it instead of delivering a third attempt.
        let dlq = bus.mailbox("jobs.dlq").unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let dead = loop {
            assert!(g.claim("w", 5).unwrap().is_empty(), "delivered past max_deliveries");
            if let Some(m) = dlq.messages().next() {
                break m.unwrap();
            }
            assert!(Instant::now() < deadline, "never dead-lettered");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert_eq!(dead.body.as_deref(), Some("poison"));
        let info: serde_json::Value =
            serde_json::from_str(&dead.headers[DEAD_LETTER_HEADER]).unwrap();
        assert_eq!(info["seq"], sent.seq);
        assert_eq!(info["group"], "workers");
        assert!(info["reason"].as_str().unwrap().contains("max deliveries (2)"), "{info}");
        std::thread::sleep(Duration::from_millis(100));
        assert!(g.claim("w", 5).unwrap().is_empty());
        assert_eq!(dlq.messages().count(), 1, "dead-lettered twice");
    }

    /// A group's filter passes over other messages; StartAt::End skips history.
    fn group_filters_and_start_positions(env: &Env) {
        let bus = env.bus("writer");
        let mb = bus.create_mailbox("events").unwrap();
        mb.send(NewMessage::new("old")).unwrap();
        let drafts = mb
            .create_group_with("drafts", GroupOptions::new().filter(Filter::new().of_type("draft")))
            .unwrap();
        let fresh = mb
            .create_group_with("fresh", GroupOptions::new().start(StartAt::End))
            .unwrap();
        mb.send(NewMessage::new("note")).unwrap();
        mb.send(NewMessage::new("draft").body("d1")).unwrap();
        let got: Vec<_> = drafts.claim("r", 10).unwrap();
        assert_eq!(got.iter().map(|d| d.seq()).collect::<Vec<_>>(), [3]);
        let got: Vec<_> = fresh.claim("r", 10).unwrap();
        assert_eq!(got.iter().map(|d| d.seq()).collect::<Vec<_>>(), [2, 3]);
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

    /// A consumer receiver claims as messages arrive; manual mode looks only when woken.
    fn consumers_claim_as_messages_arrive(env: &Env) {
        // With a 60 s poll, only an event (inotify, or the subscription) wakes in time.
        let bus = env.builder("worker").poll_interval(Duration::from_secs(60)).init(&env.location).unwrap();
        let mb = bus.create_mailbox("jobs").unwrap();
        let g = mb.create_group("workers").unwrap();
        let mut worker = g.consumer("w1").unwrap();
        assert!(worker.try_recv().unwrap_err().is_empty());
        let sender = mb.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            sender.send(NewMessage::new("job").body("resize")).unwrap();
        });
        let job = worker.recv_timeout(Duration::from_secs(10)).expect("a job");
        assert_eq!(job.message.body.as_deref(), Some("resize"));
        job.ack().unwrap();
        t.join().unwrap();
        let err = worker.recv_timeout(Duration::from_millis(200)).unwrap_err();
        assert!(err.is_timeout());

        // Manual mode: a send does not wake the receiver, the waker does.
        let mut manual = g.consumer_with("w2", WatchMode::Manual).unwrap();
        let (waker, sender) = (manual.waker(), mb.clone());
        let woken = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            sender.send(NewMessage::new("job").body("crop")).unwrap();
            std::thread::sleep(Duration::from_millis(400));
            let at = Instant::now();
            waker.wake();
            at
        });
        let job = manual.recv_timeout(Duration::from_secs(10)).expect("woken by hand");
        let got_at = Instant::now();
        assert!(got_at >= woken.join().unwrap(), "received before the wake");
        assert_eq!(job.message.body.as_deref(), Some("crop"));
        job.ack().unwrap();
    }

    /// One holder at a time; tokens strictly increase; stale tokens are refused.
    fn leases_are_exclusive_and_fenced(env: &Env) {
        let a = env.bus("agent-a");
        let b = env.bus("agent-b");
        let mut lease = a.lease("chapter-1").ttl(Duration::from_secs(30)).try_acquire().unwrap();
        let t1 = lease.token();
        assert!(t1 > 0);
        match b.lease("chapter-1").try_acquire() {
            Err(Error::LeaseHeld { holder, token, .. }) => assert_eq!((holder.as_str(), token), ("agent-a", t1)),
            other => panic!("{other:?}"),
        }
        lease.renew(Duration::from_secs(30)).unwrap();
        assert_eq!(lease.token(), t1, "renewing keeps the token");
        let info = b.lease_info("chapter-1").unwrap().unwrap();
        assert_eq!((info.holder.as_deref(), info.token, info.renewals), (Some("agent-a"), t1, 1));
        lease.release().unwrap();

        let lease2 = b.lease("chapter-1").try_acquire().unwrap();
        assert!(lease2.token() > t1);
        for stale in [
            a.renew_lease("chapter-1", "agent-a", t1, Duration::from_secs(5)).map(drop),
            a.release_lease("chapter-1", "agent-a", t1),
            a.transfer_lease("chapter-1", "agent-a", t1, "agent-c", Duration::from_secs(5)).map(drop),
        ] {
            match stale {
                Err(Error::StaleLease { holder, token, .. }) => {
                    assert_eq!((holder.as_deref(), token), (Some("agent-b"), lease2.token()))
                }
                other => panic!("a stale token was accepted: {other:?}"),
            }
        }
        let moved = lease2.transfer("agent-c", Duration::from_secs(5)).unwrap();
        assert_eq!(moved.holder.as_deref(), Some("agent-c"));
        let names: Vec<_> = a.leases().unwrap().into_iter().map(|l| (l.name, l.holder)).collect();
        assert_eq!(names, [("chapter-1".to_owned(), Some("agent-c".to_owned()))]);
        assert!(moved.token > t1);
    }

    /// A lease nobody renews can be taken after its TTL, and acquire waits for it.
    fn leases_expire_and_waiters_get_them(env: &Env) {
        let a = env.bus("agent-a");
        let b = env.bus("agent-b");
        let held = a.lease("db").ttl(Duration::from_millis(400)).try_acquire().unwrap();
        let t1 = held.token();
        held.keep();
        let started = Instant::now();
        let taken = b.lease("db").acquire(Duration::from_secs(10)).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(250), "taken before its TTL");
        assert!(taken.token() > t1);
        // A release wakes a waiter.
        // With a 60 s poll, only the release's event wakes the waiter in time.
        let c = env.builder("agent-c").poll_interval(Duration::from_secs(60)).init(&env.location).unwrap();
        let t = std::thread::spawn(move || {
            c.lease("db").acquire(Duration::from_secs(10)).map(|l| l.token())
        });
        std::thread::sleep(Duration::from_millis(200));
        let t2 = taken.token();
        taken.release().unwrap();
        assert!(t.join().unwrap().unwrap() > t2);
    }

    /// Contenders racing for a free lease: exactly one wins each round, and every
    /// grant's token is higher than the last.
    fn racing_contenders_get_one_grant_each(env: &Env) {
        let mut last = 0;
        for round in 0..5 {
            let winners: Vec<(String, u64)> = std::thread::scope(|s| {
                let tries: Vec<_> = (0..6)
                    .map(|i| {
                        let bus = env.bus(&format!("agent-{i}"));
                        s.spawn(move || {
                            bus.lease("slot").ttl(Duration::from_secs(30)).try_acquire()
                                .map(|l| (l.holder().to_owned(), l.keep().token))
                        })
                    })
                    .collect();
                tries
                    .into_iter()
                    .filter_map(|t| match t.join().unwrap() {
                        Ok(won) => Some(won),
                        Err(Error::LeaseHeld { .. }) => None,
                        Err(e) => panic!("{e}"),
                    })
                    .collect()
            });
            assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
            let (holder, token) = &winners[0];
            assert!(*token > last, "token {token} after {last}");
            last = *token;
            env.bus("referee").release_lease("slot", holder, *token).unwrap();
        }
    }

    /// A handoff's artifact is verified, the lease moves to the receiver, the sender
    /// sees the answer; a changed artifact is rejected with a reason the sender sees.
    fn handoffs_are_verified_and_answered(env: &Env) {
        let writer = env.bus("writer");
        let watcher = env.bus("watcher");
        writer.create_mailbox("main").unwrap();
        let draft = env.scratch.path().join("draft.md");
        std::fs::write(&draft, "# Chapter 1\n").unwrap();
        let lease = writer.lease("chapter-1").ttl(Duration::from_secs(60)).try_acquire().unwrap();
        let t1 = lease.token();
        let sent = writer
            .handoff("main")
            .summary("chapter 1 drafted")
            .next_step("review")
            .artifact(&draft)
            .with_lease(lease)
            .send()
            .unwrap();
        let mut inbox = watcher.handoff_inbox("main").unwrap();
        let got = inbox.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(got.handoff.summary, "chapter 1 drafted");
        got.verify().unwrap();
        let moved = got.accept("watcher").unwrap().expect("the lease moved");
        assert_eq!(moved.holder.as_deref(), Some("watcher"));
        assert!(moved.token > t1);
        match sent.wait_answer(Duration::from_secs(10)).unwrap() {
            Some(Answer::Accepted { lease: Some(l), .. }) => assert_eq!(l.token, moved.token),
            other => panic!("{other:?}"),
        }

        // Same size, different bytes: rejected, and the sender learns why.
        let sent = writer.handoff("main").summary("chapter 2").artifact(&draft).send().unwrap();
        std::fs::write(&draft, "# Chapter X\n").unwrap();
        let got = inbox.recv_timeout(Duration::from_secs(10)).unwrap();
        let err = got.verify().unwrap_err();
        assert!(matches!(err, Error::ArtifactDigestMismatch { .. }), "{err}");
        got.reject("watcher", &err.to_string()).unwrap();
        match sent.wait_answer(Duration::from_secs(10)).unwrap() {
            Some(Answer::Rejected { reason, .. }) => assert!(reason.contains("draft.md"), "{reason}"),
            other => panic!("{other:?}"),
        }
        assert!(inbox.try_recv().unwrap().is_none());
    }

    /// Four processes send at once: seqs stay contiguous and every message is stored once.
    fn concurrent_processes_never_lose_or_reorder(env: &Env) {
        env.bus("parent").create_mailbox("main").unwrap();
        let children: Vec<_> = (0..4)
            .map(|i| {
                common::child("child_sender")
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

/// What only the JetStream backend refuses, refused with a typed error.
#[test]
fn nats_refuses_what_it_cannot_do() {
    let Some(env) = Env::nats() else { return };
    let bus = env.bus("agent");
    let mb = bus.create_mailbox("main").unwrap();
    let g = mb.create_group("g").unwrap();
    mb.send(NewMessage::new("job")).unwrap();
    let claimed = g.claim_one("w").unwrap().unwrap();
    for err in [
        bus.doctor(false).map(drop).unwrap_err(),
        mb.compact(None).map(drop).unwrap_err(),
        g.ack_upto(5).map(drop).unwrap_err(),
        g.delivery(1, 1).map(drop).unwrap_err(),
        // Settling by seq needs the handle that claimed it.
        mb.group("g").unwrap().ack(1).map(drop).unwrap_err(),
        bus.lease("x")
            .process_bound(true)
            .try_acquire()
            .map(drop)
            .unwrap_err(),
    ] {
        assert!(
            matches!(
                err,
                Error::Unsupported {
                    backend: "nats",
                    ..
                }
            ),
            "{err}"
        );
    }
    // The claiming handle reports its live delivery, and can settle it by seq; acking
    // twice is fine.
    let live = g
        .in_flight(claimed.seq())
        .unwrap()
        .expect("held by this handle");
    assert_eq!((live.consumer.as_str(), live.attempt), ("w", 1));
    assert_eq!(live.deadline, claimed.deadline);
    assert!(mb
        .group("g")
        .unwrap()
        .in_flight(claimed.seq())
        .unwrap()
        .is_none());
    assert!(g.ack(claimed.seq()).unwrap());
    claimed.ack().unwrap();
    let err = Bus::open("nats://127.0.0.1:1").unwrap_err();
    assert!(matches!(err, Error::Nats { .. }), "{err}");
    let err = Bus::open("nats://127.0.0.1:4222/bad/ns").unwrap_err();
    assert!(matches!(err, Error::InvalidName { .. }), "{err}");
}

/// The CLI reaches the same JetStream bus with `--bus <url>`: what it sends, the
/// library reads, and the reverse.
#[test]
fn cli_uses_a_nats_bus_with_the_bus_option() {
    let Some(env) = Env::nats() else { return };
    let cli = || {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_agentbus"));
        cmd.arg("--bus").arg(&env.location);
        cmd.env_remove("AGENTBUS_DIR").env_remove("AGENTBUS_AGENT");
        cmd
    };
    common::ok(cli().arg("init").output().unwrap());
    common::ok(cli().args(["mailbox", "create", "main"]).output().unwrap());
    let receipt = common::ok(
        cli()
            .args(["send", "main", "--type", "draft.ready", "--from", "shell"])
            .args(["--body", "from the shell", "--idempotency-key", "k1"])
            .output()
            .unwrap(),
    );
    assert_eq!(receipt[0]["seq"], 1);
    let bus = env.bus("rust");
    let mb = bus.mailbox("main").unwrap();
    let m = mb.messages().next().unwrap().unwrap();
    assert_eq!(
        (m.from.as_str(), m.body.as_deref()),
        ("shell", Some("from the shell"))
    );
    mb.send(NewMessage::new("reply").body("from rust")).unwrap();
    let read = common::ok(cli().args(["recv", "main"]).output().unwrap());
    assert_eq!(read.len(), 2);
    assert_eq!(read[1]["body"], "from rust");
    let listed = common::ok(cli().args(["mailbox", "list"]).output().unwrap());
    assert!(
        listed.iter().any(|l| l.to_string().contains("main")),
        "{listed:?}"
    );
}

/// Opening a JetStream bus inside an async runtime, even one that fails to connect,
/// neither blocks the runtime nor panics.
#[test]
fn nats_bus_opens_and_fails_inside_an_async_runtime() {
    let Some(env) = Env::nats() else { return };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        assert!(matches!(
            Bus::open("nats://127.0.0.1:1"),
            Err(Error::Nats { .. })
        ));
        let bus = env.bus("async");
        bus.create_mailbox("main")
            .unwrap()
            .send(NewMessage::new("x"))
            .unwrap();
        drop(bus);
    });
}
