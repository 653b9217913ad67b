//! The bus processes of the power-loss test: each role is an ignored test that the
//! harness runs as a child process (this test binary, re-invoked) on the mounted bus.
//! A role prints one line per thing it was promised, after the call that promised it
//! returned: the ledger (`ledger.rs`) reads these lines, and the checks after each
//! power cut hold the bus to them. A role runs until it is killed.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use agentbus::{Bus, NewMessage};

use crate::common;

/// The lease names the leasers compete for, and the one handed on with handoffs.
pub const LEASES: [&str; 2] = ["alpha", "beta"];
pub const BATON: &str = "baton";
/// Idempotency keys are drawn from this many, so that keys repeat across power cuts.
pub const KEYS: u64 = 300;

/// What every role is told through its environment.
struct Ctx {
    bus: PathBuf,
    round: u64,
    id: u64,
    rng: common::Rng,
}

impl Ctx {
    fn from_env() -> Ctx {
        let round = common::env("ROUND").parse().unwrap();
        let id = common::env("ID").parse().unwrap();
        let seed: u64 = common::env("SEED").parse().unwrap();
        Ctx {
            bus: common::env("BUS").into(),
            round,
            id,
            rng: common::Rng::new(seed ^ (round << 20) ^ (id << 8) ^ 0x9e37),
        }
    }

    /// Opens the bus (`Sync`, the default), retrying while it fails: right after a
    /// cut the harness checks the bus itself first, so failing here is not expected,
    /// but the role must keep going to report what it sees.
    fn open(&self, agent: &str) -> Bus {
        retry("open", || Bus::builder().agent(agent).open(&self.bus))
    }

    fn pause(&mut self, max_ms: u64) {
        std::thread::sleep(Duration::from_millis(self.rng.below(max_ms + 1)));
    }
}

/// `f`, again and again until it works (the cut ends every role soon enough).
fn retry<T>(what: &str, mut f: impl FnMut() -> agentbus::Result<T>) -> T {
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) => err(what, &e),
        }
    }
}

/// Reports an error and waits a little before the caller tries again.
fn err(what: &str, e: &dyn std::fmt::Display) {
    let text = e.to_string().replace('\n', " ");
    println!("ERR {what} {text}");
    std::thread::sleep(Duration::from_millis(20));
}

fn child_only() -> bool {
    common::is_child()
}

#[test]
#[ignore = "runs only as a child process of the power-loss test"]
fn pl_writer() {
    if !child_only() {
        return;
    }
    let mut ctx = Ctx::from_env();
    let bus = ctx.open(&format!("writer{}", ctx.id));
    let jobs = retry("open", || bus.mailbox("jobs"));
    for n in 0.. {
        let tag = format!("w{}r{}n{n}", ctx.id, ctx.round);
        let pad = ctx.rng.below(400) as usize;
        let body = |suffix: &str| format!("{tag}{suffix}:{}", "x".repeat(pad));
        match ctx.rng.below(10) {
            0..=2 => {
                let key = format!("key{}", ctx.rng.below(KEYS));
                let msg = NewMessage::new("job").body(body("")).idempotency_key(&key);
                match jobs.send(msg) {
                    Ok(r) => println!(
                        "RECEIPT jobs {} {} {} {key} {tag} {pad}",
                        r.seq,
                        r.id,
                        u8::from(r.duplicate)
                    ),
                    Err(e) => err("send", &e),
                }
            }
            3 => {
                let batch: Vec<_> = ["a", "b", "c"]
                    .iter()
                    .map(|s| NewMessage::new("job").body(body(s)))
                    .collect();
                match jobs.send_batch(batch) {
                    Ok(rs) => {
                        for (r, s) in rs.iter().zip(["a", "b", "c"]) {
                            println!("RECEIPT jobs {} {} 0 - {tag}{s} {pad}", r.seq, r.id);
                        }
                    }
                    Err(e) => err("send", &e),
                }
            }
            _ => match jobs.send(NewMessage::new("job").body(body(""))) {
                Ok(r) => println!("RECEIPT jobs {} {} 0 - {tag} {pad}", r.seq, r.id),
                Err(e) => err("send", &e),
            },
        }
        ctx.pause(8);
    }
}

