//! The file system as the directory backend sees it: every file and directory of a bus
//! is reached from one descriptor of the bus directory, [`Fs`], and checked.
//!
//! - **No symlink is ever followed** inside the bus: paths are resolved beneath the
//!   bus directory's descriptor with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`
//!   (see `at`), so a symlink planted anywhere on the way (`log/`, `keys/`, `leases/`,
//!   a group) is an [`Error::UnsafeFile`], atomically: there is no window between a
//!   check and the open. Directories are created, entries renamed and removed with
//!   `mkdirat`/`renameat`/`unlinkat` relative to a directory opened the same way.
//! - **Only regular files with one link, and directories**: files are opened with
//!   `O_NONBLOCK | O_NOCTTY` (a FIFO or device neither blocks nor becomes a terminal),
//!   then `fstat`ed: a FIFO, device, socket, directory or hard-linked file is refused
//!   before a byte is read or written.
//! - **Only the bus's owner's files** (see `trust`): the `fstat` also checks the owner,
//!   group and mode. These checks happen once per open, never per send.
//! - **Modes are exact and set on descriptors**: what agentbus creates gets its mode
//!   by `fchmod` (the umask is overridden, so group-shared modes work) and, where it
//!   must, its owner by `fchown`. Nothing is ever chmodded by path.

use std::borrow::Borrow;
use std::ffi::OsString;
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;

use crate::backend::Options;
use crate::error::IoContext;
use crate::{Error, Result};

mod at;
mod trust;

use trust::{unsafe_file, Kind, Trust};

/// The bus directory, opened once per bus handle, through which every file of the bus
/// is opened. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Fs {
    inner: Arc<FsInner>,
}

#[derive(Debug)]
struct FsInner {
    root: PathBuf,
    fd: OwnedFd,
    trust: Trust,
}

/// File access for [`Fs::open_file`].
#[derive(Clone, Copy)]
enum Access {
    Read,
    Write,
    /// Read and append.
    Append,
    /// Read and write (lock files, the key watermark).
    ReadWrite,
}

impl Access {
    fn flags(self) -> OFlags {
        match self {
            Access::Read => OFlags::RDONLY,
            Access::Write => OFlags::WRONLY,
            Access::Append => OFlags::RDWR | OFlags::APPEND,
            Access::ReadWrite => OFlags::RDWR,
        }
    }
}

/// What `lstat` says about an entry of the bus (see [`Fs::stat`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Meta {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) len: u64,
    pub(crate) modified: std::time::SystemTime,
}

impl Fs {
    /// Opens the bus directory `root` (creating it first with `create`, like `mkdir`
    /// with an exact mode) and checks that it can be trusted: it is a directory, it
    /// is yours (or shared with a group of yours, or you are root), and it is not
    /// writable beyond the sharing mode. `root` itself may be reached through
    /// symlinks: it is the caller's path; nothing inside it is.
    pub(crate) fn open_root(root: &Path, opts: &Options, create: bool) -> Result<Fs> {
        let created = create
            && match rustix::fs::mkdir(root, Mode::from_raw_mode(opts.dir_mode)) {
                Ok(()) => true,
                Err(Errno::EXIST) => false,
                Err(e) => return Err(Error::io("create directory", root, e.into())),
            };
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let fd = match rustix::fs::open(root, flags, Mode::empty()) {
            Ok(fd) => fd,
            Err(Errno::NOTDIR) => {
                return Err(unsafe_file(
                    root,
                    "is not a directory",
                    "use a directory for the bus",
                ))
            }
            Err(Errno::NOENT) => {
                return Err(Error::NotABus {
                    path: root.to_owned(),
                })
            }
            Err(e) => return Err(Error::io("open directory", root, e.into())),
        };
        if created {
            fchmod(&fd, opts.dir_mode, root)?;
            if opts.sync() {
                // The new directory's name lives in its parent: without this fsync a
                // power cut can take the whole bus with it.
                let parent = root.parent().filter(|p| !p.as_os_str().is_empty());
                let parent = parent.unwrap_or(Path::new("."));
                let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
                let dir = rustix::fs::open(parent, flags, Mode::empty())
                    .map_err(|e| Error::io("open directory", parent, e.into()))?;
                at::retry(|| rustix::fs::fsync(&dir)).ctx("fsync directory", parent)?;
            }
        }
        let st = rustix::fs::fstat(&fd).map_err(|e| Error::io("stat", root, e.into()))?;
        let trust = Trust::of_root(root, &st, opts)?;
        Ok(Fs {
            inner: Arc::new(FsInner {
                root: root.to_owned(),
                fd,
                trust,
            }),
        })
    }

