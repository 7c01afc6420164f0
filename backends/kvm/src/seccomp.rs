//! System call filters for boxlet-vmm's threads (seccomp-bpf, built with seccompiler).
//!
//! Every thread installs the filter of its role once the VM is built and before it runs
//! anything the guest drives: a vCPU thread ([`Role::Vcpu`]: `KVM_RUN` and the few vCPU
//! ioctls, plus the device I/O a vCPU exit may do, since a guest may notify a queue by a
//! plain MMIO write), a device thread ([`Role::Device`]: disk reads and writes, the vsock
//! sockets, the vhost-user messages), the vhost-user watchdog ([`Role::Watchdog`]) and the
//! main thread ([`Role::Main`]: waiting for the vCPUs, kicking them, and tearing the
//! devices down at the end). No thread serves the guest before all are filtered. The
//! threads share one address space, so a thread the guest took over could drive
//! another: the roles narrow what each does by accident, the union of them is what a
//! compromised VMM can do. No filter allows
//! opening a file, creating a process or thread, executable memory, or any ioctl but the
//! listed ones.
//!
//! A call outside the filter traps: [`report_violations`]'s handler writes which thread
//! made which call to stderr and ends the process with [`EXIT_FORBIDDEN_SYSCALL`], which
//! the runtime reports as a sandbox violation (`boxlet::VmExit::SandboxViolation`).
//!
//! `BOXLET_VMM_SECCOMP=off` in the VMM's environment leaves the threads unfiltered (for
//! finding which call a new device needs; stderr says so). `BOXLET_VMM_TEST_FORBIDDEN`
//! (`vcpu`, `device` or `main`) is a test hook: that thread makes a forbidden call right
//! after its filter is in, which must stop the VM.

use std::cell::Cell;
use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};
use vmm_sys_util::signal::register_signal_handler;

use crate::vmm::VmmError;

/// The exit status of a VMM that made a forbidden system call (128 + SIGSYS, as a shell
/// would show a process SIGSYS killed).
pub const EXIT_FORBIDDEN_SYSCALL: i32 = boxlet::process::EXIT_FORBIDDEN_SYSCALL;

/// What a thread does, and so which calls it may make.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Runs the VMM's main loop once the VM is up: waits, kicks vCPUs, exits.
    Main,
    /// Runs one vCPU, and device emulation on its MMIO and port exits.
    Vcpu,
    /// Serves one virtio device's queues and host-side sockets.
    Device,
    /// Cuts a vhost-user connection that stops answering.
    Watchdog,
}

impl Role {
    fn name(self) -> &'static str {
        match self {
            Role::Main => "main",
            Role::Vcpu => "vcpu",
            Role::Device => "device",
            Role::Watchdog => "watchdog",
        }
    }
}

thread_local! {
    /// This thread's role, for the violation report (read in the signal handler: a
    /// const-initialised thread local without destructor needs no allocation there).
    static ROLE: Cell<&'static str> = const { Cell::new("unfiltered") };
}

fn cond(arg: u8, op: Op, value: u64) -> SeccompCondition {
    // Only fails for an argument index above 5, which none here is.
    SeccompCondition::new(arg, Len::Dword, op, value).expect("seccomp argument index 0-5")
}

fn rule(conditions: Vec<SeccompCondition>) -> SeccompRule {
    SeccompRule::new(conditions).expect("a seccomp rule has conditions")
}

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// Allow `nr` with any arguments.
fn any(rules: &mut Rules, nr: libc::c_long) {
    rules.insert(nr, Vec::new());
}

/// Allow `nr` when argument `arg` equals one of `values`.
fn one_of(rules: &mut Rules, nr: libc::c_long, arg: u8, values: &[u64]) {
    let list = rules.entry(nr).or_default();
    list.extend(values.iter().map(|&v| rule(vec![cond(arg, Op::Eq, v)])));
}

