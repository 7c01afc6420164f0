//! OverlayMount: each layer extracted once into `layers/<diff id hex>/` (whiteouts kept the
//! way overlayfs reads them), mounted as overlayfs lowers under a per-box upper and work
//! directory at `boxes/<id>/rootfs`, booted over virtio-fs. Linux only, and mounting
//! needs CAP_SYS_ADMIN: without it, prepare fails clearly, or falls back to the Extracted
//! strategy when asked to.
//!
//! Mounts never leak: cleanup unmounts before it removes anything, and a new strategy
//! unmounts what a crashed runtime left mounted under `boxes/`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use boxlet_cas::Store;
use boxlet_oci::{Layer, StoredImage, Whiteouts};

use crate::rootfs::shared::{
    box_dir_of, cache_apply_options, cache_id_base, image_env, install_staged_dir, own_top_dir,
    remove_box_dir, requested_image, Flights,
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
}

#[derive(Debug)]
struct Inner {
    home: Home,
    store: Arc<Store>,
    extractions: AtomicUsize,
}

/// The mount points listed in `/proc/self/mountinfo` (octal escapes decoded).
fn mount_points() -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| {
            let mut out = Vec::new();
            let b = p.as_bytes();
            let octal = |c: u8| (b'0'..=b'7').contains(&c).then(|| u32::from(c - b'0'));
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'\\' && i + 3 < b.len() {
                    if let (Some(x), Some(y), Some(z)) =
                        (octal(b[i + 1]), octal(b[i + 2]), octal(b[i + 3]))
                    {
                        out.push((x << 6 | y << 3 | z) as u8);
                        i += 4;
                        continue;
                    }
                }
                out.push(b[i]);
                i += 1;
            }
            PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
        })
        .collect()
}

/// Whether this process has CAP_SYS_ADMIN in its effective set (from /proc/self/status).
fn has_cap_sys_admin() -> bool {
    const CAP_SYS_ADMIN: u32 = 21;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

/// Unmount `target` (lazily when it is busy).
fn unmount(target: &Path) -> Result<(), RootfsError> {
    use rustix::mount::{unmount as umount, UnmountFlags};
    match umount(target, UnmountFlags::empty()) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::BUSY) => umount(target, UnmountFlags::DETACH)
            .map_err(|e| RootfsError::io("unmounting", target)(e.into())),
        Err(e) => Err(RootfsError::io("unmounting", target)(e.into())),
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
        for point in mount_points().into_iter().filter(|p| p.starts_with(&boxes)) {
            tracing::info!(mount = %point.display(), "unmounting a box rootfs left mounted by an earlier runtime");
            unmount(&point)?;
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
            }),
            flights: Flights::default(),
            fallback,
        })
    }

    /// How many layers this strategy has extracted (cache misses).
    pub fn extractions(&self) -> usize {
        self.inner.extractions.load(Ordering::Relaxed)
    }

    async fn layer_dir(&self, layer: &Layer) -> Result<PathBuf, RootfsError> {
        let hex = layer.diff_id.hex();
        let flight = self.flights.get(&hex);
        let _once = flight.lock().await;
        let (inner, layer) = (self.inner.clone(), layer.clone());
        tokio::task::spawn_blocking(move || inner.ensure_layer(&layer))
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
    fn ensure_layer(&self, layer: &Layer) -> Result<PathBuf, RootfsError> {
        let dir = self.home.layers().join(layer.diff_id.hex());
        if dir.is_dir() {
            return Ok(dir);
        }
        let stage = tempfile::Builder::new()
            .prefix("layer-")
            .tempdir_in(self.home.tmp())
            .map_err(RootfsError::io("staging in", self.home.tmp()))?;
        let staged = stage.path().join("tree");
        std::fs::create_dir(&staged).map_err(RootfsError::io("creating", &staged))?;
        let opts = cache_apply_options(Whiteouts::Overlay);
        boxlet_oci::apply_stored_layer(&self.store, layer, &staged, &opts)?;
        self.extractions.fetch_add(1, Ordering::Relaxed);
        install_staged_dir(&staged, &dir)?;
        Ok(dir)
    }
}

#[async_trait]
impl RootfsStrategy for OverlayStrategy {
    fn name(&self) -> &'static str {
        "overlay"
    }

    async fn ensure_cached(&self, image: &str) -> Result<(), RootfsError> {
        let image = StoredImage::open(&self.inner.store, image)?;
        for layer in &image.layers {
            self.layer_dir(layer).await?;
        }
        Ok(())
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
        let mut lower = Vec::with_capacity(image.layers.len());
        for layer in image.layers.iter().rev() {
            lower.push(self.layer_dir(layer).await?);
        }
        let box_dir = self.inner.home.box_dir(req.box_id);
        let (upper, work, target) = (
            box_dir.join("upper"),
            box_dir.join("work"),
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
            let _ = std::fs::remove_dir_all(&box_dir);
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
        let target = rootfs.path.clone();
        let points = mount_points();
        let canonical = std::fs::canonicalize(&target).unwrap_or(target.clone());
        if points.contains(&canonical) {
            unmount(&canonical)?;
        }
        // Never remove through a mount: only once nothing is mounted under the box.
        if mount_points().iter().any(|p| p.starts_with(&canonical)) {
            return Err(RootfsError::Invalid {
                what: target.display().to_string(),
                reason: "still mounted after unmounting; not removing it".into(),
            });
        }
        remove_box_dir(dir).await
    }
}
