//! The Intel MultiProcessor table (MP spec 1.4).
//!
//! Without ACPI the guest kernel learns its CPUs, the IOAPIC and the ISA IRQ
//! routing from this table: the floating pointer at [`MPTABLE_START`] (in
//! the EBDA, where Linux's `find_smp_config` scans) points at the
//! configuration table right after it. The table is serialised field by
//! field into a byte buffer, little-endian, so no unsafe struct casts are
//! needed and the layout is visible in one place.

use chitin_memory::layout::{HIMEM_START, IOAPIC_START, LAPIC_START, MPTABLE_START};
use chitin_memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use crate::BootError;

/// Largest vCPU count: APIC ids 0..=253, the IOAPIC takes the next id and
/// 0xff is the broadcast id.
const MAX_CPUS: u8 = 254;

/// MP spec revision 1.4.
const SPEC_REV: u8 = 4;
/// Floating pointer structure size (MP spec §4.1): 16 bytes, one paragraph.
const FLOATING_POINTER_LEN: usize = 16;
/// Configuration table header size (MP spec §4.2).
const HEADER_LEN: usize = 44;
/// Processor entry size (MP spec §4.3.1).
const PROCESSOR_ENTRY_LEN: usize = 20;
/// Size of every other base table entry (bus, IOAPIC, interrupts).
const SHORT_ENTRY_LEN: usize = 8;

/// Entry types (MP spec table 4-3).
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

/// Processor flags: CPU enabled.
const CPU_ENABLED: u8 = 1 << 0;
/// Processor flags: bootstrap processor.
const CPU_BSP: u8 = 1 << 1;
/// Local APIC version of an integrated xAPIC (what KVM emulates).
const LAPIC_VERSION: u8 = 0x14;
/// CPU signature: family 6 (stepping and model 0), as KVM's default CPU.
const CPU_SIGNATURE: u32 = 0x600;
/// CPUID.1:EDX features advertised: FPU (bit 0) and APIC (bit 9).
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);

/// IOAPIC version of the 82093AA with 24 pins.
const IOAPIC_VERSION: u8 = 0x11;
/// IOAPIC flags: usable.
const IOAPIC_USABLE: u8 = 1;
/// IOAPIC input pins; ISA IRQ n is wired to pin n.
const IOAPIC_PINS: u8 = 24;

/// Interrupt types (MP spec table 4-8).
const INT_VECTORED: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;
/// Interrupt flags: polarity and trigger "conform to bus" (ISA: high, edge).
const INT_FLAGS_CONFORM: u16 = 0;
/// Destination "all local APICs" in local interrupt entries.
const ALL_LAPICS: u8 = 0xff;
/// The one bus: ISA, id 0.
const ISA_BUS_ID: u8 = 0;
/// Bus type string, space padded to 6 bytes (MP spec table 4-5).
const ISA_BUS_TYPE: &[u8; 6] = b"ISA   ";

/// OEM id, space padded to 8 bytes.
const OEM_ID: &[u8; 8] = b"CHITIN  ";
/// Product id, space padded to 12 bytes.
const PRODUCT_ID: &[u8; 12] = b"MICROVM     ";

/// Write the MP floating pointer and configuration table for `num_cpus`
/// vCPUs (APIC ids `0..num_cpus`, vCPU 0 the bootstrap processor) at
/// [`MPTABLE_START`].
///
/// # Errors
///
/// [`BootError::TooManyCpus`] when `num_cpus` is 0 or above 254, or the
/// table would not fit below 1 MiB; [`BootError::GuestMemory`] when guest
/// memory does not cover the table.
pub fn setup_mptable(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), BootError> {
    if num_cpus == 0 || num_cpus > MAX_CPUS {
        return Err(BootError::TooManyCpus { num_cpus });
    }
    if MPTABLE_START + table_len(num_cpus) > HIMEM_START {
        return Err(BootError::TooManyCpus { num_cpus });
    }
    let table = build(num_cpus);
    debug_assert_eq!(table.len() as u64, table_len(num_cpus));
    mem.write_slice(&table, GuestAddress(MPTABLE_START))
        .map_err(BootError::GuestMemory)
}

/// Non-processor entries: bus, IOAPIC, one I/O interrupt per IOAPIC pin,
/// LINT0 and LINT1.
const SHORT_ENTRIES: usize = 1 + 1 + IOAPIC_PINS as usize + 2;

/// Bytes of the floating pointer and configuration table for `num_cpus`.
fn table_len(num_cpus: u8) -> u64 {
    (FLOATING_POINTER_LEN
        + HEADER_LEN
        + usize::from(num_cpus) * PROCESSOR_ENTRY_LEN
        + SHORT_ENTRIES * SHORT_ENTRY_LEN) as u64
}