// ioctl request numbers (linux/kvm.h and asm-generic/ioctls.h).
const KVMIO: u64 = 0xAE;
const fn io(nr: u64) -> u64 {
    (KVMIO << 8) | nr
}
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
const KVM_RUN: u64 = io(0x80);
const KVM_GET_REGS: u64 = ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>());
const KVM_GET_SREGS: u64 = ior(0x83, std::mem::size_of::<kvm_bindings::kvm_sregs>());
const KVM_GET_MP_STATE: u64 = ior(0x98, std::mem::size_of::<kvm_bindings::kvm_mp_state>());
const FIONBIO: u64 = 0x5421;

/// futex operations without their PRIVATE and CLOCK_REALTIME flags: WAIT, WAKE,
/// WAIT_BITSET, WAKE_BITSET (no requeueing or priority inheritance).
const FUTEX_CMD_MASK: u64 = 0x7f;
const FUTEX_OPS: [u64; 4] = [0, 1, 9, 10];

/// What every thread needs: memory (never executable), locks, signals for panics and
/// kicks, time, writing (console, stderr, eventfds), reading (eventfds), ending.
fn base() -> Rules {
    let mut r = Rules::new();
    for nr in [
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_close,
        libc::SYS_brk,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sigaltstack,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_getrandom,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ] {
        any(&mut r, nr);
    }
    // mmap and mprotect: never PROT_EXEC (no new code in the process).
    for nr in [libc::SYS_mmap, libc::SYS_mprotect] {
        r.insert(
            nr,
            vec![rule(vec![cond(2, Op::MaskedEq(libc::PROT_EXEC as u64), 0)])],
        );
    }
    r.insert(
        libc::SYS_futex,
        FUTEX_OPS
            .iter()
            .map(|&op| rule(vec![cond(1, Op::MaskedEq(FUTEX_CMD_MASK), op)]))
            .collect(),
    );
    // A panic aborts: SIGABRT's action reset, then raised at this thread.
    one_of(&mut r, libc::SYS_rt_sigaction, 0, &[libc::SIGABRT as u64]);
    one_of(&mut r, libc::SYS_tgkill, 2, &[libc::SIGABRT as u64]);
    r
}

/// Device emulation: disk I/O (qcow2 grows its file), the vsock sockets (a guest's
/// connection to a host port opens a Unix socket to the run directory's listener; its
/// epoll set; the peer's credentials against our uid), the vhost-user messages
/// (descriptors passed with them), polling.
fn device_io(r: &mut Rules) {
    for nr in [
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_lseek,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_ftruncate,
        libc::SYS_fstat,
        libc::SYS_statx,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_connect,
        libc::SYS_accept4,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_recvmsg,
        libc::SYS_sendmsg,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
        libc::SYS_fcntl,
    ] {
        any(r, nr);
    }
    // Unix stream sockets only: the VMM has no network, and no other family.
    r.insert(
        libc::SYS_socket,
        vec![rule(vec![cond(0, Op::Eq, libc::AF_UNIX as u64)])],
    );
    one_of(r, libc::SYS_ioctl, 1, &[FIONBIO]);
}

/// The rules of `role`.
fn rules(role: Role) -> Rules {
    let mut r = base();
    match role {
        Role::Main => {
            // Kicking vCPU threads out of KVM_RUN (SIGRTMIN, see `vmm::run`).
            one_of(&mut r, libc::SYS_tgkill, 2, &[libc::SIGRTMIN() as u64]);
            // Tearing the devices down when the VM ends: a qcow2 image flushes its
            // metadata. (The vsock device's removal of its socket is refused like every
            // path call: the backend removes it.)
            device_io(&mut r);
        }
        Role::Vcpu => {
            device_io(&mut r);
            one_of(
                &mut r,
                libc::SYS_ioctl,
                1,
                &[KVM_RUN, KVM_GET_REGS, KVM_GET_SREGS, KVM_GET_MP_STATE],
            );
        }
        Role::Device => device_io(&mut r),
        Role::Watchdog => any(&mut r, libc::SYS_shutdown),
    }
    r
}

