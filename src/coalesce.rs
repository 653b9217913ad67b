//! Coalescing: one delivery per burst of messages with the same key, for groups
//! ([`GroupOptions::coalesce`](crate::GroupOptions::coalesce)) and followers
//! ([`Follower::coalesce`](crate::Follower::coalesce)).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::clock::{ms, ts_ms};
use crate::{Error, Message, Result};

/// What makes two messages "the same" for [`Coalesce`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CoalesceBy {
    /// The message type (`"build.failed"`).
    Type,
    /// The correlation id; a message without one is never coalesced.
    CorrelationId,
    /// The value of this header; a message without the header is never coalesced.
    Header(String),
}

/// Leading-edge coalescing ("cooldown"): of a burst of messages with the same key,
/// the first is delivered and the others, sent less than `window` after it, are
/// *coalesced* into it: settled without being delivered.
///
/// Precisely: a message that passes the filter and has a key is coalesced when the
/// last message with that key that was delivered (its *leader*) comes before it in
/// the log and was sent (`ts`) less than `window` before it; otherwise it is delivered
/// and becomes the key's leader. So a key gets at most one delivery per window,
/// however long a burst lasts: with a window of 5 s and a message every second, the
/// ones sent at 0 s, 5 s, 10 s, ... are delivered. Messages with different keys, and
/// messages without a key, never coalesce with each other.
///
/// The window is measured between the messages' own timestamps (the senders'
/// clocks), not when a consumer happens to claim them: a group that was stopped for an
/// hour decides exactly as it would have live, every process and restart of it
/// decides alike, and so it is decided once, at the group's cursor. Redeliveries are
/// never coalesced, and what happens to the leader (acked, nacked, dead-lettered)
/// does not change what was coalesced into it.
///
/// Nothing is lost: a coalesced message stays in the log, other groups get it as
/// usual, a group counts it in [`GroupStats::coalesced`](crate::GroupStats::coalesced)
/// and records it with the seq it was folded into (FORMAT.md), and
/// [`Group::requeue`](crate::Group::requeue) delivers it after all.
///
/// ```
/// # fn main() -> agentbus::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// use std::time::Duration;
/// use agentbus::{Bus, Coalesce, CoalesceBy, GroupOptions, NewMessage};
/// let bus = Bus::init(dir.path())?;
/// let alerts = bus.create_mailbox("alerts")?;
/// let cooldown = Coalesce::new(CoalesceBy::Type, Duration::from_secs(60));
/// let pager = alerts.create_group_with("pager", GroupOptions::new().coalesce(cooldown))?;
/// let audit = alerts.create_group("audit")?;
/// for _ in 0..5 {
///     alerts.send(NewMessage::new("disk.full"))?;
/// }
/// alerts.send(NewMessage::new("cpu.hot"))?;
///
/// let paged: Vec<u64> = pager.claim("p1", 10)?.iter().map(|d| d.seq()).collect();
/// assert_eq!(paged, [1, 6]); // the first disk.full, and cpu.hot (another key)
/// assert_eq!(pager.stats()?.coalesced, 4);
/// assert_eq!(audit.claim("a1", 10)?.len(), 6); // other groups see every message
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[must_use]
pub struct Coalesce {
    by: CoalesceBy,
    window_ms: u64,
}

/// The longest window accepted (as for a visibility timeout).
const MAX_WINDOW: Duration = Duration::from_secs(365 * 86_400);

/// Keys longer than this are remembered by their SHA-256, so a huge header value
/// cannot bloat the group's state records.
const MAX_KEY_BYTES: usize = 128;

impl Coalesce {
    /// Coalesces messages with the same key `by` within `window` (from 1 ms to 365
    /// days; stored in ms).
    pub fn new(by: CoalesceBy, window: Duration) -> Self {
        Coalesce {
            by,
            window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// What the key is.
    pub fn by(&self) -> &CoalesceBy {
        &self.by
    }

    /// How long after a delivered message others with its key are coalesced into it.
    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }

    /// Refuses a window outside 1 ms to 365 days, or an empty header name.
    pub(crate) fn check(&self) -> Result<()> {
        let window = self.window();
        if window < Duration::from_millis(1) || window > MAX_WINDOW {
            return Err(Error::InvalidSetting {
                setting: "coalesce window",
                reason: format!("must be from 1 ms to 365 days, got {window:?}"),
            });
        }
        if matches!(&self.by, CoalesceBy::Header(h) if h.is_empty()) {
            return Err(Error::InvalidSetting {
                setting: "coalesce header",
                reason: "the header name must not be empty".into(),
            });
        }
        Ok(())
    }

    /// The key of `message`, if it has one.
    pub(crate) fn key(&self, message: &Message) -> Option<String> {
        let key = match &self.by {
            CoalesceBy::Type => &message.kind,
            CoalesceBy::CorrelationId => message.correlation_id.as_ref()?,
            CoalesceBy::Header(name) => message.headers.get(name)?,
        };
        if key.len() <= MAX_KEY_BYTES {
            return Some(key.clone());
        }
        use sha2::Digest;
        let digest = sha2::Sha256::digest(key.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        Some(format!("sha256:{hex}"))
    }

    /// What to do with `message`, which passed the filter and is delivered for the
    /// first time, given the `leaders` so far.
    pub(crate) fn decide(&self, leaders: &Leaders, message: &Message) -> Decision {
        let Some(key) = self.key(message) else {
            return Decision::Deliver;
        };
        let ts = ts_ms(message.ts);
        match leaders.0.get(&key) {
            Some(l) if l.seq < message.seq && ts < l.quiet_until => Decision::Coalesce(l.seq),
            _ => Decision::Lead {
                key,
                quiet_until: ts.saturating_add(ms(self.window())),
            },
        }
    }
}

/// What [`Coalesce::decide`] says about a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// No key: deliver it, as without coalescing.
    Deliver,
    /// Deliver it, and it leads `key` until `quiet_until` (ms, message time).
    Lead { key: String, quiet_until: i64 },
    /// Coalesce it into this seq.
    Coalesce(u64),
}

/// The leader of each key: the last message with it that was delivered, and until
/// when (ms, message time) later ones are coalesced into it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Leaders(BTreeMap<String, Leader>);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Leader {
    pub(crate) seq: u64,
    pub(crate) quiet_until: i64,
}

