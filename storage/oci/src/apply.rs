//! Secure layer application: one uncompressed tar layer applied onto a directory, as an
//! OCI runtime would see the result (whiteouts delete, opaque markers hide the lower
//! layers' contents of a directory).
//!
//! Nothing is ever written outside the root: every parent directory is opened with
//! `openat2(RESOLVE_IN_ROOT)` (see [`crate::fsat`]) and the entry is created by name in
//! it, with `O_NOFOLLOW | O_EXCL`. Metadata is set through the new file's own fd, never
//! by a path that a symlink could redirect. Entries whose path has a `..` component, and
//! hard links or whiteouts naming one, are refused with the entry named.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{
    fchmod, fchown, futimens, linkat, mknodat, symlinkat, AtFlags, FileType, Gid, Mode, OFlags,
    Timespec, Timestamps, Uid, XattrFlags,
};
use tar::EntryType;

use crate::fsat::{self, ensure_dir, kind_at, open_dir_path, open_dir_rw, remove_all_at};

/// What to do with device nodes in a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum DevicePolicy {
    /// Leave them out (counted in the report). Safe anywhere.
    #[default]
    Skip,
    /// Create them (needs CAP_MKNOD).
    Create,
    /// Fail the layer, naming the entry.
    Refuse,
}

/// How whiteouts are applied.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Whiteouts {
    /// Delete what they name: one directory holds the whole image.
    #[default]
    Apply,
    /// Keep them the way overlayfs reads a lower layer: a 0/0 character device per
    /// whiteout, `trusted.overlay.opaque=y` on an opaque directory (needs root).
    Overlay,
}

/// Image user and group ids moved into a range of host ids nobody on the host runs as:
/// id `n` is stored as `base + n`, so a set-user-ID-root file of the image is set-ID to
/// `base` on the host, which grants nothing. Ids past the range become the range's
/// `nobody` (65534). Whoever serves the tree to a guest maps the range back (virtiofsd
/// `--translate-uid map:0:<base>:65536`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdShift {
    base: u32,
}

impl IdShift {
    /// Ids in the range: image ids 0 to 65535.
    pub const COUNT: u32 = 65536;
    /// What an image id past the range becomes (before the shift).
    pub const OVERFLOW: u32 = 65534;

    /// The range starting at host id `base`; `None` when it would reach the id -1 (which
    /// `chown` reads as "leave as is") or start at 0.
    pub const fn new(base: u32) -> Option<IdShift> {
        if base == 0 || base > u32::MAX - Self::COUNT - 1 {
            None
        } else {
            Some(IdShift { base })
        }
    }

    /// The host id that image id 0 becomes.
    pub fn base(self) -> u32 {
        self.base
    }

    /// Whether `host` is one of the range's host ids.
    pub fn holds(self, host: u32) -> bool {
        (self.base..self.base + Self::COUNT).contains(&host)
    }

    /// The host id of image id `id`.
    pub fn host(self, id: u64) -> u32 {
        let id = if id < u64::from(Self::COUNT) {
            id as u32
        } else {
            Self::OVERFLOW
        };
        self.base + id
    }
}

/// Which of a layer's extended attributes reach the host, and under what names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum XattrPolicy {
    /// Only what is harmless on the host: `user.*` (not `user.overlay.*`, which an
    /// overlayfs mounted with `userxattr` obeys) and POSIX ACLs. `security.capability`
    /// (as good as a set-UID bit), `trusted.*` (overlayfs obeys `trusted.overlay.*`) and
    /// everything else are left out and counted.
    #[default]
    Safe,
    /// Every attribute kept, under `prefix` + its name: inert on the host, and given back
    /// under its own name by a file server that strips the prefix (virtiofsd
    /// `--xattrmap`). Names too long with the prefix are left out and counted.
    Prefixed(&'static str),
}

impl XattrPolicy {
    /// The host name of the layer attribute `name`, or `None` to leave it out.
    pub fn host_name(self, name: &[u8]) -> Option<Vec<u8>> {
        match self {
            Self::Safe => {
                let ok = (name.starts_with(b"user.") && !name.starts_with(b"user.overlay."))
                    || name == b"system.posix_acl_access"
                    || name == b"system.posix_acl_default";
                ok.then(|| name.to_vec())
            }
            Self::Prefixed(prefix) => {
                let full = [prefix.as_bytes(), name].concat();
                // XATTR_NAME_MAX
                (full.len() <= 255 && !name.is_empty()).then_some(full)
            }
        }
    }
}

