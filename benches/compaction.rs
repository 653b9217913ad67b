//! After compaction of a fully acked mailbox of 1,000,000 messages, opening it and
//! receiving the next message is as cheap as on a fresh mailbox.
//!
//! Both benchmarks measure the same thing, as a new agent process would do it: open
//! the bus, the mailbox and the group, claim the next message and ack it. One runs on
//! a mailbox that has been through 1,000,000 messages (sent, claimed, acked, then
//! compacted); the other on a fresh mailbox. Their ratio is the figure of interest.
//!
//! Run with `cargo bench --bench compaction` (the setup takes a few seconds).

use std::path::Path;
use std::time::{Duration, Instant};

use agentbus::{Bus, Durability, NewMessage};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

const HISTORY: usize = 1_000_000;

fn prepare(root: &Path, history: usize) {
    let bus = Bus::builder()
        .durability(Durability::Flush)
        .init(root)
        .unwrap();
    let mb = bus.create_mailbox("jobs").unwrap();
    let group = mb.create_group("workers").unwrap();
    let started = Instant::now();
    let chunk: Vec<_> = (0..1000)
        .map(|i| NewMessage::new("job").body(format!("job number {i:>40}")))
        .collect();
    for _ in 0..history / 1000 {
        mb.send_batch(chunk.clone()).unwrap();
    }
    let sent = started.elapsed();
    loop {
        let batch = group.claim("drainer", 1000).unwrap();
        let Some(last) = batch.last() else { break };
        group.ack_upto(last.seq()).unwrap();
    }
    let drained = started.elapsed() - sent;
    let before = mb.stats().unwrap();
    let report = mb.compact(None).unwrap();
    if history > 0 {
        eprintln!(
            "history of {history}: sent in {sent:.1?}, drained in {drained:.1?}; \
             compaction removed {} of {} segments ({} MB)",
            report.removed.len(),
            before.segments,
            report.bytes / 1_000_000
        );
    }
}

/// What a freshly started agent does to take the next message.
fn open_and_receive(root: &Path) {
    let bus = Bus::builder()
        .durability(Durability::Flush)
        .open(root)
        .unwrap();
    let group = bus.mailbox("jobs").unwrap().group("workers").unwrap();
    let d = group
        .claim_one("worker")
        .unwrap()
        .expect("a message is waiting");
    d.ack().unwrap();
}

fn send_one(root: &Path) {
    let bus = Bus::builder()
        .durability(Durability::Flush)
        .open(root)
        .unwrap();
    bus.mailbox("jobs")
        .unwrap()
        .send(NewMessage::new("job"))
        .unwrap();
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let compacted = dir.path().join("compacted");
    let fresh = dir.path().join("fresh");
    prepare(&compacted, HISTORY);
    prepare(&fresh, 0);

    let mut g = c.benchmark_group("open_and_receive_next");
    for (name, root) in [
        ("fresh_mailbox", &fresh),
        ("after_1M_compacted", &compacted),
    ] {
        g.bench_function(name, |b| {
            b.iter_batched(
                || send_one(root),
                |()| open_and_receive(root),
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group! {
    name = compaction;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50);
    targets = benches
}
criterion_main!(compaction);
