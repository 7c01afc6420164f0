//! A reader that follows the structure of the tar stream passing through it and stops
//! metadata records (GNU long names and links, PAX headers) larger than a cap before the
//! tar parser reads them into memory: the `tar` crate buffers those records whole, so a
//! small compressed layer could otherwise make it allocate gigabytes.
//!
//! It tracks header positions the way the parser does: each header is followed by its
//! data rounded up to 512 bytes, a PAX `size` overrides the size of the next member, and
//! GNU sparse headers may be followed by extension blocks. If the stream stops looking
//! like tar (a bad header checksum), the guard stands aside and the parser reports it.

use std::io::{self, Read};

const BLOCK: u64 = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// A member header at `next`.
    Header,
    /// A GNU sparse extension block at `next`, then the member's data of `size` bytes.
    SparseExt { size: u64 },
    /// Lost track (not tar): pass everything through.
    Off,
}

/// The guard around a decompressed layer.
pub struct TarGuard<R> {
    inner: R,
    cap: u64,
    pos: u64,
    next: u64,
    expect: Expect,
    block: Vec<u8>,
    /// Data of a PAX header being collected: (start, end, bytes).
    pax: Option<(u64, u64, Vec<u8>)>,
    pax_size: Option<u64>,
}

impl<R> std::fmt::Debug for TarGuard<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TarGuard")
            .field("cap", &self.cap)
            .field("pos", &self.pos)
            .finish_non_exhaustive()
    }
}

impl<R: Read> TarGuard<R> {
    /// Guard the tar stream `inner`, refusing metadata records over `cap` bytes.
    pub fn new(inner: R, cap: u64) -> Self {
        Self {
            inner,
            cap,
            pos: 0,
            next: 0,
            expect: Expect::Header,
            block: Vec::with_capacity(BLOCK as usize),
            pax: None,
            pax_size: None,
        }
    }

    fn observe(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() && self.expect != Expect::Off {
            if self.pos < self.next {
                let n = (self.next - self.pos).min(data.len() as u64) as usize;
                if let Some((start, end, buf)) = &mut self.pax {
                    let from = self.pos.max(*start);
                    let to = (self.pos + n as u64).min(*end);
                    if from < to {
                        let a = (from - self.pos) as usize;
                        let b = (to - self.pos) as usize;
                        buf.extend_from_slice(&data[a..b]);
                    }
                }
                self.pos += n as u64;
                data = &data[n..];
                continue;
            }
            if let Some((_, _, buf)) = self.pax.take() {
                self.pax_size = pax_value(&buf, "size");
            }
            let n = (BLOCK as usize - self.block.len()).min(data.len());
            self.block.extend_from_slice(&data[..n]);
            self.pos += n as u64;
            data = &data[n..];
            if self.block.len() == BLOCK as usize {
                let block = std::mem::take(&mut self.block);
                self.on_block(&block)?;
                self.block = block;
                self.block.clear();
            }
        }
        Ok(())
    }

    fn on_block(&mut self, h: &[u8]) -> io::Result<()> {
        let start = self.pos;
        if let Expect::SparseExt { size } = self.expect {
            if h[504] != 0 {
                self.next = start;
            } else {
                self.next = advance(start, size)?;
                self.expect = Expect::Header;
            }
            return Ok(());
        }
        if h.iter().all(|&b| b == 0) {
            self.next = start;
            return Ok(());
        }
        let sum: u32 = h[..148]
            .iter()
            .chain(&h[156..])
            .map(|&b| u32::from(b))
            .sum::<u32>()
            + 8 * 32;
        if parse_number(&h[148..156]) != Some(u64::from(sum)) {
            self.expect = Expect::Off;
            return Ok(());
        }
        let Some(mut size) = parse_number(&h[124..136]) else {
            self.expect = Expect::Off;
            return Ok(());
        };
        match h[156] {
            kind @ (b'L' | b'K' | b'x') => {
                if size > self.cap {
                    let what = match kind {
                        b'L' => "long name",
                        b'K' => "long link name",
                        _ => "PAX header",
                    };
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "a tar {what} record of {size} bytes (at most {} accepted)",
                            self.cap
                        ),
                    ));
                }
                if kind == b'x' {
                    self.pax = Some((start, start + size, Vec::new()));
                }
            }
            b'g' => self.pax_size = None,
            kind => {
                if let Some(s) = self.pax_size.take() {
                    size = s;
                }
                // An old GNU sparse header with more sparse entries after it.
                if kind == b'S' && h[482] != 0 {
                    self.expect = Expect::SparseExt { size };
                    self.next = start;
                    return Ok(());
                }
            }
        }
        self.next = advance(start, size)?;
        Ok(())
    }
}

impl<R: Read> Read for TarGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.observe(&buf[..n])?;
        Ok(n)
    }
}

