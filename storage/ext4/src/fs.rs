//! An open ext4 image: inodes, file data, directories, symlinks and paths.

use std::collections::{HashSet, VecDeque};
use std::path::Path;

use crate::dir::{parse_entries, verify_leaf, DirEntry};
use crate::error::{corrupt, Corruption, ErrorKind, Result};
use crate::extent::{block_map, extent_tree, Extent};
use crate::group::{read_groups, GroupDesc};
use crate::inode::{FileType, Inode, FLAG_EA_INODE, FLAG_INDEX, ROOT_INO};
use crate::superblock::{Superblock, SUPERBLOCK_OFFSET, SUPERBLOCK_SIZE};
use crate::xattr::read_xattrs;
use crate::{Error, Metadata, ReadAt};

/// Most symlinks followed while resolving one path (the kernel's limit).
const MAX_SYMLINKS: u32 = 40;
/// Largest file [`Ext4::read`] reads into memory; larger ones go through [`FileReader`].
pub const MAX_READ: u64 = 1 << 30;

/// An open ext4 (or ext2/ext3) image.
#[derive(Debug)]
pub struct Ext4 {
    src: Box<dyn ReadAt>,
    len: u64,
    sb: Superblock,
    groups: Vec<GroupDesc>,
}

impl Ext4 {
    /// Open an image file.
    pub fn open(path: &Path) -> Result<Self> {
        let f = std::fs::File::open(path)
            .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
        Self::new(Box::new(f))
    }

    /// Open an image from anything that reads at offsets.
    pub fn new(src: Box<dyn ReadAt>) -> Result<Self> {
        let len = src
            .len()
            .map_err(|e| Error::io("reading the image length", e))?;
        if len < SUPERBLOCK_OFFSET + SUPERBLOCK_SIZE as u64 {
            return Err(Corruption::OutOfImage {
                what: "superblock",
                offset: SUPERBLOCK_OFFSET,
                len,
            }
            .into());
        }
        let mut raw = vec![0u8; SUPERBLOCK_SIZE];
        src.read_exact_at(&mut raw, SUPERBLOCK_OFFSET)
            .map_err(|e| Error::io("reading the superblock", e))?;
        let sb = Superblock::parse(&raw)?;
        let groups = read_groups(&*src, &sb, len)?;
        Ok(Self {
            src,
            len,
            sb,
            groups,
        })
    }

    /// The superblock.
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// Image length in bytes.
    pub fn image_len(&self) -> u64 {
        self.len
    }

    fn read_bytes(&self, what: &'static str, offset: u64, buf: &mut [u8]) -> Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > self.len)
        {
            return Err(Corruption::OutOfImage {
                what,
                offset,
                len: self.len,
            }
            .into());
        }
        self.src
            .read_exact_at(buf, offset)
            .map_err(|e| Error::io(format!("reading {what} at {offset:#x}"), e))
    }

    /// One filesystem block.
    pub fn read_block(&self, nr: u64) -> Result<Vec<u8>> {
        let bs = self.sb.block_size();
        let mut buf = vec![0u8; bs as usize];
        let off = nr
            .checked_mul(bs)
            .ok_or_else(|| corrupt(format!("block number {nr}")))?;
        self.read_bytes("block", off, &mut buf)?;
        Ok(buf)
    }

    /// Byte offset of inode `ino` in the image.
    pub fn inode_offset(&self, ino: u32) -> Result<u64> {
        if ino == 0 || ino > self.sb.inodes_count {
            return Err(Corruption::InodeNumber(u64::from(ino)).into());
        }
        let ipg = self.sb.inodes_per_group;
        let group = &self.groups[((ino - 1) / ipg) as usize];
        let index = u64::from((ino - 1) % ipg);
        Ok(group.inode_table * self.sb.block_size() + index * u64::from(self.sb.inode_size))
    }

    /// Inode `ino`.
    pub fn inode(&self, ino: u32) -> Result<Inode> {
        let off = self.inode_offset(ino)?;
        let size = u64::from(self.sb.inode_size);
        let mut raw = vec![0u8; size as usize];
        self.read_bytes("inode", off, &mut raw)?;
        Inode::parse(&self.sb, ino, &raw)
    }

