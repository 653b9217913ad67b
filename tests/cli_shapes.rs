//! One consistent CLI: one identity flag, one JSON shape per object, `--durability`
//! only where something is written, usage errors for people and for scripts, and
//! read-only commands that leave the bus exactly as they found it.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{cli, fails, ok};
use serde_json::Value;

/// The keys of one JSON object line, in the order they are written.
fn keys(line: &str) -> Vec<String> {
    struct Keys;
    impl<'de> serde::de::Visitor<'de> for Keys {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut keys = Vec::new();
            while let Some((k, _)) = map.next_entry::<String, serde::de::IgnoredAny>()? {
                keys.push(k);
            }
            Ok(keys)
        }
    }
    use serde::Deserializer;
    serde_json::Deserializer::from_str(line)
        .deserialize_map(Keys)
        .unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

/// The lines a successful run printed, as text.
fn text_lines(out: Output) -> Vec<String> {
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    ok(out);
    stdout.lines().map(str::to_owned).collect()
}

fn bus() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    ok(cli(dir.path()).arg("init").output().unwrap());
    dir
}

/// A new [`bus`] with the mailboxes `mailboxes` and a group of `jobs` made by `group
/// create jobs GROUP...`.
fn bus_with_group(mailboxes: &[&str], group: &[&str]) -> tempfile::TempDir {
    let dir = bus();
    ok(run(
        dir.path(),
        None,
        &[&["mailbox", "create"], mailboxes].concat(),
    ));
    ok(run(
        dir.path(),
        None,
        &[&["group", "create", "jobs"], group].concat(),
    ));
    dir
}

/// `handoff send bob` from `agent`, carrying its lease `lease` (at `token`).
fn hand_lease_to_bob(d: &Path, agent: &str, lease: &str, token: &str) -> Vec<Value> {
    let args = ["--summary", "s", "--lease", lease, "--token", token];
    ok(run(
        d,
        Some(agent),
        &[&["handoff", "send", "bob"][..], &args].concat(),
    ))
}

/// `agentbus --dir DIR ARGS...`, as `agent` when given.
fn run(dir: &Path, agent: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = cli(dir);
    if let Some(a) = agent {
        cmd.env("AGENTBUS_AGENT", a);
    }
    cmd.args(args).output().unwrap()
}

fn is_rfc3339(v: &Value) -> bool {
    v.as_str().is_some_and(|s| {
        time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
            .is_ok_and(|t| t.offset().is_utc())
    })
}

/// The verbs and sub-verbs, as `--help` takes them.
const VERBS: &[&[&str]] = &[
    &["init"],
    &["mailbox", "create"],
    &["mailbox", "list"],
    &["send"],
    &["recv"],
    &["watch"],
    &["ack"],
    &["nack"],
    &["extend"],
    &["term"],
    &["group", "create"],
    &["group", "list"],
    &["group", "requeue"],
    &["stats"],
    &["compact"],
    &["replay"],
    &["lease", "acquire"],
    &["lease", "renew"],
    &["lease", "release"],
    &["lease", "show"],
    &["lease", "list"],
    &["kv", "create"],
    &["kv", "put"],
    &["kv", "get"],
    &["kv", "del"],
    &["kv", "keys"],
    &["kv", "history"],
    &["handoff", "send"],
    &["handoff", "recv"],
    &["handoff", "show"],
    &["handoff", "verify"],
    &["handoff", "accept"],
    &["handoff", "reject"],
    &["verify"],
    &["doctor"],
];

/// The verbs that only read: they take no `--durability` and create nothing.
const READ_ONLY: &[&[&str]] = &[
    &["mailbox", "list"],
    &["group", "list"],
    &["stats"],
    &["lease", "show"],
    &["lease", "list"],
    &["kv", "get"],
    &["kv", "keys"],
    &["kv", "history"],
    &["handoff", "show"],
    &["handoff", "verify"],
    &["verify"],
];