/// Calls that name a path: every filter lets them through to the [`Program::opens`]
/// filter stacked under it, which fails them with EACCES. glibc opens files on its own
/// (`/proc/sys/vm/overcommit_memory` when a thread's malloc arena shrinks,
/// `/sys/devices/system/cpu/online` for a new arena) and copes with a refusal; a trap
/// there would kill a healthy VM. Nothing is opened either way.
const PATH_CALLS: [libc::c_long; 8] = [
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_creat,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// A role's filters: both installed, the kernel takes the stricter answer of the two.
#[derive(Debug)]
pub struct Program {
    /// Path calls fail with EACCES; everything else passes (to `calls`).
    opens: BpfProgram,
    /// The role's calls pass (path calls too, for `opens` to refuse); anything else
    /// traps.
    calls: BpfProgram,
}

/// The switch to the VM's identity `id` ([`boxlet::jail::switch_to_vm_identity`]),
/// exactly: glibc makes each call in every thread, so a thread filtered before the VMM
/// switches (a vhost-user watchdog, started while devices are set up) must let these
/// through. Once switched they change nothing (and without capabilities could not).
fn identity_switch(rules: &mut Rules, id: u32) {
    let id = u64::from(id);
    one_of(rules, libc::SYS_setgroups, 0, &[1]);
    for nr in [libc::SYS_setresgid, libc::SYS_setresuid] {
        rules
            .entry(nr)
            .or_default()
            .push(rule((0..3).map(|arg| cond(arg, Op::Eq, id)).collect()));
    }
}

/// The compiled filters of `role` (`switch_to`: the identity the VMM switches to once
/// set up, which a watchdog thread, filtered before that, must go along with).
pub fn filter(role: Role, switch_to: Option<u32>) -> Result<Program, VmmError> {
    let err = |e: seccompiler::BackendError| {
        VmmError::Device(format!("seccomp filter for {}: {e}", role.name()))
    };
    let mut allowed = rules(role);
    if let (Role::Watchdog, Some(id)) = (role, switch_to) {
        identity_switch(&mut allowed, id);
    }
    let mut paths = Rules::new();
    for nr in PATH_CALLS {
        any(&mut allowed, nr);
        any(&mut paths, nr);
    }
    let compile = |rules, mismatch, matched| {
        SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64)
            .and_then(BpfProgram::try_from)
            .map_err(err)
    };
    Ok(Program {
        opens: compile(
            paths,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::EACCES as u32),
        )?,
        calls: compile(allowed, SeccompAction::Trap, SeccompAction::Allow)?,
    })
}

/// Whether filters are on (`BOXLET_VMM_SECCOMP=off` turns them off).
pub fn enabled() -> bool {
    std::env::var_os("BOXLET_VMM_SECCOMP").is_none_or(|v| v != "off")
}

/// Install `role`'s filter on the calling thread (it stays for the thread's life and
/// cannot be removed), then run the test hook if it names this role.
pub fn install(role: Role, prog: &Program) -> Result<(), VmmError> {
    apply(role, prog)
        .map_err(|e| VmmError::Device(format!("installing the {} filter: {e}", role.name())))?;
    if std::env::var_os("BOXLET_VMM_TEST_FORBIDDEN").is_some_and(|v| v == role.name()) {
        forbidden_call();
    }
    Ok(())
}

/// Set the thread's role and filters (allocates nothing unless it fails).
fn apply(role: Role, prog: &Program) -> Result<(), seccompiler::Error> {
    ROLE.with(|r| r.set(role.name()));
    seccompiler::apply_filter(&prog.opens)?;
    seccompiler::apply_filter(&prog.calls)
}

/// A call no filter allows (the test hook's).
fn forbidden_call() {
    // SAFETY: ptrace(PTRACE_TRACEME) takes no pointers; under a filter it traps.
    unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0) };
}

/// Filters for every role, compiled once before any thread needs one (compiling
/// allocates; installing does not).
#[derive(Debug)]
pub struct Filters {
    main: Program,
    vcpu: Program,
    device: Program,
    watchdog: Program,
}

