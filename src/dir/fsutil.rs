//! Small file-system helpers: no-follow opens, explicit modes, `flock` guards,
//! directory fsync, atomic replace.

use std::borrow::Borrow;
use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::error::{IoContext, Result};

/// Opens (creating if needed) a file for appending and reading, never following a
/// symlink in the last component. A file this call creates gets exactly `mode`
/// (the umask is overridden, so group-shared modes work).
pub(crate) fn open_append(path: &Path, mode: u32) -> Result<File> {
    open_or_create(
        path,
        mode,
        OpenOptions::new().read(true).append(true),
        "open",
    )
}

/// Opens an existing file read-only without following a symlink.
pub(crate) fn open_read(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    Ok(file)
}

/// Opens an existing regular file for writing (to cut a torn tail) without following
/// a symlink.
pub(crate) fn open_write(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    Ok(file)
}

/// Opens (creating if needed) a lock file without following a symlink.
pub(crate) fn open_lock(path: &Path, mode: u32) -> Result<File> {
    open_or_create(
        path,
        mode,
        OpenOptions::new().read(true).write(true),
        "open lock",
    )
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

fn open_or_create(
    path: &Path,
    mode: u32,
    opts: &mut OpenOptions,
    op: &'static str,
) -> Result<File> {
    opts.mode(mode)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC);
    let file = match opts.clone().create_new(true).open(path) {
        Ok(file) => {
            file.set_permissions(Permissions::from_mode(mode))
                .ctx("chmod", path)?;
            file
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => opts.open(path).ctx(op, path)?,
        Err(e) => return Err(crate::Error::io(op, path, e)),
    };
    ensure_regular(&file, path)?;
    Ok(file)
}

fn ensure_regular(file: &File, path: &Path) -> Result<()> {
    let meta = file.metadata().ctx("stat", path)?;
    if meta.is_file() {
        Ok(())
    } else {
        Err(crate::Error::io(
            "open",
            path,
            io::Error::other("not a regular file"),
        ))
    }
}

/// Creates one directory with exactly `mode`; an existing directory is fine, an existing
/// symlink or file is not.
pub(crate) fn create_dir(path: &Path, mode: u32) -> Result<()> {
    match DirBuilder::new().mode(mode).create(path) {
        Ok(()) => set_mode(path, mode),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => ensure_dir(path),
        Err(e) => Err(crate::Error::io("create directory", path, e)),
    }
}

/// Fails unless `path` is a real directory (not a symlink to one).
pub(crate) fn ensure_dir(path: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(path).ctx("stat", path)?;
    if meta.is_dir() {
        Ok(())
    } else {
        Err(crate::Error::io(
            "open directory",
            path,
            io::Error::other("not a directory (symlinks are not followed)"),
        ))
    }
}

pub(crate) fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, Permissions::from_mode(mode)).ctx("chmod", path)
}

/// fsyncs a directory so that entries created or renamed in it survive power loss.
pub(crate) fn sync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .ctx("fsync directory", path)
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, fsynced
/// when `sync`, then renamed over `path` (and the directory fsynced when `sync`).
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32, sync: bool) -> Result<()> {
    let dir = path.parent().expect("atomic write target has a parent");
    let name = path.file_name().expect("atomic write target has a name");
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        uuid::Uuid::now_v7().simple()
    ));
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .ctx("create", &tmp)?;
        f.write_all(bytes).ctx("write", &tmp)?;
        if sync {
            f.sync_all().ctx("fsync", &tmp)?;
        }
        set_mode(&tmp, mode)?;
        fs::rename(&tmp, path).ctx("rename", path)?;
        if sync {
            sync_dir(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The entries of `dir` that are directories with a valid name, sorted. A missing
/// `dir` is an empty list when `missing_ok`.
pub(crate) fn list_names(dir: &Path, missing_ok: bool) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if missing_ok && e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(crate::Error::io("list", dir, e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.ctx("list", dir)?;
        let is_dir = entry.file_type().ctx("stat", &entry.path())?.is_dir();
        match entry.file_name().to_str() {
            Some(name) if is_dir && crate::name::is_valid(name) => names.push(name.to_owned()),
            _ => {}
        }
    }
    names.sort();
    Ok(names)
}

/// Renames a directory built under a temporary name into place; `exists()` is the
/// error when the target exists already (someone else created it meanwhile).
pub(crate) fn rename_new_dir(
    tmp: &Path,
    dir: &Path,
    exists: impl FnOnce() -> crate::Error,
) -> Result<()> {
    match fs::rename(tmp, dir) {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY) | Some(libc::EEXIST))
                || e.kind() == io::ErrorKind::AlreadyExists =>
        {
            Err(exists())
        }
        Err(e) => Err(crate::Error::io("rename", dir, e)),
    }
}
