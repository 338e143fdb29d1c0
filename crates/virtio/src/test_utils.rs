//! Helpers for unit tests of virtio devices and of the transport: guest
//! memory, split queues built by hand in it, an interrupt that records what
//! it was asked to do, and a configurable dummy device.
//!
//! This module owns only test scaffolding. It is compiled for this crate's
//! tests and with the `test-utils` feature, and must never be used by
//! production code. Guest data stays hostile here too: the queue builder
//! writes whatever descriptors a test asks for (loops, huge lengths,
//! addresses outside memory) and [`DummyDevice`] accepts any configuration
//! access without panicking, so the fuzz target can drive it.

use std::io;
use std::mem::size_of;
use std::sync::atomic::{AtomicUsize, Ordering};

use chitin_memory::GuestMemoryMmap;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::desc::split::{Descriptor, VirtqUsedElem};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryError};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{ActivateContext, ActivateError, VirtioDevice};
use crate::interrupt::{InterruptKind, VirtioInterrupt};

/// Guest memory of `size` bytes in one region at guest address 0.
///
/// # Panics
///
/// If the host cannot map `size` bytes, or `size` is 0: a test cannot go on
/// without its memory.
///
/// # Example
///
/// ```
/// use chitin_virtio::test_utils::guest_memory;
/// use vm_memory::{Bytes, GuestAddress};
///
/// let mem = guest_memory(0x1_0000);
/// mem.write_obj(0xabcd_u16, GuestAddress(0x100)).unwrap();
/// assert_eq!(mem.read_obj::<u16>(GuestAddress(0x100)).unwrap(), 0xabcd);
/// ```
pub fn guest_memory(size: usize) -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)])
        .unwrap_or_else(|e| panic!("cannot map {size:#x} bytes of test guest memory: {e}"))
}

/// One split-queue descriptor as a test wants it in guest memory (virtio
/// 1.2 §2.7.5), with no validation at all.
///
/// # Example
///
/// ```
/// use chitin_virtio::test_utils::TestDescriptor;
/// use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
///
/// // A 16-byte header the device reads, then a 512-byte buffer it writes.
/// let header = TestDescriptor::new(0x8000, 16, VRING_DESC_F_NEXT as u16);
/// let data = TestDescriptor::new(0x9000, 512, VRING_DESC_F_WRITE as u16);
/// assert_eq!(data.len, 512);
/// assert_eq!(header.next, 0);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TestDescriptor {
    /// Guest address of the buffer.
    pub addr: u64,
    /// Length of the buffer in bytes.
    pub len: u32,
    /// `VRING_DESC_F_NEXT`, `VRING_DESC_F_WRITE`, `VRING_DESC_F_INDIRECT`,
    /// or anything else.
    pub flags: u16,
    /// Index of the next descriptor, used when `flags` has NEXT.
    pub next: u16,
}

impl TestDescriptor {
    /// A descriptor with `next` 0.
    pub const fn new(addr: u64, len: u32, flags: u16) -> Self {
        TestDescriptor {
            addr,
            len,
            flags,
            next: 0,
        }
    }

    /// The same descriptor with `next` set, to build loops or chains that
    /// point anywhere.
    pub const fn with_next(self, next: u16) -> Self {
        TestDescriptor { next, ..self }
    }

    fn has_next(&self) -> bool {
        self.flags & VRING_DESC_F_NEXT as u16 != 0
    }
}

impl From<(u64, u32, u16)> for TestDescriptor {
    fn from((addr, len, flags): (u64, u32, u16)) -> Self {
        TestDescriptor::new(addr, len, flags)
    }
}

