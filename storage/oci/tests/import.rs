//! Import of OCI layouts and docker archives, and unpacking what was imported.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use boxlet_cas::{Algorithm, Digest};
use boxlet_oci::{import_archive, import_layout, unpack, ApplyOptions, OciError, StoredImage};
use common::{busybox_fixture, copy_layout, multi_platform_layout, store, tree};

#[test]
fn an_oci_layout_imports_verifies_and_unpacks() {
    let fixture = busybox_fixture();
    let (dir, store) = store();
    let record = import_layout(&store, &fixture.join("layout"), Some("boxlet/busybox:1")).unwrap();
    assert_eq!(record.reference, "docker.io/boxlet/busybox:1");
    assert_eq!(record.layers.len(), 2);
    assert_eq!(record.platform, "linux/amd64");
    assert!(store.verify().unwrap().problems.is_empty());

    let image = StoredImage::open(&store, "boxlet/busybox:1").unwrap();
    assert_eq!(image.record, record);
    assert_eq!(
        image
            .config
            .config()
            .as_ref()
            .unwrap()
            .cmd()
            .as_ref()
            .unwrap(),
        &["/bin/sh"]
    );

    let root = dir.path().join("rootfs");
    let report = unpack(&store, "boxlet/busybox:1", &root, &ApplyOptions::default()).unwrap();
    assert!(report.files >= 3 && report.symlinks > 100, "{report:?}");
    assert_eq!(report.whiteouts, 1);
    assert_eq!(
        fs::read_link(root.join("bin/sh")).unwrap(),
        Path::new("busybox")
    );
    assert!(
        !root.join("etc/motd").exists(),
        "the second layer's whiteout removed it"
    );
    assert_eq!(fs::read(root.join("etc/hostname")).unwrap(), b"boxlet\n");
    assert_eq!(
        fs::metadata(root.join("tmp")).unwrap().permissions().mode() & 0o7777,
        0o1777
    );

    // Importing again stores nothing new.
    let blobs = store.list_blobs().unwrap().len();
    let again = import_layout(&store, &fixture.join("layout"), Some("boxlet/busybox:1")).unwrap();
    assert_eq!(again.manifest, record.manifest);
    assert_eq!(store.list_blobs().unwrap().len(), blobs);
}

#[test]
fn a_docker_archive_imports_to_the_same_tree() {
    let fixture = busybox_fixture();
    let (dir, store) = store();
    let from_layout = import_layout(&store, &fixture.join("layout"), Some("from-layout")).unwrap();
    let from_archive = import_archive(&store, &fixture.join("docker-archive.tar"), None).unwrap();
    assert_eq!(
        from_archive.reference, "docker.io/boxlet/busybox:latest",
        "named by its repo tag"
    );
    assert_eq!(from_archive.layers.len(), 2);
    let a = StoredImage::open(&store, &from_layout.reference).unwrap();
    let b = StoredImage::open(&store, &from_archive.reference).unwrap();
    let diff_ids = |i: &StoredImage| i.layers.iter().map(|l| l.diff_id).collect::<Vec<_>>();
    assert_eq!(
        diff_ids(&a),
        diff_ids(&b),
        "the same layers, however compressed"
    );
    unpack(
        &store,
        &from_layout.reference,
        &dir.path().join("a"),
        &ApplyOptions::default(),
    )
    .unwrap();
    unpack(
        &store,
        &from_archive.reference,
        &dir.path().join("b"),
        &ApplyOptions::default(),
    )
    .unwrap();
    assert_eq!(tree(&dir.path().join("a")), tree(&dir.path().join("b")));
    assert!(store.verify().unwrap().problems.is_empty());

    // A name given renames the archive's only image.
    let renamed = import_archive(
        &store,
        &fixture.join("docker-archive.tar"),
        Some("other:tag"),
    )
    .unwrap();
    assert_eq!(renamed.reference, "docker.io/library/other:tag");
    assert_eq!(
        renamed.manifest, from_archive.manifest,
        "the written manifest is deterministic"
    );
}

