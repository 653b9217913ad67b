//! Lost-seqs notices: how a log says that seqs were handed out and then lost with
//! the machine's power.

use std::ops::RangeInclusive;

use crate::Message;

/// The type of the notice a writer appends when a power cut took records that `Flush`
/// sends had already been given receipts for (only `Sync` sends survive power loss).
/// Its seq comes after every seq that may have been handed out before the cut, so no
/// seq is ever handed out twice; [`Message::lost_seqs`] says which seqs it stands for,
/// and readers read on after it. It is delivered like any message (from `agentbus`),
/// so every group and follower learns of the loss (one that filters by type, only if
/// its filter admits this type).
pub const LOST_TYPE: &str = "agentbus.lost";

/// The header of a [`LOST_TYPE`] notice that holds the first seq it covers (its own
/// seq minus one is the last).
pub const LOST_FROM_HEADER: &str = "agentbus-lost-from";

impl Message {
    /// For a [`LOST_TYPE`] notice, the seqs it stands for: some or all of them went out
    /// in receipts of `Flush` sends and were lost in a power cut. `None` for any other
    /// message.
    ///
    /// ```
    /// # fn main() -> agentbus::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let bus = agentbus::Bus::builder().agent("main").init(dir.path())?;
    /// let tasks = bus.create_mailbox("tasks")?;
    /// tasks.send(agentbus::NewMessage::new("task"))?;
    /// for m in tasks.messages() {
    ///     let m = m?;
    ///     if let Some(seqs) = m.lost_seqs() {
    ///         eprintln!("messages {seqs:?} were lost in a power cut: ask for them again");
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn lost_seqs(&self) -> Option<RangeInclusive<u64>> {
        if self.kind != LOST_TYPE {
            return None;
        }
        let from: u64 = self.headers.get(LOST_FROM_HEADER)?.parse().ok()?;
        (from < self.seq).then(|| from..=self.seq - 1)
    }
}
