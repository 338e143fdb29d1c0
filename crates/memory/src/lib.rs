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
use vm_memory::mmap::MmapRegionBuilder;
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
    /// A snapshot's memory file could not be read or written.
    #[error("snapshot memory file")]
    Snapshot(#[source] io::Error),
    /// A snapshot's memory file is not the size of the RAM it holds.
    #[error("snapshot memory file holds {have} bytes, the guest has {want}")]
    SnapshotSize {
        /// The file's size.
        have: u64,
        /// Guest RAM's size.
        want: u64,
    },
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
    /// Mapped copy-on-write from a snapshot's memory file.
    from_file: bool,
}

/// Page present in RAM (proc(5), pagemap).
const PAGE_PRESENT: u64 = 1 << 63;
/// Page swapped out.
const PAGE_SWAPPED: u64 = 1 << 62;
/// Page of a file, or shared anonymous memory (not a private copy).
const PAGE_FILE: u64 = 1 << 61;

/// `test` of each `/proc/self/pagemap` entry of the `len / 4 KiB` pages at
/// `host`, read in chunks.
fn pagemap(host: usize, len: usize, test: impl Fn(u64) -> bool) -> io::Result<Vec<bool>> {
    use std::os::unix::fs::FileExt;
    /// Pagemap entries read at once (256 KiB, for 128 MiB of RAM).
    const CHUNK_PAGES: usize = 32 << 10;
    let pagemap = File::open("/proc/self/pagemap")?;
    let page = layout::PAGE_SIZE as usize;
    let pages = len / page;
    let mut out = Vec::with_capacity(pages);
    let mut entries = vec![0u8; CHUNK_PAGES.min(pages) * 8];
    let mut done = 0;
    while done < pages {
        let n = CHUNK_PAGES.min(pages - done);
        let buf = &mut entries[..n * 8];
        pagemap.read_exact_at(buf, ((host / page + done) * 8) as u64)?;
        out.extend(buf.chunks_exact(8).map(|e| {
            let mut v = [0u8; 8];
            v.copy_from_slice(e);
            test(u64::from_le_bytes(v))
        }));
        done += n;
    }
    Ok(out)
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
        // Each region is mapped into a hole prepared at a 2 MiB boundary
        // (see `AlignedHole`), one region at a time.
        let mut mapped = Vec::with_capacity(ranges.len());
        for (start, len, fo) in ranges {
            let hole = AlignedHole::prepare(len);
            let region = vm_memory::GuestRegionMmap::from_range(start, len, fo);
            drop(hole);
            mapped.push(region.map_err(|source| MemoryError::Map { size, source })?);
        }
        let memory = GuestMemoryMmap::from_regions(mapped).map_err(|e| MemoryError::Map {
            size,
            source: e.into(),
        })?;
        Ok(Self {
            memory,
            layout,
            memfd,
            from_file: false,
        })
    }

    /// Map guest RAM of `size` bytes from `file` (a snapshot's memory,
    /// as [`GuestRam::save`] wrote it) copy-on-write: nothing is read
    /// until the guest touches it, and what the guest writes stays in this
    /// mapping, never in the file. Many `GuestRam`s may map one file and
    /// share the pages none of them wrote; the file must not change while
    /// any of them lives.
    pub fn from_snapshot(file: &File, size: u64) -> Result<Self, MemoryError> {
        validate_size(size)?;
        let have = file.metadata().map_err(MemoryError::Snapshot)?.len();
        if have != size {
            return Err(MemoryError::SnapshotSize { have, want: size });
        }
        let layout = MemoryLayout::new(size);
        let mut file_offset = 0;
        let mut mapped = Vec::new();
        for (start, len) in layout.ram_regions() {
            let dup = file.try_clone().map_err(MemoryError::Snapshot)?;
            let hole = AlignedHole::prepare(len as usize);
            let region = MmapRegionBuilder::new(len as usize)
                .with_file_offset(FileOffset::new(dup, file_offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
                .build();
            drop(hole);
            let region = region.map_err(|e| MemoryError::Map {
                size,
                source: e.into(),
            })?;
            mapped.push(
                vm_memory::GuestRegionMmap::new(region, GuestAddress(start)).ok_or(
                    MemoryError::Map {
                        size,
                        source: vm_memory::mmap::FromRangesError::InvalidGuestRegion,
                    },
                )?,
            );
            file_offset += len;
        }
        let memory = GuestMemoryMmap::from_regions(mapped).map_err(|e| MemoryError::Map {
            size,
            source: e.into(),
        })?;
        Ok(Self {
            memory,
            layout,
            memfd: None,
            from_file: true,
        })
    }

    /// Write guest RAM to `file` (truncated to RAM's size first) for a
    /// snapshot, regions back to back in address order: only pages that
    /// hold something are written, so untouched and zero pages stay holes.
    /// Returns the bytes written.
    ///
    /// # Safety
    ///
    /// Nothing may write guest RAM while this reads it: every vCPU paused
    /// and every device at rest. (It reads RAM as plain bytes.)
    pub unsafe fn save(&self, file: &File) -> Result<u64, MemoryError> {
        use std::os::unix::fs::FileExt;
        let page = layout::PAGE_SIZE as usize;
        file.set_len(0).map_err(MemoryError::Snapshot)?;
        file.set_len(self.layout.ram_size())
            .map_err(MemoryError::Snapshot)?;
        let mut written = 0u64;
        let mut file_offset = 0u64;
        for region in self.memory.iter() {
            let len = region.len() as usize;
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| MemoryError::Snapshot(io::Error::other(e.to_string())))?;
            let mapped = self.mapped_pages(host as usize, len)?;
            // SAFETY: `host` is the start of a live mapping of `len` bytes
            // owned by `self.memory`; the caller guarantees (this
            // function's contract) that nothing writes it while this
            // reads, so a shared view of plain bytes is sound.
            let bytes = unsafe { std::slice::from_raw_parts(host.cast_const(), len) };
            // Runs of pages with data, each written with one call.
            let mut run: Option<usize> = None;
            for (i, chunk) in bytes.chunks(page).enumerate() {
                let data = mapped.as_ref().is_none_or(|m| m[i]) && chunk.iter().any(|&b| b != 0);
                match (data, run) {
                    (true, None) => run = Some(i * page),
                    (false, Some(start)) => {
                        file.write_all_at(&bytes[start..i * page], file_offset + start as u64)
                            .map_err(MemoryError::Snapshot)?;
                        written += (i * page - start) as u64;
                        run = None;
                    }
                    _ => {}
                }
            }
            if let Some(start) = run {
                file.write_all_at(&bytes[start..], file_offset + start as u64)
                    .map_err(MemoryError::Snapshot)?;
                written += (len - start) as u64;
            }
            file_offset += len as u64;
        }
        Ok(written)
    }

    /// For anonymous RAM, which of the `len / 4 KiB` pages at `host` the
    /// guest ever touched (present or swapped out, per
    /// `/proc/self/pagemap`): the others are zero and need not be read.
    /// `None` for RAM backed by a file or memfd, whose untouched pages may
    /// hold data, or where the pagemap cannot be read: then every page is
    /// read.
    fn mapped_pages(&self, host: usize, len: usize) -> Result<Option<Vec<bool>>, MemoryError> {
        if self.memfd.is_some() || self.from_file {
            return Ok(None);
        }
        Ok(pagemap(host, len, |e| e & (PAGE_PRESENT | PAGE_SWAPPED) != 0).ok())
    }

    /// Bytes of guest RAM this sandbox holds on its own: for RAM mapped
    /// from a snapshot, the pages the guest wrote (its private copies; the
    /// pages it only read are the snapshot file's, shared with every clone
    /// and the page cache); otherwise what it touched, as
    /// [`GuestRam::resident_bytes`].
    pub fn private_bytes(&self) -> io::Result<u64> {
        if !self.from_file {
            return self.resident_bytes();
        }
        let mut private = 0u64;
        for region in self.memory.iter() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| io::Error::other(e.to_string()))?;
            let own = pagemap(host as usize, region.len() as usize, |e| {
                e & (PAGE_PRESENT | PAGE_SWAPPED) != 0 && e & PAGE_FILE == 0
            })?;
            private += own.iter().filter(|&&b| b).count() as u64 * layout::PAGE_SIZE;
        }
        Ok(private)
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
    /// what the guest has touched, as opposed to what it was given. For
    /// RAM mapped from a snapshot this counts the snapshot file's pages in
    /// the page cache too, shared with every clone: see
    /// [`GuestRam::private_bytes`].
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

