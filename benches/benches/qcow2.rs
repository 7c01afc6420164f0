//! qcow2 engine against a raw file and against imago (the qcow2 engine libkrun uses), on
//! the same fully allocated image, side by side: 4 KiB sequential and random reads and
//! writes, first writes to unallocated clusters of an overlay, and overlay creation.

use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use boxlet_benches::{make_raw, random_offsets};
use boxlet_qcow2::{
    create, create_on, image_size, BackingFormat, CreateOptions, OpenOptions as QOpen, Qcow2,
};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use imago::{FormatAccess, FormatDriverBuilder, PermissiveImplicitOpenGate};

const SIZE: u64 = 256 << 20;
const BS: usize = 4096;

struct Fixture {
    _dir: tempfile::TempDir,
    raw: std::path::PathBuf,
    qcow2: std::path::PathBuf,
    base_dir: std::path::PathBuf,
}

/// A raw file of random bytes and a qcow2 image (64 KiB clusters) holding the same bytes,
/// every cluster allocated.
fn fixture() -> Fixture {
    let dir = tempfile::TempDir::new_in(
        std::env::var("BOXLET_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()),
    )
    .unwrap();
    let raw = dir.path().join("disk.raw");
    make_raw(&raw, SIZE).unwrap();
    let qcow2 = dir.path().join("disk.qcow2");
    create(&qcow2, &CreateOptions::standalone(SIZE)).unwrap();
    let mut img = Qcow2::open_with(
        &qcow2,
        QOpen {
            writable: true,
            ..Default::default()
        },
    )
    .unwrap();
    let src = File::open(&raw).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..SIZE).step_by(buf.len()) {
        src.read_exact_at(&mut buf, off).unwrap();
        img.write_at(&buf, off).unwrap();
    }
    img.flush().unwrap();
    drop(img);
    // Let writeback of the fixtures finish before anything is timed.
    File::open(&raw).unwrap().sync_all().unwrap();
    let base_dir = dir.path().to_path_buf();
    Fixture {
        raw,
        qcow2,
        base_dir,
        _dir: dir,
    }
}

fn open_imago(path: &Path, write: bool) -> FormatAccess<imago::file::File> {
    // imago built with its `sync` feature: the API is synchronous, no runtime involved.
    let q = imago::qcow2::Qcow2::<imago::file::File>::builder_path(path)
        .write(write)
        .open(PermissiveImplicitOpenGate::default())
        .unwrap();
    FormatAccess::new(q)
}

fn offsets(random: bool, n: usize) -> Vec<u64> {
    if random {
        random_offsets(SIZE, n, 42)
    } else {
        (0..n as u64).map(|i| (i * BS as u64) % SIZE).collect()
    }
}

fn reads(c: &mut Criterion, f: &Fixture) {
    for random in [false, true] {
        let name = if random {
            "read_4k_random"
        } else {
            "read_4k_sequential"
        };
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Bytes(BS as u64));
        let offs = offsets(random, 1 << 16);
        let mut buf = vec![0u8; BS];

        let raw = File::open(&f.raw).unwrap();
        let mut i = 0;
        g.bench_function("raw_file", |b| {
            b.iter(|| {
                raw.read_exact_at(&mut buf, offs[i % offs.len()]).unwrap();
                i += 1;
                black_box(&buf);
            })
        });

        let mut img = Qcow2::open(&f.qcow2).unwrap();
        let mut i = 0;
        g.bench_function("boxlet", |b| {
            b.iter(|| {
                img.read_at(&mut buf, offs[i % offs.len()]).unwrap();
                i += 1;
                black_box(&buf);
            })
        });

        let im = open_imago(&f.qcow2, false);
        let mut i = 0;
        g.bench_function("imago", |b| {
            b.iter(|| {
                im.read(&mut buf[..], offs[i % offs.len()]).unwrap();
                i += 1;
                black_box(&buf);
            })
        });
        g.finish();
    }
}

