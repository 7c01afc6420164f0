//! Crash consistency: record every write and sync the engine makes, then rebuild the image
//! as a crash would have left it at each point (a process crash keeps every write made; a
//! power loss also drops writes made since the last sync) and require that the image opens,
//! has no refcount corruption (leaks are allowed), and reads, byte for byte, as the disk did
//! at some moment between the last completed flush and the crash.

use std::io;
use std::sync::{Arc, Mutex};

use boxlet_qcow2::{
    create_on, BlockDevice, CreateOptions, MemStorage, Qcow2, RawImage, Storage, StorageOptions,
};

use crate::util::{read_all, Rng};

#[derive(Debug, Clone)]
enum LogOp {
    Write(u64, Vec<u8>),
    SetLen(u64),
    Sync,
}

#[derive(Debug, Clone, Default)]
struct Recorder(Arc<Mutex<(Vec<u8>, Vec<LogOp>)>>);

impl Recorder {
    fn log_len(&self) -> usize {
        self.0.lock().unwrap().1.len()
    }
}

fn apply(bytes: &mut Vec<u8>, op: &LogOp) {
    match op {
        LogOp::Write(off, data) => {
            let end = *off as usize + data.len();
            if end > bytes.len() {
                bytes.resize(end, 0);
            }
            bytes[*off as usize..end].copy_from_slice(data);
        }
        LogOp::SetLen(len) => bytes.resize(*len as usize, 0),
        LogOp::Sync => {}
    }
}

impl Storage for Recorder {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.lock().unwrap().0.len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        MemStorage::new(self.0.lock().unwrap().0.clone()).read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut g = self.0.lock().unwrap();
        let op = LogOp::Write(offset, buf.to_vec());
        apply(&mut g.0, &op);
        g.1.push(op);
        Ok(())
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let mut g = self.0.lock().unwrap();
        let op = LogOp::SetLen(len);
        apply(&mut g.0, &op);
        g.1.push(op);
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        self.0.lock().unwrap().1.push(LogOp::Sync);
        Ok(())
    }
}

struct Scenario {
    opts: CreateOptions,
    backing: Option<Vec<u8>>,
    ops: usize,
    max_len: u64,
    seed: u64,
    /// Test every crash point inside flushes; elsewhere every `stride`-th.
    stride: usize,
}

struct Recorded {
    base: Vec<u8>,
    log: Vec<LogOp>,
    /// Disk contents before the scenario and after each op.
    models: Vec<Vec<u8>>,
    /// (log length when op i started, when it ended, whether it was a flush).
    spans: Vec<(usize, usize, bool)>,
}

fn backing_dev(b: &Option<Vec<u8>>) -> Option<Box<dyn BlockDevice>> {
    b.as_ref().map(|d| {
        Box::new(RawImage::new(Box::new(MemStorage::new(d.clone()))).unwrap())
            as Box<dyn BlockDevice>
    })
}

fn record(s: &Scenario) -> Recorded {
    let mut m = MemStorage::default();
    create_on(&mut m, &s.opts).unwrap();
    let size = s.opts.size.unwrap();
    let rec = Recorder::default();
    rec.0.lock().unwrap().0 = m.data;
    let wopts = || StorageOptions {
        writable: true,
        l2_cache_tables: 4,
    };
    let mut img =
        Qcow2::from_storage(Box::new(rec.clone()), wopts(), backing_dev(&s.backing)).unwrap();
    let mut rng = Rng::new(s.seed);
    // Some data before the recorded part, so that overwrites and discards have old data.
    let mut model = read_all(&mut img);
    for _ in 0..4 {
        let len = 1 + rng.below(s.max_len);
        let off = rng.below(size - len);
        let mut buf = vec![0u8; len as usize];
        rng.fill(&mut buf);
        img.write_at(&buf, off).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&buf);
    }
    img.flush().unwrap();
    let base = rec.0.lock().unwrap().0.clone();
    rec.0.lock().unwrap().1.clear();

    let mut models = vec![model.clone()];
    let mut spans = Vec::new();
    for i in 0..s.ops {
        let start = rec.log_len();
        let is_flush = i % 4 == 3 || i + 1 == s.ops;
        if is_flush {
            img.flush().unwrap();
        } else {
            let len = 1 + rng.below(s.max_len);
            let off = rng.below(size - len);
            if rng.below(5) == 0 {
                img.discard(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            } else {
                let mut buf = vec![0u8; len as usize];
                rng.fill(&mut buf);
                img.write_at(&buf, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&buf);
            }
        }
        spans.push((start, rec.log_len(), is_flush));
        models.push(model.clone());
    }
    drop(img);
    let log = rec.0.lock().unwrap().1.clone();
    Recorded {
        base,
        log,
        models,
        spans,
    }
}

