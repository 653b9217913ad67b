//! FIFOs and devices planted where a bus keeps its files. Opening a FIFO for reading
//! blocks until someone writes to it, so a command that opens one the ordinary way
//! hangs forever. Every command here must instead refuse at once with the typed error
//! `unsafe_file` naming the path (or, for `doctor`, report it as a problem).
//!
//! Each command runs as a real `agentbus` process, killed (and the test failed) if it
//! has not finished within [`BOUND`].

mod common;

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use agentbus::NewMessage;

/// Far longer than any of these commands takes on a loaded machine; a command still
/// running then is hung on the planted file.
const BOUND: Duration = Duration::from_secs(20);

const SEGMENT: &str = "mailboxes/main/log/00000000000000000001.jsonl";

/// A bus with every kind of file in place: a mailbox with a keyed message (so the key
/// index and its watermark exist), a group that has claimed it (state file and
/// checkpoint), and a lease that was granted and released.
fn bus() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bus");
    let bus = common::flush_bus(&root);
    let mb = bus.create_mailbox("main").unwrap();
    mb.send(NewMessage::new("t").idempotency_key("k")).unwrap();
    let group = mb.create_group("g").unwrap();
    assert_eq!(group.claim("c", 1).unwrap().len(), 1);
    bus.lease("res").try_acquire().unwrap().release().unwrap();
    for file in [
        "agentbus.json",
        "mailboxes/main/mailbox.json",
        "mailboxes/main/lock",
        SEGMENT,
        "mailboxes/main/keys/scanned",
        "mailboxes/main/groups/g/group.json",
        "mailboxes/main/groups/g/checkpoint.json",
        "mailboxes/main/groups/g/state.0.jsonl",
        "leases/res.jsonl",
    ] {
        assert!(root.join(file).is_file(), "{file} should exist");
    }
    (dir, root)
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).unwrap()
}

/// Replaces the file at `path` with a FIFO.
fn plant_fifo(path: &Path) {
    std::fs::remove_file(path).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c_path(path).as_ptr(), 0o600) }, 0);
}

/// Replaces the file at `path` with a character device like `/dev/null` (1, 3).
fn plant_device(path: &Path) {
    std::fs::remove_file(path).unwrap();
    let dev = libc::makedev(1, 3);
    let rc = unsafe { libc::mknod(c_path(path).as_ptr(), libc::S_IFCHR | 0o600, dev) };
    assert_eq!(rc, 0, "mknod needs CAP_MKNOD (the suite runs as root)");
}

/// Runs `cmd`, failing the test if it does not finish within [`BOUND`].
fn bounded(cmd: Command) -> Output {
    common::output_bounded(cmd, BOUND)
}

/// The error object a failed command printed on stderr.
fn error_of(out: &Output) -> serde_json::Value {
    assert!(!out.status.success(), "expected a failure: {out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    serde_json::from_str(stderr.trim()).unwrap_or_else(|e| panic!("{stderr:?}: {e}"))
}

/// With a FIFO planted at `file` of a new [`bus`], each of `commands` fails at once
/// with `unsafe_file` about it.
fn fifo_refused_by(file: &str, commands: &[&[&str]]) {
    let (_d, root) = bus();
    plant_fifo(&root.join(file));
    for args in commands {
        refused(&root, file, args);
    }
}

/// `args` on the bus at `root` fail at once with `unsafe_file` about `file`.
fn refused(root: &Path, file: &str, args: &[&str]) {
    let out = bounded({
        let mut cmd = common::cli(root);
        cmd.args(args);
        cmd
    });
    let err = error_of(&out);
    assert_eq!(err["error"], "unsafe_file", "{args:?} on {file}: {err}");
    assert_eq!(err["path"], root.join(file).to_str().unwrap(), "{err}");
}

const SEND: &[&str] = &["send", "main", "--type", "t"];
const KEYED_SEND: &[&str] = &["send", "main", "--type", "t", "--idempotency-key", "k2"];
const RECV: &[&str] = &["recv", "main"];
const CLAIM: &[&str] = &["recv", "main", "--group", "g"];
const ACQUIRE: &[&str] = &["lease", "acquire", "res", "--holder", "h", "--ttl", "5"];

#[test]
fn a_fifo_at_the_marker_is_refused() {
    fifo_refused_by("agentbus.json", &[RECV, &["stats"]]);
}

#[test]
fn a_fifo_at_mailbox_metadata_or_lock_is_refused() {
    for file in ["mailboxes/main/mailbox.json", "mailboxes/main/lock"] {
        fifo_refused_by(file, &[SEND, RECV]);
    }
}

#[test]
fn a_fifo_segment_is_refused_by_writers_readers_and_stats() {
    fifo_refused_by(SEGMENT, &[SEND, RECV, &["stats"], &["doctor"]]);
}

#[test]
fn a_fifo_key_watermark_is_refused_by_a_keyed_send() {
    fifo_refused_by("mailboxes/main/keys/scanned", &[KEYED_SEND]);
}

#[test]
fn a_fifo_in_a_group_is_refused() {
    for file in [
        "mailboxes/main/groups/g/group.json",
        "mailboxes/main/groups/g/checkpoint.json",
        "mailboxes/main/groups/g/state.0.jsonl",
    ] {
        fifo_refused_by(file, &[CLAIM]);
    }
}

#[test]
fn a_fifo_lease_file_is_refused() {
    fifo_refused_by("leases/res.jsonl", &[ACQUIRE, &["lease", "show", "res"]]);
}

#[test]
fn doctor_reports_a_fifo_in_the_key_index_without_reading_it() {
    let (_d, root) = bus();
    let keys = root.join("mailboxes/main/keys");
    let bucket = std::fs::read_dir(&keys)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .unwrap();
    plant_fifo(&bucket);
    let out = bounded({
        let mut cmd = common::cli(&root);
        cmd.arg("doctor");
        cmd
    });
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(bucket.to_str().unwrap()) && stdout.contains("FIFO"),
        "{stdout}"
    );
}

#[test]
fn devices_are_refused() {
    let (_d, root) = bus();
    plant_device(&root.join(SEGMENT));
    refused(&root, SEGMENT, SEND);
    refused(&root, SEGMENT, RECV);
    plant_device(&root.join("agentbus.json"));
    refused(&root, "agentbus.json", RECV);
}
