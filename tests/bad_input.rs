//! Input that used to be accepted silently, changed, or answered with a misleading
//! error: each is now a typed error (JSON on stderr, the documented exit status) with
//! nothing written, or the behaviour a user expects.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use agentbus::{Artifact, Bus, Error, GroupOptions, NewMessage};
use common::{fails, ok, run, run_fails, run_ok};

fn setup() -> tempfile::TempDir {
    common::cli_bus(&["main"])
}

/// Runs `cmd`, failing the test instead of hanging if it has not ended after a minute
/// (a loaded machine is slow, but never that slow for these commands).
fn run_bounded(cmd: Command) -> Output {
    common::output_bounded(cmd, Duration::from_secs(60))
}

fn group_names(dir: &Path, mailbox: &str) -> Vec<String> {
    run_ok(dir, &["group", "list", mailbox])
        .iter()
        .map(|g| g["group"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn group_settings_out_of_range_are_refused_and_create_nothing() {
    let dir = setup();
    for (flag, value, setting) in [
        ("--max-deliveries", "0", "max_deliveries"),
        ("--visibility", "0", "visibility"),
        // Below the millisecond the group stores: it would become 0.
        ("--visibility", "0.0004", "visibility"),
        // A deadline past what a timestamp can hold.
        ("--visibility", "1e12", "visibility"),
    ] {
        let e = run_fails(
            dir.path(),
            &["group", "create", "main", "g", flag, value],
            2,
        );
        assert_eq!(
            (e["error"].as_str(), e["setting"].as_str()),
            (Some("invalid_setting"), Some(setting)),
            "{flag} {value}: {e}"
        );
        assert!(group_names(dir.path(), "main").is_empty(), "{flag} {value}");
    }
    // The limits themselves are fine.
    run_ok(
        dir.path(),
        &[
            "group",
            "create",
            "main",
            "g",
            "--max-deliveries",
            "1",
            "--visibility",
            "0.001",
        ],
    );
    assert_eq!(group_names(dir.path(), "main"), ["g"]);

    // A claim's own visibility is checked the same way.
    run_ok(dir.path(), &["send", "main", "--type", "t"]);
    let e = run_fails(
        dir.path(),
        &["recv", "main", "--group", "g", "--visibility", "0"],
        2,
    );
    assert_eq!(e["setting"], "visibility");
    let stats = run_ok(dir.path(), &["stats", "main"]);
    assert_eq!(stats[0]["groups"][0]["delivered"], 0, "{stats:?}");

    // The library: a typed error, not a silent change.
    let bus = Bus::open(dir.path()).unwrap();
    let mb = bus.mailbox("main").unwrap();
    for opts in [
        GroupOptions::new().max_deliveries(0),
        GroupOptions::new().visibility(Duration::ZERO),
        GroupOptions::new().visibility(Duration::from_micros(999)),
    ] {
        let e = mb.create_group_with("lib", opts).unwrap_err();
        assert_eq!(e.code(), "invalid_setting", "{e:?}");
        assert!(e.is_invalid_input());
    }
    let group = mb.group("g").unwrap();
    let e = group.claim_for("c", 1, Duration::ZERO).unwrap_err();
    assert_eq!(e.code(), "invalid_setting", "{e:?}");
    assert!(!mb.groups().unwrap().contains(&"lib".to_owned()));
}

#[test]
fn lease_acquire_refuses_a_wait_that_is_not_a_duration() {
    let dir = setup();
    for wait in [["--wait", "-1"], ["--wait", "NaN"], ["--wait", "inf"]] {
        let out = run(
            dir.path(),
            &[
                "lease", "acquire", "deploy", "--holder", "h", "--ttl", "10", wait[0], wait[1],
            ],
        );
        let e = fails(out, 2);
        assert_eq!(e["error"], "usage");
        assert!(e["message"].as_str().unwrap().contains(wait[1]), "{e}");
    }
    let e = run_fails(
        dir.path(),
        &[
            "lease",
            "acquire",
            "deploy",
            "--holder",
            "h",
            "--ttl",
            "10",
            "--wait=-1",
        ],
        2,
    );
    assert!(e["message"].as_str().unwrap().contains("-1"), "{e}");
    // Nothing was granted.
    let shown = run_ok(dir.path(), &["lease", "show", "deploy"]);
    assert!(shown[0]["holder"].is_null(), "{shown:?}");
}

#[test]
fn a_header_without_a_name_is_refused() {
    let dir = setup();
    let e = run_fails(
        dir.path(),
        &["send", "main", "--type", "t", "--header", "=v"],
        2,
    );
    assert_eq!(e["error"], "invalid_message");
    assert!(run_ok(dir.path(), &["recv", "main"]).is_empty());

    // `KEY=` is a header with an empty value, which is fine.
    run_ok(
        dir.path(),
        &["send", "main", "--type", "t", "--header", "k="],
    );
    assert_eq!(run_ok(dir.path(), &["recv", "main"])[0]["headers"]["k"], "");
}

#[test]
fn an_artifact_that_is_not_a_regular_file_is_named_for_what_it_is() {
    let dir = setup();
    let folder = dir.path().join("folder");
    std::fs::create_dir(&folder).unwrap();
    let fifo = dir.path().join("pipe");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    for (path, kind) in [
        (folder.as_path(), "directory"),
        (fifo.as_path(), "FIFO"),
        (Path::new("/dev/null"), "character device"),
    ] {
        for args in [
            &["send", "main", "--type", "t"][..],
            &["handoff", "send", "main", "--from", "w", "--summary", "s"][..],
        ] {
            let mut cmd = common::cli(dir.path());
            cmd.args(args).arg("--artifact").arg(path);
            let e = fails(run_bounded(cmd), 6);
            assert_eq!(
                (e["error"].as_str(), e["kind"].as_str()),
                (Some("artifact_not_a_file"), Some(kind)),
                "{e}"
            );
            assert!(e["message"].as_str().unwrap().contains(kind), "{e}");
        }
    }
    assert!(run_ok(dir.path(), &["recv", "main"]).is_empty());

    // At verification time too: a pinned file replaced by a FIFO does not block.
    let file = dir.path().join("draft.md");
    std::fs::write(&file, "# draft\n").unwrap();
    let artifact = Artifact::capture(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    Command::new("mkfifo").arg(&file).status().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(artifact.verify()).unwrap());
    let e = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("verify blocked on a FIFO")
        .unwrap_err();
    assert_eq!(e.code(), "artifact_not_a_file", "{e:?}");
    assert!(e.to_string().contains("FIFO"), "{e}");
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    let e = Artifact {
        path: file.clone(),
        size: 8,
        sha256: "00".repeat(32),
    }
    .verify()
    .unwrap_err();
    assert_eq!(e.code(), "artifact_not_a_file");
}

#[test]
fn a_refused_handoff_leaves_no_group_and_no_reply_mailbox_behind() {
    let dir = setup();
    let granted = run_ok(
        dir.path(),
        &[
            "lease", "acquire", "ch1", "--holder", "writer", "--ttl", "60",
        ],
    );
    let token = granted[0]["token"].as_u64().unwrap();
    let send = |token: u64| {
        let token = token.to_string();
        let handoff = [
            "handoff",
            "send",
            "main",
            "--from",
            "writer",
            "--summary",
            "s",
        ];
        run(
            dir.path(),
            handoff.iter().chain(&["--lease", "ch1", "--token", &token]),
        )
    };
    let e = fails(send(token + 1), 5);
    assert_eq!(e["error"], "stale_lease");
    assert!(group_names(dir.path(), "main").is_empty());
    let mailboxes: Vec<_> = run_ok(dir.path(), &["mailbox", "list"])
        .iter()
        .map(|m| m["mailbox"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(mailboxes, ["main"]);
    assert!(run_ok(dir.path(), &["recv", "main"]).is_empty());

    // With the right token it goes through and creates both.
    ok(send(token));
    assert_eq!(group_names(dir.path(), "main"), ["handoffs"]);
}

#[test]
fn a_refused_handoff_with_a_lease_handle_keeps_the_lease_and_creates_nothing() {
    let dir = setup();
    let bus = Bus::builder().agent("writer").open(dir.path()).unwrap();
    let lease = bus
        .lease("ch1")
        .ttl(Duration::from_millis(1))
        .try_acquire()
        .unwrap();
    // Taken over by someone else once it ran out: the handle is stale.
    std::thread::sleep(Duration::from_millis(300));
    let other = bus.lease("ch1").holder("other").try_acquire().unwrap();
    let e = bus
        .handoff("main")
        .summary("s")
        .with_lease(lease)
        .send()
        .unwrap_err();
    assert!(matches!(e, Error::StaleLease { .. }), "{e:?}");
    assert!(group_names(dir.path(), "main").is_empty());
    assert_eq!(bus.mailboxes().unwrap(), ["main"]);
    assert_eq!(bus.lease_info("ch1").unwrap().unwrap().token, other.token());
}

#[test]
fn settling_seq_0_is_an_error_not_a_quiet_false() {
    let dir = setup();
    run_ok(dir.path(), &["group", "create", "main", "g"]);
    run_ok(dir.path(), &["send", "main", "--type", "t"]);
    run_ok(dir.path(), &["recv", "main", "--group", "g"]);
    for verb in [
        &["ack", "main", "--group", "g", "0"][..],
        &["nack", "main", "--group", "g", "0"][..],
        &["term", "main", "--group", "g", "0"][..],
        &["extend", "main", "--group", "g", "0", "--by", "5"][..],
    ] {
        let e = run_fails(dir.path(), verb, 2);
        assert_eq!(e["error"], "not_delivered", "{verb:?}: {e}");
    }
    let group = Bus::open(dir.path())
        .unwrap()
        .mailbox("main")
        .unwrap()
        .group("g")
        .unwrap();
    assert!(matches!(
        group.ack(0),
        Err(Error::NotDelivered { seq: 0, .. })
    ));
    // The real delivery is untouched.
    assert!(group.ack(1).unwrap());
}

#[test]
fn replaying_a_dead_letter_twice_sends_one_message() {
    let dir = setup();
    run_ok(
        dir.path(),
        &["group", "create", "main", "g", "--max-deliveries", "1"],
    );
    run_ok(
        dir.path(),
        &["send", "main", "--type", "job", "--body", "b"],
    );
    run_ok(dir.path(), &["recv", "main", "--group", "g"]);
    run_ok(dir.path(), &["nack", "main", "--group", "g", "1"]);
    assert_eq!(run_ok(dir.path(), &["recv", "main.dlq"]).len(), 1);

    let first = run_ok(dir.path(), &["replay", "main.dlq", "1"]);
    assert_eq!(
        (
            first[0]["receipt"]["seq"].as_u64(),
            first[0]["receipt"]["duplicate"].as_bool()
        ),
        (Some(2), Some(false))
    );
    let again = run_ok(dir.path(), &["replay", "main.dlq", "1", "1"]);
    for line in &again {
        assert_eq!(line["receipt"]["seq"], 2, "{line}");
        assert_eq!(line["receipt"]["duplicate"], true, "{line}");
    }
    let stored = run_ok(dir.path(), &["recv", "main"]);
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert_eq!(stored[1]["body"], "b");

    // The library's replay message carries the same key.
    let bus = Bus::open(dir.path()).unwrap();
    let dead = common::first_message(&bus, "main.dlq");
    let receipt = bus
        .mailbox("main")
        .unwrap()
        .send(NewMessage::replay_of(&dead))
        .unwrap();
    assert_eq!((receipt.seq, receipt.duplicate), (2, true));
}

/// Appends `line` (and a newline) to the first segment of `main`, as an outside writer.
fn outside(dir: &Path, line: &str) {
    use std::io::Write;
    let seg = common::first_segment(dir, "main");
    let mut f = std::fs::OpenOptions::new().append(true).open(seg).unwrap();
    writeln!(f, "{line}").unwrap();
}

#[test]
fn outside_records_with_names_that_are_not_names_are_damage_and_lone_surrogates_read() {
    let dir = tempfile::tempdir().unwrap();
    let (_bus, mb) = common::flush_mailbox(dir.path(), "main");
    mb.send(NewMessage::new("t")).unwrap();
    let record = |seq: u64, from: &str, subject: &str| {
        format!(
            r#"{{"seq":{seq},"id":"01890000-0000-7000-8000-{seq:012}","ts":"2026-12-02T00:00:00Z","from":{from},"type":"t","subject":{subject}}}"#
        )
    };
    // What Python's json.dumps writes for a lone surrogate, then a "from" that would
    // reach a handler's environment as `x=1\nPATH=/tmp`.
    outside(dir.path(), &record(2, r#""py""#, r#""half \ud800 a pair""#));
    outside(dir.path(), &record(3, r#""x=1\nPATH=/tmp""#, r#""s""#));
    outside(dir.path(), &record(4, r#""py""#, r#""after""#));
    let items: Vec<_> = mb.messages().collect();
    assert_eq!(items.len(), 4, "{items:?}");
    let second = items[1].as_ref().unwrap();
    assert_eq!(second.subject.as_deref(), Some("half \u{fffd} a pair"));
    // An invalid `from` is damage.
    let reason = common::corrupt_reason(&items[2], 3);
    assert!(reason.contains("not a valid name"), "{reason}");
    assert_eq!(items[3].as_ref().unwrap().subject.as_deref(), Some("after"));
    // The CLI reports it and prints the intact records around it.
    let out = common::cli(dir.path())
        .args(["recv", "main"])
        .output()
        .unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid name"));
}
