//! Images made by `mke2fs -d` from a host tree, under feature variations, read back
//! identical to the tree.

use std::path::Path;
use std::process::Command;

use boxlet_ext4::Ext4;
use tempfile::TempDir;

use crate::tree::{assert_same, host_tree, image_tree, populate};

fn mke2fs(image: &Path, src: &Path, args: &[&str], size: &str) {
    let _ = std::fs::remove_file(image);
    let out = Command::new("mke2fs")
        .args(["-q", "-F", "-E", "root_owner=0:0"])
        .args(args)
        .args(["-d", src.to_str().unwrap(), image.to_str().unwrap(), size])
        .output()
        .expect("mke2fs runnable (e2fsprogs); run `make setup`");
    assert!(
        out.status.success(),
        "mke2fs {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The size of `path` in `img` according to debugfs.
fn debugfs_size(img: &Path, path: &str) -> u64 {
    let out = Command::new("debugfs")
        .args(["-R", &format!("stat {path}"), img.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let tail = text
        .split("Size: ")
        .nth(1)
        .unwrap_or_else(|| panic!("debugfs stat: {text}"));
    tail.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn mke2fs_images_read_back_identical_under_feature_variations() {
    let dir = TempDir::new().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    populate(&src, 3000);
    let host = host_tree(&src);
    let img = dir.path().join("fs.img");
    let variants: &[(&str, &[&str])] = &[
        ("ext4 defaults", &["-t", "ext4"]),
        ("ext4 1 KiB blocks", &["-t", "ext4", "-b", "1024"]),
        ("ext4 ^64bit", &["-t", "ext4", "-O", "^64bit"]),
        (
            "ext4 ^metadata_csum (gdt_csum)",
            &["-t", "ext4", "-O", "^metadata_csum,uninit_bg"],
        ),
        ("ext4 inline_data", &["-t", "ext4", "-O", "inline_data"]),
        // 64 KiB blocks: a directory entry spanning a whole block stores rec_len 65535.
        (
            "ext4 64 KiB blocks, ^metadata_csum",
            &["-t", "ext4", "-b", "65536", "-O", "^metadata_csum"],
        ),
        ("ext4 64 KiB blocks", &["-t", "ext4", "-b", "65536"]),
        (
            "ext4 256-byte inodes, huge_file, ^flex_bg",
            &["-t", "ext4", "-I", "256", "-O", "^flex_bg"],
        ),
        ("ext4 128-byte inodes", &["-t", "ext4", "-I", "128"]),
        (
            "ext4 meta_bg",
            &["-t", "ext4", "-O", "meta_bg,^resize_inode"],
        ),
        ("ext3 (block maps, journal)", &["-t", "ext3"]),
        ("ext2 (block maps)", &["-t", "ext2"]),
        ("ext2 1 KiB blocks", &["-t", "ext2", "-b", "1024"]),
    ];
    for (name, args) in variants {
        // Every small file takes a whole block: 64 KiB ones need more room.
        let size = if args.contains(&"65536") {
            "512M"
        } else {
            "64M"
        };
        mke2fs(&img, &src, args, size);
        let fs = Ext4::open(&img).unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut want = host.clone();
        if args.contains(&"inline_data") {
            // mke2fs -O inline_data drops a trailing hole: take the size debugfs reports.
            let size = debugfs_size(&img, "/sparse.img");
            let e = want.get_mut("/sparse.img").unwrap();
            e.size = size;
            e.content.as_mut().unwrap().truncate(size as usize);
        }
        assert_same(name, &want, &image_tree(&fs));
    }
}

/// The kernel fills the directory (mke2fs -d inserts entries in O(n^2) time and writes
/// linear directories): needs root for the loop mount.
#[test]
fn a_kernel_made_htree_directory_of_50k_entries_lists_completely() {
    assert!(
        crate::tree::unsafe_free_is_root(),
        "this test loop-mounts an image: run it as root"
    );
    let dir = TempDir::new().unwrap();
    let img = dir.path().join("fs.img");
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    mke2fs(&img, &empty, &["-t", "ext4", "-N", "60000"], "128M");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let status = Command::new("mount")
        .args(["-o", "loop", img.to_str().unwrap(), mnt.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success(), "mount -o loop");
    let fill = || -> std::io::Result<()> {
        std::fs::create_dir(mnt.join("big"))?;
        for i in 0..50_000 {
            std::fs::write(
                mnt.join(format!("big/f{i}")),
                if i % 1000 == 0 { b"x".as_slice() } else { b"" },
            )?;
        }
        Ok(())
    };
    let filled = fill();
    let status = Command::new("umount").arg(&mnt).status().unwrap();
    filled.unwrap();
    assert!(status.success(), "umount");

    let fs = Ext4::open(&img).unwrap();
    let mut names: Vec<String> = fs
        .read_dir("/big")
        .unwrap()
        .iter()
        .map(|e| e.name_lossy())
        .collect();
    names.sort();
    let mut want: Vec<String> = (0..50_000).map(|i| format!("f{i}")).collect();
    want.sort();
    assert_eq!(names, want);
    assert!(
        fs.resolve("/big", false).unwrap().flags & 0x1000 != 0,
        "an htree directory"
    );
    assert_eq!(fs.read("/big/f49000").unwrap(), b"x");
    assert_eq!(fs.read("/big/f49999").unwrap(), b"");
}

#[test]
fn paths_resolve_through_symlinks_and_dotdot() {
    let dir = TempDir::new().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    populate(&src, 10);
    let img = dir.path().join("fs.img");
    mke2fs(&img, &src, &["-t", "ext4"], "64M");
    let fs = Ext4::open(&img).unwrap();
    assert_eq!(fs.read("/usr/rel-link").unwrap(), b"boxlet\n");
    assert_eq!(fs.read("etc/fast-link").unwrap(), b"boxlet\n");
    assert_eq!(
        fs.read("/usr/bin/../../etc/./hostname").unwrap(),
        b"boxlet\n"
    );
    assert_eq!(fs.read_link("/etc/fast-link").unwrap(), b"hostname");
    let e = fs.read("/etc/nope").unwrap_err();
    assert!(matches!(e.kind(), boxlet_ext4::ErrorKind::NotFound), "{e}");
    assert_eq!(e.to_string(), "/etc/nope: no such file or directory");
    assert!(matches!(
        fs.read("/etc/hostname/x").unwrap_err().kind(),
        boxlet_ext4::ErrorKind::NotADirectory
    ));
    assert!(matches!(
        fs.read("/etc").unwrap_err().kind(),
        boxlet_ext4::ErrorKind::WrongType(_)
    ));
    // Sparse: holes read as zeros.
    let sparse = fs.read("/sparse.img").unwrap();
    assert_eq!(sparse.len(), 20 << 20);
    assert_eq!(&sparse[..4], b"head");
    assert!(sparse[4..10 << 20].iter().all(|&b| b == 0));
}
