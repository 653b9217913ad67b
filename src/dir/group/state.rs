//! A group's state: the records of `state.<gen>.jsonl` and their fold.
//!
//! The state is a fold over append-only records (`claim`, `claim_range`, `ack`,
//! `ack_upto`, `nack`, `extend`, `term`, `dead`, `skip`, `coalesce`). It holds the
//! cursor (`next`, the first never-delivered seq, and its byte position in the log),
//! one entry per delivered but unsettled message, and for a coalescing group the
//! leader of each key seen within one window: its size is bounded by the work in
//! flight, not by history.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::backend::AttemptNote;
use crate::coalesce::Leaders;
use crate::dir::read::Position;

/// One delivered, unsettled message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Entry {
    pub(crate) attempt: u32,
    /// The consumer holding the claim; `None` after a nack.
    pub(crate) consumer: Option<String>,
    /// When the message may be delivered again (ms since the Unix epoch).
    pub(crate) visible_at: i64,
    /// Where the message starts in the log.
    pub(crate) at: Position,
    /// The message's own timestamp (ms), for the oldest-unacked age; `None` when the
    /// state records do not say (all but the first message of a `claim_range`), and
    /// then read from the log when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ts: Option<i64>,
    /// How earlier attempts ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) history: Vec<AttemptNote>,
}

/// The folded state of a group.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct GroupState {
    /// The first seq never delivered.
    pub(crate) next: u64,
    /// Where `next` is in the log, when known.
    pub(crate) next_pos: Option<Position>,
    pub(crate) entries: BTreeMap<u64, Entry>,
    pub(crate) delivered: u64,
    pub(crate) redelivered: u64,
    pub(crate) acked: u64,
    pub(crate) nacked: u64,
    pub(crate) termed: u64,
    pub(crate) dead: u64,
    #[serde(default)]
    pub(crate) skipped: u64,
    /// Messages coalesced into an earlier one (never delivered).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub(crate) coalesced: u64,
    /// A coalescing group's leader of each key (`claim` records with `key`).
    #[serde(default, skip_serializing_if = "Leaders::is_empty")]
    pub(crate) leaders: Leaders,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// One state record. Flat, with optional fields, to keep lines short.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Rec {
    pub(crate) seq: u64,
    pub(crate) op: Op,
    /// When the record was written (ms).
    pub(crate) t: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) attempt: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) consumer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) until: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) at: Option<Position>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) next: Option<Position>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) ts: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reason: Option<String>,
    /// For a `dead` record at the cursor (damaged records): the first seq of the range
    /// that ends at `seq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) first: Option<u64>,
    /// For a `claim_range` record: the last seq of the range that starts at `seq`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) last: Option<u64>,
    /// For the `claim` of a coalescing group's leader: its key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) key: Option<String>,
    /// With `key`: until when (ms, message time) messages with the key are coalesced
    /// into this one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) quiet: Option<i64>,
    /// For a `coalesce` record: the seq it was coalesced into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) into: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Op {
    Claim,
    /// New messages `seq..=last`, delivered to one consumer in one claim.
    ClaimRange,
    Ack,
    AckUpto,
    Nack,
    Extend,
    Term,
    Dead,
    /// Passed over by the group's filter.
    Skip,
    /// A settled message (a damaged record since repaired, a dead letter) delivered
    /// again, from `at`. Written only by `Group::requeue`: state files that hold one
    /// need this release or later.
    Requeue,
    /// Coalesced into the earlier message `into` at the cursor: settled, never
    /// delivered (a coalescing group: group format 2).
    Coalesce,
}

impl Rec {
    pub(crate) fn new(seq: u64, op: Op, t: i64) -> Rec {
        Rec {
            seq,
            op,
            t,
            attempt: None,
            consumer: None,
            until: None,
            at: None,
            next: None,
            ts: None,
            reason: None,
            first: None,
            last: None,
            key: None,
            quiet: None,
            into: None,
        }
    }

