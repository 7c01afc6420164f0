//! Writing an ext4 image from a [`Tree`] in one pass over the data.
//!
//! Layout: 4 KiB blocks, 32768 blocks per group, each group holding (when sparse_super
//! says so) a superblock and descriptor backup, then its block bitmap, inode bitmap and
//! inode table, then data. Files are written in inode order as they are read, zero blocks
//! left as holes; everything else (inodes, directories, bitmaps, descriptors,
//! superblocks) is built in memory, bounded by the number of inodes, and written last.
//!
//! Features: has_journal (by default), extents, 64bit, filetype, ext_attr, dir_index,
//! sparse_super, large_file, huge_file, dir_nlink, extra_isize, metadata_csum, with
//! hashed (htree) indexes for directories of more than one block.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::csum::crc32c_raw;
use crate::dx;
use crate::encode::{self, InodeRec};
use crate::error::{ErrorKind, Result};
use crate::group::is_backup_group;
use crate::tree::{FileData, NodeId, NodeKind, NodeMeta, Tree};
use crate::xattr_write;
use crate::Error;

const BS: u64 = 4096;
const BPG: u64 = 32768;
const INODE_SIZE: u64 = 256;
const EXTRA_ISIZE: u16 = 32;
const DESC_SIZE: u64 = 64;
const FIRST_INO: u32 = 11;
const LOST_FOUND_INO: u32 = 11;
const MAX_EXTENT_LEN: u64 = 32768;
/// The most links an inode may have (`EXT4_LINK_MAX`).
const LINK_MAX: u32 = 65000;
/// Bytes of a sized image per inode (mke2fs's default `inode_ratio`).
const BYTES_PER_INODE: u64 = 16384;
/// The largest image the builder makes (its block map takes 1 bit per block in memory).
const MAX_IMAGE_BYTES: u64 = 1 << 42;

/// How to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOptions {
    /// Image size in bytes; `None` sizes it from the content plus `headroom_percent`.
    pub size: Option<u64>,
    /// Free space and inodes to leave, in percent of what the content needs.
    pub headroom_percent: u64,
    /// Filesystem UUID (also seeds every checksum); `None` derives one from the time.
    pub uuid: Option<[u8; 16]>,
    /// Volume label (at most 16 bytes).
    pub label: String,
    /// Write a journal (boxes write to their overlays and may crash).
    pub journal: bool,
    /// Inodes to have beyond those the size brings (one per 16 KiB of a size given):
    /// room for the many small files of a tree that will be copied in.
    pub extra_inodes: u64,
}

impl Default for BuildOptions {
    fn default() -> Self {
        Self {
            size: None,
            headroom_percent: 25,
            uuid: None,
            label: String::new(),
            journal: true,
            extra_inodes: 0,
        }
    }
}

const JOURNAL_INO: u32 = 8;

/// Journal blocks for a filesystem of `blocks` blocks (e2fsprogs' default sizes).
fn journal_blocks(blocks: u64) -> u64 {
    match blocks {
        0..=32767 => 1024,
        32768..=262_143 => 4096,
        262_144..=524_287 => 8192,
        _ => 16384,
    }
}

/// The jbd2 superblock (big-endian) of an empty journal of `len` blocks.
fn journal_superblock(len: u64, uuid: &[u8; 16]) -> Vec<u8> {
    let mut b = vec![0u8; BS as usize];
    let put = |b: &mut [u8], o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_be_bytes());
    put(&mut b, 0x0, 0xc03b_3998); // magic
    put(&mut b, 0x4, 4); // superblock v2
    put(&mut b, 0xc, BS as u32);
    put(&mut b, 0x10, len as u32);
    put(&mut b, 0x14, 1); // first log block
    put(&mut b, 0x18, 1); // first expected sequence
    put(&mut b, 0x28, 0x2 | 0x10); // 64bit, csum v3
    b[0x30..0x40].copy_from_slice(uuid);
    put(&mut b, 0x40, 1); // users
    b[0x50] = 4; // crc32c
    let crc = crc32c_raw(!0, &b[..1024]);
    put(&mut b, 0xfc, crc);
    b
}

/// What a build produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildReport {
    /// Image size in bytes.
    pub size: u64,
    /// Inodes in use (including the reserved ones).
    pub inodes_used: u64,
    /// Blocks in use.
    pub blocks_used: u64,
}

fn invalid(msg: impl Into<String>) -> Error {
    ErrorKind::InvalidInput(msg.into()).into()
}

/// Per-group geometry.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    blocks: u64,
    groups: u64,
    ipg: u64,
    itable_blocks: u64,
    gdt_blocks: u64,
}