fn writes(c: &mut Criterion, f: &Fixture) {
    for random in [false, true] {
        let name = if random {
            "write_4k_random"
        } else {
            "write_4k_sequential"
        };
        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Bytes(BS as u64));
        let offs = offsets(random, 1 << 16);
        let buf = vec![0x5au8; BS];

        let raw = OpenOptions::new().write(true).open(&f.raw).unwrap();
        let mut i = 0;
        g.bench_function("raw_file", |b| {
            b.iter(|| {
                raw.write_all_at(&buf, offs[i % offs.len()]).unwrap();
                i += 1;
            })
        });

        let mut img = Qcow2::open_with(
            &f.qcow2,
            QOpen {
                writable: true,
                ..Default::default()
            },
        )
        .unwrap();
        let mut i = 0;
        g.bench_function("boxlet", |b| {
            b.iter(|| {
                img.write_at(&buf, offs[i % offs.len()]).unwrap();
                i += 1;
            })
        });
        drop(img);

        let im = open_imago(&f.qcow2, true);
        let mut i = 0;
        g.bench_function("imago", |b| {
            b.iter(|| {
                im.write(&buf[..], offs[i % offs.len()]).unwrap();
                i += 1;
            })
        });
        g.finish();
    }
}

/// First 4 KiB write into each of `n` unallocated clusters of a fresh overlay over the
/// raw disk: allocation, copy of the rest of the cluster from the backing file, metadata.
fn allocating_writes(c: &mut Criterion, f: &Fixture) {
    let mut g = c.benchmark_group("write_4k_allocating");
    g.throughput(Throughput::Bytes(BS as u64));
    let buf = vec![0x77u8; BS];
    let mut round = 0u32;
    let fresh = |round: &mut u32| {
        *round += 1;
        let p = f.base_dir.join(format!("ov{round}.qcow2"));
        let _ = std::fs::remove_file(&p);
        create(&p, &CreateOptions::overlay("disk.raw", BackingFormat::Raw)).unwrap();
        p
    };
    g.bench_function("boxlet", |b| {
        b.iter_custom(|iters| {
            let p = fresh(&mut round);
            let mut img = Qcow2::open_with(
                &p,
                QOpen {
                    writable: true,
                    ..Default::default()
                },
            )
            .unwrap();
            let clusters = SIZE / 65536;
            let start = Instant::now();
            for i in 0..iters {
                img.write_at(&buf, (i % clusters) * 65536).unwrap();
            }
            img.flush().unwrap();
            let t = start.elapsed();
            drop(img);
            std::fs::remove_file(&p).unwrap();
            t
        })
    });
    g.bench_function("imago", |b| {
        b.iter_custom(|iters| {
            let p = fresh(&mut round);
            let im = open_imago(&p, true);
            let clusters = SIZE / 65536;
            let start = Instant::now();
            for i in 0..iters {
                im.write(&buf[..], (i % clusters) * 65536).unwrap();
            }
            // boxlet's flush makes the writes durable; imago's needs a sync for that.
            im.flush().unwrap();
            im.sync().unwrap();
            let t = start.elapsed();
            drop(im);
            std::fs::remove_file(&p).unwrap();
            t
        })
    });
    g.finish();
}

fn overlay_creation(c: &mut Criterion, f: &Fixture) {
    let mut g = c.benchmark_group("overlay_create");
    let mut n = 0u64;
    for (label, fsync) in [("before_fsync", false), ("with_fsync", true)] {
        g.bench_function(BenchmarkId::new("boxlet", label), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    n += 1;
                    let p = f.base_dir.join(format!("c{n}.qcow2"));
                    let start = Instant::now();
                    if fsync {
                        create(&p, &CreateOptions::overlay("disk.raw", BackingFormat::Raw))
                            .unwrap();
                    } else {
                        // Everything `create` does but the final fsync.
                        let size = image_size(&f.raw, BackingFormat::Raw).unwrap();
                        let mut file = OpenOptions::new()
                            .read(true)
                            .write(true)
                            .create_new(true)
                            .open(&p)
                            .unwrap();
                        let opts = CreateOptions {
                            size: Some(size),
                            ..CreateOptions::overlay("disk.raw", BackingFormat::Raw)
                        };
                        create_on(&mut file, &opts).unwrap();
                    }
                    total += start.elapsed();
                    std::fs::remove_file(&p).unwrap();
                }
                total
            })
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    let f = fixture();
    reads(c, &f);
    writes(c, &f);
    allocating_writes(c, &f);
    overlay_creation(c, &f);
}

criterion_group! {
    name = qcow2;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    targets = benches
}
criterion_main!(qcow2);
