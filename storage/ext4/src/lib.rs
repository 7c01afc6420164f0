//! ext4 for boxlet: a reader for ext2/ext3/ext4 images that never trusts the image.
//!
//! Superblock and feature checks, 32/64-bit group descriptors (flex_bg, meta_bg),
//! inodes with nanosecond times, extent trees and classic block maps, linear and htree
//! directories, fast and slow symlinks, inline data, sparse files and uninitialized
//! extents, extended attributes (in-inode, block, ea_inode), and metadata_csum / gdt_csum
//! verification. Invalid images give errors, never panics or unbounded work.
//!
//! The on-disk layout it reads is summarized in `docs/ext4.md`.
#![forbid(unsafe_code)]

mod acl;
mod bytes;
mod csum;
mod dir;
mod dx;
mod encode;
mod error;
mod extent;
mod fs;
pub mod fuzz;
mod group;
mod inject;
mod inode;
mod layers;
mod metadata;
mod mkfs;
mod source;
pub mod superblock;
mod targuard;
mod tree;
mod xattr;
mod xattr_write;

pub use dir::DirEntry;
pub use error::{Corruption, Error, ErrorKind, Result};
pub use extent::Extent;
pub use fs::{Ext4, FileReader, MAX_READ};
pub use inject::{inject, inject_bytes, InjectOptions};
pub use inode::{FileType, Inode, Timestamp, ROOT_INO};
pub use layers::{LayerLimits, LayerStack, MAX_TAR_RECORD};
pub use metadata::Metadata;
pub use mkfs::{
    build, build_file, build_file_with_layers, build_with_layers, BuildOptions, BuildReport,
};
pub use source::ReadAt;
pub use superblock::Superblock;
pub use targuard::TarGuard;
pub use tree::{FileData, Node, NodeId, NodeKind, NodeMeta, Tree};
pub use xattr::Xattr;

/// Every extended attribute of an inode (names with their namespace prefix).
pub fn xattrs(fs: &Ext4, inode: &Inode) -> Result<Vec<Xattr>> {
    xattr::read_xattrs(fs, inode)
}
