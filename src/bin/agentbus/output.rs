//! What the CLI prints: JSON, one object per line, on stdout. Errors are one JSON object
//! on stderr, `{"error": "<stable code>", "message": "..."}`, and a non-zero exit:
//!
//! | exit | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | the operation failed (I/O error, damaged data); see the error object |
//! | 2 | the request was invalid (usage, bad name, bad JSON, unknown mailbox); nothing was written |
//! | 3 | `lease acquire`: the lease is held by someone else |
//! | 4 | `doctor` found problems it did not repair |
//! | 5 | a stale delivery (`nack`, `extend`, `term`) or lease grant (`lease renew`, `release`) |
//! | 6 | an artifact is missing, is not a regular file, or differs in size or SHA-256 (`send`, `handoff`) |
//! | 7 | `kv put --expect-revision` or `kv create`: a compare-and-set conflict; the error carries the current revision and value |

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use agentbus::Error;
use serde_json::{json, Value};

/// A CLI failure: a crate error, or a usage problem found by the CLI itself.
pub enum Failure {
    Bus(Error),
    Usage(String),
    Unclean,
    /// Already reported on stderr; exit 1.
    Reported,
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Bus(e)
    }
}

/// Prints `failure` on stderr as JSON and returns its exit code (see the table above).
pub fn report(failure: Failure) -> ExitCode {
    let (value, code) = match failure {
        Failure::Usage(message) => (json!({"error": "usage", "message": message}), 2),
        Failure::Unclean => (
            json!({"error": "unclean", "message": "doctor found problems it did not repair"}),
            4,
        ),
        Failure::Reported => return ExitCode::FAILURE,
        Failure::Bus(e) => {
            let v = error_json(&e);
            let code = match e {
                Error::LeaseHeld { .. } => 3,
                Error::ArtifactMissing { .. }
                | Error::ArtifactNotAFile { .. }
                | Error::ArtifactSizeMismatch { .. }
                | Error::ArtifactDigestMismatch { .. } => 6,
                Error::StaleDelivery { .. } | Error::StaleLease { .. } => 5,
                Error::KvConflict { .. } => 7,
                _ if e.is_invalid_input() => 2,
                _ => 1,
            };
            (v, code)
        }
    };
    eprintln!("{value}");
    ExitCode::from(code)
}

/// A crate error as the CLI prints it: its stable code, message, and the fields that
/// say more (path, existing names, line, holder and token).
pub fn error_json(e: &Error) -> Value {
    let mut v = json!({"error": e.code(), "message": e.to_string()});
    if let Some(path) = e.path() {
        v["path"] = path_json(path);
    }
    match e {
        Error::MailboxNotFound { existing, .. }
        | Error::GroupNotFound { existing, .. }
        | Error::BucketNotFound { existing, .. } => v["existing"] = json!(existing),
        Error::KvConflict {
            bucket,
            key,
            expected_revision,
            current_revision,
            current_value,
        } => {
            v["bucket"] = json!(bucket);
            v["key"] = json!(key);
            v["expected_revision"] = json!(expected_revision);
            v["current_revision"] = json!(current_revision);
            v["current_value"] = json!(current_value);
        }
        Error::Corrupt { line, .. } => v["line"] = json!(line),
        Error::Compacted {
            missed_from,
            first_available,
            ..
        } => {
            v["missed_from"] = json!(missed_from);
            v["first_available"] = json!(first_available);
        }
        Error::ArtifactNotAFile { kind, .. } => v["kind"] = json!(kind),
        Error::InvalidSetting { setting, .. } => v["setting"] = json!(setting),
        Error::BatchIncomplete { committed, .. } => v["committed"] = json!(committed),
        Error::LeaseHeld {
            holder,
            token,
            expires_at,
            ..
        } => {
            v["holder"] = json!(holder);
            v["token"] = json!(token);
            v["expires_at"] = json!(rfc3339(*expires_at));
        }
        Error::StaleLease { holder, token, .. } => {
            v["holder"] = json!(holder);
            v["token"] = json!(token);
        }
        _ => {}
    }
    v
}

/// A path as the CLI prints it: JSON text holds only UTF-8, so bytes that are not are
/// shown as U+FFFD (the path itself is used as given).
pub fn path_json(path: &Path) -> Value {
    Value::String(path.to_string_lossy().into_owned())
}

/// Writes `value` as one line of JSON. Print paths with [`path_json`]: serializing a
/// `Path` that is not UTF-8 fails, and that failure is reported, not a panic.
pub fn emit(out: &mut impl Write, value: &impl serde::Serialize) -> Result<(), Failure> {
    let mut line = serde_json::to_vec(value).map_err(|e| {
        Failure::Bus(Error::Io {
            op: "print as JSON",
            path: "<stdout>".into(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })
    })?;
    line.push(b'\n');
    out.write_all(&line).map_err(|e| {
        Failure::Bus(Error::Io {
            op: "write",
            path: "<stdout>".into(),
            source: e,
        })
    })
}

/// A time as the CLI prints it.
pub fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Prints the library's warnings (damage a group passed over, a watcher that could not
/// start) on stderr, one JSON object per line: `{"warning": "..."}`.
struct StderrWarnings;

impl log::Log for StderrWarnings {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!("{}", json!({"warning": record.args().to_string()}));
        }
    }

    fn flush(&self) {}
}

/// Installs [`StderrWarnings`] as the logger.
pub fn print_warnings() {
    static LOGGER: StderrWarnings = StderrWarnings;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Warn);
    }
}
