//! Crash safety: fail or kill the process at every step of ingest and GC, reopen, and
//! check that everything committed is intact and indexed, nothing half-written is
//! visible, and leftovers are swept.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use boxlet_cas::{Algorithm, CasError, FaultHook, ImageRecord, Problem, Step, Store, StoreOptions};
use common::{entries, image, put};

/// The steps of each drill, with how many times the drill reaches each.
const INGEST_STEPS: [(Step, u32); 7] = [
    (Step::IngestCreated, 2),
    (Step::IngestChunk, 5),
    (Step::IngestWritten, 2),
    (Step::IngestSynced, 2),
    (Step::IngestRenamed, 2),
    (Step::IngestDirSynced, 2),
    (Step::IngestCommitted, 2),
];
const GC_STEPS: [(Step, u32); 3] = [
    (Step::GcMarked, 1),
    (Step::GcIndexSwept, 1),
    (Step::GcFileRemoved, 4),
];

/// A store with images `a` and `b`, a blob nobody names, and an orphan file.
fn prepare(root: &Path) -> ImageRecord {
    let store = Store::open(root).unwrap();
    let a = image(&store, "a", &[b"layer of a", &[1u8; 300_000]]);
    image(&store, "b", &[b"layer of b"]);
    put(&store, b"nobody names this");
    std::fs::write(root.join("blobs/sha256").join("f".repeat(64)), b"orphan").unwrap();
    a
}

/// Reopen after a crash and check the store: committed content intact, nothing
/// half-written visible, leftovers swept by open and GC.
fn check_recovers(root: &Path, a: &ImageRecord, drill: &str) {
    let store = Store::open(root).unwrap_or_else(|e| panic!("{drill}: reopening: {e}"));
    assert!(
        entries(&root.join("tmp")).is_empty(),
        "{drill}: tmp/ not swept"
    );
    let report = store.verify().unwrap();
    for p in &report.problems {
        assert!(matches!(p, Problem::Orphan(_)), "{drill}: {p}");
    }
    assert_eq!(
        store.image("a").unwrap().as_ref(),
        Some(a),
        "{drill}: image a lost"
    );
    for d in a.blobs() {
        assert_eq!(
            store.read_blob(d, 1 << 20).unwrap().len() as u64,
            store.stat(d).unwrap().unwrap().size
        );
    }
    if let Some(drill_image) = store.image("drill").unwrap() {
        for d in drill_image.blobs() {
            assert!(
                store.contains(d).unwrap(),
                "{drill}: image drill names a missing blob"
            );
        }
    }
    store.gc().unwrap();
    let after = store.verify().unwrap();
    assert!(
        after.problems.is_empty(),
        "{drill}: after GC: {:?}",
        after.problems
    );
    let live = store.live_blobs().unwrap();
    assert_eq!(
        store.list_blobs().unwrap().len(),
        live.len(),
        "{drill}: garbage survived GC"
    );
    assert_eq!(
        entries(&root.join("blobs/sha256")).len() + entries(&root.join("blobs/blake3")).len(),
        live.len(),
        "{drill}: files beside the index after GC"
    );
}

/// Run a drill's operation in this process, failing it at the `nth` time it reaches
/// `step`.
fn fail_in_process(root: &Path, op: &str, step: Step, nth: u32) {
    let hits = Arc::new(AtomicU32::new(0));
    let fault =
        FaultHook::new(move |s| !(s == step && hits.fetch_add(1, Ordering::SeqCst) + 1 == nth));
    let store = Store::open_with(root, StoreOptions { fault }).unwrap();
    let result = match op {
        "ingest" => {
            // The same steps as the drill's: a 3.5 MiB layer, a config, the record.
            let lease = store.lease();
            let data = vec![9u8; 7 << 19];
            store
                .ingest_bytes(&data, Algorithm::Sha256, None, &lease)
                .and_then(|layer| {
                    let config = store.ingest_bytes(b"{}", Algorithm::Sha256, None, &lease)?;
                    let mut rec = store.image("a").unwrap().unwrap();
                    rec.reference = "drill".into();
                    rec.config = config.digest;
                    rec.layers = vec![layer.digest];
                    store.put_image(&rec)
                })
        }
        _ => store.remove_image("b").and_then(|_| store.gc().map(drop)),
    };
    match result {
        Err(CasError::Fault(s)) => assert_eq!(s, step),
        other => panic!("{op} at {step:?} #{nth}: expected the injected fault, got {other:?}"),
    }
}

#[test]
fn a_failure_at_every_step_of_ingest_and_gc_loses_nothing_committed() {
    for (op, steps) in [("ingest", &INGEST_STEPS[..]), ("gc", &GC_STEPS[..])] {
        for &(step, times) in steps {
            for nth in 1..=times {
                let dir = tempfile::tempdir().unwrap();
                let a = prepare(dir.path());
                fail_in_process(dir.path(), op, step, nth);
                check_recovers(dir.path(), &a, &format!("{op} failing at {step:?} #{nth}"));
            }
        }
    }
}

fn drill_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/crash_drill");
    assert!(
        bin.is_file(),
        "{} is missing: `cargo test -p boxlet-cas` builds it (cargo builds examples for tests)",
        bin.display()
    );
    bin
}

#[test]
fn a_kill_at_every_step_of_ingest_and_gc_loses_nothing_committed() {
    let bin = drill_binary();
    for (op, steps) in [("ingest", &INGEST_STEPS[..]), ("gc", &GC_STEPS[..])] {
        for &(step, times) in steps {
            for nth in [1, times] {
                let dir = tempfile::tempdir().unwrap();
                let a = prepare(dir.path());
                let drill = format!("{op} killed at {step:?} #{nth}");
                let status = Command::new(&bin)
                    .arg(dir.path())
                    .args([op, &step.name(), &nth.to_string()])
                    .status()
                    .unwrap();
                assert!(
                    !status.success(),
                    "{drill}: the drill ran to its end without dying"
                );
                check_recovers(dir.path(), &a, &drill);
            }
        }
    }
}

#[test]
fn a_drill_that_is_never_killed_completes() {
    let dir = tempfile::tempdir().unwrap();
    let a = prepare(dir.path());
    let status = Command::new(drill_binary())
        .arg(dir.path())
        .args(["ingest", "GcMarked", "1"])
        .status()
        .unwrap();
    assert!(status.success());
    let store = Store::open(dir.path()).unwrap();
    let drill = store
        .image("drill")
        .unwrap()
        .expect("the drill's image is recorded");
    assert!(store.contains(&drill.layers[0]).unwrap());
    drop(store);
    check_recovers(dir.path(), &a, "uninterrupted ingest");
}
