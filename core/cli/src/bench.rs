//! `boxlet bench strategies`: the four rootfs strategies against each other on the same
//! images: cold and warm prepare, what a box costs, boot to ready, and an in-guest
//! workload, as a table and as JSON.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use boxlet::rootfs::{
    AgentBinary, DirectStrategy, DiskStrategy, ExtractedStrategy, GuestRootfs, Home,
    OverlayStrategy, PrepareRequest,
};
use boxlet::{boot, AccelPolicy, BootSpec, Exec, Root, RootfsStrategy};
use boxlet_cas::{BoxId, Store};
use clap::{Args, Subcommand};

use crate::vm::Backend;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The rootfs strategies against each other (images from the store).
    Strategies(StrategiesArgs),
}

#[derive(Debug, Args)]
pub struct StrategiesArgs {
    /// An image in the store; repeat for several (default: every image in the store).
    #[arg(long = "image")]
    images: Vec<String>,
    /// Warm prepares to take the median of.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// The VMM backend for the boots.
    #[arg(long, value_enum, default_value = "auto")]
    backend: Backend,
    /// Acceleration: auto (hardware, else an error), kvm, or tcg (hardware where there
    /// is any, else software emulation: a weaker boundary, used only when asked for).
    #[arg(long, env = "BOXLET_ACCEL", default_value = "auto")]
    accel: AccelPolicy,
    /// Prepare only: no boots, no workload.
    #[arg(long)]
    no_boot: bool,
    /// Only this strategy (direct, extracted, overlay, disk); repeat for several
    /// (default: all four).
    #[arg(long = "strategy", value_parser = ["direct", "extracted", "overlay", "disk"])]
    strategies: Vec<String>,
    /// The disk quota of the directory-root strategies (extracted, overlay): a size, or
    /// `unlimited` (their boxes then write to the home's file system; reflinks for
    /// extracted where it has them). Default: as `boxlet run`.
    #[arg(long, value_name = "SIZE|unlimited", value_parser = crate::run::parse_quota)]
    disk_quota: Option<boxlet::rootfs::DiskQuota>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// One strategy on one image.
#[derive(Debug, Default, serde::Serialize)]
struct Row {
    image: String,
    strategy: &'static str,
    /// How a box's files are made from the cache (Extracted): reflinks or copies.
    #[serde(skip_serializing_if = "Option::is_none")]
    per_box_copy: Option<&'static str>,
    /// Building the image-level cache from empty (`ensure_cached`).
    cold_prepare_ms: f64,
    /// `ensure_cached` again: a cache hit.
    warm_prepare_ms: f64,
    /// A new box with the cache warm (`prepare`).
    box_create_ms: f64,
    box_bytes: u64,
    ready_ms: Option<f64>,
    read_usr_ms: Option<f64>,
    write_fsync_100m_ms: Option<f64>,
    find_ms: Option<f64>,
    /// Steps that failed in the guest, with the reason (their times are left out).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    failed: Vec<String>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Copy `reference`'s blobs and record from `from` into the store `to`.
fn copy_image(from: &Store, to: &Store, reference: &str) -> Result<String> {
    let image = boxlet_oci::StoredImage::open(from, reference)?;
    let lease = to.lease();
    for d in image.record.blobs() {
        let mut f = from.open_blob(d)?;
        to.ingest(&mut f, d.algorithm(), None, &lease)?;
    }
    to.put_image(&image.record)?;
    Ok(image.record.reference)
}

/// Makes a strategy for a scratch home and its store.
type MakeStrategy = dyn Fn(&Home, Arc<Store>) -> Result<Box<dyn RootfsStrategy>>;

const WORKLOAD: [(&str, &str); 3] = [
    ("read /usr", "find /usr -type f -exec cat {} + > /dev/null"),
    // dd's status is the step's and its complaint the reason (the clean-up after it must
    // hide neither); its statistics are not shown.
    ("write+fsync 100M", "dd if=/dev/zero of=/root/boxlet-bench bs=1M count=100 conv=fsync 2>/tmp/boxlet-bench.err; s=$?; [ $s = 0 ] || cat /tmp/boxlet-bench.err >&2; rm -f /root/boxlet-bench /tmp/boxlet-bench.err 2>/dev/null; exit $s"),
    ("find /", "find / -xdev > /dev/null"),
];

struct Ctx {
    hv: Box<dyn boxlet::Hypervisor>,
    kernel: PathBuf,
    agent: PathBuf,
}

/// Boot the rootfs, time ready and the workload.
async fn boot_and_work(ctx: &Ctx, rootfs: &GuestRootfs, row: &mut Row) -> Result<()> {
    let root = rootfs.root();
    let mut spec = BootSpec::new("bench", &ctx.kernel, root.clone());
    if matches!(root, Root::Dir { .. }) {
        spec.agent = Some(ctx.agent.clone());
    }
    spec.ready_timeout = Duration::from_secs(120);
    let t = Instant::now();
    let vm = boot(ctx.hv.as_ref(), spec).await.context("booting")?;
    row.ready_ms = Some(ms(t.elapsed()));
    let mut times = Vec::new();
    for (what, script) in WORKLOAD {
        let exec = Exec {
            args: vec!["sh".into(), "-c".into(), script.into()],
            ..Exec::default()
        };
        let t = Instant::now();
        let out = vm
            .agent()
            .run(exec, None)
            .await
            .with_context(|| format!("running {what}"))?;
        let took = ms(t.elapsed());
        // A step that failed has no time: its number would be the failure's.
        let code = out.status.shell_code();
        if code == 0 {
            times.push(Some(took));
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let reason = stderr.trim().lines().last().unwrap_or_default();
            row.failed.push(format!(
                "{what}: exit {code}{}",
                if reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", boxlet::console::printable(reason, false))
                }
            ));
            times.push(None);
        }
    }
    row.read_usr_ms = times[0];
    row.write_fsync_100m_ms = times[1];
    row.find_ms = times[2];
    vm.shutdown(Duration::from_secs(30)).await?;
    Ok(())
}

async fn measure(
    name: &'static str,
    make: &MakeStrategy,
    source: &Store,
    reference: &str,
    runs: usize,
    ctx: Option<&Ctx>,
) -> Result<Row> {
    let dir = tempfile::tempdir_in(source.root().join("tmp")).context("a scratch home")?;
    let home = Home::new(dir.path().join("home"));
    let store = Arc::new(Store::open(home.root())?);
    let reference = copy_image(source, &store, reference)?;
    let strategy = make(&home, store.clone())?;
    let req = |id| PrepareRequest {
        image: Some(reference.clone()),
        box_id: id,
    };
    let mut row = Row {
        image: reference.clone(),
        strategy: name,
        per_box_copy: (name == "extracted").then(|| {
            if boxlet::rootfs::reflinks_supported(&home.tmp()) {
                "reflink"
            } else {
                "copy"
            }
        }),
        ..Row::default()
    };
    let t = Instant::now();
    strategy.ensure_cached(&reference).await?;
    row.cold_prepare_ms = ms(t.elapsed());
    let mut warm = Vec::new();
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        strategy.ensure_cached(&reference).await?;
        warm.push(ms(t.elapsed()));
    }
    row.warm_prepare_ms = median(warm);
    let rootfs = strategy.prepare(&req(BoxId::mint())).await?;
    let mut create = Vec::new();
    let mut boxes = Vec::new();
    for _ in 0..runs.max(1) {
        let id = BoxId::mint();
        let t = Instant::now();
        let r = strategy.prepare(&req(id)).await?;
        create.push(ms(t.elapsed()));
        boxes.push((id, r));
    }
    row.box_create_ms = median(create);
    row.box_bytes = match &rootfs.strategy {
        boxlet::Strategy::Direct => 0,
        _ => boxlet::rootfs::allocated_bytes(&home.box_dir(boxes[0].0)),
    };
    if let Some(ctx) = ctx {
        boot_and_work(ctx, &rootfs, &mut row).await?;
    }
    for (_, r) in boxes {
        strategy.cleanup(&r).await?;
    }
    strategy.cleanup(&rootfs).await?;
    Ok(row)
}

