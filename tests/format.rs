//! The outside-writer examples in FORMAT.md, run for real: their records must read back
//! through the library, interleave correctly with library writers, and torn tails must
//! be handled as FORMAT.md says.

mod common;

use std::process::{Command, Output};

use agentbus::{Bus, NewMessage};

/// The code block of FORMAT.md in language `lang` whose first line is
/// `# outside-writer`.
fn example(lang: &str) -> String {
    let format = include_str!("../FORMAT.md");
    let open = format!("```{lang}\n");
    let block = format!("{open}# outside-writer\n");
    let start = format
        .find(&block)
        .unwrap_or_else(|| panic!("no {lang} example"))
        + open.len();
    let len = format[start..].find("\n```").unwrap();
    format[start..start + len + 1].to_owned()
}

fn run(lang: &str, bus: &std::path::Path) -> Output {
    let (program, flag) = match lang {
        "bash" => ("bash", "-c"),
        "python" => ("python3", "-c"),
        _ => unreachable!(),
    };
    Command::new(program)
        .arg(flag)
        .arg(example(lang))
        .env("AGENTBUS_DIR", bus)
        .env("MAILBOX", "main")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "example failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn shell_and_python_examples_write_records_the_library_reads() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::init(dir.path()).unwrap();
    let mb = bus.create_mailbox("main").unwrap();

    // Into an empty mailbox first: the seq comes from the segment name.
    assert_ok(&run("bash", dir.path()));
    mb.send(NewMessage::new("note").from("rust-agent")).unwrap();
    let py = run("python", dir.path());
    assert_ok(&py);
    assert_eq!(String::from_utf8_lossy(&py.stdout).trim(), "3");
    assert_eq!(
        mb.send(NewMessage::new("note").from("rust-agent"))
            .unwrap()
            .seq,
        4
    );
    assert_ok(&run("bash", dir.path()));

    let messages: Vec<_> = mb.messages().collect::<agentbus::Result<_>>().unwrap();
    let summary: Vec<(u64, &str)> = messages.iter().map(|m| (m.seq, m.from.as_str())).collect();
    assert_eq!(
        summary,
        [
            (1, "shell-agent"),
            (2, "rust-agent"),
            (3, "python-agent"),
            (4, "rust-agent"),
            (5, "shell-agent")
        ]
    );
    assert_eq!(
        messages[0].body.as_deref(),
        Some("written by a shell script")
    );
    assert_eq!(messages[2].payload, Some(serde_json::json!({"ok": true})));
    assert!(bus.doctor(false).unwrap().problems.is_empty());
}

#[test]
fn outside_writers_and_library_writers_interleave_without_gaps() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::segmented_bus(dir.path(), 2048);
    let mb = bus.create_mailbox("main").unwrap();
    std::thread::scope(|s| {
        for lang in ["bash", "bash", "python"] {
            let path = dir.path();
            s.spawn(move || {
                for _ in 0..15 {
                    assert_ok(&run(lang, path));
                }
            });
        }
        s.spawn(|| {
            for i in 0..100 {
                mb.send(NewMessage::new("note").body(i.to_string()))
                    .unwrap();
            }
        });
    });
    let seqs: Vec<u64> = mb.messages().map(|m| m.unwrap().seq).collect();
    assert_eq!(seqs, (1..=145).collect::<Vec<_>>());
    assert!(bus.doctor(false).unwrap().problems.is_empty());
}

#[test]
fn outside_writers_handle_a_torn_tail_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::init(dir.path()).unwrap();
    let mb = bus.create_mailbox("main").unwrap();
    mb.send(NewMessage::new("note")).unwrap();
    let seg = common::first_segment(dir.path(), "main");
    let good = std::fs::read(&seg).unwrap();
    let mut torn = good.clone();
    torn.extend_from_slice(b"{\"seq\":2,\"id\":\"half");
    std::fs::write(&seg, &torn).unwrap();

    // The shell example refuses and writes nothing...
    let out = run("bash", dir.path());
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("torn tail"));
    assert_eq!(std::fs::read(&seg).unwrap(), torn);

    // ...the Python example cuts the torn record and appends after it.
    assert_ok(&run("python", dir.path()));
    let kinds: Vec<_> = mb.messages().map(|m| m.unwrap().from).collect();
    assert_eq!(kinds, ["anonymous", "python-agent"]);
    assert!(bus.doctor(false).unwrap().problems.is_empty());
}
