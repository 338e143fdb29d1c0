//! Guest RAM of a chitin microVM.
//!
//! This crate owns the x86_64 guest physical address map ([`layout`]) and the
//! host memory behind guest RAM ([`GuestRam`]). RAM is mapped with
//! `MAP_NORESERVE` and never touched here, so the host's resident memory grows
//! only with the pages the guest actually uses. It must never read or write
//! guest memory on behalf of a guest: that is the devices' job.

#![deny(missing_docs)]

pub mod layout;

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
pub use layout::MemoryLayout;
use vm_memory::{FileOffset, GuestAddress, GuestMemory, GuestMemoryRegion};

/// The guest memory type every chitin crate uses.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Smallest guest RAM chitin accepts: the kernel is loaded at 1 MiB and needs
/// room above it.
pub const MIN_RAM_SIZE: u64 = 2 << 20;

/// Why guest RAM could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is below [`MIN_RAM_SIZE`] (this includes 0).
    #[error("guest memory of {0} bytes is too small: at least {MIN_RAM_SIZE} bytes are needed")]
    TooSmall(u64),
    /// The requested size is not a multiple of the 4 KiB page size.
    #[error("guest memory size {0:#x} is not a multiple of the 4 KiB page size")]
    Unaligned(u64),
    /// The requested size is above [`layout::MAX_RAM_SIZE`].
    #[error("guest memory of {0} bytes exceeds the 1 TiB maximum")]
    TooLarge(u64),
    /// `memfd_create` or `ftruncate` failed for memfd backing.
    #[error("cannot create memfd backing for guest memory")]
    Memfd(#[source] io::Error),
    /// The host could not map the requested guest memory.
    #[error("host cannot map {size} bytes of guest memory")]
    Map {
        /// Bytes requested.
        size: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// KVM refused a memory slot.
    #[error("cannot register guest memory slot {slot} with KVM")]
    RegisterSlot {
        /// The slot number.
        slot: u32,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// What host memory backs guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Backing {
    /// Private anonymous memory (the default, cheapest).
    #[default]
    Anonymous,
    /// A sealed-size memfd mapped shared, so another process (a vhost-user
    /// backend, a snapshot writer) can map the same pages.
    Memfd,
}

/// Guest RAM: the mapped regions, the layout they follow and, for memfd
/// backing, the file that holds them.
#[derive(Debug)]
pub struct GuestRam {
    memory: GuestMemoryMmap,
    layout: MemoryLayout,
    memfd: Option<File>,
}

impl GuestRam {
    /// Map `size` bytes of guest RAM following the x86_64 layout.
    ///
    /// No page is touched: host RSS does not grow until the guest uses RAM.
    pub fn new(size: u64, backing: Backing) -> Result<Self, MemoryError> {
        validate_size(size)?;
        let layout = MemoryLayout::new(size);
        let regions = layout.ram_regions();
        let memfd = match backing {
            Backing::Anonymous => None,
            Backing::Memfd => Some(create_memfd(size)?),
        };
        let mut file_offset = 0;
        let mut ranges = Vec::with_capacity(regions.len());
        for &(start, len) in &regions {
            let fo = match &memfd {
                Some(file) => {
                    let dup = file.try_clone().map_err(MemoryError::Memfd)?;
                    Some(FileOffset::new(dup, file_offset))
                }
                None => None,
            };
            file_offset += len;
            // `len` fits usize: size was checked against MAX_RAM_SIZE.
            ranges.push((GuestAddress(start), len as usize, fo));
        }
        let memory = GuestMemoryMmap::from_ranges_with_files(ranges)
            .map_err(|source| MemoryError::Map { size, source })?;
        Ok(Self {
            memory,
            layout,
            memfd,
        })
    }

    /// The mapped guest memory, for the loader and the devices.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.memory
    }

    /// The address map this RAM follows.
    pub fn layout(&self) -> &MemoryLayout {
        &self.layout
    }

    /// The memfd holding guest RAM, when backed by one.
    pub fn memfd(&self) -> Option<&File> {
        self.memfd.as_ref()
    }

    /// Bytes of guest RAM resident in host memory right now (`mincore`):
    /// what the guest has touched, as opposed to what it was given.
    pub fn resident_bytes(&self) -> io::Result<u64> {
        let page = layout::PAGE_SIZE as usize;
        let mut resident = 0u64;
        for region in self.memory.iter() {
            let len = region.len() as usize;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| io::Error::other(e.to_string()))?;
            let mut vec = vec![0u8; len.div_ceil(page)];
            // SAFETY: `host` is the page-aligned start of a live mapping of
            // `len` bytes owned by `self.memory`; `vec` has one byte per page
            // of it, as mincore(2) requires.
            let ret = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
            if ret != 0 {
                return Err(io::Error::last_os_error());
            }
            let pages = vec.iter().filter(|&&b| b & 1 != 0).count() as u64;
            resident += pages * layout::PAGE_SIZE;
        }
        Ok(resident)
    }

    /// Register every RAM region with KVM as memory slots 0, 1, ...
    pub fn register(&self, vm: &VmFd) -> Result<(), MemoryError> {
        for (slot, region) in self.memory.iter().enumerate() {
            let slot = slot as u32;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .expect("a mapped region has a host address at offset 0");
            let desc = kvm_userspace_memory_region {
                slot,
                flags: 0,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
            };
            // SAFETY: `host` is the start of a live mapping of `region.len()`
            // bytes owned by `self.memory`. The caller keeps this `GuestRam`
            // alive for as long as the VM uses the slot (the facade drops the
            // VM before the memory).
            unsafe { vm.set_user_memory_region(desc) }
                .map_err(|source| MemoryError::RegisterSlot { slot, source })?;
        }
        Ok(())
    }
}