impl Leaders {
    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Message `seq`, sent at `ts` (ms), leads `key` until `quiet_until`. Leaders
    /// whose window closed before `ts` are forgotten: no message sent after `ts` can
    /// be coalesced into them, so what is remembered is bounded by the keys seen
    /// within one window.
    pub(crate) fn lead(&mut self, key: &str, seq: u64, ts: i64, quiet_until: i64) {
        self.0.retain(|_, l| l.quiet_until > ts);
        self.0.insert(key.to_owned(), Leader { seq, quiet_until });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(seq: u64, kind: &str, at_ms: i64) -> Message {
        let mut m: Message = serde_json::from_value(serde_json::json!({
            "seq": seq, "id": uuid::Uuid::now_v7(), "from": "a", "type": kind,
            "ts": "2026-01-01T00:00:00Z",
        }))
        .unwrap();
        m.ts += Duration::from_millis(at_ms as u64);
        m
    }

    /// Leading edge, one delivery per window per key, measured from the leader's
    /// timestamp (not the last coalesced one's), keys apart, never backwards in seq.
    #[test]
    fn a_key_is_delivered_at_most_once_per_window_from_its_leader() {
        let c = Coalesce::new(CoalesceBy::Type, Duration::from_millis(5_000));
        let mut leaders = Leaders::default();
        let sent = [
            (1, "a", 0),
            (2, "a", 1_000),
            (3, "b", 1_500),
            (4, "a", 4_999),
            (5, "a", 5_000),
            (6, "a", 9_999),
            (7, "b", 7_000),
            (8, "a", 10_000),
        ];
        let mut delivered = Vec::new();
        for (seq, kind, at) in sent {
            let m = message(seq, kind, at);
            match c.decide(&leaders, &m) {
                Decision::Lead { key, quiet_until } => {
                    leaders.lead(&key, seq, ts_ms(m.ts), quiet_until);
                    delivered.push(seq);
                }
                Decision::Coalesce(into) => {
                    assert!(into < seq);
                }
                Decision::Deliver => panic!("every message has a type"),
            }
        }
        assert_eq!(delivered, [1, 3, 5, 7, 8]);
        // Leaders whose window closed were forgotten: only the last two remain.
        assert_eq!(leaders.0.len(), 2);
    }

    #[test]
    fn messages_without_the_key_are_always_delivered_and_long_keys_are_hashed() {
        let by_corr = Coalesce::new(CoalesceBy::CorrelationId, Duration::from_secs(5));
        let by_host = Coalesce::new(CoalesceBy::Header("host".into()), Duration::from_secs(5));
        let m = message(1, "a", 0);
        assert_eq!(by_corr.decide(&Leaders::default(), &m), Decision::Deliver);
        assert_eq!(by_host.decide(&Leaders::default(), &m), Decision::Deliver);
        let mut m = message(2, "a", 0);
        m.headers.insert("host".into(), "x".repeat(10_000));
        let key = by_host.key(&m).unwrap();
        assert!(key.starts_with("sha256:") && key.len() == 7 + 64, "{key}");
        m.headers.insert("host".into(), "web-1".into());
        assert_eq!(by_host.key(&m).as_deref(), Some("web-1"));
    }

    #[test]
    fn check_refuses_an_empty_window_or_header() {
        assert!(Coalesce::new(CoalesceBy::Type, Duration::ZERO)
            .check()
            .is_err());
        let long = Duration::from_secs(366 * 86_400);
        assert!(Coalesce::new(CoalesceBy::Type, long).check().is_err());
        let empty = CoalesceBy::Header(String::new());
        assert!(Coalesce::new(empty, Duration::from_secs(1))
            .check()
            .is_err());
        let ok = Coalesce::new(CoalesceBy::Header("h".into()), Duration::from_millis(1));
        assert!(ok.check().is_ok());
    }
}
