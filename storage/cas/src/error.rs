//! Errors of the store: I/O (your disk), corrupt or mismatched content (your input or a
//! damaged store), conflicts (someone else got there first), and the index database.

use std::io;
use std::path::PathBuf;

use crate::digest::Digest;

/// The store's result type.
pub type Result<T, E = CasError> = std::result::Result<T, E>;

/// An error of the content-addressed store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CasError {
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
    /// Reading the content to ingest failed.
    #[error("reading the content for {what}: {source}")]
    Source {
        /// What was being ingested (the expected digest, or "a new blob").
        what: String,
        /// The reader's error.
        source: io::Error,
    },
    /// Content did not hash to the digest it was announced with.
    #[error("content announced as {expected} hashes to {actual}")]
    DigestMismatch {
        /// The digest the caller expected.
        expected: Digest,
        /// The digest of the bytes received.
        actual: Digest,
    },
    /// Content announced by a digest of one algorithm was to be hashed with another.
    #[error("content announced as {expected} cannot be stored under {algorithm}")]
    AlgorithmMismatch {
        /// The digest the caller expected.
        expected: Digest,
        /// The algorithm asked for.
        algorithm: crate::digest::Algorithm,
    },
    /// Content was not the size it was announced with.
    #[error("content announced as {digest} with {expected} bytes has {actual_or_more}{actual} bytes",
        actual_or_more = if *.truncated { "more than " } else { "" })]
    SizeMismatch {
        /// The digest the caller expected.
        digest: String,
        /// The size the caller expected.
        expected: u64,
        /// Bytes received (when `truncated`, reading stopped here).
        actual: u64,
        /// Reading stopped early because the content was already too long.
        truncated: bool,
    },
    /// The store does not hold this blob.
    #[error("the store has no blob {0}")]
    NotFound(Digest),
    /// A record refers to a blob the store does not hold.
    #[error("{what} names blob {digest}, which the store does not hold")]
    MissingBlob {
        /// The record (an image reference, a box).
        what: String,
        /// The blob it names.
        digest: Digest,
    },
    /// A record with this unique key exists already.
    #[error("{0} exists already")]
    Conflict(String),
    /// A record was not found.
    #[error("no {0}")]
    NoRecord(String),
    /// A record in the index could not be decoded.
    #[error("corrupt record in table {table} under key {key:?}: {reason}")]
    CorruptRecord {
        /// The table.
        table: &'static str,
        /// The record's key.
        key: String,
        /// What was wrong.
        reason: String,
    },
    /// The index was written by another version of the store.
    #[error("the store at {} has format version {found}; this boxlet reads version {supported}", path.display())]
    FormatVersion {
        /// The database file.
        path: PathBuf,
        /// Its version.
        found: u64,
        /// Ours.
        supported: u64,
    },
    /// The index database failed.
    #[error("the store's index {}: {source}", path.display())]
    Db {
        /// The database file.
        path: PathBuf,
        /// redb's error.
        source: Box<redb::Error>,
    },
    /// The store's root is not private to this user.
    #[error("{}: unsafe as a boxlet home: {reason}", path.display())]
    Insecure {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// An injected fault (tests and crash drills only).
    #[error("injected fault at {0:?}")]
    Fault(crate::fault::Step),
}

impl CasError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| CasError::Io { op, path, source }
    }
}
