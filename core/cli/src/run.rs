//! `boxlet run IMAGE -- CMD`: a box from a stored image, end to end. The runtime takes
//! the home's lock, records the box, prepares its root with the chosen strategy, boots
//! it, runs the command attached to this terminal, and then removes the box.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use boxlet::rootfs::{
    AgentBinary, DiskQuota, DiskStrategy, ExtractedStrategy, GuestRootfs, Home, OverlayStrategy,
    PrepareRequest, RuntimeLock,
};
use boxlet::{boot, AccelPolicy, BootSpec, Exec, Root, RootfsStrategy};
use boxlet_cas::{unix_now, BoxId, BoxRecord, BoxState, Store};
use boxlet_oci::StoredImage;
use clap::{Args, ValueEnum};

use crate::vm::{attach, backend, Backend};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StrategyName {
    /// The image's ext4 with the agent, a qcow2 overlay per box (virtio-blk).
    Disk,
    /// The image extracted once, a copy per box (virtio-fs).
    Extracted,
    /// The layers as overlayfs lowers under a per-box upper (virtio-fs; needs root,
    /// falls back to extracted).
    Overlay,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// How to make the box's root filesystem.
    #[arg(long, value_enum, default_value = "disk")]
    strategy: StrategyName,
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
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u8,
    /// Memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// Host memory the box's VM processes may use together, in MiB (default: the guest
    /// memory plus 256 MiB or a quarter of it). Limits need cgroup v2 and root.
    #[arg(long, value_name = "MIB")]
    host_memory: Option<u64>,
    /// Host CPU the box's VM processes may use, in percent of one CPU (default: its
    /// vCPUs plus one, times 100).
    #[arg(long, value_name = "PERCENT")]
    cpu_limit: Option<u32>,
    /// Processes and threads the box's VM processes may have (default 1024).
    #[arg(long, value_name = "N")]
    pids_limit: Option<u64>,
    /// How much a box on a directory root (extracted, overlay) may write to the host's
    /// disk: a size (`512M`, `10G`), or `unlimited`. Default: 4 GiB of writes (and the
    /// image's copy, for extracted). Quotas need root (a loop-mounted file system per box).
    #[arg(long, value_name = "SIZE|unlimited", value_parser = parse_quota)]
    disk_quota: Option<DiskQuota>,
    /// Environment for CMD (`KEY=VALUE`, repeatable), over the image's.
    #[arg(long = "env", short = 'e')]
    env: Vec<String>,
    /// Working directory for CMD (default: the image's).
    #[arg(long)]
    cwd: Option<String>,
    /// User for CMD (default: the image's).
    #[arg(long)]
    user: Option<String>,
    /// Print boot and run times to stderr.
    #[arg(long)]
    timings: bool,
    /// The image (as `boxlet images` lists it, or a short form such as `busybox:1`).
    image: String,
    /// The command (default: the image's entrypoint and command).
    #[arg(last = true)]
    cmd: Vec<String>,
}

/// `--disk-quota`: a size, or `unlimited`.
pub(crate) fn parse_quota(s: &str) -> Result<DiskQuota, String> {
    match s {
        "unlimited" | "none" => Ok(DiskQuota::Unlimited),
        _ => crate::size::parse_size(s).map(DiskQuota::Bytes),
    }
}

fn strategy(
    name: StrategyName,
    home: &Home,
    store: &Arc<Store>,
    quota: Option<DiskQuota>,
) -> Result<Box<dyn RootfsStrategy>> {
    let quota = quota.unwrap_or_default();
    if name == StrategyName::Disk {
        // The Disk strategy's box writes into its own disk, bounded by its size.
        anyhow::ensure!(
            quota == DiskQuota::Default,
            "--disk-quota is for directory roots (--strategy extracted or overlay); a disk \
             box writes within its disk"
        );
    }
    Ok(match name {
        StrategyName::Disk => {
            let agent = AgentBinary::new(crate::agent::find()?);
            Box::new(DiskStrategy::new(home.clone(), store.clone(), agent)?)
        }
        StrategyName::Extracted => {
            Box::new(ExtractedStrategy::new(home.clone(), store.clone())?.with_disk_quota(quota))
        }
        StrategyName::Overlay => Box::new(
            OverlayStrategy::new(home.clone(), store.clone(), true)?.with_disk_quota(quota),
        ),
    })
}

