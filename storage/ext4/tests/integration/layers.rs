//! OCI layers to ext4: whiteouts, opaque directories, hard links, xattrs and every entry
//! type, from plain, gzip and zstd tar streams; hostile entries refused or contained.

use std::io::Write;

use boxlet_ext4::{
    build_file_with_layers, BuildOptions, ErrorKind, Ext4, FileType, LayerLimits, LayerStack,
};
use tempfile::TempDir;

use crate::builder::e2fsck_clean;

/// A tar layer made with the tar crate.
struct Layer(tar::Builder<Vec<u8>>);

impl Layer {
    fn new() -> Self {
        Self(tar::Builder::new(Vec::new()))
    }

    fn header(path: &str, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        h
    }

    fn file(mut self, path: &str, data: &[u8], mode: u32) -> Self {
        let h = Self::header(path, tar::EntryType::Regular, mode, data.len() as u64);
        self.0.append(&h, data).unwrap();
        self
    }

    fn dir(mut self, path: &str) -> Self {
        let h = Self::header(path, tar::EntryType::Directory, 0o755, 0);
        self.0.append(&h, std::io::empty()).unwrap();
        self
    }

    fn link(mut self, path: &str, kind: tar::EntryType, target: &str) -> Self {
        let mut h = Self::header(path, kind, 0o777, 0);
        self.0.append_link(&mut h, path, target).unwrap();
        self
    }

