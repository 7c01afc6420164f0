//! proptest: random trees (every file type, hard links, holes, xattrs, odd times and
//! owners) -> build -> e2fsck -fn clean -> read back equal to the tree.

use std::collections::BTreeMap;

use boxlet_ext4::{
    build_file, BuildOptions, Ext4, FileData, FileType, Node, NodeKind, NodeMeta, Tree,
};
use proptest::prelude::*;
use tempfile::TempDir;

use crate::builder::e2fsck_clean;

#[derive(Debug, Clone)]
enum Gen {
    File { len: usize, holes: bool, seed: u8 },
    Dir(Vec<(String, Gen)>),
    Symlink(String),
    Fifo,
    Dev(u32, u32),
    HardLink(usize),
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[a-z0-9._-]{1,12}",
        1 => "[a-z]{200,255}",
    ]
    .prop_filter("not . or ..", |n| n != "." && n != "..")
}

fn leaf() -> impl Strategy<Value = Gen> {
    prop_oneof![
        6 => (prop_oneof![0usize..100, 0usize..20_000, 40_000usize..200_000], any::<bool>(), any::<u8>())
            .prop_map(|(len, holes, seed)| Gen::File { len, holes, seed }),
        2 => prop_oneof!["[a-z/.]{1,50}", "[a-z/]{60,300}"].prop_map(Gen::Symlink),
        1 => Just(Gen::Fifo),
        1 => (0u32..4096, 0u32..1_000_000).prop_map(|(a, b)| Gen::Dev(a, b)),
        1 => (0usize..100).prop_map(Gen::HardLink),
    ]
}

fn gen_tree() -> impl Strategy<Value = Gen> {
    leaf().prop_recursive(4, 60, 12, |inner| {
        prop::collection::vec((name(), inner), 0..12).prop_map(|v| {
            let mut seen = std::collections::HashSet::new();
            Gen::Dir(
                v.into_iter()
                    .filter(|(n, _)| seen.insert(n.clone()))
                    .collect(),
            )
        })
    })
}

fn meta() -> impl Strategy<Value = NodeMeta> {
    (
        0u16..0o10000,
        prop_oneof![Just(0u32), 0u32..70_000, Just(u32::MAX - 1)],
        prop_oneof![Just(0u32), 0u32..70_000],
        prop_oneof![
            Just(0i64),
            0i64..0x7fff_ffff,
            0x8000_0000i64..0x3_0000_0000,
            -100_000i64..0
        ],
        0u32..1_000_000_000,
        prop::collection::vec(
            ("[a-z]{1,10}", prop::collection::vec(any::<u8>(), 0..300)),
            0..3,
        ),
    )
        .prop_map(|(mode, uid, gid, secs, nanos, x)| {
            let mut xattrs: Vec<(String, Vec<u8>)> = x
                .into_iter()
                .map(|(n, v)| (format!("user.{n}"), v))
                .collect();
            xattrs.sort();
            xattrs.dedup_by(|a, b| a.0 == b.0);
            NodeMeta {
                mode,
                uid,
                gid,
                atime: (secs, nanos),
                mtime: (secs / 2, nanos / 3),
                ctime: (secs, 0),
                xattrs,
            }
        })
}

fn data(len: usize, holes: bool, seed: u8) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(seed | 1).wrapping_add(seed))
        .collect();
    if holes {
        for (k, chunk) in v.chunks_mut(4096).enumerate() {
            if k % 3 == 1 {
                chunk.fill(0);
            }
        }
    }
    v
}

