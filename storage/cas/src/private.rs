//! The store's root is private to the user who owns it: created 0700, and refused when it
//! belongs to someone else or others may write to it. Everything under it (blobs, images,
//! box disks and sockets) is then out of other local users' reach, whatever its own mode.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

use crate::error::{CasError, Result};

/// Make `dir` (and its parents) if missing, the last one with mode 0700, then check it:
/// a directory, owned by this process's effective user, writable by nobody else, and
/// every directory above it owned by root or this user and writable by no one else
/// unless sticky (as sshd's StrictModes has it: whoever may rename a parent may swap the
/// store for one of their own). A directory only others can read or search (an older
/// boxlet's 0755) is narrowed to 0700.
pub fn private_dir(dir: &Path) -> Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(CasError::io("creating", parent))?;
    }
    match fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(CasError::io("creating", dir)(e)),
    }
    let insecure = |reason: String| CasError::Insecure {
        path: dir.to_path_buf(),
        reason,
    };
    let meta = fs::metadata(dir).map_err(CasError::io("reading", dir))?;
    if !meta.is_dir() {
        return Err(insecure("not a directory".into()));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != me {
        return Err(insecure(format!(
            "owned by uid {}, not by this user (uid {me}): another user could change what \
             boxes run",
            meta.uid()
        )));
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(insecure(format!(
            "mode {mode:04o} lets other users write to it: check what it holds, then \
             `chmod 700 {}`",
            dir.display()
        )));
    }
    // The path as given, then as resolved: every symlink on the way owned by root or
    // this user (one another user left in a sticky directory could point anywhere), and
    // every directory above as below.
    let given = std::path::absolute(dir).map_err(CasError::io("resolving", dir))?;
    for p in given.ancestors() {
        let Ok(m) = fs::symlink_metadata(p) else {
            continue;
        };
        if m.file_type().is_symlink() && m.uid() != 0 && m.uid() != me {
            return Err(insecure(format!(
                "{} on its path is a symlink of uid {}: that user could point it elsewhere",
                p.display(),
                m.uid()
            )));
        }
    }
    let real = fs::canonicalize(dir).map_err(CasError::io("resolving", dir))?;
    let given_dirs = given
        .ancestors()
        .skip(1)
        .filter(|p| fs::symlink_metadata(p).is_ok_and(|m| m.is_dir()));
    for above in real.ancestors().skip(1).chain(given_dirs) {
        let m = fs::metadata(above).map_err(CasError::io("reading", above))?;
        let (uid, mode) = (m.uid(), m.mode() & 0o7777);
        if uid != 0 && uid != me {
            return Err(insecure(format!(
                "{} above it is owned by uid {uid}: that user could move the store away \
                 and put another in its place",
                above.display()
            )));
        }
        if mode & 0o022 != 0 && mode & 0o1000 == 0 {
            return Err(insecure(format!(
                "{} above it has mode {mode:04o}: other users could move the store away \
                 and put another in its place",
                above.display()
            )));
        }
    }
    if mode & 0o077 != 0 {
        tracing::warn!(
            dir = %dir.display(),
            "narrowing the store's mode from {mode:04o} to 0700"
        );
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(CasError::io("narrowing the mode of", dir))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn a_store_under_a_directory_another_user_controls_is_refused() {
        use std::os::unix::fs::chown;
        let dir = tempfile::tempdir().unwrap();
        // A parent another user owns (only root can make one for the test).
        if rustix::process::geteuid().is_root() {
            let theirs = dir.path().join("theirs");
            fs::create_dir(&theirs).unwrap();
            chown(&theirs, Some(12345), Some(12345)).unwrap();
            let e = private_dir(&theirs.join("home")).unwrap_err().to_string();
            assert!(e.contains("owned by uid 12345"), "{e}");
        }
        // A parent anyone may write to, without the sticky bit.
        let open = dir.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let e = private_dir(&open.join("home")).unwrap_err().to_string();
        assert!(e.contains("mode 0777"), "{e}");
        // With the sticky bit (as /tmp has it) others cannot move what is ours.
        fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).unwrap();
        private_dir(&open.join("home2")).unwrap();
        // A path through a directory another user controls, by a symlink that leads to
        // a safe place, is as unsafe: they could point it elsewhere.
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let safe = dir.path().join("safe");
        fs::create_dir(&safe).unwrap();
        std::os::unix::fs::symlink(&safe, open.join("link")).unwrap();
        let e = private_dir(&open.join("link/home"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("mode 0777"), "{e}");
        if rustix::process::geteuid().is_root() {
            // Someone else's symlink in a sticky directory.
            fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).unwrap();
            let theirs = open.join("their-link");
            std::os::unix::fs::symlink(&safe, &theirs).unwrap();
            std::os::unix::fs::lchown(&theirs, Some(12345), Some(12345)).unwrap();
            let e = private_dir(&theirs).unwrap_err().to_string();
            assert!(e.contains("symlink of uid 12345"), "{e}");
        }
    }

    #[test]
    fn a_new_root_is_0700_and_an_old_0755_one_is_narrowed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("a/b/home");
        private_dir(&root).unwrap();
        assert_eq!(mode(&root), 0o700);
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&root).unwrap();
        assert_eq!(mode(&root), 0o700);
    }

    #[test]
    fn a_root_others_may_write_to_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        for m in [0o777, 0o770, 0o1777] {
            fs::set_permissions(dir.path(), fs::Permissions::from_mode(m)).unwrap();
            let e = private_dir(dir.path()).unwrap_err().to_string();
            assert!(e.contains(&dir.path().display().to_string()), "{e}");
            assert!(e.contains("other users write"), "{e}");
            assert_eq!(mode(dir.path()), m, "left as it was");
        }
    }

    #[test]
    fn a_root_owned_by_another_user_is_refused() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root to give a directory away");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("home");
        fs::create_dir(&root).unwrap();
        std::os::unix::fs::chown(&root, Some(65534), Some(65534)).unwrap();
        let e = private_dir(&root).unwrap_err().to_string();
        assert!(e.contains("owned by uid 65534"), "{e}");
    }

    #[test]
    fn a_file_is_not_a_root() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        fs::write(&f, b"").unwrap();
        assert!(private_dir(&f).is_err());
    }
}
