//! cgroup v2 limits for a VM's host processes: one cgroup per VM, holding its VMM and
//! every daemon of it (each joins it from inside `boxlet-jail`, before it makes its
//! namespaces), with a memory limit (guest RAM plus a bounded overhead by default, no
//! swap), a CPU limit (its vCPUs plus one by default) and a process limit.
//!
//! The cgroups live under `/sys/fs/cgroup/boxlet` (`BOXLET_CGROUP_PARENT` names another
//! parent), which needs root and a unified (v2) hierarchy with the memory, pids and cpu
//! controllers. Where the host has none (a cgroup v1 host, a container without
//! delegation) a VM runs without limits, said once as a warning; limits asked for
//! explicitly are then an error.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// What a VM's host processes may use together. `None` is the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Host memory of the VM's processes, in MiB (default: guest RAM plus
    /// [`overhead_mib`] of it).
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// CPU time, in hundredths of a CPU (default: the vCPUs plus one, times 100).
    #[serde(default)]
    pub cpu_percent: Option<u32>,
    /// Processes and threads (default [`DEFAULT_PIDS`]).
    #[serde(default)]
    pub pids: Option<u64>,
}

impl Limits {
    /// Whether anything was asked for explicitly (so a host without cgroups must refuse
    /// rather than run without).
    pub fn explicit(&self) -> bool {
        self.memory_mib.is_some() || self.cpu_percent.is_some() || self.pids.is_some()
    }
}

/// Threads and processes of one VM by default: a VMM's vCPU and device threads, QEMU's
/// worker threads, virtiofsd's thread pool.
pub const DEFAULT_PIDS: u64 = 1024;

/// Host memory a VM's processes may use beyond its guest RAM by default: the VMM, its
/// daemons, QEMU's translation cache under TCG, page tables, the page cache of what
/// they read. 256 MiB, or a quarter of the RAM when that is more.
pub fn overhead_mib(guest_mib: u64) -> u64 {
    (guest_mib / 4).max(256)
}

/// The limits applied: memory in bytes, CPU as quota per 100 ms period, processes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    /// `memory.max`.
    pub memory_bytes: u64,
    /// `cpu.max` quota in microseconds per 100,000.
    pub cpu_quota_us: u64,
    /// `pids.max`.
    pub pids: u64,
}

/// `limits` resolved for a VM of `vcpus` and `guest_mib`.
pub fn resolve(limits: &Limits, vcpus: u8, guest_mib: u64) -> Applied {
    let memory_mib = limits
        .memory_mib
        .unwrap_or(guest_mib + overhead_mib(guest_mib));
    let cpu = limits
        .cpu_percent
        .map_or((u64::from(vcpus) + 1) * 100, u64::from);
    Applied {
        memory_bytes: memory_mib << 20,
        cpu_quota_us: cpu.max(1) * 1000,
        pids: limits.pids.unwrap_or(DEFAULT_PIDS),
    }
}

const CONTROLLERS: [&str; 3] = ["memory", "pids", "cpu"];
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The parent boxlet's cgroups go under, if this host can have them: a cgroup v2
/// hierarchy mounted at `/sys/fs/cgroup` offering the memory, pids and cpu controllers,
/// and root to write it.
pub fn parent() -> Result<PathBuf, String> {
    let root = Path::new("/sys/fs/cgroup");
    let fs = rustix::fs::statfs(root).map_err(|e| format!("{}: {e}", root.display()))?;
    #[allow(clippy::unnecessary_cast)] // f_type's type differs between C libraries
    if fs.f_type as i64 != CGROUP2_SUPER_MAGIC {
        return Err(format!(
            "{} is not a cgroup v2 hierarchy (this host has cgroup v1)",
            root.display()
        ));
    }
    let offered = std::fs::read_to_string(root.join("cgroup.controllers"))
        .map_err(|e| format!("{}/cgroup.controllers: {e}", root.display()))?;
    let missing: Vec<&str> = CONTROLLERS
        .into_iter()
        .filter(|c| !offered.split_whitespace().any(|o| o == *c))
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the cgroup v2 hierarchy offers no {} controller",
            missing.join(", ")
        ));
    }
    if !rustix::process::geteuid().is_root() {
        return Err("cgroups for VMs need root (rootless delegation is not built yet)".into());
    }
    let parent = std::env::var_os("BOXLET_CGROUP_PARENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("boxlet"));
    // A parent elsewhere (a typo, a plain directory) would take the limit files as
    // plain files and limit nothing.
    let holder = parent.parent().unwrap_or(&parent);
    match rustix::fs::statfs(holder) {
        #[allow(clippy::unnecessary_cast)]
        Ok(fs) if fs.f_type as i64 == CGROUP2_SUPER_MAGIC => {}
        _ => {
            return Err(format!(
                "{} is not in the cgroup v2 hierarchy",
                parent.display()
            ))
        }
    }
    // One that exists must be root's alone: whoever may write it could move a VM's
    // processes out of their limits.
    if let Ok(m) = std::fs::symlink_metadata(&parent) {
        use std::os::unix::fs::MetadataExt;
        if !m.is_dir() || m.uid() != 0 || m.mode() & 0o022 != 0 {
            return Err(format!(
                "{} is not a directory only root may write",
                parent.display()
            ));
        }
    }
    Ok(parent)
}

