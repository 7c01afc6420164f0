//! Shared helpers for the criterion benchmarks.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Deterministic pseudo-random bytes (xorshift64*), so that runs compare.
pub fn fill_random(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// `n` offsets, 4 KiB aligned, spread pseudo-randomly over `size` bytes.
pub fn random_offsets(size: u64, n: usize, seed: u64) -> Vec<u64> {
    let mut x = seed | 1;
    let blocks = size / 4096;
    (0..n)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) % blocks) * 4096
        })
        .collect()
}

/// Write a raw file of `size` random bytes.
pub fn make_raw(path: &Path, size: u64) -> std::io::Result<()> {
    let f = File::create(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < size {
        fill_random(&mut buf, off + 1);
        let n = (size - off).min(buf.len() as u64) as usize;
        f.write_all_at(&buf[..n], off)?;
        off += n as u64;
    }
    Ok(())
}
