//! Embed the guest agent's sha256 when the build knows the agent ($BOXLET_AGENT), so the
//! runtime's version keys come from build time and an agent swapped after the build is
//! caught (`GuestRootfsManager`), as the seed does. Without it the runtime hashes the
//! agent it finds.

use std::io::Read;

fn main() {
    println!("cargo:rerun-if-env-changed=BOXLET_AGENT");
    let Some(agent) = std::env::var_os("BOXLET_AGENT") else {
        return;
    };
    let path = std::path::PathBuf::from(agent);
    println!("cargo:rerun-if-changed={}", path.display());
    let Ok(mut file) = std::fs::File::open(&path) else {
        return;
    };
    use sha2::Digest as _;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => hasher.update(&buf[..n]),
            Err(_) => return,
        }
    }
    let hex: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    println!("cargo:rustc-env=BOXLET_GUEST_HASH={hex}");
}
