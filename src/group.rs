//! Consumer groups: durable, competing consumption of a mailbox.

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use crate::backend::{at_once_reason, cap_reason, exhausted_reason};
use crate::backend::{Claimed, GroupImp, GroupMeta, Settle};
use crate::report::GroupStats;
use crate::{
    validate_name, Bus, Coalesce, Error, Filter, Mailbox, Message, Result, FORMAT_VERSION,
};
use crate::{RetryOutcome, RetryPolicy};

mod options;
pub use options::{GroupOptions, StartAt};

/// A durable consumer group on a mailbox. Cheap to clone; `Send + Sync`.
///
/// Every group sees every message of its mailbox (pub/sub); consumers inside one group
/// compete for them (work queue): a [`claim`](Group::claim) hands a message to one
/// consumer for a visibility timeout, during which no other consumer of the group gets
/// it. A message is done when it is acked; a claim that runs out is redelivered with
/// `attempt + 1`, and after `max_deliveries` the message moves to the dead-letter
/// mailbox with the reason and its attempt history.
///
/// ```
/// # fn main() -> agentbus::Result<()> {
/// # let dir = tempfile::tempdir().unwrap();
/// use agentbus::{Bus, NewMessage};
/// let bus = Bus::init(dir.path())?;
/// let tasks = bus.create_mailbox("tasks")?;
/// let workers = tasks.create_group("workers")?;
/// tasks.send(NewMessage::new("task").body("resize image 1"))?;
///
/// let delivery = workers.claim_one("worker-1")?.expect("one task waiting");
/// assert_eq!(delivery.attempt, 1);
/// // ... do the work ...
/// delivery.ack()?;
/// assert!(workers.claim_one("worker-2")?.is_none());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Group {
    inner: Arc<GroupInner>,
}

#[derive(Debug)]
struct GroupInner {
    mailbox: Mailbox,
    name: String,
    meta: GroupMeta,
    imp: GroupImp,
}

/// A message handed to a consumer by [`Group::claim`]. Settle it with
/// [`ack`](Delivery::ack), [`nack`](Delivery::nack) or [`term`](Delivery::term), or keep
/// it longer with [`extend`](Delivery::extend).
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message.
    pub message: Message,
    /// 1 for the first delivery, 2 for the first redelivery, ...
    pub attempt: u32,
    /// The consumer that holds the claim.
    pub consumer: String,
    /// When the claim runs out unless extended.
    pub deadline: OffsetDateTime,
    group: Group,
}

impl Delivery {
    /// The message's seq.
    pub fn seq(&self) -> u64 {
        self.message.seq
    }

    /// The group this delivery belongs to.
    pub fn group(&self) -> &Group {
        &self.group
    }

    /// Marks the message done. Acking a message whose claim already ran out is still
    /// accepted (the work was done), as is acking it twice.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the record cannot be written.
    pub fn ack(&self) -> Result<()> {
        self.group
            .imp()
            .ack(self.seq(), Some(self.attempt))
            .map(drop)
    }

    /// Gives the message back for redelivery after `delay` (zero: at once), noting
    /// `reason` in its history.
    ///
    /// # Errors
    ///
    /// [`Error::StaleDelivery`] if this claim ran out or was settled meanwhile.
    ///
    /// If the group's [retry policy](RetryPolicy) does not retry the reason's class
    /// ([`RetryPolicy::no_retry_on`]), the message goes to the dead-letter mailbox now,
    /// with the reason `not retryable: <reason>`.
    pub fn nack(&self, delay: Duration, reason: Option<&str>) -> Result<()> {
        self.group
            .nack_as(self.seq(), Some(self.attempt), delay, reason)
    }

