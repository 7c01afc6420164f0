//! Finding the guest agent binary that belongs to this boxlet.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The agent: `$BOXLET_AGENT`, else `boxlet-guest` beside this executable, else the
/// static build in the same cargo target directory. It must report this boxlet's version.
pub fn find() -> Result<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("BOXLET_AGENT") {
        candidates.push(PathBuf::from(p));
    } else {
        let exe = std::env::current_exe()?;
        if let Some(dir) = exe.parent() {
            candidates.push(dir.join("boxlet-guest"));
            if let Some(target) = dir.parent() {
                for profile in ["guest", "release", "debug"] {
                    candidates.push(
                        target
                            .join("x86_64-unknown-linux-gnu")
                            .join(profile)
                            .join("boxlet-guest"),
                    );
                }
            }
        }
    }
    let Some(agent) = candidates.iter().find(|p| p.is_file()) else {
        bail!(
            "the guest agent was not found (looked at {}): build it with \
             `scripts/build-agent.sh` or set BOXLET_AGENT",
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    check_version(agent)?;
    Ok(agent.clone())
}

fn check_version(agent: &Path) -> Result<()> {
    let out = Command::new(agent)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", agent.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let want = format!("boxlet-guest {} ", env!("CARGO_PKG_VERSION"));
    if !text.starts_with(&want) {
        bail!(
            "{} reports {:?}; this boxlet needs {}",
            agent.display(),
            text.trim(),
            want.trim()
        );
    }
    Ok(())
}
