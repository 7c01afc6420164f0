//! Encoders shared by the builder and by file injection: inodes, extent trees and
//! directory blocks, with their metadata_csum checksums.

use crate::csum::crc32c_raw;
use crate::error::{ErrorKind, Result};
use crate::tree::NodeMeta;

/// A directory entry to write: name, inode number, file type code.
pub(crate) type Dirent = (Vec<u8>, u32, u8);

/// Everything an inode is written from.
#[derive(Debug, Clone)]
pub(crate) struct InodeRec {
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub links: u16,
    pub blocks_512: u64,
    pub flags: u32,
    pub iblock: [u8; 60],
    pub file_acl: u64,
    pub meta: NodeMeta,
    pub xattr_area: Option<Vec<u8>>,
}

/// (low 32 bits, extra field) for a timestamp.
pub(crate) fn encode_time((secs, nanos): (i64, u32)) -> (u32, u32) {
    let lo = secs as u32;
    let epoch = ((secs - i64::from(lo as i32)) >> 32) as u32 & 3;
    (lo, (nanos.min(999_999_999) << 2) | epoch)
}

/// The `inode_size` bytes of inode `ino` (generation 0), checksummed when `seed` is given
/// (metadata_csum).
pub(crate) fn inode_bytes(
    ino: u32,
    r: &InodeRec,
    seed: Option<u32>,
    inode_size: usize,
    extra_isize: u16,
) -> Vec<u8> {
    let mut b = vec![0u8; inode_size];
    let put16 = |b: &mut [u8], o: usize, v: u16| b[o..o + 2].copy_from_slice(&v.to_le_bytes());
    let put32 = |b: &mut [u8], o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_le_bytes());
    put16(&mut b, 0x0, r.mode);
    put16(&mut b, 0x2, r.uid as u16);
    put32(&mut b, 0x4, r.size as u32);
    let (at, atx) = encode_time(r.meta.atime);
    let (ct, ctx) = encode_time(r.meta.ctime);
    let (mt, mtx) = encode_time(r.meta.mtime);
    put32(&mut b, 0x8, at);
    put32(&mut b, 0xc, ct);
    put32(&mut b, 0x10, mt);
    put16(&mut b, 0x18, r.gid as u16);
    put16(&mut b, 0x1a, r.links);
    put32(&mut b, 0x1c, r.blocks_512 as u32);
    put32(&mut b, 0x20, r.flags);
    b[0x28..0x64].copy_from_slice(&r.iblock);
    put32(&mut b, 0x68, r.file_acl as u32);
    put32(&mut b, 0x6c, (r.size >> 32) as u32);
    put16(&mut b, 0x74, (r.blocks_512 >> 32) as u16);
    put16(&mut b, 0x76, (r.file_acl >> 32) as u16);
    put16(&mut b, 0x78, (r.uid >> 16) as u16);
    put16(&mut b, 0x7a, (r.gid >> 16) as u16);
    let extra = inode_size > 128 && extra_isize >= 24;
    if inode_size > 128 {
        put16(&mut b, 0x80, extra_isize);
    }
    if extra {
        put32(&mut b, 0x84, ctx);
        put32(&mut b, 0x88, mtx);
        put32(&mut b, 0x8c, atx);
        put32(&mut b, 0x90, ct);
        put32(&mut b, 0x94, ctx);
    }
    if let Some(area) = &r.xattr_area {
        let at = 128 + usize::from(extra_isize);
        b[at..at + area.len()].copy_from_slice(area);
    }
    if let Some(seed) = seed {
        let crc = crc32c_raw(seed, &ino.to_le_bytes());
        let crc = crc32c_raw(crc, &0u32.to_le_bytes());
        let crc = crc32c_raw(crc, &b);
        put16(&mut b, 0x7c, crc as u16);
        if inode_size > 128 && extra_isize >= 4 {
            put16(&mut b, 0x82, (crc >> 16) as u16);
        }
    }
    b
}

