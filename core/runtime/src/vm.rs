//! Booting a VM to a ready agent, on any [`Hypervisor`]: the kernel command line, the
//! agent's delivery (in the root disk, or in an initramfs for a directory root), the
//! vsock sockets, the wait for "ready" that also watches the VM, and shutdown.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use boxlet_guest::proto::{Ready, Setup, PROTOCOL_VERSION, READY_PORT};
use tokio::net::UnixListener;

use crate::agent::{accept_ready, AgentClient, AgentError};
use crate::hypervisor::{
    DiskFormat, DiskSpec, Hypervisor, HypervisorError, ShareIds, ShareSpec, Vm, VmExit, VmSpec,
    VsockSpec,
};

/// What the guest boots from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Root {
    /// An ext4 image (raw or qcow2) with the agent at `/boxlet/bin/boxlet-guest`.
    Disk {
        /// The image.
        path: PathBuf,
        /// Mount it read-only.
        read_only: bool,
    },
    /// A host directory over virtio-fs; the agent comes in an initramfs.
    Dir {
        /// The directory.
        path: PathBuf,
        /// Only this VM changes it while it runs (see [`ShareSpec::exclusive`]).
        exclusive: bool,
        /// Whose ids its files carry (see [`ShareSpec::ids`]).
        ids: ShareIds,
    },
}

/// A VM to boot.
#[derive(Debug, Clone)]
pub struct BootSpec {
    /// A name (also the guest's hostname).
    pub name: String,
    /// Guest kernel.
    pub kernel: PathBuf,
    /// The root filesystem.
    pub root: Root,
    /// The agent binary (needed for [`Root::Dir`]).
    pub agent: Option<PathBuf>,
    /// Virtual CPUs.
    pub vcpus: u8,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// More kernel command-line arguments.
    pub extra_cmdline: String,
    /// How long to wait for the agent.
    pub ready_timeout: Duration,
    /// Where to put the console log (default: in the VM's run directory).
    pub console_log: Option<PathBuf>,
    /// Host memory, CPU and processes its VM may use (cgroup v2; see
    /// [`crate::cgroup::Limits`] for the defaults).
    pub limits: crate::cgroup::Limits,
}

impl BootSpec {
    /// Defaults: 1 vCPU, 256 MiB, 120 s to get ready (software emulation is slow).
    pub fn new(name: impl Into<String>, kernel: impl Into<PathBuf>, root: Root) -> Self {
        Self {
            name: name.into(),
            kernel: kernel.into(),
            root,
            agent: None,
            vcpus: 1,
            memory_mib: 256,
            extra_cmdline: String::new(),
            ready_timeout: Duration::from_secs(120),
            console_log: None,
            limits: crate::cgroup::Limits::default(),
        }
    }
}

