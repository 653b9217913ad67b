//! Paths that are not UTF-8 (any byte string is a Unix path): the CLI accepts them
//! where a path is only opened (`--dir`, `--body-file`), refuses them with a typed
//! error where the path would have to be stored as JSON text (`--artifact`), and never
//! panics. Paths it prints are shown with U+FFFD for the bytes JSON cannot hold.

mod common;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{fails, ok, run_fails, run_ok};

/// `parent/<name bytes>`, a path with a byte that is not UTF-8.
fn raw(parent: &Path, name: &[u8]) -> PathBuf {
    parent.join(OsStr::from_bytes(name))
}

/// `agentbus send main --type t <flag> <path>` on the bus at `dir`.
fn send_naming(dir: &Path, flag: &str, path: &Path) -> Output {
    common::cli(dir)
        .args(["send", "main", "--type", "t", flag])
        .arg(path)
        .output()
        .unwrap()
}

#[test]
fn a_bus_directory_whose_name_is_not_utf8_works_and_prints_json() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = raw(tmp.path(), b"bus\xff");
    let init = run_ok(&dir, ["init"]);
    let shown = init[0]["init"].as_str().unwrap();
    assert!(shown.ends_with("bus\u{fffd}"), "{shown}");
    run_ok(&dir, ["mailbox", "create", "main"]);
    run_ok(&dir, ["send", "main", "--type", "t", "--body", "hello"]);
    let read = run_ok(&dir, ["recv", "main"]);
    assert_eq!(read[0]["body"], "hello");
    let doctor = run_ok(&dir, ["doctor"]);
    assert_eq!(doctor[0]["doctor"], "clean");

    // Errors that name a path inside it are JSON too.
    let missing = raw(tmp.path(), b"no-bus\xfe");
    let e = run_fails(&missing, ["stats"], 2);
    assert_eq!(e["error"], "not_a_bus");
    assert!(
        e["path"].as_str().unwrap().ends_with("no-bus\u{fffd}"),
        "{e}"
    );

    // Compaction prints the paths of the segments it removed.
    let small = raw(tmp.path(), b"small\xff");
    let bus = agentbus::Bus::builder()
        .segment_bytes(1)
        .init(&small)
        .unwrap();
    let mb = bus.create_mailbox("main").unwrap();
    for _ in 0..3 {
        mb.send(agentbus::NewMessage::new("t")).unwrap();
    }
    let compacted = run_ok(&small, ["compact", "main", "--retention", "0"]);
    let removed = compacted[0]["removed"].as_array().unwrap();
    assert_eq!(removed.len(), 2, "{compacted:?}");
    assert!(removed[0].as_str().unwrap().contains("small\u{fffd}"));
    // The same key order as before: the report's field order.
    let line = String::from_utf8(
        common::cli(&small)
            .args(["compact", "main"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert!(
        line.starts_with(r#"{"mailbox":"main","floor":null,"removed":[]"#),
        "{line}"
    );
}

#[test]
fn a_body_file_whose_name_is_not_utf8_is_read_or_reported() {
    let dir = common::cli_bus(&["main"]);
    let send = |path: &Path| send_naming(dir.path(), "--body-file", path);

    let body = raw(dir.path(), b"body\xfe.txt");
    std::fs::write(&body, "from a Latin-1 name").unwrap();
    assert_eq!(ok(send(&body))[0]["seq"], 1);

    let e = fails(send(&raw(dir.path(), b"gone\xfe.txt")), 1);
    assert_eq!(e["error"], "io");
    assert!(
        e["path"].as_str().unwrap().ends_with("gone\u{fffd}.txt"),
        "{e}"
    );

    // A body that is not UTF-8 text is invalid input, not an I/O failure.
    let binary = dir.path().join("binary.bin");
    std::fs::write(&binary, b"\xff\xfe\x00").unwrap();
    let e = fails(send(&binary), 2);
    assert_eq!(e["error"], "invalid_message");
    assert!(e["message"].as_str().unwrap().contains("UTF-8"), "{e}");

    let read = run_ok(dir.path(), ["recv", "main"]);
    assert_eq!(read.len(), 1);
    assert_eq!(read[0]["body"], "from a Latin-1 name");
}

#[test]
fn an_artifact_whose_name_is_not_utf8_is_refused_before_anything_is_written() {
    let dir = common::cli_bus(&["main"]);
    let send = |path: &Path| send_naming(dir.path(), "--artifact", path);

    let e = fails(send(&raw(dir.path(), b"gone\xff.md")), 6);
    assert_eq!(e["error"], "artifact_missing");
    assert!(
        e["path"].as_str().unwrap().ends_with("gone\u{fffd}.md"),
        "{e}"
    );

    // Present, but FORMAT.md stores artifact paths as JSON text, which cannot hold it.
    let named = raw(dir.path(), b"draft\xff.md");
    std::fs::write(&named, "# draft\n").unwrap();
    let e = fails(send(&named), 2);
    assert_eq!(e["error"], "invalid_message");
    assert!(e["message"].as_str().unwrap().contains("UTF-8"), "{e}");

    let e = fails(
        common::cli(dir.path())
            .args(["handoff", "send", "main", "--from", "w", "--summary", "s"])
            .arg("--artifact")
            .arg(&named)
            .output()
            .unwrap(),
        2,
    );
    assert_eq!(e["error"], "invalid_message");

    let read = run_ok(dir.path(), ["recv", "main"]);
    assert!(read.is_empty(), "{read:?}");
    let lib = agentbus::Artifact::capture(&named).unwrap_err();
    assert!(matches!(lib, agentbus::Error::InvalidMessage(_)), "{lib:?}");
}
