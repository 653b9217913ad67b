//! Handoffs: a verified baton from one agent to another.
//!
//! A handoff is a message of type [`HANDOFF_TYPE`] whose payload is a [`Handoff`] (what
//! the successor needs to resume without reprocessing) and whose artifacts are pinned
//! by size and SHA-256 when it is sent. The receiving mailbox has a consumer group
//! named [`HANDOFF_GROUP`] that only sees handoffs: a handoff nobody answered is
//! *pending* in that group's stats, and one whose receiver crashed is redelivered. The
//! receiver answers with `handoff.accepted` or `handoff.rejected` in the sender's reply
//! mailbox, so the sender always learns the outcome and why.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{
    Artifact, Bus, Delivery, Error, Filter, GroupOptions, LeaseInfo, Mailbox, Message, NewMessage,
    RecvTimeoutError, Result,
};

mod answer;

use answer::LeaseAnswer;
pub use answer::{Answer, SentHandoff};

/// The message type of a handoff.
pub const HANDOFF_TYPE: &str = "handoff";
/// The message type of an accepted handoff's answer.
pub const ACCEPTED_TYPE: &str = "handoff.accepted";
/// The message type of a rejected handoff's answer.
pub const REJECTED_TYPE: &str = "handoff.rejected";
/// The consumer group that tracks the handoffs of a mailbox.
pub const HANDOFF_GROUP: &str = "handoffs";

/// How long [`ReceivedHandoff::accept`] holds the lease it takes over (renew it).
const ACCEPTED_LEASE_TTL: Duration = Duration::from_secs(300);

/// A lease passed along with a handoff: the sender holds it with `token`; accepting
/// the handoff transfers it to the receiver with a new, higher token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRef {
    /// The lease name.
    pub name: String,
    /// Its holder when the handoff was sent.
    pub holder: String,
    /// The holder's token.
    pub token: u64,
}

/// The baton: everything a successor needs to continue. Stored as the payload of the
/// handoff message (artifacts travel as the message's artifacts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Handoff {
    /// One line: what this handoff is.
    pub summary: String,
    /// Machine state to resume from (any JSON), so the successor does not redo work.
    #[serde(default)]
    pub state: Value,
    /// What changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub changed: Vec<String>,
    /// What remains to be done.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remaining: Vec<String>,
    /// The next step to take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_step: Option<String>,
    /// Blockers and assumptions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blockers: Vec<String>,
    /// A lease that goes with the work.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseRef>,
    /// The mailbox that receives the answer.
    pub reply_to: String,
}

/// Builds and sends a handoff: [`Bus::handoff`].
#[derive(Debug)]
#[must_use]
pub struct HandoffBuilder<'a> {
    bus: &'a Bus,
    to: String,
    from: Option<String>,
    handoff: Handoff,
    artifacts: Vec<PathBuf>,
    correlation_id: Option<String>,
    /// The lease given with [`with_lease`](HandoffBuilder::with_lease), passed on when
    /// sending.
    lease_handle: Option<crate::Lease>,
}

impl Bus {
    /// Starts a handoff to the mailbox `to`. The answer goes to the mailbox named after
    /// the sender agent unless [`reply_to`](HandoffBuilder::reply_to) says otherwise.
    ///
    /// ```
    /// # fn main() -> agentbus::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use std::time::Duration;
    /// let bus = agentbus::Bus::builder().agent("drafter").init(dir.path().join("bus"))?;
    /// bus.create_mailbox("main")?;
    /// let draft = dir.path().join("draft.md");
    /// std::fs::write(&draft, "# Draft\n").unwrap();
    ///
    /// let sent = bus
    ///     .handoff("main")
    ///     .summary("chapter 1 drafted")
    ///     .state(serde_json::json!({"chapter": 1, "words": 2}))
    ///     .remaining("review tone")
    ///     .next_step("review chapter 1")
    ///     .artifact(&draft)
    ///     .send()?;
    ///
    /// // The main agent (usually another process) takes it, verifies, accepts.
    /// let mut inbox = bus.handoff_inbox("main")?;
    /// let received = inbox.recv_timeout(Duration::from_secs(5)).expect("a handoff");
    /// assert_eq!(received.handoff.next_step.as_deref(), Some("review chapter 1"));
    /// received.accept("main-agent")?;
    ///
    /// let answer = sent.wait_answer(Duration::from_secs(5))?.expect("answered");
    /// assert!(answer.is_accepted());
    /// # Ok(()) }
    /// ```
    pub fn handoff(&self, to: &str) -> HandoffBuilder<'_> {
        HandoffBuilder {
            bus: self,
            to: to.to_owned(),
            from: None,
            handoff: Handoff {
                summary: String::new(),
                state: Value::Null,
                changed: Vec::new(),
                remaining: Vec::new(),
                next_step: None,
                blockers: Vec::new(),
                lease: None,
                reply_to: String::new(),
            },
            artifacts: Vec::new(),
            correlation_id: None,
            lease_handle: None,
        }
    }

    /// The handoffs waiting in `mailbox`, as a receiver (creating its
    /// [`HANDOFF_GROUP`] if needed).
    ///
    /// # Errors
    ///
    /// [`Error::MailboxNotFound`], [`Error::Io`].
    pub fn handoff_inbox(&self, mailbox: &str) -> Result<HandoffInbox> {
        let mb = self.mailbox(mailbox)?;
        let group = handoff_group(&mb)?;
        Ok(HandoffInbox {
            bus: self.clone(),
            consumer: group.consumer(&self.inner.opts.agent)?,
        })
    }
}

