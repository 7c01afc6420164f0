//! Replay the fuzz targets' corpora as a normal test: the seeds that
//! `fixtures/qcow2/make-corpus.sh` generates, the regressions in `fixtures/qcow2/regressions/`,
//! and whatever `fuzz/corpus/` and `fuzz/artifacts/` hold from earlier fuzzing runs.

use std::path::{Path, PathBuf};
use std::process::Command;

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

fn replay(target: &str, body: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let seeds = tempfile::TempDir::new().unwrap();
    let status = Command::new("bash")
        .arg(root.join("fixtures/qcow2/make-corpus.sh"))
        .arg(seeds.path())
        .status()
        .expect("run make-corpus.sh");
    assert!(status.success(), "make-corpus.sh failed");
    let generated = files(&seeds.path().join(target));
    assert!(
        generated.len() >= 10,
        "make-corpus.sh wrote {} {target} seeds",
        generated.len()
    );
    let mut all = generated;
    all.extend(files(&root.join("fuzz/corpus").join(target)));
    all.extend(files(&root.join("fuzz/artifacts").join(target)));
    // Inputs that once crashed a target, kept as regression tests (the engine's input
    // format is a superset of the header's: both bodies run on them).
    all.extend(files(&root.join("fixtures/qcow2/regressions")));
    for f in &all {
        // A running fuzzer may remove corpus files meanwhile.
        if let Ok(data) = std::fs::read(f) {
            body(&data);
        }
    }
}

#[test]
fn qcow2_header_corpus() {
    replay("qcow2_header", boxlet_qcow2::fuzz::header);
}

#[test]
fn qcow2_engine_corpus() {
    replay("qcow2_engine", boxlet_qcow2::fuzz::engine);
}