impl Geometry {
    fn new(blocks: u64, inodes: u64) -> Result<Self> {
        if blocks > MAX_IMAGE_BYTES / BS {
            return Err(invalid(format!(
                "an image of {} bytes: the builder makes images of at most {} bytes (4 TiB)",
                blocks.saturating_mul(BS),
                MAX_IMAGE_BYTES
            )));
        }
        let groups = blocks.div_ceil(BPG);
        let per_itable_block = BS / INODE_SIZE;
        let ipg = inodes.div_ceil(groups).div_ceil(per_itable_block) * per_itable_block;
        if ipg > BS * 8 {
            return Err(invalid(format!(
                "{inodes} inodes do not fit in {groups} groups"
            )));
        }
        Ok(Self {
            blocks,
            groups,
            ipg,
            itable_blocks: ipg * INODE_SIZE / BS,
            gdt_blocks: (groups * DESC_SIZE).div_ceil(BS),
        })
    }

    fn group_start(&self, g: u64) -> u64 {
        g * BPG
    }

    fn group_len(&self, g: u64) -> u64 {
        BPG.min(self.blocks - g * BPG)
    }

    /// Superblock and descriptor copies at the start of the group.
    fn backup_blocks(&self, g: u64) -> u64 {
        if is_backup_group(g) {
            1 + self.gdt_blocks
        } else {
            0
        }
    }

    fn block_bitmap(&self, g: u64) -> u64 {
        self.group_start(g) + self.backup_blocks(g)
    }

    fn inode_bitmap(&self, g: u64) -> u64 {
        self.block_bitmap(g) + 1
    }

    fn inode_table(&self, g: u64) -> u64 {
        self.block_bitmap(g) + 2
    }

    fn meta_blocks(&self, g: u64) -> u64 {
        self.backup_blocks(g) + 2 + self.itable_blocks
    }

    fn total_meta(&self) -> u64 {
        (0..self.groups).map(|g| self.meta_blocks(g)).sum()
    }
}

/// A sequential allocator over the data area of each group.
struct Alloc {
    geo: Geometry,
    group: u64,
    next: u64,
    used: Vec<u64>,
}

impl Alloc {
    fn new(geo: Geometry) -> Self {
        let mut a = Self {
            geo,
            group: 0,
            next: 0,
            used: vec![0; geo.blocks.div_ceil(64) as usize],
        };
        for g in 0..geo.groups {
            let s = geo.group_start(g);
            for b in s..s + geo.meta_blocks(g) {
                a.mark(b);
            }
        }
        a.next = geo.meta_blocks(0);
        a
    }

    fn mark(&mut self, b: u64) {
        self.used[(b / 64) as usize] |= 1 << (b % 64);
    }

