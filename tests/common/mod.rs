//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use agentbus::{Bus, Delivery, Durability, Group, Mailbox, Message, NewMessage};
use serde_json::Value;

/// Environment variable that marks a process as a child spawned by a test.
pub const CHILD_ENV: &str = "AGENTBUS_TEST_CHILD";

/// A command that re-runs this test binary as a real, separate process executing only
/// the (ignored) test `name`. The child test reads its instructions from environment
/// variables and does nothing unless [`is_child`] is true.
pub fn child(name: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("test binary path"));
    cmd.args([
        "--exact",
        name,
        "--include-ignored",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ]);
    cmd.env(CHILD_ENV, "1");
    cmd
}

/// True inside a process started by [`child`].
pub fn is_child() -> bool {
    std::env::var_os(CHILD_ENV).is_some()
}

pub fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("child needs {name}"))
}

/// Inside a process started by [`child`]: environment variable `name`, which it must
/// have. Outside one: `None`, and the (ignored) child test returns at once.
pub fn child_env(name: &str) -> Option<String> {
    is_child().then(|| env(name))
}

/// Inside a process started by [`child`]: the bus named by `BUS`, opened like
/// [`open_flush_bus`]. Outside one: `None`.
pub fn child_bus() -> Option<Bus> {
    child_env("BUS").map(open_flush_bus)
}

/// The number environment variable `name` holds, if it is set to one.
pub fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Asserts that the process `what` succeeded (showing its stdout and stderr if not)
/// and returns its stdout.
pub fn succeeded(what: &str, out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what}: {:?}: {stdout}\n{stderr}",
        out.status
    );
    stdout
}

/// Starts `cmd` with its stdout piped: the child and its stdout's lines.
pub fn spawn_lines(cmd: &mut Command) -> (std::process::Child, impl Iterator<Item = String>) {
    use std::io::BufRead;
    let mut child = cmd.stdout(std::process::Stdio::piped()).spawn().unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    (child, stdout.lines().map(Result::unwrap))
}

/// Waits for each of `children` (started with stdout piped), which must succeed (or
/// the test fails naming `what`), and returns every line they printed.
pub fn lines_of(children: Vec<std::process::Child>, what: &str) -> Vec<String> {
    let mut lines = Vec::new();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{what} failed");
        lines.extend(
            String::from_utf8(out.stdout)
                .unwrap()
                .lines()
                .map(str::to_owned),
        );
    }
    lines
}

/// A new bus at `dir` that flushes every write without fsync: fast, and all a test
/// needs unless it is about fsync itself.
pub fn flush_bus(dir: impl AsRef<Path>) -> Bus {
    flush_builder().init(dir).unwrap()
}

/// A bus builder with [`Durability::Flush`], as [`flush_bus`] uses.
pub fn flush_builder() -> agentbus::BusBuilder {
    Bus::builder().durability(Durability::Flush)
}

/// Opens the existing bus at `dir` with [`flush_bus`]'s durability.
pub fn open_flush_bus(dir: impl AsRef<Path>) -> Bus {
    flush_builder().open(dir).unwrap()
}

/// A new bus at `dir` like [`flush_bus`]'s whose mailboxes roll over every `bytes`, so
/// that tests can work across segments.
pub fn segmented_bus(dir: impl AsRef<Path>, bytes: u64) -> Bus {
    flush_builder().segment_bytes(bytes).init(dir).unwrap()
}

/// `bus` with a new mailbox `mailbox` and its new group `group`.
pub fn with_group(bus: Bus, mailbox: &str, group: &str) -> (Bus, Mailbox, Group) {
    let mb = bus.create_mailbox(mailbox).unwrap();
    let group = mb.create_group(group).unwrap();
    (bus, mb, group)
}

/// A [`flush_bus`] at `dir` with a new mailbox `name`.
pub fn flush_mailbox(dir: &Path, name: &str) -> (Bus, Mailbox) {
    let bus = flush_bus(dir);
    let mb = bus.create_mailbox(name).unwrap();
    (bus, mb)
}

/// A bus at `dir` of 1 KiB segments with mailbox `main`, its group `workers`, and one
/// message (body `"0"`): set for [`grow_settle_and_compact`].
pub fn main_with_workers(dir: &Path) -> (Bus, Mailbox, Group) {
    let (bus, mb, group) = with_group(segmented_bus(dir, 1024), "main", "workers");
    mb.send(NewMessage::new("t").body("0")).unwrap();
    (bus, mb, group)
}

/// A [`flush_bus`] at `dir` with mailbox `jobs`, its group `g`, and `n` messages in it
/// (sent by [`send_n`]).
pub fn jobs_group(dir: &Path, n: usize) -> (Bus, Mailbox, Group) {
    let (bus, mb, group) = with_group(flush_bus(dir), "jobs", "g");
    send_n(&mb, n);
    (bus, mb, group)
}