    /// Gives the message back for redelivery after the delay the group's
    /// [retry policy](RetryPolicy) sets for this attempt (at once without a policy),
    /// noting `reason` in its history: a nack without an explicit delay. A reason
    /// whose [class](RetryPolicy::class_of) the policy does not retry, or a retry of
    /// the last delivery (`max_deliveries`), dead-letters the message instead; the
    /// outcome says which, and the delay or the reason recorded.
    ///
    /// ```
    /// # fn main() -> agentbus::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use std::time::Duration;
    /// use agentbus::{GroupOptions, RetryOutcome, RetryPolicy};
    /// let bus = agentbus::Bus::init(dir.path())?;
    /// let jobs = bus.create_mailbox("jobs")?;
    /// let policy = RetryPolicy::exponential(Duration::from_millis(200), 2.0, Duration::from_secs(5));
    /// let workers = jobs.create_group_with("w", GroupOptions::new().retry(policy))?;
    /// jobs.send(agentbus::NewMessage::new("job"))?;
    ///
    /// let d = workers.claim_one("w1")?.unwrap();
    /// let outcome = d.retry(Some("timeout: no answer"))?;
    /// assert_eq!(outcome, RetryOutcome::Scheduled { delay: Duration::from_millis(200) });
    /// assert!(workers.claim_one("w1")?.is_none(), "not before 200 ms");
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::StaleDelivery`] if this claim ran out or was settled meanwhile;
    /// [`Error::Io`] (or [`Error::Nats`]) if a dead letter cannot be written.
    pub fn retry(&self, reason: Option<&str>) -> Result<RetryOutcome> {
        self.group.retry_as(self.seq(), self.attempt, reason)
    }

    /// Keeps the claim for `by` from now ("still working").
    ///
    /// # Errors
    ///
    /// [`Error::StaleDelivery`] if this claim ran out or was settled meanwhile.
    pub fn extend(&self, by: Duration) -> Result<()> {
        self.settle(Settle::Extend(by))
    }

    /// Gives up on the message for good: it is settled without being acked and is not
    /// redelivered.
    ///
    /// # Errors
    ///
    /// [`Error::StaleDelivery`] if this claim ran out or was settled meanwhile.
    pub fn term(&self, reason: Option<&str>) -> Result<()> {
        self.settle(Settle::Term {
            reason: reason.map(str::to_owned),
        })
    }

    /// Gives up on the message for good and sends it to the group's dead-letter mailbox
    /// now, whatever attempt this is: for a message that retrying cannot help (invalid
    /// input, say). The dead letter's reason is `rejected by the consumer: <reason>`,
    /// and [`Group::requeue`] or a replay brings it back once the cause is fixed.
    ///
    /// ```
    /// # fn main() -> agentbus::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let bus = agentbus::Bus::init(dir.path())?;
    /// let jobs = bus.create_mailbox("jobs")?;
    /// let workers = jobs.create_group("w")?;
    /// jobs.send(agentbus::NewMessage::new("job").body("not JSON"))?;
    /// workers.claim_one("w1")?.unwrap().dead_letter("invalid payload")?;
    ///
    /// let dead = bus.mailbox("jobs.dlq")?.messages().next().unwrap()?;
    /// let info = dead.dead_letter().expect("a dead letter");
    /// assert_eq!(info.reason, "rejected by the consumer: invalid payload");
    /// assert_eq!(info.attempts[0].outcome, "rejected");
    /// assert!(workers.claim_one("w1")?.is_none());
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::StaleDelivery`] if this claim ran out or was settled meanwhile;
    /// [`Error::Io`] (or [`Error::Nats`]) if the dead letter cannot be written, and then
    /// the claim is left as it was.
    pub fn dead_letter(&self, reason: &str) -> Result<()> {
        self.settle(Settle::DeadLetter {
            reason: reason.to_owned(),
            not_retryable: false,
        })
    }

    fn settle(&self, how: Settle) -> Result<()> {
        self.group.imp().settle(self.seq(), Some(self.attempt), how)
    }
}

impl Mailbox {
    /// Creates a consumer group with default [`GroupOptions`].
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`], [`Error::GroupExists`], [`Error::Io`].
    pub fn create_group(&self, name: &str) -> Result<Group> {
        self.create_group_with(name, GroupOptions::default())
    }

    /// Creates a consumer group, and its dead-letter mailbox if that does not exist.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] (for the group, the dead-letter mailbox, or a type in the
    /// filter that [`Filter::check`] refuses), [`Error::InvalidSetting`] for
    /// `max_deliveries` 0, a visibility timeout or a coalescing window outside 1 ms to
    /// 365 days, or a [`RetryPolicy`] that cannot work (its documentation says which),
    /// [`Error::GroupExists`], [`Error::Io`]; [`Error::Unsupported`] for coalescing on
    /// JetStream. Nothing is created when the name or a setting is refused.
    pub fn create_group_with(&self, name: &str, opts: GroupOptions) -> Result<Group> {
        validate_name("group", name)?;
        if opts.max_deliveries == 0 {
            return Err(Error::InvalidSetting {
                setting: "max_deliveries",
                reason: "must be at least 1 (0 would dead-letter every message unseen)".into(),
            });
        }
        check_visibility(opts.visibility)?;
        opts.filter.check()?;
        if let Some(c) = &opts.coalesce {
            c.check()?;
            self.imp().coalescing()?;
        }
        if let Some(policy) = &opts.retry {
            policy.check()?;
        }
        let dead_letter = opts
            .dead_letter
            .clone()
            .unwrap_or_else(|| format!("{}.dlq", self.name()));
        validate_name("mailbox", &dead_letter)?;
        if dead_letter != self.name() {
            Bus {
                inner: self.bus().clone(),
            }
            .create_or_open_mailbox(&dead_letter)?;
        }
        let mut meta = GroupMeta {
            format: FORMAT_VERSION,
            max_deliveries: opts.max_deliveries,
            visibility_ms: opts.visibility.as_millis() as u64,
            dead_letter,
            filter: opts.filter,
            coalesce: opts.coalesce,
            retry: opts.retry,
        };
        meta.format = meta.needed_format();
        let from_end = opts.start == StartAt::End;
        self.imp().create_group(name, &meta, from_end)?;
        self.group(name)
    }

    /// Opens group `name`, creating it with `opts` if it does not exist: what a consumer
    /// that restarts calls, safe to race with another process doing the same. An
    /// existing group must have the settings `opts` asks for (where to start only
    /// matters at creation).
    ///
    /// ```
    /// # fn main() -> agentbus::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use agentbus::GroupOptions;
    /// let bus = agentbus::Bus::init(dir.path())?;
    /// let jobs = bus.create_mailbox("jobs")?;
    /// let opts = GroupOptions::new().max_deliveries(3);
    /// let first = jobs.create_or_open_group("workers", opts.clone())?;
    /// let again = jobs.create_or_open_group("workers", opts)?; // after a restart
    /// assert_eq!(again.max_deliveries(), first.max_deliveries());
    /// let other = jobs.create_or_open_group("workers", GroupOptions::new().max_deliveries(9));
    /// assert!(matches!(other, Err(agentbus::Error::GroupSettingsDiffer { .. })));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::GroupSettingsDiffer`] naming each setting that differs; as
    /// [`create_group_with`](Self::create_group_with) otherwise.
    pub fn create_or_open_group(&self, name: &str, opts: GroupOptions) -> Result<Group> {
        let wanted = (
            opts.max_deliveries,
            opts.visibility.as_millis() as u64,
            opts.dead_letter
                .clone()
                .unwrap_or_else(|| format!("{}.dlq", self.name())),
            opts.filter.clone(),
            opts.coalesce.clone(),
            opts.retry.clone(),
        );
        let group = match self.create_group_with(name, opts) {
            Err(Error::GroupExists { .. }) => self.group(name)?,
            other => return other,
        };
        let meta = &group.inner.meta;
        let mut differences = Vec::new();
        if meta.max_deliveries != wanted.0 {
            differences.push(format!(
                "max_deliveries: {} (asked: {})",
                meta.max_deliveries, wanted.0
            ));
        }
        if meta.visibility_ms != wanted.1 {
            differences.push(format!(
                "visibility_ms: {} (asked: {})",
                meta.visibility_ms, wanted.1
            ));
        }
        if meta.dead_letter != wanted.2 {
            differences.push(format!(
                "dead_letter: {} (asked: {})",
                meta.dead_letter, wanted.2
            ));
        }
        if meta.filter != wanted.3 {
            differences.push(format!("filter: {:?} (asked: {:?})", meta.filter, wanted.3));
        }
        if meta.coalesce != wanted.4 {
            differences.push(format!(
                "coalesce: {:?} (asked: {:?})",
                meta.coalesce, wanted.4
            ));
        }
        if meta.retry != wanted.5 {
            let show = |p: &Option<RetryPolicy>| match p {
                Some(p) => serde_json::to_string(p).expect("a policy serializes"),
                None => "none".into(),
            };
            differences.push(format!(
                "retry: {} (asked: {})",
                show(&meta.retry),
                show(&wanted.5)
            ));
        }
        if differences.is_empty() {
            Ok(group)
        } else {
            Err(Error::GroupSettingsDiffer {
                mailbox: self.name().to_owned(),
                name: name.to_owned(),
                differences: differences.join("; "),
            })
        }
    }

    /// Opens an existing consumer group.
    ///
    /// # Errors
    ///
    /// [`Error::GroupNotFound`] (listing the groups that exist), [`Error::InvalidName`],
    /// [`Error::Io`]; [`Error::UnsupportedFormat`] for a group written by a newer
    /// release, [`Error::Unsupported`] for a coalescing group on JetStream.
    pub fn group(&self, name: &str) -> Result<Group> {
        validate_name("group", name)?;
        let Some((meta, imp)) = self.imp().open_group(name)? else {
            return Err(Error::GroupNotFound {
                mailbox: self.name().to_owned(),
                name: name.to_owned(),
                existing: self.groups()?,
            });
        };
        if meta.coalesce.is_some() {
            // Never opened by a backend that would deliver what it should coalesce.
            self.imp().coalescing()?;
        }
        Ok(Group {
            inner: Arc::new(GroupInner {
                mailbox: self.clone(),
                name: name.to_owned(),
                meta,
                imp,
            }),
        })
    }

    /// The names of this mailbox's consumer groups, sorted.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the groups directory cannot be listed.
    pub fn groups(&self) -> Result<Vec<String>> {
        self.imp().group_names()
    }
}

