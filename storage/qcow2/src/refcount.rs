//! Reference counts: the refcount table, its blocks (cached, written back on flush) and
//! cluster allocation.
//!
//! Allocation takes the first cluster whose refcount is zero (from a moving hint), else
//! appends at the end of the image. A missing refcount block is placed at the end of the
//! image and, when it falls in its own range, describes itself. A full refcount table is
//! moved to a larger one at the end of the image; the old one is freed once the header
//! points at the new one.

use std::collections::{HashMap, HashSet};

use crate::error::{corrupt, Corruption, Result};
use crate::header::{check_table, MAX_REFTABLE_BYTES};
use crate::storage::Storage;
use crate::{invalid, Error};

/// Offset bits of a refcount table entry.
const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// Read entry `idx` of a refcount block with entries of `1 << order` bits.
pub(crate) fn get_entry(block: &[u8], idx: usize, order: u32) -> u64 {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (idx % per_byte) * bits;
            u64::from((block[idx / per_byte] >> shift) & ((1u8 << bits) - 1))
        }
        3 => u64::from(block[idx]),
        4 => u64::from(u16::from_be_bytes([block[2 * idx], block[2 * idx + 1]])),
        5 => u64::from(u32::from_be_bytes(
            block[4 * idx..4 * idx + 4].try_into().expect("4 bytes"),
        )),
        _ => u64::from_be_bytes(block[8 * idx..8 * idx + 8].try_into().expect("8 bytes")),
    }
}

/// Write entry `idx`; `value` must fit in `1 << order` bits.
pub(crate) fn set_entry(block: &mut [u8], idx: usize, order: u32, value: u64) {
    match order {
        0..=2 => {
            let bits = 1usize << order;
            let per_byte = 8 / bits;
            let shift = (idx % per_byte) * bits;
            let mask = ((1u8 << bits) - 1) << shift;
            let b = &mut block[idx / per_byte];
            *b = (*b & !mask) | (((value as u8) << shift) & mask);
        }
        3 => block[idx] = value as u8,
        4 => block[2 * idx..2 * idx + 2].copy_from_slice(&(value as u16).to_be_bytes()),
        5 => block[4 * idx..4 * idx + 4].copy_from_slice(&(value as u32).to_be_bytes()),
        _ => block[8 * idx..8 * idx + 8].copy_from_slice(&value.to_be_bytes()),
    }
}

#[derive(Debug)]
struct Block {
    data: Vec<u8>,
    dirty: bool,
}

/// The refcount structures of one open image.
#[derive(Debug)]
pub(crate) struct Refcounts {
    order: u32,
    cluster_bits: u32,
    /// log2 of the entries in one refcount block.
    epb_bits: u32,
    table: Vec<u64>,
    table_offset: u64,
    table_clusters: u64,
    /// Range of table entries changed since the last flush.
    table_dirty: Option<(usize, usize)>,
    /// The table was moved: the header must be rewritten.
    pub table_moved: bool,
    /// Byte ranges of tables replaced by moves, to free once the header is durable.
    pub pending_table_free: Vec<(u64, u64)>,
    blocks: HashMap<u64, Block>,
    block_cache_cap: usize,
    /// First cluster index past everything in the file or allocated.
    end: u64,
    free_hint: u64,
    /// Clusters that must never be handed out (header, L1, refcount table).
    reserved: Vec<(u64, u64)>,
    /// Cluster indices of the refcount blocks.
    block_clusters: HashSet<u64>,
}

