//! The `DiskStore` trait: where base-disk records live (the seed's `base_disk` table).
//!
//! Four operations, cut at what the base-disk manager needs: insert (UNIQUE per source
//! and name, so the loser of a race learns it), find by name, list by source and kind,
//! delete. boxlet's own store implements it on redb; [`MemoryDiskStore`] is for tests and
//! for embedders that keep no state on disk.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, PoisonError};

pub use boxlet_cas::{BaseDisk, BaseDiskId, BaseDiskKind, DiskInfo};

/// An error of a [`DiskStore`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiskStoreError {
    /// A record with this ID, or of this source with this name, exists already.
    #[error("a base disk record conflicts: {0}")]
    Conflict(String),
    /// The store failed.
    #[error("the base-disk store failed: {0}")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
}

/// Where base-disk records live.
pub trait DiskStore: Send + Sync + fmt::Debug {
    /// Record a disk; [`DiskStoreError::Conflict`] when its ID exists, or when it is
    /// named and its source already has a disk of that name.
    fn insert(&self, disk: &BaseDisk) -> Result<(), DiskStoreError>;

    /// The disk of `source` named `name`.
    fn find_by_name(&self, source: &str, name: &str) -> Result<Option<BaseDisk>, DiskStoreError>;

    /// The disks of `source` (of `kind`, when given), oldest first.
    fn list_by_source(
        &self,
        source: &str,
        kind: Option<BaseDiskKind>,
    ) -> Result<Vec<BaseDisk>, DiskStoreError>;

    /// Forget a disk; whether it was there.
    fn delete(&self, id: BaseDiskId) -> Result<bool, DiskStoreError>;
}

fn from_cas(e: boxlet_cas::CasError) -> DiskStoreError {
    match e {
        boxlet_cas::CasError::Conflict(what) => DiskStoreError::Conflict(what),
        other => DiskStoreError::Store(Box::new(other)),
    }
}

impl DiskStore for boxlet_cas::Store {
    fn insert(&self, disk: &BaseDisk) -> Result<(), DiskStoreError> {
        self.insert_base_disk(disk).map_err(from_cas)
    }

    fn find_by_name(&self, source: &str, name: &str) -> Result<Option<BaseDisk>, DiskStoreError> {
        self.find_base_disk(source, name).map_err(from_cas)
    }

    fn list_by_source(
        &self,
        source: &str,
        kind: Option<BaseDiskKind>,
    ) -> Result<Vec<BaseDisk>, DiskStoreError> {
        self.list_base_disks(source, kind).map_err(from_cas)
    }

    fn delete(&self, id: BaseDiskId) -> Result<bool, DiskStoreError> {
        self.delete_base_disk(id).map_err(from_cas)
    }
}

/// A [`DiskStore`] in memory: nothing survives the process.
#[derive(Debug, Default)]
pub struct MemoryDiskStore {
    disks: Mutex<BTreeMap<BaseDiskId, BaseDisk>>,
}

impl MemoryDiskStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl DiskStore for MemoryDiskStore {
    fn insert(&self, disk: &BaseDisk) -> Result<(), DiskStoreError> {
        let mut disks = self.disks.lock().unwrap_or_else(PoisonError::into_inner);
        if disks.contains_key(&disk.id) {
            return Err(DiskStoreError::Conflict(format!("base disk {}", disk.id)));
        }
        if let Some(name) = &disk.name {
            let holder = disks
                .values()
                .find(|d| d.source_box_id == disk.source_box_id && d.name.as_ref() == Some(name));
            if let Some(holder) = holder {
                return Err(DiskStoreError::Conflict(format!(
                    "base disk named {name:?} of source {:?} (it is {})",
                    disk.source_box_id, holder.id
                )));
            }
        }
        disks.insert(disk.id, disk.clone());
        Ok(())
    }

    fn find_by_name(&self, source: &str, name: &str) -> Result<Option<BaseDisk>, DiskStoreError> {
        let disks = self.disks.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(disks
            .values()
            .find(|d| d.source_box_id == source && d.name.as_deref() == Some(name))
            .cloned())
    }

    fn list_by_source(
        &self,
        source: &str,
        kind: Option<BaseDiskKind>,
    ) -> Result<Vec<BaseDisk>, DiskStoreError> {
        let disks = self.disks.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<BaseDisk> = disks
            .values()
            .filter(|d| d.source_box_id == source && kind.is_none_or(|k| d.kind == k))
            .cloned()
            .collect();
        out.sort_by_key(|d| (d.created_at, d.id));
        Ok(out)
    }

    fn delete(&self, id: BaseDiskId) -> Result<bool, DiskStoreError> {
        let mut disks = self.disks.lock().unwrap_or_else(PoisonError::into_inner);
        Ok(disks.remove(&id).is_some())
    }
}
