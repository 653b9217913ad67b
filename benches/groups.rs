//! Consumer groups, leases and receiving, each next to a raw baseline in the same run:
//!
//! - `drain_100k`: 100,000 messages through a group, with per-message ack and with
//!   cumulative ack, against writing the same 100,000 records with raw `write()`;
//! - `lease`: acquire + release against one raw `write()`;
//! - `receive_next`: a follower taking the next message with 1,000,000 messages of
//!   history against an empty mailbox.
//!
//! `cargo bench --bench groups`

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use agentbus::{Bus, Durability, NewMessage};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const DRAIN: u64 = 100_000;

fn bus(root: &Path) -> Bus {
    Bus::builder()
        .durability(Durability::Flush)
        .init(root)
        .unwrap()
}

fn fill(mb: &agentbus::Mailbox, n: u64) {
    let chunk: Vec<_> = (0..1000)
        .map(|_| {
            NewMessage::new("job").body("the quick brown fox jumps over the lazy dog 0123456789abc")
        })
        .collect();
    for _ in 0..n / 1000 {
        mb.send_batch(chunk.clone()).unwrap();
    }
}

fn benches(c: &mut Criterion) {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let line = vec![b'x'; 212]
        .into_iter()
        .chain([b'\n'])
        .collect::<Vec<u8>>();

    let mut g = c.benchmark_group("drain_100k");
    g.sample_size(10).throughput(Throughput::Elements(DRAIN));
    g.bench_function("raw_write", |b| {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(tmp.path().join("raw"))
            .unwrap();
        b.iter(|| {
            for _ in 0..DRAIN {
                f.write_all(&line).unwrap();
            }
        })
    });
    let mut round = 0;
    for (name, cumulative) in [("per_message_ack", false), ("cumulative_ack", true)] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    round += 1;
                    let bus = bus(&tmp.path().join(format!("drain{round}")));
                    let mb = bus.create_mailbox("jobs").unwrap();
                    let group = mb.create_group("workers").unwrap();
                    fill(&mb, DRAIN);
                    let started = Instant::now();
                    loop {
                        let batch = group.claim("w", 1000).unwrap();
                        let Some(last) = batch.last() else { break };
                        if cumulative {
                            group.ack_upto(last.seq()).unwrap();
                        } else {
                            for d in &batch {
                                d.ack().unwrap();
                            }
                        }
                    }
                    total += started.elapsed();
                    drop(bus);
                    let _ = std::fs::remove_dir_all(tmp.path().join(format!("drain{round}")));
                }
                total
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("lease");
    g.throughput(Throughput::Elements(1));
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(tmp.path().join("raw2"))
        .unwrap();
    g.bench_function("raw_write", |b| b.iter(|| f.write_all(&line).unwrap()));
    let lbus = bus(&tmp.path().join("leases"));
    g.bench_function("acquire_release", |b| {
        b.iter(|| {
            lbus.lease("resource")
                .try_acquire()
                .unwrap()
                .release()
                .unwrap()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("receive_next");
    for (name, history) in [("empty_mailbox", 0), ("history_1M", 1_000_000)] {
        let bus = bus(&tmp.path().join(name));
        let mb = bus.create_mailbox("m").unwrap();
        fill(&mb, history);
        let mut rx = bus.follow(&["m"]).unwrap();
        g.bench_function(name, |b| {
            b.iter_batched(
                || mb.send(NewMessage::new("t").body("next")).unwrap(),
                |_| rx.try_recv().unwrap(),
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group! {
    name = groups;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(groups);
