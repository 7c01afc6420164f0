//! The qcow2 header (cluster 0): fixed fields, header extensions and the backing file name,
//! parsed and validated the way QEMU validates them. Byte layout: `docs/qcow2.md`.

use zerocopy::big_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{Corruption, Result, Unsupported};
use crate::storage::Storage;
use crate::{BackingFormat, Error};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of the version 2 header (and of the fields common to both versions).
pub const V2_HEADER_LEN: u32 = 72;
/// Smallest version 3 header_length.
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// header_length boxlet writes: the v3 fields plus the compression type byte, padded to 8.
pub const V3_HEADER_LEN: u32 = 112;
/// Largest backing file name QEMU accepts.
pub const MAX_BACKING_NAME: u32 = 1023;
/// QEMU's limit on the L1 table: 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// QEMU's limit on the refcount table: 8 MiB.
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// QEMU's limit on internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;

/// Header extension: end of the extension area.
pub const EXT_END: u32 = 0;
/// Header extension: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Header extension: feature name table.
pub const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
/// Header extension: bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Header extension: full disk encryption header pointer.
pub const EXT_CRYPTO: u32 = 0x0537_be77;
/// Header extension: external data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature bit 0: refcounts may be stale (lazy refcounts, unclean shutdown).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: the image was found corrupt and must not be written.
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression type field is not deflate.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;

/// Name of an incompatible feature bit as the qcow2 specification gives it.
pub fn incompatible_feature_name(bit: u32) -> Option<&'static str> {
    Some(match bit {
        0 => "dirty",
        1 => "corrupt",
        2 => "external data file",
        3 => "compression type",
        4 => "extended L2 entries",
        _ => return None,
    })
}

/// The fields common to versions 2 and 3, as stored (big-endian).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug, Clone)]
#[repr(C)]
pub struct RawHeaderV2 {
    pub magic: U32,
    pub version: U32,
    pub backing_file_offset: U64,
    pub backing_file_size: U32,
    pub cluster_bits: U32,
    pub size: U64,
    pub crypt_method: U32,
    pub l1_size: U32,
    pub l1_table_offset: U64,
    pub refcount_table_offset: U64,
    pub refcount_table_clusters: U32,
    pub nb_snapshots: U32,
    pub snapshots_offset: U64,
}

/// The fields version 3 adds after the common ones.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned, Debug, Clone)]
#[repr(C)]
pub struct RawHeaderV3 {
    pub incompatible_features: U64,
    pub compatible_features: U64,
    pub autoclear_features: U64,
    pub refcount_order: U32,
    pub header_length: U32,
}

const _: () = assert!(size_of::<RawHeaderV2>() == V2_HEADER_LEN as usize);
const _: () = assert!(size_of::<RawHeaderV2>() + size_of::<RawHeaderV3>() == 104);

/// Byte offsets of header fields the engine rewrites in place.
pub mod offsets {
    /// refcount_table_offset (u64) followed by refcount_table_clusters (u32).
    pub const REFCOUNT_TABLE: u64 = 48;
    /// incompatible_features (u64), v3 only.
    pub const INCOMPATIBLE: u64 = 72;
    /// autoclear_features (u64), v3 only.
    pub const AUTOCLEAR: u64 = 88;
}

/// One entry of the feature name table extension.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    /// Bit number.
    pub bit: u8,
    /// The name.
    pub name: String,
}

/// A header extension as found in the image (type and length), for inspection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExtensionInfo {
    /// Extension type.
    pub ext_type: u32,
    /// Length of its data.
    pub len: u32,
}

