//! The sender's side of a handoff: waiting for the answer, and the lease after it.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{LeaseRef, ACCEPTED_TYPE, REJECTED_TYPE};
use crate::{Bus, LeaseInfo, Mailbox, Message, Receipt, RecvTimeoutError, Result};

/// A sent handoff: its receipt, and a way to wait for the answer.
#[derive(Debug)]
pub struct SentHandoff {
    /// Where the handoff landed.
    pub receipt: Receipt,
    pub(super) reply: Mailbox,
    /// The reply mailbox's next seq when the handoff was sent: answers come after it.
    pub(super) reply_from: u64,
    /// The lease that went along, as the handoff names it.
    pub(super) lease: Option<LeaseRef>,
}

/// The receiver's answer to a handoff.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Answer {
    /// Accepted; with the lease's new grant when one was passed along.
    Accepted {
        /// The lease, now held by the receiver.
        lease: Option<LeaseInfo>,
        /// The answer message.
        message: Message,
    },
    /// Rejected, and why.
    Rejected {
        /// The receiver's reason (for a failed verification, which artifact and how).
        reason: String,
        /// The answer message.
        message: Message,
    },
}

impl Answer {
    /// True for [`Answer::Accepted`].
    pub fn is_accepted(&self) -> bool {
        matches!(self, Answer::Accepted { .. })
    }

    /// Reads an answer message (of type [`ACCEPTED_TYPE`] or [`REJECTED_TYPE`]).
    pub fn from_message(message: Message) -> Option<Answer> {
        let payload = message.payload.clone().unwrap_or(Value::Null);
        match message.kind.as_str() {
            ACCEPTED_TYPE => Some(Answer::Accepted {
                lease: payload
                    .get("lease")
                    .and_then(|l| serde_json::from_value::<LeaseAnswer>(l.clone()).ok())
                    .map(LeaseAnswer::into_info),
                message,
            }),
            REJECTED_TYPE => Some(Answer::Rejected {
                reason: payload["reason"].as_str().unwrap_or_default().to_owned(),
                message,
            }),
            _ => None,
        }
    }
}

/// The lease part of an accepted answer.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct LeaseAnswer {
    pub(super) name: String,
    pub(super) holder: String,
    pub(super) token: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub(super) expires_at: time::OffsetDateTime,
}

impl LeaseAnswer {
    pub(super) fn into_info(self) -> LeaseInfo {
        LeaseInfo {
            name: self.name,
            holder: Some(self.holder),
            token: self.token,
            acquired_at: time::OffsetDateTime::now_utc(),
            expires_at: self.expires_at,
            renewals: 0,
            process_bound: false,
        }
    }
}

impl SentHandoff {
    /// After a rejection (or no answer): takes the lease that went along back as a
    /// renewable [`Lease`](crate::Lease), renewed for `ttl`. `None` if no lease went
    /// along.
    ///
    /// # Errors
    ///
    /// [`Error::StaleLease`] if the receiver accepted meanwhile (the lease is theirs)
    /// or it expired.
    pub fn lease_back(&self, ttl: Duration) -> Result<Option<crate::Lease>> {
        let Some(l) = &self.lease else {
            return Ok(None);
        };
        let bus = Bus {
            inner: self.reply.bus().clone(),
        };
        let started = Instant::now();
        let info = bus.renew_lease(&l.name, &l.holder, l.token, ttl)?;
        Ok(Some(crate::Lease::held(
            &bus, &info, &l.holder, ttl, started,
        )))
    }

    /// Waits up to `timeout` for the receiver's answer in the reply mailbox; `None`
    /// when none came in time (the handoff stays pending in the receiver's stats).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] and other read errors.
    pub fn wait_answer(&self, timeout: Duration) -> Result<Option<Answer>> {
        let deadline = Instant::now() + timeout;
        let bus = Bus {
            inner: self.reply.bus().clone(),
        };
        let mut rx = bus.follow(&[self.reply.name()])?.from_seq(self.reply_from);
        let id = self.receipt.id.to_string();
        loop {
            match rx.recv_deadline(deadline) {
                Ok(env) if env.message.causation_id.as_deref() == Some(id.as_str()) => {
                    if let Some(answer) = Answer::from_message(env.message) {
                        return Ok(Some(answer));
                    }
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Bus(e)) => return Err(e),
            }
        }
    }
}
