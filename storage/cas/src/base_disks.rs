//! Base-disk records: the seed's `base_disk` table, with UNIQUE(source box, name).

use redb::{ReadableDatabase, ReadableTable};

use crate::error::{CasError, Result};
use crate::id::BaseDiskId;
use crate::images::adjust_references;
use crate::records::{BaseDisk, BaseDiskKind};
use crate::schema::{decode, decode_all, encode, DbContext, BASE_DISKS, BASE_DISK_NAMES, BLOBS};
use crate::store::Store;

impl Store {
    /// Record a base disk. Fails with [`CasError::Conflict`] when its ID exists, or when
    /// it is named and its source already has a base disk of that name (the loser of a
    /// race learns it here, and looks the winner up by name).
    pub fn insert_base_disk(&self, disk: &BaseDisk) -> Result<()> {
        let p = &self.db_path;
        let id = disk.id.to_string();
        let txn = self.db.begin_write().db(p)?;
        {
            let mut disks = txn.open_table(BASE_DISKS).db(p)?;
            let mut names = txn.open_table(BASE_DISK_NAMES).db(p)?;
            if disks.get(id.as_str()).db(p)?.is_some() {
                return Err(CasError::Conflict(format!("base disk {id}")));
            }
            if let Some(name) = &disk.name {
                let key = (disk.source_box_id.as_str(), name.as_str());
                if let Some(holder) = names.get(key).db(p)? {
                    return Err(CasError::Conflict(format!(
                        "base disk named {name:?} of source {:?} (it is {})",
                        disk.source_box_id,
                        holder.value()
                    )));
                }
                names.insert(key, id.as_str()).db(p)?;
            }
            let mut blobs = txn.open_table(BLOBS).db(p)?;
            adjust_references(&mut blobs, &disk.blob, true, &format!("base disk {id}"), p)?;
            disks.insert(id.as_str(), encode(disk).as_slice()).db(p)?;
        }
        txn.commit().db(p)
    }

    /// The base disk with this ID.
    pub fn base_disk(&self, id: BaseDiskId) -> Result<Option<BaseDisk>> {
        let p = &self.db_path;
        let key = id.to_string();
        let txn = self.db.begin_read().db(p)?;
        let disks = txn.open_table(BASE_DISKS).db(p)?;
        let found = disks.get(key.as_str()).db(p)?;
        found
            .map(|v| decode("base_disks", &key, v.value()))
            .transpose()
    }

    /// The base disk of `source` named `name`.
    pub fn find_base_disk(&self, source: &str, name: &str) -> Result<Option<BaseDisk>> {
        let p = &self.db_path;
        let txn = self.db.begin_read().db(p)?;
        let names = txn.open_table(BASE_DISK_NAMES).db(p)?;
        let Some(id) = names
            .get((source, name))
            .db(p)?
            .map(|v| v.value().to_string())
        else {
            return Ok(None);
        };
        let disks = txn.open_table(BASE_DISKS).db(p)?;
        let found = disks.get(id.as_str()).db(p)?;
        found
            .map(|v| decode("base_disks", &id, v.value()))
            .transpose()
    }

    /// The base disks of `source`, of `kind` when given, oldest first.
    pub fn list_base_disks(
        &self,
        source: &str,
        kind: Option<BaseDiskKind>,
    ) -> Result<Vec<BaseDisk>> {
        let mut all = self.all_base_disks()?;
        all.retain(|d| d.source_box_id == source && kind.is_none_or(|k| d.kind == k));
        all.sort_by_key(|d| (d.created_at, d.id));
        Ok(all)
    }

    /// Every base disk, by ID.
    pub fn all_base_disks(&self) -> Result<Vec<BaseDisk>> {
        let p = &self.db_path;
        let txn = self.db.begin_read().db(p)?;
        let disks = txn.open_table(BASE_DISKS).db(p)?;
        decode_all("base_disks", &disks, p)
    }

    /// Forget a base disk (its file is the caller's). Returns whether it existed.
    pub fn delete_base_disk(&self, id: BaseDiskId) -> Result<bool> {
        let p = &self.db_path;
        let key = id.to_string();
        let txn = self.db.begin_write().db(p)?;
        let existed = {
            let mut disks = txn.open_table(BASE_DISKS).db(p)?;
            let mut names = txn.open_table(BASE_DISK_NAMES).db(p)?;
            let old = disks.remove(key.as_str()).db(p)?;
            match old {
                Some(v) => {
                    let disk: BaseDisk = decode("base_disks", &key, v.value())?;
                    if let Some(name) = &disk.name {
                        names
                            .remove((disk.source_box_id.as_str(), name.as_str()))
                            .db(p)?;
                    }
                    true
                }
                None => false,
            }
        };
        txn.commit().db(p)?;
        Ok(existed)
    }
}
