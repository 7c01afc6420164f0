//! boxlet's content-addressed store: blobs named by their digest under `blobs/`, and a
//! redb index of blobs, images, base disks and boxes (schema in `docs/cas.md`).
//!
//! Content is hashed while it is written, verified against the digest it was announced
//! with, synced and renamed into place before the index learns of it, so a crash at any
//! instant loses nothing committed and shows nothing half-written. GC marks from the
//! records and from leases held by operations in flight.

#![forbid(unsafe_code)]

mod base_disks;
mod boxes;
mod digest;
mod error;
mod fault;
mod gc;
mod id;
mod images;
mod ingest;
mod lease;
mod pipe;
mod private;
mod records;
mod schema;
mod store;
mod verify;

pub use digest::{Algorithm, Digest, DigestParseError, Hasher, DIGEST_LEN};
pub use error::{CasError, Result};
pub use fault::{FaultHook, Step};
pub use gc::GcReport;
pub use id::{BaseDiskId, BoxId, IdParseError, ID_LEN};
pub use ingest::{BlobWriter, Expected};
pub use lease::Lease;
pub use private::private_dir;
pub use records::{
    unix_now, BaseDisk, BaseDiskKind, BlobInfo, BoxRecord, BoxState, DiskInfo, ImageRecord,
};
pub use schema::FORMAT_VERSION;
pub use store::{Store, StoreOptions};
pub use verify::{Problem, Usage, VerifyReport};