fn handoff_group(mb: &Mailbox) -> Result<crate::Group> {
    match mb.group(HANDOFF_GROUP) {
        Err(Error::GroupNotFound { .. }) => {
            match mb.create_group_with(
                HANDOFF_GROUP,
                GroupOptions::new().filter(Filter::new().of_type(HANDOFF_TYPE)),
            ) {
                Err(Error::GroupExists { .. }) => mb.group(HANDOFF_GROUP),
                other => other,
            }
        }
        other => other,
    }
}

impl HandoffBuilder<'_> {
    /// The sending agent; default: the bus's agent name.
    pub fn from(mut self, agent: impl Into<String>) -> Self {
        self.from = Some(agent.into());
        self
    }

    /// One line: what this handoff is (required).
    pub fn summary(mut self, summary: impl Into<String>) -> Self {
        self.handoff.summary = summary.into();
        self
    }

    /// State to resume from.
    pub fn state(mut self, state: Value) -> Self {
        self.handoff.state = state;
        self
    }

    /// Something that changed (repeatable).
    pub fn changed(mut self, item: impl Into<String>) -> Self {
        self.handoff.changed.push(item.into());
        self
    }

    /// Something that remains to be done (repeatable).
    pub fn remaining(mut self, item: impl Into<String>) -> Self {
        self.handoff.remaining.push(item.into());
        self
    }

    /// The next step.
    pub fn next_step(mut self, step: impl Into<String>) -> Self {
        self.handoff.next_step = Some(step.into());
        self
    }

    /// A blocker or assumption (repeatable).
    pub fn blocker(mut self, item: impl Into<String>) -> Self {
        self.handoff.blockers.push(item.into());
        self
    }

    /// A file to hand over; its size and SHA-256 are captured when the handoff is sent.
    pub fn artifact(mut self, path: impl Into<PathBuf>) -> Self {
        self.artifacts.push(path.into());
        self
    }

    /// Passes a lease the sender holds, by name, holder and token; accepting the handoff
    /// moves it to the receiver. With a [`Lease`](crate::Lease) in hand, prefer
    /// [`with_lease`](Self::with_lease): dropping a `Lease` releases it.
    pub fn lease(mut self, name: &str, holder: &str, token: u64) -> Self {
        self.lease_handle = None;
        self.handoff.lease = Some(LeaseRef {
            name: name.to_owned(),
            holder: holder.to_owned(),
            token,
        });
        self
    }

    /// Passes `lease` along, taking it by value so it cannot be released when the
    /// sender drops it (it stays held, by token, until the receiver accepts and takes
    /// it over, or it expires). A process-bound lease, which would end with its handle,
    /// is re-granted to its holder without the binding when the handoff is sent (a new
    /// token, for its TTL). If sending fails, the lease is released.
    ///
    /// ```
    /// # fn main() -> agentbus::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let bus = agentbus::Bus::builder().agent("writer").init(dir.path())?;
    /// bus.create_mailbox("main")?;
    /// let lease = bus.lease("chapter-1").try_acquire()?;
    /// bus.handoff("main").summary("over to you").with_lease(lease).send()?;
    /// assert_eq!(bus.lease_info("chapter-1")?.unwrap().holder.as_deref(), Some("writer"));
    /// # Ok(()) }
    /// ```
    pub fn with_lease(mut self, lease: crate::Lease) -> Self {
        self.handoff.lease = None;
        self.lease_handle = Some(lease);
        self
    }

    /// The mailbox for the answer (created if missing); default: the sender's name.
    pub fn reply_to(mut self, mailbox: impl Into<String>) -> Self {
        self.handoff.reply_to = mailbox.into();
        self
    }

    /// Groups the handoff and its answer with the rest of the task.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    /// Captures the artifacts and sends the handoff.
    ///
    /// Everything that can be refused is checked before anything is created: a refused
    /// handoff leaves no [`HANDOFF_GROUP`] and no reply mailbox behind.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidMessage`] without a summary, or for an empty or still-changing
    /// artifact; [`Error::InvalidName`] for the sender or the reply mailbox;
    /// [`Error::ArtifactMissing`], [`Error::ArtifactNotAFile`];
    /// [`Error::MailboxNotFound`] for `to`; [`Error::StaleLease`] if the lease (by name
    /// or by handle) is not the current grant.
    pub fn send(mut self) -> Result<SentHandoff> {
        if self.handoff.summary.trim().is_empty() {
            return Err(Error::InvalidMessage("a handoff needs a summary".into()));
        }
        let from = self
            .from
            .clone()
            .unwrap_or_else(|| self.bus.inner.opts.agent.clone());
        crate::validate_name("agent", &from)?;
        if self.handoff.reply_to.is_empty() {
            self.handoff.reply_to = from.clone();
        }
        crate::validate_name("mailbox", &self.handoff.reply_to)?;
        let to = self.bus.mailbox(&self.to)?;
        let artifacts = self
            .artifacts
            .iter()
            .map(Artifact::capture)
            .collect::<Result<Vec<_>>>()?;
        match (&self.lease_handle, &self.handoff.lease) {
            (Some(lease), _) => self.check_lease(&LeaseRef {
                name: lease.name().to_owned(),
                holder: lease.holder().to_owned(),
                token: lease.token(),
            })?,
            (None, Some(lease)) => self.check_lease(lease)?,
            (None, None) => {}
        }
        let reply = self.bus.create_or_open_mailbox(&self.handoff.reply_to)?;
        let reply_from = reply.last_seq()? + 1;
        handoff_group(&to)?;
        // Everything that can fail before the send has: only now let go of the lease.
        let passed = match self.lease_handle.take() {
            Some(lease) => {
                let (name, holder) = (lease.name().to_owned(), lease.holder().to_owned());
                let token = lease.pass_on()?.token;
                self.handoff.lease = Some(LeaseRef {
                    name,
                    holder,
                    token,
                });
                true
            }
            None => false,
        };
        let mut message = NewMessage::new(HANDOFF_TYPE)
            .from(from)
            .subject(self.handoff.summary.clone())
            .payload(serde_json::to_value(&self.handoff).expect("handoff serializes"));
        for artifact in artifacts {
            message = message.artifact(artifact);
        }
        if let Some(id) = &self.correlation_id {
            message = message.correlation_id(id);
        }
        match to.send(message) {
            Ok(receipt) => Ok(SentHandoff {
                receipt,
                reply,
                reply_from,
                lease: self.handoff.lease.clone(),
            }),
            Err(e) => {
                // Nothing was handed off: a lease given by handle is released, since
                // its token went nowhere.
                if let (true, Some(l)) = (passed, &self.handoff.lease) {
                    let _ = self.bus.release_lease(&l.name, &l.holder, l.token);
                }
                Err(e)
            }
        }
    }

    /// A lease given by name and token must be the current grant.
    fn check_lease(&self, lease: &LeaseRef) -> Result<()> {
        let held = self.bus.lease_info(&lease.name)?;
        let current = held
            .as_ref()
            .is_some_and(|i| i.token == lease.token && i.holder.as_deref() == Some(&lease.holder));
        if current {
            return Ok(());
        }
        Err(Error::StaleLease {
            name: lease.name.clone(),
            holder: held.as_ref().and_then(|i| i.holder.clone()),
            token: held.map_or(0, |i| i.token),
            reason: format!(
                "token {} of {:?} is not the current grant",
                lease.token, lease.holder
            ),
        })
    }
}

