//! Type patterns (`draft.*`, `draft.>`) on both backends: in a group's stored filter
//! (library and `group create`), in `recv` and `watch` run as real processes, and the
//! refusal of entries that can match no type. The matcher's exact semantics are table-
//! and property-tested in `src/filter.rs`. Also coalescing where both backends differ:
//! a follower (`watch --coalesce`) coalesces on both, a group only on the directory
//! (`tests/coalesce.rs` has the rest).

use std::process::{Command, Stdio};
use std::time::Duration;

use agentbus::{Coalesce, CoalesceBy, Error, Filter, GroupOptions, NewMessage};

use crate::{common, Env};

/// The types every test here sends, in this order (seqs 1..=8).
const TYPES: [&str; 8] = [
    "draft",
    "draft.ready",
    "draft.ready.v2",
    "drafts.ready",
    "review.done",
    "draft.x.old",
    "task.done",
    "draft.",
];

/// The `agentbus` binary on `env`'s bus.
fn cli(env: &Env) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentbus"));
    cmd.arg("--bus").arg(&env.location);
    cmd.env_remove("AGENTBUS_DIR").env_remove("AGENTBUS_AGENT");
    cmd
}

/// The `type`s of JSON lines (messages, or deliveries).
fn kinds(lines: &[serde_json::Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["type"].as_str().unwrap().to_owned())
        .collect()
}

