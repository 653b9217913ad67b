//! The JetStream backend on a real 3-node cluster on loopback, through failovers:
//! sends across a stream-leader kill, competing consumers across a consumer step-down
//! and a leader kill, two lease contenders across a KV-leader kill, and a new process
//! opening the bus while the meta leader is down.
//!
//! Each test starts its own three `nats-server`s (the binary `$AGENTBUS_NATS_SERVER`,
//! else `/tmp/agentbus-ci-venv/bin/nats-server`, which `.ci/run` installs) with their
//! own store directories, routes and ports (14403-14438), and stops every one by its
//! PID when it ends, also on a panic. Without a binary the tests print why and pass
//! without running. The tests take turns (one cluster at a time), every wait is
//! bounded, and each prints its figures (`cargo test --test nats_cluster --
//! --nocapture` shows them): the failover window in ms, what was lost (0), double
//! lease holds (0).

mod cluster;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use agentbus::{Bus, Error, GroupOptions, NewMessage, RecvTimeoutError};
use cluster::Cluster;

/// A bound for waits that normally take milliseconds to seconds, with room for a
/// loaded 2-core machine.
const PATIENCE: Duration = Duration::from_secs(60);

/// Retries `f` while it fails with a retryable error, up to [`PATIENCE`]: what an
/// agent does during a failover (README "Scaling out").
fn retrying<T>(what: &str, mut f: impl FnMut() -> agentbus::Result<T>) -> T {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if e.is_retryable() && start.elapsed() < PATIENCE => {
                thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("{what}: {e} (after {:?})", start.elapsed()),
        }
    }
}

fn open(cluster: &Cluster, agent: &str) -> Bus {
    retrying("open the bus", || {
        Bus::builder()
            .agent(agent)
            .poll_interval(Duration::from_millis(100))
            .open(cluster.url(Some(3)))
    })
}

/// Every acknowledged send survives a kill -9 of the stream's leader: each receipt
/// reads back afterwards with its id, no key is stored twice, and sends are refused
/// (retryably) only for a short window.
#[test]
fn sends_survive_a_stream_leader_kill() {
    let Some(cluster) = Cluster::start(0) else {
        return;
    };
    let bus = open(&cluster, "sender");
    retrying("create the mailbox", || {
        bus.create_mailbox("jobs").map(drop)
    });
    let stream = cluster.stream_name("jobs");
    let mb = retrying("open the mailbox", || bus.mailbox("jobs"));

    const N: usize = 400;
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let sent = Arc::new(AtomicUsize::new(0));
    let sender = {
        let (mb, sent, killed_at) = (mb.clone(), sent.clone(), killed_at.clone());
        thread::spawn(move || {
            let mut receipts = Vec::new();
            let mut refused = 0;
            let mut first_ok_after_kill = None;
            for i in 0..N {
                let key = format!("k-{i}");
                let start = Instant::now();
                let receipt = loop {
                    let m = NewMessage::new("job").body(format!("job {i}"));
                    match mb.send(m.idempotency_key(key.clone())) {
                        Ok(r) => break r,
                        Err(e) if e.is_retryable() && start.elapsed() < PATIENCE => {
                            refused += 1;
                            thread::sleep(Duration::from_millis(20));
                        }
                        Err(e) => panic!("send {i}: {e}"),
                    }
                };
                if let Some(k) = *killed_at.lock().unwrap() {
                    first_ok_after_kill.get_or_insert(k.elapsed());
                }
                receipts.push((key, receipt));
                sent.fetch_add(1, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(5));
            }
            (receipts, refused, first_ok_after_kill)
        })
    };
    wait_until("100 sends", || sent.load(Ordering::SeqCst) >= 100);
    let leader = cluster.stream_leader(&stream);
    *killed_at.lock().unwrap() = Some(Instant::now());
    cluster.kill(&leader);
    let (receipts, refused, window) = sender.join().expect("the sender");

    // A new process's view: every receipt reads back, with its id, once per key.
    let reader = open(&cluster, "reader");
    let mb = retrying("open the mailbox", || reader.mailbox("jobs"));
    let stored: Vec<_> = retrying("read the mailbox", || mb.messages().collect());
    let mut by_key: HashMap<String, Vec<u64>> = HashMap::new();
    for m in &stored {
        by_key
            .entry(m.idempotency_key.clone().unwrap_or_default())
            .or_default()
            .push(m.seq);
    }
    let by_seq: HashMap<u64, _> = stored.iter().map(|m| (m.seq, m)).collect();
    let mut lost = 0;
    for (key, r) in &receipts {
        match by_seq.get(&r.seq) {
            Some(m) if m.id == r.id && m.idempotency_key.as_deref() == Some(key) => {}
            _ => lost += 1,
        }
    }
    let twice = by_key.values().filter(|seqs| seqs.len() > 1).count();
    let window = window.expect("sends went on after the kill");
    println!(
        "figures: sends across a stream-leader kill ({leader}): {} receipts, lost {lost}, \
         stored twice {twice}, {refused} refusals, first send stored {} ms after the kill",
        receipts.len(),
        window.as_millis()
    );
    assert_eq!(lost, 0, "every receipt reads back");
    assert_eq!(twice, 0, "no key is stored twice");
    assert_eq!(stored.len(), N, "exactly the messages sent");
}