/// Booting failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BootError {
    /// The backend failed.
    #[error(transparent)]
    Hypervisor(#[from] HypervisorError),
    /// The agent failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The VM ended before its agent was ready.
    #[error("the VM ended before the agent was ready ({exit:?}); console:\n{console}")]
    EndedEarly {
        /// How it ended.
        exit: VmExit,
        /// The end of its console log.
        console: String,
    },
    /// The agent did not announce itself in time.
    #[error("the agent was not ready after {0:?}; console:\n{1}")]
    Timeout(Duration, String),
    /// Bad input.
    #[error("{0}")]
    Invalid(String),
    /// Host I/O.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

pub use crate::console::console_tail;

/// A VM whose agent is ready.
#[derive(Debug)]
pub struct RunningVm {
    vm: Box<dyn Vm>,
    client: AgentClient,
    ready: Ready,
    boot_time: Duration,
    console: PathBuf,
    // Removed when the VM is dropped (after the VM handle's own cleanup).
    _run_dir: tempfile::TempDir,
}

impl RunningVm {
    /// The agent.
    pub fn agent(&self) -> &AgentClient {
        &self.client
    }

    /// What the agent announced.
    pub fn ready(&self) -> &Ready {
        &self.ready
    }

    /// From asking the backend for a VM to the agent's announcement.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// The console log.
    pub fn console_log(&self) -> &Path {
        &self.console
    }

    /// The VM's private directory (sockets, the VMM's files); removed with the VM.
    pub fn run_dir(&self) -> &Path {
        self._run_dir.path()
    }

    /// Wait for the VM to end by itself.
    pub async fn wait(mut self) -> Result<VmExit, HypervisorError> {
        self.vm.wait().await
    }

    /// Ask the agent to power off; stop the VM if it has not ended after `grace`.
    pub async fn shutdown(mut self, grace: Duration) -> Result<VmExit, HypervisorError> {
        let asked = tokio::time::timeout(grace, self.client.shutdown()).await;
        // An answer lost to the power-off (the connection ends instead) still means the
        // guest is going down: wait for it either way, unless the agent did not respond.
        if asked.is_ok() {
            if let Ok(exit) = tokio::time::timeout(grace, self.vm.wait()).await {
                return exit;
            }
        }
        self.vm.stop(grace).await
    }

    /// Stop the VM from the host (the VMM's graceful stop, then a kill after `grace`).
    pub async fn stop(mut self, grace: Duration) -> Result<VmExit, HypervisorError> {
        self.vm.stop(grace).await
    }
}

const CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 quiet 8250.nr_uarts=1";
/// The virtio-fs tag of a directory root.
const ROOT_TAG: &str = "rootfs";

/// Boot `spec` on `hv` and wait for its agent.
pub async fn boot(hv: &dyn Hypervisor, spec: BootSpec) -> Result<RunningVm, BootError> {
    // Private: the sockets in it reach the guest agent, which runs commands as root.
    let run_dir = tempfile::Builder::new()
        .prefix("boxlet-vm-")
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
        .map_err(|source| BootError::Io {
            what: "creating the VM's run directory".into(),
            source,
        })?;
    let io = |what: String| move |source| BootError::Io { what, source };
    // The VM's sockets in its own directory, which the backend hands to the VM's
    // identity (the ready socket with it, so the VM may connect to it).
    let vm_dir = crate::process::vm_dir(run_dir.path());
    std::fs::create_dir(&vm_dir).map_err(io(format!("creating {}", vm_dir.display())))?;
    let uds = vm_dir.join("vsock.sock");
    let ready_path = PathBuf::from(format!("{}_{READY_PORT}", uds.display()));
    let listener = UnixListener::bind(&ready_path)
        .map_err(io(format!("listening on {}", ready_path.display())))?;
    let console = spec
        .console_log
        .clone()
        .unwrap_or_else(|| run_dir.path().join("console.log"));

    let mut cmdline = CMDLINE.to_string();
    let mut disks = Vec::new();
    let mut shares = Vec::new();
    let mut initrd = None;
    match &spec.root {
        Root::Disk { path, read_only } => {
            let format = DiskFormat::detect(path).map_err(io(format!("{}", path.display())))?;
            disks.push(DiskSpec {
                path: path.clone(),
                format,
                read_only: *read_only,
            });
            cmdline.push_str(&format!(
                " root=/dev/vda {} rootfstype=ext4 init=/boxlet/bin/boxlet-guest",
                if *read_only { "ro" } else { "rw" }
            ));
        }
        Root::Dir {
            path,
            exclusive,
            ids,
        } => {
            if !hv.capabilities().directory_shares {
                return Err(BootError::Invalid(format!(
                    "the {} backend cannot share directories",
                    hv.name()
                )));
            }
            let agent = spec.agent.as_ref().ok_or_else(|| {
                BootError::Invalid("a directory root needs the agent binary".into())
            })?;
            let img = run_dir.path().join("agent.cpio");
            crate::initramfs::write_with_agent(agent, &img)
                .map_err(io(format!("making an initramfs of {}", agent.display())))?;
            initrd = Some(img);
            shares.push(ShareSpec {
                tag: ROOT_TAG.into(),
                host_path: path.clone(),
                read_only: false,
                exclusive: *exclusive,
                ids: *ids,
            });
            cmdline.push_str(&format!(
                " rdinit=/boxlet-guest boxlet.root=virtiofs:{ROOT_TAG}"
            ));
        }
    }
    if !spec.extra_cmdline.is_empty() {
        cmdline.push(' ');
        cmdline.push_str(&spec.extra_cmdline);
    }
    let vm_spec = VmSpec {
        name: spec.name.clone(),
        vcpus: spec.vcpus,
        memory_mib: spec.memory_mib,
        kernel: spec.kernel.clone(),
        initrd,
        cmdline,
        disks,
        shares,
        vsock: Some(VsockSpec {
            cid: 3,
            uds_path: uds.clone(),
        }),
        console_log: console.clone(),
        run_dir: run_dir.path().to_path_buf(),
        limits: spec.limits,
    };
    let start = Instant::now();
    let mut vm = hv.create(vm_spec).await?;
    let ready = tokio::select! {
        r = accept_ready(&listener) => r,
        exit = vm.wait() => {
            let exit = exit?;
            return Err(BootError::EndedEarly { exit, console: console_tail(&console, 30) });
        }
        () = tokio::time::sleep(spec.ready_timeout) => {
            let _ = vm.stop(Duration::from_secs(1)).await;
            return Err(BootError::Timeout(spec.ready_timeout, console_tail(&console, 30)));
        }
    };
    let ready = match ready {
        Ok(r) => r,
        Err(e) => {
            let _ = vm.stop(Duration::from_secs(1)).await;
            return Err(e.into());
        }
    };
    if ready.protocol != PROTOCOL_VERSION {
        let _ = vm.stop(Duration::from_secs(1)).await;
        return Err(BootError::Invalid(format!(
            "the guest agent {} speaks protocol {}, this boxlet {PROTOCOL_VERSION}",
            crate::console::printable(&ready.agent, false),
            ready.protocol
        )));
    }
    let boot_time = start.elapsed();
    drop(listener);
    let _ = std::fs::remove_file(&ready_path);
    let client = AgentClient::vsock(&uds);
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let setup = Setup {
        unix_time_ns: Some(now),
        hostname: Some(spec.name.clone()),
        ..Setup::default()
    };
    if let Err(e) = client.setup(setup).await {
        let _ = vm.stop(Duration::from_secs(1)).await;
        return Err(e.into());
    }
    Ok(RunningVm {
        vm,
        client,
        ready,
        boot_time,
        console,
        _run_dir: run_dir,
    })
}
