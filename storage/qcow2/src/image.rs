//! The read/write engine: a qcow2 image as a block device.
//!
//! Reads walk L1 -> L2 -> data cluster, fall through to the backing device for unallocated
//! clusters and return zeros for zero clusters and beyond the backing device.
//!
//! Writes allocate clusters and keep metadata in write-back caches. [`Qcow2::flush`] makes
//! everything durable in an order that keeps every on-disk state consistent:
//!
//! 1. data clusters and refcount blocks (refcounts only ever grow here), sync; refcount
//!    table entries that point to new blocks, sync;
//! 2. the header, if the refcount table moved, sync;
//! 3. L2 tables, sync; 4. the L1 table, sync;
//! 5. only now are clusters that no longer have a reference released, sync.
//!
//! A crash between any two writes therefore leaves at worst leaked clusters (refcount
//! higher than the references), never a reference to a cluster that was not yet written
//! or not yet counted, and never a freed cluster that something still points to.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use flate2::{Decompress, FlushDecompress};

use crate::error::{corrupt, Corruption, Result, Unsupported};
use crate::header::{
    self, check_table, Header, COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY,
};
use crate::l2cache::L2Cache;
use crate::refcount::Refcounts;
use crate::storage::Storage;
use crate::{invalid, BlockDevice, Error};

/// Offset bits of an L1 entry.
pub(crate) const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Offset bits of a standard L2 entry.
pub(crate) const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// The cluster has refcount 1 and may be written in place.
pub(crate) const OFLAG_COPIED: u64 = 1 << 63;
/// The cluster is compressed.
pub(crate) const OFLAG_COMPRESSED: u64 = 1 << 62;
/// The cluster reads as zeros (v3).
pub(crate) const OFLAG_ZERO: u64 = 1;

/// What an L2 entry says about one guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mapping {
    /// Not allocated here: read from the backing device.
    Unallocated,
    /// Reads as zeros; may still own a host cluster.
    Zero { host: Option<u64>, copied: bool },
    /// A standard data cluster.
    Data { host: u64, copied: bool },
    /// Compressed data: `offset` and `sectors` 512-byte sectors (from offset's sector).
    Compressed { offset: u64, sectors: u64 },
}

/// Decode a standard L2 entry of an image with `cluster_bits`.
pub(crate) fn decode_l2(entry: u64, cluster_bits: u32) -> Result<Mapping> {
    if entry & OFLAG_COMPRESSED != 0 {
        let shift = 62 - (cluster_bits - 8);
        let mask = (1u64 << (cluster_bits - 8)) - 1;
        return Ok(Mapping::Compressed {
            offset: entry & ((1u64 << shift) - 1),
            sectors: ((entry >> shift) & mask) + 1,
        });
    }
    let host = entry & L2_OFFSET_MASK;
    let copied = entry & OFLAG_COPIED != 0;
    if !host.is_multiple_of(1u64 << cluster_bits) {
        return Err(Corruption::Unaligned {
            table: "data cluster",
            offset: host,
        }
        .into());
    }
    if entry & OFLAG_ZERO != 0 {
        Ok(Mapping::Zero {
            host: (host != 0).then_some(host),
            copied,
        })
    } else if host == 0 {
        Ok(Mapping::Unallocated)
    } else {
        Ok(Mapping::Data { host, copied })
    }
}

/// Options for opening an image from storage.
#[derive(Debug, Default)]
pub struct StorageOptions {
    /// Open for writing.
    pub writable: bool,
    /// Maximum number of L2 tables to cache (0: a default that covers up to 32 MiB of
    /// tables, or the whole disk when smaller).
    pub l2_cache_tables: usize,
}

/// An open qcow2 image.
#[derive(Debug)]
pub struct Qcow2 {
    storage: Box<dyn Storage>,
    path: Option<PathBuf>,
    header: Header,
    cluster_bits: u32,
    cluster_size: u64,
    l2_bits: u32,
    l1: Vec<u64>,
    l1_dirty: Option<(usize, usize)>,
    l2: L2Cache,
    refs: Option<Refcounts>,
    backing: Option<Box<dyn BlockDevice>>,
    writable: bool,
    /// Host ranges with a reference removed in memory, released at the next flush.
    pending_free: Vec<(u64, u64)>,
    /// Data written since the last sync.
    data_unsynced: bool,
    /// Last decompressed cluster, by (host offset, sectors).
    inflated: Option<((u64, u64), Vec<u8>)>,
    /// A cluster-sized buffer for copy-on-write, kept between writes.
    scratch: Vec<u8>,
    /// Cluster indices of the L2 tables the L1 table names (writable images).
    l2_clusters: HashSet<u64>,
}

