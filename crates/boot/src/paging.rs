//! Identity page tables for entering the kernel in long mode.
//!
//! The Linux 64-bit boot protocol (boot.rst, "64-bit Boot Protocol") wants
//! the kernel, zero page and command line identity mapped. One PML4 entry,
//! one PDPT with [`PDE_PAGES`] entries and that many page directories of
//! 2 MiB pages map the whole first 4 GiB (MMIO gap included), so the kernel
//! can reach its devices before it builds its own tables. Each table is
//! written as a whole 4 KiB page so no stale entry survives.

use chitin_memory::layout::{PAGE_SIZE, PDE_PAGES, PDE_START, PDPTE_START, PML4_START};
use chitin_memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use crate::BootError;

/// Entry bits: present.
const PTE_PRESENT: u64 = 1 << 0;
/// Entry bits: writable.
const PTE_WRITABLE: u64 = 1 << 1;
/// Entry bits: in a page directory, the entry maps a 2 MiB page (PS).
const PTE_HUGE: u64 = 1 << 7;
/// Bytes mapped by one page-directory entry with PS set.
const HUGE_PAGE_SIZE: u64 = 2 << 20;
/// 8-byte entries per 4 KiB table.
const ENTRIES_PER_TABLE: usize = 512;

/// Write PML4 → PDPT → page directories identity-mapping `0..4 GiB`.
pub(crate) fn write_identity_map(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    write_table(mem, PML4_START, |i| {
        (i == 0).then_some(PDPTE_START | PTE_PRESENT | PTE_WRITABLE)
    })?;
    write_table(mem, PDPTE_START, |i| {
        ((i as u64) < PDE_PAGES)
            .then(|| (PDE_START + i as u64 * PAGE_SIZE) | PTE_PRESENT | PTE_WRITABLE)
    })?;
    for dir in 0..PDE_PAGES {
        let first_page = dir * ENTRIES_PER_TABLE as u64;
        write_table(mem, PDE_START + dir * PAGE_SIZE, |i| {
            let addr = (first_page + i as u64) * HUGE_PAGE_SIZE;
            Some(addr | PTE_PRESENT | PTE_WRITABLE | PTE_HUGE)
        })?;
    }
    Ok(())
}

/// Write one 4 KiB table at `addr`; `entry(i)` gives entry `i`, `None`
/// leaves it not present.
fn write_table(
    mem: &GuestMemoryMmap,
    addr: u64,
    entry: impl Fn(usize) -> Option<u64>,
) -> Result<(), BootError> {
    let mut page = [0u8; PAGE_SIZE as usize];
    for (i, slot) in page.chunks_exact_mut(8).enumerate() {
        slot.copy_from_slice(&entry(i).unwrap_or(0).to_le_bytes());
    }
    mem.write_slice(&page, GuestAddress(addr))
        .map_err(BootError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use chitin_memory::{Backing, GuestRam};

    use super::*;

    fn entry(mem: &GuestMemoryMmap, table: u64, index: u64) -> u64 {
        mem.read_obj(GuestAddress(table + index * 8)).unwrap()
    }

    #[test]
    fn write_identity_map_maps_first_and_last_2m_pages() {
        // Arrange: 64 MiB of RAM holds all tables (they lie below 64 KiB).
        let ram = GuestRam::new(64 << 20, Backing::Anonymous).unwrap();
        let mem = ram.memory();
        // Act
        write_identity_map(mem).unwrap();
        // Assert: 0x83 = present | writable | 2 MiB page.
        assert_eq!(entry(mem, PDE_START, 0), 0x83);
        assert_eq!(entry(mem, PDE_START, 1), HUGE_PAGE_SIZE | 0x83);
        // The last entry of the last directory maps 4 GiB - 2 MiB.
        let last_dir = PDE_START + (PDE_PAGES - 1) * PAGE_SIZE;
        assert_eq!(entry(mem, last_dir, 511), 0xffe0_0000 | 0x83);
    }

    #[test]
    fn write_identity_map_links_pml4_pdpt_and_directories() {
        let ram = GuestRam::new(64 << 20, Backing::Anonymous).unwrap();
        let mem = ram.memory();
        write_identity_map(mem).unwrap();
        // 0x3 = present | writable.
        assert_eq!(entry(mem, PML4_START, 0), PDPTE_START | 0x3);
        assert_eq!(entry(mem, PML4_START, 1), 0);
        for i in 0..PDE_PAGES {
            assert_eq!(
                entry(mem, PDPTE_START, i),
                (PDE_START + i * PAGE_SIZE) | 0x3
            );
        }
        assert_eq!(entry(mem, PDPTE_START, PDE_PAGES), 0);
    }

    #[test]
    fn write_identity_map_clears_stale_entries() {
        let ram = GuestRam::new(64 << 20, Backing::Anonymous).unwrap();
        let mem = ram.memory();
        mem.write_obj(u64::MAX, GuestAddress(PML4_START + 8))
            .unwrap();
        write_identity_map(mem).unwrap();
        assert_eq!(entry(mem, PML4_START, 1), 0);
    }
}
