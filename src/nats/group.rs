//! Groups on JetStream: a durable pull consumer of the mailbox's stream.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use async_nats::jetstream::context::ConsumerInfoErrorKind;
use async_nats::jetstream::{self, consumer::pull, AckKind};
use futures_util::StreamExt;
use time::OffsetDateTime;

use super::backoff::{backoff, nak_delay};
use super::{dec, decode, enc, nats_err, Mailbox, NatsBus, NET, REQUEST_TIMEOUT};
use crate::backend::MailboxBackend;
use crate::backend::{Backend, Claimed, Damage, DeadLetterTo, GroupBackend, GroupMeta, Settle};
use crate::report::GroupStats;
use crate::watch::{Watch, WatchMode};
use crate::{Error, Result};

/// A group on JetStream. Each handle remembers the deliveries it claimed (their reply
/// subjects), so settling goes through the handle that claimed.
#[derive(Debug)]
pub(crate) struct Group {
    mailbox: Mailbox,
    name: String,
    meta: GroupMeta,
    /// The visibility timeout of every claim: the consumer's `ack_wait`, or the
    /// group's `visibility_ms` when a retry policy set a `backoff` list (which then
    /// holds the claims' timers, and `ack_wait` is its first value).
    ack_wait: Duration,
    /// The consumer's `backoff` list (empty without a retry policy).
    backoff: Vec<Duration>,
    /// The consumer handle, opened on first use.
    consumer: OnceLock<PullConsumer>,
    /// The live deliveries this handle claimed, by seq. A settled or superseded claim
    /// is removed.
    held: Mutex<HashMap<u64, Held>>,
}

/// A delivery a NATS group handle holds: what [`Group::in_flight`] reports, and the
/// reply subject its acks go to.
#[derive(Debug, Clone)]
struct Held {
    attempt: u32,
    consumer: String,
    deadline: OffsetDateTime,
    reply: String,
}

/// A durable pull consumer: a group on JetStream.
pub(crate) type PullConsumer = jetstream::consumer::Consumer<pull::Config>;

/// A message fetched for a group, not decided on yet.
pub(crate) struct Fetched {
    pub(crate) seq: u64,
    pub(crate) attempt: u32,
    pub(crate) reply: String,
    pub(crate) payload: Vec<u8>,
    /// The `Nats-Msg-Id` header it was published with.
    pub(crate) msg_id: Option<String>,
}

/// What the server says about a group.
pub(crate) struct ConsumerState {
    pub(crate) ack_wait: Duration,
    pub(crate) backoff: Vec<Duration>,
    pub(crate) description: Option<String>,
    pub(crate) delivered_seq: u64,
    pub(crate) ack_floor_seq: u64,
    pub(crate) ack_pending: u64,
    pub(crate) redelivered: u64,
    pub(crate) num_pending: u64,
}

/// How a group's consumer is set up.
pub(crate) struct ConsumerConfig {
    pub(crate) description: String,
    pub(crate) start_seq: Option<u64>,
    pub(crate) ack_wait: Duration,
    pub(crate) max_deliver: i64,
    /// The server's redelivery timer of each delivery (the last one repeats).
    pub(crate) backoff: Vec<Duration>,
}

/// Whether a consumer is an agentbus group: durable, with group settings as its
/// description.
fn is_group(config: &jetstream::consumer::Config) -> bool {
    config.durable_name.is_some()
        && config
            .description
            .as_deref()
            .is_some_and(|d| serde_json::from_str::<GroupMeta>(d).is_ok())
}

/// Creates group `name` on `mailbox` (its dead-letter mailbox exists already).
pub(crate) fn create(
    mailbox: &Mailbox,
    name: &str,
    meta: &GroupMeta,
    from_end: bool,
) -> Result<()> {
    let backoff = backoff(meta);
    let config = ConsumerConfig {
        description: serde_json::to_string(meta).expect("metadata serializes"),
        start_seq: if from_end {
            Some(mailbox.last_seq()? + 1)
        } else {
            None
        },
        // With a backoff list the server takes its first value as `ack_wait`.
        ack_wait: backoff
            .first()
            .copied()
            .unwrap_or(Duration::from_millis(meta.visibility_ms.max(1))),
        // Unlimited on the server: a delivery past `max_deliveries` is buried by the
        // client that sees it, and one that dies first leaves it to be redelivered and
        // buried by the next. (So the server's rule that `max_deliver` exceed the
        // length of `backoff` holds whatever the list.)
        max_deliver: -1,
        backoff,
    };
    if !mailbox
        .bus()
        .conn()
        .create_consumer(mailbox.name(), name, config)?
    {
        return Err(Error::GroupExists {
            mailbox: mailbox.name().to_owned(),
            name: name.to_owned(),
        });
    }
    Ok(())
}

