//! The x86_64 guest physical address map of a chitin microVM, in one place.
//!
//! Every fixed guest address the VMM writes to or reserves is a named constant
//! here, so that the boot loader, the devices and the tests agree on one map.
//! This module only describes addresses; it never touches guest memory.
//!
//! ```text
//! 0x0000_0000 ┬ real-mode IVT / BDA (untouched)
//! 0x0000_0500 │ boot GDT, then IDT                     BOOT_GDT_START, BOOT_IDT_START
//! 0x0000_6000 │ PVH hvm_start_info (+ memory map)      PVH_INFO_START
//! 0x0000_7000 │ Linux zero page (struct boot_params)   ZERO_PAGE_START
//! 0x0000_8ff0 │ boot stack pointer (grows down)        BOOT_STACK_POINTER
//! 0x0000_9000 │ PML4, PDPT, 4 PDs (identity map 4 GiB) PML4_START, PDPTE_START, PDE_START
//! 0x0002_0000 │ kernel command line                    CMDLINE_START
//! 0x0009_fc00 ┼ EBDA: Intel MP table (reserved in e820) MPTABLE_START
//! 0x000a_0000 │ legacy VGA / BIOS ROM hole (reserved)
//! 0x000e_0000 │ ACPI: RSDP, XSDT, FADT, MADT, DSDT      ACPI_START
//! 0x0010_0000 ┼ kernel (HIMEM_START), then initrd high in low RAM
//!             │ ... RAM ...
//! 0xc000_0000 ┼ 32-bit MMIO gap: virtio-mmio windows, IOAPIC, LAPIC
//! 0x1_0000_0000 ┴ RAM above 4 GiB resumes here (guests larger than 3 GiB)
//! ```

/// Start of the boot GDT written for the 64-bit and PVH boot protocols.
pub const BOOT_GDT_START: u64 = 0x500;
/// Number of 8-byte entries in the boot GDT (null, code, data, TSS).
pub const BOOT_GDT_ENTRIES: u64 = 4;
/// Start of the (empty) boot IDT, right after the GDT.
pub const BOOT_IDT_START: u64 = BOOT_GDT_START + BOOT_GDT_ENTRIES * 8;
/// Where the PVH `hvm_start_info` structure lives (PVH boot only).
pub const PVH_INFO_START: u64 = 0x6000;
/// Where the PVH memory map array lives, after `hvm_start_info`.
pub const PVH_MEMMAP_START: u64 = PVH_INFO_START + 0x100;
/// Linux zero page (`struct boot_params`, 4 KiB).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page map of the boot identity mapping.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table of the boot identity mapping.
pub const PDPTE_START: u64 = 0xa000;
/// First of [`PDE_PAGES`] page directories of the boot identity mapping
/// (each 512 × 2 MiB = 1 GiB), so the first 4 GiB, MMIO gap included, are
/// mapped when the boot vCPU enters the kernel in long mode.
pub const PDE_START: u64 = 0xb000;
/// Number of page directories after [`PDE_START`].
pub const PDE_PAGES: u64 = 4;
/// Kernel command line, NUL-terminated.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line chitin accepts, NUL included. Linux x86 reads at most
/// `COMMAND_LINE_SIZE` (2048) bytes; a kernel's setup header may say less.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area; the Intel MP table is written here, where
/// Linux's `find_smp_config` scans (MP spec 1.4 §4: first KiB of the EBDA).
pub const EBDA_START: u64 = 0x9fc00;
/// Start of the Intel MP floating pointer + configuration table.
pub const MPTABLE_START: u64 = EBDA_START;
/// End of conventional memory: the EBDA and the 0xa0000-0xfffff hole are
/// reported as reserved.
pub const LOW_RAM_END: u64 = EBDA_START;
/// Where the ACPI RSDP is written, followed by the other ACPI tables up to
/// [`ACPI_END`]: in the BIOS area Linux scans for the RSDP (ACPI 6.5
/// §5.2.5.1: 0xe0000-0xfffff on 16-byte boundaries), which the e820 map
/// reports as reserved.
pub const ACPI_START: u64 = 0xe_0000;
/// End (exclusive) of the ACPI tables' area: the end of the BIOS area.
pub const ACPI_END: u64 = 0x10_0000;
/// Start of high memory (1 MiB): the kernel is loaded here.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap below 4 GiB: no RAM is mapped in it.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End (exclusive) of the 32-bit MMIO gap: 4 GiB.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// Size of the 32-bit MMIO gap.
pub const MMIO_GAP_SIZE: u64 = MMIO_GAP_END - MMIO_GAP_START;
/// First virtio-mmio device window; each device gets a 4 KiB window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_WINDOW: u64 = 0x1000;
/// Default physical address of the IOAPIC (Intel 82093AA datasheet).
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Default physical address of the local APIC (Intel SDM vol. 3 §10.4.1).
pub const LAPIC_START: u64 = 0xfee0_0000;

