//! The agent-client and OCI-documents fuzz targets replayed as normal tests: their seeds
//! (each must reach the code it is for, so the targets fuzz the real thing) and whatever
//! `fuzz/corpus/<target>` and `fuzz/artifacts/<target>` hold from earlier runs.
//! `BOXLET_FUZZ_SEEDS_OUT=DIR` also writes the seeds to `DIR/<target>` (`make corpus`).

use std::path::{Path, PathBuf};

use boxlet::fuzz::{agent_client, agent_seeds};
use boxlet_oci::fuzz::{documents, documents_seeds, Reached};

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Write `seeds` where `make corpus` asks, and feed the target's stored corpus and
/// artifacts to `run`.
fn replay_stored(target: &str, seeds: &[Vec<u8>], run: impl Fn(&[u8])) {
    if let Some(out) = std::env::var_os("BOXLET_FUZZ_SEEDS_OUT") {
        let dir = Path::new(&out).join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, s) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), s).unwrap();
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    for sub in ["fuzz/corpus", "fuzz/artifacts"] {
        for f in files(&root.join(sub).join(target)) {
            // A running fuzzer may remove corpus files meanwhile.
            if let Ok(data) = std::fs::read(&f) {
                run(&data);
            }
        }
    }
}

#[test]
fn agent_client_seeds_reach_the_client_and_the_corpus_replays() {
    let seeds = agent_seeds();
    let results: Vec<Result<(), String>> = seeds.iter().map(|s| agent_client(s)).collect();
    // ping, ping answered with an error, run, exec, copy out of a hostile tree, copy out
    // of a top-level link.
    assert_eq!(results.len(), 6);
    assert_eq!(results[0], Ok(()));
    assert!(
        results[1].as_ref().unwrap_err().contains("no"),
        "{results:?}"
    );
    assert_eq!(results[2], Ok(()));
    assert_eq!(results[3], Ok(()));
    assert_eq!(
        results[4],
        Ok(()),
        "the hostile tree is copied, minus what it may not make"
    );
    assert!(
        results[5].is_err(),
        "a top-level link is refused: {results:?}"
    );
    replay_stored("agent_client", &seeds, |d| drop(agent_client(d)));
}

#[test]
fn oci_documents_seeds_reach_the_parsers_and_the_corpus_replays() {
    let seeds = documents_seeds();
    let reached: Vec<Reached> = seeds.iter().map(|s| documents(s)).collect();
    let only = |index, manifest, config, decompressed| Reached {
        index,
        manifest,
        config,
        decompressed,
    };
    assert_eq!(reached[0], only(false, true, false, 0), "a manifest");
    assert_eq!(reached[1], only(true, false, false, 0), "an index");
    assert_eq!(reached[2], only(false, false, true, 0), "a config");
    assert_eq!(
        reached[3],
        only(false, false, false, 0),
        "too many layers are refused"
    );
    // The bombs are read only as far as the target's cap, here the whole MiB.
    assert_eq!(reached[4].decompressed, 1 << 20, "gzip");
    assert_eq!(reached[5].decompressed, 1 << 20, "zstd");
    replay_stored("oci_documents", &seeds, |d| {
        documents(d);
    });
}
