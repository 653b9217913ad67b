//! Property tests: any message reads back as sent; any sequence of group operations
//! (with reopenings, compactions and torn tails) keeps the invariants; arbitrary bytes
//! in a segment never panic a reader, `doctor` or the next writer; lease tokens only
//! increase. (The fuzz target of the hardening issue, as proptest over arbitrary bytes.)

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::time::Duration;

use agentbus::{Bus, Error, NewMessage};
use proptest::prelude::*;

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        (-1e300f64..1e300).prop_map(serde_json::Value::from),
        ".*".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn any_message_reads_back_as_sent(
        kind in "[a-z][a-z0-9._-]{0,20}",
        from in "[A-Za-z0-9][A-Za-z0-9._-]{0,20}",
        subject in proptest::option::of(".*"),
        body in proptest::option::of("(.|\n|\t|\"|\\\\){0,200}"),
        payload in proptest::option::of(json_value()),
        headers in prop::collection::btree_map(".{0,10}", ".{0,10}", 0..4),
        priority in any::<i32>(),
        correlation in proptest::option::of("[ -~]{1,40}"),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mb = common::flush_bus(dir.path()).create_mailbox("m").unwrap();
        let mut msg = NewMessage::new(kind.clone()).from(from.clone()).priority(priority);
        if let Some(s) = &subject { msg = msg.subject(s.clone()); }
        if let Some(b) = &body { msg = msg.body(b.clone()); }
        if let Some(p) = &payload { msg = msg.payload(p.clone()); }
        if let Some(c) = &correlation { msg = msg.correlation_id(c.clone()); }
        for (k, v) in &headers { msg = msg.header(k.clone(), v.clone()); }
        let receipt = mb.send(msg).unwrap();
        let got = mb.messages().next().unwrap().unwrap();
        prop_assert_eq!(got.id, receipt.id);
        prop_assert_eq!(&got.kind, &kind);
        prop_assert_eq!(&got.from, &from);
        prop_assert_eq!(&got.subject, &subject);
        prop_assert_eq!(&got.body, &body);
        prop_assert_eq!(&got.payload, &payload);
        prop_assert_eq!(&got.correlation_id, &correlation);
        prop_assert_eq!(&got.headers, &headers);
        prop_assert_eq!(got.priority, priority);
    }
}

