//! Claims: redeliveries first (expired claims, nacks whose delay is over), then new
//! messages from the cursor.

use std::time::Duration;

use super::state::{flush_run, Entry, Op, Rec};
use super::{read_at, Group, Loaded};
use crate::backend::{cap_reason, AttemptNote, Claimed, Damage};
use crate::clock::{datetime_ms, ms, now_ms, ts_ms};
use crate::coalesce::Decision;
use crate::dir::read::LogSpec;
use crate::dir::read::Position;
use crate::{Error, Message, Result};

/// One claim call in progress: who claims, until when, and what it has gathered.
struct Claiming<'a> {
    consumer: &'a str,
    max: usize,
    now: i64,
    until: i64,
    /// State records to write, in order.
    records: Vec<Rec>,
    /// The messages claimed, with their attempt.
    out: Vec<(Message, u32)>,
}

impl<'a> Claiming<'a> {
    /// A claim of up to `max` messages for `consumer` starting now, each for
    /// `visibility`.
    fn new(consumer: &'a str, max: usize, visibility: Duration) -> Self {
        let now = now_ms();
        Claiming {
            consumer,
            max,
            now,
            until: now.saturating_add(ms(visibility)),
            records: Vec::new(),
            out: Vec::new(),
        }
    }

    fn full(&self) -> bool {
        self.out.len() >= self.max
    }

    fn record(&self, seq: u64, attempt: u32) -> Rec {
        let mut r = Rec::new(seq, Op::Claim, self.now);
        r.attempt = Some(attempt);
        r.consumer = Some(self.consumer.to_owned());
        r.until = Some(self.until);
        r
    }

    fn claimed(&self, message: Message, attempt: u32) -> Claimed {
        Claimed {
            message,
            attempt,
            consumer: self.consumer.to_owned(),
            deadline: datetime_ms(self.until),
        }
    }
}

impl Group {
    /// Claims up to `max` messages for `consumer`: redeliveries first, oldest seq
    /// first, then new messages in seq order. Everything is written with one `write()`.
    pub(super) fn claim_batch(
        &self,
        consumer: &str,
        max: usize,
        visibility: Duration,
    ) -> Result<Vec<Claimed>> {
        let spec = self.spec();
        self.locked(|g, loaded| {
            let mut c = Claiming::new(consumer, max, visibility);
            g.redeliveries(loaded, &spec, &mut c)?;
            let redelivered = c.records.len();
            g.new_messages(loaded, &mut c)?;
            // New-message claims were applied as they were read (the reader moved on);
            // apply the redelivery claims (the first records) now, then write
            // everything at once.
            for r in &c.records[..redelivered] {
                loaded.state.apply(r);
            }
            g.write(loaded, &c.records)?;
            let out = std::mem::take(&mut c.out);
            Ok(out.into_iter().map(|(m, a)| c.claimed(m, a)).collect())
        })
    }

