//! A box's disk quota on a directory root (Extracted, OverlayMount): what the guest can
//! write lives on a file system of the box's own, a sparse ext4 file of the quota's size
//! (built by `boxlet_ext4`, so its metadata is ours, never an image's), loop-mounted
//! `nosuid,nodev,noexec` under the box's directory. A guest writing through virtio-fs
//! meets ENOSPC at the quota, and the host's file system gives the box at most that much.
//! Needs root (loop devices and mounting); without it a quota is a clear error, and only
//! an explicit [`DiskQuota::Unlimited`] runs without one.
//!
//! Mounts never leak: a box's cleanup unmounts everything under its directory, deepest
//! first, before it removes anything, and a new OverlayMount strategy unmounts what a
//! crashed runtime left under `boxes/`. The loop device detaches itself when its file
//! system is unmounted (`LO_FLAGS_AUTOCLEAR`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::rootfs::RootfsError;

/// How much a box on a directory root may write to the host's disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskQuota {
    /// [`DEFAULT_QUOTA`] of writes (OverlayMount); the image's tree and as much again
    /// (Extracted, whose box holds a copy of the tree).
    #[default]
    Default,
    /// This many bytes in all: the box's file system's size.
    Bytes(u64),
    /// No quota: the box writes to the home's own file system (where Extracted's copies
    /// can be reflinks). A guest can then fill that file system.
    Unlimited,
}

/// What a box may write by default: the Disk strategy's smallest disk.
pub const DEFAULT_QUOTA: u64 = crate::rootfs::disk::MIN_DISK_SIZE;

/// The smallest quota: the file system's own metadata and journal need a few MiB.
pub const MIN_QUOTA: u64 = 32 << 20;

impl DiskQuota {
    /// The size of the box's file system when it must also hold `content` bytes (an
    /// Extracted copy), or `None` for no quota.
    pub fn size_for(self, content: u64) -> Option<u64> {
        match self {
            DiskQuota::Default => Some(content.saturating_add(DEFAULT_QUOTA)),
            DiskQuota::Bytes(b) => Some(b),
            DiskQuota::Unlimited => None,
        }
    }
}

/// Make the box's file system of `bytes` at `image` (a new sparse file), with at least
/// `inodes` inodes beyond those of its size (one per 16 KiB), and mount it on `at` (made
/// if missing). Blocking.
pub(crate) fn mount_new(
    image: &Path,
    at: &Path,
    bytes: u64,
    inodes: u64,
) -> Result<(), RootfsError> {
    let refused = |reason: String| RootfsError::Invalid {
        what: format!(
            "a disk quota of {} MiB ({bytes} bytes)",
            bytes.div_ceil(1 << 20)
        ),
        reason,
    };
    if bytes < MIN_QUOTA {
        return Err(refused(format!("the smallest quota is {MIN_QUOTA} bytes")));
    }
    if !crate::rootfs::shared::has_cap_sys_admin() {
        return Err(refused(
            "a box's disk quota is a loop-mounted file system, which needs root: run as \
             root, use the Disk strategy, or ask for no quota (`--disk-quota unlimited`, \
             `DiskQuota::Unlimited`)"
                .into(),
        ));
    }
    let opts = boxlet_ext4::BuildOptions {
        size: Some(bytes),
        extra_inodes: inodes,
        label: "boxlet-quota".into(),
        ..boxlet_ext4::BuildOptions::default()
    };
    boxlet_ext4::build_file(&boxlet_ext4::Tree::default(), image, &opts).map_err(|source| {
        RootfsError::Ext4 {
            what: format!("the box's file system {}", image.display()),
            source,
        }
    })?;
    std::fs::create_dir_all(at).map_err(RootfsError::io("creating", at))?;
    let loop_dev = attach(image).map_err(RootfsError::io("attaching a loop device to", image))?;
    let mounted = rustix::mount::mount(
        &loop_dev.path,
        at,
        "ext4",
        rustix::mount::MountFlags::NOSUID
            | rustix::mount::MountFlags::NODEV
            | rustix::mount::MountFlags::NOEXEC,
        None,
    );
    // The mount holds the device now; closing ours lets it detach at the unmount.
    drop(loop_dev);
    mounted.map_err(|e| RootfsError::io("mounting the box's file system on", at)(e.into()))?;
    // The file system's own lost+found is no business of the box's.
    let _ = std::fs::remove_dir(at.join("lost+found"));
    Ok(())
}

/// A loop device bound to a file.
struct LoopDevice {
    path: PathBuf,
    _fd: std::os::fd::OwnedFd,
}

// linux/loop.h
const LOOP_CTL_GET_FREE: u64 = 0x4C82;
const LOOP_CONFIGURE: u64 = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;

#[repr(C)]
struct LoopInfo64 {
    device: u64,
    inode: u64,
    rdevice: u64,
    offset: u64,
    sizelimit: u64,
    number: u32,
    encrypt_type: u32,
    encrypt_key_size: u32,
    flags: u32,
    file_name: [u8; 64],
    crypt_name: [u8; 64],
    encrypt_key: [u8; 32],
    init: [u64; 2],
}

