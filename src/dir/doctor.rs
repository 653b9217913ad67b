//! `doctor`: verify every record of every mailbox; optionally repair torn tails.

use std::io::Read;
use std::path::PathBuf;

use super::fsutil::Fs;
use super::group::Group;
use super::lease::LeaseFiles;
use super::read::Reader;
use super::segment as log;
use super::{Bus, Mailbox};
use crate::backend::{BusBackend, GroupBackend, MailboxBackend};
use crate::error::IoContext;
use crate::report::{DoctorReport, Problem, ProblemKind};
use crate::{Error, Result};

/// Reads and verifies every record of the bus, holding each mailbox's append lock
/// while it is checked; with `repair`, cuts torn tails.
pub(crate) fn run(bus: &Bus, repair: bool) -> Result<DoctorReport> {
    let mut report = DoctorReport::default();
    for mailbox in bus.all_mailboxes()? {
        report.mailboxes += 1;
        mailbox.with_append_lock(|| check_mailbox(&mailbox, repair, &mut report))??;
    }
    // Lease files, outside any mailbox. Loading a lease (under its lock) cuts a torn
    // tail, so a repair loads every lease first.
    if repair {
        for name in bus.lease_names()? {
            let _ = LeaseFiles::new(bus, &name).info();
        }
    }
    let leases = bus.root().join("leases");
    let mut problem = |path, line, kind, detail, repaired| {
        add(&mut report, "", path, line, kind, detail, repaired)
    };
    check_records(
        bus.fs(),
        &leases,
        |name| name.ends_with(".jsonl"),
        false,
        &mut problem,
    )?;
    Ok(report)
}

fn check_mailbox(mailbox: &Mailbox, repair: bool, report: &mut DoctorReport) -> Result<()> {
    let name = mailbox.name();
    let mut problem =
        |path, line, kind, detail, repaired| add(report, name, path, line, kind, detail, repaired);
    let mut messages = Reader::new(mailbox.log_spec());
    let mut records = 0;
    for item in messages.by_ref() {
        match item {
            Ok(_) => records += 1,
            Err(Error::Corrupt { path, line, reason }) => {
                problem(path, line, ProblemKind::Damaged, reason, false)
            }
            Err(e) => return Err(e),
        }
    }
    let log_dir = mailbox.log_dir();
    let fs = mailbox.bus().fs();
    let segments = log::list_segments(fs, log_dir)?;
    let reached = messages.segment_first();
    let at_newest = reached.is_some() && reached == segments.last().copied();
    if let Some((path, line, offset)) = messages.pending_partial()? {
        if at_newest {
            // A writer died mid-append: safe to cut, the record was never acknowledged.
            if repair {
                cut(fs, &path, offset)?;
            }
            let detail = format!("incomplete final record at byte {offset}");
            problem(path, line, ProblemKind::TornTail, detail, repair);
        } else {
            // In a sealed segment the bytes may be a whole record that lost its newline.
            let detail = format!("incomplete record at byte {offset} of a sealed segment");
            problem(path, line, ProblemKind::Damaged, detail, false);
        }
    }
    // The scan follows segments by name (the next seq); any segment after the one it
    // ended in was never reached.
    for first in segments
        .into_iter()
        .filter(|&f| reached.is_some_and(|r| f > r))
    {
        problem(
            log_dir.join(log::segment_name(first)),
            0,
            ProblemKind::Damaged,
            "segment not reachable from the previous one (seq gap between segments)".into(),
            false,
        );
    }
    // The key index is only written under the append lock, which we hold.
    check_records(
        fs,
        &mailbox.dir().join("keys"),
        |n| n.ends_with(".jsonl"),
        repair,
        &mut problem,
    )?;
    let next_seq = mailbox.last_seq()? + 1;
    for group in mailbox.group_names()? {
        let dir = mailbox.dir().join("groups").join(&group);
        let open = || Group::open(mailbox, &group).ok().flatten();
        if repair {
            // A refresh under the group's lock cuts a torn state tail.
            if let Some(g) = open() {
                let _ = g.stats();
            }
        }
        check_records(
            fs,
            &dir,
            |n| n.starts_with("state.") && n.ends_with(".jsonl"),
            false,
            &mut problem,
        )?;
        // How far it has read (a refresh, as `stats` does).
        let Some(g) = open() else { continue };
        let Ok(stats) = g.stats() else { continue };
        if stats.next_seq > next_seq {
            // Its log lost records it had seen: a power cut took a tail that was not
            // synced (by an older release, or a group on a Flush bus).
            let detail = format!(
                "group {group:?} has read up to seq {}, but the log ends at seq {}: \
                 the log lost records the group had seen, and messages given seqs up \
                 to {} will not reach this group (FORMAT.md, \"Power loss\")",
                stats.next_seq - 1,
                next_seq - 1,
                stats.next_seq - 1,
            );
            problem(dir, 0, ProblemKind::AheadOfLog, detail, false);
        }
    }
    report.records += records;
    Ok(())
}

