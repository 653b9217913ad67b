//! Only its owner's bus: a directory squatted by another user, files planted by one,
//! and modes wider than the bus's sharing mode are refused; what root creates in a
//! user's bus stays usable by that user.
//!
//! These tests need root (to act as other users, with `setuid` in the child); run
//! without it, each says so and returns.

mod common;

use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The user the bus belongs to, and another one (neither needs a passwd entry).
const OWNER: u32 = 65534;
const OTHER: u32 = 65533;
/// A group both of them are in, for a shared bus.
const TEAM: u32 = 65532;

struct Place {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    exe: PathBuf,
}

/// A world-traversable place with a copy of the CLI every user can run, or `None`
/// (with the reason printed) when this process cannot act as other users.
fn place() -> Option<Place> {
    if rustix::process::geteuid().as_raw() != 0 {
        eprintln!("skipped: acting as other users needs root");
        return None;
    }
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_owned();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    let exe = root.join("agentbus");
    std::fs::copy(env!("CARGO_BIN_EXE_agentbus"), &exe).unwrap();
    std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
    Some(Place {
        _tmp: tmp,
        root,
        exe,
    })
}

impl Place {
    /// `agentbus --dir BUS ARGS` as `uid` (root when `None`).
    fn run(&self, uid: Option<u32>, bus: &Path, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--dir").arg(bus).args(args);
        cmd.env_remove("AGENTBUS_DIR")
            .env("AGENTBUS_AGENT", "agent");
        if let Some(uid) = uid {
            cmd.uid(uid).gid(uid);
        }
        output(cmd)
    }

    /// `agentbus --dir BUS ARGS` as `uid`, with [`TEAM`] as a supplementary group.
    fn run_in_team(&self, uid: u32, bus: &Path, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--dir").arg(bus).args(args);
        cmd.env_remove("AGENTBUS_DIR")
            .env("AGENTBUS_AGENT", format!("u{uid}"));
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let groups = [TEAM as libc::gid_t];
                if libc::setgroups(1, groups.as_ptr()) != 0
                    || libc::setgid(uid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        output(cmd)
    }

    fn dir(&self, name: &str, uid: u32, mode: u32) -> PathBuf {
        let d = self.root.join(name);
        std::fs::create_dir(&d).unwrap();
        chown(&d, Some(uid), Some(uid)).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
        d
    }
}

/// Runs `cmd`. Another test's fork may briefly hold a descriptor of an executable just
/// copied (`ETXTBSY`): try again then.
fn output(mut cmd: Command) -> Output {
    for _ in 0..100 {
        match cmd.output() {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            other => return other.unwrap(),
        }
    }
    panic!("the copied agentbus stayed busy")
}

fn refused(out: Output, what: &str) -> serde_json::Value {
    let err = common::fails(out, 1);
    assert_eq!(err["error"], "untrusted", "{what}: {err}");
    err
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(entries(&p));
        }
        out.push(p);
    }
    out
}

#[test]
fn init_refuses_a_directory_squatted_by_another_user() {
    let Some(p) = place() else { return };
    let squat = p.dir("squat", OTHER, 0o777);
    let err = refused(p.run(Some(OWNER), &squat, &["init"]), "squatted");
    assert!(err["message"].as_str().unwrap().contains("65533"), "{err}");
    assert_eq!(
        std::fs::read_dir(&squat).unwrap().count(),
        0,
        "nothing created"
    );
}

#[test]
fn a_bus_writable_by_others_is_refused_with_the_fix() {
    let Some(p) = place() else { return };
    let open = p.dir("open", OWNER, 0o777);
    let err = refused(p.run(Some(OWNER), &open, &["init"]), "0777");
    let message = err["message"].as_str().unwrap();
    assert!(message.contains("chmod"), "says what to fix: {err}");
}

