//! For backends whose VMM is a child process: wait for it or stop it (SIGTERM, then
//! SIGKILL after a grace period), tell why it ended, and a [`Vm`] handle over the task
//! that does so.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use std::os::unix::fs::MetadataExt;

use crate::hypervisor::{HypervisorError, ShareIds, ShareSpec, Vm, VmExit, VmSpec};

/// The absolute directories of `PATH`: an empty or relative entry names the working
/// directory, which may be anyone's (/tmp).
fn path_dirs() -> Vec<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .filter(|d| d.is_absolute())
                .collect()
        })
        .unwrap_or_default()
}

/// `name` in `PATH`, in `~/.cargo/bin`, or as `/usr/libexec/name`.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let mut dirs = path_dirs();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(Path::new(&home).join(".cargo/bin"));
    }
    dirs.push("/usr/libexec".into());
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// One of boxlet's helper programs (`boxlet-vmm`, `boxlet-jail`): the path in `$var`,
/// else `name` beside this executable (or in its parent directory, for test binaries
/// under `target/*/deps`), else in `PATH`.
pub fn find_helper(var: &str, name: &str) -> Option<PathBuf> {
    // Set but empty is unset (a script passing on a variable it does not have).
    if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    let mut dirs = vec![dir.to_path_buf()];
    if let Some(parent) = dir.parent() {
        dirs.push(parent.to_path_buf());
    }
    dirs.extend(path_dirs());
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// Connect to the Unix socket at `path` without following a symbolic link in its last
/// component, and only if it is a socket: the directory of a VM's sockets belongs to the
/// VM's own processes, which could otherwise point this process (often root) at any
/// socket on the host and have the agent's requests sent there.
pub async fn connect_no_follow(path: &Path) -> io::Result<tokio::net::UnixStream> {
    use rustix::fs::{FileType, Mode, OFlags};
    let fd = rustix::fs::open(
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let kind = FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode);
    if kind != FileType::Socket {
        return Err(io::Error::other(format!(
            "not a socket but a {kind:?}: refused"
        )));
    }
    // Through the descriptor: the very inode checked (it also lifts the length limit of
    // a socket path).
    let via = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    let stream = tokio::net::UnixStream::connect(via).await;
    drop(fd);
    stream
}

/// How to install `virtiofsd`, for errors that find it missing.
pub const VIRTIOFSD_HINT: &str =
    "apt-get install libseccomp-dev libcap-ng-dev; cargo install virtiofsd --version 1.14.0 --locked";

/// The directory in a VM's run directory where its processes make and meet their
/// sockets (the vsock socket, vhost-user sockets): the one place of the run directory
/// they may write, handed to the VM's identity ([`crate::jail::hand_over`]).
pub fn vm_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("vm")
}

/// The vhost-user socket of a VM's share number `index`, in its [`vm_dir`] (the
/// backend starts `virtiofsd` there; the VMM connects to it).
pub fn virtiofs_socket(run_dir: &Path, index: usize) -> PathBuf {
    vm_dir(run_dir).join(format!("virtiofs{index}.sock"))
}

/// Where the `virtiofsd` of share number `index` writes its log.
pub fn virtiofsd_log(run_dir: &Path, index: usize) -> PathBuf {
    run_dir.join(format!("virtiofsd{index}.log"))
}

/// Host directories a guest is never given: the host's root and its system trees (and
/// anything inside the ones the host runs from).
const SYSTEM_DIRS: [&str; 13] = [
    "/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/boot", "/dev",
    "/proc", "/sys", "/run",
];
/// Directories that hold other users' or the system's data: refused themselves (a
/// directory inside them is fine).
const SYSTEM_PARENTS: [&str; 10] = [
    "/", "/var", "/home", "/root", "/opt", "/srv", "/tmp", "/mnt", "/media", "/var/lib",
];

/// The host system directory `real` (a resolved path) is in, if any.
pub fn system_path(real: &Path) -> Option<&'static str> {
    SYSTEM_DIRS.iter().copied().find(|d| real.starts_with(d))
}

/// The directory `path` resolves to, if a guest may be given it: not the host's root,
/// a system directory or one inside it, or a directory that holds other users' homes.
pub fn check_share_path(path: &Path) -> Result<PathBuf, String> {
    let real = std::fs::canonicalize(path).map_err(|e| e.to_string())?;
    if !real.is_dir() {
        return Err("not a directory".into());
    }
    if let Some(sys) = system_path(&real) {
        return Err(format!(
            "{} is in the host's system directory {sys}: a guest may not be given it",
            real.display()
        ));
    }
    if SYSTEM_PARENTS.iter().any(|d| real == Path::new(d)) {
        return Err(format!(
            "{} holds the host's or other users' files: share a directory inside it",
            real.display()
        ));
    }
    Ok(real)
}