/// Receives handoffs: [`Bus::handoff_inbox`].
#[derive(Debug)]
pub struct HandoffInbox {
    bus: Bus,
    consumer: crate::Consumer,
}

/// A handoff taken from an inbox: verify it, then accept or reject it.
#[derive(Debug)]
#[non_exhaustive]
pub struct ReceivedHandoff {
    /// The baton.
    pub handoff: Handoff,
    /// The handoff message (sender, artifacts, correlation id, ...).
    pub message: Message,
    delivery: Delivery,
    bus: Bus,
}

impl HandoffInbox {
    /// The next handoff, waiting as long as it takes.
    ///
    /// # Errors
    ///
    /// As [`recv_timeout`](Self::recv_timeout), without the timeout.
    pub fn recv(&mut self) -> Result<ReceivedHandoff> {
        let delivery = self.consumer.recv()?;
        ReceivedHandoff::from_delivery(&self.bus, delivery)
    }

    /// The next handoff, waiting until `deadline`.
    ///
    /// # Errors
    ///
    /// As [`recv_timeout`](Self::recv_timeout).
    pub fn recv_deadline(
        &mut self,
        deadline: Instant,
    ) -> std::result::Result<ReceivedHandoff, RecvTimeoutError> {
        let delivery = self.consumer.recv_deadline(deadline)?;
        Ok(ReceivedHandoff::from_delivery(&self.bus, delivery)?)
    }

