//! The versioned guest rootfs cache: an image's ext4 with this boxlet's agent injected,
//! installed once per (image, agent) pair under its version key and shared by every box
//! (each box writes to its own qcow2 overlay of it).
//!
//! - Version key: `{image digest[..12]}-{agent sha256[..12]}` (`sha256:` stripped).
//! - The agent's hash comes from build time (`BOXLET_GUEST_HASH`) when the build embeds
//!   it, else from hashing the agent once per manager; when both exist and differ, the
//!   build is inconsistent and that is an error, not a silent rebuild.
//! - Install is staged in `tmp/`, renamed into `bases/<id>.ext4`, then recorded under
//!   the global source with the version key as its name. A conflicting record means
//!   another runtime won the race: ours is removed and the winner's returned.
//! - `find` drops records whose file is gone.
//! - GC removes entries of other agent versions, unless a box's overlay
//!   (`boxes/*/disks/guest-rootfs.qcow2`) names them as its backing file.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use boxlet_cas::{unix_now, BaseDisk, BaseDiskId, BaseDiskKind, DiskInfo};

use crate::disk_store::{DiskStore, DiskStoreError};
use crate::rootfs::copy::copy_file;
use crate::rootfs::{PrepareHook, PrepareStep, RootfsError};

/// The source of shared (not per-box) base disks.
pub const GLOBAL_SOURCE: &str = "__global__";

/// Where the agent lives in a guest's root.
pub const AGENT_IN_GUEST: &str = "/boxlet/bin/boxlet-guest";

/// The guest agent binary to inject, and the hash it had when boxlet was built.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentBinary {
    /// The static agent.
    pub path: PathBuf,
    /// Its sha256 (hex) embedded at build time, when the build embedded one.
    pub build_hash: Option<String>,
}

impl AgentBinary {
    /// The agent at `path`, with the build-time hash of this build (if any).
    pub fn new(path: impl Into<PathBuf>) -> AgentBinary {
        AgentBinary {
            path: path.into(),
            build_hash: option_env!("BOXLET_GUEST_HASH").map(str::to_string),
        }
    }
}

/// The versioned base-disk cache (see the module documentation).
#[derive(Debug)]
pub struct GuestRootfsManager {
    store: Arc<dyn DiskStore>,
    bases_dir: PathBuf,
    temp_dir: PathBuf,
    agent: AgentBinary,
    agent_hash: OnceLock<Result<String, String>>,
    hook: PrepareHook,
}

fn sha256_file(path: &Path) -> Result<String, RootfsError> {
    let mut file = std::fs::File::open(path).map_err(RootfsError::io("opening", path))?;
    let mut hasher = boxlet_cas::Hasher::new(boxlet_cas::Algorithm::Sha256);
    std::io::copy(&mut file, &mut hasher).map_err(RootfsError::io("reading", path))?;
    Ok(hasher.finish().hex())
}

impl GuestRootfsManager {
    /// A manager over `store`, installing into `bases_dir`, staging in `temp_dir` (same
    /// file system).
    pub fn new(
        store: Arc<dyn DiskStore>,
        bases_dir: impl Into<PathBuf>,
        temp_dir: impl Into<PathBuf>,
        agent: AgentBinary,
    ) -> Self {
        GuestRootfsManager {
            store,
            bases_dir: bases_dir.into(),
            temp_dir: temp_dir.into(),
            agent,
            agent_hash: OnceLock::new(),
            hook: PrepareHook::default(),
        }
    }

    /// With a fault hook at every step of a prepare (tests and crash drills).
    pub fn with_hook(mut self, hook: PrepareHook) -> Self {
        self.hook = hook;
        self
    }

    pub(crate) fn hook(&self) -> &PrepareHook {
        &self.hook
    }

    /// `{digest[..12]}-{agent[..12]}`, with a `sha256:` prefix stripped.
    pub fn version_key(digest: &str, agent_hash: &str) -> String {
        let d = Self::version_prefix(digest);
        let g = agent_hash.get(..12).unwrap_or(agent_hash);
        format!("{d}-{g}")
    }

    /// The image part of a version key: the digest's first 12 characters, a `sha256:`
    /// prefix stripped first.
    pub fn version_prefix(digest: &str) -> &str {
        let d = digest.strip_prefix("sha256:").unwrap_or(digest);
        d.get(..12).unwrap_or(d)
    }