#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// A free loop device bound to `file` (read-write), detaching itself once nothing
/// holds it. Retries when another process takes the free device first.
fn attach(file: &Path) -> std::io::Result<LoopDevice> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let backing = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_CLOEXEC | nix::libc::O_NOFOLLOW)
        .open(file)?;
    let control = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_CLOEXEC)
        .open("/dev/loop-control")?;
    for _ in 0..16 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { nix::libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE as _) };
        if n < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let path = PathBuf::from(format!("/dev/loop{n}"));
        let dev = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_CLOEXEC)
            .open(&path)?;
        let config = LoopConfig {
            fd: backing.as_raw_fd() as u32,
            block_size: 0,
            info: LoopInfo64 {
                device: 0,
                inode: 0,
                rdevice: 0,
                offset: 0,
                sizelimit: 0,
                number: 0,
                encrypt_type: 0,
                encrypt_key_size: 0,
                flags: LO_FLAGS_AUTOCLEAR,
                file_name: [0; 64],
                crypt_name: [0; 64],
                encrypt_key: [0; 32],
                init: [0; 2],
            },
            reserved: [0; 8],
        };
        // SAFETY: LOOP_CONFIGURE reads one `struct loop_config`, which `config` is
        // (repr(C), the kernel's layout), alive for the call.
        let r = unsafe { nix::libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE as _, &config) };
        if r == 0 {
            return Ok(LoopDevice {
                path,
                _fd: dev.into(),
            });
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(nix::libc::EBUSY) {
            return Err(e);
        }
    }
    Err(std::io::Error::other(
        "every free loop device was taken by another process first",
    ))
}

/// Unmount everything mounted under `dir` (the box's directory), deepest first (lazily
/// when busy), and check nothing is left there.
pub(crate) fn unmount_under(dir: &Path) -> Result<(), RootfsError> {
    let canonical = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let mut points: Vec<PathBuf> = mount_points()
        .into_iter()
        .filter(|p| p.starts_with(&canonical))
        .collect();
    // Mounted later is unmounted first (an overlay before the file system under its
    // upper), and children before parents.
    points.reverse();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for p in &points {
        unmount(p)?;
    }
    if mount_points().iter().any(|p| p.starts_with(&canonical)) {
        return Err(RootfsError::Invalid {
            what: dir.display().to_string(),
            reason: "still mounted after unmounting; not removing it".into(),
        });
    }
    Ok(())
}

/// Remove what a failed prepare left of a box: its mounts, then its directory; nothing
/// is removed when unmounting fails (never through a mount).
pub(crate) fn discard_box_dir(box_dir: &Path) {
    if unmount_under(box_dir).is_ok() {
        let _ = std::fs::remove_dir_all(box_dir);
    }
}

/// The mount points of this mount namespace (`/proc/self/mountinfo`), in mount order.
pub(crate) fn mount_points() -> Vec<PathBuf> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| {
            let mut out = Vec::new();
            let b = p.as_bytes();
            let octal = |c: u8| (b'0'..=b'7').contains(&c).then(|| u32::from(c - b'0'));
            let mut i = 0;
            while i < b.len() {
                if b[i] == b'\\' && i + 3 < b.len() {
                    if let (Some(x), Some(y), Some(z)) =
                        (octal(b[i + 1]), octal(b[i + 2]), octal(b[i + 3]))
                    {
                        out.push((x << 6 | y << 3 | z) as u8);
                        i += 4;
                        continue;
                    }
                }
                out.push(b[i]);
                i += 1;
            }
            PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
        })
        .collect()
}

/// Unmount `target` (lazily when it is busy).
pub(crate) fn unmount(target: &Path) -> Result<(), RootfsError> {
    use rustix::mount::{unmount as umount, UnmountFlags};
    // (Never through a symbolic link put in place of the mount point.)
    match umount(target, UnmountFlags::NOFOLLOW) {
        Ok(()) => Ok(()),
        Err(rustix::io::Errno::BUSY) => {
            umount(target, UnmountFlags::DETACH | UnmountFlags::NOFOLLOW)
                .map_err(|e| RootfsError::io("unmounting", target)(e.into()))
        }
        Err(e) => Err(RootfsError::io("unmounting", target)(e.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_loop_config_layout() {
        // linux/loop.h: loop_info64 is 232 bytes, loop_config 304.
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<LoopConfig>(), 304);
    }

    #[test]
    fn default_quotas_leave_room_beyond_the_content() {
        assert_eq!(DiskQuota::Default.size_for(0), Some(DEFAULT_QUOTA));
        assert_eq!(
            DiskQuota::Default.size_for(1 << 30),
            Some((1 << 30) + DEFAULT_QUOTA)
        );
        assert_eq!(DiskQuota::Bytes(64 << 20).size_for(1 << 30), Some(64 << 20));
        assert_eq!(DiskQuota::Unlimited.size_for(1 << 30), None);
    }
}
