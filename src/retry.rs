//! Retry policies: how long a consumer group waits before it delivers a failed message
//! again, and which failures it does not retry at all.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// A group's retry policy: exponential backoff with a cap and jitter, and the reason
/// classes that are not worth retrying. Stored with the group (`group.json`, or the
/// JetStream consumer) and set with [`GroupOptions::retry`](crate::GroupOptions::retry).
///
/// The delay after attempt `n` fails is `initial * multiplier^(n-1)`, capped at `max`,
/// then shortened by up to `jitter` of itself (`0.2`: a delay from 80 % to 100 % of
/// that), so the cap is a true maximum. The jitter is derived from the message's seq
/// and the attempt: messages that fail together spread out, and every process computes
/// the same delay for the same failure.
///
/// The policy applies to:
///
/// - a retry, [`Delivery::retry`](crate::Delivery::retry) /
///   [`Group::retry`](crate::Group::retry) (a nack without an explicit delay; the
///   CLI's `nack` without `--delay`, `watch --exec` without `--retry-delay`);
/// - a claim that ran out: the message is delivered again once its visibility timeout
///   *and* the policy's delay for that attempt are over;
/// - every nack, with or without a delay, whose reason's [class](RetryPolicy::class_of)
///   is in [`no_retry_on`](RetryPolicy::no_retry_on): the message goes to the group's
///   dead-letter mailbox at once, with the reason `not retryable: <reason>`.
///
/// The group's `max_deliveries` still bounds the deliveries: a retry of the last one
/// dead-letters the message, as a nack does. A group without a policy keeps the fixed
/// behaviour: a retry redelivers at once, an expired claim as soon as it runs out.
///
/// ```
/// # fn main() -> agentbus::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// use std::time::Duration;
/// use agentbus::{GroupOptions, RetryOutcome, RetryPolicy};
///
/// let policy = RetryPolicy::exponential(Duration::from_secs(1), 2.0, Duration::from_secs(30))
///     .jitter(0.2)
///     .no_retry_on("invalid_payload");
/// assert_eq!(policy.delay(1), Duration::from_secs(1));
/// assert_eq!(policy.delay(3), Duration::from_secs(4));
/// assert_eq!(policy.delay(9), Duration::from_secs(30)); // the cap
///
/// let bus = agentbus::Bus::init(dir.path())?;
/// let jobs = bus.create_mailbox("jobs")?;
/// let workers = jobs.create_group_with("w", GroupOptions::new().retry(policy))?;
/// jobs.send(agentbus::NewMessage::new("job"))?;
/// jobs.send(agentbus::NewMessage::new("job"))?;
///
/// // A transient failure: back after about a second (800 ms to 1 s, the jitter).
/// let first = workers.claim_one("w1")?.unwrap();
/// match first.retry(Some("timeout: the API did not answer"))? {
///     RetryOutcome::Scheduled { delay } => assert!(delay <= Duration::from_secs(1)),
///     other => panic!("{other:?}"),
/// }
/// // A failure of a class marked `no_retry_on`: straight to the dead-letter mailbox.
/// let second = workers.claim_one("w1")?.unwrap();
/// let outcome = second.retry(Some("invalid_payload: no \"url\" field"))?;
/// assert!(matches!(outcome, RetryOutcome::DeadLettered { .. }));
/// let dead = bus.mailbox("jobs.dlq")?.messages().next().unwrap()?;
/// assert_eq!(
///     dead.dead_letter().unwrap().reason,
///     "not retryable: invalid_payload: no \"url\" field"
/// );
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[must_use]
pub struct RetryPolicy {
    initial_ms: u64,
    multiplier: f64,
    max_ms: u64,
    #[serde(default)]
    jitter: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    no_retry_on: Vec<String>,
}

/// How a retry ended: see [`Delivery::retry`](crate::Delivery::retry).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RetryOutcome {
    /// Given back: the message is delivered again after `delay` (zero: at once).
    Scheduled {
        /// How long the group waits before delivering it again.
        delay: Duration,
    },
    /// Sent to the group's dead-letter mailbox: the reason's class is not retryable,
    /// or that was the last delivery the message gets.
    DeadLettered {
        /// The reason the dead letter records.
        reason: String,
    },
}

/// The longest delay a policy may have: as long as the longest visibility timeout.
const MAX_DELAY: Duration = Duration::from_secs(365 * 86_400);

/// At most this many non-retryable classes, each at most [`MAX_CLASS_LEN`] bytes: the
/// policy is stored in a JetStream consumer's description (4 KiB with the rest).
const MAX_CLASSES: usize = 32;
const MAX_CLASS_LEN: usize = 64;