/// Huge page size of x86_64 (2 MiB): where guest RAM should start in the
/// host's address space.
const HUGE_PAGE: usize = 2 << 20;

/// A hole of a region's length at a 2 MiB-aligned host address, fenced by
/// inaccessible guard mappings, so that the next `mmap(NULL, len)` (the
/// one vm-memory makes) lands in it.
///
/// KVM maps guest memory with 2 MiB pages in its nested page tables only
/// where the host mapping is backed by transparent huge pages *and* host
/// and guest addresses agree modulo 2 MiB. Linux before 6.7 does not align
/// large anonymous mappings, so vm-memory's mapping usually starts
/// mid-huge-page: every 4 KiB page the guest touches is then a nested page
/// fault. Measured in the nested tier (kvm-clock's "sched offset", guest
/// time from VM start to the kernel's clock, Debian's bzImage
/// decompressing itself, three boots each): 1.66-3.0 G cycles unaligned,
/// 0.59-0.87 G aligned, where QEMU, which aligns its RAM, took 0.71-1.05 G
/// in the same runs.
///
/// Linux places a mapping at the top of the highest free gap that fits
/// it, which is this hole unless a larger free gap lies above it (or
/// another thread maps in between). Then the mapping lands elsewhere,
/// unaligned, and only speed is lost: correctness never depends on where
/// the mapping is, and vm-memory keeps owning (and unmapping) it. The
/// guards are unmapped when this is dropped, right after vm-memory maps.
struct AlignedHole {
    /// The guard mappings before and after the hole: (address, length).
    guards: [(usize, usize); 2],
}

