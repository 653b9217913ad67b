//! Agent state: key-value buckets with revisions, compare-and-set, tombstones and
//! history, on the directory backend, with real processes where it matters.

mod common;

use std::path::Path;
use std::time::Instant;

use agentbus::{Error, Kv};
use common::{child, child_bus, child_env, cli, fails, flush_bus, ok, open_flush_bus};
use serde_json::{json, Value};

/// A new bus at `dir` with bucket `state`.
fn state(dir: &Path) -> Kv {
    flush_bus(dir).create_kv("state").unwrap()
}

/// Adds one to the counter at `key` with a compare-and-set, retrying from the value a
/// conflict reports until it wins: how many conflicts it met.
fn increment(kv: &Kv, key: &str) -> u64 {
    let mut current = kv.get(key).unwrap().map(|e| (e.revision, e.value));
    let mut conflicts = 0;
    loop {
        let written = match &current {
            None => kv.create(key, json!(1)),
            Some((rev, v)) => kv.update(key, json!(v.as_u64().unwrap() + 1), *rev),
        };
        match written {
            Ok(_) => return conflicts,
            Err(Error::KvConflict {
                current_revision,
                current_value,
                ..
            }) => {
                conflicts += 1;
                current = current_revision.zip(current_value);
            }
            Err(e) => panic!("increment: {e}"),
        }
    }
}

#[test]
#[ignore = "run by cas_from_8_processes_loses_no_update"]
fn cas_child() {
    let Some(bus) = child_bus() else { return };
    let n: u64 = child_env("N").unwrap().parse().unwrap();
    let kv = bus.kv("state").unwrap();
    let conflicts: u64 = (0..n).map(|_| increment(&kv, "counter")).sum();
    println!("{conflicts}");
}

#[test]
fn cas_from_8_processes_loses_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let kv = state(dir.path());
    let per_process: u64 = common::env_number("AGENTBUS_KV_CAS_N").unwrap_or(1000);
    let started = Instant::now();
    let children: Vec<_> = (0..8)
        .map(|_| {
            child("cas_child")
                .env("BUS", dir.path())
                .env("N", per_process.to_string())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let lines = common::lines_of(children, "cas_child");
    let conflicts: u64 = lines
        .iter()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .sum();
    let entry = kv.get("counter").unwrap().unwrap();
    assert_eq!(entry.value, json!(8 * per_process), "lost updates");
    // One revision per successful write: none wasted, none reused.
    assert_eq!(entry.revision, 8 * per_process);
    eprintln!(
        "8 processes x {per_process} increments in {:?}, {conflicts} conflicts retried",
        started.elapsed()
    );
    let history = kv.history("counter").unwrap();
    // The writers compacted the log as it grew: far fewer revisions than writes.
    assert!(history.len() < 400, "{} revisions kept", history.len());
    assert!(history.windows(2).all(|w| w[0].revision < w[1].revision));
}

#[test]
fn revisions_strictly_increase_across_keys_reopen_and_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let kv = flush_bus(dir.path())
        .create_kv_with_history("state", 2)
        .unwrap();
    let mut last = 0;
    for i in 0..5 {
        for key in ["a", "b/c"] {
            let rev = kv.put(key, json!(i)).unwrap();
            assert!(rev > last, "{rev} after {last}");
            last = rev;
        }
    }
    let tomb = kv.delete("b/c").unwrap().unwrap();
    assert!(tomb > last);
    last = tomb;
    assert_eq!(
        kv.compact().unwrap(),
        11 - 4,
        "2 of a's 5, 2 of b/c's 6 kept"
    );
    assert_eq!(kv.history("a").unwrap().len(), 2);
    drop(kv);

    let kv = open_flush_bus(dir.path()).kv("state").unwrap();
    assert_eq!(kv.history_depth(), 2);
    // b/c's tombstone is the latest record: the next revision follows it, even after
    // the compaction removed most of the log.
    let rev = kv.put("a", json!("again")).unwrap();
    assert_eq!(rev, last + 1);
    assert_eq!(kv.get("a").unwrap().unwrap().revision, rev);
}

