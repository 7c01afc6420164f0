//! The VMM proper: one process per VM (the `boxlet-vmm` binary runs [`run`]).
//!
//! Guest memory is a memfd (shareable with vhost-user daemons), the kernel an ELF vmlinux
//! entered through its PVH note in 32-bit protected mode (no firmware, no decompressor),
//! interrupts and timers are KVM's in-kernel irqchip and PIT, the console a 16550 UART
//! (vm-superio) on port 0x3f8 written to stdout. A guest reset (triple fault with
//! `reboot=t`, or the i8042 reset line, see [`crate::i8042`]) ends the VM: the process
//! exits 0.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use boxlet::VmSpec;
use kvm_bindings::{
    kvm_fpu, kvm_pit_config, kvm_regs, kvm_segment, kvm_sregs, CpuId, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuExit, VcpuFd, VmFd};
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap,
    GuestMemoryRegion,
};
use vm_superio::{Serial, Trigger};

use crate::i8042::{self, I8042};
use crate::kernel_image;
use crate::mptable;
use crate::seccomp::{self, Role};
use crate::virtio::block::{Block, Disk, Qcow2Disk, RawDisk};
use crate::virtio::fs::Fs;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::vsock::Vsock;
use crate::virtio::VirtioDevice;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

/// Why the VMM stopped, or could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmmError {
    /// A KVM ioctl failed.
    #[error("kvm: {what}: {source}")]
    Kvm {
        /// The operation.
        what: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be set up.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The kernel could not be loaded.
    #[error("kernel {path}: {msg}")]
    Kernel {
        /// The kernel file.
        path: String,
        /// Why.
        msg: String,
    },
    /// A device could not be set up.
    #[error("{0}")]
    Device(String),
    /// A vCPU stopped on something the VMM cannot handle.
    #[error("vcpu {0}: {1}")]
    Vcpu(usize, String),
    /// Host I/O.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::Kvm { what, source }
}

// Guest physical layout (below 1 MiB: boot structures; the kernel loads itself at 16 MiB).
const GDT_ADDR: u64 = 0x500;
const START_INFO_ADDR: u64 = 0x6000;
const MODLIST_ADDR: u64 = 0x6800;
const MEMMAP_ADDR: u64 = 0x7000;
const CMDLINE_ADDR: u64 = 0x20000;
const CMDLINE_MAX: usize = 4096;
/// Start of the BIOS area the memory map leaves out (as PCs have it).
const EBDA_START: u64 = 0x9fc00;
const HIGH_RAM_START: u64 = kernel_image::LOAD_FROM;
/// The largest guest RAM this layout supports (one region below the 32-bit MMIO hole).
const MAX_RAM: u64 = 0xc000_0000;

/// virtio-mmio windows: one 4 KiB page each from here, interrupts from GSI 5.
const MMIO_BASE: u64 = 0xd000_0000;
const MMIO_SIZE: u64 = 0x1000;
const MMIO_FIRST_IRQ: u32 = 5;
/// Legacy interrupt lines 5-15 minus the serial's: room for this many devices.
const MAX_MMIO_DEVICES: usize = 10;

const SERIAL_PORT: u16 = 0x3f8;
const SERIAL_IRQ: u32 = 4;
/// Kernel parameters for our i8042 (as Firecracker passes them): no mouse port, no
/// multiplexer, no PnP probe, and a keyboard port not to be talked to.
const I8042_PARAMS: &str = " i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd";