impl AlignedHole {
    /// Reserve `len + 2 MiB` of address space and open the aligned hole;
    /// `None` when the reservation fails (the mapping then goes wherever
    /// the kernel puts it).
    fn prepare(len: usize) -> Option<Self> {
        let total = len.checked_add(HUGE_PAGE)?;
        // SAFETY: a new private anonymous mapping with no access at an
        // address the kernel chooses; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        let base = base as usize;
        let hole = base.next_multiple_of(HUGE_PAGE);
        let guards = [
            (base, hole - base),
            (hole + len, base + total - (hole + len)),
        ];
        // SAFETY: [hole, hole + len) lies inside the reservation made
        // above, which only this function knows.
        if unsafe { libc::munmap(hole as *mut libc::c_void, len) } != 0 {
            // Give the whole reservation back; no hole, no alignment.
            // SAFETY: the reservation is still whole and ours.
            unsafe { libc::munmap(base as *mut libc::c_void, total) };
            return None;
        }
        Some(Self { guards })
    }
}

impl Drop for AlignedHole {
    fn drop(&mut self) {
        for (addr, len) in self.guards {
            if len > 0 {
                // SAFETY: each guard is a part of the reservation that
                // `prepare` made and never handed out; a mapping made
                // since cannot overlap it (mmap never reuses mapped
                // address space without MAP_FIXED).
                unsafe { libc::munmap(addr as *mut libc::c_void, len) };
            }
        }
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

    /// A scratch file, removed when the test ends (unlinked at once).
    fn scratch() -> File {
        let path = std::env::temp_dir().join(format!(
            "chitin-memory-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    #[test]
    fn saved_ram_maps_back_copy_on_write_and_sparse() {
        use std::os::unix::fs::MetadataExt;
        // Arrange: 16 MiB with two pages written, one of them zeroes.
        let ram = GuestRam::new(16 * MIB, Backing::Anonymous).unwrap();
        let mem = ram.memory();
        mem.write_obj(0x1122_3344_5566_7788u64, GuestAddress(0x20_0008))
            .unwrap();
        mem.write_obj(0u64, GuestAddress(0x40_0000)).unwrap();
        let file = scratch();
        // Act
        // SAFETY: nothing else touches `ram` in this test.
        let written = unsafe { ram.save(&file) }.unwrap();
        let first = GuestRam::from_snapshot(&file, 16 * MIB).unwrap();
        let second = GuestRam::from_snapshot(&file, 16 * MIB).unwrap();
        first
            .memory()
            .write_obj(7u64, GuestAddress(0x20_0008))
            .unwrap();
        // Assert: one page of data, the rest holes; what one mapping
        // writes, neither the file nor the other mapping sees.
        assert_eq!(written, layout::PAGE_SIZE);
        let meta = file.metadata().unwrap();
        assert_eq!(meta.len(), 16 * MIB);
        assert!(meta.blocks() * 512 <= 64 * 1024, "{} blocks", meta.blocks());
        let read = |ram: &GuestRam| ram.memory().read_obj::<u64>(GuestAddress(0x20_0008));
        assert_eq!(read(&first).unwrap(), 7);
        assert_eq!(read(&second).unwrap(), 0x1122_3344_5566_7788);
        assert_eq!(read(&ram).unwrap(), 0x1122_3344_5566_7788);
        let again = GuestRam::from_snapshot(&file, 16 * MIB).unwrap();
        assert_eq!(read(&again).unwrap(), 0x1122_3344_5566_7788);
        // A restored RAM saved again before the guest touched anything:
        // its data is in the file, not in its pages, and must carry over.
        let untouched = GuestRam::from_snapshot(&file, 16 * MIB).unwrap();
        let file2 = scratch();
        // SAFETY: nothing else touches `untouched` in this test.
        let written = unsafe { untouched.save(&file2) }.unwrap();
        assert_eq!(written, layout::PAGE_SIZE);
        let resaved = GuestRam::from_snapshot(&file2, 16 * MIB).unwrap();
        assert_eq!(read(&resaved).unwrap(), 0x1122_3344_5566_7788);
        // A clone holds on its own only the pages it wrote: `second` only
        // read its page (the file's, shared), `first` wrote one.
        assert_eq!(first.private_bytes().unwrap(), layout::PAGE_SIZE);
        assert_eq!(second.private_bytes().unwrap(), 0);
        assert!(second.resident_bytes().unwrap() >= layout::PAGE_SIZE);
        assert_eq!(ram.private_bytes().unwrap(), ram.resident_bytes().unwrap());
    }

    #[test]
    fn snapshot_of_another_size_is_refused() {
        let ram = GuestRam::new(16 * MIB, Backing::Anonymous).unwrap();
        let file = scratch();
        // SAFETY: nothing else touches `ram` in this test.
        unsafe { ram.save(&file) }.unwrap();
        assert!(matches!(
            GuestRam::from_snapshot(&file, 32 * MIB),
            Err(MemoryError::SnapshotSize {
                have,
                want
            }) if have == 16 * MIB && want == 32 * MIB
        ));
    }

    fn host_address(region: &vm_memory::GuestRegionMmap) -> usize {
        region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .unwrap() as usize
    }

    #[test]
    fn guest_ram_starts_on_huge_page_boundaries() {
        // 4 GiB + 64 MiB has a second region above the MMIO gap. The
        // placement is best effort (another thread may map into the hole
        // first): one of a few tries must be aligned, as almost every one
        // is.
        for mib in [64u64, 256, 4096 + 64] {
            for backing in [Backing::Anonymous, Backing::Memfd] {
                let aligned = (0..5).any(|_| {
                    let ram = GuestRam::new(mib << 20, backing).unwrap();
                    let all = ram.memory().iter().all(|region| {
                        assert_eq!(region.start_addr().0 % HUGE_PAGE as u64, 0);
                        host_address(region) % HUGE_PAGE == 0
                    });
                    all
                });
                assert!(aligned, "{mib} MiB {backing:?}: never on a 2 MiB boundary");
            }
        }
    }

    /// Whether any mapping of this process covers the page at `addr`
    /// (mincore fails with ENOMEM on unmapped address space).
    fn mapped(addr: usize) -> bool {
        let mut vec = [0u8; 1];
        // SAFETY: mincore only reads the page tables for one page at the
        // page-aligned `addr` and writes one byte into `vec`.
        unsafe { libc::mincore(addr as *mut libc::c_void, 4096, vec.as_mut_ptr()) == 0 }
    }

    #[test]
    fn aligned_hole_gives_its_guards_back() {
        let len = 64 << 20;
        // Other tests' threads map and unmap meanwhile and may take the
        // freed space at once: a leak fails every try, a race only one.
        let mut released = false;
        for _ in 0..5 {
            let hole = AlignedHole::prepare(len).unwrap();
            let guards = hole.guards;
            let hole_start = guards[0].0 + guards[0].1;
            assert_eq!(hole_start % HUGE_PAGE, 0);
            assert_eq!(guards[1].0, hole_start + len);
            assert_eq!(guards[0].1 + guards[1].1, HUGE_PAGE);
            let live: Vec<usize> = guards
                .iter()
                .filter(|(_, l)| *l > 0)
                .flat_map(|(a, l)| [*a, a + l - 4096])
                .collect();
            for addr in &live {
                assert!(mapped(*addr), "guard page {addr:#x} missing");
            }
            drop(hole);
            if live.iter().all(|a| !mapped(*a)) {
                released = true;
                break;
            }
        }
        assert!(released, "the guards stayed mapped after every try");
    }

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
