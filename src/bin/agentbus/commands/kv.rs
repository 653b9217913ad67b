use std::io::Write;

use agentbus::{Kv, KvEntry};
use clap::Subcommand;
use serde_json::{json, Value};

use super::{open_bus, open_writer, Durable};
use crate::lines::KvLine;
use crate::output::{emit, Failure};
use crate::Cli;

/// Agent state: key-value buckets with revisions and compare-and-set. Entries print as
/// {"bucket","key","revision","value","deleted","created_at","updated_at"}.
#[derive(Subcommand, Debug)]
pub enum KvCommand {
    /// Create a bucket (names follow the mailbox rule); prints {"bucket","created"}.
    Create {
        /// The bucket.
        bucket: String,
        /// Revisions kept per key when the bucket is compacted.
        #[arg(long, default_value_t = agentbus::DEFAULT_KV_HISTORY)]
        history: u32,
        #[command(flatten)]
        durable: Durable,
    },
    /// Set a key to a JSON value; prints the revision written. With
    /// `--expect-revision N`, only if its current value is at revision N (0: only if
    /// it is absent): exit 7 otherwise, with the current revision and value.
    Put {
        /// The bucket.
        bucket: String,
        /// The key: tokens of letters, digits, '_' and '-', separated by '/' or '.'.
        key: String,
        /// The value, as JSON (a string needs its quotes: '"done"').
        value: String,
        /// Compare-and-set: the revision the current value must have (0: absent).
        #[arg(long)]
        expect_revision: Option<u64>,
        #[command(flatten)]
        durable: Durable,
    },
    /// Print a key's current value (null revision and value if it has none).
    Get {
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
    },
    /// Delete a key: a tombstone with its own revision, kept in its history.
    Del {
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
        #[command(flatten)]
        durable: Durable,
    },
    /// List the keys with a value, one {"bucket","key"} per line, sorted.
    Keys {
        /// The bucket.
        bucket: String,
        /// Only keys starting with this (such as `phase1/`).
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Print every stored revision of a key, oldest first, deletions included.
    History {
        /// The bucket.
        bucket: String,
        /// The key.
        key: String,
    },
}

pub fn run(cli: &Cli, cmd: &KvCommand, out: &mut impl Write) -> Result<(), Failure> {
    match cmd {
        KvCommand::Create {
            bucket,
            history,
            durable,
        } => {
            open_writer(cli, durable)?.create_kv_with_history(bucket, *history)?;
            emit(out, &json!({"bucket": bucket, "created": true}))
        }
        KvCommand::Put {
            bucket,
            key,
            value,
            expect_revision,
            durable,
        } => {
            let value: Value = serde_json::from_str(value).map_err(|e| {
                Failure::Usage(format!(
                    "VALUE must be JSON ({e}); quote a string as '\"text\"'"
                ))
            })?;
            let kv = open_writer(cli, durable)?.kv(bucket)?;
            let revision = match expect_revision {
                None => kv.put(key, value)?,
                Some(0) => kv.create(key, value)?,
                Some(n) => kv.update(key, value, *n)?,
            };
            emit_revision(out, &kv, key, Some(revision))
        }
        KvCommand::Get { bucket, key } => {
            let entry = open_bus(cli)?.kv(bucket)?.get(key)?;
            emit(out, &KvLine::new(bucket, key, entry.as_ref()))
        }
        KvCommand::Del {
            bucket,
            key,
            durable,
        } => {
            let kv = open_writer(cli, durable)?.kv(bucket)?;
            let revision = kv.delete(key)?;
            emit_revision(out, &kv, key, revision)
        }
        KvCommand::Keys { bucket, prefix } => {
            for key in open_bus(cli)?.kv(bucket)?.keys(prefix)? {
                emit(out, &json!({"bucket": bucket, "key": key}))?;
            }
            Ok(())
        }
        KvCommand::History { bucket, key } => {
            for entry in open_bus(cli)?.kv(bucket)?.history(key)? {
                emit(out, &KvLine::new(bucket, key, Some(&entry)))?;
            }
            Ok(())
        }
    }
}

/// Prints the entry just written at `revision`, as stored (`None`: nothing written).
fn emit_revision(
    out: &mut impl Write,
    kv: &Kv,
    key: &str,
    revision: Option<u64>,
) -> Result<(), Failure> {
    let history: Vec<KvEntry> = match revision {
        Some(_) => kv.history(key)?,
        None => Vec::new(),
    };
    let entry = history.iter().find(|e| Some(e.revision) == revision);
    // Not found only if it was overwritten and compacted away already: its revision
    // is still what was written.
    emit(
        out,
        &KvLine::new(kv.bucket(), key, entry).revision(revision),
    )
}
