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

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use agentbus::{Artifact, Bus, Durability, Error, NewMessage};
use clap::{Args, Parser, Subcommand, ValueEnum};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(
    name = "agentbus",
    version,
    about = "Mailboxes, leases and handoffs for agents sharing a directory"
)]
struct Cli {
    /// The bus directory.
    #[arg(long, global = true, env = "AGENTBUS_DIR", default_value = ".agentbus")]
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
}

/// A CLI failure: a crate error, or a usage problem found by the CLI itself.
enum Failure {
    Bus(Error),
    Usage(String),
    Unclean,
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
        Failure::Bus(e) => {
            let mut v = json!({"error": e.code(), "message": e.to_string()});
            if let Some(path) = e.path() {
                v["path"] = json!(path);
            }
            match &e {
                Error::MailboxNotFound { existing, .. } => v["existing"] = json!(existing),
                Error::Corrupt { line, .. } => v["line"] = json!(line),
                _ => {}
            }
            (v, if e.is_invalid_input() { 2 } else { 1 })
        }
    };
    eprintln!("{value}");
    ExitCode::from(code)
}

fn open_bus(cli: &Cli) -> Result<Bus, Failure> {
    Ok(Bus::builder()
        .durability(match cli.durability {
            DurabilityArg::Sync => Durability::Sync,
            DurabilityArg::Flush => Durability::Flush,
        })
        .open(&cli.dir)?)
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
        Command::Recv(args) => {
            let bus = open_bus(&cli)?;
            let mut messages = bus
                .mailbox(&args.mailbox)?
                .messages()
                .from_seq(args.from_seq);
            for kind in &args.kinds {
                messages = messages.of_type(kind);
            }
            if let Some(from) = &args.from {
                messages = messages.sender(from);
            }
            if let Some(id) = &args.correlation_id {
                messages = messages.correlation_id(id);
            }
            for message in messages.take(args.max.unwrap_or(usize::MAX)) {
                emit(out, &message?)?;
            }
            Ok(())
        }
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
