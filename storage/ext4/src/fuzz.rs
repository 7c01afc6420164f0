//! Body of the cargo-fuzz reader target in `fuzz/`, here so that the corpus replay test
//! runs exactly what the fuzzer runs. Takes arbitrary bytes and must never panic.

use crate::{xattrs, Ext4, FileType};

/// Most bytes read from one file.
const READ_CAP: usize = 1 << 16;

/// Open the bytes as an image, walk it, and read every file, link and xattr.
pub fn reader(data: &[u8]) {
    let Ok(fs) = Ext4::new(Box::new(data.to_vec())) else {
        return;
    };
    let entries = match fs.walk() {
        Ok(e) => e,
        Err(_) => {
            // Still exercise path resolution on a tree that does not walk.
            let _ = fs.read_dir("/");
            let _ = fs.read("/etc/hostname");
            return;
        }
    };
    let mut buf = vec![0u8; READ_CAP];
    for (path, meta) in entries {
        let Ok(inode) = fs.inode(meta.ino) else {
            continue;
        };
        let _ = xattrs(&fs, &inode);
        match meta.file_type {
            FileType::Regular => {
                if let Ok(r) = fs.file_reader(&inode) {
                    let _ = r.read_at(&mut buf, 0);
                }
            }
            FileType::Symlink => {
                let _ = fs.read_link(&path);
                let _ = fs.resolve(&path, true);
            }
            _ => {}
        }
    }
}

/// Apply the bytes as one layer (small limits), build an image of the result into a
/// temporary file, and read it back.
pub fn layers(data: &[u8]) {
    let limits = crate::LayerLimits {
        max_total_bytes: 1 << 22,
        max_entries: 2000,
        max_depth: 64,
    };
    let Ok(mut stack) = crate::LayerStack::new(limits) else {
        return;
    };
    if stack.apply("fuzz", data).is_err() {
        return;
    }
    let tree = stack.into_tree();
    let Ok(file) = tempfile::tempfile() else {
        return;
    };
    let opts = crate::BuildOptions {
        journal: false,
        uuid: Some([1; 16]),
        ..Default::default()
    };
    let mut layer = |_| Ok(Box::new(data) as Box<dyn std::io::Read + '_>);
    if crate::build_with_layers(&tree, &file, &opts, &mut layer).is_ok() {
        let fs = Ext4::new(Box::new(file)).expect("a built image opens");
        fs.walk().expect("a built image walks");
    }
}
