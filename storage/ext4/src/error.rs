//! Errors of the ext4 reader: the image is bad ([`ErrorKind::Corrupt`]), uses something
//! the reader does not implement ([`ErrorKind::Unsupported`]), the storage failed
//! ([`ErrorKind::Io`]), or the request was wrong ([`ErrorKind::NotFound`] and friends).

use std::fmt;
use std::io;

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// An error, with the path inside the image it concerns when one is known.
#[derive(Debug)]
pub struct Error {
    path: Option<String>,
    kind: ErrorKind,
}

/// What went wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Reading the image failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being read.
        context: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The image violates the ext4 format.
    #[error("corrupt image: {0}")]
    Corrupt(Corruption),
    /// The image uses a feature the reader does not implement.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// No such file or directory.
    #[error("no such file or directory")]
    NotFound,
    /// A path component that must be a directory is not one.
    #[error("not a directory")]
    NotADirectory,
    /// The operation needs a regular file, a symlink, ...
    #[error("{0}")]
    WrongType(String),
    /// Too many symbolic links while resolving a path.
    #[error("too many levels of symbolic links")]
    SymlinkLoop,
    /// A request the reader refuses (e.g. a file too large to read into memory).
    #[error("{0}")]
    InvalidInput(String),
}

/// Ways the reader can find an image corrupt.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Corruption {
    /// The image is shorter than what it claims to hold.
    #[error("{what} at byte {offset:#x} lies beyond the end of the image ({len} bytes)")]
    OutOfImage {
        /// What was being read.
        what: &'static str,
        /// Where.
        offset: u64,
        /// Image length.
        len: u64,
    },
    /// Superblock magic is not 0xEF53.
    #[error("bad superblock magic {0:#06x} (not an ext2/3/4 image)")]
    BadMagic(u16),
    /// A superblock field is out of range.
    #[error("superblock: {0}")]
    Superblock(String),
    /// A checksum does not match (metadata_csum / gdt_csum).
    #[error("{what} checksum mismatch (stored {stored:#x}, computed {computed:#x})")]
    Checksum {
        /// What the checksum covers, with its number or location.
        what: String,
        /// Stored value.
        stored: u32,
        /// Computed value.
        computed: u32,
    },
    /// An inode number outside 1..=inodes_count.
    #[error("inode number {0} out of range")]
    InodeNumber(u64),
    /// A bad extent tree.
    #[error("inode {ino}: extent tree: {msg}")]
    Extent {
        /// Inode number.
        ino: u32,
        /// What is wrong.
        msg: String,
    },
    /// A bad directory entry.
    #[error("directory inode {ino}, block {block}: {msg}")]
    DirEntry {
        /// Directory inode.
        ino: u32,
        /// Logical block of the directory.
        block: u64,
        /// What is wrong.
        msg: String,
    },
    /// A bad extended attribute.
    #[error("inode {ino}: extended attributes: {msg}")]
    Xattr {
        /// Inode number.
        ino: u32,
        /// What is wrong.
        msg: String,
    },
    /// Anything else.
    #[error("{0}")]
    Other(String),
}

impl Error {
    /// An error of this kind.
    pub fn new(kind: ErrorKind) -> Self {
        Self { path: None, kind }
    }

    /// An I/O error while reading `context`.
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

    /// The corruption, if this is one.
    pub fn corruption(&self) -> Option<&Corruption> {
        match &self.kind {
            ErrorKind::Corrupt(c) => Some(c),
            _ => None,
        }
    }

    /// The path inside the image, if known.
    pub fn path(&self) -> Option<&str> {
        self.path.as_deref()
    }

    /// Attach the path inside the image (the first one attached wins).
    pub fn with_path(mut self, path: &str) -> Self {
        if self.path.is_none() {
            self.path = Some(path.to_owned());
        }
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.path {
            Some(p) => write!(f, "{p}: {}", self.kind),
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

impl From<ErrorKind> for Error {
    fn from(k: ErrorKind) -> Self {
        Self::new(k)
    }
}

pub(crate) fn corrupt(msg: impl Into<String>) -> Error {
    Corruption::Other(msg.into()).into()
}
