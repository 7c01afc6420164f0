//! What the engine stores an image in: five small methods, so that a file, an in-memory
//! buffer (fuzzing, tests) and a fault-injecting wrapper (crash tests) are all trivial.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Byte storage under a qcow2 image or a raw backing file.
#[allow(clippy::len_without_is_empty)] // a length that can fail has no useful is_empty
pub trait Storage: Send + std::fmt::Debug {
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Fill `buf` from `offset`; bytes beyond the end read as zeros.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Write all of `buf` at `offset`, extending the storage if needed.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Truncate or extend to `len` bytes.
    fn set_len(&mut self, len: u64) -> io::Result<()>;
    /// Make everything written so far durable.
    fn sync(&mut self) -> io::Result<()>;
}

impl Storage for File {
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match FileExt::read_at(self, &mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.sync_data()
    }
}

/// An image held in memory.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct MemStorage {
    /// The bytes.
    pub data: Vec<u8>,
}

impl MemStorage {
    /// Storage over these bytes.
    pub fn new(data: Vec<u8>) -> Self {
        Self { data }
    }
}

fn mem_end(offset: u64, len: usize) -> io::Result<usize> {
    usize::try_from(offset)
        .ok()
        .and_then(|o| o.checked_add(len))
        .filter(|&end| end <= isize::MAX as usize)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))
}

impl Storage for MemStorage {
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.len() as u64)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        buf.fill(0);
        if let Ok(start) = usize::try_from(offset) {
            if start < self.data.len() {
                let n = buf.len().min(self.data.len() - start);
                buf[..n].copy_from_slice(&self.data[start..start + n]);
            }
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = mem_end(offset, buf.len())?;
        if end > self.data.len() {
            self.data.resize(end, 0);
        }
        self.data[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let end = mem_end(len, 0)?;
        self.data.resize(end, 0);
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<S: Storage + ?Sized> Storage for Box<S> {
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_at(buf, offset)
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn sync(&mut self) -> io::Result<()> {
        (**self).sync()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_storage_reads_zeros_past_end_and_grows_on_write() {
        let mut s = MemStorage::new(vec![1, 2, 3]);
        let mut buf = [9u8; 5];
        s.read_at(&mut buf, 1).unwrap();
        assert_eq!(buf, [2, 3, 0, 0, 0]);
        s.write_at(&[7, 7], 5).unwrap();
        assert_eq!(s.data, vec![1, 2, 3, 0, 0, 7, 7]);
        assert!(s.write_at(&[1], u64::MAX).is_err());
    }
}
