//! The `Hypervisor` implementation: one `boxlet-vmm` process per VM, owned by its handle.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use async_trait::async_trait;
use boxlet::hypervisor::{
    Acceleration, Capabilities, Hypervisor, HypervisorError, Vm, VmExit, VmSpec,
};
use boxlet::jail::{system_binds, vm_binds, Bind, JailSpec, Jailer};
use boxlet::process::{
    classify, daemon_violation, find_program, forbidden_call_in, owned, start_virtiofsds,
    virtiofsd_log, wait_or_stop, MonitoredVm, VmLaunch,
};

use crate::kernel_image;

const NAME: &str = "kvm";

/// boxlet's own VMM.
#[derive(Debug, Clone)]
pub struct KvmBackend {
    vmm: PathBuf,
    /// Serves directory shares (the VMM's virtio-fs devices are its vhost-user frontends).
    virtiofsd: Option<PathBuf>,
    /// Confines the VMM and its daemons.
    jailer: Jailer,
}

/// The `boxlet-vmm` helper: `$BOXLET_VMM`, else beside this executable (or its parent
/// directory, for test binaries under `target/*/deps`), else in `PATH`.
pub fn find_vmm() -> Option<PathBuf> {
    boxlet::process::find_helper("BOXLET_VMM", "boxlet-vmm")
}

impl KvmBackend {
    /// Check that this host's KVM can boot Linux ([`crate::probe`], cached per host
    /// boot) and find the VMM helper. On a host whose KVM fails the probe this is an error
    /// that says why and names the QEMU backend as the alternative.
    pub fn new() -> Result<Self, HypervisorError> {
        let p = crate::probe::cached();
        if !p.usable {
            return Err(HypervisorError::Unavailable {
                backend: NAME,
                reason: p.reason,
                alternative: "use the qemu backend (--backend qemu), which runs without KVM".into(),
            });
        }
        Self::without_probe()
    }

    /// Find the VMM helper without probing KVM (for tests of the backend itself, and
    /// callers that probed already). The VMM and its daemons run jailed
    /// ([`boxlet::jail`]), which needs root and the `boxlet-jail` helper, or
    /// `BOXLET_JAIL=off`.
    pub fn without_probe() -> Result<Self, HypervisorError> {
        let vmm = find_vmm().ok_or(HypervisorError::MissingProgram {
            backend: NAME,
            program: "boxlet-vmm".into(),
            hint:
                "build it (cargo build -p boxlet-kvm) and put it beside boxlet, or set BOXLET_VMM"
                    .into(),
        })?;
        Ok(Self {
            vmm,
            virtiofsd: find_program("virtiofsd"),
            jailer: Jailer::new(NAME)?,
        })
    }

    /// The helper this backend runs.
    pub fn vmm_path(&self) -> &Path {
        &self.vmm
    }
}

impl KvmBackend {
    /// What the VMM of `spec` is given in its jail: the VM's files (run directory,
    /// kernel, initrd, disks with their backing chains), `/dev/kvm`, and the kernel's
    /// cached image, read-only. The image is built here, outside the jail, so a VMM can
    /// never write an image another VM maps; if it cannot be built the VMM copies the
    /// kernel instead. Returns the spec and the image's path, when there is one.
    async fn jail(
        &self,
        spec: &VmSpec,
        spec_path: &Path,
    ) -> Result<(JailSpec, Option<PathBuf>), HypervisorError> {
        let mut binds = system_binds();
        binds.push(Bind::ro(spec_path));
        binds.extend(vm_binds(spec).map_err(|e| HypervisorError::Start {
            backend: NAME,
            what: "boxlet-vmm".into(),
            msg: format!("preparing its jail: {e}"),
        })?);
        binds.push(Bind::dev("/dev/kvm"));
        let mut given = None;
        if self.jailer != Jailer::Off && kernel_image::zero_copy(spec) {
            let kernel = spec.kernel.clone();
            let image = tokio::task::spawn_blocking(move || {
                kernel_image::cached(&kernel, kernel_image::LOAD_FROM)
            })
            .await;
            if let Ok(Ok(image)) = image {
                binds.extend(image.paths.iter().map(Bind::ro));
                given = Some(image.paths[0].clone());
            }
        }
        Ok((JailSpec::new(spec.run_dir.join("jail-vmm"), binds), given))
    }
}

