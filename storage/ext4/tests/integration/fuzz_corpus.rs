//! Replay the reader fuzz target's corpus as a normal test: the seeds
//! `fixtures/ext4/make-corpus.sh` makes, the regressions in `fixtures/ext4/regressions/`,
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

/// The repository root, and a directory holding the seeds `make-corpus.sh` writes.
fn make_seeds() -> (std::path::PathBuf, tempfile::TempDir) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let seeds = tempfile::TempDir::new().unwrap();
    let status = Command::new("bash")
        .arg(root.join("fixtures/ext4/make-corpus.sh"))
        .arg(seeds.path())
        .status()
        .expect("run make-corpus.sh");
    assert!(status.success(), "make-corpus.sh failed");
    (root, seeds)
}

#[test]
fn ext4_reader_corpus() {
    let (root, seeds) = make_seeds();
    let generated = files(&seeds.path().join("ext4_reader"));
    assert!(
        generated.len() >= 7,
        "make-corpus.sh wrote {} seeds",
        generated.len()
    );
    // The seeds are valid images: the reader must walk every one of them.
    for f in &generated {
        let fs = boxlet_ext4::Ext4::new(Box::new(std::fs::read(f).unwrap())).unwrap();
        assert!(fs.walk().unwrap().len() > 40, "{}", f.display());
    }
    let mut all = generated;
    all.extend(files(&root.join("fixtures/ext4/regressions")));
    all.extend(files(&root.join("fuzz/corpus/ext4_reader")));
    all.extend(files(&root.join("fuzz/artifacts/ext4_reader")));
    for f in &all {
        // A running fuzzer may remove corpus files meanwhile.
        if let Ok(data) = std::fs::read(f) {
            boxlet_ext4::fuzz::reader(&data);
        }
    }
}

#[test]
fn ext4_layers_corpus() {
    let (root, seeds) = make_seeds();
    let generated = files(&seeds.path().join("ext4_layers"));
    assert_eq!(generated.len(), 3, "make-corpus.sh layer seeds");
    let mut all = generated;
    all.extend(files(&root.join("fuzz/corpus/ext4_layers")));
    all.extend(files(&root.join("fuzz/artifacts/ext4_layers")));
    for f in &all {
        if let Ok(data) = std::fs::read(f) {
            boxlet_ext4::fuzz::layers(&data);
        }
    }
}