    /// The agent's hash: from build time when embedded, else computed once.
    pub fn agent_hash(&self) -> Result<&str, RootfsError> {
        let cached = self
            .agent_hash
            .get_or_init(|| match &self.agent.build_hash {
                Some(h) => Ok(h.clone()),
                None => sha256_file(&self.agent.path).map_err(|e| e.to_string()),
            });
        cached.as_deref().map_err(|msg| RootfsError::Invalid {
            what: self.agent.path.display().to_string(),
            reason: msg.clone(),
        })
    }

    /// The installed base for `version_key`, if its record exists and its file too (a
    /// record whose file is gone is dropped).
    pub fn find(&self, version_key: &str) -> Result<Option<PathBuf>, RootfsError> {
        let Some(record) = self.store.find_by_name(GLOBAL_SOURCE, version_key)? else {
            return Ok(None);
        };
        let path = PathBuf::from(&record.disk_info.base_path);
        if path.is_file() {
            return Ok(Some(path));
        }
        tracing::warn!(version_key, path = %path.display(), "a base disk record names a missing file: dropping it");
        self.store.delete(record.id)?;
        Ok(None)
    }

    /// The versioned base for the image `digest`, built from its ext4 `image_disk` (copied
    /// without copying bytes where possible, the agent injected) when not cached.
    pub fn get_or_create(&self, digest: &str, image_disk: &Path) -> Result<PathBuf, RootfsError> {
        let expected = Self::version_key(digest, self.agent_hash()?);
        if let Some(path) = self.find(&expected)? {
            return Ok(path);
        }
        self.build_and_install(digest, image_disk, &expected)
    }

    fn build_and_install(
        &self,
        digest: &str,
        image_disk: &Path,
        expected: &str,
    ) -> Result<PathBuf, RootfsError> {
        let actual_hash = sha256_file(&self.agent.path)?;
        let actual = Self::version_key(digest, &actual_hash);
        if actual != expected {
            if let Some(build) = &self.agent.build_hash {
                return Err(RootfsError::AgentMismatch {
                    path: self.agent.path.clone(),
                    build: build.clone(),
                    actual: actual_hash,
                });
            }
            if let Some(path) = self.find(&actual)? {
                return Ok(path);
            }
        }
        std::fs::create_dir_all(&self.temp_dir)
            .map_err(RootfsError::io("creating", &self.temp_dir))?;
        let stage = tempfile::Builder::new()
            .prefix("rootfs-")
            .tempdir_in(&self.temp_dir)
            .map_err(RootfsError::io("staging in", &self.temp_dir))?;
        let staged = stage.path().join("guest-rootfs.ext4");
        let method = copy_file(image_disk, &staged)?;
        let opts = boxlet_ext4::InjectOptions {
            mode: 0o755,
            ..Default::default()
        };
        boxlet_ext4::inject(&staged, &self.agent.path, AGENT_IN_GUEST, &opts).map_err(
            |source| RootfsError::Ext4 {
                what: format!("injecting the agent into {}", staged.display()),
                source,
            },
        )?;
        std::fs::File::open(&staged)
            .and_then(|f| f.sync_all())
            .map_err(RootfsError::io("syncing", &staged))?;
        tracing::debug!(?method, version_key = actual, "staged a guest rootfs");
        self.hook.check(PrepareStep::BaseStaged)?;
        self.install(&actual, &staged)
    }

    /// Install a staged base under `version_key`: rename into `bases/<id>.ext4`, then
    /// record it. When another runtime recorded one first, its base is returned and the
    /// staged file removed.
    pub fn install(&self, version_key: &str, staged: &Path) -> Result<PathBuf, RootfsError> {
        self.install_as(BaseDiskKind::Rootfs, version_key, staged)
    }

