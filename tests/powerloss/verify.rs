//! The checks after a power cut, run on a copy of what survived (so that draining
//! groups and repairing torn tails change nothing for the rounds after it):
//!
//! - the bus opens, and `doctor` finds nothing but torn tails, which `--repair` removes;
//! - every Sync receipt is readable with the same id, key and content, unless
//!   compaction removed it, which it may only do once every group acked it;
//! - every group delivers every message it was not durably acked (a claim still
//!   running counts: it runs out and the message is delivered again), and redelivers
//!   none it was;
//! - every handoff is answered at most once, and is answered or still deliverable;
//!   every handoff whose accept returned is answered;
//! - no lease's token is below a token it granted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use agentbus::{Bus, Message, ProblemKind};

use crate::ledger::Ledger;

/// What one check found.
#[derive(Debug, Default)]
pub struct Check {
    pub receipts_checked: u64,
    pub compacted: u64,
    pub torn_tails: u64,
    /// Messages a drain delivered, claims found still running, messages settled by
    /// an ack the ledger saw.
    pub drained: u64,
    pub in_flight: u64,
    pub answered: u64,
    /// Group generation (`checkpoint.json`'s `gen`), by group.
    pub generations: HashMap<String, u64>,
    pub lost: u64,
    pub acked_redelivered: u64,
    /// The Flush mailbox (reported, not held to): receipts lost, whether its group's
    /// cursor is past the end of the log, doctor's findings there other than torn
    /// tails.
    pub flush_lost: Vec<u64>,
    pub flush_cursor_past_end: bool,
    pub flush_doctor: u64,
    pub failures: Vec<String>,
}

impl Check {
    fn fail(&mut self, what: String) {
        self.failures.push(what);
    }
}

/// The mailboxes and the groups the workload uses.
pub const GROUPS: [(&str, &str); 3] =
    [("jobs", "workers"), ("jobs", "audit"), ("desk", "handoffs")];
const MAILBOXES: [&str; 3] = ["jobs", "desk", "courier-inbox"];
/// The mailbox of the Flush writer.
const FLUSH_MAILBOX: &str = "scratch";

/// Checks the bus at `root` against everything `ledger` says was promised.
pub fn after_cut(root: &Path, ledger: &Ledger) -> Check {
    let mut c = Check::default();
    let bus = match Bus::open(root) {
        Ok(b) => b,
        Err(e) => {
            c.fail(format!("the bus does not open: {e}"));
            return c;
        }
    };
    doctor(&bus, &mut c);
    let mut stored: HashMap<&str, (u64, BTreeMap<u64, Message>)> = HashMap::new();
    for name in MAILBOXES {
        match read_mailbox(&bus, name) {
            Ok(m) => {
                stored.insert(name, m);
            }
            Err(e) => c.fail(format!("mailbox {name}: {e}")),
        }
    }
    receipts(ledger, &stored, &mut c);
    for (name, (_, messages)) in &stored {
        by_field(
            messages,
            |m| m.idempotency_key.as_deref(),
            |k, seq, again| {
                c.fail(format!(
                    "{name}: key {k:?} stored twice, at seqs {seq} and {again}"
                ));
            },
        );
    }
    flushed(&bus, ledger, &mut c);
    let answers = answers(&stored, &mut c);
    for (mailbox, group) in GROUPS {
        if let Some((first, _)) = stored.get(mailbox) {
            if let Err(e) = drain(&bus, mailbox, group, *first, ledger, &answers, &mut c) {
                c.fail(format!("group {mailbox}/{group}: {e}"));
            }
        }
        let checkpoint = root
            .join("mailboxes")
            .join(mailbox)
            .join("groups")
            .join(group)
            .join("checkpoint.json");
        let gen = std::fs::read(&checkpoint)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| v["gen"].as_u64());
        match gen {
            Some(g) => {
                c.generations.insert(format!("{mailbox}/{group}"), g);
            }
            None => c.fail(format!("{}: unreadable", checkpoint.display())),
        }
    }
    for id in &ledger.accepted {
        if !answers.contains_key(id.as_str()) {
            c.lost += 1;
            c.fail(format!("handoff {id} was accepted, but its answer is gone"));
        }
    }
    for (name, &max) in ledger.max_tokens() {
        match bus.lease_info(name) {
            Ok(Some(info)) if info.token >= max => {}
            Ok(info) => c.fail(format!(
                "lease {name}: token {} after the cut, but token {max} was granted",
                info.map_or(0, |i| i.token)
            )),
            Err(e) => c.fail(format!("lease {name}: {e}")),
        }
    }
    match bus.mailbox("jobs.dlq").map(|m| m.last_seq()) {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => c.fail(format!("jobs.dlq holds {n} dead letters")),
        Ok(Err(e)) | Err(e) => c.fail(format!("jobs.dlq: {e}")),
    }
    c
}

