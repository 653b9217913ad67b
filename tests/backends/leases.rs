//! Leases on both backends: exclusive holds with strictly increasing fencing tokens,
//! stale tokens refused, renew/release/transfer, expiry, waiters woken by a release,
//! holder processes killed, and eight contending processes.

use std::time::{Duration, Instant};

use agentbus::Error;

use crate::Env;

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
}