/// Cuts the file at `len` (a torn tail), never through a symlink or a hard link.
fn cut(fs: &Fs, path: &std::path::Path, len: u64) -> Result<()> {
    let file = fs.open_write(path)?;
    file.set_len(len).ctx("truncate torn tail", path)?;
    file.sync_data().ctx("fdatasync", path)
}

/// Records a problem found in `mailbox` (empty: outside any mailbox).
fn add(
    report: &mut DoctorReport,
    mailbox: &str,
    path: PathBuf,
    line: u64,
    kind: ProblemKind,
    detail: String,
    repaired: bool,
) {
    report.problems.push(Problem {
        mailbox: mailbox.to_owned(),
        path,
        line,
        kind,
        detail,
        repaired,
    });
}

/// Every complete line of the record files in `dir` whose names pass `pick` (the key
/// index, group state, lease files) must verify and parse. A damaged one is reported;
/// an incomplete last line is reported as a torn tail, and cut if `cut_torn` (the
/// caller holds the lock its writers take).
fn check_records(
    fs: &Fs,
    dir: &std::path::Path,
    pick: impl Fn(&str) -> bool,
    cut_torn: bool,
    problem: &mut impl FnMut(PathBuf, u64, ProblemKind, String, bool),
) -> Result<()> {
    let entries = match fs.list(dir, true) {
        Ok(entries) => entries,
        // A symlink or a file planted where the directory belongs: reported, not
        // followed.
        Err(e @ (Error::UnsafeFile { .. } | Error::Untrusted { .. })) => {
            problem(
                dir.to_owned(),
                0,
                ProblemKind::Damaged,
                e.to_string(),
                false,
            );
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let mut paths: Vec<PathBuf> = Vec::new();
    for (name, _) in entries {
        if name.to_str().is_some_and(&pick) {
            paths.push(dir.join(name));
        }
    }
    paths.sort();
    for path in paths {
        let mut text = Vec::new();
        let read = fs
            .open_read(&path)
            .and_then(|mut f| f.read_to_end(&mut text).ctx("read", &path));
        if let Err(e) = read {
            // A symlink, a FIFO or a directory planted here, say: reported, never
            // followed or read.
            problem(
                path,
                0,
                ProblemKind::Damaged,
                format!("cannot read: {e}"),
                false,
            );
            continue;
        }
        let complete = text.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let mut line = 0;
        for bytes in text[..complete].split(|&b| b == b'\n') {
            line += 1;
            if bytes.is_empty() {
                continue;
            }
            if let Err(Error::Corrupt { reason, .. }) =
                log::decode::<serde_json::Value>(bytes, &path, line)
            {
                problem(path.clone(), line, ProblemKind::Damaged, reason, false);
            }
        }
        if complete < text.len() {
            if cut_torn {
                cut(fs, &path, complete as u64)?;
            }
            let detail =
                format!("incomplete final record at byte {complete} (the next writer cuts it)");
            problem(path.clone(), line, ProblemKind::TornTail, detail, cut_torn);
        }
    }
    Ok(())
}
