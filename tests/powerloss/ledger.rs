//! What the bus processes were promised, read from the lines the roles print
//! (`roles.rs`), across every power cut of a run. Reading it already checks two
//! promises: a seq is never handed out twice (two receipts for one seq must be the same
//! message, and an idempotency key always answers with its first message), and a
//! fencing token is never granted twice (one grant per token, and every grant after a
//! cut above every grant before it).

use std::collections::{BTreeMap, HashMap, HashSet};

/// One Sync receipt: `send` returned it, so it must survive any power cut.
#[derive(Debug, Clone)]
pub struct Receipt {
    pub mailbox: String,
    pub seq: u64,
    pub id: String,
    pub duplicate: bool,
    pub key: Option<String>,
    /// The body the writer sent (for writers' messages), or the handoff summary.
    pub content: String,
    pub round: u64,
}

/// The ledger of a whole run.
#[derive(Debug, Default)]
pub struct Ledger {
    /// By mailbox and seq: the receipt that first named it.
    pub receipts: BTreeMap<(String, u64), Receipt>,
    /// By mailbox and key: the seq and id the key first answered with.
    keys: HashMap<(String, String), (u64, String)>,
    /// Receipts printed (duplicates and repeats included).
    pub receipts_printed: u64,
    pub keyed: u64,
    pub duplicates: u64,
    /// By group: seqs whose ack returned Ok (durably settled).
    pub acked: HashMap<String, HashSet<u64>>,
    /// By group: seqs an ack was started for (maybe settled).
    pub acking: HashMap<String, HashSet<u64>>,
    /// The audit group: `ack_upto` started up to here (every delivered seq up to it
    /// maybe settled).
    pub audit_acking_upto: u64,
    pub deliveries: u64,
    /// By lease name and token: the grant (holder and handoff, or `-`).
    grants: HashMap<(String, u64), (String, String)>,
    /// By lease name: the highest token granted before the current round.
    max_token_before: HashMap<String, u64>,
    /// By lease name: the highest token granted in the current round.
    max_token_now: HashMap<String, u64>,
    pub grants_printed: u64,
    pub renewals: u64,
    /// Accepts repeated after a cut that returned the lease of their first attempt
    /// although it had been granted to someone else since.
    pub stale_leases: u64,
    /// Handoffs rejected because the lease they carried was no longer the sender's.
    pub rejected: u64,
    /// Accepts that reported a grant another accept made: `take_lease` takes any
    /// grant to the accepting agent above the carried token for its own earlier
    /// attempt (an agentbus defect this harness found; not a second grant, since the
    /// lease file holds one).
    pub misattributed: Vec<String>,
    pub releases: u64,
    /// Handoffs whose accept returned Ok, by id.
    pub accepted: HashSet<String>,
    pub compact_runs: u64,
    pub segments_removed: u64,
    /// Errors the roles reported, by role and kind ("EIO" for what the power-off
    /// caused).
    pub errors: BTreeMap<String, u64>,
    /// The Flush writer's receipts (not promised to survive a power cut), by seq.
    pub flush: BTreeMap<u64, (String, u64)>,
    /// Seqs that a Flush receipt named for a message after an earlier Flush receipt
    /// had named them for another (issue 14 #1).
    pub flush_reused: std::collections::BTreeSet<u64>,
    /// Broken promises found while reading.
    pub failures: Vec<String>,
    pub seqs_reused: u64,
    pub tokens_reused: u64,
}