impl Group {
    pub(crate) fn imp(&self) -> &GroupImp {
        &self.inner.imp
    }

    /// The group name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The mailbox the group consumes.
    pub fn mailbox(&self) -> &Mailbox {
        &self.inner.mailbox
    }

    /// How many deliveries a message gets before it is dead-lettered.
    pub fn max_deliveries(&self) -> u32 {
        self.inner.meta.max_deliveries
    }

    /// The default visibility timeout of a claim.
    pub fn visibility(&self) -> Duration {
        Duration::from_millis(self.inner.meta.visibility_ms)
    }

    /// The group's filter (empty: every message).
    pub fn filter(&self) -> &Filter {
        &self.inner.meta.filter
    }

    /// How the group coalesces bursts, if it does.
    pub fn coalesce(&self) -> Option<&Coalesce> {
        self.inner.meta.coalesce.as_ref()
    }

    /// The mailbox that receives this group's dead letters.
    pub fn dead_letter_mailbox(&self) -> &str {
        &self.inner.meta.dead_letter
    }

    /// The group's retry policy; `None` for a group without one (made without
    /// [`GroupOptions::retry`], or by a release before retry policies).
    pub fn retry_policy(&self) -> Option<&RetryPolicy> {
        self.inner.meta.retry.as_ref()
    }

