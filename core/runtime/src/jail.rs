//! The jail every VMM process and helper daemon starts in: `boxlet-jail SPEC PROGRAM
//! ARGS...` (this crate's small binary, Firecracker's jailer in spirit) puts PROGRAM in
//! new mount, PID, IPC, UTS and network namespaces, on a root of its own that holds only
//! what [`JailSpec`] binds into it (read-only unless said, `nosuid` and `nodev` unless a
//! device is the point), with fresh `/proc` and `/tmp`, the old root detached, every
//! capability but the ones the program needs dropped from its bounding set, no new
//! privileges, no core dumps; then it runs PROGRAM.
//!
//! The launcher is shared: [`Jailer::wrap`] turns a spec and a program into the command
//! a backend spawns, so boxlet-vmm, QEMU, `virtiofsd` and `vhost-device-vsock` (and,
//! next, the network daemons) are confined the same way. As root each VM's programs run
//! as the VM's own ids ([`IdentityLease`]); as an ordinary user ([`Jailer::Rootless`])
//! each jail sits in a user namespace of its own that maps only the caller's ids, and a
//! host that allows no such namespace gets a clear error, not a program run unconfined.
//! `BOXLET_JAIL=off` turns the jail off explicitly (with a warning).

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::process::Command;

use crate::hypervisor::HypervisorError;

/// A host path the jailed program sees, at the same path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    /// The file or directory (a symlink is recreated as a symlink, not followed).
    pub path: PathBuf,
    /// The program may write to it.
    pub writable: bool,
    /// It is a device node the program opens (`/dev/kvm`): the mount keeps devices
    /// usable. Everything else is `nodev`.
    pub device: bool,
}

impl Bind {
    /// Read-only, no devices.
    pub fn ro(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            writable: false,
            device: false,
        }
    }

    /// Writable, no devices.
    pub fn rw(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            writable: true,
            device: false,
        }
    }

    /// A device node, read-write.
    pub fn dev(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            writable: true,
            device: true,
        }
    }
}

/// What a jail holds and keeps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JailSpec {
    /// An empty directory on the host the new root is mounted on (in the jail's own
    /// mount namespace only).
    pub root: PathBuf,
    /// What the program sees besides `/proc`, `/tmp` and the system's shared libraries.
    pub binds: Vec<Bind>,
    /// Capabilities (numbers, as in `linux/capability.h`) left in the bounding set; all
    /// others are dropped. Empty for a VMM.
    pub keep_caps: Vec<u8>,
    /// The VM's cgroup ([`crate::cgroup`]), joined before anything else.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// A seccomp filter of boxlet's for a program without its own
    /// ([`crate::daemon_filter`]), installed last, before the program runs.
    #[serde(default)]
    pub seccomp: Option<SeccompProfile>,
    /// Whose ids the program runs with ([`RunAs`]).
    #[serde(default)]
    pub run_as: RunAs,
    /// The program may execute no file but itself (and its ELF interpreter): a Landlock
    /// ruleset, where the kernel has Landlock (a VMM or daemon never starts another
    /// program; a shell run in a jail does).
    #[serde(default)]
    pub exec_only_program: bool,
    /// For a program a root jail runs as [`RunAs::Root`]: a user namespace with these
    /// ids, the program root in it. Root there is the host ids mapped to 0, and its
    /// capabilities hold over files of mapped ids only: host root's files and everyone
    /// else's are no more its than any stranger's. (A rootless jail maps the caller
    /// alone, whatever this says.)
    #[serde(default)]
    pub id_maps: Option<IdMaps>,
    /// The program may make no set-user-ID or set-group-ID file
    /// ([`crate::daemon_filter::no_set_id_files`]): a file server writing a user's
    /// directory, where such a file would be a way into its owner's account.
    #[serde(default)]
    pub no_set_id_files: bool,
}

/// The ids of a jail's own user namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMaps {
    /// User ids.
    pub uids: Vec<IdRange>,
    /// Group ids.
    pub gids: Vec<IdRange>,
    /// The host user that owns the namespace (any process of its in the host's namespace
    /// has every capability in it): best one no host process runs as, like the shifted
    /// root; host root when unset.
    #[serde(default)]
    pub owner: Option<u32>,
}

/// `count` ids from `inside` in a user namespace are `outside` and up on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRange {
    /// The first id in the namespace.
    pub inside: u32,
    /// The host id it is.
    pub outside: u32,
    /// How many.
    pub count: u32,
}

/// A VM's own unprivileged user and group id, the same number ([`IdentityLease`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The user id (and group id).
    pub id: u32,
}

impl Identity {
    /// `uid:gid`, as QEMU's `-runas` and [`RUN_AS_VAR`] take it.
    pub fn uid_gid(&self) -> String {
        format!("{}:{}", self.id, self.id)
    }
}

/// Whose ids a jailed program runs with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunAs {
    /// Root's, with only [`JailSpec::keep_caps`] (a daemon that serves files as their
    /// owners: `virtiofsd`).
    #[default]
    Root,
    /// The VM's: the jail switches before it runs the program, which starts with no
    /// capability at all (`vhost-device-vsock`).
    Vm(Identity),
    /// The VM's, switched to by the program itself once it has opened its files and
    /// before it runs any guest code (QEMU's `-runas`, boxlet-vmm's
    /// [`switch_to_vm_identity`]): it starts as root with the VM's group and only
    /// CAP_SETUID and CAP_SETGID (and its `keep_caps`), which the switch loses.
    VmAfterSetup(Identity),
    /// The ids of the user who started the jail, with no capability: what a rootless
    /// jail ([`Jailer::Rootless`]) runs a VM's programs as, having no other ids to give.
    Caller,
}

/// Where a program told to switch itself ([`RunAs::VmAfterSetup`]) finds its identity:
/// `uid:gid`.
pub const RUN_AS_VAR: &str = "BOXLET_RUN_AS";

/// The ids VMs run as: `VM_IDS.0 + slot` for 65536 slots, in the block systemd
/// documents as unused (0x70000000-0x7FFDFFFF: above its container range, which
/// `systemd-nspawn --private-users=pick` picks from, below its foreign range and the ids
/// some tools read as negative).
pub const VM_IDS: (u32, u32) = (0x7000_0000, 65536);

/// One VM's [`Identity`], its slot locked (`flock`) in a directory only root may write
/// (`/run/boxlet/ids`, or `$BOXLET_IDS_DIR`) for as long as this lives: no two running
/// VMs on the host share ids, whichever boxlet process or home started them, and a
/// crashed boxlet's slots free themselves.
#[derive(Debug)]
pub struct IdentityLease {
    identity: Identity,
    _lock: std::fs::File,
}

impl IdentityLease {
    /// A free identity, from the host's lease directory.
    pub fn take() -> io::Result<Self> {
        let dir = std::env::var_os("BOXLET_IDS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/run/boxlet/ids"));
        Self::take_in(&dir)
    }

    /// A free identity, leased in `dir` (made private if it is missing; refused if
    /// another user owns it or others may write it).
    pub fn take_in(dir: &Path) -> io::Result<Self> {
        boxlet_cas::private_dir(dir).map_err(io::Error::other)?;
        // Start somewhere different each time, so concurrent starts rarely contend.
        let start = std::process::id().wrapping_mul(2_654_435_761)
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
        for i in 0..VM_IDS.1 {
            let slot = start.wrapping_add(i) % VM_IDS.1;
            let path = dir.join(slot.to_string());
            let file = rustix::fs::open(
                &path,
                rustix::fs::OFlags::CREATE
                    | rustix::fs::OFlags::RDONLY
                    | rustix::fs::OFlags::NOFOLLOW
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::from_raw_mode(0o600),
            )
            .map_err(|e| {
                io::Error::new(
                    io::Error::from(e).kind(),
                    format!("{}: {e}", path.display()),
                )
            })?;
            match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
                Ok(()) => {
                    return Ok(Self {
                        identity: Identity {
                            id: VM_IDS.0 + slot,
                        },
                        _lock: file.into(),
                    })
                }
                Err(rustix::io::Errno::WOULDBLOCK) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(io::Error::other(format!(
            "{}: all {} VM identities are in use",
            dir.display(),
            VM_IDS.1
        )))
    }

    /// The identity leased.
    pub fn identity(&self) -> Identity {
        self.identity
    }
}