/// A memfd of `bytes` for guest RAM.
pub(crate) fn ram_file(bytes: u64) -> Result<File, VmmError> {
    let fd =
        nix::sys::memfd::memfd_create(c"boxlet-guest-ram", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
            .map_err(|e| VmmError::Memory(format!("memfd_create: {e}")))?;
    let file = File::from(fd);
    file.set_len(bytes)?;
    Ok(file)
}

/// Whether `bytes` of guest RAM is a size this VMM runs.
fn check_ram(bytes: u64) -> Result<(), VmmError> {
    if !(64 << 20..=MAX_RAM).contains(&bytes) {
        return Err(VmmError::Memory(format!(
            "{} MiB: from 64 MiB to {} MiB",
            bytes >> 20,
            MAX_RAM >> 20
        )));
    }
    Ok(())
}

/// Guest RAM backed by a memfd, so vhost-user daemons can map it too.
pub fn guest_memory(bytes: u64) -> Result<GuestMemoryMmap, VmmError> {
    check_ram(bytes)?;
    let file = ram_file(bytes)?;
    GuestMemoryMmap::from_ranges_with_files(&[(
        GuestAddress(0),
        bytes as usize,
        Some(FileOffset::new(file, 0)),
    )])
    .map_err(|e| VmmError::Memory(e.to_string()))
}

/// A serial interrupt line: an eventfd registered as KVM irqfd for the UART's GSI.
struct IrqLine(EventFd);

impl Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// Console output: the VMM's stdout, flushed at every byte the guest writes (it is a
/// pipe the backend reads, or a terminal).
struct Console;

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut o = std::io::stdout().lock();
        o.write_all(buf)?;
        o.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stdout().lock().flush()
    }
}

/// Devices on the port I/O bus.
struct PortBus {
    serial: Serial<IrqLine, vm_superio::serial::NoEvents, Console>,
    i8042: I8042,
}

/// What a vCPU exit asks of the VMM.
enum Next {
    Continue,
    /// The guest reset or shut down: the VM is over.
    End,
}

impl PortBus {
    fn read(&mut self, port: u16, data: &mut [u8]) {
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) && data.len() == 1 => {
                data[0] = self.serial.read((p - SERIAL_PORT) as u8);
            }
            i8042::DATA_PORT | i8042::COMMAND_PORT if data.len() == 1 => {
                data[0] = self.i8042.read(port);
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, port: u16, data: &[u8]) -> Next {
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) && data.len() == 1 => {
                // A full output pipe or a failed interrupt only loses console bytes.
                let _ = self.serial.write((p - SERIAL_PORT) as u8, data[0]);
            }
            i8042::DATA_PORT | i8042::COMMAND_PORT
                if data.len() == 1 && self.i8042.write(port, data[0]) == i8042::Effect::Reset =>
            {
                return Next::End;
            }
            _ => {}
        }
        Next::Continue
    }
}

