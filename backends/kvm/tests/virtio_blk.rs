//! virtio-blk and the MMIO transport driven the way a driver would, on the host (no KVM):
//! descriptor chains built in guest memory, valid and hostile.

mod common;

use std::io;

use boxlet_kvm::virtio::block::{Block, Disk};
use boxlet_kvm::virtio::mmio::MmioTransport;
use boxlet_kvm::virtio::VirtioDevice;
use common::{reg, set, Ring};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const NEXT: u16 = 1;
const WRITE: u16 = 2;

/// An in-memory disk that counts flushes.
#[derive(Default)]
struct MemDisk {
    data: Vec<u8>,
    flushes: usize,
}

impl Disk for MemDisk {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let o = offset as usize;
        buf.copy_from_slice(&self.data[o..o + buf.len()]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let o = offset as usize;
        self.data[o..o + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.flushes += 1;
        Ok(())
    }
}

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
}

/// Write chains (each a list of (addr, len, device-writable)) into the queue's memory.
fn add_chains(vq: &MockSplitQueue<'_, GuestMemoryMmap>, chains: &[Vec<(u64, u32, bool)>]) {
    let mut descs = Vec::new();
    for chain in chains {
        for (i, &(addr, len, w)) in chain.iter().enumerate() {
            let idx = descs.len() as u16;
            let last = i == chain.len() - 1;
            let flags = if w { WRITE } else { 0 } | if last { 0 } else { NEXT };
            descs.push(RawDescriptor::from(SplitDescriptor::new(
                addr,
                len,
                flags,
                if last { 0 } else { idx + 1 },
            )));
        }
    }
    vq.add_desc_chains(&descs, 0).unwrap();
}

fn header(m: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    m.write_slice(&h, GuestAddress(at)).unwrap();
}

fn status(m: &GuestMemoryMmap, at: u64) -> u8 {
    let mut b = [0xaa];
    m.read_slice(&mut b, GuestAddress(at)).unwrap();
    b[0]
}

/// (id, len) of used element `i`.
fn used(vq: &MockSplitQueue<'_, GuestMemoryMmap>, i: usize) -> (u32, u32) {
    let e = vq.used().ring().ref_at(i).unwrap().load();
    (e.id(), e.len())
}

#[test]
fn reads_writes_flushes_and_ids() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    let mut disk = MemDisk {
        data: vec![0; 1 << 20],
        flushes: 0,
    };
    for (i, b) in disk.data.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let mut dev = Block::new(Box::new(disk), false, "serial-123");
    let payload: Vec<u8> = (0..8192u32).map(|i| (i * 7 % 256) as u8).collect();
    m.write_slice(&payload, GuestAddress(0x20_0000)).unwrap();
    header(&m, 0x10_0000, 1, 16); // write 8 KiB at sector 16
    header(&m, 0x10_1000, 0, 16); // read it back, in two buffers
    header(&m, 0x10_2000, 4, 0); // flush
    header(&m, 0x10_3000, 8, 0); // get id
    add_chains(
        &vq,
        &[
            vec![
                (0x10_0000, 16, false),
                (0x20_0000, 8192, false),
                (0x10_0100, 1, true),
            ],
            vec![
                (0x10_1000, 16, false),
                (0x30_0000, 4096, true),
                (0x30_1000, 4096, true),
                (0x10_1100, 1, true),
            ],
            vec![(0x10_2000, 16, false), (0x10_2100, 1, true)],
            vec![
                (0x10_3000, 16, false),
                (0x10_3200, 20, true),
                (0x10_3100, 1, true),
            ],
        ],
    );
    assert!(dev.process_queue(0, std::slice::from_mut(&mut q), &m));
    for (s, at) in [
        (0, 0x10_0100),
        (1, 0x10_1100),
        (2, 0x10_2100),
        (3, 0x10_3100),
    ] {
        assert_eq!(status(&m, at), 0, "request {s}");
    }
    let mut back = vec![0u8; 8192];
    m.read_slice(&mut back, GuestAddress(0x30_0000)).unwrap();
    assert_eq!(back, payload);
    // Used lengths: the bytes written into guest memory, status included.
    assert_eq!(used(&vq, 0), (0, 1));
    assert_eq!(used(&vq, 1).1, 8193);
    assert_eq!(used(&vq, 3).1, 21);
    let mut id = [0u8; 10];
    m.read_slice(&mut id, GuestAddress(0x10_3200)).unwrap();
    assert_eq!(&id, b"serial-123");
}

