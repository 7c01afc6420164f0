//! The store: a directory of blobs named by digest and a redb index of what it holds.
//!
//! ```text
//! ROOT/db/boxlet.redb       the index (tables in schema.rs)
//! ROOT/blobs/<alg>/<hex>    one read-only file per blob
//! ROOT/tmp/                 ingests in progress; swept at open
//! ```
//! Opening the index locks it (redb takes an exclusive file lock), so one process at a
//! time owns a store, and what `tmp/` holds at open is left over from a crash.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use redb::{Database, ReadableDatabase, ReadableTable};

use crate::digest::{Algorithm, Digest};
use crate::error::{CasError, Result};
use crate::fault::FaultHook;
use crate::lease::{Lease, LeaseTable};
use crate::records::BlobInfo;
use crate::schema::{self, DbContext, BLOBS, FORMAT_KEY, FORMAT_VERSION, META};

/// How to open a store.
#[derive(Clone, Debug, Default)]
pub struct StoreOptions {
    /// A hook at every step of ingest and GC (tests and crash drills).
    pub fault: FaultHook,
}

/// A content-addressed store rooted at one directory.
#[derive(Debug)]
pub struct Store {
    pub(crate) root: PathBuf,
    pub(crate) db_path: PathBuf,
    pub(crate) db: Database,
    pub(crate) leases: Arc<LeaseTable>,
    /// Ingest commits hold it shared, GC exclusively: GC never sees a blob half-installed.
    pub(crate) gc_lock: RwLock<()>,
    pub(crate) fault: FaultHook,
}

impl Store {
    /// Open (creating if needed) the store at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        Self::open_with(root, StoreOptions::default())
    }

    /// Open with options.
    pub fn open_with(root: impl Into<PathBuf>, options: StoreOptions) -> Result<Store> {
        let root = root.into();
        crate::private::private_dir(&root)?;
        for dir in [root.join("db"), root.join("tmp")]
            .into_iter()
            .chain(Algorithm::ALL.map(|a| root.join("blobs").join(a.name())))
        {
            fs::create_dir_all(&dir).map_err(CasError::io("creating", &dir))?;
        }
        let db_path = root.join("db").join("boxlet.redb");
        let db = Database::create(&db_path).db(&db_path)?;
        check_format(&db, &db_path)?;
        let store = Store {
            root,
            db_path,
            db,
            leases: Arc::default(),
            gc_lock: RwLock::new(()),
            fault: options.fault,
        };
        store.sweep_tmp()?;
        Ok(store)
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where a blob's file is (whether or not the store holds it).
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm().name())
            .join(digest.hex())
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// A new, empty lease (see [`Lease`]).
    pub fn lease(&self) -> Lease {
        Lease::new(&self.leases)
    }

    /// The index's entry for a blob, if the store holds it.
    pub fn stat(&self, digest: &Digest) -> Result<Option<BlobInfo>> {
        let p = &self.db_path;
        let txn = self.db.begin_read().db(p)?;
        let table = txn.open_table(BLOBS).db(p)?;
        let key = digest.to_string();
        Ok(table.get(key.as_str()).db(p)?.map(|v| {
            let (size, created, references) = v.value();
            BlobInfo {
                digest: *digest,
                size,
                created,
                references,
            }
        }))
    }

    /// Whether the store holds a blob: indexed, and its file present.
    pub fn contains(&self, digest: &Digest) -> Result<bool> {
        Ok(self.stat(digest)?.is_some() && self.blob_path(digest).is_file())
    }

    /// Open a blob for reading.
    pub fn open_blob(&self, digest: &Digest) -> Result<File> {
        if self.stat(digest)?.is_none() {
            return Err(CasError::NotFound(*digest));
        }
        let path = self.blob_path(digest);
        File::open(&path).map_err(CasError::io("opening blob", path))
    }

    /// Read a whole blob of at most `limit` bytes, verifying it against its digest (for
    /// small documents such as manifests that are parsed after reading).
    pub fn read_blob(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>> {
        let path = self.blob_path(digest);
        let mut data = Vec::new();
        self.open_blob(digest)?
            .take(limit.saturating_add(1))
            .read_to_end(&mut data)
            .map_err(CasError::io("reading blob", &path))?;
        if data.len() as u64 > limit {
            return Err(CasError::SizeMismatch {
                digest: digest.to_string(),
                expected: limit,
                actual: limit + 1,
                truncated: true,
            });
        }
        let actual = Digest::of(digest.algorithm(), &data);
        if actual != *digest {
            return Err(CasError::DigestMismatch {
                expected: *digest,
                actual,
            });
        }
        Ok(data)
    }

    /// Every blob in the index, in digest order.
    pub fn list_blobs(&self) -> Result<Vec<BlobInfo>> {
        let p = &self.db_path;
        let txn = self.db.begin_read().db(p)?;
        let table = txn.open_table(BLOBS).db(p)?;
        let mut out = Vec::new();
        for row in table.iter().db(p)? {
            let (k, v) = row.db(p)?;
            let digest = k.value().parse().map_err(|e: crate::DigestParseError| {
                CasError::CorruptRecord {
                    table: "blobs",
                    key: k.value().to_string(),
                    reason: e.to_string(),
                }
            })?;
            let (size, created, references) = v.value();
            out.push(BlobInfo {
                digest,
                size,
                created,
                references,
            });
        }
        Ok(out)
    }

    /// Remove what a crashed ingest (or staging) left in `tmp/`.
    fn sweep_tmp(&self) -> Result<()> {
        let tmp = self.tmp_dir();
        let entries = fs::read_dir(&tmp).map_err(CasError::io("listing", &tmp))?;
        for entry in entries {
            let entry = entry.map_err(CasError::io("listing", &tmp))?;
            let path = entry.path();
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            let removed = if is_dir {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match removed {
                Ok(()) => {
                    tracing::info!(path = %path.display(), "removed a leftover of an interrupted ingest")
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(CasError::io("removing", path)(e)),
            }
        }
        Ok(())
    }
}

/// Create every table and the format version in a new index; refuse another version.
fn check_format(db: &Database, path: &Path) -> Result<()> {
    let txn = db.begin_write().db(path)?;
    {
        let mut meta = txn.open_table(META).db(path)?;
        let found = meta.get(FORMAT_KEY).db(path)?.map(|v| v.value());
        match found {
            Some(FORMAT_VERSION) => {}
            Some(found) => {
                return Err(CasError::FormatVersion {
                    path: path.to_path_buf(),
                    found,
                    supported: FORMAT_VERSION,
                })
            }
            None => {
                meta.insert(FORMAT_KEY, FORMAT_VERSION).db(path)?;
            }
        }
        txn.open_table(BLOBS).db(path)?;
        txn.open_table(schema::IMAGES).db(path)?;
        txn.open_table(schema::BASE_DISKS).db(path)?;
        txn.open_table(schema::BASE_DISK_NAMES).db(path)?;
        txn.open_table(schema::BOXES).db(path)?;
        txn.open_table(schema::BOX_NAMES).db(path)?;
    }
    txn.commit().db(path)
}

/// fsync a directory, so a rename or unlink in it survives a power loss.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(CasError::io("syncing directory", dir))
}
