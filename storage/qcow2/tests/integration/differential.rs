//! Differential tests against QEMU: images written by qemu-img read back byte-identical
//! to `qemu-img convert -O raw`; images written by boxlet pass `qemu-img check` and
//! `qemu-img compare` against a raw reference.

use std::path::{Path, PathBuf};

use boxlet_qcow2::{create, BackingFormat, CreateOptions, OpenOptions, Qcow2};
use tempfile::TempDir;

use crate::util::{export, qemu_check_clean, qemu_export, run, run_ok, Rng};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A raw file of `size` bytes: random runs separated by holes of zeros.
fn patterned_raw(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut data = vec![0u8; size];
    let mut pos = 0;
    while pos < size {
        let run = (rng.below(96 << 10) + 1) as usize;
        let end = (pos + run).min(size);
        if rng.below(3) != 0 {
            rng.fill(&mut data[pos..end]);
        }
        pos = end;
    }
    std::fs::write(path, &data).unwrap();
    data
}

/// `qemu-img convert` of a raw file to qcow2 with `-o opts` (and `-c` when `compress`).
fn convert(src: &Path, dst: &Path, opts: &str, compress: bool) {
    let mut args = vec![
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        opts,
        s(src),
        s(dst),
    ];
    if compress {
        args.insert(1, "-c");
    }
    run_ok("qemu-img", &args);
}

fn open_rw(path: &Path) -> Qcow2 {
    let opts = OpenOptions {
        writable: true,
        ..Default::default()
    };
    Qcow2::open_with(path, opts).unwrap()
}

fn qemu_io(img: &Path, fmt: &str, cmd: &str) {
    run_ok("qemu-io", &["-f", fmt, "-c", cmd, s(img)]);
}

fn assert_same_as_qemu(img: &Path, dir: &Path) -> Vec<u8> {
    let ours = export(img);
    let theirs = qemu_export(img, dir);
    assert_eq!(ours.len(), theirs.len(), "{}: size", img.display());
    if let Some(i) = (0..ours.len()).find(|&i| ours[i] != theirs[i]) {
        panic!("{}: first difference at byte {i:#x}", img.display());
    }
    ours
}

#[test]
fn qemu_images_export_identically_for_every_cluster_size_and_compat() {
    let dir = TempDir::new().unwrap();
    for cluster in ["512", "4k", "64k", "2M"] {
        let size = if cluster == "2M" { 9 << 20 } else { 3 << 20 };
        let raw = dir.path().join("src.raw");
        let data = patterned_raw(&raw, size, size as u64 ^ cluster.len() as u64);
        for compat in ["0.10", "1.1"] {
            let img = dir.path().join(format!("img-{cluster}-{compat}.qcow2"));
            let opts = format!("cluster_size={cluster},compat={compat}");
            convert(&raw, &img, &opts, false);
            let ours = assert_same_as_qemu(&img, dir.path());
            assert!(ours == data, "{cluster} {compat}: differs from the source");
        }
    }
}

#[test]
fn every_refcount_width_reads_and_writes() {
    let dir = TempDir::new().unwrap();
    let raw = dir.path().join("src.raw");
    let mut data = patterned_raw(&raw, 2 << 20, 7);
    for bits in [1, 2, 4, 8, 16, 32, 64] {
        let img = dir.path().join(format!("rc{bits}.qcow2"));
        let opts = format!("refcount_bits={bits},cluster_size=4k");
        convert(&raw, &img, &opts, false);
        assert_eq!(
            assert_same_as_qemu(&img, dir.path()),
            data,
            "refcount_bits={bits}"
        );

        let mut q = open_rw(&img);
        let mut rng = Rng::new(bits);
        random_writes(&mut q, &mut data, &mut rng, 40);
        drop(q);
        qemu_check_clean(&img);
        assert_eq!(export(&img), data, "refcount_bits={bits} after writes");
        std::fs::write(&raw, &data).unwrap();
    }
}

/// Random writes and discards, mirrored into `model`.
fn random_writes(q: &mut Qcow2, model: &mut [u8], rng: &mut Rng, n: usize) {
    let size = model.len() as u64;
    for i in 0..n {
        let len = 1 + rng.below(if i % 4 == 0 { 200_000 } else { 9000 });
        let len = len.min(size);
        let off = rng.below(size - len + 1);
        let range = off as usize..(off + len) as usize;
        if rng.below(6) == 0 {
            q.discard(off, len).unwrap();
            model[range].fill(0);
        } else {
            let mut buf = vec![0u8; len as usize];
            rng.fill(&mut buf);
            q.write_at(&buf, off).unwrap();
            model[range].copy_from_slice(&buf);
        }
        if rng.below(10) == 0 {
            q.flush().unwrap();
        }
    }
    q.flush().unwrap();
}

