//! Creating images, reading the backing name for GC, and resolving backing chains.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use boxlet_qcow2::{
    create, read_backing_file_path, resolve_chain, BackingFormat, CreateOptions, ErrorKind,
    OpenOptions, Qcow2,
};
use tempfile::TempDir;

use crate::util::{qemu_check_clean, run_ok};

#[test]
fn overlay_creation_is_constant_size_in_the_virtual_size() {
    let dir = TempDir::new().unwrap();
    let mut lens = Vec::new();
    for size in [1u64 << 30, 1 << 40, 64 << 40] {
        let p = dir.path().join(format!("s{size}.qcow2"));
        create(&p, &CreateOptions::standalone(size)).unwrap();
        qemu_check_clean(&p);
        let info = run_ok("qemu-img", &["info", "--output=json", p.to_str().unwrap()]);
        assert!(
            info.contains(&format!("\"virtual-size\": {size}")),
            "{info}"
        );
        let meta = std::fs::metadata(&p).unwrap();
        // The L1 table is all zeros and left sparse: 8 bytes per 512 MiB of disk.
        assert_eq!(
            meta.len(),
            4 * 65536 + (size >> 29).saturating_sub(1) * 8 / 65536 * 65536
        );
        lens.push(meta.blocks() * 512);
    }
    // Written: header, refcount table, refcount block, and no more, even for 64 TiB.
    assert!(lens.iter().all(|&l| l <= 4 * 65536), "{lens:?}");
}

#[test]
fn overlay_over_qcow2_records_backing_and_format_and_takes_its_size() {
    let dir = TempDir::new().unwrap();
    let base = dir.path().join("base.qcow2");
    create(&base, &CreateOptions::standalone(3 << 20)).unwrap();
    let ov = dir.path().join("ov.qcow2");
    create(
        &ov,
        &CreateOptions::overlay("base.qcow2", BackingFormat::Qcow2),
    )
    .unwrap();
    let info = run_ok("qemu-img", &["info", ov.to_str().unwrap()]);
    assert!(info.contains("virtual size: 3 MiB"), "{info}");
    assert!(info.contains("backing file: base.qcow2"), "{info}");
    assert!(info.contains("backing file format: qcow2"), "{info}");
    qemu_check_clean(&ov);
    let img = Qcow2::open(&ov).unwrap();
    assert_eq!(img.header().backing_format, Some(BackingFormat::Qcow2));
    assert_eq!(img.virtual_size(), 3 << 20);
}

#[test]
fn create_refuses_to_overwrite_and_leaves_nothing_on_failure() {
    let dir = TempDir::new().unwrap();
    let p = dir.path().join("a.qcow2");
    create(&p, &CreateOptions::standalone(1 << 20)).unwrap();
    let before = std::fs::read(&p).unwrap();
    assert!(create(&p, &CreateOptions::standalone(2 << 20)).is_err());
    assert_eq!(
        std::fs::read(&p).unwrap(),
        before,
        "existing image untouched"
    );

    let q = dir.path().join("b.qcow2");
    let err = create(
        &q,
        &CreateOptions::overlay("missing.raw", BackingFormat::Raw),
    )
    .unwrap_err();
    assert!(err.to_string().contains("missing.raw"), "{err}");
    assert!(!q.exists());
}

/// The seed's GC test: a 1 KiB file holding only magic, version and the backing name.
#[test]
fn read_backing_file_path_needs_only_the_name_fields() {
    let dir = TempDir::new().unwrap();
    let p = dir.path().join("guest-rootfs.qcow2");
    let name = "/var/lib/boxlet/bases/abc-def.ext4";
    let mut buf = vec![0u8; 1024];
    buf[0..4].copy_from_slice(&0x5146_49fbu32.to_be_bytes());
    buf[4..8].copy_from_slice(&3u32.to_be_bytes());
    buf[8..16].copy_from_slice(&512u64.to_be_bytes());
    buf[16..20].copy_from_slice(&(name.len() as u32).to_be_bytes());
    buf[512..512 + name.len()].copy_from_slice(name.as_bytes());
    std::fs::write(&p, &buf).unwrap();
    assert_eq!(read_backing_file_path(&p).unwrap().as_deref(), Some(name));
    // The full parser refuses the same file.
    assert!(Qcow2::open_with(
        &p,
        OpenOptions {
            no_backing: true,
            ..Default::default()
        }
    )
    .is_err());

    let standalone = dir.path().join("s.qcow2");
    create(&standalone, &CreateOptions::standalone(1 << 20)).unwrap();
    assert_eq!(read_backing_file_path(&standalone).unwrap(), None);

    std::fs::write(&p, b"garbage").unwrap();
    let e = read_backing_file_path(&p).unwrap_err();
    assert!(e.to_string().contains("guest-rootfs.qcow2"), "{e}");
}

