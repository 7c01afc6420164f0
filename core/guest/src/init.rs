//! PID 1 in the VM: mount the basics, switch to a virtio-fs root when asked, then split
//! into a reaper (PID 1, collects every orphan) and the agent server (its child).

use std::io;
use std::path::Path;

use nix::mount::{mount, MsFlags};

fn log(msg: &str) {
    eprintln!("boxlet-guest: {msg}");
}

fn mount_fs(src: &str, target: &str, fstype: &str, flags: MsFlags, data: Option<&str>) {
    let _ = std::fs::create_dir_all(target);
    match mount(Some(src), target, Some(fstype), flags, data) {
        // Already there (the kernel mounts /dev itself with CONFIG_DEVTMPFS_MOUNT).
        Ok(()) | Err(nix::errno::Errno::EBUSY) => {}
        Err(e) => log(&format!("mounting {fstype} on {target}: {e}")),
    }
}

/// The value of `key=` on the kernel command line.
fn cmdline_value(cmdline: &str, key: &str) -> Option<String> {
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .map(str::to_owned)
}

/// Mount the virtio-fs share `tag` and make it the root (as switch_root does; the
/// initramfs that carried the agent stays underneath, unreachable).
fn switch_to_virtiofs(tag: &str) -> io::Result<()> {
    let new = "/newroot";
    std::fs::create_dir_all(new)?;
    mount(
        Some(tag),
        new,
        Some("virtiofs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| io::Error::other(format!("mounting virtio-fs {tag:?}: {e}")))?;
    // /proc was mounted on the old root to read the command line.
    let _ = nix::mount::umount("/proc");
    std::env::set_current_dir(new)?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| io::Error::other(format!("moving the new root: {e}")))?;
    nix::unistd::chroot(".").map_err(io::Error::from)?;
    std::env::set_current_dir("/")
}

fn mount_basics() {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", nosuid, None);
    mount_fs("sysfs", "/sys", "sysfs", nosuid, None);
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    );
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0620,ptmxmode=0666"),
    );
    mount_fs(
        "shm",
        "/dev/shm",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    );
    mount_fs(
        "tmpfs",
        "/tmp",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=1777"),
    );
    mount_fs(
        "tmpfs",
        "/run",
        "tmpfs",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some("mode=0755"),
    );
    for (link, target) in [
        ("/dev/fd", "/proc/self/fd"),
        ("/dev/stdin", "/proc/self/fd/0"),
        ("/dev/stdout", "/proc/self/fd/1"),
        ("/dev/stderr", "/proc/self/fd/2"),
    ] {
        if !Path::new(link).exists() {
            let _ = std::os::unix::fs::symlink(target, link);
        }
    }
}

/// Run as PID 1. Never returns.
pub fn run() -> ! {
    let nosuid = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount_fs("proc", "/proc", "proc", nosuid, None);
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    if let Some(root) = cmdline_value(&cmdline, "boxlet.root") {
        let res = match root.strip_prefix("virtiofs:") {
            Some(tag) => switch_to_virtiofs(tag),
            None => Err(io::Error::other(format!("unknown boxlet.root {root:?}"))),
        };
        if let Err(e) = res {
            log(&format!("cannot switch root: {e}"));
            crate::sys::power_off();
        }
    }
    mount_basics();
    let port = cmdline_value(&cmdline, "boxlet.port")
        .and_then(|p| p.parse().ok())
        .unwrap_or(crate::proto::AGENT_PORT);

    // SAFETY: no thread has been started yet, so the child is a complete copy of this
    // single-threaded process and may do anything.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            let code = match crate::serve::vsock(port) {
                Ok(()) => 0,
                Err(e) => {
                    log(&format!("agent stopped: {e}"));
                    1
                }
            };
            std::process::exit(code);
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => reap(child),
        Err(e) => {
            log(&format!("fork: {e}"));
            crate::sys::power_off();
        }
    }
}

/// Collect every process that ends; when the agent itself ends, end the VM.
fn reap(agent: nix::unistd::Pid) -> ! {
    use nix::sys::wait::{waitpid, WaitStatus};
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(pid, code)) if pid == agent => {
                log(&format!("agent exited with {code}; powering off"));
                crate::sys::power_off();
            }
            Ok(WaitStatus::Signaled(pid, sig, _)) if pid == agent => {
                log(&format!("agent killed by {sig}; powering off"));
                crate::sys::power_off();
            }
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => {
                log(&format!("waitpid: {e}"));
                crate::sys::power_off();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn command_line_values() {
        let c = "console=ttyS0 boxlet.root=virtiofs:rootfs quiet boxlet.port=6000";
        assert_eq!(
            super::cmdline_value(c, "boxlet.root").as_deref(),
            Some("virtiofs:rootfs")
        );
        assert_eq!(
            super::cmdline_value(c, "boxlet.port").as_deref(),
            Some("6000")
        );
        assert_eq!(super::cmdline_value(c, "boxlet"), None);
    }
}