    /// Records whose loss in a power cut would undo a settled outcome. Claims and
    /// extends are not among them (losing one only makes a redelivery come earlier),
    /// nor are skips and coalesces (decided from the log alone, the same decision is
    /// made again).
    pub(crate) fn needs_sync(&self) -> bool {
        !matches!(
            self.op,
            Op::Claim | Op::ClaimRange | Op::Extend | Op::Skip | Op::Coalesce
        )
    }
}

impl GroupState {
    pub(crate) fn new(next: u64) -> GroupState {
        GroupState {
            next,
            ..GroupState::default()
        }
    }

    /// Every seq below the floor is settled.
    pub(crate) fn floor(&self) -> u64 {
        self.entries.keys().next().copied().unwrap_or(self.next)
    }

    /// Folds one record into the state. Records for seqs that are already settled are
    /// ignored, so replaying is safe whatever the interleaving of writers was.
    pub(crate) fn apply(&mut self, r: &Rec) {
        match r.op {
            Op::Claim => {
                let attempt = r.attempt.unwrap_or(1);
                if r.seq >= self.next {
                    self.next = r.seq + 1;
                    self.next_pos = r.next;
                    self.delivered += 1;
                    if let (Some(key), Some(quiet)) = (&r.key, r.quiet) {
                        self.leaders.lead(key, r.seq, r.ts.unwrap_or(r.t), quiet);
                    }
                } else if !self.entries.contains_key(&r.seq) {
                    return;
                }
                if attempt > 1 {
                    self.redelivered += 1;
                }
                let entry = self.entries.entry(r.seq).or_insert_with(|| Entry {
                    attempt,
                    consumer: None,
                    visible_at: 0,
                    at: r.at.unwrap_or(Position {
                        segment: 0,
                        offset: 0,
                        line: 0,
                        seq: r.seq,
                    }),
                    ts: r.ts,
                    history: Vec::new(),
                });
                if attempt > 1 && entry.consumer.is_some() {
                    // The previous claim ran out.
                    entry.history.push(AttemptNote {
                        attempt: entry.attempt,
                        consumer: entry.consumer.take(),
                        outcome: "expired".into(),
                        reason: None,
                        at: entry.visible_at,
                    });
                }
                entry.attempt = attempt;
                entry.consumer = r.consumer.clone();
                entry.visible_at = r.until.unwrap_or(r.t);
            }
            Op::ClaimRange => {
                // Each message as if claimed alone, all at the first one's position (a
                // redelivery reads forward from there to its seq).
                let last = r.last.unwrap_or(r.seq);
                for seq in r.seq.max(self.next)..=last {
                    let mut claim = Rec::new(seq, Op::Claim, r.t);
                    claim.attempt = Some(1);
                    claim.consumer = r.consumer.clone();
                    claim.until = r.until;
                    claim.at = r.at;
                    claim.ts = r.ts.filter(|_| seq == r.seq);
                    claim.next = r.next.filter(|_| seq == last);
                    self.apply(&claim);
                }
            }
            Op::Ack => {
                if self.entries.remove(&r.seq).is_some() {
                    self.acked += 1;
                }
            }
            Op::AckUpto => {
                let keep = match r.seq.checked_add(1) {
                    Some(above) => self.entries.split_off(&above),
                    None => BTreeMap::new(),
                };
                self.acked += self.entries.len() as u64;
                self.entries = keep;
            }
            Op::Nack => {
                if let Some(e) = self.entries.get_mut(&r.seq) {
                    self.nacked += 1;
                    e.history.push(AttemptNote {
                        attempt: e.attempt,
                        consumer: e.consumer.take(),
                        outcome: "nacked".into(),
                        reason: r.reason.clone(),
                        at: r.t,
                    });
                    e.visible_at = r.until.unwrap_or(r.t);
                }
            }
            Op::Extend => {
                if let Some(e) = self.entries.get_mut(&r.seq) {
                    e.visible_at = r.until.unwrap_or(e.visible_at);
                }
            }
            Op::Term => {
                if self.entries.remove(&r.seq).is_some() {
                    self.termed += 1;
                }
            }
            Op::Requeue => {
                if r.seq < self.next && !self.entries.contains_key(&r.seq) {
                    let Some(at) = r.at else { return };
                    self.entries.insert(
                        r.seq,
                        Entry {
                            attempt: 0,
                            consumer: None,
                            visible_at: r.t,
                            at,
                            ts: r.ts,
                            history: vec![AttemptNote {
                                attempt: 0,
                                consumer: None,
                                outcome: "requeued".into(),
                                reason: r.reason.clone(),
                                at: r.t,
                            }],
                        },
                    );
                }
            }
            Op::Skip => {
                if r.seq >= self.next {
                    self.next = r.seq + 1;
                    self.next_pos = r.next;
                    self.skipped += 1;
                }
            }
            Op::Coalesce => {
                if r.seq >= self.next {
                    self.next = r.seq + 1;
                    self.next_pos = r.next;
                    self.coalesced += 1;
                }
            }
            Op::Dead => match r.first {
                // Damaged records at the cursor: skipped with the reason, never delivered.
                Some(first) => {
                    if r.seq >= self.next {
                        self.dead += r.seq + 1 - first.max(self.next);
                        self.next = r.seq + 1;
                        self.next_pos = r.next;
                    }
                }
                // A delivered message moved to the dead-letter mailbox.
                None => {
                    if self.entries.remove(&r.seq).is_some() {
                        self.dead += 1;
                    }
                }
            },
        }
    }
}

