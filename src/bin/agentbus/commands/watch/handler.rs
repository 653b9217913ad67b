//! Running one `watch --exec` handler: `sh -c CMD` in a process group of its own, the
//! message written to its stdin and its stderr forwarded to ours by one I/O thread (so
//! neither side can block the other, whatever the sizes), its stdout sent straight to
//! our stderr (never into the JSON stream on stdout), a heartbeat while it runs, and a
//! timeout that kills its whole group.
//!
//! Only the handler process itself is waited for: a background job it leaves running
//! keeps whatever pipes it inherited, and neither holds `watch` up.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rustix::event::{poll, PollFd, PollFlags};
use rustix::fs::{fcntl_getfl, fcntl_setfl, OFlags};
use rustix::process::{kill_process_group, waitid, Pid, Signal, WaitId, WaitIdOptions};

use super::stop::Stop;

/// How long a handler has to exit after SIGTERM (timed out, or watch told to stop at
/// once) before its process group gets SIGKILL.
pub const KILL_GRACE: Duration = Duration::from_secs(2);

/// How much of the end of a handler's stderr is kept for the outcome's reason.
const TAIL_CHARS: usize = 500;

/// How often the wait for the handler looks at stop requests.
const STOP_CHECK: Duration = Duration::from_millis(100);

/// One handler run: what to run and what to give it.
pub struct Run<'a> {
    /// The shell command.
    pub command: &'a str,
    /// What its stdin reads (the message JSON), then end of file.
    pub input: Vec<u8>,
    /// Variables to set (`Some`) or to remove from the inherited environment (`None`).
    pub env: &'a [(&'static str, Option<String>)],
    /// Kill it (its process group) after this long.
    pub timeout: Option<Duration>,
}

/// Called every `every` while the handler runs; returns false to stop beating.
pub struct Heartbeat<'a> {
    pub every: Duration,
    pub beat: &'a mut dyn FnMut() -> bool,
}

/// How the handler process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
    /// It could not be started (the error).
    NotStarted(String),
}

/// What happened to one handler run.
#[derive(Debug)]
pub struct Ended {
    pub ending: Ending,
    /// It ran past the timeout and was killed.
    pub timed_out: bool,
    /// It was killed because watch was told to stop at once (a second signal).
    pub stopped: bool,
    /// The end of what it wrote to stderr, trimmed.
    pub stderr_tail: String,
}

impl Ended {
    /// The exit code, if it exited.
    pub fn code(&self) -> Option<i32> {
        match self.ending {
            Ending::Exited(code) => Some(code),
            _ => None,
        }
    }
}