/// Recompute the metadata_csum checksum of raw inode bytes (seeded by the inode number
/// and the generation stored in the inode).
pub(crate) fn set_inode_checksum(raw: &mut [u8], ino: u32, fs_seed: u32) {
    let has_hi = raw.len() > 128 && u16::from_le_bytes([raw[0x80], raw[0x81]]) >= 4;
    raw[0x7c..0x7e].fill(0);
    if has_hi {
        raw[0x82..0x84].fill(0);
    }
    let crc = crc32c_raw(fs_seed, &ino.to_le_bytes());
    let crc = crc32c_raw(crc, &raw[0x64..0x68]);
    let crc = crc32c_raw(crc, raw);
    raw[0x7c..0x7e].copy_from_slice(&(crc as u16).to_le_bytes());
    if has_hi {
        raw[0x82..0x84].copy_from_slice(&((crc >> 16) as u16).to_le_bytes());
    }
}

fn extent_header(b: &mut [u8], entries: usize, max: u16, depth: u16) {
    b[0..2].copy_from_slice(&0xf30au16.to_le_bytes());
    b[2..4].copy_from_slice(&(entries as u16).to_le_bytes());
    b[4..6].copy_from_slice(&max.to_le_bytes());
    b[6..8].copy_from_slice(&depth.to_le_bytes());
}

fn extent_leaf(b: &mut [u8], (l, p, n): (u64, u64, u64)) {
    b[0..4].copy_from_slice(&(l as u32).to_le_bytes());
    b[4..6].copy_from_slice(&(n as u16).to_le_bytes());
    b[6..8].copy_from_slice(&((p >> 32) as u16).to_le_bytes());
    b[8..12].copy_from_slice(&(p as u32).to_le_bytes());
}

/// Extent tree blocks (leaves and index blocks below the root) for `extents` extents in
/// blocks of `bs` bytes.
pub(crate) fn extent_tree_blocks(extents: u64, bs: u64) -> u64 {
    let per_block = (bs - 12 - 4) / 12;
    let mut level = extents;
    let mut total = 0;
    while level > 4 {
        level = level.div_ceil(per_block);
        total += level;
    }
    total
}

/// The deepest extent tree the kernel accepts.
const MAX_TREE_DEPTH: u16 = 5;

