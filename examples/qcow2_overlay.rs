//! A per-box overlay over a shared base disk, as the runtime makes one for every box:
//!
//!     cargo run -p boxlet-qcow2 --example qcow2_overlay -- /tmp/demo
use std::path::PathBuf;

use boxlet_qcow2::{create, BackingFormat, CreateOptions, OpenOptions, Qcow2};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "qcow2-demo".into()),
    );
    std::fs::create_dir_all(&dir)?;
    let base = dir.join("base.ext4");
    std::fs::write(&base, vec![0xb5u8; 4 << 20])?; // stands in for a cached ext4 base disk

    // A few clusters of metadata, no data copied, whatever the size of the base.
    let overlay = dir.join("box.qcow2");
    let _ = std::fs::remove_file(&overlay);
    create(
        &overlay,
        &CreateOptions::overlay("base.ext4", BackingFormat::Raw),
    )?;

    let opts = OpenOptions {
        writable: true,
        ..Default::default()
    };
    let mut disk = Qcow2::open_with(&overlay, opts)?;
    disk.write_at(b"hello", 1 << 20)?; // allocates a cluster, copies the rest from the base
    let mut buf = [0u8; 8];
    disk.read_at(&mut buf, (1 << 20) - 3)?;
    assert_eq!(&buf, b"\xb5\xb5\xb5hello");
    disk.discard(0, 65536)?; // reads as zeros from now on
    disk.flush()?; // durable, in crash-safe order

    println!(
        "{}: {} byte disk, {} byte file; base.ext4 untouched",
        overlay.display(),
        disk.virtual_size(),
        std::fs::metadata(&overlay)?.len()
    );
    Ok(())
}
