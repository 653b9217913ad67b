//! Handoffs between real processes: artifacts verified by size and SHA-256, changed,
//! truncated and missing artifacts rejected with the reason visible to the sender, and
//! an accepted handoff moving its lease to the receiver with a higher token.

mod common;

use std::time::Duration;

use agentbus::{Answer, Bus, Delivery, Error, Group, LeaseInfo, ReceivedHandoff, HANDOFF_GROUP};

/// Runs a receiver process that answers every handoff in `main` until `count` are
/// answered: accept if the artifacts verify, otherwise reject with the error.
fn spawn_receiver(root: &std::path::Path, count: usize) -> std::process::Child {
    common::child("handoff_receiver")
        .env("BUS", root)
        .env("COUNT", count.to_string())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// In a child process: the reviewer's inbox on `main` of the bus named by `BUS`.
fn reviewer_inbox() -> agentbus::HandoffInbox {
    let bus = Bus::builder()
        .agent("reviewer")
        .open(common::env("BUS"))
        .unwrap();
    bus.handoff_inbox("main").unwrap()
}

#[test]
#[ignore = "runs only as a child process of another test"]
fn handoff_receiver() {
    let Some(count) = common::child_env("COUNT") else {
        return;
    };
    let mut inbox = reviewer_inbox();
    for _ in 0..count.parse::<usize>().unwrap() {
        let h = inbox.recv_timeout(Duration::from_secs(30)).unwrap();
        match h.verify() {
            Ok(()) => {
                h.accept("reviewer").unwrap();
            }
            Err(e) => h.reject("reviewer", &e.to_string()).unwrap(),
        }
    }
}

fn setup() -> (tempfile::TempDir, std::path::PathBuf, Bus) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bus");
    let bus = Bus::builder().agent("writer").init(&root).unwrap();
    bus.create_mailbox("main").unwrap();
    (dir, root, bus)
}

/// Sends a handoff with an artifact and the writer's lease on `task`; returns the sent
/// handoff and the lease's token.
fn send_leased(dir: &std::path::Path, bus: &Bus) -> (agentbus::SentHandoff, u64) {
    let file = dir.join("a.md");
    std::fs::write(&file, "x").unwrap();
    let lease = bus.lease("task").try_acquire().unwrap();
    let token = lease.token();
    let sent = bus
        .handoff("main")
        .summary("s")
        .artifact(&file)
        .with_lease(lease)
        .send()
        .unwrap();
    (sent, token)
}

/// The reviewer's view: its bus and the `handoffs` group of `main`.
fn reviewer(bus: &Bus, agent: &str) -> (Bus, agentbus::Group) {
    let receiver = Bus::builder().agent(agent).open(bus.path()).unwrap();
    let group = receiver
        .mailbox("main")
        .unwrap()
        .group(HANDOFF_GROUP)
        .unwrap();
    (receiver, group)
}

/// [`setup`], a handoff sent with the writer's lease ([`send_leased`]), and the
/// reviewer's view ([`reviewer`]).
fn leased_to_reviewer() -> (
    tempfile::TempDir,
    Bus,
    (agentbus::SentHandoff, u64),
    (Bus, Group),
) {
    let (dir, _root, bus) = setup();
    let sent = send_leased(dir.path(), &bus);
    let review = reviewer(&bus, "reviewer");
    (dir, bus, sent, review)
}

/// An earlier attempt of a receiver that dies with the handoff in hand: `consumer`'s
/// claim on it, running out after `visibility`.
fn first_attempt(group: &Group, consumer: &str, visibility: Duration) -> Delivery {
    group
        .claim_for(consumer, 1, visibility)
        .unwrap()
        .pop()
        .unwrap()
}

/// What an attempt to accept does first: the writer's lease on `task` (at `token`)
/// moved to the reviewer.
fn move_lease(receiver: &Bus, token: u64) -> LeaseInfo {
    receiver
        .transfer_lease("task", "writer", token, "reviewer", Duration::from_secs(60))
        .unwrap()
}

