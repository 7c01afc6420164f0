//! Hot paths of the content store and the rootfs strategies: blob lookups and small
//! ingests, and what a new box costs once its image is cached (a warm prepare) for each
//! strategy. Needs the busybox OCI fixture (fixtures/oci/busybox-image.sh) and root (the
//! overlay strategy mounts).

use std::hint::black_box;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use boxlet::rootfs::{
    AgentBinary, DiskStrategy, ExtractedStrategy, Home, OverlayStrategy, PrepareRequest,
};
use boxlet::RootfsStrategy;
use boxlet_cas::{Algorithm, BoxId, Digest, Store};
use criterion::{criterion_group, criterion_main, Criterion};

fn busybox_layout() -> PathBuf {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../fixtures/oci/busybox-image.sh"
    );
    let out = Command::new("bash").arg(script).output().unwrap();
    assert!(out.status.success(), "{script} failed: run `make setup`");
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()).join("layout")
}

fn scratch() -> tempfile::TempDir {
    tempfile::TempDir::new_in(
        std::env::var("BOXLET_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into()),
    )
    .unwrap()
}

fn store_paths(c: &mut Criterion) {
    let dir = scratch();
    let store = Store::open(dir.path()).unwrap();
    let lease = store.lease();
    let known = store
        .ingest_bytes(b"a blob", Algorithm::Sha256, None, &lease)
        .unwrap()
        .digest;
    let mut g = c.benchmark_group("store");
    g.bench_function("stat of a stored blob", |b| {
        b.iter(|| black_box(store.stat(&known).unwrap()))
    });
    g.bench_function("digest parse", |b| {
        let s = known.to_string();
        b.iter(|| black_box(s.parse::<Digest>().unwrap()))
    });
    let mut n = 0u64;
    g.bench_function("ingest 4 KiB (hash, write, fsync, rename, index)", |b| {
        b.iter(|| {
            n += 1;
            let mut data = vec![0u8; 4096];
            data[..8].copy_from_slice(&n.to_le_bytes());
            black_box(
                store
                    .ingest_bytes(&data, Algorithm::Sha256, None, &lease)
                    .unwrap(),
            )
        })
    });
    g.finish();
}

fn warm_prepares(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = scratch();
    let home = Home::new(dir.path().join("home"));
    let store = Arc::new(Store::open(home.root()).unwrap());
    boxlet_oci::import_layout(&store, &busybox_layout(), Some("busybox:1")).unwrap();
    let agent = dir.path().join("agent");
    std::fs::write(&agent, b"#!/bin/sh\n").unwrap();
    let strategies: Vec<Box<dyn RootfsStrategy>> = vec![
        Box::new(
            DiskStrategy::new(
                home.clone(),
                store.clone(),
                AgentBinary {
                    path: agent,
                    build_hash: None,
                },
            )
            .unwrap(),
        ),
        Box::new(ExtractedStrategy::new(home.clone(), store.clone()).unwrap()),
        Box::new(OverlayStrategy::new(home.clone(), store.clone(), false).unwrap()),
    ];
    let mut g = c.benchmark_group("new box, image cached (busybox)");
    g.sample_size(30);
    for s in &strategies {
        let req = |id| PrepareRequest {
            image: Some("busybox:1".into()),
            box_id: id,
        };
        // Fill the caches first.
        let first = rt.block_on(s.prepare(&req(BoxId::mint()))).unwrap();
        // The prepare is timed; removing the box again is not.
        g.bench_function(s.name(), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let r = rt.block_on(s.prepare(&req(BoxId::mint()))).unwrap();
                    total += t.elapsed();
                    rt.block_on(s.cleanup(&r)).unwrap();
                }
                total
            })
        });
        rt.block_on(s.cleanup(&first)).unwrap();
    }
    g.finish();
}

criterion_group!(benches, store_paths, warm_prepares);
criterion_main!(benches);
