//! Receivers: blocked `recv` woken across processes through notify, the same in
//! poll-only mode, delivery without any event within the poll interval, manual wake-ups,
//! several mailboxes, filters, group consumers, and `agentbus watch`.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use agentbus::{Bus, Filter, GroupOptions, NewMessage, WatchMode};

/// A new bus in a temporary directory that watches with `mode` and polls every `poll`.
fn bus_with(mode: WatchMode, poll: Duration) -> (tempfile::TempDir, Bus) {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_builder()
        .watch_mode(mode)
        .poll_interval(poll)
        .init(dir.path())
        .unwrap();
    (dir, bus)
}

/// Starts a child that blocks in `recv`, then sends one message from this process and
/// returns what the child printed.
fn cross_process_recv(mode: &str, poll_ms: u64) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::init(dir.path()).unwrap();
    let main = bus.create_mailbox("main").unwrap();
    let (mut child, mut lines) = common::spawn_lines(
        common::child("blocked_receiver")
            .env("BUS", dir.path())
            .env("MODE", mode)
            .env("POLL_MS", poll_ms.to_string()),
    );
    let ready = lines
        .find(|l| l.starts_with("READY"))
        .expect("receiver never got ready");
    std::thread::sleep(Duration::from_millis(100)); // let it block in recv
    main.send(NewMessage::new("ping").body("hello")).unwrap();
    let mut out = vec![ready];
    out.extend(lines.filter(|l| l.starts_with("RECEIVED") || l.starts_with("TIMEOUT")));
    assert!(child.wait().unwrap().success());
    out
}

#[test]
fn a_blocked_recv_in_another_process_is_woken_through_notify() {
    // A one-minute poll interval: only a notify event can wake it within the timeout.
    let out = cross_process_recv("auto", 60_000);
    assert_eq!(out[0], "READY events=true");
    assert_eq!(out[1], "RECEIVED 1 hello");
}

#[test]
fn a_blocked_recv_in_another_process_is_woken_by_polling_alone() {
    let out = cross_process_recv("poll", 50);
    assert_eq!(out[0], "READY events=false");
    assert_eq!(out[1], "RECEIVED 1 hello");
}

#[test]
#[ignore = "runs only as a child process of another test"]
fn blocked_receiver() {
    let Some(mode) = common::child_env("MODE") else {
        return;
    };
    let mode = match mode.as_str() {
        "poll" => WatchMode::PollOnly,
        _ => WatchMode::Auto,
    };
    let poll = Duration::from_millis(common::env("POLL_MS").parse().unwrap());
    let bus = Bus::builder()
        .watch_mode(mode)
        .poll_interval(poll)
        .open(common::env("BUS"))
        .unwrap();
    let mut rx = bus.follow(&["main"]).unwrap();
    println!("READY events={}", rx.has_events());
    std::io::stdout().flush().unwrap();
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(env) => println!("RECEIVED {} {}", env.message.seq, env.message.body.unwrap()),
        Err(e) => println!("TIMEOUT {e}"),
    }
}

#[test]
fn without_any_event_every_message_arrives_within_the_poll_interval() {
    // Poll-only: the watcher's events are never seen; only the timer wakes the receiver.
    let poll = Duration::from_millis(50);
    let (_dir, bus) = bus_with(WatchMode::PollOnly, poll);
    let main = bus.create_mailbox("main").unwrap();
    let mut rx = bus.follow(&["main"]).unwrap();
    assert!(!rx.has_events());
    let sender = std::thread::spawn(move || {
        let mut sent = Vec::new();
        for i in 0..20u64 {
            std::thread::sleep(Duration::from_millis(7 * (i % 5)));
            sent.push((main.send(NewMessage::new("t")).unwrap().seq, Instant::now()));
        }
        sent
    });
    let mut got = Vec::new();
    while got.len() < 20 {
        let env = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("message lost");
        got.push((env.message.seq, Instant::now()));
    }
    let sent = sender.join().unwrap();
    assert_eq!(
        got.iter().map(|g| g.0).collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>()
    );
    let worst = got.iter().zip(&sent).map(|(g, s)| g.1 - s.1).max().unwrap();
    // The bound is the poll interval plus scheduling noise on a shared machine.
    assert!(
        worst < poll + Duration::from_millis(500),
        "worst delay {worst:?}"
    );
}

