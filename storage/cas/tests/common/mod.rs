//! Helpers shared by the store's integration tests.
#![allow(dead_code)]

use boxlet_cas::{unix_now, Algorithm, BlobInfo, ImageRecord, Store};

/// A fresh store in a temporary directory.
pub fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    (dir, store)
}

/// Ingest `data` (sha256) with a throwaway lease.
pub fn put(store: &Store, data: &[u8]) -> BlobInfo {
    let lease = store.lease();
    store
        .ingest_bytes(data, Algorithm::Sha256, None, &lease)
        .unwrap()
}

/// Record image `reference` made of blobs holding `layers` (the config is `{}` plus the
/// reference, the manifest the reference itself).
pub fn image(store: &Store, reference: &str, layers: &[&[u8]]) -> ImageRecord {
    let record = ImageRecord {
        reference: reference.to_string(),
        index: None,
        manifest: put(store, format!("manifest of {reference}").as_bytes()).digest,
        config: put(store, format!("{{}} {reference}").as_bytes()).digest,
        layers: layers.iter().map(|l| put(store, l).digest).collect(),
        platform: "linux/amd64".into(),
        created_at: unix_now(),
    };
    store.put_image(&record).unwrap();
    record
}

/// The names of the entries of `dir`.
pub fn entries(dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}
