//! The builder: images of host trees pass `e2fsck -fn` and read back identical.

use std::path::Path;
use std::process::Command;

use boxlet_ext4::{build_file, BuildOptions, Ext4, Tree};
use tempfile::TempDir;

use crate::tree::{assert_same, host_tree, image_tree, populate};

/// `e2fsck -fn` finds nothing to fix.
pub fn e2fsck_clean(img: &Path) {
    let out = Command::new("e2fsck")
        .args(["-fn", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn {}: {}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn opts() -> BuildOptions {
    BuildOptions {
        uuid: Some(*b"boxlet-test-uuid"),
        ..BuildOptions::default()
    }
}

#[test]
fn built_images_pass_e2fsck_and_read_back_identical() {
    let dir = TempDir::new().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    populate(&src, 3000);
    let tree = Tree::from_dir(&src).unwrap();
    let img = dir.path().join("built.img");
    let report = build_file(&tree, &img, &opts()).unwrap();
    assert_eq!(report.size, std::fs::metadata(&img).unwrap().len());
    e2fsck_clean(&img);
    let fs = Ext4::open(&img).unwrap();
    assert_same("builder", &host_tree(&src), &image_tree(&fs));
    // The 3000-entry directory is hash-indexed (e2fsck above checked the index), small
    // ones are not.
    assert!(fs.resolve("/many", false).unwrap().flags & 0x1000 != 0);
    assert!(fs.resolve("/etc", false).unwrap().flags & 0x1000 == 0);
}

#[test]
fn an_empty_tree_and_a_given_size() {
    let dir = TempDir::new().unwrap();
    let img = dir.path().join("empty.img");
    build_file(&Tree::default(), &img, &opts()).unwrap();
    e2fsck_clean(&img);
    let img2 = dir.path().join("sized.img");
    let r = build_file(
        &Tree::default(),
        &img2,
        &BuildOptions {
            size: Some(300 << 20),
            ..opts()
        },
    )
    .unwrap();
    assert!(r.size >= 300 << 20, "{}", r.size);
    e2fsck_clean(&img2);
    // Room for files as well as bytes: an inode per 16 KiB, as mke2fs gives, and the
    // empty inode tables (4.8 MiB of them) are holes.
    let fs = Ext4::open(&img2).unwrap();
    let sb = fs.superblock();
    assert!(
        sb.inodes_count >= (300 << 20) / 16384,
        "{} inodes",
        sb.inodes_count
    );
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&img2).unwrap().blocks() * 512;
    assert!(allocated < 8 << 20, "{allocated} bytes allocated");
    let e = build_file(
        &Tree::from_dir(Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap(),
        &dir.path().join("small.img"),
        &BuildOptions {
            size: Some(64 << 10),
            ..opts()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("more than"), "{e}");
    assert!(
        !dir.path().join("small.img").exists(),
        "no partial image left"
    );
}

#[test]
fn fragmented_files_get_an_extent_tree_and_holes_stay_holes() {
    let dir = TempDir::new().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    // 3000 data blocks separated by holes: 3000 extents in 9 leaves, more than the 4
    // the inode can point at, so an index block above them (a tree of depth 2).
    let mut data = vec![0u8; 6000 * 4096];
    for b in (0..6000).step_by(2) {
        data[b * 4096..b * 4096 + 10].copy_from_slice(b"0123456789");
    }
    std::fs::write(src.join("frag"), &data).unwrap();
    let tree = Tree::from_dir(&src).unwrap();
    let img = dir.path().join("frag.img");
    build_file(&tree, &img, &opts()).unwrap();
    e2fsck_clean(&img);
    let fs = Ext4::open(&img).unwrap();
    let inode = fs.resolve("/frag", false).unwrap();
    assert_eq!(fs.extents(&inode).unwrap().len(), 3000);
    // The root's header: depth 2.
    assert_eq!(u16::from_le_bytes([inode.block[6], inode.block[7]]), 2);
    assert_eq!(
        inode.blocks,
        (3000 + 9 + 1) * 8,
        "data blocks, 9 leaves and an index block, no hole blocks"
    );
    assert_eq!(fs.read("/frag").unwrap(), data);
}

#[test]
fn limits_of_the_format_give_clear_errors() {
    let dir = TempDir::new().unwrap();
    let e = build_file(
        &Tree::default(),
        &dir.path().join("huge.img"),
        &BuildOptions {
            size: Some(8 << 40),
            ..opts()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("at most"), "{e}");
    let mut tree = Tree::default();
    tree.add(
        0,
        b"dev",
        boxlet_ext4::Node {
            kind: boxlet_ext4::NodeKind::CharDevice(1 << 12, 1),
            meta: Default::default(),
        },
    )
    .unwrap();
    let e = build_file(&tree, &dir.path().join("dev.img"), &opts()).unwrap_err();
    assert!(e.to_string().contains("device 4096:1"), "{e}");
    let mut tree = Tree::default();
    tree.add(
        0,
        b"big",
        boxlet_ext4::Node {
            kind: boxlet_ext4::NodeKind::File(boxlet_ext4::FileData::Layer {
                layer: 0,
                entry: 0,
                size: 17 << 40,
            }),
            meta: Default::default(),
        },
    )
    .unwrap();
    let e = build_file(&tree, &dir.path().join("big.img"), &opts()).unwrap_err();
    assert!(e.to_string().contains("16 TiB"), "{e}");
}

/// More subdirectories than a link count holds: ext4 (dir_nlink) counts such a
/// directory as 1, as the kernel and e2fsck do.
#[test]
fn a_directory_with_65001_subdirectories() {
    let mut tree = Tree::default();
    let parent = tree
        .add(
            0,
            b"wide",
            boxlet_ext4::Node {
                kind: boxlet_ext4::NodeKind::Dir(Default::default()),
                meta: boxlet_ext4::NodeMeta {
                    mode: 0o755,
                    ..Default::default()
                },
            },
        )
        .unwrap();
    for i in 0..65_001u32 {
        tree.add(
            parent,
            format!("d{i}").as_bytes(),
            boxlet_ext4::Node {
                kind: boxlet_ext4::NodeKind::Dir(Default::default()),
                meta: boxlet_ext4::NodeMeta {
                    mode: 0o755,
                    ..Default::default()
                },
            },
        )
        .unwrap();
    }
    let dir = TempDir::new().unwrap();
    let img = dir.path().join("wide.img");
    build_file(&tree, &img, &opts()).unwrap();
    e2fsck_clean(&img);
    let fs = Ext4::open(&img).unwrap();
    assert_eq!(fs.resolve("/wide", false).unwrap().links, 1);
    assert_eq!(fs.resolve("/", false).unwrap().links, 4);
    assert_eq!(fs.read_dir("/wide").unwrap().len(), 65_001);
}

#[test]
fn the_kernel_mounts_a_built_image_and_sees_the_tree() {
    assert!(
        crate::tree::unsafe_free_is_root(),
        "this test loop-mounts an image: run it as root"
    );
    let dir = TempDir::new().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    populate(&src, 500);
    let img = dir.path().join("built.img");
    build_file(&Tree::from_dir(&src).unwrap(), &img, &opts()).unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let st = Command::new("mount")
        .args([
            "-o",
            "loop,ro",
            img.to_str().unwrap(),
            mnt.to_str().unwrap(),
        ])
        .status()
        .unwrap();
    assert!(st.success(), "mount");
    let mut seen = host_tree(&mnt);
    let st = Command::new("umount").arg(&mnt).status().unwrap();
    assert!(st.success(), "umount");
    seen.retain(|k, _| k != "/lost+found");
    let mut want = host_tree(&src);
    // The mount point's own times are not the source root's.
    let root = want.get_mut("/").unwrap();
    *root = seen["/"].clone();
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    for (k, v) in &want {
        if k != "/" {
            assert!(seen[k] == *v, "{k} differs through the kernel");
        }
    }
}

#[test]
fn the_journal_is_usable_and_optional() {
    assert!(
        crate::tree::unsafe_free_is_root(),
        "this test loop-mounts an image: run it as root"
    );
    let dir = TempDir::new().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    std::fs::write(src.join("a"), b"before").unwrap();
    let img = dir.path().join("j.img");
    build_file(&Tree::from_dir(&src).unwrap(), &img, &opts()).unwrap();
    let fs = Ext4::open(&img).unwrap();
    assert!(fs.superblock().feature_names().contains(&"has_journal"));
    drop(fs);
    // Mounted read-write, the kernel journals a change; the result is clean.
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let st = Command::new("mount")
        .args(["-o", "loop", img.to_str().unwrap(), mnt.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(st.success(), "mount rw");
    let wrote = std::fs::write(mnt.join("b"), b"after")
        .and_then(|()| std::fs::write(mnt.join("a"), b"changed"));
    let st = Command::new("umount").arg(&mnt).status().unwrap();
    wrote.unwrap();
    assert!(st.success(), "umount");
    e2fsck_clean(&img);
    let fs = Ext4::open(&img).unwrap();
    assert_eq!(fs.read("/a").unwrap(), b"changed");
    assert_eq!(fs.read("/b").unwrap(), b"after");

    let img = dir.path().join("nj.img");
    build_file(
        &Tree::from_dir(&src).unwrap(),
        &img,
        &BuildOptions {
            journal: false,
            ..opts()
        },
    )
    .unwrap();
    e2fsck_clean(&img);
    assert!(!Ext4::open(&img)
        .unwrap()
        .superblock()
        .feature_names()
        .contains(&"has_journal"));
}

/// e2fsprogs' own reader (`debugfs rdump`) extracts the same files, directories and
/// symlinks, with the same contents, permission bits and owners (rdump drops setuid,
/// setgid and sticky, which the reader and kernel-mount tests check).
#[test]
fn debugfs_extracts_what_was_built() {
    let dir = TempDir::new().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir(&src).unwrap();
    populate(&src, 2000);
    let img = dir.path().join("built.img");
    build_file(&Tree::from_dir(&src).unwrap(), &img, &opts()).unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let st = Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", out.display()))
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let keep = |t: &crate::tree::Tree| -> Vec<(String, String)> {
        t.iter()
            .filter(|(p, e)| {
                p.as_str() != "/"
                    && !p.starts_with("/lost+found")
                    && matches!(
                        e.kind,
                        boxlet_ext4::FileType::Regular
                            | boxlet_ext4::FileType::Directory
                            | boxlet_ext4::FileType::Symlink
                    )
            })
            .map(|(p, e)| (p.clone(), e.summary_without_special_bits()))
            .collect()
    };
    let got = keep(&host_tree(&out));
    let want = keep(&host_tree(&src));
    let diff: Vec<_> = want.iter().filter(|w| !got.contains(w)).take(5).collect();
    let extra: Vec<_> = got.iter().filter(|g| !want.contains(g)).take(5).collect();
    assert!(
        diff.is_empty() && extra.is_empty(),
        "missing or different {diff:?}, extra {extra:?}"
    );
}

#[test]
fn a_tree_with_its_own_lost_and_found_builds_clean() {
    let dir = TempDir::new().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("lost+found")).unwrap();
    std::fs::write(src.join("lost+found/stray"), b"x").unwrap();
    std::fs::write(src.join("kept"), b"y").unwrap();
    let img = dir.path().join("lf.img");
    build_file(&Tree::from_dir(&src).unwrap(), &img, &opts()).unwrap();
    e2fsck_clean(&img);
    let fs = Ext4::open(&img).unwrap();
    assert!(
        fs.read_dir("/lost+found").unwrap().is_empty(),
        "the image's own lost+found"
    );
    assert_eq!(fs.read("/kept").unwrap(), b"y");
}

#[test]
fn more_inodes_than_one_group_holds_get_more_groups() {
    let mut tree = Tree::default();
    for i in 0..40_000 {
        let node = boxlet_ext4::Node {
            kind: boxlet_ext4::NodeKind::Fifo,
            meta: boxlet_ext4::NodeMeta {
                mode: 0o644,
                ..Default::default()
            },
        };
        tree.add(0, format!("p{i}").as_bytes(), node).unwrap();
    }
    let dir = TempDir::new().unwrap();
    let img = dir.path().join("inodes.img");
    build_file(
        &tree,
        &img,
        &BuildOptions {
            journal: false,
            ..opts()
        },
    )
    .unwrap();
    e2fsck_clean(&img);
    assert_eq!(
        Ext4::open(&img).unwrap().read_dir("/").unwrap().len(),
        40_001
    );
}
