//! The Disk strategy on the host: stage 1 and 2 cached, a qcow2 overlay per box, one build
//! for concurrent prepares, cleanup leaving nothing of the box.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use boxlet::rootfs::{AgentBinary, DiskStrategy, Home, PrepareRequest, Strategy};
use boxlet::RootfsStrategy;
use boxlet_cas::{BaseDiskKind, BoxId, Store};

const AGENT: &[u8] = b"#!/bin/sh\n# stands in for the agent: these tests do not boot\n";

fn setup() -> (tempfile::TempDir, Arc<DiskStrategy>, Home, Arc<Store>) {
    let dir = tempfile::tempdir().unwrap();
    let (home, store) = boxlet_testkit::busybox_home(dir.path());
    let agent = dir.path().join("agent");
    std::fs::write(&agent, AGENT).unwrap();
    let strategy = DiskStrategy::new(
        home.clone(),
        store.clone(),
        AgentBinary {
            path: agent,
            build_hash: None,
        },
    )
    .unwrap();
    (dir, Arc::new(strategy), home, store)
}

fn req(id: BoxId) -> PrepareRequest {
    PrepareRequest {
        image: Some("busybox:1".into()),
        box_id: id,
    }
}

#[tokio::test]
async fn a_box_gets_an_overlay_of_the_versioned_base_with_the_agent_inside() {
    let (_dir, strategy, home, store) = setup();
    let id = BoxId::mint();
    let rootfs = strategy.prepare(&req(id)).await.unwrap();
    assert_eq!(rootfs.path, home.box_disk(id));
    assert!(
        matches!(&rootfs.strategy, Strategy::Disk { disk_path, .. } if *disk_path == home.box_disk(id))
    );
    assert!(
        rootfs.env.iter().any(|(k, _)| k == "PATH"),
        "{:?}",
        rootfs.env
    );

    let base = boxlet_qcow2::read_backing_file_path(&rootfs.path)
        .unwrap()
        .unwrap();
    assert!(base.starts_with(home.bases().to_str().unwrap()), "{base}");
    let fs = boxlet_ext4::Ext4::open(base.as_ref()).unwrap();
    let agent = fs.resolve("/boxlet/bin/boxlet-guest", true).unwrap();
    assert_eq!(fs.read_inode(&agent, 1 << 20).unwrap(), AGENT);
    let hostname = fs.resolve("/etc/hostname", true).unwrap();
    assert_eq!(fs.read_inode(&hostname, 100).unwrap(), b"boxlet\n");
    assert!(
        fs.resolve("/etc/motd", true).is_err(),
        "the whiteout of the second layer was not applied"
    );

    // One image disk and one versioned base are recorded.
    let kinds: Vec<BaseDiskKind> = store
        .all_base_disks()
        .unwrap()
        .iter()
        .map(|d| d.kind)
        .collect();
    assert_eq!(kinds.len(), 2);
    assert!(kinds.contains(&BaseDiskKind::Image) && kinds.contains(&BaseDiskKind::Rootfs));
    assert_eq!(
        std::fs::read_dir(home.tmp()).unwrap().count(),
        0,
        "staging left behind"
    );

    // A second box costs an overlay: no build, a few clusters of metadata.
    let second = strategy.prepare(&req(BoxId::mint())).await.unwrap();
    assert_eq!(strategy.builds(), 1);
    assert_eq!(
        boxlet_qcow2::read_backing_file_path(&second.path)
            .unwrap()
            .unwrap(),
        base
    );
    let bytes = std::fs::metadata(&second.path).unwrap().blocks() * 512;
    assert!(bytes < 1 << 20, "a box's disk takes {bytes} bytes");

    // Cleanup removes the box's directory, and nothing shared.
    strategy.cleanup(&rootfs).await.unwrap();
    assert!(!home.box_dir(id).exists());
    assert!(std::path::Path::new(&base).exists());
    assert_eq!(store.all_base_disks().unwrap().len(), 2);
    // GC keeps the base of the current agent and of the remaining box.
    assert_eq!(strategy.manager().gc(&home.boxes()).unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_concurrent_prepares_of_one_image_build_it_once() {
    let (_dir, strategy, home, store) = setup();
    let ids: Vec<BoxId> = (0..10).map(|_| BoxId::mint()).collect();
    let tasks: Vec<_> = ids
        .iter()
        .map(|&id| {
            let s = strategy.clone();
            tokio::spawn(async move { s.prepare(&req(id)).await })
        })
        .collect();
    let mut bases = std::collections::HashSet::new();
    for t in tasks {
        let rootfs = t.await.unwrap().unwrap();
        bases.insert(
            boxlet_qcow2::read_backing_file_path(&rootfs.path)
                .unwrap()
                .unwrap(),
        );
    }
    assert_eq!(strategy.builds(), 1);
    assert_eq!(bases.len(), 1, "boxes got different bases: {bases:?}");
    assert_eq!(store.all_base_disks().unwrap().len(), 2);
    assert_eq!(std::fs::read_dir(home.bases()).unwrap().count(), 2);
    for id in ids {
        assert!(home.box_disk(id).is_file());
    }
}

#[tokio::test]
async fn an_unknown_image_and_a_missing_image_are_errors_naming_them() {
    let (_dir, strategy, _home, _store) = setup();
    let err = strategy
        .prepare(&PrepareRequest {
            image: Some("nothing:here".into()),
            box_id: BoxId::mint(),
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("nothing:here"), "{err}");
    let err = strategy
        .prepare(&PrepareRequest {
            image: None,
            box_id: BoxId::mint(),
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("needs an image"), "{err}");
}

#[tokio::test]
async fn ensure_cached_builds_the_shared_base_once_and_makes_no_box() {
    let (_dir, strategy, home, store) = setup();
    strategy.ensure_cached("busybox:1").await.unwrap();
    strategy.ensure_cached("busybox:1").await.unwrap();
    assert_eq!(strategy.builds(), 1);
    assert_eq!(store.all_base_disks().unwrap().len(), 2);
    assert_eq!(
        std::fs::read_dir(home.boxes()).unwrap().count(),
        0,
        "a box was made"
    );
    strategy.prepare(&req(BoxId::mint())).await.unwrap();
    assert_eq!(strategy.builds(), 1, "the prepare after it built again");
    assert!(strategy
        .ensure_cached("nothing:here")
        .await
        .unwrap_err()
        .to_string()
        .contains("nothing:here"));
}