/// What layers may make the applier write, at most: the ext4 builder's bounds
/// ([`boxlet_ext4::LayerLimits`]), so a layer that decompresses without end (a zstd or
/// gzip bomb) or holds millions of entries is refused, naming the layer, before it fills
/// the host's disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApplyLimits {
    /// Bytes of file contents.
    pub max_bytes: u64,
    /// Entries (files, directories, links, nodes, whiteouts).
    pub max_entries: u64,
    /// Components of a path.
    pub max_depth: usize,
}

impl Default for ApplyLimits {
    fn default() -> Self {
        let l = boxlet_ext4::LayerLimits::default();
        ApplyLimits {
            max_bytes: l.max_total_bytes,
            max_entries: l.max_entries as u64,
            max_depth: l.max_depth,
        }
    }
}

impl ApplyLimits {
    /// What is left after a layer did `r`.
    pub fn after(self, r: &ApplyReport) -> ApplyLimits {
        ApplyLimits {
            max_bytes: self.max_bytes.saturating_sub(r.bytes),
            max_entries: self.max_entries.saturating_sub(r.entries()),
            max_depth: self.max_depth,
        }
    }
}

/// How to apply layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApplyOptions {
    /// Bounds on what the layer may make.
    pub limits: ApplyLimits,
    /// Device nodes (FIFOs are always created: they are harmless).
    pub devices: DevicePolicy,
    /// Give entries their owners from the layer (needs CAP_CHOWN); otherwise the
    /// applier owns everything, and set-id bits are dropped.
    pub owners: bool,
    /// With `owners`: store the layer's ids shifted into an unprivileged range.
    pub id_shift: Option<IdShift>,
    /// Extended attributes.
    pub xattrs: XattrPolicy,
    /// Whiteouts and opaque directories.
    pub whiteouts: Whiteouts,
}

impl Default for ApplyOptions {
    /// Devices skipped; owners kept when running as root, unshifted; safe xattrs only.
    fn default() -> Self {
        ApplyOptions {
            limits: ApplyLimits::default(),
            devices: DevicePolicy::Skip,
            owners: rustix::process::geteuid().is_root(),
            id_shift: None,
            xattrs: XattrPolicy::Safe,
            whiteouts: Whiteouts::Apply,
        }
    }
}

impl ApplyOptions {
    /// The host uid and gid of an entry.
    fn ids(&self, header: &tar::Header) -> io::Result<(Uid, Gid)> {
        let (uid, gid) = (header.uid()?, header.gid()?);
        Ok(match self.id_shift {
            Some(s) => (Uid::from_raw(s.host(uid)), Gid::from_raw(s.host(gid))),
            None => (Uid::from_raw(uid as u32), Gid::from_raw(gid as u32)),
        })
    }
}

/// What a layer did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Regular files written.
    pub files: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Directories created or updated.
    pub dirs: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Hard links.
    pub hardlinks: u64,
    /// Device nodes and FIFOs created.
    pub nodes: u64,
    /// Device nodes left out by [`DevicePolicy::Skip`].
    pub devices_skipped: u64,
    /// Whiteouts and opaque markers applied.
    pub whiteouts: u64,
    /// Extended attributes left out by the [`XattrPolicy`] or refused by the file system
    /// (counted, not fatal).
    pub xattrs_skipped: u64,
}

impl ApplyReport {
    /// Entries the layer applied (or left out).
    pub fn entries(&self) -> u64 {
        self.files
            + self.dirs
            + self.symlinks
            + self.hardlinks
            + self.nodes
            + self.devices_skipped
            + self.whiteouts
    }
}