impl Ledger {
    /// Reads the output of one role process of round `round`.
    pub fn read(&mut self, role: &str, round: u64, output: &str) {
        // Seqs this process was delivered (for the audit group's ack_upto).
        let mut delivered: Vec<u64> = Vec::new();
        for line in output.lines() {
            let f: Vec<&str> = line.split(' ').collect();
            match f.as_slice() {
                ["RECEIPT", mailbox, seq, id, dup, key, tag, pad] => {
                    let content = match pad.parse::<usize>() {
                        Ok(pad) => format!("{tag}:{}", "x".repeat(pad)),
                        Err(_) => (*tag).to_owned(),
                    };
                    let key = (*key != "-").then(|| (*key).to_owned());
                    let r = Receipt {
                        mailbox: (*mailbox).to_owned(),
                        seq: seq.parse().unwrap(),
                        id: (*id).to_owned(),
                        duplicate: *dup == "1",
                        key,
                        content,
                        round,
                    };
                    self.receipt(r);
                }
                ["DELIVER", group, seq, _attempt] => {
                    self.deliveries += 1;
                    if *group == "audit" {
                        delivered.push(seq.parse().unwrap());
                    }
                }
                ["ACKING", group, seq] => {
                    let e = self.acking.entry((*group).to_owned()).or_default();
                    e.insert(seq.parse().unwrap());
                }
                ["ACKED", group, seq] => {
                    let e = self.acked.entry((*group).to_owned()).or_default();
                    e.insert(seq.parse().unwrap());
                }
                ["ACKING_UPTO", "audit", upto] => {
                    let upto: u64 = upto.parse().unwrap();
                    self.audit_acking_upto = self.audit_acking_upto.max(upto);
                }
                ["ACKED_UPTO", "audit", upto] => {
                    let upto: u64 = upto.parse().unwrap();
                    let e = self.acked.entry("audit".to_owned()).or_default();
                    e.extend(delivered.iter().filter(|&&s| s <= upto));
                }
                ["GRANT", name, token, holder, context, carried] => {
                    let carried = carried.parse().ok();
                    self.grant(
                        name,
                        token.parse().unwrap(),
                        holder,
                        context,
                        carried,
                        round,
                    )
                }
                ["STALE_LEASE", ..] => self.stale_leases += 1,
                ["RENEW", ..] => self.renewals += 1,
                ["RELEASE", ..] => self.releases += 1,
                ["FLUSHED", seq, id] => {
                    let seq: u64 = seq.parse().unwrap();
                    match self.flush.get(&seq) {
                        Some((first, _)) if first != id => {
                            self.flush_reused.insert(seq);
                        }
                        Some(_) => {}
                        None => {
                            self.flush.insert(seq, ((*id).to_owned(), round));
                        }
                    }
                }
                ["TAKEN", ..] => {}
                ["REJECTED", ..] => self.rejected += 1,
                ["ACCEPTED", _seq, id] => {
                    self.accepted.insert((*id).to_owned());
                }
                ["COMPACT", removed] => {
                    self.compact_runs += 1;
                    self.segments_removed += removed.parse::<u64>().unwrap();
                }
                ["ERR", what, rest @ ..] => {
                    let rest = rest.join(" ");
                    let kind = if rest.contains("os error 5") || rest.contains("I/O error") {
                        "EIO".to_owned()
                    } else {
                        rest.chars().take(160).collect()
                    };
                    // A Sync send may fail only because the power went off, or for the
                    // one known defect (see main.rs's report).
                    let known = kind == "EIO" || kind.contains("were compacted away");
                    if role == "pl_writer" && !known {
                        self.failures
                            .push(format!("a Sync send failed in round {round}: {rest}"));
                    }
                    *self
                        .errors
                        .entry(format!("{role} {what}: {kind}"))
                        .or_default() += 1;
                }
                _ => {} // the test harness's own lines
            }
        }
    }

