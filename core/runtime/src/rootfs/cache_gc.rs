//! Collection of the rootfs caches an image leaves behind once it is removed from the
//! store: its extracted tree (`images/<manifest hex>`, Extracted), its unpacked layers
//! (`layers/<diff id hex>`, OverlayMount; kept while another stored image uses them), its
//! ext4 image disk (`image-<hex>` in `bases/`, Disk stage 1) and its versioned bases
//! (Disk stage 2; kept while a box's overlay names them as its backing file).
//!
//! The caller owns the home alone while this runs: it holds the store open, and opening
//! the store takes its exclusive lock, so no runtime prepares a box meanwhile. A cache
//! directory is first renamed into `tmp/` and then deleted, so a crash never leaves a
//! partial tree where a strategy would take it for a whole one (the store sweeps `tmp/`
//! when it opens). A base's record goes before its file: a crash leaves a file no record
//! names, which the Disk strategy sweeps at its start.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use boxlet_cas::{BaseDiskKind, Store};
use boxlet_oci::StoredImage;

use crate::disk_store::DiskStore;
use crate::rootfs::manager::referenced_bases;
use crate::rootfs::{allocated_bytes, GuestRootfsManager, Home, RootfsError, GLOBAL_SOURCE};

/// What [`collect_caches`] removed, and what it kept because it could not decide.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheReport {
    /// Extracted trees (`images/<hex>`).
    pub trees: usize,
    /// Unpacked layers (`layers/<diff id>`).
    pub layers: usize,
    /// Image disks (`bases/image-<hex>…`).
    pub image_disks: usize,
    /// Versioned bases.
    pub bases: usize,
    /// Bytes freed (allocated blocks of what was removed).
    pub bytes: u64,
    /// Why something was kept that may be garbage (an image whose layers cannot be read
    /// keeps every layer; a box overlay that cannot be read keeps every base).
    pub kept: Vec<String>,
}

/// What the stored images still need.
struct Live {
    /// Manifest digests' hex.
    manifests: HashSet<String>,
    /// The image parts of their bases' version keys.
    prefixes: HashSet<String>,
    /// Layer diff IDs' hex; `None` when an image's layers could not be read.
    layers: Option<HashSet<String>>,
}

impl Live {
    /// Whether a base disk record of `kind` named `name` belongs to a stored image (names
    /// not of the forms the Disk strategy writes are kept).
    fn wants(&self, kind: BaseDiskKind, name: &str) -> bool {
        match kind {
            BaseDiskKind::Image => name
                .strip_prefix(IMAGE_DISK_PREFIX)
                .is_none_or(|hex| self.manifests.contains(hex)),
            // `<image part>-<agent part>` (see `GuestRootfsManager::version_key`).
            _ => name
                .rsplit_once('-')
                .is_none_or(|(image, _)| self.prefixes.contains(image)),
        }
    }
}

fn live(store: &Store, report: &mut CacheReport) -> Result<Live, RootfsError> {
    let mut manifests = HashSet::new();
    let mut prefixes = HashSet::new();
    let mut layers = Some(HashSet::new());
    for record in store.images()? {
        manifests.insert(record.manifest.hex());
        let digest = record.manifest.to_string();
        prefixes.insert(GuestRootfsManager::version_prefix(&digest).to_string());
        match StoredImage::open(store, &record.reference) {
            Ok(image) => {
                if let Some(l) = layers.as_mut() {
                    l.extend(image.layers.iter().map(|l| l.diff_id.hex()));
                }
            }
            Err(e) => {
                report.kept.push(format!(
                    "every unpacked layer: image {}: {e}",
                    record.reference
                ));
                layers = None;
            }
        }
    }
    Ok(Live {
        manifests,
        prefixes,
        layers,
    })
}

