//! The portable backend: one `qemu-system-x86_64 -M microvm` process per VM.
//!
//! Disks go through QEMU's own raw/qcow2 drivers (virtio-blk on virtio-mmio), directory
//! shares through vhost-user-fs and `virtiofsd`, vsock through vhost-user-vsock and
//! `vhost-device-vsock` (Firecracker's host convention). Guest memory is a shared memfd,
//! as vhost-user needs. KVM accelerates where this host's KVM can boot Linux; QEMU's
//! software emulation (TCG) is used only when asked for ([`AccelPolicy::Tcg`]): it works
//! everywhere, costs tens of times the speed, and is a weaker boundary.
//!
//! Every process a VM starts (QEMU and its daemons) is owned by its VM handle: killed
//! when the VM ends or the handle is dropped, and killed by the kernel if this process
//! dies (`PR_SET_PDEATHSIG`); their sockets are removed with them.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Once;
use std::time::Duration;

use async_trait::async_trait;
use boxlet::hypervisor::{
    AccelPolicy, Acceleration, Capabilities, DiskFormat, Hypervisor, HypervisorError, Vm, VmExit,
    VmSpec,
};
use boxlet::jail::{system_binds, vm_binds, Bind, Identity, JailSpec, Jailer};
use boxlet::process::{
    classify, daemon_violation, find_program, forbidden_call_in, owned, start_daemon,
    start_virtiofsds, vm_dir, wait_or_stop, MonitoredVm, VmLaunch,
};
use tokio::process::Child;

const NAME: &str = "qemu";

/// The QEMU backend.
#[derive(Debug, Clone)]
pub struct Qemu {
    qemu: PathBuf,
    vsock_daemon: Option<PathBuf>,
    virtiofsd: Option<PathBuf>,
    accel: Acceleration,
    why: String,
    jailer: Jailer,
}

/// Whether QEMU can use KVM to boot Linux here, and why (or why not).
///
/// `/dev/kvm` must exist and be a hardware KVM module (kvm_intel or kvm_amd). A software
/// hypervisor behind /dev/kvm (kvm_pvm) runs tiny guests but fails on ordinary kernel
/// instructions (xrstor, cmpxchg16b, int3), so it does not count.
pub fn probe_kvm() -> (bool, String) {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return (false, "no usable /dev/kvm".into());
    }
    for m in ["kvm_intel", "kvm_amd"] {
        if Path::new("/sys/module").join(m).exists() {
            return (true, format!("/dev/kvm is {m}"));
        }
    }
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    (
        false,
        if pvm {
            "/dev/kvm is kvm_pvm, a software hypervisor that cannot boot Linux".into()
        } else {
            "/dev/kvm is not hardware KVM (no kvm_intel or kvm_amd)".into()
        },
    )
}

/// The acceleration `policy` gets on a host where KVM is usable or not (`why`): KVM
/// wherever it is there, TCG only where it is not and the policy allows it, else an
/// error saying why and naming `--accel tcg`.
pub fn choose_acceleration(
    policy: AccelPolicy,
    kvm: (bool, String),
) -> Result<(Acceleration, String), HypervisorError> {
    let (usable, why) = kvm;
    match policy {
        _ if usable => Ok((Acceleration::Kvm, why)),
        AccelPolicy::Tcg => Ok((Acceleration::Tcg, format!("{why}; --accel tcg"))),
        AccelPolicy::Auto | AccelPolicy::Kvm => Err(HypervisorError::Unavailable {
            backend: NAME,
            reason: format!("no hardware acceleration ({why})"),
            alternative: AccelPolicy::SOFTWARE_HINT.into(),
        }),
    }
}

impl Qemu {
    /// Find QEMU and the vhost-user daemons, with the acceleration `$BOXLET_ACCEL` allows
    /// (hardware only unless it says `tcg`).
    pub fn new() -> Result<Self, HypervisorError> {
        Self::with_accel(AccelPolicy::from_env()?)
    }

    /// As [`Qemu::new`], with the acceleration policy given.
    pub fn with_accel(policy: AccelPolicy) -> Result<Self, HypervisorError> {
        let (accel, why) = choose_acceleration(policy, probe_kvm())?;
        let qemu = find_program("qemu-system-x86_64").ok_or(HypervisorError::MissingProgram {
            backend: NAME,
            program: "qemu-system-x86_64".into(),
            hint: "apt-get install qemu-system-x86".into(),
        })?;
        Ok(Self {
            qemu,
            vsock_daemon: find_program("vhost-device-vsock"),
            virtiofsd: find_program("virtiofsd"),
            accel,
            why,
            jailer: Jailer::new(NAME)?,
        })
    }

