//! Hostile directory contents: symlinks planted where bus files should be, files
//! replaced by directories. Each gives a typed error, nothing outside the bus is
//! touched, and nothing already stored is lost.

mod common;

use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::time::Duration;

use agentbus::{Bus, Error, NewMessage};

struct Setup {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    victim: std::path::PathBuf,
    bus: Bus,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bus");
    let bus = common::flush_bus(&root);
    let main = bus.create_mailbox("main").unwrap();
    main.send(NewMessage::new("t").body("precious message"))
        .unwrap();
    let victim = dir.path().join("victim.txt");
    std::fs::write(&victim, "outside the bus").unwrap();
    Setup {
        _dir: dir,
        root,
        victim,
        bus,
    }
}

impl Setup {
    /// The victim file is untouched and the stored message is still there.
    fn intact(&self) {
        assert_eq!(
            std::fs::read_to_string(&self.victim).unwrap(),
            "outside the bus"
        );
        let first = common::first_message(&self.bus, "main");
        assert_eq!(first.body.as_deref(), Some("precious message"));
    }

    fn replace_with_symlink(&self, path: &std::path::Path) {
        let _ = std::fs::remove_file(path);
        symlink(&self.victim, path).unwrap();
    }
}

/// The typed refusal of a path that is not a plain file or directory of the bus.
fn is_unsafe(e: &Error) -> bool {
    e.code() == "unsafe_file"
}

/// Asserts that `result` is that refusal.
fn assert_unsafe<T: std::fmt::Debug>(result: agentbus::Result<T>) {
    let e = result.unwrap_err();
    assert!(is_unsafe(&e), "{e:?}");
}

#[test]
fn a_symlinked_lock_file_is_refused() {
    let s = setup();
    s.replace_with_symlink(&s.root.join("mailboxes/main/lock"));
    assert_unsafe(s.bus.mailbox("main"));
    s.replace_with_symlink(&s.root.join("mailboxes/main/lock"));
    std::fs::remove_file(s.root.join("mailboxes/main/lock")).unwrap();
    s.intact();
}

#[test]
fn a_symlinked_key_bucket_is_refused() {
    let s = setup();
    let mb = s.bus.mailbox("main").unwrap();
    mb.send(NewMessage::new("t").idempotency_key("k")).unwrap();
    let bucket = std::fs::read_dir(s.root.join("mailboxes/main/keys"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .unwrap();
    s.replace_with_symlink(&bucket);
    assert_unsafe(mb.send(NewMessage::new("t").idempotency_key("k")));
    // Doctor reports it and, repairing, cuts nothing through it (the victim has no
    // newline: read through the link, all of it would look like a torn tail).
    let report = s.bus.doctor(true).unwrap();
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.path == bucket && !p.repaired),
        "{:?}",
        report.problems
    );
    s.intact();
}

#[test]
fn a_segment_replaced_by_a_directory_is_an_error_for_writers_and_readers() {
    let s = setup();
    let seg = s.root.join("mailboxes/main/log/00000000000000000001.jsonl");
    let saved = std::fs::read(&seg).unwrap();
    std::fs::remove_file(&seg).unwrap();
    std::fs::create_dir(&seg).unwrap();
    let fresh = Bus::open(&s.root).unwrap().mailbox("main").unwrap();
    assert!(is_unsafe(&fresh.send(NewMessage::new("t")).unwrap_err()));
    assert!(fresh.messages().next().unwrap().is_err());
    // Put it back: nothing was lost.
    std::fs::remove_dir(&seg).unwrap();
    std::fs::write(&seg, saved).unwrap();
    s.intact();
}

#[test]
fn symlinked_group_and_lease_files_are_refused() {
    let s = setup();
    let mb = s.bus.mailbox("main").unwrap();
    let outside = s.victim.parent().unwrap().join("outside-group");
    std::fs::create_dir(&outside).unwrap();
    std::fs::create_dir_all(s.root.join("mailboxes/main/groups")).unwrap();
    symlink(&outside, s.root.join("mailboxes/main/groups/evil")).unwrap();
    assert!(is_unsafe(&mb.group("evil").unwrap_err()));
    assert!(!mb.groups().unwrap().contains(&"evil".to_owned()));

    s.bus.lease("res").try_acquire().unwrap().release().unwrap();
    s.replace_with_symlink(&s.root.join("leases/res.jsonl"));
    assert_unsafe(s.bus.lease("res").ttl(Duration::from_secs(1)).try_acquire());
    assert!(
        std::fs::read_dir(&outside).unwrap().next().is_none(),
        "wrote outside the bus"
    );
    s.intact();
}