/// SIGSYS on Linux (x86-64 and arm64): what seccomp sends for a forbidden call.
pub const SIGSYS: i32 = 31;

/// The exit status of a VMM that made a system call its seccomp filter forbids and
/// stopped itself (boxlet-vmm's report: 128 + SIGSYS, as a shell shows a SIGSYS death).
/// A VMM killed by SIGSYS itself (QEMU's `-sandbox`) is the same violation.
pub const EXIT_FORBIDDEN_SYSCALL: i32 = 128 + SIGSYS;

/// Where every share stores the guest's xattrs on the host: each name the guest uses is
/// stored under this prefix, where it means nothing to the host kernel (no file
/// capabilities, no overlayfs or SELinux attributes); host attributes without the prefix
/// are invisible to the guest. The directory caches store image xattrs the same way.
pub const GUEST_XATTR_PREFIX: &str = "user.virtiofs.";

/// How a `virtiofsd` stores the guest's ids on the host, as the daemon sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestIds {
    /// As they are: a directory of root's, served by root (no translation).
    AsIs,
    /// Guest id `n` is `base + n` for 65536 ids, the rest refused (virtiofsd translates).
    Shifted {
        /// The host id of guest id 0.
        base: u32,
    },
    /// Guest ids below 65536 as they are, the rest refused: the daemon's own user
    /// namespace maps them onto the shifted range.
    InRange,
    /// Every guest id is this one.
    Squashed {
        /// The user id.
        uid: u32,
        /// The group id.
        gid: u32,
    },
}

/// A `virtiofsd` serving `share` on `socket`: chrooted into the shared directory, file
/// handles off (they need CAP_DAC_READ_SEARCH on the host), extended attributes on but
/// mapped under [`GUEST_XATTR_PREFIX`], without CAP_MKNOD and CAP_SETFCAP (a guest makes no device
/// node on the host), guest ids stored as `ids` says, read-only when the share is,
/// caching everything when the share is exclusive.
pub fn virtiofsd_command(
    program: &Path,
    share: &ShareSpec,
    socket: &Path,
    ids: GuestIds,
) -> Command {
    let mut cmd = owned(program);
    cmd.arg(format!("--socket-path={}", socket.display()))
        .arg(format!("--shared-dir={}", share.host_path.display()))
        .arg(if share.exclusive {
            "--cache=always"
        } else {
            "--cache=auto"
        })
        .args(["--sandbox=chroot", "--announce-submounts"])
        .args(["--inode-file-handles=never", "--xattr"])
        .arg(format!("--xattrmap=:map::{GUEST_XATTR_PREFIX}:"))
        // A user's directory: not CAP_FSETID either (set-ID bits kept over writes, set on
        // files of other groups); a box's own root keeps it, for packages' set-ID files
        // (shifted, behind a nosuid mount or the private home).
        .arg(if users_directory(share) {
            "--modcaps=-mknod:-setfcap:-fsetid"
        } else {
            "--modcaps=-mknod:-setfcap"
        });
    // Guest ids past the range would pass through as the same ids (real users' on the
    // host; the VM's identity in a daemon's namespace): refused.
    let forbid_past_range = [
        "--translate-uid=forbid-guest:65536:4294901759",
        "--translate-gid=forbid-guest:65536:4294901759",
    ];
    match ids {
        GuestIds::AsIs => {}
        GuestIds::Shifted { base } => {
            cmd.arg(format!("--translate-uid=map:0:{base}:65536"))
                .arg(format!("--translate-gid=map:0:{base}:65536"))
                .args(forbid_past_range);
        }
        GuestIds::InRange => {
            cmd.args(forbid_past_range);
        }
        // What the guest makes is the owner's, whoever it is in the guest.
        GuestIds::Squashed { uid, gid } => {
            cmd.arg(format!("--translate-uid=squash-guest:0:{uid}:4294967295"))
                .arg(format!("--translate-gid=squash-guest:0:{gid}:4294967295"));
        }
    }
    if share.read_only {
        cmd.arg("--readonly");
    }
    cmd
}

/// The group a virtiofsd serving `uid`'s directory (of group `dir_gid`) works as: the
/// directory's group if the user is in it (or nothing says which groups the user has),
/// else the user's own: the guest gets no group's rights the directory's owner lacks (a
/// directory `alice:www-data` would open everyone's www-data files in it).
fn group_of(uid: u32, dir_gid: u32) -> u32 {
    let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) else {
        return dir_gid;
    };
    let member = user.gid.as_raw() == dir_gid
        || nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(dir_gid))
            .ok()
            .flatten()
            .is_some_and(|g| g.mem.contains(&user.name));
    if member {
        dir_gid
    } else {
        user.gid.as_raw()
    }
}

