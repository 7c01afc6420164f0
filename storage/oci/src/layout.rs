//! Import of an OCI image layout directory (`oci-layout`, `index.json`, `blobs/`).

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use boxlet_cas::{Digest, Expected, ImageRecord, Lease, Store};
use oci_spec::image::{Descriptor, ImageIndex};

use crate::error::{OciError, Result};
use crate::image::record_image;
use crate::manifest::{
    choose_platform, digest_of, manifest_blobs, normalize_reference, parse_document, Document,
    MAX_MANIFEST,
};

/// Annotation naming an image in a layout (often only its tag).
const REF_NAME: &str = "org.opencontainers.image.ref.name";
/// containerd's annotation with the full name.
const CONTAINERD_NAME: &str = "io.containerd.image.name";

/// Import the image of the OCI layout at `dir` under `name` (a full reference), or under
/// the name its index annotates. With several images in the layout, `name` (or its tag)
/// picks one.
pub fn import_layout(store: &Store, dir: &Path, name: Option<&str>) -> Result<ImageRecord> {
    let layout = read_small(&dir.join("oci-layout"), 4096)?;
    let version: serde_json::Value = serde_json::from_slice(&layout)
        .map_err(|e| OciError::malformed(dir.join("oci-layout").display(), e))?;
    if version["imageLayoutVersion"] != "1.0.0" {
        return Err(OciError::Unsupported {
            what: dir.join("oci-layout").display().to_string(),
            reason: format!("image layout version {}", version["imageLayoutVersion"]),
        });
    }
    let index_path = dir.join("index.json");
    let index: ImageIndex = match parse_document(
        &read_small(&index_path, MAX_MANIFEST)?,
        &index_path.display().to_string(),
    )? {
        Document::Index(i) => *i,
        Document::Manifest(_) => {
            return Err(OciError::malformed(
                index_path.display(),
                "not an image index",
            ))
        }
    };
    let desc = pick(&index, name, dir)?;
    let reference = match name {
        Some(n) => normalize_reference(n)?,
        None => annotated_name(desc).ok_or_else(|| OciError::Reference {
            input: dir.display().to_string(),
            reason: "the layout does not name its image: give a name".into(),
        })?,
    };

    let lease = store.lease();
    let what = format!("{} in {}", desc.digest(), dir.display());
    let top = ingest_blob(store, dir, desc, &lease)?;
    let (index_digest, manifest_digest) =
        match parse_document(&store.read_blob(&top, MAX_MANIFEST)?, &what)? {
            Document::Manifest(_) => (None, top),
            Document::Index(nested) => {
                let chosen = choose_platform(&nested, &reference)?.clone();
                (Some(top), ingest_blob(store, dir, &chosen, &lease)?)
            }
        };
    let manifest = match parse_document(&store.read_blob(&manifest_digest, MAX_MANIFEST)?, &what)? {
        Document::Manifest(m) => m,
        Document::Index(_) => {
            return Err(OciError::malformed(
                &what,
                "an index inside an index's platform entry",
            ))
        }
    };
    ingest_blob(store, dir, manifest.config(), &lease)?;
    for layer in manifest.layers() {
        ingest_blob(store, dir, layer, &lease)?;
    }
    manifest_blobs(&manifest, &what)?;
    record_image(store, &reference, index_digest, manifest_digest)
}

/// The index entry to import.
fn pick<'a>(index: &'a ImageIndex, name: Option<&str>, dir: &Path) -> Result<&'a Descriptor> {
    let entries = index.manifests();
    if entries.len() == 1 {
        return Ok(&entries[0]);
    }
    if let Some(name) = name {
        let full = normalize_reference(name).unwrap_or_default();
        let tag = full.rsplit_once(':').map(|(_, t)| t).unwrap_or_default();
        let found = entries.iter().find(|d| {
            let ann = d.annotations().as_ref();
            let named = |k: &str| ann.and_then(|a| a.get(k)).map(String::as_str);
            named(CONTAINERD_NAME) == Some(full.as_str())
                || named(REF_NAME).is_some_and(|r| r == name || r == tag)
        });
        if let Some(d) = found {
            return Ok(d);
        }
    }
    if let Ok(d) = choose_platform(index, &dir.display().to_string()) {
        if entries
            .iter()
            .filter(|e| crate::manifest::platform_of(e) == "linux/amd64")
            .count()
            == 1
        {
            return Ok(d);
        }
    }
    let names: Vec<String> = entries.iter().filter_map(annotated_name).collect();
    Err(OciError::Reference {
        input: dir.display().to_string(),
        reason: format!(
            "the layout holds {} images; name one (it names: {})",
            entries.len(),
            names.join(", ")
        ),
    })
}

fn annotated_name(desc: &Descriptor) -> Option<String> {
    let ann = desc.annotations().as_ref()?;
    if let Some(full) = ann.get(CONTAINERD_NAME) {
        return normalize_reference(full).ok();
    }
    // A bare tag is not a name; a full reference is.
    ann.get(REF_NAME)
        .filter(|r| r.contains('/') || r.contains(':'))
        .and_then(|r| normalize_reference(r).ok())
}

/// Ingest the blob `desc` names from the layout, verified against its digest and size.
/// A symlink in the layout is refused: a layout must not smuggle host files in.
fn ingest_blob(store: &Store, dir: &Path, desc: &Descriptor, lease: &Lease) -> Result<Digest> {
    let what = format!("{} in {}", desc.digest(), dir.display());
    let digest = digest_of(desc, &what)?;
    let expected = Expected::new(digest, desc.size());
    if store.lease_stored(expected, lease)?.is_some() {
        return Ok(digest);
    }
    let path = dir
        .join("blobs")
        .join(digest.algorithm().name())
        .join(digest.hex());
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(&path)
        .map_err(OciError::io("opening blob", &path))?;
    if !file
        .metadata()
        .map_err(OciError::io("opening blob", &path))?
        .is_file()
    {
        return Err(OciError::malformed(path.display(), "not a regular file"));
    }
    store.ingest(&mut file, digest.algorithm(), Some(expected), lease)?;
    Ok(digest)
}

/// Read a small file whole, refusing one over `limit` bytes.
pub(crate) fn read_small(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let mut data = Vec::new();
    File::open(path)
        .and_then(|f| f.take(limit + 1).read_to_end(&mut data))
        .map_err(OciError::io("reading", path))?;
    if data.len() as u64 > limit {
        return Err(OciError::malformed(
            path.display(),
            format!("larger than {limit} bytes"),
        ));
    }
    Ok(data)
}
