//! `agentbus`: the command-line face of the agentbus crate, for shell, Python and cron
//! agents sharing a bus directory with Rust programs.
//!
//! Output is JSON, one object per line, on stdout. Errors are one JSON object on stderr,
//! `{"error": "<stable code>", "message": "..."}`, and a non-zero exit:
//!
//! | exit | meaning |
//! |------|---------|
//! | 0 | success |
//! | 1 | the operation failed (I/O error, damaged data); see the error object |
//! | 2 | the request was invalid (usage, bad name, bad JSON, unknown mailbox); nothing was written |
//! | 4 | `doctor` found problems it did not repair |
//! | 3 | `lease acquire`: the lease is held by someone else |
//! | 5 | a stale delivery (`nack`, `extend`, `term`) or lease grant (`lease renew`, `release`) |
//! | 6 | an artifact is missing or differs in size or SHA-256 (`send`, `handoff`) |

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agentbus::{Artifact, Bus, Durability, Error, GroupOptions, Mailbox, NewMessage, StartAt};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(
    name = "agentbus",
    version,
    about = "Mailboxes, leases and handoffs for agents sharing a directory"
)]
struct Cli {
    /// The bus: a directory, or with the `nats` feature a NATS JetStream server,
    /// `nats://host:port[/namespace]`. `--bus` is the same option.
    #[arg(
        long,
        visible_alias = "bus",
        global = true,
        env = "AGENTBUS_DIR",
        default_value = ".agentbus"
    )]
    dir: PathBuf,
    /// When a write counts as done: `sync` (fdatasync, survives power loss) or `flush`
    /// (survives a crash of this process).
    #[arg(
        long,
        global = true,
        env = "AGENTBUS_DURABILITY",
        default_value = "sync"
    )]
    durability: DurabilityArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum DurabilityArg {
    Sync,
    Flush,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the bus directory (safe to run again).
    Init,
    /// Create or list mailboxes.
    #[command(subcommand)]
    Mailbox(MailboxCommand),
    /// Send a message; prints its receipt.
    Send(SendArgs),
    /// Read messages without changing any state; prints one message per line.
    Recv(RecvArgs),
    /// Stream messages as they arrive (woken by file-system events, with a polling
    /// fallback); with `--exec`, run a handler per message.
    Watch(WatchArgs),
    /// Acknowledge delivered messages (done).
    Ack(AckArgs),
    /// Give a claimed message back for redelivery, optionally after a delay.
    Nack {
        #[command(flatten)]
        target: Target,
        /// Redeliver after this many seconds.
        #[arg(long, default_value_t = 0.0)]
        delay: f64,
        /// Why, kept in the message's delivery history.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Keep the claim on a message for longer ("still working").
    Extend {
        #[command(flatten)]
        target: Target,
        /// Seconds from now.
        #[arg(long, default_value_t = 30.0)]
        by: f64,
    },
    /// Give up on a claimed message for good (no redelivery).
    Term {
        #[command(flatten)]
        target: Target,
        /// Why.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Create or list consumer groups.
    #[command(subcommand)]
    Group(GroupCommand),
    /// Counters per mailbox and group: published, delivered, acked, in flight,
    /// pending, redelivered, dead, lag, oldest unacked age.
    Stats {
        /// Only this mailbox.
        mailbox: Option<String>,
    },
    /// Remove segments that every group has settled.
    Compact {
        /// Only this mailbox.
        mailbox: Option<String>,
        /// Keep segments written in the last SECS seconds.
        #[arg(long)]
        retention: Option<f64>,
    },
    /// Send dead letters back to the mailbox they came from.
    Replay {
        /// The dead-letter mailbox.
        mailbox: String,
        /// Seqs of the dead letters to replay.
        #[arg(required = true)]
        seqs: Vec<u64>,
    },
    /// Take, renew, release or inspect leases (exclusive, expiring ownership with a
    /// fencing token).
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Hand work to another agent with verified artifacts, or answer a handoff.
    #[command(subcommand)]
    Handoff(HandoffCommand),
    /// Verify every record of every mailbox; `--repair` truncates torn tails.
    Doctor {
        /// Truncate torn final lines (left by crashed writers).
        #[arg(long)]
        repair: bool,
    },
}

#[derive(Subcommand, Debug)]
enum MailboxCommand {
    /// Create mailboxes.
    Create {
        /// Mailbox names.
        #[arg(required = true)]
        names: Vec<String>,
        /// Succeed if the mailbox already exists.
        #[arg(long)]
        exist_ok: bool,
    },
    /// List mailboxes.
    List,
}

#[derive(Subcommand, Debug)]
enum GroupCommand {
    /// Create a consumer group on a mailbox.
    Create {
        /// The mailbox.
        mailbox: String,
        /// The group.
        group: String,
        /// Deliveries before a message is dead-lettered.
        #[arg(long, default_value_t = 5)]
        max_deliveries: u32,
        /// Default visibility timeout of a claim, in seconds.
        #[arg(long, default_value_t = 30.0)]
        visibility: f64,
        /// Dead-letter mailbox (default `<mailbox>.dlq`).
        #[arg(long)]
        dead_letter: Option<String>,
        /// Deliver only messages sent from now on.
        #[arg(long)]
        from_end: bool,
        /// Succeed if the group already exists.
        #[arg(long)]
        exist_ok: bool,
        /// Only deliver messages of this type to the group (repeatable).
        #[arg(long = "type")]
        kinds: Vec<String>,
        /// Only deliver messages from this agent to the group (repeatable).
        #[arg(long = "from")]
        senders: Vec<String>,
    },
    /// List the groups of a mailbox.
    List {
        /// The mailbox.
        mailbox: String,
    },
}

#[derive(Subcommand, Debug)]
enum LeaseCommand {
    /// Take a lease; prints {"name","holder","token","expires_at"}. Exit 3 if held.
    Acquire {
        /// The lease (resource) name.
        name: String,
        /// Who takes it.
        #[arg(long, env = "AGENTBUS_AGENT")]
        holder: String,
        /// Seconds until it expires unless renewed.
        #[arg(long)]
        ttl: f64,
        /// Wait up to SECS for it to be released or to expire.
        #[arg(long, default_value_t = 0.0)]
        wait: f64,
    },
    /// Extend a lease you hold.
    Renew {
        /// The lease.
        name: String,
        /// The holder.
        #[arg(long, env = "AGENTBUS_AGENT")]
        holder: String,
        /// The fencing token of your grant.
        #[arg(long)]
        token: u64,
        /// New TTL from now, in seconds.
        #[arg(long)]
        ttl: f64,
    },
    /// Release a lease you hold.
    Release {
        /// The lease.
        name: String,
        /// The holder.
        #[arg(long, env = "AGENTBUS_AGENT")]
        holder: String,
        /// The fencing token of your grant.
        #[arg(long)]
        token: u64,
    },
    /// Show one lease.
    Show {
        /// The lease.
        name: String,
    },
    /// List all leases.
    List,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum HandoffCommand {
    /// Send a handoff; prints its receipt.
    Send {
        /// The receiving mailbox.
        mailbox: String,
        /// The sending agent.
        #[arg(long, env = "AGENTBUS_AGENT")]
        from: String,
        /// One line: what this handoff is.
        #[arg(long)]
        summary: String,
        /// State to resume from, as JSON.
        #[arg(long)]
        state: Option<String>,
        /// Something that changed (repeatable).
        #[arg(long)]
        changed: Vec<String>,
        /// Something that remains (repeatable).
        #[arg(long)]
        remaining: Vec<String>,
        /// The next step.
        #[arg(long)]
        next_step: Option<String>,
        /// A blocker or assumption (repeatable).
        #[arg(long)]
        blocker: Vec<String>,
        /// A file to hand over, pinned by size and SHA-256 (repeatable).
        #[arg(long = "artifact")]
        artifacts: Vec<PathBuf>,
        /// A lease you hold that goes with the work.
        #[arg(long, requires = "token")]
        lease: Option<String>,
        /// Your token for `--lease`.
        #[arg(long)]
        token: Option<u64>,
        /// Mailbox for the answer (default: your agent name).
        #[arg(long)]
        reply_to: Option<String>,
        /// Correlation id.
        #[arg(long)]
        correlation_id: Option<String>,
    },
    /// Take the next handoff waiting in a mailbox (prints it, with "verified").
    Recv {
        /// The mailbox.
        mailbox: String,
        /// Wait up to SECS for one.
        #[arg(long, default_value_t = 0.0)]
        wait: f64,
    },
    /// Print a handoff (read-only).
    Show {
        /// The mailbox.
        mailbox: String,
        /// The handoff's seq.
        seq: u64,
    },
    /// Check a handoff's artifacts (exists, size, SHA-256). Exit 6 if one fails.
    Verify {
        /// The mailbox.
        mailbox: String,
        /// The handoff's seq.
        seq: u64,
    },
    /// Accept a handoff: verify, take over its lease, answer the sender.
    Accept {
        /// The mailbox.
        mailbox: String,
        /// The handoff's seq.
        seq: u64,
    },
    /// Reject a handoff; the sender sees the reason.
    Reject {
        /// The mailbox.
        mailbox: String,
        /// The handoff's seq.
        seq: u64,
        /// Why.
        #[arg(long)]
        reason: String,
    },
}

#[derive(Args, Debug)]
struct Target {
    /// The mailbox.
    mailbox: String,
    /// The consumer group.
    #[arg(long)]
    group: String,
    /// The message's seq.
    seq: u64,
    /// The attempt your claim was (from `recv`'s `delivery.attempt`): refuse with exit 5
    /// if the message has been redelivered since, instead of acting on someone else's
    /// claim.
    #[arg(long)]
    attempt: Option<u32>,
}

#[derive(Args, Debug)]
struct WatchArgs {
    /// The mailbox.
    mailbox: String,
    /// Claim for this consumer group (at-least-once, acked per message) instead of
    /// just reading.
    #[arg(long)]
    group: Option<String>,
    /// Consumer name for claims.
    #[arg(long, env = "AGENTBUS_AGENT", default_value = "cli")]
    consumer: String,
    /// Only this type (repeatable). Without `--group` only; a group filters with
    /// `group create --type`.
    #[arg(long = "type")]
    kinds: Vec<String>,
    /// Without `--group`: start at this seq instead of the end (new messages only).
    #[arg(long)]
    from_seq: Option<u64>,
    /// Run this shell command per message: the message JSON on stdin, fields in
    /// AGENTBUS_* environment variables. With `--group`, exit 0 acks and anything else
    /// nacks (the message is redelivered).
    #[arg(long)]
    exec: Option<String>,
    /// Seconds before a failed handler's message is redelivered.
    #[arg(long, default_value_t = 0.0)]
    retry_delay: f64,
    /// Visibility timeout of the claims, in seconds (default: the group's).
    #[arg(long)]
    visibility: Option<f64>,
    /// Stop after this many messages.
    #[arg(long)]
    max: Option<usize>,
    /// Stop after this many seconds without a message.
    #[arg(long)]
    idle_timeout: Option<f64>,
    /// Poll only (no file-system events), e.g. on a network file system.
    #[arg(long)]
    poll: bool,
}

#[derive(Args, Debug)]
struct AckArgs {
    /// The mailbox.
    mailbox: String,
    /// The consumer group.
    #[arg(long)]
    group: String,
    /// Seqs to ack.
    #[arg(required_unless_present = "upto")]
    seqs: Vec<u64>,
    /// Ack every delivered message up to and including this seq.
    #[arg(long)]
    upto: Option<u64>,
}

#[derive(Args, Debug)]
struct SendArgs {
    /// The mailbox.
    mailbox: String,
    /// Message type, for example `task`.
    #[arg(long = "type")]
    kind: String,
    /// Sending agent.
    #[arg(long, env = "AGENTBUS_AGENT", default_value = "cli")]
    from: String,
    /// Subject line.
    #[arg(long)]
    subject: Option<String>,
    /// Body text.
    #[arg(long, conflicts_with = "body_file")]
    body: Option<String>,
    /// Read the body from a file (`-` for stdin).
    #[arg(long)]
    body_file: Option<PathBuf>,
    /// Structured payload, as JSON.
    #[arg(long)]
    payload: Option<String>,
    /// A file to attach by path, size and SHA-256 (repeatable).
    #[arg(long = "artifact")]
    artifacts: Vec<PathBuf>,
    /// Correlation id.
    #[arg(long)]
    correlation_id: Option<String>,
    /// Causation id.
    #[arg(long)]
    causation_id: Option<String>,
    /// Idempotency key: a repeated key returns the original receipt.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// Priority (higher is more urgent).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// A header, `KEY=VALUE` (repeatable).
    #[arg(long = "header")]
    headers: Vec<String>,
}

#[derive(Args, Debug)]
struct RecvArgs {
    /// The mailbox.
    mailbox: String,
    /// Start at this seq.
    #[arg(long, default_value_t = 1)]
    from_seq: u64,
    /// Print at most this many messages.
    #[arg(long)]
    max: Option<usize>,
    /// Only this type (repeatable).
    #[arg(long = "type")]
    kinds: Vec<String>,
    /// Only messages from this agent.
    #[arg(long)]
    from: Option<String>,
    /// Only messages with this correlation id.
    #[arg(long)]
    correlation_id: Option<String>,
    /// Claim for this consumer group instead of just reading.
    #[arg(long)]
    group: Option<String>,
    /// Consumer name for claims.
    #[arg(long, env = "AGENTBUS_AGENT", default_value = "cli")]
    consumer: String,
    /// Visibility timeout of the claims, in seconds (default: the group's).
    #[arg(long, requires = "group")]
    visibility: Option<f64>,
    /// Wait up to SECS for a message when none is waiting.
    #[arg(long, default_value_t = 0.0)]
    wait: f64,
}

/// A CLI failure: a crate error, or a usage problem found by the CLI itself.
enum Failure {
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

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return report(Failure::Usage(e.to_string().trim_end().to_owned())),
    };
    let mut out = io::stdout().lock();
    match run(cli, &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            let _ = out.flush();
            report(f)
        }
    }
}

fn report(failure: Failure) -> ExitCode {
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
                | Error::ArtifactSizeMismatch { .. }
                | Error::ArtifactDigestMismatch { .. } => 6,
                Error::StaleDelivery { .. } | Error::StaleLease { .. } => 5,
                _ if e.is_invalid_input() => 2,
                _ => 1,
            };
            (v, code)
        }
    };
    eprintln!("{value}");
    ExitCode::from(code)
}

