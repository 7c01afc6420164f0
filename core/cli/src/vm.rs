//! `boxlet vm run`: boot a VM from a prepared disk or directory, run one command through
//! the agent with stdio passed through, and exit with its code.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use boxlet::{boot, AccelPolicy, BootSpec, Exec, ExecEvent, Hypervisor, Root, RunningVm};
use clap::{Args, Subcommand, ValueEnum};
use tokio::io::AsyncReadExt;

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Boot a VM, run CMD in it, print its output and exit with its exit code.
    Run(RunArgs),
    /// Measure boot to agent-ready, a whole `vm run -- true`, and exec round trips.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// The VMM backend.
    #[arg(long, value_enum, default_value = "auto")]
    backend: Backend,
    /// Acceleration: auto (hardware, else an error), kvm, or tcg (hardware where there
    /// is any, else software emulation: a weaker boundary, used only when asked for).
    #[arg(long, env = "BOXLET_ACCEL", default_value = "auto")]
    accel: AccelPolicy,
    /// Guest kernel (default: $BOXLET_KERNEL, else the cached build).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Root disk with the agent (opened read-only: every boot sees the same disk).
    #[arg(long, required_unless_present = "fs", conflicts_with = "fs")]
    disk: Option<PathBuf>,
    /// Or a root directory, shared over virtio-fs (the agent comes in an initramfs).
    #[arg(long)]
    fs: Option<PathBuf>,
    /// Boots to measure.
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// Exec round trips to measure in one VM.
    #[arg(long, default_value_t = 200)]
    execs: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    /// boxlet's own VMM when this host's KVM can boot Linux, else QEMU.
    Auto,
    /// QEMU microvm (KVM where it can boot Linux, else TCG).
    Qemu,
    /// boxlet's own VMM on KVM.
    Kvm,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The VMM backend.
    #[arg(long, value_enum, default_value = "auto")]
    backend: Backend,
    /// Acceleration: auto (hardware, else an error), kvm, or tcg (hardware where there
    /// is any, else software emulation: a weaker boundary, used only when asked for).
    #[arg(long, env = "BOXLET_ACCEL", default_value = "auto")]
    accel: AccelPolicy,
    /// Guest kernel (default: $BOXLET_KERNEL, else the one `boxlet kernel build` made).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Root disk: an ext4 image, raw or qcow2, with the agent in it (`IMG:ro` for
    /// read-only).
    #[arg(long, required_unless_present = "fs", conflicts_with = "fs")]
    disk: Option<String>,
    /// Root directory, shared read-write over virtio-fs (the agent comes in an
    /// initramfs and is never written into it).
    #[arg(long)]
    fs: Option<PathBuf>,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// Write the guest console here.
    #[arg(long)]
    console: Option<PathBuf>,
    /// Environment for CMD (`KEY=VALUE`, repeatable).
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Working directory for CMD.
    #[arg(long)]
    cwd: Option<String>,
    /// User for CMD (`name`, `uid` or `uid:gid`).
    #[arg(long)]
    user: Option<String>,
    /// Seconds to wait for the guest to be ready.
    #[arg(long, default_value_t = 120)]
    ready_timeout: u64,
    /// Print boot and run times to stderr.
    #[arg(long)]
    timings: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    cmd: Vec<String>,
}

