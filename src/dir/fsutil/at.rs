//! Opening paths beneath a directory descriptor without following any symlink.
//!
//! [`open`] resolves a relative path with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)`: one system call, as cheap as `open`, that fails with `ELOOP`
//! if any component is a symlink and with `EXDEV` if the path would leave the
//! directory. Where the kernel has no `openat2` (before Linux 5.6, or a sandbox that
//! hides it), it walks the components one `openat(O_NOFOLLOW | O_DIRECTORY)` at a
//! time, which gives the same guarantee with a few more system calls.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Component, Path};
#[cfg(target_os = "linux")]
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

/// Set once `openat2` turned out to be missing; from then on, [`walk`].
#[cfg(target_os = "linux")]
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Opens `rel` (relative, without `..`) beneath `dir` with `flags` (`O_CLOEXEC` is
/// added), never following a symlink in any component. `mode` is used with `O_CREAT`.
pub(super) fn open(
    dir: BorrowedFd<'_>,
    rel: &Path,
    flags: OFlags,
    mode: u32,
) -> io::Result<OwnedFd> {
    let flags = flags | OFlags::CLOEXEC;
    let mode = Mode::from_raw_mode(mode);
    #[cfg(target_os = "linux")]
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        use rustix::fs::ResolveFlags;
        let resolve =
            ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
        loop {
            match rustix::fs::openat2(dir, rel, flags, mode, resolve) {
                // A rename raced with the lookup: the kernel asks us to try again.
                Err(Errno::AGAIN) | Err(Errno::INTR) => continue,
                Err(Errno::NOSYS) => {
                    NO_OPENAT2.store(true, Ordering::Relaxed);
                    break;
                }
                other => return other.map_err(io::Error::from),
            }
        }
    }
    walk(dir, rel, flags, mode)
}

/// [`open`] without `openat2`: one `openat(O_NOFOLLOW)` per component.
pub(super) fn walk(
    dir: BorrowedFd<'_>,
    rel: &Path,
    flags: OFlags,
    mode: Mode,
) -> io::Result<OwnedFd> {
    let mut names: Vec<&OsStr> = Vec::new();
    for component in rel.components() {
        match component {
            Component::Normal(name) => names.push(name),
            Component::CurDir => {}
            // Never produced by the bus's own paths; refused like openat2 refuses them.
            _ => return Err(Errno::XDEV.into()),
        }
    }
    let Some((last, parents)) = names.split_last() else {
        return retry(|| rustix::fs::openat(dir, ".", flags, mode));
    };
    let mut held: Option<OwnedFd> = None;
    for name in parents {
        let at = held.as_ref().map_or(dir, |fd| fd.as_fd());
        let dir_flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        held = Some(retry(|| {
            rustix::fs::openat(at, *name, dir_flags, Mode::empty())
        })?);
    }
    let at = held.as_ref().map_or(dir, |fd| fd.as_fd());
    retry(|| rustix::fs::openat(at, *last, flags | OFlags::NOFOLLOW, mode))
}

/// Runs `f` again while it is interrupted by a signal.
pub(super) fn retry<T>(mut f: impl FnMut() -> rustix::io::Result<T>) -> io::Result<T> {
    loop {
        match f() {
            Err(Errno::INTR) => continue,
            other => return other.map_err(io::Error::from),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn flags() -> OFlags {
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK
    }

    /// Both resolvers: `openat2` (where the kernel has it) and the walk.
    fn both(dir: &std::fs::File, rel: &str) -> [io::Result<OwnedFd>; 2] {
        let fd = dir.as_fd();
        [
            open(fd, Path::new(rel), flags(), 0),
            walk(fd, Path::new(rel), flags() | OFlags::CLOEXEC, Mode::empty()),
        ]
    }

    #[test]
    fn symlinks_anywhere_on_the_path_are_refused_by_both_resolvers() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        let outside = tmp.path().join("outside");
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(root.join("a/file"), "in").unwrap();
        std::fs::write(outside.join("file"), "out").unwrap();
        symlink(&outside, root.join("link")).unwrap();
        symlink(outside.join("file"), root.join("a/last")).unwrap();
        let dir = std::fs::File::open(&root).unwrap();

        for r in both(&dir, "a/file") {
            let mut text = String::new();
            io::Read::read_to_string(&mut std::fs::File::from(r.unwrap()), &mut text).unwrap();
            assert_eq!(text, "in");
        }
        for r in both(&dir, "link/file") {
            let e = r.unwrap_err();
            assert!(
                matches!(e.raw_os_error(), Some(libc::ELOOP) | Some(libc::ENOTDIR)),
                "{e}"
            );
        }
        for r in both(&dir, "a/last") {
            assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::ELOOP));
        }
        for r in both(&dir, "a/../../outside/file") {
            assert!(r.is_err());
        }
        for r in both(&dir, "a/missing") {
            assert_eq!(r.unwrap_err().kind(), io::ErrorKind::NotFound);
        }
    }
}