impl Group {
    /// Opens group `name` of `mailbox`; `None` if its consumer does not exist.
    pub(crate) fn open(mailbox: &Mailbox, name: &str) -> Result<Option<Group>> {
        let conn = mailbox.bus().conn();
        let Some(state) = conn.consumer_state(mailbox.name(), name)? else {
            return Ok(None);
        };
        let meta: GroupMeta = state
            .description
            .as_deref()
            .and_then(|d| serde_json::from_str(d).ok())
            .ok_or_else(|| Error::Corrupt {
                path: mailbox.path().join(name),
                line: 1,
                reason: "the consumer was not made by agentbus (no group settings)".into(),
            })?;
        meta.check_format(&mailbox.path().join(name))?;
        Ok(Some(Group {
            mailbox: mailbox.clone(),
            name: name.to_owned(),
            ack_wait: if state.backoff.is_empty() {
                state.ack_wait
            } else {
                Duration::from_millis(meta.visibility_ms.max(1))
            },
            meta,
            backoff: state.backoff,
            consumer: OnceLock::new(),
            held: Mutex::new(HashMap::new()),
        }))
    }

    pub(crate) fn meta(&self) -> &GroupMeta {
        &self.meta
    }

    fn conn(&self) -> &NatsBus {
        self.mailbox.bus().conn()
    }

    /// Fetches until `max` deliveries are in hand or nothing is waiting. Messages past
    /// `max_deliveries` are buried on the way, messages the filter passes over are
    /// acked (skipped), and records that are not messages are termed with a warning.
    fn claim_batch(&self, consumer: &str, max: usize) -> Result<Vec<Claimed>> {
        let mut out = Vec::new();
        let mut fetched = Vec::new();
        match self.claim_into(consumer, max, &mut out, &mut fetched) {
            Ok(()) => Ok(out),
            Err(e) => {
                // Give back at once what will not be handed out, so no attempt is
                // spent on a claim nobody saw.
                let conn = self.conn();
                for d in &out {
                    let held = self.held_map().remove(&d.message.seq);
                    if let Some(h) = held {
                        let _ = conn.settle(&h.reply, AckKind::Nak(None));
                    }
                }
                for f in fetched {
                    let _ = conn.settle(&f.reply, AckKind::Nak(None));
                }
                Err(e)
            }
        }
    }

    fn claim_into(
        &self,
        consumer: &str,
        max: usize,
        out: &mut Vec<Claimed>,
        pending: &mut Vec<Fetched>,
    ) -> Result<()> {
        let conn = self.conn();
        while out.len() < max {
            let handle = match self.consumer.get() {
                Some(c) => c,
                None => {
                    let c = conn.consumer(self.mailbox.name(), &self.name)?;
                    self.consumer.get_or_init(|| c)
                }
            };
            *pending = conn.fetch(handle, max - out.len())?;
            if pending.is_empty() {
                break;
            }
            pending.reverse();
            while let Some(f) = pending.pop() {
                let decoded = decode(
                    conn.url(),
                    self.mailbox.name(),
                    f.seq,
                    &f.payload,
                    f.msg_id.as_deref(),
                );
                let message = match decoded {
                    Ok(m) => m,
                    Err(e) => {
                        // Not an agentbus message (an outside writer's record): dead
                        // lettered with its raw payload and the reason, as the
                        // directory backend does with damage, then termed.
                        let path = self.mailbox.path();
                        self.dead_letter_to().send_damage(&Damage {
                            seqs: Some((f.seq, f.seq)),
                            path: &path,
                            line: f.seq,
                            reason: &e.to_string(),
                            raw: Some(&f.payload),
                        })?;
                        conn.settle(&f.reply, AckKind::Term)?;
                        continue;
                    }
                };
                if f.attempt > self.meta.max_deliveries {
                    let to = self.dead_letter_to();
                    to.send(
                        &message,
                        &[],
                        &to.exhausted("the last claim ran out or was nacked"),
                    )?;
                    conn.settle(&f.reply, AckKind::Term)?;
                    continue;
                }
                if !self.meta.filter.matches(&message) {
                    conn.settle(&f.reply, AckKind::Ack)?;
                    continue;
                }
                let held = Held {
                    attempt: f.attempt,
                    consumer: consumer.to_owned(),
                    deadline: OffsetDateTime::now_utc() + self.ack_wait,
                    reply: f.reply,
                };
                out.push(held.claimed(message));
                self.held_map().insert(f.seq, held);
            }
        }
        Ok(())
    }