/// Open the image as a crash left it and check it; `durable` is the log prefix known
/// to be on disk, `k` the crash point.
fn verify_state(s: &Scenario, r: &Recorded, bytes: Vec<u8>, durable: usize, k: usize, what: &str) {
    let lower = r
        .spans
        .iter()
        .enumerate()
        .filter(|(_, &(_, end, flush))| flush && end <= durable)
        .map(|(i, _)| i + 1)
        .max()
        .unwrap_or(0);
    // Ops that had started (or, writing nothing, had completed) by the crash.
    let upper = r
        .spans
        .iter()
        .filter(|&&(start, end, _)| start < k || end <= k)
        .count();
    let opts = StorageOptions {
        writable: true,
        ..Default::default()
    };
    let mut img = Qcow2::from_storage(
        Box::new(MemStorage::new(bytes)),
        opts,
        backing_dev(&s.backing),
    )
    .unwrap_or_else(|e| panic!("{what}: does not open: {e}"));
    let got = read_all(&mut img);
    let report = img
        .check()
        .unwrap_or_else(|e| panic!("{what}: check failed: {e}"));
    assert_eq!(report.corruption_count, 0, "{what}: {report:?}");
    for (b, &v) in got.iter().enumerate() {
        if !(lower..=upper).any(|j| r.models[j][b] == v) {
            panic!(
                "{what}: byte {b:#x} = {v}, not the value of any state from op {lower} to {upper}"
            );
        }
    }
    // The image stays usable: a write after recovery lands and reads back.
    img.write_at(&[0xee; 700], 1000).unwrap();
    img.flush().unwrap();
    let mut back = [0u8; 700];
    img.read_at(&mut back, 1000).unwrap();
    assert_eq!(back, [0xee; 700], "{what}");
}

fn crash_everywhere(s: Scenario) {
    let r = record(&s);
    let in_flush = |k: usize| r.spans.iter().any(|&(a, b, f)| f && (a..=b).contains(&k));
    let mut tested = 0;
    for k in 0..=r.log.len() {
        if !(in_flush(k) || k % s.stride == 0 || k == r.log.len()) {
            continue;
        }
        // Process crash: every write made so far is there.
        let mut bytes = r.base.clone();
        let mut last_sync = 0;
        for (i, op) in r.log[..k].iter().enumerate() {
            apply(&mut bytes, op);
            if matches!(op, LogOp::Sync) {
                last_sync = i + 1;
            }
        }
        verify_state(&s, &r, bytes, k, k, &format!("process crash at {k}"));
        tested += 1;

        // Power loss: writes since the last sync may be missing, all or some.
        let unsynced: Vec<usize> = (last_sync..k)
            .filter(|&i| matches!(r.log[i], LogOp::Write(..)))
            .collect();
        if unsynced.is_empty() {
            continue;
        }
        let mut variants: Vec<Vec<usize>> = vec![Vec::new()];
        // Inside a flush, where metadata is written, drop each write in turn; elsewhere
        // (data writes) the first few.
        let singles = if in_flush(k) { unsynced.len() } else { 6 };
        for &skip in unsynced.iter().take(singles) {
            variants.push(unsynced.iter().copied().filter(|&i| i != skip).collect());
        }
        for keep in variants {
            let mut bytes = r.base.clone();
            for op in &r.log[..last_sync] {
                apply(&mut bytes, op);
            }
            for &i in &keep {
                apply(&mut bytes, &r.log[i]);
            }
            verify_state(
                &s,
                &r,
                bytes,
                last_sync,
                k,
                &format!("power loss at {k} keeping {keep:?}"),
            );
            tested += 1;
        }
    }
    assert!(tested > 50, "only {tested} crash states");
}

#[test]
fn crash_at_any_point_leaves_a_consistent_image() {
    crash_everywhere(Scenario {
        opts: CreateOptions {
            cluster_bits: 9,
            ..CreateOptions::standalone(256 << 10)
        },
        backing: None,
        ops: 16,
        max_len: 20_000,
        seed: 1,
        stride: 7,
    });
}

#[test]
fn crash_at_any_point_over_a_backing_file() {
    let backing: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8 + 1).collect();
    crash_everywhere(Scenario {
        opts: CreateOptions {
            cluster_bits: 10,
            version: 3,
            ..CreateOptions::standalone(256 << 10)
        },
        backing: Some(backing),
        ops: 16,
        max_len: 20_000,
        seed: 2,
        stride: 7,
    });
}

#[test]
fn crash_while_the_refcount_table_moves() {
    // 64-bit refcounts and 512-byte clusters: the first table covers only 2 MiB of file.
    crash_everywhere(Scenario {
        opts: CreateOptions {
            cluster_bits: 9,
            refcount_order: 6,
            ..CreateOptions::standalone(3 << 20)
        },
        backing: None,
        ops: 8,
        max_len: 700_000,
        seed: 3,
        stride: 400,
    });
}