/// The next handoff in `main` for `receiver`, within 5 s.
fn next_handoff(receiver: &Bus) -> ReceivedHandoff {
    let mut inbox = receiver.handoff_inbox("main").unwrap();
    inbox.recv_timeout(Duration::from_secs(5)).unwrap()
}

/// An answer as an earlier attempt would have left it: sent, but never acked.
fn earlier_answer(receiver: &Bus, handoff: &agentbus::Message, kind: &str, from: &str) {
    let answer = agentbus::NewMessage::new(kind)
        .from(from)
        .payload(serde_json::json!({"reason": "no"}))
        .causation_id(handoff.id.to_string())
        .idempotency_key(format!("handoff-answer/{}", handoff.id));
    receiver.mailbox("writer").unwrap().send(answer).unwrap();
}

#[test]
fn an_accepted_handoff_is_verified_and_moves_the_lease_to_the_receiver() {
    let (dir, root, bus) = setup();
    let draft = dir.path().join("chapter-1.md");
    std::fs::write(&draft, "# Chapter 1\n\nIt was a bright cold day.\n").unwrap();
    let lease = bus.lease("chapter-1").try_acquire().unwrap();
    let old_token = lease.token();
    let lease = lease.keep();

    let mut receiver = spawn_receiver(&root, 1);
    let sent = bus
        .handoff("main")
        .summary("chapter 1 drafted")
        .state(serde_json::json!({"chapter": 1, "paragraphs_done": 2}))
        .changed("wrote paragraphs 1-2")
        .remaining("paragraph 3")
        .next_step("review tone")
        .blocker("assumes British spelling")
        .artifact(&draft)
        .lease("chapter-1", "writer", lease.token)
        .correlation_id("book-1")
        .send()
        .unwrap();
    let answer = sent
        .wait_answer(Duration::from_secs(30))
        .unwrap()
        .expect("an answer");
    assert!(receiver.wait().unwrap().success());
    match answer {
        Answer::Accepted {
            lease: Some(new),
            message,
        } => {
            assert_eq!(new.holder.as_deref(), Some("reviewer"));
            assert!(new.token > old_token);
            assert_eq!(message.from, "reviewer");
            assert_eq!(message.correlation_id.as_deref(), Some("book-1"));
        }
        other => panic!("expected an accepted answer with a lease, got {other:?}"),
    }
    // The lease really moved: the writer's token is stale now.
    let info = bus.lease_info("chapter-1").unwrap().unwrap();
    assert_eq!(info.holder.as_deref(), Some("reviewer"));
    assert!(matches!(
        bus.renew_lease("chapter-1", "writer", old_token, Duration::from_secs(5)),
        Err(Error::StaleLease { .. })
    ));
    // Answered: nothing pending in the handoffs group.
    let stats = bus
        .mailbox("main")
        .unwrap()
        .group(HANDOFF_GROUP)
        .unwrap()
        .stats()
        .unwrap();
    assert_eq!((stats.acked, stats.pending, stats.in_flight), (1, 0, 0));
}

