//! A hostile image prepared with each rootfs strategy leaves nothing usable on the host:
//! no device node anyone could open, no set-ID file of a host id, no file capability or
//! overlayfs attribute the host kernel would obey. The guest still gets what the image
//! says, through the mapping its file server applies.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use boxlet::rootfs::{
    AgentBinary, DiskStrategy, ExtractedStrategy, Home, OverlayStrategy, PrepareRequest, CACHE_IDS,
};
use boxlet::RootfsStrategy;
use boxlet_cas::BoxId;
use boxlet_testkit::hostile;

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.push(p.clone());
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            walk(&p, out);
        }
    }
}

fn xattrs(p: &Path) -> Vec<String> {
    let mut buf = vec![0u8; 64 << 10];
    let n = rustix::fs::llistxattr(p, &mut buf).unwrap_or(0);
    buf[..n]
        .split(|&b| b == 0)
        .filter(|n| !n.is_empty())
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect()
}

/// Everything under the home that the host kernel would honour.
fn usable_on_the_host(home: &Path) -> Vec<String> {
    let mut bad = Vec::new();
    let mut all = Vec::new();
    walk(home, &mut all);
    for p in all {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let t = m.file_type();
        // overlayfs whiteouts are 0/0 character devices, which nothing can open.
        if (t.is_block_device() || t.is_char_device()) && m.rdev() != 0 {
            bad.push(format!("device node {}", p.display()));
        }
        if m.mode() & 0o4000 != 0 && !CACHE_IDS.holds(m.uid()) {
            bad.push(format!("set-UID to {}: {}", m.uid(), p.display()));
        }
        if m.mode() & 0o2000 != 0 && t.is_file() && !CACHE_IDS.holds(m.gid()) {
            bad.push(format!("set-GID to {}: {}", m.gid(), p.display()));
        }
        for x in xattrs(&p) {
            // The only others: boxlet's overlayfs markers on unpacked layers, and the
            // ones overlayfs itself keeps on a box's upper directory.
            // (boxes/<id>/upper, or boxes/<id>/rw/upper on a box's quota file system)
            let boxes = home.join("boxes");
            let parent = p.parent();
            let in_upper = p.file_name().is_some_and(|n| n == "upper")
                && (parent.and_then(Path::parent) == Some(&boxes)
                    || (parent.and_then(Path::file_name) == Some("rw".as_ref())
                        && parent.and_then(Path::parent).and_then(Path::parent) == Some(&boxes)));
            let own_marker = x.starts_with("trusted.overlay.")
                && (p.starts_with(home.join("layers")) || in_upper);
            if !x.starts_with("user.virtiofs.") && !own_marker {
                bad.push(format!("xattr {x} on {}", p.display()));
            }
        }
    }
    bad
}

#[tokio::test]
async fn a_hostile_image_leaves_nothing_usable_on_the_host_with_any_strategy() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: the strategies keep owners and create nodes only as root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let home = Home::new(dir.path().join("home"));
    let store = std::sync::Arc::new(boxlet_cas::Store::open(home.root()).unwrap());
    let layout = hostile::hostile_layout(dir.path());
    boxlet_oci::import_layout(&store, &layout, Some("hostile:1")).unwrap();
    let agent = AgentBinary::new(boxlet_testkit::agent());
    let disk = DiskStrategy::new(home.clone(), store.clone(), agent).unwrap();
    let extracted = ExtractedStrategy::new(home.clone(), store.clone()).unwrap();
    let overlay = OverlayStrategy::new(home.clone(), store.clone(), false).unwrap();
    let strategies: [&dyn RootfsStrategy; 3] = [&disk, &extracted, &overlay];
    let mut roots = Vec::new();
    for s in strategies {
        let req = PrepareRequest {
            image: Some("hostile:1".into()),
            box_id: BoxId::mint(),
        };
        let root = s.prepare(&req).await.unwrap();
        let bad = usable_on_the_host(home.root());
        assert!(bad.is_empty(), "after {}: {bad:#?}", s.name());
        roots.push((s, root));
    }
    // What the guest is to see is kept, in forms the host ignores.
    for (s, root) in &roots[1..] {
        let p = &root.path;
        assert!(!p.join(hostile::BLOCK_DEVICE).exists(), "{}", s.name());
        assert!(!p.join(hostile::CHAR_DEVICE).exists(), "{}", s.name());
        let sh = std::fs::metadata(p.join(hostile::SETUID_ROOT)).unwrap();
        assert_eq!(sh.mode() & 0o7777, 0o4755, "{}", s.name());
        assert_eq!(
            sh.uid(),
            CACHE_IDS.base(),
            "image root, shifted: {}",
            s.name()
        );
        let caps = xattrs(&p.join(hostile::FILE_CAPS));
        assert_eq!(caps, ["user.virtiofs.security.capability"], "{}", s.name());
        let mut marks = xattrs(&p.join(hostile::OVERLAY_DIR));
        marks.sort();
        assert_eq!(
            marks,
            [
                "user.virtiofs.trusted.overlay.opaque",
                "user.virtiofs.user.note",
                "user.virtiofs.user.overlay.opaque",
            ],
            "{}",
            s.name()
        );
        assert!(p.join(hostile::OVERLAY_DIR).join("f").is_file());
        let top = std::fs::metadata(p).unwrap();
        assert_eq!(top.uid(), CACHE_IDS.base(), "the guest's root owns /");
    }
    // The overlay itself is mounted so that nothing in it counts on the host.
    let merged = std::fs::canonicalize(&roots[2].1.path).unwrap();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(merged.to_str().unwrap()))
        .expect("the box's overlay is mounted");
    let opts = line.split(' ').nth(5).unwrap();
    assert!(opts.contains("nosuid") && opts.contains("nodev"), "{line}");
    for (s, root) in roots {
        s.cleanup(&root).await.unwrap();
    }
}