/// Give `dir` (made if missing: the directory a VM's processes write their sockets in)
/// and everything directly in it to `who`, mode 0770: the VM's processes, the ones that
/// switch late included (they carry the VM's group), may use it; nobody else. Nothing is
/// followed: a symbolic link in it changes owner itself.
pub fn hand_over(dir: &Path, who: Identity) -> io::Result<()> {
    give_dir(dir, who.id, who.id, 0o770)
}

/// [`hand_over`] for a rootless jail, whose programs run as the caller: `dir` (made if
/// missing) and what is directly in it the caller's, mode 0700, nothing followed.
pub fn keep_private(dir: &Path) -> io::Result<()> {
    give_dir(
        dir,
        rustix::process::geteuid().as_raw(),
        rustix::process::getegid().as_raw(),
        0o700,
    )
}

fn give_dir(dir: &Path, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
    use rustix::fs::{AtFlags, Mode, OFlags};
    let ctx = |e: rustix::io::Errno| {
        io::Error::new(io::Error::from(e).kind(), format!("{}: {e}", dir.display()))
    };
    match std::fs::DirBuilder::new().create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", dir.display()))),
    }
    let fd = rustix::fs::open(
        dir,
        OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(ctx)?;
    let (uid, gid) = (
        rustix::fs::Uid::from_raw(uid),
        rustix::fs::Gid::from_raw(gid),
    );
    rustix::fs::fchown(&fd, Some(uid), Some(gid)).map_err(ctx)?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode)).map_err(ctx)?;
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        rustix::fs::chownat(&fd, &name, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(ctx)?;
    }
    Ok(())
}

/// The identity a program started with [`RunAs::VmAfterSetup`] is to switch to (its
/// [`RUN_AS_VAR`]); `Ok(None)` when the variable is unset.
pub fn vm_identity_from_env() -> io::Result<Option<Identity>> {
    let Some(value) = std::env::var_os(RUN_AS_VAR) else {
        return Ok(None);
    };
    let bad = || {
        io::Error::other(format!(
            "{RUN_AS_VAR}={value:?}: not uid:gid of a VM identity"
        ))
    };
    let text = value.to_str().ok_or_else(bad)?;
    let (u, g) = text.split_once(':').ok_or_else(bad)?;
    let (uid, gid): (u32, u32) = (u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?);
    if uid != gid || !(VM_IDS.0..VM_IDS.0 + VM_IDS.1).contains(&uid) {
        return Err(bad());
    }
    Ok(Some(Identity { id: uid }))
}

/// In a program started with [`RunAs::VmAfterSetup`] (its [`RUN_AS_VAR`] set), once
/// it has opened what it needs and before it serves the guest: become the VM's user
/// (every capability lost with root's ids), checked. The calls are process-wide (every
/// thread switches; a thread already under a seccomp filter must allow exactly these:
/// `setgroups` of one group, `setresgid` and `setresuid` to the identity). Nothing to
/// do, `Ok(None)`, when the variable is unset.
#[cfg(target_os = "linux")]
pub fn switch_to_vm_identity() -> io::Result<Option<Identity>> {
    let Some(who) = vm_identity_from_env()? else {
        return Ok(None);
    };
    use nix::unistd::{Gid, Uid};
    let (uid, gid) = (Uid::from_raw(who.id), Gid::from_raw(who.id));
    nix::unistd::setgroups(&[gid])?;
    nix::unistd::setresgid(gid, gid, gid)?;
    nix::unistd::setresuid(uid, uid, uid)?;
    check_unprivileged(who.id)?;
    Ok(Some(who))
}

/// The process runs as `uid` in every id and holds no capability.
#[cfg(target_os = "linux")]
fn check_unprivileged(uid: u32) -> io::Result<()> {
    let ids = nix::unistd::getresuid()?;
    let caps = rustix::thread::capabilities(None)?;
    if [ids.real, ids.effective, ids.saved]
        .iter()
        .any(|u| u.as_raw() != uid)
        || !caps.effective.is_empty()
        || !caps.permitted.is_empty()
    {
        return Err(io::Error::other(format!(
            "switching to the VM's identity {uid} left ids {ids:?}, capabilities {caps:?}"
        )));
    }
    Ok(())
}

/// A daemon's seccomp filter ([`crate::daemon_filter`]; x86-64 only so far: elsewhere a
/// jail asked for one cannot be made).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SeccompProfile {
    /// `vhost-device-vsock` 0.3 (rust-vmm): vhost-user on a Unix socket, the guest's
    /// connections as Unix sockets beside it, epoll, worker threads.
    VhostDeviceVsock,
}

impl JailSpec {
    /// A jail on `root` holding `binds`, no capability kept, no cgroup.
    pub fn new(root: impl Into<PathBuf>, binds: Vec<Bind>) -> Self {
        Self {
            root: root.into(),
            binds,
            keep_caps: Vec::new(),
            cgroup: None,
            seccomp: None,
            run_as: RunAs::Root,
            exec_only_program: false,
            id_maps: None,
            no_set_id_files: false,
        }
    }
}

/// What every jailed program needs to run at all: the system's programs and shared
/// libraries (read-only), the loader's cache, and the harmless device nodes.
pub fn system_binds() -> Vec<Bind> {
    let mut b: Vec<Bind> = [
        "/usr",
        "/lib",
        "/lib64",
        "/lib32",
        "/libx32",
        "/bin",
        "/sbin",
        "/etc/ld.so.cache",
    ]
    .into_iter()
    .filter(|p| Path::new(p).symlink_metadata().is_ok())
    .map(Bind::ro)
    .collect();
    b.extend(
        ["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random"]
            .into_iter()
            .map(Bind::dev),
    );
    b
}

/// What a VMM needs of `spec`: the directory of its sockets
/// ([`crate::process::vm_dir`]), the kernel and initrd, and every disk with its whole
/// qcow2 backing chain (read-only below the top; a writable disk's chain checked
/// against its pin, [`backing_chain`]).
pub fn vm_binds(spec: &crate::hypervisor::VmSpec) -> io::Result<Vec<Bind>> {
    let mut b = vec![
        Bind::rw(crate::process::vm_dir(&spec.run_dir)),
        Bind::ro(&spec.kernel),
    ];
    b.extend(spec.initrd.iter().map(Bind::ro));
    for disk in &spec.disks {
        b.push(if disk.read_only {
            Bind::ro(&disk.path)
        } else {
            Bind::rw(&disk.path)
        });
        b.extend(
            backing_chain(&disk.path, disk.format, !disk.read_only)?
                .iter()
                .map(Bind::ro),
        );
    }
    Ok(b)
}

