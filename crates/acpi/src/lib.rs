//! The ACPI tables of chitin microVMs.
//!
//! Distribution kernels (Debian's, Ubuntu's, Fedora's) learn their machine
//! from ACPI only: without a MADT they see one CPU and no IOAPIC, they find
//! virtio-mmio devices only as `LNRO0005` devices in the DSDT, and they can
//! power off only through the FADT. This crate describes a chitin machine
//! that way, on rust-vmm's `acpi_tables`:
//!
//! - the RSDP (revision 2) at [`ACPI_START`], in the BIOS area Linux scans,
//!   and returned so the boot loader can also hand it over in the zero
//!   page (`acpi_rsdp_addr`) and PVH's `hvm_start_info`;
//! - the XSDT, listing the FADT and the MADT;
//! - a hardware-reduced FADT (ACPI 6.5 §4.1): no legacy PM blocks, no SCI,
//!   no fixed buttons, the sleep control and status registers and the reset
//!   register on [`chitin_devices::AcpiPm`]'s ports, the DSDT's 64-bit
//!   address, and boot flags that say there is no i8042 or VGA to probe;
//! - the MADT: one enabled local APIC per vCPU (APIC id = processor UID =
//!   vCPU index), the IOAPIC at GSI base 0, and the ISA interrupt override
//!   of COM1 (IRQ 4 on GSI 4, edge, active high: the trigger mode of its
//!   irqfd);
//! - the DSDT (AML): `\_S5_` (soft off) with [`S5_SLEEP_TYPE`], and under
//!   `\_SB` COM1 (`PNP0501`, its ports and interrupt), the CMOS clock
//!   (`PNP0B00`, ports only: it raises no interrupt) and every virtio-mmio
//!   device as `LNRO0005` with its window and edge-triggered, active-high
//!   interrupt. A hardware-reduced machine has no ISA identity mapping, so
//!   every interrupt a device uses is declared in its `_CRS`.
//!
//! [`build_tables`] returns the tables as bytes with their addresses (what
//! the tests walk); [`setup_acpi`] writes them to guest memory. Nothing
//! here panics on the configuration: a vCPU count or device list the
//! tables cannot describe is an [`AcpiError`].

#![deny(missing_docs)]

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Name, Package, ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags, FADT};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use chitin_devices::{
    COM1_BASE, COM1_IRQ, COM1_LEN, RESET_PORT, RESET_VALUE, RTC_BASE, RTC_LEN, S5_SLEEP_TYPE,
    SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT,
};
use chitin_memory::layout::{
    ACPI_END, ACPI_START, IOAPIC_START, LAPIC_START, MMIO_GAP_END, MMIO_GAP_START,
};
use chitin_memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

/// OEM id in every table header.
pub const OEM_ID: [u8; 6] = *b"CHITIN";
/// OEM revision in every table header.
const OEM_REVISION: u32 = 1;
/// Most vCPUs the MADT describes: APIC ids 0..=253 (the IOAPIC takes the
/// next id and 0xff is the broadcast id), as the MP table.
pub const MAX_VCPUS: u8 = 254;
/// Most interrupt inputs of the IOAPIC KVM emulates.
const IOAPIC_PINS: u32 = 24;

/// Length of an ACPI table header (ACPI 6.5 §5.2.6).
const HEADER_LEN: u32 = 36;
/// Length of the MADT's fixed part: header, local APIC address, flags.
const MADT_FIXED_LEN: u32 = 44;
/// MADT revision 5 (ACPI 6.3); the structures chitin writes (local APIC,
/// IOAPIC, interrupt source override) are unchanged since ACPI 1.0.
const MADT_REVISION: u8 = 5;
/// DSDT revision 2: AML integers are 64 bits wide.
const DSDT_REVISION: u8 = 2;
/// MADT Interrupt Source Override structure: type and length.
const MADT_ISO_TYPE: u8 = 2;
const MADT_ISO_LEN: u8 = 10;
/// MPS INTI flags: active high (polarity 01), edge triggered (trigger 01).
const INTI_EDGE_HIGH: u16 = 0b01 | (0b01 << 2);
/// FADT IA-PC boot architecture flags: VGA not present (bit 2). Clear
/// `LEGACY_DEVICES` and `8042`: no ISA device to probe beyond those the
/// DSDT lists, and no keyboard controller (chitin's i8042 only resets).
const IAPC_BOOT_ARCH: u16 = 1 << 2;
/// Alignment of each table after the RSDP.
const TABLE_ALIGN: u64 = 16;
/// Where the XSDT goes: after the 36-byte RSDP.
const XSDT_START: u64 = ACPI_START + 0x40;

