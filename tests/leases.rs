//! Leases on the directory only: what has no JetStream counterpart (waiting that burns
//! no CPU, process-bound liveness files). The behaviours both backends share, including
//! real-process contention, expiry, stale tokens and transfer, are in `backends.rs`.

use std::time::{Duration, Instant};

use agentbus::Bus;

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
