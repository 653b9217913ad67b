//! The disk model behind the power-loss file system: every file and directory has a
//! *live* state (what processes see) and a *durable* state (what survives a power
//! cut). The durability rules are the strict reading of Linux's `fsync(2)`:
//!
//! - A file's data and size become durable when that file is fsynced or fdatasynced
//!   (the two are the same here: the model keeps no timestamps durable apart).
//! - A directory entry (a create, `mkdir`, rename or unlink in that directory) becomes
//!   durable only when *that directory* is fsynced. fsyncing the file does not make
//!   its name durable ("Calling fsync() does not necessarily ensure that the entry in
//!   the directory containing the file has also reached disk. For that an explicit
//!   fsync() on a file descriptor for the directory is also needed.", fsync(2)); ext4
//!   happens to commit the name with the file in most cases, which is why a program
//!   tested only on ext4 can get this wrong.
//! - A rename within one directory is atomic: after a cut the directory holds the old
//!   name or the new one, never both or neither. A rename between two directories is
//!   two changes, each made durable by fsyncing its own directory (agentbus renames
//!   only within a directory).
//! - Permissions and owners are durable at once (they are not what this harness is
//!   about).
//!
//! A power cut ([`Disk::power_cut`]) replaces the live state with the durable one in
//! one of two ways, chosen per cut:
//!
//! - [`Cut::Strict`]: everything unsynced is lost, as LazyFS does for Jepsen.
//! - [`Cut::Prefix`]: besides the durable state, each file and directory keeps a
//!   random prefix of its unsynced changes, in order, and the first change left out
//!   may survive in part (a torn write): what a kernel that wrote some dirty pages back
//!   before the cut leaves behind.
//!
//! Files and directories that are no longer reachable from the root through durable
//! entries are gone after a cut (their inodes are freed), as are unlinked files that
//! were still open.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::time::SystemTime;

/// The root directory's inode number (FUSE's).
pub const ROOT: u64 = 1;

/// What a power cut keeps of the unsynced changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// Nothing unsynced survives.
    Strict,
    /// A random prefix of each file's and directory's unsynced changes survives, the
    /// next change possibly torn.
    Prefix,
}

/// One unsynced change to a file.
#[derive(Debug, Clone)]
pub enum FileOp {
    Write { offset: u64, data: Vec<u8> },
    Truncate(u64),
}

/// One unsynced change to a directory.
#[derive(Debug, Clone)]
pub enum DirOp {
    Insert(OsString, u64),
    Remove(OsString),
    Rename(OsString, OsString),
}

#[derive(Debug, Clone)]
pub enum Body {
    File {
        live: Vec<u8>,
        durable: Vec<u8>,
        pending: Vec<FileOp>,
    },
    Dir {
        live: BTreeMap<OsString, u64>,
        durable: BTreeMap<OsString, u64>,
        pending: Vec<DirOp>,
        parent: u64,
    },
}

/// An inode: its body and the attributes that are durable at once.
#[derive(Debug, Clone)]
pub struct Inode {
    pub body: Body,
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

impl Inode {
    pub fn is_dir(&self) -> bool {
        matches!(self.body, Body::Dir { .. })
    }