/// A virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioDevice {
    /// Guest physical address of its register window.
    pub base: u64,
    /// Length of the window.
    pub len: u64,
    /// Its interrupt: an IOAPIC input (GSI), edge triggered, active high.
    pub gsi: u32,
}

/// What the tables describe.
#[derive(Debug, Clone, Copy)]
pub struct AcpiConfig<'a> {
    /// Number of vCPUs, 1 to [`MAX_VCPUS`].
    pub vcpus: u8,
    /// The virtio-mmio devices, in the order the guest should number them.
    pub virtio: &'a [VirtioMmioDevice],
}

/// Why the tables could not be built or written.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The vCPU count is 0 or above [`MAX_VCPUS`].
    #[error("ACPI tables describe 1 to {MAX_VCPUS} vCPUs, not {0}")]
    InvalidVcpus(u8),
    /// A device window outside the 32-bit MMIO gap, or an interrupt the
    /// IOAPIC does not have.
    #[error("virtio-mmio device at {base:#x} (+{len:#x}, GSI {gsi}) is outside the MMIO gap or the IOAPIC's 24 inputs")]
    InvalidDevice {
        /// Window start.
        base: u64,
        /// Window length.
        len: u64,
        /// Interrupt.
        gsi: u32,
    },
    /// More than the 256 devices the DSDT's names allow.
    #[error("{0} virtio-mmio devices; the DSDT names at most 256")]
    TooManyDevices(usize),
    /// The tables do not fit below [`ACPI_END`].
    #[error("ACPI tables end at {end:#x}, past the BIOS area's end {ACPI_END:#x}")]
    TooLarge {
        /// Where the last table would end.
        end: u64,
    },
    /// Writing a table to guest memory failed.
    #[error("writing the ACPI {table} table to guest memory")]
    GuestMemory {
        /// The table's signature.
        table: String,
        /// What the write reported.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// One system description table and where it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// Its signature: `XSDT`, `FACP`, `APIC`, `DSDT`.
    pub signature: [u8; 4],
    /// Guest physical address.
    pub address: u64,
    /// The whole table, header included.
    pub bytes: Vec<u8>,
}

/// Every table of a machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    /// The RSDP's address, [`ACPI_START`].
    pub rsdp_address: u64,
    /// The 36-byte RSDP.
    pub rsdp: Vec<u8>,
    /// XSDT, FADT, MADT and DSDT, in that order and in ascending addresses.
    pub tables: Vec<Table>,
}

impl Tables {
    /// The table with `signature`, if present.
    pub fn get(&self, signature: &[u8; 4]) -> Option<&Table> {
        self.tables.iter().find(|t| &t.signature == signature)
    }
}

/// AML bytes serialised ahead of time, so a list of children can own them.
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(&self.0);
    }
}

/// The bytes of one AML object.
fn aml(object: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    object.to_aml_bytes(&mut bytes);
    bytes
}

fn align_up(value: u64) -> u64 {
    value.next_multiple_of(TABLE_ALIGN)
}

/// A device `name` with `_HID` `hid`, `_UID` `uid` and `_CRS` `resources`.
fn device(name: &str, hid: &dyn Aml, uid: u8, resources: &[&dyn Aml]) -> Raw {
    let hid = Name::new("_HID".into(), hid);
    let uid = Name::new("_UID".into(), &uid);
    let crs = ResourceTemplate::new(resources.to_vec());
    let crs = Name::new("_CRS".into(), &crs);
    let children: Vec<&dyn Aml> = vec![&hid, &uid, &crs];
    Raw(aml(&Device::new(name.into(), children)))
}

