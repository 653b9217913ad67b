//! Dead letters: what a group sends to its dead-letter mailbox, and how to read and
//! replay it.

use std::path::PathBuf;

use serde::Deserialize;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::{Message, NewMessage};

/// The header a dead letter carries: JSON with the source mailbox, group, seq, id, the
/// reason and every attempt.
pub const DEAD_LETTER_HEADER: &str = "dead_letter";

/// The type of the notice a group sends to its dead-letter mailbox when damaged records
/// (or missing seqs) stand in its path: its [`DEAD_LETTER_HEADER`] says where
/// (`mailbox`, `group`, `first_seq`, `last_seq`, `path`, `line`) and why (`reason`).
/// Once the record is repaired, [`Group::requeue`](crate::Group::requeue) delivers it.
pub const DAMAGED_TYPE: &str = "agentbus.damaged";

impl NewMessage {
    /// A new message with the same content as `message` (type, from, subject, body,
    /// payload, artifacts, correlation id, priority, headers other than
    /// [`DEAD_LETTER_HEADER`]): for replaying a dead letter into its mailbox.
    ///
    /// Its idempotency key is `replay:<id of message>`, so replaying the same dead
    /// letter again (a retried script, a second operator) returns the first replay's
    /// receipt instead of sending a second copy. A replayed message that dies again is
    /// a new dead letter, with a new id, and can be replayed in turn.
    pub fn replay_of(message: &Message) -> NewMessage {
        let mut m = NewMessage::new(message.kind.clone()).from(message.from.clone());
        m.subject = message.subject.clone();
        m.body = message.body.clone();
        m.payload = message.payload.clone();
        m.artifacts = message.artifacts.clone();
        m.correlation_id = message.correlation_id.clone();
        m.causation_id = message.causation_id.clone();
        m.priority = message.priority;
        m.headers = message.headers.clone();
        m.headers.remove(DEAD_LETTER_HEADER);
        m.idempotency_key = Some(format!("replay:{}", message.id));
        m
    }
}

/// Where a dead letter came from and why: the typed form of its
/// [`DEAD_LETTER_HEADER`], from [`Message::dead_letter`]. For a
/// [`DAMAGED_TYPE`] notice, `seq` and `id` are `None` and `damaged` says where.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadLetter {
    /// The mailbox the message was delivered from.
    pub mailbox: String,
    /// The group that gave up on it.
    pub group: String,
    /// The message's seq in `mailbox`.
    pub seq: Option<u64>,
    /// The message's id.
    pub id: Option<Uuid>,
    /// Why it was given up on.
    pub reason: String,
    /// How each delivery ended, oldest first.
    pub attempts: Vec<DeadAttempt>,
    /// For a damage notice: where the damage is.
    pub damaged: Option<Damaged>,
}

/// How one delivery of a dead letter ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct DeadAttempt {
    /// 1 for the first delivery, ...
    pub attempt: u32,
    /// Who held the claim, if anyone.
    pub consumer: Option<String>,
    /// `"nacked"`, `"expired"`, or `"rejected"` (given up on with
    /// [`Delivery::dead_letter`](crate::Delivery::dead_letter)).
    pub outcome: String,
    /// The nack's reason.
    pub reason: Option<String>,
    /// When it ended.
    pub at: OffsetDateTime,
}

/// Where a group found damage it passed over (a [`DAMAGED_TYPE`] notice).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Damaged {
    /// The seqs the damage covers; `None` for a duplicate record, which hides none.
    pub seqs: Option<(u64, u64)>,
    /// The segment file.
    pub path: PathBuf,
    /// The 1-based line.
    pub line: u64,
}

/// The header's JSON, as written (`at` in milliseconds since the epoch).
#[derive(Deserialize)]
struct Header {
    mailbox: String,
    group: String,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    id: Option<Uuid>,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    attempts: Vec<HeaderAttempt>,
    #[serde(default)]
    first_seq: Option<u64>,
    #[serde(default)]
    last_seq: Option<u64>,
    #[serde(default)]
    path: Option<PathBuf>,
    #[serde(default)]
    line: Option<u64>,
}

#[derive(Deserialize)]
struct HeaderAttempt {
    attempt: u32,
    #[serde(default)]
    consumer: Option<String>,
    outcome: String,
    #[serde(default)]
    reason: Option<String>,
    at: i64,
}

impl Message {
    /// Where this dead letter came from and why; `None` if it is not one (no
    /// [`DEAD_LETTER_HEADER`], or one that does not parse).
    ///
    /// ```
    /// # fn main() -> agentbus::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use std::time::Duration;
    /// let bus = agentbus::Bus::init(dir.path())?;
    /// let jobs = bus.create_mailbox("jobs")?;
    /// let workers = jobs.create_group_with("w", agentbus::GroupOptions::new().max_deliveries(1))?;
    /// jobs.send(agentbus::NewMessage::new("job"))?;
    /// workers.claim_one("w1")?.unwrap().nack(Duration::ZERO, Some("bad input"))?;
    ///
    /// let dead = bus.mailbox("jobs.dlq")?.messages().next().unwrap()?;
    /// let info = dead.dead_letter().expect("a dead letter");
    /// assert_eq!((info.group.as_str(), info.seq), ("w", Some(1)));
    /// assert!(info.reason.contains("bad input"));
    /// # Ok(()) }
    /// ```
    pub fn dead_letter(&self) -> Option<DeadLetter> {
        let h: Header = serde_json::from_str(self.headers.get(DEAD_LETTER_HEADER)?).ok()?;
        let damaged = h.path.map(|path| Damaged {
            seqs: h.first_seq.zip(h.last_seq),
            path,
            line: h.line.unwrap_or(0),
        });
        Some(DeadLetter {
            mailbox: h.mailbox,
            group: h.group,
            seq: h.seq,
            id: h.id,
            reason: h.reason,
            attempts: h
                .attempts
                .into_iter()
                .map(|a| DeadAttempt {
                    attempt: a.attempt,
                    consumer: a.consumer,
                    outcome: a.outcome,
                    reason: a.reason,
                    at: crate::clock::datetime_ms(a.at),
                })
                .collect(),
            damaged,
        })
    }
}
