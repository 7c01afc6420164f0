//! GC and verify: what is kept, what is collected, what verify reports.

mod common;

use std::os::unix::fs::PermissionsExt;

use boxlet_cas::{unix_now, Algorithm, BoxId, BoxRecord, BoxState, Digest, Problem};
use common::{entries, image, put, store};

#[test]
fn gc_keeps_what_images_boxes_and_leases_name_and_removes_the_rest() {
    let (dir, store) = store();
    let img = image(&store, "a:1", &[b"image layer"]);
    let box_only = put(&store, b"a box's own blob").digest;
    store
        .put_box(&BoxRecord {
            id: BoxId::mint(),
            name: None,
            image: None,
            config: serde_json::Value::Null,
            state: BoxState::Running,
            blobs: vec![box_only],
            created_at: unix_now(),
        })
        .unwrap();
    let lease = store.lease();
    let leased = store
        .ingest_bytes(b"pulled, not yet recorded", Algorithm::Sha256, None, &lease)
        .unwrap()
        .digest;
    let garbage = put(&store, b"nobody wants me");
    let orphan = dir.path().join("blobs/sha256").join("0".repeat(64));
    std::fs::write(&orphan, b"left by a crash").unwrap();
    let junk = dir.path().join("blobs/blake3/not-a-digest");
    std::fs::write(&junk, b"?").unwrap();

    let report = store.gc().unwrap();
    assert_eq!(report.blobs_removed, 1);
    assert_eq!(report.bytes_freed, garbage.size);
    assert_eq!(report.orphans_removed, 2);
    assert_eq!(report.blobs_kept, 5);
    for d in img.blobs().chain([&box_only, &leased]) {
        assert!(store.contains(d).unwrap(), "{d} was collected");
    }
    assert!(!store.contains(&garbage.digest).unwrap());
    assert!(!store.blob_path(&garbage.digest).exists());
    assert!(!orphan.exists() && !junk.exists());

    // Once the lease is gone and the image forgotten, their blobs go too.
    drop(lease);
    store.remove_image("a:1").unwrap();
    let report = store.gc().unwrap();
    assert_eq!(report.blobs_removed, 4);
    assert_eq!(entries(&dir.path().join("blobs/sha256")), [box_only.hex()]);
    assert!(store.verify().unwrap().problems.is_empty());
}

#[test]
fn gc_running_beside_ingests_never_loses_a_leased_blob() {
    let (_dir, store) = store();
    std::thread::scope(|s| {
        let collector = s.spawn(|| {
            for _ in 0..200 {
                store.gc().unwrap();
            }
        });
        for i in 0..300u32 {
            let lease = store.lease();
            let data = format!("blob {i}").repeat(100);
            let info = store
                .ingest_bytes(data.as_bytes(), Algorithm::Sha256, None, &lease)
                .unwrap();
            std::thread::yield_now();
            assert!(
                store.contains(&info.digest).unwrap(),
                "blob {i} was collected under its lease"
            );
            assert_eq!(
                std::fs::read(store.blob_path(&info.digest)).unwrap(),
                data.as_bytes()
            );
        }
        collector.join().unwrap();
    });
}

#[test]
fn verify_finds_corrupt_truncated_missing_and_orphan_content() {
    let (dir, store) = store();
    let img = image(&store, "a:1", &[b"layer one", b"layer two", b"layer three"]);
    let clean = store.verify().unwrap();
    assert!(clean.problems.is_empty(), "{:?}", clean.problems);
    assert_eq!(clean.blobs, 5);

    let writable = |d: &Digest| {
        let p = store.blob_path(d);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        p
    };
    let [one, two, three] = [img.layers[0], img.layers[1], img.layers[2]];
    std::fs::write(writable(&one), b"layer 0ne").unwrap();
    std::fs::write(writable(&two), b"layer").unwrap();
    std::fs::remove_file(store.blob_path(&three)).unwrap();
    let orphan = dir.path().join("blobs/sha256/stray");
    std::fs::write(&orphan, b"").unwrap();

    let report = store.verify().unwrap();
    let has = |f: &dyn Fn(&Problem) -> bool| report.problems.iter().any(f);
    assert!(has(&|p| matches!(p, Problem::Corrupt { digest, actual }
        if *digest == one && *actual == Digest::of(Algorithm::Sha256, b"layer 0ne"))));
    assert!(has(
        &|p| matches!(p, Problem::WrongSize { digest, indexed: 9, actual: 5 } if *digest == two)
    ));
    assert!(has(
        &|p| matches!(p, Problem::Unreadable { digest, .. } if *digest == three)
    ));
    assert!(has(
        &|p| matches!(p, Problem::Orphan(path) if *path == orphan)
    ));
    assert_eq!(report.problems.len(), 4, "{:?}", report.problems);
    for p in &report.problems {
        assert!(!p.to_string().is_empty());
    }
}

#[test]
fn usage_counts_blobs_records_and_tmp() {
    let (dir, store) = store();
    image(&store, "a:1", &[&[7u8; 10_000]]);
    std::fs::write(dir.path().join("tmp/ingest-x"), [0u8; 123]).unwrap();
    let usage = store.usage().unwrap();
    assert_eq!(usage.blobs, 3);
    assert_eq!(
        usage.blob_bytes,
        10_000 + "manifest of a:1".len() as u64 + "{} a:1".len() as u64
    );
    assert!(usage.blob_disk_bytes >= 10_000);
    assert_eq!(usage.tmp_bytes, 123);
    assert_eq!(usage.images, 1);
    assert!(usage.index_bytes > 0);
}

#[test]
fn a_base_disk_keeps_its_blob_until_its_record_goes() {
    use boxlet_cas::{BaseDisk, BaseDiskId, BaseDiskKind, CasError, DiskInfo};
    let (_dir, store) = store();
    let disk_blob = put(&store, b"an ext4 image, say");
    let disk = |blob| BaseDisk {
        id: BaseDiskId::mint(),
        source_box_id: "__global__".into(),
        name: None,
        kind: BaseDiskKind::Image,
        disk_info: DiskInfo {
            base_path: store.blob_path(&disk_blob.digest).display().to_string(),
            container_disk_bytes: 0,
            size_bytes: disk_blob.size,
        },
        created_at: 0,
        blob,
    };
    let kept = disk(Some(disk_blob.digest));
    store.insert_base_disk(&kept).unwrap();
    assert_eq!(
        store.stat(&disk_blob.digest).unwrap().unwrap().references,
        1
    );
    assert_eq!(store.gc().unwrap().blobs_removed, 0);
    assert!(store.contains(&disk_blob.digest).unwrap());
    assert!(store.verify().unwrap().problems.is_empty());

    let missing = Digest::of(Algorithm::Sha256, b"no such disk");
    let err = store.insert_base_disk(&disk(Some(missing))).unwrap_err();
    assert!(matches!(err, CasError::MissingBlob { .. }), "{err}");

    store.delete_base_disk(kept.id).unwrap();
    assert_eq!(store.gc().unwrap().blobs_removed, 1);
    assert!(!store.contains(&disk_blob.digest).unwrap());
}
