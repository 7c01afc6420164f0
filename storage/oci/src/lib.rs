//! OCI images for boxlet: import of image layouts and docker archives, registry pull,
//! and secure application of layers to a directory.

mod apply;
mod fsat;

pub use apply::{apply_layer, ApplyError, ApplyOptions, ApplyReport, DevicePolicy};
