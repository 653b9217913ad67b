//! Power loss, proven rather than argued: the bus runs on a file system that forgets
//! whatever was not fsynced (`disk.rs` says exactly what survives), real bus processes
//! work on it (writers with Sync sends, some keyed; group consumers; a cumulative
//! acker; lease holders; a handoff courier and the desk that accepts its handoffs and
//! the leases that come with them; compaction through the CLI; group-state rotation
//! follows from the traffic; a Flush writer on a mailbox of its own), and at a random
//! moment the power goes off: every request fails from then on, every bus process is
//! SIGKILLed, and what was not durable is thrown away. Then the power comes back (a new
//! mount of what survived), everything the processes were promised is checked
//! (`verify.rs`), and the next round runs on the same bus.
//!
//! It needs FUSE: `/dev/fuse` and the right to mount (root). Without them each test
//! says why and passes as skipped, unless `AGENTBUS_POWERLOSS_REQUIRED=1` (CI sets
//! it). `AGENTBUS_POWERLOSS_CUTS` sets the number of cuts (default 200) and
//! `AGENTBUS_POWERLOSS_SEED` the seed of the harness's choices (the processes' timing
//! is never the same twice).

#![cfg(target_os = "linux")]

/// Writes a line to the test's stderr past libtest's capture, so that the figures
/// show in a plain `cargo test` too.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

#[path = "../common/mod.rs"]
mod common;
mod disk;
mod fuse;
mod ledger;
mod roles;
mod setup;
mod verify;

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use agentbus::{Bus, Filter, GroupOptions};

use disk::{Cut, Disk};
use fuse::{Mounted, SharedDisk};
use ledger::Ledger;

/// The processes of one round: (role, id).
const ROLES: [(&str, u64); 12] = [
    ("pl_writer", 0),
    ("pl_writer", 1),
    ("pl_consumer", 0),
    ("pl_consumer", 1),
    ("pl_auditor", 0),
    ("pl_leaser", 0),
    ("pl_leaser", 1),
    ("pl_courier", 0),
    ("pl_desk", 0),
    ("pl_compactor", 0),
    ("pl_flusher", 0),
    ("pl_reader", 0),
];

/// A fresh power-loss file system mounted at `<tmp>/mnt`, or `None` (after saying
/// why) where FUSE cannot run; where it must run (`AGENTBUS_POWERLOSS_REQUIRED=1`),
/// that is a failure instead.
pub fn fuse_here(tmp: &Path) -> Option<(SharedDisk, Mounted, PathBuf)> {
    let skip = |why: String| {
        if std::env::var("AGENTBUS_POWERLOSS_REQUIRED").is_ok_and(|v| v == "1") {
            panic!("the power-loss harness must run here, but {why}");
        }
        say!("powerloss: skipped: {why}");
        None
    };
    if !Path::new("/dev/fuse").exists() {
        return skip("there is no /dev/fuse".into());
    }
    let mnt = tmp.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let (uid, gid) = (
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
    );
    let disk = Arc::new(Mutex::new(Disk::new(uid, gid)));
    match fuse::mount(disk.clone(), &mnt) {
        Ok(m) => Some((disk, m, mnt)),
        Err(e) => skip(format!("mounting FUSE at {} failed: {e}", mnt.display())),
    }
}

/// The power goes off (every bus process must be gone or about to be killed), what
/// was not durable is lost as `cut` says, and the power comes back: a new mount.
pub fn power_cut(
    mounted: Mounted,
    disk: &SharedDisk,
    cut: Cut,
    pick: impl FnMut(usize) -> usize,
) -> Mounted {
    let path = mounted.path.clone();
    mounted.power_off();
    mounted.unmount().expect("unmount after the power cut");
    fuse::lock(disk).power_cut(cut, pick);
    fuse::mount(disk.clone(), &path).expect("mount after the power cut")
}

/// A running role process and the threads collecting what it prints.
struct Running {
    role: &'static str,
    child: Child,
    stdout: JoinHandle<String>,
    stderr: JoinHandle<String>,
}

fn collect(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = r.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

struct Round<'a> {
    round: u64,
    seed: u64,
    bus: &'a Path,
    artifact: &'a Path,
}

