//! The JetStream backend against one real server, with what other clients do to it:
//! records that are not agentbus messages, consumers made by other tools, outside
//! writers that set only `Nats-Msg-Id`, a consumer deleted under a claim, URLs with a
//! seed list or with replicas the streams do not have.
//!
//! Needs `AGENTBUS_NATS_URL` (as `tests/backends.rs`; `.ci/run` sets it); without it
//! the tests print why and pass without running. The raw side is async-nats, as a
//! nats-py or `nats` CLI user would do it.

use std::time::Duration;

use agentbus::{Bus, Error, Group, Mailbox, NewMessage};

struct Env {
    /// `nats://host:port`
    server: String,
    /// The bus URL: the server and a namespace of this test's own.
    url: String,
    ns: String,
    rt: tokio::runtime::Runtime,
    client: async_nats::Client,
}

fn env(test: &str) -> Option<Env> {
    let Ok(server) = std::env::var("AGENTBUS_NATS_URL") else {
        eprintln!("skipped: AGENTBUS_NATS_URL is not set (see tests/backends.rs)");
        return None;
    };
    let server = server.trim_end_matches('/').to_owned();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let ns = format!("s{}{test}{}", std::process::id(), nanos % 1_000_000_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = rt
        .block_on(async_nats::connect(server.trim_start_matches("nats://")))
        .expect("connect");
    Some(Env {
        url: format!("{server}/{ns}"),
        server,
        ns,
        rt,
        client,
    })
}

impl Env {
    fn bus(&self) -> Bus {
        Bus::builder().agent("t").init(&self.url).unwrap()
    }

    /// A new bus in this namespace with mailbox `mailbox` and its group `g`.
    fn group_of(&self, mailbox: &str) -> (Bus, Mailbox, Group) {
        let bus = self.bus();
        let mb = bus.create_mailbox(mailbox).unwrap();
        let group = mb.create_group("g").unwrap();
        (bus, mb, group)
    }

    fn subject(&self, mailbox: &str) -> String {
        format!("agentbus.{}.{mailbox}", self.ns)
    }

    fn stream(&self, mailbox: &str) -> String {
        format!("{}_MB_{mailbox}", self.ns)
    }

    /// Publishes `payload` (with `headers`) to `mailbox`'s stream, as an outside client.
    fn publish(&self, mailbox: &str, payload: &[u8], headers: &[(&str, &str)]) {
        let client = self.client.clone();
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in headers {
            h.insert(*k, *v);
        }
        let (subject, payload) = (self.subject(mailbox), payload.to_vec());
        self.rt.block_on(async move {
            let js = async_nats::jetstream::new(client);
            js.publish_with_headers(subject, h, payload.into())
                .await
                .unwrap()
                .await
                .unwrap();
        });
    }

    /// A JetStream API request; its JSON answer.
    fn api(&self, subject: String, body: serde_json::Value) -> serde_json::Value {
        let client = self.client.clone();
        let reply = self
            .rt
            .block_on(async move { client.request(subject, body.to_string().into()).await })
            .unwrap();
        serde_json::from_slice(&reply.payload).unwrap()
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(env!("CARGO_BIN_EXE_agentbus"))
            .arg("--bus")
            .arg(&self.url)
            .args(args)
            .env_remove("AGENTBUS_DIR")
            .output()
            .unwrap()
    }
}

/// An agentbus record as an outside writer publishes it (FORMAT.md), without a key.
fn record(body: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "seq": 0,
        "id": uuid::Uuid::now_v7(),
        "ts": "2026-01-02T03:04:05Z",
        "from": "nats-py",
        "type": "note",
        "body": body,
    }))
    .unwrap()
}

/// Issue 15 #3: an ack, nack or extend that the server does not confirm (here: no
/// consumer answers any more, as during a leader election) is not Ok, and says it
/// can be retried.
#[test]
fn a_settlement_nobody_confirms_is_an_error() {
    let Some(env) = env("settle") else { return };
    let (_bus, mb, group) = env.group_of("jobs");
    mb.send(NewMessage::new("job")).unwrap();
    mb.send(NewMessage::new("job")).unwrap();
    let claimed = group.claim("w", 2).unwrap();
    assert_eq!(claimed.len(), 2);
    let deleted = env.api(
        format!("$JS.API.CONSUMER.DELETE.{}.g", env.stream("jobs")),
        serde_json::json!({}),
    );
    assert_eq!(deleted["success"], true, "{deleted}");
    for err in [
        claimed[0].ack().unwrap_err(),
        claimed[1].extend(Duration::from_secs(1)).unwrap_err(),
        claimed[1].nack(Duration::ZERO, None).unwrap_err(),
    ] {
        assert!(
            matches!(err, Error::Unavailable { .. }) && err.is_retryable(),
            "{err:?}"
        );
        assert_eq!(err.code(), "unavailable");
    }
}