    fn dead_letter_to(&self) -> DeadLetterTo<'_> {
        let bus = self.mailbox.bus();
        DeadLetterTo {
            bus,
            agent: &bus.opts().agent,
            mailbox: self.mailbox.name(),
            group: &self.name,
            meta: &self.meta,
        }
    }

    fn held_map(&self) -> MutexGuard<'_, HashMap<u64, Held>> {
        self.held.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Acks, naks, extends or terms a delivery this handle holds, and waits for the
    /// server to confirm it.
    fn settle_held(&self, seq: u64, attempt: Option<u32>, kind: AckKind) -> Result<()> {
        let stale = |why: String| Error::StaleDelivery {
            group: self.name.clone(),
            seq,
            reason: why,
        };
        let reply = match self.held_map().get(&seq) {
            Some(Held { attempt: a, .. }) if attempt.is_some_and(|want| want != *a) => {
                return Err(stale(format!("redelivered meanwhile (now attempt {a})")))
            }
            Some(h) => h.reply.clone(),
            // A delivery acked twice (it was settled through this handle).
            None if matches!(kind, AckKind::Ack) && attempt.is_some() => return Ok(()),
            None if attempt.is_none() => {
                return Err(
                    self.unsupported("settling by seq a message this handle has not claimed")
                )
            }
            None => return Err(stale("already settled".into())),
        };
        self.conn().settle(&reply, kind)?;
        let mut held = self.held_map();
        if matches!(kind, AckKind::Progress) {
            // +WPI restarts the whole ack_wait.
            if let Some(h) = held.get_mut(&seq) {
                h.deadline = OffsetDateTime::now_utc() + self.ack_wait;
            }
        } else {
            held.remove(&seq);
        }
        Ok(())
    }
}

impl Group {
    /// Whether the live delivery of `seq` this handle holds (as `attempt`) is the last
    /// one the message gets.
    fn last_delivery(&self, seq: u64, attempt: Option<u32>) -> bool {
        self.held_map().get(&seq).is_some_and(|h| {
            attempt.is_none_or(|a| a == h.attempt) && h.attempt >= self.meta.max_deliveries
        })
    }

    /// Copies a held delivery to the dead-letter mailbox (exactly once: its idempotency
    /// key) with `recorded` as the reason and the last attempt's `outcome` and
    /// `reason`, then terms it. A crash in between leaves it to be redelivered.
    fn bury_held(
        &self,
        seq: u64,
        attempt: Option<u32>,
        outcome: &str,
        reason: &str,
        recorded: &str,
    ) -> Result<()> {
        let held = self.held_map().get(&seq).cloned();
        match held {
            Some(h) if attempt.is_some_and(|want| want != h.attempt) => {}
            Some(h) => {
                let message = self.conn().get(self.mailbox.name(), seq)?.ok_or_else(|| {
                    Error::StaleDelivery {
                        group: self.name.clone(),
                        seq,
                        reason: "the message is no longer in the stream".into(),
                    }
                })?;
                let to = self.dead_letter_to();
                let note = crate::backend::AttemptNote {
                    attempt: h.attempt,
                    consumer: Some(h.consumer),
                    outcome: outcome.into(),
                    reason: Some(crate::backend::cap_reason(reason)),
                    at: crate::clock::now_ms(),
                };
                to.send(&message, &[note], recorded)?;
            }
            // Not held (or held as another attempt): settling says why.
            None => {}
        }
        self.settle_held(seq, attempt, AckKind::Term)
    }

