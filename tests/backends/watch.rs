//! `agentbus watch --group --exec` on both backends, as real processes: one JSON line
//! per outcome whatever the handler prints, exit codes mapped to ack / retry / dead
//! letter, and a claim kept alive while a slow handler runs, so two watchers never run
//! one message at once.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use agentbus::{GroupOptions, NewMessage};
use serde_json::Value;

use crate::{common, Env};

/// How long any one `watch` run may take before it counts as hung.
const HUNG: Duration = Duration::from_secs(90);

/// `agentbus --bus <the env's bus> watch`.
fn watch(env: &Env) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_agentbus"));
    cmd.arg("--bus").arg(&env.location).arg("watch");
    cmd.env_remove("AGENTBUS_DIR").env_remove("AGENTBUS_AGENT");
    cmd
}

behaviours! {
    /// Exit 0 acks, 75 retries later (after `--retry-delay`), 65 dead-letters at once,
    /// anything else retries until the group's deliveries run out; each outcome is one
    /// JSON line on stdout, and what the handler prints (even JSON) is on stderr.
    fn watch_exec_maps_exit_codes_to_outcomes_on_a_clean_stream(env: &Env) {
        let bus = env.bus("writer");
        let jobs = bus.create_mailbox("jobs").unwrap();
        jobs.create_group_with("g", GroupOptions::new().max_deliveries(2)).unwrap();
        for code in ["0", "75", "65", "3"] {
            jobs.send(NewMessage::new("job").body(code)).unwrap();
        }
        // The handler exits with its body's code, after printing lines that would break
        // (or fake) the JSON stream if they reached it.
        let handler = r#"code=$(cat | sed 's/.*"body":"\([0-9]*\)".*/\1/')
            echo '{"outcome":"acked","seq":999}'; printf 'no newline'
            echo "to stderr $AGENTBUS_SEQ" >&2; exit "$code""#;
        let mut cmd = watch(env);
        cmd.args(["jobs", "--group", "g", "--max", "6", "--idle-timeout", "5"])
            .args(["--retry-delay", "0.2", "--exec", handler]);
        let out = common::output_within("watch --exec", cmd, HUNG);
        let mut by_seq: HashMap<u64, Vec<Value>> = HashMap::new();
        for line in out.lines() {
            assert!(line["outcome"].is_string(), "only outcome lines: {line}");
            by_seq.entry(line["seq"].as_u64().unwrap()).or_default().push(line);
        }
        let outcomes = |seq: u64| -> Vec<(u64, String)> {
            by_seq[&seq]
                .iter()
                .map(|l| (l["attempt"].as_u64().unwrap(), l["outcome"].as_str().unwrap().to_owned()))
                .collect()
        };
        let s = |o: &str| o.to_owned();
        assert_eq!(outcomes(1), [(1, s("acked"))], "stderr: {}", out.stderr);
        assert_eq!(outcomes(2), [(1, s("retried")), (2, s("dead_lettered"))]);
        assert_eq!(outcomes(3), [(1, s("dead_lettered"))]);
        assert_eq!(outcomes(4), [(1, s("retried")), (2, s("dead_lettered"))]);
        let retried = &by_seq[&2][0];
        assert_eq!(retried["delay_ms"], 200, "{retried}");
        assert!(retried["reason"].as_str().unwrap().contains("retry later (exit 75)"), "{retried}");
        let refused = &by_seq[&3][0];
        assert_eq!((refused["exit"].as_i64(), refused["dead_letter"].as_str()), (Some(65), Some("jobs.dlq")));
        assert!(refused["reason"].as_str().unwrap().starts_with("rejected by the consumer"), "{refused}");
        let exhausted = &by_seq[&4][1];
        assert!(
            exhausted["reason"].as_str().unwrap().starts_with("max deliveries (2) reached: handler exited with 3: to stderr 4"),
            "{exhausted}"
        );
        // The handler's own output went to stderr, whole.
        assert_eq!(out.stderr.matches(r#"{"outcome":"acked","seq":999}"#).count(), 6, "{}", out.stderr);
        assert!(out.stderr.contains("no newline"), "{}", out.stderr);

        // The dead-letter mailbox holds the three, with their reasons.
        let mut dead: Vec<(u64, String)> = bus
            .mailbox("jobs.dlq")
            .unwrap()
            .messages()
            .map(|m| {
                let info = m.unwrap().dead_letter().expect("a dead letter");
                (info.seq.unwrap(), info.reason)
            })
            .collect();
        dead.sort();
        let seqs: Vec<u64> = dead.iter().map(|d| d.0).collect();
        assert_eq!(seqs, [2, 3, 4], "{dead:?}");
        assert!(dead[1].1.starts_with("rejected by the consumer: handler refused the message (exit 65)"), "{dead:?}");
        let st = jobs.group("g").unwrap().stats().unwrap();
        assert_eq!((st.pending, st.in_flight), (0, 0), "{st:?}");
    }

    /// A handler slower than the visibility timeout keeps its claim (watch extends it
    /// every third of it), so a second watcher of the group never runs the same
    /// message while the first still does, and each message runs once.
    fn a_slow_handler_is_never_run_twice_at_once_by_two_watchers(env: &Env) {
        let bus = env.bus("writer");
        let jobs = bus.create_mailbox("jobs").unwrap();
        jobs.create_group_with("g", GroupOptions::new().visibility(Duration::from_secs(3)))
            .unwrap();
        for i in 0..3 {
            jobs.send(NewMessage::new("job").body(i.to_string())).unwrap();
        }
        let log = env.scratch.path().join("runs");
        let handler = format!(
            "cat >/dev/null; echo \"start $AGENTBUS_SEQ $AGENTBUS_ATTEMPT\" >> {l}; sleep 5; \
             echo \"end $AGENTBUS_SEQ\" >> {l}",
            l = log.display()
        );
        let watchers: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|name| {
                let mut cmd = watch(env);
                cmd.args(["jobs", "--group", "g", "--consumer", name, "--idle-timeout", "4"])
                    .args(["--exec", &handler]);
                std::thread::spawn(move || common::output_within("a slow watcher", cmd, HUNG))
            })
            .collect();
        let outs: Vec<_> = watchers.into_iter().map(|w| w.join().unwrap()).collect();
        let runs = std::fs::read_to_string(&log).unwrap();
        let mut starts: Vec<&str> = runs.lines().filter(|l| l.starts_with("start")).collect();
        starts.sort();
        assert_eq!(starts, ["start 1 1", "start 2 1", "start 3 1"], "{runs}");
        let mut acked: Vec<u64> = outs
            .iter()
            .flat_map(|o| o.lines())
            .map(|l| {
                assert_eq!(l["outcome"], "acked", "{l}");
                l["seq"].as_u64().unwrap()
            })
            .collect();
        acked.sort();
        assert_eq!(acked, [1, 2, 3]);
        for o in &outs {
            assert!(o.status.success(), "{}", o.stderr);
            assert!(!o.stderr.contains("could not extend"), "{}", o.stderr);
        }
    }
}
