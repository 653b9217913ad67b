//! A group's retry policy through the CLI, as real processes: `group create --backoff
//! --jitter --no-retry-on` and what `group list` shows, `nack` without `--delay`, and
//! `watch --exec` retrying a failing handler with growing delays (measured between
//! the handler's runs) and dead-lettering a class the policy does not retry. The
//! library's side, on both backends: `tests/backends/retry.rs`.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

/// How long any one `watch` run may take before it counts as hung.
const HUNG: Duration = Duration::from_secs(60);

fn run(dir: &Path, args: &[&str]) -> Vec<Value> {
    common::ok(common::cli(dir).args(args).output().unwrap())
}

/// `recv --group w`: claims up to `max` messages, waiting up to `wait` seconds.
fn claim(dir: &Path, max: &str, wait: &str) -> Vec<Value> {
    let args = [
        "recv",
        "jobs",
        "--group",
        "w",
        "--consumer",
        "c",
        "--max",
        max,
        "--wait",
        wait,
    ];
    run(dir, &args)
}

/// `nack jobs --group w ARGS...`.
fn nack(dir: &Path, args: &[&str]) -> Vec<Value> {
    run(dir, &[&["nack", "jobs", "--group", "w"], args].concat())
}

/// A scratch directory holding a bus (`bus`) with mailbox `jobs` and its group `w`,
/// created with `group_args`.
fn bus_with(group_args: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let bus = dir.path().join("bus");
    run(&bus, &["init"]);
    run(&bus, &["mailbox", "create", "jobs"]);
    let mut args = vec!["group", "create", "jobs", "w"];
    args.extend(group_args.split_whitespace());
    run(&bus, &args);
    (dir, bus)
}

