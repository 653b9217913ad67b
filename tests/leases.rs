//! Leases: exclusive holds with strictly increasing fencing tokens under real-process
//! contention, expiry and process-death reclaim, stale tokens, compaction, transfer.

mod common;

use std::io::{BufRead, Write};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use agentbus::{Bus, Error};

fn nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

const CONTENDERS: usize = 8;
const HOLDS: usize = 1_000;

#[test]
fn eight_processes_contending_1000_times_never_overlap_and_tokens_increase() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bus");
    Bus::init(&root).unwrap();
    let children: Vec<_> = (0..CONTENDERS)
        .map(|w| {
            common::child("contender")
                .env("BUS", &root)
                .env("HOLDER", format!("agent-{w}"))
                .env("HOLDS", (HOLDS / CONTENDERS).to_string())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut holds: Vec<(u64, u128, u128, String)> = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "a contender failed");
        for line in out.stdout.lines() {
            let line = line.unwrap();
            let parts: Vec<&str> = line.split(' ').collect();
            if let ["HOLD", holder, token, start, end] = parts[..] {
                holds.push((
                    token.parse().unwrap(),
                    start.parse().unwrap(),
                    end.parse().unwrap(),
                    holder.into(),
                ));
            }
        }
    }
    assert_eq!(holds.len(), HOLDS);
    holds.sort();
    for (i, pair) in holds.windows(2).enumerate() {
        let ((t1, _, end1, h1), (t2, start2, _, h2)) = (&pair[0], &pair[1]);
        assert!(
            t2 > t1,
            "tokens not strictly increasing at {i}: {t1} then {t2}"
        );
        assert!(
            end1 < start2,
            "hold {t1} by {h1} overlaps hold {t2} by {h2}"
        );
    }
    let holders: std::collections::HashSet<_> = holds.iter().map(|h| &h.3).collect();
    assert_eq!(holders.len(), CONTENDERS);
    // The lease file was compacted along the way, and tokens kept increasing.
    let info = Bus::open(&root)
        .unwrap()
        .lease_info("shared-resource")
        .unwrap()
        .unwrap();
    assert_eq!(info.token, holds.last().unwrap().0);
    assert!(
        std::fs::metadata(root.join("leases/shared-resource.jsonl"))
            .unwrap()
            .len()
            < 20_000
    );
}

#[test]
#[ignore = "runs only as a child process of another test"]
fn contender() {
    if !common::is_child() {
        return;
    }
    let bus = common::open_flush_bus(common::env("BUS"));
    let holder = common::env("HOLDER");
    let n: usize = common::env("HOLDS").parse().unwrap();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for _ in 0..n {
        let lease = bus
            .lease("shared-resource")
            .holder(&holder)
            .ttl(Duration::from_secs(30))
            .acquire(Duration::from_secs(120))
            .unwrap();
        let start = nanos();
        std::hint::black_box((0..200).sum::<u64>()); // the "work"
        let end = nanos();
        writeln!(out, "HOLD {holder} {} {start} {end}", lease.token()).unwrap();
        lease.release().unwrap();
    }
    out.flush().unwrap();
}

fn spawn_holder(root: &std::path::Path, process_bound: bool, ttl_ms: u64) -> std::process::Child {
    let mut child = common::child("holder")
        .env("BUS", root)
        .env("PROCESS_BOUND", if process_bound { "1" } else { "0" })
        .env("TTL_MS", ttl_ms.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = std::io::BufReader::new(stdout).lines();
    assert!(
        lines.by_ref().map(Result::unwrap).any(|l| l == "HELD"),
        "child never held"
    );
    // Keep the pipe open until the child dies.
    std::thread::spawn(move || lines.for_each(drop));
    child
}

#[test]
#[ignore = "runs only as a child process of another test"]
fn holder() {
    if !common::is_child() {
        return;
    }
    let bus = Bus::open(common::env("BUS")).unwrap();
    let lease = bus
        .lease("job")
        .holder("doomed")
        .ttl(Duration::from_millis(
            common::env("TTL_MS").parse().unwrap(),
        ))
        .process_bound(common::env("PROCESS_BOUND") == "1")
        .try_acquire()
        .unwrap();
    println!("HELD");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(600));
    drop(lease);
}

