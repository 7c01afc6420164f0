//! Crash drill for the store's tests: run one operation and die (abort, as a kill would)
//! the `nth` time it reaches `step`.
//!
//! `crash_drill ROOT ingest|gc STEP NTH`
//! - `ingest`: ingest [`drill_content`] (several chunks) under a lease, then record it as
//!   image `drill`.
//! - `gc`: forget image `b`, then collect garbage.
//!
//! Exits 0 when the step was never reached `nth` times.

use std::sync::atomic::{AtomicU32, Ordering};

use boxlet_cas::{unix_now, Algorithm, FaultHook, ImageRecord, Step, Store, StoreOptions};

/// 3.5 MiB of deterministic bytes: four ingest chunks.
fn drill_content() -> Vec<u8> {
    (0..(7u32 << 19))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, root, op, step, nth] = args.as_slice() else {
        eprintln!("usage: crash_drill ROOT ingest|gc STEP NTH");
        std::process::exit(2);
    };
    let step = Step::from_name(step).unwrap_or_else(|| panic!("unknown step {step}"));
    let nth: u32 = nth.parse().expect("NTH is a number");
    let hits = AtomicU32::new(0);
    let fault = FaultHook::new(move |s| {
        if s == step && hits.fetch_add(1, Ordering::SeqCst) + 1 == nth {
            std::process::abort();
        }
        true
    });
    let store = Store::open_with(root, StoreOptions { fault }).expect("open");
    match op.as_str() {
        "ingest" => {
            let lease = store.lease();
            let data = drill_content();
            let blob = store
                .ingest_bytes(&data, Algorithm::Sha256, None, &lease)
                .expect("ingest");
            let config = store
                .ingest_bytes(b"{}", Algorithm::Sha256, None, &lease)
                .expect("ingest config");
            store
                .put_image(&ImageRecord {
                    reference: "drill".into(),
                    index: None,
                    manifest: config.digest,
                    config: config.digest,
                    layers: vec![blob.digest],
                    platform: "linux/amd64".into(),
                    created_at: unix_now(),
                })
                .expect("put image");
        }
        "gc" => {
            store.remove_image("b").expect("remove image b");
            store.gc().expect("gc");
        }
        other => panic!("unknown operation {other}"),
    }
}
