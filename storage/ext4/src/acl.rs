//! POSIX ACLs: the VFS xattr format (`system.posix_acl_access` as `getfattr` shows it,
//! version 2, 8 bytes per entry) and ext4's on-disk format (version 1, 4-byte entries for
//! the owner, group, mask and other, 8-byte ones for named users and groups).

use crate::error::{ErrorKind, Result};

const VFS_VERSION: u32 = 2;
const DISK_VERSION: u32 = 1;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;
const UNDEFINED_ID: u32 = u32::MAX;

fn bad(what: &str, msg: impl std::fmt::Display) -> crate::Error {
    ErrorKind::InvalidInput(format!("POSIX ACL ({what}): {msg}")).into()
}

fn tag_has_id(tag: u16, what: &str) -> Result<bool> {
    match tag {
        USER | GROUP => Ok(true),
        USER_OBJ | GROUP_OBJ | MASK | OTHER => Ok(false),
        t => Err(bad(what, format_args!("unknown tag {t:#x}"))),
    }
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// The ext4 form of a VFS-format ACL value.
pub fn to_disk(vfs: &[u8]) -> Result<Vec<u8>> {
    const WHAT: &str = "xattr value";
    if vfs.len() < 4 || !(vfs.len() - 4).is_multiple_of(8) {
        return Err(bad(WHAT, format_args!("{} bytes", vfs.len())));
    }
    if le32(vfs, 0) != VFS_VERSION {
        return Err(bad(WHAT, format_args!("version {}", le32(vfs, 0))));
    }
    let mut out = DISK_VERSION.to_le_bytes().to_vec();
    for e in vfs[4..].chunks_exact(8) {
        let tag = le16(e, 0);
        out.extend_from_slice(&e[0..4]);
        if tag_has_id(tag, WHAT)? {
            out.extend_from_slice(&e[4..8]);
        }
    }
    Ok(out)
}

/// The VFS form of an ext4 on-disk ACL value.
pub fn from_disk(disk: &[u8]) -> Result<Vec<u8>> {
    const WHAT: &str = "on disk";
    if disk.len() < 4 || le32(disk, 0) != DISK_VERSION {
        return Err(bad(WHAT, "bad header"));
    }
    let mut out = VFS_VERSION.to_le_bytes().to_vec();
    let mut off = 4;
    while off < disk.len() {
        if off + 4 > disk.len() {
            return Err(bad(WHAT, "truncated entry"));
        }
        let tag = le16(disk, off);
        out.extend_from_slice(&disk[off..off + 4]);
        if tag_has_id(tag, WHAT)? {
            if off + 8 > disk.len() {
                return Err(bad(WHAT, "truncated entry"));
            }
            out.extend_from_slice(&disk[off + 4..off + 8]);
            off += 8;
        } else {
            out.extend_from_slice(&UNDEFINED_ID.to_le_bytes());
            off += 4;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vfs(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = VFS_VERSION.to_le_bytes().to_vec();
        for &(t, p, id) in entries {
            v.extend_from_slice(&t.to_le_bytes());
            v.extend_from_slice(&p.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    }

    #[test]
    fn named_entries_keep_ids_and_short_ones_lose_them() {
        let acl = vfs(&[
            (USER_OBJ, 6, UNDEFINED_ID),
            (USER, 4, 1000),
            (GROUP_OBJ, 4, UNDEFINED_ID),
            (GROUP, 5, 50),
            (MASK, 7, UNDEFINED_ID),
            (OTHER, 0, UNDEFINED_ID),
        ]);
        let disk = to_disk(&acl).unwrap();
        // Header, four short entries, two long ones.
        assert_eq!(disk.len(), 4 + 4 * 4 + 2 * 8);
        assert_eq!(le32(&disk, 0), DISK_VERSION);
        assert_eq!(le32(&disk, 12), 1000);
        assert_eq!(from_disk(&disk).unwrap(), acl);
    }

    #[test]
    fn malformed_values_are_refused() {
        assert!(to_disk(&[2, 0, 0]).is_err());
        assert!(to_disk(&vfs(&[(0x40, 0, 0)])).is_err());
        let mut v1 = vfs(&[(USER_OBJ, 6, 0)]);
        v1[0] = 1;
        assert!(to_disk(&v1).is_err());
        assert!(from_disk(&[1, 0, 0, 0, 2, 0, 6]).is_err());
        assert!(from_disk(&[1, 0, 0, 0, 2, 0, 6, 0]).is_err());
        assert!(from_disk(&[2, 0, 0, 0]).is_err());
    }
}
