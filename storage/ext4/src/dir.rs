//! Directory entries: linear blocks (htree directories are read the same way: their
//! index nodes look like one empty entry spanning the block), the metadata_csum tail, and
//! inline directories.

use crate::bytes::{le16, le32};
use crate::csum::crc32c_raw;
use crate::error::{Corruption, Result};
use crate::fs::Ext4;
use crate::inode::Inode;
use crate::superblock::INCOMPAT_FILETYPE;

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// The name (ext4 names are bytes, not necessarily UTF-8).
    pub name: Vec<u8>,
    /// Inode number.
    pub ino: u32,
    /// The type recorded in the entry (0 when the filetype feature is off).
    pub file_type: u8,
}

impl DirEntry {
    /// The name as text, with invalid UTF-8 replaced.
    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

fn derr(ino: u32, block: u64, msg: impl Into<String>) -> crate::Error {
    Corruption::DirEntry {
        ino,
        block,
        msg: msg.into(),
    }
    .into()
}

/// Parse the entries of `data` (one directory block, or an inline area) into `out`.
pub fn parse_entries(
    fs: &Ext4,
    dir: &Inode,
    block: u64,
    data: &[u8],
    out: &mut Vec<DirEntry>,
) -> Result<()> {
    let filetype = fs.superblock().feature_incompat & INCOMPAT_FILETYPE != 0;
    let bs = fs.superblock().block_size() as usize;
    let mut off = 0usize;
    while off + 8 <= data.len() {
        let ino = le32(data, off);
        let rec_len = crate::encode::rec_len_from_disk(le16(data, off + 4), bs);
        let (name_len, file_type) = if filetype {
            (usize::from(data[off + 6]), data[off + 7])
        } else {
            (usize::from(le16(data, off + 6)), 0)
        };
        if rec_len < 8 || !rec_len.is_multiple_of(4) || off + rec_len > data.len() {
            return Err(derr(
                dir.ino,
                block,
                format!("entry at {off}: rec_len {rec_len}"),
            ));
        }
        if ino != 0 {
            if 8 + name_len > rec_len || name_len == 0 {
                return Err(derr(
                    dir.ino,
                    block,
                    format!("entry at {off}: name length {name_len}"),
                ));
            }
            out.push(DirEntry {
                name: data[off + 8..off + 8 + name_len].to_vec(),
                ino,
                file_type,
            });
        }
        off += rec_len;
    }
    Ok(())
}

/// Verify the checksum tail of a leaf block (metadata_csum), if the block has one.
/// Index (htree) nodes carry a different tail and are skipped.
pub fn verify_leaf(fs: &Ext4, dir: &Inode, block: u64, data: &[u8]) -> Result<()> {
    let sb = fs.superblock();
    let n = data.len();
    if !sb.has_metadata_csum() || n < 12 {
        return Ok(());
    }
    // The tail: inode 0, rec_len 12, name_len 0, file type 0xde, then the crc.
    let tail = &data[n - 12..];
    if le32(tail, 0) != 0 || le16(tail, 4) != 12 || tail[6] != 0 || tail[7] != 0xde {
        return Ok(());
    }
    let stored = le32(tail, 8);
    let computed = crc32c_raw(dir.csum_seed(sb), &data[..n - 12]);
    if stored != computed {
        return Err(Corruption::Checksum {
            what: format!("directory inode {} block {block}", dir.ino),
            stored,
            computed,
        }
        .into());
    }
    Ok(())
}
