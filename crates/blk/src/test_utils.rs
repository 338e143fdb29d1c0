//! The driver side of a split virtqueue in anonymous guest memory (on
//! `chitin-virtio`'s queue builder, with a buffer allocator and request
//! helpers of blk's own), temporary disk images and the recording
//! interrupt: what the unit tests and the throughput bench need to drive
//! the device without a guest.
//!
//! The bench includes this file with `#[path]`, so it uses other crates
//! only, never `crate::`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

pub use chitin_virtio::test_utils::RecordingInterrupt;
use chitin_virtio::test_utils::{SplitQueueBuilder, TestDescriptor};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

/// Guest memory layout: the queue's rings from 0 (room for queues of up to
/// 256 entries), then buffers up to the end.
const RINGS: u64 = 0x0;
const BUFFERS: u64 = 0x4000;
/// What buffer memory holds before the device touches it.
const CANARY: u8 = 0xa5;
/// Default guest memory: 2 MiB.
const DEFAULT_MEM_SIZE: usize = 2 << 20;

/// One descriptor of a chain to build.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    /// Buffer address.
    pub addr: GuestAddress,
    /// Buffer length.
    pub len: u32,
    /// Device-writable (`VRING_DESC_F_WRITE`).
    pub writable: bool,
}

impl Desc {
    /// A device-readable buffer.
    pub fn readable(addr: GuestAddress, len: u32) -> Self {
        Desc {
            addr,
            len,
            writable: false,
        }
    }

    /// A device-writable buffer.
    pub fn writable(addr: GuestAddress, len: u32) -> Self {
        Desc {
            addr,
            len,
            writable: true,
        }
    }
}

/// A driver: guest memory with one split queue and a buffer allocator.
pub struct GuestQueue {
    mem: GuestMemoryMmap,
    ring: SplitQueueBuilder,
    next_buf: u64,
    allocated: Vec<(u64, u64)>,
}

impl GuestQueue {
    /// The value status bytes hold until the device writes them.
    pub const STATUS_UNSET: u8 = 0xee;

    /// A queue of `size` entries in 2 MiB of guest memory.
    pub fn new(size: u16) -> Self {
        Self::with_memory(DEFAULT_MEM_SIZE, size)
    }

