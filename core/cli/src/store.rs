//! `boxlet store verify|gc|du`: the content-addressed store under `$BOXLET_HOME`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use boxlet::rootfs::Home;
use boxlet_cas::Store;
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum StoreCommand {
    /// Re-hash every blob and check the index against files and records (exit 1 on a
    /// problem; nothing is changed).
    Verify {
        /// Print a JSON report.
        #[arg(long)]
        json: bool,
    },
    /// Remove the rootfs caches of removed images (extracted trees, unpacked layers, image
    /// disks, and bases no box uses), then blobs no image or box names and files the
    /// index does not list.
    Gc {
        /// Print a JSON report.
        #[arg(long)]
        json: bool,
    },
    /// Ingest a file as a blob and print its digest (benchmarks and debugging: GC removes
    /// blobs no image or box names).
    Ingest {
        /// The file.
        file: PathBuf,
        /// The digest algorithm.
        #[arg(long, value_enum, default_value = "sha256")]
        alg: Alg,
    },
    /// What the store occupies.
    Du {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Alg {
    Sha256,
    Blake3,
}

/// Open the store at boxlet's home.
pub fn open() -> Result<Store> {
    open_in(&Home::from_env()?)
}

/// Open the store of `home`.
fn open_in(home: &Home) -> Result<Store> {
    Store::open(home.root())
        .with_context(|| format!("opening the store at {}", home.root().display()))
}

/// `1.5 MiB`-style sizes.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

pub fn run(cmd: StoreCommand) -> Result<ExitCode> {
    let home = Home::from_env()?;
    let store = open_in(&home)?;
    match cmd {
        StoreCommand::Verify { json } => {
            let report = store.verify()?;
            let problems: Vec<String> = report.problems.iter().map(ToString::to_string).collect();
            if json {
                let doc = serde_json::json!({
                    "blobs": report.blobs,
                    "bytes": report.bytes,
                    "problems": problems,
                });
                println!("{doc:#}");
            } else {
                for p in &problems {
                    println!("problem: {p}");
                }
                println!(
                    "{} blobs ({}) checked, {} problems",
                    report.blobs,
                    human(report.bytes),
                    problems.len()
                );
            }
            Ok(if problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        StoreCommand::Gc { json } => {
            // Caches first: a base disk's record can hold a blob alive.
            let c = boxlet::rootfs::collect_caches(&home, &store, &store)?;
            let r = store.gc()?;
            if json {
                let doc = serde_json::json!({
                    "blobs_removed": r.blobs_removed,
                    "bytes_freed": r.bytes_freed,
                    "orphans_removed": r.orphans_removed,
                    "blobs_kept": r.blobs_kept,
                    "caches": c,
                });
                println!("{doc:#}");
            } else {
                println!(
                    "removed {} blobs ({}) and {} orphan files; {} blobs kept",
                    r.blobs_removed,
                    human(r.bytes_freed),
                    r.orphans_removed,
                    r.blobs_kept
                );
                println!(
                    "removed caches of removed images: {} extracted trees, {} layers, {} image \
                     disks, {} bases ({})",
                    c.trees,
                    c.layers,
                    c.image_disks,
                    c.bases,
                    human(c.bytes)
                );
                for k in &c.kept {
                    println!("kept {k}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        StoreCommand::Ingest { file, alg } => {
            let alg = match alg {
                Alg::Sha256 => boxlet_cas::Algorithm::Sha256,
                Alg::Blake3 => boxlet_cas::Algorithm::Blake3,
            };
            let mut f = std::fs::File::open(&file)
                .with_context(|| format!("opening {}", file.display()))?;
            let info = store.ingest(&mut f, alg, None, &store.lease())?;
            println!("{} {}", info.digest, info.size);
            Ok(ExitCode::SUCCESS)
        }
        StoreCommand::Du { json } => {
            let u = store.usage()?;
            if json {
                let doc = serde_json::json!({
                    "home": store.root(),
                    "blobs": u.blobs,
                    "blob_bytes": u.blob_bytes,
                    "blob_disk_bytes": u.blob_disk_bytes,
                    "tmp_bytes": u.tmp_bytes,
                    "index_bytes": u.index_bytes,
                    "images": u.images,
                    "boxes": u.boxes,
                    "base_disks": u.base_disks,
                });
                println!("{doc:#}");
            } else {
                println!("store      {}", store.root().display());
                println!(
                    "blobs      {} ({}, {} on disk)",
                    u.blobs,
                    human(u.blob_bytes),
                    human(u.blob_disk_bytes)
                );
                println!("index      {}", human(u.index_bytes));
                println!("tmp        {}", human(u.tmp_bytes));
                println!(
                    "records    {} images, {} boxes, {} base disks",
                    u.images, u.boxes, u.base_disks
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}
