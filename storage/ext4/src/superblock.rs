//! The superblock: geometry, feature sets, checksum seed. Offsets follow the kernel's
//! `struct ext4_super_block`; the byte diagram is in `docs/ext4.md`.

use crate::bytes::{le16, le32, lo_hi};
use crate::csum::crc32c_raw;
use crate::error::{Corruption, ErrorKind, Result};

/// Byte offset of the superblock in the image.
pub const SUPERBLOCK_OFFSET: u64 = 1024;
/// Its size.
pub const SUPERBLOCK_SIZE: usize = 1024;
/// `s_magic`.
pub const MAGIC: u16 = 0xef53;

/// Compatible feature: a journal.
pub const COMPAT_HAS_JOURNAL: u32 = 0x4;
/// Compatible feature: hashed directory indexes.
pub const COMPAT_DIR_INDEX: u32 = 0x20;

/// Incompatible feature: directory entries carry the file type.
pub const INCOMPAT_FILETYPE: u32 = 0x2;
/// Incompatible feature: the journal needs recovery.
pub const INCOMPAT_RECOVER: u32 = 0x4;
/// Incompatible feature: meta block groups.
pub const INCOMPAT_META_BG: u32 = 0x10;
/// Incompatible feature: extents.
pub const INCOMPAT_EXTENTS: u32 = 0x40;
/// Incompatible feature: 64-bit block numbers.
pub const INCOMPAT_64BIT: u32 = 0x80;
/// Incompatible feature: flexible block groups.
pub const INCOMPAT_FLEX_BG: u32 = 0x200;
/// Incompatible feature: large xattr values in inodes.
pub const INCOMPAT_EA_INODE: u32 = 0x400;
/// Incompatible feature: the checksum seed is stored in the superblock.
pub const INCOMPAT_CSUM_SEED: u32 = 0x2000;
/// Incompatible feature: 3-level htrees and >2 GiB directories.
pub const INCOMPAT_LARGEDIR: u32 = 0x4000;
/// Incompatible feature: small files and directories inside the inode.
pub const INCOMPAT_INLINE_DATA: u32 = 0x8000;
/// Incompatible feature: multiple mount protection (harmless to a reader).
pub const INCOMPAT_MMP: u32 = 0x100;
/// Incompatible feature: case-insensitive directories (names stored as given).
pub const INCOMPAT_CASEFOLD: u32 = 0x20000;

/// Read-only compatible feature: group descriptor checksums (crc16).
pub const RO_COMPAT_GDT_CSUM: u32 = 0x10;
/// Read-only compatible feature: i_blocks in filesystem blocks for huge files.
pub const RO_COMPAT_HUGE_FILE: u32 = 0x8;
/// Read-only compatible feature: crc32c checksums on all metadata.
pub const RO_COMPAT_METADATA_CSUM: u32 = 0x400;

/// The incompatible features the reader understands.
const INCOMPAT_KNOWN: u32 = INCOMPAT_FILETYPE
    | INCOMPAT_META_BG
    | INCOMPAT_EXTENTS
    | INCOMPAT_64BIT
    | INCOMPAT_FLEX_BG
    | INCOMPAT_EA_INODE
    | INCOMPAT_CSUM_SEED
    | INCOMPAT_LARGEDIR
    | INCOMPAT_INLINE_DATA
    | INCOMPAT_MMP
    | INCOMPAT_CASEFOLD;

/// Name of an incompatible feature bit, as e2fsprogs names it.
pub fn incompat_name(bit: u32) -> &'static str {
    match 1u32 << bit {
        0x1 => "compression",
        0x2 => "filetype",
        0x4 => "needs_recovery",
        0x8 => "journal_dev",
        0x10 => "meta_bg",
        0x40 => "extent",
        0x80 => "64bit",
        0x100 => "mmp",
        0x200 => "flex_bg",
        0x400 => "ea_inode",
        0x1000 => "dirdata",
        0x2000 => "metadata_csum_seed",
        0x4000 => "large_dir",
        0x8000 => "inline_data",
        0x10000 => "encrypt",
        0x20000 => "casefold",
        _ => "unknown",
    }
}

/// The fields of the superblock the reader uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub inodes_count: u32,
    pub blocks_count: u64,
    pub first_data_block: u32,
    pub log_block_size: u32,
    pub blocks_per_group: u32,
    pub inodes_per_group: u32,
    pub rev_level: u32,
    pub first_ino: u32,
    pub inode_size: u16,
    pub feature_compat: u32,
    pub feature_incompat: u32,
    pub feature_ro_compat: u32,
    pub uuid: [u8; 16],
    pub volume_name: String,
    pub desc_size: u16,
    pub first_meta_bg: u32,
    pub min_extra_isize: u16,
    pub hash_seed: [u32; 4],
    pub def_hash_version: u8,
    pub checksum_seed: u32,
    pub checksum: u32,
}

