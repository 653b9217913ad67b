//! Compaction (removing consumed segments) and statistics.

use std::time::Duration;

use crate::report::{CompactReport, MailboxStats};
use crate::{Bus, Mailbox, Result};

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
        self.imp().compact(retention)
    }

    /// Counters of this mailbox and each of its groups.
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io), [`Error::Corrupt`](crate::Error::Corrupt) if the
    /// newest record is damaged.
    pub fn stats(&self) -> Result<MailboxStats> {
        let (segments, bytes) = self.imp().storage()?;
        let groups = self
            .groups()?
            .iter()
            .map(|g| self.group(g)?.stats())
            .collect::<Result<Vec<_>>>()?;
        Ok(MailboxStats {
            mailbox: self.name().to_owned(),
            published: self.last_seq()?,
            first_seq: self.first_seq()?,
            segments,
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