/// Materialize the generated tree; `metas` supplies metadata round-robin.
fn materialize(g: &Gen, metas: &[NodeMeta]) -> Tree {
    let mut tree = Tree::new(NodeMeta {
        mode: 0o755,
        ..metas[0].clone()
    });
    let mut files = Vec::new();
    let mut k = 1;
    fn walk(
        tree: &mut Tree,
        parent: usize,
        g: &Gen,
        metas: &[NodeMeta],
        k: &mut usize,
        files: &mut Vec<usize>,
    ) {
        let Gen::Dir(children) = g else { return };
        for (n, c) in children {
            let meta = metas[*k % metas.len()].clone();
            *k += 1;
            let kind = match c {
                Gen::File { len, holes, seed } => {
                    NodeKind::File(FileData::Bytes(data(*len, *holes, *seed)))
                }
                Gen::Dir(_) => NodeKind::Dir(BTreeMap::new()),
                Gen::Symlink(t) => NodeKind::Symlink(t.clone().into_bytes()),
                Gen::Fifo => NodeKind::Fifo,
                Gen::Dev(a, b) => NodeKind::CharDevice(*a, *b),
                Gen::HardLink(i) => {
                    if let Some(&target) = files.get(i % files.len().max(1)) {
                        tree.link(parent, n.as_bytes(), target).unwrap();
                    }
                    continue;
                }
            };
            let is_file = matches!(kind, NodeKind::File(_));
            let id = tree.add(parent, n.as_bytes(), Node { kind, meta }).unwrap();
            if is_file {
                files.push(id);
            }
            walk(tree, id, c, metas, k, files);
        }
    }
    walk(&mut tree, 0, g, metas, &mut k, &mut files);
    tree
}

fn check(tree: &Tree) -> Result<(), TestCaseError> {
    let dir = TempDir::new().unwrap();
    let img = dir.path().join("t.img");
    build_file(
        tree,
        &img,
        &BuildOptions {
            uuid: Some([7; 16]),
            journal: false,
            ..BuildOptions::default()
        },
    )
    .unwrap();
    e2fsck_clean(&img);
    let fs = Ext4::open(&img).unwrap();
    // Walk the tree and the image together.
    let mut stack = vec![(0usize, "/".to_string())];
    while let Some((id, path)) = stack.pop() {
        let node = &tree.nodes[id];
        let inode = fs.resolve(&path, false).unwrap();
        let m = fs.metadata(&inode).unwrap();
        if id != 0 {
            prop_assert_eq!(m.mode, node.meta.mode & 0o7777, "{}", path);
            prop_assert_eq!((m.uid, m.gid), (node.meta.uid, node.meta.gid), "{}", path);
            prop_assert_eq!((m.mtime.secs, m.mtime.nanos), node.meta.mtime, "{}", path);
            prop_assert_eq!((m.atime.secs, m.atime.nanos), node.meta.atime, "{}", path);
            let names: Vec<String> = node.meta.xattrs.iter().map(|x| x.0.clone()).collect();
            let mut got: Vec<(String, Vec<u8>)> = boxlet_ext4::xattrs(&fs, &inode)
                .unwrap()
                .into_iter()
                .map(|x| (x.name, x.value))
                .collect();
            got.sort();
            prop_assert_eq!(&got, &node.meta.xattrs, "{} ({:?})", path, names);
        }
        match &node.kind {
            NodeKind::File(FileData::Bytes(b)) => {
                prop_assert_eq!(m.file_type, FileType::Regular);
                prop_assert_eq!(&fs.read_inode(&inode, 1 << 30).unwrap(), b, "{}", path);
            }
            NodeKind::Dir(children) => {
                prop_assert_eq!(m.file_type, FileType::Directory);
                let mut names: Vec<Vec<u8>> = fs
                    .read_dir(&path)
                    .unwrap()
                    .into_iter()
                    .map(|e| e.name)
                    .collect();
                names.retain(|n| !(id == 0 && n == b"lost+found"));
                names.sort();
                prop_assert_eq!(
                    &names,
                    &children.keys().cloned().collect::<Vec<_>>(),
                    "{}",
                    path
                );
                for (n, &c) in children {
                    let p = if path == "/" {
                        format!("/{}", String::from_utf8_lossy(n))
                    } else {
                        format!("{path}/{}", String::from_utf8_lossy(n))
                    };
                    stack.push((c, p));
                }
            }
            NodeKind::Symlink(t) => prop_assert_eq!(&fs.read_link(&path).unwrap(), t),
            NodeKind::CharDevice(a, b) => prop_assert_eq!(m.device, Some((*a, *b)), "{}", path),
            NodeKind::Fifo => prop_assert_eq!(m.file_type, FileType::Fifo),
            _ => {}
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_trees_build_and_read_back(g in gen_tree(), metas in prop::collection::vec(meta(), 1..8)) {
        let g = match g { d @ Gen::Dir(_) => d, leaf => Gen::Dir(vec![("only".into(), leaf)]) };
        check(&materialize(&g, &metas))?;
    }
}
