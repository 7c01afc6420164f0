//! Ingest: stream content into `tmp/`, hashing while writing; verify it against what it
//! was announced as; fsync; rename into `blobs/`; fsync the directory; then index it.
//!
//! A crash before the index commit leaves a file in `tmp/` (swept at open) or an
//! unindexed file in `blobs/` (an orphan: replaced by the next ingest of the same content,
//! removed by GC). A crash after it loses nothing: the file was synced before.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::PoisonError;

use redb::ReadableTable;

use crate::digest::{Algorithm, Digest, Hasher};
use crate::error::{CasError, Result};
use crate::fault::Step;
use crate::id::BoxId;
use crate::lease::Lease;
use crate::pipe::WritePipe;
use crate::records::{unix_now, BlobInfo};
use crate::schema::{DbContext, BLOBS};
use crate::store::{sync_dir, Store};

/// The size of the chunks [`Store::ingest`] reads and writes.
const CHUNK: usize = 1 << 20;

/// What content is announced as: its digest, and its size when known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Expected {
    /// The digest the content must hash to.
    pub digest: Digest,
    /// The size it must have.
    pub size: Option<u64>,
}

impl Expected {
    /// Content announced by digest and size, as an OCI descriptor announces it.
    pub fn new(digest: Digest, size: u64) -> Self {
        Expected {
            digest,
            size: Some(size),
        }
    }
}

impl Store {
    /// Ingest everything `src` yields. When `expected` is given and the store already holds
    /// that blob, nothing is read: a duplicate costs one index lookup. The blob joins
    /// `lease` before this returns.
    pub fn ingest(
        &self,
        src: &mut dyn Read,
        alg: Algorithm,
        expected: Option<Expected>,
        lease: &Lease,
    ) -> Result<BlobInfo> {
        if let Some(info) = expected
            .map(|e| self.lease_stored(e, lease))
            .transpose()?
            .flatten()
        {
            return Ok(info);
        }
        let mut writer = self.writer(alg, expected)?;
        loop {
            let mut buf = writer.buffer();
            buf.resize(CHUNK, 0);
            let n = match src.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(CasError::Source {
                        what: writer.what(),
                        source: e,
                    })
                }
            };
            buf.truncate(n);
            writer.push_owned(buf)?;
        }
        writer.commit(lease)
    }

    /// Ingest a byte slice.
    pub fn ingest_bytes(
        &self,
        data: &[u8],
        alg: Algorithm,
        expected: Option<Expected>,
        lease: &Lease,
    ) -> Result<BlobInfo> {
        self.ingest(&mut { data }, alg, expected, lease)
    }

    /// A writer for content that arrives in pieces (a network stream). Nothing is visible
    /// until [`BlobWriter::commit`]; dropping the writer discards what it holds.
    pub fn writer(&self, alg: Algorithm, expected: Option<Expected>) -> Result<BlobWriter<'_>> {
        if let Some(e) = expected {
            if e.digest.algorithm() != alg {
                return Err(CasError::AlgorithmMismatch {
                    expected: e.digest,
                    algorithm: alg,
                });
            }
        }
        let tmp_path = self.tmp_dir().join(format!("ingest-{}", BoxId::mint()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_path)
            .map_err(CasError::io("creating", &tmp_path))?;
        let writer = BlobWriter {
            store: self,
            out: Out::Inline(file),
            tmp_path,
            hasher: Hasher::new(alg),
            written: 0,
            expected,
        };
        self.fault.check(Step::IngestCreated)?;
        Ok(writer)
    }

    /// When the store holds `expected` content (indexed, its file present, the size
    /// right), lease it and return its entry: a fetch or ingest of it can be skipped. The
    /// check and the lease happen under the GC lock, so GC cannot remove it in between.
    pub fn lease_stored(&self, expected: Expected, lease: &Lease) -> Result<Option<BlobInfo>> {
        let _shared = self.gc_lock.read().unwrap_or_else(PoisonError::into_inner);
        match self.stat(&expected.digest)? {
            Some(info)
                if expected.size.is_none_or(|s| s == info.size)
                    && self.blob_path(&expected.digest).is_file() =>
            {
                lease.add(expected.digest);
                Ok(Some(info))
            }
            _ => Ok(None),
        }
    }
}

/// Where a writer's bytes go: written inline while the content is small, then through a
/// writer thread.
#[derive(Debug)]
enum Out {
    Inline(File),
    Piped(WritePipe),
    Failed,
}

/// Content being ingested (see [`Store::writer`]).
#[derive(Debug)]
pub struct BlobWriter<'s> {
    store: &'s Store,
    out: Out,
    tmp_path: PathBuf,
    hasher: Hasher,
    written: u64,
    expected: Option<Expected>,
}

