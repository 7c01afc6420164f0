//! Inodes: the fixed 128 bytes, the extra fields (nanosecond times, creation time), the
//! checksum, and what the file type and flags mean.

use serde::Serialize;

use crate::bytes::{le16, le32, lo_hi};
use crate::csum::crc32c_raw;
use crate::error::{Corruption, Result};
use crate::superblock::{Superblock, RO_COMPAT_HUGE_FILE};

/// Inode flag: the file's data is mapped by an extent tree.
pub const FLAG_EXTENTS: u32 = 0x80000;
/// Inode flag: a hashed-index (htree) directory.
pub const FLAG_INDEX: u32 = 0x1000;
/// Inode flag: data stored inside the inode.
pub const FLAG_INLINE_DATA: u32 = 0x1000_0000;
/// Inode flag: i_blocks counts filesystem blocks, not 512-byte sectors.
pub const FLAG_HUGE_FILE: u32 = 0x40000;
/// Inode flag: the inode holds a large xattr value.
pub const FLAG_EA_INODE: u32 = 0x20_0000;

/// The root directory's inode number.
pub const ROOT_INO: u32 = 2;

/// File type, from the mode's top four bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileType {
    /// Regular file.
    Regular,
    /// Directory.
    Directory,
    /// Symbolic link.
    Symlink,
    /// Character device.
    CharDevice,
    /// Block device.
    BlockDevice,
    /// Named pipe.
    Fifo,
    /// Unix socket.
    Socket,
}

impl FileType {
    /// From `i_mode`; `None` for an invalid type.
    pub fn from_mode(mode: u16) -> Option<Self> {
        Some(match mode & 0xf000 {
            0x1000 => Self::Fifo,
            0x2000 => Self::CharDevice,
            0x4000 => Self::Directory,
            0x6000 => Self::BlockDevice,
            0x8000 => Self::Regular,
            0xa000 => Self::Symlink,
            0xc000 => Self::Socket,
            _ => return None,
        })
    }

    /// The letter `ls -l` shows.
    pub fn letter(self) -> char {
        match self {
            Self::Regular => '-',
            Self::Directory => 'd',
            Self::Symlink => 'l',
            Self::CharDevice => 'c',
            Self::BlockDevice => 'b',
            Self::Fifo => 'p',
            Self::Socket => 's',
        }
    }
}

/// A timestamp: seconds since the epoch and nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Timestamp {
    /// Seconds (extended to 34 bits by the extra field).
    pub secs: i64,
    /// Nanoseconds (0 without the extra field).
    pub nanos: u32,
}

/// A parsed inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inode {
    /// Inode number.
    pub ino: u32,
    /// Permission bits and file type.
    pub mode: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes.
    pub size: u64,
    /// Hard links.
    pub links: u16,
    /// Blocks used, in 512-byte units (or filesystem blocks with the huge_file flag).
    pub blocks: u64,
    /// i_flags.
    pub flags: u32,
    /// The 60 bytes of i_block (extent root, block map, inline data or symlink target).
    pub block: [u8; 60],
    /// i_generation.
    pub generation: u32,
    /// Block holding extended attributes (0 if none).
    pub file_acl: u64,
    /// Access, change, modification and creation times.
    pub atime: Timestamp,
    /// Change time.
    pub ctime: Timestamp,
    /// Modification time.
    pub mtime: Timestamp,
    /// Creation time (0 without the extra field).
    pub crtime: Timestamp,
    /// The in-inode extended attribute area (after the extra fields), possibly empty.
    pub xattr_area: Vec<u8>,
}

fn time(b: &[u8], secs_off: usize, extra_off: Option<usize>) -> Timestamp {
    let secs = i64::from(le32(b, secs_off) as i32);
    match extra_off {
        Some(e) => {
            let extra = le32(b, e);
            Timestamp {
                secs: secs + (i64::from(extra & 3) << 32),
                nanos: extra >> 2,
            }
        }
        None => Timestamp { secs, nanos: 0 },
    }
}