    fn is_used(&self, b: u64) -> bool {
        self.used[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    /// One block; consecutive calls return consecutive blocks within a group.
    fn one(&mut self) -> Result<u64> {
        loop {
            if self.group >= self.geo.groups {
                return Err(ErrorKind::InvalidInput(
                    "the image is full: give a larger size".into(),
                )
                .into());
            }
            let end = self.geo.group_start(self.group) + self.geo.group_len(self.group);
            if self.next < end {
                let b = self.next;
                self.next += 1;
                if !self.is_used(b) {
                    self.mark(b);
                    return Ok(b);
                }
                continue;
            }
            self.group += 1;
            if self.group < self.geo.groups {
                self.next = self.geo.group_start(self.group) + self.geo.meta_blocks(self.group);
            }
        }
    }

    fn used_count(&self) -> u64 {
        self.used.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// Extents of one inode, built as blocks are allocated.
#[derive(Debug, Default)]
struct Extents {
    list: Vec<(u64, u64, u64)>,
    blocks: u64,
}

impl Extents {
    fn push(&mut self, logical: u64, physical: u64) {
        self.blocks += 1;
        if let Some(last) = self.list.last_mut() {
            if last.0 + last.2 == logical && last.1 + last.2 == physical && last.2 < MAX_EXTENT_LEN
            {
                last.2 += 1;
                return;
            }
        }
        self.list.push((logical, physical, 1));
    }
}

/// Writes blocks, coalescing contiguous ones into large writes.
struct Writer<'a> {
    file: &'a File,
    start: u64,
    buf: Vec<u8>,
}

impl Writer<'_> {
    fn put(&mut self, block: u64, data: &[u8]) -> Result<()> {
        if !self.buf.is_empty()
            && (self.start + self.buf.len() as u64 / BS != block || self.buf.len() >= 1 << 20)
        {
            self.flush()?;
        }
        if self.buf.is_empty() {
            self.start = block;
        }
        self.buf.extend_from_slice(data);
        self.buf
            .resize(self.buf.len().div_ceil(BS as usize) * BS as usize, 0);
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if !self.buf.is_empty() {
            self.file
                .write_all_at(&self.buf, self.start * BS)
                .map_err(|e| Error::io("writing the image", e))?;
            self.buf.clear();
        }
        Ok(())
    }
}

const S_IFDIR: u16 = 0x4000;
const S_IFREG: u16 = 0x8000;
const S_IFLNK: u16 = 0xa000;
const FLAG_EXTENTS: u32 = 0x80000;
const FLAG_INDEX: u32 = 0x1000;

fn dirent_type(kind: &NodeKind) -> u8 {
    match kind {
        NodeKind::File(_) => 1,
        NodeKind::Dir(_) => 2,
        NodeKind::CharDevice(..) => 3,
        NodeKind::BlockDevice(..) => 4,
        NodeKind::Fifo => 5,
        NodeKind::Socket => 6,
        NodeKind::Symlink(_) => 7,
    }
}

fn type_bits(kind: &NodeKind) -> u16 {
    match kind {
        NodeKind::File(_) => S_IFREG,
        NodeKind::Dir(_) => S_IFDIR,
        NodeKind::CharDevice(..) => 0x2000,
        NodeKind::BlockDevice(..) => 0x6000,
        NodeKind::Fifo => 0x1000,
        NodeKind::Socket => 0xc000,
        NodeKind::Symlink(_) => S_IFLNK,
    }
}

/// Blocks a directory with these names needs (each block ends with a 12-byte tail).
fn dir_blocks(names: &[&[u8]]) -> u64 {
    let mut blocks = 1;
    let mut used = 0;
    for n in names {
        let len = (8 + n.len() + 3) & !3;
        if used + len > (BS - 12) as usize {
            blocks += 1;
            used = 0;
        }
        used += len;
    }
    blocks
}

fn inode_seed(fs_seed: u32, ino: u32) -> u32 {
    let crc = crc32c_raw(fs_seed, &ino.to_le_bytes());
    crc32c_raw(crc, &0u32.to_le_bytes())
}

/// Extent root in i_block, and leaf blocks when more than 4 extents are needed.
fn extent_root(
    ext: &Extents,
    seed: u32,
    alloc: &mut Alloc,
    w: &mut Writer<'_>,
) -> Result<([u8; 60], u64)> {
    encode::extent_root(
        &ext.list,
        Some(seed),
        BS,
        &mut || alloc.one(),
        &mut |nr, b| w.put(nr, b),
    )
}

/// Build an image of `tree` into a new file at `path`.
pub fn build_file(tree: &Tree, path: &Path, opts: &BuildOptions) -> Result<BuildReport> {
    build_file_with_layers(tree, path, opts, &mut |i| {
        Err(std::io::Error::other(format!("no layer {i} given")))
    })
}

/// [`build_with_layers`] into a new file at `path`.
pub fn build_file_with_layers<'a>(
    tree: &Tree,
    path: &Path,
    opts: &BuildOptions,
    layers: &mut dyn FnMut(usize) -> std::io::Result<Box<dyn Read + 'a>>,
) -> Result<BuildReport> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
    let res = build_with_layers(tree, &file, opts, layers).and_then(|r| {
        file.sync_all()
            .map_err(|e| Error::io("syncing the image", e))?;
        Ok(r)
    });
    if res.is_err() {
        let _ = std::fs::remove_file(path);
    }
    res
}

/// Build an image of `tree` into `file` (which is truncated to the image size). The tree
/// must not refer to layer contents (see [`build_with_layers`]).
pub fn build(tree: &Tree, file: &File, opts: &BuildOptions) -> Result<BuildReport> {
    build_with_layers(tree, file, opts, &mut |i| {
        Err(std::io::Error::other(format!("no layer {i} given")))
    })
}