/// The floating pointer followed by the configuration table.
fn build(num_cpus: u8) -> Vec<u8> {
    let config = config_table(num_cpus);
    let config_addr = MPTABLE_START + FLOATING_POINTER_LEN as u64;
    let mut out = Vec::with_capacity(FLOATING_POINTER_LEN + config.len());
    out.extend_from_slice(b"_MP_");
    // The table lies below 1 MiB, so the address fits 32 bits.
    out.extend_from_slice(&(config_addr as u32).to_le_bytes());
    out.push((FLOATING_POINTER_LEN / 16) as u8); // length in paragraphs
    out.push(SPEC_REV);
    out.push(0); // checksum, filled below
                 // Feature bytes 1-5: 0 = a configuration table is present, no IMCR
                 // (virtual wire mode).
    out.extend_from_slice(&[0; 5]);
    out[10] = checksum(&out[..FLOATING_POINTER_LEN]);
    out.extend_from_slice(&config);
    out
}

/// Configuration table: header then base entries.
fn config_table(num_cpus: u8) -> Vec<u8> {
    let ioapic_id = num_cpus;
    let mut entries = Vec::new();
    let mut count: u16 = 0;

    for apic_id in 0..num_cpus {
        let flags = CPU_ENABLED | if apic_id == 0 { CPU_BSP } else { 0 };
        entries.push(ENTRY_PROCESSOR);
        entries.push(apic_id);
        entries.push(LAPIC_VERSION);
        entries.push(flags);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]); // reserved
        count += 1;
    }

    entries.push(ENTRY_BUS);
    entries.push(ISA_BUS_ID);
    entries.extend_from_slice(ISA_BUS_TYPE);
    count += 1;

    entries.push(ENTRY_IOAPIC);
    entries.push(ioapic_id);
    entries.push(IOAPIC_VERSION);
    entries.push(IOAPIC_USABLE);
    // IOAPIC_START lies below 4 GiB by the layout.
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 1;

    for irq in 0..IOAPIC_PINS {
        interrupt_entry(
            &mut entries,
            ENTRY_IO_INTERRUPT,
            INT_VECTORED,
            irq,
            ioapic_id,
            irq,
        );
        count += 1;
    }
    // LINT0 delivers the 8259's ExtINT, LINT1 NMI, on every LAPIC.
    interrupt_entry(
        &mut entries,
        ENTRY_LOCAL_INTERRUPT,
        INT_EXTINT,
        0,
        ALL_LAPICS,
        0,
    );
    interrupt_entry(
        &mut entries,
        ENTRY_LOCAL_INTERRUPT,
        INT_NMI,
        0,
        ALL_LAPICS,
        1,
    );
    count += 2;

    let base_len = (HEADER_LEN + entries.len()) as u16;
    let mut table = Vec::with_capacity(usize::from(base_len));
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&base_len.to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, filled below
    table.extend_from_slice(OEM_ID);
    table.extend_from_slice(PRODUCT_ID);
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    // LAPIC_START lies below 4 GiB by the layout.
    table.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    debug_assert_eq!(table.len(), HEADER_LEN);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);
    table
}

/// An I/O (type 3) or local (type 4) interrupt assignment entry; both have
/// the same layout (MP spec §4.3.4, §4.3.5).
fn interrupt_entry(
    out: &mut Vec<u8>,
    entry_type: u8,
    int_type: u8,
    source_irq: u8,
    dest_id: u8,
    dest_pin: u8,
) {
    out.push(entry_type);
    out.push(int_type);
    out.extend_from_slice(&INT_FLAGS_CONFORM.to_le_bytes());
    out.push(ISA_BUS_ID);
    out.push(source_irq);
    out.push(dest_id);
    out.push(dest_pin);
}

/// The byte that makes `bytes` (with this byte in place of a zero) sum to
/// zero modulo 256.
fn checksum(bytes: &[u8]) -> u8 {
    let sum = bytes.iter().fold(0u8, |acc, &b| acc.wrapping_add(b));
    0u8.wrapping_sub(sum)
}

#[cfg(test)]
mod tests {
    use chitin_memory::{Backing, GuestRam};

    use super::*;

    /// A parsed view of the written table, for assertions.
    struct Written {
        floating: Vec<u8>,
        config: Vec<u8>,
    }

    impl Written {
        fn read(mem: &GuestMemoryMmap) -> Self {
            let mut floating = vec![0u8; FLOATING_POINTER_LEN];
            mem.read_slice(&mut floating, GuestAddress(MPTABLE_START))
                .unwrap();
            let config_addr = u32::from_le_bytes(floating[4..8].try_into().unwrap());
            let len: u16 = mem
                .read_obj(GuestAddress(u64::from(config_addr) + 4))
                .unwrap();
            let mut config = vec![0u8; usize::from(len)];
            mem.read_slice(&mut config, GuestAddress(u64::from(config_addr)))
                .unwrap();
            Self { floating, config }
        }

        /// Entries after the header as (type, bytes).
        fn entries(&self) -> Vec<(u8, &[u8])> {
            let mut out = Vec::new();
            let mut rest = &self.config[HEADER_LEN..];
            while let Some(&kind) = rest.first() {
                let len = if kind == ENTRY_PROCESSOR {
                    PROCESSOR_ENTRY_LEN
                } else {
                    SHORT_ENTRY_LEN
                };
                out.push((kind, &rest[..len]));
                rest = &rest[len..];
            }
            out
        }