#[test]
fn delete_leaves_a_tombstone_in_history_and_get_returns_none() {
    let dir = tempfile::tempdir().unwrap();
    let kv = state(dir.path());
    let r1 = kv.put("phase1/output", json!({"pages": 3})).unwrap();
    let r2 = kv.put("phase1/output", json!({"pages": 4})).unwrap();
    let r3 = kv.delete("phase1/output").unwrap().unwrap();
    assert!(kv.get("phase1/output").unwrap().is_none());
    assert_eq!(
        kv.delete("phase1/output").unwrap(),
        None,
        "nothing to delete"
    );
    assert_eq!(kv.delete("never").unwrap(), None);
    let history = kv.history("phase1/output").unwrap();
    let revs: Vec<(u64, bool, Value)> = history
        .iter()
        .map(|e| (e.revision, e.deleted, e.value.clone()))
        .collect();
    assert_eq!(
        revs,
        vec![
            (r1, false, json!({"pages": 3})),
            (r2, false, json!({"pages": 4})),
            (r3, true, Value::Null),
        ]
    );
    assert_eq!(history[0].created_at, history[1].created_at);
    assert!(kv.keys("").unwrap().is_empty());
    // A deleted key can be created again; its life starts over.
    let r4 = kv.create("phase1/output", json!(null)).unwrap();
    let entry = kv.get("phase1/output").unwrap().unwrap();
    assert_eq!(
        (entry.revision, entry.value, entry.deleted),
        (r4, Value::Null, false)
    );
    assert!(entry.created_at >= history[2].updated_at);
}

#[test]
fn a_conflict_carries_the_current_revision_and_value_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let kv = state(dir.path());
    let r1 = kv.create("plan", json!("draft")).unwrap();
    let err = kv.create("plan", json!("other")).unwrap_err();
    assert_eq!(err.code(), "kv_conflict");
    match err {
        Error::KvConflict {
            bucket,
            key,
            expected_revision,
            current_revision,
            current_value,
        } => {
            assert_eq!((bucket.as_str(), key.as_str()), ("state", "plan"));
            assert_eq!(expected_revision, None);
            assert_eq!(current_revision, Some(r1));
            assert_eq!(current_value, Some(json!("draft")));
        }
        other => panic!("{other:?}"),
    }
    let r2 = kv.update("plan", json!("final"), r1).unwrap();
    let err = kv.update("plan", json!("stale"), r1).unwrap_err();
    assert!(
        err.to_string().contains(&format!("at revision {r2}")),
        "{err}"
    );
    assert!(
        matches!(&err, Error::KvConflict { expected_revision: Some(e), current_revision: Some(c), current_value: Some(v), .. }
            if *e == r1 && *c == r2 && *v == json!("final")),
        "{err:?}"
    );
    // An update of an absent key conflicts with "absent".
    let err = kv.update("nothing", json!(1), 1).unwrap_err();
    assert!(matches!(
        err,
        Error::KvConflict {
            current_revision: None,
            current_value: None,
            ..
        }
    ));
    assert_eq!(
        kv.history("plan").unwrap().len(),
        2,
        "the losers wrote nothing"
    );
    assert_eq!(kv.get("plan").unwrap().unwrap().value, json!("final"));
}

