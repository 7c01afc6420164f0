//! The Extracted strategy on the host: one extraction per image, a private copy per box,
//! cleanup leaving the cache.

use std::sync::Arc;

use boxlet::rootfs::{ExtractedStrategy, Home, PrepareRequest, Strategy};
use boxlet::RootfsStrategy;
use boxlet_cas::BoxId;

fn setup() -> (tempfile::TempDir, Arc<ExtractedStrategy>, Home) {
    let dir = tempfile::tempdir().unwrap();
    let (home, store) = boxlet_testkit::busybox_home(dir.path());
    let strategy = ExtractedStrategy::new(home.clone(), store).unwrap();
    (dir, Arc::new(strategy), home)
}

fn req(id: BoxId) -> PrepareRequest {
    PrepareRequest {
        image: Some("busybox:1".into()),
        box_id: id,
    }
}

#[tokio::test]
async fn each_box_gets_its_own_copy_of_the_extracted_image() {
    let (_dir, strategy, home) = setup();
    let (a, b) = (BoxId::mint(), BoxId::mint());
    let ra = strategy.prepare(&req(a)).await.unwrap();
    let rb = strategy.prepare(&req(b)).await.unwrap();
    assert_eq!(strategy.extractions(), 1);
    // On the box's own file system (its disk quota), when this runs as root.
    assert_eq!(ra.path, home.box_dir(a).join("rw/rootfs"));
    assert!(matches!(&ra.strategy, Strategy::Extracted { layers, .. } if layers.len() == 2));
    assert!(matches!(
        ra.root(),
        boxlet::Root::Dir {
            exclusive: true,
            ..
        }
    ));
    let copy = strategy.last_copy();
    assert!(copy.reflinked + copy.copied >= 3, "{copy:?}");

    assert_eq!(
        std::fs::read(ra.path.join("etc/hostname")).unwrap(),
        b"boxlet\n"
    );
    assert!(!ra.path.join("etc/motd").exists());
    assert_eq!(
        std::fs::read_link(ra.path.join("bin/sh")).unwrap(),
        std::path::Path::new("busybox")
    );
    // Boxes write to their own copies.
    std::fs::write(ra.path.join("etc/hostname"), b"changed\n").unwrap();
    assert_eq!(
        std::fs::read(rb.path.join("etc/hostname")).unwrap(),
        b"boxlet\n"
    );
    let cache = home.images().join(
        std::fs::read_dir(home.images())
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .file_name(),
    );
    assert_eq!(
        std::fs::read(cache.join("rootfs/etc/hostname")).unwrap(),
        b"boxlet\n"
    );

    strategy.cleanup(&ra).await.unwrap();
    assert!(!home.box_dir(a).exists());
    assert!(rb.path.join("bin/busybox").is_file());
    assert!(cache.join("rootfs/bin/busybox").is_file());
    assert_eq!(std::fs::read_dir(home.tmp()).unwrap().count(), 0);

    // Cleaning up something that is not a box's rootfs is refused.
    let mut foreign = rb.clone();
    foreign.path = cache.join("rootfs");
    assert!(strategy.cleanup(&foreign).await.is_err());
    assert!(cache.join("rootfs/bin/busybox").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_prepares_extract_once() {
    let (_dir, strategy, home) = setup();
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let s = strategy.clone();
            tokio::spawn(async move { s.prepare(&req(BoxId::mint())).await })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap().unwrap();
        assert!(r.path.join("bin/busybox").is_file());
    }
    assert_eq!(strategy.extractions(), 1);
    assert_eq!(std::fs::read_dir(home.images()).unwrap().count(), 1);
    assert_eq!(std::fs::read_dir(home.boxes()).unwrap().count(), 10);
}

#[tokio::test]
async fn ensure_cached_extracts_once_and_makes_no_box() {
    let (_dir, strategy, home) = setup();
    strategy.ensure_cached("busybox:1").await.unwrap();
    strategy.ensure_cached("busybox:1").await.unwrap();
    assert_eq!(strategy.extractions(), 1);
    assert_eq!(std::fs::read_dir(home.boxes()).unwrap().count(), 0);
}