/// `agentbus watch main ARGS` started as a process (from seq 1, so that sends racing
/// its start are not missed); [`watched`] waits for its end.
fn watch(env: &Env, args: &[&str]) -> std::process::Child {
    cli(env)
        .args(["watch", "main", "--from-seq", "1", "--idle-timeout", "60"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

/// The JSON lines a [`watch`] printed, once it exited successfully.
fn watched(watch: std::process::Child) -> Vec<serde_json::Value> {
    let out = watch.wait_with_output().unwrap();
    assert!(out.status.success(), "{:?}", out.status);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Sends [`TYPES`] from a separate `agentbus send` process each.
fn send_types(env: &Env) {
    for kind in TYPES {
        common::ok(
            cli(env)
                .args(["send", "main", "--type", kind, "--from", "shell"])
                .output()
                .unwrap(),
        );
    }
}

behaviours! {
    /// A group's pattern filter is stored with the group: a handle opened afresh (as
    /// another process would) delivers exactly the documented types, and the group
    /// made by `group create --type/--not-type` delivers the same to `recv --group`.
    fn a_group_with_a_type_pattern_delivers_exactly_the_matching_types(env: &Env) {
        let bus = env.bus("writer");
        let mb = bus.create_mailbox("main").unwrap();
        let filter = Filter::new().of_type("draft.>").not_type("*.*.old");
        mb.create_group_with("drafts", GroupOptions::new().filter(filter.clone()))
            .unwrap();
        mb.create_group_with("one-level", GroupOptions::new().filter(Filter::new().of_type("*.done")))
            .unwrap();
        common::ok(
            cli(env)
                .args(["group", "create", "main", "by-cli", "--type", "draft.>"])
                .args(["--not-type", "*.*.old"])
                .output()
                .unwrap(),
        );
        send_types(env);

        let drafts = env.group("reader", "main", "drafts");
        assert_eq!(drafts.filter(), &filter);
        let got: Vec<_> = drafts.claim("w", 20).unwrap();
        let got: Vec<&str> = got.iter().map(|d| d.message.kind.as_str()).collect();
        // Not `draft` (`>` needs a token), not `drafts.ready`, not the excluded
        // `draft.x.old`; `draft.` has one (empty) token after the prefix.
        assert_eq!(got, ["draft.ready", "draft.ready.v2", "draft."]);
        let done = env.group("reader", "main", "one-level").claim("w", 20).unwrap();
        let done: Vec<&str> = done.iter().map(|d| d.message.kind.as_str()).collect();
        assert_eq!(done, ["review.done", "task.done"]);

        let by_cli = common::ok(
            cli(env)
                .args(["recv", "main", "--group", "by-cli", "--max", "20"])
                .output()
                .unwrap(),
        );
        assert_eq!(kinds(&by_cli), ["draft.ready", "draft.ready.v2", "draft."]);
        assert_eq!(env.group("reader", "main", "by-cli").filter(), &filter);
        // The directory counts what the filter passed over; JetStream does not (README).
        let skipped = env.group("reader", "main", "drafts").stats().unwrap().skipped;
        assert_eq!(skipped, if env.is_nats() { 0 } else { 5 });
    }

    /// `recv --type 'draft.*'` and `--not-type`, and `watch --type 'draft.>'` woken by
    /// sends of other processes, each run as a real process.
    fn recv_and_watch_take_type_patterns(env: &Env) {
        env.bus("writer").create_mailbox("main").unwrap();
        let watching = watch(env, &["--type", "draft.>", "--not-type", "draft.x.>", "--max", "3"]);
        std::thread::sleep(Duration::from_millis(200));
        send_types(env);

        let recv = |filter: &[&str]| {
            let out = cli(env).args(["recv", "main"]).args(filter).output().unwrap();
            kinds(&common::ok(out))
        };
        assert_eq!(recv(&["--type", "draft.*"]), ["draft.ready", "draft."]);
        assert_eq!(
            recv(&["--not-type", "draft.>", "--not-type", "*.done"]),
            ["draft", "drafts.ready"]
        );
        assert_eq!(
            recv(&["--type", "*.done", "--type", "draft"]),
            ["draft", "review.done", "task.done"]
        );

        let lines = watched(watching);
        assert_eq!(kinds(&lines), ["draft.ready", "draft.ready.v2", "draft."]);
    }

    /// An entry that can match no type is refused, naming it, by groups (nothing is
    /// created) and by every CLI flag; a reader given one just matches nothing.
    fn an_entry_that_can_match_no_type_is_refused(env: &Env) {
        let bus = env.bus("writer");
        let mb = bus.create_mailbox("main").unwrap();
        mb.send(NewMessage::new("draft.ready")).unwrap();
        for bad in ["draft*", "a.>.b", ".*", ""] {
            let opts = GroupOptions::new().filter(Filter::new().not_type(bad));
            let err = mb.create_group_with("g", opts).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidName { kind: "type filter", name, .. } if name == bad),
                "{bad}: {err}"
            );
        }
        assert!(mb.groups().unwrap().is_empty());
        for args in [
            &["recv", "main", "--type", "draft*"][..],
            &["recv", "main", "--not-type", "draft.>.v2"],
            &["watch", "main", "--type", "*draft", "--max", "1"],
            &["group", "create", "main", "g", "--type", "draft.>x"],
        ] {
            let err = common::fails(cli(env).args(args).output().unwrap(), 2);
            assert_eq!(err["error"], "invalid_name", "{args:?}: {err}");
            assert!(err["message"].as_str().unwrap().contains("type filter"), "{err}");
        }
        assert!(mb.groups().unwrap().is_empty());
        assert_eq!(mb.messages().of_type("draft*").count(), 0);
    }

    /// `watch --coalesce type` (a follower, in memory) prints the first message of
    /// each burst on both backends; a coalescing group is the directory's alone and
    /// JetStream refuses it by name, creating nothing.
    fn followers_coalesce_on_both_backends_groups_on_the_directory(env: &Env) {
        let bus = env.bus("writer");
        let mb = bus.create_mailbox("main").unwrap();
        let watching = watch(env, &["--coalesce", "header:host", "--window", "120", "--max", "2"]);
        for host in ["web-1", "web-1", "web-1", "web-2", "web-1"] {
            let header = format!("host={host}");
            common::ok(
                cli(env)
                    .args(["send", "main", "--type", "alert", "--header", &header])
                    .output()
                    .unwrap(),
            );
        }
        let seqs: Vec<u64> = watched(watching).iter().map(|l| l["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, [1, 4]);

        let cooldown = Coalesce::new(CoalesceBy::Type, Duration::from_secs(60));
        let created = mb.create_group_with("pager", GroupOptions::new().coalesce(cooldown));
        if env.is_nats() {
            crate::assert_unsupported(created);
            assert!(mb.groups().unwrap().is_empty());
            let err = common::fails(
                cli(env)
                    .args(["group", "create", "main", "pager", "--coalesce", "type"])
                    .args(["--window", "5"])
                    .output()
                    .unwrap(),
                1,
            );
            assert_eq!(err["error"], "unsupported", "{err}");
        } else {
            let pager = created.unwrap();
            assert_eq!(common::seqs(&pager.claim("p", 10).unwrap()), [1]);
            assert_eq!(pager.stats().unwrap().coalesced, 4);
        }
    }
}
