//! Copying a root tree for a box: every file by reflink where the file system has it (no
//! data copied), else a sparse copy; directories, symlinks, hard links, device nodes,
//! owners, modes, times and extended attributes kept. The source is boxlet's own cache.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Timespec, Timestamps, CWD};

use crate::rootfs::copy::{copy_file_with, CopyMethod};
use crate::rootfs::RootfsError;

/// What a tree copy did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TreeCopy {
    /// Regular files made by reflink (no data copied).
    pub reflinked: u64,
    /// Regular files whose data was copied.
    pub copied: u64,
    /// Bytes of those copies (apparent size).
    pub copied_bytes: u64,
    /// Directories, symlinks, hard links and nodes.
    pub others: u64,
}

/// Copy the tree at `src` to the new directory `dst`.
pub fn copy_tree(src: &Path, dst: &Path) -> Result<TreeCopy, RootfsError> {
    let mut stats = TreeCopy::default();
    let mut links = HashMap::new();
    copy_entry(src, dst, &mut stats, &mut links)?;
    // One sync for the whole tree, not one per file.
    let dir = std::fs::File::open(dst).map_err(RootfsError::io("opening", dst))?;
    rustix::fs::syncfs(&dir).map_err(|e| RootfsError::io("syncing", dst)(e.into()))?;
    Ok(stats)
}

fn copy_entry(
    src: &Path,
    dst: &Path,
    stats: &mut TreeCopy,
    links: &mut HashMap<(u64, u64), PathBuf>,
) -> Result<(), RootfsError> {
    let meta = std::fs::symlink_metadata(src).map_err(RootfsError::io("reading", src))?;
    let ft = meta.file_type();
    if ft.is_dir() {
        std::fs::create_dir(dst).map_err(RootfsError::io("creating", dst))?;
        let mut names: Vec<_> = std::fs::read_dir(src)
            .map_err(RootfsError::io("listing", src))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(RootfsError::io("listing", src))?;
        names.sort();
        for name in names {
            copy_entry(&src.join(&name), &dst.join(&name), stats, links)?;
        }
        stats.others += 1;
    } else if ft.is_file() {
        let key = (meta.dev(), meta.ino());
        if meta.nlink() > 1 {
            if let Some(first) = links.get(&key) {
                std::fs::hard_link(first, dst).map_err(RootfsError::io("linking", dst))?;
                stats.others += 1;
                return Ok(());
            }
            links.insert(key, dst.to_path_buf());
        }
        match copy_file_with(src, dst, false)? {
            CopyMethod::Reflink => stats.reflinked += 1,
            CopyMethod::Sparse => {
                stats.copied += 1;
                stats.copied_bytes += meta.len();
            }
        }
    } else if ft.is_symlink() {
        let target = std::fs::read_link(src).map_err(RootfsError::io("reading", src))?;
        std::os::unix::fs::symlink(&target, dst).map_err(RootfsError::io("creating", dst))?;
        stats.others += 1;
    } else {
        let kind = if ft.is_char_device() {
            rustix::fs::FileType::CharacterDevice
        } else if ft.is_block_device() {
            rustix::fs::FileType::BlockDevice
        } else if ft.is_fifo() {
            rustix::fs::FileType::Fifo
        } else {
            // Sockets are not part of a root tree.
            return Ok(());
        };
        rustix::fs::mknodat(
            CWD,
            dst,
            kind,
            rustix::fs::Mode::from_raw_mode(meta.mode() & 0o7777),
            meta.rdev(),
        )
        .map_err(|e| RootfsError::io("creating", dst)(e.into()))?;
        stats.others += 1;
    }
    copy_meta(src, dst, &meta)
}

