//! Applying OCI image layers (tar streams: plain, gzip or zstd) to an in-memory [`Tree`]:
//! whiteouts, opaque directories, hard links, PAX xattrs. Nothing from a layer is written
//! to the host filesystem, and no entry can reach outside the tree: names are resolved
//! inside it without following symlinks, and `..` is refused.
//!
//! File contents are not kept: each file records which entry of which layer holds them,
//! and the image writer streams the layers a second time to copy them straight into the
//! image ([`crate::build_with_layers`]). Memory grows with the number of entries only.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader, Read};

use crate::error::{ErrorKind, Result};
use crate::targuard::TarGuard;
use crate::tree::{FileData, Node, NodeId, NodeKind, NodeMeta, Tree};
use crate::Error;

/// What one layer has put in the tree so far.
#[derive(Debug, Default)]
struct LayerView {
    /// Nodes this layer created.
    fresh: HashSet<NodeId>,
    /// Nodes this layer created, replaced the metadata of, passed through or linked.
    touched: HashSet<NodeId>,
}

/// Bounds on what hostile layers may make the builder hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerLimits {
    /// Total bytes of file contents over all layers.
    pub max_total_bytes: u64,
    /// Entries in the final tree.
    pub max_entries: usize,
    /// Path components.
    pub max_depth: usize,
}

impl Default for LayerLimits {
    fn default() -> Self {
        Self {
            max_total_bytes: 64 << 30,
            max_entries: 4 << 20,
            max_depth: 256,
        }
    }
}

/// Builds a [`Tree`] from layers applied in order.
#[derive(Debug)]
pub struct LayerStack {
    tree: Tree,
    limits: LayerLimits,
    total: u64,
    layers: usize,
    /// Hard links made (names without a node of their own).
    links: usize,
}

fn hostile(layer: &str, entry: &str, why: impl std::fmt::Display) -> Error {
    ErrorKind::InvalidInput(format!("layer {layer}: entry {entry:?}: {why}")).into()
}

/// The largest tar metadata record (long name, PAX header) a layer may carry.
pub const MAX_TAR_RECORD: u64 = 1 << 20;

/// The tar stream of a layer: `r` through the decompressor its first bytes call for
/// (gzip, zstd, or none), with metadata records capped (see [`TarGuard`]).
pub(crate) fn decompress<'a>(r: impl Read + 'a) -> std::io::Result<Box<dyn Read + 'a>> {
    let mut r = BufReader::new(r);
    let head = r.fill_buf()?;
    let tar: Box<dyn Read + 'a> = if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::read::MultiGzDecoder::new(r))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        let d = ruzstd::decoding::StreamingDecoder::new(r).map_err(std::io::Error::other)?;
        Box::new(d)
    } else {
        Box::new(r)
    };
    Ok(Box::new(TarGuard::new(tar, MAX_TAR_RECORD)))
}

/// Path components of a layer entry, or why they are refused.
fn components(path: &[u8]) -> std::result::Result<Vec<Vec<u8>>, &'static str> {
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("\"..\" in a path"),
            c if c.len() > 255 => return Err("a name longer than 255 bytes"),
            c if c.contains(&0) => return Err("a NUL byte in a name"),
            c => out.push(c.to_vec()),
        }
    }
    Ok(out)
}

impl LayerStack {
    /// An empty root directory (mode 0755, owned by root).
    pub fn new(limits: LayerLimits) -> Result<Self> {
        Ok(Self {
            tree: Tree::default(),
            limits,
            total: 0,
            layers: 0,
            links: 0,
        })
    }

    /// The tree so far.
    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    /// Layers applied so far.
    pub fn layer_count(&self) -> usize {
        self.layers
    }

    /// Finish: the tree, whose files name the layer entries holding their contents.
    pub fn into_tree(self) -> Tree {
        self.tree
    }

    fn child(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        match &self.tree.nodes[dir].kind {
            NodeKind::Dir(c) => c.get(name).copied(),
            _ => None,
        }
    }

    /// The directory at `comps`, creating missing ones; never through a non-directory.
    /// Every directory on the way is part of this layer's view (`seen`).
    fn dir_at(
        &mut self,
        comps: &[Vec<u8>],
        seen: &mut LayerView,
        layer: &str,
        entry: &str,
    ) -> Result<NodeId> {
        let mut cur = 0;
        for c in comps {
            cur = match self.child(cur, c) {
                Some(id) if matches!(self.tree.nodes[id].kind, NodeKind::Dir(_)) => id,
                Some(_) => {
                    let why = format!("{:?} is not a directory", String::from_utf8_lossy(c));
                    return Err(hostile(layer, entry, why));
                }
                None => {
                    let meta = NodeMeta {
                        mode: 0o755,
                        ..NodeMeta::default()
                    };
                    let id = self.tree.add(
                        cur,
                        c,
                        Node {
                            kind: NodeKind::Dir(BTreeMap::new()),
                            meta,
                        },
                    )?;
                    seen.fresh.insert(id);
                    id
                }
            };
            seen.touched.insert(cur);
        }
        Ok(cur)
    }