/// Doctor finds nothing but torn tails, `--repair` removes them, and then it finds
/// nothing (in the Flush mailbox, whatever it finds is only counted).
fn doctor(bus: &Bus, c: &mut Check) {
    let held = |p: &&agentbus::Problem| p.mailbox != FLUSH_MAILBOX;
    match bus.doctor(false) {
        Ok(report) => {
            for p in &report.problems {
                if p.kind == ProblemKind::TornTail {
                    c.torn_tails += 1;
                } else if held(&p) {
                    c.fail(format!("doctor: {p:?}"));
                } else {
                    c.flush_doctor += 1;
                }
            }
        }
        Err(e) => c.fail(format!("doctor: {e}")),
    }
    match bus.doctor(true) {
        Ok(r) => {
            let left: Vec<_> = r
                .problems
                .iter()
                .filter(|p| !p.repaired)
                .filter(held)
                .collect();
            if !left.is_empty() {
                c.fail(format!("doctor --repair left {left:?}"));
            }
        }
        Err(e) => c.fail(format!("doctor --repair: {e}")),
    }
    match bus.doctor(false) {
        Ok(r) => {
            let left: Vec<_> = r.problems.iter().filter(held).collect();
            if !left.is_empty() {
                c.fail(format!("doctor after --repair: {left:?}"));
            }
        }
        Err(e) => c.fail(format!("doctor after --repair: {e}")),
    }
}

/// The Flush mailbox: how many of its receipts the cuts took, and whether its group
/// was left past the end of the log (issue 14 #1).
fn flushed(bus: &Bus, ledger: &Ledger, c: &mut Check) {
    let Ok(mb) = bus.mailbox(FLUSH_MAILBOX) else {
        return;
    };
    let stored: HashMap<u64, String> = mb
        .messages()
        .filter_map(Result::ok)
        .map(|m| (m.seq, m.id.to_string()))
        .collect();
    let first = mb.first_seq().unwrap_or(1);
    c.flush_lost = ledger
        .flush
        .iter()
        .filter(|(seq, (id, _))| **seq >= first && stored.get(seq) != Some(id))
        .map(|(seq, _)| *seq)
        .collect();
    if let (Ok(g), Ok(last)) = (mb.group("readers"), mb.last_seq()) {
        c.flush_cursor_past_end = g.stats().is_ok_and(|s| s.next_seq > last + 1);
    }
}

/// The first seq still stored and every message, checking that the seqs run without
/// gaps and that no id is stored twice.
fn read_mailbox(bus: &Bus, name: &str) -> agentbus::Result<(u64, BTreeMap<u64, Message>)> {
    let mb = bus.mailbox(name)?;
    let first = mb.first_seq()?;
    let mut out = BTreeMap::new();
    let mut ids = HashSet::new();
    for (due, m) in (first..).zip(mb.messages()) {
        let m = m?;
        if m.seq != due || !ids.insert(m.id) {
            return Err(agentbus::Error::InvalidMessage(format!(
                "seq {} (id {}) where seq {due} was due, or a second time",
                m.seq, m.id
            )));
        }
        out.insert(m.seq, m);
    }
    Ok((first, out))
}

fn receipts(ledger: &Ledger, stored: &HashMap<&str, (u64, BTreeMap<u64, Message>)>, c: &mut Check) {
    for ((mailbox, seq), r) in &ledger.receipts {
        let Some((first, messages)) = stored.get(mailbox.as_str()) else {
            continue;
        };
        if seq < first {
            c.compacted += 1;
            continue; // checked against the groups' acks in `drain`
        }
        c.receipts_checked += 1;
        let Some(m) = messages.get(seq) else {
            c.lost += 1;
            c.fail(format!(
                "lost: seq {seq} of {mailbox} ({}, round {}) is not stored (last is {:?})",
                r.id,
                r.round,
                messages.keys().next_back()
            ));
            continue;
        };
        let content = if mailbox == "jobs" {
            m.body.as_deref()
        } else {
            m.subject.as_deref()
        };
        let same = m.id.to_string() == r.id
            && r.key
                .as_deref()
                .is_none_or(|k| m.idempotency_key.as_deref() == Some(k))
            && (r.duplicate || content == Some(r.content.as_str()));
        if !same {
            c.lost += 1;
            c.fail(format!(
                "lost: seq {seq} of {mailbox} was {} (key {:?}, round {}), now holds {} (key \
                 {:?}, body {:?})",
                r.id,
                r.key,
                r.round,
                m.id,
                m.idempotency_key,
                content.map(|b| b.chars().take(40).collect::<String>())
            ));
        }
    }
}

