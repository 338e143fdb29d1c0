use chitin_memory::{Backing, GuestRam};
use vm_memory::{Bytes, GuestAddress};

use super::*;

const DEVICES: [VirtioMmioDevice; 2] = [
    VirtioMmioDevice {
        base: 0xd000_0000,
        len: 0x1000,
        gsi: 5,
    },
    VirtioMmioDevice {
        base: 0xd000_1000,
        len: 0x1000,
        gsi: 6,
    },
];

fn config(vcpus: u8) -> AcpiConfig<'static> {
    AcpiConfig {
        vcpus,
        virtio: &DEVICES,
    }
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(bytes[at..at + 2].try_into().unwrap())
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

/// The I/O port of a byte-wide System I/O GAS at `at`, checking its form.
fn io_gas(bytes: &[u8], at: usize) -> u64 {
    assert_eq!(bytes[at], 1, "address space: System I/O");
    assert_eq!(bytes[at + 1], 8, "register bit width");
    assert_eq!(bytes[at + 2], 0, "bit offset");
    assert_eq!(bytes[at + 3], 1, "access size: byte");
    u64_at(bytes, at + 4)
}

/// The MADT's interrupt controller structures as (type, bytes).
fn madt_entries(madt: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut entries = Vec::new();
    let mut at = MADT_FIXED_LEN as usize;
    while at < madt.len() {
        let len = usize::from(madt[at + 1]);
        assert!(len >= 2 && at + len <= madt.len(), "entry at {at} overruns");
        entries.push((madt[at], madt[at..at + len].to_vec()));
        at += len;
    }
    entries
}

/// The entries of MADT structure type `kind`.
fn of_type(entries: &[(u8, Vec<u8>)], kind: u8) -> Vec<&Vec<u8>> {
    entries
        .iter()
        .filter(|(t, _)| *t == kind)
        .map(|(_, e)| e)
        .collect()
}

fn count(haystack: &[u8], needle: &[u8]) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle)
        .count()
}

#[test]
fn rsdp_is_revision_2_with_both_checksums_and_points_at_the_xsdt() {
    let tables = build_tables(&config(1)).unwrap();
    let rsdp = &tables.rsdp;
    assert_eq!(tables.rsdp_address, ACPI_START);
    assert_eq!(ACPI_START % 16, 0, "Linux scans 16-byte boundaries");
    assert_eq!(rsdp.len(), 36);
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[..20]), 0, "ACPI 1.0 checksum");
    assert_eq!(sum(rsdp), 0, "extended checksum");
    assert_eq!(&rsdp[9..15], &OEM_ID);
    assert_eq!(rsdp[15], 2, "revision");
    assert_eq!(u32_at(rsdp, 20), 36, "length");
    assert_eq!(u64_at(rsdp, 24), tables.get(b"XSDT").unwrap().address);
}

#[test]
fn every_table_has_a_valid_header_and_its_own_place() {
    for vcpus in [1, 2, 4, 64, MAX_VCPUS] {
        let tables = build_tables(&config(vcpus)).unwrap();
        let mut end = tables.rsdp_address + tables.rsdp.len() as u64;
        for table in &tables.tables {
            let bytes = &table.bytes;
            let name = String::from_utf8_lossy(&table.signature);
            assert_eq!(&bytes[..4], &table.signature);
            assert_eq!(u32_at(bytes, 4) as usize, bytes.len(), "{name} length");
            assert_eq!(sum(bytes), 0, "{name} checksum");
            assert_eq!(&bytes[10..16], &OEM_ID, "{name} OEM id");
            assert!(table.address >= end, "{name} overlaps the one before");
            assert_eq!(table.address % 8, 0, "{name} alignment");
            end = table.address + bytes.len() as u64;
        }
        assert!(end <= ACPI_END);
    }
}

#[test]
fn xsdt_lists_the_fadt_and_the_madt() {
    let tables = build_tables(&config(2)).unwrap();
    let xsdt = &tables.get(b"XSDT").unwrap().bytes;
    assert_eq!(xsdt.len(), 36 + 16);
    assert_eq!(xsdt[8], 1, "revision");
    let entries = [u64_at(xsdt, 36), u64_at(xsdt, 44)];
    assert_eq!(
        entries,
        [
            tables.get(b"FACP").unwrap().address,
            tables.get(b"APIC").unwrap().address
        ]
    );
}

