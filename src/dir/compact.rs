//! Compaction: removing the oldest segments every group has settled.

use std::time::{Duration, SystemTime};

use super::group::{groups_lock, Group};
use super::segment as log;
use super::Mailbox;
use crate::backend::MailboxBackend;
use crate::error::IoContext;
use crate::report::CompactReport;
use crate::Result;

/// Removes the oldest segments of `mailbox` whose messages every group has settled
/// (see [`Mailbox::compact`](crate::Mailbox::compact) for the rules).
pub(crate) fn compact(mailbox: &Mailbox, retention: Option<Duration>) -> Result<CompactReport> {
    // No group may be created while we decide what to remove.
    let _no_new_groups = groups_lock(mailbox, false)?;
    let mut floor: Option<u64> = None;
    for name in mailbox.group_names()? {
        if let Some(group) = Group::open(mailbox, &name)? {
            let f = group.floor()?;
            floor = Some(floor.map_or(f, |m: u64| m.min(f)));
        }
    }
    mailbox.with_keys_indexed(|| remove_settled(mailbox, floor, retention))
}

/// Removes the segments below `floor` (and older than `retention`, if given).
fn remove_settled(
    mailbox: &Mailbox,
    floor: Option<u64>,
    retention: Option<Duration>,
) -> Result<CompactReport> {
    let log_dir = mailbox.log_dir();
    let fs = mailbox.bus().fs();
    let segments = log::list_segments(fs, log_dir)?;
    let cutoff = retention.map(|r| SystemTime::now() - r);
    let mut report = CompactReport {
        mailbox: mailbox.name().to_owned(),
        floor,
        removed: Vec::new(),
        bytes: 0,
    };
    for pair in segments.windows(2) {
        let (first, next_first) = (pair[0], pair[1]);
        let settled = match floor {
            // Every record of this segment is below the next segment's first seq.
            Some(f) => next_first <= f,
            None => cutoff.is_some(),
        };
        if !settled {
            break;
        }
        let path = log_dir.join(log::segment_name(first));
        let meta = fs.stat(&path).ctx("stat", &path)?;
        if let Some(cutoff) = cutoff {
            if meta.modified > cutoff {
                break;
            }
        }
        match fs.remove_file(&path) {
            Ok(()) => {}
            // A concurrent compaction got there first.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(crate::Error::io("remove", path, e)),
        }
        report.bytes += meta.len;
        report.removed.push(path);
    }
    if !report.removed.is_empty() && mailbox.bus().opts().sync() {
        fs.sync_dir(log_dir)?;
    }
    Ok(report)
}
