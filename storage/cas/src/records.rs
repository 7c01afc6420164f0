//! The records the index holds besides blobs: images, base disks and boxes.

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::id::{BaseDiskId, BoxId};

/// A blob the store holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    /// Its digest.
    pub digest: Digest,
    /// Its size in bytes.
    pub size: u64,
    /// When it was first stored (unix seconds).
    pub created: u64,
    /// How many image and box records name it.
    pub references: u64,
}

/// An image: a reference (`docker.io/library/busybox:latest`) and the blobs it is made of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The reference the image is known by.
    pub reference: String,
    /// The multi-platform index the manifest was chosen from, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<Digest>,
    /// The image manifest: the image's identity.
    pub manifest: Digest,
    /// The image configuration.
    pub config: Digest,
    /// The layers, bottom first.
    pub layers: Vec<Digest>,
    /// `os/arch[/variant]`.
    pub platform: String,
    /// When the record was written (unix seconds).
    pub created_at: u64,
}

impl ImageRecord {
    /// Every blob the image needs, in a stable order (a blob named twice appears twice).
    pub fn blobs(&self) -> impl Iterator<Item = &Digest> {
        self.index
            .iter()
            .chain([&self.manifest, &self.config])
            .chain(&self.layers)
    }
}

/// What a base disk is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseDiskKind {
    /// A versioned guest root filesystem (image + agent), shared by boxes.
    Rootfs,
    /// An image's own ext4, before the agent is injected.
    Image,
    /// A box's disk frozen as a base for clones.
    Snapshot,
}

/// Where a base disk's file is and how big it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// The disk file.
    pub base_path: String,
    /// Bytes of the container's data in it (0 when unknown).
    pub container_disk_bytes: u64,
    /// The file's size.
    pub size_bytes: u64,
}

/// A base disk: a read-only disk file that boxes' qcow2 overlays are backed by.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseDisk {
    /// Its ID (also its file name).
    pub id: BaseDiskId,
    /// The box it was made from, or a sentinel such as `__global__` for shared entries.
    pub source_box_id: String,
    /// Its name, unique per source when set (a version key for rootfs entries).
    pub name: Option<String>,
    /// What it is for.
    pub kind: BaseDiskKind,
    /// The file.
    pub disk_info: DiskInfo,
    /// When it was recorded (unix seconds).
    pub created_at: i64,
    /// The blob holding the disk, when the store holds it: kept by GC while the record
    /// exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<Digest>,
}

/// Where a box is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BoxState {
    /// Created, never started.
    Created,
    /// Its VM runs.
    Running,
    /// Its VM has stopped; its disks remain.
    Stopped,
}

/// A box: its identity, configuration, state, and the blobs it uses (GC roots).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoxRecord {
    /// Its ID.
    pub id: BoxId,
    /// Its name, unique in the store.
    pub name: Option<String>,
    /// The image reference it was made from.
    pub image: Option<String>,
    /// Its configuration, as the runtime writes it.
    pub config: serde_json::Value,
    /// Its state.
    pub state: BoxState,
    /// Blobs the box uses: kept by GC as long as the record exists.
    #[serde(default)]
    pub blobs: Vec<Digest>,
    /// When it was created (unix seconds).
    pub created_at: u64,
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
