//! Consumer groups on both backends: competing consumers (threads and real
//! processes), every group seeing every message, filters and start positions,
//! claim/ack/nack/extend/term, visibility timeouts and redelivery after a crash, dead
//! letters, and the stats counters.

use std::time::{Duration, Instant};

use agentbus::{Error, Filter, GroupOptions, NewMessage, StartAt, WatchMode, DEAD_LETTER_HEADER};

use crate::Env;

behaviours! {
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
}
