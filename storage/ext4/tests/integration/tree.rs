//! A source tree with every kind of entry, and the comparison of a host tree with what
//! the reader sees in an image built from it.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use boxlet_ext4::{Ext4, FileType};

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deterministic bytes.
pub fn bytes(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .rotate_left(seed as u32 % 32) as u8
                ^ seed
        })
        .collect()
}

/// Fill `root` with: small, multi-block, sparse and empty files, a deep path, fast and
/// slow symlinks, hard links, a FIFO, device nodes (as root), xattrs, special mode bits,
/// owners, non-UTF-8-free odd names, and a directory of `many` entries (an htree).
pub fn populate(root: &Path, many: usize) {
    let w = |p: &str, data: &[u8]| std::fs::write(root.join(p), data).unwrap();
    std::fs::create_dir_all(root.join("etc/ssl/certs")).unwrap();
    std::fs::create_dir_all(root.join("usr/bin")).unwrap();
    w("etc/hostname", b"boxlet\n");
    w("etc/empty", b"");
    w("etc/ssl/certs/big.pem", &bytes(300_000, 3));
    w("usr/bin/tool", &bytes(5000, 7));
    std::fs::set_permissions(
        root.join("usr/bin/tool"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    std::fs::create_dir(root.join("tmp")).unwrap();
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
    // Sparse: data, a 10 MiB hole, data, and a hole at the end.
    let f = std::fs::File::create(root.join("sparse.img")).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(b"head", 0).unwrap();
    f.write_all_at(b"middle", 10 << 20).unwrap();
    f.set_len(20 << 20).unwrap();
    let deep: String = (0..30).map(|i| format!("d{i}/")).collect();
    std::fs::create_dir_all(root.join(&deep)).unwrap();
    w(&format!("{deep}leaf.txt"), b"deep");
    std::os::unix::fs::symlink("hostname", root.join("etc/fast-link")).unwrap();
    let long_target = format!("/{}", "x/".repeat(60)) + "target";
    std::os::unix::fs::symlink(&long_target, root.join("etc/slow-link")).unwrap();
    std::os::unix::fs::symlink("../etc/hostname", root.join("usr/rel-link")).unwrap();
    std::fs::hard_link(root.join("usr/bin/tool"), root.join("usr/bin/tool-alias")).unwrap();
    run("mkfifo", &[root.join("fifo").to_str().unwrap()]);
    if unsafe_free_is_root() {
        run(
            "mknod",
            &[root.join("null").to_str().unwrap(), "c", "1", "3"],
        );
        run(
            "mknod",
            &[root.join("loop9").to_str().unwrap(), "b", "7", "9"],
        );
        std::os::unix::fs::chown(root.join("etc/hostname"), Some(1234), Some(5678)).unwrap();
    }
    xattr::set(root.join("etc/hostname"), "user.comment", b"hello").unwrap();
    xattr::set(root.join("usr/bin/tool"), "user.big", &bytes(700, 9)).unwrap();
    std::fs::create_dir(root.join("many")).unwrap();
    for i in 0..many {
        w(
            &format!("many/entry-with-a-long-name-{i:06}"),
            format!("{i}").as_bytes(),
        );
    }
    w("name with spaces & ünïcödé", b"odd");
}

/// Whether the tests run as root (device nodes and chown need it).
pub fn unsafe_free_is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// Entries by "/path".
pub type Tree = BTreeMap<String, Entry>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: FileType,
    mode: u32,
    uid: u32,
    gid: u32,
    pub size: u64,
    links: u64,
    mtime: i64,
    pub content: Option<Vec<u8>>,
    target: Option<String>,
    device: Option<(u32, u32)>,
    xattrs: Vec<(String, Vec<u8>)>,
}

/// The host tree under `root`, keyed by "/path".
pub fn host_tree(root: &Path) -> Tree {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let rel = format!("/{}", p.strip_prefix(root).unwrap().to_string_lossy());
        let rel = if rel == "/" {
            rel
        } else {
            rel.trim_end_matches('/').to_owned()
        };
        let ft = m.file_type();
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_dir() {
            FileType::Directory
        } else if ft.is_symlink() {
            FileType::Symlink
        } else if ft.is_fifo() {
            FileType::Fifo
        } else if ft.is_char_device() {
            FileType::CharDevice
        } else if ft.is_block_device() {
            FileType::BlockDevice
        } else if ft.is_socket() {
            FileType::Socket
        } else {
            FileType::Regular
        };
        if kind == FileType::Directory {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
        }
        let mut xattrs: Vec<(String, Vec<u8>)> = if kind == FileType::Symlink {
            Vec::new()
        } else {
            xattr::list(&p)
                .unwrap()
                .map(|n| {
                    let n = n.to_string_lossy().into_owned();
                    let v = xattr::get(&p, &n).unwrap().unwrap_or_default();
                    (n, v)
                })
                .collect()
        };
        xattrs.sort();
        let rdev = m.rdev();
        out.insert(
            rel,
            Entry {
                kind,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                size: if kind == FileType::Regular || kind == FileType::Symlink {
                    m.size()
                } else {
                    0
                },
                links: if kind == FileType::Directory {
                    0
                } else {
                    m.nlink()
                },
                mtime: m.mtime(),
                content: (kind == FileType::Regular).then(|| std::fs::read(&p).unwrap()),
                target: (kind == FileType::Symlink).then(|| {
                    std::fs::read_link(&p)
                        .unwrap()
                        .to_string_lossy()
                        .into_owned()
                }),
                device: matches!(kind, FileType::CharDevice | FileType::BlockDevice).then(|| {
                    (
                        ((rdev >> 8) & 0xfff) as u32,
                        ((rdev & 0xff) | ((rdev >> 12) & 0xfff00)) as u32,
                    )
                }),
                xattrs,
            },
        );
    }
    out
}

