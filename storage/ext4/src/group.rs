//! Block group descriptors (32 bytes, or `desc_size` with 64bit), located as the kernel
//! locates them (after the superblock, or per meta group with meta_bg), checksummed with
//! crc32c (metadata_csum) or crc16 (gdt_csum).

use crate::bytes::{le16, lo_hi};
use crate::csum::{crc16, crc32c_raw};
use crate::error::{Corruption, Result};
use crate::superblock::{Superblock, INCOMPAT_META_BG, RO_COMPAT_GDT_CSUM};
use crate::{Error, ReadAt};

/// What the reader needs of one group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupDesc {
    /// First block of the inode table.
    pub inode_table: u64,
    /// bg_flags.
    pub flags: u16,
}

/// Whether group `g` is one sparse_super keeps superblock backups in: 0, 1, and the
/// powers of 3, 5 and 7.
pub(crate) fn is_backup_group(g: u64) -> bool {
    if g <= 1 {
        return true;
    }
    [3u64, 5, 7].iter().any(|&p| {
        let mut x = p;
        while x < g {
            x = x.saturating_mul(p);
        }
        x == g
    })
}

/// Whether group `g` holds a superblock backup.
fn has_super(sb: &Superblock, g: u64) -> bool {
    sb.feature_ro_compat & 0x1 == 0 || is_backup_group(g)
}

/// Byte offset of the descriptor of group `g`.
pub(crate) fn desc_offset(sb: &Superblock, g: u64) -> u64 {
    let bs = sb.block_size();
    let ds = u64::from(sb.desc_size);
    let per_block = bs / ds;
    let first = u64::from(sb.first_data_block);
    let meta_bg = sb.feature_incompat & INCOMPAT_META_BG != 0;
    let mg = g / per_block;
    if !meta_bg || mg < u64::from(sb.first_meta_bg) {
        (first + 1) * bs + g * ds
    } else {
        let group0 = mg * per_block;
        let block =
            first + group0 * u64::from(sb.blocks_per_group) + u64::from(has_super(sb, group0));
        block * bs + (g % per_block) * ds
    }
}

/// Read and verify every group descriptor.
pub fn read_groups(src: &dyn ReadAt, sb: &Superblock, image_len: u64) -> Result<Vec<GroupDesc>> {
    let count = sb.group_count();
    // Every descriptor lies inside the image: refuse counts it cannot hold before any
    // offset arithmetic.
    if count.saturating_mul(u64::from(sb.desc_size)) > image_len {
        return Err(Corruption::OutOfImage {
            what: "group descriptor table",
            offset: 0,
            len: image_len,
        }
        .into());
    }
    let ds = usize::from(sb.desc_size);
    // Every descriptor lies inside the image, so the count is bounded by its length.
    let last = desc_offset(sb, count - 1) + ds as u64;
    if last > image_len {
        return Err(Corruption::OutOfImage {
            what: "group descriptor table",
            offset: last - ds as u64,
            len: image_len,
        }
        .into());
    }
    let mut groups = Vec::with_capacity(count as usize);
    let mut raw = vec![0u8; ds];
    let itable_blocks =
        (u64::from(sb.inodes_per_group) * u64::from(sb.inode_size)).div_ceil(sb.block_size());
    for g in 0..count {
        let off = desc_offset(sb, g);
        src.read_exact_at(&mut raw, off)
            .map_err(|e| Error::io(format!("reading group descriptor {g}"), e))?;
        verify(sb, g, &raw)?;
        let is64 = sb.is_64bit() && ds >= 64;
        let inode_table = lo_hi(&raw, 0x8, is64.then_some(0x28));
        if inode_table == 0 || inode_table.saturating_add(itable_blocks) > sb.blocks_count {
            return Err(Corruption::Other(format!(
                "group {g}: inode table at block {inode_table} outside the filesystem"
            ))
            .into());
        }
        groups.push(GroupDesc {
            inode_table,
            flags: le16(&raw, 0x12),
        });
    }
    Ok(groups)
}

/// The checksum a group descriptor should carry (crc32c with metadata_csum, crc16 with
/// gdt_csum), computed as if its checksum field were zero; `None` without either.
pub(crate) fn desc_csum(sb: &Superblock, g: u64, raw: &[u8]) -> Option<u16> {
    let mut d = raw.to_vec();
    d[0x1e..0x20].fill(0);
    if sb.has_metadata_csum() {
        let crc = crc32c_raw(sb.checksum_seed, &(g as u32).to_le_bytes());
        Some((crc32c_raw(crc, &d) & 0xffff) as u16)
    } else if sb.feature_ro_compat & RO_COMPAT_GDT_CSUM != 0 {
        let mut crc = crc16(!0, &sb.uuid);
        crc = crc16(crc, &(g as u32).to_le_bytes());
        crc = crc16(crc, &d[..0x1e]);
        if d.len() > 0x20 {
            crc = crc16(crc, &d[0x20..]);
        }
        Some(crc)
    } else {
        None
    }
}

fn verify(sb: &Superblock, g: u64, raw: &[u8]) -> Result<()> {
    let stored = le16(raw, 0x1e);
    match desc_csum(sb, g, raw) {
        Some(computed) if computed != stored => Err(Corruption::Checksum {
            what: format!("group descriptor {g}"),
            stored: u32::from(stored),
            computed: u32::from(computed),
        }
        .into()),
        _ => Ok(()),
    }
}