/// Owner, mode, extended attributes and times of `src` onto `dst` (not following a
/// symlink).
fn copy_meta(src: &Path, dst: &Path, meta: &std::fs::Metadata) -> Result<(), RootfsError> {
    let set = |r: rustix::io::Result<()>, op: &'static str| {
        r.map_err(|e| RootfsError::io(op, dst)(e.into()))
    };
    let symlink = meta.file_type().is_symlink();
    set(
        rustix::fs::chownat(
            CWD,
            dst,
            Some(rustix::fs::Uid::from_raw(meta.uid())),
            Some(rustix::fs::Gid::from_raw(meta.gid())),
            AtFlags::SYMLINK_NOFOLLOW,
        ),
        "setting the owner of",
    )?;
    if !symlink {
        std::fs::set_permissions(
            dst,
            std::os::unix::fs::PermissionsExt::from_mode(meta.mode() & 0o7777),
        )
        .map_err(RootfsError::io("setting the mode of", dst))?;
        copy_xattrs(src, dst)?;
    }
    let ts = |s: i64, ns: i64| Timespec {
        tv_sec: s,
        tv_nsec: ns as _,
    };
    set(
        rustix::fs::utimensat(
            CWD,
            dst,
            &Timestamps {
                last_access: ts(meta.atime(), meta.atime_nsec()),
                last_modification: ts(meta.mtime(), meta.mtime_nsec()),
            },
            AtFlags::SYMLINK_NOFOLLOW,
        ),
        "setting the times of",
    )
}

fn copy_xattrs(src: &Path, dst: &Path) -> Result<(), RootfsError> {
    let mut names = vec![0u8; 4096];
    let n = match rustix::fs::llistxattr(src, &mut names[..]) {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => return Ok(()),
        Err(e) => return Err(RootfsError::io("listing the xattrs of", src)(e.into())),
    };
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let name = OsStr::from_bytes(name);
        let mut value = vec![0u8; 65536];
        let len = rustix::fs::lgetxattr(src, name, &mut value[..])
            .map_err(|e| RootfsError::io("reading an xattr of", src)(e.into()))?;
        rustix::fs::lsetxattr(dst, name, &value[..len], rustix::fs::XattrFlags::empty())
            .map_err(|e| RootfsError::io("setting an xattr of", dst)(e.into()))?;
    }
    Ok(())
}

/// Bytes allocated to `path`: a file's blocks, or everything under a directory, on its
/// file system only (nothing across mounts), hard links counted once. What cannot be read
/// counts as nothing.
pub fn allocated_bytes(path: &Path) -> u64 {
    tree_size(path).bytes
}

/// What a tree holds: its bytes ([`allocated_bytes`]) and its entries (what a copy of it
/// needs inodes for: every file, directory and link, hard links once).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeSize {
    /// Bytes allocated.
    pub bytes: u64,
    /// Entries, `path` itself included.
    pub entries: u64,
}

/// The [`TreeSize`] of `path`, on its file system only.
pub fn tree_size(path: &Path) -> TreeSize {
    let Ok(top) = std::fs::symlink_metadata(path) else {
        return TreeSize::default();
    };
    let mut seen = HashSet::new();
    let mut size = TreeSize::default();
    let mut stack = vec![path.to_path_buf()];
    while let Some(p) = stack.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.dev() != top.dev() || (m.nlink() > 1 && !m.is_dir() && !seen.insert(m.ino())) {
            continue;
        }
        size.bytes += m.blocks() * 512;
        size.entries += 1;
        if m.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&p) {
                stack.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
    size
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocated_bytes_counts_a_tree_once_per_inode() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, vec![7u8; 64 << 10]).unwrap();
        let file = allocated_bytes(&a);
        assert!(file >= 64 << 10, "{file}");
        let tree = allocated_bytes(dir.path());
        std::fs::hard_link(&a, dir.path().join("b")).unwrap();
        assert_eq!(
            allocated_bytes(dir.path()),
            tree,
            "a hard link adds nothing"
        );
        std::fs::create_dir(dir.path().join("d")).unwrap();
        std::fs::write(dir.path().join("d/c"), vec![1u8; 64 << 10]).unwrap();
        assert!(allocated_bytes(dir.path()) >= tree + file);
        assert_eq!(allocated_bytes(&dir.path().join("missing")), 0);
        // Entries: the directory, a (b is the same file), d and d/c.
        assert_eq!(tree_size(dir.path()).entries, 4);
    }
}