#[test]
fn a_damaged_layout_is_refused_naming_what_is_wrong_and_keeps_the_store_intact() {
    let fixture = busybox_fixture();
    let (dir, store) = store();
    let good = import_layout(&store, &fixture.join("layout"), Some("good")).unwrap();
    let stored_before = store.list_blobs().unwrap();

    let layer_hex = |layout: &Path| -> String {
        let image = StoredImage::open(&store, "good").unwrap();
        let _ = layout;
        image.layers[1].digest.hex()
    };

    // A tampered layer.
    let tampered = dir.path().join("tampered");
    copy_layout(&fixture.join("layout"), &tampered);
    let blob = tampered.join("blobs/sha256").join(layer_hex(&tampered));
    let mut bytes = fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    fs::set_permissions(&blob, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(&blob, &bytes).unwrap();
    let (_d2, fresh) = store_fresh();
    let err = import_layout(&fresh, &tampered, Some("t")).unwrap_err();
    assert!(
        matches!(
            err,
            OciError::Store(boxlet_cas::CasError::DigestMismatch { .. })
        ),
        "{err}"
    );
    assert!(fresh.image("docker.io/library/t:latest").unwrap().is_none());

    // A blob that is a symlink to a host file.
    let linked = dir.path().join("linked");
    copy_layout(&fixture.join("layout"), &linked);
    let blob = linked.join("blobs/sha256").join(layer_hex(&linked));
    fs::remove_file(&blob).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", &blob).unwrap();
    let (_d3, fresh) = store_fresh();
    let err = import_layout(&fresh, &linked, Some("l"))
        .unwrap_err()
        .to_string();
    assert!(err.contains(&layer_hex(&linked)), "{err}");

    // A missing blob, a wrong layout version, a garbage index.
    let missing = dir.path().join("missing");
    copy_layout(&fixture.join("layout"), &missing);
    fs::remove_file(missing.join("blobs/sha256").join(layer_hex(&missing))).unwrap();
    let (_d4, fresh) = store_fresh();
    let err = import_layout(&fresh, &missing, Some("m"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("opening blob") && err.contains(&layer_hex(&missing)),
        "{err}"
    );

    let versioned = dir.path().join("versioned");
    copy_layout(&fixture.join("layout"), &versioned);
    fs::write(
        versioned.join("oci-layout"),
        br#"{"imageLayoutVersion":"9.9.9"}"#,
    )
    .unwrap();
    let err = import_layout(&store, &versioned, Some("v"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("9.9.9") && err.contains("oci-layout"), "{err}");

    let garbage = dir.path().join("garbage");
    copy_layout(&fixture.join("layout"), &garbage);
    fs::write(garbage.join("index.json"), b"{\"manifests\": 12").unwrap();
    let err = import_layout(&store, &garbage, Some("g"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("index.json"), "{err}");

    // Unnamed: the fixture's index names only a tag.
    let err = import_layout(&store, &fixture.join("layout"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("give a name"), "{err}");

    // Nothing the store held was lost or changed.
    let after = store.list_blobs().unwrap();
    for b in &stored_before {
        assert!(after.iter().any(|a| a.digest == b.digest));
    }
    assert_eq!(store.image(&good.reference).unwrap(), Some(good));
    assert!(store.verify().unwrap().problems.is_empty());
}

fn store_fresh() -> (tempfile::TempDir, boxlet_cas::Store) {
    store()
}

#[test]
fn a_multi_platform_index_resolves_to_linux_amd64() {
    let fixture = busybox_fixture();
    let (dir, store) = store();
    let layout = dir.path().join("multi");
    let multi = multi_platform_layout(&fixture.join("layout"), &layout);
    let (amd64_digest, nd, nested) = (multi.amd64, multi.nested.to_string(), multi.nested_doc);
    let write_blob = |bytes: &[u8]| -> (String, usize) {
        let d = Digest::of(Algorithm::Sha256, bytes);
        fs::write(layout.join("blobs/sha256").join(d.hex()), bytes).unwrap();
        (d.to_string(), bytes.len())
    };
    let record = import_layout(&store, &layout, None).unwrap();
    assert_eq!(record.reference, "example.com/multi:1");
    assert_eq!(record.manifest, amd64_digest);
    assert_eq!(record.index.unwrap().to_string(), nd);
    assert_eq!(record.platform, "linux/amd64");

    // Without an amd64 entry, the error lists what there is.
    let arm_only = serde_json::json!({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [nested["manifests"][0].clone()]});
    let (ad, asz) = write_blob(&serde_json::to_vec(&arm_only).unwrap());
    let top = serde_json::json!({"schemaVersion": 2, "manifests": [{"mediaType": "application/vnd.oci.image.index.v1+json", "digest": ad, "size": asz}]});
    fs::write(layout.join("index.json"), serde_json::to_vec(&top).unwrap()).unwrap();
    let err = import_layout(&store, &layout, Some("arm")).unwrap_err();
    assert!(
        matches!(&err, OciError::NoPlatform { available, .. } if available == "linux/arm64"),
        "{err}"
    );
}

#[test]
fn a_layer_that_does_not_match_its_diff_id_is_an_error() {
    let fixture = busybox_fixture();
    let (dir, store) = store();
    let layout = dir.path().join("lying");
    copy_layout(&fixture.join("layout"), &layout);
    // Rewrite the config's last diff ID, and the manifest and index that name it.
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&fs::read(&index_path).unwrap()).unwrap();
    let blob = |d: &str| {
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let mut manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(blob(index["manifests"][0]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let mut config: serde_json::Value = serde_json::from_slice(
        &fs::read(blob(manifest["config"]["digest"].as_str().unwrap())).unwrap(),
    )
    .unwrap();
    let liar = Digest::of(Algorithm::Sha256, b"not the layer");
    config["rootfs"]["diff_ids"][1] = liar.to_string().into();
    let put = |v: &serde_json::Value| {
        let bytes = serde_json::to_vec(v).unwrap();
        let d = Digest::of(Algorithm::Sha256, &bytes);
        fs::write(blob(&d.to_string()), &bytes).unwrap();
        (d.to_string(), bytes.len())
    };
    let (cd, cs) = put(&config);
    manifest["config"]["digest"] = cd.into();
    manifest["config"]["size"] = cs.into();
    let (md, ms) = put(&manifest);
    index["manifests"][0]["digest"] = md.into();
    index["manifests"][0]["size"] = ms.into();
    fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();

    import_layout(&store, &layout, Some("liar")).unwrap();
    let err = unpack(
        &store,
        "liar",
        &dir.path().join("root"),
        &ApplyOptions::default(),
    )
    .unwrap_err();
    assert!(
        matches!(&err, OciError::DiffId { expected, .. } if *expected == liar),
        "{err}"
    );
}
