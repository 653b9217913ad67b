//! # agentbus
//!
//! Crash-safe coordination for AI agent processes on one machine, over a directory of
//! append-only JSON-lines files.
//!
//! - A [`Bus`] is the directory. It holds mailboxes and leases.
//! - A [`Mailbox`] is a named, append-only log of [`Message`]s. Any number of threads and
//!   processes send to it at once, and each send gets a [`Receipt`] with a unique `id` and
//!   a gap-free `seq`. Mailboxes are created explicitly: sending to a misspelled name is
//!   an error listing the names that exist. Reading ([`Mailbox::messages`]) never changes
//!   state.
//! - A [`Group`] consumes a mailbox durably. Every group sees every message; the
//!   consumers inside one group compete. A [`Delivery`] is acked, nacked, extended or
//!   terminated. Claims run out and are redelivered, and after `max_deliveries` the
//!   message goes to a dead-letter mailbox. A group can take only some messages (a
//!   [`Filter`], with type patterns such as `draft.>`) and deliver one message per burst
//!   ([`Coalesce`]). A [`RetryPolicy`] stored with the group sets growing delays
//!   between attempts and the failures not worth retrying.
//! - [`Follower`] and [`Consumer`] are receivers shaped like crossbeam-channel's
//!   (`recv`, `recv_timeout`, `try_recv`, ...). They are woken by file-system events and
//!   stay exact when events are lost. With the `tokio` feature they are also `async`.
//! - A [`Lease`] is exclusive, expiring ownership of a named resource. Its fencing token
//!   strictly increases forever. A process-bound lease is freed the moment its holder dies.
//! - A [`Handoff`] is a verified baton between agents. [`Bus::handoff`] sends one with
//!   its artifacts pinned by size and SHA-256; the receiver verifies them, then accepts
//!   (taking over the lease) or rejects with a reason the sender sees.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! use agentbus::{Artifact, Bus, NewMessage};
//!
//! let bus = Bus::builder().agent("writer").init(dir.path().join(".agentbus"))?;
//! let main = bus.create_mailbox("main")?;
//!
//! // The writer drafts a file and tells the main agent, pinning the draft by SHA-256.
//! let draft = dir.path().join("draft.md");
//! std::fs::write(&draft, "# Chapter 1\n")?;
//! main.send(
//!     NewMessage::new("draft.ready")
//!         .subject("chapter 1")
//!         .artifact(Artifact::capture(&draft)?)
//!         .correlation_id("book-1"),
//! )?;
//!
//! // The main agent (usually another process) reads it and checks the artifact.
//! for message in main.messages().of_type("draft.ready") {
//!     let message = message?;
//!     for artifact in &message.artifacts {
//!         artifact.verify()?; // exists, same size, same SHA-256
//!     }
//!     assert_eq!(message.from, "writer");
//! }
//! # Ok(()) }
//! ```
//!
//! # Guarantees
//!
//! - **Durable send.** With [`Durability::Sync`] (the default) a receipt means the
//!   record was `fdatasync`ed; with [`Durability::Flush`] it was written to the kernel and
//!   survives a crash of the process. A failed sync is returned, never retried.
//! - **No interleaving.** Each append holds an exclusive `flock` on the mailbox's `lock`
//!   file (never the data file) and writes the whole record with one `write()`.
//! - **Torn tails are repaired, damage is loud.** A crash mid-append leaves at most one
//!   incomplete final line; readers never deliver it and the next writer truncates it
//!   before appending. Every record carries a CRC-32C; a damaged record is reported with
//!   its file and line ([`Error::Corrupt`], [`Bus::doctor`]), never skipped silently.
//! - **Identity and order.** `id` is a UUIDv7; `seq` is contiguous per mailbox.
//! - **Idempotent send.** A repeated [idempotency key](NewMessage::idempotency_key)
//!   returns the original receipt instead of writing a second message.
//! - **Bounded.** A send never re-reads history: the writer caches its open segment and
//!   its length and checks it with one `fstat` under the lock. Records over the limit
//!   (default 1 MiB) are refused on write and reported on read.
//! - **Safe by default.** Directories `0700`, files `0600`; names are validated
//!   ([`validate_name`]) so nothing escapes the directory; symlinks inside the bus are
//!   not followed.
//!
//! - **At-least-once per group.** A message is done when it is acked; a claim that runs
//!   out is redelivered with `attempt + 1`; ack, nack, term and dead-letter records
//!   are durable. Delivery is in `seq` order per group, except redeliveries.
//! - **No lost wake-ups.** Every wake-up re-reads from the receiver's durable position,
//!   and a timer re-checks without events, so a lost event only delays delivery.
//! - **Leases are exclusive and fenced.** At most one live holder; tokens strictly
//!   increase across every grant; only the current token renews, releases or
//!   transfers.
//! - **Handoffs are verified** by size and SHA-256 before they are accepted.
//!
//! The README's *Guarantees and limits* names the test that proves each point and what
//! is not promised (network file systems, writers that skip the lock protocol, ...).
//! The on-disk format, for tools that write records directly, is in `FORMAT.md`.
//!
//! # Architecture
//!
//! For contributors: where things are, and the rules that keep them there (in the
//! manner of rust-analyzer's `architecture.md`).
//!
//! **Layers.** Arrows point down; nothing below imports from above.
//!
//! ```text
//! handoff, receiver                 built from the facades only (no backend code)
//! bus mailbox group lease read      facades: docs, validation, shared fields,
//! compact doctor                    one forward per operation
//! ──────────── backend.rs ────────  the seam: traits, enums, vocabulary
//! dir/                nats/         the backends
//! message filter report clock error name encode watch     backend-free
//! ```
//!
//! - **Backend-free modules** hold what every layer speaks: [`Message`], [`Filter`],
//!   the [`Error`], the reports ([`GroupStats`], [`LeaseInfo`], ...), wall-clock
//!   milliseconds (`clock`), the message encoder, and the hints a waiter sleeps on
//!   (`watch`).
//! - **The seam** (`backend.rs`) writes down once what a backend provides: the traits
//!   `BusBackend`, `MailboxBackend`, `GroupBackend` and `ReadBackend`, and an enum per
//!   concept (`BusImp`, `MailboxImp`, `GroupImp`, `ReaderImp`) with one arm per
//!   backend that dereferences to its trait. Its vocabulary (`Prepared`, `GroupMeta`,
//!   `Claimed`, `Settle`, `LeaseGrant`, `LeaseChange`, `LeaseState`) is all the
//!   backends share with the facades. An operation a backend cannot express is a
//!   trait default that answers [`Error::Unsupported`] with that backend's hint. The
//!   URL switch (`open_bus`) picks the backend. The `nats` feature gate appears only
//!   there, on the enum arms, and at the top of `nats/` (which compiles to nothing
//!   without the feature).
//! - **The directory backend** (`dir/`) is everything that touches files: `fsutil`
//!   (no-follow opens, `flock`), `record` (the CRC line codec), `segment`, `read`,
//!   `mailbox` (the append path), `keys` (the idempotency index), `group/` (state
//!   records and their fold, checkpoints, claims, creation), `lease`, `compact`,
//!   `doctor`, `watch` (`notify`). FORMAT.md is its contract with outside tools.
//! - **The JetStream backend** (`nats/`): the connection and its runtime, the URL and
//!   name mapping (`mod.rs`), streams (`mailbox`), reading by seq (`read`), durable
//!   pull consumers (`group`), the lease bucket (`lease`), subscriptions as wake-up
//!   hints (`watch`).
//! - **The CLI** (`src/bin/agentbus/`): `main.rs` (global flags, dispatch),
//!   `output.rs` (JSON lines, error JSON, exit codes), `commands/<verb>.rs` (each
//!   verb's `Args` beside its `run`). It uses the public API only.
//!
//! **Where a change goes.**
//!
//! - *A new verb*: one file in `src/bin/agentbus/commands/`, one line in the dispatch.
//! - *A new capability both backends can express*: a method on the seam's trait, its
//!   implementation in `dir/` and `nats/`, a one-line forward in the facade, and a
//!   behaviour in `tests/backends.rs` that runs on both.
//! - *A capability built from mailboxes, groups and leases* (handoffs; joins, gates,
//!   traces): a facade-level module with no backend code at all.
//! - *A new backend*: a folder beside `dir/` and `nats/` implementing the four traits,
//!   an arm in each enum, a branch in `open_bus`, and the shared suite run against it.
//!
//! **Invariants each layer keeps.**
//!
//! - Facades validate every name before forwarding; backends may assume valid names.
//! - Backends never call a facade: dead letters go through the seam
//!   (`DeadLetterTo`), so no cycle forms between `group.rs` and its backends.
//! - The directory backend changes a file only under that file's `flock`, writes a
//!   record with one `write()`, and never follows a symlink (`fsutil`).
//! - Every JetStream request is awaited on the bus's own runtime, so the blocking API
//!   works from any thread, inside another runtime too.
//!
//! # Locking
//!
//! agentbus locks with `flock(2)` through [`std::fs::File::lock`] (stable since Rust
//! 1.89, the same call the `fs4` crate makes), so shell scripts can take the same lock
//! with `flock(1)`.