    /// How many messages of the dead-letter mailbox came from this group.
    fn dead_count(&self) -> Result<u64> {
        let bus = self.mailbox.bus();
        if bus.conn().stream_limit(&self.meta.dead_letter)?.is_none() {
            return Ok(0);
        }
        let mut n = 0;
        for m in super::Reader::new(Mailbox::new(bus.clone(), &self.meta.dead_letter)) {
            let Ok(m) = m else { continue };
            let Some(info) = m.headers.get(crate::DEAD_LETTER_HEADER) else {
                continue;
            };
            let info: serde_json::Value = serde_json::from_str(info).unwrap_or_default();
            if info["mailbox"] == self.mailbox.name() && info["group"] == self.name.as_str() {
                n += 1;
            }
        }
        Ok(n)
    }
}

impl Held {
    fn claimed(&self, message: crate::Message) -> Claimed {
        Claimed {
            message,
            attempt: self.attempt,
            consumer: self.consumer.clone(),
            deadline: self.deadline,
        }
    }
}

impl GroupBackend for Group {
    /// Every claim is for the consumer's `ack_wait`, whatever `visibility` says.
    fn claim(&self, consumer: &str, max: usize, visibility: Duration) -> Result<Vec<Claimed>> {
        let _ = visibility;
        self.claim_batch(consumer, max)
    }

    fn in_flight(&self, seq: u64) -> Result<Option<Claimed>> {
        let Some(held) = self.held_map().get(&seq).cloned() else {
            return Ok(None);
        };
        Ok(match self.conn().get(self.mailbox.name(), seq) {
            Ok(Some(message)) => Some(held.claimed(message)),
            _ => None,
        })
    }

    fn ack(&self, seq: u64, attempt: Option<u32>) -> Result<bool> {
        self.settle_held(seq, attempt, AckKind::Ack).map(|()| true)
    }

    fn live_attempt(&self, seq: u64) -> Result<u32> {
        match self.held_map().get(&seq) {
            Some(h) => Ok(h.attempt),
            None => Err(self.unsupported("settling by seq a message this handle has not claimed")),
        }
    }

    /// A nack's reason and an extension's length are not sent: JetStream keeps no
    /// reasons, and `+WPI` restarts the whole `ack_wait` (with a retry policy, the
    /// delivery's `backoff` timer: the visibility plus that attempt's delay). A
    /// delayed NAK carries the delay that makes the server wait `delay` (`nak_delay`).
    fn settle(&self, seq: u64, attempt: Option<u32>, how: Settle) -> Result<()> {
        match &how {
            Settle::DeadLetter {
                reason,
                not_retryable,
            } => {
                let (outcome, recorded) = self.dead_letter_to().at_once(reason, *not_retryable);
                return self.bury_held(seq, attempt, outcome, reason, &recorded);
            }
            // A nack of the last delivery a message gets dead-letters it now, as in a
            // directory (rather than when the next claim meets the redelivery).
            Settle::Nack { reason, .. } if self.last_delivery(seq, attempt) => {
                let reason = reason.as_deref().unwrap_or("nacked");
                let to = self.dead_letter_to();
                return self.bury_held(seq, attempt, "nacked", reason, &to.exhausted(reason));
            }
            _ => {}
        }
        let kind = match how {
            Settle::Nack { delay, .. } if delay.is_zero() => AckKind::Nak(None),
            Settle::Nack { delay, .. } => {
                let held = self.held_map().get(&seq).map(|h| h.attempt);
                let attempt = held.or(attempt).unwrap_or(1);
                AckKind::Nak(Some(nak_delay(&self.backoff, attempt, delay)))
            }
            Settle::Extend(_) => AckKind::Progress,
            Settle::Term { .. } | Settle::DeadLetter { .. } => AckKind::Term,
        };
        self.settle_held(seq, attempt, kind)
    }

    /// The consumer's counters. JetStream counts by stream sequence, so `delivered`
    /// and `acked` are the highest delivered and fully acked seqs; `dead` counts what
    /// the dead-letter mailbox holds from this group (dead letters and records that
    /// were not messages), read from it; `termed` and `skipped` are not tracked (0);
    /// see README "Scaling out".
    fn stats(&self) -> Result<GroupStats> {
        let st = self
            .conn()
            .consumer_state(self.mailbox.name(), &self.name)?
            .ok_or_else(|| Error::GroupNotFound {
                mailbox: self.mailbox.name().to_owned(),
                name: self.name.clone(),
                existing: Vec::new(),
            })?;
        Ok(GroupStats {
            group: self.name.clone(),
            delivered: st.delivered_seq,
            acked: st.ack_floor_seq,
            in_flight: st.ack_pending,
            pending: st.num_pending,
            redelivered: st.redelivered,
            dead: self.dead_count()?,
            termed: 0,
            skipped: 0,
            coalesced: 0,
            lag: st.num_pending,
            next_seq: st.delivered_seq + 1,
            oldest_unacked_ms: None,
        })
    }