    /// `path` relative to the bus directory (`.` for the directory itself).
    fn rel<'p>(&self, path: &'p Path) -> io::Result<&'p Path> {
        match path.strip_prefix(&self.inner.root) {
            Ok(rel) if rel.as_os_str().is_empty() => Ok(Path::new(".")),
            Ok(rel) => Ok(rel),
            Err(_) => Err(io::Error::other("path outside the bus directory")),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        self.inner.fd.as_fd()
    }

    fn trust(&self) -> &Trust {
        &self.inner.trust
    }

    /// Opens an existing regular file of the bus read-only.
    pub(crate) fn open_read(&self, path: &Path) -> Result<File> {
        self.open_file(path, Access::Read, false).map(|(f, _)| f)
    }

    /// [`open_read`](Self::open_read), with `None` for a missing file.
    pub(crate) fn open_read_opt(&self, path: &Path) -> Result<Option<File>> {
        match self.open_file(path, Access::Read, false) {
            Ok((f, _)) => Ok(Some(f)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens (creating if needed) a file for appending and reading.
    pub(crate) fn open_append(&self, path: &Path) -> Result<File> {
        self.open_file(path, Access::Append, true).map(|(f, _)| f)
    }

    /// [`open_append`](Self::open_append), also saying whether this call created it.
    pub(crate) fn open_append_created(&self, path: &Path) -> Result<(File, bool)> {
        self.open_file(path, Access::Append, true)
    }

    /// Opens an existing regular file for writing (to cut a torn tail).
    pub(crate) fn open_write(&self, path: &Path) -> Result<File> {
        self.open_file(path, Access::Write, false).map(|(f, _)| f)
    }

    /// Opens (creating if needed) a lock file (read and write).
    pub(crate) fn open_lock(&self, path: &Path) -> Result<File> {
        self.open_file(path, Access::ReadWrite, true)
            .map(|(f, _)| f)
    }

    /// Opens a file of the bus, creating it (with the bus's file mode and owner) if
    /// `create`, and checks it. An existing file is opened first: that is the common
    /// case, and it costs one `openat2` and one `fstat`.
    fn open_file(&self, path: &Path, access: Access, create: bool) -> Result<(File, bool)> {
        let rel = self.rel(path).ctx("open", path)?;
        let flags = access.flags() | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY;
        loop {
            match at::open(self.fd(), rel, flags, 0) {
                Ok(fd) => {
                    let st = fstat(&fd, path)?;
                    self.trust().check(path, &st, Kind::File)?;
                    return Ok((File::from(fd), false));
                }
                Err(e) if create && e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(e) => return Err(self.open_error("open", path, rel, e)),
            }
            let mode = self.trust().file_mode;
            match at::open(self.fd(), rel, flags | OFlags::CREATE | OFlags::EXCL, mode) {
                Ok(fd) => {
                    self.adopt(&fd, path, Kind::File)?;
                    return Ok((File::from(fd), true));
                }
                // Someone else created it meanwhile: open theirs.
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => continue,
                Err(e) => return Err(self.open_error("create", path, rel, e)),
            }
        }
    }

    /// Gives something this process just created the bus's mode and owner (through its
    /// descriptor), then checks it like anything else.
    fn adopt(&self, fd: &OwnedFd, path: &Path, kind: Kind) -> Result<()> {
        let trust = self.trust();
        let st = fstat(fd, path)?;
        if let Some((uid, gid)) = trust.give(&st) {
            rustix::fs::fchown(fd, uid, gid).map_err(|e| Error::io("chown", path, e.into()))?;
        }
        let mode = match kind {
            Kind::File => trust.file_mode,
            // Keep the setgid bit a shared parent passed on.
            Kind::Dir => trust.dir_mode | (st.st_mode & libc::S_ISGID),
        };
        fchmod(fd, mode, path)?;
        trust.check(path, &fstat(fd, path)?, kind)
    }

    /// Turns an `open` failure into the error that says what is wrong.
    fn open_error(&self, op: &'static str, path: &Path, rel: &Path, e: io::Error) -> Error {
        let symlink = "remove it: agentbus never follows a symlink inside a bus";
        match e.raw_os_error() {
            Some(libc::ELOOP) => {
                unsafe_file(path, "is a symbolic link, or one is on its way", symlink)
            }
            Some(libc::ENOTDIR) => unsafe_file(
                path,
                "has a file or symbolic link on its way where a directory belongs",
                symlink,
            ),
            Some(libc::EXDEV) => unsafe_file(path, "leads outside the bus directory", symlink),
            // O_NONBLOCK write-opens of a FIFO nobody reads, and devices without a driver.
            Some(libc::ENXIO) => unsafe_file(
                path,
                "is a FIFO or a device, not a regular file",
                "remove it (agentbus opens only regular files)",
            ),
            Some(libc::EISDIR) => unsafe_file(
                path,
                "is a directory, where the bus keeps a regular file",
                "remove it",
            ),
            // Permission denied: say whose file it is, if that is the reason.
            Some(libc::EACCES) | Some(libc::EPERM) => match self.lstat(rel) {
                Ok(st) => match self.trust().check(path, &st, Kind::File) {
                    Err(untrusted @ Error::Untrusted { .. }) => untrusted,
                    _ => Error::io(op, path, e),
                },
                Err(_) => Error::io(op, path, e),
            },
            _ => Error::io(op, path, e),
        }
    }

    fn lstat(&self, rel: &Path) -> io::Result<Stat> {
        at::retry(|| rustix::fs::statat(self.fd(), rel, AtFlags::SYMLINK_NOFOLLOW))
    }

    /// `lstat` of an entry of the bus, without opening it (for identities, sizes and
    /// times). Only the last component is not followed: nothing is read or written
    /// through the answer.
    // The `stat` fields' widths differ between architectures.
    #[allow(clippy::unnecessary_cast)]
    pub(crate) fn stat(&self, path: &Path) -> io::Result<Meta> {
        let st = self.lstat(self.rel(path)?)?;
        let modified = std::time::UNIX_EPOCH
            + std::time::Duration::new(st.st_mtime.max(0) as u64, st.st_mtime_nsec as u32);
        Ok(Meta {
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            len: st.st_size.max(0) as u64,
            modified,
        })
    }

    /// Whether anything (a symlink included) is at `path`.
    pub(crate) fn exists(&self, path: &Path) -> bool {
        self.stat(path).is_ok()
    }

    /// Opens a directory of the bus and checks it; `None` if it does not exist.
    fn open_dir(&self, path: &Path) -> Result<Option<OwnedFd>> {
        let rel = self.rel(path).ctx("open directory", path)?;
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::NONBLOCK;
        match at::open(self.fd(), rel, flags, 0) {
            Ok(fd) => {
                self.trust().check(path, &fstat(&fd, path)?, Kind::Dir)?;
                Ok(Some(fd))
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            // A file (or FIFO, ...) where the directory belongs: say what it is.
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => match self.lstat(rel) {
                Ok(st) => Err(trust::check_type(path, &st, Kind::Dir)
                    .err()
                    .unwrap_or_else(|| self.open_error("open directory", path, rel, e))),
                Err(_) => Err(self.open_error("open directory", path, rel, e)),
            },
            Err(e) => Err(self.open_error("open directory", path, rel, e)),
        }
    }

    /// Whether the directory `path` exists; it is checked if it does.
    pub(crate) fn dir_exists(&self, path: &Path) -> Result<bool> {
        Ok(self.open_dir(path)?.is_some())
    }

    /// Fails unless `path` is a directory of the bus that passes the checks.
    pub(crate) fn ensure_dir(&self, path: &Path) -> Result<()> {
        match self.open_dir(path)? {
            Some(_) => Ok(()),
            None => Err(Error::io(
                "open directory",
                path,
                io::Error::from(io::ErrorKind::NotFound),
            )),
        }
    }

    /// Creates one directory with the bus's mode and owner; an existing directory is
    /// fine (and checked), anything else at `path` is not.
    pub(crate) fn create_dir(&self, path: &Path) -> Result<()> {
        let (parent, name) = self.parent(path)?;
        let mode = Mode::from_raw_mode(self.trust().dir_mode);
        match at::retry(|| rustix::fs::mkdirat(&parent, name, mode)) {
            Ok(()) => {
                let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW;
                let fd = at::retry(|| {
                    rustix::fs::openat(&parent, name, flags | OFlags::CLOEXEC, Mode::empty())
                })
                .ctx("open directory", path)?;
                self.adopt(&fd, path, Kind::Dir)
            }
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => self.ensure_dir(path),
            Err(e) => Err(Error::io("create directory", path, e)),
        }
    }

    /// The directory holding `path`, opened, and `path`'s last component.
    fn parent<'p>(&self, path: &'p Path) -> Result<(OwnedFd, &'p std::ffi::OsStr)> {
        let name = path
            .file_name()
            .ok_or_else(|| Error::io("open", path, io::Error::other("no file name")))?;
        let dir = path.parent().unwrap_or(Path::new(""));
        let rel = self.rel(dir).ctx("open directory", dir)?;
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW;
        let fd = at::open(self.fd(), rel, flags, 0)
            .map_err(|e| self.open_error("open directory", dir, rel, e))?;
        Ok((fd, name))
    }

    /// fsyncs a directory so that entries created or renamed in it survive power loss.
    pub(crate) fn sync_dir(&self, path: &Path) -> Result<()> {
        let rel = self.rel(path).ctx("fsync directory", path)?;
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW;
        let fd = at::open(self.fd(), rel, flags, 0)
            .map_err(|e| self.open_error("fsync directory", path, rel, e))?;
        at::retry(|| rustix::fs::fsync(&fd)).ctx("fsync directory", path)
    }

    /// Writes `bytes` to `path` atomically: a temporary file in the same directory
    /// (given the bus's mode and owner through its descriptor), fsynced when `sync`,
    /// then renamed over `path` (and the directory fsynced when `sync`). Whatever was
    /// at `path`, a symlink or a hard link included, is replaced, never written through.
    pub(crate) fn write_atomic(&self, path: &Path, bytes: &[u8], sync: bool) -> Result<()> {
        let (dir, name) = self.parent(path)?;
        let tmp_name = format!(
            ".{}.{}.tmp",
            name.to_string_lossy(),
            uuid::Uuid::now_v7().simple()
        );
        let tmp = path.with_file_name(&tmp_name);
        let result = (|| {
            let flags =
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
            let mode = Mode::from_raw_mode(self.trust().file_mode);
            let fd = at::retry(|| rustix::fs::openat(&dir, tmp_name.as_str(), flags, mode))
                .ctx("create", &tmp)?;
            self.adopt(&fd, &tmp, Kind::File)?;
            let mut f = File::from(fd);
            f.write_all(bytes).ctx("write", &tmp)?;
            if sync {
                f.sync_all().ctx("fsync", &tmp)?;
            }
            at::retry(|| rustix::fs::renameat(&dir, tmp_name.as_str(), &dir, name))
                .ctx("rename", path)?;
            if sync {
                at::retry(|| rustix::fs::fsync(&dir)).ctx("fsync directory", path)?;
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = rustix::fs::unlinkat(&dir, tmp_name.as_str(), AtFlags::empty());
        }
        result
    }

    /// The entries of the directory `dir` (never followed through a symlink) and
    /// whether each is a directory. A missing `dir` is an empty list when `missing_ok`.
    pub(crate) fn list(&self, dir: &Path, missing_ok: bool) -> Result<Vec<(OsString, bool)>> {
        let fd = match self.open_dir(dir)? {
            Some(fd) => fd,
            None if missing_ok => return Ok(Vec::new()),
            None => {
                return Err(Error::io(
                    "list",
                    dir,
                    io::Error::from(io::ErrorKind::NotFound),
                ))
            }
        };
        let entries =
            rustix::fs::Dir::read_from(&fd).map_err(|e| Error::io("list", dir, e.into()))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list", dir, e.into()))?;
            let name = entry.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            let is_dir = match entry.file_type() {
                FileType::Directory => true,
                FileType::Unknown => {
                    rustix::fs::statat(&fd, entry.file_name(), AtFlags::SYMLINK_NOFOLLOW)
                        .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory)
                }
                _ => false,
            };
            out.push((OsString::from_vec(name.to_vec()), is_dir));
        }
        Ok(out)
    }

    /// The entries of `dir` that are directories with a valid name, sorted. A missing
    /// `dir` is an empty list when `missing_ok`.
    pub(crate) fn list_names(&self, dir: &Path, missing_ok: bool) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .list(dir, missing_ok)?
            .into_iter()
            .filter(|(_, is_dir)| *is_dir)
            .filter_map(|(name, _)| name.into_string().ok())
            .filter(|name| crate::name::is_valid(name))
            .collect();
        names.sort();
        Ok(names)
    }

    /// Removes the file (or symlink) at `path`, never through a symlink.
    pub(crate) fn remove_file(&self, path: &Path) -> io::Result<()> {
        let (dir, name) = self.parent(path).map_err(into_io)?;
        at::retry(|| rustix::fs::unlinkat(&dir, name, AtFlags::empty()))
    }

    /// Removes a directory this process built under a temporary name, and everything
    /// in it (best effort: it is only ever a half-built mailbox or group).
    pub(crate) fn remove_tree(&self, path: &Path) {
        if let Ok(entries) = self.list(path, true) {
            for (name, is_dir) in entries {
                let child = path.join(name);
                if is_dir {
                    self.remove_tree(&child);
                } else {
                    let _ = self.remove_file(&child);
                }
            }
        }
        if let Ok((dir, name)) = self.parent(path) {
            let _ = rustix::fs::unlinkat(&dir, name, AtFlags::REMOVEDIR);
        }
    }

    /// Creates directory `dir` whole: `build` fills a temporary sibling
    /// (`.new-<uuid>`), which is then renamed into place, so other processes see all of
    /// it or nothing; on any failure the temporary directory is removed. `exists()` is
    /// the error when `dir` exists (someone else created it meanwhile). The parent is
    /// fsynced when `sync`.
    pub(crate) fn build_dir(
        &self,
        dir: &Path,
        sync: bool,
        exists: impl FnOnce() -> Error,
        build: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<()> {
        let parent = dir.parent().unwrap_or(Path::new(""));
        let tmp = parent.join(format!(".new-{}", uuid::Uuid::now_v7().simple()));
        let built = self.create_dir(&tmp).and_then(|()| build(&tmp));
        let renamed = built.and_then(|()| self.rename_new_dir(&tmp, dir, exists));
        if let Err(e) = renamed {
            self.remove_tree(&tmp);
            return Err(e);
        }
        if sync {
            self.sync_dir(parent)?;
        }
        Ok(())
    }

    /// Renames a directory built under a temporary name into place (both in the same
    /// directory); `exists()` is the error when the target exists already (someone
    /// else created it meanwhile).
    pub(crate) fn rename_new_dir(
        &self,
        tmp: &Path,
        dir: &Path,
        exists: impl FnOnce() -> Error,
    ) -> Result<()> {
        let (parent, tmp_name) = self.parent(tmp)?;
        let name = dir
            .file_name()
            .ok_or_else(|| Error::io("rename", dir, io::Error::other("no file name")))?;
        match at::retry(|| rustix::fs::renameat(&parent, tmp_name, &parent, name)) {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST))
                    || e.kind() == io::ErrorKind::AlreadyExists =>
            {
                Err(exists())
            }
            Err(e) => Err(Error::io("rename", dir, e)),
        }
    }
}