/// Load the kernel (and initramfs) and write the PVH start info; returns the entry point.
fn load_kernel(
    mem: &GuestMemoryMmap,
    spec: &VmSpec,
    cmdline: &str,
    image: Option<&kernel_image::Image>,
) -> Result<u64, VmmError> {
    let kerr = |msg: String| VmmError::Kernel {
        path: spec.kernel.display().to_string(),
        msg,
    };
    // Mapped already (zero-copy), or copied in now.
    let (entry, kernel_end) = match image {
        Some(i) => (i.entry, i.kernel_end),
        None => {
            let mut f = File::open(&spec.kernel).map_err(|e| kerr(e.to_string()))?;
            let loaded = Elf::load(mem, None, &mut f, Some(GuestAddress(HIGH_RAM_START)))
                .map_err(|e| kerr(format!("not an ELF vmlinux: {e}")))?;
            match loaded.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => (addr.raw_value(), loaded.kernel_end),
                _ => return Err(kerr("no PVH entry note (CONFIG_PVH)".into())),
            }
        }
    };
    if cmdline.len() + 1 > CMDLINE_MAX {
        return Err(kerr(format!("command line of {} bytes", cmdline.len())));
    }
    let mut c = cmdline.as_bytes().to_vec();
    c.push(0);
    mem.write_slice(&c, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| kerr(format!("writing the command line: {e}")))?;

    let ram_end = mem.last_addr().raw_value() + 1;
    let mut start = hvm_start_info {
        magic: linux_loader::loader::elf::start_info::XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: 2,
        ..Default::default()
    };
    // The initramfs goes at the top of RAM, page aligned.
    if let Some(initrd) = &spec.initrd {
        let data = std::fs::read(initrd).map_err(|e| VmmError::Kernel {
            path: initrd.display().to_string(),
            msg: e.to_string(),
        })?;
        let size = data.len() as u64;
        let addr = (ram_end - size) & !0xfff;
        if addr < kernel_end {
            return Err(VmmError::Memory(format!(
                "an initramfs of {size} bytes does not fit beside the kernel"
            )));
        }
        mem.write_slice(&data, GuestAddress(addr))
            .map_err(|e| VmmError::Memory(e.to_string()))?;
        let module = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        mem.write_obj(module, GuestAddress(MODLIST_ADDR))
            .map_err(|e| VmmError::Memory(e.to_string()))?;
        start.nr_modules = 1;
        start.modlist_paddr = MODLIST_ADDR;
    }
    let memmap = [
        hvm_memmap_table_entry {
            addr: 0,
            size: EBDA_START,
            type_: 1,
            ..Default::default()
        },
        hvm_memmap_table_entry {
            addr: HIGH_RAM_START,
            size: ram_end - HIGH_RAM_START,
            type_: 1,
            ..Default::default()
        },
    ];
    let mut params = BootParams::new::<hvm_start_info>(&start, GuestAddress(START_INFO_ADDR));
    params.set_sections::<hvm_memmap_table_entry>(&memmap, GuestAddress(MEMMAP_ADDR));
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)
        .map_err(|e| kerr(format!("writing the PVH start info: {e}")))?;
    Ok(entry)
}

/// A flat 4 GiB segment: 32-bit, or 64-bit code when `long`.
fn segment(selector: u16, type_: u8, long: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: u8::from(!long),
        s: 1,
        l: u8::from(long),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Load flat segments: code at GDT selector 0x08 (64-bit when `long`), data at 0x10 in
/// every data segment register. Returns the data segment.
pub(crate) fn flat_segments(sregs: &mut kvm_sregs, long: bool) -> kvm_segment {
    sregs.cs = segment(0x08, 0xb, long);
    let data = segment(0x10, 0x3, false);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    data
}

/// Registers for the PVH entry: 32-bit protected mode, paging off, EBX = start info.
fn setup_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    index: usize,
    count: usize,
    cpuid: &CpuId,
    entry: u64,
) -> Result<(), VmmError> {
    // CPUID as KVM supports it, with this vCPU's APIC id and the hypervisor bit.
    let mut cpuid = cpuid.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | ((index as u32) << 24) | ((count as u32) << 16);
                e.ecx |= 1 << 31;
            }
            0xb => e.edx = index as u32,
            _ => {}
        }
    }
    vcpu.set_cpuid2(&cpuid).map_err(kvm_err("set_cpuid2"))?;
    set_lint(vcpu)?;
    if index > 0 {
        // The other vCPUs wait for the boot CPU's INIT and startup IPIs.
        return Ok(());
    }

    // A GDT with the segments the entry state describes (the kernel loads its own).
    let gdt: [u64; 4] = [
        0,
        0x00cf_9b00_0000_ffff, // code: 32-bit, 4 GiB, execute/read
        0x00cf_9300_0000_ffff, // data: 32-bit, 4 GiB, read/write
        0x008b_0000_0000_0067, // TSS
    ];
    for (i, d) in gdt.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(|e| VmmError::Memory(e.to_string()))?;
    }
    let mut sregs = vcpu.get_sregs().map_err(kvm_err("get_sregs"))?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    let data = flat_segments(&mut sregs, false);
    sregs.tr = kvm_segment {
        base: 0,
        limit: 0x67,
        selector: 0x18,
        type_: 0xb,
        present: 1,
        s: 0,
        db: 0,
        g: 0,
        ..data
    };
    sregs.cr0 = 0x1 | 0x10; // PE, ET
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs).map_err(kvm_err("set_sregs"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("set_fpu"))?;

    let regs = kvm_regs {
        rip: entry,
        rbx: START_INFO_ADDR,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("set_regs"))?;

    Ok(())
}