/// `checkpoint.json`: the state at offset `offset` of `state.<gen>.jsonl`.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Checkpoint {
    pub(crate) format: u64,
    pub(crate) gen: u64,
    pub(crate) offset: u64,
    pub(crate) state: GroupState,
}

/// Moves a run of new-message claims (consecutive seqs, one consumer, one deadline)
/// into `records`: as it is for a single claim, as one `claim_range` record otherwise.
pub(crate) fn flush_run(run: &mut Vec<Rec>, records: &mut Vec<Rec>) {
    if run.len() < 2 {
        records.append(run);
        return;
    }
    let (first, last) = (&run[0], &run[run.len() - 1]);
    let mut r = Rec::new(first.seq, Op::ClaimRange, first.t);
    r.last = Some(last.seq);
    r.consumer = first.consumer.clone();
    r.until = first.until;
    r.at = first.at;
    r.ts = first.ts;
    r.next = last.next;
    records.push(r);
    run.clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replayed `claim_range` gives every message the first one's log position (so a
    /// redelivery reads forward from there, never the whole segment), the first one's
    /// timestamp, and the cursor after the last.
    #[test]
    fn a_claim_range_replays_as_claims_at_its_first_position() {
        let at = Position {
            segment: 1,
            offset: 4_096,
            line: 20,
            seq: 21,
        };
        let next = Position {
            offset: 4_500,
            line: 23,
            seq: 24,
            ..at
        };
        let mut r = Rec::new(21, Op::ClaimRange, 1_000);
        r.last = Some(23);
        r.consumer = Some("w".into());
        r.until = Some(31_000);
        r.at = Some(at);
        r.next = Some(next);
        r.ts = Some(900);
        let mut state = GroupState::new(21);
        state.apply(&r);

        assert_eq!(
            (state.next, state.next_pos, state.delivered),
            (24, Some(next), 3)
        );
        let seqs: Vec<u64> = state.entries.keys().copied().collect();
        assert_eq!(seqs, [21, 22, 23]);
        for (seq, e) in &state.entries {
            assert_eq!((e.attempt, e.consumer.as_deref()), (1, Some("w")));
            assert_eq!((e.visible_at, e.at), (31_000, at));
            assert_eq!(e.ts, (*seq == 21).then_some(900));
        }
    }
}
