//! Whom a bus belongs to, and the checks every file and directory of it must pass
//! before agentbus reads or writes through it.
//!
//! The bus directory's owner is the bus's owner, its group the bus's group. A bus is
//! **private** (the default: directories `0700`, files `0600`), or **shared with its
//! group** when its directory is setgid and group-writable (`chmod 2770`) or the
//! handle is configured with group-writable modes. Then:
//!
//! - the bus directory must be yours, or (shared) its group must be one of yours;
//!   root may use anyone's bus, and gives what it creates there to the bus's owner;
//! - in a private bus every file and directory belongs to the owner, in a shared one
//!   to the bus's group;
//! - nothing is writable by group or others beyond the sharing mode;
//! - a file is a regular file with one link, a directory a directory.

use std::path::Path;

use rustix::fs::{FileType, Gid, Stat, Uid};

use crate::backend::Options;
use crate::Error;

/// What a path of the bus must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    File,
    Dir,
}

/// The bus's owner and sharing mode, learnt from its directory when it is opened.
#[derive(Debug, Clone)]
pub(super) struct Trust {
    /// The bus directory's owner and group.
    owner: u32,
    group: u32,
    /// Shared with `group` (else private to `owner`).
    shared: bool,
    /// Modes of what this handle creates.
    pub(super) dir_mode: u32,
    pub(super) file_mode: u32,
    /// What files and directories created here are given to: the owner, when root
    /// creates them; the group, in a shared bus.
    give: (Option<u32>, Option<u32>),
}

impl Trust {
    /// Checks the bus directory itself (`st`, at `path`) for a process with effective
    /// user `euid`, and learns the owner and sharing mode from it.
    pub(super) fn of_root(path: &Path, st: &Stat, opts: &Options) -> crate::Result<Trust> {
        let (uid, gid) = (st.st_uid, st.st_gid);
        let mode = st.st_mode;
        if FileType::from_raw_mode(mode) != FileType::Directory {
            return Err(unsafe_file(
                path,
                "not a directory",
                "use a directory for the bus",
            ));
        }
        // Shared: configured so (group-writable modes), or the bus directory says so
        // (setgid and group-writable: its owner shared it with its group).
        let configured = opts.dir_mode & 0o020 != 0;
        let marked = mode & 0o2020 == 0o2020;
        let shared = configured || marked;
        let (dir_mode, file_mode) = if marked && !configured {
            (opts.dir_mode | 0o2770, opts.file_mode | 0o660)
        } else {
            (opts.dir_mode, opts.file_mode)
        };
        let euid = rustix::process::geteuid().as_raw();
        let mine = euid == uid || euid == 0 || (shared && in_group(gid));
        if !mine {
            let problem = if shared {
                format!("belongs to uid {uid} and is shared with group {gid}, which is not one of yours")
            } else {
                format!("belongs to uid {uid}, not to you (uid {euid})")
            };
            return Err(untrusted(
                path,
                problem,
                "use a bus directory of your own (if someone else made this one, remove it), \
                 or share this one with a group of yours (README \"Sharing a bus between users\")"
                    .into(),
            ));
        }
        let give = match (euid == 0 && uid != 0, shared) {
            (true, _) => (Some(uid), Some(gid)),
            (false, true) => (None, Some(gid)),
            (false, false) => (None, None),
        };
        let trust = Trust {
            owner: uid,
            group: gid,
            shared,
            dir_mode,
            file_mode,
            give,
        };
        trust.check_mode(path, mode, Kind::Dir)?;
        Ok(trust)
    }

    /// Checks a file or directory of the bus, `st` as `fstat` gave it for `path`.
    pub(super) fn check(&self, path: &Path, st: &Stat, kind: Kind) -> crate::Result<()> {
        check_type(path, st, kind)?;
        self.check_owner(path, st)?;
        self.check_mode(path, st.st_mode, kind)
    }

    /// The owner and group a newly created file or directory must be given, as far as
    /// they differ from what it has (`st`).
    pub(super) fn give(&self, st: &Stat) -> Option<(Option<Uid>, Option<Gid>)> {
        let uid = self.give.0.filter(|&u| u != st.st_uid);
        let gid = self.give.1.filter(|&g| g != st.st_gid);
        (uid.is_some() || gid.is_some()).then(|| (uid.map(Uid::from_raw), gid.map(Gid::from_raw)))
    }

