//! The `Hypervisor` implementation: one `boxlet-vmm` process per VM, owned by its handle.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use async_trait::async_trait;
use boxlet::hypervisor::{Acceleration, Capabilities, Hypervisor, HypervisorError, Vm, VmSpec};
use boxlet::process::{classify, owned, wait_or_stop, MonitoredVm};

const NAME: &str = "kvm";

/// boxlet's own VMM.
#[derive(Debug, Clone)]
pub struct KvmBackend {
    vmm: PathBuf,
}

/// The `boxlet-vmm` helper: `$BOXLET_VMM`, else beside this executable (or its parent
/// directory, for test binaries under `target/*/deps`), else in `PATH`.
pub fn find_vmm() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("BOXLET_VMM") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let mut dirs = vec![dir.to_path_buf()];
    if let Some(parent) = dir.parent() {
        dirs.push(parent.to_path_buf());
    }
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    dirs.into_iter()
        .map(|d| d.join("boxlet-vmm"))
        .find(|p| p.is_file())
}

impl KvmBackend {
    /// Check that this host's KVM can boot Linux ([`crate::probe`], cached per host
    /// boot) and find the VMM helper. On a host whose KVM fails the probe this is an error
    /// that says why and names the QEMU backend as the alternative.
    pub fn new() -> Result<Self, HypervisorError> {
        let p = crate::probe::cached();
        if !p.usable {
            return Err(HypervisorError::Unavailable {
                backend: NAME,
                reason: p.reason,
                alternative: "use the qemu backend (--backend qemu), which runs without KVM".into(),
            });
        }
        Self::without_probe()
    }

    /// Find the VMM helper without probing KVM (for tests of the backend itself, and
    /// callers that probed already).
    pub fn without_probe() -> Result<Self, HypervisorError> {
        let vmm = find_vmm().ok_or(HypervisorError::MissingProgram {
            backend: NAME,
            program: "boxlet-vmm".into(),
            hint:
                "build it (cargo build -p boxlet-kvm) and put it beside boxlet, or set BOXLET_VMM"
                    .into(),
        })?;
        Ok(Self { vmm })
    }

    /// The helper this backend runs.
    pub fn vmm_path(&self) -> &Path {
        &self.vmm
    }
}

#[async_trait]
impl Hypervisor for KvmBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            directory_shares: false,
            vsock: true,
            acceleration: Acceleration::Kvm,
        }
    }

    async fn create(&self, spec: VmSpec) -> Result<Box<dyn Vm>, HypervisorError> {
        let start = |msg: String| HypervisorError::Start {
            backend: NAME,
            what: "boxlet-vmm".into(),
            msg,
        };
        if !spec.shares.is_empty() {
            return Err(HypervisorError::Unsupported {
                backend: NAME,
                what: "directory shares (virtio-fs) in this VMM so far".into(),
            });
        }
        let spec_path = spec.run_dir.join("vmm.json");
        let json = serde_json::to_vec(&spec).map_err(|e| start(e.to_string()))?;
        std::fs::write(&spec_path, json).map_err(|e| start(e.to_string()))?;
        let stderr_log = spec.run_dir.join("vmm.stderr");
        let err = std::fs::File::create(&stderr_log).map_err(|e| start(e.to_string()))?;
        let console = std::fs::File::create(&spec.console_log)
            .map_err(|e| start(format!("{}: {e}", spec.console_log.display())))?;
        let mut cmd = owned(&self.vmm);
        cmd.arg(&spec_path).stdout(Stdio::piped()).stderr(err);
        let mut child = cmd.spawn().map_err(|e| start(e.to_string()))?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| start("no stdout".into()))?;
        let pump = tokio::spawn(boxlet::console::pump_console(out, console));
        let (console, stderr) = (spec.console_log.clone(), stderr_log);
        Ok(Box::new(MonitoredVm::spawn(move |mut stop| async move {
            let (status, stopped) = wait_or_stop(&mut child, &mut stop).await;
            let _ = pump.await;
            classify("boxlet-vmm", status, stopped, &console, &stderr)
        })))
    }
}
