//! The README's recipes, run as a script author would run them: the session-start
//! drain in bash and in Python, and a Rust agent sharing a bus with a Python script.
//! Run with the whole suite (`cargo test`), which builds the examples.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{cli, ok};
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Asserts that the README quotes `examples/<name>` (from `from` on) as it is.
fn quoted_as_is(name: &str, from: &str) {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let text = std::fs::read_to_string(root().join("examples").join(name)).unwrap();
    let text = &text[text.find(from).unwrap()..];
    assert!(
        readme.contains(text),
        "README quotes examples/{name} as it is"
    );
}

/// `PATH` with the `agentbus` built for these tests first, as `cargo install` would.
fn path_with_agentbus() -> std::ffi::OsString {
    let bin = Path::new(env!("CARGO_BIN_EXE_agentbus")).parent().unwrap();
    let mut dirs = vec![bin.to_path_buf()];
    dirs.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(dirs).unwrap()
}

/// The (acked, termed, pending) counts of `main`'s group in `agentbus stats`, and the
/// group's whole line.
fn group_counts(bus: &Path) -> ((u64, u64, u64), Value) {
    let stats = ok(cli(bus).args(["stats", "main"]).output().unwrap());
    let g = stats[0]["groups"][0].clone();
    let count = |key: &str| g[key].as_u64().unwrap_or_else(|| panic!("{key} in {g}"));
    (
        (count("acked"), count("termed"), count("pending")),
        g.clone(),
    )
}

/// A script run as agent `agent` on the bus `bus`, in `cwd`.
fn script(program: &str, bus: &Path, agent: &str, cwd: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(cwd)
        .env("PATH", path_with_agentbus())
        .env("AGENTBUS_DIR", bus)
        .env("AGENTBUS_AGENT", agent)
        .env_remove("AGENTBUS_DURABILITY");
    cmd
}

fn succeeded(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what}: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A bus with `main` and its group `reviewers`, holding four messages: one whose
/// artifact is intact, one whose artifact changed after it was sent, one without
/// artifacts, and one whose handling fails (subject `fail`).
fn waiting_work(dir: &Path) -> PathBuf {
    let bus = dir.join("bus");
    ok(cli(&bus).arg("init").output().unwrap());
    ok(cli(&bus)
        .args(["mailbox", "create", "main"])
        .output()
        .unwrap());
    ok(cli(&bus)
        .args(["group", "create", "main", "reviewers"])
        .output()
        .unwrap());
    let (kept, changed) = (dir.join("kept.md"), dir.join("changed.md"));
    std::fs::write(&kept, "chapter one\n").unwrap();
    std::fs::write(&changed, "chapter two\n").unwrap();
    let send = |subject: &str, artifact: Option<&Path>| {
        let mut cmd = cli(&bus);
        cmd.args(["send", "main", "--type", "draft", "--subject", subject]);
        if let Some(a) = artifact {
            cmd.arg("--artifact").arg(a);
        }
        ok(cmd.output().unwrap());
    };
    send("kept", Some(&kept));
    send("changed", Some(&changed));
    send("plain", None);
    send("fail", None);
    std::fs::write(&changed, "chapter two, rewritten\n").unwrap();
    bus
}

/// What the drain left: the group's counters, and each message's fate.
fn assert_drained(bus: &Path) {
    let stats = ok(cli(bus).args(["stats", "main"]).output().unwrap());
    let g = &stats[0]["groups"][0];
    assert_eq!(g["acked"], 2, "{g}");
    assert_eq!(g["termed"], 1, "{g}");
    assert_eq!(g["in_flight"], 0, "{g}");
    // The failed one waits for its retry, five minutes out: not claimable now.
    let again = ok(cli(bus)
        .args(["recv", "main", "--group", "reviewers"])
        .output()
        .unwrap());
    assert!(again.is_empty(), "{again:?}");
    assert_eq!(g["pending"], 1, "{g}");
}

