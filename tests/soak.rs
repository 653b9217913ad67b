//! Soak: writers, competing consumers and lease contenders run together as real
//! processes while a chaos loop SIGKILLs and restarts them at random. Afterwards
//! `doctor` is clean, every acknowledged send is stored, every message is settled,
//! nothing is lost, and fencing tokens never went backwards.
//!
//! A short run (3 s) is part of `cargo test`. A real soak:
//!
//! ```sh
//! AGENTBUS_SOAK_SECS=600 cargo test --release --test soak -- --nocapture
//! ```

mod common;

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentbus::{GroupOptions, NewMessage, TryRecvError};

const ROLES: [&str; 6] = [
    "writer",
    "writer",
    "consumer",
    "consumer",
    "contender",
    "contender",
];

#[test]
fn soak_with_sigkill_chaos_keeps_every_invariant() {
    let secs = common::env_number("AGENTBUS_SOAK_SECS").unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("bus");
    let bus = common::flush_bus(&root);
    let jobs = bus.create_mailbox("jobs").unwrap();
    jobs.create_group_with(
        "workers",
        GroupOptions::new()
            .visibility(Duration::from_millis(800))
            .max_deliveries(50),
    )
    .unwrap();

    let lines: Arc<Mutex<Vec<String>>> = Arc::default();
    let spawn = |i: usize| -> Child {
        let mut child = common::child(&format!("soak_{}", ROLES[i]))
            .env("BUS", &root)
            .env("ID", i.to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let lines = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(l);
            }
        });
        child
    };
    let mut children: Vec<Child> = (0..ROLES.len()).map(spawn).collect();
    let (mut rng, seed) = common::Rng::seeded_from_time();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut kills = 0;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100 + rng.below(200)));
        let i = rng.below(ROLES.len() as u64) as usize;
        children[i].kill().unwrap(); // SIGKILL
        children[i].wait().unwrap();
        kills += 1;
        children[i] = spawn(i);
    }
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    std::thread::sleep(Duration::from_millis(100)); // let the readers drain the pipes

    // Settle everything: a final send repairs any torn tail; a fresh consumer drains
    // what is left, including claims of killed consumers once they run out.
    let bus = common::open_flush_bus(&root);
    let jobs = bus.mailbox("jobs").unwrap();
    jobs.send(NewMessage::new("final")).unwrap();
    let group = jobs.group("workers").unwrap();
    let mut rx = group.consumer("finisher").unwrap();
    loop {
        match rx.recv_timeout(Duration::from_millis(1500)) {
            Ok(d) => d.ack().unwrap(),
            Err(e) if e.is_timeout() => break,
            Err(e) => panic!("{e}"),
        }
    }

    let lines = lines.lock().unwrap().clone();
    let violations: Vec<_> = lines
        .iter()
        .filter(|l| l.starts_with("FENCE_VIOLATION"))
        .collect();
    assert!(violations.is_empty(), "{violations:?}");
    let report = bus.doctor(false).unwrap();
    assert!(report.problems.is_empty(), "doctor: {:?}", report.problems);
    let stored: Vec<_> = jobs.messages().map(|m| m.unwrap()).collect();
    let published = stored.len() as u64;
    assert_eq!(
        stored.iter().map(|m| m.seq).collect::<Vec<_>>(),
        (1..=published).collect::<Vec<_>>(),
        "seqs contiguous"
    );
    let stored_ids: HashSet<String> = stored
        .iter()
        .map(|m| format!("{} {}", m.seq, m.id))
        .collect();
    let mut sent = 0;
    for l in lines.iter().filter_map(|l| l.strip_prefix("SENT ")) {
        assert!(stored_ids.contains(l), "acknowledged send {l} is missing");
        sent += 1;
    }
    let stats = group.stats().unwrap();
    assert_eq!(
        stats.acked + stats.dead,
        published,
        "every message settled: {stats:?}"
    );
    assert_eq!((stats.pending, stats.in_flight), (0, 0));
    let mut tokens: Vec<u64> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("HOLD ")?.parse().ok())
        .collect();
    let holds = tokens.len();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), holds, "a fencing token was granted twice");
    eprintln!(
        "soak {secs}s (seed {seed}): {published} messages ({sent} acknowledged sends), \
         {kills} SIGKILLs, {} redeliveries, {} dead letters, {holds} lease holds, nothing lost",
        stats.redelivered, stats.dead
    );
}

#[test]
#[ignore = "runs only as a child process of the soak test"]
fn soak_writer() {
    let Some(bus) = common::child_bus() else {
        return;
    };
    let id = common::env("ID");
    let jobs = bus.mailbox("jobs").unwrap();
    let mut out = std::io::stdout().lock();
    for n in 0.. {
        // Restarted writers resend the same keys: idempotency keeps them single.
        let msg = NewMessage::new("job")
            .body(format!("{id}-{n}"))
            .idempotency_key(format!("w{id}-{n}"));
        let r = jobs.send(msg).unwrap();
        writeln!(out, "SENT {} {}", r.seq, r.id).unwrap();
        out.flush().unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
#[ignore = "runs only as a child process of the soak test"]
fn soak_consumer() {
    let Some(bus) = common::child_bus() else {
        return;
    };
    let id = common::env("ID");
    let group = bus.mailbox("jobs").unwrap().group("workers").unwrap();
    let mut rx = group.consumer(&format!("c{id}")).unwrap();
    loop {
        match rx.try_recv() {
            Ok(d) => {
                std::thread::sleep(Duration::from_millis(1));
                d.ack().unwrap();
            }
            Err(TryRecvError::Empty) => std::thread::sleep(Duration::from_millis(5)),
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
#[ignore = "runs only as a child process of the soak test"]
fn soak_contender() {
    let Some(bus) = common::child_bus() else {
        return;
    };
    let id = common::env("ID");
    let root = std::path::PathBuf::from(common::env("BUS"));
    let mut out = std::io::stdout().lock();
    loop {
        let Ok(lease) = bus
            .lease("soak")
            .holder(format!("p{id}"))
            .ttl(Duration::from_secs(5))
            .process_bound(true)
            .acquire(Duration::from_secs(10))
        else {
            continue;
        };
        // A fenced resource: refuses a token not newer than the newest it has seen.
        let guard = std::fs::File::create(root.join("fence.lock")).unwrap();
        guard.lock().unwrap();
        let fence = root.join("fence");
        let newest: u64 = std::fs::read_to_string(&fence)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if lease.token() <= newest {
            writeln!(
                out,
                "FENCE_VIOLATION token {} after {newest}",
                lease.token()
            )
            .unwrap();
        }
        std::fs::write(&fence, lease.token().to_string()).unwrap();
        drop(guard);
        writeln!(out, "HOLD {}", lease.token()).unwrap();
        out.flush().unwrap();
        std::thread::sleep(Duration::from_millis(3));
        let _ = lease.release();
    }
}
