//! Placing and loading the initial ramdisk.
//!
//! Like other boot loaders (boot.rst, `initrd_addr_max`), the initrd goes
//! as high as possible: page aligned, ending at or below the kernel's
//! `initrd_addr_max` and the end of low RAM (so never in the MMIO gap), and
//! starting above everything the kernel needs while it starts.

use std::fs::File;
use std::path::Path;

use chitin_memory::layout::PAGE_SIZE;
use chitin_memory::{GuestMemoryMmap, MemoryLayout};
use vm_memory::{Bytes, GuestAddress};

use super::LoadedKernel;
use crate::BootError;

/// Load the initrd at `path` above `kernel`; return (guest address, size).
pub(super) fn load(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    path: &Path,
    kernel: &LoadedKernel,
) -> Result<(u64, u64), BootError> {
    let open_error = |source| BootError::OpenInitrd {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(open_error)?;
    let size = file.metadata().map_err(open_error)?.len();
    if size == 0 {
        return Err(BootError::EmptyInitrd {
            path: path.to_path_buf(),
        });
    }
    let addr = place(
        size,
        kernel.reserved_end,
        kernel.initrd_addr_max,
        layout.low_ram_end(),
    )?;
    // `place` bounded size by low RAM, which is addressable on the host.
    let count =
        usize::try_from(size).map_err(|_| BootError::InitrdDoesNotFit { size, available: 0 })?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, count)
        .map_err(|source| BootError::ReadInitrd {
            path: path.to_path_buf(),
            source,
        })?;
    Ok((addr, size))
}

/// The highest page-aligned address for `size` bytes that ends at or below
/// `addr_max` (inclusive) and `ram_end` (exclusive) and starts at or above
/// `lowest`.
fn place(size: u64, lowest: u64, addr_max: u64, ram_end: u64) -> Result<u64, BootError> {
    let lowest = lowest
        .checked_next_multiple_of(PAGE_SIZE)
        .unwrap_or(u64::MAX);
    let limit = addr_max.saturating_add(1).min(ram_end);
    let available = limit.saturating_sub(lowest);
    let does_not_fit = BootError::InitrdDoesNotFit { size, available };
    if size > available {
        return Err(does_not_fit);
    }
    let addr = (limit - size) & !(PAGE_SIZE - 1);
    if addr < lowest {
        return Err(does_not_fit);
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn place_goes_as_high_as_ram_allows() {
        // 1 MiB initrd, kernel up to 10 MiB, 64 MiB of RAM, high limit.
        let addr = place(MIB, 10 * MIB, 0x7fff_ffff, 64 * MIB).unwrap();
        assert_eq!(addr, 63 * MIB);
    }

    #[test]
    fn place_respects_inclusive_addr_max() {
        // addr_max 0x1ff_ffff: the last byte may be at 32 MiB - 1.
        let addr = place(MIB, 10 * MIB, 0x1ff_ffff, 64 * MIB).unwrap();
        assert_eq!(addr, 31 * MIB);
    }

    #[test]
    fn place_unaligned_size_is_page_aligned_down() {
        // 100 bytes end at or below 64 MiB; start page aligned.
        let addr = place(100, 10 * MIB, 0x7fff_ffff, 64 * MIB).unwrap();
        assert_eq!(addr, 64 * MIB - PAGE_SIZE);
    }

    #[test]
    fn place_too_large_does_not_fit() {
        // 60 MiB above a kernel ending at 10 MiB leaves 54 MiB.
        let err = place(60 * MIB, 10 * MIB, 0x7fff_ffff, 64 * MIB).unwrap_err();
        assert!(matches!(
            err,
            BootError::InitrdDoesNotFit { size, available }
                if size == 60 * MIB && available == 54 * MIB
        ));
    }

    #[test]
    fn place_exact_fit_starts_at_kernel_end() {
        let addr = place(54 * MIB, 10 * MIB, 0x7fff_ffff, 64 * MIB).unwrap();
        assert_eq!(addr, 10 * MIB);
    }

    #[test]
    fn place_limit_below_kernel_does_not_fit() {
        let err = place(PAGE_SIZE, 10 * MIB, 0x3f_ffff, 64 * MIB).unwrap_err();
        assert!(matches!(
            err,
            BootError::InitrdDoesNotFit { available: 0, .. }
        ));
    }
}
