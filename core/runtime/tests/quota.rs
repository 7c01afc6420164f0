//! A box's disk quota on a directory root (Extracted, OverlayMount): what the box writes
//! lands on a file system of its own that ends at the quota, so the host's file system
//! loses at most that much; cleanup unmounts and removes it. Needs root (loop devices).

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use boxlet::rootfs::{DiskQuota, ExtractedStrategy, OverlayStrategy, PrepareRequest};
use boxlet::RootfsStrategy;
use boxlet_cas::BoxId;

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Bytes allocated to the file system holding `p`.
fn used_on(p: &Path) -> u64 {
    let s = rustix::fs::statvfs(p).unwrap();
    (s.f_blocks - s.f_bfree) * s.f_frsize
}

/// Write zeros (real blocks: no holes) into `path` until the file system refuses;
/// returns how many bytes it took and the error.
fn fill(path: &Path) -> (u64, std::io::Error) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5au8; 1 << 20];
    let mut written = 0u64;
    loop {
        match f.write(&chunk).and_then(|n| f.sync_data().map(|()| n)) {
            Ok(n) => written += n as u64,
            Err(e) => return (written, e),
        }
        assert!(written < 1 << 30, "wrote 1 GiB into a 64 MiB quota");
    }
}

const QUOTA: u64 = 64 << 20;

async fn writes_stop_at_the_quota(strategy: &dyn RootfsStrategy, home: &boxlet::rootfs::Home) {
    let id = BoxId::mint();
    let req = PrepareRequest {
        image: Some("busybox:1".into()),
        box_id: id,
    };
    let before = used_on(home.root());
    let rootfs = strategy.prepare(&req).await.unwrap();
    // The box's root is on a file system of its own.
    assert_ne!(
        std::fs::metadata(&rootfs.path).unwrap().dev(),
        std::fs::metadata(home.root()).unwrap().dev(),
        "{}",
        rootfs.path.display()
    );
    let (written, err) = fill(&rootfs.path.join("big"));
    assert_eq!(err.raw_os_error(), Some(28), "ENOSPC, not {err}");
    assert!(
        written > QUOTA / 4 && written <= QUOTA,
        "{written} bytes written"
    );
    // The home's file system gave the box at most its quota: all the box holds there
    // (its file system's file, sparse) is allocated within it.
    let box_dir = home.box_dir(id);
    let held = boxlet::rootfs::allocated_bytes(&box_dir);
    assert!(held <= QUOTA + (1 << 20), "the box holds {held} bytes");
    // And the file system as a whole agrees (other writers on this host make it loose).
    let grew = used_on(home.root()).saturating_sub(before);
    assert!(grew < 4 * QUOTA, "the home grew by {grew} bytes");
    // Cleanup unmounts and removes all of it.
    strategy.cleanup(&rootfs).await.unwrap();
    assert!(!box_dir.exists());
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&id.to_string()), "{mounts}");
}

/// A home with the busybox image, when this runs as root (quotas need it).
fn root_home() -> Option<(
    tempfile::TempDir,
    boxlet::rootfs::Home,
    std::sync::Arc<boxlet_cas::Store>,
)> {
    if !is_root() {
        eprintln!("skipped: disk quotas need root");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let (home, store) = boxlet_testkit::busybox_home(dir.path());
    Some((dir, home, store))
}

#[tokio::test]
async fn an_extracted_box_writes_at_most_its_quota() {
    let Some((_dir, home, store)) = root_home() else {
        return;
    };
    let strategy = ExtractedStrategy::new(home.clone(), store)
        .unwrap()
        .with_disk_quota(DiskQuota::Bytes(QUOTA));
    writes_stop_at_the_quota(&strategy, &home).await;
}

#[tokio::test]
async fn an_overlay_box_writes_at_most_its_quota() {
    let Some((_dir, home, store)) = root_home() else {
        return;
    };
    let strategy = OverlayStrategy::new(home.clone(), store, false)
        .unwrap()
        .with_disk_quota(DiskQuota::Bytes(QUOTA));
    writes_stop_at_the_quota(&strategy, &home).await;
}

#[tokio::test]
async fn a_quota_too_small_for_its_file_system_is_refused_naming_it() {
    let Some((_dir, home, store)) = root_home() else {
        return;
    };
    let strategy = OverlayStrategy::new(home.clone(), store, false)
        .unwrap()
        .with_disk_quota(DiskQuota::Bytes(1 << 20));
    let id = BoxId::mint();
    let e = strategy
        .prepare(&PrepareRequest {
            image: Some("busybox:1".into()),
            box_id: id,
        })
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("1048576") && e.contains("smallest"), "{e}");
    assert!(!home.box_dir(id).exists(), "nothing of the box left");
}

#[tokio::test]
async fn an_extracted_box_of_many_small_files_fits_its_quota() {
    // An image of 5000 empty files in a 32 MiB quota: a file system with an inode per
    // 16 KiB of its size has 2048, and the copy once ran out of them.
    let Some((dir, home, store)) = root_home() else {
        return;
    };
    let mut b = tar::Builder::new(Vec::new());
    for i in 0..5000 {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        h.set_cksum();
        b.append_data(&mut h, format!("many/f{i}"), &[][..])
            .unwrap();
    }
    let tar = b.into_inner().unwrap();
    let layout = boxlet_testkit::hostile::layout_with_layer(&dir.path().join("many"), &tar, "/x");
    boxlet_oci::import_layout(&store, &layout, Some("many:1")).unwrap();
    let strategy = ExtractedStrategy::new(home.clone(), store)
        .unwrap()
        .with_disk_quota(DiskQuota::Bytes(32 << 20));
    let id = BoxId::mint();
    let rootfs = strategy
        .prepare(&PrepareRequest {
            image: Some("many:1".into()),
            box_id: id,
        })
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_dir(rootfs.path.join("many")).unwrap().count(),
        5000
    );
    // Room for the guest's own files too.
    for i in 0..100 {
        std::fs::write(rootfs.path.join(format!("new{i}")), b"").unwrap();
    }
    strategy.cleanup(&rootfs).await.unwrap();
    assert!(!home.box_dir(id).exists());
}