impl Superblock {
    /// Parse and validate the 1024 superblock bytes.
    pub fn parse(b: &[u8]) -> Result<Self> {
        let bad = |m: String| -> crate::Error { Corruption::Superblock(m).into() };
        let magic = le16(b, 0x38);
        if magic != MAGIC {
            return Err(Corruption::BadMagic(magic).into());
        }
        let incompat = le32(b, 0x60);
        let unknown = incompat & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let bit = unknown.trailing_zeros();
            return Err(ErrorKind::Unsupported(format!(
                "incompatible feature {} (bit {bit})",
                incompat_name(bit)
            ))
            .into());
        }
        let log_block_size = le32(b, 0x18);
        if log_block_size > 6 {
            return Err(bad(format!(
                "block size 1024 << {log_block_size} above 64 KiB"
            )));
        }
        let is64 = incompat & INCOMPAT_64BIT != 0;
        let rev_level = le32(b, 0x4c);
        let (inode_size, first_ino) = if rev_level == 0 {
            (128, 11)
        } else {
            (le16(b, 0x58), le32(b, 0x54))
        };
        if inode_size < 128
            || !inode_size.is_power_of_two()
            || u32::from(inode_size) > 1024 << log_block_size
        {
            return Err(bad(format!("inode size {inode_size}")));
        }
        let desc_size = if is64 { le16(b, 0xfe) } else { 32 };
        if is64 && (!(64..=1024).contains(&desc_size) || !desc_size.is_power_of_two()) {
            return Err(bad(format!("group descriptor size {desc_size}")));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[0x68..0x78]);
        let name_raw = &b[0x78..0x88];
        let name_len = name_raw.iter().position(|&c| c == 0).unwrap_or(16);
        let csum_seed = if incompat & INCOMPAT_CSUM_SEED != 0 {
            le32(b, 0x270)
        } else {
            crc32c_raw(!0, &uuid)
        };
        let sb = Self {
            inodes_count: le32(b, 0x0),
            blocks_count: lo_hi(b, 0x4, is64.then_some(0x150)),
            first_data_block: le32(b, 0x14),
            log_block_size,
            blocks_per_group: le32(b, 0x20),
            inodes_per_group: le32(b, 0x28),
            rev_level,
            first_ino,
            inode_size,
            feature_compat: le32(b, 0x5c),
            feature_incompat: incompat,
            feature_ro_compat: le32(b, 0x64),
            uuid,
            volume_name: String::from_utf8_lossy(&name_raw[..name_len]).into_owned(),
            desc_size,
            first_meta_bg: le32(b, 0x104),
            min_extra_isize: le16(b, 0x15c),
            hash_seed: [le32(b, 0xec), le32(b, 0xf0), le32(b, 0xf4), le32(b, 0xf8)],
            def_hash_version: b[0xfc],
            checksum_seed: csum_seed,
            checksum: le32(b, 0x3fc),
        };
        if sb.has_metadata_csum() {
            let computed = crc32c_raw(!0, &b[..0x3fc]);
            if computed != sb.checksum {
                return Err(Corruption::Checksum {
                    what: "superblock".into(),
                    stored: sb.checksum,
                    computed,
                }
                .into());
            }
        }
        let bs = sb.block_size();
        if sb.blocks_per_group == 0 || sb.blocks_per_group > 8 * bs as u32 {
            return Err(bad(format!("blocks per group {}", sb.blocks_per_group)));
        }
        if sb.inodes_per_group == 0 || sb.inodes_per_group > 8 * bs as u32 {
            return Err(bad(format!("inodes per group {}", sb.inodes_per_group)));
        }
        if sb.first_data_block != u32::from(bs == 1024) {
            return Err(bad(format!("first data block {}", sb.first_data_block)));
        }
        // ext4 addresses at most 2^48 blocks; anything beyond is a lying header.
        if sb.blocks_count <= u64::from(sb.first_data_block) || sb.blocks_count > 1 << 48 {
            return Err(bad(format!("blocks count {}", sb.blocks_count)));
        }
        let groups = sb.group_count();
        if u64::from(sb.inodes_count) > groups * u64::from(sb.inodes_per_group) {
            return Err(bad(format!("inodes count {}", sb.inodes_count)));
        }
        Ok(sb)
    }

    /// Block size in bytes.
    pub fn block_size(&self) -> u64 {
        1024 << self.log_block_size
    }

    /// Number of block groups.
    pub fn group_count(&self) -> u64 {
        (self.blocks_count - u64::from(self.first_data_block))
            .div_ceil(u64::from(self.blocks_per_group))
    }

    /// metadata_csum is on.
    pub fn has_metadata_csum(&self) -> bool {
        self.feature_ro_compat & RO_COMPAT_METADATA_CSUM != 0
    }

    /// 64-bit block numbers.
    pub fn is_64bit(&self) -> bool {
        self.feature_incompat & INCOMPAT_64BIT != 0
    }

    /// Names of every feature set, as e2fsprogs prints them (for `boxlet ext4 info`).
    pub fn feature_names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        let compat = [
            (0x4, "has_journal"),
            (0x8, "ext_attr"),
            (0x10, "resize_inode"),
            (0x20, "dir_index"),
            (0x200, "sparse_super2"),
            (0x400, "fast_commit"),
            (0x800, "stable_inodes"),
            (0x1000, "orphan_file"),
        ];
        for (bit, name) in compat {
            if self.feature_compat & bit != 0 {
                v.push(name);
            }
        }
        for bit in 0..32 {
            if self.feature_incompat & (1 << bit) != 0 {
                v.push(incompat_name(bit));
            }
        }
        let ro = [
            (0x1, "sparse_super"),
            (0x2, "large_file"),
            (0x8, "huge_file"),
            (0x10, "uninit_bg"),
            (0x20, "dir_nlink"),
            (0x40, "extra_isize"),
            (0x100, "quota"),
            (0x200, "bigalloc"),
            (0x400, "metadata_csum"),
            (0x1000, "read-only"),
            (0x2000, "project"),
            (0x8000, "verity"),
        ];
        for (bit, name) in ro {
            if self.feature_ro_compat & bit != 0 {
                v.push(name);
            }
        }
        v
    }
}
