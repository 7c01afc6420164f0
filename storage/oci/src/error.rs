//! Errors of image import, pull and unpack: each names the image, blob or file at fault.

use std::io;
use std::path::PathBuf;

use boxlet_cas::{CasError, Digest};

use crate::apply::ApplyError;

/// An error of the OCI image code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OciError {
    /// An image reference that does not parse.
    #[error("{input:?} is not an image reference: {reason}")]
    Reference {
        /// The reference given.
        input: String,
        /// Why.
        reason: String,
    },
    /// The registry refused or failed a request.
    #[error("registry, pulling {reference}: {source}")]
    Registry {
        /// The image.
        reference: String,
        /// The client's error.
        source: Box<oci_client::errors::OciDistributionError>,
    },
    /// A manifest, index or configuration that is malformed or breaks the spec.
    #[error("{what}: {reason}")]
    Malformed {
        /// The document (a digest, or a file of an image layout).
        what: String,
        /// What is wrong.
        reason: String,
    },
    /// Content boxlet does not handle (a media type, an algorithm, a format).
    #[error("{what}: unsupported: {reason}")]
    Unsupported {
        /// The document or blob.
        what: String,
        /// What is not supported.
        reason: String,
    },
    /// A document or image past boxlet's bounds (too large, too many layers).
    #[error("{what}: refused: {reason}")]
    TooLarge {
        /// The document, image or blob.
        what: String,
        /// Which bound, and by how much.
        reason: String,
    },
    /// A request boxlet refuses to make (credentials where they could leak).
    #[error("{what}: refused: {reason}")]
    Refused {
        /// The registry or image.
        what: String,
        /// Why, and how to allow it.
        reason: String,
    },
    /// No manifest of the image is for linux/amd64.
    #[error("{reference} has no linux/amd64 image (it has: {available})")]
    NoPlatform {
        /// The image.
        reference: String,
        /// The platforms it has.
        available: String,
    },
    /// The store does not hold this image.
    #[error("no image {0} in the store")]
    NoImage(String),
    /// A file-system operation failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A layer could not be applied.
    #[error("applying layer {layer}: {source}")]
    Apply {
        /// The layer.
        layer: Digest,
        /// Why.
        source: ApplyError,
    },
    /// A layer's uncompressed content does not match the diff ID its image announces.
    #[error("layer {layer} uncompresses to {actual}, but the image's config says {expected}")]
    DiffId {
        /// The layer.
        layer: Digest,
        /// The config's diff ID.
        expected: Digest,
        /// The digest of the uncompressed bytes.
        actual: Digest,
    },
    /// The content store failed.
    #[error(transparent)]
    Store(#[from] CasError),
}

impl OciError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| OciError::Io { op, path, source }
    }

    pub(crate) fn malformed(what: impl std::fmt::Display, reason: impl std::fmt::Display) -> Self {
        OciError::Malformed {
            what: what.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// The OCI code's result type.
pub type Result<T, E = OciError> = std::result::Result<T, E>;
