//! The NATS JetStream backend (cargo feature `nats`).
//!
//! A [`Bus`](crate::Bus) opened from a `nats://host:port[,host:port...][/namespace][?replicas=N]` URL
//! keeps its state in a JetStream server instead of a directory:
//!
//! | agentbus | JetStream |
//! | --- | --- |
//! | mailbox `m` | stream `<ns>_MB_<m>` with the one subject `agentbus.<ns>.<m>` |
//! | `seq` | the stream sequence |
//! | idempotency key | the `Nats-Msg-Id` header (duplicate window 24 h) |
//! | group `g` | durable pull consumer `g` (explicit ack, `ack_wait` = visibility) |
//! | retry policy | the consumer's `backoff` list (visibility + the delay of each attempt) |
//! | ack, nack + delay, extend, term | `+ACK`, `-NAK {delay}`, `+WPI`, `+TERM`, each confirmed |
//! | dead letters | the message is copied to the dead-letter mailbox, then termed |
//! | lease `l` | key `l` of the KV bucket `<ns>_LEASES`; the grant's revision is the token |
//! | wake-ups | a core subscription to the subjects, plus the poll timer |
//!
//! Names are mapped with `.` → `_D` and `_` → `_U`, which JetStream names allow and
//! which cannot collide.
//!
//! | file | what it holds |
//! | --- | --- |
//! | `mod.rs` | the connection, its runtime, the URL and name mapping; [`Bus`] |
//! | `mailbox` | streams: create, publish, read by seq; [`Mailbox`] |
//! | `read` | [`Reader`]: a stream in seq order |
//! | `group` | durable pull consumers: fetch, settle; [`Group`] |
//! | `backoff` | a retry policy as the consumer's `backoff` list and NAK delays |
//! | `lease` | the lease bucket and its compare-and-set |
//! | `watch` | subscriptions whose messages are wake-up hints |
//!
//! The blocking API runs each request on a small runtime owned by the bus and waits for
//! it on the calling thread, so it can be called from any thread, inside an async
//! runtime or not.
#![cfg(feature = "nats")]

use std::future::Future;
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Duration;
use std::time::Instant;

use async_nats::jetstream::{self, kv};

use crate::backend::{
    Backend, BusBackend, Granted, LeaseChange, LeaseGrant, LeaseState, MailboxImp, OpenMailbox,
    Options,
};
use crate::report::LeaseInfo;
use crate::watch::{Watch, WatchMode};
use crate::{Error, Message, Result};

mod backoff;
mod group;
mod lease;
mod mailbox;
mod read;
mod watch;

pub(crate) use group::Group;
pub(crate) use mailbox::Mailbox;
pub(crate) use read::Reader;
pub(crate) use watch::HintTask;

/// The URL scheme that selects this backend.
const SCHEME: &str = "nats://";

/// The namespace when the URL names none.
const DEFAULT_NAMESPACE: &str = "agentbus";

/// How long JetStream remembers an idempotency key (`Nats-Msg-Id`).
pub(crate) const DUPLICATE_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// A connection to a JetStream server, shared by every handle of one bus.
pub(crate) struct NatsBus {
    url: String,
    namespace: String,
    replicas: Option<usize>,
    rt: Option<tokio::runtime::Runtime>,
    client: async_nats::Client,
    js: jetstream::Context,
    leases: OnceLock<kv::Store>,
}

impl std::fmt::Debug for NatsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBus")
            .field("url", &self.url)
            .field("namespace", &self.namespace)
            .field("replicas", &self.replicas)
            .finish_non_exhaustive()
    }
}