    pub fn size(&self) -> u64 {
        match &self.body {
            Body::File { live, .. } => live.len() as u64,
            Body::Dir { live, .. } => live.len() as u64 + 2,
        }
    }
}

/// Counters of what the disk did and what the cuts threw away.
#[derive(Debug, Clone, Default)]
pub struct DiskStats {
    pub writes: u64,
    pub fsyncs: u64,
    pub dir_fsyncs: u64,
    /// Unsynced file changes dropped by cuts (whole or, when torn, in part).
    pub dropped_file_changes: u64,
    /// Unsynced directory changes dropped by cuts.
    pub dropped_dir_changes: u64,
    /// Writes that a prefix cut kept in part.
    pub torn_writes: u64,
}

/// A directory's entries: (inode, is a directory, name).
pub type Listing = Vec<(u64, bool, OsString)>;

/// Errors of the model, as errnos.
pub type Errno = i32;

/// The whole disk. Cloning it clones the live and the durable state.
#[derive(Debug, Clone)]
pub struct Disk {
    pub inodes: HashMap<u64, Inode>,
    next_ino: u64,
    /// Powered off: every operation fails with `EIO` and nothing changes.
    pub frozen: bool,
    pub stats: DiskStats,
}

impl Disk {
    /// An empty disk: a root directory owned by `uid`/`gid`, durable.
    pub fn new(uid: u32, gid: u32) -> Disk {
        let now = SystemTime::now();
        let root = Inode {
            body: Body::Dir {
                live: BTreeMap::new(),
                durable: BTreeMap::new(),
                pending: Vec::new(),
                parent: ROOT,
            },
            perm: 0o755,
            uid,
            gid,
            nlink: 2,
            mtime: now,
            ctime: now,
        };
        Disk {
            inodes: HashMap::from([(ROOT, root)]),
            next_ino: ROOT + 1,
            frozen: false,
            stats: DiskStats::default(),
        }
    }

    pub fn get(&self, ino: u64) -> Result<&Inode, Errno> {
        self.inodes.get(&ino).ok_or(libc::ENOENT)
    }

    fn get_mut(&mut self, ino: u64) -> Result<&mut Inode, Errno> {
        self.inodes.get_mut(&ino).ok_or(libc::ENOENT)
    }

    fn entries(&self, dir: u64) -> Result<&BTreeMap<OsString, u64>, Errno> {
        match &self.get(dir)?.body {
            Body::Dir { live, .. } => Ok(live),
            Body::File { .. } => Err(libc::ENOTDIR),
        }
    }

    /// The inode `name` in directory `parent` names.
    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64, Errno> {
        self.entries(parent)?.get(name).copied().ok_or(libc::ENOENT)
    }

    /// The entries of a directory with `.` and `..`.
    pub fn list(&self, dir: u64) -> Result<Listing, Errno> {
        let parent = match &self.get(dir)?.body {
            Body::Dir { parent, .. } => *parent,
            Body::File { .. } => return Err(libc::ENOTDIR),
        };
        let mut out = vec![(dir, true, ".".into()), (parent, true, "..".into())];
        for (name, &ino) in self.entries(dir)? {
            out.push((ino, self.get(ino)?.is_dir(), name.clone()));
        }
        Ok(out)
    }

    /// Links a new inode with `body` into `parent` as `name`.
    pub fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        dir: bool,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> Result<u64, Errno> {
        if self.entries(parent)?.contains_key(name) {
            return Err(libc::EEXIST);
        }
        let ino = self.next_ino;
        self.next_ino += 1;
        let body = if dir {
            Body::Dir {
                live: BTreeMap::new(),
                durable: BTreeMap::new(),
                pending: Vec::new(),
                parent,
            }
        } else {
            Body::File {
                live: Vec::new(),
                durable: Vec::new(),
                pending: Vec::new(),
            }
        };
        let now = SystemTime::now();
        let nlink = if dir { 2 } else { 1 };
        self.inodes.insert(
            ino,
            Inode {
                body,
                perm,
                uid,
                gid,
                nlink,
                mtime: now,
                ctime: now,
            },
        );
        self.dir_change(parent, DirOp::Insert(name.to_owned(), ino))?;
        Ok(ino)
    }

    /// Applies `op` to the live entries of `dir` and records it as unsynced.
    fn dir_change(&mut self, dir: u64, op: DirOp) -> Result<(), Errno> {
        let inode = self.get_mut(dir)?;
        inode.mtime = SystemTime::now();
        inode.ctime = inode.mtime;
        let Body::Dir { live, pending, .. } = &mut inode.body else {
            return Err(libc::ENOTDIR);
        };
        apply_dir_op(live, &op);
        pending.push(op);
        Ok(())
    }