/// Why a layer could not be applied.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The entry is refused (it would escape the root, or it is malformed).
    #[error("layer entry {entry:?}: {reason}")]
    Refused {
        /// The entry's path as the layer names it.
        entry: String,
        /// Why.
        reason: String,
    },
    /// Applying the entry failed.
    #[error("layer entry {entry:?}: {op}: {source}")]
    Io {
        /// The entry's path as the layer names it.
        entry: String,
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The tar stream itself is unreadable.
    #[error("reading the layer: {0}")]
    Read(#[source] io::Error),
}

const WHITEOUT: &[u8] = b".wh.";
const OPAQUE: &[u8] = b".wh..wh..opq";

/// A layer's path split into components: `.` and empty ones dropped, `..` refused. A
/// leading `/` is the root (layers are always relative to it).
fn components(path: &[u8]) -> Result<Vec<&[u8]>, &'static str> {
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("the path has a '..' component"),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Apply the uncompressed tar `layer` onto the directory `root`.
pub fn apply_layer(
    root: &Path,
    layer: impl Read,
    opts: &ApplyOptions,
) -> Result<ApplyReport, ApplyError> {
    let root_fd: OwnedFd = File::open(root)
        .map_err(|e| ApplyError::Io {
            entry: String::new(),
            op: "opening the root directory",
            source: e,
        })?
        .into();
    let mut applier = Applier {
        root: root_fd,
        opts: *opts,
        report: ApplyReport::default(),
        written: HashSet::new(),
        dir_times: Vec::new(),
        buf: vec![0u8; 256 << 10],
    };
    // Metadata records (long names, PAX headers) capped before the tar parser buffers
    // them whole.
    let guarded = boxlet_ext4::TarGuard::new(layer, boxlet_ext4::MAX_TAR_RECORD);
    let mut archive = tar::Archive::new(guarded);
    for entry in archive.entries().map_err(ApplyError::Read)? {
        let mut entry = entry.map_err(ApplyError::Read)?;
        applier.entry(&mut entry)?;
    }
    applier.finish_dirs()?;
    Ok(applier.report)
}

struct Applier {
    root: OwnedFd,
    opts: ApplyOptions,
    report: ApplyReport,
    /// Paths this layer wrote: an opaque marker hides everything else in its directory.
    written: HashSet<Vec<u8>>,
    /// Directory times, set at the end (entries written into a directory change them).
    dir_times: Vec<(Vec<u8>, u64)>,
    buf: Vec<u8>,
}

impl Applier {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ApplyError> {
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let refuse = |reason: &str| ApplyError::Refused {
            entry: shown.clone(),
            reason: reason.to_string(),
        };
        let io_err = |op: &'static str| {
            let entry = shown.clone();
            move |source: io::Error| ApplyError::Io { entry, op, source }
        };
        let comps = components(&raw).map_err(refuse)?;
        let kind = entry.header().entry_type();
        let limits = self.opts.limits;
        if self.report.entries() >= limits.max_entries {
            return Err(refuse(&format!(
                "more than {} entries in the image",
                limits.max_entries
            )));
        }
        if comps.len() > limits.max_depth {
            return Err(refuse(&format!(
                "deeper than {} components",
                limits.max_depth
            )));
        }

        let Some((&name, parents)) = comps.split_last() else {
            // The root itself: only a directory entry may describe it.
            if kind != EntryType::Directory {
                return Err(refuse("the entry would replace the root directory"));
            }
            let fd = open_dir_rw(&self.root, b"").map_err(io_err("opening the root"))?;
            self.set_meta(&fd, entry.header())
                .map_err(io_err("setting metadata"))?;
            self.dir_times
                .push((Vec::new(), entry.header().mtime().unwrap_or(0)));
            self.report.dirs += 1;
            return Ok(());
        };
        let parent =
            ensure_dir(&self.root, parents).map_err(io_err("opening the parent directory"))?;
        let rel = comps.join(&b'/');

        if name == OPAQUE && self.opts.whiteouts == Whiteouts::Overlay {
            let dir = open_dir_rw(&self.root, &parents.join(&b'/'))
                .map_err(io_err("opening the opaque directory"))?;
            rustix::fs::fsetxattr(&dir, "trusted.overlay.opaque", b"y", XattrFlags::empty())
                .map_err(|e| io_err("marking the directory opaque")(e.into()))?;
            self.report.whiteouts += 1;
            return Ok(());
        }
        if name == OPAQUE {
            let dir_rel = parents.join(&b'/');
            let dir = open_dir_rw(&self.root, &dir_rel)
                .map_err(io_err("opening the opaque directory"))?;
            for child in fsat::entries(&dir).map_err(io_err("listing the opaque directory"))? {
                let mut child_rel = dir_rel.clone();
                if !child_rel.is_empty() {
                    child_rel.push(b'/');
                }
                child_rel.extend_from_slice(&child);
                if !self.written.contains(&child_rel) {
                    remove_all_at(&dir, &child).map_err(io_err("clearing the opaque directory"))?;
                }
            }
            self.report.whiteouts += 1;
            return Ok(());
        }
        if let Some(hidden) = name.strip_prefix(WHITEOUT) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(refuse("the whiteout names no file of its directory"));
            }
            remove_all_at(&parent, hidden).map_err(io_err("applying the whiteout"))?;
            if self.opts.whiteouts == Whiteouts::Overlay {
                mknodat(
                    &parent,
                    OsStr::from_bytes(hidden),
                    FileType::CharacterDevice,
                    Mode::empty(),
                    rustix::fs::makedev(0, 0),
                )
                .map_err(|e| io_err("recording the whiteout")(e.into()))?;
            }
            self.report.whiteouts += 1;
            return Ok(());
        }

        // Whatever is there goes, unless a directory meets a directory (they merge).
        let existing = kind_at(&parent, name).map_err(io_err("looking at the existing entry"))?;
        let merge = kind == EntryType::Directory && existing == Some(FileType::Directory);
        if existing.is_some() && !merge {
            remove_all_at(&parent, name).map_err(io_err("replacing the existing entry"))?;
        }
        let os_name = OsStr::from_bytes(name);
        let header = entry.header().clone();
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let fd = rustix::fs::openat(
                    &parent,
                    os_name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| io_err("creating the file")(e.into()))?;
                let mut file = File::from(fd);
                let budget = limits.max_bytes.saturating_sub(self.report.bytes);
                let n = copy(
                    &mut entry.take(budget.saturating_add(1)),
                    &mut file,
                    &mut self.buf,
                )
                .map_err(io_err("writing the file"))?;
                if n > budget {
                    return Err(refuse(&format!(
                        "the image's files hold more than {} bytes",
                        limits.max_bytes
                    )));
                }
                self.xattrs(entry, &file);
                self.set_meta(&file, &header)
                    .map_err(io_err("setting metadata"))?;
                self.report.files += 1;
                self.report.bytes += n;
            }
            EntryType::Directory => {
                if !merge {
                    rustix::fs::mkdirat(&parent, os_name, Mode::from_raw_mode(0o700))
                        .map_err(|e| io_err("creating the directory")(e.into()))?;
                }
                let fd = rustix::fs::openat(
                    &parent,
                    os_name,
                    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|e| io_err("opening the directory")(e.into()))?;
                self.xattrs(entry, &fd);
                self.set_meta(&fd, &header)
                    .map_err(io_err("setting metadata"))?;
                self.dir_times
                    .push((rel.clone(), header.mtime().unwrap_or(0)));
                self.report.dirs += 1;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| refuse("the symlink has no target"))?;
                symlinkat(OsStr::from_bytes(&target), &parent, os_name)
                    .map_err(|e| io_err("creating the symlink")(e.into()))?;
                self.set_meta_at(&parent, name, &header)
                    .map_err(io_err("setting metadata"))?;
                self.report.symlinks += 1;
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| refuse("the hard link has no target"))?;
                let tcomps = components(&target)
                    .map_err(|r| refuse(&format!("the hard link's target: {r}")))?;
                let Some((&tname, tparents)) = tcomps.split_last() else {
                    return Err(refuse("the hard link's target is the root"));
                };
                let tparent = open_dir_path(&self.root, &tparents.join(&b'/'))
                    .map_err(io_err("opening the hard link's target directory"))?;
                linkat(
                    &tparent,
                    OsStr::from_bytes(tname),
                    &parent,
                    os_name,
                    AtFlags::empty(),
                )
                .map_err(|e| io_err("creating the hard link")(e.into()))?;
                self.report.hardlinks += 1;
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let ftype = match kind {
                    EntryType::Char => FileType::CharacterDevice,
                    EntryType::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                if ftype != FileType::Fifo {
                    match self.opts.devices {
                        DevicePolicy::Skip => {
                            self.report.devices_skipped += 1;
                            return Ok(());
                        }
                        DevicePolicy::Refuse => return Err(refuse("device nodes are refused")),
                        DevicePolicy::Create => {}
                    }
                }
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                let mode = Mode::from_raw_mode(header.mode().unwrap_or(0o600) & 0o777);
                mknodat(
                    &parent,
                    os_name,
                    ftype,
                    mode,
                    rustix::fs::makedev(major, minor),
                )
                .map_err(|e| io_err("creating the node")(e.into()))?;
                self.set_meta_at(&parent, name, &header)
                    .map_err(io_err("setting metadata"))?;
                // mknod applied the umask; set the mode on exactly the node just made.
                let mode = header.mode().unwrap_or(0o600) & 0o7777;
                chmod_node(&parent, name, ftype, mode, self.opts.owners)
                    .map_err(io_err("setting the node's mode"))?;
                self.report.nodes += 1;
            }
            other => {
                tracing::warn!(entry = %shown, kind = ?other, "skipping a layer entry of an unsupported type");
                return Ok(());
            }
        }
        // The entry and its parents (which this layer may have created implicitly).
        for (i, _) in rel.iter().enumerate().filter(|&(_, &b)| b == b'/') {
            self.written.insert(rel[..i].to_vec());
        }
        self.written.insert(rel);
        Ok(())
    }

    /// Owner, mode and times through the entry's own fd.
    fn set_meta(&self, fd: &impl AsFd, header: &tar::Header) -> io::Result<()> {
        let mut mode = header.mode()? & 0o7777;
        if self.opts.owners {
            let (uid, gid) = self.opts.ids(header)?;
            fchown(fd, Some(uid), Some(gid))?;
        } else {
            mode &= 0o1777;
        }
        // After chown, which clears set-id bits.
        fchmod(fd, Mode::from_raw_mode(mode))?;
        let t = timestamp(header.mtime().unwrap_or(0));
        futimens(
            fd,
            &Timestamps {
                last_access: t,
                last_modification: t,
            },
        )?;
        Ok(())
    }

    /// Owner and times of a symlink or node, by name in its parent, not following it.
    fn set_meta_at(&self, parent: &OwnedFd, name: &[u8], header: &tar::Header) -> io::Result<()> {
        let os = OsStr::from_bytes(name);
        if self.opts.owners {
            let (uid, gid) = self.opts.ids(header)?;
            rustix::fs::chownat(parent, os, Some(uid), Some(gid), AtFlags::SYMLINK_NOFOLLOW)?;
        }
        let t = timestamp(header.mtime().unwrap_or(0));
        rustix::fs::utimensat(
            parent,
            os,
            &Timestamps {
                last_access: t,
                last_modification: t,
            },
            AtFlags::SYMLINK_NOFOLLOW,
        )?;
        Ok(())
    }

    /// Extended attributes from PAX records (`SCHILY.xattr.NAME`), as the policy names
    /// them on the host, set through the fd.
    fn xattrs<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, fd: &impl AsFd) {
        let Ok(Some(exts)) = entry.pax_extensions() else {
            return;
        };
        for ext in exts.flatten() {
            let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") else {
                continue;
            };
            let Some(host) = self.opts.xattrs.host_name(name) else {
                self.report.xattrs_skipped += 1;
                continue;
            };
            if rustix::fs::fsetxattr(
                fd,
                OsStr::from_bytes(&host),
                ext.value_bytes(),
                XattrFlags::empty(),
            )
            .is_err()
            {
                self.report.xattrs_skipped += 1;
            }
        }
    }

    /// Set the directories' times, now that nothing more is written into them.
    fn finish_dirs(&mut self) -> Result<(), ApplyError> {
        for (rel, mtime) in self.dir_times.drain(..).rev() {
            let fd = open_dir_rw(&self.root, &rel).map_err(|source| ApplyError::Io {
                entry: String::from_utf8_lossy(&rel).into_owned(),
                op: "setting the directory's times",
                source,
            })?;
            let t = timestamp(mtime);
            futimens(
                &fd,
                &Timestamps {
                    last_access: t,
                    last_modification: t,
                },
            )
            .map_err(|e| ApplyError::Io {
                entry: String::from_utf8_lossy(&rel).into_owned(),
                op: "setting the directory's times",
                source: e.into(),
            })?;
        }
        Ok(())
    }
}