/// A new mailbox `name` on `bus` holding a message of type `t` for each of `bodies`.
pub fn mailbox_with(bus: &Bus, name: &str, bodies: &[&str]) -> Mailbox {
    let mb = bus.create_mailbox(name).unwrap();
    send_bodies(&mb, "t", bodies);
    mb
}

/// Sends messages of type `t` with bodies `"1"` to `"59"` after the one message of
/// [`main_with_workers`], settles all of them in `group` and
/// compacts `mb`, which must remove segments; returns the oldest seq still stored.
pub fn grow_settle_and_compact(mb: &Mailbox, group: &Group) -> u64 {
    for i in 1..60 {
        mb.send(NewMessage::new("t").body(i.to_string())).unwrap();
    }
    for d in group.claim("w", 100).unwrap() {
        d.ack().unwrap();
    }
    let report = mb.compact(None).unwrap();
    assert!(report.removed.len() >= 2, "{report:?}");
    mb.first_seq().unwrap()
}

/// A fresh handle on `group` of `mailbox` in the bus at `dir`, with caches of its own,
/// as another process would open it.
pub fn open_group(dir: &Path, mailbox: &str, group: &str) -> Group {
    Bus::open(dir)
        .unwrap()
        .mailbox(mailbox)
        .unwrap()
        .group(group)
        .unwrap()
}

/// Sends one message of type `kind` for each of `bodies`, in order.
pub fn send_bodies(mb: &Mailbox, kind: &str, bodies: &[&str]) {
    for body in bodies {
        mb.send(NewMessage::new(kind).body(*body)).unwrap();
    }
}

/// The first message stored in `mailbox` of `bus`.
pub fn first_message(bus: &Bus, mailbox: &str) -> Message {
    bus.mailbox(mailbox)
        .unwrap()
        .messages()
        .next()
        .expect("a message")
        .unwrap()
}

/// Sends one message (without a body) of each type in `kinds`, in order.
pub fn send_kinds(mb: &Mailbox, kinds: &[&str]) {
    for kind in kinds {
        mb.send(NewMessage::new(*kind)).unwrap();
    }
}

/// Sends `n` messages of type `job` with bodies `"0"`, `"1"`, ..., in batches of 1000.
pub fn send_n(mb: &Mailbox, n: usize) {
    let batch: Vec<_> = (0..n)
        .map(|i| NewMessage::new("job").body(i.to_string()))
        .collect();
    for chunk in batch.chunks(1000) {
        mb.send_batch(chunk.to_vec()).unwrap();
    }
}

/// The reason of a read `item`, which must be [`agentbus::Error::Corrupt`] at `line`.
pub fn corrupt_reason(item: &agentbus::Result<Message>, line: u64) -> String {
    match item {
        Err(agentbus::Error::Corrupt {
            line: at, reason, ..
        }) if *at == line => reason.clone(),
        other => panic!("expected damage at line {line}, got {other:?}"),
    }
}

/// The seqs of some deliveries, in order.
pub fn seqs(deliveries: &[Delivery]) -> Vec<u64> {
    deliveries.iter().map(Delivery::seq).collect()
}

/// Calls `f` until it returns something, every 20 ms for up to `timeout`; panics
/// naming `what` if it never does.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Claims one message for `consumer`, waiting up to `timeout` for one to be due.
pub fn claim_within(group: &Group, consumer: &str, timeout: Duration) -> Delivery {
    wait_for("a claim", timeout, || group.claim_one(consumer).unwrap())
}

/// The `dead_letter` header of a dead-lettered message, parsed.
pub fn dead_letter_info(dead: &Message) -> Value {
    serde_json::from_str(&dead.headers[agentbus::DEAD_LETTER_HEADER]).unwrap()
}

/// The names of a group's state files (`state.<generation>.jsonl`), sorted.
pub fn state_files(group_dir: &Path) -> Vec<String> {
    let mut v: Vec<_> = std::fs::read_dir(group_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("state."))
        .collect();
    v.sort();
    v
}

/// Appends `bytes` to the file at `path`, as an outside writer would.
pub fn append(path: &Path, bytes: impl AsRef<[u8]>) {
    use std::io::Write;
    std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .unwrap()
        .write_all(bytes.as_ref())
        .unwrap();
}

/// A record as an outside writer without checksums would append it: `seq`, a new id,
/// type `kind`, `body`, a newline.
pub fn raw_record(seq: u64, kind: &str, body: &str) -> String {
    format!(
        "{{\"seq\":{seq},\"id\":\"{}\",\"ts\":\"2026-01-01T00:00:00Z\",\"from\":\"x\",\"type\":\"{kind}\",\"body\":\"{body}\"}}\n",
        uuid::Uuid::now_v7()
    )
}