#[test]
fn compressed_clusters_read_and_get_replaced_on_write() {
    let dir = TempDir::new().unwrap();
    for cluster in ["4k", "64k"] {
        let raw = dir.path().join("src.raw");
        // Compressible: text-like runs among random ones.
        let mut data = patterned_raw(&raw, 3 << 20, 3);
        for (i, b) in data.iter_mut().enumerate().step_by(3) {
            *b = b'a' + (i % 23) as u8;
        }
        std::fs::write(&raw, &data).unwrap();
        let img = dir.path().join(format!("c-{cluster}.qcow2"));
        let opts = format!("cluster_size={cluster}");
        convert(&raw, &img, &opts, true);
        let info = run_ok("qemu-img", &["check", s(&img)]);
        assert!(
            info.contains("compressed clusters") && !info.contains(", 0.00% compressed"),
            "{info}"
        );
        assert_eq!(assert_same_as_qemu(&img, dir.path()), data);

        let mut q = open_rw(&img);
        random_writes(&mut q, &mut data, &mut Rng::new(11), 60);
        drop(q);
        qemu_check_clean(&img);
        assert_eq!(assert_same_as_qemu(&img, dir.path()), data);
    }
}

#[test]
fn backing_chains_written_by_qemu_read_identically() {
    let dir = TempDir::new().unwrap();
    let base = dir.path().join("base.raw");
    patterned_raw(&base, 2 << 20, 5);
    let mid = dir.path().join("mid.qcow2");
    // Larger than its backing file: the tail reads as zeros.
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&mid),
            "3M",
        ],
    );
    qemu_io(&mid, "qcow2", "write -P 0x5a 100k 300k");
    qemu_io(&mid, "qcow2", "write -P 0x11 2000k 200k");
    let top = dir.path().join("top.qcow2");
    run_ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "-b",
            s(&mid),
            "-F",
            "qcow2",
            s(&top),
        ],
    );
    qemu_io(&top, "qcow2", "write -P 0x77 250k 10k");
    qemu_io(&top, "qcow2", "write -z 1m 128k");
    qemu_io(&top, "qcow2", "discard 1536k 64k");
    qemu_io(&top, "qcow2", "write -P 0x33 1537k 1k");

    assert_same_as_qemu(&mid, dir.path());
    let ours = assert_same_as_qemu(&top, dir.path());
    assert!(ours[1 << 20..(1 << 20) + (128 << 10)]
        .iter()
        .all(|&b| b == 0));

    let chain = boxlet_qcow2::resolve_chain(&top, None).unwrap();
    let formats: Vec<_> = chain.iter().map(|l| l.format).collect();
    assert_eq!(
        formats,
        [
            BackingFormat::Qcow2,
            BackingFormat::Qcow2,
            BackingFormat::Raw
        ]
    );
}

#[test]
fn preallocated_and_lazy_refcount_images_read_and_write() {
    let dir = TempDir::new().unwrap();
    for opts in [
        "preallocation=metadata",
        "lazy_refcounts=on",
        "preallocation=metadata,compat=0.10",
        "preallocation=falloc",
    ] {
        let img = dir.path().join("p.qcow2");
        let _ = std::fs::remove_file(&img);
        run_ok(
            "qemu-img",
            &["create", "-f", "qcow2", "-o", opts, s(&img), "4M"],
        );
        qemu_io(&img, "qcow2", "write -P 0x42 123k 77k");
        let mut data = assert_same_as_qemu(&img, dir.path());
        let mut q = open_rw(&img);
        random_writes(&mut q, &mut data, &mut Rng::new(21), 30);
        drop(q);
        qemu_check_clean(&img);
        assert_eq!(assert_same_as_qemu(&img, dir.path()), data, "{opts}");
    }
}

struct Config {
    cluster_bits: u32,
    version: u32,
    refcount_order: u32,
    backing: Option<BackingFormat>,
}