/// The files below `disk` (of `format`) in its qcow2 backing chain, top first, resolved.
/// A disk's bytes are the guest's and its header a VMM's to rewrite (a compromised one
/// could point a disk it wrote at any host file for its next boot; a guest can write a
/// qcow2 header into a raw disk): so only a qcow2 disk has a chain, only a backing the
/// header says is qcow2 is read as one, names with `..` or in system trees are refused,
/// and the disk's format and chain must be what boxlet recorded beside it the first time
/// it booted that file writable ([`pin_path`]; a jail binds the disk, never its
/// directory, so no VM reaches the record). A different format or chain for the same
/// file is refused, whether or not it is writable now; a new file at the path (another
/// inode or birth time, which no VM can make) is recorded afresh.
pub fn backing_chain(
    disk: &Path,
    format: crate::hypervisor::DiskFormat,
    writable: bool,
) -> io::Result<Vec<PathBuf>> {
    let mut chain = Vec::new();
    let mut qcow2 = format == crate::hypervisor::DiskFormat::Qcow2;
    let mut at = disk.to_path_buf();
    for _ in 0..16 {
        if !qcow2 {
            break;
        }
        let (backing, backing_format) = backing_of(&at)?;
        let Some(backing) = backing else {
            break;
        };
        if Path::new(&backing)
            .components()
            .any(|c| c == std::path::Component::ParentDir)
        {
            return Err(io::Error::other(format!(
                "{}: backing file {backing:?} has a '..'",
                at.display()
            )));
        }
        let backing = match at.parent() {
            Some(dir) => dir.join(backing),
            None => PathBuf::from(backing),
        };
        let real = std::fs::canonicalize(&backing)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", backing.display())))?;
        if let Some(sys) = crate::process::system_path(&real) {
            return Err(io::Error::other(format!(
                "{}: backing file {} is in {sys}",
                at.display(),
                real.display()
            )));
        }
        chain.push(real.clone());
        // Raw, or no format said: its bytes are data, never a header to follow.
        qcow2 = backing_format == Some(boxlet_qcow2::BackingFormat::Qcow2);
        at = real;
    }
    check_pin(disk, format, &chain, writable)?;
    Ok(chain)
}

/// The backing file name in the qcow2 header of `path`, and the backing format its
/// extension names (`None` when it names none, or the header is one boxlet's parser
/// does not take whole: the name is read alone then).
fn backing_of(path: &Path) -> io::Result<(Option<String>, Option<boxlet_qcow2::BackingFormat>)> {
    let err = |e: boxlet_qcow2::Error| io::Error::other(format!("{}: {e}", path.display()));
    let file = std::fs::File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    match boxlet_qcow2::Header::read(&file) {
        Ok(h) => Ok((h.backing_file, h.backing_format)),
        Err(_) => Ok((
            boxlet_qcow2::read_backing_file_path(path).map_err(err)?,
            None,
        )),
    }
}

/// Where the format and backing chain of `disk` are recorded: `DISK.boxlet-chain`,
/// beside it.
pub fn pin_path(disk: &Path) -> PathBuf {
    let mut name = disk.as_os_str().to_owned();
    name.push(".boxlet-chain");
    PathBuf::from(name)
}

/// The largest record boxlet reads back.
const MAX_PIN: u64 = 64 << 10;

fn check_pin(
    disk: &Path,
    format: crate::hypervisor::DiskFormat,
    chain: &[PathBuf],
    writable: bool,
) -> io::Result<()> {
    use std::io::{Read, Write};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    // The file's identity: inode and birth time (a freed inode's number comes back at
    // once with the next file; its birth time does not), where the file system keeps
    // one. Not the device number, which a remount or a reboot may change.
    use rustix::fs::StatxFlags;
    let x = rustix::fs::statx(
        rustix::fs::CWD,
        disk,
        rustix::fs::AtFlags::empty(),
        StatxFlags::INO | StatxFlags::BTIME,
    )
    .map_err(|e| {
        io::Error::new(
            io::Error::from(e).kind(),
            format!("{}: {e}", disk.display()),
        )
    })?;
    let born = if x.stx_mask & StatxFlags::BTIME.bits() != 0 {
        format!("{}.{:09}", x.stx_btime.tv_sec, x.stx_btime.tv_nsec)
    } else {
        "-".to_string()
    };
    let identity = format!("boxlet-chain 1 {} {born}\n", x.stx_ino).into_bytes();
    let mut record = identity.clone();
    record.extend_from_slice(format!("{format:?}\n").as_bytes());
    for p in chain {
        let bytes = p.as_os_str().as_bytes();
        if bytes.contains(&b'\n') {
            return Err(io::Error::other(format!(
                "{}: a backing file's name has a newline: {}",
                disk.display(),
                p.display()
            )));
        }
        record.extend_from_slice(bytes);
        record.push(b'\n');
    }
    let pin = pin_path(disk);
    let at_pin = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", pin.display()));
    // Only a regular file of this user's, not followed, bounded: the directory may be
    // one others write (a sticky /tmp).
    let old = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(&pin)
    {
        Ok(f) => {
            let m = f.metadata().map_err(at_pin)?;
            if !m.is_file() || m.uid() != rustix::process::geteuid().as_raw() || m.len() > MAX_PIN {
                return Err(io::Error::other(format!(
                    "{}: not a record of this user's (a regular file of at most {MAX_PIN} \
                     bytes): remove it",
                    pin.display()
                )));
            }
            let mut old = Vec::new();
            f.take(MAX_PIN).read_to_end(&mut old).map_err(at_pin)?;
            Some(old)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(at_pin(e)),
    };
    match old {
        Some(old) if old == record => return Ok(()),
        Some(old) if old.starts_with(&identity) => {
            let show = |r: &[u8]| {
                String::from_utf8_lossy(r)
                    .lines()
                    .skip(1)
                    .collect::<Vec<_>>()
                    .join(" -> ")
            };
            return Err(io::Error::other(format!(
                "{}: it is now {}, not the {} boxlet recorded in {} when it first booted \
                 it: its guest or VMM may have rewritten its header. If you changed it \
                 yourself, remove {}",
                disk.display(),
                show(&record),
                show(&old),
                pin.display(),
                pin.display()
            )));
        }
        // Another file at this path since: its record goes.
        Some(_) => std::fs::remove_file(&pin).map_err(at_pin)?,
        None => {}
    }
    if !writable {
        return Ok(());
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&pin)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("recording the disk's chain in {}: {e}", pin.display()),
            )
        })?;
    file.write_all(&record)?;
    file.sync_all()?;
    Ok(())
}

/// Capabilities `virtiofsd` keeps: it serves files as their owners (CHOWN, DAC_OVERRIDE,
/// FOWNER, FSETID, SETGID, SETUID), chroots into the share (SYS_CHROOT), raises its
/// open-file limit (SYS_RESOURCE) and narrows its own bounding set further (SETPCAP:
/// without it libcap-ng fails, logs to syslog, and virtiofsd's seccomp filter kills it
/// for the socket). Not MKNOD, SETFCAP or anything else.
pub const VIRTIOFSD_CAPS: [u8; 9] = [0, 1, 3, CAP_FSETID, 6, 7, 8, 18, 24];

/// CAP_FSETID: of [`VIRTIOFSD_CAPS`], the one a virtiofsd of a user's directory goes
/// without ([`crate::process::users_directory`]).
pub const CAP_FSETID: u8 = 4;

/// The `boxlet-jail` helper: `$BOXLET_JAIL` (a path), beside this executable (or its
/// parent directory, for test binaries), or in `PATH`.
pub fn find_jail() -> Option<PathBuf> {
    crate::process::find_helper("BOXLET_JAIL", "boxlet-jail")
}

/// How processes of VMs are confined here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Jailer {
    /// Through the `boxlet-jail` helper at this path, as root: each VM's programs under
    /// the VM's own identity ([`IdentityLease`]), in its cgroup.
    Helper(PathBuf),
    /// Through the helper, as an ordinary user: each jail in a user namespace of its own
    /// that maps only the caller's ids (root in it for a daemon that keeps capabilities,
    /// the caller's own ids for the rest, [`RunAs::Caller`]). No VM identities (there are
    /// no other ids to give) and no cgroup unless one is delegated.
    Rootless(PathBuf),
    /// Not at all: `BOXLET_JAIL=off`.
    Off,
}