    /// Redeliveries that are due, oldest seq first. A message out of deliveries is
    /// buried on the way; one that can no longer be read is recorded as dead.
    fn redeliveries(
        &self,
        loaded: &mut Loaded,
        spec: &LogSpec,
        c: &mut Claiming<'_>,
    ) -> Result<()> {
        let due: Vec<(u64, Entry)> = loaded
            .state
            .entries
            .iter()
            .filter(|(seq, e)| self.due_at(**seq, e) <= c.now)
            .map(|(s, e)| (*s, e.clone()))
            .collect();
        for (seq, entry) in due {
            if c.full() {
                break;
            }
            let message = match read_at(spec, entry.at, seq) {
                Ok(m) => m,
                // Damaged (or gone) since it was delivered: it can never be delivered
                // again, so it is dead, with the reason, rather than a claim error
                // for ever.
                Err(Error::Corrupt { reason, .. }) => {
                    let mut r = Rec::new(seq, Op::Dead, c.now);
                    r.reason = Some(cap_reason(&format!("undeliverable: {reason}")));
                    self.append(loaded, &[r])?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if entry.attempt >= self.inner.meta.max_deliveries {
                let mut history = entry.history.clone();
                if entry.consumer.is_some() {
                    history.push(AttemptNote {
                        attempt: entry.attempt,
                        consumer: entry.consumer.clone(),
                        outcome: "expired".into(),
                        reason: None,
                        at: entry.visible_at,
                    });
                }
                let reason = history
                    .last()
                    .and_then(|n| n.reason.clone())
                    .unwrap_or_else(|| "claim expired".into());
                let reason = self.dead_letter_to().exhausted(&reason);
                self.bury(loaded, &message, &history, &reason, c.now)?;
                continue;
            }
            c.records.push(c.record(seq, entry.attempt + 1));
            c.out.push((message, entry.attempt + 1));
        }
        Ok(())
    }

    /// New messages from the cursor. Their claims are applied one by one (with each
    /// message's position), and written as one `claim_range` record per run of
    /// consecutive seqs. Filtered messages are skipped; damage at the cursor is
    /// recorded as dead with the reason, never silently skipped.
    fn new_messages(&self, loaded: &mut Loaded, c: &mut Claiming<'_>) -> Result<()> {
        let mut run: Vec<Rec> = Vec::new();
        while !c.full() {
            let reader = self.reader(loaded);
            let item = reader.next();
            let (at, next, gap) = (reader.last_start(), reader.cursor(), reader.last_gap());
            match item {
                None => break,
                Some(Ok(message)) if !self.inner.meta.filter.matches(&message) => {
                    let mut r = Rec::new(message.seq, Op::Skip, c.now);
                    r.next = next;
                    loaded.state.apply(&r);
                    flush_run(&mut run, &mut c.records);
                    c.records.push(r);
                }
                Some(Ok(message)) => {
                    let decision = self.coalescing(loaded, &message);
                    if let Decision::Coalesce(into) = decision {
                        let r = coalesced(message.seq, into, next, c.now);
                        loaded.state.apply(&r);
                        flush_run(&mut run, &mut c.records);
                        c.records.push(r);
                        continue;
                    }
                    let mut r = c.record(message.seq, 1);
                    r.at = at;
                    r.next = next;
                    r.ts = Some(ts_ms(message.ts));
                    match decision {
                        // A leader's claim carries its key: a record of its own.
                        Decision::Lead { key, quiet_until } => {
                            r.key = Some(key);
                            r.quiet = Some(quiet_until);
                            loaded.state.apply(&r);
                            flush_run(&mut run, &mut c.records);
                            c.records.push(r);
                        }
                        _ => {
                            loaded.state.apply(&r);
                            run.push(r);
                        }
                    }
                    c.out.push((message, 1));
                }
                Some(Err(Error::Corrupt { path, line, reason })) => {
                    // Never passed over silently: the dead-letter mailbox gets a notice
                    // of where and why (`doctor` reports the damage too), and the seqs
                    // it covers are recorded as dead with the reason. A duplicate hides
                    // no seq and needs no record.
                    let damage = Damage {
                        seqs: gap,
                        path: &path,
                        line,
                        reason: &reason,
                        raw: None,
                    };
                    self.dead_letter_to().send_damage(&damage)?;
                    let Some((first, last)) = gap else {
                        continue;
                    };
                    let mut r = Rec::new(last, Op::Dead, c.now);
                    r.first = Some(first);
                    r.reason = Some(cap_reason(&format!(
                        "damaged record at {}:{line}: {reason}",
                        path.display()
                    )));
                    r.next = next;
                    loaded.state.apply(&r);
                    flush_run(&mut run, &mut c.records);
                    c.records.push(r);
                }
                Some(Err(e)) => return Err(e),
            }
        }
        flush_run(&mut run, &mut c.records);
        Ok(())
    }

    /// What the group's coalescing (if any) says about `message`, met at the cursor.
    fn coalescing(&self, loaded: &Loaded, message: &Message) -> Decision {
        match &self.inner.meta.coalesce {
            Some(c) => c.decide(&loaded.state.leaders, message),
            None => Decision::Deliver,
        }
    }

    /// The live delivery of `seq` as `attempt`: it checks that this claim is still the
    /// current one, so a consumer whose claim ran out cannot nack or extend the claim
    /// of whoever got the message next.
    pub(super) fn live_claim(&self, seq: u64, attempt: u32) -> Result<Claimed> {
        let spec = self.spec();
        self.locked(|g, loaded| {
            let entry = g.unsettled(loaded, seq)?;
            if entry.attempt != attempt {
                return Err(g.stale(
                    seq,
                    format!("the current delivery is attempt {}", entry.attempt),
                ));
            }
            let consumer = match &entry.consumer {
                Some(c) if entry.visible_at > now_ms() => c.clone(),
                _ => return Err(g.stale(seq, "the claim ran out or was given back")),
            };
            Ok(Claimed {
                message: read_at(&spec, entry.at, seq)?,
                attempt,
                consumer,
                deadline: datetime_ms(entry.visible_at),
            })
        })
    }

    /// Claims exactly message `seq` for `consumer`, if it can be delivered now without
    /// jumping the queue: a message waiting for redelivery, or the next deliverable
    /// message at the cursor (passing over what the group's filter skips). `None` if it
    /// is settled, claimed by someone else, or another message comes first.
    pub(super) fn claim_exactly(
        &self,
        consumer: &str,
        seq: u64,
        visibility: Duration,
    ) -> Result<Option<Claimed>> {
        let spec = self.spec();
        self.locked(|g, loaded| {
            let c = Claiming::new(consumer, 1, visibility);
            let now = c.now;
            if seq < loaded.state.next {
                let Some(entry) = loaded.state.entries.get(&seq).cloned() else {
                    return Ok(None);
                };
                // Claimed by someone, or nacked with a delay not yet over; or out of
                // deliveries (a normal claim dead-letters it).
                if g.due_at(seq, &entry) > now || entry.attempt >= g.inner.meta.max_deliveries {
                    return Ok(None);
                }
                let message = read_at(&spec, entry.at, seq)?;
                g.append(loaded, &[c.record(seq, entry.attempt + 1)])?;
                return Ok(Some(c.claimed(message, entry.attempt + 1)));
            }
            let mut records = Vec::new();
            let mut forget = false;
            let filter = &g.inner.meta.filter;
            let found = loop {
                let reader = g.reader(loaded);
                let item = reader.next();
                let (at, next) = (reader.last_start(), reader.cursor());
                match item {
                    Some(Ok(m)) if m.seq < seq && !filter.matches(&m) => {
                        let mut r = Rec::new(m.seq, Op::Skip, now);
                        r.next = next;
                        loaded.state.apply(&r);
                        records.push(r);
                    }
                    Some(Ok(m)) if m.seq <= seq && filter.matches(&m) => {
                        let decision = g.coalescing(loaded, &m);
                        if let Decision::Coalesce(into) = decision {
                            let r = coalesced(m.seq, into, next, now);
                            loaded.state.apply(&r);
                            records.push(r);
                            if m.seq == seq {
                                break None;
                            }
                            continue;
                        }
                        if m.seq < seq {
                            // Deliverable, and it comes first: leave it.
                            forget = true;
                            break None;
                        }
                        let mut r = c.record(seq, 1);
                        r.at = at;
                        r.next = next;
                        r.ts = Some(ts_ms(m.ts));
                        if let Decision::Lead { key, quiet_until } = decision {
                            r.key = Some(key);
                            r.quiet = Some(quiet_until);
                        }
                        loaded.state.apply(&r);
                        records.push(r);
                        break Some(m);
                    }
                    // Something else comes first (or damage a normal claim will record):
                    // leave it, and forget how far this reader got.
                    // (After writing: the write makes what it read durable first.)
                    Some(Ok(_)) | Some(Err(Error::Corrupt { .. })) | None => {
                        forget = true;
                        break None;
                    }
                    Some(Err(e)) => return Err(e),
                }
            };
            g.write(loaded, &records)?;
            if forget {
                loaded.reader = None;
            }
            Ok(found.map(|m| c.claimed(m, 1)))
        })
    }
}

/// The record of message `seq` coalesced into `into` at the cursor (now at `next`).
fn coalesced(seq: u64, into: u64, next: Option<Position>, now: i64) -> Rec {
    let mut r = Rec::new(seq, Op::Coalesce, now);
    r.into = Some(into);
    r.next = next;
    r
}