/// An edge-triggered, active-high, exclusive interrupt the device consumes.
fn edge_interrupt(gsi: u32) -> Interrupt {
    Interrupt::new(true, true, false, false, gsi)
}

/// The DSDT's AML body (everything after the header).
fn dsdt_body(config: &AcpiConfig) -> Vec<u8> {
    // \_S5_: SLP_TYP for the sleep control register, and a second value
    // (SLP_TYPb, unused on a hardware-reduced machine).
    let s5: Vec<&dyn Aml> = vec![&S5_SLEEP_TYPE, &0u8];
    let mut body = aml(&Name::new("_S5_".into(), &Package::new(s5)));

    // The guest's ports and GSIs are u16/u32 by construction of the
    // chitin-devices constants.
    let com1_io = IO::new(COM1_BASE as u16, COM1_BASE as u16, 1, COM1_LEN as u8);
    let com1_irq = edge_interrupt(COM1_IRQ);
    let com1 = device("COM1", &EISAName::new("PNP0501"), 0, &[&com1_io, &com1_irq]);
    let rtc_io = IO::new(RTC_BASE as u16, RTC_BASE as u16, 1, RTC_LEN as u8);
    let rtc = device("RTC_", &EISAName::new("PNP0B00"), 0, &[&rtc_io]);

    let mut devices = vec![com1, rtc];
    for (index, dev) in config.virtio.iter().enumerate() {
        // Checked by `check_config`: the window is in the 32-bit gap and
        // there are at most 256 devices.
        let window = Memory32Fixed::new(true, dev.base as u32, dev.len as u32);
        let irq = edge_interrupt(dev.gsi);
        devices.push(device(
            &format!("VR{index:02X}"),
            &"LNRO0005",
            index as u8,
            &[&window, &irq],
        ));
    }
    let children: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
    body.extend(aml(&Scope::new("\\_SB_".into(), children)));
    body
}

fn check_config(config: &AcpiConfig) -> Result<(), AcpiError> {
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(AcpiError::InvalidVcpus(config.vcpus));
    }
    if config.virtio.len() > 256 {
        return Err(AcpiError::TooManyDevices(config.virtio.len()));
    }
    for dev in config.virtio {
        let in_gap = dev.base >= MMIO_GAP_START
            && dev.len > 0
            && dev
                .base
                .checked_add(dev.len)
                .is_some_and(|end| end <= MMIO_GAP_END);
        if !in_gap || dev.gsi >= IOAPIC_PINS {
            return Err(AcpiError::InvalidDevice {
                base: dev.base,
                len: dev.len,
                gsi: dev.gsi,
            });
        }
    }
    Ok(())
}

/// The DSDT for `config`, header included.
///
/// # Errors
///
/// As [`build_tables`], for the configuration checks.
pub fn dsdt(config: &AcpiConfig) -> Result<Vec<u8>, AcpiError> {
    check_config(config)?;
    let mut table = Sdt::new(
        *b"DSDT",
        HEADER_LEN,
        DSDT_REVISION,
        OEM_ID,
        *b"CHITDSDT",
        OEM_REVISION,
    );
    table.append_slice(&dsdt_body(config));
    Ok(table.as_slice().to_vec())
}

/// The MADT for `config`.
fn madt(config: &AcpiConfig) -> Vec<u8> {
    let mut table = Sdt::new(
        *b"APIC",
        MADT_FIXED_LEN,
        MADT_REVISION,
        OEM_ID,
        *b"CHITMADT",
        OEM_REVISION,
    );
    // The layout's LAPIC address is below 4 GiB by its own assertion.
    table.write_u32(HEADER_LEN as usize, LAPIC_START as u32);
    // Flags: no PC-AT dual 8259s (a hardware-reduced machine has none).
    table.write_u32(HEADER_LEN as usize + 4, 0);
    for id in 0..config.vcpus {
        table.append_slice(&aml(&ProcessorLocalApic::new(
            id,
            id,
            EnabledStatus::Enabled,
        )));
    }
    // The IOAPIC's id follows the vCPUs' APIC ids, as in the MP table.
    table.append_slice(&aml(&IoApic::new(config.vcpus, IOAPIC_START as u32, 0)));
    let mut iso = vec![MADT_ISO_TYPE, MADT_ISO_LEN, 0, COM1_IRQ as u8];
    iso.extend_from_slice(&COM1_IRQ.to_le_bytes());
    iso.extend_from_slice(&INTI_EDGE_HIGH.to_le_bytes());
    table.append_slice(&iso);
    table.as_slice().to_vec()
}

