//! On a file system with reflinks (XFS, loop-mounted here; needs root and xfsprogs),
//! copies share extents instead of copying data, and the Extracted strategy makes each
//! box's files that way (when the box has no disk quota).

use std::path::{Path, PathBuf};
use std::process::Command;

use boxlet::rootfs::{
    copy_file, reflinks_supported, CopyMethod, ExtractedStrategy, PrepareRequest,
};
use boxlet::RootfsStrategy;
use boxlet_cas::BoxId;

/// A loop-mounted XFS with reflinks, unmounted on drop.
struct Xfs {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl Xfs {
    fn new() -> Xfs {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let img = dir.path().join("xfs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(1 << 30)
            .unwrap();
        let mkfs = Command::new("mkfs.xfs")
            .args(["-q", "-m", "reflink=1"])
            .arg(&img)
            .status();
        assert!(
            mkfs.is_ok_and(|s| s.success()),
            "mkfs.xfs failed (scripts/setup.sh installs xfsprogs)"
        );
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let st = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .status()
            .unwrap();
        assert!(st.success(), "mounting the XFS image failed (needs root)");
        Xfs { mnt, _dir: dir }
    }

    fn path(&self) -> &Path {
        &self.mnt
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

#[test]
fn a_copy_on_xfs_is_a_reflink() {
    let xfs = Xfs::new();
    assert!(reflinks_supported(xfs.path()));
    let src = xfs.path().join("src");
    std::fs::write(&src, vec![7u8; 3 << 20]).unwrap();
    let dst = xfs.path().join("dst");
    assert_eq!(copy_file(&src, &dst).unwrap(), CopyMethod::Reflink);
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    // Writing one side leaves the other alone.
    std::fs::write(&dst, b"changed").unwrap();
    assert_eq!(std::fs::read(&src).unwrap().len(), 3 << 20);
}

#[tokio::test]
async fn extracted_boxes_on_xfs_are_made_of_reflinks() {
    let xfs = Xfs::new();
    let (home, store) = boxlet_testkit::busybox_home(xfs.path());
    // Without a disk quota: a box with one copies onto its own file system, where the
    // cache's extents cannot be shared.
    let strategy = ExtractedStrategy::new(home.clone(), store)
        .unwrap()
        .with_disk_quota(boxlet::rootfs::DiskQuota::Unlimited);
    let req = PrepareRequest {
        image: Some("busybox:1".into()),
        box_id: BoxId::mint(),
    };
    let rootfs = strategy.prepare(&req).await.unwrap();
    let copy = strategy.last_copy();
    assert!(copy.reflinked >= 3 && copy.copied == 0, "{copy:?}");
    assert_eq!(
        std::fs::read(rootfs.path.join("etc/hostname")).unwrap(),
        b"boxlet\n"
    );
    strategy.cleanup(&rootfs).await.unwrap();
}
