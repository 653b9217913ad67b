//! The `agentbus` command line: JSON lines out, JSON errors with stable codes and exit
//! statuses, and the same bus the library sees.

mod common;

use common::{fails, json_lines, ok, run_fails, run_ok};

use std::io::Write;
use std::process::Stdio;

use agentbus::Bus;
use serde_json::Value;

fn setup() -> tempfile::TempDir {
    common::cli_bus(&["main", "review"])
}

#[test]
fn send_prints_a_receipt_and_recv_reads_it_back() {
    let dir = setup();
    let artifact = dir.path().join("draft.md");
    std::fs::write(&artifact, "# draft\n").unwrap();
    let receipt = ok(common::cli(dir.path())
        .args(["send", "main", "--type", "draft.ready", "--from", "writer"])
        .args([
            "--subject",
            "ch1",
            "--body",
            "hello",
            "--payload",
            r#"{"n":1}"#,
        ])
        .args([
            "--correlation-id",
            "book-1",
            "--priority",
            "-2",
            "--header",
            "lang=en",
        ])
        .arg("--artifact")
        .arg(&artifact)
        .output()
        .unwrap());
    assert_eq!(receipt.len(), 1);
    assert_eq!(receipt[0]["seq"], 1);
    assert_eq!(receipt[0]["mailbox"], "main");
    assert_eq!(receipt[0]["id"].as_str().unwrap().len(), 36);

    let messages = run_ok(dir.path(), ["recv", "main"]);
    assert_eq!(messages.len(), 1);
    let m = &messages[0];
    assert_eq!(m["id"], receipt[0]["id"]);
    assert_eq!(
        (m["type"].as_str(), m["from"].as_str()),
        (Some("draft.ready"), Some("writer"))
    );
    assert_eq!(m["payload"]["n"], 1);
    assert_eq!(m["priority"], -2);
    assert_eq!(m["headers"]["lang"], "en");
    assert_eq!(m["artifacts"][0]["size"], 8);
    assert_eq!(m["artifacts"][0]["sha256"], sha256_hex(b"# draft\n"));

    // The library sees the same message.
    let lib = common::first_message(&Bus::open(dir.path()).unwrap(), "main");
    assert_eq!(lib.id.to_string(), m["id"].as_str().unwrap());
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn recv_filters_and_limits() {
    let dir = setup();
    for (kind, from, corr) in [
        ("task", "alice", "c1"),
        ("note", "bob", "c1"),
        ("task", "bob", "c2"),
        ("task", "alice", "c2"),
    ] {
        run_ok(
            dir.path(),
            [
                "send",
                "main",
                "--type",
                kind,
                "--from",
                from,
                "--correlation-id",
                corr,
            ],
        );
    }
    let seqs = |args: &[&str]| -> Vec<u64> {
        run_ok(dir.path(), ["recv", "main"].iter().chain(args))
            .iter()
            .map(|m| m["seq"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(seqs(&[]), [1, 2, 3, 4]);
    assert_eq!(seqs(&["--type", "task"]), [1, 3, 4]);
    assert_eq!(
        seqs(&["--type", "task", "--type", "note", "--from", "bob"]),
        [2, 3]
    );
    assert_eq!(seqs(&["--correlation-id", "c2"]), [3, 4]);
    assert_eq!(seqs(&["--from-seq", "2", "--max", "2"]), [2, 3]);
    assert_eq!(seqs(&["--from-seq", "9"]), Vec::<u64>::new());
}

#[test]
fn body_from_stdin_and_idempotency_key() {
    let dir = setup();
    let send = || {
        let mut child = common::cli(dir.path())
            .args(["send", "main", "--type", "note", "--body-file", "-"])
            .args(["--idempotency-key", "once"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(b"line one\nline two\n")
            .unwrap();
        ok(child.wait_with_output().unwrap()).remove(0)
    };
    let first = send();
    let second = send();
    assert_eq!(first["duplicate"], false);
    assert_eq!(second["duplicate"], true);
    assert_eq!(first["id"], second["id"]);
    let messages = run_ok(dir.path(), ["recv", "main"]);
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["body"], "line one\nline two\n");
}

#[test]
fn invalid_input_exits_2_with_a_typed_error_and_writes_nothing() {
    let dir = setup();
    let seg = common::first_segment(dir.path(), "main");

    let e = run_fails(
        dir.path(),
        ["send", "main", "--type", "t", "--payload", "{not json"],
        2,
    );
    assert_eq!(e["error"], "invalid_message");
    assert!(e["message"].as_str().unwrap().contains("--payload"));

    let e = run_fails(dir.path(), ["send", "mian", "--type", "t"], 2);
    assert_eq!(e["error"], "mailbox_not_found");
    assert_eq!(e["existing"], serde_json::json!(["main", "review"]));

    let big = dir.path().join("big.txt");
    std::fs::write(&big, "x".repeat(1024 * 1024)).unwrap();
    let e = fails(
        common::cli(dir.path())
            .args(["send", "main", "--type", "t", "--body-file"])
            .arg(&big)
            .output()
            .unwrap(),
        2,
    );
    assert_eq!(e["error"], "record_too_large");

    let e = run_fails(dir.path(), ["send", "main"], 2);
    assert_eq!(e["error"], "usage");
    let e = run_fails(dir.path(), ["frobnicate"], 2);
    assert_eq!(e["error"], "usage");

    let e = run_fails(
        dir.path(),
        [
            "send",
            "main",
            "--type",
            "t",
            "--artifact",
            "/nonexistent/file",
        ],
        6,
    );
    assert_eq!(e["error"], "artifact_missing");

    assert_eq!(
        std::fs::metadata(&seg).unwrap().len(),
        0,
        "nothing may be written"
    );
}

#[test]
fn a_missing_bus_is_an_error_not_a_new_directory() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("typo");
    for path in [missing.as_path(), dir.path()] {
        let e = run_fails(path, ["mailbox", "list"], 2);
        assert_eq!(e["error"], "not_a_bus");
        assert!(e["message"].as_str().unwrap().contains("agentbus init"));
    }
    assert!(!missing.exists());
}

#[test]
fn dir_comes_from_the_environment_too() {
    let dir = setup();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentbus"))
        .args(["mailbox", "list"])
        .env("AGENTBUS_DIR", dir.path())
        .output()
        .unwrap();
    let names: Vec<_> = ok(out).iter().map(|v| v["mailbox"].clone()).collect();
    assert_eq!(names, ["main", "review"]);
}

#[test]
fn doctor_reports_and_repairs_with_exit_codes() {
    let dir = setup();
    run_ok(dir.path(), ["send", "main", "--type", "t"]);
    let clean = run_ok(dir.path(), ["doctor"]);
    assert_eq!(clean.last().unwrap()["doctor"], "clean");
    assert_eq!(clean.last().unwrap()["records"], 1);

    let seg = common::first_segment(dir.path(), "main");
    let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
    f.write_all(b"{\"seq\":2,\"ty").unwrap();
    let out = common::cli(dir.path()).arg("doctor").output().unwrap();
    assert_eq!(out.status.code(), Some(4));
    let lines = json_lines(out.stdout);
    assert_eq!(lines[0]["problem"], "torn_tail");
    assert_eq!(lines[0]["line"], 2);
    assert_eq!(lines[0]["path"], seg.to_str().unwrap());
    assert_eq!(lines[1]["doctor"], "problems");

    let repaired = run_ok(dir.path(), ["doctor", "--repair"]);
    assert_eq!(repaired[0]["repaired"], true);
    assert_eq!(repaired[1]["doctor"], "clean");
    let again = run_ok(dir.path(), ["doctor"]);
    assert_eq!(again[0]["problems"], 0);
}

#[test]
fn group_verbs_claim_ack_nack_dead_letter_replay_stats_compact() {
    let dir = setup();
    let created = run_ok(
        dir.path(),
        [
            "group",
            "create",
            "main",
            "workers",
            "--max-deliveries",
            "2",
        ],
    );
    assert_eq!(created[0]["created"], true);
    let groups = run_ok(dir.path(), ["group", "list", "main"]);
    assert_eq!(groups[0]["dead_letter"], "main.dlq");

    // Nothing to deliver: no output, exit 0 (also after waiting).
    assert!(run_ok(dir.path(), ["recv", "main", "--group", "workers"]).is_empty());
    assert!(run_ok(
        dir.path(),
        ["recv", "main", "--group", "workers", "--wait", "0.2"]
    )
    .is_empty());

    for body in ["a", "b", "c"] {
        run_ok(
            dir.path(),
            ["send", "main", "--type", "job", "--body", body],
        );
    }
    let claimed = run_ok(
        dir.path(),
        [
            "recv",
            "main",
            "--group",
            "workers",
            "--consumer",
            "w1",
            "--max",
            "2",
        ],
    );
    assert_eq!(claimed.len(), 2);
    assert_eq!(claimed[0]["seq"], 1);
    assert_eq!(claimed[0]["body"], "a");
    assert_eq!(claimed[0]["delivery"]["group"], "workers");
    assert_eq!(claimed[0]["delivery"]["consumer"], "w1");
    assert_eq!(claimed[0]["delivery"]["attempt"], 1);

    let acked = run_ok(dir.path(), ["ack", "main", "--group", "workers", "1"]);
    assert_eq!(acked[0], serde_json::json!({"seq": 1, "acked": true}));
    let nack = |reason| {
        let args = [
            "nack", "main", "--group", "workers", "2", "--reason", reason,
        ];
        run_ok(dir.path(), args)
    };
    nack("bad input");
    let again = run_ok(dir.path(), ["recv", "main", "--group", "workers"]);
    assert_eq!(
        (
            again[0]["seq"].as_u64(),
            again[0]["delivery"]["attempt"].as_u64()
        ),
        (Some(2), Some(2))
    );
    // The second failure is the last allowed delivery: dead-lettered.
    nack("still bad");
    let e = run_fails(dir.path(), ["nack", "main", "--group", "workers", "2"], 5);
    assert_eq!(e["error"], "stale_delivery");
    let e = run_fails(dir.path(), ["ack", "main", "--group", "workers", "9"], 2);
    assert_eq!(e["error"], "not_delivered");

    let stats = run_ok(dir.path(), ["stats", "main"]);
    let g = &stats[0]["groups"][0];
    assert_eq!(stats[0]["published"], 3);
    assert_eq!(
        (
            g["acked"].as_u64(),
            g["dead"].as_u64(),
            g["in_flight"].as_u64()
        ),
        (Some(1), Some(1), Some(0))
    );
    assert_eq!(
        (g["lag"].as_u64(), g["pending"].as_u64()),
        (Some(1), Some(1))
    );

    let dead = run_ok(dir.path(), ["recv", "main.dlq"]);
    assert_eq!(dead[0]["body"], "b");
    let replayed = run_ok(dir.path(), ["replay", "main.dlq", "1"]);
    assert_eq!(replayed[0]["receipt"]["seq"], 4);
    assert_eq!(replayed[0]["receipt"]["mailbox"], "main");

    let rest = run_ok(
        dir.path(),
        ["recv", "main", "--group", "workers", "--max", "10"],
    );
    let seqs: Vec<_> = rest.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [3, 4]);
    let upto = run_ok(
        dir.path(),
        ["ack", "main", "--group", "workers", "--upto", "4"],
    );
    assert_eq!(upto[0]["acked"], 2);

    let compacted = run_ok(dir.path(), ["compact"]);
    assert!(compacted.iter().any(|c| c["mailbox"] == "main"));
}

#[test]
fn nack_with_attempt_refuses_a_claim_that_is_no_longer_yours() {
    let dir = setup();
    run_ok(dir.path(), ["group", "create", "main", "g"]);
    run_ok(dir.path(), ["send", "main", "--type", "job"]);
    let first = run_ok(
        dir.path(),
        [
            "recv",
            "main",
            "--group",
            "g",
            "--consumer",
            "bob",
            "--visibility",
            "0.01",
        ],
    );
    assert_eq!(first[0]["delivery"]["attempt"], 1);
    std::thread::sleep(std::time::Duration::from_millis(50));
    let second = run_ok(
        dir.path(),
        ["recv", "main", "--group", "g", "--consumer", "alice"],
    );
    assert_eq!(second[0]["delivery"]["attempt"], 2);
    // Bob comes back late: his attempt is stale, exit 5, Alice's claim stands.
    let e = run_fails(
        dir.path(),
        ["nack", "main", "--group", "g", "1", "--attempt", "1"],
        5,
    );
    assert_eq!(e["error"], "stale_delivery");
    run_ok(
        dir.path(),
        [
            "extend",
            "main",
            "--group",
            "g",
            "1",
            "--attempt",
            "2",
            "--by",
            "60",
        ],
    );
    assert!(run_ok(dir.path(), ["recv", "main", "--group", "g"]).is_empty());
}

#[test]
fn recv_waits_for_the_first_message_with_and_without_a_group() {
    let dir = setup();
    run_ok(dir.path(), ["group", "create", "main", "workers"]);
    let start = |args: &[&str]| {
        common::cli(dir.path())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    // Both start before anything is sent: without waiting they would print nothing.
    let reader = start(&["recv", "main", "--wait", "60"]);
    let claimer = start(&["recv", "main", "--group", "workers", "--wait", "60"]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    run_ok(
        dir.path(),
        ["send", "main", "--type", "t", "--body", "late"],
    );
    let read = ok(reader.wait_with_output().unwrap());
    assert_eq!((read.len(), &read[0]["body"]), (1, &Value::from("late")));
    let claimed = ok(claimer.wait_with_output().unwrap());
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0]["body"], "late");
    assert_eq!(claimed[0]["delivery"]["attempt"], 1);
}

#[test]
fn recv_reports_damage_on_stderr_without_counting_it_against_max() {
    let dir = setup();
    for body in ["one", "two"] {
        run_ok(dir.path(), ["send", "main", "--type", "t", "--body", body]);
    }
    // Damage the first record's body (its checksum no longer matches).
    common::edit_first_segment(dir.path(), "main", "\"one\"", "\"One\"");

    let out = common::cli(dir.path())
        .args(["recv", "main", "--max", "1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    let error: Value = serde_json::from_str(stderr.lines().next().unwrap()).unwrap();
    assert_eq!(error["error"], "corrupt", "{stderr}");
    let stdout = json_lines(out.stdout);
    assert_eq!(stdout.len(), 1);
    assert_eq!(
        (&stdout[0]["seq"], &stdout[0]["body"]),
        (&Value::from(2), &Value::from("two"))
    );
}