    fn special(mut self, path: &str, kind: tar::EntryType, major: u32, minor: u32) -> Self {
        let mut h = Self::header(path, kind, 0o644, 0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h.set_cksum();
        self.0.append(&h, std::io::empty()).unwrap();
        self
    }

    fn xattr_file(mut self, path: &str, data: &[u8], name: &str, value: &[u8]) -> Self {
        let key = format!("SCHILY.xattr.{name}");
        self.0
            .append_pax_extensions([(key.as_str(), value)])
            .unwrap();
        self.file(path, data, 0o644)
    }

    /// A file whose raw header name is `path`, which the tar crate would not write.
    fn raw_file(mut self, path: &str, data: &[u8]) -> Self {
        let mut h = tar::Header::new_old();
        h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
        h.set_entry_type(tar::EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.0.append(&h, data).unwrap();
        self
    }

    fn bytes(self) -> Vec<u8> {
        self.0.into_inner().unwrap()
    }
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

fn zstd(b: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(b, ruzstd::encoding::CompressionLevel::Fastest)
}

#[test]
fn a_stack_of_plain_gzip_and_zstd_layers_builds_the_merged_tree() {
    let l1 = Layer::new()
        .dir("etc/")
        .file("etc/hostname", b"base\n", 0o644)
        .file("etc/removed", b"gone soon", 0o644)
        .dir("usr/share/doc")
        .file("usr/share/doc/old", b"old doc", 0o644)
        .file("usr/bin/tool", &vec![3u8; 100_000], 0o4755)
        .link("usr/bin/tool-link", tar::EntryType::Link, "usr/bin/tool")
        .link("etc/alias", tar::EntryType::Symlink, "hostname")
        .special("dev/null", tar::EntryType::Char, 1, 3)
        .special("run/fifo", tar::EntryType::Fifo, 0, 0)
        .xattr_file(
            "usr/bin/ping",
            b"ping",
            "security.capability",
            b"\x01\x00\x00\x02\x00\x20\x00\x00",
        )
        .bytes();
    let l2 = Layer::new()
        .file("etc/hostname", b"upper\n", 0o600)
        .file("etc/.wh.removed", b"", 0o644)
        .file("usr/share/doc/new", b"new doc", 0o644)
        .file("usr/share/doc/.wh..wh..opq", b"", 0o644)
        .file("opt/app/run.sh", b"#!/bin/sh\n", 0o755)
        .bytes();
    let l3 = Layer::new()
        .file("etc/third", b"zstd layer", 0o644)
        .raw_file("/abs/contained", b"inside")
        .bytes();

    let blobs = [l1, gzip(&l2), zstd(&l3)];
    let mut stack = LayerStack::new(LayerLimits::default()).unwrap();
    for (i, b) in blobs.iter().enumerate() {
        stack.apply(&format!("sha256:l{}", i + 1), &b[..]).unwrap();
    }
    let tree = stack.into_tree();

    let dir = TempDir::new().unwrap();
    let img = dir.path().join("layers.img");
    let mut open = |i: usize| Ok(Box::new(&blobs[i][..]) as Box<dyn std::io::Read + '_>);
    build_file_with_layers(&tree, &img, &BuildOptions::default(), &mut open).unwrap();
    e2fsck_clean(&img);
    let fs = Ext4::open(&img).unwrap();
    assert_eq!(fs.read("/etc/hostname").unwrap(), b"upper\n");
    assert_eq!(fs.stat("/etc/hostname").unwrap().mode, 0o600);
    assert!(
        matches!(
            fs.read("/etc/removed").unwrap_err().kind(),
            ErrorKind::NotFound
        ),
        "whiteout"
    );
    let docs: Vec<String> = fs
        .read_dir("/usr/share/doc")
        .unwrap()
        .iter()
        .map(|e| e.name_lossy())
        .collect();
    assert_eq!(
        docs,
        ["new"],
        "opaque directory keeps only this layer's entries"
    );
    assert_eq!(fs.read("/usr/bin/tool").unwrap(), vec![3u8; 100_000]);
    let tool = fs.stat("/usr/bin/tool").unwrap();
    assert_eq!((tool.mode, tool.links), (0o4755, 2));
    assert_eq!(
        fs.stat("/usr/bin/tool-link").unwrap().ino,
        tool.ino,
        "hard link"
    );
    assert_eq!(fs.read_link("/etc/alias").unwrap(), b"hostname");
    let null = fs.stat("/dev/null").unwrap();
    assert_eq!(
        (null.file_type, null.device),
        (FileType::CharDevice, Some((1, 3)))
    );
    assert_eq!(fs.stat("/run/fifo").unwrap().file_type, FileType::Fifo);
    let ping = fs.resolve("/usr/bin/ping", false).unwrap();
    let x = boxlet_ext4::xattrs(&fs, &ping).unwrap();
    assert_eq!(x[0].name, "security.capability");
    assert_eq!(fs.read("/opt/app/run.sh").unwrap(), b"#!/bin/sh\n");
    assert_eq!(fs.read("/etc/third").unwrap(), b"zstd layer");
    assert_eq!(
        fs.read("/abs/contained").unwrap(),
        b"inside",
        "absolute paths stay inside"
    );
    assert_eq!(fs.stat("/etc/hostname").unwrap().mtime.secs, 1_700_000_000);
}

fn refused(layer: Vec<u8>, needle: &str) {
    let mut stack = LayerStack::new(LayerLimits::default()).unwrap();
    let base = Layer::new()
        .file("etc/passwd", b"root", 0o644)
        .link("etc/sym", tar::EntryType::Symlink, "/")
        .bytes();
    stack.apply("base", &base[..]).unwrap();
    let e = stack.apply("sha256:evil", &layer[..]).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("sha256:evil") && msg.contains(needle), "{msg}");
}

/// A tar header whose path the tar crate would refuse to write: set the raw name bytes.
fn raw_path_layer(path: &str, kind: tar::EntryType, link: Option<&str>) -> Vec<u8> {
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
    if let Some(l) = link {
        h.as_old_mut().linkname[..l.len()].copy_from_slice(l.as_bytes());
    }
    h.set_entry_type(kind);
    h.set_mode(0o644);
    h.set_size(if kind == tar::EntryType::Regular {
        4
    } else {
        0
    });
    h.set_cksum();
    let mut b = tar::Builder::new(Vec::new());
    let data: &[u8] = if kind == tar::EntryType::Regular {
        b"evil"
    } else {
        b""
    };
    b.append(&h, data).unwrap();
    b.into_inner().unwrap()
}

#[test]
fn hostile_entries_are_refused_with_the_layer_and_entry_named() {
    refused(
        raw_path_layer("../escape", tar::EntryType::Regular, None),
        "\"..\"",
    );
    refused(
        raw_path_layer("a/../../escape", tar::EntryType::Regular, None),
        "\"..\"",
    );
    refused(
        raw_path_layer("etc/hl", tar::EntryType::Link, Some("../../etc/shadow")),
        "\"..\"",
    );
    refused(
        raw_path_layer("etc/hl", tar::EntryType::Link, Some("etc/missing")),
        "not a file in the image",
    );
    refused(
        raw_path_layer("etc/.wh...", tar::EntryType::Regular, None),
        "whiteout",
    );
    refused(
        raw_path_layer("etc/sym/x", tar::EntryType::Regular, None),
        "not a directory",
    );
    refused(
        raw_path_layer("etc/passwd/x", tar::EntryType::Regular, None),
        "not a directory",
    );
}

#[test]
fn limits_stop_hostile_layers() {
    let big = Layer::new()
        .file("a", &vec![1u8; 5000], 0o644)
        .file("b", &vec![1u8; 5000], 0o644)
        .bytes();
    let mut stack = LayerStack::new(LayerLimits {
        max_total_bytes: 8000,
        ..LayerLimits::default()
    })
    .unwrap();
    let e = stack.apply("big", &big[..]).unwrap_err();
    assert!(e.to_string().contains("more than 8000 bytes"), "{e}");

    let many = (0..50)
        .fold(Layer::new(), |l, i| l.file(&format!("f{i}"), b"", 0o644))
        .bytes();
    let mut stack = LayerStack::new(LayerLimits {
        max_entries: 20,
        ..LayerLimits::default()
    })
    .unwrap();
    assert!(stack
        .apply("many", &many[..])
        .unwrap_err()
        .to_string()
        .contains("more than 20 entries"));

    let deep = Layer::new()
        .file("d/".repeat(40).trim_end_matches('/'), b"x", 0o644)
        .bytes();
    let mut stack = LayerStack::new(LayerLimits {
        max_depth: 10,
        ..LayerLimits::default()
    })
    .unwrap();
    assert!(stack
        .apply("deep", &deep[..])
        .unwrap_err()
        .to_string()
        .contains("deeper than 10"));

    let mut stack = LayerStack::new(LayerLimits::default()).unwrap();
    let e = stack.apply(
        "garbage",
        &b"this is not a tar stream at all, but it is long enough to have a header block"[..],
    );
    assert!(e.is_err());
}

#[test]
fn a_layer_that_changes_between_the_two_reads_is_refused() {
    let l1 = Layer::new().file("a", b"first", 0o644).bytes();
    let other = Layer::new().file("a", b"different size", 0o644).bytes();
    let mut stack = LayerStack::new(LayerLimits::default()).unwrap();
    stack.apply("l1", &l1[..]).unwrap();
    let tree = stack.into_tree();
    let dir = TempDir::new().unwrap();
    let img = dir.path().join("x.img");
    let mut open = |_| Ok(Box::new(&other[..]) as Box<dyn std::io::Read + '_>);
    let e = build_file_with_layers(&tree, &img, &BuildOptions::default(), &mut open).unwrap_err();
    assert!(
        e.to_string().contains("changed since it was applied"),
        "{e}"
    );
    assert!(!img.exists());
}

#[test]
fn a_nul_byte_in_a_pax_path_is_refused() {
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([("path", &b"etc/a\0b"[..])])
        .unwrap();
    let h = Layer::header("placeholder", tar::EntryType::Regular, 0o644, 1);
    b.append(&h, &b"x"[..]).unwrap();
    let layer = b.into_inner().unwrap();
    let mut stack = LayerStack::new(LayerLimits::default()).unwrap();
    let e = stack.apply("nul", &layer[..]).unwrap_err();
    assert!(e.to_string().contains("NUL"), "{e}");
}

#[test]
fn hard_links_count_against_the_entry_limit() {
    let l = (0..30)
        .fold(Layer::new().file("f", b"x", 0o644), |l, i| {
            l.link(&format!("l{i}"), tar::EntryType::Link, "f")
        })
        .bytes();
    let mut stack = LayerStack::new(LayerLimits {
        max_entries: 20,
        ..LayerLimits::default()
    })
    .unwrap();
    assert!(stack
        .apply("links", &l[..])
        .unwrap_err()
        .to_string()
        .contains("more than 20 entries"));
}

#[test]
fn a_whiteout_hides_lower_layers_only() {
    let l1 = Layer::new()
        .file("a", b"lower", 0o644)
        .file("b", b"lower", 0o644)
        .bytes();
    // Layer 2 adds c, then (in the same layer) whiteouts for a and c.
    let l2 = Layer::new()
        .file("c", b"same layer", 0o644)
        .file(".wh.a", b"", 0o644)
        .file(".wh.c", b"", 0o644)
        .bytes();
    let mut stack = LayerStack::new(LayerLimits::default()).unwrap();
    stack.apply("l1", &l1[..]).unwrap();
    stack.apply("l2", &l2[..]).unwrap();
    let blobs = [l1, l2];
    let tree = stack.into_tree();
    let dir = TempDir::new().unwrap();
    let img = dir.path().join("w.img");
    let mut open = |i: usize| Ok(Box::new(&blobs[i][..]) as Box<dyn std::io::Read + '_>);
    build_file_with_layers(&tree, &img, &BuildOptions::default(), &mut open).unwrap();
    let fs = Ext4::open(&img).unwrap();
    let mut names: Vec<String> = fs
        .read_dir("/")
        .unwrap()
        .iter()
        .map(|e| e.name_lossy())
        .collect();
    names.sort();
    assert_eq!(names, ["b", "c", "lost+found"]);
}

#[test]
fn a_gzip_bomb_in_a_long_name_record_is_refused_before_it_is_buffered() {
    // A GNU long-name record claiming 4 GiB of zeros: a few MB of gzip. The tar crate
    // would read the whole record into memory; the layer reader refuses it first.
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"././@LongLink");
    h.set_entry_type(tar::EntryType::GNULongName);
    h.set_size(4 << 30);
    h.set_mode(0o644);
    h.set_cksum();
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(h.as_bytes()).unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..64 {
        e.write_all(&zeros).unwrap();
    }
    let layer = e.finish().unwrap();
    let mut stack = LayerStack::new(LayerLimits::default()).unwrap();
    let msg = stack
        .apply("sha256:bomb", &layer[..])
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("sha256:bomb") && msg.contains("long name record of 4294967296 bytes"),
        "{msg}"
    );
}

#[test]
fn device_numbers_beyond_linux_are_refused_and_acls_are_kept() {
    refused(
        Layer::new()
            .special("dev/big", tar::EntryType::Char, 5000, 1)
            .bytes(),
        "device 5000:1",
    );
    // A malformed ACL value is refused; an attribute in a namespace ext4 has not is
    // dropped; a valid ACL is stored in ext4's format and read back in the VFS one.
    refused(
        Layer::new()
            .xattr_file("f", b"x", "system.posix_acl_access", b"\x02\0\0\0\x01")
            .bytes(),
        "POSIX ACL",
    );
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [(1u16, 6u16, u32::MAX), (2, 4, 1000), (4, 4, u32::MAX)] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&id.to_le_bytes());
    }
    for (tag, perm) in [(0x10u16, 6u16), (0x20, 4)] {
        acl.extend_from_slice(&tag.to_le_bytes());
        acl.extend_from_slice(&perm.to_le_bytes());
        acl.extend_from_slice(&u32::MAX.to_le_bytes());
    }
    let layer = Layer::new()
        .xattr_file("acl", b"x", "system.posix_acl_access", &acl)
        .xattr_file("odd", b"y", "weird.namespace", b"v")
        .bytes();
    let mut stack = LayerStack::new(LayerLimits::default()).unwrap();
    stack.apply("acls", &layer[..]).unwrap();
    let tree = stack.into_tree();
    let dir = TempDir::new().unwrap();
    let img = dir.path().join("acl.img");
    let mut open = |_| Ok(Box::new(&layer[..]) as Box<dyn std::io::Read + '_>);
    build_file_with_layers(&tree, &img, &BuildOptions::default(), &mut open).unwrap();
    e2fsck_clean(&img);
    let fs = Ext4::open(&img).unwrap();
    let x = boxlet_ext4::xattrs(&fs, &fs.resolve("/acl", false).unwrap()).unwrap();
    assert_eq!(x.len(), 1);
    assert_eq!(x[0].name, "system.posix_acl_access");
    assert_eq!(x[0].value, acl);
    assert!(
        boxlet_ext4::xattrs(&fs, &fs.resolve("/odd", false).unwrap())
            .unwrap()
            .is_empty()
    );
    assert_eq!(fs.read("/odd").unwrap(), b"y");
    if crate::tree::unsafe_free_is_root() {
        // The kernel reads the ACL (it gives it back in the VFS format).
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let ok = std::process::Command::new("mount")
            .args([
                "-o",
                "loop,ro",
                img.to_str().unwrap(),
                mnt.to_str().unwrap(),
            ])
            .status()
            .unwrap()
            .success();
        assert!(ok, "mount");
        let got = xattr::get(mnt.join("acl"), "system.posix_acl_access");
        std::process::Command::new("umount")
            .arg(&mnt)
            .status()
            .unwrap();
        assert_eq!(got.unwrap().unwrap(), acl);
    }
}
