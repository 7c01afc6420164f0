//! Disk: the image as an ext4 disk, booted as virtio-blk.
//!
//! - Stage 1: the image's own ext4, built from its layers by the streaming builder
//!   (nothing extracted to the host), cached per image manifest.
//! - Stage 2: the versioned guest rootfs ([`GuestRootfsManager`]): stage 1 copied without
//!   copying bytes where possible, the agent injected, installed under the version key.
//! - Per box: a qcow2 overlay backed by the stage-2 base, created in O(1).
//!
//! Concurrent prepares of one image in this process build it once (single flight); other
//! processes are kept out by the [`RuntimeLock`](crate::rootfs::RuntimeLock).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use boxlet_cas::{BaseDiskKind, Store};
use boxlet_oci::StoredImage;

use crate::disk_store::DiskStore;
use crate::rootfs::manager::{AgentBinary, GuestRootfsManager};
use crate::rootfs::shared::{box_dir_of, image_env, remove_box_dir, requested_image, Flights};
use crate::rootfs::{
    GuestRootfs, Home, PrepareHook, PrepareRequest, PrepareStep, RootfsError, RootfsStrategy,
    Strategy,
};

/// The Disk strategy (see the module documentation).
#[derive(Debug)]
pub struct DiskStrategy {
    inner: Arc<Inner>,
    flights: Flights,
}

/// What the blocking stages need, shared with the blocking thread.
#[derive(Debug)]
struct Inner {
    home: Home,
    store: Arc<Store>,
    manager: GuestRootfsManager,
    /// Image disks built (stage 1) by this strategy.
    builds: AtomicUsize,
}

impl DiskStrategy {
    /// Boxes of `home` from images in `store` (the home's own store), with `agent` injected.
    /// Sweeps base files a crash left without a record.
    pub fn new(home: Home, store: Arc<Store>, agent: AgentBinary) -> Result<Self, RootfsError> {
        Self::with_hook(home, store, agent, PrepareHook::default())
    }

    /// [`new`](Self::new) with a fault hook at every step of a prepare (crash drills).
    pub fn with_hook(
        home: Home,
        store: Arc<Store>,
        agent: AgentBinary,
        hook: PrepareHook,
    ) -> Result<Self, RootfsError> {
        home.prepare()?;
        let records: Arc<dyn DiskStore> = store.clone();
        let manager =
            GuestRootfsManager::new(records, home.bases(), home.tmp(), agent).with_hook(hook);
        manager.sweep_orphans()?;
        Ok(DiskStrategy {
            inner: Arc::new(Inner {
                home,
                store,
                manager,
                builds: AtomicUsize::new(0),
            }),
            flights: Flights::default(),
        })
    }

    /// The versioned base-disk cache.
    pub fn manager(&self) -> &GuestRootfsManager {
        &self.inner.manager
    }

    /// How many image disks this strategy has built (cache misses of stage 1).
    pub fn builds(&self) -> usize {
        self.inner.builds.load(Ordering::Relaxed)
    }
}

impl Inner {
    /// Stage 1 and 2 for an image (blocking): the versioned base disk.
    fn base_for(&self, image: &StoredImage) -> Result<PathBuf, RootfsError> {
        let digest = image.record.manifest.to_string();
        let key = GuestRootfsManager::version_key(&digest, self.manager.agent_hash()?);
        if let Some(base) = self.manager.find(&key)? {
            return Ok(base);
        }
        let image_disk = self.image_disk(image)?;
        self.manager.get_or_create(&digest, &image_disk)
    }

    /// Stage 1: the image's own ext4, cached under the name `image-<manifest hex>`.
    fn image_disk(&self, image: &StoredImage) -> Result<PathBuf, RootfsError> {
        let name = GuestRootfsManager::image_disk_name(&image.record.manifest.hex());
        if let Some(path) = self.manager.find(&name)? {
            return Ok(path);
        }
        let blobs: Vec<PathBuf> = image
            .layers
            .iter()
            .map(|l| self.store.blob_path(&l.digest))
            .collect();
        let mut stack = boxlet_ext4::LayerStack::new(boxlet_ext4::LayerLimits::default()).map_err(
            |source| RootfsError::Ext4 {
                what: image.record.reference.clone(),
                source,
            },
        )?;
        for (layer, path) in image.layers.iter().zip(&blobs) {
            let file = self.store.open_blob(&layer.digest)?;
            stack
                .apply(&layer.digest.to_string(), file)
                .map_err(|source| RootfsError::Ext4 {
                    what: format!("{}: layer {}", image.record.reference, path.display()),
                    source,
                })?;
        }
        self.builds.fetch_add(1, Ordering::Relaxed);
        let tree = stack.into_tree();
        let stage = tempfile::Builder::new()
            .prefix("image-")
            .tempdir_in(self.home.tmp())
            .map_err(RootfsError::io("staging in", self.home.tmp()))?;
        let staged = stage.path().join("image.ext4");
        let mut open_layer = |i: usize| -> std::io::Result<Box<dyn std::io::Read>> {
            Ok(Box::new(std::fs::File::open(&blobs[i])?))
        };
        let opts = boxlet_ext4::BuildOptions {
            size: Some(disk_size(&tree)),
            ..boxlet_ext4::BuildOptions::default()
        };
        boxlet_ext4::build_file_with_layers(&tree, &staged, &opts, &mut open_layer).map_err(
            |source| RootfsError::Ext4 {
                what: format!("building the disk of {}", image.record.reference),
                source,
            },
        )?;
        self.manager.hook().check(PrepareStep::ImageBuilt)?;
        self.manager.install_as(BaseDiskKind::Image, &name, &staged)
    }
}