/// What one consumer saw of one delivery.
#[derive(Debug, Clone)]
struct Seen {
    seq: u64,
    attempt: u32,
    received: Instant,
    deadline: Instant,
    /// When the server confirmed its ack; `None` if it never did.
    acked: Option<Instant>,
}

/// Three competing consumers (each its own connection) keep claiming through a
/// consumer-leader step-down and a kill -9 of the consumer's leader: none hangs,
/// every message is acked, and a message is delivered twice only when its earlier
/// claim ran out unacknowledged.
#[test]
fn competing_consumers_survive_a_step_down_and_a_leader_kill() {
    let Some(cluster) = Cluster::start(1) else {
        return;
    };
    let visibility = Duration::from_secs(3);
    let admin = open(&cluster, "admin");
    retrying("create the mailbox", || {
        admin.create_mailbox("work").map(drop)
    });
    let mb = retrying("open the mailbox", || admin.mailbox("work"));
    // The group is made by a process whose URL names no replicas: its consumer still
    // has the stream's three (issue 15 #7). Its dead-letter mailbox is made first with
    // three, as a process with `?replicas=3` will open it.
    retrying("create the dead-letter mailbox", || {
        admin.create_mailbox("work.dlq").map(drop)
    });
    let plain = retrying("open the bus", || Bus::open(cluster.url(None)));
    retrying("create the group", || {
        let opts = GroupOptions::new()
            .visibility(visibility)
            .max_deliveries(1000);
        plain
            .mailbox("work")?
            .create_group_with("g", opts)
            .map(drop)
    });
    retrying("create the CLI's group", || {
        let opts = GroupOptions::new().visibility(visibility);
        plain
            .mailbox("work")?
            .create_group_with("cli", opts)
            .map(drop)
    });
    drop(plain);
    let stream = cluster.stream_name("work");
    assert_eq!(
        cluster.consumer_replicas(&stream, "g"),
        3,
        "the stream's replicas"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    // Each worker reports here when it stops; one that never does hung.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    for i in 0..3 {
        {
            let name = format!("w{i}");
            let b = open(&cluster, &name);
            let (stop, seen, done_tx) = (stop.clone(), seen.clone(), done_tx.clone());
            thread::spawn(move || {
                let group = retrying("open the group", || b.mailbox("work")?.group("g"));
                let mut rx = group.consumer(&name).expect("a consumer");
                let (mut longest, mut looks_after_stop) = (Duration::ZERO, 0);
                let mut errors = Vec::new();
                while looks_after_stop < 3 {
                    if stop.load(Ordering::SeqCst) {
                        looks_after_stop += 1;
                    }
                    let start = Instant::now();
                    let got = rx.recv_timeout(Duration::from_secs(1));
                    longest = longest.max(start.elapsed());
                    let d = match got {
                        Ok(d) => d,
                        Err(RecvTimeoutError::Timeout) => continue,
                        Err(RecvTimeoutError::Bus(e)) => {
                            errors.push((e.to_string(), e.is_retryable()));
                            continue;
                        }
                        Err(e) => panic!("{e}"),
                    };
                    let received = Instant::now();
                    let left =
                        (d.deadline - time::OffsetDateTime::now_utc()).max(time::Duration::ZERO);
                    let deadline = received + Duration::try_from(left).unwrap_or_default();
                    thread::sleep(Duration::from_millis(10)); // the work
                    let acked = ack_with_retries(&d, deadline);
                    seen.lock().unwrap().push(Seen {
                        seq: d.seq(),
                        attempt: d.attempt,
                        received,
                        deadline,
                        acked,
                    });
                }
                let _ = done_tx.send((name, longest, errors));
            });
        }
    }

    // Messages keep coming through both failovers.
    const N: usize = 300;
    // `watch --group --exec` in a process of its own, on a group of its own (so it
    // sees every message): it must handle all of them and exit.
    let scratch = tempfile::tempdir().unwrap();
    let watch_out = scratch.path().join("watch.jsonl");
    let mut watcher = Reaped(
        std::process::Command::new(env!("CARGO_BIN_EXE_agentbus"))
            .arg("--bus")
            .arg(cluster.url(None))
            .args(["watch", "work", "--group", "cli", "--consumer", "cli"])
            .args(["--exec", "true", "--max", &N.to_string()])
            .env_remove("AGENTBUS_DIR")
            .stdout(std::fs::File::create(&watch_out).unwrap())
            .stderr(std::fs::File::create(scratch.path().join("watch.err")).unwrap())
            .spawn()
            .expect("start agentbus watch"),
    );
    let sender = {
        let mb = mb.clone();
        thread::spawn(move || {
            for i in 0..N {
                let m = NewMessage::new("task").idempotency_key(format!("t-{i}"));
                retrying("send", || mb.send(m.clone()));
                thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let acked = |seen: &Mutex<Vec<Seen>>| {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|s| s.acked.is_some())
            .count()
    };
    wait_until("50 acked", || acked(&seen) >= 50);
    let leader = cluster.consumer_leader(&stream, "g");
    let stepped_at = Instant::now();
    cluster.step_down_consumer(&stream, "g");
    cluster.step_down_consumer(&stream, "cli");
    let before = acked(&seen);
    wait_until("acks after the step-down", || acked(&seen) > before + 20);
    let step_down_window = stepped_at.elapsed();
    let new_leader =
        wait_for(|| Some(cluster.consumer_leader(&stream, "g")).filter(|l| *l != leader));
    let killed_at = Instant::now();
    cluster.kill(&new_leader);
    let before = acked(&seen);
    wait_until("acks after the kill", || acked(&seen) > before + 20);
    let kill_window = killed_at.elapsed();
    sender.join().expect("the sender");
    // Done when every message was delivered and the server holds none unsettled. An
    // ack whose confirmation was lost may have been applied (README "Scaling out"):
    // the server's counters, not the confirmations, say whether anything is left.
    let group = retrying("open the group", || mb.group("g"));
    let start = Instant::now();
    loop {
        let delivered: std::collections::HashSet<u64> =
            seen.lock().unwrap().iter().map(|s| s.seq).collect();
        let stats = group.stats();
        let settled = stats
            .as_ref()
            .is_ok_and(|st| st.pending == 0 && st.in_flight == 0);
        if delivered.len() >= N && settled {
            break;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "not every message settled: {} of {N} delivered, {stats:?}",
            delivered.len()
        );
        thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::SeqCst);
    let mut longest = Duration::ZERO;
    for _ in 0..3 {
        let (name, l, errors) = done_rx
            .recv_timeout(PATIENCE)
            .expect("a consumer hung: it never came back from a receive");
        let retryable = errors.iter().filter(|e| e.1).count();
        println!(
            "figures: consumer {name}: longest recv_timeout(1 s) {} ms, {} errors returned \
             ({retryable} retryable, at a deadline), first: {:?}",
            l.as_millis(),
            errors.len(),
            errors.first()
        );
        longest = longest.max(l);
    }

    // The watcher finishes its 300 messages; one that hung is killed (by its PID)
    // and fails the test.
    let start = Instant::now();
    let status = loop {
        if let Some(status) = watcher.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "agentbus watch --group --exec hung"
        );
        thread::sleep(Duration::from_millis(100));
    };
    let lines = std::fs::read_to_string(&watch_out).unwrap();
    let stderr = std::fs::read_to_string(scratch.path().join("watch.err")).unwrap();
    assert!(status.success(), "agentbus watch: {status}: {stderr}");
    let handled: Vec<serde_json::Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let unsettled = handled
        .iter()
        .filter(|l| l.get("unsettled").is_some())
        .count();
    println!(
        "figures: agentbus watch --group --exec: {} messages handled, {unsettled} not \
         settled (redelivered)",
        handled.len()
    );
    assert_eq!(handled.len(), N);

    let seen = seen.lock().unwrap();
    let mut by_seq: BTreeMap<u64, Vec<&Seen>> = BTreeMap::new();
    for s in seen.iter() {
        by_seq.entry(s.seq).or_default().push(s);
    }
    let lost = (1..=N as u64)
        .filter(|seq| !by_seq.contains_key(seq))
        .count();
    let unconfirmed = by_seq
        .values()
        .filter(|v| v.iter().all(|s| s.acked.is_none()))
        .count();
    let (mut duplicates, mut unexplained) = (0, Vec::new());
    for deliveries in by_seq.values() {
        for pair in deliveries.windows(2) {
            let (before, after) = (pair[0], pair[1]);
            duplicates += 1;
            // Only a claim that ran out unacknowledged may be delivered again.
            let acked_first = before.acked.is_some_and(|a| a <= after.received);
            let expired = after.received + Duration::from_millis(250) >= before.deadline;
            if acked_first || !expired || after.attempt <= before.attempt {
                unexplained.push(format!("{before:?} then {after:?}"));
            }
        }
    }
    println!(
        "figures: competing consumers: {N} messages, lost {lost}, {unconfirmed} settled \
         without a confirmed ack, {duplicates} duplicate deliveries, {} unexplained; \
         step-down ({leader}) window {} ms, leader kill ({new_leader}) window {} ms, \
         longest receive {} ms",
        unexplained.len(),
        step_down_window.as_millis(),
        kill_window.as_millis(),
        longest.as_millis()
    );
    assert_eq!(
        lost, 0,
        "every message delivered, and the server holds none unsettled"
    );
    assert!(
        unexplained.is_empty(),
        "duplicates not from expired claims: {unexplained:#?}"
    );
    // recv_timeout(1 s) returns within its second, plus at most one unanswered
    // request (5 s) and room for a loaded machine.
    assert!(
        longest < Duration::from_secs(15),
        "a consumer hung for {longest:?}"
    );
}

/// A child process killed (by its PID) and reaped when dropped, also on a panic.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Acks `d`, retrying what the server did not confirm until the claim runs out;
/// when the server confirmed it.
fn ack_with_retries(d: &agentbus::Delivery, deadline: Instant) -> Option<Instant> {
    loop {
        match d.ack() {
            Ok(()) => return Some(Instant::now()),
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(50))
            }
            Err(_) => return None,
        }
    }
}