/// Build an image of a tree made by a [`crate::LayerStack`]: `layers(i)` opens layer `i`
/// again (compressed or not), and each is read once more, in order, for file contents.
pub fn build_with_layers<'a>(
    tree: &Tree,
    file: &File,
    opts: &BuildOptions,
    layers: &mut dyn FnMut(usize) -> std::io::Result<Box<dyn Read + 'a>>,
) -> Result<BuildReport> {
    let n = tree.nodes.len();
    // Inode numbers: root 2, lost+found 11, the rest from 12 in depth-first order.
    let mut ino = vec![0u32; n];
    let mut parent = vec![0usize; n];
    let mut links = vec![0u32; n];
    let mut order = Vec::with_capacity(n);
    ino[0] = 2;
    links[0] = 2;
    let mut next = FIRST_INO + 1;
    let mut stack = vec![0usize];
    while let Some(id) = stack.pop() {
        order.push(id);
        if let NodeKind::Dir(children) = &tree.nodes[id].kind {
            // The image's own lost+found replaces one the tree may bring.
            for (_, &c) in children
                .iter()
                .rev()
                .filter(|(n, _)| !(id == 0 && n.as_slice() == b"lost+found"))
            {
                if matches!(tree.nodes[c].kind, NodeKind::Dir(_)) {
                    if ino[c] != 0 {
                        return Err(invalid("a directory with two names"));
                    }
                    links[c] = 2;
                    links[id] += 1;
                    parent[c] = id;
                } else {
                    links[c] += 1;
                    if ino[c] != 0 {
                        continue;
                    }
                }
                ino[c] = next;
                next += 1;
                stack.push(c);
            }
        }
    }
    links[0] += 1; // lost+found
    for (id, l) in links.iter_mut().enumerate() {
        if *l > LINK_MAX {
            if !matches!(tree.nodes[id].kind, NodeKind::Dir(_)) {
                return Err(invalid(format!(
                    "{l} hard links to one file (ext4 allows {LINK_MAX})"
                )));
            }
            // dir_nlink: a directory with too many subdirectories counts 1.
            *l = 1;
        }
    }

    // Size the image.
    let mut data_blocks = 1u64; // lost+found
    for &id in &order {
        let node = &tree.nodes[id];
        data_blocks += match &node.kind {
            NodeKind::File(d) => {
                let b = d.size().div_ceil(BS);
                if b > 1 << 32 {
                    return Err(invalid(format!(
                        "a file of {} bytes: ext4 files end at 16 TiB",
                        d.size()
                    )));
                }
                // Holes may split a file into an extent per data block (every other
                // block at worst), plus a split at each group crossed.
                b + encode::extent_tree_blocks(b.div_ceil(2) + b / BPG + 2, BS)
            }
            NodeKind::Dir(children) => {
                let mut names: Vec<&[u8]> = vec![b".", b".."];
                names.extend(children.keys().map(Vec::as_slice));
                dir_blocks(&names)
            }
            NodeKind::Symlink(t) if t.len() >= 60 => 1,
            _ => 0,
        };
        if !node.meta.xattrs.is_empty() {
            data_blocks += 1;
        }
    }
    // Sized for the data alone, once: the space reserved here is the space allocated below.
    let journal_len = opts.journal.then(|| journal_blocks(data_blocks));
    if let Some(len) = journal_len {
        data_blocks += len + 1;
    }
    let inodes_used = u64::from(next - 1);
    let mut inodes = (inodes_used * (100 + opts.headroom_percent) / 100).max(inodes_used + 16);
    if let Some(size) = opts.size {
        // A size given is room to fill: files for it too (mke2fs's ratio), not only the
        // content's own inodes and a quarter more, or the image runs out of inodes while
        // nearly all its blocks are free.
        inodes = inodes.max(size / BYTES_PER_INODE);
    }
    inodes = inodes.saturating_add(opts.extra_inodes);
    let want = data_blocks * (100 + opts.headroom_percent) / 100 + 16;
    let min = opts.size.map(|s| s / BS);
    // Enough groups for the inodes too (at most 32768 per group).
    let want = want.max((inodes.div_ceil(BS * 8) - 1) * BPG + 1);
    let mut blocks = min.unwrap_or(want).max(want);
    let mut rounds = 0;
    let geo = loop {
        let geo = Geometry::new(blocks, inodes)?;
        // One spare block per group: runs stop at group ends.
        let need = want + geo.total_meta() + geo.groups;
        if let Some(min) = min.filter(|&m| need > m) {
            return Err(invalid(format!(
                "the content needs {} bytes, more than the {} given",
                need * BS,
                min * BS
            )));
        }
        let mut total = need.max(min.unwrap_or(0));
        // The last group must hold its own metadata and some data.
        let last = (total - 1) / BPG;
        let room = geo.backup_blocks(last) + 2 + geo.itable_blocks + 64;
        if total - last * BPG < room {
            total = last * BPG + room;
        }
        rounds += 1;
        if total == blocks || rounds > 32 {
            break Geometry::new(total, inodes)?;
        }
        blocks = total;
    };

    let uuid = opts.uuid.unwrap_or_else(derive_uuid);
    let seed = crc32c_raw(!0, &uuid);
    file.set_len(0)
        .and_then(|()| file.set_len(geo.blocks * BS))
        .map_err(|e| Error::io("sizing the image", e))?;
    let mut alloc = Alloc::new(geo);
    let mut w = Writer {
        file,
        start: 0,
        buf: Vec::new(),
    };
    let mut recs: Vec<(u32, InodeRec)> = Vec::with_capacity(n + 1);
    let mut dirs_per_group = vec![0u64; geo.groups as usize];

    if let Some(len) = journal_len {
        let mut ext = Extents::default();
        for k in 0..len {
            ext.push(k, alloc.one()?);
        }
        w.put(ext.list[0].1, &journal_superblock(len, &uuid))?;
        let iseed = inode_seed(seed, JOURNAL_INO);
        let (ib, leaves) = extent_root(&ext, iseed, &mut alloc, &mut w)?;
        recs.push((
            JOURNAL_INO,
            InodeRec {
                mode: S_IFREG | 0o600,
                uid: 0,
                gid: 0,
                size: len * BS,
                links: 1,
                blocks_512: (len + leaves) * (BS / 512),
                flags: FLAG_EXTENTS,
                iblock: ib,
                file_acl: 0,
                meta: NodeMeta {
                    mode: 0o600,
                    ..tree.nodes[0].meta.clone()
                },
                xattr_area: None,
            },
        ));
    }

    let mut chunk = vec![0u8; 1 << 20];
    // Layer contents first, each layer streamed once, in tar order.
    let mut layer_ext = write_layer_data(tree, &order, layers, &mut chunk, &mut alloc, &mut w)?;
    for &id in &order {
        let node = &tree.nodes[id];
        let i = ino[id];
        let iseed = inode_seed(seed, i);
        let mut rec = InodeRec {
            mode: type_bits(&node.kind) | (node.meta.mode & 0o7777),
            uid: node.meta.uid,
            gid: node.meta.gid,
            size: 0,
            links: links[id] as u16,
            blocks_512: 0,
            flags: 0,
            iblock: [0u8; 60],
            file_acl: 0,
            meta: node.meta.clone(),
            xattr_area: None,
        };
        match &node.kind {
            NodeKind::File(data) => {
                let size = data.size();
                let ext = match data {
                    FileData::Layer { .. } => layer_ext
                        .remove(&id)
                        .ok_or_else(|| invalid(format!("inode {i}: layer data not found")))?,
                    FileData::Host { path, .. } => {
                        let mut f = File::open(path)
                            .map_err(|e| Error::io(format!("{}", path.display()), e))?;
                        write_stream(&mut f, size, &mut chunk, &mut alloc, &mut w)
                            .map_err(|e| e.with_path(&path.display().to_string()))?
                    }
                    FileData::Bytes(b) => {
                        write_stream(&mut &b[..], size, &mut chunk, &mut alloc, &mut w)?
                    }
                };
                let (ib, leaves) = extent_root(&ext, iseed, &mut alloc, &mut w)?;
                rec.iblock = ib;
                rec.flags = FLAG_EXTENTS;
                rec.size = size;
                rec.blocks_512 = (ext.blocks + leaves) * (BS / 512);
            }
            NodeKind::Dir(children) => {
                let mut entries: Vec<(Vec<u8>, u32, u8)> =
                    vec![(b".".to_vec(), i, 2), (b"..".to_vec(), ino[parent[id]], 2)];
                if id == 0 {
                    entries.push((b"lost+found".to_vec(), LOST_FOUND_INO, 2));
                }
                for (name, &c) in children {
                    if id == 0 && name.as_slice() == b"lost+found" {
                        continue;
                    }
                    entries.push((name.clone(), ino[c], dirent_type(&tree.nodes[c].kind)));
                }
                // More than one block of entries: a hashed index, as the kernel would
                // make it (when one index level can hold them).
                let linear = encode::dir_data(&entries, Some(iseed), BS as usize);
                let blocks = if linear.len() > 1 {
                    dx::build(
                        i,
                        ino[parent[id]],
                        &entries[2..],
                        &hash_seed(&uuid),
                        Some(iseed),
                        BS as usize,
                    )
                } else {
                    None
                };
                let indexed = blocks.is_some();
                let ext = write_blocks(&blocks.unwrap_or(linear), &mut alloc, &mut w)?;
                let (ib, leaves) = extent_root(&ext, iseed, &mut alloc, &mut w)?;
                rec.iblock = ib;
                rec.flags = FLAG_EXTENTS | if indexed { FLAG_INDEX } else { 0 };
                rec.size = ext.blocks * BS;
                rec.blocks_512 = (ext.blocks + leaves) * (BS / 512);
                dirs_per_group[((i - 1) as u64 / geo.ipg) as usize] += 1;
            }
            NodeKind::Symlink(target) => {
                if target.is_empty() || target.len() >= BS as usize {
                    return Err(invalid(format!("symlink target of {} bytes", target.len())));
                }
                rec.size = target.len() as u64;
                if target.len() < 60 {
                    rec.iblock[..target.len()].copy_from_slice(target);
                } else {
                    let mut ext = Extents::default();
                    let phys = alloc.one()?;
                    w.put(phys, target)?;
                    ext.push(0, phys);
                    let (ib, _) = extent_root(&ext, iseed, &mut alloc, &mut w)?;
                    rec.iblock = ib;
                    rec.flags = FLAG_EXTENTS;
                    rec.blocks_512 = BS / 512;
                }
            }
            NodeKind::CharDevice(major, minor) | NodeKind::BlockDevice(major, minor) => {
                if *major > 0xfff || *minor > 0xf_ffff {
                    return Err(invalid(format!(
                        "inode {i}: device {major}:{minor} (Linux has 12-bit majors and \
                         20-bit minors)"
                    )));
                }
                if *major < 256 && *minor < 256 {
                    rec.iblock[0..4].copy_from_slice(&((major << 8) | minor).to_le_bytes());
                } else {
                    let new = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
                    rec.iblock[4..8].copy_from_slice(&new.to_le_bytes());
                }
            }
            NodeKind::Fifo | NodeKind::Socket => {}
        }
        // Extended attributes: in the inode when they fit, else in a block.
        let encoded = xattr_write::encode(&node.meta.xattrs)?;
        if !encoded.is_empty() {
            let room = (INODE_SIZE - 128 - u64::from(EXTRA_ISIZE)) as usize;
            match xattr_write::inode_area(&encoded, room) {
                Some(area) => rec.xattr_area = Some(area),
                None => {
                    let nr = alloc.one()?;
                    w.put(nr, &xattr_write::block(&encoded, BS as usize, nr, seed)?)?;
                    rec.file_acl = nr;
                    rec.blocks_512 += BS / 512;
                }
            }
        }
        recs.push((i, rec));
    }
    // lost+found.
    {
        let iseed = inode_seed(seed, LOST_FOUND_INO);
        let entries = vec![(b".".to_vec(), LOST_FOUND_INO, 2u8), (b"..".to_vec(), 2, 2)];
        let ext = write_dir(&entries, iseed, &mut alloc, &mut w)?;
        let (ib, _) = extent_root(&ext, iseed, &mut alloc, &mut w)?;
        let root = &tree.nodes[0].meta;
        recs.push((
            LOST_FOUND_INO,
            InodeRec {
                mode: S_IFDIR | 0o700,
                uid: 0,
                gid: 0,
                size: ext.blocks * BS,
                links: 2,
                blocks_512: ext.blocks * (BS / 512),
                flags: FLAG_EXTENTS,
                iblock: ib,
                file_acl: 0,
                meta: NodeMeta {
                    mode: 0o700,
                    xattrs: Vec::new(),
                    ..root.clone()
                },
                xattr_area: None,
            },
        ));
        dirs_per_group[((LOST_FOUND_INO - 1) as u64 / geo.ipg) as usize] += 1;
    }
    w.flush()?;

    write_metadata(
        file,
        &geo,
        &alloc,
        &recs,
        &dirs_per_group,
        seed,
        &uuid,
        opts,
    )?;
    Ok(BuildReport {
        size: geo.blocks * BS,
        inodes_used,
        blocks_used: alloc.used_count(),
    })
}

