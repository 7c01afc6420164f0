//! The few system calls the agent makes, through `nix`'s safe wrappers.

use std::io;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

/// Set the wall clock.
pub fn set_clock(unix_ns: u64) -> io::Result<()> {
    let ts = nix::sys::time::TimeSpec::new(
        (unix_ns / 1_000_000_000) as i64,
        (unix_ns % 1_000_000_000) as i64,
    );
    nix::time::clock_settime(nix::time::ClockId::CLOCK_REALTIME, ts).map_err(io::Error::from)
}

/// Set the hostname.
pub fn set_hostname(name: &str) -> io::Result<()> {
    nix::unistd::sethostname(name).map_err(io::Error::from)
}

/// Send `signal` to the process group led by `pid` (execs run in their own group).
pub fn kill_group(pid: u32, signal: i32) {
    if let (Ok(sig), Ok(pid)) = (Signal::try_from(signal), i32::try_from(pid)) {
        let _ = killpg(Pid::from_raw(pid), sig);
    }
}

/// Flush the filesystems and end the VM. The kernel is started with `reboot=t` and the
/// VMM treats a reset as the end (QEMU's `-no-reboot`, our VMM's i8042 reset), which
/// needs no ACPI in the guest.
pub fn power_off() -> ! {
    nix::unistd::sync();
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT);
    // Only reached when rebooting is not allowed (not PID 1's namespace, no CAP_SYS_BOOT).
    std::process::exit(1)
}

/// Whether reading `fd` would not block right now: data is waiting, or every writer has
/// closed (end of file to read).
pub fn readable_now(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(n) if n > 0 => fds[0]
            .revents()
            .is_some_and(|r| r.intersects(PollFlags::POLLIN | PollFlags::POLLHUP)),
        _ => false,
    }
}
