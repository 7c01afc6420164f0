//! The Intel MultiProcessor table (MP spec 1.4) that tells a guest without ACPI how many
//! CPUs it has, where its I/O APIC is and how the ISA interrupt lines reach it.
//!
//! Without one, Linux runs on the boot CPU alone in PIC mode. With it, every vCPU is
//! brought up (INIT/SIPI through KVM's in-kernel local APICs) and device interrupts go
//! through KVM's in-kernel I/O APIC, whose pins 0-23 are GSIs 0-23.
//!
//! Layout: the 16-byte floating pointer at [`MPTABLE_ADDR`] (the start of the EBDA, the
//! first place Linux looks), the configuration table right after it.

/// Where the table goes: the EBDA, which the memory map leaves out of usable RAM.
pub const MPTABLE_ADDR: u64 = 0x9fc00;
/// Room for the whole table: the 1 KiB up to 640 KiB.
pub const MPTABLE_ROOM: usize = 0x400;
/// The in-kernel I/O APIC's MMIO address (KVM's fixed default).
const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APICs' MMIO address.
const LAPIC_ADDR: u32 = 0xfee0_0000;
/// The I/O APIC's interrupt pins.
const IOAPIC_PINS: u8 = 24;
/// The most vCPUs the table has room for (and the VMM supports).
pub const MAX_VCPUS: usize = 32;

const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;

/// Entry types of the configuration table.
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

/// Interrupt types of interrupt entries.
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;

/// Processor flags.
const CPU_ENABLED: u8 = 1;
const CPU_BOOT: u8 = 2;

/// The table's bytes for `vcpus` CPUs (APIC ids 0..vcpus; the first boots), to be
/// written at [`MPTABLE_ADDR`].
///
/// # Panics
/// When `vcpus` is 0 or more than [`MAX_VCPUS`]: the caller validates the count.
pub fn build(vcpus: usize) -> Vec<u8> {
    assert!(
        (1..=MAX_VCPUS).contains(&vcpus),
        "{vcpus} vCPUs: the VMM checks the count"
    );
    let ioapic_id = vcpus as u8;
    let config_addr = MPTABLE_ADDR as u32 + 16;

    // The configuration table's entries.
    let mut entries = Vec::new();
    for id in 0..vcpus {
        entries.push(ENTRY_PROCESSOR);
        entries.push(id as u8); // local APIC id
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if id == 0 { CPU_BOOT } else { 0 });
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    for pin in 0..IOAPIC_PINS {
        // ISA bus IRQ n -> I/O APIC pin n, polarity and trigger as the bus has them.
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, 0, pin]);
        entries.extend_from_slice(&[ioapic_id, pin]);
    }
    // The PIC's output on every local APIC's LINT0, NMIs on LINT1.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = vcpus + 1 + 1 + usize::from(IOAPIC_PINS) + 2;

    let mut config = Vec::with_capacity(44 + entries.len());
    config.extend_from_slice(b"PCMP");
    config.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    config.push(4); // spec revision 1.4
    config.push(0); // checksum, below
    config.extend_from_slice(b"BOXLET  "); // OEM id
    config.extend_from_slice(b"MICROVM     "); // product id
    config.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    config.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    config.extend_from_slice(&(entry_count as u16).to_le_bytes());
    config.extend_from_slice(&LAPIC_ADDR.to_le_bytes());
    config.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    config.push(0); // extended table checksum
    config.push(0); // reserved
    config.extend_from_slice(&entries);
    config[7] = checksum(&config);

    let mut table = Vec::with_capacity(16 + config.len());
    table.extend_from_slice(b"_MP_");
    table.extend_from_slice(&config_addr.to_le_bytes());
    table.push(1); // length in 16-byte units
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(&[0; 5]); // features: a configuration table is present
    table[10] = checksum(&table);
    table.extend_from_slice(&config);
    debug_assert!(table.len() <= MPTABLE_ROOM);
    table
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |s, x| s.wrapping_add(*x))
    }

    fn u16_at(b: &[u8], off: usize) -> usize {
        usize::from(u16::from_le_bytes([b[off], b[off + 1]]))
    }

    #[test]
    fn every_structure_sums_to_zero_and_points_at_the_next() {
        for vcpus in [1, 2, 7, MAX_VCPUS] {
            let t = build(vcpus);
            assert!(t.len() <= MPTABLE_ROOM, "{vcpus}: {} bytes", t.len());
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0);
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            let config = &t[(ptr - MPTABLE_ADDR) as usize..];
            assert_eq!(&config[..4], b"PCMP");
            assert_eq!(u16_at(config, 4), config.len());
            assert_eq!(sum(config), 0);
        }
    }

    #[test]
    fn the_entries_list_each_cpu_once_the_ioapic_and_its_pins() {
        let vcpus = 3;
        let t = build(vcpus);
        let config = &t[16..];
        let count = u16_at(config, 34);
        let mut off = 44;
        let (mut cpus, mut boot, mut ioapics, mut pins, mut local) = (vec![], 0, 0, vec![], 0);
        for _ in 0..count {
            let len = match config[off] {
                ENTRY_PROCESSOR => {
                    cpus.push(config[off + 1]);
                    if config[off + 3] & CPU_BOOT != 0 {
                        boot += 1;
                    }
                    20
                }
                ENTRY_BUS => 8,
                ENTRY_IOAPIC => {
                    ioapics += 1;
                    assert_eq!(config[off + 1] as usize, vcpus, "its id follows the CPUs'");
                    8
                }
                ENTRY_IO_INTERRUPT => {
                    pins.push(config[off + 7]);
                    8
                }
                ENTRY_LOCAL_INTERRUPT => {
                    local += 1;
                    8
                }
                other => panic!("entry type {other}"),
            };
            off += len;
        }
        assert_eq!(off, config.len(), "the count covers every entry");
        assert_eq!(cpus, vec![0, 1, 2]);
        assert_eq!(boot, 1);
        assert_eq!(ioapics, 1);
        assert_eq!(pins, (0..24).collect::<Vec<u8>>());
        assert_eq!(local, 2);
    }
}