/// Replaces the first `from` in the first segment of `mailbox` by `to`, as an outside
/// tool damaging (or repairing) a record would; returns the segment's path.
pub fn edit_first_segment(bus: &Path, mailbox: &str, from: &str, to: &str) -> PathBuf {
    let seg = first_segment(bus, mailbox);
    let text = std::fs::read_to_string(&seg).unwrap();
    std::fs::write(&seg, text.replacen(from, to, 1)).unwrap();
    seg
}

/// The `agentbus` binary built for these tests.
pub fn cli(dir: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentbus"));
    cmd.arg("--dir").arg(dir);
    cmd.env_remove("AGENTBUS_DIR").env_remove("AGENTBUS_AGENT");
    cmd
}

/// Runs the CLI on the bus at `dir` with `args`, to its end.
pub fn run<I>(dir: &Path, args: I) -> Output
where
    I: IntoIterator,
    I::Item: AsRef<OsStr>,
{
    cli(dir).args(args).output().unwrap()
}

/// Runs the CLI on the bus at `dir` with `args`; it must succeed: its JSON lines.
pub fn run_ok<I>(dir: &Path, args: I) -> Vec<Value>
where
    I: IntoIterator,
    I::Item: AsRef<OsStr>,
{
    ok(run(dir, args))
}

/// Runs the CLI on the bus at `dir` with `args`; it must fail with exit `code`: its
/// error object (see [`fails`]).
pub fn run_fails<I>(dir: &Path, args: I, code: i32) -> Value
where
    I: IntoIterator,
    I::Item: AsRef<OsStr>,
{
    fails(run(dir, args), code)
}

/// A new bus in a temporary directory made with the CLI (`init`, then `mailbox create`
/// of `mailboxes`).
pub fn cli_bus(mailboxes: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    run_ok(dir.path(), ["init"]);
    let created = run_ok(dir.path(), ["mailbox", "create"].iter().chain(mailboxes));
    assert_eq!(created.len(), mailboxes.len(), "{created:?}");
    for (line, name) in created.iter().zip(mailboxes) {
        assert_eq!(*line, serde_json::json!({"mailbox": name, "created": true}));
    }
    dir
}

/// The JSON lines of `out` (each line must parse).
pub fn json_lines(out: impl AsRef<[u8]>) -> Vec<Value> {
    std::str::from_utf8(out.as_ref())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

/// Path of the first segment of `mailbox` in the bus at `bus`.
pub fn first_segment(bus: &Path, mailbox: &str) -> std::path::PathBuf {
    bus.join("mailboxes")
        .join(mailbox)
        .join("log")
        .join("00000000000000000001.jsonl")
}

/// A tiny deterministic PRNG (xorshift64*), so tests need no extra crate.
#[derive(Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub fn seeded_from_time() -> (Self, u64) {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        (Rng::new(seed), seed)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Asserts that a CLI run succeeded and parses its stdout as JSON lines.
pub fn ok(out: Output) -> Vec<Value> {
    assert!(
        out.status.success(),
        "status {:?}, stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    json_lines(out.stdout)
}

/// Asserts that a CLI run failed with exit `code` and one JSON object on stderr, and
/// returns that object.
pub fn fails(out: Output, code: i32) -> Value {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        stderr.lines().count(),
        1,
        "one JSON object on stderr: {stderr}"
    );
    serde_json::from_str(&stderr).unwrap()
}

/// What a process bounded by [`output_within`] left.
#[derive(Debug)]
pub struct Bounded {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Bounded {
    /// Its stdout as JSON lines (each line must parse).
    pub fn lines(&self) -> Vec<Value> {
        json_lines(&self.stdout)
    }
}

/// Runs `cmd` to its end, but for at most `limit`: past that it is killed and the test
/// fails, naming `what`. Its stdout is read through a pipe; its stderr goes to a file,
/// so that a process it leaves behind holding stderr cannot hold the test up.
pub fn output_within(what: &str, mut cmd: Command, limit: Duration) -> Bounded {
    use std::io::Read;
    let errors = tempfile::NamedTempFile::new().unwrap();
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(errors.reopen().unwrap());
    let mut child = cmd.spawn().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        stdout.read_to_string(&mut s).unwrap();
        s
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = std::fs::read_to_string(errors.path()).unwrap_or_default();
            panic!("{what}: still running after {limit:?}; stderr: {stderr}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Bounded {
        status,
        stdout: reader.join().unwrap(),
        stderr: std::fs::read_to_string(errors.path()).unwrap(),
    }
}

/// [`output_within`] as a plain [`Output`]: `cmd` run to its end, for at most `limit`.
pub fn output_bounded(cmd: Command, limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    let out = output_within(&what, cmd, limit);
    Output {
        status: out.status,
        stdout: out.stdout.into_bytes(),
        stderr: out.stderr.into_bytes(),
    }
}

/// Whether process `pid` is still running (a zombie waiting to be reaped is not).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name, which is in parentheses.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with(['Z', 'X'])),
        Err(_) => false,
    }
}