    /// The block mapping of a non-inline inode.
    pub fn extents(&self, inode: &Inode) -> Result<Vec<Extent>> {
        if inode.has_extents() {
            extent_tree(self, inode)
        } else {
            block_map(self, inode)
        }
    }

    /// Inline data: the 60 bytes of i_block, continued in the `system.data` xattr.
    fn inline_data(&self, inode: &Inode) -> Result<Vec<u8>> {
        let mut data = inode.block.to_vec();
        if inode.size > 60 {
            let extra = read_xattrs(self, inode)?
                .into_iter()
                .find(|x| x.name == "system.data")
                .map(|x| x.value)
                .unwrap_or_default();
            data.extend_from_slice(&extra);
        }
        if inode.size > data.len() as u64 && inode.file_type() != Some(FileType::Directory) {
            return Err(corrupt(format!(
                "inode {}: inline data shorter than its size",
                inode.ino
            )));
        }
        data.truncate(inode.size as usize);
        Ok(data)
    }

    /// A reader over an inode's data.
    pub fn file_reader(&self, inode: &Inode) -> Result<FileReader<'_>> {
        let data = if inode.is_inline() {
            let d = self.inline_data(inode)?;
            if (d.len() as u64) < inode.size {
                return Err(corrupt(format!(
                    "inode {}: inline data shorter than its size",
                    inode.ino
                )));
            }
            Data::Inline(d)
        } else {
            Data::Mapped(self.extents(inode)?)
        };
        Ok(FileReader {
            fs: self,
            size: inode.size,
            data,
            pos: 0,
        })
    }

    /// All of an inode's data, refusing more than `limit` bytes.
    pub fn read_inode(&self, inode: &Inode, limit: u64) -> Result<Vec<u8>> {
        if inode.size > limit {
            return Err(ErrorKind::InvalidInput(format!(
                "inode {}: {} bytes is more than {limit} to read at once",
                inode.ino, inode.size
            ))
            .into());
        }
        let mut out = vec![0u8; inode.size as usize];
        let r = self.file_reader(inode)?;
        r.read_at(&mut out, 0)?;
        Ok(out)
    }

    /// The value of an xattr stored in its own inode (ea_inode).
    pub(crate) fn read_ea_inode(&self, ino: u32, size: u64) -> Result<Vec<u8>> {
        let inode = self.inode(ino)?;
        // A value inode holds plain data: not inline (whose data would be xattrs again).
        if inode.flags & FLAG_EA_INODE == 0
            || inode.size != size
            || inode.is_inline()
            || inode.file_type() != Some(FileType::Regular)
        {
            return Err(corrupt(format!(
                "inode {ino} is not an xattr value of {size} bytes"
            )));
        }
        self.read_inode(&inode, size)
    }

    /// The entries of a directory inode, "." and ".." included.
    pub fn dir_entries(&self, dir: &Inode) -> Result<Vec<DirEntry>> {
        if dir.file_type() != Some(FileType::Directory) {
            return Err(ErrorKind::NotADirectory.into());
        }
        // Every block of a valid directory is distinct, so it fits in the image.
        if dir.size > self.len {
            return Err(corrupt(format!(
                "directory inode {} claims {} bytes",
                dir.ino, dir.size
            )));
        }
        let mut out = Vec::new();
        if dir.is_inline() {
            let data = self.inline_data(dir)?;
            if data.len() < 4 {
                return Err(corrupt(format!(
                    "inline directory inode {} too short",
                    dir.ino
                )));
            }
            out.push(DirEntry {
                name: b".".to_vec(),
                ino: dir.ino,
                file_type: 2,
            });
            let parent = u32::from_le_bytes(data[..4].try_into().expect("4 bytes"));
            out.push(DirEntry {
                name: b"..".to_vec(),
                ino: parent,
                file_type: 2,
            });
            let body = &data[4..data.len().min(60)];
            parse_entries(self, dir, 0, body, &mut out)?;
            if data.len() > 60 {
                parse_entries(self, dir, 1, &data[60..], &mut out)?;
            }
            return Ok(out);
        }
        let bs = self.sb.block_size();
        let nblocks = dir.size.div_ceil(bs);
        let extents = self.extents(dir)?;
        let htree = dir.flags & FLAG_INDEX != 0;
        for e in &extents {
            for i in 0..e.len {
                let lblock = e.logical + i;
                if lblock >= nblocks {
                    break;
                }
                if e.uninit {
                    continue;
                }
                let data = self.read_block(e.physical + i)?;
                // Block 0 of an htree directory is the index root (its tail differs).
                if !(htree && lblock == 0) {
                    verify_leaf(self, dir, lblock, &data)?;
                }
                parse_entries(self, dir, lblock, &data, &mut out)?;
            }
        }
        Ok(out)
    }

    /// A symlink's target.
    pub fn symlink_target(&self, inode: &Inode) -> Result<Vec<u8>> {
        if inode.file_type() != Some(FileType::Symlink) {
            return Err(ErrorKind::WrongType("not a symbolic link".into()).into());
        }
        if inode.size > self.sb.block_size().max(4096) {
            return Err(corrupt(format!(
                "symlink inode {} of {} bytes",
                inode.ino, inode.size
            )));
        }
        // A fast symlink keeps its target in i_block and owns no data block.
        let acl_blocks = if inode.file_acl != 0 {
            self.sb.block_size() / 512
        } else {
            0
        };
        let fast =
            !inode.is_inline() && inode.size < 60 && inode.blocks.saturating_sub(acl_blocks) == 0;
        if fast {
            return Ok(inode.block[..inode.size as usize].to_vec());
        }
        self.read_inode(inode, inode.size)
    }

    /// Resolve `path` (absolute inside the image, or relative to the root); the last
    /// component is followed if it is a symlink only when `follow` is set.
    pub fn resolve(&self, path: &str, follow: bool) -> Result<Inode> {
        self.resolve_inner(path, follow)
            .map_err(|e| e.with_path(path))
    }

    fn resolve_inner(&self, path: &str, follow: bool) -> Result<Inode> {
        let root = self.inode(ROOT_INO)?;
        let mut queue: VecDeque<Vec<u8>> = components(path.as_bytes());
        let mut cur = root.clone();
        let mut links = 0;
        while let Some(name) = queue.pop_front() {
            let entries = self.dir_entries(&cur)?;
            let ino = entries
                .iter()
                .find(|e| e.name == name)
                .map(|e| e.ino)
                .ok_or(ErrorKind::NotFound)?;
            let child = self.inode(ino)?;
            if child.file_type() == Some(FileType::Symlink) && (follow || !queue.is_empty()) {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(ErrorKind::SymlinkLoop.into());
                }
                let target = self.symlink_target(&child)?;
                if target.first() == Some(&b'/') {
                    cur = root.clone();
                }
                for c in components(&target).into_iter().rev() {
                    queue.push_front(c);
                }
                continue;
            }
            cur = child;
        }
        Ok(cur)
    }

    /// Metadata of `path`, not following a final symlink.
    pub fn stat(&self, path: &str) -> Result<Metadata> {
        let inode = self.resolve(path, false)?;
        self.metadata(&inode).map_err(|e| e.with_path(path))
    }

    /// Metadata of an inode.
    pub fn metadata(&self, inode: &Inode) -> Result<Metadata> {
        Metadata::of(self, inode)
    }

    /// The entries of the directory at `path` (following symlinks), without "." and "..".
    pub fn read_dir(&self, path: &str) -> Result<Vec<DirEntry>> {
        let dir = self.resolve(path, true)?;
        let mut v = self.dir_entries(&dir).map_err(|e| e.with_path(path))?;
        v.retain(|e| e.name != b"." && e.name != b"..");
        Ok(v)
    }

    /// The contents of the regular file at `path` (following symlinks), at most
    /// [`MAX_READ`] bytes.
    pub fn read(&self, path: &str) -> Result<Vec<u8>> {
        let inode = self.resolve(path, true)?;
        if inode.file_type() != Some(FileType::Regular) {
            return Err(
                Error::from(ErrorKind::WrongType("not a regular file".into())).with_path(path),
            );
        }
        self.read_inode(&inode, MAX_READ)
            .map_err(|e| e.with_path(path))
    }

    /// The target of the symlink at `path`.
    pub fn read_link(&self, path: &str) -> Result<Vec<u8>> {
        let inode = self.resolve(path, false)?;
        self.symlink_target(&inode).map_err(|e| e.with_path(path))
    }

    /// Every entry of the tree under the root, depth first, with its metadata; the root
    /// itself comes first as "/". A directory reached twice is corruption.
    pub fn walk(&self) -> Result<Vec<(String, Metadata)>> {
        let root = self.inode(ROOT_INO)?;
        let mut out = vec![("/".to_owned(), self.metadata(&root)?)];
        let mut seen = HashSet::from([ROOT_INO]);
        let mut stack = vec![(String::new(), root)];
        while let Some((prefix, dir)) = stack.pop() {
            let mut entries = self
                .dir_entries(&dir)
                .map_err(|e| e.with_path(if prefix.is_empty() { "/" } else { &prefix }))?;
            entries.retain(|e| e.name != b"." && e.name != b"..");
            entries.sort_by(|a, b| b.name.cmp(&a.name));
            for e in entries {
                let path = format!("{prefix}/{}", e.name_lossy());
                let inode = self.inode(e.ino).map_err(|err| err.with_path(&path))?;
                let meta = self.metadata(&inode).map_err(|err| err.with_path(&path))?;
                if inode.file_type() == Some(FileType::Directory) {
                    if !seen.insert(e.ino) {
                        return Err(corrupt(format!("directory inode {} reached twice", e.ino))
                            .with_path(&path));
                    }
                    stack.push((path.clone(), inode));
                }
                out.push((path, meta));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

/// Path components, without empty ones and ".".
fn components(path: &[u8]) -> VecDeque<Vec<u8>> {
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty() && *c != b".")
        .map(<[u8]>::to_vec)
        .collect()
}

#[derive(Debug)]
enum Data {
    Inline(Vec<u8>),
    Mapped(Vec<Extent>),
}

/// Reads an inode's data: holes and uninitialized extents read as zeros.
#[derive(Debug)]
pub struct FileReader<'a> {
    fs: &'a Ext4,
    size: u64,
    data: Data,
    pos: u64,
}

impl FileReader<'_> {
    /// File size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Read from `offset` into `buf`; returns the bytes read (short only at end of file).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.size - offset) as usize;
        let buf = &mut buf[..n];
        let extents = match &self.data {
            Data::Inline(d) => {
                buf.copy_from_slice(&d[offset as usize..offset as usize + n]);
                return Ok(n);
            }
            Data::Mapped(e) => e,
        };
        let bs = self.fs.sb.block_size();
        let mut done = 0usize;
        while done < n {
            let pos = offset + done as u64;
            let lblock = pos / bs;
            let i = extents.partition_point(|e| e.logical + e.len <= lblock);
            let left = n - done;
            match extents.get(i) {
                Some(e) if e.logical <= lblock => {
                    let run = ((e.logical + e.len) * bs - pos).min(left as u64) as usize;
                    if e.uninit {
                        buf[done..done + run].fill(0);
                    } else {
                        let phys = (e.physical + (lblock - e.logical)) * bs + pos % bs;
                        self.fs
                            .read_bytes("file data", phys, &mut buf[done..done + run])?;
                    }
                    done += run;
                }
                next => {
                    // A hole, up to the next extent or the end.
                    let end = next.map_or(u64::MAX, |e| e.logical * bs);
                    let run = (end - pos).min(left as u64) as usize;
                    buf[done..done + run].fill(0);
                    done += run;
                }
            }
        }
        Ok(n)
    }
}

impl std::io::Read for FileReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = FileReader::read_at(self, buf, self.pos).map_err(std::io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}