/// Write `size` bytes from `r` into newly allocated blocks, leaving zero blocks as holes.
fn write_stream(
    r: &mut dyn Read,
    size: u64,
    chunk: &mut [u8],
    alloc: &mut Alloc,
    w: &mut Writer<'_>,
) -> Result<Extents> {
    let mut ext = Extents::default();
    let mut pos = 0u64;
    while pos < size {
        let len = (size - pos).min(chunk.len() as u64) as usize;
        r.read_exact(&mut chunk[..len])
            .map_err(|e| Error::io("reading file contents (changed while building?)", e))?;
        for (k, blk) in chunk[..len].chunks(BS as usize).enumerate() {
            if blk.iter().all(|&b| b == 0) {
                continue;
            }
            let phys = alloc.one()?;
            w.put(phys, blk)?;
            ext.push(pos / BS + k as u64, phys);
        }
        pos += len as u64;
    }
    Ok(ext)
}

/// Stream every layer that holds contents of the tree's files and write those contents,
/// in the order the layers hold them.
fn write_layer_data<'a>(
    tree: &Tree,
    reachable: &[NodeId],
    layers: &mut dyn FnMut(usize) -> std::io::Result<Box<dyn Read + 'a>>,
    chunk: &mut [u8],
    alloc: &mut Alloc,
    w: &mut Writer<'_>,
) -> Result<HashMap<NodeId, Extents>> {
    let mut wanted: BTreeMap<usize, HashMap<u64, (NodeId, u64)>> = BTreeMap::new();
    // Only reachable nodes: layers may have removed or replaced others.
    for &id in reachable {
        if let NodeKind::File(FileData::Layer { layer, entry, size }) = &tree.nodes[id].kind {
            wanted
                .entry(*layer)
                .or_default()
                .insert(*entry, (id, *size));
        }
    }
    let mut out = HashMap::new();
    for (layer, mut entries) in wanted {
        let io = |e| Error::io(format!("reading layer {layer} again"), e);
        let r = crate::layers::decompress(layers(layer).map_err(io)?).map_err(io)?;
        let mut ar = tar::Archive::new(r);
        for (k, entry) in ar.entries().map_err(io)?.enumerate() {
            let mut entry = entry.map_err(io)?;
            if let Some((id, size)) = entries.remove(&(k as u64)) {
                if entry.size() != size {
                    return Err(invalid(format!(
                        "layer {layer} changed since it was applied"
                    )));
                }
                out.insert(id, write_stream(&mut entry, size, chunk, alloc, w)?);
                if entries.is_empty() {
                    break;
                }
            }
        }
        if !entries.is_empty() {
            return Err(invalid(format!(
                "layer {layer} changed since it was applied"
            )));
        }
    }
    Ok(out)
}