    /// Why the acceleration is what it is.
    pub fn acceleration_reason(&self) -> &str {
        &self.why
    }

    fn tell_once(&self) {
        static ONCE: Once = Once::new();
        if self.accel == Acceleration::Tcg {
            ONCE.call_once(|| {
                tracing::warn!(
                    "qemu: guests run under TCG software emulation ({}): a weaker boundary \
                     than a hardware VM (the emulator is the guest's attack surface), and \
                     tens of times slower",
                    self.why
                );
            });
        }
    }

    /// The QEMU command line for `spec` (vhost-user sockets at the given paths).
    fn args(
        &self,
        spec: &VmSpec,
        vsock_sock: Option<&Path>,
        fs_socks: &[PathBuf],
        identity: Option<Identity>,
    ) -> Vec<String> {
        let mem = format!("{}M", spec.memory_mib);
        let mut a: Vec<String> = Vec::new();
        let mut push = |s: &[&str]| a.extend(s.iter().map(|s| s.to_string()));
        // Without ACPI in the guest, microvm announces virtio-mmio devices on the kernel
        // command line. PIT and PIC stay on (TCG hangs or panics without them).
        push(&[
            "-M",
            "microvm,acpi=off,rtc=off,memory-backend=mem",
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
            "-m",
            &mem,
            "-smp",
            &spec.vcpus.max(1).to_string(),
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            // QEMU's own seccomp filter: no obsolete syscalls, no new processes, no
            // scheduler or resource changes; no privilege changes, unless it is to
            // switch to the VM's identity below (its filter comes first, and after the
            // switch there is no privilege left to change to).
            "-sandbox",
            if identity.is_some() {
                "on,obsolete=deny,elevateprivileges=allow,spawn=deny,resourcecontrol=deny"
            } else {
                "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            },
            // The console comes out of QEMU's stdout, which the monitor writes to the
            // console log up to a limit (a guest cannot fill the host's disk).
            "-serial",
            "stdio",
            "-kernel",
            &spec.kernel.display().to_string(),
            "-append",
            &spec.cmdline,
        ]);
        if let Some(who) = identity {
            // The VM's own ids once QEMU has opened its disks, kernel and sockets. QEMU
            // 7.2 applies -runas after it would start the vCPUs: they start paused (-S)
            // and the backend resumes them over QMP, which QEMU serves only after the
            // switch.
            push(&["-runas", &who.uid_gid(), "-S"]);
            push(&[
                "-qmp",
                &format!("unix:{},server=on,wait=off", qemu_path(&qmp_socket(spec))),
            ]);
        }
        match self.accel {
            Acceleration::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
            _ => push(&["-accel", "tcg", "-cpu", "max"]),
        }
        if let Some(i) = &spec.initrd {
            push(&["-initrd", &i.display().to_string()]);
        }
        for (i, d) in spec.disks.iter().enumerate() {
            let fmt = match d.format {
                DiskFormat::Raw => "raw",
                DiskFormat::Qcow2 => "qcow2",
            };
            push(&[
                "-drive",
                &format!(
                    "id=vd{i},file={},format={fmt},if=none,read-only={},discard=unmap",
                    qemu_path(&d.path),
                    if d.read_only { "on" } else { "off" }
                ),
                "-device",
                &format!("virtio-blk-device,drive=vd{i}"),
            ]);
        }
        if let Some(s) = vsock_sock {
            push(&[
                "-chardev",
                &format!("socket,id=vsock,path={}", qemu_path(s)),
                "-device",
                "vhost-user-vsock-device,chardev=vsock",
            ]);
        }
        for (i, (share, sock)) in spec.shares.iter().zip(fs_socks).enumerate() {
            push(&[
                "-chardev",
                &format!("socket,id=fs{i},path={}", qemu_path(sock)),
                "-device",
                &format!("vhost-user-fs-device,chardev=fs{i},tag={}", share.tag),
            ]);
        }
        a
    }
}

/// QEMU's QMP socket, in the VM's directory (used only to resume a VM that switched to
/// its identity).
fn qmp_socket(spec: &VmSpec) -> PathBuf {
    vm_dir(&spec.run_dir).join("qmp.sock")
}

/// Resume the paused VM of `spec` over QMP once QEMU (`qemu`) serves it: the socket
/// appears, the greeting, `qmp_capabilities`, `cont`. Every line read is bounded (QEMU
/// may be the guest's by now), the whole exchange takes at most `limit`.
async fn resume(spec: &VmSpec, qemu: &mut Child, limit: Duration) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let socket = qmp_socket(spec);
    let exchange = async {
        let stream = loop {
            if let Some(status) = qemu.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("QEMU ended ({status}) before it served QMP"));
            }
            match boxlet::process::connect_no_follow(&socket).await {
                Ok(s) => break s,
                Err(e)
                    if e.kind() == std::io::ErrorKind::NotFound
                        || e.kind() == std::io::ErrorKind::ConnectionRefused =>
                {
                    tokio::time::sleep(Duration::from_millis(5)).await
                }
                Err(e) => return Err(format!("{}: {e}", socket.display())),
            }
        };
        let (r, mut w) = stream.into_split();
        let mut r = tokio::io::BufReader::new(r);
        qmp_answer(&mut r, "the greeting").await?;
        for cmd in ["qmp_capabilities", "cont"] {
            w.write_all(format!("{{\"execute\":\"{cmd}\"}}\n").as_bytes())
                .await
                .map_err(|e| e.to_string())?;
            qmp_answer(&mut r, cmd).await?;
        }
        Ok(())
    };
    tokio::time::timeout(limit, exchange)
        .await
        .map_err(|_| format!("QEMU did not resume over QMP within {limit:?}"))?
}