pub fn run(cmd: VmCommand) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    match cmd {
        VmCommand::Run(args) => {
            let res = rt.block_on(run_cmd(args));
            // Stdin may still be blocked in a read on a runtime thread: never wait for it.
            rt.shutdown_background();
            std::process::exit(res?);
        }
        VmCommand::Bench(args) => {
            rt.block_on(bench(args))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The backend to use. `auto` takes boxlet's own VMM when this host's KVM passes the
/// probe (and, for a VM with a directory share, `virtiofsd` is installed), else QEMU,
/// which falls back to software emulation only when `accel` allows it.
pub(crate) fn backend(b: Backend, accel: AccelPolicy, shares: bool) -> Result<Box<dyn Hypervisor>> {
    match b {
        Backend::Qemu => Ok(Box::new(boxlet_qemu::Qemu::with_accel(accel)?)),
        Backend::Kvm => Ok(Box::new(boxlet_kvm::KvmBackend::new()?)),
        Backend::Auto => match boxlet_kvm::KvmBackend::new() {
            Ok(k) if !shares || k.capabilities().directory_shares => Ok(Box::new(k)),
            _ => Ok(Box::new(boxlet_qemu::Qemu::with_accel(accel)?)),
        },
    }
}

async fn run_cmd(a: RunArgs) -> Result<i32> {
    let hv = backend(a.backend, a.accel, a.fs.is_some())?;
    let kernel = crate::kernel::resolve(a.kernel.clone())?;
    let (root, agent) = match (&a.disk, &a.fs) {
        (Some(d), _) => {
            let (path, ro) = match d.strip_suffix(":ro") {
                Some(p) => (p, true),
                None => (d.as_str(), false),
            };
            let path = PathBuf::from(path);
            if !path.is_file() {
                bail!("disk {}: no such file", path.display());
            }
            (
                Root::Disk {
                    path,
                    read_only: ro,
                },
                None,
            )
        }
        (None, Some(dir)) => {
            if !dir.is_dir() {
                bail!("{}: not a directory", dir.display());
            }
            (
                Root::Dir {
                    path: dir.clone(),
                    exclusive: false,
                    ids: boxlet::ShareIds::Host,
                },
                Some(crate::agent::find()?),
            )
        }
        (None, None) => bail!("give --disk or --fs"),
    };
    let mut spec = BootSpec::new("boxlet", kernel, root);
    spec.agent = agent;
    spec.vcpus = a.cpus;
    spec.memory_mib = a.memory;
    spec.console_log = a.console.clone();
    spec.ready_timeout = Duration::from_secs(a.ready_timeout);
    let started = std::time::Instant::now();
    let vm = boot(hv.as_ref(), spec).await.context("booting the VM")?;
    if a.timings {
        eprintln!(
            "boxlet: agent ready {:.0} ms after start ({})",
            vm.boot_time().as_secs_f64() * 1000.0,
            hv.capabilities().acceleration
        );
    }
    let exec = Exec {
        args: a.cmd.clone(),
        env: a.env.clone(),
        cwd: a.cwd.clone(),
        user: a.user.clone(),
        stdin: true,
        timeout_ms: None,
    };
    attach(vm, exec, a.timings.then_some(started)).await
}

/// Run `exec` in `vm` with this process's stdin, stdout and stderr, then shut the VM
/// down; the command's exit code (128+N on signal N). With `timings`, the time since
/// then is printed at the end.
pub(crate) async fn attach(
    vm: RunningVm,
    exec: Exec,
    timings: Option<std::time::Instant>,
) -> Result<i32> {
    let session = vm
        .agent()
        .exec(exec)
        .await
        .context("starting the command")?;
    let (mut out, mut input) = session.split();
    // Our stdin to the command's, until it ends (or the command does).
    let feed = tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if input.write_stdin(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            }
        }
        let _ = input.close_stdin().await;
        // Keep the connection open: closing our side ends the exec (vsock has no
        // half-close through the VMM).
        std::future::pending::<()>().await;
        drop(input);
    });
    let mut status = None;
    while let Some(ev) = out.next().await.context("reading the command's output")? {
        match ev {
            ExecEvent::Stdout(b) => {
                let mut o = std::io::stdout().lock();
                o.write_all(&b)?;
                o.flush()?;
            }
            ExecEvent::Stderr(b) => {
                let mut e = std::io::stderr().lock();
                e.write_all(&b)?;
                e.flush()?;
            }
            ExecEvent::Exit(s) => status = Some(s),
        }
    }
    feed.abort();
    let status = status.context("the command's exit status never came")?;
    let exit = vm.shutdown(Duration::from_secs(10)).await?;
    if let Some(started) = timings {
        eprintln!(
            "boxlet: done {:.0} ms after start; VM ended: {exit:?}",
            started.elapsed().as_secs_f64() * 1000.0
        );
    }
    Ok(status.shell_code())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Resident memory of the processes serving one VM (those whose command line names its
/// run directory): (private and file-backed KiB, shared-memory KiB, process count). Guest
/// RAM is a shared memfd, so the first number is what the VMM costs beyond the guest.
fn vmm_memory(run_dir: &std::path::Path) -> (u64, u64, usize) {
    let needle = run_dir.to_string_lossy().into_owned();
    let (mut own, mut shared, mut n) = (0, 0, 0);
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        if !String::from_utf8_lossy(&cmd).contains(&needle) {
            continue;
        }
        let status = std::fs::read_to_string(e.path().join("status")).unwrap_or_default();
        let kib = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0)
        };
        // Guest RAM mapped from a cached kernel image is the guest's, not the VMM's.
        let image = kernel_image_rss(&e.path().join("smaps"));
        own += (kib("RssAnon:") + kib("RssFile:")).saturating_sub(image);
        shared += kib("RssShmem:") + image;
        n += 1;
    }
    (own, shared, n)
}