/// A grant as its holder saw it: from when `try_acquire` returned to the last moment
/// the holder found it valid (a holder checks `is_valid` before each fenced action).
#[derive(Debug, Clone)]
struct Held {
    holder: &'static str,
    token: u64,
    from: Instant,
    until: Instant,
}

/// Two contenders for one lease through a kill -9 of the KV bucket's leader: never two
/// holders at once, and every grant's token is higher than the one before.
#[test]
fn lease_contenders_survive_a_kv_leader_kill() {
    let Some(cluster) = Cluster::start(2) else {
        return;
    };
    let ttl = Duration::from_millis(800);
    let grants: Arc<Mutex<Vec<Held>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let first = open(&cluster, "a");
    retrying("open the lease bucket", || first.leases().map(drop));
    let bucket = format!("KV_{}_LEASES", cluster.namespace());
    let contenders: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|name| {
            let b = open(&cluster, name);
            let (grants, stop) = (grants.clone(), stop.clone());
            thread::spawn(move || {
                let (mut refused, mut n) = (0u32, 0u64);
                while !stop.load(Ordering::SeqCst) {
                    let lease = match b.lease("deploy").ttl(ttl).try_acquire() {
                        Ok(l) => l,
                        Err(Error::LeaseHeld { .. }) => {
                            thread::sleep(Duration::from_millis(5));
                            continue;
                        }
                        Err(e) if e.is_retryable() => {
                            refused += 1;
                            thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                        Err(e) => panic!("acquire: {e}"),
                    };
                    let from = Instant::now();
                    n += 1;
                    // Hold it for a while, checking it before each "action"; every
                    // third grant is held until it runs out.
                    let hold = if n % 3 == 0 {
                        ttl * 2
                    } else {
                        Duration::from_millis(20 + (n % 5) * 20)
                    };
                    let mut until = from;
                    while from.elapsed() < hold {
                        if !lease.is_valid() {
                            break;
                        }
                        until = Instant::now();
                        thread::sleep(Duration::from_millis(5));
                    }
                    let token = lease.token();
                    if n % 3 == 0 {
                        drop(lease.keep());
                    } else {
                        // A release the server did not confirm leaves the grant to run
                        // out at its TTL: the holder stopped using it either way.
                        let _ = lease.release();
                    }
                    grants.lock().unwrap().push(Held {
                        holder: name,
                        token,
                        from,
                        until,
                    });
                }
                refused
            })
        })
        .collect();
    let count = |g: &Mutex<Vec<Held>>| g.lock().unwrap().len();
    wait_until("20 grants", || count(&grants) >= 20);
    let leader = cluster.stream_leader(&bucket);
    let killed_at = Instant::now();
    cluster.kill(&leader);
    let before = count(&grants);
    wait_until("a grant after the kill", || count(&grants) > before);
    let window = killed_at.elapsed();
    wait_until("20 grants after the kill", || count(&grants) >= before + 20);
    stop.store(true, Ordering::SeqCst);
    let refused: u32 = contenders
        .into_iter()
        .map(|c| c.join().expect("a contender"))
        .sum();

    let mut grants = grants.lock().unwrap().clone();
    grants.sort_by_key(|g| g.from);
    let mut double = Vec::new();
    for (i, a) in grants.iter().enumerate() {
        for b in &grants[i + 1..] {
            if b.from < a.until && b.holder != a.holder {
                double.push(format!("{a:?} and {b:?}"));
            }
        }
    }
    let disorder: Vec<_> = grants
        .windows(2)
        .filter(|w| w[1].token <= w[0].token)
        .map(|w| format!("{:?} then {:?}", w[0], w[1]))
        .collect();
    println!(
        "figures: lease contenders across a KV-leader kill ({leader}): {} grants, double \
         holds {}, tokens out of order {}, {refused} retryable refusals, first grant {} ms \
         after the kill",
        grants.len(),
        double.len(),
        disorder.len(),
        window.as_millis()
    );
    assert!(double.is_empty(), "two holders at once: {double:#?}");
    assert!(disorder.is_empty(), "tokens not increasing: {disorder:#?}");
}

