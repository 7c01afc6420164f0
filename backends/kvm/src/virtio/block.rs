//! virtio-blk on boxlet's own qcow2 engine or a raw file.
//!
//! Requests: read, write, flush, get-id. Every request is checked against the disk's
//! capacity and its descriptors' directions; data moves in bounded chunks, so a guest
//! naming a 4 GiB buffer costs the host no more than 64 KiB at a time.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{read_config_bytes, VirtioDevice};

const SECTOR: u64 = 512;
const CHUNK: usize = 64 << 10;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
const QUEUE_SIZE: u16 = 256;

/// What a block device reads and writes.
pub trait Disk: Send {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Fill `buf` from `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make written data durable.
    fn flush(&mut self) -> io::Result<()>;
}

/// A raw image file.
#[derive(Debug)]
pub struct RawDisk {
    file: std::fs::File,
    size: u64,
}

impl RawDisk {
    /// Open `path` (for writing unless `read_only`).
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok(Self { file, size })
    }
}

impl Disk for RawDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
}

/// A qcow2 image (with its backing chain) through boxlet's engine.
pub struct Qcow2Disk(boxlet_qcow2::Qcow2);

impl std::fmt::Debug for Qcow2Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Disk").finish_non_exhaustive()
    }
}

impl Qcow2Disk {
    /// Open `path` and its backing chain.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let opts = boxlet_qcow2::OpenOptions {
            writable: !read_only,
            ..Default::default()
        };
        boxlet_qcow2::Qcow2::open_with(path, opts)
            .map(Self)
            .map_err(|e| io::Error::other(e.to_string()))
    }
}

impl Disk for Qcow2Disk {
    fn size(&self) -> u64 {
        self.0.virtual_size()
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0
            .read_at(buf, offset)
            .map_err(|e| io::Error::other(e.to_string()))
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0
            .write_at(buf, offset)
            .map_err(|e| io::Error::other(e.to_string()))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush().map_err(|e| io::Error::other(e.to_string()))
    }
}

/// The virtio-blk device.
pub struct Block {
    disk: Box<dyn Disk>,
    read_only: bool,
    config: [u8; 8],
    id: [u8; 20],
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl Block {
    /// A device over `disk`, `id` as its serial (at most 20 bytes are kept).
    pub fn new(disk: Box<dyn Disk>, read_only: bool, id: &str) -> Self {
        let capacity = disk.size() / SECTOR;
        let mut serial = [0u8; 20];
        let n = id.len().min(20);
        serial[..n].copy_from_slice(&id.as_bytes()[..n]);
        Self {
            disk,
            read_only,
            config: capacity.to_le_bytes(),
            id: serial,
        }
    }

    fn capacity_bytes(&self) -> u64 {
        u64::from_le_bytes(self.config) * SECTOR
    }

    /// Serve one request; returns the bytes written into guest memory (data + status).
    fn request(&mut self, descs: &[Descriptor], mem: &GuestMemoryMmap) -> u32 {
        let (Some(head), Some(status)) = (descs.first(), descs.last()) else {
            return 0;
        };
        if descs.len() < 2 || head.is_write_only() || head.len() < 16 || !status.is_write_only() {
            return 0; // nowhere to put a status: complete it empty
        }
        let mut hdr = [0u8; 16];
        if mem.read_slice(&mut hdr, head.addr()).is_err() {
            return 0;
        }
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or([0; 8]));
        let data = &descs[1..descs.len() - 1];
        let (code, written) = match kind {
            T_IN => self.read(sector, data, mem),
            T_OUT if self.read_only => (S_IOERR, 0),
            T_OUT => (self.write(sector, data, mem), 0),
            T_FLUSH => match self.disk.flush() {
                Ok(()) => (S_OK, 0),
                Err(_) => (S_IOERR, 0),
            },
            T_GET_ID => match data.first() {
                Some(d) if d.is_write_only() => {
                    let n = (d.len() as usize).min(self.id.len());
                    match mem.write_slice(&self.id[..n], d.addr()) {
                        Ok(()) => (S_OK, n as u32),
                        Err(_) => (S_IOERR, 0),
                    }
                }
                _ => (S_IOERR, 0),
            },
            _ => (S_UNSUPP, 0),
        };
        if mem.write_slice(&[code], status.addr()).is_err() {
            return written;
        }
        written.saturating_add(1)
    }

    /// Where a request at `sector` of `len` bytes starts, if it fits the disk.
    fn span(&self, sector: u64, len: u64) -> Option<u64> {
        let start = sector.checked_mul(SECTOR)?;
        (start.checked_add(len)? <= self.capacity_bytes()).then_some(start)
    }

    fn read(&mut self, sector: u64, data: &[Descriptor], mem: &GuestMemoryMmap) -> (u8, u32) {
        let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        let Some(mut off) = self.span(sector, total) else {
            return (S_IOERR, 0);
        };
        if data.iter().any(|d| !d.is_write_only()) {
            return (S_IOERR, 0);
        }
        let mut buf = vec![0u8; CHUNK];
        let mut written: u32 = 0;
        for d in data {
            let mut done = 0u64;
            while done < u64::from(d.len()) {
                let n = (u64::from(d.len()) - done).min(CHUNK as u64) as usize;
                if self.disk.read_at(&mut buf[..n], off).is_err() {
                    return (S_IOERR, written);
                }
                let Some(addr) = d.addr().0.checked_add(done) else {
                    return (S_IOERR, written);
                };
                if mem.write_slice(&buf[..n], GuestAddress(addr)).is_err() {
                    return (S_IOERR, written);
                }
                done += n as u64;
                off += n as u64;
                written = written.saturating_add(n as u32);
            }
        }
        (S_OK, written)
    }

    fn write(&mut self, sector: u64, data: &[Descriptor], mem: &GuestMemoryMmap) -> u8 {
        let total: u64 = data.iter().map(|d| u64::from(d.len())).sum();
        let Some(mut off) = self.span(sector, total) else {
            return S_IOERR;
        };
        if data.iter().any(|d| d.is_write_only()) {
            return S_IOERR;
        }
        let mut buf = vec![0u8; CHUNK];
        for d in data {
            let mut done = 0u64;
            while done < u64::from(d.len()) {
                let n = (u64::from(d.len()) - done).min(CHUNK as u64) as usize;
                let Some(addr) = d.addr().0.checked_add(done) else {
                    return S_IOERR;
                };
                if mem.read_slice(&mut buf[..n], GuestAddress(addr)).is_err()
                    || self.disk.write_at(&buf[..n], off).is_err()
                {
                    return S_IOERR;
                }
                done += n as u64;
                off += n as u64;
            }
        }
        S_OK
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        2
    }

    fn features(&self) -> u64 {
        VIRTIO_BLK_F_FLUSH | if self.read_only { VIRTIO_BLK_F_RO } else { 0 }
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemoryMmap) -> bool {
        let Some(queue) = queues.get_mut(index) else {
            return false;
        };
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            // The chain iterator stops at loops, bad indexes and the queue's size.
            let descs: Vec<Descriptor> = chain.collect();
            let len = self.request(&descs, mem);
            if queue.add_used(mem, head, len).is_err() {
                break;
            }
            used = true;
        }
        used
    }
}