#[test]
fn a_lease_file_planted_by_another_user_is_refused() {
    let Some(p) = place() else { return };
    let bus = p.dir("bus", OWNER, 0o700);
    common::ok(p.run(Some(OWNER), &bus, &["init"]));
    let args = ["lease", "acquire", "deploy", "--ttl", "60"];
    common::ok(p.run(Some(OWNER), &bus, &args));
    common::ok(p.run(
        Some(OWNER),
        &bus,
        &["lease", "release", "deploy", "--token", "1"],
    ));
    // Another user (with access to the directory, say through a wrong mode once)
    // replaces the lease file with one of its own: token history forged or reset.
    let lease = bus.join("leases").join("deploy.jsonl");
    std::fs::remove_file(&lease).unwrap();
    std::fs::write(&lease, b"").unwrap();
    chown(&lease, Some(OTHER), Some(OTHER)).unwrap();
    refused(p.run(Some(OWNER), &bus, &args), "planted lease");
    // Its own file, made writable by others: refused too.
    chown(&lease, Some(OWNER), Some(OWNER)).unwrap();
    std::fs::set_permissions(&lease, std::fs::Permissions::from_mode(0o666)).unwrap();
    refused(p.run(Some(OWNER), &bus, &args), "lease file 0666");
}

#[test]
fn what_root_creates_in_a_users_bus_stays_the_users() {
    let Some(p) = place() else { return };
    let bus = p.dir("bus", OWNER, 0o700);
    common::ok(p.run(Some(OWNER), &bus, &["init"]));
    // Root (an operator, a cron job) uses the user's bus.
    common::ok(p.run(None, &bus, &["mailbox", "create", "main"]));
    let keyed = ["send", "main", "--type", "t", "--idempotency-key", "k1"];
    common::ok(p.run(None, &bus, &keyed));
    let acquire = ["lease", "acquire", "deploy", "--ttl", "60"];
    let grant = common::ok(p.run(None, &bus, &acquire)).remove(0);
    let token = grant["token"].as_u64().unwrap().to_string();
    common::ok(p.run(
        None,
        &bus,
        &["lease", "release", "deploy", "--token", &token],
    ));
    for path in entries(&bus) {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(
            meta.uid(),
            OWNER,
            "{} belongs to the bus's owner",
            path.display()
        );
    }
    // The owner goes on using all of it.
    let again = common::ok(p.run(Some(OWNER), &bus, &keyed)).remove(0);
    assert_eq!(again["duplicate"], true);
    let grant = common::ok(p.run(Some(OWNER), &bus, &acquire)).remove(0);
    assert!(grant["token"].as_u64().unwrap() > token.parse::<u64>().unwrap());
    let report = common::ok(p.run(Some(OWNER), &bus, &["doctor"]));
    assert!(!report.is_empty());
}

#[test]
fn a_bus_shared_with_a_group_works_for_every_member_and_stays_the_groups() {
    let Some(p) = place() else { return };
    // As README "Sharing a bus between users" says: a directory of the group, setgid
    // and group-writable.
    let bus = p.dir("team-bus", OWNER, 0o700);
    chown(&bus, Some(OWNER), Some(TEAM)).unwrap();
    std::fs::set_permissions(&bus, std::fs::Permissions::from_mode(0o2770)).unwrap();
    common::ok(p.run_in_team(OWNER, &bus, &["init"]));
    common::ok(p.run_in_team(OWNER, &bus, &["mailbox", "create", "main"]));
    common::ok(p.run_in_team(
        OTHER,
        &bus,
        &["send", "main", "--type", "t", "--body", "hi"],
    ));
    let acquire = ["lease", "acquire", "deploy", "--ttl", "60"];
    common::ok(p.run_in_team(OTHER, &bus, &acquire));
    let got = common::ok(p.run_in_team(OWNER, &bus, &["recv", "main"]));
    assert_eq!(got[0]["body"], "hi");
    let held = common::fails(p.run_in_team(OWNER, &bus, &acquire), 3);
    assert_eq!(held["error"], "lease_held");
    for path in entries(&bus) {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.gid(), TEAM, "{} belongs to the team", path.display());
        assert_eq!(
            meta.mode() & 0o007,
            0,
            "{} is nobody else's",
            path.display()
        );
    }
    // Someone outside the team cannot even open it (the modes keep them out).
    let err = common::fails(p.run(Some(OTHER), &bus, &["recv", "main"]), 1);
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("Permission denied"),
        "{err}"
    );
}
