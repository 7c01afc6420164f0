//! Fixtures of the image tests: the busybox image (built by fixtures/oci with umoci and
//! skopeo), and a real registry (Debian's docker-registry) on 127.0.0.1.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::process::Command;

use boxlet_cas::Digest;

pub use boxlet_testkit::registry::Registry;

/// The busybox fixture: `layout/` (OCI layout, tag latest) and `docker-archive.tar`.
pub fn busybox_fixture() -> PathBuf {
    boxlet_testkit::busybox_image()
}

/// A store in a temporary directory.
pub fn store() -> (tempfile::TempDir, boxlet_cas::Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = boxlet_cas::Store::open(dir.path().join("home")).unwrap();
    (dir, store)
}

/// Every path under `root`: type, mode, owner, and content digest and link count (files),
/// target (symlinks) or device number (nodes).
pub fn tree(root: &Path) -> std::collections::BTreeMap<String, String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<String, String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let rel = p.strip_prefix(root).unwrap().display().to_string();
            let ft = m.file_type();
            let owner = format!("{}:{} {:o}", m.uid(), m.gid(), m.mode() & 0o7777);
            let what = if ft.is_symlink() {
                format!(
                    "link {} {}:{}",
                    std::fs::read_link(&p).unwrap().display(),
                    m.uid(),
                    m.gid()
                )
            } else if ft.is_dir() {
                walk(root, &p, out);
                format!("dir {owner}")
            } else if ft.is_file() {
                let data = std::fs::read(&p).unwrap();
                let digest = boxlet_cas::Digest::of(boxlet_cas::Algorithm::Blake3, &data);
                format!("file {owner} {} links {digest}", m.nlink())
            } else {
                let kind = if ft.is_char_device() {
                    "char"
                } else if ft.is_block_device() {
                    "block"
                } else {
                    "fifo"
                };
                format!("{kind} {owner} {:x}", m.rdev())
            };
            out.insert(rel, what);
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Copy a layout so a test may change it.
pub fn copy_layout(src: &Path, dst: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(src)
        .arg(dst)
        .status()
        .unwrap();
    assert!(st.success());
}

/// A copy of a one-image layout turned multi-platform.
pub struct MultiLayout {
    /// The original (amd64) manifest.
    pub amd64: Digest,
    /// The nested index (arm64 first, then amd64).
    pub nested: Digest,
    /// Its document.
    pub nested_doc: serde_json::Value,
}

/// Copy `src` to `dst` and make its image multi-platform: `index.json` names (as
/// `example.com/multi:1`) an index of an arm64 variant (the same layers, a config that
/// says arm64) and the original amd64 manifest.
pub fn multi_platform_layout(src: &Path, dst: &Path) -> MultiLayout {
    use boxlet_cas::Algorithm;
    use std::fs;
    copy_layout(src, dst);
    let blob = |d: &str| {
        dst.join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let write_blob = |v: &serde_json::Value| -> (Digest, usize) {
        let bytes = serde_json::to_vec(v).unwrap();
        let d = Digest::of(Algorithm::Sha256, &bytes);
        fs::write(dst.join("blobs/sha256").join(d.hex()), &bytes).unwrap();
        (d, bytes.len())
    };
    let read = |p: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&fs::read(p).unwrap()).unwrap()
    };
    let index = read(dst.join("index.json"));
    let amd64 = index["manifests"][0].clone();
    let manifest = read(blob(amd64["digest"].as_str().unwrap()));
    let mut config = read(blob(manifest["config"]["digest"].as_str().unwrap()));
    config["architecture"] = "arm64".into();
    let (cd, cs) = write_blob(&config);
    let mut arm_manifest = manifest.clone();
    arm_manifest["config"]["digest"] = cd.to_string().into();
    arm_manifest["config"]["size"] = cs.into();
    let (md, ms) = write_blob(&arm_manifest);
    let nested_doc = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md.to_string(), "size": ms,
             "platform": {"os": "linux", "architecture": "arm64"}},
            {"mediaType": amd64["mediaType"], "digest": amd64["digest"], "size": amd64["size"],
             "platform": {"os": "linux", "architecture": "amd64"}},
        ]
    });
    let (nd, ns) = write_blob(&nested_doc);
    let top = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json", "digest": nd.to_string(), "size": ns,
                       "annotations": {"io.containerd.image.name": "example.com/multi:1",
                                       "org.opencontainers.image.ref.name": "1"}}]
    });
    fs::write(dst.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    MultiLayout {
        amd64: amd64["digest"].as_str().unwrap().parse().unwrap(),
        nested: nd,
        nested_doc,
    }
}