/// The same view of an image, through the reader.
pub fn image_tree(fs: &Ext4) -> Tree {
    let mut out = BTreeMap::new();
    for (path, m) in fs.walk().unwrap() {
        if path == "/lost+found" || path.starts_with("/lost+found/") {
            continue;
        }
        let inode = fs.inode(m.ino).unwrap();
        let mut xattrs: Vec<(String, Vec<u8>)> = boxlet_ext4::xattrs(fs, &inode)
            .unwrap()
            .into_iter()
            .filter(|x| x.name != "system.data")
            .map(|x| (x.name, x.value))
            .collect();
        xattrs.sort();
        out.insert(
            path.clone(),
            Entry {
                kind: m.file_type,
                mode: u32::from(m.mode),
                uid: m.uid,
                gid: m.gid,
                size: if matches!(m.file_type, FileType::Regular | FileType::Symlink) {
                    m.size
                } else {
                    0
                },
                links: if m.file_type == FileType::Directory {
                    0
                } else {
                    u64::from(m.links)
                },
                mtime: m.mtime.secs,
                content: (m.file_type == FileType::Regular)
                    .then(|| fs.read_inode(&inode, boxlet_ext4::MAX_READ).unwrap()),
                target: m.link_target.clone(),
                device: m.device,
                xattrs,
            },
        );
    }
    out
}

/// Assert two trees are equal, reporting the first difference by path.
pub fn assert_same(what: &str, host: &Tree, image: &Tree) {
    let hk: Vec<&String> = host.keys().collect();
    let ik: Vec<&String> = image.keys().collect();
    if hk != ik {
        let missing: Vec<_> = hk
            .iter()
            .filter(|k| !image.contains_key(**k))
            .take(5)
            .collect();
        let extra: Vec<_> = ik
            .iter()
            .filter(|k| !host.contains_key(**k))
            .take(5)
            .collect();
        panic!("{what}: paths differ; missing {missing:?}, extra {extra:?}");
    }
    for (k, h) in host {
        let i = &image[k];
        if k == "/" {
            // mke2fs sets the root's owner and mode from the source directory too, but
            // the root's times are its own.
            assert_eq!((h.kind, h.mode), (i.kind, i.mode), "{what}: {k}");
            continue;
        }
        if h != i {
            let trunc = |e: &Entry| {
                format!(
                    "{:?}",
                    Entry {
                        content: e.content.as_ref().map(|c| c[..c.len().min(16)].to_vec()),
                        ..e.clone()
                    }
                )
            };
            panic!(
                "{what}: {k} differs:\n host  {}\n image {}",
                trunc(h),
                trunc(i)
            );
        }
    }
}

impl Entry {
    /// Kind, permission bits, owner, size, contents hash and link target.
    pub fn summary_without_special_bits(&self) -> String {
        let content = self.content.as_ref().map(|c| crc32c_of(c));
        let mode = self.mode & 0o777;
        format!(
            "{:?} {mode:o} {}:{} {} {content:?} {:?}",
            self.kind, self.uid, self.gid, self.size, self.target
        )
    }
}

fn crc32c_of(data: &[u8]) -> u32 {
    data.iter()
        .fold(0u32, |h, &b| h.rotate_left(5) ^ u32::from(b))
}