fn overlay(dir: &Path, name: &str, backing: &str, fmt: Option<BackingFormat>) {
    let mut args = vec!["create", "-f", "qcow2", "-u", "-b", backing];
    if let Some(f) = fmt {
        args.extend(["-F", f.name()]);
    }
    let p = dir.join(name);
    args.extend([p.to_str().unwrap(), "1M"]);
    run_ok("qemu-img", &args);
}

#[test]
fn chains_refuse_cycles_and_depth_over_16() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    overlay(d, "a.qcow2", "b.qcow2", Some(BackingFormat::Qcow2));
    overlay(d, "b.qcow2", "a.qcow2", Some(BackingFormat::Qcow2));
    let e = resolve_chain(&d.join("a.qcow2"), None).unwrap_err();
    assert!(e.to_string().contains("cycle"), "{e}");
    assert!(Qcow2::open(&d.join("a.qcow2")).is_err());

    std::fs::write(d.join("l0.raw"), vec![1u8; 1 << 20]).unwrap();
    overlay(d, "l1.qcow2", "l0.raw", Some(BackingFormat::Raw));
    for i in 2..=17 {
        overlay(
            d,
            &format!("l{i}.qcow2"),
            &format!("l{}.qcow2", i - 1),
            Some(BackingFormat::Qcow2),
        );
    }
    // l16 has 16 images below it (l15..l1 and l0.raw): the limit.
    let chain = resolve_chain(&d.join("l16.qcow2"), None).unwrap();
    assert_eq!(chain.len(), 17);
    let mut img = Qcow2::open(&d.join("l16.qcow2")).unwrap();
    let mut b = [0u8; 4];
    img.read_at(&mut b, 4096).unwrap();
    assert_eq!(b, [1; 4], "read through 16 levels");
    let e = resolve_chain(&d.join("l17.qcow2"), None).unwrap_err();
    assert!(e.to_string().contains("deeper than 16"), "{e}");
}

#[test]
fn backing_format_is_never_guessed() {
    let dir = TempDir::new().unwrap();
    let d = dir.path();
    std::fs::write(d.join("base.raw"), vec![7u8; 1 << 20]).unwrap();
    overlay(d, "ov.qcow2", "base.raw", Some(BackingFormat::Raw));
    // Rename the backing format extension to an unknown type: the format is now unrecorded.
    let p = d.join("ov.qcow2");
    let mut bytes = std::fs::read(&p).unwrap();
    let pos = bytes
        .windows(4)
        .position(|w| w == 0xe279_2acau32.to_be_bytes())
        .unwrap();
    bytes[pos..pos + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
    std::fs::write(&p, bytes).unwrap();
    let e = Qcow2::open(&d.join("ov.qcow2")).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::InvalidInput(_)), "{e}");
    assert!(e.to_string().contains("no recorded format"), "{e}");
    // The caller may say what it is.
    let opts = OpenOptions {
        backing_format: Some(BackingFormat::Raw),
        ..Default::default()
    };
    let mut img = Qcow2::open_with(&d.join("ov.qcow2"), opts).unwrap();
    let mut b = [0u8; 2];
    img.read_at(&mut b, 100).unwrap();
    assert_eq!(b, [7, 7]);
}

#[test]
fn zero_sized_image_has_no_l1_table_and_no_leak() {
    let dir = TempDir::new().unwrap();
    let p = dir.path().join("empty.qcow2");
    create(&p, &CreateOptions::standalone(0)).unwrap();
    qemu_check_clean(&p);
    let mut img = Qcow2::open(&p).unwrap();
    assert_eq!(img.header().l1_size, 0);
    assert!(img.check().unwrap().is_clean());
}