    /// A blocking iterator: each `next()` is a [`recv`](Self::recv).
    pub fn iter(&mut self) -> impl Iterator<Item = Result<ReceivedHandoff>> + '_ {
        std::iter::from_fn(move || Some(self.recv()))
    }

    /// The next handoff, waiting up to `timeout`.
    ///
    /// # Errors
    ///
    /// [`RecvTimeoutError::Timeout`]; [`RecvTimeoutError::Bus`], also for a handoff
    /// whose payload is not a handoff ([`Error::InvalidMessage`]; it is rejected).
    pub fn recv_timeout(
        &mut self,
        timeout: Duration,
    ) -> std::result::Result<ReceivedHandoff, RecvTimeoutError> {
        self.recv_deadline(Instant::now() + timeout)
    }

    /// Takes the next handoff if one is waiting.
    ///
    /// # Errors
    ///
    /// As [`recv_timeout`](Self::recv_timeout), with `Ok(None)` when none is waiting.
    pub fn try_recv(&mut self) -> Result<Option<ReceivedHandoff>> {
        match self.consumer.try_recv() {
            Ok(d) => Ok(Some(ReceivedHandoff::from_delivery(&self.bus, d)?)),
            Err(crate::TryRecvError::Empty) => Ok(None),
            Err(crate::TryRecvError::Bus(e)) => Err(e),
        }
    }

    /// The handoff `seq` of this inbox, for answering by seq (the CLI's `handoff
    /// accept`): the delivery this agent already holds, or a fresh claim if it is the
    /// next handoff waiting.
    ///
    /// # Errors
    ///
    /// [`Error::StaleDelivery`] if another agent is handling it, it was answered, or
    /// other handoffs come first (nothing is claimed then).
    pub fn take(&mut self, seq: u64) -> Result<ReceivedHandoff> {
        let group = self.consumer.group().clone();
        let me = &self.bus.inner.opts.agent;
        if let Some(d) = group.in_flight(seq)? {
            if &d.consumer != me {
                return Err(Error::StaleDelivery {
                    group: group.name().to_owned(),
                    seq,
                    reason: format!("{} is handling it", d.consumer),
                });
            }
            return ReceivedHandoff::from_delivery(&self.bus, d);
        }
        match group.claim_seq(me, seq, group.visibility())? {
            Some(d) => ReceivedHandoff::from_delivery(&self.bus, d),
            None => Err(Error::StaleDelivery {
                group: group.name().to_owned(),
                seq,
                reason: "it is not waiting for an answer: answered already, or other \
                         handoffs come first"
                    .into(),
            }),
        }
    }
}

