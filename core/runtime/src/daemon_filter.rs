//! seccomp filters boxlet puts on helper daemons that have none of their own, installed
//! by `boxlet-jail` as its last step before it runs the daemon (so the list includes
//! what the dynamic loader and the C library need to start a program). A call outside
//! the list kills the daemon with SIGSYS (no core: the jail sets none); the backend then
//! stops the VM and reports a sandbox violation.
//!
//! The lists come from tracing the daemons through boxlet's test suites (strace -f) and
//! are kept to what that shows, plus the C library's usual startup.

use std::collections::BTreeMap;

use nix::libc;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

pub use crate::jail::SeccompProfile as Profile;

/// Starting a dynamically linked program: exec itself, the loader mapping and
/// protecting libraries, thread and signal setup of the C library and Rust's std.
const STARTUP: &[libc::c_long] = &[
    libc::SYS_execve,
    libc::SYS_brk,
    libc::SYS_arch_prctl,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_munmap,
    libc::SYS_openat,
    libc::SYS_read,
    libc::SYS_pread64,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_access,
    // Programs finding their own path (/proc/self/exe).
    libc::SYS_readlink,
    libc::SYS_set_tid_address,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prlimit64,
    libc::SYS_getrandom,
    libc::SYS_poll,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_sched_getaffinity,
    libc::SYS_sched_yield,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// vhost-device-vsock at work (strace -f of the QEMU box suite): worker threads named
/// with prctl, the vhost-user socket (descriptors passed on it, guest memory mapped from
/// them), epoll, eventfds, the guest's connections as Unix sockets it binds, accepts and
/// connects, removing stale socket files. Arguments are checked where one call has many
/// uses (ioctl, prctl, socket: see [`program`]).
const VHOST_DEVICE_VSOCK: &[libc::c_long] = &[
    libc::SYS_write,
    libc::SYS_lseek,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_eventfd2,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_unlink,
];

/// Namespace flags of clone: a thread gets none of them.
const CLONE_NAMESPACES: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWCGROUP) as u64;

/// The compiled filters of `profile`, to install in this order: the first fails
/// `clone3` with ENOSYS (its flags are in memory, out of a filter's sight; the C library
/// then uses `clone`, whose flags the second checks), the second is the daemon's list.
pub fn programs(profile: Profile) -> Result<[BpfProgram; 2], String> {
    Ok([
        failing(&[libc::SYS_clone3], libc::ENOSYS)?,
        program(profile)?,
    ])
}

/// A filter that fails `calls` with `errno` and lets everything else through (to the
/// filters after it).
fn failing(calls: &[libc::c_long], errno: i32) -> Result<BpfProgram, String> {
    failing_when(calls.iter().map(|&nr| (nr, Vec::new())).collect(), errno)
}

/// A filter that fails the calls `rules` match (a call with no rule: always) with
/// `errno` and lets everything else through.
fn failing_when(rules: BTreeMap<i64, Vec<SeccompRule>>, errno: i32) -> Result<BpfProgram, String> {
    SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(errno as u32),
        TargetArch::x86_64,
    )
    .and_then(BpfProgram::try_from)
    .map_err(|e| e.to_string())
}

/// The daemon's list of `profile` (see [`programs`] for the filter that goes first).
pub fn program(profile: Profile) -> Result<BpfProgram, String> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let (extra, name): (&[libc::c_long], &str) = match profile {
        Profile::VhostDeviceVsock => (VHOST_DEVICE_VSOCK, "vhost-device-vsock"),
    };
    for &nr in STARTUP.iter().chain(extra) {
        rules.insert(nr, Vec::new());
    }
    // Left to the filter before this one, which refuses it.
    rules.insert(libc::SYS_clone3, Vec::new());
    let when = |arg: u8, values: &[u64]| -> Result<Vec<SeccompRule>, String> {
        values
            .iter()
            .map(|&v| {
                SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, v)
                    .and_then(|c| SeccompRule::new(vec![c]))
                    .map_err(|e| format!("{name}: {e}"))
            })
            .collect()
    };
    // Unix sockets only: the daemon has no network (and no other family).
    rules.insert(libc::SYS_socket, when(0, &[libc::AF_UNIX as u64])?);
    // Non-blocking sockets, and the C library asking whether stderr is a terminal.
    rules.insert(libc::SYS_ioctl, when(1, &[libc::FIONBIO, libc::TCGETS])?);
    // Naming its threads; a panic's abort raising SIGABRT.
    rules.insert(libc::SYS_prctl, when(0, &[libc::PR_SET_NAME as u64])?);
    rules.insert(libc::SYS_tgkill, when(2, &[libc::SIGABRT as u64])?);
    let masked = |arg: u8, mask: u64, value: u64| {
        SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(mask),
            value,
        )
        .and_then(|c| SeccompRule::new(vec![c]))
        .map_err(|e| format!("{name}: {e}"))
    };
    // Threads only: CLONE_THREAD, no namespace.
    rules.insert(
        libc::SYS_clone,
        vec![masked(
            0,
            CLONE_NAMESPACES | libc::CLONE_THREAD as u64,
            libc::CLONE_THREAD as u64,
        )?],
    );
    // futex: WAIT, WAKE, WAIT_BITSET, WAKE_BITSET, with or without PRIVATE and
    // CLOCK_REALTIME (no requeueing, no priority inheritance).
    rules.insert(
        libc::SYS_futex,
        [0, 1, 9, 10]
            .into_iter()
            .map(|op| masked(1, 0x7f, op))
            .collect::<Result<_, _>>()?,
    );
    SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .and_then(BpfProgram::try_from)
    .map_err(|e| format!("{name}: {e}"))
}