/// Whether `share` is a directory of a user's (or root's: `--fs`, Direct), not a box's own
/// root: its virtiofsd makes no set-ID file and keeps no CAP_FSETID.
pub fn users_directory(share: &ShareSpec) -> bool {
    share.ids == ShareIds::Host && !share.exclusive
}

/// One `virtiofsd` (found at `program`, if it was) per share of `spec`, each listening on
/// its [`virtiofs_socket`] before this returns, its stderr in its [`virtiofsd_log`].
/// A share of a system directory ([`check_share_path`]) is refused. Returns the daemons
/// (killed when dropped) with their sockets.
pub async fn start_virtiofsds(
    backend: &'static str,
    program: Option<&Path>,
    spec: &VmSpec,
    launch: &VmLaunch,
) -> Result<Vec<(Child, PathBuf)>, HypervisorError> {
    let mut daemons = Vec::new();
    for (i, share) in spec.shares.iter().enumerate() {
        let program = program.ok_or(HypervisorError::MissingProgram {
            backend,
            program: "virtiofsd".into(),
            hint: VIRTIOFSD_HINT.into(),
        })?;
        let refused = |reason: String| HypervisorError::Start {
            backend,
            what: "virtiofsd".into(),
            msg: format!(
                "sharing {} with the guest: {reason}",
                share.host_path.display()
            ),
        };
        let dir = check_share_path(&share.host_path).map_err(refused)?;
        let meta = std::fs::metadata(&dir).map_err(|e| refused(e.to_string()))?;
        let share = ShareSpec {
            host_path: dir,
            ..share.clone()
        };
        let socket = virtiofs_socket(&spec.run_dir, i);
        let log = virtiofsd_log(&spec.run_dir, i);
        let mut binds = crate::jail::system_binds();
        binds.push(crate::jail::Bind::rw(vm_dir(&spec.run_dir)));
        binds.push(crate::jail::Bind {
            path: share.host_path.clone(),
            writable: !share.read_only,
            device: false,
        });
        let mut jail =
            crate::jail::JailSpec::new(spec.run_dir.join(format!("jail-virtiofsd{i}")), binds);
        jail.keep_caps = crate::jail::VIRTIOFSD_CAPS.to_vec();
        if users_directory(&share) {
            jail.keep_caps.retain(|&c| c != crate::jail::CAP_FSETID);
        }
        jail.exec_only_program = true;
        let (ids, id_maps) = launch.virtiofsd_ids(&share, &meta);
        let own_namespace = id_maps.is_some();
        // A directory of a user's (or root's): no set-ID file from the guest there, where
        // whoever reaches it would run it as the directory's owner. A box's own root
        // (exclusive) is not one: shifted, or behind a nosuid mount, or in the private
        // home.
        jail.no_set_id_files = users_directory(&share);
        jail.id_maps = id_maps;
        let cmd = virtiofsd_command(program, &share, &socket, ids);
        let cmd = launch
            .wrap(jail, cmd)
            .map_err(|e| refused(format!("preparing its jail: {e}")))?;
        let daemon = start_daemon(backend, "virtiofsd", cmd, &socket, &log).await?;
        if let (true, Some(vm)) = (own_namespace, launch.identity()) {
            // Its socket is its namespace's root's, which the VMM is not: open it to the
            // VM's group (the directory keeps everyone else out).
            open_socket_to_group(&socket, vm.id)
                .map_err(|e| refused(format!("its socket {}: {e}", socket.display())))?;
        }
        daemons.push((daemon, socket));
    }
    Ok(daemons)
}

/// Give the socket at `path` to group `gid`, mode 0660, without following a symbolic
/// link put in its place (the directory is writable by the VM's processes).
fn open_socket_to_group(path: &Path, gid: u32) -> io::Result<()> {
    use rustix::fs::{AtFlags, FileType, Mode, OFlags};
    let fd = rustix::fs::open(
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    if FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) != FileType::Socket {
        return Err(io::Error::other("not a socket"));
    }
    rustix::fs::chownat(
        &fd,
        "",
        None,
        Some(rustix::fs::Gid::from_raw(gid)),
        AtFlags::EMPTY_PATH,
    )?;
    // Through the descriptor: the inode it holds, whatever the name now is.
    let by_fd = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    std::fs::set_permissions(by_fd, std::os::unix::fs::PermissionsExt::from_mode(0o660))
}

/// The launcher of one VM's processes: every one goes through [`VmLaunch::wrap`] into
/// its jail ([`crate::jail`]) and the VM's cgroup ([`crate::cgroup`]), which this owns
/// and removes when dropped (what still runs in it killed).
#[derive(Debug)]
pub struct VmLaunch {
    jailer: crate::jail::Jailer,
    cgroup: Option<crate::cgroup::Cgroup>,
    /// The VM's own ids, held until the VM ends.
    identity: Option<crate::jail::IdentityLease>,
}

