//! Injecting one host file into an existing image (what the base-disk manager does for
//! `/boxlet/bin/boxlet-guest`): missing parent directories are created, an existing
//! regular file is replaced, and bitmaps, group descriptors, the superblock and every
//! checksum are updated so that `e2fsck -fn` stays clean.
//!
//! Works on images with extents (ext4) and groups whose bitmaps are initialized; a
//! hash-indexed parent directory is turned into a linear one first. Anything else is
//! refused with a named error.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::bytes::{le16, le32, lo_hi};
use crate::csum::crc32c_raw;
use crate::encode::{self, InodeRec};
use crate::error::{corrupt, ErrorKind, Result};
use crate::group::{desc_csum, desc_offset};
use crate::inode::{FileType, Inode, FLAG_EXTENTS, FLAG_INDEX, ROOT_INO};
use crate::superblock::{INCOMPAT_EXTENTS, SUPERBLOCK_OFFSET};
use crate::tree::NodeMeta;
use crate::{Error, Ext4};

const BG_INODE_UNINIT: u16 = 0x1;
const BG_BLOCK_UNINIT: u16 = 0x2;

/// Owner and permissions of the injected file and of directories created for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectOptions {
    /// Permission bits of the file.
    pub mode: u16,
    /// Owner of the file and of created directories.
    pub uid: u32,
    /// Group of the file and of created directories.
    pub gid: u32,
    /// Permission bits of created directories.
    pub dir_mode: u16,
}

impl Default for InjectOptions {
    fn default() -> Self {
        Self {
            mode: 0o755,
            uid: 0,
            gid: 0,
            dir_mode: 0o755,
        }
    }
}

fn unsupported(msg: impl Into<String>) -> Error {
    ErrorKind::Unsupported(msg.into()).into()
}

/// Put `host_file` at `path` inside the image file `image`.
pub fn inject(image: &Path, host_file: &Path, path: &str, opts: &InjectOptions) -> Result<()> {
    let data = std::fs::read(host_file)
        .map_err(|e| Error::io(format!("reading {}", host_file.display()), e))?;
    inject_bytes(image, &data, path, opts)
}

/// Put `data` at `path` inside the image file `image`.
pub fn inject_bytes(image: &Path, data: &[u8], path: &str, opts: &InjectOptions) -> Result<()> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(image)
        .map_err(|e| Error::io(format!("opening {}", image.display()), e))?;
    let reader = file.try_clone().map_err(|e| Error::io("opening", e))?;
    let fs = Ext4::new(Box::new(reader))?;
    let mut inj = Injector::new(&fs, &file)?;
    if let Err(e) = inj.run(data, path, opts) {
        // Nothing of a failed injection stays in the image.
        inj.rollback()?;
        return Err(e.with_path(path));
    }
    inj.commit()?;
    file.sync_all()
        .map_err(|e| Error::io("syncing the image", e))
}

struct Group {
    raw: Vec<u8>,
    block_bitmap: Option<Vec<u8>>,
    inode_bitmap: Option<Vec<u8>>,
}

struct Injector<'a> {
    fs: &'a Ext4,
    file: &'a File,
    bs: u64,
    seed: Option<u32>,
    groups: HashMap<u64, Group>,
    free_blocks_delta: i64,
    free_inodes_delta: i64,
    /// Directory blocks and other metadata written as we go.
    now: i64,
    undo: std::cell::RefCell<Vec<(u64, Vec<u8>)>>,
}