/// A filter that fails the keyring calls (`add_key`, `request_key`, `keyctl`) with
/// EPERM and lets everything else through (to the filters after it): every jailed
/// program gets it.
pub fn no_keyrings() -> Result<BpfProgram, String> {
    failing(
        &[libc::SYS_add_key, libc::SYS_request_key, libc::SYS_keyctl],
        libc::EPERM,
    )
}

/// A filter that keeps a file server from making set-user-ID or set-group-ID files:
/// `chmod`, `fchmod`, `fchmodat`, `fchmodat2`, and `creat`, `open`, `openat`, `mknod`,
/// `mknodat` creating a file, fail with EPERM when the mode has S_ISUID or S_ISGID;
/// `openat2`, whose mode is out of a filter's sight, fails with ENOSYS (virtiofsd then
/// uses `openat`). Everything else goes through (to the filters after it). For a
/// virtiofsd serving a directory of a user's (or root's), where such a file would be
/// one to its owner's (or root's) account for whoever can reach it.
pub fn no_set_id_files() -> Result<BpfProgram, String> {
    const SET_ID: [u64; 2] = [libc::S_ISUID as u64, libc::S_ISGID as u64];
    // The kernel's fchmodat2 (Linux 6.6), not in every C library's list yet.
    const SYS_FCHMODAT2: i64 = 452;
    let cond = |arg: u8, mask: u64, value: u64| {
        SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(mask),
            value,
        )
        .map_err(|e| e.to_string())
    };
    // A mode argument with either bit set, when `also` (a creating flag) holds.
    let set_id = |mode_arg: u8, also: Option<(u8, u64)>| -> Result<Vec<SeccompRule>, String> {
        let mut rules = Vec::new();
        for bit in SET_ID {
            let creating: Vec<Option<(u8, u64)>> = match also {
                None => vec![None],
                // O_CREAT, or O_TMPFILE's own bit.
                Some((arg, _)) => vec![
                    Some((arg, libc::O_CREAT as u64)),
                    Some((arg, (libc::O_TMPFILE & !libc::O_DIRECTORY) as u64)),
                ],
            };
            for flag in creating {
                let mut conds = vec![cond(mode_arg, bit, bit)?];
                if let Some((arg, f)) = flag {
                    conds.push(cond(arg, f, f)?);
                }
                rules.push(SeccompRule::new(conds).map_err(|e| e.to_string())?);
            }
        }
        Ok(rules)
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    rules.insert(libc::SYS_chmod, set_id(1, None)?);
    rules.insert(libc::SYS_fchmod, set_id(1, None)?);
    rules.insert(libc::SYS_fchmodat, set_id(2, None)?);
    rules.insert(SYS_FCHMODAT2, set_id(2, None)?);
    rules.insert(libc::SYS_creat, set_id(1, None)?);
    rules.insert(libc::SYS_mknod, set_id(1, None)?);
    rules.insert(libc::SYS_mknodat, set_id(2, None)?);
    rules.insert(libc::SYS_open, set_id(2, Some((1, 0)))?);
    rules.insert(libc::SYS_openat, set_id(3, Some((2, 0)))?);
    failing_when(rules, libc::EPERM)
}

/// The filter that fails `openat2` with ENOSYS, to go with [`no_set_id_files`].
pub fn no_openat2() -> Result<BpfProgram, String> {
    failing(&[libc::SYS_openat2], libc::ENOSYS)
}

/// Put the calling thread (and what it executes) under [`no_set_id_files`] and
/// [`no_openat2`].
pub fn install_no_set_id_files() -> std::io::Result<()> {
    for prog in [no_set_id_files(), no_openat2()] {
        let prog = prog.map_err(std::io::Error::other)?;
        seccompiler::apply_filter(&prog).map_err(std::io::Error::other)?;
    }
    Ok(())
}

/// A filter that fails every x32 system call (numbers with bit 30 set, on the x86-64
/// architecture: filters made by seccompiler check the architecture, not that bit, so a
/// list of numbers to refuse would not see `keyctl | 0x40000000` on a kernel with x32)
/// with EPERM, and kills a program calling with another architecture's convention.
/// Installed first in every jail, before the lists.
pub fn no_x32() -> BpfProgram {
    use seccompiler::sock_filter;
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const JGE_K: u16 = 0x35;
    const RET_K: u16 = 0x06;
    const AUDIT_ARCH_X86_64: u32 = 0xC000_003E;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    let op = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    vec![
        // seccomp_data.arch, at offset 4.
        op(LD_W_ABS, 0, 0, 4),
        op(JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        op(RET_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
        // seccomp_data.nr, at offset 0.
        op(LD_W_ABS, 0, 0, 0),
        op(JGE_K, 0, 1, X32_SYSCALL_BIT),
        op(RET_K, 0, 0, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        op(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ]
}

/// Put the calling thread (and what it executes) under [`no_keyrings`].
pub fn install_no_keyrings() -> std::io::Result<()> {
    seccompiler::apply_filter(&no_x32()).map_err(std::io::Error::other)?;
    let prog = no_keyrings().map_err(std::io::Error::other)?;
    seccompiler::apply_filter(&prog).map_err(std::io::Error::other)
}

/// Put the calling thread (and what it executes) under `profile`'s filters.
pub fn install(profile: Profile) -> std::io::Result<()> {
    for prog in programs(profile).map_err(std::io::Error::other)? {
        seccompiler::apply_filter(&prog).map_err(std::io::Error::other)?;
    }
    Ok(())
}