/// Whether `e` says the file does not exist.
pub(crate) fn is_not_found(e: &Error) -> bool {
    e.io_error()
        .is_some_and(|e| e.kind() == io::ErrorKind::NotFound)
}

fn into_io(e: Error) -> io::Error {
    match e {
        Error::Io { source, .. } => source,
        other => io::Error::other(other.to_string()),
    }
}

fn fstat(fd: &OwnedFd, path: &Path) -> Result<Stat> {
    rustix::fs::fstat(fd).map_err(|e| Error::io("stat", path, e.into()))
}

fn fchmod(fd: &OwnedFd, mode: u32, path: &Path) -> Result<()> {
    rustix::fs::fchmod(fd, Mode::from_raw_mode(mode & 0o7777))
        .map_err(|e| Error::io("chmod", path, e.into()))
}

/// An `flock` on a file (owned, or borrowed from a longer-lived handle), released when
/// the guard drops.
#[derive(Debug)]
pub(crate) struct Flock<F: Borrow<File>>(F);

impl<F: Borrow<File>> Flock<F> {
    /// Blocks until `file` is locked exclusively.
    pub(crate) fn exclusive(file: F, path: &Path) -> Result<Self> {
        file.borrow().lock().ctx("lock", path)?;
        Ok(Flock(file))
    }

    /// Locks `file` exclusively if that is possible right now.
    pub(crate) fn try_exclusive(file: F) -> Option<Self> {
        file.borrow().try_lock().ok()?;
        Some(Flock(file))
    }

    /// Blocks until `file` is locked shared.
    pub(crate) fn shared(file: F, path: &Path) -> Result<Self> {
        file.borrow().lock_shared().ctx("lock", path)?;
        Ok(Flock(file))
    }
}

impl<F: Borrow<File>> Drop for Flock<F> {
    fn drop(&mut self) {
        let _ = self.0.borrow().unlock();
    }
}