impl ReceivedHandoff {
    fn from_delivery(bus: &Bus, delivery: Delivery) -> Result<ReceivedHandoff> {
        let message = delivery.message.clone();
        match serde_json::from_value::<Handoff>(message.payload.clone().unwrap_or(Value::Null)) {
            Ok(handoff) => Ok(ReceivedHandoff {
                handoff,
                message,
                delivery,
                bus: bus.clone(),
            }),
            Err(e) => {
                let reason = format!("not a handoff payload: {e}");
                let _ = delivery.term(Some(&reason));
                Err(Error::InvalidMessage(reason))
            }
        }
    }

    /// The handoff's seq in its mailbox.
    pub fn seq(&self) -> u64 {
        self.message.seq
    }

    /// Checks every artifact: exists, same size, same SHA-256.
    ///
    /// # Errors
    ///
    /// The first failure: [`Error::ArtifactMissing`], [`Error::ArtifactSizeMismatch`]
    /// or [`Error::ArtifactDigestMismatch`].
    pub fn verify(&self) -> Result<()> {
        self.message.artifacts.iter().try_for_each(Artifact::verify)
    }

    /// Accepts the handoff as `agent`: verifies the artifacts, takes over the lease
    /// (a new, higher token, valid for 5 minutes; renew it), answers the sender and
    /// marks the handoff done. Safe to repeat after a crash: a lease already moved to
    /// `agent` and an answer already sent are not done twice.
    ///
    /// # Errors
    ///
    /// The verification error (nothing is accepted; call
    /// [`reject`](Self::reject) with it); [`Error::StaleLease`] if the sender no longer
    /// holds the lease; [`Error::Io`].
    pub fn accept(self, agent: &str) -> Result<Option<LeaseInfo>> {
        self.accept_for(agent, ACCEPTED_LEASE_TTL)
    }

    /// [`accept`](Self::accept), keeping the lease as a renewable
    /// [`Lease`](crate::Lease) held for `ttl` (renew it before it runs out; dropping it
    /// releases it).
    ///
    /// # Errors
    ///
    /// As [`accept`](Self::accept); also [`Error::StaleLease`] when this handoff was
    /// accepted before and the lease that accept took is no longer held.
    pub fn accept_lease(self, agent: &str, ttl: Duration) -> Result<Option<crate::Lease>> {
        let bus = self.bus.clone();
        let started = Instant::now();
        let Some(info) = self.accept_for(agent, ttl)? else {
            return Ok(None);
        };
        // A repeated accept reports the grant of the first: a handle is only for a
        // grant still held (not released, expired or superseded since).
        let now = bus.lease_info(&info.name)?;
        let current = now
            .as_ref()
            .is_some_and(|n| n.token == info.token && n.holder.as_deref() == Some(agent));
        if !current {
            let (holder, token) = now.map_or((None, 0), |n| (n.holder, n.token));
            return Err(Error::StaleLease {
                name: info.name,
                holder,
                token,
                reason: format!(
                    "this handoff was accepted before, with token {}, and that grant is \
                     over (released, expired or taken over since)",
                    info.token
                ),
            });
        }
        Ok(Some(crate::Lease::held(&bus, &info, agent, ttl, started)))
    }

    fn accept_for(self, agent: &str, ttl: Duration) -> Result<Option<LeaseInfo>> {
        let reply = self.hold()?;
        if let Some(prior) = self.prior_answer(&reply)? {
            self.done()?;
            return match prior {
                // Our own earlier accept (we died before acking): report its lease.
                Some(p) if p.kind == ACCEPTED_TYPE && p.from == agent => {
                    Ok(match Answer::from_message(p) {
                        Some(Answer::Accepted { lease, .. }) => lease,
                        _ => None,
                    })
                }
                other => Err(self.already(other.as_ref())),
            };
        }
        self.verify()?;
        // Verifying may take a while: keep the claim before moving anything.
        self.delivery.extend(self.delivery.group().visibility())?;
        let lease = match &self.handoff.lease {
            None => None,
            Some(l) => Some(self.take_lease(l, agent, ttl)?),
        };
        let mut payload = serde_json::json!({ "handoff": self.reference() });
        if let Some(info) = &lease {
            let answer = LeaseAnswer {
                name: info.name.clone(),
                holder: agent.to_owned(),
                token: info.token,
                expires_at: info.expires_at,
            };
            payload["lease"] = serde_json::to_value(answer).expect("lease answer serializes");
        }
        if let Err(e) = self.answer(&reply, ACCEPTED_TYPE, agent, payload) {
            // Someone else answered first: give the lease back to the sender. (After
            // any other failure the lease stays with `agent`, where a retry of this
            // accept finds it; the sender's token is stale either way.)
            if let (Error::StaleDelivery { .. }, Some(l), Some(info)) =
                (&e, &self.handoff.lease, &lease)
            {
                let _ = self.bus.transfer_lease(
                    &l.name,
                    agent,
                    info.token,
                    &l.holder,
                    ACCEPTED_LEASE_TTL,
                );
            }
            return Err(e);
        }
        self.done()?;
        Ok(lease)
    }