        fn processors(&self) -> Vec<&[u8]> {
            self.entries()
                .into_iter()
                .filter(|(kind, _)| *kind == ENTRY_PROCESSOR)
                .map(|(_, bytes)| bytes)
                .collect()
        }
    }

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |acc, &b| acc.wrapping_add(b))
    }

    fn written(num_cpus: u8) -> Written {
        let ram = GuestRam::new(64 << 20, Backing::Anonymous).unwrap();
        setup_mptable(ram.memory(), num_cpus).unwrap();
        Written::read(ram.memory())
    }

    #[test]
    fn setup_mptable_checksums_sum_to_zero() {
        let table = written(4);
        assert_eq!(&table.floating[..4], b"_MP_");
        assert_eq!(sum(&table.floating), 0);
        assert_eq!(&table.config[..4], b"PCMP");
        assert_eq!(sum(&table.config), 0);
    }

    #[test]
    fn setup_mptable_one_processor_entry_per_cpu() {
        let table = written(4);
        let processors = table.processors();
        assert_eq!(processors.len(), 4);
        for (id, entry) in processors.iter().enumerate() {
            assert_eq!(usize::from(entry[1]), id, "APIC id");
            assert_eq!(entry[2], LAPIC_VERSION);
            let bsp = entry[3] & CPU_BSP != 0;
            assert_eq!(bsp, id == 0, "BSP flag on vCPU {id}");
            assert_ne!(entry[3] & CPU_ENABLED, 0);
        }
    }

    #[test]
    fn setup_mptable_entry_count_matches_header() {
        let table = written(2);
        let count = u16::from_le_bytes([table.config[34], table.config[35]]);
        // 2 CPUs + bus + IOAPIC + 24 I/O interrupts + 2 local interrupts.
        assert_eq!(usize::from(count), 2 + 1 + 1 + 24 + 2);
        assert_eq!(table.entries().len(), usize::from(count));
    }

    #[test]
    fn setup_mptable_header_has_lapic_address() {
        let table = written(1);
        let lapic = u32::from_le_bytes(table.config[36..40].try_into().unwrap());
        assert_eq!(u64::from(lapic), LAPIC_START);
    }

    #[test]
    fn setup_mptable_ioapic_follows_cpu_ids() {
        let table = written(3);
        let entries = table.entries();
        let (_, ioapic) = entries
            .iter()
            .find(|(kind, _)| *kind == ENTRY_IOAPIC)
            .unwrap();
        assert_eq!(ioapic[1], 3, "IOAPIC id = num_cpus");
        assert_eq!(ioapic[2], IOAPIC_VERSION);
        let addr = u32::from_le_bytes(ioapic[4..8].try_into().unwrap());
        assert_eq!(u64::from(addr), IOAPIC_START);
        let (_, bus) = entries.iter().find(|(kind, _)| *kind == ENTRY_BUS).unwrap();
        assert_eq!(&bus[2..8], b"ISA   ");
    }

    #[test]
    fn setup_mptable_routes_isa_irqs_to_matching_pins() {
        let table = written(1);
        let io: Vec<_> = table
            .entries()
            .into_iter()
            .filter(|(kind, _)| *kind == ENTRY_IO_INTERRUPT)
            .map(|(_, e)| e)
            .collect();
        assert_eq!(io.len(), 24);
        for (irq, entry) in io.iter().enumerate() {
            assert_eq!(usize::from(entry[5]), irq, "source IRQ");
            assert_eq!(entry[6], 1, "destination IOAPIC id");
            assert_eq!(usize::from(entry[7]), irq, "IOAPIC pin");
        }
    }

    #[test]
    fn setup_mptable_local_interrupts_extint_and_nmi() {
        let table = written(1);
        let local: Vec<_> = table
            .entries()
            .into_iter()
            .filter(|(kind, _)| *kind == ENTRY_LOCAL_INTERRUPT)
            .map(|(_, e)| (e[1], e[6], e[7]))
            .collect();
        assert_eq!(local, vec![(INT_EXTINT, 0xff, 0), (INT_NMI, 0xff, 1)]);
    }

    #[test]
    fn setup_mptable_max_cpus_fits() {
        let table = written(MAX_CPUS);
        assert_eq!(table.processors().len(), usize::from(MAX_CPUS));
        assert_eq!(sum(&table.config), 0);
    }

    #[test]
    fn setup_mptable_zero_cpus_is_rejected() {
        let ram = GuestRam::new(64 << 20, Backing::Anonymous).unwrap();
        assert!(matches!(
            setup_mptable(ram.memory(), 0),
            Err(BootError::TooManyCpus { num_cpus: 0 })
        ));
    }

    #[test]
    fn setup_mptable_255_cpus_is_rejected() {
        let ram = GuestRam::new(64 << 20, Backing::Anonymous).unwrap();
        assert!(matches!(
            setup_mptable(ram.memory(), 255),
            Err(BootError::TooManyCpus { num_cpus: 255 })
        ));
    }
}
