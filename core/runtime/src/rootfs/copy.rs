//! Copying disk images without copying bytes where the file system allows: a reflink
//! (`FICLONE`: the copy shares extents until either side writes), else a copy of the data
//! segments only (`SEEK_DATA`/`SEEK_HOLE` + `copy_file_range`), so holes stay holes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::rootfs::RootfsError;

/// How [`copy_file`] copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMethod {
    /// A reflink: no data was copied.
    Reflink,
    /// The data segments were copied; holes were kept.
    Sparse,
}

/// Copy `src` to the new file `dst` (which must not exist), by reflink when possible, and
/// sync it.
pub fn copy_file(src: &Path, dst: &Path) -> Result<CopyMethod, RootfsError> {
    copy_file_with(src, dst, true)
}

/// [`copy_file`], syncing `dst` only when `sync` (a tree copy syncs once at its end).
pub(crate) fn copy_file_with(
    src: &Path,
    dst: &Path,
    sync: bool,
) -> Result<CopyMethod, RootfsError> {
    let from = File::open(src).map_err(RootfsError::io("opening", src))?;
    let len = from
        .metadata()
        .map_err(RootfsError::io("reading", src))?
        .len();
    let to = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(dst)
        .map_err(RootfsError::io("creating", dst))?;
    let result = match rustix::fs::ioctl_ficlone(&to, &from) {
        Ok(()) => Ok(CopyMethod::Reflink),
        Err(_) => sparse_copy(&from, &to, len).map(|()| CopyMethod::Sparse),
    }
    .and_then(|m| {
        if sync {
            to.sync_all().map(|()| m)
        } else {
            Ok(m)
        }
    });
    match result {
        Ok(m) => Ok(m),
        Err(e) => {
            let _ = std::fs::remove_file(dst);
            Err(RootfsError::io("copying to", dst)(e))
        }
    }
}

/// Whether the file system of `dir` makes reflinks (tried on two scratch files there).
pub fn reflinks_supported(dir: &Path) -> bool {
    let Ok(scratch) = tempfile::tempdir_in(dir) else {
        return false;
    };
    let (a, b) = (scratch.path().join("a"), scratch.path().join("b"));
    let made = std::fs::write(&a, b"reflink probe").and_then(|()| {
        let from = File::open(&a)?;
        let to = File::create(&b)?;
        Ok(rustix::fs::ioctl_ficlone(&to, &from).is_ok())
    });
    made.unwrap_or(false)
}

fn sparse_copy(from: &File, to: &File, len: u64) -> io::Result<()> {
    to.set_len(len)?;
    let mut pos = 0u64;
    while pos < len {
        // The next data segment; past the last one there is only a hole.
        let start = match rustix::fs::seek(from, rustix::fs::SeekFrom::Data(pos))
            .map_err(io::Error::from)
        {
            Ok(s) => s,
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::NXIO.raw_os_error()) => break,
            Err(e) => return Err(e),
        };
        let end = rustix::fs::seek(from, rustix::fs::SeekFrom::Hole(start))?.min(len);
        let mut off_in = start;
        let mut off_out = start;
        while off_in < end {
            let want = (end - off_in).min(1 << 30) as usize;
            let n = match rustix::fs::copy_file_range(
                from,
                Some(&mut off_in),
                to,
                Some(&mut off_out),
                want,
            ) {
                // Between two file systems (a box's quota file system and the cache)
                // the kernel may not copy in place: through a buffer, then.
                Err(
                    rustix::io::Errno::XDEV
                    | rustix::io::Errno::OPNOTSUPP
                    | rustix::io::Errno::NOSYS,
                ) => {
                    let n = buffered_copy(from, to, off_in, end)?;
                    off_in += n;
                    off_out += n;
                    n as usize
                }
                r => r?,
            };
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the source shrank while copied",
                ));
            }
        }
        pos = end;
    }
    Ok(())
}

/// Copy `from`'s bytes `start..end` to the same place in `to` through a buffer;
/// returns how many were copied (fewer only at the source's end).
fn buffered_copy(from: &File, to: &File, start: u64, end: u64) -> io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = start;
    while pos < end {
        let want = ((end - pos) as usize).min(buf.len());
        let n = from.read_at(&mut buf[..want], pos)?;
        if n == 0 {
            break;
        }
        to.write_all_at(&buf[..n], pos)?;
        pos += n as u64;
    }
    Ok(pos - start)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_sparse_file_is_copied_with_its_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src.img");
        let mut f = File::create(&src).unwrap();
        f.set_len(64 << 20).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&[7u8; 8192]).unwrap();
        f.seek(SeekFrom::Start(40 << 20)).unwrap();
        f.write_all(b"tail of the data").unwrap();
        f.sync_all().unwrap();
        drop(f);

        let dst = dir.path().join("dst.img");
        let method = copy_file(&src, &dst).unwrap();
        assert_eq!(
            reflinks_supported(dir.path()),
            method == CopyMethod::Reflink
        );
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        let blocks = std::fs::metadata(&dst).unwrap().blocks() * 512;
        if method == CopyMethod::Sparse {
            assert!(
                blocks < 1 << 20,
                "{blocks} bytes allocated for 16 KiB of data"
            );
        }
        // The destination must be new.
        let err = copy_file(&src, &dst).unwrap_err();
        assert!(err.to_string().contains("dst.img"), "{err}");
    }
}
