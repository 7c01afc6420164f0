//! proptest: random writes, discards, flushes and reopens against an in-memory model of
//! the disk, with and without a backing device, for several geometries. After every flush
//! the image is reopened from its stored bytes alone, compared with the model, and checked
//! for refcount corruption and leaks.

use boxlet_qcow2::{
    create_on, BlockDevice, CreateOptions, MemStorage, Qcow2, RawImage, StorageOptions,
};
use proptest::prelude::*;

use crate::util::{read_all, SharedMem};

const SIZE: u64 = 1 << 20;

#[derive(Debug, Clone)]
enum Op {
    Write { off: u64, len: u64, seed: u8 },
    Discard { off: u64, len: u64 },
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (
        0..SIZE,
        prop_oneof![1u64..600, 1u64..20_000, 60_000u64..140_000],
    );
    prop_oneof![
        6 => (range.clone(), any::<u8>()).prop_map(|((off, len), seed)| Op::Write { off, len, seed }),
        2 => range.prop_map(|(off, len)| Op::Discard { off, len }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

#[derive(Debug, Clone, Copy)]
enum Backing {
    None,
    Raw,
    Qcow2,
}

#[derive(Debug, Clone)]
struct Setup {
    cluster_bits: u32,
    version: u32,
    refcount_order: u32,
    backing: Backing,
}

fn setup() -> impl Strategy<Value = Setup> {
    (
        prop_oneof![Just(9u32), Just(12), Just(16)],
        prop_oneof![Just(2u32), Just(3)],
        prop_oneof![Just(0u32), Just(4), Just(6)],
        prop_oneof![
            Just(Backing::None),
            Just(Backing::Raw),
            Just(Backing::Qcow2)
        ],
    )
        .prop_map(|(cluster_bits, version, order, backing)| Setup {
            cluster_bits,
            version,
            refcount_order: if version == 2 { 4 } else { order },
            backing,
        })
}

/// Backing content: a pattern over the first 3/4 of the disk.
fn backing_bytes() -> Vec<u8> {
    (0..SIZE * 3 / 4)
        .map(|i| (i * 7 / 5 % 251) as u8 + 1)
        .collect()
}

/// A qcow2 backing image holding `backing_bytes` in a few regions only (the rest
/// unallocated, reading as zeros): returns the image bytes and what it reads as.
fn qcow2_backing() -> (Vec<u8>, Vec<u8>) {
    let data = backing_bytes();
    let mut reads = vec![0u8; data.len()];
    let mut m = MemStorage::default();
    create_on(
        &mut m,
        &CreateOptions {
            cluster_bits: 12,
            ..CreateOptions::standalone(data.len() as u64)
        },
    )
    .unwrap();
    let store = SharedMem::new(m.data);
    let mut q = Qcow2::from_storage(
        Box::new(store.clone()),
        StorageOptions {
            writable: true,
            ..Default::default()
        },
        None,
    )
    .unwrap();
    for (start, len) in [(0usize, 70_000usize), (200_000, 5000), (500_000, 200_000)] {
        q.write_at(&data[start..start + len], start as u64).unwrap();
        reads[start..start + len].copy_from_slice(&data[start..start + len]);
    }
    drop(q);
    (store.bytes(), reads)
}

struct Harness {
    setup: Setup,
    store: SharedMem,
    backing_image: Vec<u8>,
    img: Option<Qcow2>,
}

impl Harness {
    fn new(setup: Setup) -> (Self, Vec<u8>) {
        let mut model = vec![0u8; SIZE as usize];
        let backing_image = match setup.backing {
            Backing::None => Vec::new(),
            Backing::Raw => {
                let b = backing_bytes();
                model[..b.len()].copy_from_slice(&b);
                b
            }
            Backing::Qcow2 => {
                let (img, reads) = qcow2_backing();
                model[..reads.len()].copy_from_slice(&reads);
                img
            }
        };
        let mut m = MemStorage::default();
        let opts = CreateOptions {
            size: Some(SIZE),
            cluster_bits: setup.cluster_bits,
            version: setup.version,
            refcount_order: setup.refcount_order,
            ..CreateOptions::default()
        };
        create_on(&mut m, &opts).unwrap();
        let mut h = Self {
            setup,
            store: SharedMem::new(m.data),
            backing_image,
            img: None,
        };
        h.open();
        (h, model)
    }

    fn backing(&self) -> Option<Box<dyn BlockDevice>> {
        let bytes = Box::new(MemStorage::new(self.backing_image.clone()));
        match self.setup.backing {
            Backing::None => None,
            Backing::Raw => Some(Box::new(RawImage::new(bytes).unwrap())),
            Backing::Qcow2 => Some(Box::new(
                Qcow2::from_storage(bytes, StorageOptions::default(), None).unwrap(),
            )),
        }
    }

    /// Reopen from the stored bytes alone (a fresh copy), with a tiny L2 cache so that
    /// evictions happen.
    fn open(&mut self) {
        self.img = None;
        let copy = SharedMem::new(self.store.bytes());
        self.store = copy.clone();
        let opts = StorageOptions {
            writable: true,
            l2_cache_tables: 2,
        };
        self.img = Some(Qcow2::from_storage(Box::new(copy), opts, self.backing()).unwrap());
    }

    fn img(&mut self) -> &mut Qcow2 {
        self.img.as_mut().unwrap()
    }

    fn verify(&mut self, model: &[u8]) -> Result<(), TestCaseError> {
        let report = self.img().check().unwrap();
        prop_assert!(report.is_clean(), "check after flush: {report:?}");
        self.open();
        let got = read_all(self.img());
        if let Some(i) = (0..model.len()).find(|&i| got[i] != model[i]) {
            return Err(TestCaseError::fail(format!(
                "byte {i:#x}: got {}, model {}",
                got[i], model[i]
            )));
        }
        Ok(())
    }
}

fn run(setup: Setup, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let (mut h, mut model) = Harness::new(setup);
    for op in ops {
        match op {
            Op::Write { off, len, seed } => {
                let len = len.min(SIZE - off);
                let buf: Vec<u8> = (0..len)
                    .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                    .collect();
                h.img().write_at(&buf, off).unwrap();
                model[off as usize..(off + len) as usize].copy_from_slice(&buf);
                // Reads see writes at once, before any flush.
                let mut back = vec![0u8; len as usize];
                h.img().read_at(&mut back, off).unwrap();
                prop_assert_eq!(&back, &buf);
            }
            Op::Discard { off, len } => {
                let len = len.min(SIZE - off);
                h.img().discard(off, len).unwrap();
                model[off as usize..(off + len) as usize].fill(0);
            }
            Op::Flush => {
                h.img().flush().unwrap();
                h.verify(&model)?;
            }
            Op::Reopen => h.verify(&model)?,
        }
    }
    h.img().flush().unwrap();
    h.verify(&model)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_model(setup in setup(), ops in prop::collection::vec(op(), 1..30)) {
        run(setup, ops)?;
    }
}
