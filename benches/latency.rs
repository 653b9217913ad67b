//! Send-to-receive latency across two processes, next to a raw inotify wake-up measured
//! in the same run on the same file system. Reports p50 and p99 of each and their ratio.
//!
//! - baseline: process A appends an 8-byte CLOCK_MONOTONIC timestamp to a file; process B
//!   is blocked in `read()` on an inotify descriptor watching the directory, wakes,
//!   reads the timestamp with `pread` and records now - timestamp;
//! - agentbus: A sends a message whose payload carries the timestamp (`Flush`); B is
//!   blocked in `Follower::recv` (notify watcher) and records now - timestamp.
//!
//! Both use CLOCK_MONOTONIC, which is shared by all processes on the machine. Run with
//! `cargo bench --bench latency`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use agentbus::{Bus, Durability, NewMessage, WatchMode};

const SAMPLES: usize = 2_000;
const GAP: Duration = Duration::from_millis(1);

fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn main() {
    match std::env::var("LATENCY_ROLE").as_deref() {
        Ok("raw-receiver") => raw_receiver(Path::new(&std::env::var("DIR").unwrap())),
        Ok("bus-receiver") => bus_receiver(Path::new(&std::env::var("DIR").unwrap())),
        _ => run(),
    }
}

fn run() {
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let raw_dir = tmp.path().join("raw");
    std::fs::create_dir(&raw_dir).unwrap();
    let raw = measure("raw-receiver", &raw_dir, |i, file: &std::fs::File| {
        let _ = i;
        (&*file).write_all(&mono_ns().to_le_bytes()).unwrap();
    });
    let bus_dir = tmp.path().join("bus");
    let bus = Bus::builder()
        .durability(Durability::Flush)
        .init(&bus_dir)
        .unwrap();
    let mb = bus.create_mailbox("bench").unwrap();
    let agentbus = measure("bus-receiver", &bus_dir, |i, _| {
        mb.send(
            NewMessage::new("tick")
                .payload(serde_json::json!({ "t": mono_ns(), "i": i }))
                .body("x".repeat(120)),
        )
        .unwrap();
    });
    let (r50, r99) = percentiles(raw);
    let (b50, b99) = percentiles(agentbus);
    println!("cross-process wake-up latency, {SAMPLES} samples each, {GAP:?} apart:");
    println!("  raw inotify   p50 {:>8.1} us   p99 {:>8.1} us", r50, r99);
    println!("  agentbus      p50 {:>8.1} us   p99 {:>8.1} us", b50, b99);
    println!(
        "  ratio         p50 {:>8.2} x    p99 {:>8.2} x",
        b50 / r50,
        b99 / r99
    );
    // For benches/ratios.py.
    let json = serde_json::json!({
        "raw_p50_us": r50, "raw_p99_us": r99, "agentbus_p50_us": b50, "agentbus_p99_us": b99,
    });
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("../criterion/agentbus-latency.json");
    let _ = std::fs::create_dir_all(out.parent().unwrap());
    let _ = std::fs::write(out, json.to_string());
}

/// Starts the receiver role, waits until it is ready, sends SAMPLES times, and returns
/// the latencies (ns) the receiver measured.
fn measure(role: &str, dir: &Path, mut send: impl FnMut(usize, &std::fs::File)) -> Vec<u64> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("LATENCY_ROLE", role)
        .env("DIR", dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "READY");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("ticks"))
        .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    for i in 0..SAMPLES {
        send(i, &file);
        std::thread::sleep(GAP);
    }
    let latencies: Vec<u64> = lines.map(|l| l.unwrap().parse().unwrap()).collect();
    assert!(child.wait().unwrap().success());
    assert_eq!(latencies.len(), SAMPLES, "{role} lost samples");
    latencies
}

fn percentiles(mut v: Vec<u64>) -> (f64, f64) {
    v.sort_unstable();
    let at = |q: f64| v[((v.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    (at(0.50), at(0.99))
}

fn raw_receiver(dir: &Path) {
    let path = dir.join("ticks");
    std::fs::File::create(&path).unwrap();
    let file = std::fs::File::open(&path).unwrap();
    // SAFETY: plain inotify calls with valid arguments.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    let cdir = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    unsafe { libc::inotify_add_watch(fd, cdir.as_ptr(), libc::IN_MODIFY) };
    println!("READY");
    std::io::stdout().flush().unwrap();
    let mut out = Vec::with_capacity(SAMPLES);
    let mut seen = 0u64;
    let mut events = [0u8; 4096];
    while out.len() < SAMPLES {
        // SAFETY: reading into a buffer we own.
        let n = unsafe { libc::read(fd, events.as_mut_ptr().cast(), events.len()) };
        assert!(n > 0);
        let now = mono_ns();
        let len = file.metadata().unwrap().len();
        while seen + 8 <= len {
            let mut ts = [0u8; 8];
            file.read_exact_at(&mut ts, seen).unwrap();
            out.push(now.saturating_sub(u64::from_le_bytes(ts)));
            seen += 8;
        }
    }
    for l in out {
        println!("{l}");
    }
}

fn bus_receiver(dir: &Path) {
    let bus = Bus::builder()
        .watch_mode(WatchMode::Auto)
        .poll_interval(Duration::from_secs(1))
        .open(dir)
        .unwrap();
    let mut rx = bus.follow(&["bench"]).unwrap();
    assert!(rx.has_events());
    println!("READY");
    std::io::stdout().flush().unwrap();
    let mut out = Vec::with_capacity(SAMPLES);
    while out.len() < SAMPLES {
        let env = rx.recv().unwrap();
        let now = mono_ns();
        let t = env.message.payload.unwrap()["t"].as_u64().unwrap();
        out.push(now.saturating_sub(t));
    }
    for l in out {
        println!("{l}");
    }
}