/// Local APIC: LINT0 delivers the PIC's interrupts (ExtINT), LINT1 NMIs, as the MP
/// table says.
fn set_lint(vcpu: &VcpuFd) -> Result<(), VmmError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm_err("get_lapic"))?;
    let set_lvt = |regs: &mut [std::os::raw::c_char], off: usize, mode: u32| {
        let mut v = [0u8; 4];
        for (i, b) in v.iter_mut().enumerate() {
            *b = regs[off + i] as u8;
        }
        let val = (u32::from_le_bytes(v) & !0x700) | (mode << 8);
        for (i, b) in val.to_le_bytes().iter().enumerate() {
            regs[off + i] = *b as std::os::raw::c_char;
        }
    };
    set_lvt(&mut lapic.regs, 0x350, 0x7);
    set_lvt(&mut lapic.regs, 0x360, 0x4);
    vcpu.set_lapic(&lapic).map_err(kvm_err("set_lapic"))?;
    Ok(())
}

/// The VM: memory, vCPUs, devices.
struct Machine {
    _kvm: Kvm,
    _vm: VmFd,
    _mem: GuestMemoryMmap,
    vcpus: Vec<VcpuFd>,
    ports: Arc<Mutex<PortBus>>,
    mmio: Arc<MmioBus>,
}

/// The virtio-mmio devices, each behind its own lock.
#[derive(Default)]
struct MmioBus {
    devices: Vec<Arc<Mutex<MmioTransport>>>,
    /// Per device, one ioeventfd per queue (KVM signals it when the guest writes that
    /// queue's index to the notify register).
    notifiers: Vec<Vec<EventFd>>,
}

impl MmioBus {
    fn find(&self, addr: u64) -> Option<(&Mutex<MmioTransport>, u64)> {
        let off = addr.checked_sub(MMIO_BASE)?;
        let i = usize::try_from(off / MMIO_SIZE).ok()?;
        self.devices.get(i).map(|d| (&**d, off % MMIO_SIZE))
    }

    fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((d, off)) => d.lock().unwrap_or_else(|e| e.into_inner()).read(off, data),
            None => data.fill(0xff),
        }
    }

    fn write(&self, addr: u64, data: &[u8]) {
        if let Some((d, off)) = self.find(addr) {
            d.lock().unwrap_or_else(|e| e.into_inner()).write(off, data);
        }
    }
}

/// Phase timings on stderr when `BOXLET_VMM_TIMINGS` is set.
fn phase(start: std::time::Instant, what: &str) {
    if std::env::var_os("BOXLET_VMM_TIMINGS").is_some() {
        eprintln!(
            "boxlet-vmm: {what}: {:.3} ms",
            start.elapsed().as_secs_f64() * 1000.0
        );
    }
}