// The device windows must lie inside the gap, above the virtio windows'
// start; checked when the crate compiles.
const _: () = assert!(VIRTIO_MMIO_START >= MMIO_GAP_START);
const _: () = assert!(IOAPIC_START > VIRTIO_MMIO_START && LAPIC_START < MMIO_GAP_END);
// The ACPI tables sit in the BIOS hole, below the kernel.
const _: () = assert!(ACPI_START >= LOW_RAM_END && ACPI_END <= HIMEM_START);

/// Page size the map is aligned to.
pub const PAGE_SIZE: u64 = 0x1000;
/// Largest guest RAM chitin accepts (1 TiB), well inside the 46-bit guest
/// physical address space every x86_64 KVM host supports.
pub const MAX_RAM_SIZE: u64 = 1 << 40;

/// What a range of guest physical address space is used for; the boot loader
/// turns this into e820 entry types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeKind {
    /// Usable RAM.
    Ram,
    /// RAM or address space the guest must not use (EBDA, BIOS hole, MMIO gap).
    Reserved,
}

/// A range of guest physical addresses and what it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AddressRange {
    /// First address of the range.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// What the range holds.
    pub kind: RangeKind,
}

impl AddressRange {
    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// The address map for a guest with a given amount of RAM.
///
/// Invariant: `ram_size` is non-zero, page aligned and at most
/// [`MAX_RAM_SIZE`] (checked by [`crate::GuestRam::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryLayout {
    ram_size: u64,
}

impl MemoryLayout {
    /// The layout for `ram_size` bytes of RAM. The size is validated by
    /// [`crate::GuestRam::new`]; this constructor only describes.
    pub(crate) fn new(ram_size: u64) -> Self {
        Self { ram_size }
    }

    /// Total bytes of guest RAM.
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// Bytes of RAM mapped below the MMIO gap.
    pub fn low_ram_size(&self) -> u64 {
        self.ram_size.min(MMIO_GAP_START)
    }

    /// Bytes of RAM mapped from 4 GiB upwards.
    pub fn high_ram_size(&self) -> u64 {
        self.ram_size - self.low_ram_size()
    }

    /// One past the last RAM address below 4 GiB.
    pub fn low_ram_end(&self) -> u64 {
        self.low_ram_size()
    }

    /// The guest RAM regions as `(start, length)`, in address order: one
    /// below the MMIO gap and, for guests above 3 GiB, one from 4 GiB.
    pub fn ram_regions(&self) -> Vec<(u64, u64)> {
        let mut regions = vec![(0, self.low_ram_size())];
        if self.high_ram_size() > 0 {
            regions.push((MMIO_GAP_END, self.high_ram_size()));
        }
        regions
    }

    /// The guest physical address map as the guest should be told about it
    /// (e820 / PVH memory map), sorted and non-overlapping.
    ///
    /// Low RAM up to the EBDA is usable; the EBDA and BIOS hole up to 1 MiB
    /// are reserved; RAM from 1 MiB to the gap is usable; the MMIO gap is
    /// reserved so the guest never places a PCI BAR or its own data there;
    /// RAM above 4 GiB is usable.
    pub fn address_map(&self) -> Vec<AddressRange> {
        let mut map = Vec::with_capacity(5);
        let low_end = self.low_ram_end();
        map.push(AddressRange {
            start: 0,
            len: LOW_RAM_END.min(low_end),
            kind: RangeKind::Ram,
        });
        if low_end > LOW_RAM_END {
            map.push(AddressRange {
                start: LOW_RAM_END,
                len: HIMEM_START - LOW_RAM_END,
                kind: RangeKind::Reserved,
            });
        }
        if low_end > HIMEM_START {
            map.push(AddressRange {
                start: HIMEM_START,
                len: low_end - HIMEM_START,
                kind: RangeKind::Ram,
            });
        }
        map.push(AddressRange {
            start: MMIO_GAP_START,
            len: MMIO_GAP_SIZE,
            kind: RangeKind::Reserved,
        });
        if self.high_ram_size() > 0 {
            map.push(AddressRange {
                start: MMIO_GAP_END,
                len: self.high_ram_size(),
                kind: RangeKind::Ram,
            });
        }
        map
    }

