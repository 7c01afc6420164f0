//! Manifests, indexes and configs (OCI and Docker schema 2), parsed with `oci-spec`, and
//! the checks boxlet makes before trusting a descriptor.

use std::io::{self, Read};

use boxlet_cas::Digest;
use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};
use serde::Deserialize;

use crate::error::{OciError, Result};

/// The largest manifest or index boxlet reads (containerd's limit too).
pub const MAX_MANIFEST: u64 = 4 << 20;
/// The largest image configuration boxlet reads.
pub const MAX_CONFIG: u64 = 16 << 20;

/// The most layers an image may have (Docker refuses more than 127; overlayfs's options
/// hold about as many lower directories).
pub const MAX_LAYERS: usize = 128;
/// The most bytes an image's blobs may declare together (the ext4 builder's limit on
/// file contents too).
pub const MAX_IMAGE_BYTES: u64 = 64 << 30;

/// Refuse a manifest whose blobs no image needs and a host could not hold: more than
/// [`MAX_LAYERS`] layers, a config past [`MAX_CONFIG`], more than [`MAX_IMAGE_BYTES`]
/// declared in all. Checked before anything is fetched.
pub fn check_bounds(manifest: &ImageManifest, what: &str) -> Result<()> {
    let too_large = |reason: String| OciError::TooLarge {
        what: what.to_string(),
        reason,
    };
    let layers = manifest.layers();
    if layers.len() > MAX_LAYERS {
        return Err(too_large(format!(
            "{} layers (at most {MAX_LAYERS})",
            layers.len()
        )));
    }
    let config = manifest.config().size();
    if config > MAX_CONFIG {
        return Err(too_large(format!(
            "a config of {config} bytes (at most {MAX_CONFIG})"
        )));
    }
    let total = layers
        .iter()
        .try_fold(config, |sum, l| sum.checked_add(l.size()))
        .filter(|&t| t <= MAX_IMAGE_BYTES);
    if total.is_none() {
        return Err(too_large(format!(
            "its blobs declare more than {MAX_IMAGE_BYTES} bytes"
        )));
    }
    Ok(())
}

/// Media types of manifests and indexes, OCI and Docker.
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
/// OCI image index.
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Docker schema 2 manifest.
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Docker manifest list.
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
/// Every manifest type boxlet accepts from a registry.
pub const ACCEPTED: [&str; 4] = [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST];

/// A manifest document: an index of per-platform manifests, or one image's manifest.
#[derive(Debug)]
pub enum Document {
    /// A multi-platform index (or Docker manifest list).
    Index(Box<ImageIndex>),
    /// One image.
    Manifest(Box<ImageManifest>),
}

#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    manifests: Option<serde_json::Value>,
    layers: Option<serde_json::Value>,
}

/// Parse a manifest or index; `what` names it in errors.
pub fn parse_document(bytes: &[u8], what: &str) -> Result<Document> {
    let probe: Probe = serde_json::from_slice(bytes).map_err(|e| OciError::malformed(what, e))?;
    let is_index = match probe.media_type.as_deref() {
        Some(OCI_INDEX | DOCKER_LIST) => true,
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
        Some(other) if probe.manifests.is_none() && probe.layers.is_none() => {
            return Err(OciError::Unsupported {
                what: what.to_string(),
                reason: format!("media type {other}"),
            })
        }
        _ => probe.manifests.is_some(),
    };
    if is_index {
        let index: ImageIndex =
            serde_json::from_slice(bytes).map_err(|e| OciError::malformed(what, e))?;
        Ok(Document::Index(Box::new(index)))
    } else {
        let manifest: ImageManifest =
            serde_json::from_slice(bytes).map_err(|e| OciError::malformed(what, e))?;
        Ok(Document::Manifest(Box::new(manifest)))
    }
}

/// Parse an image configuration.
pub fn parse_config(bytes: &[u8], what: &str) -> Result<ImageConfiguration> {
    serde_json::from_slice(bytes).map_err(|e| OciError::malformed(what, e))
}

/// A descriptor's digest as the store names it (sha256 or blake3; OCI's sha512 is not
/// supported).
pub fn digest_of(desc: &Descriptor, what: &str) -> Result<Digest> {
    let text = desc.digest().to_string();
    text.parse().map_err(|e| OciError::Unsupported {
        what: what.to_string(),
        reason: format!("{e}"),
    })
}

/// The platform string of an index entry (`os/arch[/variant]`), or `unknown`.
pub fn platform_of(desc: &Descriptor) -> String {
    match desc.platform() {
        Some(p) => match p.variant() {
            Some(v) => format!("{}/{}/{v}", p.os(), p.architecture()),
            None => format!("{}/{}", p.os(), p.architecture()),
        },
        None => "unknown".to_string(),
    }
}

