//! Retry policies on both backends: delays that grow by the multiplier up to the cap
//! (for retries and for expired claims), reasons that are not retried, and a policy
//! that survives reopening the group. Timings are checked from below with a few ms
//! for rounding (a redelivery never comes early) and from above with margins that
//! hold on a loaded 2-core machine.

use std::time::{Duration, Instant};

use agentbus::{Error, GroupOptions, NewMessage, RetryOutcome, RetryPolicy};

use crate::{common, Env};

/// How early a redelivery may seem to come: delays are kept in whole milliseconds
/// and timestamps are taken on either side of a call.
const ROUNDING: Duration = Duration::from_millis(15);

/// How late a redelivery may come on a loaded machine before the test calls it lost.
const LATE: Duration = Duration::from_millis(2_500);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// Claims one message, polling every 5 ms until one comes (at most `expected` plus
/// [`LATE`]), and returns it with the time it took from `since`.
fn claim_after(
    g: &agentbus::Group,
    since: Instant,
    expected: Duration,
) -> (agentbus::Delivery, Duration) {
    loop {
        if let Some(d) = g.claim_one("w").unwrap() {
            return (d, since.elapsed());
        }
        assert!(
            since.elapsed() < expected + LATE,
            "not redelivered within {:?}",
            expected + LATE
        );
        std::thread::sleep(ms(5));
    }
}

