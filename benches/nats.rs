//! The JetStream backend beside the directory backend, in the same run:
//!
//! - `backend_send`: one `send` on a directory bus (Flush and Sync) and on JetStream;
//! - `backend_claim_ack`: one `claim_one` + `ack` on a directory bus (Sync, whose ack
//!   is fsynced) and on JetStream (a fetch and a confirmed ack: two round trips).
//!
//! The JetStream side needs a server: `AGENTBUS_NATS_URL=nats://127.0.0.1:4222 cargo
//! bench --features nats --bench nats`; without it only the directory side runs. A
//! server with default settings acknowledges a publish once stored, and fsyncs every
//! two minutes (`sync_interval`): compare it with Flush unless the server runs with
//! `sync_interval: always`.

use std::path::Path;
use std::time::{Duration, Instant};

use agentbus::{Bus, Durability, NewMessage};
use criterion::{criterion_group, criterion_main, Criterion};

fn message() -> NewMessage {
    NewMessage::new("job").body("the quick brown fox jumps over the lazy dog 0123456789abc")
}

/// `(label, bus)` for each backend measured in this run.
fn buses(root: &Path) -> Vec<(&'static str, Bus)> {
    let mut out = vec![
        (
            "dir_flush",
            Bus::builder()
                .durability(Durability::Flush)
                .init(root.join("flush"))
                .unwrap(),
        ),
        ("dir_sync", Bus::init(root.join("sync")).unwrap()),
    ];
    match std::env::var("AGENTBUS_NATS_URL") {
        Ok(url) => {
            let ns = format!("bench-{}", std::process::id());
            out.push(("jetstream", Bus::open(format!("{url}/{ns}")).unwrap()));
        }
        Err(_) => eprintln!("AGENTBUS_NATS_URL is not set: measuring the directory only"),
    }
    out
}

fn benches(c: &mut Criterion) {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let buses = buses(tmp.path());

    let mut g = c.benchmark_group("backend_send");
    for (label, bus) in &buses {
        let mb = bus.create_mailbox("send").unwrap();
        g.bench_function(*label, |b| b.iter(|| mb.send(message()).unwrap()));
    }
    g.finish();

    let mut g = c.benchmark_group("backend_claim_ack");
    for (label, bus) in &buses {
        if *label == "dir_flush" {
            continue;
        }
        let mb = bus.create_mailbox("claim").unwrap();
        let group = mb.create_group("workers").unwrap();
        g.bench_function(*label, |b| {
            b.iter_custom(|iters| {
                for chunk in 0..iters.div_ceil(1000) {
                    let n = (iters - chunk * 1000).min(1000);
                    mb.send_batch((0..n).map(|_| message())).unwrap();
                }
                let start = Instant::now();
                for _ in 0..iters {
                    let d = group.claim_one("w").unwrap().expect("a message");
                    d.ack().unwrap();
                }
                start.elapsed()
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = nats;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(nats);
