//! The NATS JetStream backend (cargo feature `nats`).
//!
//! A [`Bus`](crate::Bus) opened from a `nats://host:port[/namespace][?replicas=N]` URL
//! keeps its state in a JetStream server instead of a directory:
//!
//! | agentbus | JetStream |
//! | --- | --- |
//! | mailbox `m` | stream `<ns>_MB_<m>` with the one subject `agentbus.<ns>.<m>` |
//! | `seq` | the stream sequence |
//! | idempotency key | the `Nats-Msg-Id` header (duplicate window 24 h) |
//! | group `g` | durable pull consumer `g` (explicit ack, `ack_wait` = visibility) |
//! | ack, nack + delay, extend, term | `+ACK`, `-NAK {delay}`, `+WPI`, `+TERM`, each confirmed |
//! | dead letters | the message is copied to the dead-letter mailbox, then termed |
//! | lease `l` | key `l` of the KV bucket `<ns>_LEASES`; the grant's revision is the token |
//! | wake-ups | a core subscription to the subjects, plus the poll timer |
//!
//! Names are mapped with `.` → `_D` and `_` → `_U`, which JetStream names allow and
//! which cannot collide. This module speaks to the server; the semantics (what a
//! claim returns, when a lease is held) stay in the modules of the public types.
//!
//! The blocking API runs each request on a small runtime owned by the bus and waits for
//! it on the calling thread, so it can be called from any thread, inside an async
//! runtime or not.

use std::future::Future;
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Duration;

use async_nats::jetstream::context::{ConsumerInfoErrorKind, GetStreamErrorKind};
use async_nats::jetstream::{self, consumer::pull, kv, stream, AckKind};
use async_nats::HeaderMap;
use futures_util::StreamExt;

use crate::watch::Hints;
use crate::{Error, Message, Receipt, Result};

/// The URL scheme that selects this backend.
pub(crate) const SCHEME: &str = "nats://";

/// The namespace when the URL names none.
const DEFAULT_NAMESPACE: &str = "agentbus";

/// How long JetStream remembers an idempotency key (`Nats-Msg-Id`).
pub(crate) const DUPLICATE_WINDOW: Duration = Duration::from_secs(24 * 3600);

/// A connection to a JetStream server, shared by every handle of one bus.
pub(crate) struct NatsBus {
    url: String,
    namespace: String,
    replicas: usize,
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

fn nats_err(operation: impl Into<String>, e: impl std::fmt::Display) -> Error {
    Error::Nats {
        operation: operation.into(),
        reason: e.to_string(),
    }
}

/// `nats://host:port[/namespace][?replicas=N]` → (server URL, namespace, replicas).
fn parse_url(url: &str) -> Result<(String, String, usize)> {
    let bad = |reason: &str| nats_err(format!("parse URL {url:?}"), reason);
    let rest = url
        .strip_prefix(SCHEME)
        .ok_or_else(|| bad("it must start with nats://"))?;
    let (rest, query) = rest.split_once('?').unwrap_or((rest, ""));
    let (server, namespace) = rest.split_once('/').unwrap_or((rest, ""));
    if server.is_empty() {
        return Err(bad("no host"));
    }
    let namespace = match namespace.trim_end_matches('/') {
        "" => DEFAULT_NAMESPACE.to_owned(),
        ns => ns.to_owned(),
    };
    crate::validate_name("namespace", &namespace)?;
    let mut replicas = 1;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("replicas", n)) => {
                replicas = n
                    .parse()
                    .ok()
                    .filter(|n| (1..=5).contains(n))
                    .ok_or_else(|| bad("replicas must be 1 to 5"))?;
            }
            _ => return Err(bad(&format!("unknown option {pair:?}"))),
        }
    }
    Ok((format!("{SCHEME}{server}"), namespace, replicas))
}

