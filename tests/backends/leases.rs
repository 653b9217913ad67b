//! Leases on both backends: exclusive holds with strictly increasing fencing tokens,
//! stale tokens refused, renew/release/transfer, expiry, waiters woken by a release,
//! holder processes killed, and eight contending processes.

use std::io::{BufRead, Write};
use std::process::Stdio;
use std::time::{Duration, Instant};

use agentbus::{Bus, Error};

use crate::{assert_unsupported, common, Env};

behaviours! {
    /// One holder at a time; tokens strictly increase; stale tokens are refused.
    fn leases_are_exclusive_and_fenced(env: &Env) {
        let a = env.bus("agent-a");
        let b = env.bus("agent-b");
        let mut lease = a.lease("chapter-1").ttl(Duration::from_secs(30)).try_acquire().unwrap();
        let t1 = lease.token();
        assert!(t1 > 0);
        match b.lease("chapter-1").try_acquire() {
            Err(Error::LeaseHeld { holder, token, .. }) => assert_eq!((holder.as_str(), token), ("agent-a", t1)),
            other => panic!("{other:?}"),
        }
        lease.renew(Duration::from_secs(30)).unwrap();
        assert_eq!(lease.token(), t1, "renewing keeps the token");
        let info = b.lease_info("chapter-1").unwrap().unwrap();
        assert_eq!((info.holder.as_deref(), info.token, info.renewals), (Some("agent-a"), t1, 1));
        lease.release().unwrap();

        let lease2 = b.lease("chapter-1").try_acquire().unwrap();
        assert!(lease2.token() > t1);
        for stale in [
            a.renew_lease("chapter-1", "agent-a", t1, Duration::from_secs(5)).map(drop),
            a.release_lease("chapter-1", "agent-a", t1),
            a.transfer_lease("chapter-1", "agent-a", t1, "agent-c", Duration::from_secs(5)).map(drop),
        ] {
            match stale {
                Err(Error::StaleLease { holder, token, .. }) => {
                    assert_eq!((holder.as_deref(), token), (Some("agent-b"), lease2.token()))
                }
                other => panic!("a stale token was accepted: {other:?}"),
            }
        }
        let moved = lease2.transfer("agent-c", Duration::from_secs(5)).unwrap();
        assert_eq!(moved.holder.as_deref(), Some("agent-c"));
        let names: Vec<_> = a.leases().unwrap().into_iter().map(|l| (l.name, l.holder)).collect();
        assert_eq!(names, [("chapter-1".to_owned(), Some("agent-c".to_owned()))]);
        assert!(moved.token > t1);
    }

    /// A stale token cannot renew, release or transfer, and the error names the real
    /// holder; an expired grant cannot be renewed even when nobody took it over.
    fn stale_tokens_are_refused_naming_the_real_holder(env: &Env) {
        let bus = env.bus("agent");
        let short = bus.lease("res").holder("a").ttl(Duration::from_millis(50)).try_acquire().unwrap();
        let old_token = short.token();
        let info = short.keep();
        std::thread::sleep(Duration::from_millis(200));
        let b = bus.lease("res").holder("b").try_acquire().unwrap();
        assert!(b.token() > old_token);
        for result in [
            bus.renew_lease("res", "a", old_token, Duration::from_secs(1)).map(drop),
            bus.release_lease("res", "a", old_token),
            bus.transfer_lease("res", "a", info.token, "c", Duration::from_secs(1)).map(drop),
        ] {
            match result {
                Err(Error::StaleLease { holder, token, .. }) => {
                    assert_eq!((holder.as_deref(), token), (Some("b"), b.token()));
                }
                other => panic!("expected StaleLease, got {other:?}"),
            }
        }
        // The right token works.
        bus.renew_lease("res", "b", b.token(), Duration::from_secs(5)).unwrap();
        // An expired grant cannot be renewed, even when nobody took it over.
        let mut c = bus.lease("other").holder("c").ttl(Duration::from_millis(30)).try_acquire().unwrap();
        std::thread::sleep(Duration::from_millis(60));
        assert!(!c.is_valid());
        assert!(matches!(c.renew(Duration::from_secs(1)), Err(Error::StaleLease { .. })));
    }

    /// Tokens strictly increase over hundreds of grants, and a new handle continues
    /// after them; on the directory, the lease file is compacted along the way.
    fn tokens_keep_increasing_across_compaction_and_reopening(env: &Env) {
        let bus = env.bus("agent");
        let mut last = 0;
        for i in 0..500 {
            let mut lease = bus.lease("res").holder(format!("h{}", i % 3)).try_acquire().unwrap();
            assert!(lease.token() > last);
            last = lease.token();
            lease.renew(Duration::from_secs(5)).unwrap();
            lease.release().unwrap();
        }
        if let Some(root) = env.dir_path() {
            let file = root.join("leases/res.jsonl");
            let size = std::fs::metadata(&file).unwrap().len();
            assert!(size < 20_000, "lease file not compacted: {size} bytes");
            // The compacted file starts with the `state` record that carries the token.
            let text = std::fs::read_to_string(&file).unwrap();
            assert!(text.starts_with('{') && text.lines().next().unwrap().contains(r#""op":"state""#));
        }
        // A fresh handle continues after the last token.
        let next = env.bus("fresh").lease("res").try_acquire().unwrap();
        env.assert_next_token(last, next.token());
    }

    /// A transfer hands the lease over with a higher token: the old holder cannot take
    /// it back, the new one can renew and release it.
    fn transfer_hands_over_with_a_higher_token_and_no_gap(env: &Env) {
        let bus = env.bus("agent");
        let lease = bus.lease("chapter").holder("drafter").try_acquire().unwrap();
        let t1 = lease.token();
        let info = lease.transfer("reviewer", Duration::from_secs(30)).unwrap();
        assert_eq!(info.holder.as_deref(), Some("reviewer"));
        assert!(info.token > t1);
        assert!(matches!(
            bus.lease("chapter").holder("drafter").try_acquire(),
            Err(Error::LeaseHeld { ref holder, .. }) if holder == "reviewer"
        ));
        bus.renew_lease("chapter", "reviewer", info.token, Duration::from_secs(30)).unwrap();
        bus.release_lease("chapter", "reviewer", info.token).unwrap();
    }

    /// acquire waits for a release (woken by it) and times out otherwise; dropping a
    /// lease releases it; `leases` lists every lease by name.
    fn acquire_waits_for_a_release_and_times_out_otherwise(env: &Env) {
        let bus = env.bus("agent");
        let lease = bus.lease("res").holder("a").ttl(Duration::from_secs(60)).try_acquire().unwrap();
        let timed_out = bus.lease("res").holder("b").acquire(Duration::from_millis(200));
        assert!(matches!(timed_out, Err(Error::LeaseHeld { .. })));

        let waiter = {
            let bus = bus.clone();
            std::thread::spawn(move || bus.lease("res").holder("b").acquire(Duration::from_secs(30)))
        };
        std::thread::sleep(Duration::from_millis(100));
        let t1 = lease.token();
        lease.release().unwrap();
        env.assert_next_token(t1, waiter.join().unwrap().unwrap().token());

        // Dropping a lease releases it.
        let dropped = {
            let c = bus.lease("dropped").holder("c").try_acquire().unwrap();
            c.token()
        };
        let d = if env.is_nats() {
            // README: on JetStream a background task releases a dropped lease, soon
            // after (long before its 30 s TTL).
            bus.lease("dropped").holder("d").acquire(Duration::from_secs(10))
        } else {
            bus.lease("dropped").holder("d").try_acquire()
        };
        let d = d.unwrap();
        env.assert_next_token(dropped, d.token());
        // Listed while held (a background release in flight could race the listing).
        let names: Vec<_> = bus.leases().unwrap().into_iter().map(|l| l.name).collect();
        assert_eq!(names, ["dropped", "res"]);
        d.release().unwrap();
    }

    /// A lease nobody renews can be taken after its TTL, and acquire waits for it.
    fn leases_expire_and_waiters_get_them(env: &Env) {
        let a = env.bus("agent-a");
        let b = env.bus("agent-b");
        let held = a.lease("db").ttl(Duration::from_millis(400)).try_acquire().unwrap();
        let t1 = held.token();
        held.keep();
        let started = Instant::now();
        let taken = b.lease("db").acquire(Duration::from_secs(10)).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(250), "taken before its TTL");
        assert!(taken.token() > t1);
        // A release wakes a waiter.
        // With a 60 s poll, only the release's event wakes the waiter in time.
        let c = env.builder("agent-c").poll_interval(Duration::from_secs(60)).init(&env.location).unwrap();
        let t = std::thread::spawn(move || {
            c.lease("db").acquire(Duration::from_secs(10)).map(|l| l.token())
        });
        std::thread::sleep(Duration::from_millis(200));
        let t2 = taken.token();
        taken.release().unwrap();
        assert!(t.join().unwrap().unwrap() > t2);
    }

    /// Contenders racing for a free lease: exactly one wins each round, and every
    /// grant's token is higher than the last.
    fn racing_contenders_get_one_grant_each(env: &Env) {
        let mut last = 0;
        for round in 0..5 {
            let winners: Vec<(String, u64)> = std::thread::scope(|s| {
                let tries: Vec<_> = (0..6)
                    .map(|i| {
                        let bus = env.bus(&format!("agent-{i}"));
                        s.spawn(move || {
                            bus.lease("slot").ttl(Duration::from_secs(30)).try_acquire()
                                .map(|l| (l.holder().to_owned(), l.keep().token))
                        })
                    })
                    .collect();
                tries
                    .into_iter()
                    .filter_map(|t| match t.join().unwrap() {
                        Ok(won) => Some(won),
                        Err(Error::LeaseHeld { .. }) => None,
                        Err(e) => panic!("{e}"),
                    })
                    .collect()
            });
            assert_eq!(winners.len(), 1, "round {round}: {winners:?}");
            let (holder, token) = &winners[0];
            assert!(*token > last, "token {token} after {last}");
            last = *token;
            env.bus("referee").release_lease("slot", holder, *token).unwrap();
        }
    }

    /// A holder process killed by SIGKILL keeps a TTL lease until the TTL runs out; then
    /// the next contender gets it.
    fn a_sigkilled_ttl_holder_keeps_its_lease_until_the_ttl(env: &Env) {
        let bus = env.bus("next");
        let mut child = spawn_holder(&env.location, false, 2_000);
        child.kill().unwrap();
        child.wait().unwrap();
        let held = bus.lease_info("job").unwrap().unwrap();
        assert_eq!(held.holder.as_deref(), Some("doomed"));
        let early = bus.lease("job").holder("next").try_acquire();
        if time::OffsetDateTime::now_utc() < held.expires_at {
            assert!(matches!(early, Err(Error::LeaseHeld { .. })), "taken before the TTL");
        }
        let lease = bus.lease("job").holder("next").acquire(Duration::from_secs(20)).unwrap();
        assert!(time::OffsetDateTime::now_utc() >= held.expires_at);
        env.assert_next_token(held.token, lease.token());
    }

    /// A process-bound lease whose holder process is killed is free at once, with no TTL
    /// wait; JetStream has no process-bound leases (README).
    fn a_sigkilled_process_bound_holder_loses_its_lease_at_once(env: &Env) {
        let bus = env.bus("next");
        if env.is_nats() {
            return process_bound_leases_are_unsupported(&bus);
        }
        let mut child = spawn_holder(&env.location, true, 60_000);
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

    /// A contender waiting for a process-bound lease wakes when the holder process dies,
    /// long before the TTL; JetStream has no process-bound leases (README).
    fn a_waiting_contender_wakes_when_a_process_bound_holder_dies(env: &Env) {
        let bus = env.bus("waiter");
        if env.is_nats() {
            return process_bound_leases_are_unsupported(&bus);
        }
        let mut child = spawn_holder(&env.location, true, 60_000);
        let waiter = {
            let bus = bus.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                let lease = bus.lease("job").acquire(Duration::from_secs(50));
                (lease.map(|l| l.token()), started.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        child.kill().unwrap();
        child.wait().unwrap();
        let (token, waited) = waiter.join().unwrap();
        assert_eq!(token.unwrap(), 2);
        assert!(waited < Duration::from_secs(30), "waited for the TTL instead: {waited:?}");
    }

    /// Eight processes take a lease 1 000 times between them: no two holds overlap and
    /// tokens strictly increase (on the directory, the lease file stays compacted).
    fn eight_processes_contending_1000_times_never_overlap_and_tokens_increase(env: &Env) {
        let referee = env.bus("referee");
        let children: Vec<_> = (0..CONTENDERS)
            .map(|w| {
                common::child("leases::contender")
                    .env("BUS", &env.location)
                    .env("HOLDER", format!("agent-{w}"))
                    .env("HOLDS", (HOLDS / CONTENDERS).to_string())
                    .stdout(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let mut holds: Vec<(u64, u128, u128, String)> = Vec::new();
        for line in common::lines_of(children, "a contender") {
            let parts: Vec<&str> = line.split(' ').collect();
            if let ["HOLD", holder, token, start, end] = parts[..] {
                let (token, start, end) = (token.parse(), start.parse(), end.parse());
                holds.push((token.unwrap(), start.unwrap(), end.unwrap(), holder.into()));
            }
        }
        assert_eq!(holds.len(), HOLDS);
        holds.sort();
        for (i, pair) in holds.windows(2).enumerate() {
            let ((t1, _, end1, h1), (t2, start2, _, h2)) = (&pair[0], &pair[1]);
            assert!(t2 > t1, "tokens not strictly increasing at {i}: {t1} then {t2}");
            assert!(end1 < start2, "hold {t1} by {h1} overlaps hold {t2} by {h2}");
        }
        let holders: std::collections::HashSet<_> = holds.iter().map(|h| &h.3).collect();
        assert_eq!(holders.len(), CONTENDERS);
        let info = referee.lease_info("shared-resource").unwrap().unwrap();
        assert_eq!(info.token, holds.last().unwrap().0);
        // The lease file was compacted along the way.
        if let Some(root) = env.dir_path() {
            let size = std::fs::metadata(root.join("leases/shared-resource.jsonl")).unwrap().len();
            assert!(size < 20_000, "{size} bytes");
        }
    }
}

/// JetStream has no process-bound leases: no lock spans machines (README).
fn process_bound_leases_are_unsupported(bus: &Bus) {
    assert_unsupported(bus.lease("job").process_bound(true).try_acquire());
    assert_unsupported(
        bus.lease("job")
            .process_bound(true)
            .acquire(Duration::from_secs(1)),
    );
    assert_eq!(bus.lease_info("job").unwrap(), None, "nothing was granted");
}

/// Starts a process that takes the lease `job` as `doomed` and hangs; returns once it
/// holds the lease.
fn spawn_holder(bus: &str, process_bound: bool, ttl_ms: u64) -> std::process::Child {
    let mut child = common::child("leases::holder")
        .env("BUS", bus)
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
    let Some(bus) = common::child_env("BUS").map(|b| Bus::open(b).unwrap()) else {
        return;
    };
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

const CONTENDERS: usize = 8;
const HOLDS: usize = 1_000;

fn nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// One contender process of
/// `eight_processes_contending_1000_times_never_overlap_and_tokens_increase`.
#[test]
#[ignore = "runs only as a child process of another test"]
fn contender() {
    let Some(bus) = common::child_bus() else {
        return;
    };
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