#[test]
fn changed_truncated_and_missing_artifacts_are_rejected_with_the_reason() {
    let (dir, root, bus) = setup();
    let mut expectations = Vec::new();
    let mut sent = Vec::new();
    for (name, tamper, expect) in [
        ("changed.md", "change", "sha256"),
        ("truncated.md", "truncate", "bytes, expected"),
        ("missing.md", "delete", "is missing"),
    ] {
        let path = dir.path().join(name);
        std::fs::write(&path, "original contents\n").unwrap();
        sent.push(
            bus.handoff("main")
                .summary(name)
                .artifact(&path)
                .send()
                .unwrap(),
        );
        match tamper {
            "change" => std::fs::write(&path, "ORIGINAL CONTENTS\n").unwrap(), // same size
            "truncate" => std::fs::write(&path, "original").unwrap(),
            _ => std::fs::remove_file(&path).unwrap(),
        }
        expectations.push(expect);
    }
    let mut receiver = spawn_receiver(&root, 3);
    for (handoff, expect) in sent.iter().zip(expectations) {
        match handoff.wait_answer(Duration::from_secs(30)).unwrap() {
            Some(Answer::Rejected { reason, .. }) => {
                assert!(
                    reason.contains(expect),
                    "reason {reason:?} lacks {expect:?}"
                );
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
    }
    assert!(receiver.wait().unwrap().success());
}

#[test]
fn empty_artifacts_are_refused_and_unanswered_handoffs_show_as_pending() {
    let (dir, _root, bus) = setup();
    let empty = dir.path().join("empty.md");
    std::fs::write(&empty, "").unwrap();
    let e = bus
        .handoff("main")
        .summary("nothing")
        .artifact(&empty)
        .send()
        .unwrap_err();
    assert!(
        matches!(e, Error::InvalidMessage(ref m) if m.contains("empty")),
        "{e}"
    );
    assert!(matches!(
        bus.handoff("main").summary("").send(),
        Err(Error::InvalidMessage(_))
    ));
    assert!(matches!(
        bus.handoff("mian").summary("typo").send(),
        Err(Error::MailboxNotFound { .. })
    ));
    // A lease the sender does not hold cannot ride along.
    assert!(matches!(
        bus.handoff("main")
            .summary("x")
            .lease("nope", "writer", 7)
            .send(),
        Err(Error::StaleLease { .. })
    ));

    let sent = bus.handoff("main").summary("please review").send().unwrap();
    assert!(sent
        .wait_answer(Duration::from_millis(100))
        .unwrap()
        .is_none());
    let stats = bus.mailbox("main").unwrap().stats().unwrap();
    let handoffs = stats
        .groups
        .iter()
        .find(|g| g.group == HANDOFF_GROUP)
        .unwrap();
    assert_eq!(handoffs.pending, 1);
}

#[test]
fn a_receiver_that_crashed_mid_accept_can_accept_again() {
    let (_dir, bus, (_sent, token), (receiver, group)) = leased_to_reviewer();
    // First attempt: the lease moves, then the receiver "dies" before answering.
    let d = first_attempt(&group, "reviewer", Duration::from_millis(1));
    let moved = move_lease(&receiver, token);
    drop(d);
    std::thread::sleep(Duration::from_millis(10));
    // Redelivered: accepting again succeeds and keeps the moved lease.
    let new = next_handoff(&receiver).accept("reviewer").unwrap().unwrap();
    assert_eq!(new.holder.as_deref(), Some("reviewer"));
    assert!(new.token > token);
    assert_eq!(new.token, moved.token, "the lease moved once");
    assert_eq!(answers(&bus).len(), 1);
}

/// The answers in the writer's mailbox.
fn answers(bus: &Bus) -> Vec<agentbus::Message> {
    bus.mailbox("writer")
        .unwrap()
        .messages()
        .map(|m| m.unwrap())
        .collect()
}

#[test]
fn a_receiver_that_crashed_after_answering_accepts_again_without_a_second_answer() {
    let (_dir, bus, (_sent, token), (receiver, group)) = leased_to_reviewer();
    let d = first_attempt(&group, "reviewer", Duration::from_millis(1));
    // The first attempt moved the lease and answered, then died before acking.
    let moved = move_lease(&receiver, token);
    let expires_at = moved
        .expires_at
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    let answer = agentbus::NewMessage::new(agentbus::ACCEPTED_TYPE)
        .from("reviewer")
        .payload(serde_json::json!({
            "lease": {"name": "task", "holder": "reviewer", "token": moved.token,
                      "expires_at": expires_at},
        }))
        .idempotency_key(format!("handoff-answer/{}", d.message.id));
    receiver.mailbox("writer").unwrap().send(answer).unwrap();
    drop(d);
    std::thread::sleep(Duration::from_millis(10));

    let lease = next_handoff(&receiver).accept("reviewer").unwrap().unwrap();
    assert_eq!(lease.token, moved.token);
    assert_eq!(bus.lease_info("task").unwrap().unwrap().token, moved.token);
    assert_eq!(answers(&bus).len(), 1, "answered once");
    assert_eq!(group.stats().unwrap().pending, 0, "and marked done");
}

#[test]
fn the_cli_sends_verifies_and_answers_handoffs() {
    let (dir, root, bus) = setup();
    let file = dir.path().join("notes.md");
    std::fs::write(&file, "notes").unwrap();
    let run = |args: &[&str], agent: &str| {
        let out = common::cli(&root)
            .env("AGENTBUS_AGENT", agent)
            .args(args)
            .output()
            .unwrap();
        let stdout: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (
            out.status.code(),
            stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, sent, _) = run(
        &[
            "handoff",
            "send",
            "main",
            "--summary",
            "notes ready",
            "--state",
            r#"{"step":2}"#,
            "--remaining",
            "edit",
            "--next-step",
            "edit notes",
            "--artifact",
            file.to_str().unwrap(),
        ],
        "writer",
    );
    assert_eq!(code, Some(0));
    let seq = sent[0]["seq"].as_u64().unwrap().to_string();
    let (_, shown, _) = run(&["handoff", "show", "main", &seq], "x");
    assert_eq!(shown[0]["payload"]["state"]["step"], 2);
    assert_eq!(run(&["handoff", "verify", "main", &seq], "x").0, Some(0));
    std::fs::write(&file, "NOTES").unwrap();
    let (code, _, err) = run(&["handoff", "verify", "main", &seq], "x");
    assert_eq!(code, Some(6));
    assert!(err.contains("artifact_digest_mismatch"), "{err}");
    let (code, got, _) = run(&["handoff", "recv", "main"], "editor");
    assert_eq!(code, Some(0));
    assert_eq!(got[0]["verified"], false);
    assert_eq!(got[0]["verify_error"]["error"], "artifact_digest_mismatch");
    // Someone else cannot answer the editor's handoff; the editor can.
    assert_eq!(
        run(
            &["handoff", "reject", "main", &seq, "--reason", "no"],
            "intruder"
        )
        .0,
        Some(5)
    );
    let (code, _, _) = run(
        &[
            "handoff",
            "reject",
            "main",
            &seq,
            "--reason",
            "notes changed after sending",
        ],
        "editor",
    );
    assert_eq!(code, Some(0));
    let answer = common::first_message(&bus, "writer");
    assert_eq!(answer.kind, "handoff.rejected");
    assert_eq!(
        answer.payload.unwrap()["reason"],
        "notes changed after sending"
    );
}

#[test]
fn an_accept_after_a_reject_is_refused_and_the_lease_stays() {
    let (_dir, bus, (sent, _token), (receiver, group)) = leased_to_reviewer();
    // Reviewer 1 rejects, but its claim runs out before the ack lands (a crash).
    let short = first_attempt(&group, "r1", Duration::from_millis(200));
    earlier_answer(&receiver, &short.message, agentbus::REJECTED_TYPE, "r1");
    std::thread::sleep(Duration::from_millis(250));
    // Reviewer 2 gets the redelivery and tries to accept: refused, lease untouched.
    match next_handoff(&receiver).accept("r2") {
        Err(Error::StaleDelivery { reason, .. }) => {
            assert!(reason.contains("handoff.rejected"), "{reason}")
        }
        other => panic!("expected StaleDelivery, got {other:?}"),
    }
    assert_eq!(
        bus.lease_info("task").unwrap().unwrap().holder.as_deref(),
        Some("writer")
    );
    assert!(!sent
        .wait_answer(Duration::from_secs(1))
        .unwrap()
        .unwrap()
        .is_accepted());
    assert_eq!(group.stats().unwrap().pending, 0, "answered once, settled");
}

#[test]
fn answering_by_seq_claims_only_that_handoff_and_burns_no_attempts() {
    let (_dir, _root, bus) = setup();
    for s in ["first", "second"] {
        bus.handoff("main").summary(s).send().unwrap();
    }
    let receiver = Bus::builder().agent("cli-agent").open(bus.path()).unwrap();
    let mut inbox = receiver.handoff_inbox("main").unwrap();
    for _ in 0..10 {
        // Seq 2 is not next: refused, and seq 1 is not touched.
        assert!(matches!(inbox.take(2), Err(Error::StaleDelivery { .. })));
    }
    let h = inbox.take(1).unwrap();
    assert_eq!(h.message.subject.as_deref(), Some("first"));
    h.accept("cli-agent").unwrap();
    let group = receiver
        .mailbox("main")
        .unwrap()
        .group(HANDOFF_GROUP)
        .unwrap();
    assert_eq!(group.stats().unwrap().redelivered, 0);
    inbox
        .take(2)
        .unwrap()
        .reject("cli-agent", "not now")
        .unwrap();
    assert_eq!(group.stats().unwrap().acked, 2);
}

#[test]
fn a_second_agent_cannot_claim_success_for_someone_elses_accept() {
    let (_dir, _root, bus) = setup();
    bus.handoff("main").summary("s").send().unwrap();
    let (receiver, group) = reviewer(&bus, "r2");
    // r1 accepted, then died before its ack landed.
    let first = first_attempt(&group, "r1", Duration::from_millis(200));
    earlier_answer(&receiver, &first.message, agentbus::ACCEPTED_TYPE, "r1");
    std::thread::sleep(Duration::from_millis(250));
    match next_handoff(&receiver).accept("r2") {
        Err(Error::StaleDelivery { reason, .. }) => assert!(reason.contains("by r1"), "{reason}"),
        other => panic!("expected StaleDelivery naming r1, got {other:?}"),
    }
}

#[test]
fn an_accept_whose_answer_cannot_be_written_keeps_the_lease_for_its_retry() {
    let (dir, root, bus) = setup();
    // The answer goes to the sender's mailbox: make it larger than the file size
    // limit the receiver process runs under, so that only the answer fails.
    bus.create_mailbox("writer")
        .unwrap()
        .send(agentbus::NewMessage::new("filler").body("x".repeat(300_000)))
        .unwrap();
    let (sent, token) = send_leased(dir.path(), &bus);
    let out = common::child("limited_acceptor")
        .env("BUS", &root)
        .env("SEQ", sent.receipt.seq.to_string())
        .output()
        .unwrap();
    let stdout = common::succeeded("limited_acceptor", &out);
    assert!(stdout.contains("FIRST io EFBIG"), "{stdout}");
    assert!(stdout.contains("RETRY accepted"), "{stdout}");

    let info = bus.lease_info("task").unwrap().unwrap();
    assert_eq!(info.holder.as_deref(), Some("reviewer"));
    assert!(info.token > token);
    let answers: Vec<_> = bus
        .mailbox("writer")
        .unwrap()
        .messages()
        .map(|m| m.unwrap())
        .filter(|m| m.kind != "filler")
        .collect();
    assert_eq!(answers.len(), 1, "one answer: {answers:?}");
    match Answer::from_message(answers[0].clone()) {
        Some(Answer::Accepted { lease, .. }) => assert_eq!(lease.unwrap().token, info.token),
        other => panic!("expected an acceptance, got {other:?}"),
    }
}

#[test]
#[ignore = "runs only as a child process of another test"]
fn limited_acceptor() {
    let Some(seq) = common::child_env("SEQ") else {
        return;
    };
    let seq: u64 = seq.parse().unwrap();
    let mut inbox = reviewer_inbox();
    let set_limit = |limit| unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let rl = libc::rlimit {
            rlim_cur: limit,
            rlim_max: libc::RLIM_INFINITY,
        };
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &rl), 0);
    };
    set_limit(200_000);
    match inbox.take(seq).unwrap().accept("reviewer") {
        Err(e @ Error::Io { .. }) => {
            assert_eq!(e.io_error().unwrap().raw_os_error(), Some(libc::EFBIG));
            println!("FIRST io EFBIG");
        }
        other => panic!("expected an I/O error, got {other:?}"),
    }
    set_limit(libc::RLIM_INFINITY);
    let lease = inbox
        .take(seq)
        .unwrap()
        .accept("reviewer")
        .unwrap()
        .unwrap();
    assert_eq!(lease.holder.as_deref(), Some("reviewer"));
    println!("RETRY accepted");
}