/// A new process opens the bus, sends and reads while the cluster has no meta leader
/// (two of three servers killed, so none can be elected), as long as its mailbox's
/// stream leader is alive; its URL's seed list starts with the dead servers.
#[test]
fn a_new_process_opens_the_bus_without_a_meta_leader() {
    let Some(cluster) = Cluster::start(3) else {
        return;
    };
    // A mailbox on one server (replicas 1), so it lives on while the others are gone.
    let url = cluster.url(None);
    let admin = retrying("open the bus", || Bus::open(&url));
    retrying("create the mailbox", || {
        admin.create_mailbox("solo").map(drop)
    });
    retrying("create the group", || {
        admin.mailbox("solo")?.create_group("g").map(drop)
    });
    let stream = cluster.stream_name("solo");
    let survivor = cluster.stream_leader(&stream);
    let dead: Vec<String> = cluster
        .names()
        .into_iter()
        .filter(|n| *n != survivor)
        .collect();
    drop(admin);
    for name in &dead {
        cluster.kill(name);
    }
    let killed_at = Instant::now();
    // The survivor notices that it is alone: no meta leader can be elected now.
    // (nats-server takes 7 to 45 s to give up on a lost meta leader.)
    while cluster.meta_leader(&survivor).is_some() {
        assert!(
            killed_at.elapsed() < 2 * PATIENCE,
            "the survivor kept a meta leader without a quorum"
        );
        thread::sleep(Duration::from_millis(100));
    }

    let cli = |url: &str, args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentbus"))
            .arg("--bus")
            .arg(url)
            .args(args)
            .env_remove("AGENTBUS_DIR")
            .output()
            .expect("run agentbus");
        assert!(
            out.status.success(),
            "agentbus {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let leaderless = killed_at.elapsed();
    let ns = cluster.namespace();
    let started = Instant::now();
    let only = format!("nats://127.0.0.1:{}/{ns}", cluster.port(&survivor));
    cli(
        &only,
        &["send", "solo", "--type", "note", "--body", "no meta leader"],
    );
    let took = started.elapsed();
    // The seed list names the dead servers first.
    let mut seeds: Vec<String> = dead
        .iter()
        .map(|n| format!("127.0.0.1:{}", cluster.port(n)))
        .collect();
    seeds.push(format!("127.0.0.1:{}", cluster.port(&survivor)));
    let url = format!("nats://{}/{ns}", seeds.join(","));
    // A group's claims go to the consumer's leader. (Reading by seq, `recv` without a
    // group, does not: nats-server answers its message-get API only while the meta
    // group has a leader; README "Scaling out".)
    let started = Instant::now();
    let read = cli(&url, &["recv", "solo", "--group", "g", "--consumer", "c"]);
    let claimed = started.elapsed();
    println!(
        "figures: a new process without a meta leader (only {survivor} up, leaderless {} \
         ms after the kills): opened the bus and sent in {} ms, claimed in {} ms",
        leaderless.as_millis(),
        took.as_millis(),
        claimed.as_millis()
    );
    assert!(read.contains("no meta leader"), "{read}");
}

/// Waits until `f` holds, at most [`PATIENCE`].
fn wait_until(what: &str, f: impl Fn() -> bool) {
    let start = Instant::now();
    while !f() {
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for `f` to give something, at most [`PATIENCE`].
fn wait_for<T>(f: impl Fn() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < PATIENCE, "timed out");
        thread::sleep(Duration::from_millis(50));
    }
}
