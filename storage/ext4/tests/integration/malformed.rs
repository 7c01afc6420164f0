//! Each check of the reader gives its named error on a damaged image, never a panic or
//! a hang.

use std::process::Command;

use boxlet_ext4::{Corruption, Error, ErrorKind, Ext4};
use tempfile::TempDir;

/// A small image of a tiny tree; `opts` are extra mke2fs options.
fn image(opts: &[&str]) -> Vec<u8> {
    let dir = TempDir::new().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("etc/sub")).unwrap();
    std::fs::write(src.join("etc/hostname"), b"boxlet\n").unwrap();
    std::fs::write(src.join("data.bin"), vec![1u8; 50_000]).unwrap();
    let img = dir.path().join("fs.img");
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "1024", "-O", "^has_journal"])
        .args(opts)
        .arg("-d")
        .arg(&src)
        .arg(&img)
        .arg("2M")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(img).unwrap()
}

fn open(b: Vec<u8>) -> Result<Ext4, Error> {
    Ext4::new(Box::new(b))
}

fn corruption_of(r: Result<impl std::fmt::Debug, Error>) -> Corruption {
    match r {
        Err(e) => e
            .corruption()
            .cloned()
            .unwrap_or_else(|| panic!("not a corruption: {e}")),
        Ok(v) => panic!("accepted a malformed image: {v:?}"),
    }
}

fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

const SB: usize = 1024;

fn nocsum() -> Vec<u8> {
    image(&["-O", "^metadata_csum"])
}

/// Offset of inode `ino` in `b`, and the inode number of `path`.
fn locate(b: &[u8], path: &str) -> (usize, u32) {
    let fs = open(b.to_vec()).unwrap();
    let ino = fs.resolve(path, false).unwrap().ino;
    (fs.inode_offset(ino).unwrap() as usize, ino)
}

#[test]
fn truncated_and_not_ext4() {
    assert!(matches!(
        corruption_of(open(vec![0u8; 1500])),
        Corruption::OutOfImage {
            what: "superblock",
            ..
        }
    ));
    assert_eq!(
        corruption_of(open(vec![0u8; 4096])),
        Corruption::BadMagic(0)
    );
    let mut b = nocsum();
    b.truncate(40_000);
    // Whatever is past the cut is refused (at open or when read), not read as zeros.
    let res = open(b).and_then(|fs| {
        fs.walk()?;
        fs.read("/data.bin")
    });
    assert!(res.is_err());
}

#[test]
fn unknown_incompatible_features_are_named() {
    for (bit, name) in [
        (0x4u32, "needs_recovery"),
        (0x10000, "encrypt"),
        (0x1000, "dirdata"),
        (0x8000_0000, "unknown"),
    ] {
        let mut b = nocsum();
        let f = u32::from_le_bytes(b[SB + 0x60..SB + 0x64].try_into().unwrap());
        put32(&mut b, SB + 0x60, f | bit);
        match open(b) {
            Err(e) => match e.kind() {
                ErrorKind::Unsupported(m) => assert!(m.contains(name), "{m}"),
                _ => panic!("{e}"),
            },
            Ok(_) => panic!("accepted incompat {bit:#x}"),
        }
    }
}

#[test]
fn superblock_fields_out_of_range() {
    for (off, v) in [(0x18usize, 7u32), (0x20, 0), (0x28, 0), (0x14, 5)] {
        let mut b = nocsum();
        put32(&mut b, SB + off, v);
        assert!(
            matches!(corruption_of(open(b)), Corruption::Superblock(_)),
            "field {off:#x} = {v}"
        );
    }
    let mut b = nocsum();
    put16(&mut b, SB + 0x58, 100); // inode size
    assert!(matches!(corruption_of(open(b)), Corruption::Superblock(_)));
    // More groups than the image has room for descriptors.
    let mut b = nocsum();
    put32(&mut b, SB + 0x4, u32::MAX);
    assert!(matches!(
        corruption_of(open(b)),
        Corruption::OutOfImage { .. } | Corruption::Superblock(_)
    ));
}

#[test]
fn checksums_are_verified() {
    let good = image(&[]);
    open(good.clone()).unwrap().walk().unwrap();

    let mut b = good.clone();
    b[SB + 0x78] ^= 1; // volume name: only the checksum notices
    assert!(
        matches!(corruption_of(open(b)), Corruption::Checksum { what, .. } if what == "superblock")
    );

    let mut b = good.clone();
    b[2048 + 0x10] ^= 1; // group 0's used-dirs count
    assert!(
        matches!(corruption_of(open(b)), Corruption::Checksum { what, .. } if what.starts_with("group descriptor"))
    );

    let (off, ino) = locate(&good, "/etc/hostname");
    let mut b = good.clone();
    b[off + 0x10] ^= 1; // mtime
    let fs = open(b).unwrap();
    assert!(
        matches!(corruption_of(fs.read("/etc/hostname")), Corruption::Checksum { what, .. } if what == format!("inode {ino}"))
    );
}

