//! Unpack an image from the store into a directory: its layers, bottom first, each
//! decompressed, checked against its diff ID, and applied securely.

use std::io::{self, Read};
use std::path::Path;

use boxlet_cas::{Algorithm, Hasher, Store};

use crate::apply::{apply_layer, ApplyError, ApplyOptions, ApplyReport};
use crate::error::{OciError, Result};
use crate::image::{Layer, StoredImage};
use crate::manifest::Compression;

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hasher: Hasher,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Apply one stored layer onto `dir`, checking its uncompressed bytes against its diff ID.
pub fn apply_stored_layer(
    store: &Store,
    layer: &Layer,
    dir: &Path,
    opts: &ApplyOptions,
) -> Result<ApplyReport> {
    let mut blob = store.open_blob(&layer.digest)?;
    let mut head = [0u8; 4];
    let n = blob.read(&mut head).map_err(OciError::io(
        "reading layer",
        store.blob_path(&layer.digest),
    ))?;
    let compression = Compression::detect(&layer.media_type, &head[..n]);
    let src = io::Cursor::new(head[..n].to_vec()).chain(blob);
    let plain = compression.reader(src).map_err(OciError::io(
        "decompressing layer",
        store.blob_path(&layer.digest),
    ))?;
    let mut hashing = Hashing {
        inner: plain,
        hasher: Hasher::new(Algorithm::Sha256),
    };
    let report = apply_layer(dir, &mut hashing, opts).map_err(|source| match source {
        ApplyError::Read(e) => OciError::Apply {
            layer: layer.digest,
            source: ApplyError::Read(io::Error::new(
                e.kind(),
                format!("{e} (compression {compression:?})"),
            )),
        },
        source => OciError::Apply {
            layer: layer.digest,
            source,
        },
    })?;
    // The tar may end before the stream does (padding): hash the rest too.
    io::copy(&mut hashing, &mut io::sink()).map_err(|e| OciError::Apply {
        layer: layer.digest,
        source: ApplyError::Read(e),
    })?;
    let actual = hashing.hasher.finish();
    if actual != layer.diff_id {
        return Err(OciError::DiffId {
            layer: layer.digest,
            expected: layer.diff_id,
            actual,
        });
    }
    Ok(report)
}

/// Unpack the image `reference` into `dir` (created if missing). Returns the summed
/// report of its layers.
pub fn unpack(
    store: &Store,
    reference: &str,
    dir: &Path,
    opts: &ApplyOptions,
) -> Result<ApplyReport> {
    let image = StoredImage::open(store, reference)?;
    std::fs::create_dir_all(dir).map_err(OciError::io("creating", dir))?;
    let mut total = ApplyReport::default();
    let mut opts = *opts;
    for layer in &image.layers {
        let r = apply_stored_layer(store, layer, dir, &opts)?;
        // The bounds hold for the image as a whole.
        opts.limits = opts.limits.after(&r);
        total.files += r.files;
        total.bytes += r.bytes;
        total.dirs += r.dirs;
        total.symlinks += r.symlinks;
        total.hardlinks += r.hardlinks;
        total.nodes += r.nodes;
        total.devices_skipped += r.devices_skipped;
        total.whiteouts += r.whiteouts;
        total.xattrs_skipped += r.xattrs_skipped;
    }
    Ok(total)
}
