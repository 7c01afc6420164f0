//! Direct: a directory the user gives, validated, booted as is (virtio-fs). Cleanup
//! never modifies or removes it.

use std::path::PathBuf;

use async_trait::async_trait;

use crate::rootfs::{GuestRootfs, PrepareRequest, RootfsError, RootfsStrategy, Strategy};

/// The Direct strategy for one directory.
#[derive(Clone, Debug)]
pub struct DirectStrategy {
    dir: PathBuf,
}

impl DirectStrategy {
    /// Boxes root at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        DirectStrategy { dir: dir.into() }
    }
}

#[async_trait]
impl RootfsStrategy for DirectStrategy {
    fn name(&self) -> &'static str {
        "direct"
    }

    async fn prepare(&self, _req: &PrepareRequest) -> Result<GuestRootfs, RootfsError> {
        let dir =
            std::fs::canonicalize(&self.dir).map_err(RootfsError::io("opening", &self.dir))?;
        let meta = std::fs::metadata(&dir).map_err(RootfsError::io("reading", &dir))?;
        if !meta.is_dir() {
            return Err(RootfsError::Invalid {
                what: dir.display().to_string(),
                reason: "not a directory".into(),
            });
        }
        if dir == std::path::Path::new("/") {
            return Err(RootfsError::Invalid {
                what: "/".into(),
                reason: "the host's own root cannot be a box's root".into(),
            });
        }
        Ok(GuestRootfs {
            path: dir,
            strategy: Strategy::Direct,
            kernel: None,
            initrd: None,
            env: Vec::new(),
        })
    }

    async fn cleanup(&self, _rootfs: &GuestRootfs) -> Result<(), RootfsError> {
        // The directory is the user's: nothing of it is ours to remove.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> PrepareRequest {
        PrepareRequest {
            image: None,
            box_id: boxlet_cas::BoxId::mint(),
        }
    }

    #[tokio::test]
    async fn a_directory_is_used_as_is_and_left_alone_by_cleanup() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("marker"), "mine").unwrap();
        let s = DirectStrategy::new(dir.path());
        let rootfs = s.prepare(&req()).await.unwrap();
        assert_eq!(rootfs.path, std::fs::canonicalize(dir.path()).unwrap());
        assert_eq!(rootfs.strategy, Strategy::Direct);
        assert!(matches!(
            rootfs.root(),
            crate::vm::Root::Dir {
                exclusive: false,
                ..
            }
        ));
        s.cleanup(&rootfs).await.unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("marker")).unwrap(),
            "mine"
        );
        let json = serde_json::to_string(&rootfs).unwrap();
        assert_eq!(serde_json::from_str::<GuestRootfs>(&json).unwrap(), rootfs);
    }

    #[tokio::test]
    async fn missing_paths_files_and_the_host_root_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        for (path, says) in [
            (dir.path().join("nope"), "nope"),
            (file, "not a directory"),
            (PathBuf::from("/"), "host"),
        ] {
            let err = DirectStrategy::new(&path)
                .prepare(&req())
                .await
                .unwrap_err()
                .to_string();
            assert!(err.contains(says), "{err}");
        }
    }
}
