//! Images in the store: recording one once its blobs are in, and reading one back.

use boxlet_cas::{unix_now, Digest, ImageRecord, Store};
use oci_spec::image::{ImageConfiguration, ImageManifest};

use crate::error::{OciError, Result};
use crate::manifest::{
    config_platform, manifest_blobs, parse_config, parse_document, Document, MAX_CONFIG,
    MAX_MANIFEST,
};

/// An image read back from the store, its documents verified.
#[derive(Debug)]
pub struct StoredImage {
    /// The record.
    pub record: ImageRecord,
    /// Its manifest.
    pub manifest: ImageManifest,
    /// Its configuration.
    pub config: ImageConfiguration,
    /// Layers: digest, size, media type, and the diff ID (digest of the uncompressed tar).
    pub layers: Vec<Layer>,
}

/// One layer of a stored image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    /// The blob.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Its media type.
    pub media_type: String,
    /// The digest of its uncompressed tar, from the config.
    pub diff_id: Digest,
}

/// Check that the manifest's config and layers are consistent, record the image, and
/// return its record. Every blob must be in the store (held by the caller's lease until
/// this returns).
pub(crate) fn record_image(
    store: &Store,
    reference: &str,
    index: Option<Digest>,
    manifest_digest: Digest,
) -> Result<ImageRecord> {
    let stored = load(store, reference, index, manifest_digest)?;
    store.put_image(&stored.record)?;
    Ok(stored.record)
}

/// Read an image's manifest and config from the store and check them against each other.
fn load(
    store: &Store,
    reference: &str,
    index: Option<Digest>,
    manifest_digest: Digest,
) -> Result<StoredImage> {
    let what = manifest_digest.to_string();
    let bytes = store.read_blob(&manifest_digest, MAX_MANIFEST)?;
    let manifest = match parse_document(&bytes, &what)? {
        Document::Manifest(m) => *m,
        Document::Index(_) => {
            return Err(OciError::malformed(
                &what,
                "an index where an image manifest belongs",
            ))
        }
    };
    let (config_digest, layer_descs) = manifest_blobs(&manifest, &what)?;
    let config_bytes = store.read_blob(&config_digest, MAX_CONFIG)?;
    let config = parse_config(&config_bytes, &config_digest.to_string())?;
    let diff_ids = config.rootfs().diff_ids();
    if diff_ids.len() != layer_descs.len() {
        return Err(OciError::malformed(
            &what,
            format!(
                "{} layers, but its config {config_digest} lists {} diff IDs",
                layer_descs.len(),
                diff_ids.len()
            ),
        ));
    }
    let mut layers = Vec::with_capacity(layer_descs.len());
    for (desc, diff_id) in layer_descs.into_iter().zip(diff_ids) {
        let diff_id: Digest = diff_id
            .parse()
            .map_err(|e| OciError::malformed(config_digest, e))?;
        layers.push(Layer {
            digest: desc.digest,
            size: desc.size,
            media_type: desc.media_type,
            diff_id,
        });
    }
    let record = ImageRecord {
        reference: reference.to_string(),
        index,
        manifest: manifest_digest,
        config: config_digest,
        layers: layers.iter().map(|l| l.digest).collect(),
        platform: config_platform(&config),
        created_at: unix_now(),
    };
    Ok(StoredImage {
        record,
        manifest,
        config,
        layers,
    })
}

impl StoredImage {
    /// The image recorded under `reference` (normalized first), its documents verified.
    pub fn open(store: &Store, reference: &str) -> Result<StoredImage> {
        let normalized = crate::manifest::normalize_reference(reference)
            .unwrap_or_else(|_| reference.to_string());
        let record = match store.image(&normalized)? {
            Some(r) => r,
            None => store
                .image(reference)?
                .ok_or_else(|| OciError::NoImage(reference.to_string()))?,
        };
        let mut image = load(store, &record.reference, record.index, record.manifest)?;
        image.record = record;
        Ok(image)
    }
}