/// The VM's virtio devices (disks, vsock, then directory shares) and their kernel command-line
/// announcements.
fn devices(vm: &VmFd, spec: &VmSpec, mem: &GuestMemoryMmap) -> Result<(MmioBus, String), VmmError> {
    let mut bus = MmioBus::default();
    let mut announce = String::new();
    let count = spec.disks.len() + usize::from(spec.vsock.is_some()) + spec.shares.len();
    if count > MAX_MMIO_DEVICES {
        return Err(VmmError::Device(format!(
            "{count} devices: at most {MAX_MMIO_DEVICES}"
        )));
    }
    let mut add = |dev: Box<dyn VirtioDevice>| -> Result<(), VmmError> {
        let i = bus.devices.len();
        let irq = EventFd::new(libc::EFD_NONBLOCK)?;
        let gsi = MMIO_FIRST_IRQ + i as u32;
        vm.register_irqfd(&irq, gsi)
            .map_err(kvm_err("register_irqfd"))?;
        let base = MMIO_BASE + i as u64 * MMIO_SIZE;
        let mut notifiers = Vec::new();
        for q in 0..dev.queue_max_sizes().len() {
            let evt = EventFd::new(libc::EFD_NONBLOCK)?;
            let at = IoEventAddress::Mmio(base + MmioTransport::NOTIFY_OFFSET);
            vm.register_ioevent(&evt, &at, q as u32)
                .map_err(kvm_err("register_ioevent"))?;
            notifiers.push(evt);
        }
        let kicks = if dev.external() {
            notifiers
                .iter()
                .map(EventFd::try_clone)
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        bus.notifiers.push(notifiers);
        bus.devices.push(Arc::new(Mutex::new(
            MmioTransport::new(dev, mem.clone(), irq).with_kicks(kicks),
        )));
        announce.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{gsi}"));
        Ok(())
    };
    for (i, d) in spec.disks.iter().enumerate() {
        let open = |e: std::io::Error| VmmError::Device(format!("disk {}: {e}", d.path.display()));
        let disk: Box<dyn Disk> = match d.format {
            boxlet::DiskFormat::Raw => Box::new(RawDisk::open(&d.path, d.read_only).map_err(open)?),
            boxlet::DiskFormat::Qcow2 => {
                Box::new(Qcow2Disk::open(&d.path, d.read_only).map_err(open)?)
            }
        };
        let id = format!("boxlet-vd{i}");
        add(Box::new(Block::new(disk, d.read_only, &id)))?;
    }
    if let Some(v) = &spec.vsock {
        let dev = Vsock::new(u64::from(v.cid), &v.uds_path)
            .map_err(|e| VmmError::Device(format!("vsock: {e}")))?;
        add(Box::new(dev))?;
    }
    for (i, share) in spec.shares.iter().enumerate() {
        let socket = boxlet::process::virtiofs_socket(&spec.run_dir, i);
        let dev = Fs::connect(&socket, &share.tag)
            .map_err(|e| VmmError::Device(format!("virtio-fs {:?}: {e}", share.tag)))?;
        add(Box::new(dev))?;
    }
    Ok((bus, announce))
}

fn build(spec: &VmSpec, cmdline: &str) -> Result<Machine, VmmError> {
    let t = std::time::Instant::now();
    let count = usize::from(spec.vcpus);
    if !(1..=mptable::MAX_VCPUS).contains(&count) {
        return Err(VmmError::Vcpu(
            0,
            format!("{count} vCPUs: from 1 to {}", mptable::MAX_VCPUS),
        ));
    }
    let kvm = Kvm::new().map_err(kvm_err("opening /dev/kvm"))?;
    let vm = kvm.create_vm().map_err(kvm_err("create_vm"))?;
    phase(t, "vm created");
    let bytes = u64::from(spec.memory_mib) << 20;
    check_ram(bytes)?;
    // The kernel mapped from its cached image (see `kernel_image::zero_copy`), else
    // copied into the memfd.
    let image = if kernel_image::zero_copy(spec) {
        match kernel_image::cached(&spec.kernel, kernel_image::LOAD_FROM) {
            Ok(i) => Some(i),
            Err(e) => {
                eprintln!(
                    "boxlet-vmm: {}: no kernel image ({e}): copying the kernel",
                    spec.kernel.display()
                );
                None
            }
        }
    } else {
        None
    };
    let mem = match &image {
        Some(i) => kernel_image::guest_memory(i, bytes).map_err(VmmError::Memory)?,
        None => guest_memory(bytes)?,
    };
    phase(t, "memory mapped");
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_bindings::kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping of `region.len()` bytes owned by `mem`,
        // which the vCPU threads keep alive for as long as the VM runs.
        unsafe { vm.set_user_memory_region(r) }.map_err(kvm_err("set_user_memory_region"))?;
    }
    vm.set_tss_address(0xfffb_d000)
        .map_err(kvm_err("set_tss_address"))?;
    vm.create_irq_chip().map_err(kvm_err("create_irq_chip"))?;
    let pit = kvm_pit_config {
        flags: kvm_bindings::KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("create_pit2"))?;

    let irq = EventFd::new(libc::EFD_NONBLOCK)?;
    vm.register_irqfd(&irq, SERIAL_IRQ)
        .map_err(kvm_err("register_irqfd"))?;
    let ports = Arc::new(Mutex::new(PortBus {
        serial: Serial::new(IrqLine(irq), Console),
        i8042: I8042::default(),
    }));

    let (mmio, announce) = devices(&vm, spec, &mem)?;
    phase(t, "devices");
    let cmdline = format!("{cmdline}{I8042_PARAMS}{announce}");
    let entry = load_kernel(&mem, spec, &cmdline, image.as_ref())?;
    phase(t, "kernel loaded");
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("get_supported_cpuid"))?;
    // KVM emulates the TSC-deadline timer but leaves its CPUID bit for the VMM to set.
    // Without it the guest calibrates the local APIC timer against the PIT, which fails
    // under nested emulation ("APIC timer disabled") and leaves it on the slow PIT.
    if kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer) {
        for e in cpuid.as_mut_slice() {
            if e.function == 1 {
                e.ecx |= 1 << 24;
            }
        }
    }
    mem.write_slice(&mptable::build(count), GuestAddress(mptable::MPTABLE_ADDR))
        .map_err(|e| VmmError::Memory(format!("writing the MP table: {e}")))?;
    let mut vcpus = Vec::with_capacity(count);
    for i in 0..count {
        let vcpu = vm.create_vcpu(i as u64).map_err(kvm_err("create_vcpu"))?;
        setup_vcpu(&vcpu, &mem, i, count, &cpuid, entry)?;
        vcpus.push(vcpu);
    }
    phase(t, "vcpus set up");
    Ok(Machine {
        _kvm: kvm,
        _vm: vm,
        _mem: mem,
        vcpus,
        ports,
        mmio: Arc::new(mmio),
    })
}

