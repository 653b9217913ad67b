//! The examples are real programs: run each (as `cargo test` built it) and check that
//! it did what it says, starting with the README demonstration. Run this file with the
//! whole suite (`cargo test`), which builds the examples; `cargo test --test examples`
//! alone does not rebuild them.

use std::path::PathBuf;
use std::process::Command;

fn example(name: &str) -> Command {
    // target/<profile>/deps/<this test> -> target/<profile>/examples/<name>
    let exe = std::env::current_exe().unwrap();
    let dir: PathBuf = exe.parent().unwrap().parent().unwrap().join("examples");
    Command::new(dir.join(name))
}

fn run(name: &str) -> String {
    run_command(name, &mut example(name))
}

/// Runs `cmd` (an example with its arguments), asserts that it succeeded, and returns
/// what it printed.
fn run_command(name: &str, cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run example {name}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{name} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn the_demo_hands_a_verified_draft_and_its_lease_from_writer_to_watcher() {
    let out = run("demo");
    for expected in [
        "[watcher] woke on handoff seq 1 from writer",
        "[watcher] verified 1 artifact(s)",
        "[writer]  watcher accepted; lease chapter-1 now held by watcher with token 2",
        "lease chapter-1 held by watcher with token 2",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
}

/// The lines of `text` with each temporary directory (`<TMPDIR>/.tmpXXXXXX`) written
/// `<tmp>`, sorted: the two processes' lines may interleave either way.
fn normalized(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text
        .lines()
        .map(|l| match l.find("/.tmp") {
            Some(at) => {
                let start = l[..at].rfind(' ').map_or(0, |s| s + 1);
                let end = l[at + 5..].find('/').map_or(l.len(), |e| at + 5 + e);
                format!("{}<tmp>{}", &l[..start], &l[end..])
            }
            None => l.to_owned(),
        })
        .collect();
    lines.sort();
    lines
}

#[test]
fn the_readme_shows_what_the_demo_prints() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let at = readme
        .find("What `cargo run --example demo` prints")
        .unwrap();
    let start = readme[at..].find("```text\n").unwrap() + at + 8;
    let end = readme[start..].find("```").unwrap() + start;
    let shown = &readme[start..end];
    let out = run("demo");
    assert_eq!(
        normalized(shown),
        normalized(&out),
        "README:\n{shown}\nrun:\n{out}"
    );
}

#[test]
fn two_writers_lose_nothing() {
    let out = run("two_writers");
    assert!(out.contains(r#"{"auditor": 50, "drafter": 50}"#), "{out}");
    assert!(out.contains("acked 100, pending 0"), "{out}");
}

#[test]
fn lease_workers_write_with_strictly_increasing_tokens() {
    let out = run("lease_worker");
    let tokens: Vec<u64> = out
        .lines()
        .filter_map(|l| {
            l.strip_prefix("token ")?
                .split(':')
                .next()?
                .trim()
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(tokens, (1..=9).collect::<Vec<_>>(), "{out}");
}

#[test]
fn the_pipeline_resumes_from_phase_one_state() {
    let out = run("pipeline");
    assert!(
        out.contains("[phase2] resuming at item 6 with 5 results carried over"),
        "{out}"
    );
    assert!(out.contains("accepted = true"), "{out}");
}

/// The README's "Scaling out": the same writer → watcher handoff, as two processes,
/// through NATS JetStream instead of a directory.
#[test]
fn the_demo_runs_through_jetstream() {
    let Ok(url) = std::env::var("AGENTBUS_NATS_URL") else {
        eprintln!("skipped: AGENTBUS_NATS_URL is not set (see README, Scaling out)");
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let bus = format!("{url}/demo-{}", std::process::id());
    let stdout = run_command("demo", example("demo").arg(&bus).current_dir(work.path()));
    for expected in [
        "[watcher] woke on handoff seq 1 from writer",
        "[watcher] verified 1 artifact(s)",
        "[writer]  watcher accepted; lease chapter-1 now held by watcher",
        "lease chapter-1 held by watcher",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
    assert!(work.path().join("chapter-1.md").exists());
}