    /// A queue of `size` entries (at most 256) in `mem_size` bytes of guest
    /// memory. Buffer memory is filled with a canary. Chains take the
    /// table's slots round and round, so a queue serves any number of them.
    pub fn with_memory(mem_size: usize, size: u16) -> Self {
        assert!(size <= 256 && mem_size as u64 > BUFFERS);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mem_size)]).unwrap();
        let ring = SplitQueueBuilder::new(&mem, GuestAddress(RINGS), size)
            .unwrap()
            .recycling(true);
        assert!(ring.end().raw_value() <= BUFFERS);
        let canary = vec![CANARY; mem_size - BUFFERS as usize];
        mem.write_slice(&canary, GuestAddress(BUFFERS)).unwrap();
        GuestQueue {
            mem,
            ring,
            next_buf: BUFFERS,
            allocated: Vec::new(),
        }
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// A ready device-side `Queue` over the rings (no `EVENT_IDX`).
    pub fn queue(&self) -> Queue {
        self.ring.build().unwrap()
    }

    /// Zero both rings and start over, as a driver does after a reset.
    pub fn restart(&mut self) {
        self.ring.restart().unwrap();
    }

    /// A zeroed buffer of `len` bytes, 64-byte aligned with a canary gap
    /// after it.
    pub fn alloc(&mut self, len: u32) -> GuestAddress {
        self.alloc_aligned(len, 64)
    }

    /// A zeroed buffer of `len` bytes aligned to `align` (a power of two),
    /// as a guest's page-sized buffers are, with a canary gap after it.
    pub fn alloc_aligned(&mut self, len: u32, align: u64) -> GuestAddress {
        let addr = (self.next_buf + align - 1) & !(align - 1);
        let end = addr + u64::from(len);
        self.next_buf = (end + 64 + 63) & !63;
        self.allocated.push((addr, end));
        self.mem
            .write_slice(&vec![0u8; len as usize], GuestAddress(addr))
            .unwrap();
        GuestAddress(addr)
    }

    /// A buffer holding `bytes`.
    pub fn alloc_bytes(&mut self, bytes: &[u8]) -> GuestAddress {
        // Buffers are far below 4 GiB.
        let addr = self.alloc(bytes.len() as u32);
        self.mem.write_slice(bytes, addr).unwrap();
        addr
    }

    /// A request header: type, reserved 0, sector.
    pub fn header(&mut self, request_type: u32, sector: u64) -> GuestAddress {
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        self.alloc_bytes(&header)
    }

    /// A one-byte status buffer holding [`Self::STATUS_UNSET`].
    pub fn status_byte(&mut self) -> GuestAddress {
        self.alloc_bytes(&[Self::STATUS_UNSET])
    }

    /// A discard/write-zeroes range list.
    pub fn ranges(&mut self, ranges: &[(u64, u32, u32)]) -> GuestAddress {
        let mut bytes = Vec::new();
        for &(sector, num_sectors, flags) in ranges {
            bytes.extend_from_slice(&sector.to_le_bytes());
            bytes.extend_from_slice(&num_sectors.to_le_bytes());
            bytes.extend_from_slice(&flags.to_le_bytes());
        }
        self.alloc_bytes(&bytes)
    }

    /// Write descriptor `index` of the table as given.
    pub fn set_desc(&self, index: u16, addr: GuestAddress, len: u32, flags: u16, next: u16) {
        let desc = TestDescriptor::new(addr.raw_value(), len, flags).with_next(next);
        self.ring.write_descriptor(index, desc).unwrap();
    }

    /// Put `head` in the next available ring slot and publish it.
    pub fn publish(&mut self, head: u16) {
        self.ring.publish(head).unwrap();
    }

    /// Write `descs` as a chain into free table slots and publish it;
    /// returns the head index.
    pub fn add_chain(&mut self, descs: &[Desc]) -> u16 {
        let head = self.write_chain(descs);
        self.publish(head);
        head
    }

    /// Write `descs` as a chain into free table slots without publishing
    /// it; returns the head index.
    pub fn write_chain(&mut self, descs: &[Desc]) -> u16 {
        let last = descs.len().saturating_sub(1);
        let descs: Vec<TestDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, desc)| {
                let mut flags = 0u16;
                if desc.writable {
                    flags |= VRING_DESC_F_WRITE as u16;
                }
                if i < last {
                    flags |= VRING_DESC_F_NEXT as u16;
                }
                TestDescriptor::new(desc.addr.raw_value(), desc.len, flags)
            })
            .collect();
        self.ring.write_chain(&descs).unwrap()
    }

    /// `used_event` (the field after the available ring), for `EVENT_IDX`.
    pub fn set_used_event(&self, value: u16) {
        self.ring.set_used_event(value).unwrap();
    }

    /// The device's used index.
    pub fn used_idx(&self) -> u16 {
        self.ring.used_idx().unwrap()
    }

    /// Used element `index`: (head id, length).
    pub fn used(&self, index: u16) -> (u32, u32) {
        self.ring.used_element(index).unwrap()
    }

    /// `len` bytes of guest memory at `addr`.
    pub fn read(&self, addr: GuestAddress, len: usize) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        self.mem.read_slice(&mut bytes, addr).unwrap();
        bytes
    }

    /// Whether buffer memory outside the allocated buffers still holds the
    /// canary, i.e. the device wrote nothing outside the chains.
    pub fn outside_buffers_untouched(&self) -> bool {
        self.untouched_outside(&[])
    }

    /// [`Self::outside_buffers_untouched`], also allowing writes to the
    /// `(start, end)` ranges in `extra`.
    pub fn untouched_outside(&self, extra: &[(u64, u64)]) -> bool {
        let mut start = BUFFERS;
        let end = self.next_buf + 4096;
        let mut ranges = self.allocated.clone();
        ranges.extend(
            extra
                .iter()
                .map(|&(a, b)| (a.min(end), b.min(end)))
                .filter(|(a, b)| a < b),
        );
        ranges.sort_unstable();
        ranges.push((end, end));
        for (alloc_start, alloc_end) in ranges {
            if alloc_start > start {
                let gap = self.read(GuestAddress(start), (alloc_start - start) as usize);
                if gap.iter().any(|&b| b != CANARY) {
                    return false;
                }
            }
            start = start.max(alloc_end);
        }
        true
    }
}

/// A disk image under the system temporary directory, removed on drop.
pub struct TempImage {
    path: PathBuf,
}

impl TempImage {
    fn create() -> (Self, File) {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "chitin-blk-{}-{}.img",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let path = std::env::temp_dir().join(name);
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        (TempImage { path }, file)
    }

    /// An image of `size` bytes, all `byte`.
    pub fn filled(size: u64, byte: u8) -> Self {
        let (image, mut file) = Self::create();
        file.write_all(&vec![byte; size as usize]).unwrap();
        image
    }

    /// An image of `size` bytes holding [`TempImage::pattern`].
    pub fn with_pattern(size: u64) -> Self {
        let (image, mut file) = Self::create();
        file.write_all(&Self::pattern(size)).unwrap();
        image
    }

    /// A sparse image of `size` bytes (reads as zeros, allocates nothing).
    pub fn sparse(size: u64) -> Self {
        let (image, file) = Self::create();
        file.set_len(size).unwrap();
        image
    }

    /// `size` bytes that are never 0 and differ from sector to sector.
    pub fn pattern(size: u64) -> Vec<u8> {
        (0..size).map(|i| (i % 251) as u8 + 1).collect()
    }

    /// Where the image is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole image.
    pub fn contents(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

impl Drop for TempImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
