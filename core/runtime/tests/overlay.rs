//! The OverlayMount strategy on the host (needs root: it mounts overlayfs).

use std::sync::Arc;

use boxlet::rootfs::{Home, OverlayStrategy, PrepareRequest, Strategy};
use boxlet::RootfsStrategy;
use boxlet_cas::{BoxId, Store};

fn setup() -> (tempfile::TempDir, Home, Arc<Store>) {
    let dir = tempfile::tempdir().unwrap();
    let (home, store) = boxlet_testkit::busybox_home(dir.path());
    (dir, home, store)
}

fn mounted(path: &std::path::Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let path = std::fs::canonicalize(path).unwrap_or(path.to_path_buf());
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(path.to_str().unwrap()))
}

fn req(id: BoxId) -> PrepareRequest {
    PrepareRequest {
        image: Some("busybox:1".into()),
        box_id: id,
    }
}

#[tokio::test]
async fn layers_are_extracted_once_and_mounted_under_a_per_box_upper() {
    let (_dir, home, store) = setup();
    let overlay = OverlayStrategy::new(home.clone(), store, false).unwrap();
    let (a, b) = (BoxId::mint(), BoxId::mint());
    let ra = overlay.prepare(&req(a)).await.unwrap();
    let rb = overlay.prepare(&req(b)).await.unwrap();
    assert_eq!(
        overlay.extractions(),
        2,
        "two layers, extracted once for both boxes"
    );
    assert!(mounted(&ra.path) && mounted(&rb.path));
    let Strategy::OverlayMount { lower, upper, .. } = &ra.strategy else {
        panic!("{:?}", ra.strategy)
    };
    assert_eq!(lower.len(), 2);
    assert!(matches!(
        ra.root(),
        boxlet::Root::Dir {
            exclusive: true,
            ..
        }
    ));

    assert_eq!(
        std::fs::read(ra.path.join("etc/hostname")).unwrap(),
        b"boxlet\n"
    );
    assert!(
        !ra.path.join("etc/motd").exists(),
        "the whiteout of the top layer hides it"
    );
    assert!(ra.path.join("bin/busybox").is_file());
    std::fs::write(ra.path.join("etc/hostname"), b"a\n").unwrap();
    assert_eq!(
        std::fs::read(upper.join("etc/hostname")).unwrap(),
        b"a\n",
        "writes go to the box's upper"
    );
    assert_eq!(
        std::fs::read(rb.path.join("etc/hostname")).unwrap(),
        b"boxlet\n"
    );
    assert_eq!(
        std::fs::read(lower[0].join("etc/hostname")).unwrap(),
        b"boxlet\n",
        "a layer changed"
    );

    overlay.cleanup(&ra).await.unwrap();
    assert!(!mounted(&ra.path));
    assert!(!home.box_dir(a).exists());
    assert!(mounted(&rb.path));
    overlay.cleanup(&rb).await.unwrap();
    assert!(std::fs::read_dir(home.boxes()).unwrap().next().is_none());
}

#[tokio::test]
async fn mounts_left_by_a_crashed_runtime_are_unmounted_at_the_next_start() {
    let (_dir, home, store) = setup();
    let first = OverlayStrategy::new(home.clone(), store.clone(), false).unwrap();
    let r = first.prepare(&req(BoxId::mint())).await.unwrap();
    assert!(mounted(&r.path));
    // The runtime "crashes": nothing cleans up. The next one finds and unmounts it.
    std::mem::forget(first);
    let _second = OverlayStrategy::new(home.clone(), store, false).unwrap();
    assert!(!mounted(&r.path), "a box rootfs stayed mounted");
    assert!(r.path.is_dir(), "unmounting removes nothing");
}

#[test]
fn without_cap_sys_admin_it_fails_clearly_or_falls_back_to_extracted() {
    let (_dir, home, store) = setup();
    drop(store);
    let exe = std::env::current_exe().unwrap();
    let helper = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/overlay_prepare");
    assert!(
        helper.is_file(),
        "{} is missing: `cargo test -p boxlet` builds it",
        helper.display()
    );
    let run = |mode: &str| {
        std::process::Command::new("setpriv")
            .args(["--bounding-set=-sys_admin", "--inh-caps=-sys_admin", "--"])
            .arg(&helper)
            .arg(home.root())
            .args(["busybox:1", mode])
            .output()
            .unwrap()
    };
    let strict = run("strict");
    assert!(!strict.status.success());
    let err = String::from_utf8_lossy(&strict.stderr);
    assert!(
        err.contains("CAP_SYS_ADMIN") && err.contains("Extracted"),
        "{err}"
    );
    // The fallback's default disk quota needs root's loop devices: a clear error that
    // names the way out.
    let quota = run("fallback-quota");
    assert!(!quota.status.success());
    let err = String::from_utf8_lossy(&quota.stderr);
    assert!(
        err.contains("needs root") && err.contains("unlimited"),
        "{err}"
    );
    let fallback = run("fallback");
    assert!(
        fallback.status.success(),
        "{}",
        String::from_utf8_lossy(&fallback.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&fallback.stdout).trim(),
        "extracted"
    );
}

#[tokio::test]
async fn an_images_bounds_hold_for_all_its_layers_together() {
    // Each layer alone within the bound, the two together past it: refused, whether
    // the layers are unpacked now or were for another image before.
    let usage = |home: &Home, hex: String| -> u64 {
        let t = std::fs::read_to_string(home.layers().join(format!("{hex}.usage"))).unwrap();
        t.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let (_dir, home, store) = setup();
    let image = boxlet_oci::StoredImage::open(&store, "busybox:1").unwrap();
    assert_eq!(image.layers.len(), 2);
    let full = OverlayStrategy::new(home.clone(), store.clone(), false).unwrap();
    full.ensure_cached("busybox:1").await.unwrap();
    let entries: Vec<u64> = image
        .layers
        .iter()
        .map(|l| usage(&home, l.diff_id.hex()))
        .collect();
    let bound = boxlet_oci::ApplyLimits {
        max_entries: entries[0] + entries[1] - 1,
        ..boxlet_oci::ApplyLimits::default()
    };
    assert!(
        entries.iter().all(|&e| e > 0 && e <= bound.max_entries),
        "{entries:?}"
    );
    let tight = |home: &Home, store: &Arc<Store>| {
        OverlayStrategy::new(home.clone(), store.clone(), false)
            .unwrap()
            .with_image_limits(bound)
    };
    // Cached: the recorded usage counts.
    let e = tight(&home, &store)
        .ensure_cached("busybox:1")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("busybox:1") && e.contains("together"), "{e}");
    // Unpacked now: the second layer gets what the first left of the bound.
    let (_dir2, home2, store2) = setup();
    let e = tight(&home2, &store2)
        .ensure_cached("busybox:1")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("entries") || e.contains("bound"), "{e}");
    // A bound the two fit in is fine.
    OverlayStrategy::new(home2.clone(), store2.clone(), false)
        .unwrap()
        .with_image_limits(boxlet_oci::ApplyLimits {
            max_entries: entries[0] + entries[1],
            ..boxlet_oci::ApplyLimits::default()
        })
        .ensure_cached("busybox:1")
        .await
        .unwrap();
}
