//! `store verify`: re-hash every blob and check the index against the files and records;
//! `store du`: what the store occupies.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::digest::{Algorithm, Digest, Hasher};
use crate::error::Result;
use crate::gc::list_entries;
use crate::records::BlobInfo;
use crate::store::Store;

/// Something `verify` found wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// The index lists a blob whose file is missing or unreadable.
    Unreadable {
        /// The blob.
        digest: Digest,
        /// Why.
        error: String,
    },
    /// A blob's file is not the size the index says.
    WrongSize {
        /// The blob.
        digest: Digest,
        /// The index's size.
        indexed: u64,
        /// The file's size.
        actual: u64,
    },
    /// A blob's content does not hash to its name.
    Corrupt {
        /// The blob.
        digest: Digest,
        /// What its bytes hash to.
        actual: Digest,
    },
    /// A file under `blobs/` the index does not list (GC removes it).
    Orphan(PathBuf),
    /// A blob's reference count differs from the records naming it.
    References {
        /// The blob.
        digest: Digest,
        /// The index's count.
        indexed: u64,
        /// Mentions in image and box records.
        counted: u64,
    },
    /// A record names a blob the index does not hold.
    Dangling {
        /// The record.
        record: String,
        /// The blob.
        digest: Digest,
    },
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Problem::Unreadable { digest, error } => write!(f, "{digest}: cannot be read: {error}"),
            Problem::WrongSize {
                digest,
                indexed,
                actual,
            } => write!(
                f,
                "{digest}: the index says {indexed} bytes, the file has {actual}"
            ),
            Problem::Corrupt { digest, actual } => {
                write!(f, "{digest}: the content hashes to {actual}")
            }
            Problem::Orphan(path) => write!(f, "{}: not in the index (an orphan)", path.display()),
            Problem::References {
                digest,
                indexed,
                counted,
            } => write!(
                f,
                "{digest}: the index counts {indexed} references, the records make {counted}"
            ),
            Problem::Dangling { record, digest } => {
                write!(f, "{record} names {digest}, which the store does not hold")
            }
        }
    }
}

/// What `verify` checked and found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyReport {
    /// Blobs re-hashed.
    pub blobs: usize,
    /// Their bytes.
    pub bytes: u64,
    /// Everything wrong, in a stable order.
    pub problems: Vec<Problem>,
}

/// What the store occupies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Blobs in the index.
    pub blobs: usize,
    /// Their apparent size.
    pub blob_bytes: u64,
    /// Blocks allocated to blob files (less than `blob_bytes` for sparse content).
    pub blob_disk_bytes: u64,
    /// Bytes in `tmp/` (ingests in progress).
    pub tmp_bytes: u64,
    /// The index database's size.
    pub index_bytes: u64,
    /// Image records.
    pub images: usize,
    /// Box records.
    pub boxes: usize,
    /// Base-disk records.
    pub base_disks: usize,
}

impl Store {
    /// Re-hash every blob (on every CPU) and check the index against files and records.
    /// Nothing is changed.
    pub fn verify(&self) -> Result<VerifyReport> {
        // Snapshot under the exclusive lock, so no half-installed ingest looks like an
        // orphan; then hash under the shared one, so GC cannot remove what is read.
        let (blobs, orphans, counted, dangling) = {
            let _exclusive = self.gc_lock.write().unwrap_or_else(PoisonError::into_inner);
            let blobs = self.list_blobs()?;
            let indexed = self.indexed_keys()?;
            let mut orphans = Vec::new();
            for alg in Algorithm::ALL {
                for (name, path) in list_entries(&self.root.join("blobs").join(alg.name()))? {
                    if !indexed.contains(&format!("{alg}:{name}")) {
                        orphans.push(Problem::Orphan(path));
                    }
                }
            }
            let mut counted: HashMap<Digest, u64> = HashMap::new();
            let mut dangling = Vec::new();
            let mut count = |record: String, d: &Digest| {
                *counted.entry(*d).or_default() += 1;
                if !indexed.contains(&d.to_string()) {
                    dangling.push(Problem::Dangling { record, digest: *d });
                }
            };
            for image in self.images()? {
                for d in image.blobs() {
                    count(format!("image {}", image.reference), d);
                }
            }
            for b in self.boxes()? {
                for d in &b.blobs {
                    count(format!("box {}", b.id), d);
                }
            }
            for disk in self.all_base_disks()? {
                if let Some(d) = &disk.blob {
                    count(format!("base disk {}", disk.id), d);
                }
            }
            (blobs, orphans, counted, dangling)
        };
        let _shared = self.gc_lock.read().unwrap_or_else(PoisonError::into_inner);
        let mut problems = self.rehash_all(&blobs);
        for b in &blobs {
            let refs = counted.get(&b.digest).copied().unwrap_or(0);
            if refs != b.references {
                problems.push(Problem::References {
                    digest: b.digest,
                    indexed: b.references,
                    counted: refs,
                });
            }
        }
        problems.extend(orphans);
        problems.extend(dangling);
        Ok(VerifyReport {
            blobs: blobs.len(),
            bytes: blobs.iter().map(|b| b.size).sum(),
            problems,
        })
    }