behaviours! {
    /// Each retry waits the policy's delay for its attempt: 150, 300, 600 ms, then the
    /// 600 ms cap; the retry of the last delivery dead-letters the message with the
    /// reason. No redelivery comes early.
    fn retry_delays_grow_by_the_multiplier_up_to_the_cap(env: &Env) {
        let bus = env.bus("writer");
        let mb = bus.create_mailbox("jobs").unwrap();
        let policy = RetryPolicy::exponential(ms(150), 2.0, ms(600));
        let opts = GroupOptions::new().max_deliveries(5).retry(policy);
        let g = mb.create_group_with("w", opts).unwrap();
        mb.send(NewMessage::new("job")).unwrap();
        let mut d = g.claim_one("w").unwrap().unwrap();
        let mut waits = Vec::new();
        for (attempt, expected) in [(1, 150), (2, 300), (3, 600), (4, 600)] {
            assert_eq!(d.attempt, attempt);
            let outcome = d.retry(Some("timeout: the API did not answer")).unwrap();
            let given_back = Instant::now();
            assert_eq!(outcome, RetryOutcome::Scheduled { delay: ms(expected) });
            let (next, waited) = claim_after(&g, given_back, ms(expected));
            assert!(waited + ROUNDING >= ms(expected), "attempt {attempt}: back after {waited:?}, before {expected} ms");
            waits.push(waited);
            d = next;
        }
        // Growth is measured, not only each floor: the second wait is longer than the
        // first, the third longer than the second.
        eprintln!("retry waits: {waits:?}");
        assert!(waits[1] > waits[0] && waits[2] > waits[1], "{waits:?}");
        assert_eq!(d.attempt, 5);
        let outcome = d.retry(Some("timeout: still no answer")).unwrap();
        let reason = "max deliveries (5) reached: timeout: still no answer";
        assert_eq!(outcome, RetryOutcome::DeadLettered { reason: reason.into() });
        let dead = bus.mailbox("jobs.dlq").unwrap().messages().next().unwrap().unwrap();
        assert_eq!(dead.dead_letter().unwrap().reason, reason);
        assert!(g.claim_one("w").unwrap().is_none());
    }

    /// A claim that runs out is redelivered once its visibility timeout and then the
    /// policy's delay for that attempt are over: 250 + 400 ms after the first claim,
    /// 250 + 800 ms after the second (on JetStream: the consumer's `backoff` list).
    fn an_expired_claim_waits_the_policys_delay_for_its_attempt(env: &Env) {
        let bus = env.bus("writer");
        let mb = bus.create_mailbox("jobs").unwrap();
        let policy = RetryPolicy::exponential(ms(400), 2.0, ms(5_000));
        let opts = GroupOptions::new().visibility(ms(250)).retry(policy);
        let g = mb.create_group_with("w", opts).unwrap();
        mb.send(NewMessage::new("job")).unwrap();
        let claimed = Instant::now();
        let first = g.claim_one("w").unwrap().unwrap();
        assert_eq!(first.attempt, 1);
        let (second, waited) = claim_after(&g, claimed, ms(650));
        assert_eq!(second.attempt, 2);
        assert!(waited + ROUNDING >= ms(650), "back after {waited:?}, before 650 ms");
        let claimed = Instant::now();
        let (third, waited2) = claim_after(&g, claimed, ms(1_050));
        assert_eq!(third.attempt, 3);
        assert!(waited2 + ROUNDING >= ms(1_050), "back after {waited2:?}, before 1050 ms");
        eprintln!("expired-claim waits: {waited:?} then {waited2:?}");
        assert!(waited2 > waited, "{waited:?} then {waited2:?}");
        // The history says how the claims ended.
        third.dead_letter("enough").unwrap();
        let dead = bus.mailbox("jobs.dlq").unwrap().messages().next().unwrap().unwrap();
        let info = dead.dead_letter().unwrap();
        if !env.is_nats() {
            let outcomes: Vec<_> = info.attempts.iter().map(|a| a.outcome.as_str()).collect();
            assert_eq!(outcomes, ["expired", "expired", "rejected"]);
        }
    }

    /// A nack whose reason's class is marked `no_retry_on` goes straight to the
    /// dead-letter mailbox with its reason, at the first attempt, whether it is a retry
    /// or a nack with an explicit delay; other classes, and reasons without one, are
    /// retried.
    fn a_non_retryable_reason_goes_straight_to_the_dead_letter_mailbox(env: &Env) {
        let bus = env.bus("writer");
        let mb = bus.create_mailbox("jobs").unwrap();
        let policy = RetryPolicy::fixed(ms(10)).no_retry_on("invalid_payload").no_retry_on("unauthorized");
        let g = mb.create_group_with("w", GroupOptions::new().max_deliveries(9).retry(policy)).unwrap();
        common::send_n(&mb, 4);

        let d = g.claim_one("w").unwrap().unwrap();
        let outcome = d.retry(Some("invalid_payload: no \"url\" field")).unwrap();
        let reason = "not retryable: invalid_payload: no \"url\" field";
        assert_eq!(outcome, RetryOutcome::DeadLettered { reason: reason.into() });
        let d = g.claim_one("w").unwrap().unwrap();
        assert_eq!(d.seq(), 2, "the first is gone");
        d.nack(Duration::from_secs(60), Some("unauthorized: token expired")).unwrap();
        // A class not listed, and a reason without a class, are retried.
        let d = g.claim_one("w").unwrap().unwrap();
        assert_eq!(d.retry(Some("timeout: slow")).unwrap(), RetryOutcome::Scheduled { delay: ms(10) });
        let d = g.claim_one("w").unwrap().unwrap();
        assert_eq!(d.seq(), 4);
        assert!(matches!(d.retry(Some("invalid_payload")).unwrap(), RetryOutcome::Scheduled { .. }));
        let mut seqs = Vec::new();
        while seqs.len() < 2 {
            let d = common::claim_within(&g, "w", Duration::from_secs(10));
            seqs.push(d.seq());
            d.ack().unwrap();
        }
        seqs.sort();
        assert_eq!(seqs, [3, 4]);

        let dead: Vec<_> = bus.mailbox("jobs.dlq").unwrap().messages().map(Result::unwrap).collect();
        assert_eq!(dead.len(), 2);
        let infos: Vec<_> = dead.iter().map(|m| m.dead_letter().unwrap()).collect();
        assert_eq!((infos[0].seq, infos[0].reason.as_str()), (Some(1), reason));
        assert_eq!((infos[1].seq, infos[1].reason.as_str()), (Some(2), "not retryable: unauthorized: token expired"));
        for info in &infos {
            let last = info.attempts.last().unwrap();
            assert_eq!((last.attempt, last.outcome.as_str()), (1, "nacked"));
        }
        assert_eq!(infos[1].attempts[0].reason.as_deref(), Some("unauthorized: token expired"));
    }

    /// The policy is stored with the group: another handle (another process) reads it
    /// back and applies it, `create_or_open_group` accepts the same policy and names
    /// `retry` when it differs, and a group without one reports none.
    fn the_retry_policy_survives_reopening_the_group(env: &Env) {
        let bus = env.bus("writer");
        let mb = bus.create_mailbox("jobs").unwrap();
        let policy = RetryPolicy::exponential(ms(700), 1.5, Duration::from_secs(20))
            .jitter(0.25)
            .no_retry_on("invalid_payload");
        let opts = GroupOptions::new().retry(policy.clone());
        mb.create_group_with("w", opts.clone()).unwrap();
        mb.create_group("plain").unwrap();

        let again = env.group("other", "jobs", "w");
        assert_eq!(again.retry_policy(), Some(&policy));
        assert_eq!(again.retry_policy().unwrap().non_retryable(), ["invalid_payload"]);
        assert_eq!(env.group("other", "jobs", "plain").retry_policy(), None);
        let other = env.bus("other").mailbox("jobs").unwrap();
        assert_eq!(other.create_or_open_group("w", opts).unwrap().retry_policy(), Some(&policy));
        for differs in [
            GroupOptions::new().retry(policy.clone().jitter(0.5)),
            GroupOptions::new().retry(policy.clone().no_retry_on("timeout")),
            GroupOptions::new(),
        ] {
            match other.create_or_open_group("w", differs) {
                Err(Error::GroupSettingsDiffer { differences, .. }) => {
                    assert!(differences.starts_with("retry: {\"initial_ms\":700"), "{differences}")
                }
                got => panic!("expected GroupSettingsDiffer, got {got:?}"),
            }
        }
        // The reopened handle applies it: 700 ms less at most a quarter.
        mb.send(NewMessage::new("job")).unwrap();
        let d = again.claim_one("w").unwrap().unwrap();
        match d.retry(Some("timeout: x")).unwrap() {
            RetryOutcome::Scheduled { delay } => assert!(delay >= ms(525) && delay <= ms(700), "{delay:?}"),
            other => panic!("{other:?}"),
        }
        // By seq through the handle that holds it, too (the directory: any handle).
        let held = again.in_flight(1).unwrap();
        assert!(held.is_none(), "given back");
        let d = common::claim_within(&again, "w", Duration::from_secs(5));
        assert_eq!(d.attempt, 2);
        match again.retry(1, Some("timeout: y")).unwrap() {
            RetryOutcome::Scheduled { delay } => assert!(delay >= ms(787) && delay <= ms(1_050), "{delay:?}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(again.retry(1, None), Err(Error::StaleDelivery { .. } | Error::Unsupported { .. })));
    }

    /// Settings that cannot work are refused with the setting named, and nothing is
    /// created.
    fn an_unusable_retry_policy_is_refused(env: &Env) {
        let bus = env.bus("writer");
        let mb = bus.create_mailbox("jobs").unwrap();
        for (policy, setting) in [
            (RetryPolicy::exponential(ms(0), 2.0, ms(10)), "retry.initial"),
            (RetryPolicy::exponential(ms(10), 0.5, ms(100)), "retry.multiplier"),
            (RetryPolicy::exponential(ms(100), 2.0, ms(10)), "retry.max"),
            (RetryPolicy::fixed(ms(10)).jitter(2.0), "retry.jitter"),
            (RetryPolicy::fixed(ms(10)).no_retry_on("two words"), "retry.no_retry_on"),
        ] {
            match mb.create_group_with("w", GroupOptions::new().retry(policy)) {
                Err(Error::InvalidSetting { setting: s, .. }) => assert_eq!(s, setting),
                got => panic!("expected InvalidSetting {setting}, got {got:?}"),
            }
        }
        assert!(mb.groups().unwrap().is_empty());
    }
}
