//! A summary of an image for `boxlet qcow2 info`.

use crate::header::{incompatible_feature_name, ExtensionInfo, Header, COMPAT_LAZY_REFCOUNTS};

/// What `boxlet qcow2 info` shows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImageInfo {
    /// Always "qcow2".
    pub format: &'static str,
    /// 2 or 3.
    pub version: u32,
    /// "0.10" (v2) or "1.1" (v3), as qemu-img names them.
    pub compat: &'static str,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Length of the image file in bytes.
    pub file_length: u64,
    /// Backing file name as stored.
    pub backing_file: Option<String>,
    /// Backing format extension, as recorded.
    pub backing_format: Option<String>,
    /// Lazy refcounts (compatible bit 0).
    pub lazy_refcounts: bool,
    /// Names of the incompatible feature bits that are set.
    pub incompatible_features: Vec<String>,
    /// Raw compatible feature bits.
    pub compatible_features: u64,
    /// Raw autoclear feature bits.
    pub autoclear_features: u64,
    /// Number of internal snapshots.
    pub snapshots: u32,
    /// L1 table entries.
    pub l1_size: u32,
    /// Header extensions present.
    pub extensions: Vec<ExtensionInfo>,
}

impl ImageInfo {
    /// Summarize a parsed header.
    pub fn new(h: &Header, file_length: u64) -> Self {
        let incompatible_features = (0..64)
            .filter(|b| h.incompatible_features & (1u64 << b) != 0)
            .map(|b| incompatible_feature_name(b).map_or(format!("bit {b}"), str::to_owned))
            .collect();
        Self {
            format: "qcow2",
            version: h.version,
            compat: if h.version >= 3 { "1.1" } else { "0.10" },
            virtual_size: h.size,
            cluster_size: h.cluster_size(),
            refcount_bits: 1 << h.refcount_order,
            file_length,
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format_name.clone(),
            lazy_refcounts: h.compatible_features & COMPAT_LAZY_REFCOUNTS != 0,
            incompatible_features,
            compatible_features: h.compatible_features,
            autoclear_features: h.autoclear_features,
            snapshots: h.nb_snapshots,
            l1_size: h.l1_size,
            extensions: h.extensions.clone(),
        }
    }
}