/// A byte-wide register at I/O port `port`.
fn io_register(port: u64) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

/// The hardware-reduced FADT pointing at the DSDT at `dsdt_address`.
fn fadt(dsdt_address: u64) -> Vec<u8> {
    let mut builder = FADTBuilder::new(OEM_ID, *b"CHITFACP", OEM_REVISION)
        .dsdt_64(dsdt_address)
        .flag(Flags::HwReducedAcpi)
        // No fixed-feature power or sleep button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    builder.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    builder.sleep_control_reg = io_register(SLEEP_CONTROL_PORT);
    builder.sleep_status_reg = io_register(SLEEP_STATUS_PORT);
    builder.reset_reg = io_register(RESET_PORT);
    builder.reset_value = RESET_VALUE;
    aml(&builder.finalize())
}

/// Build every table for `config`, placed from [`ACPI_START`].
///
/// # Errors
///
/// [`AcpiError::InvalidVcpus`], [`AcpiError::InvalidDevice`] or
/// [`AcpiError::TooManyDevices`] for a configuration the tables cannot
/// describe; [`AcpiError::TooLarge`] when they would not fit below
/// [`ACPI_END`].
pub fn build_tables(config: &AcpiConfig) -> Result<Tables, AcpiError> {
    let dsdt = dsdt(config)?;
    let madt = madt(config);
    // XSDT: header plus one 8-byte pointer per table it lists.
    let xsdt_len = u64::from(HEADER_LEN) + 2 * 8;
    let fadt_address = align_up(XSDT_START + xsdt_len);
    let madt_address = align_up(fadt_address + FADT::len() as u64);
    let dsdt_address = align_up(madt_address + madt.len() as u64);
    let end = dsdt_address + dsdt.len() as u64;
    if end > ACPI_END {
        return Err(AcpiError::TooLarge { end });
    }
    let fadt = fadt(dsdt_address);

    let mut xsdt = XSDT::new(OEM_ID, *b"CHITXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_address);
    xsdt.add_entry(madt_address);
    let xsdt = aml(&xsdt);

    Ok(Tables {
        rsdp_address: ACPI_START,
        rsdp: aml(&Rsdp::new(OEM_ID, XSDT_START)),
        tables: vec![
            Table {
                signature: *b"XSDT",
                address: XSDT_START,
                bytes: xsdt,
            },
            Table {
                signature: *b"FACP",
                address: fadt_address,
                bytes: fadt,
            },
            Table {
                signature: *b"APIC",
                address: madt_address,
                bytes: madt,
            },
            Table {
                signature: *b"DSDT",
                address: dsdt_address,
                bytes: dsdt,
            },
        ],
    })
}

/// Build the tables for `config` and write them to `mem`; returns the
/// RSDP's address for the boot loader to hand over.
///
/// # Errors
///
/// As [`build_tables`], and [`AcpiError::GuestMemory`] when guest memory
/// does not cover the BIOS area.
pub fn setup_acpi(mem: &GuestMemoryMmap, config: &AcpiConfig) -> Result<u64, AcpiError> {
    let tables = build_tables(config)?;
    let write = |name: &str, bytes: &[u8], address: u64| {
        mem.write_slice(bytes, GuestAddress(address))
            .map_err(|source| AcpiError::GuestMemory {
                table: name.to_string(),
                source,
            })
    };
    write("RSDP", &tables.rsdp, tables.rsdp_address)?;
    for table in &tables.tables {
        write(
            &String::from_utf8_lossy(&table.signature),
            &table.bytes,
            table.address,
        )?;
    }
    Ok(tables.rsdp_address)
}

#[cfg(test)]
mod tests;