impl Refcounts {
    /// Load the refcount table (already validated to lie inside the file).
    pub fn load(
        storage: &dyn Storage,
        order: u32,
        cluster_bits: u32,
        table_offset: u64,
        table_clusters: u32,
        file_len: u64,
    ) -> Result<Self> {
        let cs = 1u64 << cluster_bits;
        let bytes = u64::from(table_clusters) * cs;
        let mut raw = vec![0u8; bytes as usize];
        storage
            .read_at(&mut raw, table_offset)
            .map_err(|e| Error::io("reading the refcount table", e))?;
        let table: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let block_clusters = table
            .iter()
            .map(|e| (e & REFT_OFFSET_MASK) >> cluster_bits)
            .filter(|&c| c != 0)
            .collect();
        Ok(Self {
            order,
            cluster_bits,
            epb_bits: cluster_bits + 3 - order,
            table,
            table_offset,
            table_clusters: u64::from(table_clusters),
            table_dirty: None,
            table_moved: false,
            pending_table_free: Vec::new(),
            blocks: HashMap::new(),
            block_cache_cap: ((64usize << 20) >> cluster_bits).max(64),
            end: file_len.div_ceil(cs),
            free_hint: 0,
            reserved: Vec::new(),
            block_clusters,
        })
    }

    /// Clusters allocation must never return, whatever their refcount says.
    pub fn reserve(&mut self, offset: u64, len: u64) {
        let first = offset >> self.cluster_bits;
        let last = offset.saturating_add(len.max(1) - 1) >> self.cluster_bits;
        self.reserved.push((first, last));
    }

    fn max_value(&self) -> u64 {
        if self.order == 6 {
            u64::MAX
        } else {
            (1u64 << (1u32 << self.order)) - 1
        }
    }

    /// Where the refcount table is, in bytes, and its length in clusters.
    pub fn table_location(&self) -> (u64, u64) {
        (self.table_offset, self.table_clusters)
    }

    /// The refcount of host cluster `ci`.
    pub fn get(&mut self, storage: &dyn Storage, ci: u64) -> Result<u64> {
        let bi = ci >> self.epb_bits;
        if bi >= self.table.len() as u64 || self.table[bi as usize] & REFT_OFFSET_MASK == 0 {
            return Ok(0);
        }
        let idx = (ci & ((1 << self.epb_bits) - 1)) as usize;
        let order = self.order;
        let block = self.block(storage, bi)?;
        Ok(get_entry(&block.data, idx, order))
    }

    fn block(&mut self, storage: &dyn Storage, bi: u64) -> Result<&mut Block> {
        if !self.blocks.contains_key(&bi) {
            let cs = 1u64 << self.cluster_bits;
            let off = self.table[bi as usize] & REFT_OFFSET_MASK;
            let file_len = storage
                .len()
                .map_err(|e| Error::io("reading the file length", e))?;
            check_table("refcount block", off, cs, cs, file_len)?;
            if self.is_reserved(off >> self.cluster_bits) {
                return Err(corrupt(format!(
                    "refcount block at {off:#x} overlaps the header, L1 or refcount table"
                )));
            }
            if self.blocks.len() >= self.block_cache_cap {
                self.blocks.retain(|_, b| b.dirty);
            }
            let mut data = vec![0u8; cs as usize];
            storage
                .read_at(&mut data, off)
                .map_err(|e| Error::io(format!("reading refcount block at {off:#x}"), e))?;
            self.blocks.insert(bi, Block { data, dirty: false });
        }
        Ok(self.blocks.get_mut(&bi).expect("just inserted"))
    }

    /// Set the refcount of `ci`, creating its refcount block if needed.
    fn set(&mut self, storage: &dyn Storage, ci: u64, value: u64) -> Result<()> {
        let bi = ci >> self.epb_bits;
        self.ensure_block(storage, bi)?;
        let idx = (ci & ((1 << self.epb_bits) - 1)) as usize;
        let order = self.order;
        let block = self.block(storage, bi)?;
        set_entry(&mut block.data, idx, order, value);
        block.dirty = true;
        Ok(())
    }

