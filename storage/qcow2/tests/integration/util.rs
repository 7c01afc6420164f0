//! Helpers shared by the integration tests.

use std::io;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use boxlet_qcow2::{Qcow2, Storage};

/// Run a QEMU tool; panic with its output if it cannot start.
pub fn run(tool: &str, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{tool} not runnable ({e}); run `make setup`"))
}

/// Run a QEMU tool and require success.
pub fn run_ok(tool: &str, args: &[&str]) -> String {
    let out = run(tool, args);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `qemu-img check` must report neither errors nor leaks.
pub fn qemu_check_clean(path: &Path) {
    let p = path.to_str().unwrap();
    let out = run("qemu-img", &["check", p]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "qemu-img check {p}: {text}"
    );
}

/// The whole virtual disk of `path` as read by boxlet.
pub fn export(path: &Path) -> Vec<u8> {
    let mut img = Qcow2::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    read_all(&mut img)
}

/// The whole virtual disk of an open image.
pub fn read_all(img: &mut Qcow2) -> Vec<u8> {
    let mut buf = vec![0u8; img.virtual_size() as usize];
    img.read_at(&mut buf, 0).unwrap();
    buf
}

/// The whole disk as `qemu-img convert -O raw` sees it.
pub fn qemu_export(path: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("qemu-export.raw");
    let _ = std::fs::remove_file(&out);
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            path.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
    );
    std::fs::read(out).unwrap()
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// In-memory storage whose bytes the test can still see after handing it to an image.
#[derive(Debug, Clone, Default)]
pub struct SharedMem(pub Arc<Mutex<Vec<u8>>>);

impl SharedMem {
    pub fn new(data: Vec<u8>) -> Self {
        Self(Arc::new(Mutex::new(data)))
    }

    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

impl Storage for SharedMem {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.lock().unwrap().len() as u64)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let d = self.0.lock().unwrap();
        buf.fill(0);
        let start = (offset as usize).min(d.len());
        let n = buf.len().min(d.len() - start);
        buf[..n].copy_from_slice(&d[start..start + n]);
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        let end = offset as usize + buf.len();
        if end > d.len() {
            d.resize(end, 0);
        }
        d[offset as usize..end].copy_from_slice(buf);
        Ok(())
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.lock().unwrap().resize(len as usize, 0);
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}
