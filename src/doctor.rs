//! `doctor`: verify every record of the bus; optionally repair torn tails.

use crate::report::DoctorReport;
use crate::{Bus, Result};

impl Bus {
    /// Reads and verifies every record of every mailbox, holding each mailbox's append
    /// lock while it is checked (writers to it wait). With `repair`, torn tails are
    /// truncated; damaged records are reported and left in place.
    ///
    /// ```
    /// # fn main() -> agentbus::Result<()> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let bus = agentbus::Bus::init(dir.path())?;
    /// bus.create_mailbox("main")?.send(agentbus::NewMessage::new("hello"))?;
    /// let report = bus.doctor(false)?;
    /// assert!(report.is_clean());
    /// assert_eq!(report.records, 1);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::Io`](crate::Error::Io) when a mailbox cannot be read at all; damage is reported in the
    /// [`DoctorReport`], not as an error.
    pub fn doctor(&self, repair: bool) -> Result<DoctorReport> {
        self.inner.imp.doctor(repair)
    }
}
