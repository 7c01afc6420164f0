//! Little-endian field readers over byte slices whose length the caller has checked.

#[track_caller]
pub fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

#[track_caller]
pub fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().expect("4 bytes"))
}

/// A 64-bit value split in a low u32 at `lo` and a high u32 at `hi` (if the structure
/// has it).
#[track_caller]
pub fn lo_hi(b: &[u8], lo: usize, hi: Option<usize>) -> u64 {
    u64::from(le32(b, lo)) | hi.map_or(0, |h| u64::from(le32(b, h)) << 32)
}
