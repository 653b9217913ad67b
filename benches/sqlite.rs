//! agentbus against SQLite (bundled, WAL mode) on the same workload in the same run:
//! a queue table `queue(id INTEGER PRIMARY KEY, body TEXT, state INT)`.
//!
//! - `send`: one INSERT per message against `Mailbox::send`;
//! - `claim_ack`: claim the oldest ready row in one transaction (SELECT + UPDATE to
//!   state 1), then ack it in another (UPDATE to state 2), against `claim_one` + `ack`.
//!
//! `synchronous=NORMAL` is compared with `Durability::Flush` (both survive a crash of the
//! process, not of the machine), `synchronous=FULL` with `Durability::Sync`.
//!
//! `cargo bench --bench sqlite`

use std::path::Path;
use std::time::{Duration, Instant};

use agentbus::{Bus, Durability, NewMessage};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rusqlite::Connection;

const BODY: &str = "the quick brown fox jumps over the lazy dog 0123456789abc";

fn open_sqlite(path: &Path, synchronous: &str) -> Connection {
    let db = Connection::open(path).unwrap();
    db.pragma_update(None, "journal_mode", "WAL").unwrap();
    db.pragma_update(None, "synchronous", synchronous).unwrap();
    db.execute_batch(
        "CREATE TABLE IF NOT EXISTS queue (id INTEGER PRIMARY KEY, body TEXT NOT NULL, state INT NOT NULL DEFAULT 0);
         CREATE INDEX IF NOT EXISTS ready ON queue(state, id);",
    )
    .unwrap();
    db
}

fn sqlite_send(db: &Connection) {
    db.execute("INSERT INTO queue (body) VALUES (?1)", [BODY])
        .unwrap();
}

fn sqlite_claim_ack(db: &mut Connection) {
    let tx = db
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .unwrap();
    let id: i64 = tx
        .query_row(
            "SELECT id FROM queue WHERE state = 0 ORDER BY id LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    tx.execute("UPDATE queue SET state = 1 WHERE id = ?1", [id])
        .unwrap();
    tx.commit().unwrap();
    db.execute("UPDATE queue SET state = 2 WHERE id = ?1", [id])
        .unwrap();
}

fn benches(c: &mut Criterion) {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    for (label, durability, synchronous) in [
        ("flush_vs_normal", Durability::Flush, "NORMAL"),
        ("sync_vs_full", Durability::Sync, "FULL"),
    ] {
        let dir = tmp.path().join(label);
        std::fs::create_dir_all(&dir).unwrap();
        let bus = Bus::builder()
            .durability(durability)
            .init(dir.join("bus"))
            .unwrap();
        let mb = bus.create_mailbox("queue").unwrap();
        let group = mb.create_group("workers").unwrap();
        let mut db = open_sqlite(&dir.join("queue.db"), synchronous);

        let mut g = c.benchmark_group(format!("{label}/send"));
        g.throughput(Throughput::Elements(1));
        g.bench_function("sqlite", |b| b.iter(|| sqlite_send(&db)));
        g.bench_function("agentbus", |b| {
            b.iter(|| mb.send(NewMessage::new("job").body(BODY)).unwrap())
        });
        g.finish();

        let mut g = c.benchmark_group(format!("{label}/claim_ack"));
        g.throughput(Throughput::Elements(1));
        g.bench_function("sqlite", |b| {
            b.iter_custom(|iters| {
                let tx = db.transaction().unwrap();
                for _ in 0..iters {
                    tx.execute("INSERT INTO queue (body) VALUES (?1)", [BODY])
                        .unwrap();
                }
                tx.commit().unwrap();
                let started = Instant::now();
                for _ in 0..iters {
                    sqlite_claim_ack(&mut db);
                }
                started.elapsed()
            })
        });
        g.bench_function("agentbus", |b| {
            b.iter_custom(|iters| {
                let batch: Vec<_> = (0..iters)
                    .map(|_| NewMessage::new("job").body(BODY))
                    .collect();
                for chunk in batch.chunks(1000) {
                    mb.send_batch(chunk.to_vec()).unwrap();
                }
                let started = Instant::now();
                for _ in 0..iters {
                    group.claim_one("w").unwrap().unwrap().ack().unwrap();
                }
                started.elapsed()
            })
        });
        g.finish();
    }
}

criterion_group! {
    name = sqlite;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = benches
}
criterion_main!(sqlite);
