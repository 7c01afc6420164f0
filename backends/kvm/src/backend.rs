//! The `Hypervisor` implementation: one `boxlet-vmm` process per VM, owned by its handle.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use boxlet::hypervisor::{
    Acceleration, Capabilities, Hypervisor, HypervisorError, Vm, VmExit, VmSpec,
};
use tokio::process::{Child, Command};

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
    /// Find the VMM helper.
    pub fn new() -> Result<Self, HypervisorError> {
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
            vsock: false,
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
        let mut cmd = Command::new(&self.vmm);
        cmd.arg(&spec_path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(err)
            .kill_on_drop(true);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl,
        // which is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                    .map_err(std::io::Error::from)
            });
        }
        let mut child = cmd.spawn().map_err(|e| start(e.to_string()))?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| start("no stdout".into()))?;
        let pump = tokio::spawn(boxlet::console::pump_console(out, console));
        let (stop_tx, stop_rx) = tokio::sync::mpsc::channel(1);
        let task = tokio::spawn(monitor(
            child,
            pump,
            stop_rx,
            spec.console_log.clone(),
            stderr_log,
        ));
        Ok(Box::new(KvmVm {
            stop: stop_tx,
            task: Some(task),
            exit: None,
        }))
    }
}

async fn monitor(
    mut child: Child,
    pump: tokio::task::JoinHandle<()>,
    mut stop: tokio::sync::mpsc::Receiver<Duration>,
    console: PathBuf,
    stderr_log: PathBuf,
) -> VmExit {
    use std::os::unix::process::ExitStatusExt;
    let mut stopped = false;
    let status = tokio::select! {
        s = child.wait() => s,
        Some(grace) = stop.recv() => {
            stopped = true;
            // The VMM has no guest state worth flushing that the kernel would not lose
            // anyway on a stop from outside: SIGTERM, then SIGKILL.
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            match tokio::time::timeout(grace, child.wait()).await {
                Ok(s) => s,
                Err(_) => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            }
        }
    };
    let _ = pump.await;
    if stopped {
        return VmExit::Stopped;
    }
    let status = match status {
        Ok(s) => s,
        Err(e) => return VmExit::VmmFailed(format!("waiting for boxlet-vmm: {e}")),
    };
    let tail = boxlet::console::console_tail(&console, 200);
    if let Some(line) = tail
        .lines()
        .find(|l| l.contains("Kernel panic - not syncing"))
    {
        return VmExit::GuestPanic(line.trim().to_string());
    }
    if status.success() {
        return VmExit::Shutdown;
    }
    let stderr = std::fs::read_to_string(&stderr_log).unwrap_or_default();
    let how = match (status.code(), status.signal()) {
        (Some(c), _) => format!("boxlet-vmm exited with {c}"),
        (None, Some(s)) => format!("boxlet-vmm killed by signal {s}"),
        _ => "boxlet-vmm ended".into(),
    };
    VmExit::VmmFailed(format!("{how}: {}", stderr.trim()))
}

/// A VM running in a `boxlet-vmm` process.
#[derive(Debug)]
pub struct KvmVm {
    stop: tokio::sync::mpsc::Sender<Duration>,
    task: Option<tokio::task::JoinHandle<VmExit>>,
    exit: Option<VmExit>,
}

#[async_trait]
impl Vm for KvmVm {
    async fn wait(&mut self) -> Result<VmExit, HypervisorError> {
        if let Some(exit) = &self.exit {
            return Ok(exit.clone());
        }
        let Some(task) = self.task.as_mut() else {
            return Ok(VmExit::Stopped);
        };
        let exit = task.await;
        self.task = None;
        let exit = exit.map_err(|e| HypervisorError::Io {
            what: "the VM monitor".into(),
            source: std::io::Error::other(e),
        })?;
        self.exit = Some(exit.clone());
        Ok(exit)
    }

    async fn stop(&mut self, grace: Duration) -> Result<VmExit, HypervisorError> {
        let _ = self.stop.try_send(grace);
        self.wait().await
    }
}

impl Drop for KvmVm {
    fn drop(&mut self) {
        if self.task.is_some() {
            let _ = self.stop.try_send(Duration::ZERO);
        }
    }
}
