//! One behaviour suite, run on both backends: every behaviour in `backends/*.rs` runs
//! once on a bus directory (`<area>::dir::*`) and once on NATS JetStream
//! (`<area>::nats::*`). The JetStream half needs a server with JetStream enabled, named
//! by `AGENTBUS_NATS_URL` (for example `nats://127.0.0.1:4222`); `.ci/run` starts one.
//! Where the variable is unset, the JetStream tests print why and pass without running.
//!
//! Where the backends differ as README "Scaling out" documents, a behaviour asserts the
//! documented difference (`Error::Unsupported`, counters JetStream does not keep, ...).

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use agentbus::{Bus, Error, Group, NewMessage};

/// Where a test's bus lives, plus a scratch directory for its files.
struct Env {
    location: String,
    scratch: tempfile::TempDir,
    nats: bool,
}

impl Env {
    fn dir() -> Env {
        let scratch = tempfile::tempdir().unwrap();
        let location = scratch.path().join("bus").to_str().unwrap().to_owned();
        Env {
            location,
            scratch,
            nats: false,
        }
    }

    /// A fresh namespace on the server, so tests never see each other's state.
    fn nats() -> Option<Env> {
        let Ok(url) = std::env::var("AGENTBUS_NATS_URL") else {
            eprintln!(
                "skipped: AGENTBUS_NATS_URL is not set (run `nats-server -js` and set it \
                 to nats://127.0.0.1:4222 to test the JetStream backend)"
            );
            return None;
        };
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let ns = format!(
            "t{}-{}-{}",
            std::process::id(),
            nanos % 1_000_000_000_000,
            N.fetch_add(1, Ordering::Relaxed)
        );
        Some(Env {
            location: format!("{}/{ns}", url.trim_end_matches('/')),
            scratch: tempfile::tempdir().unwrap(),
            nats: true,
        })
    }

    fn is_nats(&self) -> bool {
        self.nats
    }

    /// The bus directory, on the directory backend only: for checks of its files.
    fn dir_path(&self) -> Option<&Path> {
        (!self.nats).then(|| Path::new(&self.location))
    }

    fn bus(&self, agent: &str) -> Bus {
        self.builder(agent).init(&self.location).unwrap()
    }

    fn builder(&self, agent: &str) -> agentbus::BusBuilder {
        common::flush_builder()
            .agent(agent)
            .poll_interval(Duration::from_millis(50))
    }

    /// A new bus handle (as another process would open it) on a group that exists.
    fn group(&self, agent: &str, mailbox: &str, group: &str) -> Group {
        self.bus(agent)
            .mailbox(mailbox)
            .unwrap()
            .group(group)
            .unwrap()
    }

    /// The writer's bus with a new mailbox `jobs` and its new group `group`.
    fn jobs(
        &self,
        group: &str,
        options: agentbus::GroupOptions,
    ) -> (Bus, agentbus::Mailbox, Group) {
        let bus = self.bus("writer");
        let mb = bus.create_mailbox("jobs").unwrap();
        let group = mb.create_group_with(group, options).unwrap();
        (bus, mb, group)
    }

    /// What a behaviour gives on this backend: `dir` on the directory, `nats` on
    /// JetStream (where README documents a difference).
    fn pick<T>(&self, dir: T, nats: T) -> T {
        if self.nats {
            nats
        } else {
            dir
        }
    }

    /// Asserts that `after` is the token of the grant after the one with `before`:
    /// the next number on the directory; higher on JetStream, whose tokens are revisions
    /// of the namespace's bucket (strictly increasing, not consecutive: README).
    fn assert_next_token(&self, before: u64, after: u64) {
        if self.nats {
            assert!(after > before, "token {after} after {before}");
        } else {
            assert_eq!(after, before + 1, "the next token");
        }
    }
}

/// Asserts that `result` is the JetStream backend's typed refusal of something README
/// "Scaling out" says it cannot do.
fn assert_unsupported<T: std::fmt::Debug>(result: agentbus::Result<T>) {
    match result {
        Err(Error::Unsupported {
            backend: "nats", ..
        }) => {}
        other => panic!("expected Error::Unsupported from nats, got {other:?}"),
    }
}