#[test]
fn hostile_chains_get_errors_not_panics() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 32);
    let mut q: Queue = vq.create_queue().unwrap();
    let mut dev = Block::new(
        Box::new(MemDisk {
            data: vec![0; 64 << 10],
            flushes: 0,
        }),
        false,
        "x",
    );
    header(&m, 0x10_0000, 0, 1 << 60); // a sector far past the end (and overflowing)
    header(&m, 0x10_1000, 0, 127); // the last sector, 2 sectors long
    header(&m, 0x10_2000, 1, 0); // a write whose data is device-writable
    header(&m, 0x10_3000, 77, 0); // an unknown request
    header(&m, 0x10_4000, 0, 0); // a read into memory the guest does not have
    add_chains(
        &vq,
        &[
            vec![
                (0x10_0000, 16, false),
                (0x20_0000, 512, true),
                (0x10_0100, 1, true),
            ],
            vec![
                (0x10_1000, 16, false),
                (0x20_0000, 1024, true),
                (0x10_1100, 1, true),
            ],
            vec![
                (0x10_2000, 16, false),
                (0x20_0000, 512, true),
                (0x10_2100, 1, true),
            ],
            vec![(0x10_3000, 16, false), (0x10_3100, 1, true)],
            vec![
                (0x10_4000, 16, false),
                (0xffff_0000, 4096, true),
                (0x10_4100, 1, true),
            ],
            // A header too short, then a status the device may not write.
            vec![(0x10_5000, 8, false), (0x10_5100, 1, true)],
            vec![(0x10_6000, 16, false), (0x10_6100, 1, false)],
            // A nearly 4 GiB "buffer": bounded work, an error for the range.
            vec![
                (0x10_1000, 16, false),
                (0x0, u32::MAX - 100, true),
                (0x10_7100, 1, true),
            ],
            // A chain over 2^32 bytes in total is cut where it overflows: no status.
            vec![
                (0x10_1000, 16, false),
                (0x0, u32::MAX, true),
                (0x10_8100, 1, true),
            ],
        ],
    );
    for at in [
        0x10_0100u64,
        0x10_1100,
        0x10_2100,
        0x10_3100,
        0x10_4100,
        0x10_5100,
        0x10_6100,
        0x10_7100,
        0x10_8100,
    ] {
        m.write_slice(&[0xaa], GuestAddress(at)).unwrap();
    }
    assert!(dev.process_queue(0, std::slice::from_mut(&mut q), &m));
    assert_eq!(status(&m, 0x10_0100), 1, "past the end");
    assert_eq!(status(&m, 0x10_1100), 1, "crossing the end");
    assert_eq!(status(&m, 0x10_2100), 1, "write with device-writable data");
    assert_eq!(status(&m, 0x10_3100), 2, "unsupported");
    assert_eq!(status(&m, 0x10_4100), 1, "buffer outside guest memory");
    assert_eq!(
        status(&m, 0x10_5100),
        0xaa,
        "no status written for a short header"
    );
    assert_eq!(used(&vq, 5).1, 0);
    assert_eq!(
        status(&m, 0x10_6100),
        0xaa,
        "a read-only status byte is left alone"
    );
    assert_eq!(status(&m, 0x10_7100), 1, "4 GiB buffer");
    assert_eq!(
        status(&m, 0x10_8100),
        0xaa,
        "an illegal chain gets no status"
    );
    assert_eq!(used(&vq, 8).1, 0);
    // Every chain was completed.
    assert_eq!(vq.used().idx().load(), 9);
}

#[test]
fn read_only_disks_refuse_writes() {
    let m = mem();
    let vq = MockSplitQueue::new(&m, 16);
    let mut q: Queue = vq.create_queue().unwrap();
    let mut dev = Block::new(
        Box::new(MemDisk {
            data: vec![5; 4096],
            flushes: 0,
        }),
        true,
        "ro",
    );
    assert_ne!(dev.features() & (1 << 5), 0, "VIRTIO_BLK_F_RO offered");
    header(&m, 0x10_0000, 1, 0);
    add_chains(
        &vq,
        &[vec![
            (0x10_0000, 16, false),
            (0x20_0000, 512, false),
            (0x10_0100, 1, true),
        ]],
    );
    dev.process_queue(0, std::slice::from_mut(&mut q), &m);
    assert_eq!(status(&m, 0x10_0100), 1);
}

