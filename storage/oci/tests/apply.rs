//! Secure layer application: the result an OCI runtime expects, and the known escapes
//! reproduced, each writing nothing outside the root.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use boxlet_oci::{apply_layer, ApplyError, ApplyOptions, DevicePolicy};

/// One tar entry, with its name and link name written byte for byte (the tar crate's
/// own setters refuse `..`, and hostile layers are the point here).
struct E<'a> {
    path: &'a str,
    kind: tar::EntryType,
    mode: u32,
    data: &'a [u8],
    link: &'a str,
}

fn file<'a>(path: &'a str, data: &'a [u8]) -> E<'a> {
    E {
        path,
        kind: tar::EntryType::Regular,
        mode: 0o644,
        data,
        link: "",
    }
}
fn dir(path: &str) -> E<'_> {
    E {
        path,
        kind: tar::EntryType::Directory,
        mode: 0o755,
        data: b"",
        link: "",
    }
}
fn symlink<'a>(path: &'a str, target: &'a str) -> E<'a> {
    E {
        path,
        kind: tar::EntryType::Symlink,
        mode: 0o777,
        data: b"",
        link: target,
    }
}
fn hardlink<'a>(path: &'a str, target: &'a str) -> E<'a> {
    E {
        path,
        kind: tar::EntryType::Link,
        mode: 0o644,
        data: b"",
        link: target,
    }
}

fn layer(entries: &[E<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let mut h = tar::Header::new_gnu();
        {
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..e.path.len()].copy_from_slice(e.path.as_bytes());
            gnu.linkname[..e.link.len()].copy_from_slice(e.link.as_bytes());
        }
        h.set_entry_type(e.kind);
        h.set_mode(e.mode);
        h.set_uid(1000);
        h.set_gid(1001);
        h.set_mtime(1_600_000_000);
        h.set_size(e.data.len() as u64);
        h.set_cksum();
        b.append(&h, e.data).unwrap();
    }
    b.into_inner().unwrap()
}

