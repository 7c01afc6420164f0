//! Errors of the qcow2 crate, split the way a caller needs them: the bytes are bad
//! ([`ErrorKind::Corrupt`]), the image uses something this engine does not implement
//! ([`ErrorKind::Unsupported`]), the disk failed ([`ErrorKind::Io`]), or the request itself
//! was wrong ([`ErrorKind::InvalidInput`]).

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// An error with the path of the image it concerns, when one is known.
#[derive(Debug)]
pub struct Error {
    path: Option<PathBuf>,
    kind: ErrorKind,
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The underlying file or storage failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The image's bytes violate the qcow2 format.
    #[error("corrupt image: {0}")]
    Corrupt(Corruption),
    /// The image is valid but uses a feature this engine does not implement.
    #[error("unsupported: {0}")]
    Unsupported(Unsupported),
    /// The request was invalid (bad size, offset outside the disk, read-only image...).
    #[error("{0}")]
    InvalidInput(String),
}

/// Every way the header and metadata checks can find an image corrupt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Corruption {
    /// The file is shorter than the fixed header.
    #[error("file is {len} bytes, too short for a qcow2 header")]
    Truncated {
        /// File length.
        len: u64,
    },
    /// The first four bytes are not `QFI\xfb`.
    #[error("bad magic {0:#010x} (not a qcow2 image)")]
    BadMagic(u32),
    /// The version field is not 1, 2 or 3.
    #[error("invalid version {0}")]
    BadVersion(u32),
    /// cluster_bits outside 9..=21.
    #[error("cluster_bits {0} outside 9..=21")]
    ClusterBits(u32),
    /// header_length of a v3 image is too small, too large or not a multiple of 8.
    #[error("header_length {0} invalid (v3 needs >= 104, a multiple of 8, within cluster 0)")]
    HeaderLength(u32),
    /// refcount_order above 6.
    #[error("refcount_order {0} above 6")]
    RefcountOrder(u32),
    /// The backing file name is longer than 1023 bytes or extends beyond cluster 0.
    #[error(
        "backing file name at offset {offset}, {len} bytes, must be <= 1023 bytes inside cluster 0"
    )]
    BackingName {
        /// backing_file_offset
        offset: u64,
        /// backing_file_size
        len: u32,
    },
    /// The backing file name is not valid UTF-8.
    #[error("backing file name is not UTF-8")]
    BackingNameEncoding,
    /// A table offset is not cluster aligned.
    #[error("{table} offset {offset:#x} is not cluster aligned")]
    Unaligned {
        /// Which table or cluster.
        table: &'static str,
        /// The offending offset.
        offset: u64,
    },
    /// A table lies (partly) beyond the end of the file.
    #[error("{table} at {offset:#x} ({len} bytes) extends beyond the end of the file ({file_len} bytes)")]
    OutOfFile {
        /// Which table.
        table: &'static str,
        /// Its offset.
        offset: u64,
        /// Its length in bytes.
        len: u64,
        /// The file length.
        file_len: u64,
    },
    /// l1_size cannot map the virtual size, or exceeds the 32 MiB limit.
    #[error(
        "l1_size {l1_size} inconsistent with virtual size {size} (needs {needed}, at most {max})"
    )]
    L1Size {
        /// l1_size from the header.
        l1_size: u32,
        /// The virtual size.
        size: u64,
        /// Entries the virtual size needs.
        needed: u64,
        /// The largest acceptable l1_size.
        max: u64,
    },
    /// The refcount table is empty or larger than 8 MiB.
    #[error("refcount_table_clusters {0} invalid")]
    RefcountTableSize(u32),
    /// More internal snapshots than qcow2 allows.
    #[error("nb_snapshots {0} above 65536")]
    SnapshotCount(u32),
    /// A header extension overruns the space it may use.
    #[error(
        "header extension {ext_type:#010x} at {offset:#x} with length {len} overruns cluster 0"
    )]
    Extension {
        /// Extension type.
        ext_type: u32,
        /// Where it starts.
        offset: u64,
        /// Its length.
        len: u32,
    },
    /// A compressed cluster does not inflate to a full cluster.
    #[error("compressed cluster at host offset {0:#x} does not decompress")]
    Compressed(u64),
    /// Something a well-formed image never holds.
    #[error("{0}")]
    Other(String),
}

/// Features this engine refuses, named.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Unsupported {
    /// Version 1 (the old qcow format).
    #[error("qcow version {0} (only qcow2 versions 2 and 3)")]
    Version(u32),
    /// An incompatible feature bit this engine cannot honour.
    #[error("incompatible feature bit {bit} ({name})")]
    IncompatibleFeature {
        /// Bit number.
        bit: u32,
        /// Its name: from the spec, from the image's feature name table, or "unknown".
        name: String,
    },
    /// The image is encrypted.
    #[error("encrypted image (crypt_method {0}: {name})", name = crypt_name(*.0))]
    Encryption(u32),
    /// A compression type other than deflate.
    #[error("compression type {0} ({name})", name = if *.0 == 1 { "zstd" } else { "unknown" })]
    CompressionType(u8),
    /// A backing file in a format other than raw and qcow2.
    #[error("backing file format {0:?} (only raw and qcow2)")]
    BackingFormat(String),
    /// Writing to an image in a state or with a feature that only allows reading.
    #[error("writing: {0}")]
    Write(String),
}

fn crypt_name(method: u32) -> &'static str {
    match method {
        1 => "AES",
        2 => "LUKS",
        _ => "unknown",
    }
}

impl Error {
    /// An error without a path yet.
    pub fn new(kind: ErrorKind) -> Self {
        Self { path: None, kind }
    }

    /// An I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Self::new(ErrorKind::Io {
            context: context.into(),
            source,
        })
    }

    /// What went wrong.
    pub fn kind(&self) -> &ErrorKind {
        &self.kind
    }

    /// The image the error concerns.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The corruption, if this is one.
    pub fn corruption(&self) -> Option<&Corruption> {
        match &self.kind {
            ErrorKind::Corrupt(c) => Some(c),
            _ => None,
        }
    }

    /// The unsupported feature, if this is one.
    pub fn unsupported(&self) -> Option<&Unsupported> {
        match &self.kind {
            ErrorKind::Unsupported(u) => Some(u),
            _ => None,
        }
    }

    /// Attach the image path, unless one is already attached (the innermost path wins:
    /// an error in a backing file names the backing file).
    pub fn with_path(mut self, path: &Path) -> Self {
        if self.path.is_none() {
            self.path = Some(path.to_path_buf());
        }
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(p) => write!(f, "{}: {}", p.display(), self.kind),
            None => write!(f, "{}", self.kind),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            ErrorKind::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<Corruption> for Error {
    fn from(c: Corruption) -> Self {
        Self::new(ErrorKind::Corrupt(c))
    }
}

impl From<Unsupported> for Error {
    fn from(u: Unsupported) -> Self {
        Self::new(ErrorKind::Unsupported(u))
    }
}

/// Shorthand for an [`ErrorKind::InvalidInput`] error.
pub(crate) fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidInput(msg.into()))
}

/// Shorthand for a [`Corruption::Other`] error.
pub(crate) fn corrupt(msg: impl Into<String>) -> Error {
    Corruption::Other(msg.into()).into()
}