/// Runs `run` to its end (or its timeout, or a stop request), beating `heartbeat`
/// meanwhile. Never fails: a handler that cannot be started is an [`Ending::NotStarted`].
pub fn run(run: Run<'_>, stop: &Stop, heartbeat: Option<Heartbeat<'_>>) -> Ended {
    let not_started = |e: io::Error| Ended {
        ending: Ending::NotStarted(e.to_string()),
        timed_out: false,
        stopped: false,
        stderr_tail: String::new(),
    };
    let mut child = match spawn(&run) {
        Ok(child) => child,
        Err(e) => return not_started(e),
    };
    let pid = Pid::from_raw(child.id() as i32).expect("a child's pid is positive");
    stop.running(Some(pid));
    let (stdin, stderr) = (child.stdin.take(), child.stderr.take());
    let (handler_done, done_signal) = match io::pipe() {
        Ok(pipe) => pipe,
        Err(e) => {
            kill(pid, Signal::KILL);
            let _ = child.wait();
            stop.running(None);
            return not_started(e);
        }
    };
    let (tail_tx, tail_rx) = mpsc::channel();
    let input = run.input;
    let io = std::thread::Builder::new()
        .name("handler-io".into())
        .spawn(move || pump(stdin, stderr, input, handler_done, tail_tx));
    let (exited_tx, exited_rx) = mpsc::channel();
    let waiter = std::thread::Builder::new()
        .name("handler-wait".into())
        .spawn(move || {
            // Wait for the exit without reaping it: until `child.wait()` below, the
            // pid (and so the process group id) cannot be reused, so killing the
            // group never hits a stranger.
            let options = WaitIdOptions::EXITED | WaitIdOptions::NOWAIT;
            while let Err(rustix::io::Errno::INTR) = waitid(WaitId::Pid(pid), options) {}
            let _ = exited_tx.send(());
        });
    if io.is_err() || waiter.is_err() {
        kill(pid, Signal::KILL);
    }

    let started = Instant::now();
    let deadline = run.timeout.map(|t| started + t);
    let (mut timed_out, mut stopped) = (false, false);
    let mut kill_at: Option<Instant> = None;
    let mut heartbeat = heartbeat;
    let mut beat_at = heartbeat.as_ref().map(|h| started + h.every);
    loop {
        let now = Instant::now();
        let mut until = now + STOP_CHECK;
        for t in [deadline.filter(|_| !timed_out), kill_at, beat_at]
            .into_iter()
            .flatten()
        {
            until = until.min(t);
        }
        match exited_rx.recv_timeout(until.saturating_duration_since(now)) {
            Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        if !timed_out && deadline.is_some_and(|d| now >= d) {
            timed_out = true;
            kill(pid, Signal::TERM);
            kill_at.get_or_insert(now + KILL_GRACE);
        }
        if !stopped && stop.at_once() {
            stopped = true;
            kill(pid, Signal::TERM);
            kill_at.get_or_insert(now + KILL_GRACE);
        }
        if kill_at.is_some_and(|k| now >= k) {
            kill(pid, Signal::KILL);
            kill_at = None;
        }
        if let (Some(at), Some(h)) = (beat_at, heartbeat.as_mut()) {
            if now >= at {
                beat_at = (h.beat)().then(|| Instant::now() + h.every);
            }
        }
    }
    if timed_out || stopped {
        // What is left of a handler we killed goes too (before the reap below).
        kill(pid, Signal::KILL);
    }
    let status = child.wait();
    stop.running(None);
    // The handler is gone: tell the I/O thread, which drains what it wrote before it
    // exited and hands back the tail of it. A background job that still holds the
    // pipe keeps being forwarded by that thread, but is not waited for.
    drop(done_signal);
    let tail = tail_rx
        .recv_timeout(Duration::from_secs(10))
        .unwrap_or_default();
    let ending = match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => Ending::Exited(code),
            (None, Some(sig)) => Ending::Signaled(sig),
            (None, None) => Ending::Exited(-1),
        },
        Err(e) => Ending::NotStarted(format!("waiting for it failed: {e}")),
    };
    Ended {
        ending,
        timed_out,
        stopped,
        stderr_tail: tail_text(&tail),
    }
}

/// Starts `sh -c CMD` in a process group of its own.
fn spawn(run: &Run<'_>) -> io::Result<Child> {
    let mut command = Command::new("sh");
    command.arg("-c").arg(run.command);
    // The handler's stdout goes to our stderr: stdout is our JSON stream.
    let stdout: OwnedFd = io::stderr().as_fd().try_clone_to_owned()?;
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::from(stdout))
        .stderr(Stdio::piped())
        .process_group(0);
    for (name, value) in run.env {
        match value {
            Some(v) => command.env(name, v),
            None => command.env_remove(name),
        };
    }
    command.spawn()
}

/// Sends `signal` to the handler's process group (its id is the handler's pid).
fn kill(pgid: Pid, signal: Signal) {
    let _ = kill_process_group(pgid, signal);
}

