//! Image records, and the blob reference counts that image and box records keep.

use redb::{ReadableDatabase, ReadableTable, Table};

use crate::digest::Digest;
use crate::error::{CasError, Result};
use crate::records::ImageRecord;
use crate::schema::{decode, decode_all, encode, DbContext, BLOBS, IMAGES};
use crate::store::Store;

/// Count one more (or one less) mention of each of `digests`. Adding a mention of a blob
/// the index does not hold fails, naming `what`.
pub(crate) fn adjust_references<'a>(
    blobs: &mut Table<'_, &'static str, (u64, u64, u64)>,
    digests: impl IntoIterator<Item = &'a Digest>,
    add: bool,
    what: &str,
    db: &std::path::Path,
) -> Result<()> {
    for digest in digests {
        let key = digest.to_string();
        let entry = blobs.get(key.as_str()).db(db)?.map(|v| v.value());
        match entry {
            Some((size, created, refs)) => {
                let refs = if add {
                    refs + 1
                } else {
                    refs.saturating_sub(1)
                };
                blobs.insert(key.as_str(), (size, created, refs)).db(db)?;
            }
            None if add => {
                return Err(CasError::MissingBlob {
                    what: what.to_string(),
                    digest: *digest,
                })
            }
            None => {}
        }
    }
    Ok(())
}

impl Store {
    /// Record (or replace) an image. Every blob it names must be in the store; their
    /// reference counts change in the same transaction.
    pub fn put_image(&self, image: &ImageRecord) -> Result<()> {
        let p = &self.db_path;
        let what = format!("image {}", image.reference);
        let txn = self.db.begin_write().db(p)?;
        {
            let mut images = txn.open_table(IMAGES).db(p)?;
            let mut blobs = txn.open_table(BLOBS).db(p)?;
            let old = images
                .get(image.reference.as_str())
                .db(p)?
                .map(|v| decode::<ImageRecord>("images", &image.reference, v.value()))
                .transpose()?;
            adjust_references(&mut blobs, image.blobs(), true, &what, p)?;
            if let Some(old) = &old {
                adjust_references(&mut blobs, old.blobs(), false, &what, p)?;
            }
            images
                .insert(image.reference.as_str(), encode(image).as_slice())
                .db(p)?;
        }
        txn.commit().db(p)
    }

    /// The image recorded under `reference`.
    pub fn image(&self, reference: &str) -> Result<Option<ImageRecord>> {
        let p = &self.db_path;
        let txn = self.db.begin_read().db(p)?;
        let images = txn.open_table(IMAGES).db(p)?;
        let found = images.get(reference).db(p)?;
        found
            .map(|v| decode("images", reference, v.value()))
            .transpose()
    }

    /// Every image, by reference.
    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        let p = &self.db_path;
        let txn = self.db.begin_read().db(p)?;
        let images = txn.open_table(IMAGES).db(p)?;
        decode_all("images", &images, p)
    }

    /// Forget an image (its blobs stay until GC finds them unreferenced). Returns the
    /// record removed.
    pub fn remove_image(&self, reference: &str) -> Result<ImageRecord> {
        let p = &self.db_path;
        let txn = self.db.begin_write().db(p)?;
        let old = {
            let mut images = txn.open_table(IMAGES).db(p)?;
            let mut blobs = txn.open_table(BLOBS).db(p)?;
            let old: ImageRecord = match images.remove(reference).db(p)? {
                Some(v) => decode("images", reference, v.value())?,
                None => return Err(CasError::NoRecord(format!("image {reference}"))),
            };
            adjust_references(&mut blobs, old.blobs(), false, "", p)?;
            old
        };
        txn.commit().db(p)?;
        Ok(old)
    }
}