#[test]
fn bad_extent_trees() {
    let good = nocsum();
    let (off, _) = locate(&good, "/data.bin");
    let iblock = off + 0x28;
    for (what, field, v) in [
        ("magic", 0usize, 0x1234u16),
        ("entries > max", 2, 9),
        ("depth", 6, 6),
    ] {
        let mut b = good.clone();
        put16(&mut b, iblock + field, v);
        let fs = open(b).unwrap();
        assert!(
            matches!(
                corruption_of(fs.read("/data.bin")),
                Corruption::Extent { .. }
            ),
            "{what}"
        );
    }
    // An extent pointing past the filesystem.
    let mut b = good.clone();
    put32(&mut b, iblock + 12 + 8, 0x7fff_ffff);
    let fs = open(b).unwrap();
    assert!(matches!(
        corruption_of(fs.read("/data.bin")),
        Corruption::Extent { .. }
    ));
}

/// Offset of the first data block of directory `path`.
fn dir_block(b: &[u8], path: &str) -> usize {
    let fs = open(b.to_vec()).unwrap();
    let dir = fs.resolve(path, false).unwrap();
    let e = fs.extents(&dir).unwrap();
    (e[0].physical * fs.superblock().block_size()) as usize
}

#[test]
fn bad_directories_error_instead_of_looping() {
    let good = nocsum();
    let blk = dir_block(&good, "/etc");
    // rec_len 0 on the first entry.
    let mut b = good.clone();
    put16(&mut b, blk + 4, 0);
    let fs = open(b).unwrap();
    assert!(matches!(
        corruption_of(fs.read_dir("/etc")),
        Corruption::DirEntry { .. }
    ));
    // rec_len past the end of the block.
    let mut b = good.clone();
    put16(&mut b, blk + 4, 4000);
    let fs = open(b).unwrap();
    assert!(matches!(
        corruption_of(fs.read_dir("/etc")),
        Corruption::DirEntry { .. }
    ));

    // "/etc/sub" made to point at the root: a directory cycle.
    let (_, sub) = locate(&good, "/etc/sub");
    let mut b = good.clone();
    let pos = (blk..blk + 1024)
        .find(|&i| b[i..i + 4] == sub.to_le_bytes() && &b[i + 8..i + 11] == b"sub")
        .unwrap();
    put32(&mut b, pos, 2);
    let fs = open(b).unwrap();
    let e = fs.walk().unwrap_err();
    assert!(e.to_string().contains("reached twice"), "{e}");
    // Resolution through the cycle still terminates: /etc/sub/etc/sub/... is fine.
    assert_eq!(
        fs.read("/etc/sub/etc/sub/etc/hostname").unwrap(),
        b"boxlet\n"
    );
}

#[test]
fn symlink_loops_stop() {
    let dir = TempDir::new().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::os::unix::fs::symlink("b", src.join("a")).unwrap();
    std::os::unix::fs::symlink("a", src.join("b")).unwrap();
    std::os::unix::fs::symlink("self/x", src.join("self")).unwrap();
    let img = dir.path().join("fs.img");
    let st = Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&src)
        .arg(&img)
        .arg("4M")
        .status()
        .unwrap();
    assert!(st.success());
    let fs = Ext4::open(&img).unwrap();
    for p in ["/a", "/self"] {
        let e = fs.read(p).unwrap_err();
        assert!(matches!(e.kind(), ErrorKind::SymlinkLoop), "{p}: {e}");
    }
}

#[test]
fn lying_sizes_do_not_allocate() {
    let good = nocsum();
    // A directory claiming far more bytes than the image has.
    let (off, _) = locate(&good, "/etc");
    let mut b = good.clone();
    put32(&mut b, off + 0x4, u32::MAX);
    put32(&mut b, off + 0x6c, u32::MAX);
    let fs = open(b).unwrap();
    assert!(corruption_of(fs.read_dir("/etc"))
        .to_string()
        .contains("claims"));
    // A regular file claiming 2^63 bytes: read() refuses, the reader streams zeros.
    let (off, _) = locate(&good, "/data.bin");
    let mut b = good;
    put32(&mut b, off + 0x6c, 0x7fff_ffff);
    let fs = open(b).unwrap();
    assert!(matches!(
        fs.read("/data.bin").unwrap_err().kind(),
        ErrorKind::InvalidInput(_)
    ));
}
