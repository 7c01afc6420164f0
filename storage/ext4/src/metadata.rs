//! What `stat` and `boxlet ext4 tree` report about an entry.

use serde::Serialize;

use crate::error::{corrupt, Result};
use crate::fs::Ext4;
use crate::inode::{FileType, Inode, Timestamp};
use crate::xattr::read_xattrs;

/// Metadata of one inode.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Metadata {
    /// Inode number.
    pub ino: u32,
    /// File type.
    pub file_type: FileType,
    /// Permission bits with setuid, setgid and sticky.
    pub mode: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Hard-link count.
    pub links: u16,
    /// Modification time.
    pub mtime: Timestamp,
    /// Access time.
    pub atime: Timestamp,
    /// Change time.
    pub ctime: Timestamp,
    /// Symlink target.
    pub link_target: Option<String>,
    /// (major, minor) of a device node.
    pub device: Option<(u32, u32)>,
    /// Names of the extended attributes.
    pub xattrs: Vec<String>,
}

impl Metadata {
    pub(crate) fn of(fs: &Ext4, inode: &Inode) -> Result<Self> {
        let file_type = inode.file_type().ok_or_else(|| {
            corrupt(format!(
                "inode {}: invalid mode {:#o}",
                inode.ino, inode.mode
            ))
        })?;
        let link_target = match file_type {
            FileType::Symlink => {
                Some(String::from_utf8_lossy(&fs.symlink_target(inode)?).into_owned())
            }
            _ => None,
        };
        let device = matches!(file_type, FileType::CharDevice | FileType::BlockDevice)
            .then(|| inode.device());
        let xattrs = read_xattrs(fs, inode)?
            .into_iter()
            .map(|x| x.name)
            .filter(|n| n != "system.data")
            .collect();
        Ok(Self {
            ino: inode.ino,
            file_type,
            mode: inode.permissions(),
            uid: inode.uid,
            gid: inode.gid,
            size: inode.size,
            links: inode.links,
            mtime: inode.mtime,
            atime: inode.atime,
            ctime: inode.ctime,
            link_target,
            device,
            xattrs,
        })
    }
}