#[test]
fn the_transport_negotiates_and_survives_garbage() {
    let m = mem();
    let disk = MemDisk {
        data: vec![0; 1 << 20],
        flushes: 0,
    };
    let irq = EventFd::new(0).unwrap();
    let mut t = MmioTransport::new(
        Box::new(Block::new(Box::new(disk), false, "t")),
        m.clone(),
        irq,
    );
    assert_eq!(reg(&mut t, 0x0), 0x7472_6976);
    assert_eq!(reg(&mut t, 0x4), 2);
    assert_eq!(reg(&mut t, 0x8), 2, "block device");
    set(&mut t, 0x14, 1);
    assert_eq!(reg(&mut t, 0x10) & 1, 1, "VIRTIO_F_VERSION_1 offered");
    // Capacity in the config space: 2048 sectors.
    let mut cap = [0u8; 8];
    t.read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 2048);
    // Garbage: odd sizes, unknown offsets, a queue that does not exist, absurd sizes.
    t.write(0x70, &[1, 2]);
    let mut odd = [0u8; 3];
    t.read(0x0, &mut odd);
    assert_eq!(odd, [0, 0, 0]);
    set(&mut t, 0x30, 7);
    assert_eq!(reg(&mut t, 0x34), 0, "no queue 7");
    set(&mut t, 0x38, 1000);
    set(&mut t, 0x50, 7);
    set(&mut t, 0x50, u32::MAX);
    set(&mut t, 0x30, 0);
    set(&mut t, 0x38, 3); // not a power of two: ignored
                          // Features the device never offered: the driver is told it failed.
    set(&mut t, 0x24, 0);
    set(&mut t, 0x20, 1 << 30);
    set(&mut t, 0x70, 1 | 2 | 8);
    assert_ne!(reg(&mut t, 0x70) & 0x80, 0, "FAILED");
    set(&mut t, 0x70, 0); // reset
    assert_eq!(reg(&mut t, 0x70), 0);
    // A queue whose rings lie outside guest memory: notify marks the device broken.
    set(&mut t, 0x30, 0);
    set(&mut t, 0x38, 16);
    set(&mut t, 0x80, 0xffff_f000);
    set(&mut t, 0x84, 0x7);
    set(&mut t, 0x44, 1);
    set(&mut t, 0x70, 1 | 2 | 8 | 4);
    set(&mut t, 0x50, 0);
    assert_ne!(reg(&mut t, 0x70) & 0x40, 0, "DEVICE_NEEDS_RESET");
    assert_eq!(reg(&mut t, 0x60) & 2, 2, "config interrupt");
}

#[test]
fn with_event_idx_the_guest_is_interrupted_only_when_it_asks() {
    let m = mem();
    let vq = Ring::new(&m, 0x1_0000);
    let disk = MemDisk {
        data: vec![0; 1 << 20],
        flushes: 0,
    };
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(
        Box::new(Block::new(Box::new(disk), false, "t")),
        m.clone(),
        irq.try_clone().unwrap(),
    );
    // Negotiate VERSION_1 and EVENT_IDX, then set up queue 0 where the rings are.
    set(&mut t, 0x14, 0);
    assert_ne!(reg(&mut t, 0x10) & (1 << 29), 0, "EVENT_IDX offered");
    set(&mut t, 0x24, 0);
    set(&mut t, 0x20, 1 << 29);
    set(&mut t, 0x24, 1);
    set(&mut t, 0x20, 1);
    set(&mut t, 0x70, 1 | 2 | 8);
    set(&mut t, 0x30, 0);
    set(&mut t, 0x38, u32::from(Ring::SIZE));
    let (desc, avail, used) = vq.addrs();
    for (off, addr) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
        set(&mut t, off, addr as u32);
        set(&mut t, off + 4, (addr >> 32) as u32);
    }
    set(&mut t, 0x44, 1);
    set(&mut t, 0x70, 1 | 2 | 8 | 4);

    // The driver wants an interrupt only once the used index passes 5: none now.
    vq.set_used_event(5);
    header(&m, 0x10_0000, 4, 0); // flush
    vq.push(0, &[(0x10_0000, 16, false), (0x10_0100, 1, true)]);
    set(&mut t, 0x50, 0);
    assert_eq!(vq.used_idx(), 1, "the request completed");
    assert!(irq.read().is_err(), "no interrupt: used_event is ahead");
    // The device published where it stopped: the driver notifies past it.
    assert_eq!(vq.avail_event(), 1);

    // Now the driver asks to hear about the next one.
    vq.set_used_event(1);
    header(&m, 0x10_1000, 4, 0);
    vq.push(2, &[(0x10_1000, 16, false), (0x10_1100, 1, true)]);
    set(&mut t, 0x50, 0);
    assert_eq!(vq.used_idx(), 2);
    assert_eq!(irq.read().unwrap(), 1, "interrupted");
    assert_eq!(reg(&mut t, 0x60) & 1, 1, "used-ring interrupt status");
}
