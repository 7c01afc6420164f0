//! The in-memory tree an image is built from: every entry's kind, metadata and data
//! source, with hard links as several names for one node. Built from a host directory
//! here; from OCI layers by the layer code.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::error::{ErrorKind, Result};
use crate::Error;

/// Index of a node in a [`Tree`].
pub type NodeId = usize;

/// Where a regular file's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileData {
    /// A file on the host, read while the image is written.
    Host {
        /// Its path.
        path: PathBuf,
        /// Its size when the tree was made.
        size: u64,
    },
    /// Bytes in memory.
    Bytes(Vec<u8>),
    /// Entry number `entry` (counting from 0) of layer `layer` of a [`crate::LayerStack`]:
    /// read again from the layer when the image is built.
    Layer {
        /// Index of the layer in the order applied.
        layer: usize,
        /// Index of the entry in the layer's tar stream.
        entry: u64,
        /// Size in bytes.
        size: u64,
    },
}

impl FileData {
    /// Size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Self::Host { size, .. } | Self::Layer { size, .. } => *size,
            Self::Bytes(b) => b.len() as u64,
        }
    }
}

/// What a node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// A directory: names to nodes, in byte order.
    Dir(BTreeMap<Vec<u8>, NodeId>),
    /// A regular file.
    File(FileData),
    /// A symbolic link and its target.
    Symlink(Vec<u8>),
    /// Character device (major, minor).
    CharDevice(u32, u32),
    /// Block device (major, minor).
    BlockDevice(u32, u32),
    /// Named pipe.
    Fifo,
    /// Unix socket.
    Socket,
}

/// Ownership, permissions, times and xattrs of a node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeMeta {
    /// Permission bits with setuid, setgid and sticky (no file type).
    pub mode: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Access time (seconds, nanoseconds).
    pub atime: (i64, u32),
    /// Modification time.
    pub mtime: (i64, u32),
    /// Change time.
    pub ctime: (i64, u32),
    /// Extended attributes, full names (`user.x`, `security.capability`).
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// One node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Kind and content.
    pub kind: NodeKind,
    /// Metadata.
    pub meta: NodeMeta,
}

/// A tree of nodes; node 0 is the root directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tree {
    /// The nodes.
    pub nodes: Vec<Node>,
}

impl Default for Tree {
    fn default() -> Self {
        Self::new(NodeMeta {
            mode: 0o755,
            ..NodeMeta::default()
        })
    }
}

impl Tree {
    /// An empty root directory with `meta`.
    pub fn new(meta: NodeMeta) -> Self {
        Self {
            nodes: vec![Node {
                kind: NodeKind::Dir(BTreeMap::new()),
                meta,
            }],
        }
    }

    /// Add `node` under directory `parent` as `name` (replacing nothing: the name must be
    /// new). Returns its id.
    pub fn add(&mut self, parent: NodeId, name: &[u8], node: Node) -> Result<NodeId> {
        let id = self.nodes.len();
        self.nodes.push(node);
        self.link(parent, name, id)?;
        Ok(id)
    }

    /// Give node `id` another name in `parent` (a hard link).
    pub fn link(&mut self, parent: NodeId, name: &[u8], id: NodeId) -> Result<()> {
        if name.is_empty()
            || name.len() > 255
            || name.contains(&b'/')
            || name.contains(&0)
            || name == b"."
            || name == b".."
        {
            return Err(ErrorKind::InvalidInput(format!(
                "invalid name {:?}",
                String::from_utf8_lossy(name)
            ))
            .into());
        }
        match &mut self.nodes[parent].kind {
            NodeKind::Dir(children) => {
                if children.insert(name.to_vec(), id).is_some() {
                    return Err(ErrorKind::InvalidInput(format!(
                        "duplicate name {:?}",
                        String::from_utf8_lossy(name)
                    ))
                    .into());
                }
                Ok(())
            }
            _ => Err(ErrorKind::NotADirectory.into()),
        }
    }