#[test]
fn a_marker_or_metadata_file_replaced_by_garbage_is_reported() {
    let s = setup();
    std::fs::write(s.root.join("mailboxes/main/mailbox.json"), "{not json").unwrap();
    match s.bus.mailbox("main") {
        Err(Error::Corrupt { path, .. }) => assert!(path.ends_with("mailbox.json")),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    std::fs::write(s.root.join("agentbus.json"), "[]").unwrap();
    assert!(matches!(Bus::open(&s.root), Err(Error::Corrupt { .. })));
    assert_eq!(
        std::fs::read_to_string(&s.victim).unwrap(),
        "outside the bus"
    );
}

/// A directory of the bus moved outside it and replaced by a symlink to where it went.
/// Returns the moved directory.
fn move_out_and_link(s: &Setup, inner: &str) -> std::path::PathBuf {
    let inside = s.root.join(inner);
    let outside = s
        .victim
        .with_file_name(format!("moved-{}", inner.replace('/', "-")));
    std::fs::rename(&inside, &outside).unwrap();
    symlink(&outside, &inside).unwrap();
    outside
}

/// Files with their contents.
type Snapshot = Vec<(PathBuf, Vec<u8>)>;

/// Every file below `dir`, with its contents, sorted.
fn snapshot(dir: &std::path::Path) -> Snapshot {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(snapshot(&path));
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out.sort();
    out
}

/// A handle on `main` opened (and its directories checked, nothing cached yet) before
/// `inner` of it is moved out and linked ([`move_out_and_link`]); the moved directory
/// and what it held.
fn opened_before_the_swap(s: &Setup, inner: &str) -> (agentbus::Mailbox, PathBuf, Snapshot) {
    let early = Bus::open(&s.root).unwrap().mailbox("main").unwrap();
    let outside = move_out_and_link(s, &format!("mailboxes/main/{inner}"));
    let before = snapshot(&outside);
    (early, outside, before)
}

#[test]
fn a_symlinked_log_directory_is_refused_even_under_an_open_handle() {
    let s = setup();
    let (early, outside, before) = opened_before_the_swap(&s, "log");

    assert_unsafe(early.send(NewMessage::new("t").body("lands outside")));
    assert!(early.messages().next().unwrap().is_err());
    assert_unsafe(Bus::open(&s.root).unwrap().mailbox("main"));
    assert_eq!(snapshot(&outside), before, "wrote outside the bus");
}

#[test]
fn a_symlinked_key_directory_is_refused() {
    let s = setup();
    let (early, outside, before) = opened_before_the_swap(&s, "keys");
    assert_unsafe(early.send(NewMessage::new("t").idempotency_key("k")));
    assert_eq!(snapshot(&outside), before, "wrote outside the bus");
}

#[test]
fn a_symlinked_lease_directory_is_refused() {
    let s = setup();
    s.bus.lease("res").try_acquire().unwrap().release().unwrap();
    let outside = move_out_and_link(&s, "leases");
    let before = snapshot(&outside);
    assert_unsafe(s.bus.lease("res").try_acquire());
    assert_unsafe(s.bus.lease("other").try_acquire());
    assert_eq!(snapshot(&outside), before, "wrote outside the bus");
}

#[test]
fn a_group_directory_swapped_for_a_symlink_under_an_open_handle_is_refused() {
    let s = setup();
    let mb = s.bus.mailbox("main").unwrap();
    let group = mb.create_group("g").unwrap();
    mb.send(NewMessage::new("t")).unwrap();
    assert_eq!(group.claim("c", 1).unwrap().len(), 1);
    // A copy of the group outside the bus takes its place.
    let inside = s.root.join("mailboxes/main/groups/g");
    let outside = s.victim.with_file_name("outside-group");
    std::fs::create_dir(&outside).unwrap();
    for entry in std::fs::read_dir(&inside).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), outside.join(entry.file_name())).unwrap();
    }
    std::fs::remove_dir_all(&inside).unwrap();
    symlink(&outside, &inside).unwrap();
    let before = snapshot(&outside);

    assert_unsafe(group.claim("c", 1));
    assert_unsafe(mb.group("g"));
    // The groups directory itself, too.
    let groups = s.root.join("mailboxes/main/groups");
    std::fs::remove_file(&inside).unwrap();
    let moved = s.victim.with_file_name("outside-groups");
    std::fs::rename(&groups, &moved).unwrap();
    symlink(&moved, &groups).unwrap();
    assert_unsafe(mb.create_group("h"));
    assert!(std::fs::read_dir(&moved).unwrap().all(|e| {
        let name = e.unwrap().file_name();
        name == ".lock"
    }));
    assert_eq!(snapshot(&outside), before, "wrote outside the bus");
}

/// Replaces the bus file at `path` by a hard link to an outside file holding
/// `contents`; returns the outside file.
fn hard_link_outside(s: &Setup, path: &std::path::Path, contents: &[u8]) -> std::path::PathBuf {
    let outside = s.victim.with_file_name("linked-outside");
    std::fs::write(&outside, contents).unwrap();
    std::fs::remove_file(path).unwrap();
    std::fs::hard_link(&outside, path).unwrap();
    outside
}

#[test]
fn a_hard_linked_segment_is_never_appended_to_or_truncated() {
    let s = setup();
    let seg = s.root.join("mailboxes/main/log/00000000000000000001.jsonl");
    let mut contents = std::fs::read(&seg).unwrap();
    // A torn tail: a writer would cut it, doctor --repair too.
    contents.extend_from_slice(b"{\"crc\":\"00000000\",\"seq\":2,");
    let outside = hard_link_outside(&s, &seg, &contents);

    let fresh = Bus::open(&s.root).unwrap().mailbox("main").unwrap();
    let e = fresh.send(NewMessage::new("t")).unwrap_err();
    assert!(
        is_unsafe(&e) && e.to_string().contains("has 2 hard links"),
        "{e:?}"
    );
    assert!(fresh.messages().next().unwrap().is_err());
    let _ = Bus::open(&s.root).unwrap().doctor(true);
    assert_eq!(
        std::fs::read(&outside).unwrap(),
        contents,
        "changed a file outside the bus"
    );
}

#[test]
fn a_hard_linked_lease_file_is_refused() {
    let s = setup();
    s.bus.lease("res").try_acquire().unwrap().release().unwrap();
    let path = s.root.join("leases/res.jsonl");
    let contents = std::fs::read(&path).unwrap();
    let outside = hard_link_outside(&s, &path, &contents);
    assert_unsafe(s.bus.lease("res").try_acquire());
    assert_eq!(
        std::fs::read(&outside).unwrap(),
        contents,
        "changed a file outside the bus"
    );
}