fn error_json(e: &Error) -> Value {
    let mut v = json!({"error": e.code(), "message": e.to_string()});
    if let Some(path) = e.path() {
        v["path"] = json!(path);
    }
    match e {
        Error::MailboxNotFound { existing, .. } | Error::GroupNotFound { existing, .. } => {
            v["existing"] = json!(existing)
        }
        Error::Corrupt { line, .. } => v["line"] = json!(line),
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

fn open_bus(cli: &Cli) -> Result<Bus, Failure> {
    Ok(bus_builder(cli).open(&cli.dir)?)
}

fn bus_builder(cli: &Cli) -> agentbus::BusBuilder {
    Bus::builder().durability(match cli.durability {
        DurabilityArg::Sync => Durability::Sync,
        DurabilityArg::Flush => Durability::Flush,
    })
}

/// The message `seq` of `mailbox`, if it is stored.
fn stored(mailbox: &Mailbox, seq: u64) -> Result<Option<agentbus::Message>, Failure> {
    let first = mailbox.messages().from_seq(seq).next().transpose()?;
    Ok(first.filter(|m| m.seq == seq))
}

fn emit(out: &mut impl Write, value: &impl serde::Serialize) -> Result<(), Failure> {
    let mut line = serde_json::to_vec(value).expect("output serializes");
    line.push(b'\n');
    out.write_all(&line).map_err(|e| {
        Failure::Bus(Error::Io {
            op: "write",
            path: "<stdout>".into(),
            source: e,
        })
    })
}

fn run(cli: Cli, out: &mut impl Write) -> Result<(), Failure> {
    match &cli.command {
        Command::Init => {
            let bus = Bus::builder().init(&cli.dir)?;
            emit(out, &json!({"init": bus.path()}))
        }
        Command::Mailbox(MailboxCommand::Create { names, exist_ok }) => {
            let bus = open_bus(&cli)?;
            for name in names {
                let created = match bus.create_mailbox(name) {
                    Ok(_) => true,
                    Err(Error::MailboxExists { .. }) if *exist_ok => false,
                    Err(e) => return Err(e.into()),
                };
                emit(out, &json!({"mailbox": name, "created": created}))?;
            }
            Ok(())
        }
        Command::Mailbox(MailboxCommand::List) => {
            for name in open_bus(&cli)?.mailboxes()? {
                emit(out, &json!({ "mailbox": name }))?;
            }
            Ok(())
        }
        Command::Send(args) => {
            let bus = open_bus(&cli)?;
            let mailbox = bus.mailbox(&args.mailbox)?;
            let receipt = mailbox.send(build_message(args)?)?;
            emit(out, &receipt)
        }
        Command::Recv(args) if args.group.is_some() => claim(&cli, args, out),
        Command::Recv(args) => read(&cli, args, out),
        Command::Watch(args) => watch(&cli, args, out),
        Command::Ack(args) => {
            let group = open_bus(&cli)?.mailbox(&args.mailbox)?.group(&args.group)?;
            if let Some(upto) = args.upto {
                let n = group.ack_upto(upto)?;
                emit(out, &json!({"upto": upto, "acked": n}))?;
            }
            for &seq in &args.seqs {
                let acked = group.ack(seq)?;
                emit(out, &json!({"seq": seq, "acked": acked}))?;
            }
            Ok(())
        }
        Command::Nack {
            target,
            delay,
            reason,
        } => {
            let (delay, reason) = (secs(*delay)?, reason.as_deref());
            match target_delivery(&cli, target)? {
                (_, Some(d)) => d.nack(delay, reason)?,
                (group, None) => group.nack(target.seq, delay, reason)?,
            }
            emit(out, &json!({"seq": target.seq, "nacked": true}))
        }
        Command::Extend { target, by } => {
            let by = secs(*by)?;
            match target_delivery(&cli, target)? {
                (_, Some(d)) => d.extend(by)?,
                (group, None) => group.extend(target.seq, by)?,
            }
            emit(out, &json!({"seq": target.seq, "extended": true}))
        }
        Command::Term { target, reason } => {
            match target_delivery(&cli, target)? {
                (_, Some(d)) => d.term(reason.as_deref())?,
                (group, None) => group.term(target.seq, reason.as_deref())?,
            }
            emit(out, &json!({"seq": target.seq, "terminated": true}))
        }
        Command::Group(GroupCommand::Create {
            mailbox,
            group,
            max_deliveries,
            visibility,
            dead_letter,
            from_end,
            exist_ok,
            kinds,
            senders,
        }) => {
            let mailbox = open_bus(&cli)?.mailbox(mailbox)?;
            let mut filter = agentbus::Filter::new();
            for k in kinds {
                filter = filter.of_type(k);
            }
            for f in senders {
                filter = filter.sender(f);
            }
            let mut opts = GroupOptions::new()
                .filter(filter)
                .max_deliveries(*max_deliveries)
                .visibility(secs(*visibility)?)
                .start(if *from_end {
                    StartAt::End
                } else {
                    StartAt::Beginning
                });
            if let Some(dl) = dead_letter {
                opts = opts.dead_letter(dl);
            }
            let created = match mailbox.create_group_with(group, opts) {
                Ok(_) => true,
                Err(Error::GroupExists { .. }) if *exist_ok => false,
                Err(e) => return Err(e.into()),
            };
            emit(
                out,
                &json!({"mailbox": mailbox.name(), "group": group, "created": created}),
            )
        }
        Command::Group(GroupCommand::List { mailbox }) => {
            let mailbox = open_bus(&cli)?.mailbox(mailbox)?;
            for name in mailbox.groups()? {
                let g = mailbox.group(&name)?;
                emit(
                    out,
                    &json!({
                        "mailbox": mailbox.name(),
                        "group": name,
                        "max_deliveries": g.max_deliveries(),
                        "visibility": g.visibility().as_secs_f64(),
                        "dead_letter": g.dead_letter_mailbox(),
                    }),
                )?;
            }
            Ok(())
        }
        Command::Stats { mailbox } => {
            for mb in mailboxes(&open_bus(&cli)?, mailbox.as_deref())? {
                emit(out, &mb.stats()?)?;
            }
            Ok(())
        }
        Command::Compact { mailbox, retention } => {
            let retention = retention.map(secs).transpose()?;
            for mb in mailboxes(&open_bus(&cli)?, mailbox.as_deref())? {
                emit(out, &mb.compact(retention)?)?;
            }
            Ok(())
        }
        Command::Replay { mailbox, seqs } => {
            let bus = open_bus(&cli)?;
            let dlq = bus.mailbox(mailbox)?;
            for &seq in seqs {
                let dead = stored(&dlq, seq)?
                    .ok_or_else(|| Failure::Usage(format!("{mailbox} has no message {seq}")))?;
                let origin = dead
                    .headers
                    .get(agentbus::DEAD_LETTER_HEADER)
                    .and_then(|h| serde_json::from_str::<Value>(h).ok())
                    .and_then(|v| v["mailbox"].as_str().map(str::to_owned))
                    .ok_or_else(|| {
                        Failure::Usage(format!("{mailbox} {seq} is not a dead letter"))
                    })?;
                let receipt = bus.mailbox(&origin)?.send(NewMessage::replay_of(&dead))?;
                emit(out, &json!({"replayed": seq, "receipt": receipt}))?;
            }
            Ok(())
        }
        Command::Lease(cmd) => lease(&cli, cmd, out),
        Command::Handoff(cmd) => handoff(&cli, cmd, out),
        Command::Doctor { repair } => {
            let report = open_bus(&cli)?.doctor(*repair)?;
            for p in &report.problems {
                emit(
                    out,
                    &json!({"problem": p.kind, "mailbox": p.mailbox, "path": p.path,
                    "line": p.line, "detail": p.detail, "repaired": p.repaired}),
                )?;
            }
            let repaired = report.problems.iter().filter(|p| p.repaired).count();
            emit(
                out,
                &json!({
                    "doctor": if report.is_clean() { "clean" } else { "problems" },
                    "mailboxes": report.mailboxes,
                    "records": report.records,
                    "problems": report.problems.len(),
                    "repaired": repaired,
                }),
            )?;
            if report.is_clean() {
                Ok(())
            } else {
                Err(Failure::Unclean)
            }
        }
    }
}

fn handoff(cli: &Cli, cmd: &HandoffCommand, out: &mut impl Write) -> Result<(), Failure> {
    let agent = std::env::var("AGENTBUS_AGENT").unwrap_or_else(|_| "cli".into());
    let bus = bus_builder(cli).agent(agent.clone()).open(&cli.dir)?;
    let show = |m: &agentbus::Message, verified: Option<&Error>| {
        let mut v = serde_json::to_value(m).expect("message serializes");
        if let Some(obj) = v.as_object_mut() {
            obj.insert("verified".into(), json!(verified.is_none()));
            if let Some(e) = verified {
                obj.insert("verify_error".into(), error_json(e));
            }
        }
        v
    };
    let read = |mailbox: &str, seq: u64| -> Result<agentbus::Message, Failure> {
        stored(&bus.mailbox(mailbox)?, seq)?
            .filter(|m| m.kind == agentbus::HANDOFF_TYPE)
            .ok_or_else(|| Failure::Usage(format!("{mailbox} has no handoff {seq}")))
    };
    match cmd {
        HandoffCommand::Send {
            mailbox,
            from,
            summary,
            state,
            changed,
            remaining,
            next_step,
            blocker,
            artifacts,
            lease,
            token,
            reply_to,
            correlation_id,
        } => {
            let mut h = bus.handoff(mailbox).from(from).summary(summary);
            if let Some(s) = state {
                let v: Value = serde_json::from_str(s).map_err(|e| {
                    Error::InvalidMessage(format!("--state is not valid JSON: {e}"))
                })?;
                h = h.state(v);
            }
            for c in changed {
                h = h.changed(c);
            }
            for r in remaining {
                h = h.remaining(r);
            }
            if let Some(n) = next_step {
                h = h.next_step(n);
            }
            for b in blocker {
                h = h.blocker(b);
            }
            for a in artifacts {
                h = h.artifact(a);
            }
            if let (Some(l), Some(t)) = (lease, token) {
                h = h.lease(l, from, *t);
            }
            if let Some(r) = reply_to {
                h = h.reply_to(r);
            }
            if let Some(c) = correlation_id {
                h = h.correlation_id(c);
            }
            emit(out, &h.send()?.receipt)
        }
        HandoffCommand::Recv { mailbox, wait } => {
            let mut inbox = bus.handoff_inbox(mailbox)?;
            let got = match inbox.recv_timeout(secs(*wait)?) {
                Ok(h) => Some(h),
                Err(agentbus::RecvTimeoutError::Bus(e)) => return Err(e.into()),
                Err(_) => None,
            };
            if let Some(h) = got {
                emit(out, &show(&h.message, h.verify().err().as_ref()))?;
            }
            Ok(())
        }
        HandoffCommand::Show { mailbox, seq } => emit(out, &read(mailbox, *seq)?),
        HandoffCommand::Verify { mailbox, seq } => {
            let m = read(mailbox, *seq)?;
            m.artifacts.iter().try_for_each(Artifact::verify)?;
            emit(
                out,
                &json!({"seq": seq, "verified": true, "artifacts": m.artifacts.len()}),
            )
        }
        HandoffCommand::Accept { mailbox, seq } => {
            let h = bus.handoff_inbox(mailbox)?.take(*seq)?;
            let lease = h.accept(&agent)?;
            emit(out, &json!({"seq": seq, "accepted": true, "lease": lease}))
        }
        HandoffCommand::Reject {
            mailbox,
            seq,
            reason,
        } => {
            bus.handoff_inbox(mailbox)?
                .take(*seq)?
                .reject(&agent, reason)?;
            emit(
                out,
                &json!({"seq": seq, "rejected": true, "reason": reason}),
            )
        }
    }
}

fn rfc3339(t: time::OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

fn lease(cli: &Cli, cmd: &LeaseCommand, out: &mut impl Write) -> Result<(), Failure> {
    let bus = open_bus(cli)?;
    let grant = |name: &str, holder: &str, token: u64, expires_at| json!({"name": name, "holder": holder, "token": token, "expires_at": rfc3339(expires_at)});
    match cmd {
        LeaseCommand::Acquire {
            name,
            holder,
            ttl,
            wait,
        } => {
            let request = bus.lease(name).holder(holder).ttl(secs(*ttl)?);
            let lease = if *wait > 0.0 {
                request.acquire(secs(*wait)?)?
            } else {
                request.try_acquire()?
            };
            // This process ends now: keep the lease for its TTL (renew or release by token).
            let info = lease.keep();
            emit(out, &grant(name, holder, info.token, info.expires_at))
        }
        LeaseCommand::Renew {
            name,
            holder,
            token,
            ttl,
        } => {
            let info = bus.renew_lease(name, holder, *token, secs(*ttl)?)?;
            emit(out, &grant(name, holder, info.token, info.expires_at))
        }
        LeaseCommand::Release {
            name,
            holder,
            token,
        } => {
            bus.release_lease(name, holder, *token)?;
            emit(
                out,
                &json!({"name": name, "released": true, "token": token}),
            )
        }
        LeaseCommand::Show { name } => match bus.lease_info(name)? {
            Some(info) => emit(out, &info),
            None => emit(out, &json!({"name": name, "holder": null, "token": 0})),
        },
        LeaseCommand::List => {
            for info in bus.leases()? {
                emit(out, &info)?;
            }
            Ok(())
        }
    }
}

fn secs(s: f64) -> Result<Duration, Failure> {
    Duration::try_from_secs_f64(s)
        .map_err(|_| Failure::Usage(format!("{s} is not a number of seconds")))
}

/// `watch`: stream messages (or run a handler per message) as they arrive.
fn watch(cli: &Cli, args: &WatchArgs, out: &mut impl Write) -> Result<(), Failure> {
    let mode = if args.poll {
        agentbus::WatchMode::PollOnly
    } else {
        agentbus::WatchMode::Auto
    };
    let bus = open_bus(cli)?;
    let idle = args.idle_timeout.map(secs).transpose()?;
    let max = args.max.unwrap_or(usize::MAX);
    let retry = secs(args.retry_delay)?;
    let patience = idle.unwrap_or(Duration::from_secs(3600));
    match &args.group {
        Some(group) => {
            if !args.kinds.is_empty() || args.from_seq.is_some() {
                return Err(Failure::Usage(
                    "with --group, filter with `group create --type` and the group decides \
                     where to start"
                        .into(),
                ));
            }
            let group = bus.mailbox(&args.mailbox)?.group(group)?;
            let mut rx = group.consumer_with(&args.consumer, mode)?;
            if let Some(v) = args.visibility {
                rx = rx.visibility(secs(v)?);
            }
            pump(max, idle.is_some(), out, || {
                Ok(match timed_out(rx.recv_timeout(patience))? {
                    Some(d) => Some(handle_delivery(&d, args.exec.as_deref(), retry)?),
                    None => None,
                })
            })?;
        }
        None => {
            let mut rx = bus.follow_with(&[args.mailbox.as_str()], mode)?;
            if let Some(seq) = args.from_seq {
                rx = rx.from_seq(seq);
            }
            for k in &args.kinds {
                rx = rx.of_type(k);
            }
            pump(max, idle.is_some(), out, || {
                Ok(match timed_out(rx.recv_timeout(patience))? {
                    Some(env) => Some(handle_message(
                        &env.message,
                        &args.mailbox,
                        args.exec.as_deref(),
                    )?),
                    None => None,
                })
            })?;
        }
    }
    Ok(())
}

/// Emits what `next` yields, one line each, until `max` lines, or until `next` times out
/// when `stop_when_idle`.
fn pump(
    max: usize,
    stop_when_idle: bool,
    out: &mut impl Write,
    mut next: impl FnMut() -> Result<Option<Value>, Failure>,
) -> Result<(), Failure> {
    let mut handled = 0;
    while handled < max {
        match next()? {
            Some(line) => {
                emit(out, &line)?;
                out.flush().ok();
                handled += 1;
            }
            None if stop_when_idle => break,
            None => {}
        }
    }
    Ok(())
}

/// `Ok(None)` for a timeout, the crate error for anything else.
fn timed_out<T>(r: Result<T, agentbus::RecvTimeoutError>) -> Result<Option<T>, Failure> {
    match r {
        Ok(item) => Ok(Some(item)),
        Err(agentbus::RecvTimeoutError::Bus(e)) => Err(Failure::Bus(e)),
        Err(_) => Ok(None),
    }
}

/// Runs `cmd` for one message; returns its exit code and the last of its stderr.
fn run_handler(
    cmd: &str,
    message: &agentbus::Message,
    env: &[(&str, String)],
) -> Result<(i32, String), Failure> {
    use std::process::{Command, Stdio};
    let json = serde_json::to_vec(message).expect("message serializes");
    let mut command = Command::new("sh");
    command.arg("-c").arg(cmd);
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().map_err(|e| Error::Io {
        op: "run handler",
        path: cmd.into(),
        source: e,
    })?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(&json);
    }
    let output = child.wait_with_output().map_err(|e| Error::Io {
        op: "wait for handler",
        path: cmd.into(),
        source: e,
    })?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: String = stderr
        .chars()
        .rev()
        .take(500)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    Ok((output.status.code().unwrap_or(-1), tail.trim().to_owned()))
}

fn message_env(m: &agentbus::Message, mailbox: &str) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("AGENTBUS_MAILBOX", mailbox.to_owned()),
        ("AGENTBUS_SEQ", m.seq.to_string()),
        ("AGENTBUS_ID", m.id.to_string()),
        ("AGENTBUS_TYPE", m.kind.clone()),
        ("AGENTBUS_FROM", m.from.clone()),
    ];
    if let Some(s) = &m.subject {
        env.push(("AGENTBUS_SUBJECT", s.clone()));
    }
    if let Some(c) = &m.correlation_id {
        env.push(("AGENTBUS_CORRELATION_ID", c.clone()));
    }
    env
}

