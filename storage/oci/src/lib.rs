//! OCI images for boxlet: import of image layouts and docker archives, registry pull,
//! and secure application of layers to a directory.
//!
//! Every blob goes through the content store ([`boxlet_cas::Store`]), verified against
//! its digest; manifests and configs are parsed with `oci-spec` only after that.

mod apply;
mod archive;
mod error;
mod fetch;
mod fsat;
#[doc(hidden)]
pub mod fuzz;
mod image;
mod layout;
mod manifest;
mod pull;
mod unpack;

pub use apply::{
    apply_layer, ApplyError, ApplyLimits, ApplyOptions, ApplyReport, DevicePolicy, IdShift,
    Whiteouts, XattrPolicy,
};
pub use archive::import_archive;
pub use error::{OciError, Result};
pub use image::{Layer, StoredImage};
pub use layout::import_layout;
pub use manifest::{
    check_bounds, normalize_reference, Compression, MAX_CONFIG, MAX_IMAGE_BYTES, MAX_LAYERS,
    MAX_MANIFEST,
};
pub use pull::{pull, Credentials, PullOptions, PullProgress, PullReport, Quiet};
pub use unpack::{apply_stored_layer, unpack};
