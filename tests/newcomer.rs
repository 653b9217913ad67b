//! What a newcomer expects from the library: typed payloads, restart-friendly opening,
//! the CLI's environment, `?` on receiver errors, typed dead letters, exclude filters.

mod common;

use std::time::Duration;

use agentbus::serde_json::json;
use agentbus::{Bus, Error, Filter, GroupOptions, NewMessage};
use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Review {
    chapter: u32,
    notes: Vec<String>,
}

#[test]
fn payloads_are_typed_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let (_bus, mb) = common::flush_mailbox(dir.path(), "reviews");
    let review = Review {
        chapter: 3,
        notes: vec!["tone".into()],
    };
    mb.send(NewMessage::new("review").json(&review).unwrap())
        .unwrap();
    mb.send(NewMessage::new("note").payload(json!({"chapter": "three"})))
        .unwrap();
    mb.send(NewMessage::new("empty")).unwrap();

    let all: Vec<_> = mb.messages().map(Result::unwrap).collect();
    assert_eq!(all[0].payload_as::<Review>().unwrap(), review);
    match all[1].payload_as::<Review>() {
        Err(Error::InvalidMessage(why)) => assert!(why.contains("seq 2"), "{why}"),
        other => panic!("expected InvalidMessage, got {other:?}"),
    }
    assert!(matches!(
        all[2].payload_as::<Review>(),
        Err(Error::InvalidMessage(_))
    ));
    // A map with non-string keys is not JSON.
    let bad: std::collections::HashMap<(u8, u8), u8> = [((1, 2), 3)].into();
    assert!(matches!(
        NewMessage::new("x").json(&bad),
        Err(Error::InvalidMessage(_))
    ));
}

#[test]
fn a_restarting_consumer_creates_or_opens_its_group_and_is_told_of_other_settings() {
    let dir = tempfile::tempdir().unwrap();
    let (_bus, mb) = common::flush_mailbox(dir.path(), "jobs");
    mb.send(NewMessage::new("job")).unwrap();
    let opts = || {
        GroupOptions::new()
            .max_deliveries(3)
            .visibility(Duration::from_secs(7))
    };
    // Four "restarts" at once: all get the one group.
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let mb = mb.clone();
            std::thread::spawn(move || mb.create_or_open_group("workers", opts()).unwrap())
        })
        .collect();
    for h in handles {
        let g = h.join().unwrap();
        assert_eq!(
            (g.max_deliveries(), g.visibility()),
            (3, Duration::from_secs(7))
        );
    }
    assert_eq!(mb.groups().unwrap(), ["workers"]);
    let g = mb.create_or_open_group("workers", opts()).unwrap();
    assert_eq!(g.claim("w", 10).unwrap().len(), 1);

    match mb.create_or_open_group("workers", opts().max_deliveries(4).dead_letter("elsewhere")) {
        Err(Error::GroupSettingsDiffer { differences, .. }) => {
            assert!(
                differences.contains("max_deliveries: 3 (asked: 4)"),
                "{differences}"
            );
            assert!(differences.contains("dead_letter"), "{differences}");
            assert!(!differences.contains("visibility"), "{differences}");
        }
        other => panic!("expected GroupSettingsDiffer, got {other:?}"),
    }
}

/// Child: opens the bus from the environment and sends one message.
#[test]
#[ignore = "run by from_env_reads_what_the_cli_reads"]
fn child_from_env() {
    if !common::is_child() {
        return;
    }
    let bus = Bus::from_env().unwrap();
    bus.mailbox("main")
        .unwrap()
        .send(NewMessage::new("hello"))
        .unwrap();
}

#[test]
fn from_env_reads_what_the_cli_reads() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bus");
    common::flush_bus(&root).create_mailbox("main").unwrap();
    let status = common::child("child_from_env")
        .env("AGENTBUS_DIR", &root)
        .env("AGENTBUS_AGENT", "rust-agent")
        .env("AGENTBUS_DURABILITY", "flush")
        .status()
        .unwrap();
    assert!(status.success());
    // The CLI reads the same message, from the same agent.
    let read = common::run_ok(&root, ["recv", "main"]);
    assert_eq!(read[0]["from"], "rust-agent");

    let bad = common::child("child_from_env")
        .env("AGENTBUS_DIR", &root)
        .env("AGENTBUS_DURABILITY", "sometimes")
        .output()
        .unwrap();
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stdout) + String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("AGENTBUS_DURABILITY"), "{stderr}");
}

#[test]
fn receiver_errors_pass_on_with_the_question_mark() {
    let dir = tempfile::tempdir().unwrap();
    let (bus, mb) = common::flush_mailbox(dir.path(), "main");
    let mut rx = bus.follow(&["main"]).unwrap();
    let mut try_one = || -> agentbus::Result<u64> { Ok(rx.try_recv()?.message.seq) };
    assert!(matches!(try_one(), Err(Error::Empty)));
    mb.send(NewMessage::new("t")).unwrap();
    assert_eq!(try_one().unwrap(), 1);

    let mut consumer = mb.create_group("g").unwrap().consumer("c").unwrap();
    let mut wait =
        || -> agentbus::Result<u64> { Ok(consumer.recv_timeout(Duration::from_millis(20))?.seq()) };
    assert_eq!(wait().unwrap(), 1);
    let err = wait().unwrap_err();
    assert!(matches!(err, Error::Timeout));
    assert_eq!(err.code(), "timeout");
}

