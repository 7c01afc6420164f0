//! Checksums of ext4 metadata: crc32c as the kernel computes it (no final inversion,
//! seeded per filesystem and per inode), and crc16 for the older gdt_csum feature.

/// The kernel's `ext4_chksum`: crc32c continuing from `crc`, without pre/post inversion.
pub fn crc32c_raw(crc: u32, data: &[u8]) -> u32 {
    // The crate inverts on entry and exit; undo both.
    !crc32c::crc32c_append(!crc, data)
}

/// crc16 (poly 0x8005, reflected: 0xA001), as `ext4_group_desc_csum` uses for gdt_csum.
pub fn crc16(mut crc: u16, data: &[u8]) -> u16 {
    for &b in data {
        crc ^= u16::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xa001
            } else {
                crc >> 1
            };
        }
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_crc32c_continues_like_the_kernel() {
        // Standard CRC32C check value, expressed through the raw form.
        assert_eq!(!crc32c_raw(!0, b"123456789"), 0xe306_9283);
        let whole = crc32c_raw(!0, b"hello world");
        let split = crc32c_raw(crc32c_raw(!0, b"hello "), b"world");
        assert_eq!(whole, split);
    }

    #[test]
    fn crc16_check_value() {
        // CRC-16/ARC of "123456789".
        assert_eq!(crc16(0, b"123456789"), 0xbb3d);
    }
}
