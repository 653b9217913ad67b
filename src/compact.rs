//! Compaction (removing consumed segments) and statistics.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::error::IoContext;
use crate::{fsutil, log, Bus, GroupStats, Mailbox, Result};

/// What [`Mailbox::compact`] removed.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct CompactReport {
    /// The mailbox.
    pub mailbox: String,
    /// The lowest seq still unsettled in some group (`None` without groups).
    pub floor: Option<u64>,
    /// The segment files removed.
    pub removed: Vec<PathBuf>,
    /// Their total size in bytes.
    pub bytes: u64,
}

/// Counters of one mailbox and its groups, from [`Mailbox::stats`].
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct MailboxStats {
    /// The mailbox.
    pub mailbox: String,
    /// Messages ever published: the newest seq.
    pub published: u64,
    /// The oldest seq still stored (compaction removes older ones).
    pub first_seq: u64,
    /// Segment files.
    pub segments: u64,
    /// Bytes stored in segments.
    pub bytes: u64,
    /// One entry per consumer group.
    pub groups: Vec<GroupStats>,
}

impl Mailbox {
    /// Removes the oldest segments whose messages every group has settled (acked,
    /// terminated or dead-lettered). With `retention`, only segments last written more
    /// than `retention` ago go; a mailbox without groups is compacted by `retention`
    /// alone, and not at all without one. The newest segment is never removed, so the
    /// log stays a contiguous range of seqs.
    ///
    /// Readers in the middle of a removed segment keep reading it (an open file
    /// outlives its name); readers that start afterwards begin at the oldest segment
    /// left.
    ///
    /// ```
    /// # fn main() -> agentbus::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let bus = agentbus::Bus::builder().segment_bytes(1024).init(dir.path())?;
    /// let mb = bus.create_mailbox("jobs")?;
    /// let workers = mb.create_group("workers")?;
    /// for i in 0..50 {
    ///     mb.send(agentbus::NewMessage::new("job").body(i.to_string()))?;
    /// }
    /// for d in workers.claim("w", 50)? {
    ///     d.ack()?;
    /// }
    /// let report = mb.compact(None)?;
    /// assert!(!report.removed.is_empty());
    /// assert_eq!(mb.stats()?.published, 50);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io).
    pub fn compact(&self, retention: Option<Duration>) -> Result<CompactReport> {
        #[cfg(feature = "nats")]
        if self.remote().is_some() {
            let _ = retention;
            return Err(crate::Error::unsupported(
                "compact",
                "set the stream's limits (max_age, max_bytes) in JetStream instead",
            ));
        }
        // No group may be created while we decide what to remove.
        let _no_new_groups = self.groups_lock(false)?;
        let mut floor: Option<u64> = None;
        for name in self.groups()? {
            let f = self.group(&name)?.floor()?;
            floor = Some(floor.map_or(f, |m: u64| m.min(f)));
        }
        let log_dir = self.path().join("log");
        let segments = log::list_segments(&log_dir)?;
        let cutoff = retention.map(|r| SystemTime::now() - r);
        let mut report = CompactReport {
            mailbox: self.name().to_owned(),
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
            let meta = std::fs::symlink_metadata(&path).ctx("stat", &path)?;
            if let Some(cutoff) = cutoff {
                if meta.modified().ctx("stat", &path)? > cutoff {
                    break;
                }
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                // A concurrent compaction got there first.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(crate::Error::io("remove", path, e)),
            }
            report.bytes += meta.len();
            report.removed.push(path);
        }
        if !report.removed.is_empty() && self.bus().opts.sync() {
            fsutil::sync_dir(&log_dir)?;
        }
        Ok(report)
    }

    /// Counters of this mailbox and each of its groups.
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io), [`Error::Corrupt`](crate::Error::Corrupt) if the
    /// newest record is damaged.
    pub fn stats(&self) -> Result<MailboxStats> {
        let log_dir = self.path().join("log");
        #[cfg(feature = "nats")]
        let segments = if self.remote().is_some() {
            Vec::new()
        } else {
            log::list_segments(&log_dir)?
        };
        #[cfg(not(feature = "nats"))]
        let segments = log::list_segments(&log_dir)?;
        let mut bytes = 0;
        for first in &segments {
            let path = log_dir.join(log::segment_name(*first));
            if let Ok(meta) = std::fs::symlink_metadata(&path) {
                bytes += meta.len();
            }
        }
        let groups = self
            .groups()?
            .iter()
            .map(|g| self.group(g)?.stats())
            .collect::<Result<Vec<_>>>()?;
        Ok(MailboxStats {
            mailbox: self.name().to_owned(),
            published: self.last_seq()?,
            first_seq: self.first_seq()?,
            segments: segments.len() as u64,
            bytes,
            groups,
        })
    }
}

impl Bus {
    /// Compacts every mailbox; see [`Mailbox::compact`].
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io).
    pub fn compact(&self, retention: Option<Duration>) -> Result<Vec<CompactReport>> {
        self.mailboxes()?
            .iter()
            .map(|name| self.mailbox(name)?.compact(retention))
            .collect()
    }
}
