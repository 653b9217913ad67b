//! `agentbus watch` as real processes: it reports damage and compaction and goes on,
//! and `--exec` runs any valid message's handler without deadlocks, keeps its JSON
//! stream clean, kills hung handlers, and stops cleanly on SIGINT/SIGTERM. The outcome
//! mapping and the heartbeat also run on JetStream: `tests/backends/watch.rs`.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use agentbus::{GroupOptions, NewMessage};
use serde_json::Value;

/// How long any one `watch` run in these tests may take before it counts as hung.
const HUNG: Duration = Duration::from_secs(60);

fn watch(dir: &Path) -> Command {
    let mut cmd = common::cli(dir);
    cmd.arg("watch");
    cmd
}

/// `watch` following `main` from seq 1 until it has been idle for `idle` seconds.
fn follow_main(dir: &Path, idle: &str) -> Command {
    let mut cmd = watch(dir);
    cmd.args(["main", "--from-seq", "1", "--idle-timeout", idle]);
    cmd
}

/// `watch` of group `g` of `jobs` running `handler` for up to `max` messages, to its
/// end (within [`HUNG`]; `what` names it if not).
fn watch_group(dir: &Path, max: &str, handler: &str, what: &str) -> common::Bounded {
    let mut cmd = watch(dir);
    cmd.args(["jobs", "--group", "g", "--max", max, "--exec", handler]);
    common::output_within(what, cmd, HUNG)
}

/// The JSON lines of `stderr` (other lines, such as a handler's own, skipped).
fn json_lines(stderr: &str) -> Vec<Value> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

