//! OverlayMount: each layer extracted once into `layers/<diff id hex>/` (whiteouts kept the
//! way overlayfs reads them), mounted as overlayfs lowers under a per-box upper and work
//! directory at `boxes/<id>/rootfs`, booted over virtio-fs. Linux only, and mounting
//! needs CAP_SYS_ADMIN: without it, prepare fails clearly, or falls back to the Extracted
//! strategy when asked to.
//!
//! What the guest writes (the upper and work directories) lives on the box's own file
//! system of its disk quota ([`crate::rootfs::quota`]), unless asked for none.
//!
//! Mounts never leak: cleanup unmounts before it removes anything, and a new strategy
//! unmounts what a crashed runtime left mounted under `boxes/`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use boxlet_cas::Store;
use boxlet_oci::{ApplyLimits, Layer, StoredImage, Whiteouts};

use crate::rootfs::quota::{self, mount_points, unmount_under, DiskQuota};
use crate::rootfs::shared::{
    box_dir_of, cache_apply_options, cache_id_base, has_cap_sys_admin, image_env,
    install_staged_dir, own_top_dir, remove_box_dir, requested_image, Flights,
};
use crate::rootfs::{
    ExtractedStrategy, GuestRootfs, Home, PrepareRequest, RootfsError, RootfsStrategy, Strategy,
};

/// The OverlayMount strategy (see the module documentation).
#[derive(Debug)]
pub struct OverlayStrategy {
    inner: Arc<Inner>,
    flights: Flights,
    fallback: Option<ExtractedStrategy>,
    quota: DiskQuota,
}

#[derive(Debug)]
struct Inner {
    home: Home,
    store: Arc<Store>,
    extractions: AtomicUsize,
    /// The bounds of one image, all its layers together (the ext4 builder's).
    limits: ApplyLimits,
}

/// What an unpacked layer holds, as its application counted it: stored beside it as
/// `layers/<hex>.usage` ("BYTES ENTRIES"), so an image's bounds hold across layers
/// extracted for other images.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Usage {
    bytes: u64,
    entries: u64,
}

impl Usage {
    fn report(&self) -> boxlet_oci::ApplyReport {
        boxlet_oci::ApplyReport {
            bytes: self.bytes,
            files: self.entries,
            ..Default::default()
        }
    }
}

impl OverlayStrategy {
    /// Boxes of `home` from images in `store`. With `fallback_to_extracted`, a host where
    /// mounting is not allowed gets the Extracted strategy instead of an error. Unmounts
    /// what a crashed runtime left mounted under `boxes/`.
    pub fn new(
        home: Home,
        store: Arc<Store>,
        fallback_to_extracted: bool,
    ) -> Result<Self, RootfsError> {
        home.prepare()?;
        std::fs::create_dir_all(home.layers())
            .map_err(RootfsError::io("creating", home.layers()))?;
        let boxes = std::fs::canonicalize(home.boxes())
            .map_err(RootfsError::io("opening", home.boxes()))?;
        if mount_points().iter().any(|p| p.starts_with(&boxes)) {
            tracing::info!(boxes = %boxes.display(), "unmounting box file systems left mounted by an earlier runtime");
            unmount_under(&boxes)?;
        }
        let fallback = if fallback_to_extracted {
            Some(ExtractedStrategy::new(home.clone(), store.clone())?)
        } else {
            None
        };
        Ok(OverlayStrategy {
            inner: Arc::new(Inner {
                home,
                store,
                extractions: AtomicUsize::new(0),
                limits: ApplyLimits::default(),
            }),
            flights: Flights::default(),
            fallback,
            quota: DiskQuota::Default,
        })
    }

    /// Boxes with `quota` on what their guests write (the default:
    /// [`quota::DEFAULT_QUOTA`]); the fallback, if any, gets it too.
    pub fn with_disk_quota(mut self, quota: DiskQuota) -> Self {
        self.quota = quota;
        self.fallback = self.fallback.map(|f| f.with_disk_quota(quota));
        self
    }