/// The argument that makes `boxlet-jail` check, and say, whether this user may make the
/// namespaces of a rootless jail ([`probe_rootless`]).
pub const PROBE_ARG: &str = "--probe-rootless";

impl Jailer {
    /// The jailer of this host: the helper (rootless when this process is not root, if
    /// the host lets ordinary users make user namespaces), or an error saying why there
    /// is none; `BOXLET_JAIL=off` turns confinement off, loudly.
    pub fn new(backend: &'static str) -> Result<Jailer, HypervisorError> {
        if std::env::var_os("BOXLET_JAIL").is_some_and(|v| v == "off") {
            tracing::warn!(
                "BOXLET_JAIL=off: VMM processes run unconfined, with this process's privileges"
            );
            return Ok(Jailer::Off);
        }
        let helper = find_jail().ok_or(HypervisorError::MissingProgram {
            backend,
            program: "boxlet-jail".into(),
            hint: "build it (cargo build -p boxlet) and put it beside boxlet, or set \
                   BOXLET_JAIL to its path"
                .into(),
        })?;
        if rustix::process::geteuid().is_root() {
            return Ok(Jailer::Helper(helper));
        }
        // Asked once per process: the answer does not change while it runs.
        static ROOTLESS: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
        let probe = ROOTLESS.get_or_init(|| {
            let out = std::process::Command::new(&helper)
                .arg(PROBE_ARG)
                .stdin(std::process::Stdio::null())
                .output()
                .map_err(|e| format!("{}: {e}", helper.display()))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(String::from_utf8_lossy(&out.stderr)
                    .trim()
                    .trim_start_matches("boxlet-jail: ")
                    .to_string())
            }
        });
        match probe {
            Ok(()) => Ok(Jailer::Rootless(helper)),
            Err(reason) => Err(HypervisorError::Unavailable {
                backend,
                reason: format!("confining the VMM without root needs a user namespace: {reason}"),
                alternative: "run as root, let ordinary users make user namespaces (sysctl \
                              user.max_user_namespaces, and kernel.unprivileged_userns_clone \
                              or kernel.apparmor_restrict_unprivileged_userns where the kernel \
                              has them), or set BOXLET_JAIL=off to run VMs unconfined"
                    .into(),
            }),
        }
    }

    /// Whether jails are made without root ([`Jailer::Rootless`]).
    pub fn rootless(&self) -> bool {
        matches!(self, Jailer::Rootless(_))
    }

    /// `cmd` (a program with its arguments, as [`crate::process::owned`] makes it) run
    /// confined by `spec` instead: `boxlet-jail SPEC PROGRAM ARGS...`, the spec written
    /// beside `spec.root`, the program itself bound in. Unchanged when the jail is off.
    pub fn wrap(&self, mut spec: JailSpec, cmd: Command) -> io::Result<Command> {
        let (Jailer::Helper(helper) | Jailer::Rootless(helper)) = self else {
            return Ok(cmd);
        };
        let program = std::fs::canonicalize(cmd.as_std().get_program())?;
        std::fs::create_dir_all(&spec.root)?;
        if !spec.binds.iter().any(|b| b.path == program) {
            spec.binds.push(Bind::ro(&program));
        }
        // The jail binds without following symlinks: resolve them now (a symlink that is
        // itself the bind, like /lib, is recreated as one inside).
        for b in &mut spec.binds {
            if !b.path.symlink_metadata()?.file_type().is_symlink() {
                b.path = std::fs::canonicalize(&b.path)?;
            }
        }
        let file = spec.root.with_extension("json");
        std::fs::write(&file, serde_json::to_vec(&spec).map_err(io::Error::other)?)?;
        let mut jailed = crate::process::owned(helper);
        jailed
            .arg(&file)
            .arg(&program)
            .args(cmd.as_std().get_args());
        // The program gets no more of this process's environment than it needs (a
        // compromised VMM could read the caller's tokens and keys from its own): the
        // variables of [`PASSED_ENV`], then what the command set (the jail passes its
        // own environment on).
        jailed.env_clear();
        for (key, value) in std::env::vars_os() {
            if passed_env(&key) {
                jailed.env(key, value);
            }
        }
        for (key, value) in cmd.as_std().get_envs() {
            match value {
                Some(v) => jailed.env(key, v),
                None => jailed.env_remove(key),
            };
        }
        match spec.run_as {
            RunAs::VmAfterSetup(who) => jailed.env(RUN_AS_VAR, who.uid_gid()),
            _ => jailed.env_remove(RUN_AS_VAR),
        };
        Ok(jailed)
    }
}

/// What of boxlet's environment reaches a jailed program: these variables, and those
/// starting with [`PASSED_ENV_PREFIXES`] (boxlet-vmm's switches and test hooks, the
/// jail's own test hook). Nothing else: not the caller's tokens, keys or agent sockets.
pub const PASSED_ENV: [&str; 6] = ["PATH", "LANG", "LC_ALL", "TZ", "RUST_LOG", "RUST_BACKTRACE"];

/// Prefixes of the variables [`PASSED_ENV`] also lets through.
pub const PASSED_ENV_PREFIXES: [&str; 2] = ["BOXLET_VMM_", "BOXLET_JAIL_TEST_"];

fn passed_env(key: &std::ffi::OsStr) -> bool {
    key.to_str().is_some_and(|k| {
        PASSED_ENV.contains(&k) || PASSED_ENV_PREFIXES.iter().any(|p| k.starts_with(p))
    })
}

/// A jailed command's arguments: `SPEC PROGRAM ARGS...`, as `boxlet-jail` reads them.
pub fn parse_args(
    mut args: impl Iterator<Item = std::ffi::OsString>,
) -> Result<(JailSpec, PathBuf, Vec<std::ffi::OsString>), String> {
    let spec = args
        .next()
        .ok_or("usage: boxlet-jail SPEC PROGRAM [ARGS...]")?;
    let program: PathBuf = args.next().ok_or("boxlet-jail: no program")?.into();
    let text = std::fs::read(&spec).map_err(|e| format!("{}: {e}", Path::new(&spec).display()))?;
    let spec: JailSpec = serde_json::from_slice(&text)
        .map_err(|e| format!("{}: {e}", Path::new(&spec).display()))?;
    if !program.is_absolute() {
        return Err(format!(
            "{}: the program needs an absolute path",
            program.display()
        ));
    }
    Ok((spec, program, args.collect()))
}

#[cfg(target_os = "linux")]
pub use linux::{enter, probe_rootless};

#[cfg(target_os = "linux")]
mod linux {
    use super::*;
    use rustix::mount::{
        mount, mount_bind, mount_change, mount_remount, unmount, MountFlags, MountPropagationFlags,
        UnmountFlags,
    };
    use rustix::thread::{CapabilitySet, UnshareFlags};