/// Run one vCPU until the guest ends or something fails. With `BOXLET_VMM_TIMINGS` set,
/// vCPU 0 reports on stderr how long after `started` it first entered the guest.
fn run_vcpu(
    index: usize,
    mut vcpu: VcpuFd,
    go: Arc<std::sync::Barrier>,
    ports: Arc<Mutex<PortBus>>,
    mmio: Arc<MmioBus>,
    started: std::time::Instant,
) -> Result<(), VmmError> {
    seccomp::enter(Role::Vcpu);
    // Nothing runs the guest before every thread, the main one too, is filtered.
    go.wait();
    if index == 0 && std::env::var_os("BOXLET_VMM_TIMINGS").is_some() {
        eprintln!(
            "boxlet-vmm: first KVM_RUN {:.3} ms after start",
            started.elapsed().as_secs_f64() * 1000.0
        );
    }
    let mut dumped = DUMPS_ASKED.load(Ordering::SeqCst);
    loop {
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            // An application processor that just left its wait for INIT/SIPI, or a
            // signal: enter again.
            Err(e) if e.errno() == libc::EAGAIN || e.errno() == libc::EINTR => {
                let asked = DUMPS_ASKED.load(Ordering::SeqCst);
                if asked != dumped {
                    dumped = asked;
                    dump_vcpu(index, &vcpu);
                }
                continue;
            }
            Err(e) => return Err(VmmError::Vcpu(index, format!("KVM_RUN: {e}"))),
        };
        let next = match exit {
            VcpuExit::IoIn(port, data) => {
                ports
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .read(port, data);
                Next::Continue
            }
            VcpuExit::IoOut(port, data) => ports
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(port, data),
            VcpuExit::MmioRead(addr, data) => {
                mmio.read(addr, data);
                Next::Continue
            }
            VcpuExit::MmioWrite(addr, data) => {
                mmio.write(addr, data);
                Next::Continue
            }
            VcpuExit::Shutdown | VcpuExit::SystemEvent(..) => Next::End,
            VcpuExit::Hlt => Next::End,
            VcpuExit::FailEntry(reason, cpu) => {
                return Err(VmmError::Vcpu(
                    index,
                    format!("entry failed: reason {reason:#x} on cpu {cpu}"),
                ))
            }
            VcpuExit::InternalError => {
                return Err(VmmError::Vcpu(index, "KVM internal error".into()))
            }
            other => return Err(VmmError::Vcpu(index, format!("unhandled exit {other:?}"))),
        };
        if let Next::End = next {
            return Ok(());
        }
    }
}