#[test]
fn keys_and_bucket_names_are_validated_and_prefixes_list_namespaces() {
    let dir = tempfile::tempdir().unwrap();
    let bus = flush_bus(dir.path());
    for bad in [
        "", "a//b", "/a", "a/", "a..b", ".a", "a b", "ü", "a/../b", "a\nb",
    ] {
        let err = agentbus::validate_kv_key(bad).unwrap_err();
        assert_eq!(err.code(), "invalid_name", "{bad:?}");
    }
    assert!(agentbus::validate_kv_key(&"k".repeat(agentbus::MAX_KV_KEY_LEN)).is_ok());
    assert!(agentbus::validate_kv_key(&"k".repeat(agentbus::MAX_KV_KEY_LEN + 1)).is_err());
    for bad in ["../x", "a/b", ".hidden", ""] {
        assert_eq!(
            bus.create_kv(bad).unwrap_err().code(),
            "invalid_name",
            "{bad:?}"
        );
    }
    let err = bus.kv("nope").unwrap_err();
    assert!(matches!(&err, Error::BucketNotFound { existing, .. } if existing.is_empty()));
    let kv = bus.create_kv("state").unwrap();
    assert_eq!(bus.create_kv("state").unwrap_err().code(), "bucket_exists");
    assert_eq!(bus.create_or_open_kv("state").unwrap().bucket(), "state");
    assert_eq!(bus.kv_buckets().unwrap(), ["state"]);
    assert_eq!(kv.put("a b", json!(1)).unwrap_err().code(), "invalid_name");
    assert_eq!(kv.get("a//b").unwrap_err().code(), "invalid_name");

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Memory {
        facts: Vec<String>,
    }
    let memory = Memory {
        facts: vec!["the sky is blue".into()],
    };
    kv.put_json("agents/alice/memory", &memory).unwrap();
    kv.put("agents/alice/notes", json!("n")).unwrap();
    kv.put("agents/bob/memory", json!({"facts": []})).unwrap();
    kv.put("shared.plan", json!(1)).unwrap();
    let got = kv.get("agents/alice/memory").unwrap().unwrap();
    assert_eq!(got.value_as::<Memory>().unwrap(), memory);
    assert_eq!(got.value_as::<u64>().unwrap_err().code(), "invalid_message");
    assert_eq!(
        kv.keys("agents/alice/").unwrap(),
        ["agents/alice/memory", "agents/alice/notes"]
    );
    assert_eq!(kv.keys("").unwrap().len(), 4);
    assert_eq!(kv.keys("shared.").unwrap(), ["shared.plan"]);
}

#[test]
fn a_torn_tail_is_cut_and_earlier_puts_stay_readable() {
    let dir = tempfile::tempdir().unwrap();
    let kv = state(dir.path());
    kv.put("a", json!(1)).unwrap();
    let r2 = kv.put("b", json!({"long": "x".repeat(100)})).unwrap();
    let log = dir.path().join("kv/state/log.jsonl");
    let bytes = std::fs::read(&log).unwrap();
    // Cut the last record in the middle of its line, as a crash mid-write would.
    let cut = bytes.len() - 40;
    std::fs::write(&log, &bytes[..cut]).unwrap();

    let kv = open_flush_bus(dir.path()).kv("state").unwrap();
    assert_eq!(kv.get("a").unwrap().unwrap().value, json!(1));
    assert!(
        kv.get("b").unwrap().is_none(),
        "the torn record is not a record"
    );
    assert_eq!(
        std::fs::read(&log).unwrap().len(),
        cut,
        "a reader cuts nothing"
    );
    // The next writer cuts the torn tail under the lock and appends after it; the
    // torn revision was never acknowledged, so it is given out again.
    let r = kv.put("c", json!(3)).unwrap();
    assert_eq!(r, r2);
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(text.lines().count(), 2, "{text}");
    assert!(text.ends_with('\n'));
    assert_eq!(kv.get("a").unwrap().unwrap().value, json!(1));
    assert_eq!(kv.get("c").unwrap().unwrap().value, json!(3));
    assert_eq!(kv.keys("").unwrap(), ["a", "c"]);
}