impl VmLaunch {
    /// The launcher for the VM `spec`, with its cgroup made with the spec's limits
    /// (defaults from its size). No cgroup when the jail is off, or when this host has
    /// no usable cgroup v2 and no limit was asked for explicitly (a warning, once); with
    /// explicit limits that is an error.
    pub fn new(
        backend: &'static str,
        jailer: &crate::jail::Jailer,
        spec: &VmSpec,
    ) -> Result<Self, HypervisorError> {
        let jailer = jailer.clone();
        if jailer == crate::jail::Jailer::Off {
            return Ok(Self {
                jailer,
                cgroup: None,
                identity: None,
            });
        }
        let failed = |what: &str, e: io::Error| HypervisorError::Start {
            backend,
            what: what.into(),
            msg: e.to_string(),
        };
        let identity = if jailer.rootless() {
            // No ids but the caller's: the VM's directory is theirs alone.
            crate::jail::keep_private(&vm_dir(&spec.run_dir))
                .map_err(|e| failed("the VM's directory", e))?;
            None
        } else {
            let lease =
                crate::jail::IdentityLease::take().map_err(|e| failed("the VM's identity", e))?;
            crate::jail::hand_over(&vm_dir(&spec.run_dir), lease.identity())
                .map_err(|e| failed("the VM's identity", e))?;
            Some(lease)
        };
        let parent = match crate::cgroup::parent() {
            Ok(p) => p,
            Err(reason) if spec.limits.explicit() => {
                return Err(HypervisorError::Unavailable {
                    backend,
                    reason: format!("the VM's limits need cgroup v2: {reason}"),
                    alternative: "run on a host with a cgroup v2 hierarchy (memory, pids, \
                                  cpu), or drop the explicit limits"
                        .into(),
                })
            }
            Err(reason) => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    tracing::warn!("VMs run without memory, CPU and process limits: {reason}")
                });
                return Ok(Self {
                    jailer,
                    cgroup: None,
                    identity,
                });
            }
        };
        let applied = crate::cgroup::resolve(&spec.limits, spec.vcpus, u64::from(spec.memory_mib));
        let cgroup = crate::cgroup::Cgroup::create(&parent, &spec.name, applied).map_err(|e| {
            HypervisorError::Start {
                backend,
                what: "the VM's cgroup".into(),
                msg: e.to_string(),
            }
        })?;
        Ok(Self {
            jailer,
            cgroup: Some(cgroup),
            identity,
        })
    }

    /// The VM's own ids, when its processes are jailed.
    pub fn identity(&self) -> Option<crate::jail::Identity> {
        self.identity.as_ref().map(|l| l.identity())
    }

    /// How a program of this VM that needs no privilege runs: as the VM's identity,
    /// switched to by the jail, or (`after_setup`) by the program itself once it has
    /// opened its files ([`crate::jail::RunAs`]); in a rootless jail as the caller,
    /// without capabilities. Unchanged ids when the jail is off.
    pub fn run_as(&self, after_setup: bool) -> crate::jail::RunAs {
        match self.identity() {
            None if self.jailer.rootless() => crate::jail::RunAs::Caller,
            None => crate::jail::RunAs::Root,
            Some(who) if after_setup => crate::jail::RunAs::VmAfterSetup(who),
            Some(who) => crate::jail::RunAs::Vm(who),
        }
    }

    /// How a `virtiofsd` of this VM serving `share` (a directory with `meta`) stores the
    /// guest's ids, and the user namespace it runs in, if one of its own:
    /// - rootless: every guest id as the caller (root of the caller's namespace);
    /// - a shifted tree, in a root jail: root of a namespace mapping the shifted range
    ///   (and the VM's identity, whose directory holds its socket), so its capabilities
    ///   reach no file of any other host id; guest ids beyond the range refused;
    /// - a user's directory, in a root jail: root of a namespace mapping that user's ids
    ///   (and the VM's), every guest id stored as them;
    /// - a directory of root's: root, ids as they are (docs/security.md says why to
    ///   share none);
    /// - with the jail off: as the last two, translated by virtiofsd itself.
    pub fn virtiofsd_ids(
        &self,
        share: &ShareSpec,
        meta: &std::fs::Metadata,
    ) -> (GuestIds, Option<crate::jail::IdMaps>) {
        use crate::jail::{IdMaps, IdRange};
        if self.jailer.rootless() {
            return (GuestIds::Squashed { uid: 0, gid: 0 }, None);
        }
        let owner = (meta.uid(), meta.gid());
        let Some(vm) = self.identity() else {
            return match share.ids {
                ShareIds::Shifted { base } => (GuestIds::Shifted { base }, None),
                ShareIds::Host if owner.0 != 0 => (
                    GuestIds::Squashed {
                        uid: owner.0,
                        gid: owner.1,
                    },
                    None,
                ),
                ShareIds::Host => (GuestIds::AsIs, None),
            };
        };
        let range = |inside, outside, count| IdRange {
            inside,
            outside,
            count,
        };
        // The VM's identity after the guest's ids: guest ids never reach it.
        let vm_id = range(65536, vm.id, 1);
        match share.ids {
            // Owned by the shifted root, which no host process is.
            ShareIds::Shifted { base } => {
                let ids = vec![range(0, base, 65536), vm_id];
                (
                    GuestIds::InRange,
                    Some(IdMaps {
                        uids: ids.clone(),
                        gids: ids,
                        owner: Some(base),
                    }),
                )
            }
            // Owned by host root: the user's own processes must have no power over it
            // (it can reach the VM's directory).
            ShareIds::Host if owner.0 != 0 => (
                GuestIds::Squashed { uid: 0, gid: 0 },
                Some(IdMaps {
                    uids: vec![range(0, owner.0, 1), vm_id],
                    gids: vec![range(0, group_of(owner.0, owner.1), 1), vm_id],
                    owner: None,
                }),
            ),
            ShareIds::Host => (GuestIds::AsIs, None),
        }
    }

    /// `cmd` confined by `jail`, in the VM's cgroup ([`crate::jail::Jailer::wrap`]).
    pub fn wrap(&self, mut jail: crate::jail::JailSpec, cmd: Command) -> io::Result<Command> {
        jail.cgroup = self.cgroup.as_ref().map(|c| c.path().to_path_buf());
        self.jailer.wrap(jail, cmd)
    }

    /// How the VM ended: `exit`, unless the kernel killed its processes for going past
    /// the memory limit, which is then what is reported.
    pub fn explain(&self, exit: VmExit) -> VmExit {
        match &self.cgroup {
            // A stop asked for, or a sandbox violation, is the news whatever else the
            // cgroup saw.
            Some(cg)
                if cg.oom_kills() > 0
                    && !matches!(exit, VmExit::Stopped | VmExit::SandboxViolation(_)) =>
            {
                VmExit::MemoryLimit(format!(
                    "the VM's host processes went past their memory limit of {} MiB and the \
                     kernel killed them ({exit:?})",
                    cg.applied().memory_bytes >> 20
                ))
            }
            _ => exit,
        }
    }
}