    /// Whether `[start, start + len)` lies entirely in guest RAM.
    pub fn contains_ram(&self, start: u64, len: u64) -> bool {
        let Some(end) = start.checked_add(len) else {
            return false;
        };
        self.ram_regions()
            .iter()
            .any(|&(rs, rl)| start >= rs && end <= rs + rl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn fixed_addresses_do_not_overlap() {
        // Arrange: every fixed structure with its size.
        let mut fixed = [
            (BOOT_GDT_START, BOOT_GDT_ENTRIES * 8 + 8), // GDT + empty IDT
            (PVH_INFO_START, 0x1000),
            (ZERO_PAGE_START, 0x1000),
            (BOOT_STACK_POINTER - 0x800, 0x800),
            (PML4_START, 0x1000),
            (PDPTE_START, 0x1000),
            (PDE_START, PDE_PAGES * 0x1000),
            (CMDLINE_START, CMDLINE_MAX_SIZE as u64),
            (MPTABLE_START, HIMEM_START - MPTABLE_START),
        ];
        fixed.sort();
        // Assert: each ends before the next starts, and all lie below 1 MiB.
        for pair in fixed.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:x?}");
        }
        assert!(fixed.iter().all(|&(s, l)| s + l <= HIMEM_START));
    }

    #[test]
    fn layout_small_guest_has_one_region() {
        let layout = MemoryLayout::new(128 * MIB);
        assert_eq!(layout.ram_regions(), vec![(0, 128 * MIB)]);
        assert_eq!(layout.high_ram_size(), 0);
    }

    #[test]
    fn layout_large_guest_resumes_above_4g() {
        // 5 GiB: 3 GiB below the gap, the other 2 GiB from 4 GiB.
        let layout = MemoryLayout::new(5 * GIB);
        assert_eq!(
            layout.ram_regions(),
            vec![(0, 3 * GIB), (MMIO_GAP_END, 2 * GIB)]
        );
    }

    #[test]
    fn address_map_is_sorted_and_disjoint_and_covers_ram() {
        for size in [2 * MIB, 128 * MIB, 3 * GIB, 5 * GIB] {
            let layout = MemoryLayout::new(size);
            let map = layout.address_map();
            for pair in map.windows(2) {
                assert!(pair[0].end() <= pair[1].start, "{size:#x}: {map:x?}");
            }
            // RAM reported usable plus RAM reported reserved below 1 MiB
            // equals the RAM mapped.
            let usable: u64 = map
                .iter()
                .filter(|r| r.kind == RangeKind::Ram)
                .map(|r| r.len)
                .sum();
            let hidden = HIMEM_START - LOW_RAM_END;
            assert_eq!(usable + hidden, size, "{size:#x}");
        }
    }

    #[test]
    fn address_map_reserves_mmio_gap() {
        let map = MemoryLayout::new(128 * MIB).address_map();
        assert!(map.contains(&AddressRange {
            start: MMIO_GAP_START,
            len: MMIO_GAP_SIZE,
            kind: RangeKind::Reserved,
        }));
    }

    #[test]
    fn contains_ram_rejects_gap_and_overflow() {
        let layout = MemoryLayout::new(5 * GIB);
        assert!(layout.contains_ram(HIMEM_START, MIB));
        assert!(!layout.contains_ram(MMIO_GAP_START, 1));
        assert!(layout.contains_ram(MMIO_GAP_END, GIB));
        assert!(!layout.contains_ram(u64::MAX, 2));
    }
}
