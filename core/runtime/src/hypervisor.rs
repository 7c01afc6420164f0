//! The `Hypervisor` trait: what the runtime asks of a VMM backend, and nothing more.
//!
//! Backends know nothing about images or the agent; the runtime knows nothing about
//! QEMU's flags or KVM's ioctls. A backend turns a [`VmSpec`] into a running VM and a
//! [`Vm`] handle that waits for its end, stops it, and says why it ended.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

/// How a disk image is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskFormat {
    /// A raw image.
    Raw,
    /// A qcow2 image (its backing chain is the backend's to open).
    Qcow2,
}

impl DiskFormat {
    /// The format of the image at `path`, from its first bytes.
    pub fn detect(path: &std::path::Path) -> std::io::Result<Self> {
        use std::io::Read;
        let mut magic = [0u8; 4];
        let mut f = std::fs::File::open(path)?;
        let n = f.read(&mut magic)?;
        Ok(if n == 4 && magic == *b"QFI\xfb" {
            Self::Qcow2
        } else {
            Self::Raw
        })
    }
}

/// A block device (virtio-blk); the first is the guest's `/dev/vda`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSpec {
    /// Image path on the host.
    pub path: PathBuf,
    /// Its format.
    pub format: DiskFormat,
    /// The guest may not write.
    pub read_only: bool,
}

/// A host directory shared with the guest (virtio-fs), mounted by its tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShareSpec {
    /// The virtio-fs tag the guest mounts.
    pub tag: String,
    /// Directory on the host.
    pub host_path: PathBuf,
    /// The guest may not write.
    pub read_only: bool,
    /// Nothing but this VM changes the directory while it runs (a box's own rootfs), so
    /// the guest may cache names, attributes and data without asking again (virtiofsd
    /// `--cache=always`; else `auto`, which revalidates after a second).
    #[serde(default)]
    pub exclusive: bool,
    /// Whose ids the files carry on the host (and so how the file server translates
    /// them for the guest).
    #[serde(default)]
    pub ids: ShareIds,
}

/// Whose ids the files of a shared directory carry on the host.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ShareIds {
    /// A directory of the host's (a user's): host ids are shown as they are, and what the
    /// guest creates or chowns belongs to the directory's owner (unless that is root).
    #[default]
    Host,
    /// A tree boxlet stored shifted (image id `n` as host id `base + n`, for 65536 ids):
    /// the guest sees the image's ids, and its own files land in the same range, where
    /// no host process runs.
    Shifted {
        /// The host id of guest id 0.
        base: u32,
    },
}

/// Host side of the guest's vsock device, in Firecracker's convention: a guest
/// connection to CID 2 port P reaches the Unix socket `<uds_path>_P`; the host connects
/// to `uds_path` and sends `CONNECT P\n` to reach guest port P.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockSpec {
    /// The guest's context id (3 or more).
    pub cid: u32,
    /// The host-side Unix socket path: in the VM's
    /// [`vm_dir`](crate::process::vm_dir), where the VM's processes may make it and
    /// the host's `<uds_path>_P` listeners are theirs to connect to.
    pub uds_path: PathBuf,
}

/// Everything a backend needs to start a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    /// A name for logs.
    pub name: String,
    /// Virtual CPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u32,
    /// Guest kernel: an ELF vmlinux with a PVH entry note, or a bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line (the backend appends its device announcements).
    pub cmdline: String,
    /// Block devices, in order (vda, vdb, ...).
    pub disks: Vec<DiskSpec>,
    /// Directory shares.
    pub shares: Vec<ShareSpec>,
    /// The vsock device.
    pub vsock: Option<VsockSpec>,
    /// Where the guest's serial console goes.
    pub console_log: PathBuf,
    /// A private directory the backend may use (root's, or the caller's); the VM's own
    /// processes are given only its [`vm_dir`](crate::process::vm_dir). The backend
    /// removes what it creates there when the VM ends.
    pub run_dir: PathBuf,
    /// Host resources its processes may use (cgroup v2; defaults from its size).
    #[serde(default)]
    pub limits: crate::cgroup::Limits,
}

/// What executes guest instructions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Acceleration {
    /// Linux KVM.
    Kvm,
    /// macOS Hypervisor.framework.
    Hvf,
    /// Software emulation (QEMU's TCG): correct, and tens of times slower.
    Tcg,
}

impl fmt::Display for Acceleration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Kvm => "kvm",
            Self::Hvf => "hvf",
            Self::Tcg => "tcg (software emulation)",
        })
    }
}