#[test]
#[ignore = "runs only as a child process of the power-loss test"]
fn pl_consumer() {
    if !child_only() {
        return;
    }
    let mut ctx = Ctx::from_env();
    let me = format!("c{}r{}", ctx.id, ctx.round);
    let bus = ctx.open(&me);
    let group = retry("open", || bus.mailbox("jobs")?.group("workers"));
    loop {
        let max = 1 + ctx.rng.below(8) as usize;
        let batch = match group.claim(&me, max) {
            Ok(b) => b,
            Err(e) => {
                err("claim", &e);
                continue;
            }
        };
        if batch.is_empty() {
            ctx.pause(10);
            continue;
        }
        for d in batch {
            let seq = d.seq();
            println!("DELIVER workers {seq} {}", d.attempt);
            match ctx.rng.below(100) {
                0..=79 => {
                    println!("ACKING workers {seq}");
                    match d.ack() {
                        Ok(()) => println!("ACKED workers {seq}"),
                        Err(e) => err("ack", &e),
                    }
                }
                80..=87 => {
                    if let Err(e) = d.nack(Duration::ZERO, Some("try again")) {
                        err("nack", &e);
                    }
                }
                88..=95 => {
                    if let Err(e) = d.extend(Duration::from_millis(500)) {
                        err("extend", &e);
                    }
                }
                _ => {} // left to run out: redelivered later
            }
        }
        ctx.pause(3);
    }
}

#[test]
#[ignore = "runs only as a child process of the power-loss test"]
fn pl_auditor() {
    if !child_only() {
        return;
    }
    let mut ctx = Ctx::from_env();
    let me = format!("auditor{}", ctx.round);
    let bus = ctx.open(&me);
    let group = retry("open", || bus.mailbox("jobs")?.group("audit"));
    loop {
        let batch = match group.claim(&me, 32) {
            Ok(b) => b,
            Err(e) => {
                err("claim", &e);
                continue;
            }
        };
        let Some(upto) = batch.iter().map(|d| d.seq()).max() else {
            ctx.pause(20);
            continue;
        };
        for d in &batch {
            println!("DELIVER audit {} {}", d.seq(), d.attempt);
        }
        println!("ACKING_UPTO audit {upto}");
        match group.ack_upto(upto) {
            Ok(_) => println!("ACKED_UPTO audit {upto}"),
            Err(e) => err("ack_upto", &e),
        }
        ctx.pause(15);
    }
}

#[test]
#[ignore = "runs only as a child process of the power-loss test"]
fn pl_leaser() {
    if !child_only() {
        return;
    }
    let mut ctx = Ctx::from_env();
    let me = format!("leaser{}r{}", ctx.id, ctx.round);
    let bus = ctx.open(&me);
    loop {
        let name = LEASES[ctx.rng.below(LEASES.len() as u64) as usize];
        let ttl = Duration::from_millis(150 + ctx.rng.below(600));
        let request = bus
            .lease(name)
            .holder(&me)
            .ttl(ttl)
            .process_bound(ctx.rng.below(2) == 0);
        let mut lease = match request.acquire(Duration::from_millis(200)) {
            Ok(l) => l,
            Err(agentbus::Error::LeaseHeld { .. }) => continue,
            Err(e) => {
                err("acquire", &e);
                continue;
            }
        };
        println!("GRANT {name} {} {me} - -", lease.token());
        for _ in 0..ctx.rng.below(4) {
            ctx.pause(40);
            match lease.renew(ttl) {
                Ok(()) => println!("RENEW {name} {}", lease.token()),
                Err(e) => err("renew", &e),
            }
        }
        let token = lease.token();
        match lease.release() {
            Ok(()) => println!("RELEASE {name} {token}"),
            Err(e) => err("release", &e),
        }
        ctx.pause(10);
    }
}

#[test]
#[ignore = "runs only as a child process of the power-loss test"]
fn pl_courier() {
    if !child_only() {
        return;
    }
    let mut ctx = Ctx::from_env();
    let artifact = PathBuf::from(common::env("ARTIFACT"));
    let bus = ctx.open("courier");
    for n in 0.. {
        // Hand on the baton with the work when it is free; without it otherwise.
        let lease = match bus
            .lease(BATON)
            .holder("courier")
            .ttl(Duration::from_millis(1500))
            .acquire(Duration::from_millis(100))
        {
            Ok(l) => {
                println!("GRANT {BATON} {} courier - -", l.token());
                Some(l)
            }
            Err(agentbus::Error::LeaseHeld { .. }) => None,
            Err(e) => {
                err("acquire", &e);
                None
            }
        };
        let tag = format!("h{}n{n}", ctx.round);
        let mut builder = bus
            .handoff("desk")
            .summary(tag.clone())
            .state(serde_json::json!({ "round": ctx.round, "n": n }))
            .next_step("carry on")
            .artifact(&artifact)
            .reply_to("courier-inbox");
        if let Some(l) = lease {
            builder = builder.with_lease(l);
        }
        match builder.send() {
            Ok(sent) => {
                let r = &sent.receipt;
                println!("RECEIPT desk {} {} 0 - {tag} -", r.seq, r.id);
            }
            Err(e) => err("handoff", &e),
        }
        ctx.pause(30);
    }
}