    /// An opaque directory: hide everything lower layers put under `dir`, keeping what
    /// this layer put there (in whatever order its entries come).
    fn make_opaque(&mut self, dir: NodeId, seen: &LayerView) {
        let children: Vec<(Vec<u8>, NodeId)> = match &self.tree.nodes[dir].kind {
            NodeKind::Dir(c) => c.iter().map(|(k, &v)| (k.clone(), v)).collect(),
            _ => return,
        };
        for (name, id) in children {
            if !seen.touched.contains(&id) {
                self.remove(dir, &name);
            } else if !seen.fresh.contains(&id)
                && matches!(self.tree.nodes[id].kind, NodeKind::Dir(_))
            {
                // A lower directory this layer also has: only this layer's part stays.
                self.make_opaque(id, seen);
            }
        }
    }

    fn remove(&mut self, dir: NodeId, name: &[u8]) {
        if let NodeKind::Dir(c) = &mut self.tree.nodes[dir].kind {
            c.remove(name);
        }
    }

    /// Apply one layer (a tar stream, compressed or not) named `layer` in errors.
    pub fn apply(&mut self, layer: &str, reader: impl Read) -> Result<()> {
        let r = decompress(reader).map_err(|e| Error::io(format!("layer {layer}"), e))?;
        let mut ar = tar::Archive::new(r);
        let mut seen = LayerView::default();
        let entries = ar
            .entries()
            .map_err(|e| Error::io(format!("layer {layer}"), e))?;
        let index = self.layers;
        for (ordinal, entry) in entries.enumerate() {
            // Every change below (names, implicit directories, links) counts.
            if self.tree.nodes.len() + self.links > self.limits.max_entries {
                return Err(hostile(
                    layer,
                    "(any)",
                    format!("more than {} entries", self.limits.max_entries),
                ));
            }
            let mut entry = entry
                .map_err(|e| Error::io(format!("layer {layer}: reading the tar stream"), e))?;
            let raw_path = entry.path_bytes().into_owned();
            let shown = String::from_utf8_lossy(&raw_path).into_owned();
            let comps = components(&raw_path).map_err(|why| hostile(layer, &shown, why))?;
            if comps.len() > self.limits.max_depth {
                return Err(hostile(
                    layer,
                    &shown,
                    format!("deeper than {} components", self.limits.max_depth),
                ));
            }
            let Some((name, parents)) = comps.split_last() else {
                // The root itself: take its metadata from a directory entry.
                if entry.header().entry_type().is_dir() {
                    self.tree.nodes[0].meta = meta_of(&mut entry, layer, &shown)?;
                }
                continue;
            };
            // Whiteouts.
            if let Some(target) = name.strip_prefix(b".wh.") {
                let dir = self.dir_at(parents, &mut seen, layer, &shown)?;
                if target == b".wh..opq" {
                    self.make_opaque(dir, &seen);
                } else if target.is_empty() || target == b"." || target == b".." {
                    return Err(hostile(layer, &shown, "a whiteout of . or .."));
                } else if self
                    .child(dir, target)
                    .is_none_or(|id| !seen.fresh.contains(&id))
                {
                    // A whiteout hides lower layers only, not what this layer added.
                    self.remove(dir, target);
                }
                continue;
            }
            let dir = self.dir_at(parents, &mut seen, layer, &shown)?;
            let kind = entry.header().entry_type();
            if kind.is_hard_link() {
                let link = entry
                    .link_name_bytes()
                    .ok_or_else(|| hostile(layer, &shown, "a hard link without a target"))?
                    .into_owned();
                let lcomps = components(&link)
                    .map_err(|why| hostile(layer, &shown, format!("hard link target: {why}")))?;
                let mut cur = Some(0);
                for c in &lcomps {
                    cur = cur.and_then(|d| self.child(d, c));
                }
                let target = cur
                    .filter(|&t| t != 0 && !matches!(self.tree.nodes[t].kind, NodeKind::Dir(_)))
                    .ok_or_else(|| {
                        hostile(
                            layer,
                            &shown,
                            format!(
                                "hard link to {:?}, which is not a file in the image",
                                String::from_utf8_lossy(&link)
                            ),
                        )
                    })?;
                self.remove(dir, name);
                self.tree.link(dir, name, target)?;
                self.links += 1;
                seen.touched.insert(target);
                continue;
            }
            let meta = meta_of(&mut entry, layer, &shown)?;
            let node_kind = match kind {
                k if k.is_dir() => {
                    // An existing directory keeps its children and takes the new metadata.
                    if let Some(id) = self
                        .child(dir, name)
                        .filter(|&id| matches!(self.tree.nodes[id].kind, NodeKind::Dir(_)))
                    {
                        self.tree.nodes[id].meta = meta;
                        seen.touched.insert(id);
                        continue;
                    }
                    NodeKind::Dir(BTreeMap::new())
                }
                k if k.is_symlink() => {
                    let t = entry
                        .link_name_bytes()
                        .ok_or_else(|| hostile(layer, &shown, "a symlink without a target"))?;
                    if t.is_empty() || t.len() >= 4096 || t.contains(&0) {
                        return Err(hostile(
                            layer,
                            &shown,
                            "a symlink target of 0 or 4096+ bytes",
                        ));
                    }
                    NodeKind::Symlink(t.into_owned())
                }
                k if k.is_character_special() || k.is_block_special() => {
                    let h = entry.header();
                    let major = h.device_major().ok().flatten().unwrap_or(0);
                    let minor = h.device_minor().ok().flatten().unwrap_or(0);
                    if major > 0xfff || minor > 0xf_ffff {
                        return Err(hostile(
                            layer,
                            &shown,
                            format!("device {major}:{minor} (Linux has 12-bit majors and 20-bit minors)"),
                        ));
                    }
                    if k.is_character_special() {
                        NodeKind::CharDevice(major, minor)
                    } else {
                        NodeKind::BlockDevice(major, minor)
                    }
                }
                k if k.is_fifo() => NodeKind::Fifo,
                k if k.is_file() || k == tar::EntryType::Continuous => {
                    let size = entry.size();
                    self.total = self.total.saturating_add(size);
                    if self.total > self.limits.max_total_bytes {
                        return Err(hostile(
                            layer,
                            &shown,
                            format!(
                                "layers hold more than {} bytes",
                                self.limits.max_total_bytes
                            ),
                        ));
                    }
                    // The contents stay in the layer: read past them to the next entry.
                    let skipped = std::io::copy(&mut entry, &mut std::io::sink())
                        .map_err(|e| Error::io(format!("layer {layer}: {shown}"), e))?;
                    if skipped != size {
                        return Err(hostile(layer, &shown, "truncated file contents"));
                    }
                    NodeKind::File(FileData::Layer {
                        layer: index,
                        entry: ordinal as u64,
                        size,
                    })
                }
                // PAX and GNU metadata entries are consumed by the tar reader; anything
                // else (sockets cannot be archived) is skipped.
                _ => continue,
            };
            self.remove(dir, name);
            let id = self.tree.add(
                dir,
                name,
                Node {
                    kind: node_kind,
                    meta,
                },
            )?;
            seen.fresh.insert(id);
            seen.touched.insert(id);
            if self.tree.nodes.len() > self.limits.max_entries {
                return Err(hostile(
                    layer,
                    &shown,
                    format!("more than {} entries", self.limits.max_entries),
                ));
            }
        }
        self.layers += 1;
        Ok(())
    }
}