    /// [`install`](Self::install) for a base disk of any kind, named `version_key`.
    pub(crate) fn install_as(
        &self,
        kind: BaseDiskKind,
        version_key: &str,
        staged: &Path,
    ) -> Result<PathBuf, RootfsError> {
        if let Some(path) = self.find(version_key)? {
            let _ = std::fs::remove_file(staged);
            return Ok(path);
        }
        std::fs::create_dir_all(&self.bases_dir)
            .map_err(RootfsError::io("creating", &self.bases_dir))?;
        let id = BaseDiskId::mint();
        let target = self.bases_dir.join(format!("{id}.ext4"));
        std::fs::rename(staged, &target).map_err(RootfsError::io("installing", &target))?;
        if let Ok(dir) = std::fs::File::open(&self.bases_dir) {
            let _ = dir.sync_all();
        }
        let image = kind == BaseDiskKind::Image;
        self.hook.check(if image {
            PrepareStep::ImageInstalled
        } else {
            PrepareStep::BaseInstalled
        })?;
        let size_bytes = std::fs::metadata(&target).map_or(0, |m| m.len());
        let record = BaseDisk {
            id,
            source_box_id: GLOBAL_SOURCE.to_string(),
            name: Some(version_key.to_string()),
            kind,
            disk_info: DiskInfo {
                base_path: target.display().to_string(),
                container_disk_bytes: 0,
                size_bytes,
            },
            created_at: unix_now() as i64,
            blob: None,
        };
        match self.store.insert(&record) {
            Ok(()) => {
                self.hook.check(if image {
                    PrepareStep::ImageRecorded
                } else {
                    PrepareStep::BaseRecorded
                })?;
                Ok(target)
            }
            Err(DiskStoreError::Conflict(what)) => {
                tracing::info!(version_key, %what, "another runtime installed this base first");
                let _ = std::fs::remove_file(&target);
                self.find(version_key)?.ok_or_else(|| RootfsError::Invalid {
                    what: version_key.to_string(),
                    reason: format!("its record conflicts ({what}) but no installed base is found"),
                })
            }
            Err(e) => {
                let _ = std::fs::remove_file(&target);
                Err(e.into())
            }
        }
    }

    /// Remove files in `bases/` that no record names (left by a crash between the rename
    /// and the record). Returns how many went.
    pub fn sweep_orphans(&self) -> Result<usize, RootfsError> {
        let Ok(entries) = std::fs::read_dir(&self.bases_dir) else {
            return Ok(0);
        };
        let known: HashSet<PathBuf> = [BaseDiskKind::Rootfs, BaseDiskKind::Image]
            .into_iter()
            .map(|k| self.store.list_by_source(GLOBAL_SOURCE, Some(k)))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .flatten()
            .map(|d| PathBuf::from(d.disk_info.base_path))
            .collect();
        let mut removed = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if !known.contains(&path) && entry.file_type().is_ok_and(|t| t.is_file()) {
                std::fs::remove_file(&path).map_err(RootfsError::io("removing", &path))?;
                tracing::info!(path = %path.display(), "removed a base disk no record names");
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Remove bases of other agent versions that no box's overlay names. Returns how many
    /// went.
    pub fn gc(&self, boxes_dir: &Path) -> Result<usize, RootfsError> {
        let hash = self.agent_hash()?;
        let suffix = format!("-{}", hash.get(..12).unwrap_or(hash));
        self.gc_inner(boxes_dir, &suffix)
    }

    fn gc_inner(&self, boxes_dir: &Path, current_suffix: &str) -> Result<usize, RootfsError> {
        let records = self
            .store
            .list_by_source(GLOBAL_SOURCE, Some(BaseDiskKind::Rootfs))?;
        if records.is_empty() {
            return Ok(0);
        }
        let Some(referenced) = referenced_bases(boxes_dir) else {
            tracing::warn!("GC of base disks skipped: a box's overlay cannot be read");
            return Ok(0);
        };
        let mut removed = 0;
        for record in records {
            let path = PathBuf::from(&record.disk_info.base_path);
            let current = record
                .name
                .as_deref()
                .is_some_and(|n| n.ends_with(current_suffix));
            if current || referenced.contains(&path) {
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), "GC could not remove a stale base: {e}");
                    continue;
                }
            }
            if self.store.delete(record.id)? {
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// The backing files named by the boxes' overlays (`boxes/*/disks/guest-rootfs.qcow2`);
/// `None` when an overlay exists but cannot be read (then nothing may be collected).
pub(crate) fn referenced_bases(boxes_dir: &Path) -> Option<HashSet<PathBuf>> {
    let mut referenced = HashSet::new();
    let Ok(entries) = std::fs::read_dir(boxes_dir) else {
        return Some(referenced);
    };
    for entry in entries.flatten() {
        let overlay = entry.path().join("disks").join("guest-rootfs.qcow2");
        if !overlay.exists() {
            continue;
        }
        match boxlet_qcow2::read_backing_file_path(&overlay) {
            Ok(Some(backing)) => {
                referenced.insert(PathBuf::from(backing));
            }
            Ok(None) => {}
            Err(err) => {
                tracing::warn!(overlay = %overlay.display(), "cannot read a box's backing file: {err}");
                return None;
            }
        }
    }
    Some(referenced)
}

#[cfg(test)]
mod tests;