/// A thread serving `dev`: the queue notifications KVM signals on `notifiers` (one
/// eventfd per queue) and, for devices that have one, host-side readiness (sockets).
/// Device work thus runs beside the vCPUs, not in their exits.
fn spawn_device_worker(
    dev: &Arc<Mutex<MmioTransport>>,
    notifiers: &[EventFd],
    go: &Arc<std::sync::Barrier>,
) -> Result<(), VmmError> {
    let go = Arc::clone(go);
    // A thread that panicked while holding the lock left it poisoned; the transport
    // re-checks everything it reads, so serving on is safe.
    let (host_fd, external) = {
        let t = dev.lock().unwrap_or_else(|e| e.into_inner());
        (t.host_fd(), t.external())
    };
    // A device served by another process: its notifiers are the daemon's to read.
    let notifiers = if external { &[][..] } else { notifiers };
    let notifiers: Vec<EventFd> = notifiers
        .iter()
        .map(|e| e.try_clone())
        .collect::<Result<_, _>>()?;
    let dev = Arc::clone(dev);
    std::thread::Builder::new()
        .name("virtio-dev".into())
        .spawn(move || {
            seccomp::enter(Role::Device);
            go.wait();
            let mut fds: Vec<libc::pollfd> = notifiers
                .iter()
                .map(|e| e.as_raw_fd())
                .chain(host_fd)
                .map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                })
                .collect();
            loop {
                // SAFETY: `fds` is a valid array of pollfds whose descriptors the device
                // and this thread keep open for the life of the process.
                let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
                if r < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    eprintln!("boxlet-vmm: device poll: {e}");
                    return;
                }
                let mut t = dev.lock().unwrap_or_else(|e| e.into_inner());
                for (q, evt) in notifiers.iter().enumerate() {
                    if fds[q].revents & libc::POLLIN != 0 && evt.read().is_ok() {
                        t.notify(q as u32);
                    }
                }
                if host_fd.is_some() && fds[notifiers.len()].revents & libc::POLLIN != 0 {
                    t.process_host();
                }
            }
        })?;
    Ok(())
}