impl RetryPolicy {
    /// Delays growing from `initial` by `multiplier` per attempt, up to `max`, without
    /// jitter. Delays are kept in whole milliseconds (less is cut off).
    /// [`Mailbox::create_group_with`](crate::Mailbox::create_group_with) refuses, with
    /// [`Error::InvalidSetting`], an `initial` below 1 ms, a `multiplier` below 1 (or
    /// not finite), a `max` below `initial` or above 365 days.
    pub fn exponential(initial: Duration, multiplier: f64, max: Duration) -> Self {
        RetryPolicy {
            initial_ms: initial.as_millis().min(u64::MAX as u128) as u64,
            multiplier,
            max_ms: max.as_millis().min(u64::MAX as u128) as u64,
            jitter: 0.0,
            no_retry_on: Vec::new(),
        }
    }

    /// The same delay after every failure.
    pub fn fixed(delay: Duration) -> Self {
        RetryPolicy::exponential(delay, 1.0, delay)
    }

    /// Shortens each delay by up to this fraction of it, from 0 (none, the default) to
    /// 1 (anywhere from zero to the delay).
    pub fn jitter(mut self, fraction: f64) -> Self {
        self.jitter = fraction;
        self
    }

    /// Marks a reason class as not retryable (call again for several): a nack whose
    /// reason has this [class](Self::class_of) dead-letters the message at once. A
    /// class is 1 to 64 letters, digits, `_`, `-` or `.`.
    pub fn no_retry_on(mut self, class: impl Into<String>) -> Self {
        let class = class.into();
        if let Err(at) = self.no_retry_on.binary_search(&class) {
            self.no_retry_on.insert(at, class);
        }
        self
    }

    /// The delay after the first failure.
    pub fn initial_delay(&self) -> Duration {
        Duration::from_millis(self.initial_ms)
    }

    /// How much each delay grows over the one before.
    pub fn multiplier(&self) -> f64 {
        self.multiplier
    }

    /// The longest delay.
    pub fn max_delay(&self) -> Duration {
        Duration::from_millis(self.max_ms)
    }

    /// The jitter fraction (see [`jitter`](Self::jitter)).
    pub fn jitter_fraction(&self) -> f64 {
        self.jitter
    }

    /// The classes that are not retried, sorted.
    pub fn non_retryable(&self) -> &[String] {
        &self.no_retry_on
    }

    /// The delay after attempt `attempt` fails, before jitter: `initial *
    /// multiplier^(attempt-1)`, at most `max` (attempt 0 counts as 1).
    pub fn delay(&self, attempt: u32) -> Duration {
        Duration::from_millis(self.delay_ms(attempt))
    }

    fn delay_ms(&self, attempt: u32) -> u64 {
        let exponent = attempt.saturating_sub(1).min(i32::MAX as u32) as i32;
        let grown = self.initial_ms as f64 * self.multiplier.powi(exponent);
        if grown.is_finite() && grown < self.max_ms as f64 {
            grown as u64
        } else {
            self.max_ms
        }
    }

    /// The delay before message `seq` is delivered again after attempt `attempt`
    /// failed: [`delay`](Self::delay) shortened by its jitter, which is derived from
    /// `seq` and `attempt`.
    pub(crate) fn delay_for(&self, seq: u64, attempt: u32) -> Duration {
        let base = self.delay_ms(attempt) as f64;
        let cut = base * self.jitter * unit(seq, attempt);
        Duration::from_millis((base - cut).max(0.0) as u64)
    }

    /// The class of a reason: its leading word (letters, digits, `_`, `-`, `.`) when a
    /// `:` follows it at once, as in `invalid_payload: no "url" field` or a Python
    /// exception's last line, `ValueError: bad input`. `None` for a reason without
    /// one (`the API did not answer`).
    ///
    /// ```
    /// use agentbus::RetryPolicy;
    /// assert_eq!(RetryPolicy::class_of("timeout: no answer in 5 s"), Some("timeout"));
    /// assert_eq!(RetryPolicy::class_of("  ValueError: bad input"), Some("ValueError"));
    /// assert_eq!(RetryPolicy::class_of("handler exited with 1: oops"), None);
    /// ```
    pub fn class_of(reason: &str) -> Option<&str> {
        let reason = reason.trim_start();
        let (class, _) = reason.split_once(':')?;
        is_class(class).then_some(class)
    }

    /// Whether a nack with this reason is retried: `false` if its class is marked
    /// [`no_retry_on`](Self::no_retry_on).
    pub fn retries(&self, reason: Option<&str>) -> bool {
        match reason.and_then(RetryPolicy::class_of) {
            Some(class) => self
                .no_retry_on
                .binary_search_by(|c| c.as_str().cmp(class))
                .is_err(),
            None => true,
        }
    }

