//! PVH boot parameters: `hvm_start_info`, its memory map and module list
//! (Xen `xen/include/public/arch-x86/hvm/start_info.h`, version 1).
//!
//! `hvm_start_info` goes at [`PVH_INFO_START`], the memory map at
//! [`PVH_MEMMAP_START`], then the module list (the initrd, if any); all of
//! it must end before the zero page.

use std::mem::size_of;

use chitin_memory::layout::{CMDLINE_START, PVH_INFO_START, PVH_MEMMAP_START, ZERO_PAGE_START};
use chitin_memory::{GuestMemoryMmap, MemoryLayout};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress};

use super::zero_page::e820_type;
use crate::BootError;

/// `hvm_start_info.magic` ("xEn3" with the high bit of 'x' set).
pub(super) const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
/// Structure version 1: has the memory map fields.
const START_INFO_VERSION: u32 = 1;

/// Write `hvm_start_info`, the memory map from `layout` and, with an initrd,
/// a one-module list.
pub(super) fn write(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    initrd: Option<(u64, u64)>,
    acpi_rsdp: Option<u64>,
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = layout
        .address_map()
        .iter()
        .map(|range| hvm_memmap_table_entry {
            addr: range.start,
            size: range.len,
            type_: e820_type(range.kind),
            reserved: 0,
        })
        .collect();
    let memmap_len = (memmap.len() * size_of::<hvm_memmap_table_entry>()) as u64;
    let modlist_addr = PVH_MEMMAP_START + memmap_len;
    let modules: Vec<hvm_modlist_entry> = initrd
        .iter()
        .map(|&(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            cmdline_paddr: 0,
            reserved: 0,
        })
        .collect();
    let modlist_len = (modules.len() * size_of::<hvm_modlist_entry>()) as u64;
    if size_of::<hvm_start_info>() as u64 > PVH_MEMMAP_START - PVH_INFO_START
        || modlist_addr + modlist_len > ZERO_PAGE_START
    {
        return Err(BootError::Overlap {
            what: "PVH start info and memory map",
        });
    }

    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: START_INFO_VERSION,
        flags: 0,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() { 0 } else { modlist_addr },
        cmdline_paddr: CMDLINE_START,
        // 0 without ACPI: the guest finds its CPUs in the MP table.
        rsdp_paddr: acpi_rsdp.unwrap_or(0),
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        reserved: 0,
    };
    mem.write_obj(start_info, GuestAddress(PVH_INFO_START))
        .map_err(BootError::GuestMemory)?;
    for (i, entry) in memmap.iter().enumerate() {
        let addr = PVH_MEMMAP_START + (i * size_of::<hvm_memmap_table_entry>()) as u64;
        mem.write_obj(*entry, GuestAddress(addr))
            .map_err(BootError::GuestMemory)?;
    }
    for (i, module) in modules.iter().enumerate() {
        let addr = modlist_addr + (i * size_of::<hvm_modlist_entry>()) as u64;
        mem.write_obj(*module, GuestAddress(addr))
            .map_err(BootError::GuestMemory)?;
    }
    Ok(())
}
