//! A group's retry policy on JetStream: the consumer's `backoff` list for expired
//! claims, and the delay a NAK must carry for the server to wait the policy's delay.
//!
//! With a `backoff` list, the server (nats-server `consumer.go`) takes its first value
//! as `ack_wait`, times delivery `n` with value `n` (the last one repeating), restarts
//! that timer on `+WPI`, and accepts any list length when `max_deliver` is -1 (else it
//! must exceed it). A NAK with a delay sets the delivery's clock to `now - ack_wait +
//! delay`, so the redelivery comes after `delay` plus the difference between that
//! delivery's timer and the first one: [`nak_delay`] takes it off.

use std::time::Duration;

use crate::backend::GroupMeta;

/// The longest `backoff` list a group's consumer gets; later deliveries repeat its
/// last value.
const MAX_BACKOFF: usize = 100;

/// The `backoff` list for a group's retry policy: delivery `n`'s timer is the
/// visibility timeout plus the policy's delay for attempt `n` (without jitter: the
/// list is fixed), until the delay reaches its cap or the group's last delivery.
/// Empty without a policy.
pub(crate) fn backoff(meta: &GroupMeta) -> Vec<Duration> {
    let Some(policy) = &meta.retry else {
        return Vec::new();
    };
    let visibility = Duration::from_millis(meta.visibility_ms.max(1));
    let mut list = Vec::new();
    for attempt in 1..=meta.max_deliveries.min(MAX_BACKOFF as u32) {
        list.push(visibility + policy.delay(attempt));
        if policy.delay(attempt) >= policy.max_delay() {
            break;
        }
    }
    list
}

/// The delay to send with a NAK of `attempt` so that the message comes back after
/// `delay`. The server times a delayed NAK from `ack_wait` (the list's first value)
/// but redelivers once the timer of the delivery has passed (its `backoff` value), so
/// it adds their difference, which is taken off here (down to 1 ms: a shorter
/// delay cannot be asked for, and zero would be a NAK at once).
pub(crate) fn nak_delay(backoff: &[Duration], attempt: u32, delay: Duration) -> Duration {
    let (Some(first), Some(last)) = (backoff.first(), backoff.last()) else {
        return delay;
    };
    let timer = backoff
        .get(attempt.saturating_sub(1) as usize)
        .unwrap_or(last);
    delay
        .saturating_sub(timer.saturating_sub(*first))
        .max(Duration::from_millis(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Filter, RetryPolicy};

    fn meta(retry: Option<RetryPolicy>, max_deliveries: u32) -> GroupMeta {
        GroupMeta {
            format: 1,
            max_deliveries,
            visibility_ms: 1_000,
            dead_letter: "x.dlq".into(),
            filter: Filter::new(),
            coalesce: None,
            retry,
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_list_is_visibility_plus_each_delay_until_the_cap_or_the_last_delivery() {
        let policy = RetryPolicy::exponential(ms(100), 2.0, ms(500)).jitter(0.5);
        let list = backoff(&meta(Some(policy.clone()), 10));
        assert_eq!(list, [ms(1_100), ms(1_200), ms(1_400), ms(1_500)]);
        assert_eq!(backoff(&meta(Some(policy), 2)), [ms(1_100), ms(1_200)]);
        assert!(backoff(&meta(None, 5)).is_empty());
        let slow = RetryPolicy::exponential(ms(1), 1.001, Duration::from_secs(3_600));
        assert_eq!(backoff(&meta(Some(slow), u32::MAX)).len(), MAX_BACKOFF);
    }

    #[test]
    fn a_nak_delay_takes_off_what_the_server_adds() {
        let list = [ms(1_100), ms(1_200), ms(1_400), ms(1_500)];
        // The server waits `sent + (list[attempt-1] - list[0])`.
        for (attempt, delay, sent) in [
            (1, 100, 100),
            (2, 200, 100),
            (3, 400, 100),
            (4, 500, 100),
            (9, 500, 100),
            (3, 1_000, 700),
        ] {
            assert_eq!(
                nak_delay(&list, attempt, ms(delay)),
                ms(sent),
                "attempt {attempt}"
            );
        }
        // Jitter can ask for less than the server adds: as little as it can.
        assert_eq!(nak_delay(&list, 3, ms(250)), ms(1));
        assert_eq!(nak_delay(&[], 3, ms(250)), ms(250));
    }
}