#[derive(Debug, Clone)]
enum Op {
    Send(u8),
    Claim(u8),
    AckOldest,
    AckNewest,
    NackOldest,
    AckUpto,
    Reopen,
    Compact,
    TearTail,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1u8..6).prop_map(Op::Send),
        (1u8..5).prop_map(Op::Claim),
        Just(Op::AckOldest),
        Just(Op::AckNewest),
        Just(Op::NackOldest),
        Just(Op::AckUpto),
        Just(Op::Reopen),
        Just(Op::Compact),
        Just(Op::TearTail),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// Model: what was sent, what is held (claimed, unsettled), what was nacked (given
    /// back, waiting for redelivery) and what was acked.
    #[test]
    fn group_operations_lose_nothing_and_ack_nothing_twice(ops in prop::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let bus = common::segmented_bus(dir.path(), 600);
        let mb = bus.create_mailbox("m").unwrap();
        mb.create_group("g").unwrap();
        let mut group = mb.group("g").unwrap();
        let mut sent = 0u64;
        let mut held: BTreeSet<u64> = BTreeSet::new();
        let mut nacked: BTreeSet<u64> = BTreeSet::new();
        let mut acked: BTreeSet<u64> = BTreeSet::new();
        for op in ops {
            match op {
                Op::Send(n) => {
                    for _ in 0..n {
                        let r = mb.send(NewMessage::new("job").body("x".repeat(40))).unwrap();
                        sent += 1;
                        prop_assert_eq!(r.seq, sent, "seq contiguous");
                    }
                }
                Op::Claim(n) => {
                    for d in group.claim("w", n as usize).unwrap() {
                        prop_assert!(d.seq() <= sent);
                        prop_assert!(!acked.contains(&d.seq()), "an acked message came back");
                        prop_assert_eq!(nacked.remove(&d.seq()), d.attempt > 1, "redelivery of a nacked message");
                        prop_assert!(held.insert(d.seq()), "delivered twice while held");
                    }
                }
                Op::AckOldest | Op::AckNewest => {
                    let pick = if matches!(op, Op::AckOldest) { held.first() } else { held.last() };
                    if let Some(&seq) = pick {
                        prop_assert!(group.ack(seq).unwrap(), "ack of a held message");
                        held.remove(&seq);
                        prop_assert!(acked.insert(seq));
                        prop_assert!(!group.ack(seq).unwrap(), "acked twice");
                    }
                }
                Op::NackOldest => {
                    if let Some(&seq) = held.first() {
                        group.nack(seq, Duration::ZERO, Some("retry")).unwrap();
                        held.remove(&seq);
                        nacked.insert(seq);
                    }
                }
                Op::AckUpto => {
                    if let Some(&seq) = held.last() {
                        // Settles every delivered message up to seq, nacked ones too.
                        let n = group.ack_upto(seq).unwrap();
                        let settled: Vec<u64> = held.iter().chain(nacked.range(..=seq)).copied().collect();
                        prop_assert_eq!(n, settled.len() as u64);
                        for s in settled {
                            held.remove(&s);
                            nacked.remove(&s);
                            acked.insert(s);
                        }
                    }
                }
                Op::Reopen => {
                    group = Bus::open(dir.path()).unwrap().mailbox("m").unwrap().group("g").unwrap();
                }
                Op::Compact => {
                    mb.compact(None).unwrap();
                }
                Op::TearTail => {
                    // A writer that died mid-append; the next writer repairs it.
                    let log = mb.path().join("log");
                    let newest = std::fs::read_dir(&log).unwrap().map(|e| e.unwrap().path()).max().unwrap();
                    std::fs::OpenOptions::new().append(true).open(newest).unwrap()
                        .write_all(b"{\"crc\":\"00000000\",\"seq\":").unwrap();
                }
            }
            let stats = group.stats().unwrap();
            prop_assert_eq!(stats.acked, acked.len() as u64);
        }
        // Drain: everything sent is delivered and acked exactly once, nothing is lost.
        loop {
            let batch = group.claim("drainer", 100).unwrap();
            if batch.is_empty() { break; }
            for d in batch {
                prop_assert!(!acked.contains(&d.seq()));
                nacked.remove(&d.seq());
                prop_assert!(group.ack(d.seq()).unwrap());
                acked.insert(d.seq());
            }
        }
        // Nacked or abandoned claims still held come back only after their claim ran
        // out; ack what the model still holds.
        for seq in std::mem::take(&mut held) {
            prop_assert!(group.ack(seq).unwrap());
            acked.insert(seq);
        }
        prop_assert_eq!(acked, (1..=sent).collect::<BTreeSet<_>>());
        let seqs: Vec<u64> = mb.messages().filter_map(Result::ok).map(|m| m.seq).collect();
        prop_assert_eq!(seqs.last().copied().unwrap_or(0), sent);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Arbitrary bytes in a segment (the reader's fuzz target): reading, `doctor`,
    /// repair and the next send never panic, and never return anything but records
    /// that verify or typed errors.
    #[test]
    fn arbitrary_segment_bytes_never_panic(
        chunks in prop::collection::vec(
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..600),
                Just(b"\n".to_vec()),
                Just(b"{\"seq\":1,\"id\":\"00000000-0000-0000-0000-000000000000\",\"ts\":\"2026-01-01T00:00:00Z\",\"from\":\"x\",\"type\":\"t\"}\n".to_vec()),
            ],
            0..12,
        )
    ) {
        let dir = tempfile::tempdir().unwrap();
        let bus = common::flush_builder()
            .max_record_bytes(256)
            .init(dir.path())
            .unwrap();
        let mb = bus.create_mailbox("m").unwrap();
        let seg = mb.path().join("log/00000000000000000001.jsonl");
        std::fs::write(&seg, chunks.concat()).unwrap();
        for item in mb.messages() {
            match item {
                Ok(m) => prop_assert!(m.seq >= 1),
                Err(Error::Corrupt { line, .. }) => prop_assert!(line >= 1),
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
        let _ = bus.doctor(false).unwrap();
        let _ = bus.doctor(true).unwrap();
        match mb.send(NewMessage::new("t")) {
            Ok(r) => {
                // Junk lines count as one seq each to readers, so after junk the new
                // record may be reported (loudly) as out of order; on a log that reads
                // without damage it must be the last message.
                let items: Vec<_> = mb.messages().collect();
                if items.iter().all(Result::is_ok) {
                    let last = items.last().unwrap().as_ref().unwrap();
                    prop_assert_eq!(last.seq, r.seq);
                }
            }
            Err(Error::Corrupt { .. }) => {}
            Err(e) => prop_assert!(false, "unexpected send error {e}"),
        }
    }

    /// Fencing tokens strictly increase across any sequence of lease operations,
    /// compactions (many records) and reopenings.
    #[test]
    fn lease_tokens_only_increase(ops in prop::collection::vec(0u8..5, 1..60)) {
        let dir = tempfile::tempdir().unwrap();
        let mut bus = common::flush_bus(dir.path());
        let mut last = 0u64;
        let mut held: Option<(String, u64)> = None;
        for (i, op) in ops.into_iter().enumerate() {
            match (op, held.take()) {
                (0 | 1, None) => {
                    let l = bus.lease("res").holder(format!("h{i}")).try_acquire().unwrap();
                    prop_assert!(l.token() > last, "token went from {} to {}", last, l.token());
                    last = l.token();
                    let info = l.keep();
                    held = Some((info.holder.unwrap(), info.token));
                }
                (2, Some((h, t))) => bus.release_lease("res", &h, t).unwrap(),
                (3, Some((h, t))) => {
                    let info = bus.transfer_lease("res", &h, t, "other", Duration::from_secs(60)).unwrap();
                    prop_assert!(info.token > last);
                    last = info.token;
                    held = Some(("other".into(), info.token));
                }
                (4, h) => {
                    bus = Bus::open(dir.path()).unwrap();
                    held = h;
                }
                (_, Some((h, t))) => {
                    bus.renew_lease("res", &h, t, Duration::from_secs(60)).unwrap();
                    held = Some((h, t));
                }
                (_, None) => {}
            }
        }
    }
}
