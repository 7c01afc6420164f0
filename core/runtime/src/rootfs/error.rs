//! Errors of rootfs preparation, each naming the file, image or record at fault.

use std::io;
use std::path::PathBuf;

use crate::disk_store::DiskStoreError;

/// An error preparing or cleaning up a guest rootfs.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RootfsError {
    /// A file-system operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The input is unusable (named, with why).
    #[error("{what}: {reason}")]
    Invalid {
        /// The input.
        what: String,
        /// Why.
        reason: String,
    },
    /// The agent binary is not the one this boxlet was built with.
    #[error(
        "guest agent hash mismatch: boxlet was built with agent {build} but {} hashes to {actual}; rebuild boxlet, or use the agent it was built with",
        path.display()
    )]
    AgentMismatch {
        /// The agent found.
        path: PathBuf,
        /// The hash embedded at build time.
        build: String,
        /// The file's hash.
        actual: String,
    },
    /// Another process runs on this home.
    #[error("{} is in use by process {pid} (one boxlet runtime per home)", path.display())]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// The holder's pid, as it wrote it.
        pid: String,
    },
    /// The base-disk records failed.
    #[error(transparent)]
    Store(#[from] DiskStoreError),
    /// The content store failed.
    #[error(transparent)]
    Cas(#[from] boxlet_cas::CasError),
    /// Building or injecting into an ext4 image failed.
    #[error("{what}: {source}")]
    Ext4 {
        /// The image.
        what: String,
        /// ext4's error.
        source: boxlet_ext4::Error,
    },
    /// Creating a qcow2 overlay failed.
    #[error("{}: {source}", path.display())]
    Qcow2 {
        /// The overlay.
        path: PathBuf,
        /// qcow2's error.
        source: boxlet_qcow2::Error,
    },
    /// The image could not be read or applied.
    #[error(transparent)]
    Oci(#[from] boxlet_oci::OciError),
    /// An injected fault (tests and crash drills only).
    #[error("injected fault at {0:?}")]
    Fault(crate::rootfs::PrepareStep),
}

impl RootfsError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| RootfsError::Io { op, path, source }
    }
}