fn apply(root: &Path, entries: &[E<'_>]) -> Result<boxlet_oci::ApplyReport, ApplyError> {
    apply_layer(root, layer(entries).as_slice(), &ApplyOptions::default())
}

/// A sandbox: `root` to apply into, and `outside/secret` beside it that must never change.
struct Sandbox {
    _dir: tempfile::TempDir,
    base: PathBuf,
    root: PathBuf,
    secret: PathBuf,
}

impl Sandbox {
    fn new() -> Sandbox {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().to_path_buf();
        let root = base.join("root");
        fs::create_dir_all(&root).unwrap();
        fs::create_dir_all(base.join("outside/sub")).unwrap();
        let secret = base.join("outside/secret");
        fs::write(&secret, b"do not touch").unwrap();
        fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
        Sandbox {
            _dir: dir,
            base,
            root,
            secret,
        }
    }

    /// Everything outside `root`: path -> (mode, nlink, content).
    fn outside(&self) -> BTreeMap<PathBuf, (u32, u64, Vec<u8>)> {
        fn walk(p: &Path, skip: &Path, out: &mut BTreeMap<PathBuf, (u32, u64, Vec<u8>)>) {
            for e in fs::read_dir(p).unwrap() {
                let path = e.unwrap().path();
                if path == skip {
                    continue;
                }
                let m = fs::symlink_metadata(&path).unwrap();
                let content = if m.is_file() {
                    fs::read(&path).unwrap()
                } else {
                    Vec::new()
                };
                out.insert(path.clone(), (m.mode(), m.nlink(), content));
                if m.is_dir() {
                    walk(&path, skip, out);
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(&self.base, &self.root, &mut out);
        out
    }

    /// Apply `layers` in order; assert nothing outside the root changed; the results.
    fn apply_all(&self, layers: &[&[E<'_>]]) -> Vec<Result<boxlet_oci::ApplyReport, ApplyError>> {
        let before = self.outside();
        let results = layers.iter().map(|l| apply(&self.root, l)).collect();
        assert_eq!(self.outside(), before, "something outside the root changed");
        assert_eq!(fs::read(&self.secret).unwrap(), b"do not touch");
        results
    }
}

fn refused(r: &Result<boxlet_oci::ApplyReport, ApplyError>, entry: &str) {
    match r {
        Err(e @ ApplyError::Refused { entry: named, .. }) => {
            assert_eq!(named, entry, "{e}");
            assert!(e.to_string().contains(entry));
        }
        other => panic!("expected {entry:?} to be refused, got {other:?}"),
    }
}

#[test]
fn a_layer_becomes_the_tree_it_describes() {
    let s = Sandbox::new();
    let mut fifo = dir("run/fifo");
    fifo.kind = tar::EntryType::Fifo;
    fifo.mode = 0o640;
    let mut setuid = file("usr/bin/su", b"#!su");
    setuid.mode = 0o4755;
    let r = apply(
        &s.root,
        &[
            dir("./"),
            dir("usr/"),
            dir("usr/bin"),
            file("usr/bin/tool", b"binary"),
            setuid,
            symlink("bin", "usr/bin"),
            hardlink("usr/bin/tool2", "usr/bin/tool"),
            file("deep/implicit/parents/file", b"x"),
            fifo,
        ],
    )
    .unwrap();
    assert_eq!(
        (r.files, r.dirs, r.symlinks, r.hardlinks, r.nodes),
        (3, 3, 1, 1, 1)
    );
    assert_eq!(r.bytes, 11);
    let root = &s.root;
    assert_eq!(fs::read(root.join("bin/tool")).unwrap(), b"binary");
    assert_eq!(
        fs::read_link(root.join("bin")).unwrap(),
        Path::new("usr/bin")
    );
    let tool = fs::metadata(root.join("usr/bin/tool")).unwrap();
    assert_eq!(tool.nlink(), 2);
    assert_eq!(
        tool.ino(),
        fs::metadata(root.join("usr/bin/tool2")).unwrap().ino()
    );
    assert_eq!(tool.mode() & 0o7777, 0o644);
    assert_eq!(tool.mtime(), 1_600_000_000);
    assert_eq!(
        fs::metadata(root.join("usr/bin")).unwrap().mtime(),
        1_600_000_000,
        "directory times survive later entries"
    );
    let fifo = fs::symlink_metadata(root.join("run/fifo")).unwrap();
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.mode() & 0o777, 0o640);
    if rustix::process::geteuid().is_root() {
        assert_eq!((tool.uid(), tool.gid()), (1000, 1001));
        let su = fs::metadata(root.join("usr/bin/su")).unwrap();
        assert_eq!(su.mode() & 0o7777, 0o4755, "set-id bits survive the chown");
        assert_eq!(fs::symlink_metadata(root.join("bin")).unwrap().uid(), 1000);
    }
}

#[test]
fn whiteouts_and_opaque_directories_hide_lower_layers() {
    let s = Sandbox::new();
    apply(
        &s.root,
        &[
            file("etc/keep", b"1"),
            file("etc/gone", b"2"),
            file("var/cache/a", b"3"),
            file("var/cache/sub/b", b"4"),
            file("opt/x", b"5"),
        ],
    )
    .unwrap();
    let r = apply(
        &s.root,
        &[
            file("etc/.wh.gone", b""),
            file("var/cache/new/c", b"6"),
            file("var/cache/.wh..wh..opq", b""),
            file("var/cache/d", b"7"),
            file(".wh.opt", b""),
            file("etc/.wh.never-existed", b""),
        ],
    )
    .unwrap();
    assert_eq!(r.whiteouts, 4);
    let mut cache: Vec<_> = fs::read_dir(s.root.join("var/cache"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    cache.sort();
    assert_eq!(
        cache,
        ["d", "new"],
        "the opaque marker keeps only this layer's entries"
    );
    assert_eq!(fs::read(s.root.join("var/cache/new/c")).unwrap(), b"6");
    assert!(s.root.join("etc/keep").exists());
    assert!(!s.root.join("etc/gone").exists());
    assert!(!s.root.join("opt").exists());
    assert!(
        !s.root.join("etc/.wh.gone").exists(),
        "whiteout markers are not files"
    );
}

#[test]
fn later_layers_replace_entries_of_another_type() {
    let s = Sandbox::new();
    apply(
        &s.root,
        &[
            file("a", b"file"),
            dir("b"),
            file("b/inner", b"x"),
            symlink("c", "/somewhere"),
        ],
    )
    .unwrap();
    apply(
        &s.root,
        &[dir("a"), file("b", b"now a file"), file("c", b"not a link")],
    )
    .unwrap();
    assert!(s.root.join("a").is_dir());
    assert_eq!(fs::read(s.root.join("b")).unwrap(), b"now a file");
    assert!(fs::symlink_metadata(s.root.join("c")).unwrap().is_file());
}

#[test]
fn dot_dot_paths_are_refused_and_absolute_paths_stay_in_the_root() {
    let s = Sandbox::new();
    let r = s.apply_all(&[
        &[file("../outside/secret", b"pwned")],
        &[file("a/../../escape", b"x")],
        &[file("/abs/file", b"in")],
    ]);
    refused(&r[0], "../outside/secret");
    refused(&r[1], "a/../../escape");
    r[2].as_ref().unwrap();
    assert_eq!(fs::read(s.root.join("abs/file")).unwrap(), b"in");
}

#[test]
fn umoci_cve_2021_29136_a_symlink_for_the_root_is_refused() {
    let s = Sandbox::new();
    let outside = s.base.join("outside");
    let r = s.apply_all(&[
        &[
            symlink(".", outside.to_str().unwrap()),
            file("secret", b"pwned"),
        ],
        &[symlink("/", "/tmp")],
    ]);
    refused(&r[0], ".");
    refused(&r[1], "/");
    assert!(fs::symlink_metadata(&s.root).unwrap().is_dir());
}

#[test]
fn containerd_cve_2021_32760_no_chmod_or_write_through_a_symlink() {
    let s = Sandbox::new();
    let secret = s.secret.to_str().unwrap().to_string();
    let outside_sub = s.base.join("outside/sub");
    let mut wide = file("link", b"replaced");
    wide.mode = 0o777;
    let mut wide_dir = dir("dirlink");
    wide_dir.mode = 0o777;
    let r = s.apply_all(&[
        &[
            symlink("link", &secret),
            symlink("dirlink", outside_sub.to_str().unwrap()),
            symlink("rel", "../outside/secret"),
        ],
        &[wide, wide_dir, file("rel", b"also replaced")],
    ]);
    assert!(r.iter().all(Result::is_ok), "{r:?}");
    assert_eq!(fs::metadata(&s.secret).unwrap().mode() & 0o777, 0o600);
    assert_eq!(fs::read(s.root.join("link")).unwrap(), b"replaced");
    assert!(fs::symlink_metadata(s.root.join("dirlink"))
        .unwrap()
        .is_dir());
}

#[test]
fn rustsec_2021_0080_directories_through_a_dot_dot_symlink_stay_inside() {
    let s = Sandbox::new();
    let r = s.apply_all(&[&[
        symlink("up", ".."),
        symlink("upup", "../../.."),
        dir("up/outside"),
        file("up/outside/secret", b"pwned"),
        dir("upup/escaped"),
        file("upup/escaped/file", b"pwned"),
        symlink("abs", s.base.to_str().unwrap()),
        file("abs/outside/sub/planted", b"pwned"),
    ]]);
    r[0].as_ref().unwrap();
    // Resolved as if the root were "/": everything landed inside it.
    assert_eq!(fs::read(s.root.join("outside/secret")).unwrap(), b"pwned");
    assert!(s.root.join("escaped/file").is_file());
    let inside = s
        .root
        .join(s.base.strip_prefix("/").unwrap())
        .join("outside/sub/planted");
    assert!(inside.is_file());
}

#[test]
fn hard_links_to_outside_targets_are_refused_or_stay_inside() {
    let s = Sandbox::new();
    let secret = s.secret.to_str().unwrap().to_string();
    let r = s.apply_all(&[
        &[hardlink("h1", "../outside/secret")],
        &[hardlink("h2", &secret)],
        &[symlink("s", &secret), hardlink("h3", "s")],
        &[
            symlink("d", s.base.join("outside").to_str().unwrap()),
            hardlink("h4", "d/secret"),
        ],
    ]);
    refused(&r[0], "h1");
    assert!(
        matches!(&r[1], Err(ApplyError::Io { entry, .. }) if entry == "h2"),
        "{:?}",
        r[1]
    );
    r[2].as_ref().unwrap();
    assert!(
        fs::symlink_metadata(s.root.join("h3"))
            .unwrap()
            .file_type()
            .is_symlink(),
        "the link names the symlink itself"
    );
    assert!(
        matches!(&r[3], Err(ApplyError::Io { entry, .. }) if entry == "h4"),
        "{:?}",
        r[3]
    );
    assert_eq!(fs::metadata(&s.secret).unwrap().nlink(), 1);
}

#[test]
fn whiteouts_naming_dot_dot_or_outside_paths_remove_nothing_outside() {
    let s = Sandbox::new();
    let r = s.apply_all(&[
        &[file(".wh...", b"")],
        &[file("a/.wh..", b"")],
        &[file("../outside/.wh.secret", b"")],
        &[
            symlink("o", s.base.join("outside").to_str().unwrap()),
            file("o/.wh.secret", b""),
            file("o/.wh..wh..opq", b""),
        ],
    ]);
    refused(&r[0], ".wh...");
    refused(&r[1], "a/.wh..");
    refused(&r[2], "../outside/.wh.secret");
    r[3].as_ref().unwrap();
    assert!(s.root.exists());
}

#[test]
fn device_nodes_follow_the_policy() {
    let s = Sandbox::new();
    let mut null = file("dev/null", b"");
    null.kind = tar::EntryType::Char;
    let data = layer(&[null]);
    let skip = apply_layer(
        &s.root,
        data.as_slice(),
        &ApplyOptions {
            devices: DevicePolicy::Skip,
            owners: false,
            ..ApplyOptions::default()
        },
    )
    .unwrap();
    assert_eq!(skip.devices_skipped, 1);
    assert!(!s.root.join("dev/null").exists());
    let err = apply_layer(
        &s.root,
        data.as_slice(),
        &ApplyOptions {
            devices: DevicePolicy::Refuse,
            owners: false,
            ..ApplyOptions::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(&err, ApplyError::Refused { entry, .. } if entry == "dev/null"),
        "{err}"
    );
    if rustix::process::geteuid().is_root() {
        apply_layer(
            &s.root,
            data.as_slice(),
            &ApplyOptions {
                devices: DevicePolicy::Create,
                owners: true,
                ..ApplyOptions::default()
            },
        )
        .unwrap();
        assert!(fs::symlink_metadata(s.root.join("dev/null"))
            .unwrap()
            .file_type()
            .is_char_device());
    }
}

#[test]
fn truncated_and_garbage_layers_are_errors_not_panics() {
    let s = Sandbox::new();
    let good = layer(&[file("a", &[7u8; 5000]), file("b", b"x")]);
    for cut in [100, 512, 700, 2000, 5700] {
        let r = apply_layer(&s.root, &good[..cut], &ApplyOptions::default());
        assert!(r.is_err(), "a layer cut at {cut} applied");
    }
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    assert!(apply_layer(&s.root, garbage.as_slice(), &ApplyOptions::default()).is_err());
}

/// A tar stream of one `size`-byte file of zeros, made on the fly (never held whole).
fn zeros_layer(size: u64) -> impl std::io::Read {
    let mut h = tar::Header::new_gnu();
    h.set_path("big").unwrap();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(size);
    h.set_cksum();
    let pad = (512 - size % 512) % 512;
    std::io::Cursor::new(h.as_bytes().to_vec())
        .chain(std::io::repeat(0).take(size + pad))
        .chain(std::io::Cursor::new(vec![0u8; 1024]))
}

#[test]
fn a_layer_that_never_stops_is_refused_at_the_byte_bound() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir(&root).unwrap();
    // 64 MiB of zeros gzip to about 64 KiB: a bomb in small.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    std::io::copy(&mut zeros_layer(64 << 20), &mut gz).unwrap();
    let bomb = gz.finish().unwrap();
    assert!(bomb.len() < 1 << 20);
    let opts = ApplyOptions {
        limits: boxlet_oci::ApplyLimits {
            max_bytes: 1 << 20,
            ..Default::default()
        },
        ..ApplyOptions::default()
    };
    let plain = flate2::read::GzDecoder::new(&bomb[..]);
    let e = apply_layer(&root, plain, &opts).unwrap_err().to_string();
    assert!(
        e.contains("big") && e.contains("more than 1048576 bytes"),
        "{e}"
    );
    let written = fs::metadata(root.join("big")).map_or(0, |m| m.len());
    assert!(
        written <= (1 << 20) + (256 << 10),
        "{written} bytes written"
    );
    // The default bound is the ext4 builder's.
    assert_eq!(
        ApplyOptions::default().limits.max_bytes,
        boxlet_ext4::LayerLimits::default().max_total_bytes
    );
}

#[test]
fn too_many_entries_or_too_deep_a_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir(&root).unwrap();
    let names: Vec<String> = (0..20).map(|i| format!("f{i}")).collect();
    let entries: Vec<E<'_>> = names.iter().map(|n| file(n, b"x")).collect();
    let opts = ApplyOptions {
        limits: boxlet_oci::ApplyLimits {
            max_entries: 10,
            ..Default::default()
        },
        ..ApplyOptions::default()
    };
    let e = apply_layer(&root, &layer(&entries)[..], &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("more than 10 entries"), "{e}");
    // A path of 301 components, in a GNU long-name record.
    let deep = "d/".repeat(300) + "f";
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(1);
    b.append_data(&mut h, &deep, &b"x"[..]).unwrap();
    let tar = b.into_inner().unwrap();
    let e = apply_layer(&root, &tar[..], &ApplyOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("deeper than 256"), "{e}");
}

#[test]
fn a_huge_pax_header_is_refused_before_it_is_read_into_memory() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir(&root).unwrap();
    // A PAX record claiming 1 GiB: the guard stops it at its header.
    let mut h = tar::Header::new_ustar();
    h.set_path("PaxHeaders/big").unwrap();
    h.set_entry_type(tar::EntryType::XHeader);
    h.set_size(1 << 30);
    h.set_cksum();
    let stream =
        std::io::Cursor::new(h.as_bytes().to_vec()).chain(std::io::repeat(b'a').take(1 << 30));
    let e = apply_layer(&root, stream, &ApplyOptions::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("PAX header record of 1073741824 bytes"), "{e}");
}