    fn rehash_all(&self, blobs: &[BlobInfo]) -> Vec<Problem> {
        let next = AtomicUsize::new(0);
        let found = Mutex::new(Vec::new());
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        std::thread::scope(|s| {
            for _ in 0..threads.min(blobs.len()) {
                s.spawn(|| {
                    let mut buf = vec![0u8; 1 << 20];
                    while let Some(b) = blobs.get(next.fetch_add(1, Ordering::Relaxed)) {
                        if let Some(p) = check_blob(&self.blob_path(&b.digest), b, &mut buf) {
                            found.lock().unwrap_or_else(PoisonError::into_inner).push(p);
                        }
                    }
                });
            }
        });
        let mut found = found.into_inner().unwrap_or_else(PoisonError::into_inner);
        found.sort_by_key(|p| match p {
            Problem::Unreadable { digest, .. }
            | Problem::WrongSize { digest, .. }
            | Problem::Corrupt { digest, .. } => *digest,
            _ => Digest::new(Algorithm::Sha256, [0; 32]),
        });
        found
    }

    /// What the store occupies (see [`Usage`]).
    pub fn usage(&self) -> Result<Usage> {
        let blobs = self.list_blobs()?;
        let blob_disk_bytes = blobs
            .iter()
            .filter_map(|b| fs::metadata(self.blob_path(&b.digest)).ok())
            .map(|m| m.blocks() * 512)
            .sum();
        Ok(Usage {
            blobs: blobs.len(),
            blob_bytes: blobs.iter().map(|b| b.size).sum(),
            blob_disk_bytes,
            tmp_bytes: dir_bytes(&self.tmp_dir()),
            index_bytes: fs::metadata(&self.db_path).map_or(0, |m| m.len()),
            images: self.images()?.len(),
            boxes: self.boxes()?.len(),
            base_disks: self.all_base_disks()?.len(),
        })
    }
}

fn check_blob(path: &Path, blob: &BlobInfo, buf: &mut [u8]) -> Option<Problem> {
    let unreadable = |e: std::io::Error| Problem::Unreadable {
        digest: blob.digest,
        error: e.to_string(),
    };
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) => return Some(unreadable(e)),
    };
    let mut hasher = Hasher::new(blob.digest.algorithm());
    let mut size = 0u64;
    loop {
        match file.read(buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                size += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Some(unreadable(e)),
        }
    }
    let actual = hasher.finish();
    if size != blob.size {
        Some(Problem::WrongSize {
            digest: blob.digest,
            indexed: blob.size,
            actual: size,
        })
    } else if actual != blob.digest {
        Some(Problem::Corrupt {
            digest: blob.digest,
            actual,
        })
    } else {
        None
    }
}

/// Bytes of the regular files under `dir`, recursively (0 when it cannot be read).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use crate::schema::{DbContext, BLOBS};
    use crate::{unix_now, Algorithm, ImageRecord, Problem, Store};

    #[test]
    fn a_record_naming_a_blob_the_index_lost_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let lease = store.lease();
        let put = |d: &[u8]| {
            store
                .ingest_bytes(d, Algorithm::Sha256, None, &lease)
                .unwrap()
                .digest
        };
        let (manifest, config, layer) = (put(b"m"), put(b"c"), put(b"l"));
        store
            .put_image(&ImageRecord {
                reference: "x".into(),
                index: None,
                manifest,
                config,
                layers: vec![layer],
                platform: "linux/amd64".into(),
                created_at: unix_now(),
            })
            .unwrap();
        // Damage the index behind the store's back.
        let p = &store.db_path;
        let txn = store.db.begin_write().db(p).unwrap();
        txn.open_table(BLOBS)
            .db(p)
            .unwrap()
            .remove(layer.to_string().as_str())
            .db(p)
            .unwrap();
        txn.commit().db(p).unwrap();

        let problems = store.verify().unwrap().problems;
        assert!(
            problems.contains(&Problem::Dangling {
                record: "image x".into(),
                digest: layer
            }),
            "{problems:?}"
        );
        assert!(problems
            .iter()
            .any(|p| matches!(p, Problem::Orphan(path) if path.ends_with(layer.hex()))));
    }
}