/// The I/O of one handler: writes `input` to its stdin and forwards its stderr to
/// ours, line by line, keeping the tail. When `handler_done` reports end of file (the
/// handler exited), stops writing, drains what stderr holds, and sends the tail on
/// `tail_tx`; then forwards anything more (from a background job) until end of file.
fn pump(
    stdin: Option<std::process::ChildStdin>,
    stderr: Option<std::process::ChildStderr>,
    input: Vec<u8>,
    handler_done: io::PipeReader,
    tail_tx: mpsc::Sender<Vec<u8>>,
) {
    let mut stdin = stdin.filter(|s| nonblocking(s).is_ok());
    let mut stderr = stderr.filter(|s| nonblocking(s).is_ok());
    let mut forward = Forward::default();
    let mut written = 0;
    let mut done = Some(handler_done);
    if input.is_empty() {
        stdin = None;
    }
    while done.is_some() || stderr.is_some() {
        let mut fds = Vec::with_capacity(3);
        if let Some(s) = &stderr {
            fds.push(PollFd::new(s, PollFlags::IN));
        }
        if let Some(s) = &stdin {
            fds.push(PollFd::new(s, PollFlags::OUT));
        }
        if let Some(d) = &done {
            fds.push(PollFd::new(d, PollFlags::IN));
        }
        match poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(_) => break,
        }
        let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
        drop(fds);
        let mut ready = ready.into_iter();
        if stderr.is_some() && ready.next() == Some(true) && !forward.read_from(&mut stderr) {
            stderr = None;
        }
        if stdin.is_some() && ready.next() == Some(true) {
            let s = stdin.as_mut().expect("checked");
            match s.write(&input[written..]) {
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The handler closed its stdin (or died): it has what it read.
                Err(_) => written = input.len(),
            }
            if written >= input.len() {
                stdin = None;
            }
        }
        if done.is_some() && ready.next() == Some(true) {
            done = None;
            stdin = None;
            if !forward.read_from(&mut stderr) {
                stderr = None;
            }
            forward.flush_partial();
            let _ = tail_tx.send(forward.tail.drain(..).collect());
        }
    }
    forward.flush_partial();
}

fn nonblocking(fd: &impl AsFd) -> rustix::io::Result<()> {
    let flags = fcntl_getfl(fd)?;
    fcntl_setfl(fd, flags | OFlags::NONBLOCK)
}

/// Forwards a handler's stderr to ours a whole line at a time (so its lines and
/// watch's own JSON lines never cut into each other), keeping the last bytes.
#[derive(Default)]
struct Forward {
    line: Vec<u8>,
    tail: VecDeque<u8>,
}

impl Forward {
    /// Reads what `from` holds now (up to 1 MiB at a time, so that a background job
    /// that never stops writing cannot keep us here); false at end of file or on an
    /// error.
    fn read_from(&mut self, from: &mut Option<std::process::ChildStderr>) -> bool {
        let Some(from) = from.as_mut() else {
            return false;
        };
        let mut buf = [0u8; 16 * 1024];
        for _ in 0..64 {
            match from.read(&mut buf) {
                Ok(0) => return false,
                Ok(n) => self.push(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
        true
    }

    fn push(&mut self, bytes: &[u8]) {
        self.tail.extend(bytes);
        let excess = self.tail.len().saturating_sub(4 * TAIL_CHARS);
        self.tail.drain(..excess);
        self.line.extend_from_slice(bytes);
        if let Some(end) = self.line.iter().rposition(|&b| b == b'\n') {
            let rest = self.line.split_off(end + 1);
            let _ = io::stderr().lock().write_all(&self.line);
            self.line = rest;
        }
        if self.line.len() > 64 * 1024 {
            self.flush_partial();
        }
    }

    /// Forwards an unfinished last line, ended with a newline.
    fn flush_partial(&mut self) {
        if !self.line.is_empty() {
            self.line.push(b'\n');
            let _ = io::stderr().lock().write_all(&self.line);
            self.line.clear();
        }
    }
}

/// The last [`TAIL_CHARS`] characters of `bytes` (lossy UTF-8), trimmed.
fn tail_text(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let chars: Vec<char> = text.chars().collect();
    let start = chars.len().saturating_sub(TAIL_CHARS);
    chars[start..].iter().collect::<String>().trim().to_owned()
}
