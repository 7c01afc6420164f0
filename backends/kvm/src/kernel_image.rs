//! Zero-copy kernel loading: the kernel's segments laid out once, at their guest physical
//! addresses, in a cached image file, which each VM maps copy-on-write as the low part of
//! its RAM. A VM then starts without copying (or even touching) the 10 MB of kernel: its
//! pages come from the page cache when the guest first reads them, shared by every VM of
//! that kernel, and only the pages a guest writes become its own.
//!
//! Only for VMs whose RAM no other process maps: a vhost-user daemon maps the guest's
//! memfd and would not see the private pages, so VMs with directory shares copy the
//! kernel into the memfd as before.

use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Guest RAM starts at this alignment after the image (and the image's length is one).
const ALIGN: u64 = 2 << 20;
/// The scratch mapping the image is built in: larger than any kernel's segments.
const SCRATCH: u64 = 256 << 20;

/// A kernel laid out for mapping.
#[derive(Debug)]
pub struct Image {
    /// The image file.
    pub file: File,
    /// Its length: guest RAM below it is the image.
    pub len: u64,
    /// The PVH entry point.
    pub entry: u64,
    /// Where the kernel's segments end (the initramfs must go above).
    pub kernel_end: u64,
    /// The image and its info file, as found in the cache (what a jailed VMM is given,
    /// read-only).
    pub paths: [PathBuf; 2],
}

/// Where the VMM loads kernels: 1 MiB, as PCs have it.
pub const LOAD_FROM: u64 = 0x10_0000;

/// Whether the VM of `spec` maps its kernel from an image: when no other process maps
/// its RAM (a vhost-user daemon would not see the private pages) and
/// `BOXLET_VMM_COPY_KERNEL` does not ask for the copy (to compare).
pub fn zero_copy(spec: &boxlet::VmSpec) -> bool {
    std::env::var_os("BOXLET_VMM_COPY_KERNEL").is_none() && spec.shares.is_empty()
}

/// The cached image of `kernel`, built on first use (keyed by the kernel's path, size,
/// modification time and inode, so a rebuilt kernel gets a new image). The cache is
/// `$XDG_CACHE_HOME/boxlet/kernel-images` (else under `~/.cache`); where that cannot be
/// written (a read-only home), a private directory under the temporary directory. An
/// error when the kernel is not one to boot or no directory takes the image (the VMM then
/// copies the kernel instead).
pub fn cached(kernel: &Path, load_from: u64) -> Result<Image, String> {
    let meta = std::fs::metadata(kernel).map_err(|e| e.to_string())?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        kernel,
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ino(),
        load_from,
    )
        .hash(&mut h);
    let key = format!("{:016x}", h.finish());
    // The image the backend prepared and gave a jailed VMM, when it is this kernel's.
    if let Some(given) = std::env::var_os("BOXLET_VMM_KERNEL_IMAGE").map(PathBuf::from) {
        if given.file_name() == Some(std::ffi::OsStr::new(&format!("{key}.img"))) {
            if let Some(image) = open(&given, &given.with_extension("info")) {
                return Ok(image);
            }
        }
    }
    // Each place: its directory, the image and the info file.
    let places: Vec<(PathBuf, PathBuf, PathBuf)> = [cache_dir(), private_temp_dir()]
        .into_iter()
        .flatten()
        .map(|dir| {
            let img = dir.join(format!("{key}.img"));
            let info = dir.join(format!("{key}.info"));
            (dir, img, info)
        })
        .collect();
    if let Some(image) = places.iter().find_map(|(_, img, info)| open(img, info)) {
        return Ok(image);
    }
    let mut why = String::from("no cache directory");
    for (dir, img, info) in &places {
        if let Err(e) = std::fs::create_dir_all(dir) {
            why = format!("{}: {e}", dir.display());
            continue;
        }
        match build(kernel, load_from, dir, img, info) {
            Ok(()) => {
                return open(img, info).ok_or_else(|| {
                    format!("{}: unreadable right after it was built", img.display())
                })
            }
            // A bad kernel is bad everywhere.
            Err(Build::Kernel(e)) => return Err(e),
            Err(Build::Io(e)) => why = format!("{}: {e}", dir.display()),
        }
    }
    Err(why)
}

/// `$XDG_CACHE_HOME/boxlet/kernel-images` (else under `~/.cache`), when the cache
/// directory is this user's and nobody else may write it: a root boxlet run with another
/// user's `HOME` (sudo keeps it) must not build guest code where that user can swap it.
fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?;
    let ours = |p: &Path| {
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        std::fs::symlink_metadata(p)
            .is_ok_and(|m| m.is_dir() && m.uid() == uid && m.permissions().mode() & 0o022 == 0)
    };
    let dir = base.join("boxlet/kernel-images");
    let boxlet = base.join("boxlet");
    // Missing parts are made by us; existing ones must be ours.
    let trusted = [&base, &boxlet, &dir]
        .into_iter()
        .all(|p| !p.exists() || ours(p));
    trusted.then_some(dir)
}