/// Defines each behaviour once and a `#[test]` for it per backend. A behaviour marked
/// `#[nats_bug = "..."]` fails on JetStream because of a known library bug: its
/// JetStream test is ignored with that reason (run it with `--ignored` to reproduce).
macro_rules! behaviours {
    ($(
        $(#[doc = $doc:literal])*
        $(#[nats_bug = $bug:literal])?
        fn $name:ident($env:ident: &Env) $body:block
    )*) => {
        $( $(#[doc = $doc])* fn $name($env: &Env) $body )*

        mod dir {
            $( #[test] fn $name() { super::$name(&crate::Env::dir()) } )*
        }

        mod nats {
            $( $(#[ignore = $bug])? #[test] fn $name() {
                if let Some(env) = crate::Env::nats() {
                    super::$name(&env)
                }
            } )*
        }
    };
}

#[path = "backends/mailboxes.rs"]
mod mailboxes;

#[path = "backends/groups.rs"]
mod groups;

#[path = "backends/leases.rs"]
mod leases;

#[path = "backends/handoffs.rs"]
mod handoffs;

#[path = "backends/watch.rs"]
mod watch;

#[path = "backends/filters.rs"]
mod filters;
#[path = "backends/retry.rs"]
mod retry;

/// What only the JetStream backend refuses, refused with a typed error.
#[test]
fn nats_refuses_what_it_cannot_do() {
    let Some(env) = Env::nats() else { return };
    let bus = env.bus("agent");
    let mb = bus.create_mailbox("main").unwrap();
    let g = mb.create_group("g").unwrap();
    mb.send(NewMessage::new("job")).unwrap();
    let claimed = g.claim_one("w").unwrap().unwrap();
    for err in [
        bus.doctor(false).map(drop).unwrap_err(),
        mb.compact(None).map(drop).unwrap_err(),
        g.ack_upto(5).map(drop).unwrap_err(),
        g.delivery(1, 1).map(drop).unwrap_err(),
        // Settling by seq needs the handle that claimed it.
        mb.group("g").unwrap().ack(1).map(drop).unwrap_err(),
        bus.lease("x")
            .process_bound(true)
            .try_acquire()
            .map(drop)
            .unwrap_err(),
    ] {
        assert!(
            matches!(
                err,
                Error::Unsupported {
                    backend: "nats",
                    ..
                }
            ),
            "{err}"
        );
    }
    // The claiming handle reports its live delivery, and can settle it by seq; acking
    // twice is fine.
    let live = g
        .in_flight(claimed.seq())
        .unwrap()
        .expect("held by this handle");
    assert_eq!((live.consumer.as_str(), live.attempt), ("w", 1));
    assert_eq!(live.deadline, claimed.deadline);
    assert!(mb
        .group("g")
        .unwrap()
        .in_flight(claimed.seq())
        .unwrap()
        .is_none());
    assert!(g.ack(claimed.seq()).unwrap());
    claimed.ack().unwrap();
    let err = Bus::open("nats://127.0.0.1:1").unwrap_err();
    assert!(matches!(err, Error::Nats { .. }), "{err}");
    let err = Bus::open("nats://127.0.0.1:4222/bad/ns").unwrap_err();
    assert!(matches!(err, Error::InvalidName { .. }), "{err}");
}

/// The CLI reaches the same JetStream bus with `--bus <url>`: what it sends, the
/// library reads, and the reverse.
#[test]
fn cli_uses_a_nats_bus_with_the_bus_option() {
    let Some(env) = Env::nats() else { return };
    let cli = || {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_agentbus"));
        cmd.arg("--bus").arg(&env.location);
        cmd.env_remove("AGENTBUS_DIR").env_remove("AGENTBUS_AGENT");
        cmd
    };
    common::ok(cli().arg("init").output().unwrap());
    common::ok(cli().args(["mailbox", "create", "main"]).output().unwrap());
    let receipt = common::ok(
        cli()
            .args(["send", "main", "--type", "draft.ready", "--from", "shell"])
            .args(["--body", "from the shell", "--idempotency-key", "k1"])
            .output()
            .unwrap(),
    );
    assert_eq!(receipt[0]["seq"], 1);
    let bus = env.bus("rust");
    let mb = bus.mailbox("main").unwrap();
    let m = mb.messages().next().unwrap().unwrap();
    assert_eq!(
        (m.from.as_str(), m.body.as_deref()),
        ("shell", Some("from the shell"))
    );
    mb.send(NewMessage::new("reply").body("from rust")).unwrap();
    let read = common::ok(cli().args(["recv", "main"]).output().unwrap());
    assert_eq!(read.len(), 2);
    assert_eq!(read[1]["body"], "from rust");
    let listed = common::ok(cli().args(["mailbox", "list"]).output().unwrap());
    assert!(
        listed.iter().any(|l| l.to_string().contains("main")),
        "{listed:?}"
    );
}

/// Opening a JetStream bus inside an async runtime, even one that fails to connect,
/// neither blocks the runtime nor panics.
#[test]
fn nats_bus_opens_and_fails_inside_an_async_runtime() {
    let Some(env) = Env::nats() else { return };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        assert!(matches!(
            Bus::open("nats://127.0.0.1:1"),
            Err(Error::Nats { .. })
        ));
        let bus = env.bus("async");
        bus.create_mailbox("main")
            .unwrap()
            .send(NewMessage::new("x"))
            .unwrap();
        drop(bus);
    });
}
