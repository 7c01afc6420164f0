//! For backends whose VMM is a child process: wait for it or stop it (SIGTERM, then
//! SIGKILL after a grace period), tell why it ended, and a [`Vm`] handle over the task
//! that does so.

use std::io;
use std::path::Path;
use std::process::ExitStatus;
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::hypervisor::{HypervisorError, Vm, VmExit};

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
    let stderr = std::fs::read_to_string(stderr_log).unwrap_or_default();
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
