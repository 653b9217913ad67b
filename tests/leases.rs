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

/// A process whose clock is an hour ahead records a grant that, read by the others'
/// clocks, starts in an hour and ends an hour and a second from now. It holds the lease
/// for its TTL from when it wrote it, not for an extra hour.
#[test]
fn a_holder_whose_clock_is_an_hour_ahead_holds_for_its_ttl_not_an_hour_more() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let bus = Bus::builder().agent("ok").init(dir.path()).unwrap();
    let first = bus.lease("deploy").try_acquire().unwrap();
    let token = first.token();
    first.release().unwrap();
    let ahead = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        + 3_600_000;
    let grant = format!(
        "{{\"seq\":3,\"op\":\"grant\",\"t\":{ahead},\"token\":{},\"holder\":\"fast\",\"expires_at\":{},\"acquired_at\":{ahead}}}\n",
        token + 1,
        ahead + 1000
    );
    std::fs::OpenOptions::new()
        .append(true)
        .open(dir.path().join("leases").join("deploy.jsonl"))
        .unwrap()
        .write_all(grant.as_bytes())
        .unwrap();
    // Held now, by the fast process, with its token.
    match bus.lease("deploy").try_acquire() {
        Err(agentbus::Error::LeaseHeld { holder, .. }) => assert_eq!(holder, "fast"),
        other => panic!("the fast process's grant is live: {other:?}"),
    }
    let info = bus.lease_info("deploy").unwrap().unwrap();
    let until = info.expires_at - time::OffsetDateTime::now_utc();
    assert!(
        until < time::Duration::seconds(2),
        "expires in {until}, not in an hour"
    );
    // Free again a second (plus the clock grace) after it was written, token after it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let next = loop {
        match bus.lease("deploy").try_acquire() {
            Ok(lease) => break lease,
            Err(agentbus::Error::LeaseHeld { .. }) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50))
            }
            other => panic!("the lease should be free by now: {other:?}"),
        }
    };
    assert_eq!(next.token(), token + 2);
}