/// The command to run: the one given, else the image's entrypoint and command.
fn command(a: &RunArgs, image: &StoredImage) -> Result<Vec<String>> {
    if !a.cmd.is_empty() {
        return Ok(a.cmd.clone());
    }
    let config = image.config.config().as_ref();
    let mut cmd: Vec<String> = config
        .and_then(|c| c.entrypoint().clone())
        .unwrap_or_default();
    cmd.extend(config.and_then(|c| c.cmd().clone()).unwrap_or_default());
    anyhow::ensure!(
        !cmd.is_empty(),
        "{} has no entrypoint or command: give one after --",
        a.image
    );
    Ok(cmd)
}

pub fn run(a: RunArgs) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let res = rt.block_on(run_box(a));
    // Stdin may still be blocked in a read on a runtime thread: never wait for it.
    rt.shutdown_background();
    std::process::exit(res?);
}

async fn run_box(a: RunArgs) -> Result<i32> {
    let started = Instant::now();
    let home = Home::from_env()?;
    let _lock = RuntimeLock::acquire(home.root())?;
    let store = Arc::new(
        Store::open(home.root())
            .with_context(|| format!("opening the store at {}", home.root().display()))?,
    );
    let image = StoredImage::open(&store, &a.image)
        .with_context(|| format!("{}: `boxlet pull` or `boxlet import` it first", a.image))?;
    let cmd = command(&a, &image)?;
    let strategy = strategy(a.strategy, &home, &store, a.disk_quota)?;
    let id = BoxId::mint();
    let mut record = BoxRecord {
        id,
        name: None,
        image: Some(image.record.reference.clone()),
        config: serde_json::json!({ "strategy": strategy.name(), "cmd": cmd, "accel": a.accel }),
        state: BoxState::Created,
        blobs: image.record.blobs().copied().collect(),
        created_at: unix_now(),
    };
    store.put_box(&record)?;
    let req = PrepareRequest {
        image: Some(image.record.reference.clone()),
        box_id: id,
    };
    let result = match strategy.prepare(&req).await {
        Ok(rootfs) => {
            record.state = BoxState::Running;
            record.config["rootfs"] = serde_json::to_value(&rootfs)?;
            store.put_box(&record)?;
            let ran = boot_and_attach(&a, &image, &rootfs, cmd, started).await;
            let cleaned = strategy.cleanup(&rootfs).await;
            ran.and_then(|code| cleaned.map(|()| code).context("removing the box's root"))
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("preparing the root of {}", a.image))),
    };
    store.remove_box(id)?;
    result
}

async fn boot_and_attach(
    a: &RunArgs,
    image: &StoredImage,
    rootfs: &GuestRootfs,
    cmd: Vec<String>,
    started: Instant,
) -> Result<i32> {
    let root = rootfs.root();
    let dir_root = matches!(root, Root::Dir { .. });
    let hv = backend(a.backend, a.accel, dir_root)?;
    let mut spec = BootSpec::new("boxlet", crate::kernel::resolve(a.kernel.clone())?, root);
    if dir_root {
        spec.agent = Some(crate::agent::find()?);
    }
    spec.vcpus = a.cpus;
    spec.memory_mib = a.memory;
    spec.limits = boxlet::cgroup::Limits {
        memory_mib: a.host_memory,
        cpu_percent: a.cpu_limit,
        pids: a.pids_limit,
    };
    let vm = boot(hv.as_ref(), spec).await.context("booting the box")?;
    if a.timings {
        eprintln!(
            "boxlet: agent ready {:.0} ms after start ({}, {})",
            started.elapsed().as_secs_f64() * 1000.0,
            hv.name(),
            hv.capabilities().acceleration
        );
    }
    let config = image.config.config().as_ref();
    let mut env: Vec<String> = rootfs.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    env.extend(a.env.iter().cloned());
    let image_cwd = config
        .and_then(|c| c.working_dir().clone())
        .filter(|d| !d.is_empty());
    let image_user = config
        .and_then(|c| c.user().clone())
        .filter(|u| !u.is_empty());
    let exec = Exec {
        args: cmd,
        env,
        cwd: a.cwd.clone().or(image_cwd),
        user: a.user.clone().or(image_user),
        stdin: true,
        timeout_ms: None,
    };
    attach(vm, exec, a.timings.then_some(started)).await
}
