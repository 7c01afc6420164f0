//! `boxlet qcow2 ...`

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use boxlet_qcow2::{
    create, BackingFormat, CreateOptions, Header, ImageInfo, OpenOptions, Qcow2, Storage,
};
use clap::{Subcommand, ValueEnum};

use crate::size::parse_size;

#[derive(Debug, Subcommand)]
pub enum Qcow2Command {
    /// Show the header of an image.
    Info {
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create a standalone image or an overlay over a backing file.
    Create {
        file: PathBuf,
        /// Virtual size (4096, 64K, 10G...). Overlays default to the backing file's size.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// Backing file, stored as given (relative names are relative to FILE's directory).
        #[arg(long, requires = "backing_format")]
        backing: Option<String>,
        /// Format of the backing file (never guessed).
        #[arg(long, value_enum)]
        backing_format: Option<Format>,
        /// Cluster size, a power of two from 512 to 2M.
        #[arg(long, value_parser = parse_size, default_value = "64K")]
        cluster_size: u64,
        /// qcow2 compatibility level: 0.10 (version 2) or 1.1 (version 3).
        #[arg(long, default_value = "1.1")]
        compat: String,
        /// Refcount width in bits (1, 2, 4, 8, 16, 32, 64; compat 1.1 only).
        #[arg(long, default_value_t = 16)]
        refcount_bits: u32,
    },
    /// Write the whole virtual disk as a raw file.
    Export {
        file: PathBuf,
        out: PathBuf,
        /// Format of the backing file, if the image does not record it.
        #[arg(long, value_enum)]
        backing_format: Option<Format>,
    },
    /// Write bytes (from --input, else standard input) at an offset of the virtual disk.
    Write {
        file: PathBuf,
        #[arg(long, value_parser = parse_size)]
        offset: u64,
        #[arg(long)]
        input: Option<PathBuf>,
        /// Format of the backing file, if the image does not record it.
        #[arg(long, value_enum)]
        backing_format: Option<Format>,
    },
    /// Check refcounts against references (like `qemu-img check`).
    Check {
        file: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    Raw,
    Qcow2,
}

impl From<Format> for BackingFormat {
    fn from(f: Format) -> Self {
        match f {
            Format::Raw => BackingFormat::Raw,
            Format::Qcow2 => BackingFormat::Qcow2,
        }
    }
}

pub fn run(cmd: Qcow2Command) -> Result<ExitCode> {
    match cmd {
        Qcow2Command::Info { file, json } => info(&file, json),
        Qcow2Command::Create {
            file,
            size,
            backing,
            backing_format,
            cluster_size,
            compat,
            refcount_bits,
        } => {
            let version = match compat.as_str() {
                "0.10" => 2,
                "1.1" => 3,
                other => bail!(
                    "{}: unknown compat level {other:?} (0.10 or 1.1)",
                    file.display()
                ),
            };
            if !cluster_size.is_power_of_two() || !(512..=2 << 20).contains(&cluster_size) {
                bail!(
                    "{}: cluster size {cluster_size} is not a power of two in 512..2M",
                    file.display()
                );
            }
            if !refcount_bits.is_power_of_two() || refcount_bits > 64 {
                bail!(
                    "{}: refcount bits {refcount_bits} not one of 1, 2, 4, ..., 64",
                    file.display()
                );
            }
            if size.is_none() && backing.is_none() {
                bail!("{}: --size is required without --backing", file.display());
            }
            let opts = CreateOptions {
                size,
                cluster_bits: cluster_size.trailing_zeros(),
                version,
                refcount_order: refcount_bits.trailing_zeros(),
                backing: backing.map(|b| (b, backing_format.expect("clap requires it").into())),
                lazy_refcounts: false,
            };
            create(&file, &opts)?;
            Ok(ExitCode::SUCCESS)
        }
        Qcow2Command::Export {
            file,
            out,
            backing_format,
        } => export(&file, &out, backing_format),
        Qcow2Command::Write {
            file,
            offset,
            input,
            backing_format,
        } => write(&file, offset, input.as_deref(), backing_format),
        Qcow2Command::Check { file, json } => check(&file, json),
    }
}

fn info(file: &Path, json: bool) -> Result<ExitCode> {
    let f = File::open(file).with_context(|| format!("{}: cannot open", file.display()))?;
    let header = Header::read(&f).map_err(|e| e.with_path(file))?;
    let len = Storage::len(&f).with_context(|| format!("{}: cannot stat", file.display()))?;
    let info = ImageInfo::new(&header, len);
    if json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("image: {}", file.display());
    println!("file format: qcow2");
    println!("virtual size: {} bytes", info.virtual_size);
    println!("disk size: {} bytes", info.file_length);
    println!("cluster_size: {}", info.cluster_size);
    if let Some(b) = &info.backing_file {
        println!("backing file: {b}");
        match info.backing_format {
            Some(f) => println!("backing file format: {f}"),
            None => println!("backing file format: (not recorded)"),
        }
    }
    println!("compat: {}", info.compat);
    println!("refcount bits: {}", info.refcount_bits);
    println!("lazy refcounts: {}", info.lazy_refcounts);
    if !info.incompatible_features.is_empty() {
        println!(
            "incompatible features: {}",
            info.incompatible_features.join(", ")
        );
    }
    if info.snapshots > 0 {
        println!("internal snapshots: {}", info.snapshots);
    }
    Ok(ExitCode::SUCCESS)
}

fn open(file: &Path, writable: bool, backing_format: Option<Format>) -> Result<Qcow2> {
    Ok(Qcow2::open_with(
        file,
        OpenOptions {
            writable,
            backing_format: backing_format.map(Into::into),
            no_backing: false,
        },
    )?)
}

fn export(file: &Path, out: &Path, backing_format: Option<Format>) -> Result<ExitCode> {
    let mut img = open(file, false, backing_format)?;
    let mut dst = File::create(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let size = img.virtual_size();
    let chunk = (1u64 << 20).max(img.cluster_size());
    let mut buf = vec![0u8; chunk as usize];
    let mut pos = 0;
    while pos < size {
        let n = chunk.min(size - pos) as usize;
        img.read_at(&mut buf[..n], pos)?;
        if buf[..n].iter().all(|&b| b == 0) {
            // Keep the output sparse.
            pos += n as u64;
            continue;
        }
        Storage::write_at(&mut dst, &buf[..n], pos)
            .with_context(|| format!("{}: write failed", out.display()))?;
        pos += n as u64;
    }
    dst.set_len(size)
        .and_then(|()| dst.sync_all())
        .with_context(|| format!("{}: write failed", out.display()))?;
    Ok(ExitCode::SUCCESS)
}

fn write(
    file: &Path,
    offset: u64,
    input: Option<&Path>,
    backing_format: Option<Format>,
) -> Result<ExitCode> {
    let mut data = Vec::new();
    match input {
        Some(p) => {
            File::open(p)
                .and_then(|mut f| f.read_to_end(&mut data))
                .with_context(|| format!("{}: cannot read", p.display()))?;
        }
        None => {
            std::io::stdin()
                .read_to_end(&mut data)
                .context("cannot read standard input")?;
        }
    }
    let mut img = open(file, true, backing_format)?;
    img.write_at(&data, offset)?;
    img.flush()?;
    Ok(ExitCode::SUCCESS)
}

fn check(file: &Path, json: bool) -> Result<ExitCode> {
    let mut img = Qcow2::open_with(
        file,
        OpenOptions {
            no_backing: true,
            ..Default::default()
        },
    )?;
    let report = img.check()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for c in &report.corruptions {
            println!("ERROR {c}");
        }
        println!(
            "{}: {} corruptions, {} leaked clusters, {} clusters referenced",
            file.display(),
            report.corruption_count,
            report.leaks,
            report.referenced_clusters
        );
    }
    let _ = std::io::stdout().flush();
    Ok(if report.corruption_count > 0 {
        ExitCode::from(2)
    } else if report.leaks > 0 {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}
