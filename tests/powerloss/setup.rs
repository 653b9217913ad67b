//! A power cut right after the bus, a mailbox or a group was created (with `Sync`,
//! the default) leaves it usable: each of these lost a name or a file's contents
//! before (the bus directory's entry in its parent; `mailbox.json`, written without
//! an fsync; `groups/`, whose entry in the mailbox directory was never synced).

use agentbus::{Bus, NewMessage};

use std::path::{Path, PathBuf};

use crate::disk::Cut;
use crate::fuse::{Mounted, SharedDisk};
use crate::{fuse_here, power_cut};

#[test]
fn a_bus_just_created_survives_a_power_cut() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((disk, mounted, mnt)) = fuse_here(tmp.path()) else {
        return;
    };
    drop(Bus::init(mnt.join("bus")).unwrap());
    let mounted = power_cut(mounted, &disk, Cut::Strict, |_| 0);
    let bus = Bus::open(mnt.join("bus")).expect("the bus survives");
    assert!(bus.mailboxes().unwrap().is_empty());
    unmount(mounted, bus);
}

#[test]
fn a_mailbox_just_created_survives_a_power_cut() {
    let Some((_tmp, disk, mounted, root, bus)) = synced_bus() else {
        return;
    };
    bus.create_mailbox("jobs").unwrap();
    drop(bus);
    let mounted = power_cut(mounted, &disk, Cut::Strict, |_| 0);
    let bus = Bus::open(&root).unwrap();
    let receipt = bus
        .mailbox("jobs")
        .expect("the mailbox survives")
        .send(NewMessage::new("job"))
        .unwrap();
    assert_eq!(receipt.seq, 1);
    assert!(bus.doctor(false).unwrap().problems.is_empty());
    unmount(mounted, bus);
}

#[test]
fn a_group_just_created_survives_a_power_cut() {
    let Some((_tmp, disk, mounted, root, bus)) = synced_bus() else {
        return;
    };
    let jobs = bus.create_mailbox("jobs").unwrap();
    sync(&root.join("mailboxes/jobs/mailbox.json")); // the test above
    jobs.send(NewMessage::new("job")).unwrap();
    jobs.create_group("workers").unwrap();
    drop((jobs, bus));
    let mounted = power_cut(mounted, &disk, Cut::Strict, |_| 0);
    let bus = Bus::open(&root).unwrap();
    let group = bus
        .mailbox("jobs")
        .unwrap()
        .group("workers")
        .expect("the group survives");
    let claimed = group.claim("c", 10).unwrap();
    assert_eq!(crate::common::seqs(&claimed), [1]);
    unmount(mounted, (claimed, group, bus));
}

/// A new bus `bus` on a power-loss file system mounted in a new temporary directory,
/// its own entry synced (what `a_bus_just_created_survives_a_power_cut` is about): the
/// directory, the disk, the mount, the bus's path and the bus. `None` where FUSE cannot
/// run.
fn synced_bus() -> Option<(tempfile::TempDir, SharedDisk, Mounted, PathBuf, Bus)> {
    let tmp = tempfile::tempdir().unwrap();
    let (disk, mounted, mnt) = fuse_here(tmp.path())?;
    let root = mnt.join("bus");
    let bus = Bus::init(&root).unwrap();
    sync(&mnt);
    Some((tmp, disk, mounted, root, bus))
}

/// Drops what a test still holds of the bus, then unmounts.
fn unmount(mounted: Mounted, held: impl Sized) {
    drop(held);
    mounted.unmount().unwrap();
}

/// fsyncs a file or directory, for what another test of this file is about.
fn sync(path: &Path) {
    std::fs::File::open(path).unwrap().sync_all().unwrap();
}
