//! The power-loss file system: a FUSE file system (the `fuser` crate, mounted with
//! `mount(2)` directly, so without libfuse or fusermount; that needs root) serving a
//! [`Disk`](crate::disk::Disk) from memory. Locks (`flock`) are the kernel's own: the
//! file system does not ask for them, so the kernel keeps them locally, as for any
//! file system on one machine.
//!
//! [`Mounted::power_off`] freezes the disk (every request fails with `EIO` from then
//! on, so no later fsync can succeed), the caller kills every process using it, and
//! [`Mounted::unmount`] takes it away; [`Disk::power_cut`](crate::disk::Disk::power_cut)
//! then throws away what was not durable and a new [`mount`] presents the rest.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    WriteFlags,
};

use crate::disk::{Disk, Inode};

/// How long the kernel may cache names and attributes. Every change goes through this
/// one kernel, which keeps its caches right, and a new mount starts with none.
const TTL: Duration = Duration::from_secs(1);

/// A disk shared by the file system and the test.
pub type SharedDisk = Arc<Mutex<Disk>>;

pub fn lock(disk: &SharedDisk) -> MutexGuard<'_, Disk> {
    disk.lock().unwrap_or_else(|e| e.into_inner())
}

struct PowerFs {
    disk: SharedDisk,
    /// Directory listings, snapshotted at `opendir` so that concurrent creates and
    /// removes never make a reader skip an entry that was there all along.
    listings: Mutex<HashMap<u64, crate::disk::Listing>>,
    next_fh: AtomicU64,
}

impl PowerFs {
    /// The disk, or `EIO` once the power is off.
    fn disk(&self) -> Result<MutexGuard<'_, Disk>, Errno> {
        let d = lock(&self.disk);
        if d.frozen {
            return Err(Errno::EIO);
        }
        Ok(d)
    }
}

fn errno(e: i32) -> Errno {
    Errno::from_i32(e)
}