/// Resident KiB of a process's mappings of boxlet-vmm's kernel images (see
/// `boxlet_kvm::kernel_image`), from its smaps.
fn kernel_image_rss(smaps: &std::path::Path) -> u64 {
    let text = std::fs::read_to_string(smaps).unwrap_or_default();
    let mut inside = false;
    let mut kib = 0;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            inside = line.contains("/boxlet/kernel-images/");
        } else if let Some(v) = line.strip_prefix("Rss:").filter(|_| inside) {
            kib += v
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
        }
    }
    kib
}

async fn bench(a: BenchArgs) -> Result<()> {
    let hv = backend(a.backend, a.accel, a.fs.is_some())?;
    let kernel = crate::kernel::resolve(a.kernel.clone())?;
    let accel = hv.capabilities().acceleration;
    if a.runs == 0 || a.execs == 0 {
        bail!("--runs and --execs must be at least 1");
    }
    let agent = match &a.fs {
        Some(dir) if !dir.is_dir() => bail!("{}: not a directory", dir.display()),
        Some(_) => Some(crate::agent::find()?),
        None => None,
    };
    let spec = || {
        let root = match (&a.fs, &a.disk) {
            (Some(dir), _) => Root::Dir {
                path: dir.clone(),
                exclusive: false,
                ids: boxlet::ShareIds::Host,
            },
            (None, Some(disk)) => Root::Disk {
                path: disk.clone(),
                read_only: true,
            },
            (None, None) => unreachable!("clap requires --disk or --fs"),
        };
        let mut s = BootSpec::new("bench", kernel.clone(), root);
        s.agent = agent.clone();
        s
    };
    let true_cmd = || Exec {
        args: vec!["true".into()],
        ..Exec::default()
    };
    // Boot to ready, and the whole `vm run -- true` (boot, exec, shutdown) per run.
    let mut ready_ms = Vec::new();
    let mut guest_ms = Vec::new();
    let mut run_ms = Vec::new();
    for i in 0..a.runs {
        let t = std::time::Instant::now();
        let vm = boot(hv.as_ref(), spec()).await.context("booting")?;
        ready_ms.push(vm.boot_time().as_secs_f64() * 1000.0);
        guest_ms.push(vm.ready().uptime_ms as f64);
        let out = vm.agent().run(true_cmd(), None).await?;
        if out.status.code != Some(0) {
            bail!("`true` failed in the guest: {:?}", out.status);
        }
        vm.shutdown(Duration::from_secs(30)).await?;
        run_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        if !a.json {
            eprintln!(
                "run {}/{}: ready {:.0} ms, whole run {:.0} ms",
                i + 1,
                a.runs,
                ready_ms[i],
                run_ms[i]
            );
        }
    }
    // The peer: the same VMM, kernel and disk with no agent, init = /bin/true: the kernel
    // panics the moment its first process exits and resets (panic=-1), and the VMM exits.
    // Boot-to-ready over this is what the agent and its vsock handshake add to the
    // kernel's own boot.
    let mut bare_ms = Vec::new();
    for _ in 0..a.runs {
        let dir = tempfile::tempdir()?;
        let (root, disks, shares) = match (&a.fs, &a.disk) {
            (Some(root_dir), _) => (
                "rootfstype=virtiofs root=rootfs",
                Vec::new(),
                vec![boxlet::hypervisor::ShareSpec {
                    tag: "rootfs".into(),
                    host_path: root_dir.clone(),
                    read_only: true,
                    exclusive: false,
                    ids: boxlet::ShareIds::Host,
                }],
            ),
            (None, Some(disk)) => (
                "rootfstype=ext4 root=/dev/vda",
                vec![boxlet::DiskSpec {
                    path: disk.clone(),
                    format: boxlet::DiskFormat::detect(disk)?,
                    read_only: true,
                }],
                Vec::new(),
            ),
            (None, None) => unreachable!("clap requires --disk or --fs"),
        };
        let spec = boxlet::VmSpec {
            name: "bench-bare".into(),
            vcpus: 1,
            memory_mib: 256,
            kernel: kernel.clone(),
            initrd: None,
            cmdline: format!(
                "console=ttyS0 reboot=t panic=-1 quiet 8250.nr_uarts=1 {root} ro init=/bin/true"
            ),
            disks,
            shares,
            vsock: None,
            console_log: dir.path().join("console.log"),
            run_dir: dir.path().to_path_buf(),
            limits: Default::default(),
        };
        let t = std::time::Instant::now();
        let mut vm = hv.create(spec).await?;
        let exit = vm.wait().await?;
        if !matches!(&exit, boxlet::VmExit::GuestPanic(m) if m.contains("kill init")) {
            bail!("the bare boot ended with {exit:?}");
        }
        bare_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    // Exec round trips in one running VM.
    let vm = boot(hv.as_ref(), spec()).await.context("booting")?;
    // Each split in two: request to `Started` (connection, request, spawn), then to
    // `Exit` (the process runs, is reaped, and its pipes end).
    let mut exec_us = Vec::new();
    let mut started_us = Vec::new();
    for _ in 0..a.execs {
        let t = std::time::Instant::now();
        let mut session = vm.agent().exec(true_cmd()).await?;
        started_us.push(t.elapsed().as_secs_f64() * 1e6);
        while let Some(ev) = session.next().await? {
            if let ExecEvent::Exit(s) = ev {
                if s.code != Some(0) {
                    bail!("`true` ended with {s:?}");
                }
            }
        }
        exec_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let mut ping_us = Vec::new();
    for _ in 0..a.execs {
        let t = std::time::Instant::now();
        vm.agent().ping().await?;
        ping_us.push(t.elapsed().as_secs_f64() * 1e6);
    }
    // Memory of the VMM's processes (the VMM and its helper daemons), the guest's RAM
    // (shared memfd pages) apart.
    let (overhead_kib, guest_kib, procs) = vmm_memory(vm.run_dir());
    vm.shutdown(Duration::from_secs(30)).await?;
    let v = serde_json::json!({
        "backend": hv.name(),
        "acceleration": accel.to_string(),
        "runs": a.runs,
        "boot_to_ready_ms_median": median(&mut ready_ms),
        "guest_uptime_at_ready_ms_median": median(&mut guest_ms),
        "bare_boot_to_init_and_reset_ms_median": median(&mut bare_ms),
        "vm_run_true_ms_median": median(&mut run_ms),
        "execs": a.execs,
        "exec_true_round_trip_us_median": median(&mut exec_us),
        "exec_true_started_us_median": median(&mut started_us),
        "ping_round_trip_us_median": median(&mut ping_us),
        "vmm_processes": procs,
        "vmm_resident_beyond_guest_ram_kib": overhead_kib,
        "guest_ram_resident_kib": guest_kib,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
        let (ready, bare) = (
            f("boot_to_ready_ms_median"),
            f("bare_boot_to_init_and_reset_ms_median"),
        );
        println!("backend {} ({accel}), medians", hv.name());
        println!(
            "boot to agent ready       {ready:>8.0} ms  ({} boots)",
            a.runs
        );
        println!(
            "  kernel start to ready   {:>8.0} ms  (guest uptime when the agent announced)",
            f("guest_uptime_at_ready_ms_median")
        );
        println!(
            "peer: no agent, init=true {bare:>8.0} ms  (VMM start to exit); ready / peer = {:.2}",
            ready / bare
        );
        println!(
            "vm run -- true            {:>8.0} ms  (boot, exec, shutdown)",
            f("vm_run_true_ms_median")
        );
        println!(
            "exec `true` round trip    {:>8.0} us  ({} execs in one VM)",
            f("exec_true_round_trip_us_median"),
            a.execs
        );
        println!(
            "  request to Started      {:>8.0} us  (connect, request, spawn)",
            f("exec_true_started_us_median")
        );
        println!(
            "agent ping round trip     {:>8.0} us",
            f("ping_round_trip_us_median")
        );
        println!(
            "VMM memory beyond guest   {:>8.1} MiB ({procs} processes; guest RAM resident {:.0} MiB)",
            overhead_kib as f64 / 1024.0,
            guest_kib as f64 / 1024.0
        );
    }
    Ok(())
}