impl BlobWriter<'_> {
    fn what(&self) -> String {
        self.expected
            .map_or_else(|| "a new blob".to_string(), |e| e.digest.to_string())
    }

    /// Bytes received so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Hash and write one piece. Fails as soon as the content is longer than announced.
    pub fn push(&mut self, data: &[u8]) -> Result<()> {
        match &self.out {
            Out::Piped(pipe) => {
                let mut buf = pipe.buffer();
                buf.extend_from_slice(data);
                self.push_owned(buf)
            }
            _ => self.push_owned(data.to_vec()),
        }
    }

    /// A buffer for [`push_owned`](Self::push_owned) (a recycled one when there is one).
    fn buffer(&self) -> Vec<u8> {
        match &self.out {
            Out::Piped(pipe) => pipe.buffer(),
            _ => Vec::with_capacity(CHUNK),
        }
    }

    fn push_owned(&mut self, data: Vec<u8>) -> Result<()> {
        let total = self.written + data.len() as u64;
        if let Some(Expected {
            digest,
            size: Some(size),
        }) = self.expected
        {
            if total > size {
                return Err(CasError::SizeMismatch {
                    digest: digest.to_string(),
                    expected: size,
                    actual: total,
                    truncated: true,
                });
            }
        }
        self.hasher.update(&data);
        self.out = match std::mem::replace(&mut self.out, Out::Failed) {
            // Small content is written here; past one chunk, a writer thread takes over.
            Out::Inline(mut file) if total <= CHUNK as u64 => {
                file.write_all(&data)
                    .map_err(CasError::io("writing", self.tmp_path.clone()))?;
                Out::Inline(file)
            }
            Out::Inline(file) => {
                let mut pipe = WritePipe::start(file, CHUNK)
                    .map_err(CasError::io("writing", self.tmp_path.clone()))?;
                pipe.send(data)
                    .map_err(CasError::io("writing", self.tmp_path.clone()))?;
                Out::Piped(pipe)
            }
            Out::Piped(mut pipe) => {
                pipe.send(data)
                    .map_err(CasError::io("writing", self.tmp_path.clone()))?;
                Out::Piped(pipe)
            }
            Out::Failed => {
                return Err(CasError::io("writing", self.tmp_path.clone())(
                    io::Error::other("the writer has failed"),
                ))
            }
        };
        self.written = total;
        self.store.fault.check(Step::IngestChunk)
    }

    /// Verify, sync, install and index the content; the blob joins `lease`.
    pub fn commit(mut self, lease: &Lease) -> Result<BlobInfo> {
        let store = self.store;
        let digest = self.hasher.clone().finish();
        if let Some(e) = self.expected {
            if let Some(size) = e.size.filter(|&s| s != self.written) {
                return Err(CasError::SizeMismatch {
                    digest: e.digest.to_string(),
                    expected: size,
                    actual: self.written,
                    truncated: false,
                });
            }
            if e.digest != digest {
                return Err(CasError::DigestMismatch {
                    expected: e.digest,
                    actual: digest,
                });
            }
        }
        let file = match std::mem::replace(&mut self.out, Out::Failed) {
            Out::Inline(file) => file,
            Out::Piped(pipe) => pipe
                .finish()
                .map_err(CasError::io("writing", &self.tmp_path))?,
            Out::Failed => {
                return Err(CasError::io("writing", &self.tmp_path)(io::Error::other(
                    "the writer has failed",
                )))
            }
        };
        store.fault.check(Step::IngestWritten)?;
        file.set_permissions(fs::Permissions::from_mode(0o400))
            .and_then(|()| file.sync_all())
            .map_err(CasError::io("syncing", &self.tmp_path))?;
        drop(file);
        store.fault.check(Step::IngestSynced)?;

        let _shared = store.gc_lock.read().unwrap_or_else(PoisonError::into_inner);
        let p = &store.db_path;
        if let Some(info) = store.stat(&digest)? {
            if store.blob_path(&digest).is_file() {
                // Someone stored the same content first: ours is a duplicate.
                lease.add(digest);
                return Ok(info);
            }
        }
        let target = store.blob_path(&digest);
        fs::rename(&self.tmp_path, &target).map_err(CasError::io("installing blob", &target))?;
        store.fault.check(Step::IngestRenamed)?;
        let dir = target.parent().unwrap_or(&target);
        sync_dir(dir)?;
        store.fault.check(Step::IngestDirSynced)?;

        let txn = store.db.begin_write().db(p)?;
        let info = {
            let mut blobs = txn.open_table(BLOBS).db(p)?;
            let key = digest.to_string();
            let existing = blobs.get(key.as_str()).db(p)?.map(|v| v.value());
            // An entry whose file had gone keeps its age and references.
            let (_, created, references) = existing.unwrap_or((0, unix_now(), 0));
            let size = self.written;
            blobs
                .insert(key.as_str(), (size, created, references))
                .db(p)?;
            BlobInfo {
                digest,
                size,
                created,
                references,
            }
        };
        txn.commit().db(p)?;
        lease.add(digest);
        store.fault.check(Step::IngestCommitted)?;
        tracing::debug!(%digest, size = info.size, "ingested blob");
        Ok(info)
    }
}

impl Drop for BlobWriter<'_> {
    fn drop(&mut self) {
        // After a successful commit the temporary name is gone: NotFound is expected.
        match fs::remove_file(&self.tmp_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %self.tmp_path.display(), "removing an ingest's temporary file: {e}")
            }
        }
    }
}