    /// Bounds on each image (default: the ext4 builder's, 64 GiB and 4 Mi entries, for
    /// all of an image's layers together).
    pub fn with_image_limits(mut self, limits: ApplyLimits) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("set before the strategy is shared")
            .limits = limits;
        self
    }

    /// The directories of `image`'s layers, bottom first, extracting what is missing:
    /// within the image's bounds, all layers together.
    async fn image_layers(&self, image: &StoredImage) -> Result<Vec<PathBuf>, RootfsError> {
        let mut budget = self.inner.limits;
        let mut dirs = Vec::with_capacity(image.layers.len());
        for layer in &image.layers {
            let (dir, usage) = self.layer_dir(layer, budget).await?;
            if usage.bytes > budget.max_bytes || usage.entries > budget.max_entries {
                return Err(RootfsError::Invalid {
                    what: image.record.reference.clone(),
                    reason: format!(
                        "its layers together pass the bounds of an image ({} bytes, {} \
                         entries) at layer {}",
                        self.inner.limits.max_bytes, self.inner.limits.max_entries, layer.digest
                    ),
                });
            }
            budget = budget.after(&usage.report());
            dirs.push(dir);
        }
        Ok(dirs)
    }

    /// How many layers this strategy has extracted (cache misses).
    pub fn extractions(&self) -> usize {
        self.inner.extractions.load(Ordering::Relaxed)
    }

    async fn layer_dir(
        &self,
        layer: &Layer,
        limits: ApplyLimits,
    ) -> Result<(PathBuf, Usage), RootfsError> {
        let hex = layer.diff_id.hex();
        let flight = self.flights.get(&hex);
        let _once = flight.lock().await;
        let (inner, layer) = (self.inner.clone(), layer.clone());
        tokio::task::spawn_blocking(move || inner.ensure_layer(&layer, limits))
            .await
            .map_err(|e| RootfsError::Invalid {
                what: hex,
                reason: format!("extracting the layer failed: {e}"),
            })?
    }
}

impl Inner {
    /// The layer's directory under `layers/` (extracted, staged and renamed whole, when
    /// missing).
    fn ensure_layer(
        &self,
        layer: &Layer,
        limits: ApplyLimits,
    ) -> Result<(PathBuf, Usage), RootfsError> {
        let dir = self.home.layers().join(layer.diff_id.hex());
        let usage_file = dir.with_extension("usage");
        if dir.is_dir() {
            let recorded = std::fs::read_to_string(&usage_file).ok().and_then(|t| {
                let (b, e) = t.trim().split_once(' ')?;
                Some(Usage {
                    bytes: b.parse().ok()?,
                    entries: e.parse().ok()?,
                })
            });
            // Layers unpacked before usage was recorded: counted once now.
            let usage = match recorded {
                Some(u) => u,
                None => {
                    let u = count_tree(&dir);
                    write_usage(&usage_file, u)?;
                    u
                }
            };
            return Ok((dir, usage));
        }
        let stage = tempfile::Builder::new()
            .prefix("layer-")
            .tempdir_in(self.home.tmp())
            .map_err(RootfsError::io("staging in", self.home.tmp()))?;
        let staged = stage.path().join("tree");
        std::fs::create_dir(&staged).map_err(RootfsError::io("creating", &staged))?;
        let mut opts = cache_apply_options(Whiteouts::Overlay);
        opts.limits = limits;
        let report = boxlet_oci::apply_stored_layer(&self.store, layer, &staged, &opts)?;
        self.extractions.fetch_add(1, Ordering::Relaxed);
        let usage = Usage {
            bytes: report.bytes,
            entries: report.entries(),
        };
        write_usage(&usage_file, usage)?;
        install_staged_dir(&staged, &dir)?;
        Ok((dir, usage))
    }
}

/// Record `usage` at `path` (written aside and renamed: whole or absent).
fn write_usage(path: &std::path::Path, usage: Usage) -> Result<(), RootfsError> {
    let tmp = path.with_extension("usage.tmp");
    std::fs::write(&tmp, format!("{} {}\n", usage.bytes, usage.entries))
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(RootfsError::io("recording the usage of", path))
}

/// File bytes and entries under `dir` (on its file system; links not followed).
fn count_tree(dir: &std::path::Path) -> Usage {
    let mut usage = Usage::default();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            usage.entries += 1;
            let Ok(m) = e.path().symlink_metadata() else {
                continue;
            };
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() {
                usage.bytes += m.len();
            }
        }
    }
    usage
}

