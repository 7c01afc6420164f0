//! proptest: random layer stacks (files, directories, whiteouts, opaque directories)
//! built into an image read back equal to a model of the OCI layer semantics, applied a
//! whole layer at a time: a layer's whiteouts and opaque markers hide what lower layers
//! have, then its entries are added.

use std::collections::BTreeMap;

use boxlet_ext4::{build_file_with_layers, BuildOptions, Ext4, FileType, LayerLimits, LayerStack};
use proptest::prelude::*;
use tempfile::TempDir;

const DIRS: [&str; 3] = ["a", "b", "a/c"];

#[derive(Debug, Clone)]
enum Op {
    File(String, u8),
    Dir(String),
    Whiteout(String),
    Opaque(String),
}

fn path() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["", "a", "b", "a/c"]),
        prop::sample::select(vec!["x", "y"]),
    )
        .prop_map(|(d, f)| {
            if d.is_empty() {
                f.to_string()
            } else {
                format!("{d}/{f}")
            }
        })
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (path(), any::<u8>()).prop_map(|(p, b)| Op::File(p, b)),
        1 => prop::sample::select(DIRS.to_vec()).prop_map(|d| Op::Dir(d.to_string())),
        2 => prop_oneof![path(), prop::sample::select(DIRS.to_vec()).prop_map(String::from)].prop_map(Op::Whiteout),
        1 => prop::sample::select(DIRS.to_vec()).prop_map(|d| Op::Opaque(d.to_string())),
    ]
}

/// Drop ops a valid layer would not hold together: a whiteout of a path (or an ancestor)
/// this layer also adds or puts markers under, and duplicate adds.
fn valid_layer(ops: Vec<Op>) -> Vec<Op> {
    let adds: Vec<String> = ops
        .iter()
        .filter_map(|o| match o {
            Op::File(p, _) | Op::Dir(p) | Op::Opaque(p) => Some(p.clone()),
            Op::Whiteout(w) => w.rsplit_once('/').map(|(d, _)| d.to_string()),
        })
        .collect();
    let mut seen = std::collections::HashSet::new();
    ops.into_iter()
        .filter(|o| match o {
            Op::Whiteout(w) => !adds
                .iter()
                .any(|a| a == w || a.starts_with(&format!("{w}/"))),
            Op::File(p, _) | Op::Dir(p) => seen.insert(p.clone()),
            Op::Opaque(_) => true,
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir,
    File(Vec<u8>),
}

fn parents(p: &str) -> Vec<String> {
    let parts: Vec<&str> = p.split('/').collect();
    (1..parts.len()).map(|i| parts[..i].join("/")).collect()
}

fn apply_model(model: &mut BTreeMap<String, Entry>, layer: &[Op]) {
    let under = |p: &str, root: &str| p == root || p.starts_with(&format!("{root}/"));
    for o in layer {
        match o {
            Op::Whiteout(w) => model.retain(|p, _| !under(p, w)),
            Op::Opaque(d) => model.retain(|p, _| !p.starts_with(&format!("{d}/"))),
            _ => {}
        }
    }
    for o in layer {
        let (p, e) = match o {
            Op::File(p, b) => (p, Entry::File(vec![*b; usize::from(*b) * 37])),
            Op::Dir(p) => (p, Entry::Dir),
            _ => continue,
        };
        for d in parents(p) {
            model.insert(d, Entry::Dir);
        }
        // A file replacing a directory (or the reverse) takes its whole subtree.
        model.retain(|q, _| !q.starts_with(&format!("{p}/")) || e == Entry::Dir);
        if !(e == Entry::Dir && model.get(p) == Some(&Entry::Dir)) {
            model.insert(p.clone(), e);
        }
    }
    // The directories holding this layer's whiteout and opaque markers exist in its view.
    for o in layer {
        let dirs = match o {
            Op::Opaque(d) => parents(d).into_iter().chain([d.clone()]).collect(),
            Op::Whiteout(w) => parents(w),
            _ => continue,
        };
        for q in dirs {
            model.entry(q).or_insert(Entry::Dir);
        }
    }
}

fn tarball(layer: &[Op]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut put = |path: &str, kind: tar::EntryType, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_entry_type(kind);
        h.set_mode(0o755);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, data).unwrap();
    };
    for o in layer {
        match o {
            Op::File(p, byte) => put(
                p,
                tar::EntryType::Regular,
                &vec![*byte; usize::from(*byte) * 37],
            ),
            Op::Dir(p) => put(&format!("{p}/"), tar::EntryType::Directory, b""),
            Op::Whiteout(w) => {
                let (dir, name) = w.rsplit_once('/').map_or(("", w.as_str()), |(d, n)| (d, n));
                let p = if dir.is_empty() {
                    format!(".wh.{name}")
                } else {
                    format!("{dir}/.wh.{name}")
                };
                put(&p, tar::EntryType::Regular, b"");
            }
            Op::Opaque(d) => put(&format!("{d}/.wh..wh..opq"), tar::EntryType::Regular, b""),
        }
    }
    b.into_inner().unwrap()
}

fn layers() -> impl Strategy<Value = Vec<Vec<Op>>> {
    prop::collection::vec(
        prop::collection::vec(op(), 0..10).prop_map(valid_layer),
        1..5,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn layer_stacks_build_what_the_model_says(stack in layers()) {
        // A file where the stack needs a directory (or the reverse) is refused by the
        // builder; keep only stacks whose entry kinds never clash at a path.
        let mut model = BTreeMap::new();
        let mut builder = LayerStack::new(LayerLimits::default()).unwrap();
        let blobs: Vec<Vec<u8>> = stack.iter().map(|l| tarball(l)).collect();
        for (i, layer) in stack.iter().enumerate() {
            let clash = layer.iter().any(|o| match o {
                Op::File(p, _) => parents(p).iter().any(|d| matches!(model.get(d), Some(Entry::File(_)))),
                Op::Dir(p) | Op::Opaque(p) => parents(p).iter().chain([p]).any(|d| matches!(model.get(d), Some(Entry::File(_)))),
                Op::Whiteout(w) => parents(w).iter().any(|d| matches!(model.get(d), Some(Entry::File(_)))),
            });
            prop_assume!(!clash);
            builder.apply(&format!("layer{i}"), &blobs[i][..]).unwrap();
            apply_model(&mut model, layer);
        }
        let dir = TempDir::new().unwrap();
        let img = dir.path().join("l.img");
        let mut open = |i: usize| Ok(Box::new(&blobs[i][..]) as Box<dyn std::io::Read + '_>);
        build_file_with_layers(&builder.into_tree(), &img, &BuildOptions { journal: false, ..BuildOptions::default() }, &mut open).unwrap();
        crate::builder::e2fsck_clean(&img);
        let fs = Ext4::open(&img).unwrap();
        let mut got = BTreeMap::new();
        for (p, m) in fs.walk().unwrap() {
            if p == "/" || p == "/lost+found" {
                continue;
            }
            let key = p.trim_start_matches('/').to_string();
            let e = match m.file_type {
                FileType::Directory => Entry::Dir,
                _ => Entry::File(fs.read(&p).unwrap()),
            };
            got.insert(key, e);
        }
        prop_assert_eq!(got, model);
    }
}