/// Why a [`SplitQueueBuilder`] could not do what a test asked.
#[derive(Debug, thiserror::Error)]
pub enum TestQueueError {
    /// Split queue sizes are powers of two up to 32768 (virtio 1.2 §2.7).
    #[error("queue size {0} is not a power of two in 1..=32768")]
    InvalidSize(u16),
    /// The rings do not fit in the 64-bit address space.
    #[error("queue rings at {0:#x} overflow the address space")]
    AddressOverflow(u64),
    /// The chain does not fit in the free descriptor table slots.
    #[error("descriptor table has {free} free slots, chain needs {needed}")]
    TableFull {
        /// Slots left.
        free: usize,
        /// Slots asked for.
        needed: usize,
    },
    /// A chain needs at least one descriptor.
    #[error("descriptor chain is empty")]
    EmptyChain,
    /// A descriptor index past the end of the table.
    #[error("descriptor index {index} is outside a table of {size}")]
    IndexOutsideTable {
        /// Index asked for.
        index: u16,
        /// Queue size.
        size: u16,
    },
    /// The rings or a table are not in guest memory.
    #[error("cannot access test guest memory")]
    Memory(#[source] GuestMemoryError),
    /// `virtio-queue` refused the queue.
    #[error("virtio-queue refused the test queue")]
    Queue(#[source] virtio_queue::Error),
}

/// Largest split queue (virtio 1.2 §2.7: "Queue Size ... maximum of 32768").
const MAX_QUEUE_SIZE: u16 = 32768;
/// Size of one descriptor in bytes (virtio 1.2 §2.7.5).
const DESCRIPTOR_SIZE: u64 = size_of::<Descriptor>() as u64;
/// The flags and idx fields at the start of both rings (virtio 1.2 §2.7.6).
const RING_HEADER_SIZE: u64 = 4;
/// Offset of idx in both rings.
const RING_IDX_OFFSET: u64 = 2;
/// One available ring entry: a descriptor index.
const AVAIL_ELEMENT_SIZE: u64 = 2;
/// One used ring element: id and len (virtio 1.2 §2.7.8).
const USED_ELEMENT_SIZE: u64 = size_of::<VirtqUsedElem>() as u64;

/// Builds a split virtqueue in guest memory the way a driver would, then
/// hands out the device's [`Queue`] for it.
///
/// The descriptor table starts at the base address given to
/// [`SplitQueueBuilder::new`], the available ring follows it and the used
/// ring follows that (4-byte aligned). Chains take consecutive free slots of
/// the table; every chain added is published in the available ring in
/// order, so `pop_descriptor_chain` yields them in the order they were
/// added.
///
/// Nothing about the descriptors is checked: tests of hostile input can
/// write loops ([`TestDescriptor::with_next`]), huge lengths, addresses
/// outside memory, any flags, raw descriptors at any index
/// ([`SplitQueueBuilder::write_descriptor`]), any head index
/// ([`SplitQueueBuilder::publish`]) and any available index
/// ([`SplitQueueBuilder::set_avail_idx`]).
///
/// # Example
///
/// ```
/// use chitin_virtio::test_utils::{guest_memory, SplitQueueBuilder, TestDescriptor};
/// use chitin_virtio::QueueT;
/// use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
/// use vm_memory::GuestAddress;
///
/// let mem = guest_memory(0x1_0000);
/// // A queue of 16 entries with its rings from 0x1000 (the buffers go
/// // above, from 0x4000).
/// let mut builder = SplitQueueBuilder::new(&mem, GuestAddress(0x1000), 16).unwrap();
/// builder
///     .add_chain(&[
///         TestDescriptor::new(0x4000, 16, VRING_DESC_F_NEXT as u16),
///         TestDescriptor::new(0x5000, 512, VRING_DESC_F_WRITE as u16),
///     ])
///     .unwrap();
/// let mut queue = builder.build().unwrap();
///
/// let chain = queue.pop_descriptor_chain(&mem).unwrap();
/// let lens: Vec<u32> = chain.map(|desc| desc.len()).collect();
/// assert_eq!(lens, [16, 512]);
/// ```
#[derive(Debug, Clone)]
pub struct SplitQueueBuilder {
    mem: GuestMemoryMmap,
    size: u16,
    desc_table: GuestAddress,
    avail_ring: GuestAddress,
    used_ring: GuestAddress,
    /// First address after the used ring.
    end: GuestAddress,
    /// Next free descriptor table slot (a running count when recycling).
    next_free: u16,
    /// The available ring's idx as last written.
    avail_idx: u16,
    event_idx: bool,
    /// Chains take the table's slots round and round, as a driver reusing
    /// the descriptors the device returned.
    recycle: bool,
}

impl SplitQueueBuilder {
    /// Lay out a queue of `size` entries from `base` in `mem` and zero its
    /// rings.
    ///
    /// `base` should be 16-byte aligned for a queue the transport would
    /// accept, but is not checked, so tests can build misaligned queues.
    pub fn new(
        mem: &GuestMemoryMmap,
        base: GuestAddress,
        size: u16,
    ) -> Result<Self, TestQueueError> {
        if size == 0 || !size.is_power_of_two() || size > MAX_QUEUE_SIZE {
            return Err(TestQueueError::InvalidSize(size));
        }
        let entries = u64::from(size);
        let overflow = || TestQueueError::AddressOverflow(base.raw_value());
        let avail_ring = base
            .checked_add(DESCRIPTOR_SIZE * entries)
            .ok_or_else(overflow)?;
        // flags, idx, the ring, used_event.
        let avail_len = RING_HEADER_SIZE + AVAIL_ELEMENT_SIZE * entries + 2;
        let used_ring = avail_ring
            .checked_add(avail_len)
            .and_then(|end| end.checked_align_up(4))
            .ok_or_else(overflow)?;
        // flags, idx, the ring, avail_event.
        let used_len = RING_HEADER_SIZE + USED_ELEMENT_SIZE * entries + 2;
        let end = used_ring.checked_add(used_len).ok_or_else(overflow)?;

        let builder = SplitQueueBuilder {
            mem: mem.clone(),
            size,
            desc_table: base,
            avail_ring,
            used_ring,
            end,
            next_free: 0,
            avail_idx: 0,
            event_idx: false,
            recycle: false,
        };
        builder.zero(avail_ring, avail_len)?;
        builder.zero(used_ring, used_len)?;
        Ok(builder)
    }

    /// Have [`SplitQueueBuilder::build`] enable VIRTIO_F_EVENT_IDX
    /// notification suppression on the queue.
    pub fn with_event_idx(mut self, enabled: bool) -> Self {
        self.event_idx = enabled;
        self
    }

    /// Let chains take table slots round and round (slot `n % size` for
    /// the `n`th descriptor written) instead of failing once the table is
    /// full: a long-running test or bench reusing the slots the device has
    /// returned, as a driver does. A chain may then wrap past the table's
    /// end.
    pub fn recycling(mut self, enabled: bool) -> Self {
        self.recycle = enabled;
        self
    }

    /// Zero both rings and start over from slot 0, as a driver does after
    /// a device reset.
    pub fn restart(&mut self) -> Result<(), TestQueueError> {
        let avail_len = self.used_ring.raw_value() - self.avail_ring.raw_value();
        self.zero(self.avail_ring, avail_len)?;
        let used_len = self.end.raw_value() - self.used_ring.raw_value();
        self.zero(self.used_ring, used_len)?;
        self.next_free = 0;
        self.avail_idx = 0;
        Ok(())
    }

    /// Write `used_event` (after the available ring), the used index the
    /// driver wants an interrupt at under VIRTIO_F_EVENT_IDX.
    pub fn set_used_event(&self, value: u16) -> Result<(), TestQueueError> {
        let at = self
            .avail_ring
            .unchecked_add(RING_HEADER_SIZE + AVAIL_ELEMENT_SIZE * u64::from(self.size));
        self.mem
            .write_obj(value.to_le(), at)
            .map_err(TestQueueError::Memory)
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Address of the descriptor table.
    pub fn desc_table_addr(&self) -> GuestAddress {
        self.desc_table
    }

    /// Address of the available (driver) ring.
    pub fn avail_ring_addr(&self) -> GuestAddress {
        self.avail_ring
    }

    /// Address of the used (device) ring.
    pub fn used_ring_addr(&self) -> GuestAddress {
        self.used_ring
    }

    /// First address after the used ring: where buffers can start.
    pub fn end(&self) -> GuestAddress {
        self.end
    }

    /// Write `descs` into consecutive free table slots and publish the first
    /// as a new chain head; returns the head's index.
    ///
    /// The flags are written as given: a descriptor continues the chain only
    /// if the test set `VRING_DESC_F_NEXT` on it. Every descriptor but the
    /// last that has NEXT points at the following slot; the last keeps its
    /// own `next`, so a test can close a loop or point anywhere.
    pub fn add_chain(&mut self, descs: &[TestDescriptor]) -> Result<u16, TestQueueError> {
        let head = self.write_chain(descs)?;
        self.publish(head)?;
        Ok(head)
    }

    /// [`SplitQueueBuilder::add_chain`] without publishing the chain: the
    /// test publishes it (or another head) later.
    pub fn write_chain(&mut self, descs: &[TestDescriptor]) -> Result<u16, TestQueueError> {
        if self.recycle {
            return self.write_recycled(descs);
        }
        let head = self.allocate(descs.len())?;
        for (slot, desc) in (head..).zip(link(descs, head)) {
            self.write_descriptor(slot, desc)?;
        }
        Ok(head)
    }

    /// A chain into the next slots round the table, each linked to the
    /// following slot modulo the size.
    fn write_recycled(&mut self, descs: &[TestDescriptor]) -> Result<u16, TestQueueError> {
        if descs.is_empty() {
            return Err(TestQueueError::EmptyChain);
        }
        if descs.len() > usize::from(self.size) {
            return Err(TestQueueError::TableFull {
                free: usize::from(self.size),
                needed: descs.len(),
            });
        }
        // The size divides 2^16, so a wrapping count stays in step.
        let head = self.next_free % self.size;
        let last = descs.len() - 1;
        for (i, desc) in descs.iter().enumerate() {
            let slot = self.next_free % self.size;
            let next = self.next_free.wrapping_add(1) % self.size;
            let desc = if i < last && desc.has_next() {
                desc.with_next(next)
            } else {
                *desc
            };
            self.write_descriptor(slot, desc)?;
            self.next_free = self.next_free.wrapping_add(1);
        }
        Ok(head)
    }

    /// Write `descs` as an indirect descriptor table at `table` (entries
    /// linked as in [`SplitQueueBuilder::add_chain`], counting from 0), put
    /// one descriptor with `VRING_DESC_F_INDIRECT` pointing at it in the
    /// queue's table and publish that; returns its index.
    pub fn add_indirect_chain(
        &mut self,
        table: GuestAddress,
        descs: &[TestDescriptor],
    ) -> Result<u16, TestQueueError> {
        if descs.is_empty() {
            return Err(TestQueueError::EmptyChain);
        }
        let mut addr = table;
        for desc in link(descs, 0) {
            self.write_descriptor_at(addr, desc)?;
            addr = addr
                .checked_add(DESCRIPTOR_SIZE)
                .ok_or(TestQueueError::AddressOverflow(table.raw_value()))?;
        }
        let table_len = u32::try_from(addr.raw_value() - table.raw_value())
            .map_err(|_| TestQueueError::AddressOverflow(table.raw_value()))?;
        let indirect =
            TestDescriptor::new(table.raw_value(), table_len, VRING_DESC_F_INDIRECT as u16);
        self.add_chain(&[indirect])
    }

    /// Write `desc` verbatim at `index` of the queue's descriptor table.
    /// Does not publish it and does not take the slot from the chains that
    /// [`SplitQueueBuilder::add_chain`] places.
    pub fn write_descriptor(&self, index: u16, desc: TestDescriptor) -> Result<(), TestQueueError> {
        if index >= self.size {
            return Err(TestQueueError::IndexOutsideTable {
                index,
                size: self.size,
            });
        }
        let addr = self
            .desc_table
            .checked_add(u64::from(index) * DESCRIPTOR_SIZE)
            .ok_or(TestQueueError::AddressOverflow(self.desc_table.raw_value()))?;
        self.write_descriptor_at(addr, desc)
    }

    /// Write `desc` verbatim at any guest address (an indirect table).
    pub fn write_descriptor_at(
        &self,
        addr: GuestAddress,
        desc: TestDescriptor,
    ) -> Result<(), TestQueueError> {
        let raw = Descriptor::new(desc.addr, desc.len, desc.flags, desc.next);
        self.mem
            .write_obj(raw, addr)
            .map_err(TestQueueError::Memory)
    }

    /// Publish `head` (any value, even outside the table) as the next
    /// available chain and advance the available index.
    pub fn publish(&mut self, head: u16) -> Result<(), TestQueueError> {
        let slot = u64::from(self.avail_idx % self.size);
        let entry = self
            .avail_ring
            .unchecked_add(RING_HEADER_SIZE + slot * AVAIL_ELEMENT_SIZE);
        self.mem
            .write_obj(head.to_le(), entry)
            .map_err(TestQueueError::Memory)?;
        self.set_avail_idx(self.avail_idx.wrapping_add(1))
    }

    /// Write the available ring's idx directly, for example far ahead of
    /// what was published.
    pub fn set_avail_idx(&mut self, idx: u16) -> Result<(), TestQueueError> {
        self.mem
            .write_obj(idx.to_le(), self.avail_ring.unchecked_add(RING_IDX_OFFSET))
            .map_err(TestQueueError::Memory)?;
        self.avail_idx = idx;
        Ok(())
    }

    /// The used ring's idx: how many chains the device has returned.
    pub fn used_idx(&self) -> Result<u16, TestQueueError> {
        self.mem
            .read_obj::<u16>(self.used_ring.unchecked_add(RING_IDX_OFFSET))
            .map(u16::from_le)
            .map_err(TestQueueError::Memory)
    }

    /// The used ring element at position `index` (modulo the queue size):
    /// the returned chain's head index and the length the device wrote.
    pub fn used_element(&self, index: u16) -> Result<(u32, u32), TestQueueError> {
        let slot = u64::from(index % self.size);
        let addr = self
            .used_ring
            .unchecked_add(RING_HEADER_SIZE + slot * USED_ELEMENT_SIZE);
        let id = self
            .mem
            .read_obj::<u32>(addr)
            .map_err(TestQueueError::Memory)?;
        let len = self
            .mem
            .read_obj::<u32>(addr.unchecked_add(4))
            .map_err(TestQueueError::Memory)?;
        Ok((u32::from_le(id), u32::from_le(len)))
    }

    /// A ready `Queue` over these rings, as the transport would hand it to a
    /// device at activation.
    pub fn build(&self) -> Result<Queue, TestQueueError> {
        let mut queue = Queue::new(self.size).map_err(TestQueueError::Queue)?;
        queue
            .try_set_size(self.size)
            .map_err(TestQueueError::Queue)?;
        queue
            .try_set_desc_table_address(self.desc_table)
            .map_err(TestQueueError::Queue)?;
        queue
            .try_set_avail_ring_address(self.avail_ring)
            .map_err(TestQueueError::Queue)?;
        queue
            .try_set_used_ring_address(self.used_ring)
            .map_err(TestQueueError::Queue)?;
        queue.set_event_idx(self.event_idx);
        queue.set_ready(true);
        Ok(queue)
    }

    /// Take `count` consecutive free slots; returns the first.
    fn allocate(&mut self, count: usize) -> Result<u16, TestQueueError> {
        if count == 0 {
            return Err(TestQueueError::EmptyChain);
        }
        let free = usize::from(self.size - self.next_free);
        let full = TestQueueError::TableFull {
            free,
            needed: count,
        };
        if count > free {
            return Err(full);
        }
        let first = self.next_free;
        // `count <= free <= size <= 32768`, so this fits in a u16.
        self.next_free += u16::try_from(count).map_err(|_| full)?;
        Ok(first)
    }

    fn zero(&self, addr: GuestAddress, len: u64) -> Result<(), TestQueueError> {
        let len =
            usize::try_from(len).map_err(|_| TestQueueError::AddressOverflow(addr.raw_value()))?;
        self.mem
            .write_slice(&vec![0; len], addr)
            .map_err(TestQueueError::Memory)
    }
}

/// `descs` with `next` of every descriptor but the last that has NEXT
/// pointing at the following one, numbering from `first`.
fn link(descs: &[TestDescriptor], first: u16) -> impl Iterator<Item = TestDescriptor> + '_ {
    let last = descs.len().saturating_sub(1);
    descs.iter().enumerate().map(move |(i, desc)| {
        if i < last && desc.has_next() {
            // `i + 1 < descs.len()`, which the caller fitted in the table.
            desc.with_next(first.wrapping_add(i as u16).wrapping_add(1))
        } else {
            *desc
        }
    })
}

/// A [`VirtioInterrupt`] that counts what it was asked to do.
///
/// # Example
///
/// ```
/// use chitin_virtio::test_utils::RecordingInterrupt;
/// use chitin_virtio::{InterruptKind, VirtioInterrupt};
///
/// let interrupt = RecordingInterrupt::new();
/// interrupt.trigger(InterruptKind::Queue).unwrap();
/// interrupt.signal_needs_reset();
/// assert_eq!(interrupt.count(InterruptKind::Queue), 1);
/// assert_eq!(interrupt.count(InterruptKind::Config), 0);
/// assert_eq!(interrupt.needs_reset_count(), 1);
/// ```
#[derive(Debug, Default)]
pub struct RecordingInterrupt {
    queue: AtomicUsize,
    config: AtomicUsize,
    needs_reset: AtomicUsize,
}

impl RecordingInterrupt {
    /// An interrupt that has recorded nothing.
    pub fn new() -> Self {
        RecordingInterrupt::default()
    }

    /// How many times `trigger(kind)` was called.
    pub fn count(&self, kind: InterruptKind) -> usize {
        match kind {
            InterruptKind::Queue => self.queue.load(Ordering::SeqCst),
            InterruptKind::Config => self.config.load(Ordering::SeqCst),
        }
    }

    /// How many times `signal_needs_reset` was called. These are not counted
    /// as configuration triggers.
    pub fn needs_reset_count(&self) -> usize {
        self.needs_reset.load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for RecordingInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        let counter = match kind {
            InterruptKind::Queue => &self.queue,
            InterruptKind::Config => &self.config,
        };
        counter.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn signal_needs_reset(&self) {
        self.needs_reset.fetch_add(1, Ordering::SeqCst);
    }
}

/// A [`VirtioDevice`] with a configurable type, queues, features and
/// configuration space that records what the transport asked of it.
///
/// Configuration reads past the end return zeros and writes past it are
/// dropped; everything written inside is kept, so it reads back.
/// `activate` fails when the number of queues is wrong or when built with
/// [`DummyDevice::with_failing_activation`].
///
/// # Example
///
/// ```
/// use chitin_virtio::test_utils::DummyDevice;
/// use chitin_virtio::VirtioDevice;
///
/// // A network device (type 1) with two queues of 256 entries, feature bit
/// // 5 (VIRTIO_NET_F_MAC) and a 6-byte MAC address as configuration.
/// let mut device = DummyDevice::new(1, &[256, 256])
///     .unwrap()
///     .with_features(1 << 5)
///     .with_config(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
/// let mut mac = [0u8; 6];
/// device.read_config(0, &mut mac);
/// assert_eq!(mac, [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
/// device.reset();
/// assert_eq!(device.reset_count(), 1);
/// assert_eq!(device.queue_events().len(), 2);
/// ```
pub struct DummyDevice {
    device_type: u32,
    queue_max_sizes: Vec<u16>,
    queue_events: Vec<EventFd>,
    features: u64,
    config: Vec<u8>,
    fail_activation: bool,
    activate_calls: usize,
    reset_calls: usize,
    restored_calls: usize,
    activation: Option<ActivateContext>,
    last_config_write: Option<(u64, Vec<u8>)>,
}

impl DummyDevice {
    /// A device of `device_type` with one queue per entry of
    /// `queue_max_sizes`, each with a non-blocking EventFd; no features, no
    /// configuration space.
    pub fn new(device_type: u32, queue_max_sizes: &[u16]) -> io::Result<Self> {
        let queue_events = queue_max_sizes
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(DummyDevice {
            device_type,
            queue_max_sizes: queue_max_sizes.to_vec(),
            queue_events,
            features: 0,
            config: Vec::new(),
            fail_activation: false,
            activate_calls: 0,
            reset_calls: 0,
            restored_calls: 0,
            activation: None,
            last_config_write: None,
        })
    }

    /// Offer `features` (the transport adds its own bits).
    pub fn with_features(mut self, features: u64) -> Self {
        self.features = features;
        self
    }

    /// Use `config` as the configuration space.
    pub fn with_config(mut self, config: &[u8]) -> Self {
        self.config = config.to_vec();
        self
    }

    /// Make every `activate` fail with [`ActivateError::Device`].
    pub fn with_failing_activation(mut self) -> Self {
        self.fail_activation = true;
        self
    }

    /// How many times `activate` was called, successful or not.
    pub fn activate_count(&self) -> usize {
        self.activate_calls
    }

    /// How many times `reset` was called.
    pub fn reset_count(&self) -> usize {
        self.reset_calls
    }

    /// How often [`VirtioDevice::restored`] was called.
    pub fn restored_calls(&self) -> usize {
        self.restored_calls
    }

    /// What the last successful `activate` since the last `reset` received.
    pub fn activation(&self) -> Option<&ActivateContext> {
        self.activation.as_ref()
    }

    /// The same, to move the queues along as processing would.
    pub fn activation_mut(&mut self) -> Option<&mut ActivateContext> {
        self.activation.as_mut()
    }

    /// The configuration space as written so far.
    pub fn config(&self) -> &[u8] {
        &self.config
    }

    /// Offset and bytes of the last `write_config`.
    pub fn last_config_write(&self) -> Option<(u64, &[u8])> {
        self.last_config_write
            .as_ref()
            .map(|(offset, data)| (*offset, data.as_slice()))
    }

    /// Index into the configuration space of byte `i` of an access at
    /// `offset`, if it is inside.
    fn config_index(&self, offset: u64, i: usize) -> Option<usize> {
        let index = offset.checked_add(u64::try_from(i).ok()?)?;
        usize::try_from(index)
            .ok()
            .filter(|&index| index < self.config.len())
    }
}

impl VirtioDevice for DummyDevice {
    fn device_type(&self) -> u32 {
        self.device_type
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = self
                .config_index(offset, i)
                .and_then(|index| self.config.get(index))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, &byte) in data.iter().enumerate() {
            if let Some(slot) = self
                .config_index(offset, i)
                .and_then(|index| self.config.get_mut(index))
            {
                *slot = byte;
            }
        }
        self.last_config_write = Some((offset, data.to_vec()));
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.activate_calls += 1;
        if self.fail_activation {
            return Err(ActivateError::Device("dummy device told to fail".into()));
        }
        if ctx.queues.len() != self.queue_max_sizes.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_max_sizes.len(),
                got: ctx.queues.len(),
            });
        }
        self.activation = Some(ctx);
        Ok(())
    }

    fn reset(&mut self) {
        self.reset_calls += 1;
        self.activation = None;
    }

    fn queue_positions(&self) -> Option<Vec<(u16, u16)>> {
        use virtio_queue::QueueT;
        let ctx = self.activation.as_ref()?;
        Some(
            ctx.queues
                .iter()
                .map(|q| (q.next_avail(), q.next_used()))
                .collect(),
        )
    }

    fn snapshot_refusal(&self) -> Option<&'static str> {
        None
    }

    fn restored(&mut self) {
        self.restored_calls += 1;
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::QueueOwnedT;

    use super::*;

    /// 64 KiB of guest memory: rings at [`RINGS`], buffers above.
    const MEM_SIZE: usize = 0x1_0000;
    /// Where the tests' rings start (16-byte aligned).
    const RINGS: GuestAddress = GuestAddress(0x1000);
    /// A queue of 8 entries: small enough to fill in a test.
    const SIZE: u16 = 8;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    /// (addr, len, flags) of every descriptor the chain yields.
    fn walk(chain: virtio_queue::DescriptorChain<&GuestMemoryMmap>) -> Vec<(u64, u32, u16)> {
        chain
            .map(|desc| (desc.addr().raw_value(), desc.len(), desc.flags()))
            .collect()
    }

    #[test]
    fn builder_several_chains_popped_in_order() {
        // Arrange
        let mem = guest_memory(MEM_SIZE);
        let mut builder = SplitQueueBuilder::new(&mem, RINGS, SIZE).unwrap();
        builder
            .add_chain(&[
                TestDescriptor::new(0x4000, 16, NEXT),
                TestDescriptor::new(0x5000, 512, WRITE),
            ])
            .unwrap();
        builder
            .add_chain(&[TestDescriptor::new(0x6000, 1, WRITE)])
            .unwrap();
        let mut queue = builder.build().unwrap();

        // Act
        let first = queue.pop_descriptor_chain(&mem).unwrap();
        let second = queue.pop_descriptor_chain(&mem).unwrap();
        let third = queue.pop_descriptor_chain(&mem);

        // Assert: the second chain starts after the two slots of the first.
        assert_eq!(first.head_index(), 0);
        assert_eq!(walk(first), [(0x4000, 16, NEXT), (0x5000, 512, WRITE)]);
        assert_eq!(second.head_index(), 2);
        assert_eq!(walk(second), [(0x6000, 1, WRITE)]);
        assert!(third.is_none());
    }

    #[test]
    fn builder_indirect_chain_walks_table() {
        // Arrange: the indirect table at 0x8000, 16-byte aligned.
        let mem = guest_memory(MEM_SIZE);
        let mut builder = SplitQueueBuilder::new(&mem, RINGS, SIZE).unwrap();
        builder
            .add_indirect_chain(
                GuestAddress(0x8000),
                &[
                    TestDescriptor::new(0x4000, 16, NEXT),
                    TestDescriptor::new(0x5000, 64, NEXT | WRITE),
                    TestDescriptor::new(0x6000, 1, WRITE),
                ],
            )
            .unwrap();
        let mut queue = builder.build().unwrap();

        // Act
        let chain = queue.pop_descriptor_chain(&mem).unwrap();

        // Assert
        assert_eq!(
            walk(chain),
            [
                (0x4000, 16, NEXT),
                (0x5000, 64, NEXT | WRITE),
                (0x6000, 1, WRITE)
            ]
        );
    }

    #[test]
    fn builder_loop_terminates_in_virtio_queue() {
        // Arrange: two descriptors pointing at each other forever.
        let mem = guest_memory(MEM_SIZE);
        let mut builder = SplitQueueBuilder::new(&mem, RINGS, SIZE).unwrap();
        builder
            .add_chain(&[
                TestDescriptor::new(0x4000, 1, NEXT),
                TestDescriptor::new(0x5000, 1, NEXT).with_next(0),
            ])
            .unwrap();
        let mut queue = builder.build().unwrap();

        // Act
        let chain = queue.pop_descriptor_chain(&mem).unwrap();

        // Assert: virtio-queue stops after at most SIZE descriptors.
        assert_eq!(chain.count(), usize::from(SIZE));
    }

    #[test]
    fn builder_hostile_values_written_verbatim() {
        // Arrange: a huge length at an address far outside memory.
        let mem = guest_memory(MEM_SIZE);
        let mut builder = SplitQueueBuilder::new(&mem, RINGS, SIZE).unwrap();
        builder
            .add_chain(&[TestDescriptor::new(u64::MAX - 7, u32::MAX, WRITE)])
            .unwrap();
        let mut queue = builder.build().unwrap();

        // Act
        let chain = queue.pop_descriptor_chain(&mem).unwrap();

        // Assert
        assert_eq!(walk(chain), [(u64::MAX - 7, u32::MAX, WRITE)]);
    }

    #[test]
    fn builder_publish_head_outside_table_yields_empty_chain() {
        // Arrange: head index 200 in a table of 8.
        let mem = guest_memory(MEM_SIZE);
        let mut builder = SplitQueueBuilder::new(&mem, RINGS, SIZE).unwrap();
        builder.publish(200).unwrap();
        let mut queue = builder.build().unwrap();

        // Act
        let chain = queue.pop_descriptor_chain(&mem).unwrap();

        // Assert
        assert_eq!(chain.head_index(), 200);
        assert_eq!(chain.count(), 0);
    }

    #[test]
    fn builder_avail_idx_too_far_ahead_yields_nothing() {
        // Arrange: 100 chains claimed available in a queue of 8.
        let mem = guest_memory(MEM_SIZE);
        let mut builder = SplitQueueBuilder::new(&mem, RINGS, SIZE).unwrap();
        builder.set_avail_idx(100).unwrap();
        let mut queue = builder.build().unwrap();

        // Act
        let chain = queue.pop_descriptor_chain(&mem);

        // Assert
        assert!(chain.is_none());
    }

    #[test]
    fn builder_recycling_wraps_chains_round_the_table() {
        // Arrange: six slots used, then a three-descriptor chain that
        // wraps from slot 6 over 7 to 0.
        let mem = guest_memory(MEM_SIZE);
        let mut builder = SplitQueueBuilder::new(&mem, RINGS, SIZE)
            .unwrap()
            .recycling(true);
        let mut queue = builder.build().unwrap();
        for _ in 0..3 {
            let pair = [
                TestDescriptor::new(0x4000, 1, NEXT),
                TestDescriptor::new(0x4100, 1, 0),
            ];
            builder.add_chain(&pair).unwrap();
            assert!(queue.pop_descriptor_chain(&mem).is_some());
        }
        let three = [
            TestDescriptor::new(0x5000, 2, NEXT),
            TestDescriptor::new(0x5100, 3, NEXT),
            TestDescriptor::new(0x5200, 4, WRITE),
        ];

        // Act
        let head = builder.add_chain(&three).unwrap();
        let chain = queue.pop_descriptor_chain(&mem).unwrap();

        // Assert
        assert_eq!(head, 6);
        assert_eq!(
            walk(chain),
            [(0x5000, 2, NEXT), (0x5100, 3, NEXT), (0x5200, 4, WRITE)]
        );
        // Still no chain longer than the table.
        let nine = [TestDescriptor::new(0x4000, 1, NEXT); 9];
        assert!(matches!(
            builder.add_chain(&nine),
            Err(TestQueueError::TableFull { free: 8, needed: 9 })
        ));
        // A restart begins again at slot 0 with empty rings.
        builder.restart().unwrap();
        assert_eq!(builder.used_idx().unwrap(), 0);
        assert_eq!(builder.add_chain(&three[2..]).unwrap(), 0);
    }

    #[test]
    fn builder_table_full_refused() {
        // Arrange
        let mem = guest_memory(MEM_SIZE);
        let mut builder = SplitQueueBuilder::new(&mem, RINGS, SIZE).unwrap();
        let nine = [TestDescriptor::new(0x4000, 1, NEXT); 9];

        // Act
        let result = builder.add_chain(&nine);

        // Assert
        assert!(matches!(
            result,
            Err(TestQueueError::TableFull { free: 8, needed: 9 })
        ));
    }

    #[test]
    fn builder_rings_outside_memory_refused() {
        // Arrange: rings starting 16 bytes before the end of memory.
        let mem = guest_memory(MEM_SIZE);

        // Act
        let result = SplitQueueBuilder::new(&mem, GuestAddress(MEM_SIZE as u64 - 16), SIZE);

        // Assert
        assert!(matches!(result, Err(TestQueueError::Memory(_))));
    }

    #[test]
    fn builder_used_ring_reads_back_add_used() {
        // Arrange
        let mem = guest_memory(MEM_SIZE);
        let mut builder = SplitQueueBuilder::new(&mem, RINGS, SIZE).unwrap();
        let head = builder
            .add_chain(&[TestDescriptor::new(0x4000, 64, WRITE)])
            .unwrap();
        let mut queue = builder.build().unwrap();
        let chain = queue.iter(&mem).unwrap().next().unwrap();

        // Act: the device wrote 42 bytes.
        queue.add_used(&mem, chain.head_index(), 42).unwrap();

        // Assert
        assert_eq!(builder.used_idx().unwrap(), 1);
        assert_eq!(builder.used_element(0).unwrap(), (u32::from(head), 42));
    }

    #[test]
    fn recording_interrupt_counts_each_kind() {
        // Arrange
        let interrupt = RecordingInterrupt::new();

        // Act
        interrupt.trigger(InterruptKind::Config).unwrap();
        interrupt.trigger(InterruptKind::Config).unwrap();
        interrupt.trigger(InterruptKind::Queue).unwrap();

        // Assert
        assert_eq!(interrupt.count(InterruptKind::Config), 2);
        assert_eq!(interrupt.count(InterruptKind::Queue), 1);
        assert_eq!(interrupt.needs_reset_count(), 0);
    }

    #[test]
    fn dummy_device_config_access_past_end_reads_zeros_drops_writes() {
        // Arrange: 4 bytes of configuration.
        let mut device = DummyDevice::new(1, &[]).unwrap().with_config(&[1, 2, 3, 4]);

        // Act: 4 bytes from offset 2 (half inside), and writes at absurd
        // offsets.
        device.write_config(3, &[9, 9]);
        device.write_config(u64::MAX, &[9; 8]);
        let mut data = [0xff; 4];
        device.read_config(2, &mut data);
        let mut far = [0xff; 2];
        device.read_config(u64::MAX - 1, &mut far);

        // Assert
        assert_eq!(data, [3, 9, 0, 0]);
        assert_eq!(far, [0, 0]);
        assert_eq!(device.config(), [1, 2, 3, 9]);
    }

    #[test]
    fn dummy_device_wrong_queue_count_refuses_activation() {
        // Arrange: a device with 2 queues handed 1.
        let mut device = DummyDevice::new(1, &[16, 16]).unwrap();
        let ctx = ActivateContext {
            mem: guest_memory(MEM_SIZE),
            queues: vec![Queue::new(16).unwrap()],
            interrupt: std::sync::Arc::new(RecordingInterrupt::new()),
            acked_features: 0,
        };

        // Act
        let result = device.activate(ctx);

        // Assert
        assert!(matches!(
            result,
            Err(ActivateError::QueueCount {
                expected: 2,
                got: 1
            })
        ));
        assert_eq!(device.activate_count(), 1);
        assert!(device.activation().is_none());
    }
}