impl Filters {
    /// Every role's filter.
    pub fn new() -> Result<Self, VmmError> {
        let switch_to = boxlet::jail::vm_identity_from_env()
            .map_err(|e| VmmError::Device(e.to_string()))?
            .map(|who| who.id);
        Ok(Self {
            main: filter(Role::Main, None)?,
            vcpu: filter(Role::Vcpu, None)?,
            device: filter(Role::Device, None)?,
            watchdog: filter(Role::Watchdog, switch_to)?,
        })
    }

    /// The program of `role`.
    pub fn of(&self, role: Role) -> &Program {
        match role {
            Role::Main => &self.main,
            Role::Vcpu => &self.vcpu,
            Role::Device => &self.device,
            Role::Watchdog => &self.watchdog,
        }
    }
}

/// The VMM's filters, once [`init`] ran (`None` inside: turned off).
static FILTERS: std::sync::OnceLock<Option<Filters>> = std::sync::OnceLock::new();

/// Compile the filters and install the violation report, for [`enter`] to use: the VMM
/// does this first. `BOXLET_VMM_SECCOMP=off` leaves threads unfiltered (said on stderr).
pub fn init() -> Result<(), VmmError> {
    let filters = if enabled() {
        report_violations()?;
        Some(Filters::new()?)
    } else {
        eprintln!("boxlet-vmm: BOXLET_VMM_SECCOMP=off: threads run without seccomp filters");
        None
    };
    let _ = FILTERS.set(filters);
    Ok(())
}

/// Put the calling thread under `role`'s filter, if [`init`] ran and filters are on
/// (device models used outside the VMM, as in unit tests, run unfiltered). A filter
/// that cannot be installed ends the VMM: no thread serves a guest unfiltered, and the
/// others wait for this one before they start.
pub fn enter(role: Role) {
    if let Some(Some(f)) = FILTERS.get() {
        if let Err(e) = install(role, f.of(role)) {
            eprintln!("boxlet-vmm: {e}");
            std::process::exit(1);
        }
    }
}

/// Install the SIGSYS handler that reports a forbidden call and ends the process.
fn report_violations() -> Result<(), VmmError> {
    register_signal_handler(libc::SIGSYS, on_forbidden_syscall)
        .map_err(|e| VmmError::Device(format!("SIGSYS handler: {e}")))
}

/// Offset of `si_syscall` in a SIGSYS `siginfo_t` on 64-bit Linux: signo, errno, code
/// and padding (16 bytes), then `_sigsys { void *call_addr; int syscall; ... }`.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_forbidden_syscall(
    _: libc::c_int,
    info: *mut libc::siginfo_t,
    _: *mut libc::c_void,
) {
    // Only async-signal-safe work here: format into a stack buffer, write, _exit.
    let nr = if info.is_null() {
        -1
    } else {
        // SAFETY: the kernel passes a siginfo of at least 128 bytes for SIGSYS, whose
        // `si_syscall` int sits at SI_SYSCALL_OFFSET (aligned to 8).
        unsafe { *(info as *const u8).add(SI_SYSCALL_OFFSET).cast::<i32>() }
    };
    let role = ROLE.with(|r| r.get());
    let mut msg = Message::default();
    msg.push(b"boxlet-vmm: seccomp: the ");
    msg.push(role.as_bytes());
    msg.push(b" thread made system call ");
    msg.number(nr);
    msg.push(b", which its filter forbids: the VM is stopped\n");
    // SAFETY: write and _exit are async-signal-safe; the buffer is live and `len` long.
    unsafe {
        libc::write(2, msg.buf.as_ptr().cast(), msg.len);
        libc::_exit(EXIT_FORBIDDEN_SYSCALL);
    }
}

/// A fixed buffer a signal handler can format into.
struct Message {
    buf: [u8; 192],
    len: usize,
}

impl Default for Message {
    fn default() -> Self {
        Self {
            buf: [0; 192],
            len: 0,
        }
    }
}