#[test]
fn watch_reports_damage_and_goes_on_after_every_restart() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_bus(dir.path());
    common::mailbox_with(&bus, "main", &["alpha", "bravo", "charlie"]);
    common::edit_first_segment(dir.path(), "main", "bravo", "brave");

    // Twice: a restarted follower meets the damage again, reports it again, and again
    // reads on past it.
    for _ in 0..2 {
        let cmd = follow_main(dir.path(), "1");
        let out = common::output_within("watch past damage", cmd, HUNG);
        let bodies: Vec<_> = out
            .lines()
            .iter()
            .map(|m| m["body"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(bodies, ["alpha", "charlie"], "stderr: {}", out.stderr);
        let reports = json_lines(&out.stderr);
        assert_eq!(reports.len(), 1, "{reports:?}");
        assert_eq!(
            (reports[0]["error"].as_str(), reports[0]["line"].as_u64()),
            (Some("corrupt"), Some(2))
        );
        assert_eq!(
            out.status.code(),
            Some(1),
            "damage shows in the exit status"
        );
    }

    // With --exec too: the handler runs for the intact records.
    let mut cmd = follow_main(dir.path(), "1");
    cmd.args(["--exec", "cat >/dev/null"]);
    let out = common::output_within("watch --exec past damage", cmd, HUNG);
    let seqs: Vec<_> = out
        .lines()
        .iter()
        .map(|l| l["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 3], "stderr: {}", out.stderr);
}

#[test]
fn a_watcher_behind_compaction_is_told_so_and_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let (_bus, mb, group) = common::main_with_workers(dir.path());

    // The watcher's handler holds it at seq 1 until `go` exists, while the log grows
    // by many segments and is compacted under it.
    let (go, started) = (dir.path().join("go"), dir.path().join("started"));
    let handler = format!(
        "cat >/dev/null; touch {}; while [ ! -e {} ]; do sleep 0.05; done",
        started.display(),
        go.display()
    );
    let mut cmd = follow_main(dir.path(), "2");
    cmd.args(["--exec", &handler]);
    let errors = tempfile::NamedTempFile::new().unwrap();
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(errors.reopen().unwrap())
        .spawn()
        .unwrap();
    // The handler of seq 1 runs once watch has read seq 1.
    common::wait_for("the first handler", HUNG, || std::fs::read(&started).ok());
    let first_available = common::grow_settle_and_compact(&mb, &group);
    std::fs::write(&go, "").unwrap();

    let out = child.wait_with_output().unwrap();
    let stderr = std::fs::read_to_string(errors.path()).unwrap();
    assert!(out.status.success(), "compaction is not damage: {stderr}");
    let seqs: Vec<u64> = common::json_lines(out.stdout)
        .iter()
        .map(|l| l["seq"].as_u64().unwrap())
        .collect();
    let reports = json_lines(&stderr);
    assert_eq!(reports.len(), 1, "{stderr}");
    let r = &reports[0];
    assert_eq!(r["error"], "compacted", "{r}");
    assert_eq!(r["first_available"].as_u64(), Some(first_available), "{r}");
    let missed_from = r["missed_from"].as_u64().unwrap();
    // What its open segment still held, then on from the oldest seq still stored.
    let before: Vec<u64> = (1..missed_from).collect();
    let after: Vec<u64> = (first_available..=60).collect();
    assert_eq!(seqs, [before, after].concat());
}

#[test]
fn any_valid_message_reaches_its_handler_whatever_its_fields_hold() {
    let dir = tempfile::tempdir().unwrap();
    let (_bus, jobs, _) = common::jobs_group(dir.path(), 0);
    let long = "x".repeat(40 * 1024);
    jobs.send(
        NewMessage::new("job")
            .subject("a\u{0}b")
            .correlation_id("c-1"),
    )
    .unwrap();
    jobs.send(NewMessage::new("job").subject(long.clone()))
        .unwrap();
    jobs.send(NewMessage::new("job").subject("plain")).unwrap();

    // Each handler saves its stdin and what its environment said.
    let seen = dir.path().join("seen");
    std::fs::create_dir(&seen).unwrap();
    let handler = format!(
        r#"cat > {s}/$AGENTBUS_SEQ.json
        printf '%s|%s|%s' "${{AGENTBUS_SUBJECT-unset}}" "$AGENTBUS_CORRELATION_ID" \
            "$AGENTBUS_OMITTED" > {s}/$AGENTBUS_SEQ.env"#,
        s = seen.display()
    );
    let check = |seq: u64, subject: &str, env: &str| {
        let stdin = std::fs::read_to_string(seen.join(format!("{seq}.json"))).unwrap();
        let m: Value = serde_json::from_str(&stdin).unwrap();
        assert_eq!(
            m["subject"], subject,
            "seq {seq}: the message whole on stdin"
        );
        let got = std::fs::read_to_string(seen.join(format!("{seq}.env"))).unwrap();
        assert_eq!(got, env, "seq {seq}");
    };
    let expected_env = [
        "unset|c-1|AGENTBUS_SUBJECT".to_owned(),
        "unset||AGENTBUS_SUBJECT".to_owned(),
        "plain||".to_owned(),
    ];

    // As a group consumer (a stale AGENTBUS_SUBJECT in watch's own environment is
    // not passed on)...
    let mut cmd = watch(dir.path());
    cmd.args(["jobs", "--group", "g", "--max", "3", "--idle-timeout", "5"])
        .args(["--exec", &handler])
        .env("AGENTBUS_SUBJECT", "stale")
        .env("AGENTBUS_OMITTED", "stale");
    let out = common::output_within("watch --group --exec", cmd, HUNG);
    let outcomes: Vec<_> = out.lines().iter().map(|l| l["outcome"].clone()).collect();
    assert_eq!(
        outcomes,
        ["acked", "acked", "acked"],
        "stderr: {}",
        out.stderr
    );
    let subjects = ["a\u{0}b", long.as_str(), "plain"];
    for (i, (subject, env)) in subjects.iter().zip(&expected_env).enumerate() {
        check(i as u64 + 1, subject, env);
    }

    // ... and as a plain follower, which goes on to the next seq.
    std::fs::remove_dir_all(&seen).unwrap();
    std::fs::create_dir(&seen).unwrap();
    let mut cmd = watch(dir.path());
    cmd.args([
        "jobs",
        "--from-seq",
        "1",
        "--max",
        "3",
        "--idle-timeout",
        "5",
    ])
    .args(["--exec", &handler]);
    let out = common::output_within("watch --exec", cmd, HUNG);
    let exits: Vec<_> = out
        .lines()
        .iter()
        .map(|l| (l["seq"].as_u64().unwrap(), l["exit"].as_i64().unwrap()))
        .collect();
    assert_eq!(exits, [(1, 0), (2, 0), (3, 0)], "stderr: {}", out.stderr);
    for (i, (subject, env)) in subjects.iter().zip(&expected_env).enumerate() {
        check(i as u64 + 1, subject, env);
    }
}

#[test]
fn a_handler_that_fills_stderr_before_reading_a_large_message_completes() {
    let dir = tempfile::tempdir().unwrap();
    let (_bus, jobs, _) = common::jobs_group(dir.path(), 0);
    let body = "b".repeat(200 * 1024);
    jobs.send(NewMessage::new("job").body(body.clone()))
        .unwrap();

    // 256 KiB to stderr before it reads a byte of its 200 KiB stdin: both pipes are
    // full at once unless watch writes and reads concurrently.
    let got = dir.path().join("got");
    let handler = format!(
        "head -c 262144 /dev/zero | tr '\\0' e >&2; cat > {}",
        got.display()
    );
    let out = watch_group(dir.path(), "1", &handler, "a handler with full pipes");
    let lines = out.lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["outcome"], "acked", "{}", lines[0]);
    let m: Value = serde_json::from_str(&std::fs::read_to_string(&got).unwrap()).unwrap();
    assert_eq!(m["body"].as_str().map(str::len), Some(body.len()));
    // Its stderr was forwarded whole.
    assert_eq!(out.stderr.matches('e').count(), 262_144);
}

#[test]
fn a_background_job_left_by_the_handler_does_not_hold_watch_up() {
    let dir = tempfile::tempdir().unwrap();
    common::jobs_group(dir.path(), 2);
    // Each handler leaves a job running far longer than the test may take, holding
    // every descriptor the handler had.
    let pids = dir.path().join("pids");
    let handler = format!(
        "cat >/dev/null; sleep 600 & echo $! >> {}; echo started >&2; exit 0",
        pids.display()
    );
    let out = watch_group(dir.path(), "2", &handler, "watch with background jobs");
    let jobs_left: Vec<u32> = std::fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    // They are not watch's to stop: still running, until we end them.
    let running = jobs_left.iter().all(|&p| common::alive(p));
    for &p in &jobs_left {
        let _ = Command::new("kill").arg(p.to_string()).status();
    }
    let outcomes: Vec<_> = out.lines().iter().map(|l| l["outcome"].clone()).collect();
    assert_eq!(outcomes, ["acked", "acked"], "stderr: {}", out.stderr);
    assert_eq!(out.stderr.matches("started").count(), 2, "{}", out.stderr);
    assert!(running, "background jobs are left running");
}

#[test]
fn a_hung_handler_is_killed_with_its_process_group_at_the_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let (bus, jobs) = common::flush_mailbox(dir.path(), "jobs");
    jobs.create_group_with("g", GroupOptions::new().max_deliveries(2))
        .unwrap();
    jobs.send(NewMessage::new("job")).unwrap();
    // The handler and a child of its own both hang; both ignore nothing.
    let pids = dir.path().join("pids");
    let handler = format!(
        "echo $$ >> {p}; sleep 600 & echo $! >> {p}; wait",
        p = pids.display()
    );
    let mut cmd = watch(dir.path());
    cmd.args([
        "jobs",
        "--group",
        "g",
        "--max",
        "2",
        "--handler-timeout",
        "1",
    ])
    .args(["--retry-delay", "0.1", "--exec", &handler]);
    let out = common::output_within("watch with a hung handler", cmd, HUNG);
    let lines = out.lines();
    let summary: Vec<_> = lines
        .iter()
        .map(|l| {
            (
                l["attempt"].as_u64().unwrap(),
                l["outcome"].as_str().unwrap().to_owned(),
                l["timed_out"].as_bool(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            (1, "retried".to_owned(), Some(true)),
            (2, "dead_lettered".to_owned(), Some(true))
        ],
        "stderr: {}",
        out.stderr
    );
    assert!(
        lines[1]["reason"]
            .as_str()
            .unwrap()
            .contains("timed out after 1s"),
        "{}",
        lines[1]
    );
    let pids: Vec<u32> = std::fs::read_to_string(&pids)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 4, "two runs, each a handler and its child");
    common::wait_for("the handlers' process groups to die", HUNG, || {
        pids.iter().all(|&p| !common::alive(p)).then_some(())
    });
    let dead = bus.mailbox("jobs.dlq").unwrap().messages().count();
    assert_eq!(dead, 1);
}

/// Sends `signal` to process `pid` with kill(1).
fn signal(pid: u32, signal: &str) {
    let ok = Command::new("kill")
        .args([&format!("-{signal}"), &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{signal} {pid}");
}

/// Starts `watch` on group `g` of `jobs` running `handler`, with stdout piped and
/// stderr to `errors`.
fn spawn_watch(dir: &Path, handler: &str, errors: &tempfile::NamedTempFile) -> std::process::Child {
    watch(dir)
        .args(["jobs", "--group", "g", "--exec", handler])
        .stdout(Stdio::piped())
        .stderr(errors.reopen().unwrap())
        .spawn()
        .unwrap()
}

#[test]
fn sigterm_finishes_the_message_in_hand_and_a_second_signal_gives_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let (_bus, _jobs, group) = common::jobs_group(dir.path(), 2);
    let started = dir.path().join("started");
    let release = dir.path().join("release");

    // One signal: the running handler is left to finish (it was not signalled), its
    // message is acked, and watch stops without taking the next one.
    // (It also ends when the test's directory is gone, should the test fail first.)
    let handler = format!(
        "cat >/dev/null; echo $$ > {s}; trap 'echo got-term >&2' TERM; \
         while [ ! -e {r} ] && [ -d {d} ]; do sleep 0.05; done",
        s = started.display(),
        r = release.display(),
        d = dir.path().display()
    );
    let errors = tempfile::NamedTempFile::new().unwrap();
    let child = spawn_watch(dir.path(), &handler, &errors);
    common::wait_for("the handler", HUNG, || std::fs::read(&started).ok());
    signal(child.id(), "TERM");
    common::wait_for("the notice", HUNG, || {
        let e = std::fs::read_to_string(errors.path()).unwrap();
        e.contains("finishing the current message").then_some(())
    });
    std::fs::write(&release, "").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = std::fs::read_to_string(errors.path()).unwrap();
    assert!(out.status.success(), "a clean stop: {stderr}");
    assert!(
        !stderr.contains("got-term"),
        "the handler was not signalled: {stderr}"
    );
    let lines = common::json_lines(out.stdout);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(
        (lines[0]["seq"].as_u64(), lines[0]["outcome"].as_str()),
        (Some(1), Some("acked"))
    );
    let st = group.stats().unwrap();
    assert_eq!((st.acked, st.pending, st.in_flight), (1, 1, 0));

    // Two signals: the handler's process group is stopped and the message given back
    // at once (nacked with no delay): the next claim gets it, as attempt 2.
    std::fs::remove_file(&started).unwrap();
    let handler = format!(
        "cat >/dev/null; echo $$ > {s}; sleep 600 & wait",
        s = started.display()
    );
    let errors = tempfile::NamedTempFile::new().unwrap();
    let child = spawn_watch(dir.path(), &handler, &errors);
    let pid: u32 = common::wait_for("the handler", HUNG, || {
        let s = std::fs::read_to_string(&started).ok()?;
        s.trim().parse().ok()
    });
    signal(child.id(), "INT");
    common::wait_for("the notice", HUNG, || {
        let e = std::fs::read_to_string(errors.path()).unwrap();
        e.contains("finishing the current message").then_some(())
    });
    signal(child.id(), "INT");
    let out = child.wait_with_output().unwrap();
    let stderr = std::fs::read_to_string(errors.path()).unwrap();
    assert!(out.status.success(), "a clean stop: {stderr}");
    let line: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (line["seq"].as_u64(), line["outcome"].as_str()),
        (Some(2), Some("given_back")),
        "{line}"
    );
    assert!(
        line["reason"].as_str().unwrap().contains("SIGINT"),
        "{line}"
    );
    common::wait_for("the handler to die", HUNG, || {
        (!common::alive(pid)).then_some(())
    });
    let d = group
        .claim_one("next")
        .unwrap()
        .expect("given back at once");
    assert_eq!((d.seq(), d.attempt), (2, 2));

    // And a watch waiting for messages stops at once on a signal.
    d.ack().unwrap();
    let errors = tempfile::NamedTempFile::new().unwrap();
    let child = spawn_watch(dir.path(), "true", &errors);
    std::thread::sleep(Duration::from_millis(300));
    signal(child.id(), "TERM");
    let mut child = child;
    let status = common::wait_for("watch to stop", HUNG, || child.try_wait().unwrap());
    assert!(status.success(), "{status:?}");
}

#[test]
fn the_readme_alert_recipe_retries_dead_letters_and_its_check_reports() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let alert = root.join("examples/alert.sh");
    let check = root.join("examples/dlq-check.sh");
    for script in [&alert, &check] {
        let text = std::fs::read_to_string(script).unwrap();
        assert!(
            readme.contains(&text),
            "README quotes {} as it is",
            script.display()
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let bus_dir = dir.path().join("bus");
    let setup = |bus: &Path| {
        common::run_ok(bus, ["init"]);
        common::run_ok(bus, ["mailbox", "create", "alerts"]);
    };
    // The README's `group create` line, run as it is: the policy it describes.
    let create = readme
        .lines()
        .find(|l| l.starts_with("agentbus group create alerts pager --max-deliveries"))
        .expect("the recipe creates the group");
    let readme_bus = dir.path().join("readme-bus");
    setup(&readme_bus);
    common::run_ok(&readme_bus, create.split_whitespace().skip(1));
    let listed = common::run_ok(&readme_bus, ["group", "list", "alerts"]);
    assert_eq!(
        (&listed[0]["max_deliveries"], &listed[0]["retry"]),
        (
            &serde_json::json!(5),
            &serde_json::json!({"initial_ms": 30000, "multiplier": 2.0, "max_ms": 600000,
                                "jitter": 0.2, "no_retry_on": ["unauthorized"]})
        )
    );
    // The same group with delays a test can wait for (and no jitter, to check them).
    setup(&bus_dir);
    let fast = create.replace("--backoff 30s,2,10m --jitter 0.2", "--backoff 0.1s,2,1s");
    assert_ne!(fast, create);
    common::run_ok(&bus_dir, fast.split_whitespace().skip(1));
    let send_alert = |subject: &str| {
        let args = ["send", "alerts", "--type", "alert", "--subject", subject];
        common::run_ok(&bus_dir, args);
    };
    send_alert("disk full on db-1");
    common::run_ok(
        &bus_dir,
        ["send", "alerts", "--type", "alert", "--body", "no subject"],
    );
    let spool = dir.path().join("spool");
    let watch_alerts = |max: &str| {
        let mut cmd = watch(&bus_dir);
        cmd.args(["alerts", "--group", "pager", "--exec"])
            .arg(&alert)
            .args(["--handler-timeout", "60", "--max", max])
            .env("ALERT_SPOOL", &spool);
        common::output_within("the alert handler", cmd, HUNG)
    };

    // The pager is down: the alert is retried, the message that is no alert is
    // dead-lettered at once.
    let out = watch_alerts("2");
    let got: Vec<_> = out
        .lines()
        .iter()
        .map(|l| {
            (
                l["seq"].as_u64().unwrap(),
                l["outcome"].as_str().unwrap().to_owned(),
                l["delay_ms"].as_u64(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (1, "retried".into(), Some(100)),
            (2, "dead_lettered".into(), None)
        ],
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("pager spool"), "{}", out.stderr);
    // Back up: the retry pages.
    std::fs::create_dir(&spool).unwrap();
    let out = watch_alerts("1");
    let line = &out.lines()[0];
    assert_eq!(
        (line["seq"].as_u64(), line["attempt"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(line["outcome"], "acked", "{}", out.stderr);
    assert!(
        out.stderr.contains("paged (attempt 2): disk full on db-1"),
        "{}",
        out.stderr
    );
    let paged: Vec<_> = std::fs::read_dir(&spool).unwrap().collect();
    assert_eq!(paged.len(), 1);
    // The pager revokes us: a class the group does not retry, dead-lettered at once.
    std::fs::write(spool.join("REVOKED"), "").unwrap();
    send_alert("db-2 down");
    let out = watch_alerts("1");
    let line = &out.lines()[0];
    assert_eq!(
        (
            line["seq"].as_u64(),
            line["attempt"].as_u64(),
            line["outcome"].as_str()
        ),
        (Some(3), Some(1), Some("dead_lettered")),
        "{}",
        out.stderr
    );

    // The check finds the dead letter, says why, and exits 1.
    let bin = Path::new(env!("CARGO_BIN_EXE_agentbus")).parent().unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let out = Command::new("sh")
        .arg(&check)
        .arg("alerts")
        .env("PATH", path)
        .env("AGENTBUS_DIR", &bus_dir)
        .output()
        .unwrap();
    let report = String::from_utf8(out.stdout).unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        report.trim(),
        "dead letter 1: alerts seq 2: rejected by the consumer: handler refused the \
         message (exit 65): alert 2 has no subject\n\
         dead letter 2: alerts seq 3: not retryable: unauthorized: handler exited with 1: \
         unauthorized: the pager revoked this sender"
    );
}