    /// Removes `name` from `parent`; `dir` says whether it must be an (empty)
    /// directory (`rmdir`) or must not be one (`unlink`).
    pub fn remove(&mut self, parent: u64, name: &OsStr, dir: bool) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        let target = self.get(ino)?;
        match (&target.body, dir) {
            (Body::Dir { live, .. }, true) if !live.is_empty() => return Err(libc::ENOTEMPTY),
            (Body::Dir { .. }, false) => return Err(libc::EISDIR),
            (Body::File { .. }, true) => return Err(libc::ENOTDIR),
            _ => {}
        }
        self.dir_change(parent, DirOp::Remove(name.to_owned()))?;
        let target = self.get_mut(ino)?;
        target.nlink = target.nlink.saturating_sub(1);
        target.ctime = SystemTime::now();
        Ok(())
    }

    /// `rename(2)` without flags, or with `RENAME_NOREPLACE` when `noreplace`.
    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        new_parent: u64,
        new_name: &OsStr,
        noreplace: bool,
    ) -> Result<(), Errno> {
        let ino = self.lookup(parent, name)?;
        self.entries(new_parent)?;
        let moving_dir = self.get(ino)?.is_dir();
        if let Ok(old) = self.lookup(new_parent, new_name) {
            if old == ino {
                return Ok(());
            }
            if noreplace {
                return Err(libc::EEXIST);
            }
            match (&self.get(old)?.body, moving_dir) {
                (Body::Dir { live, .. }, true) if !live.is_empty() => return Err(libc::ENOTEMPTY),
                (Body::Dir { .. }, false) => return Err(libc::EISDIR),
                (Body::File { .. }, true) => return Err(libc::ENOTDIR),
                _ => {}
            }
            let replaced = self.get_mut(old)?;
            replaced.nlink = replaced.nlink.saturating_sub(1);
        }
        if parent == new_parent {
            self.dir_change(parent, DirOp::Rename(name.to_owned(), new_name.to_owned()))?;
        } else {
            self.dir_change(parent, DirOp::Remove(name.to_owned()))?;
            self.dir_change(new_parent, DirOp::Insert(new_name.to_owned(), ino))?;
            if let Body::Dir { parent: p, .. } = &mut self.get_mut(ino)?.body {
                *p = new_parent;
            }
        }
        self.get_mut(ino)?.ctime = SystemTime::now();
        Ok(())
    }

    pub fn read(&self, ino: u64, offset: u64, size: u32) -> Result<&[u8], Errno> {
        match &self.get(ino)?.body {
            Body::File { live, .. } => {
                let start = (offset as usize).min(live.len());
                let end = start.saturating_add(size as usize).min(live.len());
                Ok(&live[start..end])
            }
            Body::Dir { .. } => Err(libc::EISDIR),
        }
    }

    pub fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> Result<(), Errno> {
        self.stats.writes += 1;
        let inode = self.get_mut(ino)?;
        inode.mtime = SystemTime::now();
        inode.ctime = inode.mtime;
        let Body::File { live, pending, .. } = &mut inode.body else {
            return Err(libc::EISDIR);
        };
        let op = FileOp::Write {
            offset,
            data: data.to_vec(),
        };
        apply_file_op(live, &op);
        pending.push(op);
        Ok(())
    }

    pub fn truncate(&mut self, ino: u64, size: u64) -> Result<(), Errno> {
        let inode = self.get_mut(ino)?;
        inode.mtime = SystemTime::now();
        inode.ctime = inode.mtime;
        let Body::File { live, pending, .. } = &mut inode.body else {
            return Err(libc::EISDIR);
        };
        let op = FileOp::Truncate(size);
        apply_file_op(live, &op);
        pending.push(op);
        Ok(())
    }

    pub fn set_attrs(
        &mut self,
        ino: u64,
        perm: Option<u16>,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<(), Errno> {
        let inode = self.get_mut(ino)?;
        if let Some(p) = perm {
            inode.perm = p;
        }
        if let Some(u) = uid {
            inode.uid = u;
        }
        if let Some(g) = gid {
            inode.gid = g;
        }
        inode.ctime = SystemTime::now();
        Ok(())
    }

    /// fsync, fdatasync or a directory fsync: the live state of `ino` becomes durable.
    pub fn sync(&mut self, ino: u64) -> Result<(), Errno> {
        let body = &mut self.inodes.get_mut(&ino).ok_or(libc::ENOENT)?.body;
        match body {
            Body::File {
                live,
                durable,
                pending,
            } => {
                self.stats.fsyncs += 1;
                durable.clone_from(live);
                pending.clear();
            }
            Body::Dir {
                live,
                durable,
                pending,
                ..
            } => {
                self.stats.dir_fsyncs += 1;
                durable.clone_from(live);
                pending.clear();
            }
        }
        Ok(())
    }

    /// Power is back after a cut: the live state becomes what the durable state (and,
    /// for [`Cut::Prefix`], the surviving unsynced changes) says, `pick(n)` (0 to `n`)
    /// choosing how many of `n` unsynced changes survive and how many bytes of the first
    /// lost write. Unreachable inodes are freed.
    pub fn power_cut(&mut self, cut: Cut, mut pick: impl FnMut(usize) -> usize) {
        let mut kept: HashMap<u64, Inode> = HashMap::new();
        let mut stack = vec![(ROOT, ROOT)];
        while let Some((ino, parent)) = stack.pop() {
            if kept.contains_key(&ino) {
                continue; // a second durable name of an inode: kept once
            }
            let Some(old) = self.inodes.get(&ino) else {
                continue;
            };
            let mut inode = old.clone();
            match &mut inode.body {
                Body::File {
                    live,
                    durable,
                    pending,
                } => {
                    let n = survivors(cut, &mut pick, pending.len());
                    for op in &pending[..n] {
                        apply_file_op(durable, op);
                    }
                    self.stats.dropped_file_changes += (pending.len() - n) as u64;
                    if let Some(FileOp::Write { offset, data }) = pending.get(n) {
                        let len = survivors(cut, &mut pick, data.len());
                        if len > 0 {
                            self.stats.torn_writes += 1;
                            let part = FileOp::Write {
                                offset: *offset,
                                data: data[..len].to_vec(),
                            };
                            apply_file_op(durable, &part);
                        }
                    }
                    live.clone_from(durable);
                    pending.clear();
                }
                Body::Dir {
                    live,
                    durable,
                    pending,
                    parent: p,
                } => {
                    let n = survivors(cut, &mut pick, pending.len());
                    for op in &pending[..n] {
                        apply_dir_op(durable, op);
                    }
                    self.stats.dropped_dir_changes += (pending.len() - n) as u64;
                    durable.retain(|_, child| self.inodes.contains_key(child));
                    live.clone_from(durable);
                    pending.clear();
                    *p = parent;
                    for &child in live.values() {
                        stack.push((child, ino));
                    }
                }
            }
            kept.insert(ino, inode);
        }
        // Directories name each inode at most once now; count the links again.
        let mut links: HashMap<u64, u32> = HashMap::new();
        for inode in kept.values() {
            if let Body::Dir { live, .. } = &inode.body {
                for child in live.values() {
                    *links.entry(*child).or_default() += 1;
                }
            }
        }
        for (ino, inode) in kept.iter_mut() {
            inode.nlink = if inode.is_dir() {
                2
            } else {
                links.get(ino).copied().unwrap_or(0)
            };
        }
        self.inodes = kept;
        self.frozen = false;
    }
}

