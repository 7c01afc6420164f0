//! Shared by the device-model tests: a virtqueue as a driver lays it out.
#![allow(dead_code)] // each test crate uses its own part

use boxlet_kvm::virtio::mmio::MmioTransport;
use std::path::Path;

use boxlet::hypervisor::VmSpec;
use boxlet::initramfs::Initramfs;
use boxlet_kvm::KvmBackend;
use boxlet_testkit as kit;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const NEXT: u16 = 1;
const WRITE: u16 = 2;

/// A split virtqueue of 16 entries laid out as a driver would: the descriptor table, the
/// available ring (then `used_event`) and the used ring (then `avail_event`), a page each.
pub struct Ring<'a> {
    m: &'a GuestMemoryMmap,
    base: u64,
}

impl<'a> Ring<'a> {
    pub const SIZE: u16 = 16;

    pub fn new(m: &'a GuestMemoryMmap, base: u64) -> Self {
        m.write_slice(&[0u8; 0x3000], GuestAddress(base)).unwrap();
        Self { m, base }
    }

    pub fn addrs(&self) -> (u64, u64, u64) {
        (self.base, self.base + 0x1000, self.base + 0x2000)
    }

    fn u16_at(&self, at: u64) -> u16 {
        self.m.read_obj(GuestAddress(at)).unwrap()
    }

    /// Chain `descs` (address, length, device-writable) from descriptor `slot` on and
    /// make it available.
    pub fn push(&self, slot: u16, descs: &[(u64, u32, bool)]) {
        for (i, &(addr, len, writable)) in descs.iter().enumerate() {
            let idx = slot + i as u16;
            let last = i + 1 == descs.len();
            let flags = if writable { WRITE } else { 0 } | if last { 0 } else { NEXT };
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..].copy_from_slice(&(if last { 0 } else { idx + 1 }).to_le_bytes());
            self.m
                .write_slice(&d, GuestAddress(self.base + 16 * u64::from(idx)))
                .unwrap();
        }
        let avail = self.base + 0x1000;
        let idx = self.u16_at(avail + 2);
        let entry = avail + 4 + 2 * u64::from(idx % Self::SIZE);
        self.m.write_obj(slot, GuestAddress(entry)).unwrap();
        self.m
            .write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
            .unwrap();
    }

    /// With EVENT_IDX: interrupt me once the used index passes `idx`.
    pub fn set_used_event(&self, idx: u16) {
        let at = self.base + 0x1000 + 4 + 2 * u64::from(Self::SIZE);
        self.m.write_obj(idx, GuestAddress(at)).unwrap();
    }

    pub fn used_idx(&self) -> u16 {
        self.u16_at(self.base + 0x2000 + 2)
    }

    /// Where the device asks to be notified next (EVENT_IDX's `avail_event`).
    pub fn avail_event(&self) -> u16 {
        self.u16_at(self.base + 0x2000 + 4 + 8 * u64::from(Self::SIZE))
    }

    /// (descriptor id, length) of used entry `i`.
    pub fn used(&self, i: u16) -> (u32, u32) {
        let at = self.base + 0x2000 + 4 + 8 * u64::from(i % Self::SIZE);
        let id: u32 = self.m.read_obj(GuestAddress(at)).unwrap();
        let len: u32 = self.m.read_obj(GuestAddress(at + 4)).unwrap();
        (id, len)
    }
}

/// A driver's 32-bit register read at `off` in the device's window.
pub fn reg(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// A driver's 32-bit register write.
pub fn set(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// The VMM under test, found beside the test executables.
pub fn backend() -> KvmBackend {
    kit::helper_beside_tests("BOXLET_VMM", "boxlet-vmm");
    KvmBackend::without_probe().unwrap()
}

/// A VM whose init is `script` (run by busybox sh from an initramfs).
pub fn spec(dir: &Path, script: &str, vcpus: u8) -> VmSpec {
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static (make setup)");
    let mut i = Initramfs::new();
    i.dir("bin", 0o755)
        .file("bin/busybox", 0o755, &busybox)
        .dir("dev", 0o755)
        .char_dev("dev/console", 0o600, 5, 1)
        .file(
            "init",
            0o755,
            format!("#!/bin/busybox sh\n{script}\n").as_bytes(),
        );
    let initrd = dir.join("initrd.cpio");
    std::fs::write(&initrd, i.finish()).unwrap();
    VmSpec {
        name: "l2".into(),
        vcpus,
        memory_mib: 256,
        kernel: kit::kernel(),
        initrd: Some(initrd),
        // Not quiet: a failure shows how far the boot got.
        cmdline: "console=ttyS0 reboot=t panic=-1 8250.nr_uarts=1 rdinit=/init".into(),
        disks: Vec::new(),
        shares: Vec::new(),
        vsock: None,
        console_log: dir.join("console.log"),
        run_dir: dir.to_path_buf(),
        limits: Default::default(),
    }
}

/// A VM that sleeps is still running after two seconds, and stops when asked.
pub async fn runs_until_stopped(hv: &KvmBackend, dir: &Path) {
    use boxlet::hypervisor::{Hypervisor, VmExit};
    let mut vm = hv
        .create(spec(dir, "while :; do /bin/busybox sleep 1; done", 1))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(
        vm.stop(std::time::Duration::from_secs(1)).await.unwrap(),
        VmExit::Stopped
    );
}