    fn delivery_of(&self, claimed: Claimed) -> Delivery {
        Delivery {
            message: claimed.message,
            attempt: claimed.attempt,
            consumer: claimed.consumer,
            deadline: claimed.deadline,
            group: self.clone(),
        }
    }

    /// Claims up to `max` messages for `consumer`, for the group's visibility timeout.
    /// Redeliveries (expired claims, nacked messages whose delay is over) come first,
    /// then new messages in seq order. Returns an empty vector when nothing is waiting;
    /// it does not block.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidName`] for a bad consumer name, [`Error::Io`].
    pub fn claim(&self, consumer: &str, max: usize) -> Result<Vec<Delivery>> {
        self.claim_for(consumer, max, self.visibility())
    }

    /// Claims at most one message; see [`claim`](Self::claim).
    ///
    /// # Errors
    ///
    /// As [`claim`](Self::claim).
    pub fn claim_one(&self, consumer: &str) -> Result<Option<Delivery>> {
        Ok(self.claim(consumer, 1)?.pop())
    }

    /// Claims up to `max` messages with an explicit visibility timeout.
    ///
    /// # Errors
    ///
    /// As [`claim`](Self::claim), and [`Error::InvalidSetting`] for a visibility outside
    /// 1 ms to 365 days (a zero one would hand the message to the next claim at once).
    pub fn claim_for(
        &self,
        consumer: &str,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<Delivery>> {
        validate_name("consumer", consumer)?;
        check_visibility(visibility)?;
        if max == 0 {
            return Ok(Vec::new());
        }
        let claimed = self.imp().claim(consumer, max, visibility)?;
        Ok(claimed.into_iter().map(|c| self.delivery_of(c)).collect())
    }

    /// The live delivery of `seq` as `attempt`, for settling it in another process or
    /// after a restart (the CLI's `--attempt`): it checks that this claim is still the
    /// current one, so a consumer whose claim ran out cannot nack or extend the claim
    /// of whoever got the message next.
    ///
    /// # Errors
    ///
    /// [`Error::NotDelivered`]; [`Error::StaleDelivery`] if that claim ran out, was
    /// settled, or the message was redelivered since.
    pub fn delivery(&self, seq: u64, attempt: u32) -> Result<Delivery> {
        self.check_seq(seq)?;
        Ok(self.delivery_of(self.imp().delivery(seq, attempt)?))
    }

    /// The live delivery of `seq`, whoever holds it; `None` if it is not claimed right
    /// now (not delivered yet, waiting for redelivery, or settled).
    ///
    /// # Errors
    ///
    /// [`Error::Io`].
    pub fn in_flight(&self, seq: u64) -> Result<Option<Delivery>> {
        Ok(self.imp().in_flight(seq)?.map(|c| self.delivery_of(c)))
    }

    /// Claims exactly message `seq` for `consumer`, if it can be delivered now without
    /// jumping the queue: a message waiting for redelivery, or the next deliverable
    /// message at the cursor (passing over what the group's filter skips). `None` if it
    /// is settled, claimed by someone else, or another message comes first.
    pub(crate) fn claim_seq(
        &self,
        consumer: &str,
        seq: u64,
        visibility: Duration,
    ) -> Result<Option<Delivery>> {
        validate_name("consumer", consumer)?;
        check_visibility(visibility)?;
        let claimed = self.imp().claim_seq(consumer, seq, visibility)?;
        Ok(claimed.map(|c| self.delivery_of(c)))
    }

    /// Acks one message. Returns `false` if it was already settled.
    ///
    /// # Errors
    ///
    /// [`Error::NotDelivered`] if the seq was never delivered to this group;
    /// [`Error::Io`].
    pub fn ack(&self, seq: u64) -> Result<bool> {
        self.check_seq(seq)?;
        self.imp().ack(seq, None)
    }

    /// Acks every delivered message up to and including `seq` (cumulative ack).
    /// Returns how many were newly acked. Messages not yet delivered are not touched.
    ///
    /// # Errors
    ///
    /// [`Error::Io`].
    pub fn ack_upto(&self, seq: u64) -> Result<u64> {
        self.imp().ack_upto(seq)
    }

    /// Gives a claimed message back for redelivery after `delay` (or dead-letters it:
    /// see [`Delivery::nack`]).
    ///
    /// # Errors
    ///
    /// [`Error::NotDelivered`]; [`Error::StaleDelivery`] if it has no live claim.
    pub fn nack(&self, seq: u64, delay: Duration, reason: Option<&str>) -> Result<()> {
        self.check_seq(seq)?;
        self.nack_as(seq, None, delay, reason)
    }

    /// Gives a claimed message back after the delay of the group's retry policy, as
    /// [`Delivery::retry`] does.
    ///
    /// # Errors
    ///
    /// [`Error::NotDelivered`]; [`Error::StaleDelivery`] if it has no live claim;
    /// [`Error::Unsupported`] on JetStream through a handle that did not claim it.
    pub fn retry(&self, seq: u64, reason: Option<&str>) -> Result<RetryOutcome> {
        self.check_seq(seq)?;
        let attempt = self.imp().live_attempt(seq)?;
        self.retry_as(seq, attempt, reason)
    }

    /// Extends the claim on a message by `by` from now.
    ///
    /// # Errors
    ///
    /// [`Error::NotDelivered`]; [`Error::StaleDelivery`] if it has no live claim.
    pub fn extend(&self, seq: u64, by: Duration) -> Result<()> {
        self.check_seq(seq)?;
        self.imp().settle(seq, None, Settle::Extend(by))
    }

    /// Gives up on a claimed message for good.
    ///
    /// # Errors
    ///
    /// [`Error::NotDelivered`]; [`Error::StaleDelivery`] if it has no live claim.
    pub fn term(&self, seq: u64, reason: Option<&str>) -> Result<()> {
        self.check_seq(seq)?;
        let reason = reason.map(str::to_owned);
        self.imp().settle(seq, None, Settle::Term { reason })
    }

    /// Delivers settled message `seq` again, as attempt 1: a damaged record once it is
    /// repaired (the group passed over it and sent a [`DAMAGED_TYPE`](crate::DAMAGED_TYPE)
    /// notice to the dead-letter mailbox), or a dead-lettered message once its consumer
    /// is fixed, in place rather than as a copy ([`NewMessage::replay_of`](crate::NewMessage::replay_of)).
    /// Returns `false` if the message is not settled (waiting or in flight already).
    ///
    /// State files holding a requeue need this release of agentbus or later.
    ///
    /// # Errors
    ///
    /// [`Error::NotDelivered`] if the group never reached `seq`;
    /// [`Error::Corrupt`] if the record is still damaged (repair it first) or no longer
    /// in the log (compacted); [`Error::Unsupported`] on JetStream.
    pub fn requeue(&self, seq: u64) -> Result<bool> {
        self.imp().requeue(seq)
    }

    /// The group's counters.
    ///
    /// # Errors
    ///
    /// [`Error::Io`].
    pub fn stats(&self) -> Result<GroupStats> {
        self.imp().stats()
    }
}

impl Group {
    /// A nack of `seq` (as `attempt`), or a dead letter if the retry policy does not
    /// retry the reason.
    fn nack_as(
        &self,
        seq: u64,
        attempt: Option<u32>,
        delay: Duration,
        reason: Option<&str>,
    ) -> Result<()> {
        let how = match (&self.inner.meta.retry, reason) {
            (Some(p), Some(reason)) if !p.retries(Some(reason)) => Settle::DeadLetter {
                reason: reason.to_owned(),
                not_retryable: true,
            },
            _ => Settle::Nack {
                delay,
                reason: reason.map(str::to_owned),
            },
        };
        self.imp().settle(seq, attempt, how)
    }