#[test]
fn the_bash_session_start_drain_handles_verifies_and_acks_everything_waiting() {
    quoted_as_is("drain.sh", "#!/bin/sh");
    let dir = tempfile::tempdir().unwrap();
    let bus = waiting_work(dir.path());
    // The handler: notes the message's subject, and fails for `fail`.
    let handler = dir.path().join("review.sh");
    std::fs::write(
        &handler,
        "#!/bin/sh\nsubject=$(jq -r .subject)\necho \"$subject\" >> handled.txt\n\
         [ \"$subject\" != fail ]\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &handler,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut run = script("sh", &bus, "reviewer", dir.path());
    run.arg(root().join("examples/drain.sh"))
        .args(["main", "reviewers"])
        .arg(&handler);
    succeeded("drain.sh", run.output().unwrap());
    let handled = std::fs::read_to_string(dir.path().join("handled.txt")).unwrap();
    assert_eq!(
        handled, "kept\nplain\nfail\n",
        "the changed draft is never handled"
    );
    assert_drained(&bus);
    // The message given up on is the one whose artifact changed.
    let again = ok(cli(&bus)
        .args(["recv", "main", "--from-seq", "2", "--max", "1", "--verify"])
        .output()
        .unwrap());
    assert_eq!(again[0]["verify_error"]["error"], "artifact_size_mismatch");
}

#[test]
fn the_python_session_start_drain_handles_verifies_and_acks_everything_waiting() {
    quoted_as_is("drain.py", "#!/usr/bin/env python3");
    let dir = tempfile::tempdir().unwrap();
    let bus = waiting_work(dir.path());
    // Its `handle` notes every verified message (the subject `fail` means nothing
    // to it: the next test makes handling fail).
    let mut run = script("python3", &bus, "reviewer", dir.path());
    run.arg(root().join("examples/drain.py"))
        .args(["main", "reviewers"]);
    succeeded("drain.py", run.output().unwrap());
    let handled = std::fs::read_to_string(dir.path().join("handled.log")).unwrap();
    let lines: Vec<_> = handled.lines().collect();
    assert_eq!(lines, ["1 kept 12", "3 plain 0", "4 fail 0"], "{handled}");
    let (counts, g) = group_counts(&bus);
    assert_eq!(counts, (3, 1, 0), "acked, termed, pending: {g}");
}

#[test]
fn the_python_drain_gives_a_failed_message_back_for_later() {
    let dir = tempfile::tempdir().unwrap();
    let bus = waiting_work(dir.path());
    // `handle` cannot write its log (a directory stands in its place): every handling
    // fails, and each verified message is given back with the reason.
    std::fs::create_dir(dir.path().join("handled.log")).unwrap();
    let mut run = script("python3", &bus, "reviewer", dir.path());
    run.arg(root().join("examples/drain.py"))
        .args(["main", "reviewers"]);
    succeeded("drain.py", run.output().unwrap());
    let (counts, g) = group_counts(&bus);
    assert_eq!(counts, (0, 1, 3), "acked, termed, pending: {g}");
    assert_eq!(g["in_flight"], 0, "{g}");
}

#[test]
fn a_rust_agent_and_the_python_drain_share_a_bus_through_the_environment() {
    quoted_as_is("review_request.rs", "use agentbus");
    let dir = tempfile::tempdir().unwrap();
    let bus = dir.path().join("bus");
    ok(cli(&bus).arg("init").output().unwrap());
    // target/<profile>/deps/<this test> -> target/<profile>/examples/review_request
    let exe = std::env::current_exe().unwrap();
    let example = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/review_request");
    for _ in 0..2 {
        // Twice: a restarted writer opens what exists.
        let out = script(example.to_str().unwrap(), &bus, "writer", dir.path()).output();
        succeeded(
            "review_request",
            out.expect("the example, built by `cargo test`"),
        );
    }
    let mut run = script("python3", &bus, "reviewer", dir.path());
    run.arg(root().join("examples/drain.py"))
        .args(["reviews", "reviewers"]);
    succeeded("drain.py", run.output().unwrap());
    let handled = std::fs::read_to_string(dir.path().join("handled.log")).unwrap();
    assert_eq!(handled, "1 chapter 3 0\n2 chapter 3 0\n");
    let sent = ok(cli(&bus).args(["recv", "reviews"]).output().unwrap());
    let from: Vec<&Value> = sent.iter().map(|m| &m["from"]).collect();
    assert_eq!(from, [&Value::from("writer"), &Value::from("writer")]);
}

#[test]
fn the_readme_rust_snippets_read_cleanly_on_github() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let mut blocks = 0;
    for block in readme.split("```rust").skip(1) {
        let code = &block[..block.find("```").unwrap()];
        let lines: Vec<&str> = code.lines().skip(1).collect();
        let hidden = lines
            .iter()
            .filter(|l| l.trim_start().starts_with("# "))
            .count();
        assert!(hidden <= 5, "at most five hidden lines:\n{code}");
        for line in lines.iter().filter(|l| !l.trim_start().starts_with('#')) {
            // `?` works on every error a snippet meets: no `.unwrap()` needed.
            assert!(
                !line.contains(".unwrap()") && !line.contains(".expect("),
                "{line}"
            );
            // A string literal is on one line: none is still open at its end.
            assert!(!open_string_at_end(line), "{line}");
        }
        blocks += 1;
    }
    assert!(blocks >= 6, "{blocks} Rust snippets");
}

/// Whether a line of Rust ends inside a string literal (comments after `//` aside).
fn open_string_at_end(line: &str) -> bool {
    let (mut in_string, mut chars) = (false, line.chars().peekable());
    while let Some(c) = chars.next() {
        match c {
            '\\' if in_string => {
                chars.next();
            }
            '"' => in_string = !in_string,
            '/' if !in_string && chars.peek() == Some(&'/') => break,
            _ => {}
        }
    }
    in_string
}