/// What acceleration a caller accepts (`--accel`, `BOXLET_ACCEL`). A hardware VM is the
/// boundary boxlet promises; software emulation is a weaker one (the emulator itself is
/// the guest's attack surface, and it runs tens of times slower), so it is used only when
/// asked for, never as a silent fallback.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelPolicy {
    /// Hardware acceleration (KVM, or HVF on macOS), or an error naming `--accel tcg`.
    #[default]
    Auto,
    /// KVM, or an error.
    Kvm,
    /// Hardware acceleration where there is any, else software emulation (QEMU's TCG).
    Tcg,
}

impl AccelPolicy {
    /// The environment variable that sets the policy when no option does.
    pub const ENV: &'static str = "BOXLET_ACCEL";

    /// `$BOXLET_ACCEL`, else [`AccelPolicy::Auto`]; a value that is not a policy is an
    /// error naming it.
    pub fn from_env() -> Result<Self, HypervisorError> {
        match std::env::var(Self::ENV) {
            Ok(v) if !v.is_empty() => v.parse(),
            _ => Ok(Self::Auto),
        }
    }

    /// What to tell a user whose host has no hardware acceleration.
    pub const SOFTWARE_HINT: &'static str = "pass --accel tcg (or set BOXLET_ACCEL=tcg) to run \
        guests under software emulation: slower, and a weaker boundary than a hardware VM";
}

impl std::str::FromStr for AccelPolicy {
    type Err = HypervisorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "kvm" => Ok(Self::Kvm),
            "tcg" => Ok(Self::Tcg),
            other => Err(HypervisorError::Unsupported {
                backend: "boxlet",
                what: format!("acceleration {other:?} (choose auto, kvm or tcg)"),
            }),
        }
    }
}

impl fmt::Display for AccelPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        })
    }
}

/// What a backend can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Directory shares (virtio-fs).
    pub directory_shares: bool,
    /// A vsock device.
    pub vsock: bool,
    /// How guest code runs.
    pub acceleration: Acceleration,
}

/// Why a VM ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmExit {
    /// The guest powered off or reset itself (the agent's shutdown ends this way).
    Shutdown,
    /// The guest kernel panicked; the line from its console.
    GuestPanic(String),
    /// The host stopped it ([`Vm::stop`]).
    Stopped,
    /// The VMM failed or was killed from outside.
    VmmFailed(String),
    /// The VMM made a system call its seccomp filter forbids (a bug, or a guest that
    /// took over the VMM) and was stopped; what it reported.
    SandboxViolation(String),
    /// The VM's host processes went past their cgroup's memory limit and the kernel
    /// killed them.
    MemoryLimit(String),
}

/// A backend failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HypervisorError {
    /// The spec asks for something this backend cannot do.
    #[error("{backend}: {what} is not supported")]
    Unsupported {
        /// The backend.
        backend: &'static str,
        /// What.
        what: String,
    },
    /// The backend cannot run on this host at all.
    #[error("the {backend} backend cannot run on this host: {reason}; {alternative}")]
    Unavailable {
        /// The backend.
        backend: &'static str,
        /// Why.
        reason: String,
        /// What to use instead.
        alternative: String,
    },
    /// A program the backend needs is missing.
    #[error("{backend}: {program} not found: {hint}")]
    MissingProgram {
        /// The backend.
        backend: &'static str,
        /// The program.
        program: String,
        /// How to get it.
        hint: String,
    },
    /// Starting the VM or one of its helpers failed.
    #[error("{backend}: starting {what}: {msg}")]
    Start {
        /// The backend.
        backend: &'static str,
        /// The VMM or a helper.
        what: String,
        /// Why.
        msg: String,
    },
    /// An I/O error.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

/// A VMM backend.
#[async_trait]
pub trait Hypervisor: Send + Sync + fmt::Debug {
    /// Its name (`qemu`, `kvm`, `hvf`).
    fn name(&self) -> &'static str;
    /// What it can do here.
    fn capabilities(&self) -> Capabilities;
    /// Start a VM.
    async fn create(&self, spec: VmSpec) -> Result<Box<dyn Vm>, HypervisorError>;
}

/// A running VM. Dropping it kills the VM and everything it started.
#[async_trait]
pub trait Vm: Send + fmt::Debug {
    /// Wait for the VM to end (and release everything it held).
    async fn wait(&mut self) -> Result<VmExit, HypervisorError>;
    /// Ask the VMM to stop, and kill it when `grace` passes; then as [`Vm::wait`].
    async fn stop(&mut self, grace: Duration) -> Result<VmExit, HypervisorError>;
}