/// Issue 15 #4: records on a group's stream that are not agentbus messages (not JSON,
/// JSON without the message fields) are dead-lettered with their raw payload and the
/// reason, counted in `dead`, and the group goes on.
#[test]
fn records_that_are_not_messages_are_dead_lettered_with_their_bytes() {
    let Some(env) = env("foreign") else { return };
    let (bus, mb, group) = env.group_of("jobs");
    env.publish("jobs", b"plain text, not JSON", &[]);
    env.publish("jobs", br#"{"hello":"world"}"#, &[]);
    env.publish("jobs", &[0xff, 0x00, 0xfe], &[]);
    mb.send(NewMessage::new("job").body("real")).unwrap();

    let got = group.claim("w", 10).unwrap();
    assert_eq!(got.len(), 1, "only the message is delivered");
    assert_eq!(got[0].message.body.as_deref(), Some("real"));
    got[0].ack().unwrap();

    let dlq = bus.mailbox("jobs.dlq").unwrap();
    let notices: Vec<_> = dlq.messages().map(Result::unwrap).collect();
    assert_eq!(notices.len(), 3, "{notices:?}");
    assert!(notices.iter().all(|n| n.kind == agentbus::DAMAGED_TYPE));
    assert_eq!(notices[0].body.as_deref(), Some("plain text, not JSON"));
    assert_eq!(notices[1].body.as_deref(), Some(r#"{"hello":"world"}"#));
    assert_eq!(
        notices[2].payload,
        Some(serde_json::json!({"raw_hex": "ff00fe"}))
    );
    let info = notices[0].dead_letter().expect("a dead-letter header");
    assert_eq!((info.mailbox.as_str(), info.group.as_str()), ("jobs", "g"));
    assert!(
        info.reason.contains("not an agentbus message"),
        "{}",
        info.reason
    );
    assert_eq!(info.damaged.unwrap().seqs, Some((1, 1)));
    assert_eq!(group.stats().unwrap().dead, 3, "counted");
    // Claiming again sends no second notice.
    assert!(group.claim("w", 10).unwrap().is_empty());
    assert_eq!(dlq.messages().count(), 3);
}

/// Issue 15 #5: consumers made by other clients (a durable from `nats consumer add` or
/// nats-py, an ephemeral like `nats sub`'s) are not groups: `groups()`, `group list`
/// and `stats` pass over them and show the agentbus groups.
#[test]
fn consumers_of_other_clients_are_not_groups() {
    let Some(env) = env("consumers") else { return };
    let bus = env.bus();
    let mb = bus.create_mailbox("jobs").unwrap();
    mb.create_group("b-agentbus").unwrap();
    let stream = env.stream("jobs");
    for (subject, config) in [
        (
            format!("$JS.API.CONSUMER.DURABLE.CREATE.{stream}.a-foreign"),
            serde_json::json!({"durable_name": "a-foreign", "ack_policy": "explicit"}),
        ),
        (
            format!("$JS.API.CONSUMER.CREATE.{stream}"),
            serde_json::json!({"ack_policy": "none", "deliver_subject": "somewhere"}),
        ),
    ] {
        let made = env.api(
            subject,
            serde_json::json!({"stream_name": stream, "config": config}),
        );
        assert!(made.get("error").is_none(), "{made}");
    }
    assert_eq!(mb.groups().unwrap(), ["b-agentbus"]);
    for args in [&["group", "list", "jobs"][..], &["stats"]] {
        let out = env.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("b-agentbus"), "{args:?}: {stdout}");
        assert!(!stdout.contains("a-foreign"), "{args:?}: {stdout}");
    }
}

/// Issue 15 #9: an outside writer that sets only the `Nats-Msg-Id` header reads back
/// with that as its idempotency key, and a send with the same key is its duplicate.
#[test]
fn a_nats_msg_id_alone_is_the_idempotency_key() {
    let Some(env) = env("msgid") else { return };
    let (_bus, mb, group) = env.group_of("inbox");
    env.publish("inbox", &record("from python"), &[("Nats-Msg-Id", "py-1")]);
    let read = mb.messages().next().unwrap().unwrap();
    assert_eq!(read.idempotency_key.as_deref(), Some("py-1"));
    let claimed = group.claim_one("w").unwrap().unwrap();
    assert_eq!(claimed.message.idempotency_key.as_deref(), Some("py-1"));
    let again = mb
        .send(NewMessage::new("note").idempotency_key("py-1"))
        .unwrap();
    assert!(again.duplicate);
    assert_eq!((again.seq, again.id), (1, read.id));
}

/// Issue 15 #8: the URL takes a seed list, so an agent starts while a server of it is
/// down.
#[test]
fn a_seed_list_skips_a_server_that_is_down() {
    let Some(env) = env("seeds") else { return };
    let host = env.server.trim_start_matches("nats://");
    let url = format!("nats://127.0.0.1:1,{host}/{}", env.ns);
    let bus = Bus::builder().agent("t").init(&url).unwrap();
    let mb = bus.create_mailbox("main").unwrap();
    assert_eq!(mb.send(NewMessage::new("hi")).unwrap().seq, 1);
    let err = Bus::open(format!("nats://127.0.0.1:1,127.0.0.1:2/{}", env.ns)).unwrap_err();
    assert!(matches!(err, Error::Nats { .. }), "{err}");
    assert!(err.to_string().contains("127.0.0.1:2"), "{err}");
}

/// Issue 15 #7: a URL whose `?replicas` differs from what the mailbox's stream (or
/// the lease bucket) has is refused with a typed error that says how to fix it,
/// instead of silently running with fewer replicas than asked for.
#[test]
fn a_url_asking_for_other_replicas_than_the_stream_has_is_refused() {
    let Some(env) = env("replicas") else { return };
    let bus = env.bus();
    bus.create_mailbox("main").unwrap();
    bus.lease("l").try_acquire().unwrap().release().unwrap();
    let asks_three = Bus::open(format!("{}?replicas=3", env.url)).unwrap();
    for err in [
        asks_three.mailbox("main").map(drop).unwrap_err(),
        asks_three.lease("l").try_acquire().map(drop).unwrap_err(),
    ] {
        match &err {
            Error::InvalidSetting {
                setting: "replicas",
                reason,
            } => assert!(reason.contains("--replicas 3"), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
    // Asking for what it has is fine.
    let asks_one = Bus::open(format!("{}?replicas=1", env.url)).unwrap();
    asks_one.mailbox("main").unwrap();
}
