//! Backing files: raw images, the chain resolver and opening an image with its chain.
//!
//! The resolver never probes a backing file's format: it takes it from the image's backing
//! format extension or, for the top image's backing file, from the caller. Chains deeper
//! than [`MAX_CHAIN_DEPTH`] and cycles are refused.

use std::collections::HashSet;
use std::fs::{File, OpenOptions as FsOpenOptions};
use std::path::{Path, PathBuf};

use crate::error::{Corruption, Result, Unsupported};
use crate::header::Header;
use crate::image::{Qcow2, StorageOptions};
use crate::storage::Storage;
use crate::{invalid, BackingFormat, BlockDevice, Error};

/// Most backing files below one image.
pub const MAX_CHAIN_DEPTH: usize = 16;

/// A raw disk image: the bytes are the disk.
#[derive(Debug)]
pub struct RawImage {
    storage: Box<dyn Storage>,
    size: u64,
}

impl RawImage {
    /// A raw image over `storage`; its size is the storage length.
    pub fn new(storage: Box<dyn Storage>) -> Result<Self> {
        let size = storage
            .len()
            .map_err(|e| Error::io("reading the raw image length", e))?;
        Ok(Self { storage, size })
    }

    /// Open a raw image file read-only.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io("opening", e).with_path(path))?;
        Self::new(Box::new(file)).map_err(|e| e.with_path(path))
    }
}

impl BlockDevice for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.storage
            .read_at(buf, offset)
            .map_err(|e| Error::io("reading the raw image", e))
    }
}

/// One image of a backing chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainLink {
    /// Where the image is.
    pub path: PathBuf,
    /// Its format.
    pub format: BackingFormat,
    /// The backing name as the image above stores it (`None` for the top image).
    pub stored_name: Option<String>,
}

/// Resolve a backing file name as QEMU does: relative names are relative to the
/// directory of the image that names them.
pub fn resolve_backing_name(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new("")).join(p)
    }
}

/// The chain below and including the qcow2 image at `top`, top first.
/// `backing_format` is used for the top image's backing file when the image does not
/// record one.
pub fn resolve_chain(top: &Path, backing_format: Option<BackingFormat>) -> Result<Vec<ChainLink>> {
    let mut chain = vec![ChainLink {
        path: top.to_path_buf(),
        format: BackingFormat::Qcow2,
        stored_name: None,
    }];
    let mut seen = HashSet::new();
    loop {
        let cur = chain
            .last()
            .expect("chain starts with the top image")
            .clone();
        let canon = cur
            .path
            .canonicalize()
            .map_err(|e| Error::io("resolving the path", e).with_path(&cur.path))?;
        if !seen.insert(canon) {
            let names: Vec<String> = chain.iter().map(|l| l.path.display().to_string()).collect();
            return Err(Error::from(Corruption::Other(format!(
                "backing chain has a cycle: {}",
                names.join(" -> ")
            )))
            .with_path(top));
        }
        if cur.format == BackingFormat::Raw {
            return Ok(chain);
        }
        let file =
            File::open(&cur.path).map_err(|e| Error::io("opening", e).with_path(&cur.path))?;
        let header = Header::read(&file).map_err(|e| e.with_path(&cur.path))?;
        let Some(name) = header.backing_file else {
            return Ok(chain);
        };
        if chain.len() > MAX_CHAIN_DEPTH {
            return Err(invalid(format!(
                "backing chain deeper than {MAX_CHAIN_DEPTH} images"
            ))
            .with_path(top));
        }
        if let (None, Some(other)) = (header.backing_format, &header.backing_format_name) {
            return Err(Error::from(Unsupported::BackingFormat(other.clone())).with_path(&cur.path));
        }
        let hint = if chain.len() == 1 {
            backing_format
        } else {
            None
        };
        let format = header.backing_format.or(hint).ok_or_else(|| {
            invalid(format!(
                "backing file {name:?} has no recorded format; give it (raw or qcow2) explicitly"
            ))
            .with_path(&cur.path)
        })?;
        chain.push(ChainLink {
            path: resolve_backing_name(&cur.path, &name),
            format,
            stored_name: Some(name),
        });
    }
}

/// How to open an image file.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Open the top image for writing (backing files are always read-only).
    pub writable: bool,
    /// Format of the top image's backing file when the image does not record it.
    pub backing_format: Option<BackingFormat>,
    /// Ignore the backing file: unallocated clusters read as zeros.
    pub no_backing: bool,
}

impl Qcow2 {
    /// Open a qcow2 file read-only, with its backing chain.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, OpenOptions::default())
    }

    /// Open a qcow2 file with options, with its backing chain.
    pub fn open_with(path: &Path, opts: OpenOptions) -> Result<Self> {
        let chain = if opts.no_backing {
            Vec::new()
        } else {
            resolve_chain(path, opts.backing_format)?
        };
        let mut below: Option<Box<dyn BlockDevice>> = None;
        for link in chain.iter().skip(1).rev() {
            below = Some(match link.format {
                BackingFormat::Raw => Box::new(RawImage::open(&link.path)?),
                BackingFormat::Qcow2 => Box::new(open_file(&link.path, false, below.take())?),
            });
        }
        open_file(path, opts.writable, below)
    }
}

fn open_file(path: &Path, writable: bool, backing: Option<Box<dyn BlockDevice>>) -> Result<Qcow2> {
    let file = FsOpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(|e| Error::io("opening", e).with_path(path))?;
    let opts = StorageOptions {
        writable,
        ..Default::default()
    };
    let mut img =
        Qcow2::from_storage(Box::new(file), opts, backing).map_err(|e| e.with_path(path))?;
    img.set_path(path);
    Ok(img)
}

/// Virtual size of a backing file of the given format.
pub fn image_size(path: &Path, format: BackingFormat) -> Result<u64> {
    let file = File::open(path).map_err(|e| Error::io("opening", e).with_path(path))?;
    match format {
        BackingFormat::Raw => {
            Storage::len(&file).map_err(|e| Error::io("reading the length", e).with_path(path))
        }
        BackingFormat::Qcow2 => Ok(Header::read(&file).map_err(|e| e.with_path(path))?.size),
    }
}