fn attr(ino: u64, i: &Inode) -> FileAttr {
    let size = i.size();
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: i.mtime,
        mtime: i.mtime,
        ctime: i.ctime,
        crtime: i.ctime,
        kind: if i.is_dir() {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: i.perm,
        nlink: i.nlink,
        uid: i.uid,
        gid: i.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// Runs `$body` on the disk (`EIO` once the power is off), then answers with `$ok` on
/// its value, or with its errno.
macro_rules! with_disk {
    ($self:ident, $reply:ident, |$d:ident| $body:expr, |$r:ident, $v:pat_param| $ok:expr) => {
        match $self.disk() {
            Err(e) => $reply.error(e),
            Ok(mut guard) => {
                let $d: &mut Disk = &mut guard;
                // A closure, so that `?` works in the body.
                #[allow(clippy::redundant_closure_call)]
                let result: Result<_, i32> = (move || $body)();
                match result {
                    Ok($v) => {
                        let $r = $reply;
                        $ok
                    }
                    Err(e) => $reply.error(errno(e)),
                }
            }
        }
    };
}

impl PowerFs {
    /// Runs `change` on the disk, then answers `reply` with success or its errno.
    fn change(&self, reply: ReplyEmpty, change: impl FnOnce(&mut Disk) -> Result<(), i32>) {
        with_disk!(self, reply, |d| change(d), |reply, ()| reply.ok())
    }
}

/// Creates `name` in `parent` (a directory if `dir`), owned by `req`'s user, with the
/// permissions of `mode` less `umask`: its attributes.
fn create_in(
    d: &mut Disk,
    req: &Request,
    (parent, name): (INodeNo, &OsStr),
    dir: bool,
    (mode, umask): (u32, u32),
) -> Result<FileAttr, i32> {
    let perm = (mode & !umask & 0o7777) as u16;
    let ino = d.create(parent.0, name, dir, perm, req.uid(), req.gid())?;
    Ok(attr(ino, d.get(ino)?))
}

impl Filesystem for PowerFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        with_disk!(
            self,
            reply,
            |d| {
                let ino = d.lookup(parent.0, name)?;
                Ok(attr(ino, d.get(ino)?))
            },
            |reply, a| reply.entry(&TTL, &a, Generation(0))
        )
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        with_disk!(
            self,
            reply,
            |d| { Ok(attr(ino.0, d.get(ino.0)?)) },
            |reply, a| reply.attr(&TTL, &a)
        )
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        with_disk!(
            self,
            reply,
            |d| {
                if let Some(size) = size {
                    d.truncate(ino.0, size)?;
                }
                d.set_attrs(ino.0, mode.map(|m| (m & 0o7777) as u16), uid, gid)?;
                Ok(attr(ino.0, d.get(ino.0)?))
            },
            |reply, a| reply.attr(&TTL, &a)
        )
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        with_disk!(
            self,
            reply,
            |d| { create_in(d, req, (parent, name), true, (mode, umask)) },
            |reply, a| reply.entry(&TTL, &a, Generation(0))
        )
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.change(reply, |d| d.remove(parent.0, name, false))
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.change(reply, |d| d.remove(parent.0, name, true))
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.change(reply, |d| {
            if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
                return Err(libc::EINVAL);
            }
            let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
            d.rename(parent.0, name, newparent.0, newname, noreplace)
        })
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        with_disk!(
            self,
            reply,
            |d| {
                if d.get(ino.0)?.is_dir() {
                    return Err(libc::EISDIR);
                }
                Ok(())
            },
            |reply, ()| reply.opened(FileHandle(0), FopenFlags::empty())
        )
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        with_disk!(
            self,
            reply,
            |d| {
                if mode & libc::S_IFMT != libc::S_IFREG {
                    return Err(libc::EPERM); // FIFOs, devices: not in this file system
                }
                create_in(d, req, (parent, name), false, (mode, umask))
            },
            |reply, a| reply.created(&TTL, &a, Generation(0), FileHandle(0), FopenFlags::empty())
        )
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        with_disk!(
            self,
            reply,
            |d| { d.read(ino.0, offset, size).map(<[u8]>::to_vec) },
            |reply, bytes| reply.data(&bytes)
        )
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        with_disk!(
            self,
            reply,
            |d| { d.write(ino.0, offset, data) },
            |reply, ()| reply.written(data.len() as u32)
        )
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(&self, _: &Request, ino: INodeNo, _: FileHandle, _: bool, reply: ReplyEmpty) {
        self.change(reply, |d| d.sync(ino.0))
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        with_disk!(
            self,
            reply,
            |d| {
                let listing = d.list(ino.0)?;
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                self.listings.lock().unwrap().insert(fh, listing);
                Ok(fh)
            },
            |reply, fh| reply.opened(FileHandle(fh), FopenFlags::empty())
        )
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if self.disk().is_err() {
            return reply.error(Errno::EIO);
        }
        let listings = self.listings.lock().unwrap();
        let Some(listing) = listings.get(&fh.0) else {
            return reply.error(Errno::EBADF);
        };
        for (i, (ino, is_dir, name)) in listing.iter().enumerate().skip(offset as usize) {
            let kind = if *is_dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            if reply.add(INodeNo(*ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.listings.lock().unwrap().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(&self, _: &Request, ino: INodeNo, _: FileHandle, _: bool, reply: ReplyEmpty) {
        self.change(reply, |d| d.sync(ino.0))
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(1 << 22, 1 << 21, 1 << 21, 1 << 20, 1 << 19, 4096, 255, 4096);
    }
}

/// The file system mounted at a directory.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    disk: SharedDisk,
    pub path: PathBuf,
}

/// Mounts `disk` at `path` (an empty directory).
pub fn mount(disk: SharedDisk, path: &Path) -> std::io::Result<Mounted> {
    let fs = PowerFs {
        disk: disk.clone(),
        listings: Mutex::default(),
        next_fh: AtomicU64::new(1),
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("agentbus-powerloss".into()),
        MountOption::Subtype("powerloss".into()),
        MountOption::NoAtime,
    ];
    let session = fuser::spawn_mount(fs, path, &config)?;
    Ok(Mounted {
        session: Some(session),
        disk,
        path: path.to_owned(),
    })
}

impl Mounted {
    /// The power goes off: from now on every request fails with `EIO`, so nothing that
    /// was not durable before this moment becomes durable.
    pub fn power_off(&self) {
        lock(&self.disk).frozen = true;
    }

    /// Unmounts (every process using the file system must be gone). Retries for a
    /// while if the kernel still holds files of processes being reaped.
    pub fn unmount(mut self) -> std::io::Result<()> {
        let session = self.session.take().expect("mounted");
        let path = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes())?;
        for attempt in 0.. {
            // SAFETY: a valid C string; umount does not keep the pointer.
            if unsafe { libc::umount(path.as_ptr()) } == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) || attempt == 250 {
                self.session = Some(session); // detached when dropped
                return Err(e);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The session ends when the kernel closes the connection; its own unmount
        // then finds nothing to do. A read of the closed connection may say
        // ECONNABORTED instead of ENODEV (seen under load): the same end.
        match session.join() {
            Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => Ok(()),
            other => other,
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            // A test that fails while mounted: detach, so the directory can be removed.
            if let Ok(c) = std::ffi::CString::new(self.path.as_os_str().as_encoded_bytes()) {
                // SAFETY: a valid C string; umount2 does not keep the pointer.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
            drop(s);
        }
    }
}
