//! `boxlet ext4 ...`

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use boxlet_ext4::{Ext4, FileType, Metadata};
use clap::Subcommand;

#[derive(Debug, Subcommand)]
pub enum Ext4Command {
    /// Show the superblock: size, block size, features.
    Info {
        image: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// List a directory like `ls -l` (default: the root).
    Ls {
        image: PathBuf,
        #[arg(default_value = "/")]
        path: String,
    },
    /// Write a file's contents to standard output.
    Cat { image: PathBuf, path: String },
    /// Build an image from a host directory or from OCI layer tarballs (plain, gzip,
    /// zstd), applied in the order given.
    Build {
        out: PathBuf,
        /// The directory to copy into the image.
        #[arg(long, required_unless_present = "layer", conflicts_with = "layer")]
        dir: Option<PathBuf>,
        /// A layer tarball; repeat for each layer, lowest first.
        #[arg(long, num_args = 1..)]
        layer: Vec<PathBuf>,
        /// Image size (default: the content plus 25%).
        #[arg(long, value_parser = crate::size::parse_size)]
        size: Option<u64>,
        /// Leave out the journal.
        #[arg(long)]
        no_journal: bool,
        /// Put this boxlet's guest agent at /boxlet/bin/boxlet-guest.
        #[arg(long)]
        agent: bool,
    },
    /// Add or replace one host file at PATH inside the image (parents created).
    Inject {
        image: PathBuf,
        host_file: PathBuf,
        path: String,
        /// Permission bits, octal.
        #[arg(long, default_value = "755", value_parser = parse_mode)]
        mode: u16,
        /// Owner.
        #[arg(long, default_value_t = 0)]
        uid: u32,
        /// Group.
        #[arg(long, default_value_t = 0)]
        gid: u32,
    },
    /// Every entry of the image with its metadata.
    Tree {
        image: PathBuf,
        /// One JSON object per entry, in an array.
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: Ext4Command) -> Result<ExitCode> {
    match cmd {
        Ext4Command::Info { image, json } => info(&image, json),
        Ext4Command::Ls { image, path } => ls(&image, &path),
        Ext4Command::Cat { image, path } => cat(&image, &path),
        Ext4Command::Tree { image, json } => tree(&image, json),
        Ext4Command::Inject {
            image,
            host_file,
            path,
            mode,
            uid,
            gid,
        } => {
            let opts = boxlet_ext4::InjectOptions {
                mode,
                uid,
                gid,
                ..Default::default()
            };
            boxlet_ext4::inject(&image, &host_file, &path, &opts)
                .with_context(|| image.display().to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Ext4Command::Build {
            out,
            dir,
            layer,
            size,
            no_journal,
            agent,
        } => {
            let agent = agent.then(crate::agent::find).transpose()?;
            build(
                &out,
                dir.as_deref(),
                &layer,
                size,
                !no_journal,
                agent.as_deref(),
            )
        }
    }
}

fn open(image: &Path) -> Result<Ext4> {
    Ext4::open(image).with_context(|| image.display().to_string())
}

fn info(image: &Path, json: bool) -> Result<ExitCode> {
    let fs = open(image)?;
    let sb = fs.superblock();
    let v = serde_json::json!({
        "block_size": sb.block_size(),
        "blocks": sb.blocks_count,
        "inodes": sb.inodes_count,
        "inode_size": sb.inode_size,
        "groups": sb.group_count(),
        "volume_name": sb.volume_name,
        "uuid": sb.uuid.iter().map(|b| format!("{b:02x}")).collect::<String>(),
        "features": sb.feature_names(),
    });
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("image: {}", image.display());
        println!("block size: {}", sb.block_size());
        println!("blocks: {}", sb.blocks_count);
        println!("inodes: {} ({} bytes each)", sb.inodes_count, sb.inode_size);
        println!("groups: {}", sb.group_count());
        println!("features: {}", sb.feature_names().join(" "));
    }
    Ok(ExitCode::SUCCESS)
}

/// `drwxr-xr-x`-style mode string.
fn mode_string(m: &Metadata) -> String {
    let mut s = String::with_capacity(10);
    s.push(m.file_type.letter());
    let bits = m.mode;
    for (i, c) in "rwxrwxrwx".chars().enumerate() {
        let set = bits & (0o400 >> i) != 0;
        let special = match i {
            2 => bits & 0o4000 != 0,
            5 => bits & 0o2000 != 0,
            8 => bits & 0o1000 != 0,
            _ => false,
        };
        s.push(match (set, special) {
            (true, false) => c,
            (false, false) => '-',
            (true, true) => {
                if i == 8 {
                    't'
                } else {
                    's'
                }
            }
            (false, true) => {
                if i == 8 {
                    'T'
                } else {
                    'S'
                }
            }
        });
    }
    s
}

fn ls_line(name: &str, m: &Metadata) -> String {
    let size = match m.device {
        Some((major, minor)) => format!("{major}, {minor}"),
        None => m.size.to_string(),
    };
    let mut line = format!(
        "{} {:>3} {:>5} {:>5} {:>10} {name}",
        mode_string(m),
        m.links,
        m.uid,
        m.gid,
        size
    );
    if let Some(t) = &m.link_target {
        line.push_str(" -> ");
        line.push_str(t);
    }
    line
}

fn ls(image: &Path, path: &str) -> Result<ExitCode> {
    let fs = open(image)?;
    // Errors from path lookups name the path already; add the image.
    let img = || image.display().to_string();
    let ctx = || format!("{}: {path}", image.display());
    let meta = fs.stat(path).with_context(img)?;
    let mut out = std::io::stdout().lock();
    if meta.file_type != FileType::Directory {
        writeln!(out, "{}", ls_line(path, &meta))?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut entries = fs.read_dir(path).with_context(img)?;
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    for e in entries {
        let inode = fs.inode(e.ino).with_context(ctx)?;
        let m = fs.metadata(&inode).with_context(ctx)?;
        writeln!(out, "{}", ls_line(&e.name_lossy(), &m))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn cat(image: &Path, path: &str) -> Result<ExitCode> {
    let fs = open(image)?;
    let ctx = || format!("{}: {path}", image.display());
    let inode = fs
        .resolve(path, true)
        .with_context(|| image.display().to_string())?;
    if inode.file_type() != Some(FileType::Regular) {
        anyhow::bail!("{}: not a regular file", ctx());
    }
    let mut reader = fs.file_reader(&inode).with_context(ctx)?;
    let mut out = std::io::stdout().lock();
    std::io::copy(&mut reader, &mut out).with_context(ctx)?;
    Ok(ExitCode::SUCCESS)
}

fn tree(image: &Path, json: bool) -> Result<ExitCode> {
    let fs = open(image)?;
    let entries = fs.walk().with_context(|| image.display().to_string())?;
    let mut out = std::io::stdout().lock();
    if json {
        let v: Vec<serde_json::Value> = entries
            .iter()
            .map(|(p, m)| {
                let mut v = serde_json::to_value(m).expect("metadata serializes");
                v["path"] = serde_json::Value::String(p.clone());
                v
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        for (p, m) in &entries {
            let mut line = ls_line(p, m);
            if !m.xattrs.is_empty() {
                line.push_str(&format!("  [{}]", m.xattrs.join(", ")));
            }
            writeln!(out, "{line}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn build(
    out: &Path,
    dir: Option<&Path>,
    layers: &[PathBuf],
    size: Option<u64>,
    journal: bool,
    agent: Option<&Path>,
) -> Result<ExitCode> {
    let mut tree = match dir {
        Some(dir) => boxlet_ext4::Tree::from_dir(dir).with_context(|| dir.display().to_string())?,
        None => {
            let mut stack = boxlet_ext4::LayerStack::new(boxlet_ext4::LayerLimits::default())?;
            for l in layers {
                let f = std::fs::File::open(l)
                    .with_context(|| format!("{}: cannot open", l.display()))?;
                stack.apply(&l.display().to_string(), f)?;
            }
            stack.into_tree()
        }
    };
    if let Some(agent) = agent {
        // In the tree, so the image is sized for it.
        let size = std::fs::metadata(agent)
            .with_context(|| agent.display().to_string())?
            .len();
        let node = boxlet_ext4::Node {
            kind: boxlet_ext4::NodeKind::File(boxlet_ext4::FileData::Host {
                path: agent.to_path_buf(),
                size,
            }),
            meta: boxlet_ext4::NodeMeta {
                mode: 0o755,
                ..Default::default()
            },
        };
        tree.put(AGENT_PATH, node)
            .with_context(|| format!("adding the agent at {AGENT_PATH}"))?;
    }
    // File contents are read from the layers a second time, straight into the image.
    let mut open_layer = |i: usize| -> std::io::Result<Box<dyn std::io::Read>> {
        Ok(Box::new(std::fs::File::open(&layers[i])?))
    };
    let opts = boxlet_ext4::BuildOptions {
        size,
        journal,
        ..Default::default()
    };
    let r = boxlet_ext4::build_file_with_layers(&tree, out, &opts, &mut open_layer)
        .with_context(|| out.display().to_string())?;
    eprintln!(
        "{}: {} bytes, {} inodes, {} blocks used",
        out.display(),
        r.size,
        r.inodes_used,
        r.blocks_used
    );
    Ok(ExitCode::SUCCESS)
}

/// Where the agent lives in a guest's root.
const AGENT_PATH: &str = "/boxlet/bin/boxlet-guest";

fn parse_mode(s: &str) -> Result<u16, String> {
    u16::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("invalid mode {s:?}: octal permission bits, e.g. 755"))
}