    fn take_lease(&self, l: &LeaseRef, agent: &str, ttl: Duration) -> Result<LeaseInfo> {
        match self
            .bus
            .transfer_lease(&l.name, &l.holder, l.token, agent, ttl)
        {
            Ok(info) => Ok(info),
            // Already ours from an earlier attempt of this accept.
            Err(e @ Error::StaleLease { .. }) => match self.bus.lease_info(&l.name)? {
                Some(info) if info.holder.as_deref() == Some(agent) && info.token > l.token => {
                    Ok(info)
                }
                _ => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Rejects the handoff: the sender gets `reason` (say which artifact failed and
    /// how) and keeps its lease; the handoff is marked done.
    ///
    /// # Errors
    ///
    /// [`Error::Io`].
    pub fn reject(self, agent: &str, reason: &str) -> Result<()> {
        let reply = self.hold()?;
        if let Some(prior) = self.prior_answer(&reply)? {
            self.done()?;
            return match prior {
                Some(p) if p.kind == REJECTED_TYPE && p.from == agent => Ok(()),
                other => Err(self.already(other.as_ref())),
            };
        }
        let payload = serde_json::json!({ "handoff": self.reference(), "reason": reason });
        self.answer(&reply, REJECTED_TYPE, agent, payload)?;
        self.done()
    }

    fn already(&self, prior: Option<&Message>) -> Error {
        let reason = match prior {
            Some(p) => format!("it was already answered ({} by {})", p.kind, p.from),
            None => "it was already answered (that answer is no longer stored)".into(),
        };
        Error::StaleDelivery {
            group: self.delivery.group().name().to_owned(),
            seq: self.message.seq,
            reason,
        }
    }

    fn reference(&self) -> Value {
        serde_json::json!({
            "mailbox": self.delivery.group().mailbox().name(),
            "seq": self.message.seq,
            "id": self.message.id,
        })
    }

    fn answer_key(&self) -> String {
        format!("handoff-answer/{}", self.message.id)
    }

    /// An answer already sent for this handoff (by an earlier attempt that died before
    /// acking, or by another agent whose claim ran out): `Some(Some(answer))`, or
    /// `Some(None)` when it was answered but the answer has been compacted away.
    fn prior_answer(&self, reply: &Mailbox) -> Result<Option<Option<Message>>> {
        let Some((seq, _)) = reply.find_key(&self.answer_key())? else {
            return Ok(None);
        };
        let stored = reply.messages().from_seq(seq).find_map(|m| m.ok());
        Ok(Some(stored.filter(|m| m.seq == seq)))
    }

    /// Keeps the claim while we work, so no other agent answers the same handoff.
    fn hold(&self) -> Result<Mailbox> {
        self.delivery.extend(self.delivery.group().visibility())?;
        self.bus.create_or_open_mailbox(&self.handoff.reply_to)
    }

    /// Marks the handoff done; a claim that ran out after the answer went out does not
    /// undo the answer.
    fn done(&self) -> Result<()> {
        match self.delivery.ack() {
            Ok(()) | Err(Error::StaleDelivery { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn answer(&self, reply: &Mailbox, kind: &str, agent: &str, payload: Value) -> Result<()> {
        let mut m = NewMessage::new(kind)
            .from(agent)
            .subject(format!("re: {}", self.handoff.summary))
            .payload(payload)
            .causation_id(self.message.id.to_string())
            .idempotency_key(self.answer_key());
        if let Some(c) = &self.message.correlation_id {
            m = m.correlation_id(c);
        }
        if reply.send(m)?.duplicate {
            // Another answer got there between our check and our send.
            if let Some(prior) = self.prior_answer(reply)? {
                if prior
                    .as_ref()
                    .is_some_and(|p| p.kind == kind && p.from == agent)
                {
                    return Ok(());
                }
                return Err(self.already(prior.as_ref()));
            }
        }
        Ok(())
    }
}