/// `$TMPDIR/boxlet-UID-kernel-images`, made mode 0700 if missing, and trusted only when
/// it is this user's and nobody else's (anyone could have made it first in a shared
/// /tmp, and an image there is code the guest runs).
fn private_temp_dir() -> Option<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    let dir = std::env::temp_dir().join(format!("boxlet-{uid}-kernel-images"));
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    (meta.is_dir() && meta.uid() == uid && meta.permissions().mode() & 0o077 == 0).then_some(dir)
}

/// A complete image: the info file (entry, end) written before the image was renamed
/// into place.
fn open(img: &Path, info: &Path) -> Option<Image> {
    let file = File::open(img).ok()?;
    let len = file.metadata().ok()?.len();
    let mut text = String::new();
    File::open(info).ok()?.read_to_string(&mut text).ok()?;
    let mut words = text.split_whitespace().map(|w| w.parse::<u64>().ok());
    let (entry, kernel_end) = (words.next()??, words.next()??);
    (len % ALIGN == 0 && kernel_end <= len).then_some(Image {
        file,
        len,
        entry,
        kernel_end,
        paths: [img.to_path_buf(), info.to_path_buf()],
    })
}

/// Why an image could not be built.
enum Build {
    /// The kernel is not one this VMM boots.
    Kernel(String),
    /// The cache directory would not take it.
    Io(String),
}

fn build(kernel: &Path, load_from: u64, dir: &Path, img: &Path, info: &Path) -> Result<(), Build> {
    let io = |e: std::io::Error| Build::Io(e.to_string());
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
    tmp.as_file().set_len(SCRATCH).map_err(io)?;
    let scratch: GuestMemoryMmap = GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        SCRATCH as usize,
        Some(FileOffset::new(tmp.reopen().map_err(io)?, 0)),
    )])
    .map_err(|e| Build::Io(e.to_string()))?;
    let mut f = File::open(kernel).map_err(|e| Build::Kernel(e.to_string()))?;
    let loaded = Elf::load(&scratch, None, &mut f, Some(GuestAddress(load_from)))
        .map_err(|e| Build::Kernel(format!("not an ELF vmlinux: {e}")))?;
    let PvhBootCapability::PvhEntryPresent(entry) = loaded.pvh_boot_cap else {
        return Err(Build::Kernel("no PVH entry note (CONFIG_PVH)".into()));
    };
    drop(scratch);
    let len = loaded.kernel_end.div_ceil(ALIGN) * ALIGN;
    tmp.as_file().set_len(len).map_err(io)?;
    tmp.as_file().sync_all().map_err(io)?;
    let mut i = File::create(info).map_err(io)?;
    writeln!(i, "{} {}", entry.0, loaded.kernel_end).map_err(io)?;
    i.sync_all().map_err(io)?;
    tmp.persist(img).map_err(|e| Build::Io(e.to_string()))?;
    Ok(())
}

/// Guest RAM of `bytes`: `image` mapped privately (copy-on-write) from address 0, the
/// rest on a memfd (as the whole RAM is otherwise).
pub fn guest_memory(image: &Image, bytes: u64) -> Result<GuestMemoryMmap, String> {
    if image.len >= bytes {
        return Err(format!(
            "a kernel image of {} MiB leaves no RAM",
            image.len >> 20
        ));
    }
    let file = image.file.try_clone().map_err(|e| e.to_string())?;
    let low = MmapRegion::build(
        Some(FileOffset::new(file, 0)),
        image.len as usize,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_PRIVATE | libc::MAP_NORESERVE,
    )
    .map_err(|e| format!("mapping the kernel image: {e}"))?;
    let rest = bytes - image.len;
    let ram = crate::vmm::ram_file(rest).map_err(|e| e.to_string())?;
    let high =
        MmapRegion::from_file(FileOffset::new(ram, 0), rest as usize).map_err(|e| e.to_string())?;
    let regions = [
        GuestRegionMmap::new(low, GuestAddress(0)),
        GuestRegionMmap::new(high, GuestAddress(image.len)),
    ];
    let regions: Vec<_> = regions
        .into_iter()
        .map(|r| r.ok_or_else(|| "a region past the end of the address space".to_string()))
        .collect::<Result<_, _>>()?;
    GuestMemoryMmap::from_regions(regions).map_err(|e| e.to_string())
}
