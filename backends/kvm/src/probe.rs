//! Can this host's KVM boot Linux? A few instructions in a throwaway VM say.
//!
//! `/dev/kvm` is not proof: a software hypervisor behind it (PVM's `kvm_pvm`) runs tiny
//! guests but fails on instructions every Linux kernel executes early. The probe enters
//! 64-bit long mode at CPL 0, as a kernel runs, and executes them: `xsetbv`, `xsave` and
//! `xrstor` (when the CPU has XSAVE), `lock cmpxchg16b`, and an `int3` through an IDT
//! gate returning with `iretq`; then it writes a marker to an I/O port. Any other exit
//! (an emulation failure, a triple fault) means "no". The answer is cached per boot of
//! the host.

use std::path::PathBuf;

use kvm_bindings::{kvm_regs, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit};

use crate::vmm::flat_segments;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// The probe's verdict.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Probe {
    /// Whether KVM ran every instruction a Linux kernel needs.
    pub usable: bool,
    /// Why not (or what was checked).
    pub reason: String,
}

const MEM_SIZE: usize = 0x20_0000;
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const GDT: u64 = 0x500;
const IDT: u64 = 0x600;
const STACK_TOP: u64 = 0x7000;
const CODE: u64 = 0x8000;
const HANDLER: u64 = 0x8100;
const XSAVE_AREA: u64 = 0x9000;
const CMPXCHG_AREA: u64 = 0xa000;
const MARKER_PORT: u16 = 0x80;
const MARKER: u8 = 0x42;

/// The probe's guest code; with `xsave`, the XSAVE part first.
fn code(xsave: bool) -> Vec<u8> {
    code_marked(xsave).0
}

/// The instruction (of those tested) that starts at or before `offset` in the code.
fn instruction_at(xsave: bool, offset: u64) -> &'static str {
    let (_, marks) = code_marked(xsave);
    marks
        .iter()
        .rev()
        .find(|(at, _)| *at as u64 <= offset)
        .map_or("?", |(_, name)| name)
}