#[async_trait]
impl RootfsStrategy for OverlayStrategy {
    fn name(&self) -> &'static str {
        "overlay"
    }

    async fn ensure_cached(&self, image: &str) -> Result<(), RootfsError> {
        let image = StoredImage::open(&self.inner.store, image)?;
        self.image_layers(&image).await.map(drop)
    }

    async fn prepare(&self, req: &PrepareRequest) -> Result<GuestRootfs, RootfsError> {
        let image = requested_image(&self.inner.store, req, "OverlayMount")?;
        let reference = image.record.reference.as_str();
        if !has_cap_sys_admin() {
            if let Some(fallback) = &self.fallback {
                tracing::warn!(
                    "no CAP_SYS_ADMIN to mount overlayfs: falling back to the Extracted strategy"
                );
                return fallback.prepare(req).await;
            }
            return Err(RootfsError::Invalid {
                what: reference.to_string(),
                reason: "the OverlayMount strategy needs CAP_SYS_ADMIN (to mount overlayfs and \
                         write trusted.* xattrs); run as root, or use the Extracted strategy"
                    .into(),
            });
        }
        // overlayfs takes the top layer first.
        let mut lower = self.image_layers(&image).await?;
        lower.reverse();
        let box_dir = self.inner.home.box_dir(req.box_id);
        // What the guest writes goes to the upper: on the box's own file system when it
        // has a quota.
        let writes = match self.quota.size_for(0) {
            Some(bytes) => {
                let (image, rw) = (box_dir.join("quota.ext4"), box_dir.join("rw"));
                std::fs::create_dir_all(&box_dir).map_err(RootfsError::io("creating", &box_dir))?;
                let made =
                    tokio::task::spawn_blocking(move || quota::mount_new(&image, &rw, bytes, 0))
                        .await
                        .map_err(|e| RootfsError::Invalid {
                            what: reference.to_string(),
                            reason: format!("making the box's file system failed: {e}"),
                        })?;
                if let Err(e) = made {
                    quota::discard_box_dir(&box_dir);
                    return Err(e);
                }
                box_dir.join("rw")
            }
            None => box_dir.clone(),
        };
        let (upper, work, target) = (
            writes.join("upper"),
            writes.join("work"),
            box_dir.join("rootfs"),
        );
        for d in [&upper, &work, &target] {
            std::fs::create_dir_all(d).map_err(RootfsError::io("creating", d))?;
        }
        // The merged root's owner is the upper's: the image's root, as the layers hold it.
        own_top_dir(&upper)?;
        let lowers: Vec<String> = lower.iter().map(|p| p.display().to_string()).collect();
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lowers.join(":"),
            upper.display(),
            work.display()
        );
        if data.len() >= 4096 {
            return Err(RootfsError::Invalid {
                what: reference.to_string(),
                reason: format!(
                    "{} layers make overlayfs options longer than a page",
                    lowers.len()
                ),
            });
        }
        let data_c = std::ffi::CString::new(data.clone()).map_err(|_| RootfsError::Invalid {
            what: reference.to_string(),
            reason: "a layer path holds a NUL byte".into(),
        })?;
        let mounted = rustix::mount::mount(
            "overlay",
            &target,
            "overlay",
            // Whatever the layers or the guest leave in it: inert on the host.
            rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV,
            Some(data_c.as_c_str()),
        );
        if let Err(e) = mounted {
            quota::discard_box_dir(&box_dir);
            if e == rustix::io::Errno::PERM {
                if let Some(fallback) = &self.fallback {
                    tracing::warn!("no CAP_SYS_ADMIN to mount overlayfs: falling back to the Extracted strategy");
                    return fallback.prepare(req).await;
                }
            }
            let hint = if e == rustix::io::Errno::PERM {
                " (mounting overlayfs needs CAP_SYS_ADMIN; or use the Extracted strategy)"
            } else {
                ""
            };
            return Err(RootfsError::Io {
                op: "mounting overlayfs on",
                path: target,
                source: std::io::Error::other(format!("{e}{hint}")),
            });
        }
        Ok(GuestRootfs {
            path: target,
            strategy: Strategy::OverlayMount {
                lower,
                upper,
                work,
                id_base: cache_id_base(),
            },
            kernel: None,
            initrd: None,
            env: image_env(&image),
        })
    }

    async fn cleanup(&self, rootfs: &GuestRootfs) -> Result<(), RootfsError> {
        if let (Strategy::Extracted { .. }, Some(f)) = (&rootfs.strategy, &self.fallback) {
            return f.cleanup(rootfs).await;
        }
        let dir = box_dir_of(&self.inner.home, &rootfs.path)?;
        // Never remove through a mount: the overlay, then the box's file system.
        unmount_under(&dir)?;
        remove_box_dir(dir).await
    }
}
