//! Injecting a host file into images made by mke2fs (metadata_csum and a journal,
//! gdt_csum, 1 KiB blocks) and by the builder: e2fsck -fn clean, and read back.

use std::path::Path;
use std::process::Command;

use boxlet_ext4::{
    build_file, inject, inject_bytes, BuildOptions, ErrorKind, Ext4, FileType, InjectOptions, Tree,
};
use tempfile::TempDir;

use crate::builder::e2fsck_clean;
use crate::tree::bytes;

fn mke2fs(img: &Path, src: &Path, args: &[&str]) {
    let out = Command::new("mke2fs")
        .args(["-q", "-F"])
        .args(args)
        .arg("-d")
        .arg(src)
        .arg(img)
        .arg("32M")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn source(dir: &Path) -> std::path::PathBuf {
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/hostname"), b"box\n").unwrap();
    std::fs::write(src.join("etc/old-agent"), bytes(20_000, 1)).unwrap();
    src
}

#[test]
fn inject_into_mke2fs_and_built_images() {
    let dir = TempDir::new().unwrap();
    let src = source(dir.path());
    let agent = dir.path().join("boxlet-guest");
    std::fs::write(&agent, bytes(300_000, 5)).unwrap();
    let opts = InjectOptions {
        mode: 0o755,
        ..InjectOptions::default()
    };
    let variants: &[(&str, &[&str])] = &[
        ("ext4 (metadata_csum, journal)", &["-t", "ext4"]),
        ("ext4 1 KiB blocks", &["-t", "ext4", "-b", "1024"]),
        (
            "ext4 gdt_csum",
            &["-t", "ext4", "-O", "^metadata_csum,uninit_bg"],
        ),
        ("ext4 ^64bit", &["-t", "ext4", "-O", "^64bit"]),
        // Entries spanning a 64 KiB block store rec_len 65535; splitting one re-encodes.
        (
            "ext4 64 KiB blocks",
            &["-t", "ext4", "-b", "65536", "-O", "^metadata_csum"],
        ),
    ];
    let mut images = Vec::new();
    for (name, args) in variants {
        let img = dir.path().join(format!("{}.img", images.len()));
        mke2fs(&img, &src, args);
        images.push((name.to_string(), img));
    }
    let built = dir.path().join("built.img");
    build_file(
        &Tree::from_dir(&src).unwrap(),
        &built,
        &BuildOptions::default(),
    )
    .unwrap();
    images.push(("boxlet builder".into(), built));

    for (name, img) in &images {
        inject(img, &agent, "/boxlet/bin/boxlet-guest", &opts)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        e2fsck_clean(img);
        let fs = Ext4::open(img).unwrap();
        assert_eq!(
            fs.read("/boxlet/bin/boxlet-guest").unwrap(),
            std::fs::read(&agent).unwrap(),
            "{name}"
        );
        let m = fs.stat("/boxlet/bin/boxlet-guest").unwrap();
        assert_eq!(
            (m.file_type, m.mode, m.uid),
            (FileType::Regular, 0o755, 0),
            "{name}"
        );
        assert_eq!(
            fs.stat("/boxlet").unwrap().links,
            3,
            "{name}: /boxlet has . and bin/.."
        );
        assert_eq!(
            fs.read("/etc/hostname").unwrap(),
            b"box\n",
            "{name}: the rest is untouched"
        );
        drop(fs);

        // Replace an existing file, twice (its blocks are freed each time).
        for round in 0..2u8 {
            let data = bytes(5000 + usize::from(round) * 70_000, 9 + round);
            inject_bytes(
                img,
                &data,
                "/etc/old-agent",
                &InjectOptions {
                    mode: 0o700,
                    uid: 1000,
                    gid: 1000,
                    ..opts.clone()
                },
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            e2fsck_clean(img);
            let fs = Ext4::open(img).unwrap();
            assert_eq!(fs.read("/etc/old-agent").unwrap(), data, "{name}");
            let m = fs.stat("/etc/old-agent").unwrap();
            assert_eq!((m.mode, m.uid, m.gid), (0o700, 1000, 1000), "{name}");
        }
    }
}

#[test]
fn a_full_directory_grows_a_block() {
    let dir = TempDir::new().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    // Fill one 1 KiB directory block almost completely.
    for i in 0..40 {
        std::fs::write(src.join(format!("d/name-{i:04}")), b"").unwrap();
    }
    let img = dir.path().join("fs.img");
    mke2fs(&img, &src, &["-t", "ext4", "-b", "1024"]);
    let before = Ext4::open(&img).unwrap().resolve("/d", false).unwrap().size;
    for i in 0..30 {
        inject_bytes(
            &img,
            format!("{i}").as_bytes(),
            &format!("/d/added-with-a-longer-name-{i:04}"),
            &InjectOptions::default(),
        )
        .unwrap();
    }
    e2fsck_clean(&img);
    let fs = Ext4::open(&img).unwrap();
    assert!(
        fs.resolve("/d", false).unwrap().size > before,
        "the directory grew"
    );
    assert_eq!(fs.read_dir("/d").unwrap().len(), 70);
    assert_eq!(fs.read("/d/added-with-a-longer-name-0029").unwrap(), b"29");
}

#[test]
fn refusals_are_named() {
    let dir = TempDir::new().unwrap();
    let src = source(dir.path());
    let img = dir.path().join("fs.img");
    mke2fs(&img, &src, &["-t", "ext4"]);
    let e = inject_bytes(&img, b"x", "/etc/hostname/x", &InjectOptions::default()).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::NotADirectory), "{e}");
    let e = inject_bytes(&img, b"x", "/etc", &InjectOptions::default()).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::Unsupported(_)), "{e}");
    let e = inject_bytes(&img, b"x", "/../x", &InjectOptions::default()).unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::InvalidInput(_)), "{e}");
    e2fsck_clean(&img);
    let ext2 = dir.path().join("ext2.img");
    mke2fs(&ext2, &src, &["-t", "ext2"]);
    let e = inject_bytes(&ext2, b"x", "/x", &InjectOptions::default()).unwrap_err();
    assert!(e.to_string().contains("without extents"), "{e}");
}