fn boxlet_image(dir: &Path, c: &Config, size: u64) -> (PathBuf, Vec<u8>) {
    let name = format!(
        "b-{}-{}-{}-{:?}.qcow2",
        c.cluster_bits, c.version, c.refcount_order, c.backing
    );
    let img = dir.join(name);
    let mut model = vec![0u8; size as usize];
    let backing = c.backing.map(|fmt| {
        let raw = dir.join("backing.raw");
        // A backing file shorter than the overlay: its tail reads as zeros.
        let data = patterned_raw(&raw, (size - size / 4) as usize, 9);
        model[..data.len()].copy_from_slice(&data);
        match fmt {
            BackingFormat::Raw => ("backing.raw".to_owned(), fmt),
            BackingFormat::Qcow2 => {
                let q = dir.join("backing.qcow2");
                let _ = std::fs::remove_file(&q);
                run_ok(
                    "qemu-img",
                    &["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&q)],
                );
                ("backing.qcow2".to_owned(), fmt)
            }
        }
    });
    let opts = CreateOptions {
        size: Some(size),
        cluster_bits: c.cluster_bits,
        version: c.version,
        refcount_order: c.refcount_order,
        backing,
        lazy_refcounts: false,
    };
    create(&img, &opts).unwrap();
    qemu_check_clean(&img);
    (img, model)
}

#[test]
fn boxlet_images_pass_qemu_check_and_compare_after_random_writes() {
    let dir = TempDir::new().unwrap();
    let mut seed = 100;
    for cluster_bits in [9, 12, 16] {
        for version in [2, 3] {
            for backing in [None, Some(BackingFormat::Raw), Some(BackingFormat::Qcow2)] {
                for refcount_order in if version == 3 { vec![0, 4, 6] } else { vec![4] } {
                    let c = Config {
                        cluster_bits,
                        version,
                        refcount_order,
                        backing,
                    };
                    let (img, mut model) = boxlet_image(dir.path(), &c, 3 << 20);
                    let mut q = open_rw(&img);
                    seed += 1;
                    random_writes(&mut q, &mut model, &mut Rng::new(seed), 50);
                    drop(q);
                    qemu_check_clean(&img);
                    let reference = dir.path().join("reference.raw");
                    std::fs::write(&reference, &model).unwrap();
                    let out = run(
                        "qemu-img",
                        &[
                            "compare",
                            "-f",
                            "raw",
                            "-F",
                            "qcow2",
                            s(&reference),
                            s(&img),
                        ],
                    );
                    assert!(
                        out.status.success(),
                        "qemu-img compare, cluster_bits {cluster_bits} v{version} order {refcount_order} {backing:?}: {}",
                        String::from_utf8_lossy(&out.stdout)
                    );
                    std::fs::remove_file(&img).unwrap();
                }
            }
        }
    }
}

#[test]
fn refcount_table_grows_when_the_image_outgrows_it() {
    let dir = TempDir::new().unwrap();
    // 512-byte clusters with 64-bit refcounts: one table cluster covers 2 MiB of file.
    let img = dir.path().join("grow.qcow2");
    let opts = CreateOptions {
        cluster_bits: 9,
        refcount_order: 6,
        ..CreateOptions::standalone(16 << 20)
    };
    create(&img, &opts).unwrap();
    let table_before = Qcow2::open(&img).unwrap().header().refcount_table_offset;
    let mut q = open_rw(&img);
    let mut data = vec![0u8; 6 << 20];
    Rng::new(1).fill(&mut data);
    q.write_at(&data, 1 << 20).unwrap();
    q.flush().unwrap();
    assert_ne!(
        q.header().refcount_table_offset,
        table_before,
        "table moved"
    );
    drop(q);
    qemu_check_clean(&img);
    let out = export(&img);
    assert_eq!(&out[1 << 20..7 << 20], &data[..]);
}

#[test]
fn qemu_writes_into_a_boxlet_overlay_and_boxlet_reads_them() {
    let dir = TempDir::new().unwrap();
    let base = dir.path().join("base.raw");
    patterned_raw(&base, 1 << 20, 77);
    let img = dir.path().join("ov.qcow2");
    create(
        &img,
        &CreateOptions::overlay("base.raw", BackingFormat::Raw),
    )
    .unwrap();
    let info = run_ok("qemu-img", &["info", s(&img)]);
    assert!(info.contains("backing file: base.raw"), "{info}");
    assert!(info.contains("backing file format: raw"), "{info}");
    assert!(info.contains("virtual size: 1 MiB"), "{info}");
    qemu_io(&img, "qcow2", "write -P 0x61 3k 70k");
    qemu_check_clean(&img);
    assert_same_as_qemu(&img, dir.path());
}