    /// Add `delta` (+1 or -1) to the refcount of every cluster in `[offset, offset+len)`.
    pub fn update(
        &mut self,
        storage: &dyn Storage,
        offset: u64,
        len: u64,
        increment: bool,
    ) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        for ci in first..=last {
            let cur = self.get(storage, ci)?;
            let new = if increment {
                if cur == self.max_value() {
                    return Err(corrupt(format!(
                        "refcount of cluster {:#x} would overflow",
                        ci << self.cluster_bits
                    )));
                }
                cur + 1
            } else {
                if cur == 0 {
                    return Err(corrupt(format!(
                        "freeing cluster {:#x} whose refcount is already 0",
                        ci << self.cluster_bits
                    )));
                }
                if cur == 1 && ci < self.free_hint {
                    self.free_hint = ci;
                }
                cur - 1
            };
            self.set(storage, ci, new)?;
        }
        Ok(())
    }

    /// First cluster index past everything in the file or allocated.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Whether `ci` holds the header, the L1 table or the refcount table.
    pub fn is_reserved(&self, ci: u64) -> bool {
        self.reserved.iter().any(|&(a, b)| (a..=b).contains(&ci))
    }

    /// Whether `ci` holds refcount metadata or the header or L1 table.
    pub fn is_metadata(&self, ci: u64) -> bool {
        self.is_reserved(ci) || self.block_clusters.contains(&ci)
    }

    /// Allocate `n` contiguous clusters with refcount 1; returns the byte offset.
    pub fn alloc(&mut self, storage: &dyn Storage, n: u64) -> Result<u64> {
        let start = if n == 1 {
            let mut c = self.free_hint;
            while c < self.end && (self.is_reserved(c) || self.get(storage, c)? != 0) {
                c += 1;
            }
            self.free_hint = c + 1;
            c
        } else {
            self.end
        };
        let end = start + n;
        if end > (1u64 << (56 - self.cluster_bits)) {
            return Err(invalid("image would grow beyond 2^56 bytes"));
        }
        self.end = self.end.max(end);
        for ci in start..end {
            self.set(storage, ci, 1)?;
        }
        Ok(start << self.cluster_bits)
    }

    /// Make sure refcount block `bi` exists, allocating it (and growing the table) as needed.
    fn ensure_block(&mut self, storage: &dyn Storage, bi: u64) -> Result<()> {
        loop {
            if bi >= self.table.len() as u64 {
                self.grow_table(storage, bi)?;
                continue;
            }
            if self.table[bi as usize] & REFT_OFFSET_MASK != 0 {
                return Ok(());
            }
            let c = self.end;
            let cb = c >> self.epb_bits;
            let has_cb =
                cb < self.table.len() as u64 && self.table[cb as usize] & REFT_OFFSET_MASK != 0;
            if cb == bi || has_cb {
                self.end += 1;
                let mut data = vec![0u8; 1 << self.cluster_bits];
                if cb == bi {
                    // The new block lies in its own range and describes itself.
                    let idx = (c & ((1 << self.epb_bits) - 1)) as usize;
                    set_entry(&mut data, idx, self.order, 1);
                }
                self.blocks.insert(bi, Block { data, dirty: true });
                self.block_clusters.insert(c);
                self.set_table(bi as usize, c << self.cluster_bits);
                if cb != bi {
                    self.set(storage, c, 1)?;
                }
                return Ok(());
            }
            // The block that must count the new block is missing too: create it first
            // (at the end, where it describes itself).
            self.ensure_block(storage, cb)?;
        }
    }

    fn set_table(&mut self, idx: usize, value: u64) {
        self.table[idx] = value;
        self.table_dirty = Some(match self.table_dirty {
            Some((a, b)) => (a.min(idx), b.max(idx + 1)),
            None => (idx, idx + 1),
        });
    }

    /// Move the table to a larger one at the end of the image, big enough for block `bi`
    /// and for the blocks that will count the new table itself.
    fn grow_table(&mut self, storage: &dyn Storage, bi: u64) -> Result<()> {
        let cs = 1u64 << self.cluster_bits;
        let per_cluster = cs / 8;
        let mut entries = (bi + 1).max(self.table.len() as u64 * 2);
        let clusters = loop {
            let tc = entries.div_ceil(per_cluster);
            // New table at [end, end + tc), then up to tc/epb + 2 new blocks after it.
            let last = self.end + tc + (tc >> self.epb_bits) + 2;
            let needed = (last >> self.epb_bits) + 1;
            if needed <= tc * per_cluster {
                break tc;
            }
            entries = needed;
        };
        if clusters * cs > MAX_REFTABLE_BYTES.max(cs) {
            return Err(invalid(
                "image too large: the refcount table would exceed 8 MiB",
            ));
        }
        let old = (self.table_offset, self.table_clusters);
        let start = self.end;
        self.end += clusters;
        self.table.resize((clusters * per_cluster) as usize, 0);
        self.table_offset = start << self.cluster_bits;
        self.table_clusters = clusters;
        self.table_dirty = Some((0, self.table.len()));
        self.table_moved = true;
        self.reserved
            .retain(|&(a, _)| a != old.0 >> self.cluster_bits);
        self.reserve(self.table_offset, clusters * cs);
        for ci in start..start + clusters {
            self.set(storage, ci, 1)?;
        }
        // The old table's clusters are released by the caller once the header is durable.
        self.pending_table_free.push((old.0, old.1 * cs));
        Ok(())
    }

    /// Write every dirty refcount block. Returns whether anything was written.
    pub fn write_blocks(&mut self, storage: &mut dyn Storage) -> Result<bool> {
        let mut dirty: Vec<u64> = self
            .blocks
            .iter()
            .filter(|(_, b)| b.dirty)
            .map(|(&i, _)| i)
            .collect();
        dirty.sort_unstable();
        for &bi in &dirty {
            let off = self.table[bi as usize] & REFT_OFFSET_MASK;
            let block = self.blocks.get_mut(&bi).expect("dirty block cached");
            storage
                .write_at(&block.data, off)
                .map_err(|e| Error::io(format!("writing refcount block at {off:#x}"), e))?;
            block.dirty = false;
        }
        Ok(!dirty.is_empty())
    }

    /// Write the changed part of the refcount table. Call only once the blocks it points
    /// to are durable. Returns whether anything was written.
    pub fn write_table(&mut self, storage: &mut dyn Storage) -> Result<bool> {
        let Some((a, b)) = self.table_dirty.take() else {
            return Ok(false);
        };
        let bytes: Vec<u8> = self.table[a..b]
            .iter()
            .flat_map(|v| v.to_be_bytes())
            .collect();
        storage
            .write_at(&bytes, self.table_offset + a as u64 * 8)
            .map_err(|e| Error::io("writing the refcount table", e))?;
        Ok(true)
    }

    /// Every allocated refcount block's byte offset (for the consistency check).
    pub fn block_offsets(&self) -> impl Iterator<Item = u64> + '_ {
        self.table
            .iter()
            .map(|e| e & REFT_OFFSET_MASK)
            .filter(|&o| o != 0)
    }

    /// Validate that a table entry is aligned (used by the consistency check).
    pub fn check_entries(&self) -> Result<()> {
        let cs = 1u64 << self.cluster_bits;
        for e in &self.table {
            let off = e & REFT_OFFSET_MASK;
            if !off.is_multiple_of(cs) {
                return Err(Corruption::Unaligned {
                    table: "refcount block",
                    offset: off,
                }
                .into());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_for_every_width() {
        for order in 0..=6u32 {
            let bits = 1u32 << order;
            let max = if bits == 64 {
                u64::MAX
            } else {
                (1 << bits) - 1
            };
            let mut block = vec![0u8; 512];
            let n = 512 * 8 / bits as usize;
            for i in 0..n {
                set_entry(&mut block, i, order, (i as u64 * 7) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_entry(&block, i, order),
                    (i as u64 * 7) & max,
                    "order {order}"
                );
            }
        }
    }

    #[test]
    fn sub_byte_entries_are_lsb_first() {
        let mut block = vec![0u8; 4];
        set_entry(&mut block, 1, 0, 1);
        assert_eq!(block[0], 0b10);
        set_entry(&mut block, 1, 1, 3);
        assert_eq!(block[0], 0b1110);
    }
}