pub fn run(cmd: BenchCommand) -> Result<ExitCode> {
    let BenchCommand::Strategies(args) = cmd;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let failed = rt.block_on(strategies(args))?;
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Runs the bench; `Ok(true)` when a step failed in a guest (the bench then exits
/// non-zero, after its table).
async fn strategies(a: StrategiesArgs) -> Result<bool> {
    let source = crate::store::open()?;
    let images = if a.images.is_empty() {
        source.images()?.into_iter().map(|i| i.reference).collect()
    } else {
        a.images.clone()
    };
    anyhow::ensure!(
        !images.is_empty(),
        "no images in the store: `boxlet import` or `boxlet pull` one"
    );
    let agent = crate::agent::find()?;
    let ctx = if a.no_boot {
        None
    } else {
        Some(Ctx {
            hv: crate::vm::backend(a.backend, a.accel, true)?,
            kernel: crate::kernel::resolve(None)?,
            agent: agent.clone(),
        })
    };
    let accel = ctx
        .as_ref()
        .map(|c| c.hv.capabilities().acceleration.to_string());
    let mut rows = Vec::new();
    for image in &images {
        let direct_dir = tempfile::tempdir_in(source.root().join("tmp"))?;
        boxlet_oci::unpack(
            &source,
            image,
            direct_dir.path(),
            &boxlet_oci::ApplyOptions::default(),
        )?;
        let agent2 = agent.clone();
        let dd = direct_dir.path().to_path_buf();
        let quota = a.disk_quota.unwrap_or_default();
        let makers: Vec<(&'static str, Box<MakeStrategy>)> = vec![
            (
                "direct",
                Box::new(move |_, _| {
                    Ok(Box::new(DirectStrategy::new(&dd)) as Box<dyn RootfsStrategy>)
                }),
            ),
            (
                "extracted",
                Box::new(move |h, s| {
                    Ok(
                        Box::new(ExtractedStrategy::new(h.clone(), s)?.with_disk_quota(quota))
                            as Box<dyn RootfsStrategy>,
                    )
                }),
            ),
            (
                "overlay",
                Box::new(move |h, s| {
                    Ok(
                        Box::new(OverlayStrategy::new(h.clone(), s, false)?.with_disk_quota(quota))
                            as Box<dyn RootfsStrategy>,
                    )
                }),
            ),
            (
                "disk",
                Box::new(move |h, s| {
                    let agent = AgentBinary::new(agent2.clone());
                    Ok(Box::new(DiskStrategy::new(h.clone(), s, agent)?)
                        as Box<dyn RootfsStrategy>)
                }),
            ),
        ];
        for (name, make) in &makers {
            if !a.strategies.is_empty() && !a.strategies.iter().any(|s| s == name) {
                continue;
            }
            let row = measure(name, make.as_ref(), &source, image, a.runs, ctx.as_ref())
                .await
                .with_context(|| format!("{name} on {image}"))?;
            if !a.json {
                eprintln!("boxlet bench: {image} {name} done");
            }
            rows.push(row);
        }
    }
    if a.json {
        let doc = serde_json::json!({
            "backend": ctx.as_ref().map(|c| c.hv.name()),
            "acceleration": accel,
            "rows": rows,
        });
        println!("{doc:#}");
        return Ok(rows.iter().any(|r| !r.failed.is_empty()));
    }
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
    // A step that failed reads "failed" (its reason below the table), never a time.
    let step = |r: &Row, v: Option<f64>, what: &str| {
        if r.failed.iter().any(|f| f.starts_with(what)) {
            "failed".to_string()
        } else {
            opt(v)
        }
    };
    println!(
        "backend: {}, acceleration: {}",
        ctx.as_ref()
            .map_or("none (--no-boot)".into(), |c| c.hv.name().to_string()),
        accel.unwrap_or_else(|| "-".into())
    );
    println!(
        "{:<40} {:<18} {:>10} {:>9} {:>9} {:>10} {:>9} {:>10} {:>10} {:>8}",
        "image",
        "strategy",
        "cold ms",
        "warm ms",
        "box ms",
        "box bytes",
        "ready ms",
        "read /usr",
        "wr+fsync",
        "find /"
    );
    for r in &rows {
        println!(
            "{:<40} {:<18} {:>10.1} {:>9.3} {:>9.2} {:>10} {:>9} {:>10} {:>10} {:>8}",
            r.image,
            match r.per_box_copy {
                Some(how) => format!("{} ({how})", r.strategy),
                None => r.strategy.to_string(),
            },
            r.cold_prepare_ms,
            r.warm_prepare_ms,
            r.box_create_ms,
            crate::store::human(r.box_bytes),
            opt(r.ready_ms),
            step(r, r.read_usr_ms, WORKLOAD[0].0),
            step(r, r.write_fsync_100m_ms, WORKLOAD[1].0),
            step(r, r.find_ms, WORKLOAD[2].0)
        );
    }
    let mut failed = false;
    for r in &rows {
        for f in &r.failed {
            println!("failed: {} {}: {f}", r.image, r.strategy);
            failed = true;
        }
    }
    Ok(failed)
}
