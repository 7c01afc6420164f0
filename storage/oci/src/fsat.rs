//! File-system operations relative to directory fds, that never leave a root.
//!
//! Every path is resolved by `openat2(RESOLVE_IN_ROOT)`: symlinks (absolute or with `..`)
//! are followed as if the root were `/`, so a hostile layer cannot reach outside it, and
//! a concurrent rename cannot race the check (there is no check: the kernel resolves).
//! The last component of a path is then operated on by name in its parent's fd, without
//! following it.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use rustix::fs::{openat2, statat, unlinkat, AtFlags, Dir, FileType, Mode, OFlags, ResolveFlags};

/// Resolution for every lookup: inside the root, no magic links (`/proc/self/fd/..`).
fn in_root() -> ResolveFlags {
    ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS
}

/// Open the directory `rel` (components joined by `/`, empty for the root) under `root`,
/// as a path-only fd usable as the `dirfd` of `*at` calls.
pub fn open_dir_path(root: &OwnedFd, rel: &[u8]) -> io::Result<OwnedFd> {
    let rel = if rel.is_empty() { &b"."[..] } else { rel };
    Ok(openat2(
        root,
        OsStr::from_bytes(rel),
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        in_root(),
    )?)
}

/// Open the directory `rel` under `root` for reading its entries or changing its
/// metadata.
pub fn open_dir_rw(root: &OwnedFd, rel: &[u8]) -> io::Result<OwnedFd> {
    let rel = if rel.is_empty() { &b"."[..] } else { rel };
    Ok(openat2(
        root,
        OsStr::from_bytes(rel),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        in_root(),
    )?)
}

/// Open (creating what is missing, mode 0755) the directory made of `components` under
/// `root`, as a path-only fd. A symlink on the way is followed inside the root, and the
/// directories missing at its target are created there, as `mkdir -p` would in a
/// chroot.
pub fn ensure_dir(root: &OwnedFd, components: &[&[u8]]) -> io::Result<OwnedFd> {
    let joined = components.join(&b'/');
    match open_dir_path(root, &joined) {
        Ok(fd) => return Ok(fd),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Walk the path, resolved lexically inside the root: `pending` holds what is left,
    // `done` the directories (within the root, no symlinks) reached so far.
    let mut pending: Vec<Vec<u8>> = components.iter().rev().map(|c| c.to_vec()).collect();
    let mut done: Vec<Vec<u8>> = Vec::new();
    let mut links = 0;
    while let Some(comp) = pending.pop() {
        match comp.as_slice() {
            b"" | b"." => continue,
            b".." => {
                done.pop();
                continue;
            }
            _ => {}
        }
        let parent = open_dir_path(root, &done.join(&b'/'))?;
        let name = OsStr::from_bytes(&comp);
        match rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        if kind_at(&parent, &comp)? == Some(FileType::Symlink) {
            links += 1;
            if links > 40 {
                return Err(rustix::io::Errno::LOOP.into());
            }
            let target = rustix::fs::readlinkat(&parent, name, Vec::new())?.into_bytes();
            if target.starts_with(b"/") {
                done.clear();
            }
            pending.extend(target.split(|&b| b == b'/').rev().map(<[u8]>::to_vec));
            continue;
        }
        done.push(comp);
    }
    open_dir_path(root, &done.join(&b'/'))
}

/// The type of `name` in `dir`, not following a symlink; `None` when absent.
pub fn kind_at(dir: &OwnedFd, name: &[u8]) -> io::Result<Option<FileType>> {
    match statat(dir, OsStr::from_bytes(name), AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Remove `name` from `dir`, a directory with everything in it; absent is fine.
pub fn remove_all_at(dir: &impl AsFd, name: &[u8]) -> io::Result<()> {
    let os = OsStr::from_bytes(name);
    let st = match statat(dir, os, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(rustix::io::Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
        let sub = rustix::fs::openat(
            dir,
            os,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        for child in entries(&sub)? {
            remove_all_at(&sub, &child)?;
        }
        unlinkat(dir, os, AtFlags::REMOVEDIR)?;
    } else {
        unlinkat(dir, os, AtFlags::empty())?;
    }
    Ok(())
}

/// The names in a directory opened for reading, without `.` and `..`.
pub fn entries(dir: &impl AsFd) -> io::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    for entry in Dir::read_from(dir)? {
        let name = entry?.file_name().to_bytes().to_vec();
        if name != b"." && name != b".." {
            out.push(name);
        }
    }
    Ok(out)
}