#[test]
fn dead_letters_and_damage_notices_read_back_typed() {
    let dir = tempfile::tempdir().unwrap();
    let (bus, mb) = common::flush_mailbox(dir.path(), "jobs");
    let g = mb
        .create_group_with("w", GroupOptions::new().max_deliveries(2))
        .unwrap();
    mb.send(NewMessage::new("job").body("one")).unwrap();
    for reason in ["first", "second"] {
        let d = g.claim_one("c").unwrap().unwrap();
        d.nack(Duration::ZERO, Some(reason)).unwrap();
    }
    let dead = common::first_message(&bus, "jobs.dlq");
    let info = dead.dead_letter().expect("a dead letter");
    assert_eq!((info.mailbox.as_str(), info.group.as_str()), ("jobs", "w"));
    assert_eq!(info.seq, Some(1));
    assert!(info.reason.contains("second"), "{}", info.reason);
    let outcomes: Vec<(u32, &str, Option<&str>)> = info
        .attempts
        .iter()
        .map(|a| (a.attempt, a.outcome.as_str(), a.reason.as_deref()))
        .collect();
    assert_eq!(
        outcomes,
        [(1, "nacked", Some("first")), (2, "nacked", Some("second"))]
    );
    assert!(info.damaged.is_none());
    assert!(NewMessage::replay_of(&dead).kind() == "job");
    assert!(mb
        .messages()
        .next()
        .unwrap()
        .unwrap()
        .dead_letter()
        .is_none());

    // A damage notice says where.
    mb.send(NewMessage::new("job").body("two")).unwrap();
    let seg = common::first_segment(dir.path(), "jobs");
    let text = std::fs::read_to_string(&seg).unwrap();
    std::fs::write(&seg, text.replacen("\"two\"", "\"tw0\"", 1)).unwrap();
    assert!(g.claim("c", 5).unwrap().is_empty());
    let notice = bus
        .mailbox("jobs.dlq")
        .unwrap()
        .messages()
        .map(Result::unwrap)
        .find(|m| m.kind == agentbus::DAMAGED_TYPE)
        .expect("a damage notice");
    let damaged = notice.dead_letter().unwrap().damaged.expect("where");
    assert_eq!((damaged.seqs, damaged.line), (Some((2, 2)), 2));
    assert_eq!(damaged.path, seg);
}

#[test]
fn exclude_filters_pass_every_other_type() {
    let dir = tempfile::tempdir().unwrap();
    let (_bus, mb) = common::flush_mailbox(dir.path(), "events");
    let no_alerts = GroupOptions::new().filter(Filter::new().not_type("alert"));
    let g = mb.create_group_with("quiet", no_alerts).unwrap();
    common::send_kinds(&mb, &["task", "alert", "added.later", "alert"]);
    let kinds =
        |ms: Vec<agentbus::Message>| -> Vec<String> { ms.into_iter().map(|m| m.kind).collect() };
    let read: Vec<_> = mb
        .messages()
        .not_type("alert")
        .map(Result::unwrap)
        .collect();
    assert_eq!(kinds(read), ["task", "added.later"]);
    let claimed: Vec<_> = g
        .claim("c", 10)
        .unwrap()
        .into_iter()
        .map(|d| d.message)
        .collect();
    assert_eq!(kinds(claimed), ["task", "added.later"]);
    assert_eq!(g.stats().unwrap().skipped, 2);
    // Reopened, the group keeps its exclusion.
    assert_eq!(
        mb.group("quiet").unwrap().filter(),
        &Filter::new().not_type("alert")
    );
}

#[test]
fn handoff_leases_come_back_as_renewable_handles() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_builder()
        .agent("writer")
        .init(dir.path().join("bus"))
        .unwrap();
    bus.create_mailbox("main").unwrap();
    let file = dir.path().join("draft.md");
    std::fs::write(&file, "# draft").unwrap();
    let send = |summary: &str| {
        let lease = bus.lease("chapter").try_acquire().unwrap();
        bus.handoff("main")
            .summary(summary)
            .artifact(&file)
            .with_lease(lease)
            .send()
            .unwrap()
    };

    // Rejected: the sender takes its lease back as a handle and renews it.
    let sent = send("first try");
    let mut inbox = bus.handoff_inbox("main").unwrap();
    inbox
        .recv_timeout(Duration::from_secs(10))
        .unwrap()
        .reject("writer", "not yet")
        .unwrap();
    assert!(!sent
        .wait_answer(Duration::from_secs(10))
        .unwrap()
        .unwrap()
        .is_accepted());
    let mut back = sent
        .lease_back(Duration::from_secs(60))
        .unwrap()
        .expect("a lease went along");
    assert!(back.is_valid());
    back.renew(Duration::from_secs(60)).unwrap();
    let token = back.token();
    back.release().unwrap();

    // Accepted: the receiver holds a renewable lease, for the TTL it chose.
    let sent = send("second try");
    let got = inbox.recv().unwrap();
    let mut lease = got
        .accept_lease("reviewer", Duration::from_secs(90))
        .unwrap()
        .expect("the lease");
    assert_eq!(lease.holder(), "reviewer");
    assert!(lease.token() > token);
    let left = lease.expires_at() - time::OffsetDateTime::now_utc();
    assert!(
        left > time::Duration::seconds(80) && left <= time::Duration::seconds(90),
        "{left}"
    );
    lease.renew(Duration::from_secs(30)).unwrap();
    assert!(matches!(
        sent.lease_back(Duration::from_secs(60)),
        Err(Error::StaleLease { .. })
    ));
    drop(lease); // released on drop
    assert_eq!(bus.lease_info("chapter").unwrap().unwrap().holder, None);
}
