//! Send throughput next to its physical baselines, measured in the same run on the same
//! file system with ~200-byte records:
//!
//! - `flush`: raw `write()` of one line to an `O_APPEND` file vs `send` with
//!   `Durability::Flush`;
//! - `sync`: raw `write()` + `fdatasync` vs `send` with `Durability::Sync`;
//! - `batch100_sync`: one `write()` of 100 lines + one `fdatasync` vs `send_batch` of
//!   100 messages with `Durability::Sync`.
//!
//! Run with `cargo bench --bench send`; compare the two lines of each group.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use agentbus::{Bus, Durability, Mailbox, NewMessage};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

/// A body that makes the stored record about 200 bytes long.
const BODY: &str = "the quick brown fox jumps over the lazy dog 0123456789abc";

fn raw_file(dir: &Path) -> File {
    std::fs::create_dir_all(dir).unwrap();
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("raw.jsonl"))
        .unwrap()
}

fn mailbox(dir: &Path, durability: Durability) -> Mailbox {
    let bus = Bus::builder()
        .durability(durability)
        .agent("bench")
        .init(dir.join("bus"))
        .unwrap();
    bus.create_or_open_mailbox("bench").unwrap()
}

fn message() -> NewMessage {
    NewMessage::new("bench.record").body(BODY)
}

/// A record line as agentbus stores it, used as the raw baseline's payload.
fn sample_line(dir: &Path) -> Vec<u8> {
    let mb = mailbox(&dir.join("sample"), Durability::Flush);
    mb.send(message()).unwrap();
    let mut line = std::fs::read(mb.path().join("log/00000000000000000001.jsonl")).unwrap();
    line.truncate(line.iter().position(|&b| b == b'\n').unwrap() + 1);
    line
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let line = sample_line(dir.path());
    eprintln!("record size: {} bytes", line.len());

    let mut g = c.benchmark_group("flush");
    g.throughput(Throughput::Elements(1));
    let mut raw = raw_file(dir.path());
    g.bench_function("raw_write", |b| b.iter(|| raw.write_all(&line).unwrap()));
    // The syscalls an append cannot avoid: lock, fstat (has another process appended?),
    // write, unlock. The floor any cross-process append sits on.
    let lock = raw_file(&dir.path().join("lockdir"));
    g.bench_function("raw_flock_fstat_write", |b| {
        b.iter(|| {
            lock.lock().unwrap();
            let _ = raw.metadata().unwrap().len();
            raw.write_all(&line).unwrap();
            lock.unlock().unwrap();
        })
    });
    let mb = mailbox(&dir.path().join("flush"), Durability::Flush);
    g.bench_function("send", |b| b.iter(|| mb.send(message()).unwrap()));
    g.finish();

    let mut g = c.benchmark_group("sync");
    g.throughput(Throughput::Elements(1));
    g.bench_function("raw_write_fdatasync", |b| {
        b.iter(|| {
            raw.write_all(&line).unwrap();
            raw.sync_data().unwrap();
        })
    });
    let mb = mailbox(&dir.path().join("sync"), Durability::Sync);
    g.bench_function("send", |b| b.iter(|| mb.send(message()).unwrap()));
    g.finish();

    let mut g = c.benchmark_group("batch100_sync");
    g.throughput(Throughput::Elements(100));
    let batch_bytes: Vec<u8> = line.repeat(100);
    g.bench_function("raw_write_fdatasync", |b| {
        b.iter(|| {
            raw.write_all(&batch_bytes).unwrap();
            raw.sync_data().unwrap();
        })
    });
    g.bench_function("send_batch", |b| {
        b.iter_batched(
            || vec![message(); 100],
            |batch| mb.send_batch(batch).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group! {
    name = send;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = benches
}
criterion_main!(send);
