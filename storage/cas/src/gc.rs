//! Garbage collection: mark the blobs that records and leases name, then sweep the rest
//! from the index first and from disk second, and remove orphan files.
//!
//! Order matters for crash safety: an index entry is removed before its file, so a crash
//! in between leaves an orphan file (removed by the next GC), never an entry without a
//! file. GC holds the store's GC lock exclusively, so no ingest commits meanwhile.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::PoisonError;

use redb::{ReadableDatabase, ReadableTable};

use crate::digest::{Algorithm, Digest};
use crate::error::{CasError, Result};
use crate::fault::Step;
use crate::schema::{DbContext, BLOBS};
use crate::store::{sync_dir, Store};

/// What a GC did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Indexed blobs no record or lease named, now removed.
    pub blobs_removed: usize,
    /// Their bytes.
    pub bytes_freed: u64,
    /// Files under `blobs/` the index did not list, now removed.
    pub orphans_removed: usize,
    /// Blobs kept.
    pub blobs_kept: usize,
}

impl Store {
    /// Every blob named by an image, a box, a base disk, or a live lease: the roots of GC.
    pub fn live_blobs(&self) -> Result<HashSet<Digest>> {
        let mut live = self.leases.snapshot();
        for image in self.images()? {
            live.extend(image.blobs().copied());
        }
        for b in self.boxes()? {
            live.extend(b.blobs);
        }
        live.extend(self.all_base_disks()?.into_iter().filter_map(|d| d.blob));
        Ok(live)
    }

    /// Collect garbage (see the module documentation).
    pub fn gc(&self) -> Result<GcReport> {
        let _exclusive = self.gc_lock.write().unwrap_or_else(PoisonError::into_inner);
        let p = &self.db_path;
        let live = self.live_blobs()?;
        self.fault.check(Step::GcMarked)?;

        let mut report = GcReport::default();
        let mut dead = Vec::new();
        let txn = self.db.begin_write().db(p)?;
        {
            let mut blobs = txn.open_table(BLOBS).db(p)?;
            for row in blobs.iter().db(p)? {
                let (k, v) = row.db(p)?;
                let key = k.value().to_string();
                match key.parse::<Digest>() {
                    Ok(d) if live.contains(&d) => report.blobs_kept += 1,
                    Ok(d) => dead.push((d, v.value().0)),
                    Err(e) => {
                        return Err(CasError::CorruptRecord {
                            table: "blobs",
                            key,
                            reason: e.to_string(),
                        })
                    }
                }
            }
            for (d, _) in &dead {
                blobs.remove(d.to_string().as_str()).db(p)?;
            }
        }
        txn.commit().db(p)?;
        self.fault.check(Step::GcIndexSwept)?;

        for (digest, size) in &dead {
            let path = self.blob_path(digest);
            remove_if_present(&path)?;
            report.blobs_removed += 1;
            report.bytes_freed += size;
            tracing::info!(%digest, size, "GC removed an unreferenced blob");
            self.fault.check(Step::GcFileRemoved)?;
        }

        let indexed = self.indexed_keys()?;
        for alg in Algorithm::ALL {
            let dir = self.root.join("blobs").join(alg.name());
            for (name, path) in list_entries(&dir)? {
                let key = format!("{alg}:{name}");
                let leased = key.parse::<Digest>().is_ok_and(|d| live.contains(&d));
                if indexed.contains(&key) || leased {
                    continue;
                }
                remove_if_present(&path)?;
                report.orphans_removed += 1;
                tracing::info!(path = %path.display(), "GC removed an orphan file");
                self.fault.check(Step::GcFileRemoved)?;
            }
            sync_dir(&dir)?;
        }
        Ok(report)
    }

    /// The keys of the blobs table.
    pub(crate) fn indexed_keys(&self) -> Result<HashSet<String>> {
        let p = &self.db_path;
        let txn = self.db.begin_read().db(p)?;
        let blobs = txn.open_table(BLOBS).db(p)?;
        let mut keys = HashSet::new();
        for row in blobs.iter().db(p)? {
            keys.insert(row.db(p)?.0.value().to_string());
        }
        Ok(keys)
    }
}

/// The entries of `dir`: name (lossy) and path, by name.
pub(crate) fn list_entries(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(CasError::io("listing", dir))? {
        let entry = entry.map_err(CasError::io("listing", dir))?;
        out.push((
            entry.file_name().to_string_lossy().into_owned(),
            entry.path(),
        ));
    }
    out.sort();
    Ok(out)
}

fn remove_if_present(path: &Path) -> Result<()> {
    let removed = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    match removed {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(CasError::io("removing", path)(e)),
        _ => Ok(()),
    }
}