#[test]
fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
    let tables = build_tables(&config(1)).unwrap();
    let fadt = &tables.get(b"FACP").unwrap().bytes;
    // ACPI 6.5 table 5.9 offsets.
    assert_eq!(fadt.len(), 276);
    assert_eq!(fadt[8], 6, "major version");
    assert_eq!(fadt[131], 5, "minor version");
    assert_eq!(u32_at(fadt, 36), 0, "no FACS");
    assert_eq!(u32_at(fadt, 40), 0, "32-bit DSDT pointer unused");
    assert_eq!(u64_at(fadt, 140), tables.get(b"DSDT").unwrap().address);
    let flags = u32_at(fadt, 112);
    assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
    assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
    assert_ne!(flags & (1 << 4), 0, "no fixed power button");
    assert_ne!(flags & (1 << 5), 0, "no fixed sleep button");
    assert_eq!(u16_at(fadt, 109), 1 << 2, "IAPC_BOOT_ARCH: no VGA, no 8042");
    assert_eq!(u16_at(fadt, 46), 0, "no SCI");
    for pm_block in (56..=88).step_by(4) {
        assert_eq!(u32_at(fadt, pm_block), 0, "legacy PM block at {pm_block}");
    }
    assert_eq!(io_gas(fadt, 116), RESET_PORT);
    assert_eq!(fadt[128], RESET_VALUE);
    assert_eq!(io_gas(fadt, 244), SLEEP_CONTROL_PORT);
    assert_eq!(io_gas(fadt, 256), SLEEP_STATUS_PORT);
}

#[test]
fn madt_has_one_lapic_per_vcpu_the_ioapic_and_com1s_override() {
    for vcpus in [1u8, 3, MAX_VCPUS] {
        let tables = build_tables(&config(vcpus)).unwrap();
        let madt = &tables.get(b"APIC").unwrap().bytes;
        assert_eq!(u32_at(madt, 36) as u64, LAPIC_START);
        assert_eq!(u32_at(madt, 40), 0, "no PC-AT 8259s");
        let entries = madt_entries(madt);
        let lapics = of_type(&entries, 0);
        assert_eq!(lapics.len(), usize::from(vcpus));
        for (i, e) in lapics.iter().enumerate() {
            assert_eq!(e.len(), 8);
            assert_eq!(usize::from(e[2]), i, "processor UID");
            assert_eq!(usize::from(e[3]), i, "APIC id");
            assert_eq!(u32_at(e, 4), 1, "enabled");
        }
        let ioapics = of_type(&entries, 1);
        assert_eq!(ioapics.len(), 1);
        assert_eq!(ioapics[0][2], vcpus, "IOAPIC id after the vCPUs'");
        assert_eq!(u32_at(ioapics[0], 4) as u64, IOAPIC_START);
        assert_eq!(u32_at(ioapics[0], 8), 0, "GSI base");
        let overrides = of_type(&entries, 2);
        assert_eq!(overrides.len(), 1);
        let iso = overrides[0];
        assert_eq!((iso[2], iso[3]), (0, 4), "ISA bus, IRQ 4");
        assert_eq!(u32_at(iso, 4), 4, "GSI 4");
        assert_eq!(u16_at(iso, 8), 0b0101, "edge, active high");
        assert_eq!(entries.len(), usize::from(vcpus) + 2);
    }
}

#[test]
fn dsdt_names_s5_com1_the_rtc_and_every_virtio_device() {
    let tables = build_tables(&config(1)).unwrap();
    let dsdt = &tables.get(b"DSDT").unwrap().bytes;
    assert_eq!(dsdt[8], 2, "revision 2: 64-bit integers");
    // Name(_S5_, Package(2) {5, 0}): NameOp, name, PackageOp, length,
    // element count, BytePrefix 5, ZeroOp.
    assert_eq!(
        count(
            dsdt,
            &[0x08, b'_', b'S', b'5', b'_', 0x12, 0x05, 0x02, 0x0a, 0x05, 0x00]
        ),
        1
    );
    assert_eq!(count(dsdt, b"LNRO0005\0"), DEVICES.len());
    assert_eq!(count(dsdt, b"COM1"), 1);
    assert_eq!(count(dsdt, b"RTC_"), 1);
    for (i, dev) in DEVICES.iter().enumerate() {
        assert_eq!(count(dsdt, format!("VR{i:02X}").as_bytes()), 1);
        // Memory32Fixed(ReadWrite, base, length).
        let mut desc = vec![0x86, 9, 0, 1];
        desc.extend_from_slice(&(dev.base as u32).to_le_bytes());
        desc.extend_from_slice(&(dev.len as u32).to_le_bytes());
        assert_eq!(count(dsdt, &desc), 1, "window of device {i}");
        // Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) {gsi}.
        let mut irq = vec![0x89, 6, 0, 0b0011, 1];
        irq.extend_from_slice(&dev.gsi.to_le_bytes());
        assert_eq!(count(dsdt, &irq), 1, "interrupt of device {i}");
    }
    let mut com1_irq = vec![0x89, 6, 0, 0b0011, 1];
    com1_irq.extend_from_slice(&COM1_IRQ.to_le_bytes());
    assert_eq!(count(dsdt, &com1_irq), 1);
}

