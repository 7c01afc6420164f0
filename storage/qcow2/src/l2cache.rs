//! A write-back cache of L2 tables, least recently used out first.
//!
//! Tables are kept decoded (host-endian `u64`s). A dirty table is written by the image's
//! flush, which orders it after the refcounts it depends on; the cache itself never writes.

use std::collections::HashMap;

/// One cached L2 table.
#[derive(Debug)]
pub(crate) struct Slot {
    /// Byte offset of the table in the image.
    pub offset: u64,
    /// The entries.
    pub table: Vec<u64>,
    /// Changed since last written.
    pub dirty: bool,
    used: u64,
}

/// The cache.
#[derive(Debug)]
pub(crate) struct L2Cache {
    slots: Vec<Slot>,
    map: HashMap<u64, usize>,
    capacity: usize,
    tick: u64,
}

impl L2Cache {
    /// A cache holding at most `capacity` tables (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            slots: Vec::new(),
            map: HashMap::new(),
            capacity: capacity.max(1),
            tick: 0,
        }
    }

    /// The slot holding the table at `offset`, marking it used.
    #[inline]
    pub fn find(&mut self, offset: u64) -> Option<usize> {
        let i = *self.map.get(&offset)?;
        self.tick += 1;
        self.slots[i].used = self.tick;
        Some(i)
    }

    /// Whether inserting one more table requires evicting a dirty one (the caller must
    /// flush first).
    pub fn victim_is_dirty(&self) -> bool {
        self.slots.len() >= self.capacity && self.lru().is_some_and(|i| self.slots[i].dirty)
    }

    fn lru(&self) -> Option<usize> {
        self.slots
            .iter()
            .enumerate()
            .min_by_key(|(_, s)| s.used)
            .map(|(i, _)| i)
    }

    /// Insert a table, evicting the least recently used clean one if full. Returns its slot.
    pub fn insert(&mut self, offset: u64, table: Vec<u64>, dirty: bool) -> usize {
        self.tick += 1;
        let slot = Slot {
            offset,
            table,
            dirty,
            used: self.tick,
        };
        let i = if self.slots.len() < self.capacity {
            self.slots.push(slot);
            self.slots.len() - 1
        } else {
            let i = self.lru().expect("cache is full, so not empty");
            debug_assert!(!self.slots[i].dirty, "caller flushes before evicting");
            self.map.remove(&self.slots[i].offset);
            self.slots[i] = slot;
            i
        };
        self.map.insert(offset, i);
        i
    }

    /// The slot at index `i`.
    #[inline]
    pub fn slot(&mut self, i: usize) -> &mut Slot {
        &mut self.slots[i]
    }

    /// Every dirty slot, in offset order.
    pub fn dirty_slots(&mut self) -> Vec<&mut Slot> {
        let mut v: Vec<&mut Slot> = self.slots.iter_mut().filter(|s| s.dirty).collect();
        v.sort_unstable_by_key(|s| s.offset);
        v
    }

    /// Whether any table is dirty.
    pub fn any_dirty(&self) -> bool {
        self.slots.iter().any(|s| s.dirty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let mut c = L2Cache::new(2);
        c.insert(0x1000, vec![1], false);
        c.insert(0x2000, vec![2], false);
        assert!(c.find(0x1000).is_some());
        c.insert(0x3000, vec![3], false);
        assert!(c.find(0x2000).is_none(), "0x2000 was least recently used");
        assert!(c.find(0x1000).is_some());
        assert!(c.find(0x3000).is_some());
    }

    #[test]
    fn reports_dirty_victim() {
        let mut c = L2Cache::new(1);
        c.insert(0x1000, vec![1], true);
        assert!(c.victim_is_dirty());
        c.slot(0).dirty = false;
        assert!(!c.victim_is_dirty());
    }
}
