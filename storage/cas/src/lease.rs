//! Leases: blobs an operation in flight needs, kept by GC until the lease is dropped.
//!
//! A pull ingests layers one by one and writes the image record at the end; between the
//! two, only its lease keeps those blobs alive. GC holds the store's GC lock while it
//! reads the leases, and ingest adds to a lease under the same lock, so no blob can fall
//! between "committed" and "leased".

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use crate::digest::Digest;

#[derive(Debug, Default)]
pub(crate) struct LeaseTable {
    next: AtomicU64,
    held: Mutex<HashMap<u64, HashSet<Digest>>>,
}

impl LeaseTable {
    /// The union of every live lease.
    pub(crate) fn snapshot(&self) -> HashSet<Digest> {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        held.values().flatten().copied().collect()
    }
}

/// A set of blobs protected from GC while this value lives.
#[derive(Debug)]
pub struct Lease {
    id: u64,
    table: Arc<LeaseTable>,
}

impl Lease {
    pub(crate) fn new(table: &Arc<LeaseTable>) -> Lease {
        let id = table.next.fetch_add(1, Ordering::Relaxed);
        table
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, HashSet::new());
        Lease {
            id,
            table: Arc::clone(table),
        }
    }

    /// Protect `digest` too. Adding a blob the store does not hold is allowed: the lease
    /// then protects it from the moment an ingest commits it.
    pub fn add(&self, digest: Digest) {
        let mut held = self
            .table
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        held.entry(self.id).or_default().insert(digest);
    }

    /// Whether the lease holds `digest`.
    pub fn holds(&self, digest: &Digest) -> bool {
        let held = self
            .table
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        held.get(&self.id).is_some_and(|s| s.contains(digest))
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut held = self
            .table
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        held.remove(&self.id);
    }
}