/// Turn the controllers on for the children of `dir`.
fn delegate(dir: &Path) -> io::Result<()> {
    let want: String = CONTROLLERS.iter().map(|c| format!("+{c} ")).collect();
    std::fs::write(dir.join("cgroup.subtree_control"), want.trim_end())
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", dir.display())))
}

/// One VM's cgroup. Removed when dropped, its processes killed first (so a VM whose
/// start fails halfway leaves none behind).
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    applied: Applied,
}

static SERIAL: AtomicU64 = AtomicU64::new(0);

impl Cgroup {
    /// A new cgroup under `parent` for the VM `name`, with `applied` written. Its parent
    /// is made (and given the controllers) on first use.
    pub fn create(parent: &Path, name: &str, applied: Applied) -> io::Result<Cgroup> {
        if !parent.is_dir() {
            std::fs::create_dir(parent).or_else(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => Ok(()),
                _ => Err(e),
            })?;
        }
        if let Some(grand) = parent.parent() {
            // The hierarchy's root (or whatever holds `parent`) hands the controllers on;
            // already done is fine, and a parent above that refuses says why below.
            let _ = delegate(grand);
        }
        delegate(parent)?;
        let clean: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .take(48)
            .collect();
        let path = parent.join(format!(
            "{clean}-{}-{}",
            std::process::id(),
            SERIAL.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let cg = Cgroup { path, applied };
        // The limit files are the kernel's: written, never created.
        let write = |file: &str, value: String| {
            let open = std::fs::OpenOptions::new()
                .write(true)
                .open(cg.path.join(file));
            open.and_then(|mut f| std::io::Write::write_all(&mut f, value.as_bytes()))
                .map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("{}/{file} = {value}: {e}", cg.path.display()),
                    )
                })
        };
        let set = write("memory.max", applied.memory_bytes.to_string())
            .and_then(|()| write("pids.max", applied.pids.to_string()))
            .and_then(|()| write("cpu.max", format!("{} 100000", applied.cpu_quota_us)));
        set?;
        // No swap to spill into where the host has swap accounting (absent otherwise),
        // and an out-of-memory kill takes the whole VM, not one daemon of it.
        let _ = write("memory.swap.max", "0".into());
        let _ = write("memory.oom.group", "1".into());
        Ok(cg)
    }

    /// The cgroup's directory (what a jail joins).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The limits written.
    pub fn applied(&self) -> Applied {
        self.applied
    }

    /// How many processes the kernel killed for going past the memory limit.
    pub fn oom_kills(&self) -> u64 {
        std::fs::read_to_string(self.path.join("memory.events"))
            .ok()
            .and_then(|t| {
                t.lines()
                    .find_map(|l| l.strip_prefix("oom_kill "))
                    .and_then(|n| n.trim().parse().ok())
            })
            .unwrap_or(0)
    }

    /// Kill whatever still runs in it and remove it (what dropping it does).
    pub fn remove(self) {
        drop(self);
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Waiting for the killed processes to go takes a moment: off the async runtime
        // when there is one.
        let path = std::mem::take(&mut self.path);
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn_blocking(move || remove(&path))),
            Err(_) => remove(&path),
        }
    }
}

/// Kill what runs in the cgroup at `path` and remove it (within 10 s).
fn remove(path: &Path) {
    // cgroup.kill (Linux 5.14) kills everything at once; older kernels get SIGKILL for
    // each process listed.
    if std::fs::write(path.join("cgroup.kill"), "1").is_err() {
        if let Ok(procs) = std::fs::read_to_string(path.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
    for _ in 0..1000 {
        match std::fs::remove_dir(path) {
            Ok(()) => return,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            // Busy while the killed processes finish exiting (a large guest's memory
            // takes a while to free).
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
        }
    }
    tracing::warn!(path = %path.display(), "a VM's cgroup could not be removed");
}

/// Join the cgroup at `path` (the calling process and all it starts from now on).
pub fn join(path: &Path) -> io::Result<()> {
    std::fs::write(path.join("cgroup.procs"), "0")
        .map_err(|e| io::Error::new(e.kind(), format!("joining {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_vm_and_explicit_limits_win() {
        let d = resolve(&Limits::default(), 2, 512);
        assert_eq!(d.memory_bytes, (512 + 256) << 20);
        assert_eq!(d.cpu_quota_us, 300_000);
        assert_eq!(d.pids, DEFAULT_PIDS);
        let big = resolve(&Limits::default(), 1, 8192);
        assert_eq!(big.memory_bytes, (8192 + 2048) << 20);
        let set = Limits {
            memory_mib: Some(300),
            cpu_percent: Some(50),
            pids: Some(64),
        };
        assert!(set.explicit() && !Limits::default().explicit());
        assert_eq!(
            resolve(&set, 4, 1024),
            Applied {
                memory_bytes: 300 << 20,
                cpu_quota_us: 50_000,
                pids: 64
            }
        );
    }
}