fn write_dir(
    entries: &[(Vec<u8>, u32, u8)],
    iseed: u32,
    alloc: &mut Alloc,
    w: &mut Writer<'_>,
) -> Result<Extents> {
    write_blocks(
        &encode::dir_data(entries, Some(iseed), BS as usize),
        alloc,
        w,
    )
}

/// Directory seed of the name hash, derived from the UUID (superblock `s_hash_seed`).
fn hash_seed(uuid: &[u8; 16]) -> [u32; 4] {
    [0u32, 1, 2, 3].map(|k| crc32c_raw(k, uuid))
}

/// Write blocks at consecutive logical positions.
fn write_blocks(blocks: &[Vec<u8>], alloc: &mut Alloc, w: &mut Writer<'_>) -> Result<Extents> {
    let mut ext = Extents::default();
    for (k, b) in blocks.iter().enumerate() {
        let phys = alloc.one()?;
        w.put(phys, b)?;
        ext.push(k as u64, phys);
    }
    Ok(ext)
}

fn derive_uuid() -> [u8; 16] {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut u = [0u8; 16];
    let a = crc32c_raw(!0, &t.to_le_bytes());
    let b = crc32c_raw(a, &std::process::id().to_le_bytes());
    let c = crc32c_raw(b, &t.to_be_bytes());
    let d = crc32c_raw(c, b"boxlet");
    for (i, x) in [a, b, c, d].iter().enumerate() {
        u[4 * i..4 * i + 4].copy_from_slice(&x.to_le_bytes());
    }
    u[6] = (u[6] & 0x0f) | 0x40; // version 4
    u[8] = (u[8] & 0x3f) | 0x80; // variant
    u
}