/// Remove the rootfs caches of images `store` no longer holds (see the module
/// documentation). `disks` is the base-disk index (the store itself, for the runtime).
pub fn collect_caches(
    home: &Home,
    store: &Store,
    disks: &dyn DiskStore,
) -> Result<CacheReport, RootfsError> {
    let mut report = CacheReport::default();
    let live = live(store, &mut report)?;
    let tmp = home.tmp();

    for (dir, name) in cache_dirs(&home.images())? {
        if !live.manifests.contains(&name) {
            report.bytes += discard_dir(&dir, &tmp)?;
            report.trees += 1;
        }
    }
    if let Some(layers) = &live.layers {
        for (dir, name) in cache_dirs(&home.layers())? {
            if !layers.contains(&name) {
                report.bytes += discard_dir(&dir, &tmp)?;
                report.layers += 1;
                // (What OverlayMount recorded of it.)
                let _ = std::fs::remove_file(dir.with_extension("usage"));
            }
        }
    }

    let Some(referenced) = referenced_bases(&home.boxes()) else {
        report
            .kept
            .push("every base disk: a box's overlay cannot be read".into());
        return Ok(report);
    };
    for kind in [BaseDiskKind::Image, BaseDiskKind::Rootfs] {
        for record in disks.list_by_source(GLOBAL_SOURCE, Some(kind))? {
            let Some(name) = record.name.as_deref() else {
                continue;
            };
            let wanted = live.wants(kind, name);
            let path = PathBuf::from(&record.disk_info.base_path);
            if wanted || referenced.contains(&path) {
                continue;
            }
            disks.delete(record.id)?;
            report.bytes += allocated_bytes(&path);
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(RootfsError::io("removing", &path)(e))
                }
                _ => {}
            }
            match kind {
                BaseDiskKind::Image => report.image_disks += 1,
                _ => report.bases += 1,
            }
        }
    }
    Ok(report)
}

/// The name prefix of an image disk's record (`image-<manifest hex>`).
pub(crate) const IMAGE_DISK_PREFIX: &str = "image-";

/// The entries of a cache directory named by a full digest in lowercase hex (anything
/// else is not ours to judge); none when the directory does not exist.
fn cache_dirs(dir: &Path) -> Result<Vec<(PathBuf, String)>, RootfsError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(RootfsError::io("listing", dir)(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(RootfsError::io("listing", dir))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        let hex = name.len() == 64
            && name
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if hex && entry.file_type().is_ok_and(|t| t.is_dir()) {
            out.push((entry.path(), name));
        }
    }
    Ok(out)
}

/// Move `dir` into `tmp` (one rename: it is gone whole or not at all), then delete it.
/// Returns the bytes it held.
fn discard_dir(dir: &Path, tmp: &Path) -> Result<u64, RootfsError> {
    let staged = tempfile::Builder::new()
        .prefix("gc-")
        .tempdir_in(tmp)
        .map_err(RootfsError::io("staging in", tmp))?
        .keep();
    let target = staged.join("entry");
    std::fs::rename(dir, &target).map_err(RootfsError::io("moving out of the cache", dir))?;
    let bytes = allocated_bytes(&target);
    std::fs::remove_dir_all(&staged).map_err(RootfsError::io("removing", &staged))?;
    Ok(bytes)
}

impl GuestRootfsManager {
    /// The record name of an image's ext4 disk (Disk stage 1).
    pub fn image_disk_name(manifest_hex: &str) -> String {
        format!("{IMAGE_DISK_PREFIX}{manifest_hex}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bases_are_matched_to_their_images_whatever_the_digest_algorithm() {
        let agent = "0123456789abcdef0123";
        let sha = format!("sha256:{}", "a1".repeat(32));
        let b3 = format!("blake3:{}", "b2".repeat(32));
        let gone = format!("sha256:{}", "c3".repeat(32));
        let live = Live {
            manifests: [&sha, &b3]
                .iter()
                .map(|d| d.split_once(':').unwrap().1.to_string())
                .collect(),
            prefixes: [&sha, &b3]
                .iter()
                .map(|d| GuestRootfsManager::version_prefix(d).to_string())
                .collect(),
            layers: None,
        };
        let key = |d: &str| GuestRootfsManager::version_key(d, agent);
        let image = |d: &str| GuestRootfsManager::image_disk_name(d.split_once(':').unwrap().1);
        for d in [&sha, &b3] {
            assert!(live.wants(BaseDiskKind::Rootfs, &key(d)), "{d}");
            assert!(live.wants(BaseDiskKind::Image, &image(d)), "{d}");
        }
        assert!(!live.wants(BaseDiskKind::Rootfs, &key(&gone)));
        assert!(!live.wants(BaseDiskKind::Image, &image(&gone)));
        // Names the Disk strategy does not write are not ours to remove.
        assert!(live.wants(BaseDiskKind::Rootfs, "custom"));
        assert!(live.wants(BaseDiskKind::Image, "custom"));
    }
}