#[test]
fn a_manual_receiver_looks_only_when_woken() {
    let (_dir, bus) = bus_with(WatchMode::Manual, Duration::from_millis(10));
    let main = bus.create_mailbox("main").unwrap();
    let mut rx = bus.follow(&["main"]).unwrap();
    let waker = rx.waker();
    let (tx, done) = std::sync::mpsc::channel();
    let (started_tx, started) = std::sync::mpsc::channel();
    let receiver = std::thread::spawn(move || {
        started_tx.send(()).unwrap();
        let got = rx.recv_timeout(Duration::from_secs(60));
        tx.send(()).unwrap();
        got.map(|e| e.message.seq)
    });
    // Send only once the receiver has had time to look and go to sleep.
    started.recv().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    main.send(NewMessage::new("t")).unwrap();
    // No event and no timer: it cannot have looked yet.
    assert!(done.recv_timeout(Duration::from_millis(300)).is_err());
    waker.wake();
    done.recv_timeout(Duration::from_secs(10))
        .expect("woken by hand");
    assert_eq!(receiver.join().unwrap().unwrap(), 1);
}

#[test]
fn a_supervisor_follows_several_mailboxes_in_seq_order_each() {
    let (_dir, bus) = bus_with(WatchMode::Auto, Duration::from_millis(100));
    let a = bus.create_mailbox("a").unwrap();
    let b = bus.create_mailbox("b").unwrap();
    a.send(NewMessage::new("old")).unwrap();
    let mut rx = bus.follow(&["a", "b"]).unwrap();
    for i in 0..10 {
        a.send(NewMessage::new("t").body(format!("a{i}"))).unwrap();
        b.send(NewMessage::new("t").body(format!("b{i}"))).unwrap();
    }
    let mut seen: std::collections::HashMap<String, Vec<u64>> = Default::default();
    for _ in 0..20 {
        let env = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        seen.entry(env.mailbox).or_default().push(env.message.seq);
    }
    assert_eq!(
        seen["a"],
        (2..=11).collect::<Vec<_>>(),
        "from the end: the old message is not replayed"
    );
    assert_eq!(seen["b"], (1..=10).collect::<Vec<_>>());
    assert!(rx.try_recv().unwrap_err().is_empty());
    // From the start, with a filter on priority and a header.
    a.send(NewMessage::new("t").priority(5).header("team", "docs"))
        .unwrap();
    a.send(NewMessage::new("t").priority(5).header("team", "ops"))
        .unwrap();
    a.send(NewMessage::new("t").priority(1).header("team", "docs"))
        .unwrap();
    let mut urgent_docs = bus
        .follow(&["a"])
        .unwrap()
        .from_seq(1)
        .filter(Filter::new().min_priority(3).header("team", "docs"));
    let got: Vec<u64> = urgent_docs
        .try_iter()
        .map(|e| e.unwrap().message.seq)
        .collect();
    assert_eq!(got, [12]);
}

#[test]
fn a_group_consumer_wakes_for_new_messages_and_for_due_redeliveries() {
    // Manual mode: no events, no timer; a nack's delay ending wakes the consumer by
    // itself.
    let (_dir, bus) = bus_with(WatchMode::Manual, Duration::from_millis(10));
    let jobs = bus.create_mailbox("jobs").unwrap();
    let group = jobs.create_group("g").unwrap();
    let mut rx = group.consumer("w").unwrap();
    assert!(rx.try_recv().unwrap_err().is_empty());
    jobs.send(NewMessage::new("job")).unwrap();
    let d = rx.recv_timeout(Duration::from_secs(5)).unwrap();
    d.nack(Duration::from_millis(300), Some("later")).unwrap();
    let started = Instant::now();
    let again = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!((again.seq(), again.attempt), (1, 2));
    again.ack().unwrap();
}