impl<'a> Injector<'a> {
    fn new(fs: &'a Ext4, file: &'a File) -> Result<Self> {
        let sb = fs.superblock();
        if sb.feature_incompat & INCOMPAT_EXTENTS == 0 {
            return Err(unsupported(
                "injecting into an image without extents (ext2/ext3)",
            ));
        }
        if sb.feature_ro_compat & 0x200 != 0 {
            return Err(unsupported("injecting into a bigalloc image"));
        }
        if sb.feature_incompat & crate::superblock::INCOMPAT_FILETYPE == 0 {
            return Err(unsupported(
                "injecting into an image without the filetype feature",
            ));
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        Ok(Self {
            fs,
            file,
            bs: sb.block_size(),
            seed: sb.has_metadata_csum().then_some(sb.checksum_seed),
            groups: HashMap::new(),
            free_blocks_delta: 0,
            free_inodes_delta: 0,
            now,
            undo: Default::default(),
        })
    }

    /// Write, keeping the bytes overwritten so that a failed injection can be undone.
    fn write(&self, what: &str, off: u64, data: &[u8]) -> Result<()> {
        let mut old = vec![0u8; data.len()];
        self.file
            .read_exact_at(&mut old, off)
            .map_err(|e| Error::io(format!("reading {what}"), e))?;
        self.undo.borrow_mut().push((off, old));
        self.file
            .write_all_at(data, off)
            .map_err(|e| Error::io(format!("writing {what}"), e))
    }

    /// Put back everything written so far, newest first (bitmaps, descriptors and the
    /// superblock are only written by `commit`, so they were never touched).
    fn rollback(&self) -> Result<()> {
        for (off, old) in self.undo.borrow_mut().drain(..).rev() {
            self.file
                .write_all_at(&old, off)
                .map_err(|e| Error::io("undoing a failed injection", e))?;
        }
        self.file
            .sync_all()
            .map_err(|e| Error::io("undoing a failed injection", e))
    }

    fn group(&mut self, g: u64) -> Result<&mut Group> {
        if !self.groups.contains_key(&g) {
            let sb = self.fs.superblock();
            let mut raw = vec![0u8; usize::from(sb.desc_size)];
            self.file
                .read_exact_at(&mut raw, desc_offset(sb, g))
                .map_err(|e| Error::io(format!("reading group descriptor {g}"), e))?;
            self.groups.insert(
                g,
                Group {
                    raw,
                    block_bitmap: None,
                    inode_bitmap: None,
                },
            );
        }
        Ok(self.groups.get_mut(&g).expect("inserted"))
    }

    fn is64(&self) -> bool {
        self.fs.superblock().is_64bit() && self.fs.superblock().desc_size >= 64
    }

    fn bitmap(&mut self, g: u64, inode: bool) -> Result<Option<&mut Vec<u8>>> {
        let is64 = self.is64();
        let bs = self.bs;
        let file = self.file;
        let grp = self.group(g)?;
        let flags = le16(&grp.raw, 0x12);
        if flags
            & (if inode {
                BG_INODE_UNINIT
            } else {
                BG_BLOCK_UNINIT
            })
            != 0
        {
            return Ok(None);
        }
        let slot = if inode {
            &mut grp.inode_bitmap
        } else {
            &mut grp.block_bitmap
        };
        if slot.is_none() {
            let (lo, hi) = if inode { (0x4, 0x24) } else { (0x0, 0x20) };
            let at = lo_hi(&grp.raw, lo, is64.then_some(hi));
            let mut b = vec![0u8; bs as usize];
            file.read_exact_at(&mut b, at * bs)
                .map_err(|e| Error::io(format!("reading a bitmap of group {g}"), e))?;
            *slot = Some(b);
        }
        Ok(slot.as_mut())
    }

    /// Adjust a 32-bit counter split in lo (u16 at `lo`) and hi (u16 at `hi`).
    fn bump(raw: &mut [u8], lo: usize, hi: Option<usize>, delta: i64) {
        let cur = u64::from(le16(raw, lo)) | hi.map_or(0, |h| u64::from(le16(raw, h)) << 16);
        let new = (cur as i64 + delta) as u64;
        raw[lo..lo + 2].copy_from_slice(&(new as u16).to_le_bytes());
        if let Some(h) = hi {
            raw[h..h + 2].copy_from_slice(&((new >> 16) as u16).to_le_bytes());
        }
    }

    fn alloc_inode(&mut self, near_group: u64, dir: bool) -> Result<u32> {
        let sb = self.fs.superblock().clone();
        let groups = sb.group_count();
        let ipg = u64::from(sb.inodes_per_group);
        let is64 = self.is64();
        for k in 0..groups {
            let g = (near_group + k) % groups;
            let Some(bitmap) = self.bitmap(g, true)? else {
                continue;
            };
            let first = if g == 0 {
                u64::from(sb.first_ino) - 1
            } else {
                0
            };
            let Some(idx) = (first..ipg).find(|&i| bitmap[(i / 8) as usize] & (1 << (i % 8)) == 0)
            else {
                continue;
            };
            bitmap[(idx / 8) as usize] |= 1 << (idx % 8);
            let grp = self.group(g)?;
            Self::bump(&mut grp.raw, 0xe, is64.then_some(0x2e), -1);
            if dir {
                Self::bump(&mut grp.raw, 0x10, is64.then_some(0x30), 1);
            }
            let unused = u64::from(le16(&grp.raw, 0x1c))
                | if is64 {
                    u64::from(le16(&grp.raw, 0x32)) << 16
                } else {
                    0
                };
            if idx >= ipg - unused.min(ipg) {
                let new = ipg - idx - 1;
                grp.raw[0x1c..0x1e].copy_from_slice(&(new as u16).to_le_bytes());
                if is64 {
                    grp.raw[0x32..0x34].copy_from_slice(&((new >> 16) as u16).to_le_bytes());
                }
            }
            self.free_inodes_delta -= 1;
            return Ok((g * ipg + idx + 1) as u32);
        }
        Err(unsupported(
            "no free inode in a group with an initialized inode bitmap",
        ))
    }

    fn alloc_block(&mut self, near_group: u64) -> Result<u64> {
        let sb = self.fs.superblock().clone();
        let groups = sb.group_count();
        let bpg = u64::from(sb.blocks_per_group);
        let first = u64::from(sb.first_data_block);
        let is64 = self.is64();
        for k in 0..groups {
            let g = (near_group + k) % groups;
            let len = bpg.min(sb.blocks_count - first - g * bpg);
            let Some(bitmap) = self.bitmap(g, false)? else {
                continue;
            };
            let Some(idx) = (0..len).find(|&i| bitmap[(i / 8) as usize] & (1 << (i % 8)) == 0)
            else {
                continue;
            };
            bitmap[(idx / 8) as usize] |= 1 << (idx % 8);
            let grp = self.group(g)?;
            Self::bump(&mut grp.raw, 0xc, is64.then_some(0x2c), -1);
            self.free_blocks_delta -= 1;
            return Ok(first + g * bpg + idx);
        }
        Err(ErrorKind::InvalidInput(
            "no free block left: the image is full (or only groups with uninitialized \
             bitmaps have room)"
                .into(),
        )
        .into())
    }

    fn free_block(&mut self, b: u64) -> Result<()> {
        let sb = self.fs.superblock().clone();
        let bpg = u64::from(sb.blocks_per_group);
        let rel = b - u64::from(sb.first_data_block);
        let (g, idx) = (rel / bpg, rel % bpg);
        let is64 = self.is64();
        let bitmap = self
            .bitmap(g, false)?
            .ok_or_else(|| corrupt(format!("block {b} in an uninitialized group")))?;
        bitmap[(idx / 8) as usize] &= !(1 << (idx % 8));
        let grp = self.group(g)?;
        Self::bump(&mut grp.raw, 0xc, is64.then_some(0x2c), 1);
        self.free_blocks_delta += 1;
        Ok(())
    }

    fn group_of_inode(&self, ino: u32) -> u64 {
        u64::from((ino - 1) / self.fs.superblock().inodes_per_group)
    }

    fn write_inode(&self, ino: u32, rec: &InodeRec) -> Result<()> {
        let sb = self.fs.superblock();
        let extra = if sb.inode_size > 128 {
            sb.min_extra_isize.max(32)
        } else {
            0
        };
        let bytes = encode::inode_bytes(ino, rec, self.seed, usize::from(sb.inode_size), extra);
        self.write("an inode", self.fs.inode_offset(ino)?, &bytes)
    }

    /// Change fields of an existing inode in place and refresh its checksum; everything
    /// else (generation, project, version, extra fields) is kept.
    fn patch_inode(&self, ino: u32, patch: impl FnOnce(&mut [u8])) -> Result<()> {
        let sb = self.fs.superblock();
        let off = self.fs.inode_offset(ino)?;
        let mut raw = vec![0u8; usize::from(sb.inode_size)];
        self.file
            .read_exact_at(&mut raw, off)
            .map_err(|e| Error::io("reading an inode", e))?;
        patch(&mut raw);
        if let Some(seed) = self.seed {
            encode::set_inode_checksum(&mut raw, ino, seed);
        }
        self.write("an inode", off, &raw)
    }

    fn inode_seed(&self, ino: u32, generation: u32) -> Option<u32> {
        self.seed
            .map(|s| crc32c_raw(crc32c_raw(s, &ino.to_le_bytes()), &generation.to_le_bytes()))
    }

    /// Write `data` into newly allocated blocks; returns (i_block, blocks used).
    fn write_data(&mut self, ino: u32, data: &[u8]) -> Result<([u8; 60], u64)> {
        let near = self.group_of_inode(ino);
        let mut list: Vec<(u64, u64, u64)> = Vec::new();
        for (k, chunk) in data.chunks(self.bs as usize).enumerate() {
            let b = self.alloc_block(near)?;
            let mut block = chunk.to_vec();
            block.resize(self.bs as usize, 0);
            self.write("file data", b * self.bs, &block)?;
            match list.last_mut() {
                Some(last) if last.1 + last.2 == b && last.2 < 32768 => last.2 += 1,
                _ => list.push((k as u64, b, 1)),
            }
        }
        let blocks = data.len().div_ceil(self.bs as usize) as u64;
        let seed = self.inode_seed(ino, 0);
        let bs = self.bs;
        let mut leaves = Vec::new();
        let (ib, nleaves) = {
            let mut alloc = || self.alloc_block(near);
            encode::extent_root(&list, seed, bs, &mut alloc, &mut |nr, b| {
                leaves.push((nr, b.to_vec()));
                Ok(())
            })?
        };
        for (nr, b) in leaves {
            self.write("an extent block", nr * bs, &b)?;
        }
        Ok((ib, blocks + nleaves))
    }

    fn run(&mut self, data: &[u8], path: &str, opts: &InjectOptions) -> Result<()> {
        let comps: Vec<&[u8]> = path
            .as_bytes()
            .split(|&b| b == b'/')
            .filter(|c| !c.is_empty() && *c != b".")
            .collect();
        let Some((name, parents)) = comps.split_last() else {
            return Err(ErrorKind::InvalidInput("no file name".into()).into());
        };
        if comps.iter().any(|c| *c == b".." || c.len() > 255) {
            return Err(
                ErrorKind::InvalidInput("path components must be plain names".into()).into(),
            );
        }
        let mut dir = self.fs.inode(ROOT_INO)?;
        for c in parents {
            let found = self
                .fs
                .dir_entries(&dir)?
                .into_iter()
                .find(|e| e.name == *c);
            dir = match found {
                Some(e) => {
                    let i = self.fs.inode(e.ino)?;
                    if i.file_type() != Some(FileType::Directory) {
                        return Err(ErrorKind::NotADirectory.into());
                    }
                    i
                }
                None => self.mkdir(&dir, c, opts)?,
            };
        }
        let bs = self.bs;
        let existing = self
            .fs
            .dir_entries(&dir)?
            .into_iter()
            .find(|e| e.name == *name);
        let meta = NodeMeta {
            mode: opts.mode,
            uid: opts.uid,
            gid: opts.gid,
            atime: (self.now, 0),
            mtime: (self.now, 0),
            ctime: (self.now, 0),
            xattrs: Vec::new(),
        };
        let ino = match existing {
            Some(e) => {
                let old = self.fs.inode(e.ino)?;
                // Only extent-mapped files: their blocks are what is freed below.
                if old.file_type() != Some(FileType::Regular)
                    || old.links != 1
                    || old.file_acl != 0
                    || old.is_inline()
                    || !old.has_extents()
                {
                    return Err(unsupported(
                        "replacing anything but an extent-mapped regular file with one link and no xattr block",
                    ));
                }
                // Release its blocks, leaf blocks included.
                for ext in self.fs.extents(&old)? {
                    for b in ext.physical..ext.physical + ext.len {
                        self.free_block(b)?;
                    }
                }
                for leaf in leaf_blocks(self.fs, &old)? {
                    self.free_block(leaf)?;
                }
                e.ino
            }
            None => {
                let ino = self.alloc_inode(self.group_of_inode(dir.ino), false)?;
                self.add_entry(&dir, name, ino, 1)?;
                ino
            }
        };
        let (iblock, blocks) = self.write_data(ino, data)?;
        let rec = InodeRec {
            mode: 0x8000 | (opts.mode & 0o7777),
            uid: opts.uid,
            gid: opts.gid,
            size: data.len() as u64,
            links: 1,
            blocks_512: blocks * (bs / 512),
            flags: FLAG_EXTENTS,
            iblock,
            file_acl: 0,
            meta,
            xattr_area: None,
        };
        self.write_inode(ino, &rec)
    }

    /// Create directory `name` in `parent`; returns its inode.
    fn mkdir(&mut self, parent: &Inode, name: &[u8], opts: &InjectOptions) -> Result<Inode> {
        let ino = self.alloc_inode(self.group_of_inode(parent.ino), true)?;
        let b = self.alloc_block(self.group_of_inode(ino))?;
        let entries = vec![(b".".to_vec(), ino, 2u8), (b"..".to_vec(), parent.ino, 2u8)];
        let block = encode::dir_data(&entries, self.inode_seed(ino, 0), self.bs as usize).remove(0);
        self.write("a directory block", b * self.bs, &block)?;
        let (iblock, _) = encode::extent_root(
            &[(0, b, 1)],
            None,
            self.bs,
            &mut || unreachable!("one extent"),
            &mut |_, _| Ok(()),
        )?;
        let meta = NodeMeta {
            mode: opts.dir_mode,
            uid: opts.uid,
            gid: opts.gid,
            atime: (self.now, 0),
            mtime: (self.now, 0),
            ctime: (self.now, 0),
            xattrs: Vec::new(),
        };
        let rec = InodeRec {
            mode: 0x4000 | (opts.dir_mode & 0o7777),
            uid: opts.uid,
            gid: opts.gid,
            size: self.bs,
            links: 2,
            blocks_512: self.bs / 512,
            flags: FLAG_EXTENTS,
            iblock,
            file_acl: 0,
            meta,
            xattr_area: None,
        };
        self.write_inode(ino, &rec)?;
        self.add_entry(parent, name, ino, 2)?;
        // The parent gains a link from the new directory's "..".
        self.patch_inode(parent.ino, |raw| {
            let links = le16(raw, 0x1a).saturating_add(1);
            raw[0x1a..0x1c].copy_from_slice(&links.to_le_bytes());
        })?;
        self.fs.inode(ino)
    }

    /// Add an entry to a linear directory, in free space or in a new block.
    fn add_entry(&mut self, dir: &Inode, name: &[u8], ino: u32, ty: u8) -> Result<()> {
        if dir.is_inline() || !dir.has_extents() {
            return Err(unsupported("adding to an inline or block-mapped directory"));
        }
        if dir.flags & FLAG_INDEX != 0 {
            self.drop_index(dir)?;
        }
        // Re-read: an earlier step may have changed the directory.
        let dir = self.fs.inode(dir.ino)?;
        let bs = self.bs as usize;
        let need = (8 + name.len() + 3) & !3;
        let seed = self.inode_seed(dir.ino, dir.generation);
        let usable = if seed.is_some() { bs - 12 } else { bs };
        let extents = self.fs.extents(&dir)?;
        for e in &extents {
            for k in 0..e.len {
                let nr = e.physical + k;
                let mut block = self.fs.read_block(nr)?;
                let mut off = 0;
                while off + 8 <= usable {
                    let rec_len = encode::rec_len_from_disk(le16(&block, off + 4), bs);
                    if rec_len < 8 || off + rec_len > usable {
                        break;
                    }
                    let used = if le32(&block, off) == 0 {
                        0
                    } else {
                        (8 + usize::from(block[off + 6]) + 3) & !3
                    };
                    if rec_len - used >= need {
                        let at = off + used;
                        if used > 0 {
                            block[off + 4..off + 6]
                                .copy_from_slice(&encode::rec_len_to_disk(used, bs));
                        }
                        let new_len = rec_len - used;
                        block[at..at + 4].copy_from_slice(&ino.to_le_bytes());
                        block[at + 4..at + 6]
                            .copy_from_slice(&encode::rec_len_to_disk(new_len, bs));
                        block[at + 6] = name.len() as u8;
                        block[at + 7] = ty;
                        block[at + 8..at + 8 + name.len()].copy_from_slice(name);
                        if let Some(s) = seed {
                            encode::dir_tail(&mut block, s);
                        }
                        return self.write("a directory block", nr * self.bs, &block);
                    }
                    off += rec_len;
                }
            }
        }
        // No room: a new block at the end of the directory.
        let list: Vec<(u64, u64, u64)> = extents
            .iter()
            .map(|e| (e.logical, e.physical, e.len))
            .collect();
        let nr = self.alloc_block(self.group_of_inode(dir.ino))?;
        let logical = dir.size / self.bs;
        let mut list = list;
        match list.last_mut() {
            Some(last) if last.0 + last.2 == logical && last.1 + last.2 == nr && last.2 < 32768 => {
                last.2 += 1
            }
            _ => list.push((logical, nr, 1)),
        }
        if list.len() > 4 || le16(&dir.block, 6) != 0 {
            return Err(unsupported("growing a directory beyond 4 extents"));
        }
        let entries = vec![(name.to_vec(), ino, ty)];
        let block = encode::dir_data(&entries, seed, bs).remove(0);
        self.write("a directory block", nr * self.bs, &block)?;
        let (iblock, _) = encode::extent_root(
            &list,
            None,
            self.bs,
            &mut || unreachable!("at most 4 extents"),
            &mut |_, _| Ok(()),
        )?;
        let size = dir.size + self.bs;
        let blocks_512 = dir.blocks + self.bs / 512;
        self.patch_inode(dir.ino, |raw| {
            raw[0x4..0x8].copy_from_slice(&(size as u32).to_le_bytes());
            raw[0x6c..0x70].copy_from_slice(&((size >> 32) as u32).to_le_bytes());
            raw[0x1c..0x20].copy_from_slice(&(blocks_512 as u32).to_le_bytes());
            raw[0x74..0x76].copy_from_slice(&((blocks_512 >> 32) as u16).to_le_bytes());
            raw[0x28..0x64].copy_from_slice(&iblock);
        })
    }

    /// Turn a hash-indexed directory into a linear one (valid, read the same way; e2fsck
    /// -D or the kernel can index it again): the root keeps "." and "..", index nodes
    /// become empty blocks, each with a directory checksum tail.
    fn drop_index(&mut self, dir: &Inode) -> Result<()> {
        let bs = self.bs as usize;
        let seed = self.inode_seed(dir.ino, dir.generation);
        let usable = if seed.is_some() { bs - 12 } else { bs };
        for e in self.fs.extents(dir)? {
            for k in 0..e.len {
                let nr = e.physical + k;
                let mut block = self.fs.read_block(nr)?;
                let root = e.logical + k == 0;
                // Index nodes look like one empty entry spanning the whole block.
                let node = le32(&block, 0) == 0 && usize::from(le16(&block, 4)) == bs;
                if !(root || node) {
                    continue;
                }
                if root {
                    // "." (12 bytes), then ".." spanning the rest; the index inside goes.
                    block[24..].fill(0);
                    block[16..18].copy_from_slice(&((usable - 12) as u16).to_le_bytes());
                } else {
                    block.fill(0);
                    block[4..6].copy_from_slice(&(usable as u16).to_le_bytes());
                }
                if let Some(s) = seed {
                    encode::dir_tail(&mut block, s);
                }
                self.write("a directory block", nr * self.bs, &block)?;
            }
        }
        self.patch_inode(dir.ino, |raw| {
            let flags = le32(raw, 0x20) & !FLAG_INDEX;
            raw[0x20..0x24].copy_from_slice(&flags.to_le_bytes());
        })
    }

    /// Write bitmaps, descriptors (with checksums) and the superblock.
    fn commit(&mut self) -> Result<()> {
        let sb = self.fs.superblock().clone();
        let is64 = self.is64();
        let mut groups: Vec<u64> = self.groups.keys().copied().collect();
        groups.sort_unstable();
        for g in groups {
            let bs = self.bs;
            let grp = self.groups.get_mut(&g).expect("listed");
            // (bitmap, location lo/hi, checksum lo/hi, bytes the checksum covers)
            let parts = [
                (
                    grp.block_bitmap.take(),
                    (0x0, 0x20),
                    (0x18, 0x38),
                    sb.blocks_per_group / 8,
                    "a block bitmap",
                ),
                (
                    grp.inode_bitmap.take(),
                    (0x4, 0x24),
                    (0x1a, 0x3a),
                    sb.inodes_per_group / 8,
                    "an inode bitmap",
                ),
            ];
            for (bitmap, (lo, hi), (clo, chi), covered, what) in parts {
                let Some(b) = bitmap else { continue };
                let at = lo_hi(&grp.raw, lo, is64.then_some(hi));
                self.file
                    .write_all_at(&b, at * bs)
                    .map_err(|e| Error::io(format!("writing {what}"), e))?;
                if let Some(seed) = self.seed {
                    let crc = crc32c_raw(seed, &b[..covered as usize]);
                    grp.raw[clo..clo + 2].copy_from_slice(&(crc as u16).to_le_bytes());
                    if is64 {
                        grp.raw[chi..chi + 2].copy_from_slice(&((crc >> 16) as u16).to_le_bytes());
                    }
                }
            }
            let raw = &mut grp.raw;
            let csum = desc_csum(&sb, g, raw).unwrap_or(0);
            raw[0x1e..0x20].copy_from_slice(&csum.to_le_bytes());
            self.file
                .write_all_at(raw, desc_offset(&sb, g))
                .map_err(|e| Error::io("writing a group descriptor", e))?;
        }
        let mut raw = vec![0u8; 1024];
        self.file
            .read_exact_at(&mut raw, SUPERBLOCK_OFFSET)
            .map_err(|e| Error::io("reading the superblock", e))?;
        let free_b =
            lo_hi(&raw, 0xc, sb.is_64bit().then_some(0x158)) as i64 + self.free_blocks_delta;
        raw[0xc..0x10].copy_from_slice(&(free_b as u32).to_le_bytes());
        if sb.is_64bit() {
            raw[0x158..0x15c].copy_from_slice(&((free_b as u64 >> 32) as u32).to_le_bytes());
        }
        let free_i = i64::from(le32(&raw, 0x10)) + self.free_inodes_delta;
        raw[0x10..0x14].copy_from_slice(&(free_i as u32).to_le_bytes());
        if sb.has_metadata_csum() {
            let crc = crc32c_raw(!0, &raw[..0x3fc]);
            raw[0x3fc..0x400].copy_from_slice(&crc.to_le_bytes());
        }
        self.file
            .write_all_at(&raw, SUPERBLOCK_OFFSET)
            .map_err(|e| Error::io("writing the superblock", e))
    }
}

/// Index blocks of an inode's extent tree (depth 1 and more).
fn leaf_blocks(fs: &Ext4, inode: &Inode) -> Result<Vec<u64>> {
    let mut out = Vec::new();
    let mut stack = vec![inode.block.to_vec()];
    while let Some(node) = stack.pop() {
        if le16(&node, 0) != 0xf30a {
            return Err(corrupt("extent node without its magic"));
        }
        let depth = le16(&node, 6);
        if depth == 0 {
            continue;
        }
        for i in 0..usize::from(le16(&node, 2)) {
            let e = &node[12 + 12 * i..24 + 12 * i];
            let child = u64::from(le16(e, 8)) << 32 | u64::from(le32(e, 4));
            if out.len() > 4096 {
                return Err(corrupt("extent tree too large"));
            }
            out.push(child);
            stack.push(fs.read_block(child)?);
        }
    }
    Ok(out)
}