#[test]
fn a_process_bound_lease_handed_off_stays_held_until_accepted() {
    let (_dir, _root, bus) = setup();
    let lease = bus.lease("task").process_bound(true).try_acquire().unwrap();
    let token = lease.token();
    let sent = bus
        .handoff("main")
        .summary("over to you")
        .with_lease(lease)
        .send()
        .unwrap();
    // The handle is gone with the send, but the lease is still the writer's.
    let held = bus.lease_info("task").unwrap().unwrap();
    assert_eq!(held.holder.as_deref(), Some("writer"));
    assert!(held.token > token && !held.process_bound);
    assert!(matches!(
        bus.lease("task").holder("thief").try_acquire(),
        Err(Error::LeaseHeld { .. })
    ));

    let (receiver, _group) = reviewer(&bus, "reviewer");
    let mut inbox = receiver.handoff_inbox("main").unwrap();
    let moved = inbox
        .take(sent.receipt.seq)
        .unwrap()
        .accept("reviewer")
        .unwrap()
        .unwrap();
    assert_eq!(moved.holder.as_deref(), Some("reviewer"));
    assert!(moved.token > held.token);
}

#[test]
fn a_handoff_that_cannot_be_sent_lets_its_lease_go() {
    let (dir, _root, bus) = setup();
    for process_bound in [false, true] {
        let lease = bus
            .lease("task")
            .process_bound(process_bound)
            .try_acquire()
            .unwrap();
        let e = bus
            .handoff("main")
            .summary("s")
            .artifact(dir.path().join("missing.md"))
            .with_lease(lease)
            .send()
            .unwrap_err();
        assert!(matches!(e, Error::ArtifactMissing { .. }), "{e:?}");
        let info = bus.lease_info("task").unwrap().unwrap();
        assert_eq!(info.holder, None, "process_bound {process_bound}");
    }
}