#[test]
fn a_group_filter_skips_other_types_for_every_consumer() {
    let (dir, bus) = bus_with(WatchMode::Auto, Duration::from_millis(100));
    let jobs = bus.create_mailbox("jobs").unwrap();
    let only_reviews = GroupOptions::new().filter(Filter::new().of_type("review"));
    let reviews = jobs.create_group_with("reviews", only_reviews).unwrap();
    common::send_kinds(&jobs, &["review", "build", "review", "deploy"]);
    assert_eq!(common::seqs(&reviews.claim("w", 10).unwrap()), [1, 3]);
    let stats = reviews.stats().unwrap();
    assert_eq!((stats.skipped, stats.lag), (2, 0));

    // Another consumer, receiving through its own handle, is filtered the same way.
    let mut other = Bus::open(dir.path())
        .unwrap()
        .mailbox("jobs")
        .unwrap()
        .group("reviews")
        .unwrap()
        .consumer("v")
        .unwrap();
    for kind in ["build", "review"] {
        jobs.send(NewMessage::new(kind)).unwrap();
    }
    let d = other.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!((d.seq(), d.message.kind.as_str()), (6, "review"));
    assert!(other.try_recv().unwrap_err().is_empty());
    assert_eq!(reviews.stats().unwrap().skipped, 3);
}

#[test]
fn watch_streams_messages_as_json_lines() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::init(dir.path()).unwrap();
    let main = bus.create_mailbox("main").unwrap();
    main.send(NewMessage::new("a").body("one")).unwrap();
    main.send(NewMessage::new("b").body("two")).unwrap();
    let out = common::cli(dir.path())
        .args([
            "watch",
            "main",
            "--from-seq",
            "1",
            "--type",
            "b",
            "--idle-timeout",
            "0.5",
        ])
        .output()
        .unwrap();
    let lines = common::ok(out);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["body"], "two");
}

#[test]
fn watch_exec_acks_on_success_and_redelivers_on_failure() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::init(dir.path()).unwrap();
    let jobs = bus.create_mailbox("jobs").unwrap();
    let group = jobs.create_group("workers").unwrap();
    jobs.send(NewMessage::new("job").body("fine")).unwrap();
    jobs.send(NewMessage::new("job").body("fails the first time"))
        .unwrap();
    let log = dir.path().join("handled.txt");
    // The handler reads the message JSON on stdin and the fields from the environment.
    let handler = format!(
        r#"body=$(cat); echo "$AGENTBUS_SEQ $AGENTBUS_ATTEMPT $AGENTBUS_TYPE" >> {log}
        case "$body" in *fails*) [ "$AGENTBUS_ATTEMPT" = 1 ] && exit 3;; esac; exit 0"#,
        log = log.display()
    );
    let out = common::cli(dir.path())
        .args([
            "watch",
            "jobs",
            "--group",
            "workers",
            "--consumer",
            "runner",
        ])
        .args([
            "--exec",
            handler.as_str(),
            "--max",
            "3",
            "--idle-timeout",
            "10",
        ])
        .output()
        .unwrap();
    let results = common::ok(out);
    let summary: Vec<_> = results
        .iter()
        .map(|r| {
            (
                r["seq"].as_u64().unwrap(),
                r["attempt"].as_u64().unwrap(),
                r["exit"].as_i64().unwrap(),
                r["acked"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [(1, 1, 0, true), (2, 1, 3, false), (2, 2, 0, true)]
    );
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "1 1 job\n2 1 job\n2 2 job\n"
    );
    let stats = group.stats().unwrap();
    assert_eq!(
        (
            stats.acked,
            stats.redelivered,
            stats.pending,
            stats.in_flight
        ),
        (2, 1, 0, 0)
    );
}
