//! The index's tables and how values are encoded (docs/cas.md has the same in prose).
//!
//! Keys are strings; record values are JSON documents, so a record can gain optional
//! fields without a format change. `FORMAT_VERSION` changes when a table's key or value
//! changes incompatibly; a store of another version is refused at open, never rewritten.

use std::path::Path;

use redb::{ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{CasError, Result};

/// The index format this code reads and writes.
pub const FORMAT_VERSION: u64 = 1;

/// `meta`: "format_version" -> u64.
pub(crate) const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
pub(crate) const FORMAT_KEY: &str = "format_version";

/// `blobs`: digest ("sha256:<hex>") -> (size, created (unix seconds), references).
/// References count the mentions of the blob in image, box and base-disk records.
pub(crate) const BLOBS: TableDefinition<'_, &str, (u64, u64, u64)> = TableDefinition::new("blobs");

/// `images`: reference -> JSON [`ImageRecord`](crate::ImageRecord).
pub(crate) const IMAGES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("images");

/// `base_disks`: base disk ID -> JSON [`BaseDisk`](crate::BaseDisk).
pub(crate) const BASE_DISKS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("base_disks");

/// `base_disk_names`: (source box ID, name) -> base disk ID. Enforces UNIQUE(source, name)
/// for named base disks.
pub(crate) const BASE_DISK_NAMES: TableDefinition<'_, (&str, &str), &str> =
    TableDefinition::new("base_disk_names");

/// `boxes`: box ID -> JSON [`BoxRecord`](crate::BoxRecord).
pub(crate) const BOXES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("boxes");

/// `box_names`: box name -> box ID. Enforces unique box names.
pub(crate) const BOX_NAMES: TableDefinition<'_, &str, &str> = TableDefinition::new("box_names");

/// Encode a record.
pub(crate) fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    // Records are plain structs of strings, numbers and digests: serializing cannot fail.
    serde_json::to_vec(record).unwrap_or_default()
}

/// Decode a record read from `table` under `key`.
pub(crate) fn decode<T: DeserializeOwned>(
    table: &'static str,
    key: &str,
    bytes: &[u8],
) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| CasError::CorruptRecord {
        table,
        key: key.to_string(),
        reason: e.to_string(),
    })
}

/// Every record of a JSON table, decoded, in key order.
pub(crate) fn decode_all<T: DeserializeOwned>(
    table: &'static str,
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    db: &Path,
) -> Result<Vec<T>> {
    let mut out = Vec::new();
    for row in t.iter().db(db)? {
        let (k, v) = row.db(db)?;
        out.push(decode(table, k.value(), v.value())?);
    }
    Ok(out)
}

/// Attach the database's path to a redb error.
pub(crate) trait DbContext<T> {
    fn db(self, path: &Path) -> Result<T>;
}

impl<T, E: Into<redb::Error>> DbContext<T> for std::result::Result<T, E> {
    fn db(self, path: &Path) -> Result<T> {
        self.map_err(|e| CasError::Db {
            path: path.to_path_buf(),
            source: Box::new(e.into()),
        })
    }
}
