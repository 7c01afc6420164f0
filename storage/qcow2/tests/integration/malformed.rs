//! Every header validation gives its named error, never a panic, and never allocates what
//! the file length cannot justify.

use boxlet_qcow2::{
    create_on, BackingFormat, Corruption, CreateOptions, Error, ErrorKind, MemStorage, Qcow2,
    StorageOptions, Unsupported,
};

fn valid(opts: &CreateOptions) -> Vec<u8> {
    let mut m = MemStorage::default();
    create_on(&mut m, opts).unwrap();
    m.data
}

fn v3() -> Vec<u8> {
    valid(&CreateOptions::standalone(1 << 20))
}

fn open(bytes: Vec<u8>, writable: bool) -> Result<Qcow2, Error> {
    let opts = StorageOptions {
        writable,
        ..Default::default()
    };
    Qcow2::from_storage(Box::new(MemStorage::new(bytes)), opts, None)
}

fn corruption(bytes: Vec<u8>) -> Corruption {
    match open(bytes, false) {
        Err(e) => e
            .corruption()
            .cloned()
            .unwrap_or_else(|| panic!("not a corruption: {e}")),
        Ok(_) => panic!("opened a malformed image"),
    }
}

fn unsupported(bytes: Vec<u8>, writable: bool) -> Unsupported {
    match open(bytes, writable) {
        Err(e) => e
            .unsupported()
            .cloned()
            .unwrap_or_else(|| panic!("not unsupported: {e}")),
        Ok(_) => panic!("opened an unsupported image"),
    }
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

#[test]
fn valid_images_open() {
    open(v3(), true).unwrap();
    open(
        valid(&CreateOptions {
            version: 2,
            ..CreateOptions::standalone(1 << 20)
        }),
        true,
    )
    .unwrap();
}

#[test]
fn truncated_files_and_bad_magic() {
    assert_eq!(
        corruption(vec![0x51, 0x46]),
        Corruption::Truncated { len: 2 }
    );
    let mut b = v3();
    b[0] = b'X';
    assert!(matches!(corruption(b), Corruption::BadMagic(_)));
    let mut b = v3();
    b.truncate(100); // a v3 header needs 104 bytes
    assert!(matches!(corruption(b), Corruption::Truncated { len: 100 }));
}

#[test]
fn versions() {
    let mut b = v3();
    put32(&mut b, 4, 1);
    assert_eq!(unsupported(b, false), Unsupported::Version(1));
    for v in [0, 4, 0xffff_ffff] {
        let mut b = v3();
        put32(&mut b, 4, v);
        assert_eq!(corruption(b), Corruption::BadVersion(v));
    }
}

#[test]
fn cluster_bits_outside_9_to_21() {
    for bits in [0, 8, 22, 63, 200] {
        let mut b = v3();
        put32(&mut b, 20, bits);
        assert_eq!(corruption(b), Corruption::ClusterBits(bits));
    }
}

#[test]
fn header_length() {
    for len in [0, 72, 100, 105, 1 << 17] {
        let mut b = v3();
        put32(&mut b, 100, len);
        assert_eq!(
            corruption(b),
            Corruption::HeaderLength(len),
            "header_length {len}"
        );
    }
}

#[test]
fn refcount_order_above_6() {
    let mut b = v3();
    put32(&mut b, 96, 7);
    assert_eq!(corruption(b), Corruption::RefcountOrder(7));
}

#[test]
fn backing_name_too_long_or_outside_cluster_0() {
    let base = valid(&CreateOptions {
        size: Some(1 << 20),
        ..CreateOptions::overlay("base.raw", BackingFormat::Raw)
    });
    let mut b = base.clone();
    put32(&mut b, 16, 1024);
    assert!(matches!(
        corruption(b),
        Corruption::BackingName { len: 1024, .. }
    ));
    let mut b = base.clone();
    put64(&mut b, 8, 65536 - 4); // runs past the 64 KiB cluster 0
    assert!(matches!(corruption(b), Corruption::BackingName { .. }));
    let mut b = base;
    let off = u64::from_be_bytes(b[8..16].try_into().unwrap()) as usize;
    b[off] = 0xff;
    assert_eq!(corruption(b), Corruption::BackingNameEncoding);
}

#[test]
fn l1_table_offset_and_size() {
    let mut b = v3();
    put64(&mut b, 40, 0x30001);
    assert!(matches!(
        corruption(b),
        Corruption::Unaligned {
            table: "L1 table",
            ..
        }
    ));

    let mut b = v3();
    put64(&mut b, 40, 1 << 40); // aligned, far beyond the file
    assert!(matches!(
        corruption(b),
        Corruption::OutOfFile {
            table: "L1 table",
            ..
        }
    ));

    // 1 MiB with 64 KiB clusters needs one L1 entry.
    let mut b = v3();
    put32(&mut b, 36, 0);
    assert!(matches!(
        corruption(b),
        Corruption::L1Size { needed: 1, .. }
    ));

    // A virtual size the L1 table cannot map.
    let mut b = v3();
    put64(&mut b, 24, 1 << 50);
    assert!(matches!(corruption(b), Corruption::L1Size { .. }));

    // The largest legal l1_size on a tiny file: refused before anything is allocated.
    let mut b = v3();
    put32(&mut b, 36, 4 << 20);
    assert!(matches!(
        corruption(b),
        Corruption::OutOfFile {
            table: "L1 table",
            ..
        }
    ));
    let mut b = v3();
    put32(&mut b, 36, (4 << 20) + 1);
    assert!(matches!(corruption(b), Corruption::L1Size { .. }));
}

#[test]
fn refcount_table_offset_and_size() {
    let mut b = v3();
    put64(&mut b, 48, 0x10008);
    assert!(matches!(
        corruption(b),
        Corruption::Unaligned {
            table: "refcount table",
            ..
        }
    ));
    let mut b = v3();
    put64(&mut b, 48, 1 << 40);
    assert!(matches!(
        corruption(b),
        Corruption::OutOfFile {
            table: "refcount table",
            ..
        }
    ));
    let mut b = v3();
    put32(&mut b, 56, 0);
    assert_eq!(corruption(b), Corruption::RefcountTableSize(0));
    let mut b = v3();
    put32(&mut b, 56, 129); // 129 * 64 KiB > 8 MiB
    assert_eq!(corruption(b), Corruption::RefcountTableSize(129));
}

#[test]
fn snapshot_table() {
    let mut b = v3();
    put32(&mut b, 60, 65537);
    put64(&mut b, 64, 0x10000);
    assert_eq!(corruption(b), Corruption::SnapshotCount(65537));
    let mut b = v3();
    put32(&mut b, 60, 1);
    put64(&mut b, 64, 0x10001);
    assert!(matches!(
        corruption(b),
        Corruption::Unaligned {
            table: "snapshot table",
            ..
        }
    ));
}

fn with_incompat(bits: u64) -> Vec<u8> {
    let mut b = v3();
    put64(&mut b, 72, bits);
    b
}

#[test]
fn incompatible_feature_bits_are_named() {
    let named = |bit: u32, name: &str| Unsupported::IncompatibleFeature {
        bit,
        name: name.into(),
    };
    assert_eq!(
        unsupported(with_incompat(1 << 2), false),
        named(2, "external data file")
    );
    assert_eq!(
        unsupported(with_incompat(1 << 4), false),
        named(4, "extended L2 entries")
    );
    assert_eq!(
        unsupported(with_incompat(1 << 13), false),
        named(13, "unknown")
    );
    assert_eq!(
        unsupported(with_incompat(1 << 63), false),
        named(63, "unknown")
    );

    // dirty and corrupt images can be read, not written.
    open(with_incompat(1), false).unwrap();
    assert_eq!(unsupported(with_incompat(1), true), named(0, "dirty"));
    open(with_incompat(2), false).unwrap();
    assert_eq!(unsupported(with_incompat(2), true), named(1, "corrupt"));
}

#[test]
fn unknown_bits_take_their_name_from_the_feature_table() {
    // boxlet writes a feature name table; rename the entry for bit 4 to bit 9.
    let mut b = with_incompat(1 << 9);
    let pos = b
        .windows(19)
        .position(|w| w == b"extended L2 entries")
        .unwrap();
    b[pos - 1] = 9;
    match unsupported(b, false) {
        Unsupported::IncompatibleFeature { bit: 9, name } => {
            assert!(name.contains("extended L2 entries"), "{name}")
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn compression_type() {
    let mut b = with_incompat(1 << 3);
    b[104] = 1;
    assert_eq!(unsupported(b, false), Unsupported::CompressionType(1));
    let mut b = v3();
    b[104] = 1; // zstd without the feature bit
    assert!(matches!(corruption(b), Corruption::Other(_)));
    assert!(matches!(
        corruption(with_incompat(1 << 3)),
        Corruption::Other(_)
    ));
}

#[test]
fn encrypted_images_are_refused() {
    for method in [1, 2] {
        let mut b = v3();
        put32(&mut b, 32, method);
        assert_eq!(unsupported(b, false), Unsupported::Encryption(method));
    }
}

#[test]
fn extension_overrunning_cluster_0() {
    let mut b = v3();
    // The first extension starts at header_length (112); give it a huge length.
    put32(&mut b, 112 + 4, 0xffff_fff0);
    assert!(matches!(corruption(b), Corruption::Extension { .. }));
}

#[test]
fn other_backing_formats_parse_but_are_refused_when_opened() {
    let mut b = valid(&CreateOptions {
        size: Some(1 << 20),
        ..CreateOptions::overlay("base.img", BackingFormat::Raw)
    });
    let pos = b.windows(3).position(|w| w == b"raw").unwrap();
    b[pos..pos + 3].copy_from_slice(b"vhd");
    let h = boxlet_qcow2::Header::read(&MemStorage::new(b.clone())).unwrap();
    assert_eq!(h.backing_format, None);
    assert_eq!(h.backing_format_name.as_deref(), Some("vhd"));
    let dir = tempfile::TempDir::new().unwrap();
    let p = dir.path().join("ov.qcow2");
    std::fs::write(&p, b).unwrap();
    std::fs::write(dir.path().join("base.img"), [0u8; 512]).unwrap();
    let e = Qcow2::open(&p).unwrap_err();
    assert_eq!(
        e.unsupported(),
        Some(&Unsupported::BackingFormat("vhd".into())),
        "{e}"
    );
}

#[test]
fn empty_l1_with_a_garbage_offset_opens_for_writing() {
    let mut b = valid(&CreateOptions::standalone(0));
    put64(&mut b, 40, u64::MAX);
    let img = open(b, true).unwrap();
    assert_eq!(img.virtual_size(), 0);
}

#[test]
fn writing_needs_the_backing_device_the_header_names() {
    let b = valid(&CreateOptions {
        size: Some(1 << 20),
        ..CreateOptions::overlay("base.raw", BackingFormat::Raw)
    });
    let e = open(b.clone(), true).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::InvalidInput(_)), "{e}");
    open(b, false).unwrap();
}

/// Entries that point a write or a release at metadata are refused, and the metadata
/// stays intact.
#[test]
fn lying_entries_cannot_overwrite_or_free_metadata() {
    let opts = CreateOptions {
        cluster_bits: 12,
        ..CreateOptions::standalone(1 << 20)
    };
    // Give the image one L2 table and one data cluster, then point guest cluster 1 at
    // the refcount table, its block, the L2 table itself and the L1 table.
    let store = crate::util::SharedMem::new(valid(&opts));
    let wopts = || StorageOptions {
        writable: true,
        ..Default::default()
    };
    let mut img = Qcow2::from_storage(Box::new(store.clone()), wopts(), None).unwrap();
    img.write_at(&[1u8; 4096], 0).unwrap();
    drop(img);
    let good = store.bytes();
    let l1 = u64::from_be_bytes(good[40..48].try_into().unwrap()) as usize;
    let l2 =
        (u64::from_be_bytes(good[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00) as usize;
    let rt = u64::from_be_bytes(good[48..56].try_into().unwrap()) as usize;
    let rb = u64::from_be_bytes(good[rt..rt + 8].try_into().unwrap());
    for target in [rt as u64, rb, l2 as u64, l1 as u64] {
        for flags in [1u64 << 63, 0] {
            let mut b = good.clone();
            put64(&mut b, l2 + 8, target | flags);
            for discard in [false, true] {
                let store = crate::util::SharedMem::new(b.clone());
                let mut img = Qcow2::from_storage(Box::new(store.clone()), wopts(), None).unwrap();
                // COPIED: an in-place write; not COPIED: copy-on-write, then release of the
                // target. A whole-cluster discard would release it too.
                let e = if discard {
                    img.discard(4096, 4096).unwrap_err()
                } else {
                    img.write_at(&[9u8; 100], 4096).unwrap_err()
                };
                assert!(e.corruption().is_some(), "target {target:#x}: {e}");
                drop(img);
                // What was stored is intact: the data, and every table (only the planted
                // lie is reported, plus at most leaks).
                let mut img = open(store.bytes(), false).unwrap();
                let mut buf = [0u8; 4096];
                img.read_at(&mut buf, 0).unwrap();
                assert_eq!(buf, [1u8; 4096], "target {target:#x}");
                let report = img.check().unwrap();
                assert!(
                    report.corruption_count <= 1,
                    "target {target:#x}: {report:?}"
                );
            }
        }
    }
}

#[test]
fn errors_name_the_file() {
    let dir = tempfile::TempDir::new().unwrap();
    let p = dir.path().join("bad.qcow2");
    std::fs::write(&p, b"not a qcow2 image ".repeat(10)).unwrap();
    let e = Qcow2::open(&p).unwrap_err();
    assert!(matches!(
        e.kind(),
        ErrorKind::Corrupt(Corruption::BadMagic(_))
    ));
    let msg = e.to_string();
    assert!(
        msg.starts_with(p.to_str().unwrap()) && msg.contains("bad magic"),
        "{msg}"
    );
}

#[test]
fn lying_tables_give_errors_on_access_not_panics() {
    // L1 entry pointing at an unaligned L2 table, and at one beyond the file.
    for l2 in [0x10200u64, 1 << 40] {
        let mut b = v3();
        let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap()) as usize;
        put64(&mut b, l1, l2 | 1 << 63);
        let mut img = open(b, true).unwrap();
        let mut buf = [0u8; 512];
        let e = img.read_at(&mut buf, 0).unwrap_err();
        assert!(e.corruption().is_some(), "{e}");
        assert!(img.write_at(&buf, 0).unwrap_err().corruption().is_some());
    }
}

#[test]
fn crypto_header_extension_without_luks() {
    let mut b = v3();
    // Replace the first extension (the feature name table) by a crypto header pointer.
    put32(&mut b, 112, 0x0537_be77);
    put32(&mut b, 116, 16);
    assert!(matches!(corruption(b), Corruption::Other(m) if m.contains("LUKS")));
}