/// Ownership, mode, times and PAX `SCHILY.xattr.*` attributes of an entry.
fn meta_of<R: Read>(entry: &mut tar::Entry<'_, R>, layer: &str, shown: &str) -> Result<NodeMeta> {
    let h = entry.header();
    let mode = h
        .mode()
        .map_err(|e| Error::io(format!("layer {layer}: {shown}: mode"), e))?
        & 0o7777;
    let uid = h.uid().unwrap_or(0);
    let gid = h.gid().unwrap_or(0);
    let mtime = h.mtime().unwrap_or(0) as i64;
    let mut xattrs = Vec::new();
    if let Ok(Some(exts)) = entry.pax_extensions() {
        for ext in exts.flatten() {
            if let (Ok(key), value) = (ext.key(), ext.value_bytes()) {
                if let Some(name) = key.strip_prefix("SCHILY.xattr.") {
                    // Namespaces ext4 cannot hold (no Linux file has them) are dropped;
                    // a malformed ACL is refused.
                    match crate::xattr_write::split_name(name) {
                        Ok((index, _)) => {
                            crate::xattr_write::disk_value(index, value)
                                .map_err(|e| hostile(layer, shown, e))?;
                            xattrs.push((name.to_owned(), value.to_vec()));
                        }
                        Err(_) => tracing::warn!(
                            layer,
                            entry = shown,
                            xattr = name,
                            "extended attribute dropped: ext4 has no such namespace"
                        ),
                    }
                }
            }
        }
    }
    xattrs.sort();
    Ok(NodeMeta {
        mode: mode as u16,
        uid: u32::try_from(uid).map_err(|_| hostile(layer, shown, "uid above 2^32"))?,
        gid: u32::try_from(gid).map_err(|_| hostile(layer, shown, "gid above 2^32"))?,
        atime: (mtime, 0),
        mtime: (mtime, 0),
        ctime: (mtime, 0),
        xattrs,
    })
}
