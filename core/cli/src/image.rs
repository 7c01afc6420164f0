//! `boxlet pull|import|images|rmi|unpack`: OCI images in the store under $BOXLET_HOME.

use std::collections::HashMap;
use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{bail, Context, Result};
use boxlet_cas::Digest;
use boxlet_oci::{
    ApplyOptions, Credentials, DevicePolicy, PullOptions, PullProgress, Quiet, StoredImage,
};
use clap::{Args, ValueEnum};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::store::{human, open};

#[derive(Debug, Args)]
pub struct PullArgs {
    /// The image (`busybox`, `registry.example.com/team/app:1`, `...@sha256:...`).
    reference: String,
    /// Talk plain HTTP to the registry (a local or test registry).
    #[arg(long)]
    insecure: bool,
    /// User name for the registry (the password is read from stdin).
    #[arg(long)]
    user: Option<String>,
    /// A file holding a bearer token for the registry, `-` for stdin (instead of a user;
    /// never on the command line, where other users can read it).
    #[arg(long, conflicts_with = "user")]
    token_file: Option<PathBuf>,
    /// Send the credentials even over plain HTTP (with --insecure).
    #[arg(long)]
    credentials_over_http: bool,
    /// Send the password to a token realm on another scheme or host than the registry.
    #[arg(long)]
    credentials_to_any_realm: bool,
    /// Layers fetched at once.
    #[arg(long, default_value_t = 3)]
    parallel: usize,
    /// Print the image record as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// An OCI image layout directory, or a `docker save` archive.
    path: PathBuf,
    /// The reference to record the image under (needed when the source names none).
    #[arg(long)]
    name: Option<String>,
    /// Print the image record as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct ImagesArgs {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
pub struct RmiArgs {
    /// The image reference.
    reference: String,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Devices {
    Skip,
    Create,
    Refuse,
}

#[derive(Debug, Args)]
pub struct UnpackArgs {
    /// The image reference.
    reference: String,
    /// The directory to unpack into (created if missing).
    dir: PathBuf,
    /// What to do with device nodes.
    #[arg(long, value_enum, default_value = "skip")]
    devices: Devices,
    /// Do not give files the owners the image names (the default as root is to).
    #[arg(long)]
    no_owners: bool,
}

/// Progress bars of a pull on a terminal, one per blob.
struct Bars {
    multi: MultiProgress,
    bars: Mutex<HashMap<Digest, ProgressBar>>,
}

impl PullProgress for Bars {
    fn started(&self, digest: &Digest, size: u64) {
        let bar = self.multi.add(ProgressBar::new(size));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(digest.hex()[..12].to_string());
        self.bars
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(*digest, bar);
    }

    fn advanced(&self, digest: &Digest, n: u64) {
        if let Some(bar) = self
            .bars
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(digest)
        {
            bar.inc(n);
        }
    }

    fn finished(&self, digest: &Digest, reused: bool) {
        let bars = self.bars.lock().unwrap_or_else(PoisonError::into_inner);
        match bars.get(digest) {
            Some(bar) => bar.finish(),
            None if reused => {
                let _ = self
                    .multi
                    .println(format!("{} already stored", &digest.hex()[..12]));
            }
            None => {}
        }
    }
}

fn print_record(record: &boxlet_cas::ImageRecord, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(record)?);
    } else {
        println!("{} {}", record.reference, record.manifest);
    }
    Ok(())
}