/// The seq of each message by the value of its `field` (messages without one left
/// out); `twice(value, seq, later seq)` for each value a later message holds again.
fn by_field(
    messages: &BTreeMap<u64, Message>,
    field: fn(&Message) -> Option<&str>,
    mut twice: impl FnMut(&str, u64, u64),
) -> HashMap<&str, u64> {
    let mut seqs = HashMap::new();
    for m in messages.values() {
        if let Some(value) = field(m) {
            if let Some(seq) = seqs.insert(value, m.seq) {
                twice(value, seq, m.seq);
            }
        }
    }
    seqs
}

/// Handoff answers stored in the courier's inbox, by handoff id; more than one answer
/// to a handoff is a failure.
fn answers<'a>(
    stored: &'a HashMap<&str, (u64, BTreeMap<u64, Message>)>,
    c: &mut Check,
) -> HashMap<&'a str, u64> {
    let mut out = HashMap::new();
    if let Some((_, messages)) = stored.get("courier-inbox") {
        out = by_field(
            messages,
            |m| m.causation_id.as_deref(),
            |cause, prev, again| {
                c.fail(format!(
                    "handoff {cause} answered twice: seqs {prev} and {again} of courier-inbox"
                ));
            },
        );
    }
    c.answered = out.len() as u64;
    out
}

/// Claims everything `group` will deliver, and holds it to the ledger: each receipt
/// of the mailbox was durably acked (then it must not come back), or may have been
/// acked (its ack was under way at the cut), or is delivered now, or is claimed by a
/// consumer whose claim has not run out yet.
#[allow(clippy::too_many_arguments)]
fn drain(
    bus: &Bus,
    mailbox: &str,
    group: &str,
    first: u64,
    ledger: &Ledger,
    answers: &HashMap<&str, u64>,
    c: &mut Check,
) -> agentbus::Result<()> {
    let mb = bus.mailbox(mailbox)?;
    let g = mb.group(group)?;
    let stats = g.stats()?;
    let last = mb.last_seq()?;
    if stats.next_seq > last + 1 {
        c.fail(format!(
            "group {mailbox}/{group}: cursor at seq {} past the end of the log (last seq {last})",
            stats.next_seq
        ));
    }
    if stats.dead + stats.termed > 0 {
        c.fail(format!("group {mailbox}/{group}: {stats:?}"));
    }
    // Every receipt of the mailbox below the first stored seq was compacted away:
    // only a group that acked it (or, for handoffs, answered it) lets that happen.
    let mut open: Vec<u64> = Vec::new();
    for ((m, seq), r) in ledger.receipts.range((mailbox.to_owned(), 0)..) {
        if m != mailbox {
            break;
        }
        let settled = if group == "handoffs" {
            answers.contains_key(r.id.as_str())
        } else {
            ledger.maybe_acked(group, *seq)
        };
        if *seq < first {
            if !settled {
                c.lost += 1;
                c.fail(format!(
                    "lost: seq {seq} of {mailbox} ({}) was compacted away, but group {group} \
                     never acked it",
                    r.id
                ));
            }
        } else if !ledger.acked(group, *seq) && !settled {
            open.push(*seq);
        }
    }
    let mut delivered: HashSet<u64> = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        loop {
            let batch = g.claim("verifier", 1000)?;
            if batch.is_empty() {
                break;
            }
            for d in batch {
                let seq = d.seq();
                if ledger.acked(group, seq) && delivered.insert(seq) {
                    c.acked_redelivered += 1;
                    c.fail(format!(
                        "group {mailbox}/{group} delivers seq {seq} again (attempt {}), though \
                         its ack had returned",
                        d.attempt
                    ));
                }
                delivered.insert(seq);
            }
        }
        let mut waiting = Vec::new();
        for &seq in &open {
            if delivered.contains(&seq) {
                continue;
            }
            if g.in_flight(seq)?.is_some() {
                c.in_flight += 1;
                continue;
            }
            waiting.push(seq);
        }
        c.drained += (open.len() - waiting.len()) as u64;
        open = waiting;
        if open.is_empty() || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for seq in open {
        c.lost += 1;
        c.fail(format!(
            "lost: group {mailbox}/{group} does not deliver seq {seq} ({:?}), which it was \
             never acked; {stats:?}",
            ledger
                .receipts
                .get(&(mailbox.to_owned(), seq))
                .map(|r| &r.id)
        ));
    }
    Ok(())
}