/// Boot the VM described by `spec` and run it to its end. `Ok` when the guest reset or
/// powered off.
pub fn run(spec: &VmSpec) -> Result<(), VmmError> {
    let started = std::time::Instant::now();
    // Every thread filters itself before it serves the guest (see `crate::seccomp`).
    seccomp::init()?;
    let mut machine = build(spec, &spec.cmdline)?;
    // Everything is open: from here on the VM's own unprivileged ids, when jailed so
    // (still one thread: the switch covers the whole process).
    boxlet::jail::switch_to_vm_identity()
        .map_err(|e| VmmError::Device(format!("switching to the VM's identity: {e}")))?;
    // SIGUSR1 asks every vCPU to print its registers (for a guest that seems stuck);
    // a real-time signal kicks the vCPU threads out of KVM_RUN to do it.
    let _ = register_signal_handler(libc::SIGUSR1, on_dump_request);
    // End on these explicitly, the same way whether run jailed (where the jail's init
    // forwards them) or not.
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        let _ = register_signal_handler(sig, on_terminate);
    }
    let _ = register_signal_handler(SIGRTMIN(), on_kick);
    let (tx, rx) = std::sync::mpsc::channel();
    let mut threads = Vec::new();
    // Every vCPU and device thread, and this one, meet here once filtered: threads share
    // one address space, so none may serve the guest while another is unfiltered.
    let go = Arc::new(std::sync::Barrier::new(
        machine.vcpus.len() + machine.mmio.devices.len() + 1,
    ));
    for (i, vcpu) in std::mem::take(&mut machine.vcpus).into_iter().enumerate() {
        let ports = Arc::clone(&machine.ports);
        let mmio = Arc::clone(&machine.mmio);
        let tx = tx.clone();
        let go = Arc::clone(&go);
        threads.push(
            std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || {
                    let _ = tx.send(run_vcpu(i, vcpu, go, ports, mmio, started));
                })?,
        );
    }
    for (dev, notifiers) in machine.mmio.devices.iter().zip(&machine.mmio.notifiers) {
        spawn_device_worker(dev, notifiers, &go)?;
    }
    drop(tx);
    seccomp::enter(Role::Main);
    go.wait();
    test_allocate();
    // The first vCPU to finish decides: the VM is over either way (the process exits,
    // taking the other vCPUs with it).
    let mut kicked = DUMPS_ASKED.load(Ordering::SeqCst);
    loop {
        match rx.recv_timeout(std::time::Duration::from_millis(200)) {
            Ok(result) => return result,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(VmmError::Vcpu(0, "every vCPU thread vanished".into()))
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
        }
        let asked = DUMPS_ASKED.load(Ordering::SeqCst);
        if asked != kicked {
            kicked = asked;
            for t in &threads {
                let _ = t.kill(SIGRTMIN());
            }
        }
    }
}

/// Test hook: `BOXLET_VMM_TEST_ALLOCATE_MIB=N` makes the main thread take and touch N
/// MiB of host memory once the VM runs, as a VMM bug or a compromised VMM could, to show
/// that the VM's cgroup stops it (see `boxlet::cgroup`).
fn test_allocate() {
    let Some(mib) = std::env::var("BOXLET_VMM_TEST_ALLOCATE_MIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    else {
        return;
    };
    let mut hog = Vec::<u8>::with_capacity(mib << 20);
    for _ in 0..(mib << 8) {
        hog.extend_from_slice(&[1u8; 4096]);
    }
    std::hint::black_box(&hog);
    eprintln!("boxlet-vmm: test hook: holding {mib} MiB");
    std::mem::forget(hog);
}

/// How many register dumps SIGUSR1 asked for.
static DUMPS_ASKED: AtomicUsize = AtomicUsize::new(0);

extern "C" fn on_dump_request(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    DUMPS_ASKED.fetch_add(1, Ordering::SeqCst);
}

extern "C" fn on_terminate(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: _exit is async-signal-safe and ends the process at once.
    unsafe { libc::_exit(128 + sig) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// One line of a vCPU's state on stderr.
fn dump_vcpu(index: usize, vcpu: &VcpuFd) {
    let regs = vcpu.get_regs();
    let sregs = vcpu.get_sregs();
    let mp = vcpu.get_mp_state().map(|m| m.mp_state);
    match (regs, sregs) {
        (Ok(r), Ok(s)) => eprintln!(
            "boxlet-vmm: vcpu {index}: rip {:#x} rsp {:#x} rflags {:#x} cr0 {:#x} cr3 {:#x} \
             cr4 {:#x} efer {:#x} mp_state {mp:?}",
            r.rip, r.rsp, r.rflags, s.cr0, s.cr3, s.cr4, s.efer
        ),
        (r, s) => eprintln!("boxlet-vmm: vcpu {index}: registers unreadable: {r:?} {s:?}"),
    }
}
