//! Hashed directory indexes (htree) for the builder: the half-MD4 name hash ext4 uses by
//! default, and a one-level index (a root block over leaf blocks sorted by hash).

use crate::csum::crc32c_raw;
use crate::encode::{self, Dirent};

/// The half-MD4 transform of the kernel's `fs/ext4/hash.c`; returns the updated state.
fn half_md4(buf: &mut [u32; 4], input: &[u32; 8]) {
    const K2: u32 = 0o13240474631;
    const K3: u32 = 0o15666365641;
    let f = |x: u32, y: u32, z: u32| z ^ (x & (y ^ z));
    let g = |x: u32, y: u32, z: u32| (x & y).wrapping_add((x ^ y) & z);
    let h = |x: u32, y: u32, z: u32| x ^ y ^ z;
    let [mut a, mut b, mut c, mut d] = *buf;
    macro_rules! round {
        ($f:ident, $a:ident, $b:ident, $c:ident, $d:ident, $x:expr, $s:expr) => {
            $a = $a.wrapping_add($f($b, $c, $d)).wrapping_add($x);
            $a = $a.rotate_left($s);
        };
    }
    let i = input;
    round!(f, a, b, c, d, i[0], 3);
    round!(f, d, a, b, c, i[1], 7);
    round!(f, c, d, a, b, i[2], 11);
    round!(f, b, c, d, a, i[3], 19);
    round!(f, a, b, c, d, i[4], 3);
    round!(f, d, a, b, c, i[5], 7);
    round!(f, c, d, a, b, i[6], 11);
    round!(f, b, c, d, a, i[7], 19);
    round!(g, a, b, c, d, i[1].wrapping_add(K2), 3);
    round!(g, d, a, b, c, i[3].wrapping_add(K2), 5);
    round!(g, c, d, a, b, i[5].wrapping_add(K2), 9);
    round!(g, b, c, d, a, i[7].wrapping_add(K2), 13);
    round!(g, a, b, c, d, i[0].wrapping_add(K2), 3);
    round!(g, d, a, b, c, i[2].wrapping_add(K2), 5);
    round!(g, c, d, a, b, i[4].wrapping_add(K2), 9);
    round!(g, b, c, d, a, i[6].wrapping_add(K2), 13);
    round!(h, a, b, c, d, i[3].wrapping_add(K3), 3);
    round!(h, d, a, b, c, i[7].wrapping_add(K3), 9);
    round!(h, c, d, a, b, i[2].wrapping_add(K3), 11);
    round!(h, b, c, d, a, i[6].wrapping_add(K3), 15);
    round!(h, a, b, c, d, i[1].wrapping_add(K3), 3);
    round!(h, d, a, b, c, i[5].wrapping_add(K3), 9);
    round!(h, c, d, a, b, i[0].wrapping_add(K3), 11);
    round!(h, b, c, d, a, i[4].wrapping_add(K3), 15);
    buf[0] = buf[0].wrapping_add(a);
    buf[1] = buf[1].wrapping_add(b);
    buf[2] = buf[2].wrapping_add(c);
    buf[3] = buf[3].wrapping_add(d);
}

/// The kernel's `str2hashbuf_signed`: up to `num` words of `msg`, padded with the length.
fn str2hashbuf(msg: &[u8], num: usize) -> [u32; 8] {
    let len = msg.len() as u32;
    let mut pad = len | (len << 8);
    pad |= pad << 16;
    let mut out = [pad; 8];
    let mut val = pad;
    let mut k = 0;
    for (i, &c) in msg.iter().take(num * 4).enumerate() {
        val = (c as i8 as i32 as u32).wrapping_add(val << 8);
        if i % 4 == 3 {
            out[k] = val;
            k += 1;
            val = pad;
        }
    }
    if k < num {
        out[k] = val;
    }
    out
}

/// The directory hash of `name` (half-MD4, signed chars), low bit clear.
pub fn name_hash(name: &[u8], seed: &[u32; 4]) -> u32 {
    let mut buf = if seed.iter().any(|&s| s != 0) {
        *seed
    } else {
        [0x6745_2301, 0xefcd_ab89, 0x98ba_dcfe, 0x1032_5476]
    };
    let mut p = name;
    loop {
        let input = str2hashbuf(p, 8);
        half_md4(&mut buf, &input);
        if p.len() <= 32 {
            break;
        }
        p = &p[32..];
    }
    let mut hash = buf[1] & !1;
    if hash == 0x7fff_ffff << 1 {
        hash = (0x7fff_ffff - 1) << 1;
    }
    hash
}

