//! Name validation: nothing escapes the bus directory, bad names create nothing.

mod common;

use agentbus::{validate_name, Bus, Error, NewMessage};

const BAD: &[&str] = &[
    "../x", "a/b", "", ".hidden", "..", "a\u{7}b", "a\nb", "a b", "-lead", "é",
];

fn long_name() -> String {
    "a".repeat(200)
}

fn entries(path: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(path)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn bad_mailbox_names_are_rejected_and_create_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::init(dir.path().join("bus")).unwrap();
    bus.create_mailbox("main").unwrap();
    let outside_before = entries(dir.path());
    let inside_before = entries(&dir.path().join("bus/mailboxes"));

    let long = long_name();
    for name in BAD.iter().copied().chain([long.as_str()]) {
        for result in [
            bus.create_mailbox(name).map(|_| ()),
            bus.mailbox(name).map(|_| ()),
        ] {
            match result {
                Err(Error::InvalidName { kind, name: n, .. }) => {
                    assert_eq!((kind, n.as_str()), ("mailbox", name));
                }
                other => panic!("{name:?}: expected InvalidName, got {other:?}"),
            }
        }
    }
    assert_eq!(entries(dir.path()), outside_before);
    assert_eq!(entries(&dir.path().join("bus/mailboxes")), inside_before);
}

#[test]
fn bad_agent_and_type_names_are_rejected_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::init(dir.path()).unwrap();
    let mb = bus.create_mailbox("main").unwrap();
    for bad in ["../x", "a/b", ""] {
        let e = mb.send(NewMessage::new("t").from(bad)).unwrap_err();
        assert!(
            matches!(e, Error::InvalidName { kind: "agent", .. }),
            "{e:?}"
        );
        let e = mb.send(NewMessage::new(bad)).unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidName {
                    kind: "message type",
                    ..
                }
            ),
            "{e:?}"
        );
    }
    assert!(matches!(
        Bus::builder().agent("a/b").open(dir.path()),
        Err(Error::InvalidName { kind: "agent", .. })
    ));
    assert_eq!(mb.messages().count(), 0);
}

#[test]
fn good_names_are_accepted() {
    for name in ["a", "main", "project.tasks", "A-1_b.c", &"z".repeat(128)] {
        validate_name("mailbox", name).unwrap();
    }
    assert!(validate_name("mailbox", &"z".repeat(129)).is_err());
}

#[test]
fn cli_rejects_bad_names_with_exit_2_and_a_json_error() {
    let dir = tempfile::tempdir().unwrap();
    assert!(common::cli(dir.path())
        .arg("init")
        .status()
        .unwrap()
        .success());
    let before = entries(&dir.path().join("mailboxes"));
    for name in ["../x", "a/b", ".hidden"] {
        let out = common::cli(dir.path())
            .args(["mailbox", "create", name])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
        assert_eq!(err["error"], "invalid_name");
        assert!(out.stdout.is_empty());
    }
    assert_eq!(entries(&dir.path().join("mailboxes")), before);
}