/// The extent root for i_block from `(logical, physical, len)` extents, with leaf and
/// index blocks (taken from `alloc`, written through `write`) when more than 4 are
/// needed: as many levels as the count calls for. Returns i_block and the number of
/// tree blocks.
pub(crate) fn extent_root(
    list: &[(u64, u64, u64)],
    seed: Option<u32>,
    bs: u64,
    alloc: &mut dyn FnMut() -> Result<u64>,
    write: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
) -> Result<([u8; 60], u64)> {
    if let Some(&(l, _, n)) = list.last() {
        if l + n > 1 << 32 {
            return Err(ErrorKind::InvalidInput(format!(
                "a file of {} blocks: ext4 files end at block 2^32",
                l + n
            ))
            .into());
        }
    }
    let mut ib = [0u8; 60];
    if list.len() <= 4 {
        extent_header(&mut ib, list.len(), 4, 0);
        for (i, e) in list.iter().enumerate() {
            extent_leaf(&mut ib[12 + 12 * i..24 + 12 * i], *e);
        }
        return Ok((ib, 0));
    }
    let per_block = (bs as usize - 12 - 4) / 12;
    let end = 12 + 12 * per_block;
    let mut put_block = |b: &mut Vec<u8>| -> Result<u64> {
        let nr = alloc()?;
        if let Some(seed) = seed {
            let crc = crc32c_raw(seed, &b[..end]);
            b[end..end + 4].copy_from_slice(&crc.to_le_bytes());
        }
        write(nr, b)?;
        Ok(nr)
    };
    // Leaves, then index levels over them until the root's 4 slots hold the top one.
    let mut level: Vec<(u64, u64)> = Vec::with_capacity(list.len().div_ceil(per_block));
    for chunk in list.chunks(per_block) {
        let mut b = vec![0u8; bs as usize];
        extent_header(&mut b, chunk.len(), per_block as u16, 0);
        for (j, e) in chunk.iter().enumerate() {
            extent_leaf(&mut b[12 + 12 * j..24 + 12 * j], *e);
        }
        level.push((chunk[0].0, put_block(&mut b)?));
    }
    let mut total = level.len() as u64;
    let mut depth = 1u16;
    while level.len() > 4 {
        if depth >= MAX_TREE_DEPTH {
            return Err(ErrorKind::Unsupported(format!(
                "a file of {} extents needs an extent tree deeper than {MAX_TREE_DEPTH}",
                list.len()
            ))
            .into());
        }
        let mut up = Vec::with_capacity(level.len().div_ceil(per_block));
        for chunk in level.chunks(per_block) {
            let mut b = vec![0u8; bs as usize];
            extent_header(&mut b, chunk.len(), per_block as u16, depth);
            for (j, e) in chunk.iter().enumerate() {
                extent_index(&mut b[12 + 12 * j..24 + 12 * j], *e);
            }
            up.push((chunk[0].0, put_block(&mut b)?));
        }
        total += up.len() as u64;
        level = up;
        depth += 1;
    }
    extent_header(&mut ib, level.len(), 4, depth);
    for (i, e) in level.iter().enumerate() {
        extent_index(&mut ib[12 + 12 * i..24 + 12 * i], *e);
    }
    Ok((ib, total))
}

fn extent_index(b: &mut [u8], (logical, block): (u64, u64)) {
    b[0..4].copy_from_slice(&(logical as u32).to_le_bytes());
    b[4..8].copy_from_slice(&(block as u32).to_le_bytes());
    b[8..10].copy_from_slice(&((block >> 32) as u16).to_le_bytes());
}

/// Put a directory block's checksum tail (metadata_csum) in its last 12 bytes.
pub(crate) fn dir_tail(block: &mut [u8], seed: u32) {
    let tail = block.len() - 12;
    block[tail..tail + 4].fill(0);
    block[tail + 4..tail + 6].copy_from_slice(&12u16.to_le_bytes());
    block[tail + 6] = 0;
    block[tail + 7] = 0xde;
    let crc = crc32c_raw(seed, &block[..tail]);
    block[tail + 8..tail + 12].copy_from_slice(&crc.to_le_bytes());
}

/// A directory entry's stored `rec_len` as a length (e2fsprogs' rule: in 64 KiB blocks,
/// 65535 and 0 mean the whole block and the low bits carry bits 16-17).
pub(crate) fn rec_len_from_disk(raw: u16, bs: usize) -> usize {
    let len = usize::from(raw);
    if bs < 65536 {
        len
    } else if raw == u16::MAX || raw == 0 {
        bs
    } else {
        (len & 65532) | ((len & 3) << 16)
    }
}

/// A length as a stored `rec_len` (the inverse of [`rec_len_from_disk`]).
pub(crate) fn rec_len_to_disk(len: usize, bs: usize) -> [u8; 2] {
    let raw = if bs < 65536 {
        len as u16
    } else if len == bs {
        u16::MAX
    } else {
        ((len & 65532) | ((len >> 16) & 3)) as u16
    };
    raw.to_le_bytes()
}

