//! Guest root filesystems: the `RootfsStrategy` trait, what a prepared rootfs is, and the
//! strategies that prepare one.
//!
//! A strategy turns an image (and a box) into a [`GuestRootfs`]: a directory for
//! virtio-fs, or a disk for virtio-blk. Its [`Strategy`] value is serializable, so a box's
//! record says how its rootfs was made and how to clean it up.

mod cache_gc;
mod copy;
mod direct;
mod disk;
mod error;
mod extracted;
mod fault;
mod home;
mod manager;
mod overlay;
mod quota;
mod shared;
mod tree_copy;

use std::path::PathBuf;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use cache_gc::{collect_caches, CacheReport};
pub use copy::{copy_file, reflinks_supported, CopyMethod};
pub use direct::DirectStrategy;
pub use disk::DiskStrategy;
pub use error::RootfsError;
pub use extracted::ExtractedStrategy;
pub use fault::{PrepareHook, PrepareStep};
pub use home::{Home, RuntimeLock};
pub use manager::{AgentBinary, GuestRootfsManager, GLOBAL_SOURCE};
pub use overlay::OverlayStrategy;
pub use quota::{DiskQuota, DEFAULT_QUOTA, MIN_QUOTA};
pub use tree_copy::{allocated_bytes, copy_tree, tree_size, TreeCopy, TreeSize};

use crate::hypervisor::ShareIds;
use crate::vm::Root;

/// Where the directory strategies store image ids on the host, when they run as root:
/// image id `n` is host id `0x6F00_0000 + n` for the 65536 ids an image may use (inside
/// systemd's range for container ids, 0x0008_0000 to 0x6FFF_FFFF). No host process runs
/// as these ids, so a set-user-ID-root file of an image is set-ID to nobody on the
/// host; virtiofsd maps the range back to the image's ids for the guest.
pub const CACHE_IDS: boxlet_oci::IdShift = match boxlet_oci::IdShift::new(0x6F00_0000) {
    Some(s) => s,
    None => panic!("the cache id range reaches the invalid id"),
};

/// How a guest rootfs was made (and so how it is cleaned up).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Strategy {
    /// A directory the user gave: used as is, never modified or removed by cleanup.
    Direct,
    /// The image's layers applied into a directory (a per-box view of a cached one).
    Extracted {
        /// The layers, bottom first (their digests).
        layers: Vec<String>,
        /// The host id of image id 0 when the tree's owners are shifted ([`CACHE_IDS`]).
        #[serde(default)]
        id_base: Option<u32>,
    },
    /// Layers as overlayfs lowers with a per-box upper and work directory.
    OverlayMount {
        /// Lower directories, topmost first (overlayfs order).
        lower: Vec<PathBuf>,
        /// The box's upper directory.
        upper: PathBuf,
        /// overlayfs's work directory.
        work: PathBuf,
        /// The host id of image id 0 when the layers' owners are shifted ([`CACHE_IDS`]).
        #[serde(default)]
        id_base: Option<u32>,
    },
    /// An ext4 disk: the versioned base (agent inside) under a per-box qcow2 overlay.
    Disk {
        /// The box's disk (a qcow2 overlay of the base).
        disk_path: PathBuf,
        /// The guest device it appears as, when known.
        device_path: Option<String>,
    },
}

/// A prepared guest rootfs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRootfs {
    /// The directory or disk the guest boots from.
    pub path: PathBuf,
    /// How it was made.
    pub strategy: Strategy,
    /// A kernel the image brings, if any (boxlet's own otherwise).
    pub kernel: Option<PathBuf>,
    /// An initrd the image brings, if any.
    pub initrd: Option<PathBuf>,
    /// The image's environment (`KEY`, `VALUE`).
    pub env: Vec<(String, String)>,
}

impl GuestRootfs {
    /// How a VM boots from it: a disk as virtio-blk, a directory as virtio-fs.
    pub fn root(&self) -> Root {
        match &self.strategy {
            Strategy::Disk { disk_path, .. } => Root::Disk {
                path: disk_path.clone(),
                read_only: false,
            },
            // The user's own directory may change under the box; a box's own does not.
            Strategy::Direct => Root::Dir {
                path: self.path.clone(),
                exclusive: false,
                ids: ShareIds::Host,
            },
            Strategy::Extracted { id_base, .. } | Strategy::OverlayMount { id_base, .. } => {
                Root::Dir {
                    path: self.path.clone(),
                    exclusive: true,
                    ids: match id_base {
                        Some(base) => ShareIds::Shifted { base: *base },
                        None => ShareIds::Host,
                    },
                }
            }
        }
    }
}

/// What to prepare a rootfs from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PrepareRequest {
    /// The image reference (strategies that take a directory ignore it).
    pub image: Option<String>,
    /// The box the rootfs is for.
    pub box_id: boxlet_cas::BoxId,
}

/// A way to give a box its root filesystem.
#[async_trait]
pub trait RootfsStrategy: Send + Sync + std::fmt::Debug {
    /// The strategy's name (`direct`, `extracted`, `overlay`, `disk`).
    fn name(&self) -> &'static str;

    /// Build what every box of `image` shares (the image-level cache) without making a
    /// box; when it is cached already, this is a lookup. Strategies with nothing to share
    /// have nothing to do.
    async fn ensure_cached(&self, image: &str) -> Result<(), RootfsError> {
        let _ = image;
        Ok(())
    }

    /// Prepare a rootfs for the request (building the image-level cache when missing).
    async fn prepare(&self, req: &PrepareRequest) -> Result<GuestRootfs, RootfsError>;

    /// Remove what `prepare` made for the box (what it shares with other boxes stays).
    async fn cleanup(&self, rootfs: &GuestRootfs) -> Result<(), RootfsError>;
}