    /// Step into the jail `spec` describes, in this (single-threaded) process: new
    /// namespaces; in the child that is PID 1 of the new PID namespace, the new root;
    /// then in its child, the capabilities, ids and limits. Returns in that grandchild,
    /// ready to exec. The two above it never return:
    /// - the outer process stays outside, forwards termination signals, and ends as the
    ///   program did (re-raising the signal that killed it);
    /// - PID 1 keeps root's ids but drops every capability but CAP_KILL, forwards the
    ///   signals on,
    ///   reaps, and reports how the program ended. It is there because the program may
    ///   change its ids (the VM's identity), which clears its parent-death signal: PID
    ///   1's never is, and when PID 1 dies the kernel kills everything in the
    ///   namespace, so nothing of a jail outlives its outer process, however it ends.
    ///   It keeps CAP_KILL alone, to signal a program that runs with other ids.
    ///
    /// Without root, a user namespace comes first, mapping only the caller's ids: to root
    /// in it for a program run as [`RunAs::Root`] (a daemon keeping capabilities, which
    /// then hold over the jail's namespaces only), to themselves for [`RunAs::Caller`].
    pub fn enter(spec: &JailSpec, program: &Path) -> io::Result<()> {
        if let Some(cg) = &spec.cgroup {
            crate::cgroup::join(cg)?;
        }
        let rootless = !rustix::process::geteuid().is_root();
        let maps = spec.id_maps.as_ref().filter(|_| !rootless);
        if let Some(maps) = maps {
            let maps_root = |ranges: &[IdRange]| ranges.iter().any(|r| r.inside == 0);
            if spec.run_as != RunAs::Root || !maps_root(&maps.uids) || !maps_root(&maps.gids) {
                return Err(io::Error::other(
                    "a jail's own user namespace is for a program run as its root, which it \
                     must map",
                ));
            }
        }
        if rootless {
            unshare_rootless(spec.run_as)?;
        } else {
            // SAFETY: the flags do not include FILES, the one that can hide descriptors
            // from other threads (and boxlet-jail has no other threads).
            unsafe { rustix::thread::unshare_unsafe(JAIL_NAMESPACES) }?;
        }
        // The parent holds the write end for its whole life: the child knows it is gone
        // when the pipe reads as ended.
        let (alive_r, alive_w) = io::pipe()?;
        // PID 1 writes the signal that killed the program here (its own death by it
        // could not be seen: PID 1 cannot raise a signal on itself).
        let (died_r, died_w) = io::pipe()?;
        // SAFETY: boxlet-jail is single-threaded at this point (it has started no
        // threads), so the child may do anything the parent could.
        match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
            nix::unistd::ForkResult::Parent { child } => {
                drop((alive_r, died_w));
                std::mem::forget(alive_w);
                supervise(child, died_r)
            }
            nix::unistd::ForkResult::Child => {
                drop((alive_w, died_r));
                if let Some(ms) = std::env::var("BOXLET_JAIL_TEST_FORK_DELAY_MS")
                    .ok()
                    .and_then(|v| v.parse().ok())
                {
                    // Test hook: widen the window in which the parent may die first.
                    std::thread::sleep(std::time::Duration::from_millis(ms));
                }
                rustix::process::set_parent_process_death_signal(Some(
                    rustix::process::Signal::KILL,
                ))?;
                // A parent that died before that sends no signal: then the program must
                // not start, orphaned and unsupervised.
                if parent_gone(&alive_r)? {
                    return Err(io::Error::other(
                        "the jail's outer process ended before the jail was made",
                    ));
                }
                drop(alive_r);
                build_root(spec)?;
                // With id maps, the program makes its own user namespace and PID 1, root
                // outside it, writes its maps (the program may not) before it drops
                // everything.
                let (asked_r, asked_w) = io::pipe()?;
                let (mapped_r, mapped_w) = io::pipe()?;
                // SAFETY: still single-threaded, as above.
                match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
                    nix::unistd::ForkResult::Parent { child } => {
                        drop((asked_w, mapped_r));
                        if let Some(maps) = maps {
                            if let Err(e) = map_ids_of(child, maps, asked_r, mapped_w) {
                                let _ = nix::sys::signal::kill(
                                    child,
                                    nix::sys::signal::Signal::SIGKILL,
                                );
                                return Err(e);
                            }
                        }
                        init(child, died_w)
                    }
                    nix::unistd::ForkResult::Child => {
                        drop((died_w, asked_r, mapped_w));
                        if maps.is_some() {
                            let owner = maps.and_then(|m| m.owner);
                            enter_own_user_namespace(owner, asked_w, mapped_r)?;
                        }
                        confine(spec, program)
                    }
                }
            }
        }
    }

    const JAIL_NAMESPACES: UnshareFlags = UnshareFlags::NEWNS
        .union(UnshareFlags::NEWPID)
        .union(UnshareFlags::NEWIPC)
        .union(UnshareFlags::NEWUTS)
        .union(UnshareFlags::NEWNET);

    /// In the program's process: a user namespace of its own (under root's, which owns
    /// the jail's other namespaces: nothing in it can mount or unmount), asked for on
    /// `asked`; once PID 1 says on `mapped` it wrote the maps, become root of it (the
    /// host ids mapped to 0) with no supplementary group (host root's would still open
    /// files by group).
    fn enter_own_user_namespace(
        owner: Option<u32>,
        asked: io::PipeWriter,
        mapped: io::PipeReader,
    ) -> io::Result<()> {
        use std::io::{Read, Write};
        if let Some(owner) = owner {
            // The namespace is its effective user's: that one for the moment (the real
            // and saved ids stay root's, so the permitted capabilities stay; the
            // effective ones come back from them).
            let root = nix::unistd::Uid::from_raw(0);
            nix::unistd::setresuid(root, nix::unistd::Uid::from_raw(owner), root)?;
            let caps = rustix::thread::capabilities(None)?;
            rustix::thread::set_capabilities(
                None,
                rustix::thread::CapabilitySets {
                    effective: caps.permitted,
                    ..caps
                },
            )?;
        }
        // SAFETY: single-threaded, and no FILES flag, as in `enter`.
        unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWUSER) }?;
        (&asked).write_all(b"u")?;
        drop(asked);
        let mut b = [0u8; 1];
        if (&mapped).read(&mut b)? != 1 {
            return Err(io::Error::other(
                "the jail's init ended before it mapped the program's ids",
            ));
        }
        let root = (nix::unistd::Uid::from_raw(0), nix::unistd::Gid::from_raw(0));
        nix::unistd::setgroups(&[])?;
        nix::unistd::setresgid(root.1, root.1, root.1)?;
        nix::unistd::setresuid(root.0, root.0, root.0)?;
        Ok(())
    }

    /// In PID 1: once `program` says on `asked` it has its user namespace, write `maps`
    /// as its user and group id maps (as root outside it: any host ids may be mapped)
    /// and tell it on `mapped`.
    fn map_ids_of(
        program: nix::unistd::Pid,
        maps: &IdMaps,
        asked: io::PipeReader,
        mapped: io::PipeWriter,
    ) -> io::Result<()> {
        use std::io::{Read, Write};
        let mut b = [0u8; 1];
        if (&asked).read(&mut b)? != 1 {
            return Err(io::Error::other(
                "the program ended before it made its user namespace",
            ));
        }
        // The jail's /proc is read-only: a proc of PID 1's own, for the moment.
        let proc_dir = Path::new("/tmp/.boxlet-map-ids");
        std::fs::DirBuilder::new().create(proc_dir)?;
        let flags = MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC;
        mount("proc", proc_dir, "proc", flags, None)
            .map_err(|e| io::Error::other(format!("mounting {}: {e}", proc_dir.display())))?;
        let written = (|| {
            for (file, ranges) in [("uid_map", &maps.uids), ("gid_map", &maps.gids)] {
                let text: String = ranges
                    .iter()
                    .map(|r| format!("{} {} {}\n", r.inside, r.outside, r.count))
                    .collect();
                let path = proc_dir.join(program.to_string()).join(file);
                std::fs::write(&path, &text).map_err(|e| {
                    io::Error::new(e.kind(), format!("{} ({text:?}): {e}", path.display()))
                })?;
            }
            Ok::<(), io::Error>(())
        })();
        unmount(proc_dir, UnmountFlags::DETACH)?;
        std::fs::remove_dir(proc_dir)?;
        written?;
        (&mapped).write_all(b"m")?;
        Ok(())
    }

    /// The jail's namespaces under a new user namespace owned by this (unprivileged)
    /// user, whose ids it maps (and nothing else): to root for a program run as
    /// [`RunAs::Root`], to themselves for [`RunAs::Caller`]. The supplementary groups
    /// stay as they were (an unprivileged user may not change them; `/dev/kvm` is often
    /// open to a group).
    fn unshare_rootless(run_as: RunAs) -> io::Result<()> {
        let (uid, gid) = (
            rustix::process::getuid().as_raw(),
            rustix::process::getgid().as_raw(),
        );
        let (in_uid, in_gid) = match run_as {
            RunAs::Root => (0, 0),
            RunAs::Caller => (uid, gid),
            RunAs::Vm(_) | RunAs::VmAfterSetup(_) => {
                return Err(io::Error::other(
                    "a rootless jail has no VM identity to run a program as (run as root \
                     for one)",
                ))
            }
        };
        // SAFETY: as in `enter`: no FILES, and a single thread (which NEWUSER needs too).
        unsafe { rustix::thread::unshare_unsafe(JAIL_NAMESPACES | UnshareFlags::NEWUSER) }
            .map_err(|e| {
                io::Error::new(
                    io::Error::from(e).kind(),
                    format!("making a user namespace as uid {uid}: {e}"),
                )
            })?;
        let write = |file: &str, text: String| {
            std::fs::write(file, text).map_err(|e| io::Error::new(e.kind(), format!("{file}: {e}")))
        };
        write("/proc/self/setgroups", "deny".into())?;
        write("/proc/self/gid_map", format!("{in_gid} {gid} 1\n"))?;
        write("/proc/self/uid_map", format!("{in_uid} {uid} 1\n"))?;
        Ok(())
    }

    /// Whether this user may make what a rootless jail is made of: a user namespace with
    /// the jail's namespaces under it, its ids mapped, a private mount tree. Run by
    /// `boxlet-jail --probe-rootless` (the namespaces go with its process).
    pub fn probe_rootless() -> io::Result<()> {
        unshare_rootless(RunAs::Caller)?;
        mount_change(
            "/",
            MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
        )
        .map_err(|e| io::Error::other(format!("making / private in it: {e}")))?;
        Ok(())
    }

    /// CAP_KILL: what the jail's init keeps, to pass signals on to a program that runs
    /// with other ids (it sees only its own PID namespace).
    const CAP_KILL: u8 = 5;

    /// PID 1 of the jail: of root's power only CAP_KILL kept, signals passed to the
    /// program, orphans reaped; ends when the program does, with its exit status, or
    /// saying on `died` which signal killed it.
    fn init(program: nix::unistd::Pid, died: io::PipeWriter) -> ! {
        let drop_everything = || -> io::Result<()> {
            no_core_dumps()?;
            drop_bounding_set_but(&[CAP_KILL])?;
            let kill = CapabilitySet::from_bits_retain(1 << CAP_KILL);
            rustix::thread::set_capabilities(
                None,
                rustix::thread::CapabilitySets {
                    effective: kill,
                    permitted: kill,
                    inheritable: CapabilitySet::empty(),
                },
            )?;
            rustix::thread::set_no_new_privs(true)?;
            Ok(())
        };
        if let Err(e) = drop_everything() {
            eprintln!("boxlet-jail: the jail's init: {e}");
            let _ = nix::sys::signal::kill(program, nix::sys::signal::Signal::SIGKILL);
            std::process::exit(125);
        }
        forward_signals_to(program);
        loop {
            use nix::sys::wait::WaitStatus;
            match nix::sys::wait::waitpid(None, None) {
                Ok(WaitStatus::Exited(pid, code)) if pid == program => std::process::exit(code),
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == program => {
                    use std::io::Write;
                    let _ = (&died).write_all(&[sig as u8]);
                    std::process::exit(128 + sig as i32)
                }
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(_) => std::process::exit(125),
            }
        }
    }

    /// Whether the pipe's write end (the parent's) is closed: a read that does not block
    /// ends at once.
    fn parent_gone(alive: &io::PipeReader) -> io::Result<bool> {
        use std::io::Read;
        rustix::io::ioctl_fionbio(alive, true)?;
        let mut b = [0u8; 1];
        match (&mut &*alive).read(&mut b) {
            Ok(0) => Ok(true),
            Ok(_) => Ok(false),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            Err(e) => Err(e),
        }
    }

    static CHILD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

    extern "C" fn forward(sig: nix::libc::c_int) {
        let pid = CHILD.load(std::sync::atomic::Ordering::Relaxed);
        if pid > 0 {
            // SAFETY: kill is async-signal-safe and takes plain integers.
            unsafe {
                nix::libc::kill(pid, sig);
            }
        }
    }

    /// Pass termination signals (and SIGUSR1, which asks a VMM for its vCPUs'
    /// registers) on to `child`.
    fn forward_signals_to(child: nix::unistd::Pid) {
        use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
        CHILD.store(child.as_raw(), std::sync::atomic::Ordering::Relaxed);
        let action = SigAction::new(
            SigHandler::Handler(forward),
            SaFlags::SA_RESTART,
            SigSet::empty(),
        );
        for sig in [
            Signal::SIGTERM,
            Signal::SIGINT,
            Signal::SIGHUP,
            Signal::SIGUSR1,
        ] {
            // SAFETY: the handler only calls kill, which is async-signal-safe.
            let _ = unsafe { sigaction(sig, &action) };
        }
    }

    /// Outside the namespaces: forward signals to the jail's init, and end as the
    /// program did (`died` names the signal that killed it, if one did).
    fn supervise(child: nix::unistd::Pid, died: io::PipeReader) -> ! {
        use nix::sys::signal::{SigHandler, Signal};
        // Ending as a child that died of SIGSYS, SIGSEGV or SIGABRT did must not leave a
        // core of this process behind.
        let _ = no_core_dumps();
        forward_signals_to(child);
        let end_by = |sig: Signal| -> ! {
            // End the same way, so the runtime sees the signal.
            // SAFETY: restoring the default disposition installs no handler.
            let _ = unsafe { nix::sys::signal::signal(sig, SigHandler::SigDfl) };
            let _ = nix::sys::signal::raise(sig);
            std::process::exit(128 + sig as i32)
        };
        loop {
            match nix::sys::wait::waitpid(child, None) {
                Ok(nix::sys::wait::WaitStatus::Exited(_, code)) => {
                    use std::io::Read;
                    let mut b = [0u8; 1];
                    let told = match (&died).read(&mut b) {
                        Ok(1) => Signal::try_from(i32::from(b[0])).ok(),
                        _ => None,
                    };
                    match told {
                        Some(sig) => end_by(sig),
                        None => std::process::exit(code),
                    }
                }
                Ok(nix::sys::wait::WaitStatus::Signaled(_, sig, _)) => end_by(sig),
                Ok(_) => {}
                Err(nix::errno::Errno::EINTR) => {}
                Err(_) => std::process::exit(125),
            }
        }
    }

    fn inside(root: &Path, path: &Path) -> PathBuf {
        root.join(path.strip_prefix("/").unwrap_or(path))
    }

    /// The new root: a tmpfs with the binds at their own paths, `/proc`, `/tmp`; then
    /// pivot into it and detach the old one.
    fn build_root(spec: &JailSpec) -> io::Result<()> {
        let ctx = |what: &str, p: &Path| {
            let what = format!("{what} {}", p.display());
            move |e: rustix::io::Errno| {
                io::Error::new(io::Error::from(e).kind(), format!("{what}: {e}"))
            }
        };
        // Nothing mounted in here propagates back to the host.
        mount_change(
            "/",
            MountPropagationFlags::REC | MountPropagationFlags::PRIVATE,
        )
        .map_err(ctx("making private", Path::new("/")))?;
        let root = &spec.root;
        mount(
            "tmpfs",
            root,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            Some(c"mode=0755,size=16m"),
        )
        .map_err(ctx("mounting the jail's root on", root))?;
        // /proc and /tmp first: binds may lie under /tmp (a VM's run directory).
        let proc_dir = root.join("proc");
        std::fs::create_dir_all(&proc_dir)?;
        // Read-only as a whole: a root without capabilities may otherwise write by file
        // mode alone to sysctls (core_pattern, modprobe: programs the host kernel runs
        // as root), sysrq, /proc/scsi/scsi (detaching a host disk), /proc/acpi/wakeup.
        mount(
            "proc",
            &proc_dir,
            "proc",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC | MountFlags::RDONLY,
            None,
        )
        .map_err(ctx("mounting", &proc_dir))?;
        // Belt and braces where the mount's flag would not reach (a proc mounted
        // differently by an older kernel): those parts read-only again, the kernel's
        // memory and keys hidden.
        for sub in ["sys", "sysrq-trigger", "irq", "bus", "fs"] {
            let p = proc_dir.join(sub);
            if p.exists() {
                mount_bind(&p, &p).map_err(ctx("binding", &p))?;
                mount_remount(
                    &p,
                    MountFlags::BIND
                        | MountFlags::RDONLY
                        | MountFlags::NOSUID
                        | MountFlags::NODEV
                        | MountFlags::NOEXEC,
                    "",
                )
                .map_err(ctx("making read-only", &p))?;
            }
        }
        for hidden in [
            "kcore",
            "keys",
            "key-users",
            "timer_list",
            "sched_debug",
            "kallsyms",
        ] {
            let p = proc_dir.join(hidden);
            if p.exists() {
                mount_bind("/dev/null", &p).map_err(ctx("hiding", &p))?;
            }
        }
        let tmp = root.join("tmp");
        std::fs::create_dir_all(&tmp)?;
        mount(
            "tmpfs",
            &tmp,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            Some(c"mode=1777,size=64m"),
        )
        .map_err(ctx("mounting", &tmp))?;
        for bind in &spec.binds {
            if !bind.path.is_absolute()
                || bind
                    .path
                    .components()
                    .any(|c| c == std::path::Component::ParentDir)
            {
                return Err(io::Error::other(format!(
                    "{}: a bind must be an absolute path without '..'",
                    bind.path.display()
                )));
            }
            let target = inside(root, &bind.path);
            let meta = std::fs::symlink_metadata(&bind.path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", bind.path.display())))?;
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)?;
            }
            if meta.file_type().is_symlink() {
                let to = std::fs::read_link(&bind.path)?;
                std::os::unix::fs::symlink(to, &target)?;
                continue;
            }
            if meta.is_dir() {
                std::fs::create_dir_all(&target)?;
            } else if target.symlink_metadata().is_err() {
                std::fs::File::create(&target)?;
            }
            // Bound from a descriptor opened without following any symlink, so a path
            // swapped by its owner since it was checked cannot send the bind elsewhere.
            let fd = rustix::fs::openat2(
                rustix::fs::CWD,
                &bind.path,
                rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::empty(),
                rustix::fs::ResolveFlags::NO_SYMLINKS,
            )
            .map_err(ctx("opening (no symlinks)", &bind.path))?;
            let by_fd = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
            mount_bind(by_fd.as_str(), &target).map_err(ctx("binding", &bind.path))?;
            drop(fd);
            let mut flags = MountFlags::BIND | MountFlags::NOSUID | kept_flags(&target)?;
            if !bind.writable {
                flags |= MountFlags::RDONLY;
            }
            if !bind.device {
                flags |= MountFlags::NODEV;
            }
            mount_remount(&target, flags, "").map_err(ctx("restricting", &bind.path))?;
        }
        let old = root.join(".old-root");
        std::fs::create_dir_all(&old)?;
        rustix::process::pivot_root(root, &old).map_err(ctx("pivoting into", root))?;
        std::env::set_current_dir("/")?;
        unmount("/.old-root", UnmountFlags::DETACH).map_err(ctx("detaching", Path::new("/")))?;
        std::fs::remove_dir("/.old-root")?;
        // The root itself read-only from now on.
        mount_remount(
            "/",
            MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
            "",
        )
        .map_err(ctx("sealing", Path::new("/")))?;
        Ok(())
    }

    /// What a bind at `target` keeps of the mount it came from when it is made stricter:
    /// read-only, no-exec, no-dev, no-symlink-following and the access-time rule. In a user namespace the kernel refuses
    /// a remount that would clear them (they are locked); as root, keeping them keeps the
    /// host's intent (a bind never becomes laxer than its source).
    fn kept_flags(target: &Path) -> io::Result<MountFlags> {
        use rustix::fs::StatVfsMountFlags as S;
        let have = rustix::fs::statvfs(target)
            .map_err(|e| io::Error::other(format!("{}: {e}", target.display())))?
            .f_flag;
        let mut keep = MountFlags::empty();
        for (st, mf) in [
            (S::RDONLY, MountFlags::RDONLY),
            (S::NOEXEC, MountFlags::NOEXEC),
            (S::NODEV, MountFlags::NODEV),
            (S::NODIRATIME, MountFlags::NODIRATIME),
            // ST_NOSYMFOLLOW (Linux 5.10), not named by rustix.
            (S::from_bits_retain(0x2000), MountFlags::NOSYMFOLLOW),
        ] {
            if have.contains(st) {
                keep |= mf;
            }
        }
        keep |= if have.contains(S::NOATIME) {
            MountFlags::NOATIME
        } else if have.contains(S::RELATIME) {
            MountFlags::RELATIME
        } else {
            MountFlags::STRICTATIME
        };
        Ok(keep)
    }

    /// Capabilities down to `keep_caps`, no new privileges, no core dumps.
    /// A core limit of zero, soft and hard: nothing of the process's memory (a VM's
    /// guest RAM, or what a compromised program holds) ever lands in a core file.
    fn no_core_dumps() -> io::Result<()> {
        rustix::process::setrlimit(
            rustix::process::Resource::Core,
            rustix::process::Rlimit {
                current: Some(0),
                maximum: Some(0),
            },
        )?;
        Ok(())
    }

    /// Every capability but `keep` out of the bounding set (for good: nothing this
    /// process or what it runs does can get them back).
    fn drop_bounding_set_but(keep: &[u8]) -> io::Result<()> {
        for cap in 0..64u8 {
            if keep.contains(&cap) {
                continue;
            }
            match rustix::thread::remove_capability_from_bounding_set(
                CapabilitySet::from_bits_retain(1 << cap),
            ) {
                Ok(()) => {}
                Err(rustix::io::Errno::INVAL) => break, // past the last capability
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Let this process (and what it executes) execute `program` and its ELF
    /// interpreter, nothing else: a Landlock ruleset handling only execution. Where the
    /// kernel has no Landlock this does nothing (the seccomp filters still hold).
    fn exec_only(program: &Path) -> io::Result<()> {
        use landlock::{
            Access, AccessFs, PathBeneath, PathFd, Ruleset, RulesetAttr, RulesetCreatedAttr, ABI,
        };
        let err = |e: landlock::RulesetError| io::Error::other(format!("landlock: {e}"));
        let mut allowed = vec![program.to_path_buf()];
        if let Some(interp) = elf_interpreter(program)? {
            allowed.push(std::fs::canonicalize(&interp).unwrap_or(interp));
        }
        let mut ruleset = Ruleset::default()
            .handle_access(AccessFs::from_all(ABI::V1) & AccessFs::Execute)
            .map_err(err)?
            .create()
            .map_err(err)?;
        for path in &allowed {
            let fd = PathFd::new(path)
                .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))?;
            ruleset = ruleset
                .add_rule(PathBeneath::new(fd, AccessFs::Execute))
                .map_err(err)?;
        }
        ruleset.restrict_self().map_err(err)?;
        Ok(())
    }

    /// The interpreter (`PT_INTERP`) a 64-bit little-endian ELF names, if any.
    fn elf_interpreter(program: &Path) -> io::Result<Option<PathBuf>> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(program)?;
        let mut eh = [0u8; 64];
        if f.read_at(&mut eh, 0)? < 64 || &eh[..4] != b"\x7fELF" || eh[4] != 2 || eh[5] != 1 {
            return Ok(None);
        }
        let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as u64;
        let u64_at = |b: &[u8], o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let (phoff, phentsize, phnum) = (u64_at(&eh, 32), u16_at(&eh, 54), u16_at(&eh, 56));
        if phentsize < 56 || phnum > 256 {
            return Ok(None);
        }
        for i in 0..phnum {
            let mut ph = [0u8; 56];
            if f.read_at(&mut ph, phoff + i * phentsize)? < 56 {
                return Ok(None);
            }
            if u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]) == 3 {
                let (off, size) = (u64_at(&ph, 8), u64_at(&ph, 32));
                if size == 0 || size > 4096 {
                    return Ok(None);
                }
                let mut name = vec![0u8; size as usize];
                f.read_exact_at(&mut name, off)?;
                let name = name.split(|&b| b == 0).next().unwrap_or_default();
                use std::os::unix::ffi::OsStrExt;
                return Ok(Some(PathBuf::from(std::ffi::OsStr::from_bytes(name))));
            }
        }
        Ok(None)
    }

    /// CAP_SETGID and CAP_SETUID: what a program that switches to the VM's identity
    /// itself needs until it does.
    const SWITCH_CAPS: [u8; 2] = [6, 7];

    /// The most files a jailed program may hold open (a guest that makes its VMM or a
    /// daemon open a descriptor per connection meets EMFILE there, not the host's
    /// limits). virtiofsd may raise its own (it keeps CAP_SYS_RESOURCE to serve files).
    pub(super) const MAX_OPEN_FILES: u64 = 65536;

    /// The most processes and threads a VM identity, or a jail's own user namespace,
    /// may have: this bounds a VM's tasks where no cgroup does (a host without cgroup v2,
    /// a rootless boxlet).
    pub(super) const MAX_VM_TASKS: u64 = 4096;

    /// Lower `resource`'s limits to at most `ceiling` (never raise them).
    fn cap_limit(resource: rustix::process::Resource, ceiling: u64) -> io::Result<()> {
        let now = rustix::process::getrlimit(resource);
        let hard = now.maximum.map_or(ceiling, |h| h.min(ceiling));
        let soft = now.current.map_or(hard, |s| s.min(hard));
        rustix::process::setrlimit(
            resource,
            rustix::process::Rlimit {
                current: Some(soft),
                maximum: Some(hard),
            },
        )?;
        Ok(())
    }

    fn confine(spec: &JailSpec, program: &Path) -> io::Result<()> {
        no_core_dumps()?;
        cap_limit(rustix::process::Resource::Nofile, MAX_OPEN_FILES)?;
        // Counted per user and user namespace (since Linux 5.14): a VM identity's tasks,
        // or those of a jail's own namespace (rootless, or a daemon with id maps). Not
        // for host root, whose count is every root process's (and is not enforced).
        let host_root = spec.run_as == RunAs::Root
            && spec.id_maps.is_none()
            && rustix::process::geteuid().is_root();
        if !host_root {
            cap_limit(rustix::process::Resource::Nproc, MAX_VM_TASKS)?;
        }
        let mut keep_caps = spec.keep_caps.clone();
        match spec.run_as {
            RunAs::Root => {}
            RunAs::Vm(_) if !keep_caps.is_empty() => {
                return Err(io::Error::other(
                    "a program run as the VM's identity keeps no capability",
                ))
            }
            RunAs::Vm(_) => {}
            RunAs::Caller if !keep_caps.is_empty() => {
                return Err(io::Error::other(
                    "a program run as the caller in a jail keeps no capability",
                ))
            }
            // As root that would be root's ids (owner of root's files) without capabilities.
            RunAs::Caller if rustix::process::geteuid().is_root() => {
                return Err(io::Error::other(
                    "a program run as the caller is for rootless jails; as root, run it as \
                     a VM identity",
                ))
            }
            RunAs::Caller => {}
            RunAs::VmAfterSetup(who) => {
                keep_caps.extend(SWITCH_CAPS);
                // Its group now, so what the VM's processes made (mode 0770 under the
                // umask below) is open to it before it switches.
                nix::unistd::setgroups(&[nix::unistd::Gid::from_raw(who.id)])?;
            }
        }
        match spec.run_as {
            RunAs::Root => {}
            // Sockets and files the VM's processes make are theirs and their group's.
            RunAs::Vm(_) | RunAs::VmAfterSetup(_) => {
                rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o007));
            }
            // The caller's alone.
            RunAs::Caller => {
                rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
            }
        }
        drop_bounding_set_but(&keep_caps)?;
        // What the program starts with is the bounding set only: nothing inherited,
        // nothing ambient, from whatever started boxlet.
        let keep = keep_caps.iter().fold(CapabilitySet::empty(), |s, &c| {
            s | CapabilitySet::from_bits_retain(1 << c)
        });
        rustix::thread::clear_ambient_capability_set()?;
        if let RunAs::Vm(who) = spec.run_as {
            // Leaving root's ids drops every capability (no SECBIT_KEEP_CAPS here).
            use nix::unistd::{Gid, Uid};
            let (uid, gid) = (Uid::from_raw(who.id), Gid::from_raw(who.id));
            nix::unistd::setgroups(&[])?;
            nix::unistd::setresgid(gid, gid, gid)?;
            nix::unistd::setresuid(uid, uid, uid)?;
            super::check_unprivileged(who.id)?;
        }
        let current = rustix::thread::capabilities(None)?;
        rustix::thread::set_capabilities(
            None,
            rustix::thread::CapabilitySets {
                effective: current.effective & keep,
                permitted: current.permitted & keep,
                inheritable: CapabilitySet::empty(),
            },
        )?;
        rustix::thread::set_no_new_privs(true)?;
        if spec.exec_only_program {
            exec_only(program)?;
        }
        // No keyring for anything jailed: a key a VM's process stores outlives it, in the
        // keyring of its ids, which a later VM of the same slot gets. (And no x32 call,
        // which the lists of numbers below would not see.)
        #[cfg(target_arch = "x86_64")]
        crate::daemon_filter::install_no_keyrings()?;
        if spec.no_set_id_files {
            #[cfg(target_arch = "x86_64")]
            crate::daemon_filter::install_no_set_id_files()?;
            #[cfg(not(target_arch = "x86_64"))]
            return Err(io::Error::other(
                "no set-ID filter for this architecture: share the directory read-only",
            ));
        }
        if let Some(profile) = spec.seccomp {
            #[cfg(target_arch = "x86_64")]
            crate::daemon_filter::install(profile)?;
            #[cfg(not(target_arch = "x86_64"))]
            return Err(io::Error::other(format!(
                "no seccomp filter {profile:?} for this architecture"
            )));
        }
        Ok(())
    }
}