#[async_trait]
impl Hypervisor for KvmBackend {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            directory_shares: self.virtiofsd.is_some(),
            vsock: true,
            acceleration: Acceleration::Kvm,
        }
    }

    async fn create(&self, spec: VmSpec) -> Result<Box<dyn Vm>, HypervisorError> {
        let start = |msg: String| HypervisorError::Start {
            backend: NAME,
            what: "boxlet-vmm".into(),
            msg,
        };
        // One virtiofsd per share, listening before the VMM connects; they are killed if
        // a later step fails (kill_on_drop) and when the VMM ends.
        // The VMM and its daemons in one cgroup, removed when the VM ends (or this fails).
        let launch = VmLaunch::new(NAME, &self.jailer, &spec)?;
        let mut daemons = start_virtiofsds(NAME, self.virtiofsd.as_deref(), &spec, &launch).await?;
        let spec_path = spec.run_dir.join("vmm.json");
        let json = serde_json::to_vec(&spec).map_err(|e| start(e.to_string()))?;
        std::fs::write(&spec_path, json).map_err(|e| start(e.to_string()))?;
        let stderr_log = spec.run_dir.join("vmm.stderr");
        let err = std::fs::File::create(&stderr_log).map_err(|e| start(e.to_string()))?;
        let console = std::fs::File::create(&spec.console_log)
            .map_err(|e| start(format!("{}: {e}", spec.console_log.display())))?;
        let mut cmd = owned(&self.vmm);
        cmd.arg(&spec_path);
        let (mut jail, image) = self.jail(&spec, &spec_path).await?;
        // Root's ids (no capability but switching) until it has opened its files and
        // connected its sockets, then the VM's (`boxlet::jail::switch_to_vm_identity`).
        jail.run_as = launch.run_as(true);
        jail.exec_only_program = true;
        if let Some(image) = image {
            // Named outright: inside the jail the cache's own directory checks (a private
            // temporary directory) would not hold for the path recreated around it.
            cmd.env("BOXLET_VMM_KERNEL_IMAGE", image);
        }
        let mut cmd = launch
            .wrap(jail, cmd)
            .map_err(|e| start(format!("preparing its jail: {e}")))?;
        cmd.stdout(Stdio::piped()).stderr(err);
        let mut child = cmd.spawn().map_err(|e| start(e.to_string()))?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| start("no stdout".into()))?;
        let pump = tokio::spawn(boxlet::console::pump_console(out, console));
        let (console, stderr) = (spec.console_log.clone(), stderr_log);
        let run_dir = spec.run_dir.clone();
        // The VMM may not remove it itself (its filter refuses path calls).
        let vsock_uds = spec.vsock.as_ref().map(|v| v.uds_path.clone());
        Ok(Box::new(MonitoredVm::spawn(move |mut stop| async move {
            // A virtiofsd its seccomp filter killed ends the VM at once.
            let (status, stopped, violation) = tokio::select! {
                (s, stopped) = wait_or_stop(&mut child, &mut stop) => (s, stopped, false),
                _ = forbidden_call_in(daemons.iter_mut().map(|(d, _)| d)) => {
                    let _ = child.start_kill();
                    (child.wait().await, false, true)
                }
            };
            // A daemon that died first is likely why the VMM failed: say so.
            let mut died = String::new();
            for (i, (d, socket)) in daemons.iter_mut().enumerate() {
                // (One that exited cleanly saw the VMM go, which is no news.)
                if let Ok(Some(st)) = d.try_wait().map(|s| s.filter(|s| !s.success())) {
                    let tail = boxlet::console::console_tail(&virtiofsd_log(&run_dir, i), 5);
                    died.push_str(&format!(
                        "; virtiofsd{i} had exited with {st}: {}",
                        tail.trim()
                    ));
                }
                let _ = d.start_kill();
                let _ = d.wait().await;
                let _ = std::fs::remove_file(socket);
            }
            let _ = pump.await;
            if let Some(uds) = &vsock_uds {
                let _ = std::fs::remove_file(uds);
            }
            let exit = match classify("boxlet-vmm", status, stopped, &console, &stderr) {
                _ if violation => daemon_violation("virtiofsd"),
                VmExit::VmmFailed(why) => VmExit::VmmFailed(why + &died),
                exit => exit,
            };
            // (Dropping the launcher then removes the cgroup.)
            launch.explain(exit)
        })))
    }
}
