//! Pull an image into a content store and unpack it into a directory.
//!
//! `cargo run -p boxlet-oci --example pull_image -- HOME REFERENCE DIR [--insecure]`
//! e.g. `... -- /tmp/store 127.0.0.1:5000/boxlet/busybox:latest /tmp/rootfs --insecure`

use std::sync::Arc;

use boxlet_cas::Store;
use boxlet_oci::{pull, unpack, ApplyOptions, PullOptions, Quiet};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, home, reference, dir, rest @ ..] = args.as_slice() else {
        eprintln!("usage: pull_image HOME REFERENCE DIR [--insecure]");
        std::process::exit(2);
    };
    // One store per home: blobs verified by digest, a redb index, crash-safe.
    let store = Store::open(home)?;
    let opts = PullOptions {
        insecure: rest.iter().any(|a| a == "--insecure"),
        ..PullOptions::default()
    };
    let report = pull(&store, reference, &opts, Arc::new(Quiet)).await?;
    println!(
        "{} {} ({} blobs fetched, {} already stored)",
        report.image.reference, report.image.manifest, report.fetched, report.reused
    );
    // Layers applied bottom first, each checked against its diff ID; nothing written
    // outside `dir`, whatever the layers contain.
    let applied = unpack(&store, reference, dir.as_ref(), &ApplyOptions::default())?;
    println!(
        "{dir}: {} files, {} symlinks",
        applied.files, applied.symlinks
    );
    Ok(())
}
