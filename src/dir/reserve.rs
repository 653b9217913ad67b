//! The seqs a `Flush` writer may have handed out: what keeps a power cut from making a
//! seq be handed out twice.
//!
//! A `Flush` send returns before its record is on disk, so a power cut can take the
//! tail of a log after its seqs went out in receipts (and to readers). Before a writer
//! hands out a seq that is not yet durable, it makes durable a reservation,
//! `mailboxes/<name>/reserved`: `{"boot":"<boot id>","through":N}`, every seq up to `N`
//! may have been handed out during that boot of the machine. Reserving ahead by
//! [`RESERVE`] seqs makes that one atomic file write per [`RESERVE`] sends.
//!
//! The first writer after a reboot (the boot id differs) whose log ends before
//! `through` cannot know which of the seqs after the end went out: it appends one
//! lost-seqs notice ([`crate::LOST_TYPE`]) with seq `through + 1` that covers all of
//! them, and the log goes on after it. `Sync` sends are durable before their receipt and
//! need no reservation.

use std::io::Read;
use std::path::Path;
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use super::fsutil::Fs;
use crate::error::IoContext;
use crate::{Error, Result};

/// How far ahead of its last seq a `Flush` writer reserves.
pub(crate) const RESERVE: u64 = 16_384;

/// The reservation file's name in a mailbox directory.
pub(crate) const FILE: &str = "reserved";

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Reservation {
    pub(crate) boot: String,
    pub(crate) through: u64,
}

/// This boot of the machine: the kernel's random boot id, which changes on every boot
/// (a power cut included). `AGENTBUS_BOOT_ID` overrides it, for tests that simulate a
/// power cut without rebooting.
pub(crate) fn boot_id() -> &'static str {
    static BOOT: OnceLock<String> = OnceLock::new();
    BOOT.get_or_init(|| {
        if let Some(id) = std::env::var("AGENTBUS_BOOT_ID")
            .ok()
            .filter(|s| !s.is_empty())
        {
            return id;
        }
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| "unknown".to_owned())
    })
}

/// The reservation at `path`, if one was ever written.
pub(crate) fn read(fs: &Fs, path: &Path) -> Result<Option<Reservation>> {
    let file = match fs.open_read_opt(path)? {
        Some(f) => f,
        None => return Ok(None),
    };
    let mut bytes = Vec::new();
    (&file)
        .take(4096)
        .read_to_end(&mut bytes)
        .ctx("read", path)?;
    // Written only by an atomic rename, so never torn: anything else was put there.
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| Error::Corrupt {
            path: path.to_owned(),
            line: 1,
            reason: format!(
                "not a seq reservation ({e}); delete the file only if no Flush send \
                 ran on this mailbox since the machine last started"
            ),
        })
}

/// Makes durable that seqs up to `through` may be handed out during this boot.
pub(crate) fn write(fs: &Fs, path: &Path, through: u64) -> Result<()> {
    let r = Reservation {
        boot: boot_id().to_owned(),
        through,
    };
    let mut bytes = serde_json::to_vec(&r).expect("a reservation serializes");
    bytes.push(b'\n');
    fs.write_atomic(path, &bytes, true)
}