/// A parsed and validated qcow2 header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: u8,
    /// The backing file name, if any.
    pub backing_file: Option<String>,
    /// The backing file format extension, if present and a format boxlet opens.
    pub backing_format: Option<BackingFormat>,
    /// The backing file format extension as recorded (any format QEMU knows).
    pub backing_format_name: Option<String>,
    /// The feature name table, if present.
    pub feature_names: Vec<FeatureName>,
    /// Every extension found, in order.
    pub extensions: Vec<ExtensionInfo>,
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Entries in one L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// L1 entries needed to map `size` bytes with clusters of `cluster_bits`.
    pub fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
        // One L2 table maps cluster_size * cluster_size / 8 bytes.
        let shift = 2 * cluster_bits - 3;
        size.div_ceil(1u64 << shift)
    }

    /// Read and validate the header of `storage`.
    pub fn read(storage: &dyn Storage) -> Result<Header> {
        let file_len = storage
            .len()
            .map_err(|e| Error::io("reading the file length", e))?;
        if file_len < u64::from(V2_HEADER_LEN) {
            return Err(Corruption::Truncated { len: file_len }.into());
        }
        let mut fixed = [0u8; V3_HEADER_LEN as usize];
        storage
            .read_at(&mut fixed, 0)
            .map_err(|e| Error::io("reading the header", e))?;
        let (v2, rest) = RawHeaderV2::read_from_prefix(&fixed).expect("buffer holds the header");
        let magic = v2.magic.get();
        if magic != MAGIC {
            return Err(Corruption::BadMagic(magic).into());
        }
        let version = v2.version.get();
        match version {
            2 | 3 => {}
            1 => return Err(Unsupported::Version(1).into()),
            v => return Err(Corruption::BadVersion(v).into()),
        }
        let cluster_bits = v2.cluster_bits.get();
        if !(9..=21).contains(&cluster_bits) {
            return Err(Corruption::ClusterBits(cluster_bits).into());
        }
        let cluster_size = 1u64 << cluster_bits;

        let mut h = Header {
            version,
            backing_file_offset: v2.backing_file_offset.get(),
            backing_file_size: v2.backing_file_size.get(),
            cluster_bits,
            size: v2.size.get(),
            crypt_method: v2.crypt_method.get(),
            l1_size: v2.l1_size.get(),
            l1_table_offset: v2.l1_table_offset.get(),
            refcount_table_offset: v2.refcount_table_offset.get(),
            refcount_table_clusters: v2.refcount_table_clusters.get(),
            nb_snapshots: v2.nb_snapshots.get(),
            snapshots_offset: v2.snapshots_offset.get(),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: 0,
            backing_file: None,
            backing_format: None,
            backing_format_name: None,
            feature_names: Vec::new(),
            extensions: Vec::new(),
        };
        if version == 3 {
            if file_len < u64::from(V3_MIN_HEADER_LEN) {
                return Err(Corruption::Truncated { len: file_len }.into());
            }
            let (v3, tail) = RawHeaderV3::read_from_prefix(rest).expect("buffer holds v3 fields");
            h.incompatible_features = v3.incompatible_features.get();
            h.compatible_features = v3.compatible_features.get();
            h.autoclear_features = v3.autoclear_features.get();
            h.refcount_order = v3.refcount_order.get();
            h.header_length = v3.header_length.get();
            if h.header_length < V3_MIN_HEADER_LEN
                || !h.header_length.is_multiple_of(8)
                || u64::from(h.header_length) > cluster_size
            {
                return Err(Corruption::HeaderLength(h.header_length).into());
            }
            if h.header_length > V3_MIN_HEADER_LEN {
                h.compression_type = tail[0];
            }
        }
        if h.refcount_order > 6 {
            return Err(Corruption::RefcountOrder(h.refcount_order).into());
        }

        // Cluster 0 holds the extensions and the backing name; read no more of it than
        // the file has.
        let c0_len = cluster_size.min(file_len) as usize;
        let mut c0 = vec![0u8; c0_len];
        storage
            .read_at(&mut c0, 0)
            .map_err(|e| Error::io("reading cluster 0", e))?;
        h.parse_extensions(&c0, cluster_size)?;
        h.check_features()?;
        h.read_backing_name(&c0, cluster_size)?;
        h.check_tables(file_len)?;
        Ok(h)
    }

    fn check_features(&self) -> Result<()> {
        let known = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION;
        if self.crypt_method != 0 {
            return Err(Unsupported::Encryption(self.crypt_method).into());
        }
        for bit in 0..64u32 {
            let mask = 1u64 << bit;
            if self.incompatible_features & mask == 0 || known & mask != 0 {
                continue;
            }
            let name = incompatible_feature_name(bit)
                .map(str::to_owned)
                .or_else(|| {
                    self.feature_names
                        .iter()
                        .find(|f| f.kind == 0 && u32::from(f.bit) == bit)
                        .map(|f| format!("{}, per the image's feature table", f.name))
                })
                .unwrap_or_else(|| "unknown".to_owned());
            return Err(Unsupported::IncompatibleFeature { bit, name }.into());
        }
        let compression_bit = self.incompatible_features & INCOMPAT_COMPRESSION != 0;
        match (self.compression_type, compression_bit) {
            (0, false) => Ok(()),
            (0, true) => Err(Corruption::Other(
                "compression type bit set with deflate compression".into(),
            )
            .into()),
            (_, false) => Err(Corruption::Other(format!(
                "compression type {} without the compression type feature bit",
                self.compression_type
            ))
            .into()),
            (t, true) => Err(Unsupported::CompressionType(t).into()),
        }
    }

    fn parse_extensions(&mut self, c0: &[u8], cluster_size: u64) -> Result<()> {
        // Extensions run from the end of the header to the backing name, if any.
        let mut end = cluster_size;
        if self.backing_file_offset != 0 && self.backing_file_offset < end {
            end = self.backing_file_offset;
        }
        let end = end.min(c0.len() as u64) as usize;
        let mut off = self.header_length as usize;
        while off + 8 <= end {
            let ext_type = be_u32(c0, off);
            let len = be_u32(c0, off + 4);
            if ext_type == EXT_END {
                return Ok(());
            }
            let data_start = off + 8;
            let data_end = data_start
                .checked_add(len as usize)
                .filter(|&e| e <= end)
                .ok_or(Corruption::Extension {
                    ext_type,
                    offset: off as u64,
                    len,
                })?;
            let data = &c0[data_start..data_end];
            self.extensions.push(ExtensionInfo { ext_type, len });
            match ext_type {
                EXT_BACKING_FORMAT => {
                    // Other formats (vmdk, ...) are valid; refused only if the chain is
                    // opened.
                    let name = String::from_utf8_lossy(data).into_owned();
                    self.backing_format = BackingFormat::from_name(&name);
                    self.backing_format_name = Some(name);
                }
                EXT_CRYPTO if self.crypt_method != 2 => {
                    // QEMU accepts this extension only on LUKS images.
                    return Err(Corruption::Other(
                        "full disk encryption header extension without LUKS encryption".into(),
                    )
                    .into());
                }
                EXT_FEATURE_NAMES => {
                    for entry in data.chunks_exact(48) {
                        let raw = &entry[2..];
                        let n = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
                        self.feature_names.push(FeatureName {
                            kind: entry[0],
                            bit: entry[1],
                            name: String::from_utf8_lossy(&raw[..n]).into_owned(),
                        });
                    }
                }
                _ => {}
            }
            // Data is padded to a multiple of 8 bytes.
            off = data_start + (len as usize).div_ceil(8) * 8;
        }
        Ok(())
    }

    fn read_backing_name(&mut self, c0: &[u8], cluster_size: u64) -> Result<()> {
        if self.backing_file_offset == 0 {
            return Ok(());
        }
        let (off, len) = (self.backing_file_offset, self.backing_file_size);
        let bad = Corruption::BackingName { offset: off, len };
        if len > MAX_BACKING_NAME || len == 0 {
            return Err(bad.into());
        }
        let end = off.checked_add(u64::from(len)).ok_or(bad.clone())?;
        if end > cluster_size {
            return Err(bad.into());
        }
        if end > c0.len() as u64 {
            return Err(Corruption::OutOfFile {
                table: "backing file name",
                offset: off,
                len: u64::from(len),
                file_len: c0.len() as u64,
            }
            .into());
        }
        let bytes = &c0[off as usize..end as usize];
        let name = std::str::from_utf8(bytes).map_err(|_| Corruption::BackingNameEncoding)?;
        self.backing_file = Some(name.to_owned());
        Ok(())
    }

    fn check_tables(&self, file_len: u64) -> Result<()> {
        let cs = self.cluster_size();
        let needed = Self::l1_entries_for(self.size, self.cluster_bits);
        let max = MAX_L1_BYTES / 8;
        if u64::from(self.l1_size) < needed || u64::from(self.l1_size) > max {
            return Err(Corruption::L1Size {
                l1_size: self.l1_size,
                size: self.size,
                needed,
                max,
            }
            .into());
        }
        if self.l1_size > 0 {
            check_table(
                "L1 table",
                self.l1_table_offset,
                u64::from(self.l1_size) * 8,
                cs,
                file_len,
            )?;
        }
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if self.refcount_table_clusters == 0 || rt_bytes > MAX_REFTABLE_BYTES.max(cs) {
            return Err(Corruption::RefcountTableSize(self.refcount_table_clusters).into());
        }
        check_table(
            "refcount table",
            self.refcount_table_offset,
            rt_bytes,
            cs,
            file_len,
        )?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Corruption::SnapshotCount(self.nb_snapshots).into());
        }
        if self.nb_snapshots > 0 {
            // Each snapshot header is at least 40 bytes.
            check_table(
                "snapshot table",
                self.snapshots_offset,
                u64::from(self.nb_snapshots) * 40,
                cs,
                file_len,
            )?;
        }
        Ok(())
    }

    /// Serialize cluster 0: the header, the extensions boxlet writes (backing format,
    /// and for v3 the feature name table when `feature_table`) and the backing file name.
    /// `self.backing_file_offset` and `backing_file_size` are filled in.
    pub fn to_bytes(&mut self, feature_table: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(1024);
        let mut exts: Vec<(u32, Vec<u8>)> = Vec::new();
        if let Some(fmt) = self.backing_format {
            exts.push((EXT_BACKING_FORMAT, fmt.name().as_bytes().to_vec()));
        }
        if self.version >= 3 && feature_table {
            let mut table = Vec::new();
            for (kind, bit, name) in [
                (0u8, 0u8, "dirty bit"),
                (0, 1, "corrupt bit"),
                (0, 2, "external data file"),
                (0, 3, "compression type"),
                (0, 4, "extended L2 entries"),
                (1, 0, "lazy refcounts"),
                (2, 0, "bitmaps"),
                (2, 1, "raw external data"),
            ] {
                let mut entry = [0u8; 48];
                entry[0] = kind;
                entry[1] = bit;
                entry[2..2 + name.len()].copy_from_slice(name.as_bytes());
                table.extend_from_slice(&entry);
            }
            exts.push((EXT_FEATURE_NAMES, table));
        }
        let header_len = if self.version >= 3 {
            self.header_length
        } else {
            V2_HEADER_LEN
        } as usize;
        out.resize(header_len, 0);
        for (t, data) in &exts {
            out.extend_from_slice(&t.to_be_bytes());
            out.extend_from_slice(&(data.len() as u32).to_be_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(8) * 8, 0);
        }
        out.extend_from_slice(&[0u8; 8]); // end of extensions
        if let Some(name) = &self.backing_file {
            self.backing_file_offset = out.len() as u64;
            self.backing_file_size = name.len() as u32;
            out.extend_from_slice(name.as_bytes());
        } else {
            self.backing_file_offset = 0;
            self.backing_file_size = 0;
        }

        let v2 = RawHeaderV2 {
            magic: MAGIC.into(),
            version: self.version.into(),
            backing_file_offset: self.backing_file_offset.into(),
            backing_file_size: self.backing_file_size.into(),
            cluster_bits: self.cluster_bits.into(),
            size: self.size.into(),
            crypt_method: self.crypt_method.into(),
            l1_size: self.l1_size.into(),
            l1_table_offset: self.l1_table_offset.into(),
            refcount_table_offset: self.refcount_table_offset.into(),
            refcount_table_clusters: self.refcount_table_clusters.into(),
            nb_snapshots: self.nb_snapshots.into(),
            snapshots_offset: self.snapshots_offset.into(),
        };
        out[..72].copy_from_slice(v2.as_bytes());
        if self.version >= 3 {
            let v3 = RawHeaderV3 {
                incompatible_features: self.incompatible_features.into(),
                compatible_features: self.compatible_features.into(),
                autoclear_features: self.autoclear_features.into(),
                refcount_order: self.refcount_order.into(),
                header_length: self.header_length.into(),
            };
            out[72..104].copy_from_slice(v3.as_bytes());
            if self.header_length > V3_MIN_HEADER_LEN {
                out[104] = self.compression_type;
            }
        }
        out
    }
}