impl Qcow2 {
    /// Open an image held in `storage`. `backing` serves unallocated clusters (the caller
    /// resolves the backing file; without one, unallocated clusters read as zeros).
    pub fn from_storage(
        storage: Box<dyn Storage>,
        opts: StorageOptions,
        backing: Option<Box<dyn BlockDevice>>,
    ) -> Result<Self> {
        let header = Header::read(&*storage)?;
        let cluster_bits = header.cluster_bits;
        let cluster_size = 1u64 << cluster_bits;
        let file_len = storage
            .len()
            .map_err(|e| Error::io("reading the file length", e))?;

        if opts.writable {
            let named = |bit: u32| Unsupported::IncompatibleFeature {
                bit,
                name: header::incompatible_feature_name(bit)
                    .unwrap_or("unknown")
                    .to_owned(),
            };
            if header.incompatible_features & INCOMPAT_DIRTY != 0 {
                return Err(named(0).into());
            }
            if header.incompatible_features & INCOMPAT_CORRUPT != 0 {
                return Err(named(1).into());
            }
            if header.nb_snapshots > 0 {
                return Err(Unsupported::Write(format!(
                    "image has {} internal snapshots",
                    header.nb_snapshots
                ))
                .into());
            }
            if let (Some(name), None) = (&header.backing_file, &backing) {
                // Partial writes copy the rest of the cluster from the backing file and
                // discards must hide it: neither can be done without it.
                return Err(invalid(format!(
                    "image has backing file {name:?}: writing needs the backing file opened too"
                )));
            }
        }

        // Validated by Header::read to lie inside the file, so the file justifies it.
        let mut raw = vec![0u8; header.l1_size as usize * 8];
        storage
            .read_at(&mut raw, header.l1_table_offset)
            .map_err(|e| Error::io("reading the L1 table", e))?;
        let l1: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();

        let l2_bits = cluster_bits - 3;
        let default_tables = ((32u64 << 20) >> cluster_bits).max(16) as usize;
        let cap = if opts.l2_cache_tables == 0 {
            default_tables.min(l1.len().max(1))
        } else {
            opts.l2_cache_tables
        };

        let mut img = Self {
            storage,
            path: None,
            cluster_bits,
            cluster_size,
            l2_bits,
            l1,
            l1_dirty: None,
            l2: L2Cache::new(cap),
            refs: None,
            backing,
            writable: opts.writable,
            pending_free: Vec::new(),
            data_unsynced: false,
            inflated: None,
            scratch: Vec::new(),
            l2_clusters: HashSet::new(),
            header,
        };
        if opts.writable {
            let h = &img.header;
            let mut refs = Refcounts::load(
                &*img.storage,
                h.refcount_order,
                cluster_bits,
                h.refcount_table_offset,
                h.refcount_table_clusters,
                file_len,
            )?;
            refs.reserve(0, cluster_size);
            if h.l1_size > 0 {
                refs.reserve(h.l1_table_offset, u64::from(h.l1_size) * 8);
            }
            refs.reserve(
                h.refcount_table_offset,
                u64::from(h.refcount_table_clusters) * cluster_size,
            );
            img.refs = Some(refs);
            img.l2_clusters = img
                .l1
                .iter()
                .map(|e| (e & L1_OFFSET_MASK) >> cluster_bits)
                .filter(|&c| c != 0)
                .collect();
            // Autoclear bits name extensions (bitmaps) that a writer that does not keep
            // them up to date must invalidate.
            if img.header.version >= 3 && img.header.autoclear_features != 0 {
                img.header.autoclear_features = 0;
                img.storage
                    .write_at(&0u64.to_be_bytes(), header::offsets::AUTOCLEAR)
                    .and_then(|()| img.storage.sync())
                    .map_err(|e| Error::io("clearing autoclear features", e))?;
            }
        }
        Ok(img)
    }

    /// Attach the path used in error messages.
    pub fn set_path(&mut self, path: &Path) {
        self.path = Some(path.to_path_buf());
    }