    /// A retry of `seq` as `attempt`: a nack after the policy's delay, and what it did.
    fn retry_as(&self, seq: u64, attempt: u32, reason: Option<&str>) -> Result<RetryOutcome> {
        let meta = &self.inner.meta;
        let delay = meta
            .retry
            .as_ref()
            .map_or(Duration::ZERO, |p| p.delay_for(seq, attempt));
        self.nack_as(seq, Some(attempt), delay, reason)?;
        // What the backend did, told the way it recorded it.
        let recorded = match (&meta.retry, reason) {
            (Some(p), Some(reason)) if !p.retries(Some(reason)) => {
                at_once_reason(&cap_reason(reason), true).1
            }
            _ if attempt >= meta.max_deliveries => {
                exhausted_reason(meta.max_deliveries, &cap_reason(reason.unwrap_or("nacked")))
            }
            _ => return Ok(RetryOutcome::Scheduled { delay }),
        };
        Ok(RetryOutcome::DeadLettered {
            reason: cap_reason(&recorded),
        })
    }

    /// Seqs start at 1: seq 0 is never a message, so settling it is a mistake (a script
    /// passing an empty variable, say), reported as [`Error::NotDelivered`] rather than
    /// as "already settled".
    fn check_seq(&self, seq: u64) -> Result<()> {
        if seq == 0 {
            return Err(Error::NotDelivered {
                group: self.name().to_owned(),
                seq,
            });
        }
        Ok(())
    }
}

/// The longest visibility timeout accepted: a claim's deadline must stay a time that
/// timestamps (and JetStream's `ack_wait`) can hold.
const MAX_VISIBILITY: Duration = Duration::from_secs(365 * 86_400);

/// A visibility timeout from 1 ms (the unit it is stored in) to [`MAX_VISIBILITY`].
fn check_visibility(visibility: Duration) -> Result<()> {
    if visibility < Duration::from_millis(1) || visibility > MAX_VISIBILITY {
        return Err(Error::InvalidSetting {
            setting: "visibility",
            reason: format!("must be from 1 ms to 365 days, got {visibility:?}"),
        });
    }
    Ok(())
}