    /// The server redelivers; the consumer's poll timer looks for it.
    fn next_due_ms(&self) -> Result<Option<i64>> {
        Ok(None)
    }

    fn watch(&self, mode: WatchMode) -> Watch {
        let conn = self.conn();
        let subjects = vec![conn.subject(self.mailbox.name())];
        let poll = self.mailbox.bus().opts().poll_interval;
        super::watch::watch_subjects(conn, subjects, mode, poll)
    }
}

/// A handle on the stream `stream` (its info not fetched), for work on its consumers.
async fn open_stream(
    js: &jetstream::Context,
    stream: &str,
) -> Result<jetstream::stream::Stream<()>> {
    js.get_stream_no_info(stream)
        .await
        .map_err(|e| nats_err(format!("open stream {stream}"), e))
}

impl NatsBus {
    /// Creates a durable pull consumer; `false` if it already existed.
    pub(crate) fn create_consumer(
        &self,
        mailbox: &str,
        group: &str,
        config: ConsumerConfig,
    ) -> Result<bool> {
        if self.consumer_state(mailbox, group)?.is_some() {
            return Ok(false);
        }
        let js = self.js.clone();
        let stream = self.stream_name(mailbox);
        let durable = enc(group);
        self.run(NET, async move {
            let s = open_stream(&js, &stream).await?;
            s.create_consumer(pull::Config {
                durable_name: Some(durable.clone()),
                description: Some(config.description),
                deliver_policy: match config.start_seq {
                    Some(seq) => jetstream::consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: seq,
                    },
                    None => jetstream::consumer::DeliverPolicy::All,
                },
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: config.ack_wait,
                max_deliver: config.max_deliver,
                backoff: config.backoff,
                max_ack_pending: -1,
                // 0: as many as the stream has, so a group survives whatever its
                // mailbox survives, whichever process created it.
                num_replicas: 0,
                ..Default::default()
            })
            .await
            .map_err(|e| nats_err(format!("create consumer {durable} on {stream}"), e))
        })?;
        Ok(true)
    }

    /// The consumer's settings and counters, or `None` if it does not exist.
    pub(crate) fn consumer_state(
        &self,
        mailbox: &str,
        group: &str,
    ) -> Result<Option<ConsumerState>> {
        let js = self.js.clone();
        let stream = self.stream_name(mailbox);
        let durable = enc(group);
        self.run(NET, async move {
            let s = open_stream(&js, &stream).await?;
            match s.consumer_info(&durable).await {
                Ok(info) => Ok(Some(ConsumerState {
                    ack_wait: info.config.ack_wait,
                    backoff: info.config.backoff.clone(),
                    description: info.config.description.clone(),
                    delivered_seq: info.delivered.stream_sequence,
                    ack_floor_seq: info.ack_floor.stream_sequence,
                    ack_pending: info.num_ack_pending as u64,
                    redelivered: info.num_redelivered as u64,
                    num_pending: info.num_pending,
                })),
                Err(e)
                    if matches!(e.kind(), ConsumerInfoErrorKind::NotFound)
                        || matches!(e.kind(), ConsumerInfoErrorKind::JetStream(j)
                            if j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND) =>
                {
                    Ok(None)
                }
                Err(e) => Err(nats_err(
                    format!("look up consumer {durable} on {stream}"),
                    e,
                )),
            }
        })
    }

    /// The groups of a mailbox, sorted: its durable consumers whose description holds
    /// agentbus group settings. Consumers made by other clients (a `nats consumer add`,
    /// a nats-py durable, the ephemeral behind `nats sub`) are not groups and are
    /// passed over (README "Scaling out").
    pub(crate) fn consumer_names(&self, mailbox: &str) -> Result<Vec<String>> {
        let js = self.js.clone();
        let stream = self.stream_name(mailbox);
        let mut names = self.run(NET, async move {
            let s = open_stream(&js, &stream).await?;
            let mut names = Vec::new();
            let mut list = s.consumers();
            while let Some(info) = list.next().await {
                let info = info.map_err(|e| nats_err("list consumers", e))?;
                if is_group(&info.config) {
                    names.extend(dec(&info.name));
                } else {
                    log::debug!(
                        "agentbus: consumer {} of stream {stream} is not an agentbus group",
                        info.name
                    );
                }
            }
            Ok::<_, Error>(names)
        })?;
        names.sort();
        Ok(names)
    }

    /// A handle on the group's consumer, for [`fetch`](Self::fetch).
    pub(crate) fn consumer(&self, mailbox: &str, group: &str) -> Result<PullConsumer> {
        let js = self.js.clone();
        let stream = self.stream_name(mailbox);
        let durable = enc(group);
        self.run(NET, async move {
            js.get_consumer_from_stream(&durable, &stream)
                .await
                .map_err(|e| nats_err(format!("open consumer {durable} on {stream}"), e))
        })
    }

    /// Fetches up to `max` messages for the group without waiting for more.
    ///
    /// The pull request asks for what is waiting now (`no_wait`), which a consumer
    /// leader answers at once: the messages there are, then "no more". It carries no
    /// `expires`, which would make the server hold a `no_wait` request open until the
    /// batch is full or it expires (a claim would wait for a nacked message's delay).
    /// The bound is the client's instead: a request nobody answers (a leader that
    /// stepped down or died with it) is given up after [`REQUEST_TIMEOUT`] as
    /// [`Error::Unavailable`]; what arrived before that is kept.
    pub(crate) fn fetch(&self, consumer: &PullConsumer, max: usize) -> Result<Vec<Fetched>> {
        let consumer = consumer.clone();
        self.run(NET, async move {
            let op = || format!("fetch from consumer {}", consumer.cached_info().name);
            let give_up = tokio::time::Instant::now() + REQUEST_TIMEOUT;
            let unanswered = || Error::Unavailable {
                operation: op(),
                reason: format!("the pull request was not answered within {REQUEST_TIMEOUT:?}"),
            };
            let request = consumer.fetch().max_messages(max).messages();
            let mut batch = tokio::time::timeout_at(give_up, request)
                .await
                .map_err(|_| unanswered())?
                .map_err(|e| nats_err(op(), e))?;
            let mut out = Vec::new();
            loop {
                let m = match tokio::time::timeout_at(give_up, batch.next()).await {
                    Ok(Some(Ok(m))) => m,
                    Ok(None) => break,
                    // Whatever came before the failure is claimed: hand it out.
                    Ok(Some(Err(_))) | Err(_) if !out.is_empty() => break,
                    Ok(Some(Err(e))) => return Err(nats_err(op(), e)),
                    Err(_) => return Err(unanswered()),
                };
                let info = m.info().map_err(|e| nats_err(op(), e))?;
                let (seq, attempt) = (info.stream_sequence, info.delivered.max(1) as u32);
                out.push(Fetched {
                    seq,
                    attempt,
                    reply: m.reply.as_ref().map(|r| r.to_string()).unwrap_or_default(),
                    payload: m.payload.to_vec(),
                    msg_id: m
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Msg-Id"))
                        .map(|v| v.as_str().to_owned()),
                });
            }
            Ok(out)
        })
    }

    /// Settles a delivery through its reply subject and waits for the server's
    /// confirmation, at most [`REQUEST_TIMEOUT`]. Only a reply from the consumer's
    /// leader confirms: "no responders" (no leader now) and silence are
    /// [`Error::Unavailable`], and the settlement may not have been applied.
    pub(crate) fn settle(&self, reply: &str, kind: AckKind) -> Result<()> {
        let client = self.client.clone();
        let reply = reply.to_owned();
        let what = match kind {
            AckKind::Ack => "ack",
            AckKind::Nak(_) => "nack",
            AckKind::Progress => "extend",
            AckKind::Term => "term",
            _ => "settle",
        };
        self.run(NET, async move {
            let op = || format!("{what} a delivery");
            let request = async_nats::Request::new()
                .payload(kind.into())
                .timeout(Some(REQUEST_TIMEOUT));
            match client.send_request(reply, request).await {
                Ok(_) => Ok(()),
                Err(e) => Err(Error::Unavailable {
                    operation: op(),
                    reason: format!("the server did not confirm it: {e}"),
                }),
            }
        })
    }
}
