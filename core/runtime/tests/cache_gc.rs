//! `collect_caches`: the rootfs caches of images removed from the store go (extracted
//! tree, unpacked layers, image disk, bases no box uses); those of stored images, and a
//! base under a box, stay; a re-imported image builds them again.

use std::path::Path;

use boxlet::rootfs::{
    collect_caches, AgentBinary, CacheReport, DiskStrategy, ExtractedStrategy, Home,
    OverlayStrategy, PrepareRequest,
};
use boxlet::RootfsStrategy;
use boxlet_cas::{BoxId, Store};

fn entries(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |d| d.count())
}

/// (extracted trees, entries in layers/ (each unpacked layer and its usage record), base
/// disk records, files in bases/)
fn caches(home: &Home, store: &Store) -> (usize, usize, usize, usize) {
    (
        entries(&home.images()),
        entries(&home.layers()),
        store.all_base_disks().unwrap().len(),
        entries(&home.bases()),
    )
}

/// Remove an image by the name it was imported as.
fn rmi(store: &Store, name: &str) {
    let image = boxlet_oci::StoredImage::open(store, name).unwrap();
    store.remove_image(&image.record.reference).unwrap();
}

fn removed(r: &CacheReport) -> (usize, usize, usize, usize) {
    (r.trees, r.layers, r.image_disks, r.bases)
}

#[tokio::test]
async fn caches_of_a_removed_image_go_and_what_is_still_used_stays() {
    let dir = tempfile::tempdir().unwrap();
    let (home, store) = boxlet_testkit::busybox_home(dir.path());
    let layout = boxlet_testkit::busybox_image().join("layout");
    // A second name for the same manifest.
    boxlet_oci::import_layout(&store, &layout, Some("busybox:2")).unwrap();
    let agent = dir.path().join("agent");
    std::fs::write(&agent, b"#!/bin/sh\n").unwrap();
    let agent = AgentBinary {
        path: agent,
        build_hash: None,
    };
    let disk = DiskStrategy::new(home.clone(), store.clone(), agent.clone()).unwrap();
    let extracted = ExtractedStrategy::new(home.clone(), store.clone()).unwrap();
    let overlay = OverlayStrategy::new(home.clone(), store.clone(), false).unwrap();
    let all: [&dyn RootfsStrategy; 3] = [&disk, &extracted, &overlay];
    for s in all {
        s.ensure_cached("busybox:1").await.unwrap();
    }
    // One tree, the image's two layers (each with its usage record), an image disk and a
    // base.
    assert_eq!(caches(&home, &store), (1, 4, 2, 2));
    let boxed = disk
        .prepare(&PrepareRequest {
            image: Some("busybox:1".into()),
            box_id: BoxId::mint(),
        })
        .await
        .unwrap();
    let base = boxlet_qcow2::read_backing_file_path(&boxed.path)
        .unwrap()
        .unwrap();

    let collect = || collect_caches(&home, &store, store.as_ref()).unwrap();
    assert_eq!(collect(), CacheReport::default(), "every cache is in use");
    rmi(&store, "busybox:1");
    assert_eq!(
        collect(),
        CacheReport::default(),
        "busybox:2 is the same image"
    );

    rmi(&store, "busybox:2");
    let r = collect();
    assert_eq!(removed(&r), (1, 2, 1, 0), "{r:?}");
    assert!(r.bytes > 0 && r.kept.is_empty(), "{r:?}");
    assert_eq!(
        caches(&home, &store),
        (0, 0, 1, 1),
        "the box's base stays with its record"
    );
    assert!(Path::new(&base).is_file());
    assert_eq!(entries(&home.tmp()), 0, "nothing left in staging");

    // Once the box is gone, so is its base; then there is nothing more to collect.
    disk.cleanup(&boxed).await.unwrap();
    assert_eq!(removed(&collect()), (0, 0, 0, 1));
    assert_eq!(caches(&home, &store), (0, 0, 0, 0));
    assert_eq!(collect(), CacheReport::default());

    // The image comes back: every strategy builds its cache again.
    boxlet_oci::import_layout(&store, &layout, Some("busybox:1")).unwrap();
    let disk = DiskStrategy::new(home.clone(), store.clone(), agent).unwrap();
    let all: [&dyn RootfsStrategy; 3] = [&disk, &extracted, &overlay];
    for s in all {
        s.ensure_cached("busybox:1").await.unwrap();
    }
    assert_eq!(caches(&home, &store), (1, 4, 2, 2));
}