/// Where the next header is: after `size` bytes of data from `start`, in whole blocks.
fn advance(start: u64, size: u64) -> io::Result<u64> {
    size.checked_add(BLOCK - 1)
        .and_then(|s| start.checked_add(s & !(BLOCK - 1)))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "tar member size overflows"))
}

/// A tar numeric field: octal (space or NUL padded) or GNU base-256.
fn parse_number(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        let mut v: u64 = u64::from(field[0] & 0x7f);
        for &b in &field[1..] {
            v = v.checked_mul(256)?.checked_add(u64::from(b))?;
        }
        return Some(v);
    }
    let s = std::str::from_utf8(field).ok()?;
    let s = s.trim_matches(|c| c == ' ' || c == '\0');
    if s.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(s, 8).ok()
}

/// The value of `key` in PAX records (`"<len> <key>=<value>\n"`).
fn pax_value(mut data: &[u8], key: &str) -> Option<u64> {
    let mut found = None;
    while !data.is_empty() {
        let sp = data.iter().position(|&b| b == b' ')?;
        let len: usize = std::str::from_utf8(&data[..sp]).ok()?.parse().ok()?;
        if len <= sp || len > data.len() {
            return found;
        }
        let rec = &data[sp + 1..len];
        let rec = rec.strip_suffix(b"\n").unwrap_or(rec);
        if let Some(v) = rec
            .strip_prefix(key.as_bytes())
            .and_then(|r| r.strip_prefix(b"="))
        {
            found = std::str::from_utf8(v).ok().and_then(|v| v.parse().ok());
        }
        data = &data[len..];
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(builder: &mut tar::Builder<Vec<u8>>, name: &str, data: &[u8]) {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut h, name, data).unwrap();
    }

    fn names(bytes: &[u8], cap: u64) -> io::Result<Vec<String>> {
        let mut ar = tar::Archive::new(TarGuard::new(bytes, cap));
        let mut out = Vec::new();
        for e in ar.entries()? {
            let mut e = e?;
            out.push(String::from_utf8_lossy(&e.path_bytes()).into_owned());
            io::copy(&mut e, &mut io::sink())?;
        }
        Ok(out)
    }

    #[test]
    fn ordinary_archives_pass_untouched() {
        let mut b = tar::Builder::new(Vec::new());
        member(&mut b, "a", b"hello");
        let long = "d/".repeat(200) + "file";
        member(&mut b, &long, &vec![7u8; 3000]);
        member(&mut b, "c", b"");
        let bytes = b.into_inner().unwrap();
        assert_eq!(
            names(&bytes, 4096).unwrap(),
            vec!["a".to_string(), long, "c".into()]
        );
    }

    #[test]
    fn a_long_name_over_the_cap_is_refused_before_it_is_read() {
        let mut b = tar::Builder::new(Vec::new());
        member(&mut b, "a", b"x");
        let long = "n".repeat(5000);
        member(&mut b, &long, b"y");
        let bytes = b.into_inner().unwrap();
        let err = names(&bytes, 4096).unwrap_err();
        assert!(
            err.to_string().contains("long name record of 5001 bytes"),
            "{err}"
        );
        assert_eq!(names(&bytes, 8192).unwrap().len(), 2);
    }

    /// A PAX header whose `size` overrides the member's: the guard must follow it to
    /// find the next header, or it would miss the oversized record behind it.
    #[test]
    fn pax_sizes_are_followed() {
        let mut b = tar::Builder::new(Vec::new());
        let data = vec![1u8; 2000];
        b.append_pax_extensions([("size", b"2000".as_slice())])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(0); // the PAX size is the real one
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_path("big").unwrap();
        h.set_cksum();
        b.append(&h, &data[..]).unwrap();
        let xattr = vec![b'v'; 6000];
        b.append_pax_extensions([("SCHILY.xattr.user.x", xattr.as_slice())])
            .unwrap();
        member(&mut b, "after", b"z");
        let bytes = b.into_inner().unwrap();
        let err = names(&bytes, 4096).unwrap_err();
        assert!(err.to_string().contains("PAX header record"), "{err}");
        assert_eq!(names(&bytes, 1 << 20).unwrap(), vec!["big", "after"]);
    }

    #[test]
    fn numbers_in_both_encodings() {
        assert_eq!(parse_number(b"00000001750\0"), Some(0o1750));
        assert_eq!(parse_number(b"     17 \0"), Some(0o17));
        let mut b256 = [0u8; 12];
        b256[0] = 0x80;
        b256[11] = 5;
        b256[10] = 1;
        assert_eq!(parse_number(&b256), Some(261));
        assert_eq!(parse_number(b"zz\0"), None);
        assert_eq!(pax_value(b"11 size=42\n9 a=bcd\n", "size"), Some(42));
        assert_eq!(pax_value(b"99 size=42\n", "size"), None);
    }
}