/// How much of `n` unsynced changes (or bytes of a write) a cut keeps: what `pick(n)`
/// says for [`Cut::Prefix`] (at most `n`), nothing otherwise.
fn survivors(cut: Cut, pick: &mut impl FnMut(usize) -> usize, n: usize) -> usize {
    if cut == Cut::Prefix {
        pick(n).min(n)
    } else {
        0
    }
}

fn apply_file_op(data: &mut Vec<u8>, op: &FileOp) {
    match op {
        FileOp::Write {
            offset,
            data: bytes,
        } => {
            let start = *offset as usize;
            let end = start + bytes.len();
            if data.len() < end {
                data.resize(end, 0);
            }
            data[start..end].copy_from_slice(bytes);
        }
        FileOp::Truncate(size) => data.resize(*size as usize, 0),
    }
}

fn apply_dir_op(entries: &mut BTreeMap<OsString, u64>, op: &DirOp) {
    match op {
        DirOp::Insert(name, ino) => {
            entries.insert(name.clone(), *ino);
        }
        DirOp::Remove(name) => {
            entries.remove(name);
        }
        DirOp::Rename(from, to) => {
            if let Some(ino) = entries.remove(from) {
                entries.insert(to.clone(), ino);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk() -> Disk {
        Disk::new(0, 0)
    }

    #[test]
    fn unsynced_data_and_names_are_lost_by_a_strict_cut() {
        let mut d = disk();
        let dir = d.create(ROOT, "d".as_ref(), true, 0o700, 0, 0).unwrap();
        d.sync(ROOT).unwrap();
        let f = d.create(dir, "f".as_ref(), false, 0o600, 0, 0).unwrap();
        d.write(f, 0, b"synced\n").unwrap();
        d.sync(f).unwrap(); // data durable, name not
        d.write(f, 7, b"lost\n").unwrap();
        d.power_cut(Cut::Strict, |_| 0);
        assert!(
            d.lookup(dir, "f".as_ref()).is_err(),
            "name without a directory fsync"
        );

        let f = d.create(dir, "f".as_ref(), false, 0o600, 0, 0).unwrap();
        d.write(f, 0, b"synced\n").unwrap();
        d.sync(f).unwrap();
        d.sync(dir).unwrap();
        d.write(f, 7, b"lost\n").unwrap();
        d.power_cut(Cut::Strict, |_| 0);
        let f = d.lookup(dir, "f".as_ref()).unwrap();
        assert_eq!(d.read(f, 0, 100).unwrap(), b"synced\n");
    }

    #[test]
    fn a_prefix_cut_keeps_some_changes_in_order_and_may_tear_the_next() {
        let mut d = disk();
        let f = d.create(ROOT, "f".as_ref(), false, 0o600, 0, 0).unwrap();
        d.sync(ROOT).unwrap();
        d.write(f, 0, b"one\n").unwrap();
        d.write(f, 4, b"two\n").unwrap();
        d.write(f, 8, b"three\n").unwrap();
        d.power_cut(Cut::Prefix, |n| match n {
            3 => 1,
            4 => 2,
            _ => 0,
        });
        let f = d.lookup(ROOT, "f".as_ref()).unwrap();
        assert_eq!(d.read(f, 0, 100).unwrap(), b"one\ntw");
        assert_eq!(d.stats.torn_writes, 1);
    }

    #[test]
    fn a_rename_in_one_directory_is_atomic() {
        let mut d = disk();
        let t = d.create(ROOT, ".tmp".as_ref(), false, 0o600, 0, 0).unwrap();
        d.write(t, 0, b"new").unwrap();
        d.sync(t).unwrap();
        d.rename(ROOT, ".tmp".as_ref(), ROOT, "cp".as_ref(), false)
            .unwrap();
        let mut prefix = d.clone();
        d.power_cut(Cut::Strict, |_| 0);
        assert!(d.list(ROOT).unwrap().len() == 2, "neither name survives");
        prefix.power_cut(Cut::Prefix, |n| n);
        let names: Vec<_> = prefix
            .list(ROOT)
            .unwrap()
            .into_iter()
            .map(|e| e.2)
            .collect();
        assert_eq!(names, [".", "..", "cp"]);
    }

    #[test]
    fn unreachable_inodes_are_freed_and_links_recounted() {
        let mut d = disk();
        let f = d.create(ROOT, "a".as_ref(), false, 0o600, 0, 0).unwrap();
        d.sync(ROOT).unwrap();
        d.remove(ROOT, "a".as_ref(), false).unwrap();
        assert_eq!(d.get(f).unwrap().nlink, 0);
        let g = d.create(ROOT, "b".as_ref(), false, 0o600, 0, 0).unwrap();
        d.power_cut(Cut::Strict, |_| 0);
        assert_eq!(d.get(f).unwrap().nlink, 1, "the unlink was not durable");
        assert!(d.get(g).is_err(), "b was never durable");
    }
}
