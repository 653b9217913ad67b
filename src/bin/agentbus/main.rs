//! `agentbus`: the command-line face of the agentbus crate, for shell, Python and cron
//! agents sharing a bus directory with Rust programs.
//!
//! Output is JSON, one object per line, on stdout; errors are one JSON object on stderr
//! and a non-zero exit (the codes are listed in `output.rs`).
//!
//! This file holds the global flags, the list of verbs and the dispatch; each verb, its
//! arguments beside the code that runs it, is a module under `commands/`.

mod commands;
mod lines;
mod output;

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use commands::{
    ack, compact, doctor, extend, group, handoff, init, kv, lease, mailbox, nack, recv, replay,
    send, stats, term, verify, watch,
};
use output::{print_warnings, report, Failure};

#[derive(Parser, Debug)]
#[command(
    name = "agentbus",
    version,
    about = "Mailboxes, leases and handoffs for agents sharing a directory"
)]
struct Cli {
    /// The bus: a directory, or with the `nats` feature a NATS JetStream server,
    /// `nats://host:port[,host:port...][/namespace][?replicas=N]`. `--bus` is the same option.
    #[arg(
        long,
        visible_alias = "bus",
        global = true,
        env = "AGENTBUS_DIR",
        default_value = ".agentbus"
    )]
    dir: PathBuf,
    /// Who you are: the sender of `send` and `handoff send`, the consumer of
    /// `recv --group` and `watch --group`, the holder of leases, the agent that answers
    /// a handoff. `--from`, `--consumer` and `--holder` override it for one command.
    #[arg(long, global = true, env = "AGENTBUS_AGENT")]
    agent: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// The verbs, in the order `agentbus --help` lists them. Each one's help text is the
/// doc comment of its arguments type.
#[derive(Subcommand, Debug)]
enum Command {
    Init(init::InitArgs),
    #[command(subcommand)]
    Mailbox(mailbox::MailboxCommand),
    Send(send::SendArgs),
    Recv(recv::RecvArgs),
    Watch(watch::WatchArgs),
    Ack(ack::AckArgs),
    Nack(nack::NackArgs),
    Extend(extend::ExtendArgs),
    Term(term::TermArgs),
    #[command(subcommand)]
    Group(group::GroupCommand),
    Stats(stats::StatsArgs),
    Compact(compact::CompactArgs),
    Replay(replay::ReplayArgs),
    #[command(subcommand)]
    Lease(lease::LeaseCommand),
    #[command(subcommand)]
    Kv(kv::KvCommand),
    #[command(subcommand)]
    Handoff(handoff::HandoffCommand),
    Verify(verify::VerifyArgs),
    Doctor(doctor::DoctorArgs),
}

fn main() -> ExitCode {
    print_warnings();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        // A person at a terminal reads clap's own text (with its colours and line
        // breaks); a script reading stderr gets the one JSON object every error is.
        Err(e) if io::stderr().is_terminal() => {
            eprintln!("{}", usage_text(&e));
            return ExitCode::from(2);
        }
        Err(e) => return report(Failure::Usage(usage_text(&e))),
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

/// clap's text for a usage error. Its usage line names the global options that were
/// given (from the environment too), where `--dir <DIR>` would read as required: they
/// are left out of it.
fn usage_text(e: &clap::Error) -> String {
    let text = e.to_string();
    let lines: Vec<_> = text
        .trim_end()
        .lines()
        .map(|line| match line.strip_prefix("Usage:") {
            Some(usage) => format!(
                "Usage:{}",
                usage
                    .replace(" --dir <DIR>", "")
                    .replace(" --agent <AGENT>", "")
            ),
            None => line.to_owned(),
        })
        .collect();
    lines.join("\n")
}

fn run(cli: Cli, out: &mut impl Write) -> Result<(), Failure> {
    match &cli.command {
        Command::Init(args) => init::run(&cli, args, out),
        Command::Mailbox(cmd) => mailbox::run(&cli, cmd, out),
        Command::Send(args) => send::run(&cli, args, out),
        Command::Recv(args) => recv::run(&cli, args, out),
        Command::Watch(args) => watch::run(&cli, args, out),
        Command::Ack(args) => ack::run(&cli, args, out),
        Command::Nack(args) => nack::run(&cli, args, out),
        Command::Extend(args) => extend::run(&cli, args, out),
        Command::Term(args) => term::run(&cli, args, out),
        Command::Group(cmd) => group::run(&cli, cmd, out),
        Command::Stats(args) => stats::run(&cli, args, out),
        Command::Compact(args) => compact::run(&cli, args, out),
        Command::Replay(args) => replay::run(&cli, args, out),
        Command::Lease(cmd) => lease::run(&cli, cmd, out),
        Command::Kv(cmd) => kv::run(&cli, cmd, out),
        Command::Handoff(cmd) => handoff::run(&cli, cmd, out),
        Command::Verify(args) => verify::run(&cli, args, out),
        Command::Doctor(args) => doctor::run(&cli, args, out),
    }
}
