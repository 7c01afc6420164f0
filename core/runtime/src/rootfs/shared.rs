//! What the image strategies share: finding the request's image, single flight per cache
//! key, and removing a box's directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use boxlet_cas::Store;
use boxlet_oci::{ApplyLimits, ApplyOptions, DevicePolicy, StoredImage, Whiteouts, XattrPolicy};

use crate::process::GUEST_XATTR_PREFIX;
use crate::rootfs::{Home, PrepareRequest, RootfsError, CACHE_IDS};

/// The host id of image id 0 in the directory caches: shifted into [`CACHE_IDS`] when
/// boxlet runs as root (it can chown); without root everything is the caller's and set-id
/// bits are dropped.
pub(crate) fn cache_id_base() -> Option<u32> {
    rustix::process::geteuid()
        .is_root()
        .then(|| CACHE_IDS.base())
}

/// How the directory strategies apply layers into the host's caches: no device nodes
/// (the guest's /dev is its own devtmpfs), image ids shifted ([`cache_id_base`]), image
/// xattrs under [`GUEST_XATTR_PREFIX`]. Nothing in a cache is a usable device, a
/// set-ID-root file or a file capability on the host.
pub(crate) fn cache_apply_options(whiteouts: Whiteouts) -> ApplyOptions {
    let shifted = cache_id_base().is_some();
    ApplyOptions {
        limits: ApplyLimits::default(),
        devices: DevicePolicy::Skip,
        owners: shifted,
        id_shift: shifted.then_some(CACHE_IDS),
        xattrs: XattrPolicy::Prefixed(GUEST_XATTR_PREFIX),
        whiteouts,
    }
}

/// Give the top directory of a cache tree, which boxlet made (the image may not describe
/// it), to the image's root in the shifted range, so the guest's root owns its `/`.
pub(crate) fn own_top_dir(dir: &Path) -> Result<(), RootfsError> {
    use std::os::unix::fs::MetadataExt;
    let Some(base) = cache_id_base() else {
        return Ok(());
    };
    let meta = std::fs::metadata(dir).map_err(RootfsError::io("reading", dir))?;
    if !CACHE_IDS.holds(meta.uid()) {
        std::os::unix::fs::chown(dir, Some(base), Some(base))
            .map_err(RootfsError::io("giving the image's root", dir))?;
    }
    Ok(())
}

/// The stored image a request names; `strategy` names the strategy in the error when
/// there is none.
pub(crate) fn requested_image(
    store: &Store,
    req: &PrepareRequest,
    strategy: &str,
) -> Result<StoredImage, RootfsError> {
    let reference = req.image.as_deref().ok_or_else(|| RootfsError::Invalid {
        what: format!("box {}", req.box_id),
        reason: format!("the {strategy} strategy needs an image"),
    })?;
    Ok(StoredImage::open(store, reference)?)
}

/// The image's environment from its config (`KEY=VALUE` entries).
pub(crate) fn image_env(image: &StoredImage) -> Vec<(String, String)> {
    image
        .config
        .config()
        .as_ref()
        .and_then(|c| c.env().clone())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// One lock per cache key: concurrent builders of one key wait for the first, then find
/// its result in the cache.
#[derive(Debug, Default)]
pub(crate) struct Flights(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

impl Flights {
    pub(crate) fn get(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        map.entry(key.to_string()).or_default().clone()
    }
}

/// The box directory `boxes/<id>` that holds `path` (its rootfs or disk), checked to be
/// one of `home`'s.
pub(crate) fn box_dir_of(home: &Home, path: &Path) -> Result<PathBuf, RootfsError> {
    let boxes = home.boxes();
    let mut dir = path;
    while let Some(parent) = dir.parent() {
        if parent == boxes {
            return Ok(dir.to_path_buf());
        }
        dir = parent;
    }
    Err(RootfsError::Invalid {
        what: path.display().to_string(),
        reason: format!("not a box's under {}", boxes.display()),
    })
}

/// Install the directory `staged` (built in `tmp/`) as the cache entry `target` by a
/// rename, and sync `target`'s parent. When another runtime installed `target` first,
/// ours is dropped and theirs stays.
pub(crate) fn install_staged_dir(staged: &Path, target: &Path) -> Result<(), RootfsError> {
    if let Err(e) = std::fs::rename(staged, target) {
        let _ = std::fs::remove_dir_all(staged);
        if !target.is_dir() {
            return Err(RootfsError::io("installing", target)(e));
        }
    }
    if let Some(parent) = target.parent() {
        if let Ok(dir) = std::fs::File::open(parent) {
            let _ = dir.sync_all();
        }
    }
    Ok(())
}

/// Remove a box's directory (on a blocking thread); absent is fine.
pub(crate) async fn remove_box_dir(dir: PathBuf) -> Result<(), RootfsError> {
    let shown = dir.display().to_string();
    tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(RootfsError::io("removing", &dir)(e))
        }
        _ => Ok(()),
    })
    .await
    .map_err(|e| RootfsError::Invalid {
        what: shown,
        reason: format!("removing it failed: {e}"),
    })?
}

/// Whether this process may mount (CAP_SYS_ADMIN in its effective set).
pub(crate) fn has_cap_sys_admin() -> bool {
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