/// chmod the node `name` in `parent` without following a symlink put in its place: through
/// an `O_PATH` fd of it and its `/proc/self/fd` link (a node cannot be opened for real
/// without side effects, and `fchmod` refuses `O_PATH` fds).
fn chmod_node(
    parent: &OwnedFd,
    name: &[u8],
    kind: FileType,
    mode: u32,
    owners: bool,
) -> io::Result<()> {
    let fd = rustix::fs::openat(
        parent,
        OsStr::from_bytes(name),
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    if FileType::from_raw_mode(rustix::fs::fstat(&fd)?.st_mode) != kind {
        return Err(io::Error::other("the node was replaced while it was made"));
    }
    let mode = if owners { mode } else { mode & 0o1777 };
    let path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
    rustix::fs::chmod(path.as_str(), Mode::from_raw_mode(mode))?;
    Ok(())
}

fn timestamp(secs: u64) -> Timespec {
    Timespec {
        tv_sec: secs.min(i64::MAX as u64) as i64,
        tv_nsec: 0,
    }
}

/// Copy `src` to `dst` through `buf`; the bytes copied.
fn copy(src: &mut impl Read, dst: &mut File, buf: &mut [u8]) -> io::Result<u64> {
    let mut total = 0;
    loop {
        let n = match src.read(buf) {
            Ok(0) => return Ok(total),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        dst.write_all(&buf[..n])?;
        total += n as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::{components, IdShift, XattrPolicy};

    #[test]
    fn only_harmless_xattrs_reach_the_host_unless_prefixed() {
        let safe = XattrPolicy::Safe;
        for ok in [
            &b"user.mime_type"[..],
            b"system.posix_acl_access",
            b"system.posix_acl_default",
        ] {
            assert_eq!(safe.host_name(ok).as_deref(), Some(ok));
        }
        for bad in [
            &b"security.capability"[..],
            b"trusted.overlay.opaque",
            b"trusted.overlay.redirect",
            b"user.overlay.opaque",
            b"security.selinux",
            b"system.nfs4_acl",
        ] {
            assert_eq!(
                safe.host_name(bad),
                None,
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let pre = XattrPolicy::Prefixed("user.virtiofs.");
        assert_eq!(
            pre.host_name(b"trusted.overlay.opaque").unwrap(),
            b"user.virtiofs.trusted.overlay.opaque"
        );
        assert_eq!(
            pre.host_name(&[b'a'; 242]),
            None,
            "too long with the prefix"
        );
        assert!(pre.host_name(&[b'a'; 241]).is_some());
    }

    #[test]
    fn shifted_ids_stay_in_their_range() {
        let s = IdShift::new(1_000_000).unwrap();
        assert_eq!(s.host(0), 1_000_000);
        assert_eq!(s.host(65535), 1_065_535);
        assert_eq!(s.host(65536), 1_065_534);
        assert_eq!(s.host(u64::MAX), 1_065_534);
        assert!(s.holds(1_000_000) && s.holds(1_065_535));
        assert!(!s.holds(999_999) && !s.holds(1_065_536));
        assert!(IdShift::new(0).is_none());
        assert!(IdShift::new(u32::MAX - 65536).is_none(), "would reach -1");
        let top = IdShift::new(u32::MAX - 65537).unwrap();
        assert_eq!(top.host(65535), u32::MAX - 2);
    }

    #[test]
    fn paths_are_split_and_dot_dot_is_refused() {
        assert_eq!(
            components(b"./usr//bin/./sh").unwrap(),
            [&b"usr"[..], b"bin", b"sh"]
        );
        assert_eq!(
            components(b"/etc/passwd").unwrap(),
            [&b"etc"[..], b"passwd"]
        );
        assert!(components(b"./").unwrap().is_empty());
        assert!(components(b"a/../../b").is_err());
        assert!(components(b"..").is_err());
        assert_eq!(
            components(b"a/..b/c..").unwrap(),
            [&b"a"[..], b"..b", b"c.."]
        );
    }
}
