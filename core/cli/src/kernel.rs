//! `boxlet kernel build|path`: the guest kernel, built from Debian's linux-source-6.1 by
//! the script in fixtures/kernel (embedded here) and cached by the hash of its config.

use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};

use anyhow::{bail, Context, Result};
use clap::Subcommand;

const BUILD_SH: &str = include_str!("../../../fixtures/kernel/build.sh");
const GUEST_CONFIG: &str = include_str!("../../../fixtures/kernel/guest.config");

#[derive(Debug, Subcommand)]
pub enum KernelCommand {
    /// Build the guest kernel (about 6 minutes on 2 cores), or reuse the cached one.
    Build,
    /// Print the cached guest kernel's path (fails when it is not built).
    Path,
}

/// Run the embedded build script; with `build` false it only looks in the cache.
fn run_script(build: bool) -> Result<PathBuf> {
    let dir = tempfile::tempdir()?;
    let script = dir.path().join("build.sh");
    let config = dir.path().join("guest.config");
    std::fs::write(&script, BUILD_SH)?;
    std::fs::write(&config, GUEST_CONFIG)?;
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .arg(&config)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if !build {
        cmd.env("BOXLET_KERNEL_CACHED_ONLY", "1");
    }
    // The script's progress goes to our stderr; its one line of output is the path.
    let out = cmd.output().context("running the kernel build script")?;
    if !out.status.success() {
        bail!(
            "{}",
            if build {
                "the kernel build failed (see above)"
            } else {
                "no guest kernel built yet: run `boxlet kernel build` (or pass --kernel)"
            }
        );
    }
    let path = String::from_utf8(out.stdout)?.trim().to_string();
    Ok(PathBuf::from(path))
}

/// The kernel to boot: `--kernel`, else `$BOXLET_KERNEL`, else the cached build.
pub fn resolve(given: Option<PathBuf>) -> Result<PathBuf> {
    if let Some(k) = given.or_else(|| std::env::var_os("BOXLET_KERNEL").map(PathBuf::from)) {
        if !k.is_file() {
            bail!("kernel {}: no such file", k.display());
        }
        return Ok(k);
    }
    run_script(false)
}

pub fn run(cmd: KernelCommand) -> Result<ExitCode> {
    let p = match cmd {
        KernelCommand::Build => run_script(true)?,
        KernelCommand::Path => run_script(false)?,
    };
    println!("{}", p.display());
    Ok(ExitCode::SUCCESS)
}