#[test]
fn a_sigkilled_process_bound_holder_loses_its_lease_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::init(dir.path()).unwrap();
    let mut child = spawn_holder(dir.path(), true, 60_000);
    let held = bus.lease("job").holder("next").try_acquire();
    assert!(matches!(held, Err(Error::LeaseHeld { ref holder, .. }) if holder == "doomed"));
    let info = bus.lease_info("job").unwrap().unwrap();
    assert_eq!((info.holder.as_deref(), info.token), (Some("doomed"), 1));
    child.kill().unwrap();
    child.wait().unwrap();
    // No TTL wait: the kernel released the holder's liveness lock. Nobody holds the
    // lease, and the dead holder's token moves nothing.
    assert_eq!(bus.lease_info("job").unwrap().unwrap().holder, None);
    let ttl = Duration::from_secs(60);
    assert!(matches!(
        bus.renew_lease("job", "doomed", 1, ttl),
        Err(Error::StaleLease { holder: None, .. })
    ));
    assert!(matches!(
        bus.transfer_lease("job", "doomed", 1, "heir", ttl),
        Err(Error::StaleLease { holder: None, .. })
    ));
    let lease = bus.lease("job").holder("next").try_acquire().unwrap();
    assert_eq!(lease.token(), 2);
}

#[test]
fn a_waiting_contender_wakes_when_a_process_bound_holder_dies() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::init(dir.path()).unwrap();
    let mut child = spawn_holder(dir.path(), true, 60_000);
    let waiter = {
        let bus = bus.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let lease = bus
                .lease("job")
                .holder("waiter")
                .acquire(Duration::from_secs(50));
            (lease.map(|l| l.token()), started.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    child.kill().unwrap();
    child.wait().unwrap();
    let (token, waited) = waiter.join().unwrap();
    assert_eq!(token.unwrap(), 2);
    assert!(
        waited < Duration::from_secs(30),
        "waited for the TTL instead: {waited:?}"
    );
}

#[test]
fn a_sigkilled_ttl_holder_keeps_its_lease_until_the_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::init(dir.path()).unwrap();
    let mut child = spawn_holder(dir.path(), false, 2_000);
    child.kill().unwrap();
    child.wait().unwrap();
    let expires_at = bus.lease_info("job").unwrap().unwrap().expires_at;
    let early = bus.lease("job").holder("next").try_acquire();
    if time::OffsetDateTime::now_utc() < expires_at {
        assert!(
            matches!(early, Err(Error::LeaseHeld { .. })),
            "taken before the TTL"
        );
    }
    let lease = bus
        .lease("job")
        .holder("next")
        .acquire(Duration::from_secs(20))
        .unwrap();
    assert!(time::OffsetDateTime::now_utc() >= expires_at);
    assert_eq!(lease.token(), 2);
}

#[test]
fn stale_tokens_are_refused_naming_the_real_holder() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::init(dir.path()).unwrap();
    let short = bus
        .lease("res")
        .holder("a")
        .ttl(Duration::from_millis(50))
        .try_acquire()
        .unwrap();
    let old_token = short.token();
    let info = short.keep();
    std::thread::sleep(Duration::from_millis(200));
    let b = bus.lease("res").holder("b").try_acquire().unwrap();
    assert!(b.token() > old_token);
    for result in [
        bus.renew_lease("res", "a", old_token, Duration::from_secs(1))
            .map(drop),
        bus.release_lease("res", "a", old_token),
        bus.transfer_lease("res", "a", info.token, "c", Duration::from_secs(1))
            .map(drop),
    ] {
        match result {
            Err(Error::StaleLease { holder, token, .. }) => {
                assert_eq!((holder.as_deref(), token), (Some("b"), b.token()));
            }
            other => panic!("expected StaleLease, got {other:?}"),
        }
    }
    // The right token works.
    bus.renew_lease("res", "b", b.token(), Duration::from_secs(5))
        .unwrap();
    // An expired grant cannot be renewed, even when nobody took it over.
    let mut c = bus
        .lease("other")
        .holder("c")
        .ttl(Duration::from_millis(30))
        .try_acquire()
        .unwrap();
    std::thread::sleep(Duration::from_millis(60));
    assert!(!c.is_valid());
    assert!(matches!(
        c.renew(Duration::from_secs(1)),
        Err(Error::StaleLease { .. })
    ));
}

#[test]
fn tokens_keep_increasing_across_compaction_and_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let bus = common::flush_bus(dir.path());
    let mut last = 0;
    for i in 0..500 {
        let mut lease = bus
            .lease("res")
            .holder(format!("h{}", i % 3))
            .try_acquire()
            .unwrap();
        assert!(lease.token() > last);
        last = lease.token();
        lease.renew(Duration::from_secs(5)).unwrap();
        lease.release().unwrap();
    }
    let file = dir.path().join("leases/res.jsonl");
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(size < 20_000, "lease file not compacted: {size} bytes");
    // The compacted file starts with the `state` record that carries the token; a
    // fresh handle continues after it.
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with('{') && text.lines().next().unwrap().contains(r#""op":"state""#));
    let fresh = Bus::open(dir.path()).unwrap();
    let next = fresh.lease("res").try_acquire().unwrap();
    assert_eq!(next.token(), last + 1);
}