    fn err(&self, e: Error) -> Error {
        match &self.path {
            Some(p) => e.with_path(p),
            None => e,
        }
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Virtual disk size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.header.size
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }

    /// Whether the image was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The backing device, if any.
    pub fn backing(&self) -> Option<&dyn BlockDevice> {
        self.backing.as_deref()
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.header.size => Ok(()),
            _ => Err(invalid(format!(
                "range {offset}+{len} is outside the virtual disk ({} bytes)",
                self.header.size
            ))),
        }
    }

    fn decode(&self, entry: u64) -> Result<Mapping> {
        decode_l2(entry, self.cluster_bits)
    }

    /// Cache slot of the L2 table at `offset`, loading it if needed.
    fn l2_slot(&mut self, offset: u64) -> Result<usize> {
        if let Some(i) = self.l2.find(offset) {
            return Ok(i);
        }
        if !offset.is_multiple_of(self.cluster_size) {
            return Err(Corruption::Unaligned {
                table: "L2 table",
                offset,
            }
            .into());
        }
        let file_len = self
            .storage
            .len()
            .map_err(|e| Error::io("reading the file length", e))?;
        check_table(
            "L2 table",
            offset,
            self.cluster_size,
            self.cluster_size,
            file_len,
        )?;
        let mut raw = vec![0u8; self.cluster_size as usize];
        self.storage
            .read_at(&mut raw, offset)
            .map_err(|e| Error::io(format!("reading L2 table at {offset:#x}"), e))?;
        let table = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        self.make_room()?;
        Ok(self.l2.insert(offset, table, false))
    }

    /// Before inserting into a full cache whose victim is dirty, write everything back.
    fn make_room(&mut self) -> Result<()> {
        if self.l2.victim_is_dirty() {
            self.flush_inner()?;
        }
        Ok(())
    }

    /// The mapping of guest cluster `vc`.
    fn lookup(&mut self, vc: u64) -> Result<Mapping> {
        let l1i = (vc >> self.l2_bits) as usize;
        let l2_off = self.l1[l1i] & L1_OFFSET_MASK;
        if l2_off == 0 {
            return Ok(Mapping::Unallocated);
        }
        let slot = self.l2_slot(l2_off)?;
        let entry = self.l2.slot(slot).table[(vc & ((1 << self.l2_bits) - 1)) as usize];
        self.decode(entry)
    }

    /// Fill `buf` from the virtual disk at `offset`.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.read_inner(buf, offset).map_err(|e| self.err(e))
    }

    fn read_inner(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let vc = pos >> self.cluster_bits;
            let in_off = pos & (self.cluster_size - 1);
            let n = ((self.cluster_size - in_off) as usize).min(buf.len() - done);
            let m = self.lookup(vc)?;
            self.read_mapped(m, pos, in_off, &mut buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Read `out` from a cluster with mapping `m`; `pos` is the guest offset, `in_off`
    /// the offset within the cluster.
    fn read_mapped(&mut self, m: Mapping, pos: u64, in_off: u64, out: &mut [u8]) -> Result<()> {
        match m {
            Mapping::Unallocated => self.read_backing(out, pos),
            Mapping::Zero { .. } => {
                out.fill(0);
                Ok(())
            }
            Mapping::Data { host, .. } => self
                .storage
                .read_at(out, host + in_off)
                .map_err(|e| Error::io(format!("reading data cluster at {host:#x}"), e)),
            Mapping::Compressed { offset, sectors } => {
                let data = self.inflate(offset, sectors)?;
                out.copy_from_slice(&data[in_off as usize..in_off as usize + out.len()]);
                Ok(())
            }
        }
    }

    fn read_backing(&mut self, out: &mut [u8], pos: u64) -> Result<()> {
        let Some(b) = self.backing.as_mut() else {
            out.fill(0);
            return Ok(());
        };
        let size = b.size();
        let avail = size.saturating_sub(pos).min(out.len() as u64) as usize;
        out[avail..].fill(0);
        if avail > 0 {
            b.read_at(&mut out[..avail], pos)?;
        }
        Ok(())
    }

    /// Decompress the cluster at `offset` (raw deflate, as QEMU writes it).
    fn inflate(&mut self, offset: u64, sectors: u64) -> Result<&[u8]> {
        let key = (offset, sectors);
        if self.inflated.as_ref().is_none_or(|(k, _)| *k != key) {
            let cs = self.cluster_size as usize;
            let len = (sectors * 512 - (offset & 511)) as usize;
            let file_len = self
                .storage
                .len()
                .map_err(|e| Error::io("reading the file length", e))?;
            if offset >= file_len {
                return Err(Corruption::OutOfFile {
                    table: "compressed cluster",
                    offset,
                    len: len as u64,
                    file_len,
                }
                .into());
            }
            let mut input = vec![0u8; len];
            self.storage
                .read_at(&mut input, offset)
                .map_err(|e| Error::io(format!("reading compressed cluster at {offset:#x}"), e))?;
            let mut out = vec![0u8; cs];
            let mut z = Decompress::new(false);
            // QEMU accepts a stream that fills the cluster, whether or not it ends there.
            z.decompress(&input, &mut out, FlushDecompress::Finish)
                .map_err(|_| Corruption::Compressed(offset))?;
            if z.total_out() != cs as u64 {
                return Err(Corruption::Compressed(offset).into());
            }
            self.inflated = Some((key, out));
        }
        Ok(&self.inflated.as_ref().expect("just filled").1)
    }

    fn refs(&mut self) -> &mut Refcounts {
        self.refs
            .as_mut()
            .expect("writable images have refcounts loaded")
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(invalid("image is open read-only"))
        }
    }

    fn alloc(&mut self, n: u64) -> Result<u64> {
        let refs = self.refs.as_mut().expect("writable");
        refs.alloc(&*self.storage, n)
    }

    fn refcount(&mut self, host: u64) -> Result<u64> {
        let refs = self.refs.as_mut().expect("writable");
        refs.get(&*self.storage, host >> self.cluster_bits)
    }

    /// The L2 slot and index for guest cluster `vc`, allocating the table if needed.
    fn l2_for_write(&mut self, vc: u64) -> Result<(usize, usize)> {
        let l1i = (vc >> self.l2_bits) as usize;
        let idx = (vc & ((1 << self.l2_bits) - 1)) as usize;
        let entry = self.l1[l1i];
        let l2_off = entry & L1_OFFSET_MASK;
        if l2_off == 0 {
            let off = self.alloc(1)?;
            self.make_room()?;
            let slot = self.l2.insert(off, vec![0u64; 1 << self.l2_bits], true);
            self.l2_clusters.insert(off >> self.cluster_bits);
            self.set_l1(l1i, off | OFLAG_COPIED);
            return Ok((slot, idx));
        }
        self.check_in_place(l2_off, "L2 table", true)?;
        if entry & OFLAG_COPIED == 0 {
            if self.refcount(l2_off)? != 1 {
                return Err(corrupt(format!(
                    "L2 table at {l2_off:#x} is shared, but the image has no snapshots"
                )));
            }
            self.set_l1(l1i, l2_off | OFLAG_COPIED);
        }
        Ok((self.l2_slot(l2_off)?, idx))
    }

    /// A cluster about to be written in place, or released, must lie inside the image and
    /// must not hold metadata (header, L1, refcount table or blocks, or, unless it is the
    /// L2 table being updated, an L2 table): a lying entry must not make the engine
    /// overwrite or free metadata, or grow the file without bound.
    fn check_in_place(&mut self, host: u64, what: &str, is_l2: bool) -> Result<()> {
        let ci = host >> self.cluster_bits;
        let l2 = !is_l2 && self.l2_clusters.contains(&ci);
        let refs = self.refs();
        if ci >= refs.end() || refs.is_metadata(ci) || l2 {
            return Err(corrupt(format!(
                "{what} at {host:#x} lies outside the image or over its metadata"
            )));
        }
        Ok(())
    }

    /// Queue a host range for release at the next flush, once nothing points to it.
    fn release(&mut self, (off, len): (u64, u64)) -> Result<()> {
        let first = off >> self.cluster_bits;
        let last = (off + len - 1) >> self.cluster_bits;
        for ci in first..=last {
            self.check_in_place(ci << self.cluster_bits, "released cluster", false)?;
        }
        self.pending_free.push((off, len));
        Ok(())
    }

    fn set_l1(&mut self, i: usize, value: u64) {
        self.l1[i] = value;
        self.l1_dirty = Some(match self.l1_dirty {
            Some((a, b)) => (a.min(i), b.max(i + 1)),
            None => (i, i + 1),
        });
    }

    fn set_l2(&mut self, slot: usize, idx: usize, value: u64) {
        let s = self.l2.slot(slot);
        s.table[idx] = value;
        s.dirty = true;
    }

    /// Host bytes an entry owns, to release when the entry stops pointing there.
    fn owned_range(&self, m: Mapping) -> Option<(u64, u64)> {
        match m {
            Mapping::Data { host, .. }
            | Mapping::Zero {
                host: Some(host), ..
            } => Some((host, self.cluster_size)),
            Mapping::Compressed { offset, sectors } => Some((offset & !511, sectors * 512)),
            _ => None,
        }
    }

    /// Write `buf` to the virtual disk at `offset`.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.write_inner(buf, offset).map_err(|e| self.err(e))
    }

    fn write_inner(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let in_off = pos & (self.cluster_size - 1);
            let n = ((self.cluster_size - in_off) as usize).min(buf.len() - done);
            self.write_cluster(pos, &buf[done..done + n])?;
            done += n;
        }
        Ok(())
    }

    /// Write `data` into one cluster at guest offset `pos`.
    fn write_cluster(&mut self, pos: u64, data: &[u8]) -> Result<()> {
        let vc = pos >> self.cluster_bits;
        let in_off = (pos & (self.cluster_size - 1)) as usize;
        let (slot, idx) = self.l2_for_write(vc)?;
        let entry = self.l2.slot(slot).table[idx];
        let old = self.decode(entry)?;
        if let Mapping::Data { host, copied: true } = old {
            self.check_in_place(host, "data cluster", false)?;
            self.storage
                .write_at(data, host + in_off as u64)
                .map_err(|e| Error::io(format!("writing data cluster at {host:#x}"), e))?;
            self.data_unsynced = true;
            return Ok(());
        }
        // A new cluster, or a preallocated zero cluster of ours: write it whole.
        let cs = self.cluster_size as usize;
        // Every byte of the buffer is overwritten below: by the old contents, then `data`.
        let mut cluster = std::mem::take(&mut self.scratch);
        cluster.resize(cs, 0);
        if data.len() < cs {
            let base = pos - in_off as u64;
            self.read_mapped(old, base, 0, &mut cluster)?;
        }
        cluster[in_off..in_off + data.len()].copy_from_slice(data);
        let (target, release) = match old {
            Mapping::Zero {
                host: Some(host),
                copied: true,
            } => {
                self.check_in_place(host, "data cluster", false)?;
                (host, None)
            }
            _ => (self.alloc(1)?, self.owned_range(old)),
        };
        self.storage
            .write_at(&cluster, target)
            .map_err(|e| Error::io(format!("writing data cluster at {target:#x}"), e))?;
        self.scratch = cluster;
        self.data_unsynced = true;
        // Allocation never touches the L2 cache, so the slot is still ours.
        self.set_l2(slot, idx, target | OFLAG_COPIED);
        if let Some(r) = release {
            self.release(r)?;
        }
        Ok(())
    }

    /// Discard `len` bytes at `offset`: afterwards the range reads as zeros. Whole
    /// clusters release their space (a v3 image with a backing file records them as zero
    /// clusters); partial clusters are zeroed in place.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.discard_inner(offset, len).map_err(|e| self.err(e))
    }

    fn discard_inner(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check_writable()?;
        self.check_range(offset, len)?;
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let in_off = pos & (self.cluster_size - 1);
            let n = (self.cluster_size - in_off).min(end - pos);
            self.discard_cluster(pos, n)?;
            pos += n;
        }
        Ok(())
    }

    /// Whether guest bytes from `pos` to the end of their cluster already read as zeros
    /// without looking at data.
    fn reads_zero(&self, m: Mapping, pos: u64) -> bool {
        match m {
            Mapping::Zero { .. } => true,
            Mapping::Unallocated => self.backing.as_ref().is_none_or(|b| b.size() <= pos),
            _ => false,
        }
    }

    fn discard_cluster(&mut self, pos: u64, n: u64) -> Result<()> {
        let vc = pos >> self.cluster_bits;
        let m = self.lookup(vc)?;
        if self.reads_zero(m, pos) {
            return Ok(());
        }
        let whole = n == self.cluster_size;
        let has_backing = self.backing.is_some();
        let v3 = self.header.version >= 3;
        if !whole || (has_backing && !v3) {
            let zeros = vec![0u8; n as usize];
            return self.write_cluster(pos, &zeros);
        }
        let (slot, idx) = self.l2_for_write(vc)?;
        let new = if has_backing { OFLAG_ZERO } else { 0 };
        if let Some(r) = self.owned_range(m) {
            self.release(r)?;
        }
        self.set_l2(slot, idx, new);
        Ok(())
    }

    /// Make every completed write durable (see the module documentation for the order).
    pub fn flush(&mut self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        self.flush_inner().map_err(|e| self.err(e))
    }

    fn sync(&mut self) -> Result<()> {
        self.data_unsynced = false;
        self.storage.sync().map_err(|e| Error::io("syncing", e))
    }

    fn flush_inner(&mut self) -> Result<()> {
        // 1. Data and refcount blocks, then the table entries that point to new blocks.
        let refs = self.refs.as_mut().expect("writable");
        if refs.write_blocks(&mut *self.storage)? || self.data_unsynced {
            self.sync()?;
        }
        let refs = self.refs.as_mut().expect("writable");
        if refs.write_table(&mut *self.storage)? {
            self.sync()?;
        }
        // 2. A moved refcount table becomes current.
        if self.refs().table_moved {
            let (off, clusters) = self.refs().table_location();
            let mut field = [0u8; 12];
            field[..8].copy_from_slice(&off.to_be_bytes());
            field[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
            self.storage
                .write_at(&field, header::offsets::REFCOUNT_TABLE)
                .map_err(|e| Error::io("writing the header", e))?;
            self.sync()?;
            self.header.refcount_table_offset = off;
            self.header.refcount_table_clusters = clusters as u32;
            let refs = self.refs();
            refs.table_moved = false;
            let moved = std::mem::take(&mut refs.pending_table_free);
            self.pending_free.extend(moved);
        }
        // 3. L2 tables.
        if self.l2.any_dirty() {
            for s in self.l2.dirty_slots() {
                let bytes: Vec<u8> = s.table.iter().flat_map(|e| e.to_be_bytes()).collect();
                self.storage
                    .write_at(&bytes, s.offset)
                    .map_err(|e| Error::io(format!("writing L2 table at {:#x}", s.offset), e))?;
                s.dirty = false;
            }
            self.sync()?;
        }
        // 4. L1 table.
        if let Some((a, b)) = self.l1_dirty.take() {
            let bytes: Vec<u8> = self.l1[a..b].iter().flat_map(|e| e.to_be_bytes()).collect();
            let off = self.header.l1_table_offset + a as u64 * 8;
            self.storage
                .write_at(&bytes, off)
                .map_err(|e| Error::io("writing the L1 table", e))?;
            self.sync()?;
        }
        // 5. Nothing references these any more, durably: release them.
        if !self.pending_free.is_empty() {
            let pending = std::mem::take(&mut self.pending_free);
            let refs = self.refs.as_mut().expect("writable");
            for (off, len) in pending {
                refs.update(&*self.storage, off, len, false)?;
            }
            // Freeing only lowers counts in existing blocks: the table does not change.
            if refs.write_blocks(&mut *self.storage)? {
                self.sync()?;
            }
        }
        Ok(())
    }

    /// Whether the image has lazy refcounts enabled (compatible feature bit 0).
    pub fn lazy_refcounts(&self) -> bool {
        self.header.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
    }

    /// Walk every table and compare the references found with the stored refcounts.
    /// Writable images are flushed first.
    pub fn check(&mut self) -> Result<crate::CheckReport> {
        self.flush()?;
        crate::check::run(self).map_err(|e| self.err(e))
    }

    pub(crate) fn parts(&self) -> CheckParts<'_> {
        CheckParts {
            storage: &*self.storage,
            header: &self.header,
            l1: &self.l1,
        }
    }
}

/// Borrowed view of an image for the consistency check.
pub(crate) struct CheckParts<'a> {
    pub storage: &'a dyn Storage,
    pub header: &'a Header,
    pub l1: &'a [u64],
}

impl BlockDevice for Qcow2 {
    fn size(&self) -> u64 {
        self.virtual_size()
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        Qcow2::read_at(self, buf, offset)
    }
}

impl Drop for Qcow2 {
    fn drop(&mut self) {
        if self.writable {
            if let Err(e) = self.flush() {
                tracing::warn!("flushing qcow2 image on close failed: {e}");
            }
        }
    }
}
