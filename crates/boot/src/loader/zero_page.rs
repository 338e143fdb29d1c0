//! The Linux zero page (`struct boot_params`) for the 64-bit boot protocol.
//!
//! It starts from the kernel's own setup header (bzImage) or one built here
//! (ELF), then gets the fields a boot loader must fill (boot.rst, "Details
//! of Header Fields"): loader type, command line pointer, ramdisk, and the
//! e820 memory map from [`MemoryLayout::address_map`].

use chitin_memory::layout::{RangeKind, CMDLINE_MAX_SIZE, CMDLINE_START, ZERO_PAGE_START};
use chitin_memory::{GuestMemoryMmap, MemoryLayout};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header, LOADED_HIGH};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use crate::BootError;

/// `boot_flag`: the boot sector signature 0xAA55.
const BOOT_FLAG: u16 = 0xaa55;
/// `header`: "HdrS" read as a little-endian u32.
const HDRS_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader`: 0xff, "undefined" boot loader (boot.rst).
const LOADER_UNDEFINED: u8 = 0xff;
/// `kernel_alignment` an x86_64 kernel is built with (16 MiB,
/// `CONFIG_PHYSICAL_ALIGN` default).
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;
/// e820 type of usable RAM.
pub(super) const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub(super) const E820_RESERVED: u32 = 2;

/// A setup header for an ELF kernel, which has none of its own: what a
/// bzImage header would say about a kernel loaded high.
pub(super) fn elf_header() -> setup_header {
    setup_header {
        boot_flag: BOOT_FLAG,
        header: HDRS_MAGIC,
        loadflags: LOADED_HIGH as u8,
        kernel_alignment: KERNEL_ALIGNMENT,
        cmdline_size: (CMDLINE_MAX_SIZE - 1) as u32,
        ..Default::default()
    }
}

/// The e820 type of an address map range.
pub(super) fn e820_type(kind: RangeKind) -> u32 {
    match kind {
        RangeKind::Ram => E820_RAM,
        RangeKind::Reserved => E820_RESERVED,
    }
}

/// Write the zero page at [`ZERO_PAGE_START`].
pub(super) fn write(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    header: setup_header,
    initrd: Option<(u64, u64)>,
    acpi_rsdp: Option<u64>,
) -> Result<(), BootError> {
    let mut params = boot_params::zeroed();
    // Kernels before boot protocol 2.14 ignore it and scan the BIOS area,
    // where the RSDP also is.
    params.acpi_rsdp_addr = acpi_rsdp.unwrap_or(0);
    params.hdr = header;
    params.hdr.type_of_loader = LOADER_UNDEFINED;
    // The command line and initrd lie below 4 GiB (low RAM), so the 32-bit
    // fields hold them; the ext_* high halves stay zero.
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    let (ramdisk_image, ramdisk_size) = initrd.unwrap_or((0, 0));
    params.hdr.ramdisk_image = ramdisk_image as u32;
    params.hdr.ramdisk_size = ramdisk_size as u32;

    let map = layout.address_map();
    let mut table = params.e820_table;
    if map.len() > table.len() {
        return Err(BootError::Overlap {
            what: "e820 map beyond the zero page table",
        });
    }
    for (slot, range) in table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: range.start,
            size: range.len,
            type_: e820_type(range.kind),
        };
    }
    params.e820_table = table;
    // At most 5 ranges, checked against the 128-slot table above.
    params.e820_entries = map.len() as u8;

    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(BootError::GuestMemory)
}