/// Read QMP lines until the answer to `want` (a return, or the greeting), an error, or
/// the end; each line at most 64 KiB.
async fn qmp_answer(
    r: &mut tokio::io::BufReader<tokio::net::unix::OwnedReadHalf>,
    want: &str,
) -> Result<(), String> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    loop {
        let mut line = String::new();
        let n = (&mut *r)
            .take(64 << 10)
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("QMP closed waiting for {want}"));
        }
        // Events may come first; the answer is a return or an error.
        if line.contains("\"return\"") || line.contains("\"QMP\"") {
            return Ok(());
        }
        if line.contains("\"error\"") {
            return Err(format!(
                "QMP refused {want}: {}",
                boxlet::console::printable(line.trim(), false)
            ));
        }
    }
}

/// A path in a QEMU option value (commas doubled).
fn qemu_path(p: &Path) -> String {
    p.display().to_string().replace(',', ",,")
}

fn start_err(what: &str, msg: impl std::fmt::Display) -> HypervisorError {
    HypervisorError::Start {
        backend: NAME,
        what: what.into(),
        msg: msg.to_string(),
    }
}

#[async_trait]
impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            directory_shares: self.virtiofsd.is_some(),
            vsock: self.vsock_daemon.is_some(),
            acceleration: self.accel,
        }
    }

    async fn create(&self, spec: VmSpec) -> Result<Box<dyn Vm>, HypervisorError> {
        self.tell_once();
        // One cgroup for QEMU and its daemons, removed when the VM ends (or this fails).
        let launch = VmLaunch::new(NAME, &self.jailer, &spec)?;
        // Started daemons are killed if a later step fails (kill_on_drop).
        let mut daemons: Vec<(&'static str, Child)> = Vec::new();
        let mut sockets: Vec<PathBuf> = Vec::new();
        let mut vsock_sock = None;
        if let Some(v) = &spec.vsock {
            let prog = self
                .vsock_daemon
                .as_ref()
                .ok_or(HypervisorError::MissingProgram {
                    backend: NAME,
                    program: "vhost-device-vsock".into(),
                    hint: "cargo install vhost-device-vsock --version 0.3.0 --locked".into(),
                })?;
            let sock = vm_dir(&spec.run_dir).join("vhost-vsock.sock");
            let mut cmd = owned(prog);
            cmd.arg("--vm").arg(format!(
                "guest-cid={},socket={},uds-path={}",
                v.cid,
                sock.display(),
                v.uds_path.display()
            ));
            let mut binds = system_binds();
            binds.push(Bind::rw(vm_dir(&spec.run_dir)));
            let mut jail = JailSpec::new(spec.run_dir.join("jail-vsock"), binds);
            // It needs no privilege at all: the VM's identity from the start.
            jail.run_as = launch.run_as(false);
            jail.exec_only_program = true;
            // It has no seccomp filter of its own: boxlet's (x86-64 so far).
            if cfg!(target_arch = "x86_64") {
                jail.seccomp = Some(boxlet::jail::SeccompProfile::VhostDeviceVsock);
            }
            let cmd = launch
                .wrap(jail, cmd)
                .map_err(|e| start_err("vhost-device-vsock", e))?;
            sockets.push(sock.clone());
            sockets.push(v.uds_path.clone());
            let log = spec.run_dir.join("vhost-device-vsock.log");
            daemons.push((
                "vhost-device-vsock",
                start_daemon(NAME, "vhost-device-vsock", cmd, &sock, &log).await?,
            ));
            vsock_sock = Some(sock);
        }
        let mut fs_socks = Vec::new();
        let virtiofsds = start_virtiofsds(NAME, self.virtiofsd.as_deref(), &spec, &launch).await?;
        for (daemon, sock) in virtiofsds {
            daemons.push(("virtiofsd", daemon));
            sockets.push(sock.clone());
            fs_socks.push(sock);
        }
        let mut cmd = owned(&self.qemu);
        cmd.args(self.args(&spec, vsock_sock.as_deref(), &fs_socks, launch.identity()));
        let mut binds = system_binds();
        binds.extend(vm_binds(&spec).map_err(|e| start_err("qemu", e))?);
        if self.accel == Acceleration::Kvm {
            binds.push(Bind::dev("/dev/kvm"));
        }
        let mut jail = JailSpec::new(spec.run_dir.join("jail-qemu"), binds);
        jail.run_as = launch.run_as(true);
        jail.exec_only_program = true;
        let mut cmd = launch.wrap(jail, cmd).map_err(|e| start_err("qemu", e))?;
        let stderr_log = spec.run_dir.join("qemu.stderr");
        let err = std::fs::File::create(&stderr_log).map_err(|e| start_err("qemu", e))?;
        cmd.stdout(Stdio::piped()).stderr(err);
        let console_file = std::fs::File::create(&spec.console_log)
            .map_err(|e| start_err("qemu", format!("{}: {e}", spec.console_log.display())))?;
        tracing::debug!(name = %spec.name, "starting qemu");
        let mut qemu = cmd.spawn().map_err(|e| start_err("qemu", e))?;
        if launch.identity().is_some() {
            // Paused until it runs as the VM's identity (see `args`).
            if let Err(e) = resume(&spec, &mut qemu, Duration::from_secs(30)).await {
                let _ = qemu.start_kill();
                let _ = qemu.wait().await;
                let tail = boxlet::console::console_tail(&stderr_log, 10);
                return Err(start_err(
                    "qemu",
                    format!("{e}; its stderr: {}", tail.trim()),
                ));
            }
        }
        let out = qemu
            .stdout
            .take()
            .ok_or_else(|| start_err("qemu", "no stdout"))?;
        let console_task = tokio::spawn(boxlet::console::pump_console(out, console_file));
        let monitor = Monitor {
            qemu,
            console_task,
            daemons: std::mem::take(&mut daemons),
            sockets: std::mem::take(&mut sockets),
            console: spec.console_log.clone(),
            stderr_log,
            launch,
        };
        Ok(Box::new(MonitoredVm::spawn(|stop| monitor.run(stop))))
    }
}