#[test]
fn group_create_stores_the_policy_and_group_list_shows_it() {
    let (_dir, bus) = bus_with(
        "--backoff 1s,2,30s --jitter 0.2 --no-retry-on unauthorized --no-retry-on invalid_payload",
    );
    run(
        &bus,
        &[
            "group",
            "create",
            "jobs",
            "slow",
            "--backoff",
            "250ms, 1.5, 2m",
        ],
    );
    run(&bus, &["group", "create", "jobs", "plain"]);
    let listed = run(&bus, &["group", "list", "jobs"]);
    let retry: Vec<_> = listed
        .iter()
        .map(|g| (g["group"].clone(), g["retry"].clone()))
        .collect();
    assert_eq!(
        retry,
        [
            (json!("plain"), Value::Null),
            (
                json!("slow"),
                json!({"initial_ms": 250, "multiplier": 1.5, "max_ms": 120000, "jitter": 0.0,
                       "no_retry_on": []})
            ),
            (
                json!("w"),
                json!({"initial_ms": 1000, "multiplier": 2.0, "max_ms": 30000, "jitter": 0.2,
                       "no_retry_on": ["invalid_payload", "unauthorized"]})
            ),
        ]
    );
    // The library reads back what the CLI stored.
    let group = agentbus::Bus::open(&bus)
        .unwrap()
        .mailbox("jobs")
        .unwrap()
        .group("w")
        .unwrap();
    let policy = group.retry_policy().unwrap();
    assert_eq!(
        (policy.initial_delay(), policy.max_delay()),
        (Duration::from_secs(1), Duration::from_secs(30))
    );

    // Settings that cannot work: typed errors (exit 2) that name the setting; a
    // malformed --backoff or --jitter without one is a usage error; nothing is created.
    let e = common::fails(
        common::cli(&bus)
            .args(["group", "create", "jobs", "x", "--backoff", "1s,0.5,30s"])
            .output()
            .unwrap(),
        2,
    );
    assert_eq!(e["error"], "invalid_setting", "{e}");
    assert!(
        e["message"].as_str().unwrap().contains("retry.multiplier"),
        "{e}"
    );
    let e = common::fails(
        common::cli(&bus)
            .args(["group", "create", "jobs", "x", "--backoff", "30s,2,1s"])
            .output()
            .unwrap(),
        2,
    );
    assert!(e["message"].as_str().unwrap().contains("retry.max"), "{e}");
    for bad in ["1s,2", "1x,2,3s", "1s,two,3s", "-1s,2,3s"] {
        let e = common::fails(
            common::cli(&bus)
                .args(["group", "create", "jobs", "x", &format!("--backoff={bad}")])
                .output()
                .unwrap(),
            2,
        );
        assert_eq!(e["error"], "usage", "{bad}: {e}");
        assert!(
            e["message"]
                .as_str()
                .unwrap()
                .contains("INITIAL,MULTIPLIER,MAX"),
            "{e}"
        );
    }
    let out = common::cli(&bus)
        .args(["group", "create", "jobs", "x", "--jitter", "0.2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(run(&bus, &["group", "list", "jobs"]).len(), 3);
}

#[test]
fn nack_without_a_delay_uses_the_policy_and_a_class_not_retried_dead_letters() {
    let (_dir, bus) = bus_with("--backoff 3s,2,10s --no-retry-on invalid_payload");
    for _ in 0..3 {
        run(&bus, &["send", "jobs", "--type", "job"]);
    }
    let claimed = claim(&bus, "3", "0");
    assert_eq!(claimed.len(), 3);

    let line = nack(&bus, &["1", "--attempt", "1", "--reason", "timeout: slow"]);
    assert_eq!(line, [json!({"seq": 1, "nacked": true, "delay_ms": 3000})]);
    let line = nack(&bus, &["2", "--reason", "invalid_payload: not JSON"]);
    assert_eq!(
        line,
        [json!({"seq": 2, "nacked": true, "dead_lettered": true,
                "reason": "not retryable: invalid_payload: not JSON"})]
    );
    // An explicit delay is kept as it is (and prints as before).
    let line = nack(&bus, &["3", "--delay", "0"]);
    assert_eq!(line, [json!({"seq": 3, "nacked": true})]);

    let dead = run(&bus, &["recv", "jobs.dlq"]);
    assert_eq!(dead.len(), 1);
    let info: Value =
        serde_json::from_str(dead[0]["headers"]["dead_letter"].as_str().unwrap()).unwrap();
    assert_eq!(
        (info["seq"].as_u64(), info["reason"].as_str()),
        (Some(2), Some("not retryable: invalid_payload: not JSON"))
    );

    // 3 is back at once; 1 only after its 3 s.
    let again = claim(&bus, "5", "0");
    let seqs: Vec<_> = again.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, [3], "1 waits for its delay");
    let again = claim(&bus, "1", "10");
    assert_eq!(
        (
            again[0]["seq"].as_u64(),
            again[0]["delivery"]["attempt"].as_u64()
        ),
        (Some(1), Some(2))
    );
}

/// Where the handler of the test below logs each run: `seq attempt nanoseconds`.
fn runs(log: &Path) -> Vec<(u64, u64, u128)> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

#[test]
fn watch_exec_retries_a_failing_handler_with_growing_delays_and_dead_letters_a_class_not_retried() {
    let (dir, bus) =
        bus_with("--backoff 0.2s,2,0.8s --max-deliveries 5 --no-retry-on invalid_payload");
    run(&bus, &["send", "jobs", "--type", "flaky"]);
    run(&bus, &["send", "jobs", "--type", "bad"]);
    let log = dir.path().join("runs.log");
    let handler = format!(
        r#"echo "$AGENTBUS_SEQ $AGENTBUS_ATTEMPT $(date +%s%N)" >> {log}; cat >/dev/null
case $AGENTBUS_TYPE in
  flaky) echo "some detail"; echo "timeout: the pager is slow" >&2; exit 1 ;;
  bad) echo "invalid_payload: no subject" >&2; exit 1 ;;
esac"#,
        log = log.display()
    );
    let mut cmd = common::cli(&bus);
    cmd.args([
        "watch", "jobs", "--group", "w", "--exec", &handler, "--max", "6",
    ]);
    let out = common::output_within("watch", cmd, HUNG);
    assert!(out.status.success(), "{}", out.stderr);
    let lines = out.lines();
    let flaky: Vec<_> = lines.iter().filter(|l| l["seq"] == 1).collect();
    let outcomes: Vec<_> = flaky
        .iter()
        .map(|l| {
            (
                l["attempt"].as_u64().unwrap(),
                l["outcome"].as_str().unwrap(),
                l["delay_ms"].as_u64(),
            )
        })
        .collect();
    assert_eq!(
        outcomes,
        [
            (1, "retried", Some(200)),
            (2, "retried", Some(400)),
            (3, "retried", Some(800)),
            (4, "retried", Some(800)),
            (5, "dead_lettered", None),
        ],
        "{}",
        out.stderr
    );
    assert_eq!(
        flaky[0]["reason"],
        "timeout: handler exited with 1: timeout: the pager is slow"
    );
    assert_eq!(
        flaky[4]["reason"],
        "max deliveries (5) reached: timeout: handler exited with 1: timeout: the pager is slow"
    );
    let bad: Vec<_> = lines.iter().filter(|l| l["seq"] == 2).collect();
    assert_eq!(bad.len(), 1, "not retried: {lines:?}");
    assert_eq!(
        (bad[0]["attempt"].as_u64(), bad[0]["outcome"].as_str()),
        (Some(1), Some("dead_lettered"))
    );
    assert_eq!(
        bad[0]["reason"],
        "not retryable: invalid_payload: handler exited with 1: invalid_payload: no subject"
    );
    assert_eq!(bad[0]["dead_letter"], "jobs.dlq");

    // The handler's runs of seq 1 are at least each delay apart (a few ms for the
    // clock), and the gaps grow until the cap.
    let starts: Vec<u128> = runs(&log)
        .into_iter()
        .filter(|r| r.0 == 1)
        .map(|r| r.2)
        .collect();
    assert_eq!(starts.len(), 5);
    let gaps: Vec<u128> = starts
        .windows(2)
        .map(|w| (w[1] - w[0]) / 1_000_000)
        .collect();
    for (gap, delay) in gaps.iter().zip([200, 400, 800, 800]) {
        assert!(*gap + 5 >= delay, "gaps {gaps:?} ms");
        assert!(*gap < delay + 5_000, "gaps {gaps:?} ms");
    }
    assert!(gaps[1] > gaps[0] && gaps[2] > gaps[1], "gaps {gaps:?} ms");
    let dead = run(&bus, &["recv", "jobs.dlq"]);
    assert_eq!(dead.len(), 2);

    // --retry-delay still sets the delay, whatever the policy says.
    run(&bus, &["send", "jobs", "--type", "flaky"]);
    let mut cmd = common::cli(&bus);
    cmd.args([
        "watch",
        "jobs",
        "--group",
        "w",
        "--exec",
        &handler,
        "--max",
        "1",
        "--retry-delay",
        "0.05",
    ]);
    let out = common::output_within("watch", cmd, HUNG);
    let line = &out.lines()[0];
    assert_eq!(
        (
            line["seq"].as_u64(),
            line["outcome"].as_str(),
            line["delay_ms"].as_u64()
        ),
        (Some(3), Some("retried"), Some(50))
    );
    assert_eq!(
        line["reason"], "handler exited with 1: timeout: the pager is slow",
        "no class in front"
    );
}