#[allow(clippy::too_many_arguments)]
fn write_metadata(
    file: &File,
    geo: &Geometry,
    alloc: &Alloc,
    recs: &[(u32, InodeRec)],
    dirs_per_group: &[u64],
    seed: u32,
    uuid: &[u8; 16],
    opts: &BuildOptions,
) -> Result<()> {
    let io = |e| Error::io("writing the image", e);
    let total_inodes = geo.ipg * geo.groups;
    // Inode tables, a group at a time.
    let mut by_group: Vec<Vec<&(u32, InodeRec)>> = vec![Vec::new(); geo.groups as usize];
    for r in recs {
        by_group[((r.0 - 1) as u64 / geo.ipg) as usize].push(r);
    }
    let mut gdt = vec![0u8; (geo.gdt_blocks * BS) as usize];
    let mut free_blocks_total = 0u64;
    let mut free_inodes_total = 0u64;
    for g in 0..geo.groups {
        let mut table = vec![0u8; (geo.itable_blocks * BS) as usize];
        let mut ibitmap = vec![0u8; BS as usize];
        let first = g * geo.ipg + 1;
        let mut used_inodes = 0u64;
        for ino in first..first + geo.ipg {
            let idx = (ino - first) as usize;
            if ino < u64::from(FIRST_INO) {
                ibitmap[idx / 8] |= 1 << (idx % 8);
                used_inodes += 1;
            }
        }
        for (ino, r) in &by_group[g as usize] {
            let idx = (u64::from(*ino) - first) as usize;
            let bytes = encode::inode_bytes(*ino, r, Some(seed), INODE_SIZE as usize, EXTRA_ISIZE);
            table[idx * INODE_SIZE as usize..(idx + 1) * INODE_SIZE as usize]
                .copy_from_slice(&bytes);
            if ibitmap[idx / 8] & (1 << (idx % 8)) == 0 {
                ibitmap[idx / 8] |= 1 << (idx % 8);
                used_inodes += 1;
            }
        }
        for idx in geo.ipg as usize..(BS * 8) as usize {
            ibitmap[idx / 8] |= 1 << (idx % 8);
        }
        // Blocks of unused inodes stay holes (the file is new, so they read as zeros,
        // as the descriptor's INODE_ZEROED says): a sized image's tables cost no disk.
        for (k, block) in table.chunks(BS as usize).enumerate() {
            if block.iter().any(|&b| b != 0) {
                file.write_all_at(block, (geo.inode_table(g) + k as u64) * BS)
                    .map_err(io)?;
            }
        }
        let mut bbitmap = vec![0u8; BS as usize];
        let start = geo.group_start(g);
        let len = geo.group_len(g);
        let mut used_blocks = 0u64;
        for k in 0..BPG {
            if k >= len || alloc.is_used(start + k) {
                bbitmap[(k / 8) as usize] |= 1 << (k % 8);
                if k < len {
                    used_blocks += 1;
                }
            }
        }
        file.write_all_at(&bbitmap, geo.block_bitmap(g) * BS)
            .map_err(io)?;
        file.write_all_at(&ibitmap, geo.inode_bitmap(g) * BS)
            .map_err(io)?;
        let free_b = len - used_blocks;
        let free_i = geo.ipg - used_inodes;
        free_blocks_total += free_b;
        free_inodes_total += free_i;

        let d = &mut gdt[(g * DESC_SIZE) as usize..((g + 1) * DESC_SIZE) as usize];
        let put16 =
            |d: &mut [u8], o: usize, v: u64| d[o..o + 2].copy_from_slice(&(v as u16).to_le_bytes());
        let put32 =
            |d: &mut [u8], o: usize, v: u64| d[o..o + 4].copy_from_slice(&(v as u32).to_le_bytes());
        put32(d, 0x0, geo.block_bitmap(g));
        put32(d, 0x4, geo.inode_bitmap(g));
        put32(d, 0x8, geo.inode_table(g));
        put16(d, 0xc, free_b);
        put16(d, 0xe, free_i);
        put16(d, 0x10, dirs_per_group[g as usize]);
        put16(d, 0x12, 0x4); // EXT4_BG_INODE_ZEROED
        let bcsum = crc32c_raw(seed, &bbitmap[..(BPG / 8) as usize]);
        let icsum = crc32c_raw(seed, &ibitmap[..(geo.ipg / 8) as usize]);
        put16(d, 0x18, u64::from(bcsum));
        put16(d, 0x1a, u64::from(icsum));
        put32(d, 0x20, geo.block_bitmap(g) >> 32);
        put32(d, 0x24, geo.inode_bitmap(g) >> 32);
        put32(d, 0x28, geo.inode_table(g) >> 32);
        put16(d, 0x2c, free_b >> 16);
        put16(d, 0x2e, free_i >> 16);
        put16(d, 0x30, dirs_per_group[g as usize] >> 16);
        put16(d, 0x38, u64::from(bcsum >> 16));
        put16(d, 0x3a, u64::from(icsum >> 16));
        let crc = crc32c_raw(seed, &(g as u32).to_le_bytes());
        let crc = crc32c_raw(crc, d);
        put16(d, 0x1e, u64::from(crc & 0xffff));
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as u32;
    for g in (0..geo.groups).filter(|&g| is_backup_group(g)) {
        let mut sb = vec![0u8; 1024];
        let put16 =
            |b: &mut [u8], o: usize, v: u64| b[o..o + 2].copy_from_slice(&(v as u16).to_le_bytes());
        let put32 =
            |b: &mut [u8], o: usize, v: u64| b[o..o + 4].copy_from_slice(&(v as u32).to_le_bytes());
        put32(&mut sb, 0x0, total_inodes);
        put32(&mut sb, 0x4, geo.blocks);
        put32(&mut sb, 0xc, free_blocks_total);
        put32(&mut sb, 0x10, free_inodes_total);
        put32(&mut sb, 0x14, 0);
        put32(&mut sb, 0x18, 2);
        put32(&mut sb, 0x1c, 2);
        put32(&mut sb, 0x20, BPG);
        put32(&mut sb, 0x24, BPG);
        put32(&mut sb, 0x28, geo.ipg);
        put32(&mut sb, 0x30, u64::from(now));
        put16(&mut sb, 0x36, 0xffff);
        put16(&mut sb, 0x38, 0xef53);
        put16(&mut sb, 0x3a, 1); // clean
        put16(&mut sb, 0x3c, 1); // continue on errors
        put32(&mut sb, 0x40, u64::from(now));
        put32(&mut sb, 0x4c, 1); // dynamic revision
        put32(&mut sb, 0x54, u64::from(FIRST_INO));
        put16(&mut sb, 0x58, INODE_SIZE);
        put16(&mut sb, 0x5a, g);
        let journal = recs.iter().find(|(i, _)| *i == JOURNAL_INO);
        put32(
            &mut sb,
            0x5c,
            0x8 | 0x20 | if journal.is_some() { 0x4 } else { 0 },
        ); // ext_attr, dir_index, has_journal
        if let Some((_, j)) = journal {
            put32(&mut sb, 0xe0, u64::from(JOURNAL_INO));
            sb[0xfd] = 1; // s_jnl_blocks holds a copy of the journal inode's i_block
            sb[0x10c..0x10c + 60].copy_from_slice(&j.iblock);
            put32(&mut sb, 0x10c + 60, j.size >> 32);
            put32(&mut sb, 0x10c + 64, j.size);
        }
        put32(&mut sb, 0x60, 0x2 | 0x40 | 0x80); // filetype, extents, 64bit
        put32(&mut sb, 0x64, 0x1 | 0x2 | 0x8 | 0x20 | 0x40 | 0x400);
        sb[0x68..0x78].copy_from_slice(uuid);
        let label = opts.label.as_bytes();
        sb[0x78..0x78 + label.len().min(16)].copy_from_slice(&label[..label.len().min(16)]);
        for (k, v) in hash_seed(uuid).iter().enumerate() {
            put32(&mut sb, 0xec + 4 * k, u64::from(*v));
        }
        sb[0xfc] = 1; // half_md4
        put16(&mut sb, 0xfe, DESC_SIZE);
        put32(&mut sb, 0x108, u64::from(now));
        put32(&mut sb, 0x150, geo.blocks >> 32);
        put32(&mut sb, 0x158, free_blocks_total >> 32);
        put16(&mut sb, 0x15c, u64::from(EXTRA_ISIZE));
        put16(&mut sb, 0x15e, u64::from(EXTRA_ISIZE));
        put32(&mut sb, 0x160, 0x1); // signed directory hash
        sb[0x175] = 1; // crc32c
        let crc = crc32c_raw(!0, &sb[..0x3fc]);
        put32(&mut sb, 0x3fc, u64::from(crc));
        let base = geo.group_start(g) * BS;
        let sb_at = if g == 0 { 1024 } else { base };
        file.write_all_at(&sb, sb_at).map_err(io)?;
        file.write_all_at(&gdt, base + BS).map_err(io)?;
    }
    Ok(())
}