    fn check_owner(&self, path: &Path, st: &Stat) -> crate::Result<()> {
        if self.shared {
            if st.st_gid == self.group {
                return Ok(());
            }
            return Err(untrusted(
                path,
                format!(
                    "belongs to group {}, not to the bus's group {}",
                    st.st_gid, self.group
                ),
                format!(
                    "every file of a bus shared with a group belongs to that group: \
                     `chgrp -R {} <bus>`, or remove the file if nobody of the group made it",
                    self.group
                ),
            ));
        }
        if st.st_uid == self.owner {
            return Ok(());
        }
        Err(untrusted(
            path,
            format!(
                "belongs to uid {}, not to the bus's owner (uid {})",
                st.st_uid, self.owner
            ),
            format!(
                "every file of a private bus belongs to its owner: `chown -R {} <bus>` \
                 (as root), or remove the file if its owner should not write here",
                self.owner
            ),
        ))
    }

    fn check_mode(&self, path: &Path, mode: u32, kind: Kind) -> crate::Result<()> {
        let allowed = match kind {
            Kind::Dir => self.dir_mode,
            Kind::File => self.file_mode,
        };
        let extra = mode & 0o022 & !allowed;
        if extra == 0 {
            return Ok(());
        }
        let who = match (extra & 0o020 != 0, extra & 0o002 != 0) {
            (true, true) => "go",
            (true, false) => "g",
            _ => "o",
        };
        let mut fix = format!("`chmod {who}-w {}`", path.display());
        if extra & 0o020 != 0 && kind == Kind::Dir && !self.shared {
            fix.push_str(
                ", or share the bus with its group: make its directory setgid and \
                 group-writable (`chmod 2770 <bus>`, README \"Sharing a bus between users\")",
            );
        }
        Err(untrusted(
            path,
            format!(
                "is writable by {} (mode {:04o}), beyond the bus's sharing mode ({:04o})",
                match who {
                    "go" => "its group and others",
                    "g" => "its group",
                    _ => "others",
                },
                mode & 0o7777,
                allowed & 0o7777
            ),
            fix,
        ))
    }
}

/// Is `gid` the effective group or a supplementary group of this process?
fn in_group(gid: u32) -> bool {
    rustix::process::getegid().as_raw() == gid
        || rustix::process::getgroups().is_ok_and(|groups| groups.iter().any(|g| g.as_raw() == gid))
}

/// Checks that `st` is what `kind` says, and that a file has no other name.
pub(super) fn check_type(path: &Path, st: &Stat, kind: Kind) -> crate::Result<()> {
    let is = FileType::from_raw_mode(st.st_mode);
    let what = match (kind, is) {
        (Kind::File, FileType::RegularFile) => {
            // 0: removed while open (compaction); fine, nothing else can reach it.
            if st.st_nlink > 1 {
                return Err(unsafe_file(
                    path,
                    &format!(
                        "has {} hard links, so it is also somewhere else",
                        st.st_nlink
                    ),
                    "agentbus never writes to a file that has other names: remove the \
                     other links, or replace this one with a copy (`cp -p F F.new && mv F.new F`)",
                ));
            }
            return Ok(());
        }
        (Kind::Dir, FileType::Directory) => return Ok(()),
        (_, FileType::Symlink) => "a symbolic link",
        (_, FileType::Fifo) => "a FIFO (named pipe)",
        (_, FileType::CharacterDevice) | (_, FileType::BlockDevice) => "a device",
        (_, FileType::Socket) => "a socket",
        (Kind::File, FileType::Directory) => "a directory",
        (Kind::Dir, _) => "a file",
        (Kind::File, _) => "not a regular file",
    };
    let want = match kind {
        Kind::File => "a regular file",
        Kind::Dir => "a directory",
    };
    Err(unsafe_file(
        path,
        &format!("is {what}, where the bus keeps {want}"),
        "remove it (agentbus opens only regular files and directories of its own)",
    ))
}

pub(super) fn unsafe_file(path: &Path, problem: &str, fix: &str) -> Error {
    Error::UnsafeFile {
        path: path.to_owned(),
        problem: problem.to_owned(),
        fix: fix.to_owned(),
    }
}

fn untrusted(path: &Path, problem: String, fix: String) -> Error {
    Error::Untrusted {
        path: path.to_owned(),
        problem,
        fix,
    }
}
