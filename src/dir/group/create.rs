//! Creating a group: built under a temporary name, renamed into place.

use std::fs::File;

use super::state::{Checkpoint, GroupState};
use super::state_path;
use crate::backend::GroupMeta;
use crate::dir::fsutil::Flock;
use crate::dir::{Mailbox, FORMAT_VERSION};
use crate::{Error, Result};

/// Creates group `name` of `mailbox`, starting at its first stored message or, with
/// `from_end`, after its last one.
pub(crate) fn create(
    mailbox: &Mailbox,
    name: &str,
    meta: &GroupMeta,
    from_end: bool,
) -> Result<()> {
    let exists = || Error::GroupExists {
        mailbox: mailbox.name().to_owned(),
        name: name.to_owned(),
    };
    let opts = mailbox.bus().opts();
    let fs = mailbox.bus().fs();
    let groups = mailbox.dir().join("groups");
    fs.create_dir(&groups)?;
    let dir = groups.join(name);
    if fs.exists(&dir) {
        return Err(exists());
    }
    // Compaction holds this lock shared while it decides what to remove: a group
    // created meanwhile would otherwise lose the segments it starts in.
    let _creating = groups_lock(mailbox, true)?;
    let start = if from_end {
        mailbox.last_seq()? + 1
    } else {
        mailbox.first_seq()?
    };
    let sync = opts.sync();
    fs.build_dir(&dir, sync, exists, |tmp| {
        let write = |file: &str, bytes: Vec<u8>| fs.write_atomic(&tmp.join(file), &bytes, sync);
        write(
            "group.json",
            serde_json::to_vec(meta).expect("metadata serializes"),
        )?;
        let cp = Checkpoint {
            format: FORMAT_VERSION,
            gen: 0,
            offset: 0,
            state: GroupState::new(start),
        };
        write(
            "checkpoint.json",
            serde_json::to_vec(&cp).expect("checkpoint serializes"),
        )?;
        fs.open_append(&state_path(tmp, 0))?;
        fs.open_lock(&tmp.join("lock"))?;
        if sync {
            fs.sync_dir(tmp)?;
        }
        Ok(())
    })?;
    if sync {
        // `groups/` is created with the first group: its own entry needs the mailbox
        // directory synced too.
        fs.sync_dir(mailbox.dir())?;
    }
    Ok(())
}

/// Takes `groups/.lock` of `mailbox` (exclusive when creating a group, shared when
/// compacting).
pub(crate) fn groups_lock(mailbox: &Mailbox, exclusive: bool) -> Result<Flock<File>> {
    let fs = mailbox.bus().fs();
    let groups = mailbox.dir().join("groups");
    fs.create_dir(&groups)?;
    let path = groups.join(".lock");
    let file = fs.open_lock(&path)?;
    if exclusive {
        Flock::exclusive(file, &path)
    } else {
        Flock::shared(file, &path)
    }
}