fn handle_message(
    m: &agentbus::Message,
    mailbox: &str,
    exec: Option<&str>,
) -> Result<Value, Failure> {
    let Some(cmd) = exec else {
        return Ok(serde_json::to_value(m).expect("message serializes"));
    };
    let (code, _) = run_handler(cmd, m, &message_env(m, mailbox))?;
    Ok(json!({"mailbox": mailbox, "seq": m.seq, "exit": code}))
}

fn handle_delivery(
    d: &agentbus::Delivery,
    exec: Option<&str>,
    retry: Duration,
) -> Result<Value, Failure> {
    let group = d.group();
    let Some(cmd) = exec else {
        return Ok(delivery_json(d));
    };
    let mailbox = group.mailbox().name().to_owned();
    let mut env = message_env(&d.message, &mailbox);
    env.push(("AGENTBUS_GROUP", group.name().to_owned()));
    env.push(("AGENTBUS_ATTEMPT", d.attempt.to_string()));
    let (code, stderr) = run_handler(cmd, &d.message, &env)?;
    let acked = code == 0;
    if acked {
        d.ack()?;
    } else {
        let reason = format!("handler exited with {code}: {stderr}");
        match d.nack(retry, Some(&reason)) {
            // The claim ran out while the handler ran: it is redelivered anyway.
            Ok(()) | Err(Error::StaleDelivery { .. }) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(
        json!({"mailbox": mailbox, "group": group.name(), "seq": d.seq(), "attempt": d.attempt,
              "exit": code, "acked": acked}),
    )
}

/// The group, and with `--attempt` the exact delivery (checked to be current).
fn target_delivery(
    cli: &Cli,
    t: &Target,
) -> Result<(agentbus::Group, Option<agentbus::Delivery>), Failure> {
    let group = open_bus(cli)?.mailbox(&t.mailbox)?.group(&t.group)?;
    let delivery = t.attempt.map(|a| group.delivery(t.seq, a)).transpose()?;
    Ok((group, delivery))
}

fn mailboxes(bus: &Bus, only: Option<&str>) -> Result<Vec<Mailbox>, Failure> {
    let names = match only {
        Some(name) => vec![name.to_owned()],
        None => bus.mailboxes()?,
    };
    Ok(names
        .iter()
        .map(|n| bus.mailbox(n))
        .collect::<Result<_, _>>()?)
}

/// How a `recv` waits: woken by file-system events when it waits at all, otherwise
/// without starting a watcher.
fn recv_mode(wait: f64) -> agentbus::WatchMode {
    if wait > 0.0 {
        agentbus::WatchMode::Auto
    } else {
        agentbus::WatchMode::Manual
    }
}

/// `recv` without `--group`: prints the stored messages from `--from-seq` on, waiting
/// up to `--wait` seconds for the first one when none is there.
fn read(cli: &Cli, args: &RecvArgs, out: &mut impl Write) -> Result<(), Failure> {
    let bus = open_bus(cli)?;
    let mut filter = agentbus::Filter::new();
    for kind in &args.kinds {
        filter = filter.of_type(kind);
    }
    if let Some(from) = &args.from {
        filter = filter.sender(from);
    }
    if let Some(id) = &args.correlation_id {
        filter = filter.correlation_id(id);
    }
    let mut rx = bus
        .follow_with(&[args.mailbox.as_str()], recv_mode(args.wait))?
        .from_seq(args.from_seq)
        .filter(filter);
    let deadline = Instant::now() + secs(args.wait)?;
    let max = args.max.unwrap_or(usize::MAX);
    // Damaged records are reported on stderr as they come, and reading goes on; the
    // exit status says whether there were any. They do not count against `--max`.
    let (mut printed, mut damaged) = (0, false);
    while printed < max {
        let until = if printed == 0 {
            deadline
        } else {
            Instant::now()
        };
        match rx.recv_deadline(until) {
            Ok(envelope) => {
                emit(out, &envelope.message)?;
                printed += 1;
            }
            Err(agentbus::RecvTimeoutError::Bus(e @ Error::Corrupt { .. })) => {
                let _ = out.flush();
                eprintln!("{}", error_json(&e));
                damaged = true;
            }
            Err(agentbus::RecvTimeoutError::Bus(e)) => return Err(Failure::Bus(e)),
            Err(_) => break,
        }
    }
    if damaged {
        Err(Failure::Reported)
    } else {
        Ok(())
    }
}

/// `recv --group`: claims up to `--max` (default 1), waiting up to `--wait` seconds
/// for the first message.
fn claim(cli: &Cli, args: &RecvArgs, out: &mut impl Write) -> Result<(), Failure> {
    let group = open_bus(cli)?
        .mailbox(&args.mailbox)?
        .group(args.group.as_deref().expect("checked by caller"))?;
    let visibility = match args.visibility {
        Some(v) => secs(v)?,
        None => group.visibility(),
    };
    let deadline = Instant::now() + secs(args.wait)?;
    let max = args.max.unwrap_or(1);
    if max == 0 {
        return Ok(());
    }
    let mut rx = group
        .consumer_with(&args.consumer, recv_mode(args.wait))?
        .visibility(visibility);
    let Some(first) = timed_out(rx.recv_deadline(deadline))? else {
        return Ok(());
    };
    // Printed before claiming more, so that a failure there cannot hide a claim.
    emit(out, &delivery_json(&first))?;
    for d in group.claim_for(&args.consumer, max - 1, visibility)? {
        emit(out, &delivery_json(&d))?;
    }
    Ok(())
}

/// A delivery as the CLI prints it: the message, plus who holds it until when.
fn delivery_json(d: &agentbus::Delivery) -> Value {
    let mut line = serde_json::to_value(&d.message).expect("message serializes");
    line["delivery"] = json!({
        "group": d.group().name(),
        "consumer": d.consumer,
        "attempt": d.attempt,
        "deadline": rfc3339(d.deadline),
    });
    line
}

fn build_message(args: &SendArgs) -> Result<NewMessage, Failure> {
    let mut msg = NewMessage::new(&args.kind)
        .from(&args.from)
        .priority(args.priority);
    if let Some(s) = &args.subject {
        msg = msg.subject(s);
    }
    if let Some(b) = &args.body {
        msg = msg.body(b);
    }
    if let Some(path) = &args.body_file {
        let mut body = String::new();
        let read = if path.as_os_str() == "-" {
            io::stdin().read_to_string(&mut body)
        } else {
            std::fs::File::open(path).and_then(|mut f| f.read_to_string(&mut body))
        };
        read.map_err(|e| Error::Io {
            op: "read body",
            path: path.clone(),
            source: e,
        })?;
        msg = msg.body(body);
    }
    if let Some(p) = &args.payload {
        let value: Value = serde_json::from_str(p)
            .map_err(|e| Error::InvalidMessage(format!("--payload is not valid JSON: {e}")))?;
        msg = msg.payload(value);
    }
    for path in &args.artifacts {
        msg = msg.artifact(Artifact::capture(path)?);
    }
    if let Some(id) = &args.correlation_id {
        msg = msg.correlation_id(id);
    }
    if let Some(id) = &args.causation_id {
        msg = msg.causation_id(id);
    }
    if let Some(k) = &args.idempotency_key {
        msg = msg.idempotency_key(k);
    }
    for h in &args.headers {
        let (k, v) = h
            .split_once('=')
            .ok_or_else(|| Failure::Usage(format!("--header {h:?} is not KEY=VALUE")))?;
        msg = msg.header(k, v);
    }
    Ok(msg)
}