/// Blocks of an indexed directory: a root block, then leaves. `None` when the entries
/// need more leaves than one index level holds.
pub fn build(
    dot: u32,
    dotdot: u32,
    entries: &[Dirent],
    hash_seed: &[u32; 4],
    csum_seed: Option<u32>,
    bs: usize,
) -> Option<Vec<Vec<u8>>> {
    let mut hashed: Vec<(u32, &Dirent)> = entries
        .iter()
        .map(|e| (name_hash(&e.0, hash_seed), e))
        .collect();
    hashed.sort_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1 .0.cmp(&b.1 .0)));
    let usable = if csum_seed.is_some() { bs - 12 } else { bs };
    // Fill leaves in hash order; each leaf starts at an index hash.
    let mut leaves: Vec<(u32, Vec<Dirent>)> = Vec::new();
    let mut used = usize::MAX;
    let mut last_hash = 0;
    for (h, e) in hashed {
        let len = (8 + e.0.len() + 3) & !3;
        if used.saturating_add(len) > usable {
            // A hash that continues from the previous leaf carries the collision bit.
            let start = if leaves.is_empty() {
                0
            } else if h == last_hash {
                h | 1
            } else {
                h
            };
            leaves.push((start, Vec::new()));
            used = 0;
        }
        used += len;
        last_hash = h;
        leaves.last_mut().expect("a leaf").1.push(e.clone());
    }
    let tail = if csum_seed.is_some() { 8 } else { 0 };
    let limit = (bs - 32 - tail) / 8;
    if leaves.len() > limit {
        return None;
    }
    let mut root = vec![0u8; bs];
    let put16 = |b: &mut [u8], o: usize, v: u16| b[o..o + 2].copy_from_slice(&v.to_le_bytes());
    let put32 = |b: &mut [u8], o: usize, v: u32| b[o..o + 4].copy_from_slice(&v.to_le_bytes());
    put32(&mut root, 0, dot);
    put16(&mut root, 4, 12);
    root[6] = 1;
    root[7] = 2;
    root[8] = b'.';
    put32(&mut root, 12, dotdot);
    put16(&mut root, 16, (bs - 12) as u16);
    root[18] = 2;
    root[19] = 2;
    root[20..22].copy_from_slice(b"..");
    // dx_root_info: reserved, hash version (half_md4), info length, levels, flags.
    root[28] = 1;
    root[29] = 8;
    put16(&mut root, 32, limit as u16);
    put16(&mut root, 34, leaves.len() as u16);
    for (i, (hash, _)) in leaves.iter().enumerate() {
        if i > 0 {
            put32(&mut root, 32 + 8 * i, *hash);
        }
        put32(&mut root, 36 + 8 * i, (i + 1) as u32);
    }
    if let Some(seed) = csum_seed {
        let size = 32 + leaves.len() * 8;
        let t = 32 + limit * 8;
        // Over the header and entries, then the tail with its checksum field still zero.
        let crc = crc32c_raw(seed, &root[..size]);
        let crc = crc32c_raw(crc, &root[t..t + 8]);
        put32(&mut root, t + 4, crc);
    }
    let mut blocks = vec![root];
    for (_, es) in leaves {
        let mut b = encode::dir_data(&es, csum_seed, bs);
        debug_assert_eq!(b.len(), 1, "a leaf fits one block");
        blocks.push(b.remove(0));
    }
    Some(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_deterministic_and_even() {
        let seed = [1, 2, 3, 4];
        let a = name_hash(b"hello", &seed);
        assert_eq!(a, name_hash(b"hello", &seed));
        assert_ne!(a, name_hash(b"hellp", &seed));
        assert_eq!(a & 1, 0);
        // Names longer than 32 bytes go through more than one round.
        let long = [b'x'; 100];
        assert_ne!(name_hash(&long, &seed), name_hash(&long[..99], &seed));
    }
}
