//! Entry points for the cargo-fuzz targets (fuzz/): arbitrary guest memory and register
//! traffic against the MMIO transport and the devices. The only property checked is the
//! one that matters for a VMM: whatever the guest writes, the host does not panic, hang
//! or touch memory outside the guest's.

use std::io;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::block::{Block, Disk};
use super::mmio::MmioTransport;
use super::vsock::Vsock;
use super::VirtioDevice;

const MEM_SIZE: usize = 0x4_0000;

/// A small in-memory disk.
struct MemDisk(Vec<u8>);

impl Disk for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let o = usize::try_from(offset).map_err(io::Error::other)?;
        let src = self
            .0
            .get(o..o + buf.len())
            .ok_or_else(|| io::Error::other("out of range"))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let o = usize::try_from(offset).map_err(io::Error::other)?;
        let dst = self
            .0
            .get_mut(o..o + buf.len())
            .ok_or_else(|| io::Error::other("out of range"))?;
        dst.copy_from_slice(buf);
        Ok(())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Guest memory holding `data` from address 0.
fn memory(data: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
        .expect("a small anonymous mapping");
    let n = data.len().min(MEM_SIZE);
    mem.write_slice(&data[..n], GuestAddress(0))
        .expect("inside the mapping");
    mem
}

/// Queues placed by the first bytes of `data`: for each, a size and the three ring
/// addresses, taken as the guest would give them (the queue checks them).
fn queues(data: &[u8], count: usize) -> Vec<Queue> {
    let byte = |i: usize| data.get(i).copied().unwrap_or(0);
    let word = |i: usize| u64::from(u16::from_le_bytes([byte(i), byte(i + 1)])) << 4;
    (0..count)
        .map(|q| {
            let b = q * 7;
            let mut queue = Queue::new(256).expect("256 is a valid size");
            let _ = queue.try_set_size(1u16 << (byte(b) % 9));
            queue.set_desc_table_address(Some(word(b + 1) as u32), Some(0));
            queue.set_avail_ring_address(Some(word(b + 3) as u32), Some(0));
            queue.set_used_ring_address(Some(word(b + 5) as u32), Some(0));
            queue.set_ready(true);
            queue
        })
        .collect()
}

fn drive(dev: &mut dyn VirtioDevice, queues: &mut [Queue], mem: &GuestMemoryMmap, rounds: u8) {
    if queues.iter().any(|q| !q.is_valid(mem)) {
        return; // the transport refuses such queues before a device sees them
    }
    for r in 0..rounds {
        let index = usize::from(r) % queues.len();
        dev.process_queue(index, queues, mem);
    }
}

/// virtio-blk on arbitrary guest memory: queue placement and every descriptor chain,
/// header and buffer come from `data`.
pub fn block(data: &[u8]) {
    let mem = memory(data);
    let mut q = queues(data, 1);
    let mut dev = Block::new(Box::new(MemDisk(vec![0; 64 << 10])), false, "fuzz");
    drive(&mut dev, &mut q, &mem, 3);
}

/// virtio-vsock on arbitrary guest memory (packets, headers, receive buffers).
pub fn vsock(data: &[u8]) {
    let mem = memory(data);
    let mut q = queues(data, 3);
    // One socket path per thread (the device removes it when dropped).
    let dir = std::env::temp_dir().join(format!("boxlet-fuzz-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join(format!("v{:?}.sock", std::thread::current().id()));
    let Ok(mut dev) = Vsock::new(3, &path) else {
        return;
    };
    drive(&mut dev, &mut q, &mem, 6);
    dev.process_host(&mut q, &mem);
}

/// The MMIO transport: register reads and writes from `data` (7-byte records: offset,
/// size and direction, value), with queue notifications reaching a block device; the
/// same bytes are the guest memory, so queues set up by the records point into them.
pub fn transport(data: &[u8]) {
    let mem = memory(data);
    let dev = Block::new(Box::new(MemDisk(vec![0; 4096])), false, "fuzz");
    let Ok(irq) = EventFd::new(libc::EFD_NONBLOCK) else {
        return;
    };
    let mut t = MmioTransport::new(Box::new(dev), mem, irq);
    for op in data.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([op[0], op[1]])) & 0x1ff;
        let len = [1usize, 2, 4, 8][usize::from(op[2] % 4)];
        if op[2] & 0x80 != 0 {
            let mut buf = vec![0u8; len];
            t.read(offset, &mut buf);
        } else {
            let mut v = [0u8; 8];
            v[..4].copy_from_slice(&op[3..7]);
            t.write(offset, &v[..len]);
        }
    }
}

#[cfg(test)]
mod tests {
    /// A deterministic stream of pseudo-random bytes (xorshift).
    fn bytes(seed: u64, n: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn random_guest_memory_never_panics_the_devices() {
        for seed in 0..300 {
            let d = bytes(seed, 2048 + (seed as usize * 37) % 4096);
            super::block(&d);
            super::vsock(&d);
            super::transport(&d);
        }
    }
}