/// Wait until one of `daemons` dies of SIGSYS (a seccomp filter, its own or boxlet's,
/// killed it: a bug, or a guest that took the daemon over) and return its index; never
/// returns otherwise. A backend runs this beside its wait for the VMM, so such a death
/// stops the whole VM.
pub async fn forbidden_call_in<'a>(daemons: impl Iterator<Item = &'a mut Child>) -> usize {
    use std::os::unix::process::ExitStatusExt;
    let mut daemons: Vec<&mut Child> = daemons.collect();
    loop {
        for (i, d) in daemons.iter_mut().enumerate() {
            if let Ok(Some(status)) = d.try_wait() {
                if status.signal() == Some(SIGSYS) {
                    return i;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The report of a daemon `name` that [`forbidden_call_in`] found killed.
pub fn daemon_violation(name: &str) -> VmExit {
    VmExit::SandboxViolation(format!(
        "{name} made a system call its seccomp filter forbids and was killed (a bug, or a \
         guest that took it over); the VM is stopped"
    ))
}

/// Start a vhost-user daemon (`what`, for `backend`) with its stderr in `log`, and wait
/// until it listens on `socket`. A daemon that exits first is an error carrying its log.
pub async fn start_daemon(
    backend: &'static str,
    what: &str,
    mut cmd: Command,
    socket: &Path,
    log: &Path,
) -> Result<Child, HypervisorError> {
    let err = |msg: String| HypervisorError::Start {
        backend,
        what: what.into(),
        msg,
    };
    let log_file =
        std::fs::File::create(log).map_err(|e| err(format!("{}: {e}", log.display())))?;
    cmd.stdout(Stdio::null()).stderr(log_file);
    // A socket file left by an earlier daemon would look like this one listening.
    let _ = std::fs::remove_file(socket);
    let mut child = cmd.spawn().map_err(|e| err(e.to_string()))?;
    let start = Instant::now();
    while !socket.exists() {
        if let Ok(Some(status)) = child.try_wait() {
            let msg = std::fs::read_to_string(log).unwrap_or_default();
            return Err(err(format!("exited with {status}: {}", msg.trim())));
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err(err("its socket did not appear in 10 s".into()));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Ok(child)
}

/// A command whose process dies with this one.
///
/// `PR_SET_PDEATHSIG` fires when the *thread* that spawned the process exits: create
/// VMs from long-lived threads (a tokio worker, the main thread), not from a
/// `spawn_blocking` thread, which exits when idle and would take the VM with it.
pub fn owned(program: &Path) -> Command {
    let mut c = Command::new(program);
    c.kill_on_drop(true).stdin(std::process::Stdio::null());
    // SAFETY: the closure runs in the forked child before exec and only calls prctl,
    // which is async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    c
}

/// Wait for `child` to exit, or, when a grace period arrives on `stop`, send it SIGTERM
/// and kill it if it has not exited by then. Returns its status and whether it was
/// stopped.
pub async fn wait_or_stop(
    child: &mut Child,
    stop: &mut mpsc::Receiver<Duration>,
) -> (io::Result<ExitStatus>, bool) {
    tokio::select! {
        s = child.wait() => (s, false),
        Some(grace) = stop.recv() => {
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let s = match tokio::time::timeout(grace, child.wait()).await {
                Ok(s) => s,
                Err(_) => {
                    let _ = child.start_kill();
                    child.wait().await
                }
            };
            (s, true)
        }
    }
}

/// Why a VMM process named `program` ended: stopped by the host, a guest kernel panic
/// (the console's "Kernel panic - not syncing" line), a clean exit (the guest reset or
/// powered off), or a failure with its status and stderr log.
pub fn classify(
    program: &str,
    status: io::Result<ExitStatus>,
    stopped: bool,
    console: &Path,
    stderr_log: &Path,
) -> VmExit {
    use std::os::unix::process::ExitStatusExt;
    let status = match status {
        Ok(s) => s,
        Err(e) => return VmExit::VmmFailed(format!("waiting for {program}: {e}")),
    };
    if stopped {
        return VmExit::Stopped;
    }
    // The run directory is writable from the jail: read a bounded tail, never through
    // a symlink put in the log's place.
    let stderr = crate::console::console_tail(stderr_log, 40);
    // Checked before anything the guest can write (its console): a guest must not pass
    // its attack on the VMM off as a panic of its own. Exit 159 is boxlet-vmm's report;
    // other VMMs (QEMU's isa-debug-exit can exit 159) count only by the signal.
    let reported = program == "boxlet-vmm" && status.code() == Some(EXIT_FORBIDDEN_SYSCALL);
    if reported || status.signal() == Some(SIGSYS) {
        // Whatever the VMM's stderr says of it: the process was stopped either way.
        let said = stderr
            .lines()
            .rev()
            .find(|l| l.contains("seccomp"))
            .unwrap_or("no report on stderr");
        return VmExit::SandboxViolation(format!(
            "{program} made a system call its seccomp filter forbids and was stopped \
             (a bug, or a guest that took over the VMM): {}",
            said.trim()
        ));
    }
    let tail = crate::console::console_tail(console, 200);
    if let Some(line) = tail
        .lines()
        .find(|l| l.contains("Kernel panic - not syncing"))
    {
        return VmExit::GuestPanic(line.trim().to_string());
    }
    if status.success() {
        return VmExit::Shutdown;
    }
    let how = match (status.code(), status.signal()) {
        (Some(c), _) => format!("{program} exited with {c}"),
        (None, Some(s)) => format!("{program} killed by signal {s}"),
        _ => format!("{program} ended"),
    };
    VmExit::VmmFailed(format!("{how}: {}", stderr.trim()))
}

/// A VM whose life a monitor task owns: the task receives stop requests (grace
/// periods) and returns how the VM ended. Dropping the handle stops the VM at once.
#[derive(Debug)]
pub struct MonitoredVm {
    stop: mpsc::Sender<Duration>,
    task: Option<tokio::task::JoinHandle<VmExit>>,
    exit: Option<VmExit>,
}

impl MonitoredVm {
    /// Spawn `monitor` with the receiving end of the stop channel.
    pub fn spawn<F, Fut>(monitor: F) -> Self
    where
        F: FnOnce(mpsc::Receiver<Duration>) -> Fut,
        Fut: std::future::Future<Output = VmExit> + Send + 'static,
    {
        let (stop, rx) = mpsc::channel(1);
        Self {
            stop,
            task: Some(tokio::spawn(monitor(rx))),
            exit: None,
        }
    }
}

#[async_trait]
impl Vm for MonitoredVm {
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
            source: io::Error::other(e),
        })?;
        self.exit = Some(exit.clone());
        Ok(exit)
    }

    async fn stop(&mut self, grace: Duration) -> Result<VmExit, HypervisorError> {
        let _ = self.stop.try_send(grace);
        self.wait().await
    }
}

impl Drop for MonitoredVm {
    fn drop(&mut self) {
        // Stop it now; the monitor kills and removes everything. (If the runtime itself
        // is gone, the monitor's processes die with it: kill_on_drop.)
        if self.task.is_some() {
            let _ = self.stop.try_send(Duration::ZERO);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(share: &ShareSpec, ids: GuestIds) -> Vec<String> {
        let cmd = virtiofsd_command(Path::new("virtiofsd"), share, Path::new("/run/s"), ids);
        cmd.as_std()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    fn share(exclusive: bool, read_only: bool, ids: ShareIds) -> ShareSpec {
        ShareSpec {
            tag: "rootfs".into(),
            host_path: "/srv/box".into(),
            read_only,
            exclusive,
            ids,
        }
    }

    #[test]
    fn a_sandbox_violation_is_reported_before_what_the_guest_wrote() {
        use std::os::unix::process::ExitStatusExt;
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console");
        let stderr = dir.path().join("stderr");
        // The guest prints a panic line, then its takeover of the VMM is stopped.
        std::fs::write(&console, "Kernel panic - not syncing: not really\n").unwrap();
        std::fs::write(
            &stderr,
            "boxlet-vmm: seccomp: the vcpu thread made system call 101\n",
        )
        .unwrap();
        let exit_159 = || Ok(ExitStatus::from_raw(EXIT_FORBIDDEN_SYSCALL << 8));
        let sigsys = || Ok(ExitStatus::from_raw(SIGSYS));
        match classify("boxlet-vmm", exit_159(), false, &console, &stderr) {
            VmExit::SandboxViolation(m) => assert!(m.contains("system call 101"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            classify("qemu", sigsys(), false, &console, &stderr),
            VmExit::SandboxViolation(_)
        ));
        // Exit 159 means nothing from another VMM (QEMU's isa-debug-exit can produce it).
        assert!(matches!(
            classify("qemu", exit_159(), false, &console, &stderr),
            VmExit::GuestPanic(_)
        ));
    }

    #[test]
    fn only_an_exclusive_share_lets_the_guest_cache_everything() {
        let shared = args(&share(false, false, ShareIds::Host), GuestIds::AsIs);
        assert!(shared.contains(&"--cache=auto".to_string()), "{shared:?}");
        assert!(!shared
            .iter()
            .any(|a| a == "--cache=always" || a == "--readonly"));
        let own = args(&share(true, true, ShareIds::Host), GuestIds::AsIs);
        assert!(own.contains(&"--cache=always".to_string()), "{own:?}");
        assert!(own.contains(&"--readonly".to_string()), "{own:?}");
        assert!(!own.contains(&"--cache=auto".to_string()));
        // A spec from before the fields existed reads as not exclusive, host ids.
        let old: ShareSpec =
            serde_json::from_str(r#"{"tag":"t","host_path":"/d","read_only":false}"#).unwrap();
        assert!(!old.exclusive);
        assert_eq!(old.ids, ShareIds::Host);
    }

    #[test]
    fn no_share_lets_the_guest_make_devices_capabilities_or_host_xattrs() {
        for ids in [ShareIds::Host, ShareIds::Shifted { base: 1 << 30 }] {
            let a = args(&share(false, false, ids), GuestIds::InRange);
            assert!(
                a.iter().any(|a| a.starts_with("--modcaps=-mknod:-setfcap")),
                "{a:?}"
            );
            assert!(
                a.contains(&"--xattrmap=:map::user.virtiofs.:".to_string()),
                "{a:?}"
            );
        }
    }

    #[test]
    fn guest_ids_land_in_the_shifted_range_or_on_the_directory_owner() {
        let shifted = args(
            &share(true, false, ShareIds::Shifted { base: 1 << 30 }),
            GuestIds::Shifted { base: 1 << 30 },
        );
        assert!(shifted.contains(&"--translate-uid=map:0:1073741824:65536".to_string()));
        assert!(shifted.contains(&"--translate-gid=map:0:1073741824:65536".to_string()));
        assert!(shifted.contains(&"--translate-uid=forbid-guest:65536:4294901759".to_string()));
        // Shifted by the daemon's namespace: only the ids past the range to refuse.
        let in_range = args(
            &share(true, false, ShareIds::Shifted { base: 1 << 30 }),
            GuestIds::InRange,
        );
        assert!(in_range.contains(&"--translate-gid=forbid-guest:65536:4294901759".to_string()));
        assert!(
            !in_range
                .iter()
                .any(|a| a.contains("-uid=map:") || a.contains("-gid=map:")),
            "{in_range:?}"
        );
        let users = args(
            &share(false, false, ShareIds::Host),
            GuestIds::Squashed {
                uid: 1000,
                gid: 100,
            },
        );
        assert!(users.contains(&"--translate-uid=squash-guest:0:1000:4294967295".to_string()));
        assert!(users.contains(&"--translate-gid=squash-guest:0:100:4294967295".to_string()));
        // A user's directory keeps no CAP_FSETID; a box's own root does.
        assert!(users.contains(&"--modcaps=-mknod:-setfcap:-fsetid".to_string()));
        let own = args(&share(true, false, ShareIds::Host), GuestIds::AsIs);
        assert!(
            own.contains(&"--modcaps=-mknod:-setfcap".to_string()),
            "{own:?}"
        );
        let roots = args(&share(false, false, ShareIds::Host), GuestIds::AsIs);
        assert!(
            !roots.iter().any(|a| a.starts_with("--translate")),
            "{roots:?}"
        );
    }

    #[test]
    fn a_jailed_virtiofsd_is_root_only_of_the_ids_its_share_holds() {
        use crate::jail::{IdRange, Jailer};
        let dir = tempfile::tempdir().unwrap();
        let lease = crate::jail::IdentityLease::take_in(&dir.path().join("ids")).unwrap();
        let vm = lease.identity().id;
        let launch = |jailer: Jailer, identity| VmLaunch {
            jailer,
            cgroup: None,
            identity,
        };
        let rooted = launch(Jailer::Helper("/j".into()), Some(lease));
        let meta = |uid, gid| {
            let f = dir.path().join(format!("owned-{uid}"));
            std::fs::write(&f, b"").unwrap();
            if rustix::process::geteuid().is_root() {
                std::os::unix::fs::chown(&f, Some(uid), Some(gid)).unwrap();
            }
            std::fs::metadata(&f).unwrap()
        };
        let range = |inside, outside, count| IdRange {
            inside,
            outside,
            count,
        };
        // A shifted tree: the range and the VM's identity (for its socket), nothing else.
        let (ids, maps) = rooted.virtiofsd_ids(
            &share(true, false, ShareIds::Shifted { base: 1 << 30 }),
            &meta(0, 0),
        );
        assert_eq!(ids, GuestIds::InRange);
        let maps = maps.unwrap();
        assert_eq!(maps.uids, [range(0, 1 << 30, 65536), range(65536, vm, 1)]);
        assert_eq!(maps.gids, maps.uids);
        assert_eq!(maps.owner, Some(1 << 30), "no host process is its owner");
        if rustix::process::geteuid().is_root() {
            // A user's directory: that user's ids alone, every guest id stored as them.
            let (ids, maps) =
                rooted.virtiofsd_ids(&share(false, false, ShareIds::Host), &meta(61_777, 100));
            assert_eq!(ids, GuestIds::Squashed { uid: 0, gid: 0 });
            let maps = maps.unwrap();
            assert_eq!(maps.uids, [range(0, 61_777, 1), range(65536, vm, 1)]);
            assert_eq!(maps.gids, [range(0, 100, 1), range(65536, vm, 1)]);
            assert_eq!(maps.owner, None, "not the user's: host root's");
            // A directory of a group its owner is not in: the owner's own group.
            if let Ok(Some(nobody)) = nix::unistd::User::from_name("nobody") {
                let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());
                let (_, maps) =
                    rooted.virtiofsd_ids(&share(false, false, ShareIds::Host), &meta(uid, 0));
                assert_eq!(maps.unwrap().gids[0], range(0, gid, 1));
                let (_, maps) =
                    rooted.virtiofsd_ids(&share(false, false, ShareIds::Host), &meta(uid, gid));
                assert_eq!(maps.unwrap().gids[0], range(0, gid, 1));
            }
            // Root's: no namespace (its files are root's).
            let (ids, maps) =
                rooted.virtiofsd_ids(&share(false, false, ShareIds::Host), &meta(0, 0));
            assert_eq!((ids, maps), (GuestIds::AsIs, None));
        }
        // Rootless: the caller's namespace, every guest id its root.
        let rootless = launch(Jailer::Rootless("/j".into()), None);
        let (ids, maps) = rootless.virtiofsd_ids(
            &share(true, false, ShareIds::Shifted { base: 1 << 30 }),
            &meta(0, 0),
        );
        assert_eq!((ids, maps), (GuestIds::Squashed { uid: 0, gid: 0 }, None));
        // No jail: virtiofsd translates.
        let off = launch(Jailer::Off, None);
        let (ids, maps) = off.virtiofsd_ids(
            &share(true, false, ShareIds::Shifted { base: 7 }),
            &meta(0, 0),
        );
        assert_eq!((ids, maps), (GuestIds::Shifted { base: 7 }, None));
    }

    #[test]
    fn system_directories_are_never_shared() {
        for bad in [
            "/",
            "/etc",
            "/usr/lib",
            "/proc/self",
            "/home",
            "/root",
            "/var",
            "/tmp",
        ] {
            assert!(check_share_path(Path::new(bad)).is_err(), "{bad}");
        }
        // Through a symlink too.
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("l");
        std::os::unix::fs::symlink("/etc", &link).unwrap();
        let e = check_share_path(&link).unwrap_err();
        assert!(e.contains("/etc"), "{e}");
        assert_eq!(
            check_share_path(dir.path()).unwrap(),
            std::fs::canonicalize(dir.path()).unwrap()
        );
        assert!(check_share_path(&dir.path().join("missing")).is_err());
    }
}