fn help(verb: &[&str]) -> String {
    let out = cli(Path::new("."))
        .args(verb)
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success(), "{verb:?} --help");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_help_page_shows_the_identity_flag_and_only_writers_show_durability() {
    for verb in VERBS {
        let page = help(verb);
        assert!(page.contains("--agent <AGENT>"), "{verb:?}:\n{page}");
        assert!(page.contains("AGENTBUS_AGENT"), "{verb:?}:\n{page}");
        let writes = !READ_ONLY.contains(verb);
        assert_eq!(page.contains("--durability"), writes, "{verb:?}:\n{page}");
    }
    // A reader refuses the flag (the environment variable is harmless everywhere).
    let dir = bus();
    let refused = fails(
        run(dir.path(), None, &["stats", "--durability", "flush"]),
        2,
    );
    assert!(refused["message"]
        .as_str()
        .unwrap()
        .contains("--durability"));
    let env_ok = cli(dir.path())
        .env("AGENTBUS_DURABILITY", "flush")
        .arg("stats")
        .output()
        .unwrap();
    ok(env_ok);
    ok(run(
        dir.path(),
        None,
        &["mailbox", "create", "jobs", "--durability", "flush"],
    ));
}

#[test]
fn one_identity_names_the_sender_the_consumer_the_holder_and_the_handoff_answerer() {
    let dir = bus_with_group(&["jobs", "bob"], &["g"]);
    let d = dir.path();

    // `--agent` and AGENTBUS_AGENT are one identity; `--from` overrides it for one send.
    ok(run(
        d,
        None,
        &["--agent", "alice", "send", "jobs", "--type", "t"],
    ));
    ok(run(d, Some("alice"), &["send", "jobs", "--type", "t"]));
    ok(run(
        d,
        Some("alice"),
        &["send", "jobs", "--type", "t", "--from", "carol"],
    ));
    let senders: Vec<_> = ok(run(d, None, &["recv", "jobs"]))
        .iter()
        .map(|m| m["from"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(senders, ["alice", "alice", "carol"]);

    let claimed = ok(run(d, Some("worker-7"), &["recv", "jobs", "--group", "g"]));
    assert_eq!(claimed[0]["delivery"]["consumer"], "worker-7");

    let lease = ok(run(
        d,
        None,
        &[
            "--agent", "alice", "lease", "acquire", "chapter", "--ttl", "60",
        ],
    ));
    assert_eq!(lease[0]["holder"], "alice");
    let token = lease[0]["token"].as_u64().unwrap().to_string();

    // A handoff from alice to bob, taken and accepted by bob in two processes: the
    // lease moves to bob, not to a made-up `cli`.
    hand_lease_to_bob(d, "alice", "chapter", &token);
    let taken = ok(run(d, Some("bob"), &["handoff", "recv", "bob"]));
    let seq = taken[0]["seq"].as_u64().unwrap().to_string();
    let accepted = ok(run(
        d,
        None,
        &[
            "--agent", "bob", "handoff", "accept", "bob", &seq, "--ttl", "120",
        ],
    ));
    assert_eq!(accepted[0]["lease"]["holder"], "bob", "{accepted:?}");
    let shown = ok(run(d, None, &["lease", "show", "chapter"]));
    assert_eq!(shown[0]["holder"], "bob");
    assert_eq!(shown[0], accepted[0]["lease"]);

    // Without an identity, answering a handoff is a usage error that says what to do,
    // and nothing is answered.
    ok(run(
        d,
        Some("alice"),
        &["handoff", "send", "bob", "--summary", "second"],
    ));
    let second = ok(run(d, Some("bob"), &["handoff", "recv", "bob"]));
    let seq = second[0]["seq"].as_u64().unwrap().to_string();
    let anonymous = fails(
        run(
            d,
            None,
            &["handoff", "reject", "bob", &seq, "--reason", "no"],
        ),
        2,
    );
    assert!(
        anonymous["message"].as_str().unwrap().contains("--agent"),
        "{anonymous}"
    );
    // The agent that took it rejects it from another process.
    let rejected = ok(run(
        d,
        Some("bob"),
        &["handoff", "reject", "bob", &seq, "--reason", "no"],
    ));
    assert_eq!(rejected[0]["rejected"], true);
    let answers = ok(run(
        d,
        None,
        &["recv", "alice", "--type", "handoff.rejected"],
    ));
    assert_eq!(answers.len(), 1);
    assert_eq!(answers[0]["from"], "bob");
}

#[test]
fn a_lease_has_one_shape_in_acquire_renew_show_and_list() {
    let dir = bus();
    let d = dir.path();
    let never = text_lines(run(d, None, &["lease", "show", "nothing"]));
    let acquired = text_lines(run(d, Some("a"), &["lease", "acquire", "l", "--ttl", "60"]));
    let token: Value = serde_json::from_str(&acquired[0]).unwrap();
    let token = token["token"].to_string();
    let renewed = text_lines(run(
        d,
        Some("a"),
        &["lease", "renew", "l", "--token", &token, "--ttl", "90"],
    ));
    let shown = text_lines(run(d, None, &["lease", "show", "l"]));
    let listed = text_lines(run(d, None, &["lease", "list"]));
    let expected = [
        "name",
        "holder",
        "token",
        "acquired_at",
        "expires_at",
        "renewals",
        "process_bound",
    ];
    for line in [&never[0], &acquired[0], &renewed[0], &shown[0], &listed[0]] {
        assert_eq!(keys(line), expected, "{line}");
    }
    let never: Value = serde_json::from_str(&never[0]).unwrap();
    assert_eq!(never["token"], 0);
    assert!(never["holder"].is_null() && never["expires_at"].is_null());
    let shown: Value = serde_json::from_str(&shown[0]).unwrap();
    assert_eq!(shown["renewals"], 1);
    assert!(is_rfc3339(&shown["acquired_at"]) && is_rfc3339(&shown["expires_at"]));
    assert_eq!(shown, serde_json::from_str::<Value>(&listed[0]).unwrap());
}

/// The keys every message line starts with, in order.
const MESSAGE_KEYS: &[&str] = &[
    "seq",
    "id",
    "ts",
    "from",
    "type",
    "subject",
    "body",
    "payload",
    "artifacts",
    "correlation_id",
    "causation_id",
    "idempotency_key",
    "priority",
    "headers",
    "dead_letter",
];

#[test]
fn a_message_has_one_shape_in_recv_claims_watch_handlers_and_handoffs() {
    let dir = bus_with_group(&["jobs", "bob"], &["g"]);
    let d = dir.path();
    ok(run(d, Some("a"), &["send", "jobs", "--type", "bare"]));
    ok(run(
        d,
        Some("a"),
        &["handoff", "send", "bob", "--summary", "s"],
    ));
    let stdin_copy = d.join("handler-stdin.json");
    let handler = format!("cat > '{}'", stdin_copy.display());

    let shapes: Vec<(&str, Vec<String>)> = vec![
        ("recv", text_lines(run(d, None, &["recv", "jobs"]))),
        (
            "recv --verify",
            text_lines(run(d, None, &["recv", "jobs", "--verify"])),
        ),
        (
            "watch",
            text_lines(run(
                d,
                None,
                &["watch", "jobs", "--from-seq", "1", "--max", "1"],
            )),
        ),
        (
            "handoff show",
            text_lines(run(d, None, &["handoff", "show", "bob", "1"])),
        ),
        (
            "handoff recv",
            text_lines(run(d, Some("b"), &["handoff", "recv", "bob"])),
        ),
        (
            "recv --group",
            text_lines(run(d, Some("w"), &["recv", "jobs", "--group", "g"])),
        ),
    ];
    for (what, lines) in &shapes {
        assert_eq!(lines.len(), 1, "{what}: {lines:?}");
        let k = keys(&lines[0]);
        assert_eq!(
            &k[..MESSAGE_KEYS.len()],
            MESSAGE_KEYS,
            "{what}: {}",
            lines[0]
        );
        let m: Value = serde_json::from_str(&lines[0]).unwrap();
        // Optional keys are there, empty: `m["artifacts"]` never raises.
        assert_eq!(m["artifacts"], serde_json::json!([]), "{what}");
        assert_eq!(m["headers"], serde_json::json!({}), "{what}");
        assert!(is_rfc3339(&m["ts"]), "{what}");
    }
    let claim: Value = serde_json::from_str(&shapes[5].1[0]).unwrap();
    assert!(is_rfc3339(&claim["delivery"]["deadline"]));
    assert_eq!(claim["subject"], Value::Null);
    // A watch --exec handler reads the same shape on its stdin.
    ok(run(d, Some("w"), &["nack", "jobs", "--group", "g", "1"]));
    ok(run(
        d,
        Some("w"),
        &[
            "watch", "jobs", "--group", "g", "--max", "1", "--exec", &handler,
        ],
    ));
    let given = std::fs::read_to_string(&stdin_copy).unwrap();
    assert_eq!(&keys(&given)[..MESSAGE_KEYS.len()], MESSAGE_KEYS, "{given}");
}

#[test]
fn dead_letters_print_their_history_with_rfc3339_times() {
    let dir = bus_with_group(&["jobs"], &["g", "--max-deliveries", "1"]);
    let d = dir.path();
    ok(run(d, None, &["send", "jobs", "--type", "t"]));
    ok(run(d, Some("w"), &["recv", "jobs", "--group", "g"]));
    ok(run(
        d,
        Some("w"),
        &["nack", "jobs", "--group", "g", "1", "--reason", "broken"],
    ));
    let dead = ok(run(d, None, &["recv", "jobs.dlq"]));
    let info = &dead[0]["dead_letter"];
    assert_eq!(info["mailbox"], "jobs");
    assert_eq!(info["seq"], 1);
    let attempt = &info["attempts"][0];
    assert_eq!(attempt["consumer"], "w");
    assert_eq!(attempt["reason"], "broken");
    assert!(is_rfc3339(&attempt["at"]), "{attempt}");
    // The header stays as written, for outside readers.
    assert!(dead[0]["headers"]["dead_letter"].is_string());
    // Durations carry their unit in their key.
    let groups = ok(run(d, None, &["group", "list", "jobs"]));
    assert_eq!(groups[0]["visibility_ms"], 30_000);
    assert!(groups[0].get("visibility").is_none());
}

#[test]
fn verify_checks_any_message_and_recv_verify_marks_each() {
    let dir = bus();
    let d = dir.path();
    ok(run(d, None, &["mailbox", "create", "jobs"]));
    let file = d.join("report.txt");
    std::fs::write(&file, "all good\n").unwrap();
    let file = file.to_str().unwrap();
    ok(run(
        d,
        None,
        &["send", "jobs", "--type", "t", "--artifact", file],
    ));
    ok(run(d, None, &["send", "jobs", "--type", "t"]));

    let fine = ok(run(d, None, &["verify", "jobs", "1"]));
    assert_eq!(fine[0]["verified"], true);
    assert_eq!(fine[0]["artifacts"], 1);
    let marked = ok(run(d, None, &["recv", "jobs", "--verify"]));
    assert_eq!(
        (marked[0]["verified"].clone(), marked[1]["verified"].clone()),
        (true.into(), true.into())
    );
    assert!(marked[0]["verify_error"].is_null());

    std::fs::write(file, "all good, said nobody\n").unwrap();
    let changed = fails(run(d, None, &["verify", "jobs", "1"]), 6);
    assert_eq!(changed["error"], "artifact_size_mismatch");
    let marked = ok(run(d, None, &["recv", "jobs", "--verify"]));
    assert_eq!(marked[0]["verified"], false);
    assert_eq!(marked[0]["verify_error"]["error"], "artifact_size_mismatch");
    assert_eq!(
        marked[1]["verified"], true,
        "no artifacts: nothing to differ"
    );
    fails(run(d, None, &["verify", "jobs", "9"]), 2);
}

#[test]
fn not_type_passes_every_other_type_in_recv_watch_and_groups() {
    let dir = bus_with_group(&["jobs"], &["quiet", "--not-type", "alert"]);
    let d = dir.path();
    for kind in ["task", "alert", "added.later"] {
        ok(run(d, None, &["send", "jobs", "--type", kind]));
    }
    let types = |lines: Vec<Value>| -> Vec<String> {
        lines
            .iter()
            .map(|m| m["type"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        types(ok(run(d, None, &["recv", "jobs", "--not-type", "alert"]))),
        ["task", "added.later"]
    );
    assert_eq!(
        types(ok(run(
            d,
            None,
            &[
                "watch",
                "jobs",
                "--from-seq",
                "1",
                "--not-type",
                "alert",
                "--max",
                "2"
            ]
        ))),
        ["task", "added.later"]
    );
    assert_eq!(
        types(ok(run(
            d,
            Some("w"),
            &["recv", "jobs", "--group", "quiet", "--max", "10"]
        ))),
        ["task", "added.later"]
    );
    fails(
        run(
            d,
            None,
            &["recv", "jobs", "--group", "quiet", "--not-type", "x"],
        ),
        2,
    );
}

#[test]
fn recv_help_says_what_max_means_in_each_mode() {
    let page = help(&["recv"]);
    let max = page.split("--max").nth(1).unwrap();
    assert!(max.contains("Without `--group`"), "{page}");
    assert!(
        max.contains("With `--group`: claim at most N (default 1"),
        "{page}"
    );
}

#[test]
fn usage_errors_are_text_on_a_terminal_and_json_otherwise() {
    let dir = bus();
    // Not a terminal: one JSON object, and its usage line does not show the global
    // `--dir` (given here from the environment) as if it were required.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentbus"))
        .env("AGENTBUS_DIR", dir.path())
        .args(["send", "jobs"])
        .output()
        .unwrap();
    let err = fails(out, 2);
    let message = err["message"].as_str().unwrap();
    let usage = message.lines().find(|l| l.starts_with("Usage:")).unwrap();
    assert_eq!(usage, "Usage: agentbus send --type <KIND> <MAILBOX>");

    // A terminal (script(1) gives the command one): clap's text, with its line breaks.
    let command = format!(
        "AGENTBUS_DIR='{}' '{}' send jobs",
        dir.path().display(),
        env!("CARGO_BIN_EXE_agentbus")
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output()
        .expect("script(1), from util-linux");
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(
        screen.contains("error: the following required arguments"),
        "{screen}"
    );
    assert!(
        screen.contains("\nUsage: agentbus send --type <KIND> <MAILBOX>"),
        "{screen}"
    );
    assert!(!screen.contains("{\"error\""), "{screen}");
}

/// Every path below `root` with its size and modification time.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, (u64, std::time::SystemTime)> {
    let mut all = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                todo.push(entry.path());
            }
            let rel = entry.path().strip_prefix(root).unwrap().to_path_buf();
            all.insert(rel, (meta.len(), meta.modified().unwrap()));
        }
    }
    all
}

/// A bus that every writing command has touched.
fn busy_bus() -> tempfile::TempDir {
    let dir = bus_with_group(&["jobs", "bob"], &["g", "--max-deliveries", "1"]);
    let d = dir.path();
    let file = d.join("notes.txt");
    std::fs::write(&file, "notes\n").unwrap();
    let file = file.to_str().unwrap();
    ok(run(
        d,
        Some("a"),
        &[
            "send",
            "jobs",
            "--type",
            "t",
            "--idempotency-key",
            "k",
            "--artifact",
            file,
            "--durability",
            "flush",
        ],
    ));
    ok(run(d, Some("a"), &["send", "jobs", "--type", "t"]));
    ok(run(
        d,
        Some("w"),
        &["recv", "jobs", "--group", "g", "--max", "2"],
    ));
    ok(run(d, Some("w"), &["ack", "jobs", "--group", "g", "1"]));
    ok(run(d, Some("w"), &["nack", "jobs", "--group", "g", "2"]));
    let lease = ok(run(d, Some("a"), &["lease", "acquire", "l", "--ttl", "60"]));
    let token = lease[0]["token"].to_string();
    hand_lease_to_bob(d, "a", "l", &token);
    ok(run(d, Some("b"), &["handoff", "recv", "bob"]));
    ok(run(d, Some("b"), &["handoff", "accept", "bob", "1"]));
    ok(run(d, None, &["kv", "create", "state"]));
    ok(run(
        d,
        None,
        &["kv", "put", "state", "phase1/out", "{\"n\":1}"],
    ));
    ok(run(d, None, &["kv", "put", "state", "gone", "true"]));
    ok(run(d, None, &["kv", "del", "state", "gone"]));
    ok(run(d, None, &["compact"]));
    ok(run(d, None, &["doctor"]));
    dir
}

#[test]
fn read_only_commands_create_and_change_nothing() {
    let dir = busy_bus();
    let d = dir.path();
    let before = snapshot(d);
    let reads: &[&[&str]] = &[
        &["mailbox", "list"],
        &["group", "list", "jobs"],
        &["stats"],
        &["recv", "jobs"],
        &["recv", "jobs", "--verify"],
        &["recv", "jobs.dlq"],
        &["lease", "show", "nothing"],
        &["lease", "show", "l"],
        &["lease", "list"],
        &["kv", "get", "state", "phase1/out"],
        &["kv", "get", "state", "never"],
        &["kv", "get", "state", "gone"],
        &["kv", "keys", "state", "--prefix", "phase1/"],
        &["kv", "history", "state", "gone"],
        &["handoff", "show", "bob", "1"],
        &["handoff", "verify", "bob", "1"],
        &["verify", "jobs", "1"],
        &["doctor"],
    ];
    for args in reads {
        ok(run(d, Some("reader"), args));
        assert_eq!(snapshot(d), before, "{args:?} changed the bus");
    }
}

/// What FORMAT.md's layout says for each kind of file agentbus creates, and how to
/// tell a path of that kind.
fn documented(rel: &str) -> Option<&'static str> {
    let parts: Vec<&str> = rel.split('/').collect();
    Some(match parts.as_slice() {
        ["agentbus.json"] => "agentbus.json",
        ["notes.txt"] => return Some(""), // the test's own artifact
        ["mailboxes"] => "mailboxes/<name>/",
        ["mailboxes", _] => "mailboxes/<name>/",
        ["mailboxes", _, "mailbox.json"] => "mailbox.json",
        ["mailboxes", _, "lock"] => "lock                        the flock target for appends",
        ["mailboxes", _, "reserved"] => "reserved ",
        ["mailboxes", _, "log"] => "log/<first-seq>.jsonl",
        ["mailboxes", _, "log", f] if f.len() == 26 && f.ends_with(".jsonl") => {
            "log/<first-seq>.jsonl"
        }
        ["mailboxes", _, "keys"] => "keys/<hh>.jsonl",
        ["mailboxes", _, "keys", "scanned"] => "keys/scanned",
        ["mailboxes", _, "keys", "lost.jsonl"] => "keys/lost.jsonl",
        ["mailboxes", _, "keys", f] if f.len() == 8 && f.ends_with(".jsonl") => "keys/<hh>.jsonl",
        ["mailboxes", _, "groups"] => "groups/<group>/",
        ["mailboxes", _, "groups", ".lock"] => "groups/.lock",
        ["mailboxes", _, "groups", _] => "groups/<group>/",
        ["mailboxes", _, "groups", _, "group.json"] => "group.json ",
        ["mailboxes", _, "groups", _, "lock"] => {
            "lock                flock target for every state change"
        }
        ["mailboxes", _, "groups", _, "checkpoint.json"] => "checkpoint.json ",
        ["mailboxes", _, "groups", _, f] if f.starts_with("state.") && f.ends_with(".jsonl") => {
            "state.<G>.jsonl"
        }
        ["leases"] => "leases/<name>.jsonl",
        ["leases", f] if f.ends_with(".jsonl") => "leases/<name>.jsonl",
        ["leases", f] if f.ends_with(".lock") => "leases/<name>.lock",
        ["leases", f] if f.ends_with(".alive") => "leases/<name>.<token>.alive",
        ["kv"] | ["kv", _] => "kv/<bucket>/",
        ["kv", _, "bucket.json"] => "bucket.json ",
        ["kv", _, "log.jsonl"] => "log.jsonl ",
        ["kv", _, "lock"] => "lock                        the flock target for every write",
        _ => return None,
    })
}

#[test]
fn every_file_the_bus_creates_is_in_format_md() {
    let format =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/FORMAT.md")).unwrap();
    let dir = busy_bus();
    let files = snapshot(dir.path());
    // The mailboxes a handoff and a group create on their own are there too.
    for made in ["jobs.dlq", "bob.dlq", "a"] {
        assert!(
            files.contains_key(Path::new("mailboxes").join(made).as_path()),
            "{made}"
        );
    }
    for rel in files.keys() {
        let rel = rel.to_str().unwrap();
        let doc = documented(rel).unwrap_or_else(|| panic!("{rel}: FORMAT.md does not list it"));
        assert!(format.contains(doc), "{rel}: FORMAT.md lacks {doc:?}");
    }
}