/// A table of `len` bytes at `offset` must be cluster aligned and inside the file.
pub(crate) fn check_table(
    table: &'static str,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<()> {
    if !offset.is_multiple_of(cluster_size) || offset == 0 {
        return Err(Corruption::Unaligned { table, offset }.into());
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(Corruption::OutOfFile {
            table,
            offset,
            len,
            file_len,
        }
        .into()),
    }
}

fn be_u32(buf: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(buf[off..off + 4].try_into().expect("4 bytes"))
}

/// Read only what garbage collection needs: the backing file name. Magic, version and the
/// backing name fields are checked; nothing else is, so that a base disk stays alive even
/// when an overlay that names it is otherwise damaged. `Ok(None)` when there is no backing file.
pub fn read_backing_file_path(path: &std::path::Path) -> Result<Option<String>> {
    let inner = || -> Result<Option<String>> {
        let file = std::fs::File::open(path).map_err(|e| Error::io("opening", e))?;
        let file_len = Storage::len(&file).map_err(|e| Error::io("reading the length", e))?;
        if file_len < 20 {
            return Err(Corruption::Truncated { len: file_len }.into());
        }
        let mut buf = [0u8; 20];
        Storage::read_at(&file, &mut buf, 0).map_err(|e| Error::io("reading the header", e))?;
        let magic = be_u32(&buf, 0);
        if magic != MAGIC {
            return Err(Corruption::BadMagic(magic).into());
        }
        let version = be_u32(&buf, 4);
        if !(2..=3).contains(&version) {
            return Err(Corruption::BadVersion(version).into());
        }
        let offset = u64::from_be_bytes(buf[8..16].try_into().expect("8 bytes"));
        let len = be_u32(&buf, 16);
        if offset == 0 {
            return Ok(None);
        }
        let bad = Corruption::BackingName { offset, len };
        if len == 0 || len > MAX_BACKING_NAME || offset > (2 << 20) {
            return Err(bad.into());
        }
        if offset + u64::from(len) > file_len {
            return Err(bad.into());
        }
        let mut name = vec![0u8; len as usize];
        Storage::read_at(&file, &mut name, offset)
            .map_err(|e| Error::io("reading the backing file name", e))?;
        let name = String::from_utf8(name).map_err(|_| Corruption::BackingNameEncoding)?;
        Ok(Some(name))
    };
    inner().map_err(|e| e.with_path(path))
}