/// Pack `(name, inode, file type)` entries into directory blocks of `bs` bytes, with
/// checksum tails when `seed` is given.
pub(crate) fn dir_data(
    entries: &[(Vec<u8>, u32, u8)],
    seed: Option<u32>,
    bs: usize,
) -> Vec<Vec<u8>> {
    let usable = if seed.is_some() { bs - 12 } else { bs };
    let mut blocks: Vec<Vec<u8>> = Vec::new();
    let mut cur = vec![0u8; bs];
    let mut off = 0usize;
    let mut last = 0usize;
    let finish = |cur: &mut Vec<u8>, last: usize| {
        // The last entry spans to the tail (or the end of the block).
        cur[last + 4..last + 6].copy_from_slice(&rec_len_to_disk(usable - last, bs));
        if let Some(seed) = seed {
            dir_tail(cur, seed);
        }
    };
    for (name, ino, ty) in entries {
        let len = (8 + name.len() + 3) & !3;
        if off + len > usable {
            finish(&mut cur, last);
            blocks.push(std::mem::replace(&mut cur, vec![0u8; bs]));
            off = 0;
        }
        cur[off..off + 4].copy_from_slice(&ino.to_le_bytes());
        cur[off + 4..off + 6].copy_from_slice(&rec_len_to_disk(len, bs));
        cur[off + 6] = name.len() as u8;
        cur[off + 7] = *ty;
        cur[off + 8..off + 8 + name.len()].copy_from_slice(name);
        last = off;
        off += len;
    }
    finish(&mut cur, last);
    blocks.push(cur);
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn le16(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes([b[o], b[o + 1]])
    }

    fn le32(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }

    /// Walk a node, checking its header, and collect its leaves' extents in order.
    fn walk(
        node: &[u8],
        depth: u16,
        blocks: &HashMap<u64, Vec<u8>>,
        out: &mut Vec<(u64, u64, u64)>,
    ) {
        assert_eq!(le16(node, 0), 0xf30a);
        assert_eq!(le16(node, 6), depth);
        let n = usize::from(le16(node, 2));
        assert!(n <= usize::from(le16(node, 4)));
        for i in 0..n {
            let e = &node[12 + 12 * i..24 + 12 * i];
            if depth == 0 {
                let phys = u64::from(le32(e, 8)) | u64::from(le16(e, 6)) << 32;
                out.push((u64::from(le32(e, 0)), phys, u64::from(le16(e, 4))));
            } else {
                let child = u64::from(le32(e, 4)) | u64::from(le16(e, 8)) << 32;
                let first = out.len();
                walk(&blocks[&child], depth - 1, blocks, out);
                assert_eq!(u64::from(le32(e, 0)), out[first].0, "index key");
            }
        }
    }

    /// With 1 KiB blocks (84 entries a block), 30000 extents need three levels below
    /// the root; every extent comes back in order and every block is counted.
    #[test]
    fn extent_trees_grow_as_deep_as_the_count_needs() {
        for count in [4usize, 5, 84 * 4, 84 * 4 + 1, 84 * 84 * 4, 30_000] {
            let list: Vec<(u64, u64, u64)> = (0..count as u64)
                .map(|i| (2 * i, 1000 + 3 * i, 1))
                .collect();
            let mut next = 1u64 << 33;
            let mut blocks = HashMap::new();
            let (ib, total) = extent_root(
                &list,
                Some(7),
                1024,
                &mut || {
                    next += 1;
                    Ok(next)
                },
                &mut |nr, b| {
                    assert_eq!(b.len(), 1024);
                    blocks.insert(nr, b.to_vec());
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(total, blocks.len() as u64, "{count}");
            assert_eq!(total, extent_tree_blocks(count as u64, 1024), "{count}");
            let depth = le16(&ib, 6);
            let want_depth = match count {
                0..=4 => 0,
                5..=336 => 1,
                337..=28224 => 2,
                _ => 3,
            };
            assert_eq!(depth, want_depth, "{count}");
            let mut out = Vec::new();
            walk(&ib, depth, &blocks, &mut out);
            assert_eq!(out, list);
        }
        let past_end = [((1u64 << 32) - 1, 5, 2)];
        let e = extent_root(&past_end, None, 4096, &mut || Ok(1), &mut |_, _| Ok(()));
        assert!(e.unwrap_err().to_string().contains("2^32"));
    }
}