    fn receipt(&mut self, r: Receipt) {
        self.receipts_printed += 1;
        if r.key.is_some() {
            self.keyed += 1;
        }
        if r.duplicate {
            self.duplicates += 1;
        }
        if let Some(key) = &r.key {
            let k = (r.mailbox.clone(), key.clone());
            match self.keys.get(&k) {
                Some((seq, id)) if (*seq, id.as_str()) != (r.seq, r.id.as_str()) => {
                    self.seqs_reused += 1;
                    self.failures.push(format!(
                        "idempotency key {key:?} of {} answered seq {seq} ({id}) before, now \
                         seq {} ({}) in round {}",
                        r.mailbox, r.seq, r.id, r.round
                    ));
                }
                Some(_) => {}
                None => {
                    self.keys.insert(k, (r.seq, r.id.clone()));
                }
            }
        }
        let at = (r.mailbox.clone(), r.seq);
        match self.receipts.get(&at) {
            Some(first) if first.id != r.id => {
                self.seqs_reused += 1;
                self.failures.push(format!(
                    "seq {} of {} handed out twice: {} (round {}) and {} (round {})",
                    r.seq, r.mailbox, first.id, first.round, r.id, r.round
                ));
            }
            Some(_) => {} // a duplicate's receipt: the same message
            None => {
                self.receipts.insert(at, r);
            }
        }
    }

    /// A grant: `context` is the handoff whose accept reported it (`-` for an
    /// acquire), `carried` the token the handoff carried.
    fn grant(
        &mut self,
        name: &str,
        token: u64,
        holder: &str,
        context: &str,
        carried: Option<u64>,
        round: u64,
    ) {
        self.grants_printed += 1;
        // A transfer grants the token after the one it takes over (FORMAT.md: a new
        // grant's token is the current token plus one). An accept that reports any
        // other token did not grant it: it found the lease already with its agent and
        // took that for the work of an earlier attempt of its own (see `misattributed`).
        let made_here = carried.is_none_or(|c| c + 1 == token);
        let grant = (holder.to_owned(), context.to_owned());
        match self.grants.get(&(name.to_owned(), token)) {
            // A handoff accepted again after a cut reports the grant it made before.
            Some(g) if *g == grant && context != "-" => return,
            Some(g) if g.0 == holder && !made_here => {
                self.misattributed.push(format!(
                    "handoff {context} (carrying token {carried:?}) reported token {token}, \
                     granted for handoff {}",
                    g.1
                ));
                return;
            }
            Some(g) => {
                self.tokens_reused += 1;
                self.failures.push(format!(
                    "token {token} of lease {name} granted twice: to {} ({}) and to {holder} \
                     ({context}) in round {round}",
                    g.0, g.1
                ));
                return;
            }
            None => {}
        }
        self.grants.insert((name.to_owned(), token), grant);
        if !made_here {
            self.misattributed.push(format!(
                "handoff {context} (carrying token {carried:?}) reported token {token}"
            ));
            return;
        }
        let before = self.max_token_before.get(name).copied().unwrap_or(0);
        if token <= before {
            self.tokens_reused += 1;
            self.failures.push(format!(
                "lease {name}: token {token} granted to {holder} in round {round}, not above \
                 token {before} granted before the last power cut"
            ));
        }
        let now = self.max_token_now.entry(name.to_owned()).or_default();
        *now = (*now).max(token);
    }

    /// The round is over (the power went off): its grants now count as "before".
    pub fn end_round(&mut self) {
        for (name, t) in self.max_token_now.drain() {
            let before = self.max_token_before.entry(name).or_default();
            *before = (*before).max(t);
        }
    }

    /// The highest token granted of each lease so far.
    pub fn max_tokens(&self) -> &HashMap<String, u64> {
        &self.max_token_before
    }

    /// Whether the group may have settled `seq` by an ack (started or finished).
    pub fn maybe_acked(&self, group: &str, seq: u64) -> bool {
        let has =
            |m: &HashMap<String, HashSet<u64>>| m.get(group).is_some_and(|s| s.contains(&seq));
        has(&self.acked) || has(&self.acking) || (group == "audit" && seq <= self.audit_acking_upto)
    }

    /// Whether an ack of `seq` by the group returned Ok.
    pub fn acked(&self, group: &str, seq: u64) -> bool {
        self.acked.get(group).is_some_and(|s| s.contains(&seq))
    }
}
