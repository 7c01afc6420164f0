//! Bodies of the cargo-fuzz targets in `fuzz/`, here so that the corpus replay test runs
//! exactly what the fuzzer runs. Each takes arbitrary bytes and must never panic.

use crate::image::{Qcow2, StorageOptions};
use crate::{BlockDevice, Header, ImageInfo, MemStorage, RawImage};

/// Parse a header and, if it is valid, read the start and end of the disk.
pub fn header(data: &[u8]) {
    let storage = MemStorage::new(data.to_vec());
    if let Ok(h) = Header::read(&storage) {
        let _ = ImageInfo::new(&h, data.len() as u64);
    }
    if let Ok(mut img) = Qcow2::from_storage(Box::new(storage), StorageOptions::default(), None) {
        let size = img.virtual_size();
        let mut buf = vec![0u8; 4096];
        let n = size.min(4096) as usize;
        let _ = img.read_at(&mut buf[..n], 0);
        let _ = img.read_at(&mut buf[..n], size - n as u64);
    }
}

/// Bytes of one operation of [`engine`].
pub const OP_LEN: usize = 12;

/// Input: `[n][n ops of OP_LEN bytes][image bytes]`. Opens the image (writable if it
/// can), runs the ops (read, write, discard, flush), then checks it.
pub fn engine(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 32);
    if rest.len() < n * OP_LEN {
        return;
    }
    let (ops, image) = rest.split_at(n * OP_LEN);
    let opts = StorageOptions {
        writable: true,
        l2_cache_tables: 3,
    };
    // An image that names a backing file gets an empty one (reads as zeros), so that it
    // can be opened for writing.
    let storage = Box::new(MemStorage::new(image.to_vec()));
    let backing = Header::read(&*storage)
        .ok()
        .and_then(|h| h.backing_file)
        .and_then(|_| RawImage::new(Box::new(MemStorage::default())).ok())
        .map(|r| Box::new(r) as Box<dyn BlockDevice>);
    let mut img = match Qcow2::from_storage(storage, opts, backing) {
        Ok(img) => img,
        Err(_) => {
            let storage = Box::new(MemStorage::new(image.to_vec()));
            match Qcow2::from_storage(storage, StorageOptions::default(), None) {
                Ok(img) => img,
                Err(_) => return,
            }
        }
    };
    let size = img.virtual_size();
    if size == 0 {
        return;
    }
    for op in ops.chunks_exact(OP_LEN) {
        let mut off_bytes = [0u8; 8];
        off_bytes[..6].copy_from_slice(&op[1..7]);
        let off = u64::from_le_bytes(off_bytes) % size;
        let len = (u64::from(u16::from_le_bytes([op[7], op[8]])) + 1).min(size - off);
        match op[0] % 4 {
            0 => {
                let mut buf = vec![0u8; len as usize];
                let _ = img.read_at(&mut buf, off);
            }
            1 => {
                let buf = vec![op[9]; len as usize];
                let _ = img.write_at(&buf, off);
            }
            2 => {
                let _ = img.discard(off, len);
            }
            _ => {
                let _ = img.flush();
            }
        }
    }
    let _ = img.check();
}

/// Build an [`engine`] input from ops and an image.
pub fn engine_input(ops: &[[u8; OP_LEN]], image: &[u8]) -> Vec<u8> {
    let mut v = vec![ops.len() as u8];
    for op in ops {
        v.extend_from_slice(op);
    }
    v.extend_from_slice(image);
    v
}