/// A handoff delivered again after its lease moved on (accepted, released, taken by
/// someone else): accepting it again must not hand out a lease that is no longer held.
#[test]
fn accepting_again_after_the_lease_moved_on_is_stale_not_a_dead_lease() {
    let (_dir, bus, (_sent, token), (receiver, group)) = leased_to_reviewer();
    let mut inbox = receiver.handoff_inbox("main").unwrap();
    let h = inbox.recv_timeout(Duration::from_secs(5)).unwrap();
    let seq = h.seq();
    let lease = h
        .accept_lease("reviewer", Duration::from_secs(60))
        .unwrap()
        .unwrap();
    assert!(lease.token() > token);
    lease.release().unwrap();
    let writers = bus.lease("task").try_acquire().unwrap();
    // Delivered once more (as after a crash between the answer and the ack).
    assert!(group.requeue(seq).unwrap());
    let h = inbox.recv_timeout(Duration::from_secs(5)).unwrap();
    match h.accept_lease("reviewer", Duration::from_secs(60)) {
        Err(Error::StaleLease { holder, token, .. }) => {
            assert_eq!(holder.as_deref(), Some("writer"));
            assert_eq!(token, writers.token());
        }
        Ok(l) => panic!(
            "a lease handle for token {:?} while the writer holds {}",
            l.map(|l| l.token()),
            writers.token()
        ),
        Err(e) => panic!("{e:?}"),
    }
    assert_eq!(answers(&bus).len(), 1, "still answered once");
}