impl Drop for NatsBus {
    fn drop(&mut self) {
        // Never blocks, so a bus may be dropped inside another async runtime.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// How long one request to the server may take before it counts as unanswered: API
/// requests, publish acknowledgements, settlements, subscriptions, pull requests.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The net under one blocking call, which may make a few requests (each bounded by
/// [`REQUEST_TIMEOUT`]).
pub(crate) const NET: Duration = Duration::from_secs(15);

/// The failure of a request to the server: [`Error::Unavailable`] when the server could
/// not answer now (a timeout, no responders, a JetStream cluster without a leader for
/// what was asked), else [`Error::Nats`].
pub(crate) fn nats_err(operation: impl Into<String>, e: impl std::fmt::Display) -> Error {
    let reason = e.to_string();
    if is_transient(&reason) {
        Error::Unavailable {
            operation: operation.into(),
            reason,
        }
    } else {
        Error::Nats {
            operation: operation.into(),
            reason,
        }
    }
}

/// Whether a client or server error says "not now" rather than "no": the words
/// async-nats and nats-server use for timeouts, missing responders (a leader being
/// elected), lost connections, and JetStream's 503 answers (code 503, or the error
/// codes of a cluster without a leader, an offline stream or consumer).
fn is_transient(reason: &str) -> bool {
    let r = reason.to_ascii_lowercase();
    const WORDS: &[&str] = &[
        "timed out",
        "timeout",
        "no responders",
        "code 503",
        "stream: 503", // a pull request's status: no consumer leader now
        "broken pipe",
        "disconnected",
        "connection closed",
        "not connected",
        "subscription dropped",
        "leader",
        "offline",
        "error code 10008", // JetStream cluster not available
        "error code 10009", // not the leader
        "error code 10006", // cluster not active
        "error code 10202", // membership change in flight
    ];
    WORDS.iter().any(|w| r.contains(w))
}

/// `fut`, or [`Error::Unavailable`] if it has not finished within `bound`.
pub(crate) async fn bounded<T>(
    operation: impl Fn() -> String,
    bound: Duration,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(bound, fut).await {
        Ok(r) => r,
        Err(_) => Err(Error::Unavailable {
            operation: operation(),
            reason: format!("no answer within {bound:?}"),
        }),
    }
}

/// The parts of a `nats://` URL.
#[derive(Debug, PartialEq)]
struct Url {
    /// Every server of the seed list, as `nats://host:port`.
    servers: Vec<String>,
    namespace: String,
    /// `?replicas=N`, if given.
    replicas: Option<usize>,
}

/// `nats://host:port[,host:port...][/namespace][?replicas=N]`.
fn parse_url(url: &str) -> Result<Url> {
    let bad = |reason: &str| Error::Nats {
        operation: format!("parse URL {url:?}"),
        reason: reason.to_owned(),
    };
    let rest = url
        .strip_prefix(SCHEME)
        .ok_or_else(|| bad("it must start with nats://"))?
        // `nats://a:1,nats://b:2` is `nats://a:1,b:2`.
        .replace(&format!(",{SCHEME}"), ",");
    let rest = rest.as_str();
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (seeds, namespace) = rest.split_once('/').unwrap_or((rest, ""));
    let mut servers = Vec::new();
    for server in seeds.split(',') {
        if server.is_empty() {
            return Err(bad("no host (a seed list is host:port,host:port)"));
        }
        servers.push(format!("{SCHEME}{server}"));
    }
    let namespace = match namespace.trim_end_matches('/') {
        "" => DEFAULT_NAMESPACE.to_owned(),
        ns => ns.to_owned(),
    };
    crate::validate_name("namespace", &namespace)?;
    let mut replicas = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("replicas", n)) => {
                replicas = Some(
                    n.parse()
                        .ok()
                        .filter(|n| (1..=5).contains(n))
                        .ok_or_else(|| bad("replicas must be 1 to 5"))?,
                );
            }
            _ => return Err(bad(&format!("unknown option {pair:?}"))),
        }
    }
    Ok(Url {
        servers,
        namespace,
        replicas,
    })
}

/// A name made safe for stream, consumer and bucket names: `.` → `_D`, `_` → `_U`.
pub(crate) fn enc(name: &str) -> String {
    let mut out = String::with_capacity(name.len() + 4);
    for c in name.chars() {
        match c {
            '.' => out.push_str("_D"),
            '_' => out.push_str("_U"),
            c => out.push(c),
        }
    }
    out
}

/// The inverse of [`enc`]; `None` for a string `enc` cannot produce.
pub(crate) fn dec(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            '_' => match chars.next()? {
                'D' => out.push('.'),
                'U' => out.push('_'),
                _ => return None,
            },
            c => out.push(c),
        }
    }
    Some(out)
}