#[test]
fn a_damaged_record_is_reported_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let kv = state(dir.path());
    kv.put("a", json!("hello")).unwrap();
    kv.put("b", json!(2)).unwrap();
    let log = dir.path().join("kv/state/log.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    std::fs::write(&log, text.replacen("hello", "jello", 1)).unwrap();
    match kv.get("b").unwrap_err() {
        Error::Corrupt { line, reason, .. } => {
            assert_eq!(line, 1);
            assert!(reason.contains("checksum"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(kv.put("c", json!(3)).unwrap_err().code(), "corrupt");
}

/// `agentbus --dir DIR ARGS...`.
fn run(dir: &Path, args: &[&str]) -> std::process::Output {
    cli(dir).args(args).output().unwrap()
}

#[test]
fn the_cli_round_trips_and_exits_7_on_a_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(run(d, &["init"]));
    assert_eq!(
        ok(run(d, &["kv", "create", "state"])),
        [json!({"bucket": "state", "created": true})]
    );
    let shape = [
        "bucket",
        "key",
        "revision",
        "value",
        "deleted",
        "created_at",
        "updated_at",
    ];
    let put = ok(run(d, &["kv", "put", "state", "phase1/out", r#"{"n":1}"#]));
    let line = put[0].as_object().unwrap();
    assert_eq!(line.keys().collect::<Vec<_>>().len(), shape.len());
    for k in shape {
        assert!(line.contains_key(k), "{k} in {line:?}");
    }
    assert_eq!(put[0]["revision"], 1);
    assert_eq!(put[0]["value"], json!({"n": 1}));
    let got = ok(run(d, &["kv", "get", "state", "phase1/out"]));
    assert_eq!(got, put, "put prints the entry as get does");

    let cas = ok(run(
        d,
        &[
            "kv",
            "put",
            "state",
            "phase1/out",
            "2",
            "--expect-revision",
            "1",
        ],
    ));
    assert_eq!(cas[0]["revision"], 2);
    let conflict = fails(
        run(
            d,
            &[
                "kv",
                "put",
                "state",
                "phase1/out",
                "3",
                "--expect-revision",
                "1",
            ],
        ),
        7,
    );
    assert_eq!(conflict["error"], "kv_conflict");
    assert_eq!(conflict["current_revision"], 2);
    assert_eq!(conflict["current_value"], 2);
    assert_eq!(conflict["expected_revision"], 1);
    // --expect-revision 0: only if absent.
    let taken = fails(
        run(
            d,
            &[
                "kv",
                "put",
                "state",
                "phase1/out",
                "4",
                "--expect-revision",
                "0",
            ],
        ),
        7,
    );
    assert_eq!(taken["expected_revision"], Value::Null);
    ok(run(d, &["kv", "put", "state", "other", r#""s""#]));
    let keys = ok(run(d, &["kv", "keys", "state", "--prefix", "phase1/"]));
    assert_eq!(keys, [json!({"bucket": "state", "key": "phase1/out"})]);

    let del = ok(run(d, &["kv", "del", "state", "phase1/out"]));
    assert_eq!(
        (del[0]["revision"].clone(), del[0]["deleted"].clone()),
        (json!(4), json!(true))
    );
    let gone = ok(run(d, &["kv", "get", "state", "phase1/out"]));
    assert_eq!(gone[0]["revision"], Value::Null);
    assert_eq!(gone[0]["value"], Value::Null);
    let history = ok(run(d, &["kv", "history", "state", "phase1/out"]));
    let revs: Vec<_> = history
        .iter()
        .map(|e| e["revision"].as_u64().unwrap())
        .collect();
    assert_eq!(revs, [1, 2, 4]);
    assert!(history
        .iter()
        .all(|e| e["updated_at"].as_str().unwrap().ends_with('Z')));

    assert_eq!(
        fails(run(d, &["kv", "put", "state", "k", "not json"]), 2)["error"],
        "usage"
    );
    assert_eq!(
        fails(run(d, &["kv", "get", "nope", "k"]), 2)["error"],
        "bucket_not_found"
    );
    assert_eq!(
        fails(run(d, &["kv", "get", "state", "a//b"]), 2)["error"],
        "invalid_name"
    );
    assert_eq!(
        fails(run(d, &["kv", "create", "state"]), 2)["error"],
        "bucket_exists"
    );
}