/// Owns a VM's processes: waits for QEMU, and the moment it ends (or is stopped) kills
/// the daemons and removes the sockets, so nothing outlives the VM even when nobody is
/// waiting on it (vhost-device-vsock would otherwise keep host connections open).
#[derive(Debug)]
struct Monitor {
    qemu: Child,
    console_task: tokio::task::JoinHandle<()>,
    /// Each with its name, for reports.
    daemons: Vec<(&'static str, Child)>,
    sockets: Vec<PathBuf>,
    console: PathBuf,
    stderr_log: PathBuf,
    /// Removes the VM's cgroup when the monitor ends.
    launch: VmLaunch,
}

impl Monitor {
    async fn run(mut self, mut stop: tokio::sync::mpsc::Receiver<Duration>) -> VmExit {
        // A stop is SIGTERM first: QEMU flushes its disks and exits. A daemon its seccomp
        // filter killed ends the VM at once.
        let (status, stopped, violation) = tokio::select! {
            (s, stopped) = wait_or_stop(&mut self.qemu, &mut stop) => (s, stopped, None),
            i = forbidden_call_in(self.daemons.iter_mut().map(|(_, d)| d)) => {
                let _ = self.qemu.start_kill();
                (self.qemu.wait().await, false, Some(self.daemons[i].0))
            }
        };
        for (_, d) in &mut self.daemons {
            let _ = d.start_kill();
            let _ = d.wait().await;
        }
        // QEMU's stdout has closed: the console log is complete.
        let _ = (&mut self.console_task).await;
        for s in &self.sockets {
            let _ = std::fs::remove_file(s);
        }
        let exit = match violation {
            Some(name) => daemon_violation(name),
            None => classify("qemu", status, stopped, &self.console, &self.stderr_log),
        };
        self.launch.explain(exit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boxlet::hypervisor::{DiskSpec, ShareSpec, VsockSpec};

    #[test]
    fn software_emulation_only_when_asked_for() {
        let none = || (false, "/dev/kvm is kvm_pvm".to_string());
        let kvm = || (true, "/dev/kvm is kvm_amd".to_string());
        for policy in [AccelPolicy::Auto, AccelPolicy::Kvm] {
            let e = choose_acceleration(policy, none()).unwrap_err().to_string();
            assert!(e.contains("kvm_pvm") && e.contains("--accel tcg"), "{e}");
            assert!(e.contains("weaker boundary"), "{e}");
            assert_eq!(
                choose_acceleration(policy, kvm()).unwrap().0,
                Acceleration::Kvm
            );
        }
        // tcg allows software emulation; hardware is still taken where it is there.
        assert_eq!(
            choose_acceleration(AccelPolicy::Tcg, none()).unwrap().0,
            Acceleration::Tcg
        );
        assert_eq!(
            choose_acceleration(AccelPolicy::Tcg, kvm()).unwrap().0,
            Acceleration::Kvm
        );
        assert!("hvf2".parse::<AccelPolicy>().is_err());
        assert_eq!("tcg".parse::<AccelPolicy>().unwrap(), AccelPolicy::Tcg);
    }

    #[test]
    fn command_line_has_every_device() {
        let q = Qemu {
            qemu: "/usr/bin/qemu-system-x86_64".into(),
            vsock_daemon: None,
            virtiofsd: None,
            accel: Acceleration::Tcg,
            why: String::new(),
            jailer: Jailer::Off,
        };
        let spec = VmSpec {
            name: "t".into(),
            vcpus: 2,
            memory_mib: 128,
            kernel: "/k".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            disks: vec![
                DiskSpec {
                    path: "/a,b.qcow2".into(),
                    format: DiskFormat::Qcow2,
                    read_only: false,
                },
                DiskSpec {
                    path: "/c.img".into(),
                    format: DiskFormat::Raw,
                    read_only: true,
                },
            ],
            shares: vec![ShareSpec {
                tag: "rootfs".into(),
                host_path: "/srv".into(),
                read_only: false,
                exclusive: false,
                ids: boxlet::ShareIds::Host,
            }],
            vsock: Some(VsockSpec {
                cid: 3,
                uds_path: "/run/v.sock".into(),
            }),
            console_log: "/run/console.log".into(),
            run_dir: "/run".into(),
            limits: Default::default(),
        };
        let a = q
            .args(
                &spec,
                Some(Path::new("/run/vv.sock")),
                &["/run/fs0.sock".into()],
                None,
            )
            .join(" ");
        assert!(
            a.contains("id=vd0,file=/a,,b.qcow2,format=qcow2,if=none,read-only=off"),
            "{a}"
        );
        assert!(
            a.contains("id=vd1,file=/c.img,format=raw,if=none,read-only=on"),
            "{a}"
        );
        assert!(
            a.contains("-smp 2") && a.contains("size=128M,share=on"),
            "{a}"
        );
        assert!(a.contains("vhost-user-vsock-device,chardev=vsock"), "{a}");
        assert!(
            a.contains("vhost-user-fs-device,chardev=fs0,tag=rootfs"),
            "{a}"
        );
        assert!(a.contains("-accel tcg -cpu max"), "{a}");
        assert!(
            a.contains(
                "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ),
            "{a}"
        );
        assert!(
            a.contains("-serial stdio") && a.contains("-display none"),
            "{a}"
        );
        assert!(!a.contains("-runas"), "{a}");
        // Given the VM's identity, QEMU switches to it, which its filter must allow.
        let who = Identity {
            id: boxlet::jail::VM_IDS.0 + 7,
        };
        let a = q.args(&spec, None, &[], Some(who)).join(" ");
        assert!(a.contains(&format!("-runas {} -S", who.uid_gid())), "{a}");
        // Paused until resumed over QMP, which QEMU serves only once switched.
        assert!(
            a.contains("-qmp unix:/run/vm/qmp.sock,server=on,wait=off"),
            "{a}"
        );
        assert!(a.contains("elevateprivileges=allow"), "{a}");
    }
}