impl NatsBus {
    /// Connects to the first server of the seed list that answers and checks that it
    /// runs JetStream. Nothing here needs the JetStream meta leader: the server's
    /// greeting says whether JetStream is on and which version it runs, so a process
    /// can open the bus while a cluster elects a new meta leader.
    pub(crate) fn connect(url: &str) -> Result<NatsBus> {
        let Url {
            servers,
            namespace,
            replicas,
        } = parse_url(url)?;
        let mut addrs = Vec::new();
        for s in &servers {
            addrs.push(
                s.parse::<async_nats::ServerAddr>()
                    .map_err(|e| nats_err(format!("parse URL {url:?}"), e))?,
            );
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("agentbus-nats")
            .enable_all()
            .build()
            .map_err(|e| nats_err("start the NATS runtime", e))?;
        let (tx, rx) = mpsc::sync_channel(1);
        let seeds = servers.join(",");
        rt.spawn(async move {
            let connected = async {
                let client = async_nats::ConnectOptions::new()
                    .connection_timeout(REQUEST_TIMEOUT)
                    .request_timeout(Some(REQUEST_TIMEOUT))
                    .connect(addrs)
                    .await
                    .map_err(|e| Error::Nats {
                        operation: format!("connect to {seeds}"),
                        reason: e.to_string(),
                    })?;
                let info = client.server_info();
                if !info.jetstream {
                    return Err(Error::Nats {
                        operation: format!("use JetStream on {seeds}"),
                        reason: format!(
                            "server {} ({}) runs without JetStream: start it with -js",
                            info.server_name, info.version
                        ),
                    });
                }
                let js = jetstream::ContextBuilder::new()
                    .timeout(REQUEST_TIMEOUT)
                    .build(client.clone());
                Ok::<_, Error>((client, js))
            };
            let _ = tx.send(connected.await);
        });
        let connected = rx
            .recv()
            .map_err(|e| nats_err("connect", e))
            .and_then(|r| r);
        let (client, js) = match connected {
            Ok(c) => c,
            Err(e) => {
                // Dropping a runtime blocks, which panics inside another runtime.
                rt.shutdown_background();
                return Err(e);
            }
        };
        Ok(NatsBus {
            url: url.to_owned(),
            namespace,
            replicas,
            rt: Some(rt),
            client,
            js,
            leases: OnceLock::new(),
        })
    }

    /// Runs `f` on the bus's runtime and waits for it on this thread, at most `bound`
    /// ([`Error::Unavailable`] after that; every request inside has a shorter bound of
    /// its own, so this is the net under them).
    pub(crate) fn run<T: Send + 'static>(
        &self,
        bound: Duration,
        f: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = mpsc::sync_channel(1);
        self.rt
            .as_ref()
            .expect("the runtime lives as long as the bus")
            .spawn(async move {
                let r = bounded(|| "a request to the NATS server".to_owned(), bound, f).await;
                let _ = tx.send(r);
            });
        rx.recv().expect("the NATS runtime dropped a request")
    }

    /// The version the server we are connected to reported.
    pub(crate) fn server_version(&self) -> String {
        self.client.server_info().version
    }

    /// The replicas the URL asks for, if it does.
    pub(crate) fn replicas(&self) -> Option<usize> {
        self.replicas
    }

    /// Starts `f` on the bus's runtime without waiting for it.
    pub(crate) fn detach(&self, f: impl Future<Output = ()> + Send + 'static) {
        if let Some(rt) = &self.rt {
            rt.spawn(f);
        }
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    pub(crate) fn stream_name(&self, mailbox: &str) -> String {
        format!("{}_MB_{}", enc(&self.namespace), enc(mailbox))
    }

    pub(crate) fn subject(&self, mailbox: &str) -> String {
        format!("agentbus.{}.{}", enc(&self.namespace), enc(mailbox))
    }

    pub(crate) fn bucket(&self) -> String {
        format!("{}_LEASES", enc(&self.namespace))
    }

    /// The subject a lease's KV updates are published on.
    pub(crate) fn lease_subject(&self, lease: &str) -> String {
        format!("$KV.{}.{}", self.bucket(), enc(lease))
    }
}

/// A bus on a JetStream server: the shared connection and this handle's settings.
/// Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Bus {
    conn: Arc<NatsBus>,
    opts: Arc<Options>,
}