    /// Refuses settings that cannot work, saying what to give instead.
    pub(crate) fn check(&self) -> Result<()> {
        let refuse = |setting, reason: String| Err(Error::InvalidSetting { setting, reason });
        let max_ms = MAX_DELAY.as_millis() as u64;
        if self.initial_ms == 0 {
            return refuse(
                "retry.initial",
                "must be at least 1 ms; for redelivery at once, create the group without \
                 a retry policy"
                    .into(),
            );
        }
        if !self.multiplier.is_finite() || self.multiplier < 1.0 {
            return refuse(
                "retry.multiplier",
                format!(
                    "must be a number of at least 1 (1 keeps the delay fixed), got {}",
                    self.multiplier
                ),
            );
        }
        if self.max_ms < self.initial_ms || self.max_ms > max_ms {
            return refuse(
                "retry.max",
                format!(
                    "must be from the initial delay ({} ms) to 365 days, got {} ms",
                    self.initial_ms, self.max_ms
                ),
            );
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return refuse(
                "retry.jitter",
                format!(
                    "must be a fraction from 0 to 1 (0.2: up to 20 % shorter), got {}",
                    self.jitter
                ),
            );
        }
        if self.no_retry_on.len() > MAX_CLASSES {
            return refuse(
                "retry.no_retry_on",
                format!(
                    "at most {MAX_CLASSES} classes, got {}",
                    self.no_retry_on.len()
                ),
            );
        }
        if let Some(bad) = self.no_retry_on.iter().find(|c| !is_class(c)) {
            return refuse(
                "retry.no_retry_on",
                format!(
                    "{bad:?} is not a reason class: give 1 to {MAX_CLASS_LEN} letters, \
                     digits, `_`, `-` or `.`, the word before the `:` of a reason"
                ),
            );
        }
        Ok(())
    }
}

/// A reason class: 1 to [`MAX_CLASS_LEN`] letters, digits, `_`, `-` or `.`.
fn is_class(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_CLASS_LEN
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

/// A number in `[0, 1)` that depends only on `seq` and `attempt` (splitmix64).
fn unit(seq: u64, attempt: u32) -> f64 {
    let mut z = seq ^ (u64::from(attempt) << 40) ^ 0x9e37_79b9_7f4a_7c15;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_by_the_multiplier_up_to_the_cap() {
        let p = RetryPolicy::exponential(Duration::from_millis(100), 3.0, Duration::from_secs(2));
        let got: Vec<u64> = (0..=6).map(|a| p.delay(a).as_millis() as u64).collect();
        assert_eq!(got, [100, 100, 300, 900, 2000, 2000, 2000]);
        assert_eq!(p.delay(u32::MAX), Duration::from_secs(2));
        assert!(p.check().is_ok());
    }

    #[test]
    fn jitter_shortens_by_at_most_its_fraction_and_spreads() {
        let p = RetryPolicy::fixed(Duration::from_secs(10)).jitter(0.5);
        let delays: Vec<Duration> = (1..200).map(|seq| p.delay_for(seq, 1)).collect();
        assert!(delays
            .iter()
            .all(|d| *d >= Duration::from_secs(5) && *d <= Duration::from_secs(10)));
        let (lo, hi) = (delays.iter().min().unwrap(), delays.iter().max().unwrap());
        assert!(*hi - *lo > Duration::from_secs(4), "spread {lo:?}..{hi:?}");
        assert_eq!(
            p.delay_for(7, 3),
            p.delay_for(7, 3),
            "the same in every process"
        );
        let none = RetryPolicy::fixed(Duration::from_secs(10));
        assert_eq!(none.delay_for(7, 3), Duration::from_secs(10));
    }

    #[test]
    fn bad_settings_are_refused_with_the_setting_named() {
        let s = Duration::from_secs(1);
        let cases = [
            (
                RetryPolicy::exponential(Duration::ZERO, 2.0, s),
                "retry.initial",
            ),
            (RetryPolicy::exponential(s, 0.5, s * 2), "retry.multiplier"),
            (
                RetryPolicy::exponential(s, f64::NAN, s * 2),
                "retry.multiplier",
            ),
            (RetryPolicy::exponential(s * 2, 2.0, s), "retry.max"),
            (RetryPolicy::exponential(s, 2.0, MAX_DELAY * 2), "retry.max"),
            (RetryPolicy::fixed(s).jitter(1.5), "retry.jitter"),
            (RetryPolicy::fixed(s).jitter(-0.1), "retry.jitter"),
            (
                RetryPolicy::fixed(s).no_retry_on("bad class"),
                "retry.no_retry_on",
            ),
            (RetryPolicy::fixed(s).no_retry_on(""), "retry.no_retry_on"),
        ];
        for (policy, setting) in cases {
            match policy.check() {
                Err(Error::InvalidSetting { setting: s, .. }) => assert_eq!(s, setting),
                other => panic!("{policy:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn classes_are_the_word_before_a_colon() {
        let p = RetryPolicy::fixed(Duration::from_secs(1))
            .no_retry_on("invalid_payload")
            .no_retry_on("unauthorized")
            .no_retry_on("invalid_payload");
        assert_eq!(p.non_retryable(), ["invalid_payload", "unauthorized"]);
        assert!(!p.retries(Some("invalid_payload: no url")));
        assert!(!p.retries(Some("unauthorized:")));
        assert!(p.retries(Some("invalid_payloads: no url")));
        assert!(p.retries(Some("invalid_payload")), "no colon, no class");
        assert!(p.retries(Some("the invalid_payload: x")));
        assert!(p.retries(None));
    }
}
