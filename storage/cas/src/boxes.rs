//! Box records: identity, configuration, state, and the blobs a box keeps alive.

use redb::{ReadableDatabase, ReadableTable};

use crate::error::{CasError, Result};
use crate::id::BoxId;
use crate::images::adjust_references;
use crate::records::BoxRecord;
use crate::schema::{decode, decode_all, encode, DbContext, BLOBS, BOXES, BOX_NAMES};
use crate::store::Store;

impl Store {
    /// Record a new box, or replace the record of an existing one (same ID). Names are
    /// unique across boxes; the blobs it names must be in the store.
    pub fn put_box(&self, record: &BoxRecord) -> Result<()> {
        let p = &self.db_path;
        let id = record.id.to_string();
        let what = format!("box {id}");
        let txn = self.db.begin_write().db(p)?;
        {
            let mut boxes = txn.open_table(BOXES).db(p)?;
            let mut names = txn.open_table(BOX_NAMES).db(p)?;
            let mut blobs = txn.open_table(BLOBS).db(p)?;
            let old: Option<BoxRecord> = boxes
                .get(id.as_str())
                .db(p)?
                .map(|v| decode("boxes", &id, v.value()))
                .transpose()?;
            if let Some(name) = &record.name {
                let holder = names
                    .get(name.as_str())
                    .db(p)?
                    .map(|v| v.value().to_string());
                match holder {
                    Some(h) if h != id => {
                        return Err(CasError::Conflict(format!("a box named {name:?} ({h})")))
                    }
                    _ => {
                        names.insert(name.as_str(), id.as_str()).db(p)?;
                    }
                }
            }
            adjust_references(&mut blobs, &record.blobs, true, &what, p)?;
            if let Some(old) = &old {
                adjust_references(&mut blobs, &old.blobs, false, &what, p)?;
                if let Some(old_name) = old
                    .name
                    .as_ref()
                    .filter(|n| record.name.as_ref() != Some(n))
                {
                    names.remove(old_name.as_str()).db(p)?;
                }
            }
            boxes.insert(id.as_str(), encode(record).as_slice()).db(p)?;
        }
        txn.commit().db(p)
    }

    /// The box with this ID.
    pub fn get_box(&self, id: BoxId) -> Result<Option<BoxRecord>> {
        let p = &self.db_path;
        let key = id.to_string();
        let txn = self.db.begin_read().db(p)?;
        let boxes = txn.open_table(BOXES).db(p)?;
        let found = boxes.get(key.as_str()).db(p)?;
        found.map(|v| decode("boxes", &key, v.value())).transpose()
    }

    /// The box named `name`.
    pub fn find_box(&self, name: &str) -> Result<Option<BoxRecord>> {
        let id = {
            let p = &self.db_path;
            let txn = self.db.begin_read().db(p)?;
            let names = txn.open_table(BOX_NAMES).db(p)?;
            let found = names.get(name).db(p)?;
            match found {
                Some(v) => v.value().to_string(),
                None => return Ok(None),
            }
        };
        let id = BoxId::parse(&id).map_err(|e| CasError::CorruptRecord {
            table: "box_names",
            key: name.to_string(),
            reason: e.to_string(),
        })?;
        self.get_box(id)
    }

    /// Every box, by ID.
    pub fn boxes(&self) -> Result<Vec<BoxRecord>> {
        let p = &self.db_path;
        let txn = self.db.begin_read().db(p)?;
        let boxes = txn.open_table(BOXES).db(p)?;
        decode_all("boxes", &boxes, p)
    }

    /// Forget a box; the blobs it named lose a reference. Returns the record removed.
    pub fn remove_box(&self, id: BoxId) -> Result<BoxRecord> {
        let p = &self.db_path;
        let key = id.to_string();
        let txn = self.db.begin_write().db(p)?;
        let old = {
            let mut boxes = txn.open_table(BOXES).db(p)?;
            let mut names = txn.open_table(BOX_NAMES).db(p)?;
            let mut blobs = txn.open_table(BLOBS).db(p)?;
            let old: BoxRecord = match boxes.remove(key.as_str()).db(p)? {
                Some(v) => decode("boxes", &key, v.value())?,
                None => return Err(CasError::NoRecord(format!("box {key}"))),
            };
            if let Some(name) = &old.name {
                names.remove(name.as_str()).db(p)?;
            }
            adjust_references(&mut blobs, &old.blobs, false, "", p)?;
            old
        };
        txn.commit().db(p)?;
        Ok(old)
    }
}