impl Bus {
    /// Connects and checks that JetStream answers. Nothing needs creating: the
    /// streams, consumers and KV bucket are made as mailboxes, groups and leases are.
    pub(crate) fn connect(url: &str, opts: Options) -> Result<Bus> {
        Ok(Bus {
            conn: Arc::new(NatsBus::connect(url)?),
            opts: Arc::new(opts),
        })
    }

    pub(crate) fn conn(&self) -> &NatsBus {
        &self.conn
    }

    pub(crate) fn opts(&self) -> &Options {
        &self.opts
    }
}

/// What to do instead, for the operations this backend does not offer.
fn hint(operation: &'static str) -> &'static str {
    match operation {
        "ack_upto" => "a JetStream consumer with explicit acks takes one ack per message",
        "compact" => "set the stream's limits (max_age, max_bytes) in JetStream instead",
        "doctor" => "JetStream checks its own storage: see `nats stream report`",
        "claiming one message by seq" => {
            "a JetStream consumer delivers in its own order: receive with recv_timeout"
        }
        "acting on a delivery claimed through another handle" => {
            "settle it with the Delivery that claim returned"
        }
        "settling by seq a message this handle has not claimed" => {
            "settle it with the Delivery its claim returned"
        }
        "a process-bound lease" => "no lock spans machines: use a TTL and renew it",
        "requeue" => "replay the dead letter instead (NewMessage::replay_of)",
        "coalescing groups" => {
            "coalesce in the receiver (Follower::coalesce, watch --coalesce), or keep the \
             mailbox on a directory bus"
        }
        "key-value buckets" => "not yet on JetStream: keep agent state on a directory bus",
        _ => "not offered on JetStream",
    }
}

/// Every JetStream backend type names itself, and its hints, the same way.
macro_rules! nats_backend {
    ($($ty:ty),*) => {
        $(impl Backend for $ty {
            fn kind(&self) -> &'static str {
                "nats"
            }

            fn hint(&self, operation: &'static str) -> &'static str {
                hint(operation)
            }
        })*
    };
}
nats_backend!(Bus, Mailbox, Group);

impl BusBackend for Bus {
    fn create_mailbox(&self, name: &str) -> Result<()> {
        if !self.conn.create_stream(name, self.opts.max_record_bytes)? {
            return Err(Error::MailboxExists {
                name: name.to_owned(),
            });
        }
        Ok(())
    }

    fn open_mailbox(&self, name: &str) -> Result<Option<OpenMailbox>> {
        let Some((limit, replicas)) = self.conn.stream_limit(name)? else {
            return Ok(None);
        };
        self.conn.check_replicas(name, replicas)?;
        let mailbox = Mailbox::new(self.clone(), name);
        Ok(Some(OpenMailbox {
            path: mailbox.path(),
            max_record_bytes: if limit == 0 { usize::MAX } else { limit },
            imp: MailboxImp::Nats(mailbox),
        }))
    }

    fn mailbox_names(&self) -> Result<Vec<String>> {
        self.conn.mailbox_names()
    }

    fn watch_mailboxes(&self, names: &[&str], mode: WatchMode) -> Watch {
        let subjects = names.iter().map(|m| self.conn.subject(m)).collect();
        watch::watch_subjects(&self.conn, subjects, mode, self.opts.poll_interval)
    }

    fn lease_info(&self, name: &str) -> Result<Option<LeaseInfo>> {
        let state = lease::state(&self.conn, name)?;
        let now = crate::clock::now_ms();
        Ok((state.token != 0).then(|| state.info(name, now)))
    }

    fn lease_names(&self) -> Result<Vec<String>> {
        Ok(self
            .conn
            .lease_entries()?
            .into_iter()
            .map(|e| e.0)
            .collect())
    }

    fn grant_lease(&self, request: &LeaseGrant<'_>) -> Result<Result<Granted, LeaseState>> {
        if request.process_bound {
            return Err(self.unsupported("a process-bound lease"));
        }
        let started = Instant::now();
        let granted = lease::grant(&self.conn, request.name, request.holder, request.ttl)?;
        Ok(granted.map(|(token, expires_at)| Granted {
            token,
            expires_at: crate::clock::datetime_ms(expires_at),
            started,
            alive: None,
        }))
    }

    fn change_lease(
        &self,
        name: &str,
        holder: &str,
        token: u64,
        change: LeaseChange,
    ) -> Result<LeaseInfo> {
        lease::change(&self.conn, name, holder, token, change)
    }

    fn release_lease_in_background(&self, name: &str, holder: &str, token: u64) {
        // Never blocking: the release runs on the bus's runtime.
        let (conn, name, holder) = (self.conn.clone(), name.to_owned(), holder.to_owned());
        self.conn.detach(async move {
            let _ = tokio::task::spawn_blocking(move || {
                lease::change(&conn, &name, &holder, token, LeaseChange::Release)
            })
            .await;
        });
    }

    fn watch_lease(&self, name: &str, mode: WatchMode) -> Result<Watch> {
        let subjects = vec![self.conn.lease_subject(name)];
        Ok(watch::watch_subjects(
            &self.conn,
            subjects,
            mode,
            self.opts.poll_interval,
        ))
    }
}

/// A stored record back to a message with its stream sequence. An outside writer may
/// give the idempotency key only as the `Nats-Msg-Id` header (`msg_id`): the message
/// then carries that as its key (FORMAT.md).
pub(crate) fn decode(
    url: &str,
    stream: &str,
    seq: u64,
    payload: &[u8],
    msg_id: Option<&str>,
) -> Result<Message> {
    let mut m = crate::decode::message(payload).map_err(|reason| Error::Corrupt {
        path: format!("{url}/{stream}").into(),
        line: seq,
        reason: format!("not an agentbus message: {reason}"),
    })?;
    m.seq = seq;
    if m.idempotency_key.is_none() {
        m.idempotency_key = msg_id.filter(|k| !k.is_empty()).map(str::to_owned);
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_one_to_one() {
        for name in ["a", "a.b", "a_b", "a._b", "a_.b", "x-y_z.w", "_D", "a__"] {
            assert_eq!(dec(&enc(name)).as_deref(), Some(name));
            assert!(!enc(name).contains('.'));
        }
        assert_ne!(enc("a._b"), enc("a_.b"));
        assert_eq!(dec("a_x"), None);
    }

    #[test]
    fn urls_parse() {
        let url = parse_url("nats://127.0.0.1:4222").unwrap();
        assert_eq!(
            url,
            Url {
                servers: vec!["nats://127.0.0.1:4222".into()],
                namespace: "agentbus".into(),
                replicas: None,
            }
        );
        let url = parse_url("nats://h:1/team.a?replicas=3").unwrap();
        assert_eq!((url.namespace.as_str(), url.replicas), ("team.a", Some(3)));
        assert!(parse_url("nats://h:1/../x").is_err());
        assert!(parse_url("nats://h:1?replicas=9").is_err());
        assert!(parse_url("nats://h:1?color=red").is_err());
        assert!(parse_url("nats:///ns").is_err());
    }

    /// Issue 15 #8: a seed list of servers, one of which may be down.
    #[test]
    fn urls_take_a_seed_list() {
        let url = parse_url("nats://a:1,b:2,nats://c:3/ns?replicas=3").unwrap();
        assert_eq!(url.servers, ["nats://a:1", "nats://b:2", "nats://c:3"]);
        assert_eq!((url.namespace.as_str(), url.replicas), ("ns", Some(3)));
        assert!(parse_url("nats://a:1,,b:2/ns").is_err());
        assert!(parse_url("nats://a:1,/ns").is_err());
    }

    /// Issue 15 #10: "not now" answers are retryable, "no" answers are not.
    #[test]
    fn unavailable_answers_are_retryable() {
        for reason in [
            "timed out",
            "no responders",
            "error while processing messages from the stream: 503, None",
            "jetstream error: JetStream cluster not available (code 503, error code 10008)",
            "broken pipe",
        ] {
            assert!(nats_err("x", reason).is_retryable(), "{reason}");
        }
        for reason in [
            "stream not found (code 404, error code 10059)",
            "insufficient resources (code 500, error code 10023)",
            "maximum payload exceeded",
        ] {
            let e = nats_err("x", reason);
            assert!(
                !e.is_retryable() && matches!(e, Error::Nats { .. }),
                "{reason}"
            );
        }
    }
}
