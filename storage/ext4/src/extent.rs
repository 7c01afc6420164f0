//! Mapping a file's logical blocks to the image: extent trees (ext4) and classic block
//! maps (ext2/ext3), both flattened into a sorted list of [`Extent`]s. Every node is read
//! at most once (a tree never shares nodes), so a hostile image cannot make the walk loop
//! or blow up.

use std::collections::HashSet;

use crate::bytes::{le16, le32};
use crate::csum::crc32c_raw;
use crate::error::{Corruption, Result};
use crate::fs::Ext4;
use crate::inode::Inode;

/// `eh_magic`.
const EXTENT_MAGIC: u16 = 0xf30a;
/// Deepest extent tree the kernel allows.
const MAX_DEPTH: u16 = 5;

/// A run of logical blocks stored contiguously.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First logical block.
    pub logical: u64,
    /// Number of blocks.
    pub len: u64,
    /// First physical block.
    pub physical: u64,
    /// Allocated but not written: reads as zeros.
    pub uninit: bool,
}

fn extent_err(ino: u32, msg: impl Into<String>) -> crate::Error {
    Corruption::Extent {
        ino,
        msg: msg.into(),
    }
    .into()
}

/// The extents of an inode whose data is an extent tree.
pub fn extent_tree(fs: &Ext4, inode: &Inode) -> Result<Vec<Extent>> {
    let mut out = Vec::new();
    let mut visited = HashSet::new();
    walk(fs, inode, &inode.block, None, &mut visited, &mut out)?;
    out.sort_unstable_by_key(|e| e.logical);
    for w in out.windows(2) {
        if w[0].logical + w[0].len > w[1].logical {
            return Err(extent_err(
                inode.ino,
                format!("extents overlap at logical block {}", w[1].logical),
            ));
        }
    }
    Ok(out)
}

fn walk(
    fs: &Ext4,
    inode: &Inode,
    node: &[u8],
    expected_depth: Option<u16>,
    visited: &mut HashSet<u64>,
    out: &mut Vec<Extent>,
) -> Result<()> {
    let ino = inode.ino;
    if le16(node, 0) != EXTENT_MAGIC {
        return Err(extent_err(ino, format!("bad magic {:#06x}", le16(node, 0))));
    }
    let entries = usize::from(le16(node, 2));
    let max = usize::from(le16(node, 4));
    let depth = le16(node, 6);
    if max > (node.len() - 12) / 12 || entries > max {
        return Err(extent_err(
            ino,
            format!(
                "{entries} entries, max {max}, in a {}-byte node",
                node.len()
            ),
        ));
    }
    if depth > MAX_DEPTH || expected_depth.is_some_and(|d| d != depth) {
        return Err(extent_err(
            ino,
            format!("node depth {depth} (expected {expected_depth:?})"),
        ));
    }
    let blocks = fs.superblock().blocks_count;
    for i in 0..entries {
        let e = &node[12 + 12 * i..24 + 12 * i];
        let logical = u64::from(le32(e, 0));
        if depth == 0 {
            let raw_len = le16(e, 4);
            let (len, uninit) = if raw_len > 32768 {
                (u64::from(raw_len - 32768), true)
            } else {
                (u64::from(raw_len), false)
            };
            let physical = u64::from(le16(e, 6)) << 32 | u64::from(le32(e, 8));
            if len == 0 || physical.checked_add(len).is_none_or(|end| end > blocks) {
                return Err(extent_err(
                    ino,
                    format!("extent of {len} blocks at block {physical} outside the filesystem"),
                ));
            }
            out.push(Extent {
                logical,
                len,
                physical,
                uninit,
            });
        } else {
            let child = u64::from(le16(e, 8)) << 32 | u64::from(le32(e, 4));
            if child >= blocks || !visited.insert(child) {
                return Err(extent_err(
                    ino,
                    format!("index node at block {child} invalid or visited twice"),
                ));
            }
            let block = fs.read_block(child)?;
            verify_tail(fs, inode, &block, child)?;
            walk(fs, inode, &block, Some(depth - 1), visited, out)?;
        }
    }
    Ok(())
}

/// Extent blocks end with a crc32c of the header and entries (metadata_csum).
fn verify_tail(fs: &Ext4, inode: &Inode, block: &[u8], nr: u64) -> Result<()> {
    let sb = fs.superblock();
    if !sb.has_metadata_csum() {
        return Ok(());
    }
    let end = 12 + 12 * usize::from(le16(block, 4));
    if end + 4 > block.len() {
        return Err(extent_err(
            inode.ino,
            format!("block {nr}: no room for the checksum"),
        ));
    }
    let stored = le32(block, end);
    let computed = crc32c_raw(inode.csum_seed(sb), &block[..end]);
    if stored != computed {
        return Err(Corruption::Checksum {
            what: format!("inode {} extent block {nr}", inode.ino),
            stored,
            computed,
        }
        .into());
    }
    Ok(())
}

/// The extents of an inode mapped by direct and (double, triple) indirect blocks.
pub fn block_map(fs: &Ext4, inode: &Inode) -> Result<Vec<Extent>> {
    let bs = fs.superblock().block_size();
    let nblocks = inode.size.div_ceil(bs);
    let per = bs / 4;
    let mut out: Vec<Extent> = Vec::new();
    let mut visited = HashSet::new();
    for i in 0..12u64 {
        let p = u64::from(le32(&inode.block, 4 * i as usize));
        if i < nblocks && p != 0 {
            check_block(fs, inode, p)?;
            push_block(&mut out, i, p);
        }
    }
    let mut base = 12u64;
    for (slot, level) in [(12usize, 1u32), (13, 2), (14, 3)] {
        let span = per.pow(level);
        let p = u64::from(le32(&inode.block, 4 * slot));
        if p != 0 && base < nblocks {
            indirect(fs, inode, p, level, base, nblocks, &mut visited, &mut out)?;
        }
        base += span;
    }
    Ok(out)
}

/// Append one mapped block, merging it into the previous extent when contiguous.
fn push_block(out: &mut Vec<Extent>, logical: u64, physical: u64) {
    if let Some(last) = out.last_mut() {
        if last.logical + last.len == logical && last.physical + last.len == physical {
            last.len += 1;
            return;
        }
    }
    out.push(Extent {
        logical,
        len: 1,
        physical,
        uninit: false,
    });
}

fn check_block(fs: &Ext4, inode: &Inode, p: u64) -> Result<()> {
    if p >= fs.superblock().blocks_count {
        return Err(extent_err(
            inode.ino,
            format!("block map points at block {p}, outside the filesystem"),
        ));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn indirect(
    fs: &Ext4,
    inode: &Inode,
    block: u64,
    level: u32,
    base: u64,
    nblocks: u64,
    visited: &mut HashSet<u64>,
    out: &mut Vec<Extent>,
) -> Result<()> {
    check_block(fs, inode, block)?;
    if !visited.insert(block) {
        return Err(extent_err(
            inode.ino,
            format!("indirect block {block} used twice"),
        ));
    }
    let data = fs.read_block(block)?;
    let per = data.len() as u64 / 4;
    let span = per.pow(level - 1);
    for i in 0..per {
        let logical = base + i * span;
        if logical >= nblocks {
            break;
        }
        let p = u64::from(le32(&data, 4 * i as usize));
        if p == 0 {
            continue;
        }
        if level == 1 {
            check_block(fs, inode, p)?;
            push_block(out, logical, p);
        } else {
            indirect(fs, inode, p, level - 1, logical, nblocks, visited, out)?;
        }
    }
    Ok(())
}