/// The index entry for linux/amd64 (the only platform boxlet's VMs run), skipping
/// attestation manifests.
pub fn choose_platform<'a>(index: &'a ImageIndex, reference: &str) -> Result<&'a Descriptor> {
    index
        .manifests()
        .iter()
        .find(|d| platform_of(d) == "linux/amd64")
        .ok_or_else(|| OciError::NoPlatform {
            reference: reference.to_string(),
            available: index
                .manifests()
                .iter()
                .map(platform_of)
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// A layer as a manifest describes it.
#[derive(Clone, Debug)]
pub struct LayerDesc {
    /// The blob.
    pub digest: Digest,
    /// Its size.
    pub size: u64,
    /// Its media type.
    pub media_type: String,
}

/// The config digest and layers of a manifest, checked.
pub fn manifest_blobs(manifest: &ImageManifest, what: &str) -> Result<(Digest, Vec<LayerDesc>)> {
    check_bounds(manifest, what)?;
    let config = digest_of(manifest.config(), what)?;
    let layers = manifest
        .layers()
        .iter()
        .map(|l| {
            Ok(LayerDesc {
                digest: digest_of(l, what)?,
                size: l.size(),
                media_type: l.media_type().to_string(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((config, layers))
}

/// The platform an image config declares (`os/arch[/variant]`).
pub fn config_platform(config: &ImageConfiguration) -> String {
    match config.variant() {
        Some(v) => format!("{}/{}/{v}", config.os(), config.architecture()),
        None => format!("{}/{}", config.os(), config.architecture()),
    }
}

/// How a layer blob is compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// A plain tar.
    None,
    /// gzip.
    Gzip,
    /// zstd.
    Zstd,
}

impl Compression {
    /// From a layer's media type, or else from its first bytes.
    pub fn detect(media_type: &str, head: &[u8]) -> Compression {
        if media_type.ends_with("+gzip") || media_type.ends_with(".gzip") {
            Compression::Gzip
        } else if media_type.ends_with("+zstd") || media_type.ends_with(".zstd") {
            Compression::Zstd
        } else if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else {
            Compression::None
        }
    }

    /// The OCI layer media type for this compression.
    pub fn media_type(self) -> &'static str {
        match self {
            Compression::None => "application/vnd.oci.image.layer.v1.tar",
            Compression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            Compression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        }
    }

    /// A reader of the uncompressed bytes.
    pub fn reader<'a>(self, src: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::None => Box::new(src),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(src)),
            Compression::Zstd => Box::new(
                ruzstd::decoding::StreamingDecoder::new(src)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?,
            ),
        })
    }
}

/// Normalize an image reference: `busybox` -> `docker.io/library/busybox:latest`.
pub fn normalize_reference(input: &str) -> Result<String> {
    let r: oci_client::Reference = input.parse().map_err(
        |e: oci_spec::distribution::ParseError| OciError::Reference {
            input: input.to_string(),
            reason: e.to_string(),
        },
    )?;
    Ok(r.whole())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_are_normalized() {
        assert_eq!(
            normalize_reference("busybox").unwrap(),
            "docker.io/library/busybox:latest"
        );
        assert_eq!(
            normalize_reference("127.0.0.1:5000/boxlet/minbase:1").unwrap(),
            "127.0.0.1:5000/boxlet/minbase:1"
        );
        let err = normalize_reference("Not A Ref!").unwrap_err().to_string();
        assert!(err.contains("Not A Ref!"), "{err}");
    }

    #[test]
    fn documents_are_told_apart_and_junk_is_refused() {
        let index = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}"#;
        assert!(matches!(
            parse_document(index, "x").unwrap(),
            Document::Index(_)
        ));
        let list = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(
            parse_document(list, "x").unwrap(),
            Document::Index(_)
        ));
        for junk in [
            &b"{"[..],
            b"[]",
            b"{\"mediaType\":\"text/plain\"}",
            b"{\"schemaVersion\":2,\"layers\":7}",
        ] {
            let err = parse_document(junk, "sha256:abc").unwrap_err().to_string();
            assert!(err.contains("sha256:abc"), "{err}");
        }
    }

    #[test]
    fn compression_from_media_type_or_magic() {
        assert_eq!(
            Compression::detect("application/vnd.oci.image.layer.v1.tar+gzip", b""),
            Compression::Gzip
        );
        assert_eq!(
            Compression::detect("application/vnd.docker.image.rootfs.diff.tar.gzip", b""),
            Compression::Gzip
        );
        assert_eq!(
            Compression::detect("application/vnd.oci.image.layer.v1.tar+zstd", b""),
            Compression::Zstd
        );
        assert_eq!(Compression::detect("", &[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(Compression::detect("", b"usr/\0\0"), Compression::None);
    }
}

#[cfg(test)]
mod bounds_tests {
    use super::*;

    fn manifest(layers: usize, layer_size: u64, config_size: u64) -> ImageManifest {
        let desc = |size: u64| {
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": format!("sha256:{}", "a".repeat(64)),
                "size": size,
            })
        };
        let json = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": format!("sha256:{}", "b".repeat(64)),
                "size": config_size,
            },
            "layers": (0..layers).map(|_| desc(layer_size)).collect::<Vec<_>>(),
        });
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn images_past_the_bounds_are_refused_naming_them() {
        check_bounds(&manifest(MAX_LAYERS, 1 << 20, 1000), "ok").unwrap();
        let e = check_bounds(&manifest(MAX_LAYERS + 1, 1, 1000), "img")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("img: refused") && e.contains("129 layers"),
            "{e}"
        );
        let e = check_bounds(&manifest(1, 1, MAX_CONFIG + 1), "img")
            .unwrap_err()
            .to_string();
        assert!(e.contains("config of"), "{e}");
        let e = check_bounds(&manifest(2, MAX_IMAGE_BYTES / 2 + 1, 1), "img")
            .unwrap_err()
            .to_string();
        assert!(e.contains("more than"), "{e}");
        // Sizes that overflow when summed.
        assert!(check_bounds(&manifest(3, u64::MAX / 2, 1), "img").is_err());
    }
}
