//! Import of a `docker save` archive (docker-archive): a tar with `manifest.json`
//! naming each image's config and layer files.
//!
//! The archive is read twice: once to find `manifest.json` and where each file's bytes
//! are, then each layer is streamed into the store straight from its offset. Docker
//! archives carry no OCI manifest, so boxlet writes one (config and layer descriptors,
//! media types from the layers' first bytes) and stores it like any other blob.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use boxlet_cas::{Algorithm, Digest, Expected, ImageRecord, Store};
use serde::Deserialize;

use crate::error::{OciError, Result};
use crate::image::record_image;
use crate::manifest::{normalize_reference, Compression, MAX_CONFIG, MAX_MANIFEST, OCI_MANIFEST};

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveEntry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Where a file's bytes are in the archive.
#[derive(Clone, Copy)]
struct Span {
    offset: u64,
    size: u64,
}

/// Import the image of the docker archive at `path` under `name`, or under its only
/// repo tag. With several images in the archive, `name` picks one by its tag.
pub fn import_archive(store: &Store, path: &Path, name: Option<&str>) -> Result<ImageRecord> {
    let shown = path.display().to_string();
    let mut file = File::open(path).map_err(OciError::io("opening", path))?;
    let mut magic = [0u8; 4];
    let n = file
        .read(&mut magic)
        .map_err(OciError::io("reading", path))?;
    if Compression::detect("", &magic[..n]) != Compression::None {
        return Err(OciError::Unsupported {
            what: shown,
            reason: "a compressed archive: decompress it first (docker save writes plain tar)"
                .into(),
        });
    }
    file.rewind().map_err(OciError::io("reading", path))?;

    let spans = index_archive(&mut file, &shown)?;
    let manifest_span = *spans
        .get("manifest.json")
        .ok_or_else(|| OciError::malformed(&shown, "no manifest.json: not a docker archive"))?;
    let manifest_bytes = read_span(
        &mut file,
        manifest_span,
        MAX_MANIFEST,
        &shown,
        "manifest.json",
    )?;
    let entries: Vec<ArchiveEntry> = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| OciError::malformed(format!("{shown}: manifest.json"), e))?;
    let wanted = name.map(normalize_reference).transpose()?;
    let tags_of = |e: &ArchiveEntry| -> Vec<String> {
        e.repo_tags
            .iter()
            .flatten()
            .filter_map(|t| normalize_reference(t).ok())
            .collect()
    };
    let entry = match (&wanted, entries.len()) {
        (_, 0) => return Err(OciError::malformed(&shown, "manifest.json lists no image")),
        (None, 1) => &entries[0],
        (Some(w), _) => entries
            .iter()
            .find(|e| tags_of(e).contains(w))
            .or(if entries.len() == 1 {
                entries.first()
            } else {
                None
            })
            .ok_or_else(|| OciError::Reference {
                input: shown.clone(),
                reason: format!("the archive has no image tagged {w}"),
            })?,
        (None, n) => {
            return Err(OciError::Reference {
                input: shown,
                reason: format!("the archive holds {n} images; name one by its tag"),
            })
        }
    };
    let reference = match wanted {
        Some(w) => w,
        None => tags_of(entry)
            .into_iter()
            .next()
            .ok_or_else(|| OciError::Reference {
                input: shown.clone(),
                reason: "the image has no repo tag: give a name".into(),
            })?,
    };

    let lease = store.lease();
    let span_of = |member: &str| {
        spans
            .get(member.trim_start_matches("./"))
            .copied()
            .ok_or_else(|| {
                OciError::malformed(
                    &shown,
                    format!("manifest.json names {member:?}, which the archive lacks"),
                )
            })
    };
    let config_span = span_of(&entry.config)?;
    let config_bytes = read_span(&mut file, config_span, MAX_CONFIG, &shown, &entry.config)?;
    let config = store.ingest_bytes(&config_bytes, Algorithm::Sha256, None, &lease)?;

    let mut layers = Vec::new();
    for member in &entry.layers {
        let span = span_of(member)?;
        let mut head = [0u8; 4];
        file.seek(SeekFrom::Start(span.offset))
            .map_err(OciError::io("reading", path))?;
        let n = file
            .read(&mut head)
            .map_err(OciError::io("reading", path))?;
        let compression = Compression::detect("", &head[..n.min(span.size as usize)]);
        file.seek(SeekFrom::Start(span.offset))
            .map_err(OciError::io("reading", path))?;
        // Newer archives name layers by digest (blobs/sha256/<hex>): verify against it.
        let expected = member
            .strip_prefix("blobs/sha256/")
            .and_then(|hex| format!("sha256:{hex}").parse::<Digest>().ok())
            .map(|d| Expected::new(d, span.size));
        let info = store.ingest(
            &mut (&mut file).take(span.size),
            Algorithm::Sha256,
            expected,
            &lease,
        )?;
        if info.size != span.size {
            return Err(OciError::malformed(
                &shown,
                format!("{member} is cut short"),
            ));
        }
        layers.push(serde_json::json!({
            "mediaType": compression.media_type(),
            "digest": info.digest.to_string(),
            "size": info.size,
        }));
    }
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config.digest.to_string(),
            "size": config.size,
        },
        "layers": layers,
    });
    let manifest_bytes =
        serde_json::to_vec(&manifest).map_err(|e| OciError::malformed(&shown, e))?;
    let manifest = store.ingest_bytes(&manifest_bytes, Algorithm::Sha256, None, &lease)?;
    record_image(store, &reference, None, manifest.digest)
}

/// Every regular file of the archive: path -> where its bytes are.
fn index_archive(file: &mut File, shown: &str) -> Result<HashMap<String, Span>> {
    let mut spans = HashMap::new();
    let mut archive = tar::Archive::new(&mut *file);
    let entries = archive
        .entries()
        .map_err(|e| OciError::malformed(shown, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| OciError::malformed(shown, e))?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes())
            .trim_start_matches("./")
            .to_string();
        spans.insert(
            name,
            Span {
                offset: entry.raw_file_position(),
                size: entry.size(),
            },
        );
    }
    Ok(spans)
}

fn read_span(
    file: &mut File,
    span: Span,
    limit: u64,
    shown: &str,
    member: &str,
) -> Result<Vec<u8>> {
    if span.size > limit {
        return Err(OciError::malformed(
            format!("{shown}: {member}"),
            format!("{} bytes, more than the {limit} allowed", span.size),
        ));
    }
    let mut data = vec![0u8; span.size as usize];
    file.seek(SeekFrom::Start(span.offset))
        .and_then(|_| file.read_exact(&mut data))
        .map_err(|e| OciError::malformed(format!("{shown}: {member}"), e))?;
    Ok(data)
}