#![warn(missing_docs, missing_debug_implementations, rust_2018_idioms)]

mod backend;
mod bus;
mod clock;
mod coalesce;
mod compact;
mod dead_letter;
mod decode;
mod dir;
mod doctor;
mod encode;
mod error;
mod filter;
mod group;
mod handoff;
mod kv;
mod lease;
mod lost;
mod mailbox;
mod message;
mod name;
mod nats;
mod read;
mod receiver;
mod report;
mod retry;
mod watch;

pub use backend::CLOCK_GRACE;
pub use bus::{
    Bus, BusBuilder, Durability, DEFAULT_MAX_RECORD_BYTES, DEFAULT_POLL_INTERVAL,
    DEFAULT_SEGMENT_BYTES,
};
pub use coalesce::{Coalesce, CoalesceBy};
pub use dead_letter::{Damaged, DeadAttempt, DeadLetter, DAMAGED_TYPE, DEAD_LETTER_HEADER};
pub use dir::{FORMAT_VERSION, MARKER_FILE};
pub use error::{Error, Result};
pub use filter::Filter;
pub use group::{Delivery, Group, GroupOptions, StartAt};
pub use handoff::{
    Answer, Handoff, HandoffBuilder, HandoffInbox, LeaseRef, ReceivedHandoff, SentHandoff,
    ACCEPTED_TYPE, HANDOFF_GROUP, HANDOFF_TYPE, REJECTED_TYPE,
};
pub use kv::{validate_kv_key, Kv, DEFAULT_KV_HISTORY, MAX_KV_KEY_LEN};
pub use lease::{Lease, LeaseRequest};
pub use lost::{LOST_FROM_HEADER, LOST_TYPE};
pub use mailbox::Mailbox;
pub use message::{Artifact, Message, NewMessage, Receipt, MAX_KEY_LEN};
pub use name::{validate_name, MAX_NAME_LEN};
pub use read::Messages;
#[cfg(feature = "tokio")]
pub use receiver::RecvStream;
pub use receiver::{Consumer, Envelope, Follower, RecvTimeoutError, TryRecvError};
pub use report::{
    CompactReport, DoctorReport, GroupStats, KvEntry, LeaseInfo, MailboxStats, Problem, ProblemKind,
};
/// The `serde_json` this crate is built with, for payloads and handoff state, so the
/// versions cannot drift apart.
pub use retry::{RetryOutcome, RetryPolicy};
pub use serde_json;
pub use watch::{Waker, WatchMode};

#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
