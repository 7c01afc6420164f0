//! Consistency check: count the references to every host cluster by walking the header,
//! tables and L2 entries, and compare with the stored refcounts (what `qemu-img check`
//! does for images without snapshots).

use std::collections::{HashMap, HashSet};

use crate::error::Result;
use crate::header::check_table;
use crate::image::{decode_l2, Mapping, Qcow2, L1_OFFSET_MASK};
use crate::refcount::Refcounts;
use crate::{invalid, Error};

/// What [`Qcow2::check`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CheckReport {
    /// Clusters whose refcount is lower than their references, or references that point
    /// outside the file: data could be lost. (At most 100 messages are kept.)
    pub corruptions: Vec<String>,
    /// Number of corruptions found (may exceed `corruptions.len()`).
    pub corruption_count: u64,
    /// Clusters whose refcount exceeds their references (space that is wasted, not lost).
    pub leaks: u64,
    /// Host clusters referenced at least once.
    pub referenced_clusters: u64,
}

impl CheckReport {
    /// No corruption and no leak.
    pub fn is_clean(&self) -> bool {
        self.corruption_count == 0 && self.leaks == 0
    }

    fn corrupt(&mut self, msg: String) {
        self.corruption_count += 1;
        if self.corruptions.len() < 100 {
            self.corruptions.push(msg);
        }
    }
}

pub(crate) fn run(img: &Qcow2) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let cs = img.cluster_size();
    let bits = cs.trailing_zeros();
    let mut refs_of: HashMap<u64, u64> = HashMap::new();
    let mut add = |off: u64, len: u64| {
        if len == 0 {
            return;
        }
        for ci in (off >> bits)..=(off.saturating_add(len - 1) >> bits) {
            *refs_of.entry(ci).or_default() += 1;
        }
    };

    let p = img.parts();
    let h = p.header;
    if h.nb_snapshots > 0 {
        return Err(invalid(
            "checking images with internal snapshots is not implemented",
        ));
    }
    let file_len = p
        .storage
        .len()
        .map_err(|e| Error::io("reading the file length", e))?;
    add(0, cs);
    add(h.l1_table_offset, u64::from(h.l1_size) * 8);
    add(
        h.refcount_table_offset,
        u64::from(h.refcount_table_clusters) * cs,
    );
    let mut refs = Refcounts::load(
        p.storage,
        h.refcount_order,
        h.cluster_bits,
        h.refcount_table_offset,
        h.refcount_table_clusters,
        file_len,
    )?;
    refs.check_entries()?;
    for off in refs.block_offsets() {
        if off.checked_add(cs).is_none_or(|end| end > file_len) {
            report.corrupt(format!("refcount block at {off:#x} beyond end of file"));
            continue;
        }
        add(off, cs);
    }

    // Walk each L2 table once, however many L1 entries name it (each naming counts as
    // a reference, so sharing shows up as a refcount mismatch).
    let mut walked = HashSet::new();
    let mut raw = vec![0u8; cs as usize];
    for (i, e) in p.l1.iter().enumerate() {
        let l2 = e & L1_OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        if check_table("L2 table", l2, cs, cs, file_len).is_err() {
            report.corrupt(format!("L1 entry {i}: L2 table at {l2:#x} invalid"));
            continue;
        }
        add(l2, cs);
        if !walked.insert(l2) {
            continue;
        }
        p.storage
            .read_at(&mut raw, l2)
            .map_err(|e| Error::io("reading an L2 table", e))?;
        for c in raw.chunks_exact(8) {
            let e = u64::from_be_bytes(c.try_into().expect("8 bytes"));
            match decode_l2(e, h.cluster_bits) {
                Err(err) => report.corrupt(format!("L2 entry {e:#x}: {err}")),
                Ok(Mapping::Data { host, .. })
                | Ok(Mapping::Zero {
                    host: Some(host), ..
                }) => {
                    if host >= file_len {
                        report.corrupt(format!("data cluster at {host:#x} beyond end of file"));
                    }
                    add(host, cs);
                }
                Ok(Mapping::Compressed { offset, sectors }) => add(offset & !511, sectors * 512),
                Ok(_) => {}
            }
        }
    }

    report.referenced_clusters = refs_of.len() as u64;
    // Every cluster of the file, and every referenced one (beyond the file when corrupt).
    let file_clusters = file_len.div_ceil(cs);
    let mut beyond: Vec<u64> = refs_of
        .keys()
        .copied()
        .filter(|&c| c >= file_clusters)
        .collect();
    beyond.sort_unstable();
    for ci in (0..file_clusters).chain(beyond) {
        let expected = refs_of.get(&ci).copied().unwrap_or(0);
        let stored = refs.get(p.storage, ci)?;
        if stored < expected {
            report.corrupt(format!(
                "cluster {:#x}: refcount {stored}, referenced {expected} times",
                ci << bits
            ));
        } else if stored > expected {
            report.leaks += 1;
        }
    }
    Ok(report)
}
