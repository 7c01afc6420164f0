//! boxlet's home directory (`$BOXLET_HOME`, default `~/.boxlet`) and the lock that gives
//! one runtime process a home to itself.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use boxlet_cas::BoxId;

use crate::rootfs::RootfsError;

/// The directories of a home.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// The home at `root`.
    pub fn new(root: impl Into<PathBuf>) -> Home {
        Home { root: root.into() }
    }

    /// `$BOXLET_HOME`, else `~/.boxlet`.
    pub fn from_env() -> Result<Home, RootfsError> {
        if let Some(h) = std::env::var_os("BOXLET_HOME").filter(|h| !h.is_empty()) {
            return Ok(Home::new(h));
        }
        match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
            Some(h) => Ok(Home::new(PathBuf::from(h).join(".boxlet"))),
            None => Err(RootfsError::Invalid {
                what: "$BOXLET_HOME".into(),
                reason: "neither BOXLET_HOME nor HOME is set".into(),
            }),
        }
    }

    /// The home's root (also the content store's).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Versioned base disks.
    pub fn bases(&self) -> PathBuf {
        self.root.join("bases")
    }

    /// Per-image caches (extracted trees, image disks).
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }

    /// Unpacked layers (OverlayMount), by diff ID.
    pub fn layers(&self) -> PathBuf {
        self.root.join("layers")
    }

    /// Per-box directories.
    pub fn boxes(&self) -> PathBuf {
        self.root.join("boxes")
    }

    /// Staging (same file system as `bases/` and `images/`, so installs are renames).
    pub fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// A box's directory.
    pub fn box_dir(&self, id: BoxId) -> PathBuf {
        self.boxes().join(id.as_str())
    }

    /// A box's disk: the qcow2 overlay of its base (the name GC looks for).
    pub fn box_disk(&self, id: BoxId) -> PathBuf {
        self.box_dir(id).join("disks").join("guest-rootfs.qcow2")
    }

    /// Create the directories (the root private to this user: see
    /// [`boxlet_cas::private_dir`]), and check that staging and the caches share a file system
    /// (installs are atomic renames).
    pub fn prepare(&self) -> Result<(), RootfsError> {
        boxlet_cas::private_dir(&self.root)?;
        let mut dev = None;
        for dir in [self.tmp(), self.bases(), self.images(), self.boxes()] {
            std::fs::create_dir_all(&dir).map_err(RootfsError::io("creating", &dir))?;
            let d = std::fs::metadata(&dir)
                .map_err(RootfsError::io("reading", &dir))?
                .dev();
            if dir != self.boxes() && *dev.get_or_insert(d) != d {
                return Err(RootfsError::Invalid {
                    what: dir.display().to_string(),
                    reason: format!(
                        "not on the same file system as {}: installs must be renames",
                        self.tmp().display()
                    ),
                });
            }
        }
        self.migrate_caches()
    }

    /// The cache format file: what the directory strategies' caches hold.
    fn cache_format_file(&self) -> PathBuf {
        self.root.join("cache-format")
    }

    /// Caches of another format (extracted trees under `images/`, unpacked layers under
    /// `layers/`) are moved into `tmp/`, which the store sweeps when it opens; they are
    /// built again in this format when a box needs them.
    fn migrate_caches(&self) -> Result<(), RootfsError> {
        let file = self.cache_format_file();
        let found = std::fs::read_to_string(&file).unwrap_or_default();
        if found.trim() == CACHE_FORMAT.to_string() {
            return Ok(());
        }
        let mut moved = 0;
        for dir in [self.images(), self.layers()] {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries {
                let entry = entry.map_err(RootfsError::io("listing", &dir))?;
                if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                    continue; // image disks (ext4) are not affected
                }
                let to = self
                    .tmp()
                    .join(format!("old-cache-{}", boxlet_cas::BoxId::mint()));
                std::fs::rename(entry.path(), &to)
                    .map_err(RootfsError::io("moving an old cache aside", entry.path()))?;
                moved += 1;
            }
        }
        if moved > 0 {
            tracing::info!(
                moved,
                "caches of format {:?} moved aside: they are rebuilt in format {CACHE_FORMAT}",
                found.trim()
            );
        }
        std::fs::write(&file, format!("{CACHE_FORMAT}\n"))
            .map_err(RootfsError::io("writing", &file))
    }
}

/// The format of the directory strategies' caches. 2: image ids shifted into
/// [`crate::rootfs::CACHE_IDS`] (when built as root), image xattrs under `user.virtiofs.`,
/// no device nodes.
pub const CACHE_FORMAT: u32 = 2;

/// An exclusive lock on a home (`flock` on `.lock`), held while this value lives. The
/// holder's pid is written in the file, so a second runtime is told who has it.
#[derive(Debug)]
pub struct RuntimeLock {
    _file: File,
    path: PathBuf,
}

impl RuntimeLock {
    /// Take the lock of the home at `root`, or fail naming the process holding it.
    pub fn acquire(root: &Path) -> Result<RuntimeLock, RootfsError> {
        boxlet_cas::private_dir(root)?;
        let path = root.join(".lock");
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(RootfsError::io("opening", &path))?;
        if let Err(e) =
            rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
        {
            if e == rustix::io::Errno::WOULDBLOCK {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                return Err(RootfsError::Locked {
                    path,
                    pid: pid.trim().to_string(),
                });
            }
            return Err(RootfsError::io("locking", &path)(e.into()));
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(RootfsError::io("writing", &path))?;
        Ok(RuntimeLock { _file: file, path })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_runtime_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let lock = RuntimeLock::acquire(dir.path()).unwrap();
        match RuntimeLock::acquire(dir.path()) {
            Err(RootfsError::Locked { pid, path }) => {
                assert_eq!(pid, std::process::id().to_string());
                assert_eq!(path, lock.path());
            }
            other => panic!("expected the lock to be refused: {other:?}"),
        }
        // Another process is refused too.
        let out = std::process::Command::new("flock")
            .args(["-n", lock.path().to_str().unwrap(), "true"])
            .status()
            .unwrap();
        assert!(!out.success(), "flock(1) got the lock");
        drop(lock);
        RuntimeLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn caches_of_an_older_format_are_moved_aside_once() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path().join("home"));
        std::fs::create_dir_all(home.images().join("abc/rootfs")).unwrap();
        std::fs::create_dir_all(home.layers().join("def")).unwrap();
        std::fs::write(home.images().join("image-abc.ext4"), b"disk").unwrap();
        home.prepare().unwrap();
        assert!(!home.images().join("abc").exists());
        assert!(!home.layers().join("def").exists());
        assert!(home.images().join("image-abc.ext4").exists(), "disks stay");
        let aside: Vec<_> = std::fs::read_dir(home.tmp()).unwrap().collect();
        assert_eq!(aside.len(), 2, "both in tmp/, for the store to sweep");
        // Caches made in this format stay.
        std::fs::create_dir_all(home.images().join("new/rootfs")).unwrap();
        home.prepare().unwrap();
        assert!(home.images().join("new/rootfs").exists());
    }

    #[test]
    fn prepare_makes_the_directories() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path().join("home"));
        home.prepare().unwrap();
        for d in [home.tmp(), home.bases(), home.images(), home.boxes()] {
            assert!(d.is_dir(), "{}", d.display());
        }
        let id = BoxId::parse("aB3xQ9mP").unwrap();
        assert_eq!(
            home.box_disk(id),
            dir.path()
                .join("home/boxes/aB3xQ9mP/disks/guest-rootfs.qcow2")
        );
    }
}
