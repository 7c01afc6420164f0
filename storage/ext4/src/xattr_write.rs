//! Encoding extended attributes for the builder: name indexes, the entry and block hashes
//! e2fsck verifies, and the in-inode and block layouts.

use crate::csum::crc32c_raw;
use crate::error::{ErrorKind, Result};

/// Magic of the in-inode area and of xattr blocks.
pub const XATTR_MAGIC: u32 = 0xea02_0000;

/// Split a full name into ext4's name index and the stored suffix.
pub fn split_name(name: &str) -> Result<(u8, &str)> {
    // POSIX ACLs have indexes of their own and an empty stored name.
    match name {
        "system.posix_acl_access" => return Ok((2, "")),
        "system.posix_acl_default" => return Ok((3, "")),
        _ => {}
    }
    for (prefix, index) in [
        ("user.", 1u8),
        ("trusted.", 4),
        ("security.", 6),
        ("system.", 7),
    ] {
        if let Some(rest) = name.strip_prefix(prefix) {
            if rest.is_empty() || rest.len() > 255 {
                break;
            }
            return Ok((index, rest));
        }
    }
    Err(ErrorKind::Unsupported(format!("extended attribute {name:?}")).into())
}

/// The stored form of a value: POSIX ACLs in ext4's own format, the rest as given.
pub fn disk_value(index: u8, value: &[u8]) -> Result<Vec<u8>> {
    match index {
        2 | 3 => crate::acl::to_disk(value),
        _ => Ok(value.to_vec()),
    }
}

/// The hash of one entry (`ext2fs_ext_attr_hash_entry`).
pub fn entry_hash(name: &[u8], value: &[u8]) -> u32 {
    let mut h: u32 = 0;
    for &c in name {
        // The kernel hashes `char`, signed on x86.
        h = (h << 5) ^ (h >> 27) ^ (c as i8 as i32 as u32);
    }
    for chunk in value.chunks(4) {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        h = (h << 16) ^ (h >> 16) ^ u32::from_le_bytes(w);
    }
    h
}

/// One encoded entry, sorted as the kernel keeps block entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    index: u8,
    name: Vec<u8>,
    value: Vec<u8>,
    hash: u32,
}

/// Encode and sort attributes.
pub fn encode(xattrs: &[(String, Vec<u8>)]) -> Result<Vec<Encoded>> {
    let mut v = Vec::with_capacity(xattrs.len());
    for (name, value) in xattrs {
        let (index, rest) = split_name(name)?;
        let value = disk_value(index, value)?;
        v.push(Encoded {
            index,
            name: rest.as_bytes().to_vec(),
            hash: entry_hash(rest.as_bytes(), &value),
            value,
        });
    }
    v.sort_by(|a, b| (a.index, a.name.len(), &a.name).cmp(&(b.index, b.name.len(), &b.name)));
    Ok(v)
}

fn entry_size(e: &Encoded) -> usize {
    (16 + e.name.len() + 3) & !3
}

fn value_size(e: &Encoded) -> usize {
    (e.value.len() + 3) & !3
}

/// Bytes the entries need: entries, 4-byte terminator, padded values.
pub fn space(entries: &[Encoded]) -> usize {
    entries
        .iter()
        .map(|e| entry_size(e) + value_size(e))
        .sum::<usize>()
        + 4
}

/// Lay entries out in `area`: entries from `entries_at`, values packed down from the end;
/// value offsets are relative to `base`. `area` must have room (see [`space`]).
fn lay_out(area: &mut [u8], entries_at: usize, base: usize, entries: &[Encoded]) {
    let mut off = entries_at;
    let mut vend = area.len();
    for e in entries {
        let vs = value_size(e);
        vend -= vs;
        area[vend..vend + e.value.len()].copy_from_slice(&e.value);
        area[off] = e.name.len() as u8;
        area[off + 1] = e.index;
        let value_offs = if e.value.is_empty() { 0 } else { vend - base };
        area[off + 2..off + 4].copy_from_slice(&(value_offs as u16).to_le_bytes());
        area[off + 4..off + 8].copy_from_slice(&0u32.to_le_bytes());
        area[off + 8..off + 12].copy_from_slice(&(e.value.len() as u32).to_le_bytes());
        area[off + 12..off + 16].copy_from_slice(&e.hash.to_le_bytes());
        area[off + 16..off + 16 + e.name.len()].copy_from_slice(&e.name);
        off += entry_size(e);
    }
}

/// The in-inode area (after the extra fields), if the entries fit in `len` bytes.
pub fn inode_area(entries: &[Encoded], len: usize) -> Option<Vec<u8>> {
    if entries.is_empty() || 4 + space(entries) > len {
        return None;
    }
    let mut area = vec![0u8; len];
    area[..4].copy_from_slice(&XATTR_MAGIC.to_le_bytes());
    lay_out(&mut area, 4, 4, entries);
    Some(area)
}

/// An xattr block numbered `nr` holding the entries, checksummed with `seed`.
pub fn block(entries: &[Encoded], block_size: usize, nr: u64, seed: u32) -> Result<Vec<u8>> {
    if 32 + space(entries) > block_size {
        return Err(ErrorKind::Unsupported(format!(
            "extended attributes of {} bytes do not fit in one block",
            space(entries)
        ))
        .into());
    }
    let mut b = vec![0u8; block_size];
    b[0..4].copy_from_slice(&XATTR_MAGIC.to_le_bytes());
    b[4..8].copy_from_slice(&1u32.to_le_bytes()); // h_refcount
    b[8..12].copy_from_slice(&1u32.to_le_bytes()); // h_blocks
    let mut h: u32 = 0;
    for e in entries {
        h = (h << 16) ^ (h >> 16) ^ e.hash;
    }
    b[12..16].copy_from_slice(&h.to_le_bytes());
    lay_out(&mut b, 32, 0, entries);
    let crc = crc32c_raw(seed, &nr.to_le_bytes());
    let crc = crc32c_raw(crc, &b);
    b[16..20].copy_from_slice(&crc.to_le_bytes());
    Ok(b)
}