fn spawn(role: &'static str, id: u64, r: &Round<'_>) -> Running {
    let mut cmd: Command = common::child(&format!("roles::{role}"));
    cmd.env("BUS", r.bus)
        .env("ROUND", r.round.to_string())
        .env("ID", id.to_string())
        .env("SEED", r.seed.to_string())
        .env("ARTIFACT", r.artifact)
        // Each round between two cuts is one boot of the simulated machine: a writer
        // tells a restart by the boot id (FORMAT.md, "Power loss").
        .env(
            "AGENTBUS_BOOT_ID",
            format!("powerloss-{}-boot-{}", r.seed, r.round),
        )
        .env_remove("AGENTBUS_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Its own process group, so that the power cut also takes the CLI processes the
    // compactor runs.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().expect("spawn a role");
    let stdout = collect(child.stdout.take().unwrap());
    let stderr = collect(child.stderr.take().unwrap());
    Running {
        role,
        child,
        stdout,
        stderr,
    }
}

/// The bus every round works on: Sync (the default), small segments so that
/// compaction has work, groups that redeliver soon and never dead-letter.
fn setup(root: &Path) -> agentbus::Result<()> {
    let bus = Bus::builder().segment_bytes(32 * 1024).init(root)?;
    let jobs = bus.create_mailbox("jobs")?;
    let opts = GroupOptions::new()
        .visibility(Duration::from_millis(800))
        .max_deliveries(1000);
    jobs.create_group_with("workers", opts.clone())?;
    jobs.create_group_with("audit", opts.clone())?;
    let desk = bus.create_mailbox("desk")?;
    desk.create_group_with(
        agentbus::HANDOFF_GROUP,
        GroupOptions::new()
            .filter(Filter::new().of_type(agentbus::HANDOFF_TYPE))
            .visibility(Duration::from_secs(3))
            .max_deliveries(1000),
    )?;
    bus.create_mailbox("courier-inbox")?;
    bus.create_mailbox("scratch")?
        .create_group_with("readers", opts)?;
    Ok(())
}

#[derive(Default)]
struct Figures {
    cuts: u64,
    strict: u64,
    prefix: u64,
    receipt_checks: u64,
    compacted: u64,
    torn_tails: u64,
    delivered: u64,
    in_flight: u64,
    lost: u64,
    acked_redelivered: u64,
    generations: HashMap<String, u64>,
    answered: u64,
    flush_lost: std::collections::HashSet<u64>,
    flush_cursor_past_end: u64,
    flush_doctor: u64,
}

#[test]
fn power_cuts_lose_nothing_that_was_synced() {
    let cuts = common::env_number("AGENTBUS_POWERLOSS_CUTS").unwrap_or(200);
    let seed = common::env_number("AGENTBUS_POWERLOSS_SEED")
        .unwrap_or_else(|| common::Rng::seeded_from_time().1);
    say!("powerloss: seed {seed} (AGENTBUS_POWERLOSS_SEED={seed} repeats the choices)");
    let mut rng = common::Rng::new(seed);

    let tmp = tempfile::tempdir().unwrap();
    let artifact = tmp.path().join("chapter.md");
    std::fs::write(&artifact, "# Chapter 1\n\nHanded on with every handoff.\n").unwrap();
    let Some((disk, mut mounted, mnt)) = fuse_here(tmp.path()) else {
        return;
    };
    let root = mnt.join("bus");
    setup(&root).expect("set up the bus on the power-loss file system");

    let started = Instant::now();
    let mut ledger = Ledger::default();
    let mut fig = Figures::default();
    for round in 1..=cuts {
        let r = Round {
            round,
            seed,
            bus: &root,
            artifact: &artifact,
        };
        let running: Vec<Running> = ROLES
            .iter()
            .map(|&(role, id)| spawn(role, id, &r))
            .collect();
        // Mostly mid-work, sometimes while the processes are still starting.
        let run_ms = if rng.below(8) == 0 {
            rng.below(60)
        } else {
            100 + rng.below(500)
        };
        std::thread::sleep(Duration::from_millis(run_ms));

        // Power off first: from this moment nothing more becomes durable, and no
        // process learns of anything that did not.
        mounted.power_off();
        for r in &running {
            // SAFETY: kill(2) on the process group of a child we started.
            unsafe { libc::kill(-(r.child.id() as i32), libc::SIGKILL) };
        }
        for mut r in running {
            r.child.wait().unwrap();
            ledger.read(r.role, round, &r.stdout.join().unwrap());
            let err = r.stderr.join().unwrap();
            for line in err.lines().filter(|l| l.contains("panicked")) {
                let line: String = line.chars().take(200).collect();
                *ledger
                    .errors
                    .entry(format!("{} panic: {line}", r.role))
                    .or_default() += 1;
            }
        }
        ledger.end_round();
        let cut = if rng.below(2) == 0 {
            Cut::Strict
        } else {
            Cut::Prefix
        };
        mounted.unmount().expect("unmount after the power cut");
        fuse::lock(&disk).power_cut(cut, |n| rng.below(n as u64 + 1) as usize);
        fig.cuts += 1;
        match cut {
            Cut::Strict => fig.strict += 1,
            Cut::Prefix => fig.prefix += 1,
        }

        // Check a copy of what survived, so that the checks (which drain groups and
        // repair torn tails) change nothing for the rounds that follow.
        let copy = Arc::new(Mutex::new(fuse::lock(&disk).clone()));
        let view = fuse::mount(copy, &mnt).expect("mount the copy");
        let check = verify::after_cut(&root, &ledger);
        view.unmount().expect("unmount the copy");
        fig.receipt_checks += check.receipts_checked;
        fig.compacted = check.compacted;
        fig.torn_tails += check.torn_tails;
        fig.delivered += check.drained;
        fig.in_flight += check.in_flight;
        fig.lost += check.lost;
        fig.acked_redelivered += check.acked_redelivered;
        fig.answered = check.answered;
        fig.flush_lost.extend(check.flush_lost);
        fig.flush_cursor_past_end += u64::from(check.flush_cursor_past_end);
        fig.flush_doctor += check.flush_doctor;
        for (g, gen) in check.generations {
            let e = fig.generations.entry(g).or_default();
            *e = (*e).max(gen);
        }
        let mut failures = std::mem::take(&mut ledger.failures);
        failures.extend(check.failures);
        if !failures.is_empty() {
            report(&fig, &ledger, &disk, started);
            panic!(
                "power cut {round} ({cut:?}, after {run_ms} ms of work) broke {} promise(s):\n  {}",
                failures.len(),
                failures
                    .iter()
                    .take(30)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n  ")
            );
        }
        mounted = fuse::mount(disk.clone(), &mnt).expect("mount after the power cut");
    }
    mounted.unmount().unwrap();
    report(&fig, &ledger, &disk, started);
    // Flush records may be lost to a cut; their seqs must never go out again.
    assert!(
        ledger.flush_reused.is_empty(),
        "seqs handed out twice after a lost Flush tail: {:?}",
        ledger.flush_reused
    );

    // Every scenario made progress, or the run proved little.
    if cuts >= 100 {
        let rotations: u64 = fig.generations.values().sum();
        assert!(ledger.receipts.len() > 1000, "too few receipts");
        assert!(
            ledger.keyed > 100 && ledger.duplicates > 0,
            "too few keyed sends"
        );
        assert!(ledger.grants_printed > 100, "too few lease grants");
        assert!(ledger.accepted.len() > 20, "too few handoffs accepted");
        assert!(
            ledger.segments_removed > 0,
            "compaction never removed a segment"
        );
        assert!(rotations > 0, "no group state was rotated");
        assert!(fig.torn_tails > 0, "no cut left a torn tail");
    }
}

fn report(f: &Figures, l: &Ledger, disk: &SharedDisk, started: Instant) {
    let d = fuse::lock(disk).stats.clone();
    let rotations: u64 = f.generations.values().sum();
    say!(
        "powerloss: {} cuts ({} strict, {} prefix) in {} s: {} Sync receipts ({} keyed, {} \
         answered as duplicates) checked {} times, {} compacted after their acks, lost {}, \
         seqs reused {}; {} lease grants, tokens reused {}; {} group deliveries verified ({} \
         by claims still running), acked redelivered {}; {} handoffs accepted, {} rejected, \
         {} answered; {} torn tails repaired; {} state rotations; {} segments compacted; \
         {} unsynced writes and {} unsynced directory changes thrown away ({} torn)",
        f.cuts,
        f.strict,
        f.prefix,
        started.elapsed().as_secs(),
        l.receipts.len(),
        l.keyed,
        l.duplicates,
        f.receipt_checks,
        f.compacted,
        f.lost,
        l.seqs_reused,
        l.grants_printed,
        l.tokens_reused,
        f.delivered,
        f.in_flight,
        f.acked_redelivered,
        l.accepted.len(),
        l.rejected,
        f.answered,
        f.torn_tails,
        rotations,
        l.segments_removed,
        d.dropped_file_changes,
        d.dropped_dir_changes,
        d.torn_writes,
    );
    say!(
        "powerloss: Flush, whose records are not promised to survive power loss: {} receipts, \
         {} lost to cuts, {} seqs handed out again after a lost tail (must be 0), {} cuts left a group's cursor past the \
         end of the log, {} doctor findings",
        l.flush.len(),
        f.flush_lost.len(),
        l.flush_reused.len(),
        f.flush_cursor_past_end,
        f.flush_doctor,
    );
    say!(
        "powerloss: agentbus defects seen (known, not failed on): {} keyed sends refused \
         because compaction passed the key watermark; {} accepts reported another accept's \
         lease grant; {} repeated accepts returned a superseded lease",
        l.errors
            .iter()
            .filter(|(k, _)| k.starts_with("pl_writer send: seqs") && k.contains("compacted"))
            .map(|(_, n)| n)
            .sum::<u64>(),
        l.misattributed.len(),
        l.stale_leases,
    );
    for m in l.misattributed.iter().take(3) {
        say!("  {m}");
    }
    for (what, n) in &l.errors {
        say!("  {n} x {what}");
    }
}