/// A name made safe for stream, consumer and bucket names: `.` → `_D`, `_` → `_U`.
fn enc(name: &str) -> String {
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
fn dec(s: &str) -> Option<String> {
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

/// A durable pull consumer: a group on JetStream.
pub(crate) type PullConsumer = jetstream::consumer::Consumer<pull::Config>;

/// One message on its way to a stream.
pub(crate) struct Outgoing {
    /// The record, `{"seq":0,...}`.
    pub(crate) payload: Vec<u8>,
    pub(crate) id: uuid::Uuid,
    pub(crate) key: Option<String>,
}

/// A message fetched for a group, not decided on yet.
pub(crate) struct Fetched {
    pub(crate) seq: u64,
    pub(crate) attempt: u32,
    pub(crate) reply: String,
    pub(crate) payload: Vec<u8>,
}

/// What the server says about a group.
pub(crate) struct ConsumerState {
    pub(crate) ack_wait: Duration,
    pub(crate) description: Option<String>,
    pub(crate) delivered_seq: u64,
    pub(crate) ack_floor_seq: u64,
    pub(crate) ack_pending: u64,
    pub(crate) redelivered: u64,
    pub(crate) num_pending: u64,
}

/// A subscription that bumps a [`Hints`] on every message; unsubscribes when dropped.
#[derive(Debug)]
pub(crate) struct HintTask(tokio::task::AbortHandle);

impl Drop for HintTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl NatsBus {
    /// Connects and checks that JetStream answers.
    pub(crate) fn connect(url: &str) -> Result<NatsBus> {
        let (server, namespace, replicas) = parse_url(url)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("agentbus-nats")
            .enable_all()
            .build()
            .map_err(|e| nats_err("start the NATS runtime", e))?;
        let (tx, rx) = mpsc::sync_channel(1);
        rt.spawn(async move {
            let connected = async {
                let client = async_nats::ConnectOptions::new()
                    .connection_timeout(Duration::from_secs(5))
                    .connect(server.as_str())
                    .await
                    .map_err(|e| nats_err(format!("connect to {server}"), e))?;
                let js = jetstream::new(client.clone());
                // Any JetStream answer will do ("no such stream" included); a server
                // without JetStream has no responders for the API.
                match js.get_stream("agentbus-probe").await {
                    Ok(_) => {}
                    Err(e)
                        if matches!(e.kind(), GetStreamErrorKind::JetStream(j)
                            if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) => {}
                    Err(e) => return Err(nats_err(format!("use JetStream on {server}"), e)),
                }
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

    /// Runs `f` on the bus's runtime and waits for it on this thread.
    fn run<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = mpsc::sync_channel(1);
        self.rt
            .as_ref()
            .expect("the runtime lives as long as the bus")
            .spawn(async move {
                let _ = tx.send(f.await);
            });
        rx.recv().expect("the NATS runtime dropped a request")
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

    fn stream_name(&self, mailbox: &str) -> String {
        format!("{}_MB_{}", enc(&self.namespace), enc(mailbox))
    }

    pub(crate) fn subject(&self, mailbox: &str) -> String {
        format!("agentbus.{}.{}", enc(&self.namespace), enc(mailbox))
    }

    fn bucket(&self) -> String {
        format!("{}_LEASES", enc(&self.namespace))
    }

    /// The subject a lease's KV updates are published on.
    pub(crate) fn lease_subject(&self, lease: &str) -> String {
        format!("$KV.{}.{}", self.bucket(), enc(lease))
    }

    /// Creates the mailbox's stream; `false` if it already existed.
    pub(crate) fn create_stream(&self, mailbox: &str, max_record: usize) -> Result<bool> {
        if self.stream_limit(mailbox)?.is_some() {
            return Ok(false);
        }
        let config = stream::Config {
            name: self.stream_name(mailbox),
            subjects: vec![self.subject(mailbox)],
            description: Some(format!("agentbus mailbox {mailbox:?}")),
            max_message_size: i32::try_from(max_record).unwrap_or(i32::MAX),
            duplicate_window: DUPLICATE_WINDOW,
            num_replicas: self.replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        let js = self.js.clone();
        let name = mailbox.to_owned();
        self.run(async move {
            js.create_stream(config)
                .await
                .map_err(|e| nats_err(format!("create stream for mailbox {name}"), e))
        })?;
        Ok(true)
    }

    /// The mailbox's record limit, or `None` if it has no stream.
    pub(crate) fn stream_limit(&self, mailbox: &str) -> Result<Option<usize>> {
        let js = self.js.clone();
        let name = self.stream_name(mailbox);
        self.run(async move {
            match js.get_stream(&name).await {
                Ok(s) => Ok(Some(s.cached_info().config.max_message_size.max(0) as usize)),
                Err(e)
                    if matches!(e.kind(), GetStreamErrorKind::JetStream(j)
                        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
                {
                    Ok(None)
                }
                Err(e) => Err(nats_err(format!("look up stream {name}"), e)),
            }
        })
    }

    /// The mailboxes of this namespace, sorted.
    pub(crate) fn mailbox_names(&self) -> Result<Vec<String>> {
        let js = self.js.clone();
        let prefix = format!("{}_MB_", enc(&self.namespace));
        let mut names = self.run(async move {
            let mut names = Vec::new();
            let mut list = js.stream_names();
            while let Some(name) = list.next().await {
                let name = name.map_err(|e| nats_err("list streams", e))?;
                if let Some(mb) = name.strip_prefix(&prefix).and_then(dec) {
                    names.push(mb);
                }
            }
            Ok::<_, Error>(names)
        })?;
        names.sort();
        Ok(names)
    }

    /// Publishes `batch` in order (pipelined: all are sent before the first ack is
    /// awaited) and returns a receipt per message once the server has stored it.
    pub(crate) fn publish(&self, mailbox: &str, batch: Vec<Outgoing>) -> Result<Vec<Receipt>> {
        let js = self.js.clone();
        let subject = self.subject(mailbox);
        let stream = self.stream_name(mailbox);
        let name = mailbox.to_owned();
        self.run(async move {
            let op = || format!("publish to mailbox {name}");
            let mut pending = Vec::with_capacity(batch.len());
            for m in batch {
                let mut headers = HeaderMap::new();
                if let Some(key) = &m.key {
                    headers.insert("Nats-Msg-Id", key.as_str());
                }
                let ack = js
                    .publish_with_headers(subject.clone(), headers, m.payload.into())
                    .await
                    .map_err(|e| nats_err(op(), e))?;
                pending.push((m.id, ack));
            }
            let mut receipts = Vec::with_capacity(pending.len());
            for (id, ack) in pending {
                let ack = ack.await.map_err(|e| nats_err(op(), e))?;
                let id = if ack.duplicate {
                    // The original receipt: its id is in the stored record.
                    let s = js
                        .get_stream_no_info(&stream)
                        .await
                        .map_err(|e| nats_err(op(), e))?;
                    let stored = s
                        .get_raw_message(ack.sequence)
                        .await
                        .map_err(|e| nats_err(op(), e))?;
                    serde_json::from_slice::<Message>(&stored.payload)
                        .map(|m| m.id)
                        .unwrap_or(id)
                } else {
                    id
                };
                receipts.push(Receipt {
                    id,
                    seq: ack.sequence,
                    mailbox: name.clone(),
                    duplicate: ack.duplicate,
                });
            }
            Ok(receipts)
        })
    }

    /// (first seq, last seq) of the mailbox: (last + 1, last) when it is empty.
    pub(crate) fn bounds(&self, mailbox: &str) -> Result<(u64, u64)> {
        let js = self.js.clone();
        let name = self.stream_name(mailbox);
        self.run(async move {
            let s = js
                .get_stream(&name)
                .await
                .map_err(|e| nats_err(format!("read stream {name}"), e))?;
            let state = &s.cached_info().state;
            let last = state.last_sequence;
            let first = if state.messages == 0 {
                last + 1
            } else {
                state.first_sequence
            };
            Ok((first, last))
        })
    }

    /// The message stored at `seq`; `None` if there is none (deleted, or not yet sent).
    pub(crate) fn get(&self, mailbox: &str, seq: u64) -> Result<Option<Message>> {
        let js = self.js.clone();
        let name = self.stream_name(mailbox);
        let url = self.url.clone();
        self.run(async move {
            let s = js
                .get_stream_no_info(&name)
                .await
                .map_err(|e| nats_err(format!("read stream {name}"), e))?;
            match s.get_raw_message(seq).await {
                Ok(stored) => decode(&url, &name, seq, &stored.payload).map(Some),
                Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
                Err(e) => Err(nats_err(format!("read seq {seq} of stream {name}"), e)),
            }
        })
    }

    /// Creates a durable pull consumer; `false` if it already existed.
    pub(crate) fn create_consumer(
        &self,
        mailbox: &str,
        group: &str,
        config: ConsumerConfig,
    ) -> Result<bool> {
        if self.consumer_state(mailbox, group)?.is_some() {
            return Ok(false);
        }
        let js = self.js.clone();
        let stream = self.stream_name(mailbox);
        let durable = enc(group);
        let replicas = self.replicas;
        self.run(async move {
            let s = js
                .get_stream_no_info(&stream)
                .await
                .map_err(|e| nats_err(format!("open stream {stream}"), e))?;
            s.create_consumer(pull::Config {
                durable_name: Some(durable.clone()),
                description: Some(config.description),
                deliver_policy: match config.start_seq {
                    Some(seq) => jetstream::consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: seq,
                    },
                    None => jetstream::consumer::DeliverPolicy::All,
                },
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: config.ack_wait,
                max_deliver: config.max_deliver,
                max_ack_pending: -1,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| nats_err(format!("create consumer {durable} on {stream}"), e))
        })?;
        Ok(true)
    }

    /// The consumer's settings and counters, or `None` if it does not exist.
    pub(crate) fn consumer_state(
        &self,
        mailbox: &str,
        group: &str,
    ) -> Result<Option<ConsumerState>> {
        let js = self.js.clone();
        let stream = self.stream_name(mailbox);
        let durable = enc(group);
        self.run(async move {
            let s = js
                .get_stream_no_info(&stream)
                .await
                .map_err(|e| nats_err(format!("open stream {stream}"), e))?;
            match s.consumer_info(&durable).await {
                Ok(info) => Ok(Some(ConsumerState {
                    ack_wait: info.config.ack_wait,
                    description: info.config.description.clone(),
                    delivered_seq: info.delivered.stream_sequence,
                    ack_floor_seq: info.ack_floor.stream_sequence,
                    ack_pending: info.num_ack_pending as u64,
                    redelivered: info.num_redelivered as u64,
                    num_pending: info.num_pending,
                })),
                Err(e)
                    if matches!(e.kind(), ConsumerInfoErrorKind::NotFound)
                        || matches!(e.kind(), ConsumerInfoErrorKind::JetStream(j)
                            if j.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND) =>
                {
                    Ok(None)
                }
                Err(e) => Err(nats_err(
                    format!("look up consumer {durable} on {stream}"),
                    e,
                )),
            }
        })
    }

    /// The groups of a mailbox, sorted.
    pub(crate) fn consumer_names(&self, mailbox: &str) -> Result<Vec<String>> {
        let js = self.js.clone();
        let stream = self.stream_name(mailbox);
        let mut names = self.run(async move {
            let s = js
                .get_stream_no_info(&stream)
                .await
                .map_err(|e| nats_err(format!("open stream {stream}"), e))?;
            let mut names = Vec::new();
            let mut list = s.consumer_names();
            while let Some(name) = list.next().await {
                let name = name.map_err(|e| nats_err("list consumers", e))?;
                names.extend(dec(&name));
            }
            Ok::<_, Error>(names)
        })?;
        names.sort();
        Ok(names)
    }

    /// A handle on the group's consumer, for [`fetch`](Self::fetch).
    pub(crate) fn consumer(&self, mailbox: &str, group: &str) -> Result<PullConsumer> {
        let js = self.js.clone();
        let stream = self.stream_name(mailbox);
        let durable = enc(group);
        self.run(async move {
            js.get_consumer_from_stream(&durable, &stream)
                .await
                .map_err(|e| nats_err(format!("open consumer {durable} on {stream}"), e))
        })
    }

    /// Fetches up to `max` messages for the group without waiting for more.
    pub(crate) fn fetch(&self, consumer: &PullConsumer, max: usize) -> Result<Vec<Fetched>> {
        let consumer = consumer.clone();
        self.run(async move {
            let op = || format!("fetch from consumer {}", consumer.cached_info().name);
            let mut batch = consumer
                .fetch()
                .max_messages(max)
                .messages()
                .await
                .map_err(|e| nats_err(op(), e))?;
            let mut out = Vec::new();
            while let Some(m) = batch.next().await {
                let m = m.map_err(|e| nats_err(op(), e))?;
                let info = m.info().map_err(|e| nats_err(op(), e))?;
                let (seq, attempt) = (info.stream_sequence, info.delivered.max(1) as u32);
                out.push(Fetched {
                    seq,
                    attempt,
                    reply: m.reply.as_ref().map(|r| r.to_string()).unwrap_or_default(),
                    payload: m.payload.to_vec(),
                });
            }
            Ok(out)
        })
    }

    /// Settles a delivery through its reply subject and waits for the server's
    /// confirmation.
    pub(crate) fn settle(&self, reply: &str, kind: AckKind) -> Result<()> {
        let js = self.js.clone();
        let reply = reply.to_owned();
        self.run(async move {
            jetstream::message::Acker::new(js, Some(reply.clone().into()))
                .double_ack_with(kind)
                .await
                .map_err(|e| nats_err("settle a delivery", e))
        })
    }

    fn lease_store(&self) -> Result<kv::Store> {
        if let Some(store) = self.leases.get() {
            return Ok(store.clone());
        }
        let js = self.js.clone();
        let bucket = self.bucket();
        let replicas = self.replicas;
        let store = self.run(async move {
            match js.get_key_value(&bucket).await {
                Ok(store) => Ok(store),
                Err(_) => {
                    // The bucket's stream, as `create_key_value` would make it. That
                    // call first asks for the account's limits, whose answer 2.9
                    // servers word in a way this client cannot parse.
                    js.create_stream(stream::Config {
                        name: format!("KV_{bucket}"),
                        description: Some("agentbus leases".into()),
                        subjects: vec![format!("$KV.{bucket}.>")],
                        max_messages_per_subject: 1,
                        storage: stream::StorageType::File,
                        allow_rollup: true,
                        deny_delete: true,
                        // Reads go to the leader: a replica's direct answer may lag,
                        // and a lease decision must see the latest grant.
                        allow_direct: false,
                        num_replicas: replicas,
                        discard: stream::DiscardPolicy::New,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| nats_err(format!("create KV bucket {bucket}"), e))?;
                    js.get_key_value(&bucket)
                        .await
                        .map_err(|e| nats_err(format!("open KV bucket {bucket}"), e))
                }
            }
        })?;
        Ok(self.leases.get_or_init(|| store).clone())
    }

    /// Read-modify-write of a lease entry with compare-and-set on its revision:
    /// `decide` sees the current (revision, value) and returns the new value, or
    /// `None` to leave it. A concurrent writer makes the write fail; then `decide`
    /// runs again on what that writer left. Returns the revision written (or the
    /// current one) and the value `decide` last saw.
    pub(crate) fn lease_update<T: Send + 'static>(
        &self,
        lease: &str,
        mut decide: impl FnMut(Option<(u64, &[u8])>) -> Result<(Option<Vec<u8>>, T)> + Send + 'static,
    ) -> Result<(u64, T)> {
        let store = self.lease_store()?;
        let key = enc(lease);
        self.run(async move {
            let op = || format!("update lease {key}");
            loop {
                let entry = store.entry(&key).await.map_err(|e| nats_err(op(), e))?;
                let current = entry.as_ref().and_then(|e| match e.operation {
                    kv::Operation::Put => Some((e.revision, &e.value[..])),
                    _ => None,
                });
                let (write, seen) = decide(current)?;
                let Some(bytes) = write else {
                    return Ok((entry.map_or(0, |e| e.revision), seen));
                };
                let written = match &entry {
                    Some(e) => store
                        .update(&key, bytes.into(), e.revision)
                        .await
                        .map_err(|e| {
                            (
                                e.kind() == kv::UpdateErrorKind::WrongLastRevision,
                                e.to_string(),
                            )
                        }),
                    None => store.create(&key, bytes.into()).await.map_err(|e| {
                        (
                            e.kind() == kv::CreateErrorKind::AlreadyExists,
                            e.to_string(),
                        )
                    }),
                };
                match written {
                    Ok(revision) => return Ok((revision, seen)),
                    Err((true, _)) => continue,
                    Err((false, e)) => return Err(nats_err(op(), e)),
                }
            }
        })
    }

    /// Every lease entry: (name, revision, value).
    pub(crate) fn lease_entries(&self) -> Result<Vec<(String, u64, Vec<u8>)>> {
        let store = self.lease_store()?;
        self.run(async move {
            let op = || "list leases".to_owned();
            let mut keys = store.keys().await.map_err(|e| nats_err(op(), e))?;
            let mut out = Vec::new();
            while let Some(key) = keys.next().await {
                let key = key.map_err(|e| nats_err(op(), e))?;
                if let Some(e) = store.entry(&key).await.map_err(|e| nats_err(op(), e))? {
                    if e.operation == kv::Operation::Put {
                        out.extend(dec(&key).map(|k| (k, e.revision, e.value.to_vec())));
                    }
                }
            }
            out.sort_by(|a, b| a.0.cmp(&b.0));
            Ok(out)
        })
    }

    /// Subscribes to `subjects` (confirmed by the server before this returns) and
    /// bumps `hints` on every message.
    pub(crate) fn hint(&self, subjects: Vec<String>, hints: Arc<Hints>) -> Result<HintTask> {
        let client = self.client.clone();
        let subs = self.run(async move {
            let mut subs = Vec::new();
            for s in subjects {
                subs.push(
                    client
                        .subscribe(s.clone())
                        .await
                        .map_err(|e| nats_err(format!("subscribe to {s}"), e))?,
                );
            }
            client.flush().await.map_err(|e| nats_err("flush", e))?;
            Ok::<_, Error>(subs)
        })?;
        let rt = self
            .rt
            .as_ref()
            .expect("the runtime lives as long as the bus");
        let task = rt.spawn(async move {
            let mut all = futures_util::stream::select_all(subs);
            while all.next().await.is_some() {
                hints.bump();
            }
        });
        Ok(HintTask(task.abort_handle()))
    }
}

/// How a group's consumer is set up.
pub(crate) struct ConsumerConfig {
    pub(crate) description: String,
    pub(crate) start_seq: Option<u64>,
    pub(crate) ack_wait: Duration,
    pub(crate) max_deliver: i64,
}

/// A stored record back to a message with its stream sequence.
pub(crate) fn decode(url: &str, stream: &str, seq: u64, payload: &[u8]) -> Result<Message> {
    let mut m: Message = serde_json::from_slice(payload).map_err(|e| Error::Corrupt {
        path: format!("{url}/{stream}").into(),
        line: seq,
        reason: format!("not an agentbus message: {e}"),
    })?;
    m.seq = seq;
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
        let (server, ns, replicas) = parse_url("nats://127.0.0.1:4222").unwrap();
        assert_eq!(
            (server.as_str(), ns.as_str(), replicas),
            ("nats://127.0.0.1:4222", "agentbus", 1)
        );
        let (_, ns, replicas) = parse_url("nats://h:1/team.a?replicas=3").unwrap();
        assert_eq!((ns.as_str(), replicas), ("team.a", 3));
        assert!(parse_url("nats://h:1/../x").is_err());
        assert!(parse_url("nats://h:1?replicas=9").is_err());
        assert!(parse_url("nats://h:1?color=red").is_err());
        assert!(parse_url("nats:///ns").is_err());
    }
}