impl Message {
    fn push(&mut self, s: &[u8]) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s[..n]);
        self.len += n;
    }

    fn number(&mut self, n: i32) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 10];
        let mut v = n.unsigned_abs();
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_compiles() {
        for role in [Role::Main, Role::Vcpu, Role::Device, Role::Watchdog] {
            let prog = filter(role, None).unwrap();
            assert!(!prog.opens.is_empty() && !prog.calls.is_empty(), "{role:?}");
        }
    }

    #[test]
    fn kvm_ioctl_numbers_match_the_kernel_headers() {
        // linux/kvm.h, x86_64.
        assert_eq!(KVM_RUN, 0xae80);
        assert_eq!(KVM_GET_REGS, 0x8090_ae81);
        assert_eq!(KVM_GET_SREGS, 0x8138_ae83);
        assert_eq!(KVM_GET_MP_STATE, 0x8004_ae98);
    }

    #[test]
    fn only_vcpu_threads_may_run_a_vcpu_and_no_thread_may_start_processes() {
        let ioctls = |role| rules(role).get(&libc::SYS_ioctl).map(Vec::len);
        assert_eq!(ioctls(Role::Main), Some(1));
        assert_eq!(ioctls(Role::Watchdog), None);
        assert_eq!(ioctls(Role::Device), Some(1));
        assert_eq!(ioctls(Role::Vcpu), Some(5));
        assert!(!rules(Role::Watchdog).contains_key(&libc::SYS_socket));
        for role in [Role::Main, Role::Vcpu, Role::Device, Role::Watchdog] {
            assert!(!rules(role).contains_key(&libc::SYS_unlink), "{role:?}");
        }
        for role in [Role::Main, Role::Vcpu, Role::Device, Role::Watchdog] {
            let r = rules(role);
            for nr in [
                libc::SYS_execve,
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_fork,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_bpf,
            ] {
                assert!(!r.contains_key(&nr), "{role:?} allows {nr}");
            }
        }
    }

    /// In a forked child (one thread, nothing allocated after the fork): install
    /// `role`'s filter, make the call `call` does, and return the exit status and what
    /// the child wrote to stderr.
    fn in_child(role: Role, call: fn()) -> (i32, String) {
        in_child_switching(role, None, call)
    }

    /// [`in_child`], the filter allowing the switch to `switch_to`.
    fn in_child_switching(role: Role, switch_to: Option<u32>, call: fn()) -> (i32, String) {
        use std::io::Read;
        use std::os::fd::{AsRawFd, FromRawFd};
        let prog = filter(role, switch_to).unwrap();
        let mut fds = [0; 2];
        // SAFETY: pipe fills the two-int array it is given.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors are fresh and owned here.
        let (mut r, w) = unsafe {
            (
                std::fs::File::from_raw_fd(fds[0]),
                std::fs::File::from_raw_fd(fds[1]),
            )
        };
        report_violations().unwrap();
        // SAFETY: the child only makes system calls and touches memory prepared before
        // the fork (the filter, the thread-local role), then exits with _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: dup2 of live descriptors.
            unsafe { libc::dup2(w.as_raw_fd(), 2) };
            if apply(role, &prog).is_err() {
                // SAFETY: _exit has no preconditions.
                unsafe { libc::_exit(90) };
            }
            call();
            // SAFETY: as above.
            unsafe { libc::_exit(0) };
        }
        drop(w);
        let mut status = 0;
        // SAFETY: waiting for our own child, into a local.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        let mut text = String::new();
        r.read_to_string(&mut text).unwrap();
        assert!(libc::WIFEXITED(status), "child status {status:#x}: {text}");
        (libc::WEXITSTATUS(status), text)
    }

    #[test]
    fn a_forbidden_call_stops_the_process_and_names_the_thread_and_call() {
        let (code, text) = in_child(Role::Vcpu, forbidden_call);
        assert_eq!(code, EXIT_FORBIDDEN_SYSCALL, "{text}");
        assert!(
            text.contains("the vcpu thread made system call 101,"),
            "{text}"
        );
    }

    const VM_ID: u32 = boxlet::jail::VM_IDS.0 + 77;

    #[test]
    fn a_watchdog_goes_along_with_the_switch_to_the_vms_identity_and_nothing_else() {
        // SAFETY: plain calls with integer arguments and a one-element list; _exit has
        // no preconditions.
        let to_vm = || unsafe {
            let g = VM_ID;
            libc::syscall(libc::SYS_setgroups, 1, &g as *const u32);
            libc::syscall(libc::SYS_setresgid, VM_ID, VM_ID, VM_ID);
            let r = libc::syscall(libc::SYS_setresuid, VM_ID, VM_ID, VM_ID);
            libc::_exit(if r == 0 { 0 } else { 1 });
        };
        // SAFETY: integer arguments only.
        let to_root = || unsafe {
            libc::syscall(libc::SYS_setresuid, 0, 0, 0);
        };
        // SAFETY: integer arguments only.
        let to_other = || unsafe {
            libc::syscall(libc::SYS_setresuid, VM_ID + 1, VM_ID + 1, VM_ID + 1);
        };
        let root = nix::unistd::geteuid().is_root();
        let (code, text) = in_child_switching(Role::Watchdog, Some(VM_ID), to_vm);
        // (Without root the calls are allowed by the filter and refused by the kernel.)
        assert_eq!(code, if root { 0 } else { 1 }, "{text}");
        for call in [to_root, to_other] {
            let (code, text) = in_child_switching(Role::Watchdog, Some(VM_ID), call);
            assert_eq!(code, EXIT_FORBIDDEN_SYSCALL, "{text}");
        }
        // Other threads, and a watchdog when there is no switch, may not change ids.
        for (role, to) in [(Role::Watchdog, None), (Role::Device, Some(VM_ID))] {
            let (code, text) = in_child_switching(role, to, to_vm);
            assert_eq!(code, EXIT_FORBIDDEN_SYSCALL, "{role:?}: {text}");
        }
    }

    #[test]
    fn allowed_calls_run_under_the_filter() {
        let (code, text) = in_child(Role::Device, || {
            // SAFETY: plain calls on this process; the descriptor is closed again.
            unsafe {
                libc::getpid();
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                assert!(fd >= 0);
                libc::close(fd);
            }
        });
        assert_eq!((code, text.as_str()), (0, ""));
    }

    #[test]
    fn no_thread_may_open_a_file_it_is_refused_without_stopping_the_vm() {
        for role in [Role::Main, Role::Vcpu, Role::Device, Role::Watchdog] {
            let (code, text) = in_child(role, || {
                // SAFETY: constant NUL-terminated paths; errno read right after.
                let (fd, fd2, errno) = unsafe {
                    let fd = libc::open(c"/etc/passwd".as_ptr(), libc::O_RDONLY);
                    let fd2 = libc::syscall(
                        libc::SYS_openat,
                        libc::AT_FDCWD,
                        c"/proc/sys/vm/overcommit_memory".as_ptr(),
                        libc::O_RDONLY,
                    );
                    (fd, fd2, *libc::__errno_location())
                };
                let refused = fd == -1 && fd2 == -1 && errno == libc::EACCES;
                // SAFETY: _exit has no preconditions.
                unsafe { libc::_exit(if refused { 0 } else { 1 }) };
            });
            assert_eq!((code, text.as_str()), (0, ""), "{role:?}");
        }
    }

    #[test]
    fn no_thread_may_map_code_or_open_network_sockets() {
        let calls: [fn(); 2] = [
            // SAFETY: an anonymous mapping at an address of the kernel's choice; traps.
            || unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
            },
            // SAFETY: no pointers; the call traps.
            || unsafe {
                libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            },
        ];
        for (i, call) in calls.into_iter().enumerate() {
            let (code, text) = in_child(Role::Vcpu, call);
            assert_eq!(code, EXIT_FORBIDDEN_SYSCALL, "call {i}: {text}");
        }
    }

    #[test]
    fn the_report_formats_numbers_without_allocating() {
        let mut m = Message::default();
        m.number(0);
        m.push(b" ");
        m.number(101);
        m.push(b" ");
        m.number(-1);
        assert_eq!(&m.buf[..m.len], b"0 101 -1");
        let mut full = Message::default();
        full.push(&[b'x'; 300]);
        assert_eq!(full.len, 192);
    }
}