impl Inode {
    /// Parse the `inode_size` bytes of inode `ino`, verifying the checksum.
    pub fn parse(sb: &Superblock, ino: u32, b: &[u8]) -> Result<Self> {
        let extra_isize = if b.len() > 128 {
            usize::from(le16(b, 0x80))
        } else {
            0
        };
        if b.len() > 128 && (128 + extra_isize > b.len() || extra_isize % 4 != 0) {
            return Err(Corruption::Other(format!("inode {ino}: extra size {extra_isize}")).into());
        }
        if sb.has_metadata_csum() {
            verify(sb, ino, b, extra_isize)?;
        }
        let has = |field_end: usize| extra_isize >= field_end - 128;
        let flags = le32(b, 0x20);
        let huge = sb.feature_ro_compat & RO_COMPAT_HUGE_FILE != 0;
        let mut blocks = lo_hi(b, 0x1c, None) | (u64::from(le16(b, 0x74)) << 32);
        if huge && flags & FLAG_HUGE_FILE != 0 {
            blocks = blocks.saturating_mul(sb.block_size() / 512);
        }
        let mut block = [0u8; 60];
        block.copy_from_slice(&b[0x28..0x64]);
        let xattr_area = if b.len() > 128 {
            b[128 + extra_isize..].to_vec()
        } else {
            Vec::new()
        };
        Ok(Self {
            ino,
            mode: le16(b, 0x0),
            uid: u32::from(le16(b, 0x2)) | (u32::from(le16(b, 0x78)) << 16),
            gid: u32::from(le16(b, 0x18)) | (u32::from(le16(b, 0x7a)) << 16),
            size: lo_hi(b, 0x4, Some(0x6c)),
            links: le16(b, 0x1a),
            blocks,
            flags,
            block,
            generation: le32(b, 0x64),
            file_acl: u64::from(le32(b, 0x68)) | (u64::from(le16(b, 0x76)) << 32),
            atime: time(b, 0x8, has(0x90).then_some(0x8c)),
            ctime: time(b, 0xc, has(0x88).then_some(0x84)),
            mtime: time(b, 0x10, has(0x8c).then_some(0x88)),
            crtime: if has(0x98) {
                time(b, 0x90, Some(0x94))
            } else {
                Timestamp::default()
            },
            xattr_area,
        })
    }

    /// The file type, if the mode holds a valid one.
    pub fn file_type(&self) -> Option<FileType> {
        FileType::from_mode(self.mode)
    }

    /// Permission bits including setuid, setgid and sticky.
    pub fn permissions(&self) -> u16 {
        self.mode & 0o7777
    }

    /// Whether the data is in the inode (inline_data).
    pub fn is_inline(&self) -> bool {
        self.flags & FLAG_INLINE_DATA != 0
    }

    /// Whether the data is mapped by extents.
    pub fn has_extents(&self) -> bool {
        self.flags & FLAG_EXTENTS != 0
    }

    /// For device nodes: (major, minor), in either of the two encodings ext4 uses.
    pub fn device(&self) -> (u32, u32) {
        let old = le32(&self.block, 0);
        if old != 0 {
            ((old >> 8) & 0xff, old & 0xff)
        } else {
            let new = le32(&self.block, 4);
            ((new & 0xfff00) >> 8, (new & 0xff) | ((new >> 12) & 0xfff00))
        }
    }

    /// Checksum seed for this inode's metadata blocks (extent and directory blocks, xattr
    /// values in the inode).
    pub fn csum_seed(&self, sb: &Superblock) -> u32 {
        let crc = crc32c_raw(sb.checksum_seed, &self.ino.to_le_bytes());
        crc32c_raw(crc, &self.generation.to_le_bytes())
    }
}

fn verify(sb: &Superblock, ino: u32, b: &[u8], extra_isize: usize) -> Result<()> {
    let mut d = b.to_vec();
    let stored_lo = le16(b, 0x7c);
    d[0x7c..0x7e].fill(0);
    let has_hi = b.len() > 128 && extra_isize >= 4;
    let stored_hi = if has_hi { le16(b, 0x82) } else { 0 };
    if has_hi {
        d[0x82..0x84].fill(0);
    }
    let mut crc = crc32c_raw(sb.checksum_seed, &ino.to_le_bytes());
    crc = crc32c_raw(crc, &b[0x64..0x68]);
    crc = crc32c_raw(crc, &d);
    let (stored, computed) = if has_hi {
        ((u32::from(stored_hi) << 16) | u32::from(stored_lo), crc)
    } else {
        (u32::from(stored_lo), crc & 0xffff)
    };
    if stored != computed {
        return Err(Corruption::Checksum {
            what: format!("inode {ino}"),
            stored,
            computed,
        }
        .into());
    }
    Ok(())
}
