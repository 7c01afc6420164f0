//! Extended attributes: in the inode after its extra fields, and in one xattr block
//! (checksummed with metadata_csum). Values in separate inodes (ea_inode) are read too.

use crate::bytes::{le16, le32};
use crate::csum::crc32c_raw;
use crate::error::{Corruption, Result};
use crate::fs::Ext4;
use crate::inode::Inode;

/// Magic of the in-inode area and of xattr blocks.
const XATTR_MAGIC: u32 = 0xea02_0000;
/// Largest value the reader accepts (the kernel's limit is 64 KiB).
const MAX_VALUE: u32 = 1 << 16;
/// Largest sum of one inode's values (many entries may name one large value inode).
const MAX_TOTAL: usize = 16 << 20;

/// One extended attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Xattr {
    /// Full name with its namespace prefix (`user.foo`, `security.capability`).
    pub name: String,
    /// The value.
    pub value: Vec<u8>,
}

fn prefix(index: u8) -> Option<&'static str> {
    Some(match index {
        1 => "user.",
        2 => "system.posix_acl_access",
        3 => "system.posix_acl_default",
        4 => "trusted.",
        6 => "security.",
        7 => "system.",
        8 => "system.richacl",
        _ => return None,
    })
}

fn xerr(ino: u32, msg: impl Into<String>) -> crate::Error {
    Corruption::Xattr {
        ino,
        msg: msg.into(),
    }
    .into()
}

/// Every extended attribute of `inode`: in-inode ones first, then the block's.
pub fn read_xattrs(fs: &Ext4, inode: &Inode) -> Result<Vec<Xattr>> {
    let mut out = Vec::new();
    let area = &inode.xattr_area;
    if area.len() >= 4 && le32(area, 0) == XATTR_MAGIC {
        // Value offsets count from the first entry, just after the magic.
        let entries = &area[4..];
        parse_entries(fs, inode, entries, 0, entries, &mut out)?;
    }
    if inode.file_acl != 0 {
        let nr = inode.file_acl;
        if nr >= fs.superblock().blocks_count {
            return Err(xerr(
                inode.ino,
                format!("xattr block {nr} outside the filesystem"),
            ));
        }
        let block = fs.read_block(nr)?;
        if le32(&block, 0) != XATTR_MAGIC {
            return Err(xerr(inode.ino, format!("xattr block {nr}: bad magic")));
        }
        verify_block(fs, &block, nr)?;
        parse_entries(fs, inode, &block, 32, &block, &mut out)?;
    }
    Ok(out)
}

fn verify_block(fs: &Ext4, block: &[u8], nr: u64) -> Result<()> {
    let sb = fs.superblock();
    if !sb.has_metadata_csum() {
        return Ok(());
    }
    let stored = le32(block, 0x10);
    let mut d = block.to_vec();
    d[0x10..0x14].fill(0);
    let crc = crc32c_raw(sb.checksum_seed, &nr.to_le_bytes());
    let computed = crc32c_raw(crc, &d);
    if stored != computed {
        return Err(Corruption::Checksum {
            what: format!("xattr block {nr}"),
            stored,
            computed,
        }
        .into());
    }
    Ok(())
}

/// Entries start at `start` in `table`; value offsets are relative to `values`.
fn parse_entries(
    fs: &Ext4,
    inode: &Inode,
    table: &[u8],
    start: usize,
    values: &[u8],
    out: &mut Vec<Xattr>,
) -> Result<()> {
    let mut off = start;
    let mut total: usize = out.iter().map(|x| x.value.len()).sum();
    while off + 4 <= table.len() && le32(table, off) != 0 {
        if off + 16 > table.len() {
            return Err(xerr(inode.ino, "entry runs past the end of its area"));
        }
        let name_len = usize::from(table[off]);
        let index = table[off + 1];
        let value_offs = usize::from(le16(table, off + 2));
        let value_inum = le32(table, off + 4);
        let value_size = le32(table, off + 8);
        let name_end = off + 16 + name_len;
        if name_end > table.len() {
            return Err(xerr(inode.ino, "entry name runs past the end of its area"));
        }
        let pfx =
            prefix(index).ok_or_else(|| xerr(inode.ino, format!("unknown name index {index}")))?;
        let name = format!(
            "{pfx}{}",
            String::from_utf8_lossy(&table[off + 16..name_end])
        );
        if value_size > MAX_VALUE {
            return Err(xerr(
                inode.ino,
                format!("{name}: value of {value_size} bytes"),
            ));
        }
        let value = if value_inum != 0 {
            fs.read_ea_inode(value_inum, u64::from(value_size))?
        } else {
            let end = value_offs + value_size as usize;
            values
                .get(value_offs..end)
                .ok_or_else(|| xerr(inode.ino, format!("{name}: value outside its area")))?
                .to_vec()
        };
        let value = if index == 2 || index == 3 {
            crate::acl::from_disk(&value).map_err(|e| xerr(inode.ino, format!("{name}: {e}")))?
        } else {
            value
        };
        total += value.len();
        if total > MAX_TOTAL {
            return Err(xerr(
                inode.ino,
                format!("values of more than {MAX_TOTAL} bytes in all"),
            ));
        }
        out.push(Xattr { name, value });
        off = (name_end + 3) & !3;
    }
    Ok(())
}