#[test]
#[ignore = "runs only as a child process of the power-loss test"]
fn pl_desk() {
    if !child_only() {
        return;
    }
    let mut ctx = Ctx::from_env();
    let me = "desk-agent";
    let bus = ctx.open(me);
    let mut inbox = retry("inbox", || bus.handoff_inbox("desk"));
    loop {
        let received = match inbox.recv_timeout(Duration::from_millis(100)) {
            Ok(r) => r,
            Err(e) if e.is_timeout() => continue,
            Err(e) => {
                err("recv", &e);
                continue;
            }
        };
        let (seq, id) = (received.seq(), received.message.id);
        let carried = received.handoff.lease.as_ref().map(|l| l.token);
        println!(
            "TAKEN {seq} {id} {}",
            carried.map_or("-".into(), |t| t.to_string())
        );
        match received.accept_lease(me, Duration::from_millis(1500)) {
            Ok(lease) => {
                println!("ACCEPTED {seq} {id}");
                if let Some(l) = lease {
                    let token = l.token();
                    // An accept repeated after a crash reports the grant its first
                    // attempt made, which may have been superseded since.
                    match bus.lease_info(BATON) {
                        Ok(Some(i)) if i.token == token && i.holder.as_deref() == Some(me) => {
                            let carried = carried.map_or("-".into(), |t| t.to_string());
                            println!("GRANT {BATON} {token} {me} {id} {carried}")
                        }
                        Ok(i) => {
                            println!("STALE_LEASE {BATON} {token} {}", i.map_or(0, |i| i.token))
                        }
                        Err(e) => err("lease_info", &e),
                    }
                    ctx.pause(30);
                    match l.release() {
                        Ok(()) => println!("RELEASE {BATON} {token}"),
                        Err(e) => err("release", &e),
                    }
                }
            }
            // The lease it carries has run out (or gone on): tell the sender.
            Err(e @ agentbus::Error::StaleLease { .. }) => {
                let reason = e.to_string();
                match inbox.take(seq).and_then(|r| r.reject(me, &reason)) {
                    Ok(()) => println!("REJECTED {seq} {id}"),
                    Err(e) => err("reject", &e),
                }
            }
            Err(e) => err("accept", &e),
        }
    }
}

#[test]
#[ignore = "runs only as a child process of the power-loss test"]
fn pl_compactor() {
    if !child_only() {
        return;
    }
    let mut ctx = Ctx::from_env();
    // The CLI, as a cron job would run it: each run is a process of its own (in this
    // role's process group, so the power cut kills it too).
    loop {
        let out = Command::new(env!("CARGO_BIN_EXE_agentbus"))
            .arg("--dir")
            .arg(&ctx.bus)
            .arg("compact")
            .env_remove("AGENTBUS_DIR")
            .output();
        match out {
            Ok(o) if o.status.success() => {
                let removed: usize = String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                    .map(|v| v["removed"].as_array().map_or(0, Vec::len))
                    .sum();
                println!("COMPACT {removed}");
            }
            Ok(o) => err(
                "compact",
                &String::from_utf8_lossy(&o.stderr).trim().to_owned(),
            ),
            Err(e) => err("compact", &e),
        }
        ctx.pause(60);
    }
}

#[test]
#[ignore = "runs only as a child process of the power-loss test"]
fn pl_flusher() {
    if !child_only() {
        return;
    }
    let mut ctx = Ctx::from_env();
    // Flush: survives a crash of the process, not a power cut (Bus docs), so its
    // receipts are reported, not held to.
    let bus = retry("open", || {
        Bus::builder()
            .agent("flusher")
            .durability(agentbus::Durability::Flush)
            .open(&ctx.bus)
    });
    let scratch = retry("open", || bus.mailbox("scratch"));
    for n in 0.. {
        match scratch.send(NewMessage::new("note").body(format!("f{}n{n}", ctx.round))) {
            Ok(r) => println!("FLUSHED {} {}", r.seq, r.id),
            Err(e) => err("send", &e),
        }
        ctx.pause(6);
    }
}

#[test]
#[ignore = "runs only as a child process of the power-loss test"]
fn pl_reader() {
    if !child_only() {
        return;
    }
    let mut ctx = Ctx::from_env();
    let me = format!("reader{}", ctx.round);
    let bus = ctx.open(&me);
    let group = retry("open", || bus.mailbox("scratch")?.group("readers"));
    loop {
        match group.claim(&me, 16) {
            Ok(batch) if batch.is_empty() => ctx.pause(10),
            Ok(batch) => {
                let upto = batch.iter().map(|d| d.seq()).max().unwrap_or(0);
                if let Err(e) = group.ack_upto(upto) {
                    err("ack_upto", &e);
                }
            }
            Err(e) => err("claim", &e),
        }
    }
}
