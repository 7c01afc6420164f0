//! Creating images: a standalone image of a given virtual size, or an overlay over a raw
//! or qcow2 backing file. O(1) in the virtual size: the header cluster, the refcount
//! table, the refcount blocks that count the metadata, and an all-zero L1 table.

use std::fs::OpenOptions as FsOpenOptions;
use std::path::Path;

use crate::backing::{image_size, resolve_backing_name};
use crate::error::Result;
use crate::header::{Header, MAX_BACKING_NAME, MAX_L1_BYTES, V2_HEADER_LEN, V3_HEADER_LEN};
use crate::refcount::set_entry;
use crate::storage::Storage;
use crate::{invalid, BackingFormat, Error};

/// What to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes (for overlays, `None` takes the backing file's size).
    pub size: Option<u64>,
    /// log2 of the cluster size, 9..=21 (default 16: 64 KiB).
    pub cluster_bits: u32,
    /// 2 (compat 0.10) or 3 (compat 1.1, the default).
    pub version: u32,
    /// log2 of the refcount width in bits, 0..=6 (v3 only; default 4: 16 bits).
    pub refcount_order: u32,
    /// Backing file name as stored in the image, and its format.
    pub backing: Option<(String, BackingFormat)>,
    /// Set the lazy refcounts compatible feature (v3).
    pub lazy_refcounts: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            size: None,
            cluster_bits: 16,
            version: 3,
            refcount_order: 4,
            backing: None,
            lazy_refcounts: false,
        }
    }
}

impl CreateOptions {
    /// A standalone image of `size` bytes.
    pub fn standalone(size: u64) -> Self {
        Self {
            size: Some(size),
            ..Self::default()
        }
    }

    /// An overlay over `backing` (stored as given) of format `format`, sized like it.
    pub fn overlay(backing: impl Into<String>, format: BackingFormat) -> Self {
        Self {
            backing: Some((backing.into(), format)),
            ..Self::default()
        }
    }
}

/// Create a new image file at `path` (which must not exist). A relative backing name is
/// resolved against `path`'s directory to find the backing file's size when needed.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    let mut opts = opts.clone();
    if opts.size.is_none() {
        let (name, fmt) = opts
            .backing
            .as_ref()
            .ok_or_else(|| invalid("a virtual size is needed for an image without backing file"))?;
        let backing = resolve_backing_name(path, name);
        opts.size = Some(image_size(&backing, *fmt)?);
    }
    let mut file = FsOpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io("creating", e).with_path(path))?;
    let res = create_on(&mut file, &opts).and_then(|()| {
        file.sync_all()
            .map_err(|e| Error::io("syncing the new image", e))
    });
    if res.is_err() {
        let _ = std::fs::remove_file(path);
    }
    res.map_err(|e| e.with_path(path))
}

/// Write a new image into empty `storage`.
pub fn create_on(storage: &mut dyn Storage, opts: &CreateOptions) -> Result<()> {
    let size = opts.size.ok_or_else(|| invalid("no virtual size given"))?;
    let bits = opts.cluster_bits;
    if !(9..=21).contains(&bits) {
        return Err(invalid(format!(
            "cluster size 2^{bits} outside 512 B..2 MiB"
        )));
    }
    if !(2..=3).contains(&opts.version) {
        return Err(invalid(format!("version {} (2 or 3)", opts.version)));
    }
    let order = if opts.version == 2 {
        4
    } else {
        opts.refcount_order
    };
    if order > 6 {
        return Err(invalid(format!("refcount order {order} above 6")));
    }
    if opts.version == 2 && (opts.lazy_refcounts || opts.refcount_order != 4) {
        return Err(invalid(
            "lazy refcounts and refcount widths other than 16 bits need version 3",
        ));
    }
    if size > i64::MAX as u64 {
        return Err(invalid(format!("virtual size {size} too large")));
    }
    let cs = 1u64 << bits;
    let size = size.div_ceil(512) * 512;
    let l1_entries = Header::l1_entries_for(size, bits);
    if l1_entries * 8 > MAX_L1_BYTES {
        return Err(invalid(format!(
            "virtual size {size} needs an L1 table over 32 MiB with {cs}-byte clusters"
        )));
    }
    // A zero-sized disk has no L1 table at all (offset 0), as QEMU writes it.
    let l1_clusters = (l1_entries * 8).div_ceil(cs);
    let epb = cs * 8 / (1u64 << order);

    // Header cluster, refcount table, refcount blocks, L1: find a fixed point.
    let (mut rt, mut rb) = (1u64, 1u64);
    loop {
        let total = 1 + rt + rb + l1_clusters;
        let rb2 = total.div_ceil(epb);
        let rt2 = (rb2 * 8).div_ceil(cs);
        if (rb2, rt2) == (rb, rt) {
            break;
        }
        (rb, rt) = (rb2, rt2);
    }
    let rt_off = cs;
    let rb_off = rt_off + rt * cs;
    let l1_off = rb_off + rb * cs;
    let total = 1 + rt + rb + l1_clusters;

    let mut header = Header {
        version: opts.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits: bits,
        size,
        crypt_method: 0,
        l1_size: l1_entries as u32,
        l1_table_offset: if l1_entries > 0 { l1_off } else { 0 },
        refcount_table_offset: rt_off,
        refcount_table_clusters: rt as u32,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: 0,
        compatible_features: u64::from(opts.lazy_refcounts),
        autoclear_features: 0,
        refcount_order: order,
        header_length: if opts.version == 3 {
            V3_HEADER_LEN
        } else {
            V2_HEADER_LEN
        },
        compression_type: 0,
        backing_file: None,
        backing_format: None,
        backing_format_name: None,
        feature_names: Vec::new(),
        extensions: Vec::new(),
    };
    if let Some((name, fmt)) = &opts.backing {
        if name.is_empty() || name.len() > MAX_BACKING_NAME as usize {
            return Err(invalid(format!(
                "backing file name must be 1..={MAX_BACKING_NAME} bytes"
            )));
        }
        header.backing_file = Some(name.clone());
        header.backing_format = Some(*fmt);
    }
    let mut c0 = header.to_bytes(true);
    if c0.len() as u64 > cs {
        // The feature name table is optional; drop it before giving up.
        c0 = header.to_bytes(false);
        if c0.len() as u64 > cs {
            return Err(invalid(format!(
                "header and backing file name ({} bytes) do not fit in a {cs}-byte cluster",
                c0.len()
            )));
        }
    }

    let io = |e| Error::io("writing the new image", e);
    storage.set_len(total * cs).map_err(io)?;
    storage.write_at(&c0, 0).map_err(io)?;
    let table: Vec<u8> = (0..rb)
        .flat_map(|i| (rb_off + i * cs).to_be_bytes())
        .collect();
    storage.write_at(&table, rt_off).map_err(io)?;
    let mut blocks = vec![0u8; (rb * cs) as usize];
    for ci in 0..total {
        let (b, i) = (ci / epb, (ci % epb) as usize);
        let block = &mut blocks[(b * cs) as usize..((b + 1) * cs) as usize];
        set_entry(block, i, order, 1);
    }
    storage.write_at(&blocks, rb_off).map_err(io)?;
    Ok(())
}