/// The code, with where each tested instruction (or its setup) begins.
fn code_marked(xsave: bool) -> (Vec<u8>, Vec<(usize, &'static str)>) {
    let mut c = Vec::new();
    let mut marks = Vec::new();
    if xsave {
        marks.push((c.len(), "xsetbv"));
        c.extend_from_slice(&[0x31, 0xc9]); // xor ecx, ecx
        c.extend_from_slice(&[0xb8, 0x03, 0, 0, 0]); // mov eax, 3 (x87 | SSE)
        c.extend_from_slice(&[0x31, 0xd2]); // xor edx, edx
        c.extend_from_slice(&[0x0f, 0x01, 0xd1]); // xsetbv
        c.extend_from_slice(&[0x48, 0xc7, 0xc7]); // mov rdi, XSAVE_AREA
        c.extend_from_slice(&(XSAVE_AREA as u32).to_le_bytes());
        marks.push((c.len(), "xsave"));
        c.extend_from_slice(&[0x0f, 0xae, 0x27]); // xsave [rdi]
        marks.push((c.len(), "xrstor"));
        c.extend_from_slice(&[0x0f, 0xae, 0x2f]); // xrstor [rdi]
    }
    marks.push((c.len(), "cmpxchg16b"));
    c.extend_from_slice(&[0x48, 0xc7, 0xc6]); // mov rsi, CMPXCHG_AREA
    c.extend_from_slice(&(CMPXCHG_AREA as u32).to_le_bytes());
    c.extend_from_slice(&[0x31, 0xc0, 0x31, 0xd2, 0x31, 0xdb, 0x31, 0xc9]); // zero a, d, b, c
    c.extend_from_slice(&[0xf0, 0x48, 0x0f, 0xc7, 0x0e]); // lock cmpxchg16b [rsi]
    marks.push((c.len(), "int3"));
    c.push(0xcc); // int3
    marks.push((c.len(), "out"));
    c.extend_from_slice(&[0xb0, MARKER]); // mov al, MARKER
    c.extend_from_slice(&[0xe6, MARKER_PORT as u8]); // out MARKER_PORT, al
    c.push(0xf4); // hlt
    (c, marks)
}

/// Run the probe now.
pub fn run() -> Probe {
    match try_run() {
        Ok(()) => Probe {
            usable: true,
            reason: "KVM ran the probe (long mode, xsave/xrstor, cmpxchg16b, int3)".into(),
        },
        Err(reason) => Probe {
            usable: false,
            reason,
        },
    }
}

fn try_run() -> Result<(), String> {
    // Page-aligned anonymous memory, declared before the VM so dropped after it on every
    // path.
    let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
        .map_err(|e| format!("probe memory: {e}"))?;
    let kvm = Kvm::new().map_err(|e| format!("/dev/kvm: {e}"))?;
    let vm = kvm.create_vm().map_err(|e| format!("KVM_CREATE_VM: {e}"))?;
    let put = |mem: &GuestMemoryMmap, at: u64, bytes: &[u8]| {
        // Every address here is a constant well inside the 2 MiB.
        let _ = mem.write_slice(bytes, GuestAddress(at));
    };
    // Identity map of the first 2 MiB (one large page).
    put(&mem, PML4, &(PDPT | 3).to_le_bytes());
    put(&mem, PDPT, &(PD | 3).to_le_bytes());
    put(&mem, PD, &0x83u64.to_le_bytes());
    // GDT: null, 64-bit code, data.
    for (i, d) in [0u64, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff]
        .iter()
        .enumerate()
    {
        put(&mem, GDT + 8 * i as u64, &d.to_le_bytes());
    }
    // IDT entry 3 (#BP): a 64-bit interrupt gate to the handler, which returns.
    let mut gate = [0u8; 16];
    gate[0..2].copy_from_slice(&(HANDLER as u16).to_le_bytes());
    gate[2..4].copy_from_slice(&0x08u16.to_le_bytes());
    gate[5] = 0x8e;
    gate[6..8].copy_from_slice(&((HANDLER >> 16) as u16).to_le_bytes());
    put(&mem, IDT + 3 * 16, &gate);
    put(&mem, HANDLER, &[0x48, 0xcf]); // iretq

    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
    let xsave = cpuid
        .as_slice()
        .iter()
        .any(|e| e.function == 1 && e.ecx & (1 << 26) != 0);
    let code = code(xsave);
    put(&mem, CODE, &code);

    let host = mem
        .iter()
        .next()
        .map(|r| r.as_ptr())
        .ok_or("probe memory: no region")?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: host as u64,
        flags: 0,
    };
    // SAFETY: `mem` is a live mapping of MEM_SIZE bytes, declared before `vm` and so
    // unmapped only after the VM is gone, on every path out of this function.
    unsafe { vm.set_user_memory_region(region) }
        .map_err(|e| format!("KVM_SET_USER_MEMORY_REGION: {e}"))?;
    let vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("KVM_CREATE_VCPU: {e}"))?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(|e| format!("KVM_SET_CPUID2: {e}"))?;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 23;
    sregs.idt.base = IDT;
    sregs.idt.limit = 16 * 4 - 1;
    flat_segments(&mut sregs, true);
    sregs.cr3 = PML4;
    sregs.cr4 = (1 << 5) | (1 << 9) | if xsave { 1 << 18 } else { 0 }; // PAE, OSFXSR, OSXSAVE
    sregs.cr0 = 0x8000_0033; // PG, NE, ET, MP, PE
    sregs.efer = 0x500; // LME, LMA
    vcpu.set_sregs(&sregs)
        .map_err(|e| format!("KVM_SET_SREGS: {e}"))?;
    vcpu.set_regs(&kvm_regs {
        rip: CODE,
        rsp: STACK_TOP,
        rflags: 0x2,
        ..Default::default()
    })
    .map_err(|e| format!("KVM_SET_REGS: {e}"))?;

    let mut vcpu = vcpu;
    let result = loop {
        let exit = match vcpu.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => break Err(format!("KVM_RUN: {e}")),
        };
        break match exit {
            VcpuExit::IoOut(port, data) if port == MARKER_PORT && data == [MARKER] => Ok(()),
            VcpuExit::InternalError => Err(
                "KVM cannot run ordinary kernel instructions (an emulation failure: a \
                 software hypervisor such as kvm_pvm behind /dev/kvm?)"
                    .into(),
            ),
            VcpuExit::Shutdown => {
                Err("the probe guest triple-faulted on ordinary kernel instructions".into())
            }
            other => Err(format!("the probe guest stopped early: {other:?}")),
        };
    };
    let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
    drop(vcpu);
    drop(vm);
    drop(mem);
    result.map_err(|e| {
        if rip >= CODE && rip < CODE + code.len() as u64 {
            format!("{e}; at {}", instruction_at(xsave, rip - CODE))
        } else {
            e
        }
    })
}

fn cache_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("boxlet").join("kvm-probe.json"))
}

fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The probe's answer, from the cache when this boot of the host already ran it.
pub fn cached() -> Probe {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Entry {
        boot_id: String,
        probe: Probe,
    }
    let id = boot_id();
    let path = cache_path();
    if let Some(p) = &path {
        if let Ok(b) = std::fs::read(p) {
            if let Ok(e) = serde_json::from_slice::<Entry>(&b) {
                if !id.is_empty() && e.boot_id == id {
                    return e.probe;
                }
            }
        }
    }
    let probe = run();
    if let (Some(p), false) = (&path, id.is_empty()) {
        let entry = Entry {
            boot_id: id,
            probe: probe.clone(),
        };
        if let (Some(dir), Ok(json)) = (p.parent(), serde_json::to_vec(&entry)) {
            // Best effort: a read-only home only costs a probe per call.
            let tmp = p.with_extension(format!("tmp{}", std::process::id()));
            let _ = std::fs::create_dir_all(dir)
                .and_then(|()| std::fs::write(&tmp, json))
                .and_then(|()| std::fs::rename(&tmp, p));
        }
    }
    probe
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_code_ends_in_the_marker_and_a_halt() {
        for xsave in [false, true] {
            let c = code(xsave);
            assert_eq!(
                &c[c.len() - 5..],
                &[0xb0, MARKER, 0xe6, MARKER_PORT as u8, 0xf4]
            );
            assert_eq!(c.windows(3).any(|w| w == [0x0f, 0x01, 0xd1]), xsave);
            assert!(c.windows(5).any(|w| w == [0xf0, 0x48, 0x0f, 0xc7, 0x0e]));
        }
        assert_eq!(instruction_at(true, 9), "xsetbv");
        assert_eq!(instruction_at(true, 20), "xsave");
        assert_eq!(instruction_at(false, 0), "cmpxchg16b");
    }
}