    /// Put `node` at the absolute `path`, creating missing parent directories (mode 0755,
    /// owned by root) and replacing what was there unless it is a directory.
    pub fn put(&mut self, path: &str, node: Node) -> Result<NodeId> {
        let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        let Some((name, parents)) = comps.split_last() else {
            return Err(ErrorKind::InvalidInput(format!("cannot put a node at {path:?}")).into());
        };
        let mut cur = 0;
        for c in parents {
            let existing = match &self.nodes[cur].kind {
                NodeKind::Dir(children) => children.get(c.as_bytes()).copied(),
                _ => return Err(ErrorKind::NotADirectory.into()),
            };
            cur = match existing {
                Some(id) => id,
                None => self.add(
                    cur,
                    c.as_bytes(),
                    Node {
                        kind: NodeKind::Dir(BTreeMap::new()),
                        meta: NodeMeta {
                            mode: 0o755,
                            ..NodeMeta::default()
                        },
                    },
                )?,
            };
        }
        match &mut self.nodes[cur].kind {
            NodeKind::Dir(children) => {
                if let Some(&old) = children.get(name.as_bytes()) {
                    if matches!(self.nodes[old].kind, NodeKind::Dir(_)) {
                        return Err(
                            ErrorKind::InvalidInput(format!("{path:?} is a directory")).into()
                        );
                    }
                    if let NodeKind::Dir(children) = &mut self.nodes[cur].kind {
                        children.remove(name.as_bytes());
                    }
                }
            }
            _ => return Err(ErrorKind::NotADirectory.into()),
        }
        self.add(cur, name.as_bytes(), node)
    }

    /// The tree under a host directory (symlinks not followed, hard links kept, xattrs
    /// read where the host filesystem has them).
    pub fn from_dir(root: &Path) -> Result<Self> {
        let meta = std::fs::symlink_metadata(root)
            .map_err(|e| Error::io(format!("{}", root.display()), e))?;
        if !meta.is_dir() {
            return Err(ErrorKind::NotADirectory.into());
        }
        let mut tree = Self::new(host_meta(root, &meta)?);
        let mut seen: HashMap<(u64, u64), NodeId> = HashMap::new();
        let mut stack = vec![(root.to_path_buf(), 0usize)];
        while let Some((dir, id)) = stack.pop() {
            let rd =
                std::fs::read_dir(&dir).map_err(|e| Error::io(format!("{}", dir.display()), e))?;
            for entry in rd {
                let entry = entry.map_err(|e| Error::io(format!("{}", dir.display()), e))?;
                let path = entry.path();
                let m = std::fs::symlink_metadata(&path)
                    .map_err(|e| Error::io(format!("{}", path.display()), e))?;
                use std::os::unix::ffi::OsStrExt;
                let name = entry.file_name().as_bytes().to_vec();
                if !m.is_dir() && m.nlink() > 1 {
                    if let Some(&other) = seen.get(&(m.dev(), m.ino())) {
                        tree.link(id, &name, other)?;
                        continue;
                    }
                }
                let ft = m.file_type();
                let kind = if ft.is_dir() {
                    NodeKind::Dir(BTreeMap::new())
                } else if ft.is_symlink() {
                    use std::os::unix::ffi::OsStringExt;
                    let t = std::fs::read_link(&path)
                        .map_err(|e| Error::io(format!("{}", path.display()), e))?;
                    NodeKind::Symlink(t.into_os_string().into_vec())
                } else if ft.is_char_device() {
                    let (a, b) = split_dev(m.rdev());
                    NodeKind::CharDevice(a, b)
                } else if ft.is_block_device() {
                    let (a, b) = split_dev(m.rdev());
                    NodeKind::BlockDevice(a, b)
                } else if ft.is_fifo() {
                    NodeKind::Fifo
                } else if ft.is_socket() {
                    NodeKind::Socket
                } else {
                    NodeKind::File(FileData::Host {
                        path: path.clone(),
                        size: m.len(),
                    })
                };
                let is_dir = ft.is_dir();
                let child = tree.add(
                    id,
                    &name,
                    Node {
                        kind,
                        meta: host_meta(&path, &m)?,
                    },
                )?;
                if m.nlink() > 1 && !is_dir {
                    seen.insert((m.dev(), m.ino()), child);
                }
                if is_dir {
                    stack.push((path, child));
                }
            }
        }
        Ok(tree)
    }
}

/// glibc's dev_t encoding.
fn split_dev(dev: u64) -> (u32, u32) {
    let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
    let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
    (major as u32, minor as u32)
}

fn host_meta(path: &Path, m: &std::fs::Metadata) -> Result<NodeMeta> {
    let mut xattrs = Vec::new();
    if !m.file_type().is_symlink() {
        // Filesystems without xattr support list nothing.
        if let Ok(names) = xattr::list(path) {
            for n in names {
                let name = n.to_string_lossy().into_owned();
                if let Ok(Some(v)) = xattr::get(path, &n) {
                    xattrs.push((name, v));
                }
            }
        }
    }
    xattrs.sort();
    Ok(NodeMeta {
        mode: (m.mode() & 0o7777) as u16,
        uid: m.uid(),
        gid: m.gid(),
        atime: (m.atime(), m.atime_nsec() as u32),
        mtime: (m.mtime(), m.mtime_nsec() as u32),
        ctime: (m.ctime(), m.ctime_nsec() as u32),
        xattrs,
    })
}