fn validate_size(size: u64) -> Result<(), MemoryError> {
    if size < MIN_RAM_SIZE {
        return Err(MemoryError::TooSmall(size));
    }
    if size > layout::MAX_RAM_SIZE {
        return Err(MemoryError::TooLarge(size));
    }
    if size % layout::PAGE_SIZE != 0 {
        return Err(MemoryError::Unaligned(size));
    }
    Ok(())
}

fn create_memfd(size: u64) -> Result<File, MemoryError> {
    let name = c"chitin-guest-ram";
    // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size).map_err(MemoryError::Memfd)?;
    debug_assert!(file.as_raw_fd() >= 0);
    Ok(file)
}

#[cfg(test)]
mod tests {
    use vm_memory::Bytes;

    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn new_zero_size_is_too_small() {
        assert!(matches!(
            GuestRam::new(0, Backing::Anonymous),
            Err(MemoryError::TooSmall(0))
        ));
    }

    #[test]
    fn new_unaligned_size_is_rejected() {
        // One byte past 4 MiB is not a whole number of pages.
        assert!(matches!(
            GuestRam::new(4 * MIB + 1, Backing::Anonymous),
            Err(MemoryError::Unaligned(_))
        ));
    }

    #[test]
    fn new_huge_size_is_too_large() {
        assert!(matches!(
            GuestRam::new(layout::MAX_RAM_SIZE + layout::PAGE_SIZE, Backing::Anonymous),
            Err(MemoryError::TooLarge(_))
        ));
    }

    #[test]
    fn new_anonymous_maps_layout_regions() {
        let ram = GuestRam::new(64 * MIB, Backing::Anonymous).unwrap();
        assert_eq!(ram.memory().num_regions(), 1);
        assert_eq!(ram.memory().last_addr(), GuestAddress(64 * MIB - 1));
        assert!(ram.memfd().is_none());
    }

    #[test]
    fn new_memfd_backing_is_shared_with_file() {
        // Arrange: 4 MiB backed by a memfd.
        let ram = GuestRam::new(4 * MIB, Backing::Memfd).unwrap();
        // Act: write through the guest mapping.
        ram.memory()
            .write_obj(0xabcd_u16, GuestAddress(0x1000))
            .unwrap();
        // Assert: the bytes are in the file.
        let mut buf = [0u8; 2];
        let file = ram.memfd().unwrap();
        std::os::unix::fs::FileExt::read_exact_at(file, &mut buf, 0x1000).unwrap();
        assert_eq!(u16::from_le_bytes(buf), 0xabcd);
        assert_eq!(file.metadata().unwrap().len(), 4 * MIB);
    }

    #[test]
    fn resident_bytes_counts_only_touched_pages() {
        // Arrange: 16 MiB, nothing touched yet.
        let ram = GuestRam::new(16 * MIB, Backing::Anonymous).unwrap();
        assert_eq!(ram.resident_bytes().unwrap(), 0);
        // Act: touch three pages.
        for page in [0u64, 5, 4095] {
            ram.memory()
                .write_obj(1u8, GuestAddress(page * layout::PAGE_SIZE))
                .unwrap();
        }
        // Assert
        assert_eq!(ram.resident_bytes().unwrap(), 3 * layout::PAGE_SIZE);
    }

    #[test]
    fn new_large_guest_does_not_touch_pages() {
        // 64 GiB of NORESERVE mapping would be impossible to back if touched;
        // mapping succeeds because nothing is.
        let ram = GuestRam::new(64 << 30, Backing::Anonymous).unwrap();
        assert_eq!(ram.memory().num_regions(), 2);
    }
}
