//! qcow2 for boxlet: the copy-on-write format of every box's disk.
//!
//! - [`Header`]: parse and validate v2/v3 headers and extensions ([`read_backing_file_path`]
//!   for garbage collection reads only the backing name).
//! - [`create`]: standalone images and overlays over raw or qcow2 backing files.
//! - [`Qcow2`]: a read/write engine usable as a block device backend, with backing chains
//!   ([`resolve_chain`]), compressed clusters, discard and crash-consistent flush.
//!
//! The on-disk format is described in `docs/qcow2.md`.
#![forbid(unsafe_code)]

mod backing;
mod check;
mod create;
mod error;
pub mod fuzz;
pub mod header;
mod image;
mod info;
mod l2cache;
mod refcount;
mod storage;

pub use backing::{
    image_size, resolve_backing_name, resolve_chain, ChainLink, OpenOptions, RawImage,
    MAX_CHAIN_DEPTH,
};
pub use check::CheckReport;
pub use create::{create, create_on, CreateOptions};
pub use error::{Corruption, Error, ErrorKind, Result, Unsupported};
pub use header::{
    incompatible_feature_name, read_backing_file_path, ExtensionInfo, FeatureName, Header,
};
pub use image::{Qcow2, StorageOptions};
pub use info::ImageInfo;
pub use storage::{MemStorage, Storage};

pub(crate) use error::invalid;

/// Format of a backing file. Never guessed: recorded in the image or given by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackingFormat {
    /// A raw disk image.
    Raw,
    /// A qcow2 image.
    Qcow2,
}

impl BackingFormat {
    /// The name used in the backing format extension and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }

    /// Parse a format name.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "raw" => Some(Self::Raw),
            "qcow2" => Some(Self::Qcow2),
            _ => None,
        }
    }
}

impl std::fmt::Display for BackingFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A readable virtual disk: what a backing file is to the image above it.
pub trait BlockDevice: Send + std::fmt::Debug {
    /// Size of the disk in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`; `offset + buf.len()` must not exceed [`Self::size`].
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<()>;
}
