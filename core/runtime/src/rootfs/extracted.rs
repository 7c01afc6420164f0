//! Extracted: the image's layers applied (securely, by the OCI layer code) into one
//! directory, cached per image manifest under `images/<hex>/rootfs`; each box gets its
//! own copy of it (reflinks where the file system has them, else a copy of the data),
//! booted over virtio-fs.
//!
//! The box's copy lives on its own file system of its disk quota
//! ([`crate::rootfs::quota`]: the tree and [`crate::rootfs::DEFAULT_QUOTA`] more by
//! default), where reflinks from the cache cannot reach: with a quota the copy is a copy;
//! only [`DiskQuota::Unlimited`] copies onto the home's own file system.
//!
//! The cache is staged in `tmp/` and renamed into `images/` whole: a directory there is
//! complete, and a crash leaves only staging, which the store sweeps at open.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_trait::async_trait;
use boxlet_cas::Store;
use boxlet_oci::{StoredImage, Whiteouts};

use crate::rootfs::quota::{self, unmount_under, DiskQuota};
use crate::rootfs::shared::{
    box_dir_of, cache_apply_options, cache_id_base, image_env, install_staged_dir, own_top_dir,
    remove_box_dir, requested_image, Flights,
};
use crate::rootfs::tree_copy::{copy_tree, tree_size, TreeCopy};
use crate::rootfs::{GuestRootfs, Home, PrepareRequest, RootfsError, RootfsStrategy, Strategy};

/// The Extracted strategy (see the module documentation).
#[derive(Debug)]
pub struct ExtractedStrategy {
    inner: Arc<Inner>,
    flights: Flights,
    quota: DiskQuota,
}

#[derive(Debug)]
struct Inner {
    home: Home,
    store: Arc<Store>,
    extractions: AtomicUsize,
    last_copy: Mutex<TreeCopy>,
}

impl ExtractedStrategy {
    /// Boxes of `home` from images in `store`.
    pub fn new(home: Home, store: Arc<Store>) -> Result<Self, RootfsError> {
        home.prepare()?;
        // Boxes' quota file systems a crashed runtime left mounted (a home is one
        // runtime's at a time: `RuntimeLock`).
        if home.boxes().is_dir() {
            unmount_under(&home.boxes())?;
        }
        Ok(ExtractedStrategy {
            inner: Arc::new(Inner {
                home,
                store,
                extractions: AtomicUsize::new(0),
                last_copy: Mutex::default(),
            }),
            flights: Flights::default(),
            quota: DiskQuota::Default,
        })
    }

    /// Boxes with `quota` on their copy and what their guests write (the default: the
    /// tree and [`quota::DEFAULT_QUOTA`] more).
    pub fn with_disk_quota(mut self, quota: DiskQuota) -> Self {
        self.quota = quota;
        self
    }

    /// How many images this strategy has extracted (cache misses).
    pub fn extractions(&self) -> usize {
        self.inner.extractions.load(Ordering::Relaxed)
    }

    /// What the last per-box copy did (reflinked or copied files).
    pub fn last_copy(&self) -> TreeCopy {
        self.inner
            .last_copy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The cached tree of an image (extracting it when missing).
    pub async fn cached_tree(&self, image: &StoredImage) -> Result<PathBuf, RootfsError> {
        let hex = image.record.manifest.hex();
        let flight = self.flights.get(&hex);
        let _once = flight.lock().await;
        let inner = self.inner.clone();
        let reference = image.record.reference.clone();
        tokio::task::spawn_blocking(move || inner.ensure_cached(&reference, &hex))
            .await
            .map_err(|e| RootfsError::Invalid {
                what: image.record.reference.clone(),
                reason: format!("extracting it failed: {e}"),
            })?
    }
}

impl Inner {
    fn ensure_cached(&self, reference: &str, hex: &str) -> Result<PathBuf, RootfsError> {
        let dir = self.home.images().join(hex);
        let tree = dir.join("rootfs");
        if tree.is_dir() {
            return Ok(tree);
        }
        let stage = tempfile::Builder::new()
            .prefix("extract-")
            .tempdir_in(self.home.tmp())
            .map_err(RootfsError::io("staging in", self.home.tmp()))?;
        let staged = stage.path().join("rootfs");
        let opts = cache_apply_options(Whiteouts::Apply);
        boxlet_oci::unpack(&self.store, reference, &staged, &opts)?;
        own_top_dir(&staged)?;
        self.extractions.fetch_add(1, Ordering::Relaxed);
        // The whole staging directory becomes images/<hex> (the tree is its `rootfs`).
        install_staged_dir(&stage.keep(), &dir)?;
        Ok(tree)
    }
}

#[async_trait]
impl RootfsStrategy for ExtractedStrategy {
    fn name(&self) -> &'static str {
        "extracted"
    }

    async fn ensure_cached(&self, image: &str) -> Result<(), RootfsError> {
        let image = StoredImage::open(&self.inner.store, image)?;
        self.cached_tree(&image).await.map(drop)
    }

    async fn prepare(&self, req: &PrepareRequest) -> Result<GuestRootfs, RootfsError> {
        let image = requested_image(&self.inner.store, req, "Extracted")?;
        let reference = image.record.reference.as_str();
        let tree = self.cached_tree(&image).await?;
        let box_dir = self.inner.home.box_dir(req.box_id);
        let quota = self.quota;
        let rootfs = match quota {
            DiskQuota::Unlimited => box_dir.join("rootfs"),
            _ => box_dir.join("rw").join("rootfs"),
        };
        let inner = self.inner.clone();
        let (from, to) = (tree.clone(), rootfs.clone());
        let dir = box_dir.clone();
        let made = tokio::task::spawn_blocking(move || -> Result<(), RootfsError> {
            std::fs::create_dir_all(&dir).map_err(RootfsError::io("creating", &dir))?;
            // The copy and a quarter more for the file system's own metadata, and an
            // inode for each of its entries (a quarter more again) besides those of the
            // quota's size: an image of many small files fits.
            let tree = tree_size(&from);
            let content = tree.bytes.saturating_mul(5) / 4;
            if let Some(bytes) = quota.size_for(content) {
                let inodes = tree.entries.saturating_mul(5) / 4;
                quota::mount_new(&dir.join("quota.ext4"), &dir.join("rw"), bytes, inodes)?;
            }
            let stats = copy_tree(&from, &to)?;
            *inner
                .last_copy
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = stats;
            Ok(())
        })
        .await
        .map_err(|e| RootfsError::Invalid {
            what: reference.to_string(),
            reason: format!("copying its tree failed: {e}"),
        })?;
        if let Err(e) = made {
            quota::discard_box_dir(&box_dir);
            return Err(e);
        }
        Ok(GuestRootfs {
            path: rootfs,
            strategy: Strategy::Extracted {
                layers: image.layers.iter().map(|l| l.digest.to_string()).collect(),
                id_base: cache_id_base(),
            },
            kernel: None,
            initrd: None,
            env: image_env(&image),
        })
    }

    async fn cleanup(&self, rootfs: &GuestRootfs) -> Result<(), RootfsError> {
        let dir = box_dir_of(&self.inner.home, &rootfs.path)?;
        // Never remove through a mount (the box's file system).
        unmount_under(&dir)?;
        remove_box_dir(dir).await
    }
}