pub fn pull(args: PullArgs) -> Result<ExitCode> {
    let store = open()?;
    let read_secret = |from: &std::path::Path, what: &str| -> Result<String> {
        let mut text = String::new();
        if from == std::path::Path::new("-") {
            std::io::stdin()
                .take(64 << 10)
                .read_to_string(&mut text)
                .with_context(|| format!("reading the {what} from stdin"))?;
        } else {
            std::fs::File::open(from)
                .and_then(|f| f.take(64 << 10).read_to_string(&mut text))
                .with_context(|| format!("reading the {what} from {}", from.display()))?;
        }
        Ok(text.trim_end_matches(['\r', '\n']).to_string())
    };
    let credentials = match (&args.user, &args.token_file) {
        (Some(user), _) => Credentials::Basic {
            user: user.clone(),
            password: read_secret("-".as_ref(), "password")?,
        },
        (None, Some(file)) => Credentials::Bearer(read_secret(file, "token")?),
        (None, None) => Credentials::Anonymous,
    };
    let opts = PullOptions {
        insecure: args.insecure,
        credentials,
        parallel: args.parallel,
        credentials_over_http: args.credentials_over_http,
        credentials_to_any_realm: args.credentials_to_any_realm,
    };
    let progress: Arc<dyn PullProgress> = if std::io::stderr().is_terminal() && !args.json {
        Arc::new(Bars {
            multi: MultiProgress::new(),
            bars: Mutex::default(),
        })
    } else {
        Arc::new(Quiet)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let report = rt.block_on(boxlet_oci::pull(&store, &args.reference, &opts, progress))?;
    if !args.json {
        eprintln!(
            "fetched {} blobs ({}), {} already stored",
            report.fetched,
            human(report.fetched_bytes),
            report.reused
        );
    }
    print_record(&report.image, args.json)?;
    Ok(ExitCode::SUCCESS)
}

pub fn import(args: ImportArgs) -> Result<ExitCode> {
    let store = open()?;
    let record = if args.path.is_dir() {
        boxlet_oci::import_layout(&store, &args.path, args.name.as_deref())?
    } else if args.path.is_file() {
        boxlet_oci::import_archive(&store, &args.path, args.name.as_deref())?
    } else {
        bail!(
            "{}: neither an OCI layout directory nor an archive",
            args.path.display()
        );
    };
    print_record(&record, args.json)?;
    Ok(ExitCode::SUCCESS)
}

pub fn images(args: ImagesArgs) -> Result<ExitCode> {
    let store = open()?;
    let images = store.images()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&images)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<50} {:<19} {:<12} {:>10}",
        "REFERENCE", "MANIFEST", "PLATFORM", "SIZE"
    );
    for image in &images {
        let size: u64 = image
            .blobs()
            .filter_map(|d| store.stat(d).ok().flatten())
            .map(|b| b.size)
            .sum();
        println!(
            "{:<50} {:<19} {:<12} {:>10}",
            image.reference,
            &image.manifest.to_string()[..19],
            image.platform,
            human(size)
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn rmi(args: RmiArgs) -> Result<ExitCode> {
    let store = open()?;
    let image = StoredImage::open(&store, &args.reference)
        .map(|i| i.record.reference)
        .unwrap_or(args.reference);
    let removed = store.remove_image(&image)?;
    println!(
        "removed {} (its blobs go at the next `boxlet store gc`)",
        removed.reference
    );
    Ok(ExitCode::SUCCESS)
}

pub fn unpack(args: UnpackArgs) -> Result<ExitCode> {
    let store = open()?;
    let opts = ApplyOptions {
        devices: match args.devices {
            Devices::Skip => DevicePolicy::Skip,
            Devices::Create => DevicePolicy::Create,
            Devices::Refuse => DevicePolicy::Refuse,
        },
        owners: !args.no_owners && ApplyOptions::default().owners,
        ..ApplyOptions::default()
    };
    let r = boxlet_oci::unpack(&store, &args.reference, Path::new(&args.dir), &opts)?;
    println!(
        "{}: {} files ({}), {} directories, {} symlinks, {} hard links, {} whiteouts, {} devices skipped",
        args.dir.display(),
        r.files,
        human(r.bytes),
        r.dirs,
        r.symlinks,
        r.hardlinks,
        r.whiteouts,
        r.devices_skipped
    );
    Ok(ExitCode::SUCCESS)
}