#[test]
fn configurations_the_tables_cannot_describe_are_errors() {
    assert!(matches!(
        build_tables(&config(0)),
        Err(AcpiError::InvalidVcpus(0))
    ));
    assert!(matches!(
        build_tables(&config(255)),
        Err(AcpiError::InvalidVcpus(255))
    ));
    let bad = [
        VirtioMmioDevice {
            base: 0x1000,
            len: 0x1000,
            gsi: 5,
        },
        VirtioMmioDevice {
            base: 0xffff_f000,
            len: 0x2000,
            gsi: 5,
        },
        VirtioMmioDevice {
            base: 0xd000_0000,
            len: 0,
            gsi: 5,
        },
        VirtioMmioDevice {
            base: 0xd000_0000,
            len: 0x1000,
            gsi: 24,
        },
        VirtioMmioDevice {
            base: u64::MAX,
            len: u64::MAX,
            gsi: u32::MAX,
        },
    ];
    for dev in bad {
        let config = AcpiConfig {
            vcpus: 1,
            virtio: &[dev],
        };
        assert!(
            matches!(build_tables(&config), Err(AcpiError::InvalidDevice { .. })),
            "{dev:?}"
        );
    }
    let many = vec![DEVICES[0]; 257];
    let config = AcpiConfig {
        vcpus: 1,
        virtio: &many,
    };
    assert!(matches!(
        build_tables(&config),
        Err(AcpiError::TooManyDevices(257))
    ));
}

#[test]
fn the_largest_machine_fits_in_the_bios_area() {
    let many: Vec<VirtioMmioDevice> = (0..256)
        .map(|i| VirtioMmioDevice {
            base: 0xd000_0000 + i * 0x1000,
            len: 0x1000,
            gsi: 5 + (i as u32 % 19),
        })
        .collect();
    let tables = build_tables(&AcpiConfig {
        vcpus: MAX_VCPUS,
        virtio: &many,
    })
    .unwrap();
    let dsdt = &tables.get(b"DSDT").unwrap().bytes;
    assert_eq!(count(dsdt, b"LNRO0005\0"), 256);
    assert!(count(dsdt, b"VRFF") == 1);
}

#[test]
fn setup_acpi_writes_tables_a_guest_can_walk_from_the_rsdp() {
    let ram = GuestRam::new(64 << 20, Backing::Anonymous).unwrap();
    let mem = ram.memory();
    let rsdp_address = setup_acpi(mem, &config(2)).unwrap();
    let read = |addr: u64, len: usize| {
        let mut buf = vec![0; len];
        mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
        buf
    };
    let rsdp = read(rsdp_address, 36);
    assert_eq!(sum(&rsdp), 0);
    let table = |addr: u64| {
        let len = u32_at(&read(addr, 8), 4) as usize;
        let bytes = read(addr, len);
        assert_eq!(sum(&bytes), 0);
        bytes
    };
    let xsdt = table(u64_at(&rsdp, 24));
    let fadt = table(u64_at(&xsdt, 36));
    let madt = table(u64_at(&xsdt, 44));
    let dsdt = table(u64_at(&fadt, 140));
    assert_eq!(&fadt[..4], b"FACP");
    assert_eq!(&madt[..4], b"APIC");
    assert_eq!(&dsdt[..4], b"DSDT");
    assert_eq!(dsdt, dsdt_of(&config(2)));
}

fn dsdt_of(config: &AcpiConfig) -> Vec<u8> {
    dsdt(config).unwrap()
}

#[test]
fn setup_acpi_reports_memory_that_does_not_reach_the_bios_area() {
    // Guest RAM always covers the first MiB; a memory map without it is
    // an error, not a panic.
    let empty = GuestMemoryMmap::default();
    assert!(matches!(
        setup_acpi(&empty, &config(1)),
        Err(AcpiError::GuestMemory { .. })
    ));
}