#[test]
fn transfer_hands_over_with_a_higher_token_and_no_gap() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::init(dir.path()).unwrap();
    let lease = bus
        .lease("chapter")
        .holder("drafter")
        .try_acquire()
        .unwrap();
    let t1 = lease.token();
    let info = lease.transfer("reviewer", Duration::from_secs(30)).unwrap();
    assert_eq!(info.holder.as_deref(), Some("reviewer"));
    assert!(info.token > t1);
    assert!(matches!(
        bus.lease("chapter").holder("drafter").try_acquire(),
        Err(Error::LeaseHeld { ref holder, .. }) if holder == "reviewer"
    ));
    bus.renew_lease("chapter", "reviewer", info.token, Duration::from_secs(30))
        .unwrap();
    bus.release_lease("chapter", "reviewer", info.token)
        .unwrap();
}

#[test]
fn acquire_waits_for_a_release_and_times_out_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::init(dir.path()).unwrap();
    let lease = bus
        .lease("res")
        .holder("a")
        .ttl(Duration::from_secs(60))
        .try_acquire()
        .unwrap();
    let timed_out = bus
        .lease("res")
        .holder("b")
        .acquire(Duration::from_millis(200));
    assert!(matches!(timed_out, Err(Error::LeaseHeld { .. })));

    let waiter = {
        let bus = bus.clone();
        std::thread::spawn(move || {
            bus.lease("res")
                .holder("b")
                .acquire(Duration::from_secs(30))
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    lease.release().unwrap();
    assert_eq!(waiter.join().unwrap().unwrap().token(), 2);

    // Dropping a lease releases it.
    {
        let _c = bus.lease("dropped").holder("c").try_acquire().unwrap();
    }
    assert_eq!(
        bus.lease("dropped")
            .holder("d")
            .try_acquire()
            .unwrap()
            .token(),
        2
    );
    let names: Vec<_> = bus.leases().unwrap().into_iter().map(|l| l.name).collect();
    assert_eq!(names, ["dropped", "res"]);
}

#[test]
fn lease_types_are_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<agentbus::Lease>();
    check::<agentbus::Bus>();
    check::<agentbus::Mailbox>();
    check::<agentbus::Group>();
}

/// CPU time used by the calling thread so far.
fn thread_cpu() -> Duration {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a rusage struct.
    assert_eq!(unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) }, 0);
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

#[test]
fn waiting_for_a_lease_or_a_message_sleeps_instead_of_spinning() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::init(dir.path()).unwrap();
    let _held = bus
        .lease("busy")
        .holder("a")
        .ttl(Duration::from_secs(60))
        .try_acquire()
        .unwrap();
    let before = thread_cpu();
    let waited = Instant::now();
    assert!(bus
        .lease("busy")
        .holder("b")
        .acquire(Duration::from_secs(1))
        .is_err());
    let (cpu, wall) = (thread_cpu() - before, waited.elapsed());
    assert!(wall >= Duration::from_secs(1));
    assert!(
        cpu < Duration::from_millis(300),
        "acquire burned {cpu:?} of CPU in {wall:?}"
    );

    bus.create_mailbox("idle").unwrap();
    let mut rx = bus.follow(&["idle"]).unwrap();
    let before = thread_cpu();
    assert!(rx
        .recv_timeout(Duration::from_secs(1))
        .unwrap_err()
        .is_timeout());
    let cpu = thread_cpu() - before;
    assert!(
        cpu < Duration::from_millis(300),
        "recv burned {cpu:?} of CPU"
    );
}

#[test]
fn released_and_superseded_grants_leave_no_liveness_files() {
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::init(dir.path()).unwrap();
    for _ in 0..3 {
        bus.lease("job")
            .process_bound(true)
            .try_acquire()
            .unwrap()
            .release()
            .unwrap();
    }
    // Dropping the handle releases too.
    drop(bus.lease("job").process_bound(true).try_acquire().unwrap());
    assert_eq!(bus.lease_info("job").unwrap().unwrap().holder, None);
    let alive: Vec<_> = std::fs::read_dir(dir.path().join("leases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".alive"))
        .collect();
    assert!(alive.is_empty(), "{alive:?}");
}