#[test]
fn an_htree_parent_directory_takes_the_new_entry() {
    let dir = TempDir::new().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("big")).unwrap();
    for i in 0..3000 {
        std::fs::write(src.join(format!("big/file-{i:05}")), b"").unwrap();
    }
    let img = dir.path().join("fs.img");
    mke2fs(&img, &src, &["-t", "ext4"]);
    // Index the big directory the way e2fsck -D does.
    let out = Command::new("e2fsck")
        .args(["-fyD", img.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.code().is_some_and(|c| c <= 1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        Ext4::open(&img)
            .unwrap()
            .resolve("/big", false)
            .unwrap()
            .flags
            & 0x1000
            != 0
    );
    inject_bytes(
        &img,
        b"agent",
        "/big/boxlet-guest",
        &InjectOptions::default(),
    )
    .unwrap();
    e2fsck_clean(&img);
    let fs = Ext4::open(&img).unwrap();
    assert_eq!(fs.read("/big/boxlet-guest").unwrap(), b"agent");
    assert_eq!(fs.read_dir("/big").unwrap().len(), 3001);
    assert_eq!(fs.read("/big/file-02999").unwrap(), b"");
}

#[test]
fn a_failed_injection_leaves_the_image_as_it_was() {
    let dir = TempDir::new().unwrap();
    let src = source(dir.path());
    let img = dir.path().join("fs.img");
    mke2fs(&img, &src, &["-t", "ext4"]);
    let before = std::fs::read(&img).unwrap();
    // Far more data than the 32 MiB image has room for, under a new directory.
    let e = inject_bytes(
        &img,
        &vec![1u8; 40 << 20],
        "/new/dir/huge",
        &InjectOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(e.kind(), ErrorKind::InvalidInput(_)), "{e}");
    assert!(e.to_string().contains("the image is full"), "{e}");
    assert!(std::fs::read(&img).unwrap() == before, "image unchanged");
    e2fsck_clean(&img);
}