/// The smallest virtual size of a box's root disk: room for the agent and for what boxes
/// write. The image is sparse: unwritten space costs nothing on the host.
pub const MIN_DISK_SIZE: u64 = 4 << 30;

/// The virtual size of an image's disk: its content twice over plus 256 MiB, at least
/// [`MIN_DISK_SIZE`], in whole MiB.
fn disk_size(tree: &boxlet_ext4::Tree) -> u64 {
    let content: u64 = tree
        .nodes
        .iter()
        .map(|n| match &n.kind {
            boxlet_ext4::NodeKind::File(boxlet_ext4::FileData::Host { size, .. })
            | boxlet_ext4::NodeKind::File(boxlet_ext4::FileData::Layer { size, .. }) => *size,
            boxlet_ext4::NodeKind::File(boxlet_ext4::FileData::Bytes(b)) => b.len() as u64,
            _ => 0,
        })
        .sum();
    let want = content
        .saturating_mul(2)
        .saturating_add(256 << 20)
        .max(MIN_DISK_SIZE);
    want.div_ceil(1 << 20) << 20
}

/// Create the box's overlay of `base` (absolute backing path, raw format).
fn create_overlay(overlay: &Path, base: &Path) -> Result<(), RootfsError> {
    let dir = overlay.parent().unwrap_or(overlay);
    std::fs::create_dir_all(dir).map_err(RootfsError::io("creating", dir))?;
    let opts = boxlet_qcow2::CreateOptions::overlay(
        base.display().to_string(),
        boxlet_qcow2::BackingFormat::Raw,
    );
    boxlet_qcow2::create(overlay, &opts).map_err(|source| RootfsError::Qcow2 {
        path: overlay.to_path_buf(),
        source,
    })
}

impl DiskStrategy {
    /// The versioned base of an image: stages 1 and 2, once per image at a time.
    async fn base(&self, image: Arc<StoredImage>) -> Result<PathBuf, RootfsError> {
        let reference = image.record.reference.clone();
        let flight = self.flights.get(&image.record.manifest.to_string());
        let _once = flight.lock().await;
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.base_for(&image))
            .await
            .map_err(|e| RootfsError::Invalid {
                what: reference,
                reason: format!("preparing its disk failed: {e}"),
            })?
    }
}

#[async_trait]
impl RootfsStrategy for DiskStrategy {
    fn name(&self) -> &'static str {
        "disk"
    }

    async fn ensure_cached(&self, image: &str) -> Result<(), RootfsError> {
        let image = Arc::new(StoredImage::open(&self.inner.store, image)?);
        self.base(image).await.map(drop)
    }

    async fn prepare(&self, req: &PrepareRequest) -> Result<GuestRootfs, RootfsError> {
        let image = Arc::new(requested_image(&self.inner.store, req, "Disk")?);
        let base = self.base(image.clone()).await?;
        let overlay = self.inner.home.box_disk(req.box_id);
        create_overlay(&overlay, &base)?;
        self.inner
            .manager
            .hook()
            .check(PrepareStep::OverlayCreated)?;
        Ok(GuestRootfs {
            path: overlay.clone(),
            strategy: Strategy::Disk {
                disk_path: overlay,
                device_path: Some("/dev/vda".into()),
            },
            kernel: None,
            initrd: None,
            env: image_env(&image),
        })
    }

    async fn cleanup(&self, rootfs: &GuestRootfs) -> Result<(), RootfsError> {
        let Strategy::Disk { disk_path, .. } = &rootfs.strategy else {
            return Err(RootfsError::Invalid {
                what: rootfs.path.display().to_string(),
                reason: "not a rootfs of the Disk strategy".into(),
            });
        };
        // boxes/<id>/disks/guest-rootfs.qcow2: the box's directory goes with it.
        remove_box_dir(box_dir_of(&self.inner.home, disk_path)?).await
    }
}
