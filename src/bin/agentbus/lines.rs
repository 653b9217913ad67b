//! One JSON shape per object the CLI prints: a message (in `recv`, `recv --group`,
//! `watch`, a `watch --exec` handler's stdin, `handoff recv` and `handoff show`), a
//! lease (in `lease acquire`, `renew`, `show` and `list`) and a key-value entry (in
//! every `kv` command but `kv create` and `kv keys`). Every key is always present,
//! `null`, `[]` or `{}` where the object has nothing, in the same order; times are
//! RFC 3339 UTC; durations are whole milliseconds in keys ending `_ms`.

use std::collections::BTreeMap;

use agentbus::{Artifact, Delivery, Error, KvEntry, LeaseInfo, Message};
use serde::Serialize;
use serde_json::Value;

use crate::output::{error_json, path_json, rfc3339};

/// A message as every command prints it. `payload` is `null` both for a message
/// without one and for a JSON `null` payload; `dead_letter` is the typed form of the
/// `dead_letter` header (which stays as written, for outside readers).
#[derive(Serialize)]
pub struct MessageLine<'a> {
    #[serde(skip)]
    message: &'a Message,
    seq: u64,
    id: String,
    ts: String,
    from: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    subject: Option<&'a str>,
    body: Option<&'a str>,
    payload: Option<&'a Value>,
    artifacts: &'a [Artifact],
    correlation_id: Option<&'a str>,
    causation_id: Option<&'a str>,
    idempotency_key: Option<&'a str>,
    priority: i32,
    headers: &'a BTreeMap<String, String>,
    dead_letter: Option<DeadLetterLine>,
    /// With `--group`: who holds the claim until when.
    #[serde(skip_serializing_if = "Option::is_none")]
    delivery: Option<DeliveryLine<'a>>,
    /// With `--verify` and in `handoff recv`: whether the artifacts are intact.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    verification: Option<Verification>,
}

#[derive(Serialize)]
struct DeliveryLine<'a> {
    group: &'a str,
    consumer: &'a str,
    attempt: u32,
    deadline: String,
}

#[derive(Serialize)]
struct Verification {
    verified: bool,
    /// The error object of the first artifact that failed; `null` when verified.
    verify_error: Option<Value>,
}

#[derive(Serialize)]
struct DeadLetterLine {
    mailbox: String,
    group: String,
    seq: Option<u64>,
    id: Option<String>,
    reason: String,
    attempts: Vec<AttemptLine>,
    damaged: Option<DamagedLine>,
}

#[derive(Serialize)]
struct AttemptLine {
    attempt: u32,
    consumer: Option<String>,
    outcome: String,
    reason: Option<String>,
    at: String,
}

#[derive(Serialize)]
struct DamagedLine {
    first_seq: Option<u64>,
    last_seq: Option<u64>,
    path: Value,
    line: u64,
}

impl<'a> MessageLine<'a> {
    /// `m` as stored.
    pub fn new(m: &'a Message) -> Self {
        MessageLine {
            message: m,
            seq: m.seq,
            id: m.id.to_string(),
            ts: rfc3339(m.ts),
            from: &m.from,
            kind: &m.kind,
            subject: m.subject.as_deref(),
            body: m.body.as_deref(),
            payload: m.payload.as_ref(),
            artifacts: &m.artifacts,
            correlation_id: m.correlation_id.as_deref(),
            causation_id: m.causation_id.as_deref(),
            idempotency_key: m.idempotency_key.as_deref(),
            priority: m.priority,
            headers: &m.headers,
            dead_letter: m.dead_letter().map(|d| DeadLetterLine {
                mailbox: d.mailbox,
                group: d.group,
                seq: d.seq,
                id: d.id.map(|id| id.to_string()),
                reason: d.reason,
                attempts: d
                    .attempts
                    .into_iter()
                    .map(|a| AttemptLine {
                        attempt: a.attempt,
                        consumer: a.consumer,
                        outcome: a.outcome,
                        reason: a.reason,
                        at: rfc3339(a.at),
                    })
                    .collect(),
                damaged: d.damaged.map(|x| DamagedLine {
                    first_seq: x.seqs.map(|s| s.0),
                    last_seq: x.seqs.map(|s| s.1),
                    path: path_json(&x.path),
                    line: x.line,
                }),
            }),
            delivery: None,
            verification: None,
        }
    }

    /// A claimed message: the message, plus who holds it until when.
    pub fn delivery(d: &'a Delivery) -> Self {
        let mut line = MessageLine::new(&d.message);
        line.delivery = Some(DeliveryLine {
            group: d.group().name(),
            consumer: &d.consumer,
            attempt: d.attempt,
            deadline: rfc3339(d.deadline),
        });
        line
    }

    /// The message shown.
    pub fn message(&self) -> &'a Message {
        self.message
    }

    /// Adds `verified` and `verify_error`: the result of checking the artifacts.
    pub fn verified(mut self, result: Result<(), &Error>) -> Self {
        self.verification = Some(Verification {
            verified: result.is_ok(),
            verify_error: result.err().map(error_json),
        });
        self
    }
}

/// Checks every artifact of `m` (exists, regular file, size, SHA-256); the first
/// that fails.
pub fn verify(m: &Message) -> Result<(), Error> {
    m.artifacts.iter().try_for_each(Artifact::verify)
}

/// A lease as every command prints it; a lease never granted has token 0 and `null`
/// holder and times.
#[derive(Serialize)]
pub struct LeaseLine<'a> {
    name: &'a str,
    holder: Option<&'a str>,
    token: u64,
    acquired_at: Option<String>,
    expires_at: Option<String>,
    renewals: u32,
    process_bound: bool,
}

impl<'a> LeaseLine<'a> {
    /// Lease `name` in the state `info` (`None`: never granted).
    pub fn new(name: &'a str, info: Option<&'a LeaseInfo>) -> Self {
        LeaseLine {
            name,
            holder: info.and_then(|i| i.holder.as_deref()),
            token: info.map_or(0, |i| i.token),
            acquired_at: info.map(|i| rfc3339(i.acquired_at)),
            expires_at: info.map(|i| rfc3339(i.expires_at)),
            renewals: info.map_or(0, |i| i.renewals),
            process_bound: info.is_some_and(|i| i.process_bound),
        }
    }
}

/// One revision of a key as every `kv` command prints it. A key without a value
/// (`kv get` of an absent key, `kv del` of one) has `null` revision, value and times.
#[derive(Serialize)]
pub struct KvLine<'a> {
    bucket: &'a str,
    key: &'a str,
    revision: Option<u64>,
    value: Option<&'a Value>,
    deleted: bool,
    created_at: Option<String>,
    updated_at: Option<String>,
}

impl<'a> KvLine<'a> {
    /// Key `key` of `bucket` at `entry` (`None`: no value, deleted or never set).
    pub fn new(bucket: &'a str, key: &'a str, entry: Option<&'a KvEntry>) -> Self {
        KvLine {
            bucket,
            key,
            revision: entry.map(|e| e.revision),
            value: entry.map(|e| &e.value),
            deleted: entry.is_some_and(|e| e.deleted),
            created_at: entry.map(|e| rfc3339(e.created_at)),
            updated_at: entry.map(|e| rfc3339(e.updated_at)),
        }
    }

    /// The same, with the revision known to have been written.
    pub fn revision(mut self, revision: Option<u64>) -> Self {
        self.revision = revision.or(self.revision);
        self
    }
}
