//! The per-queue registers of the virtio-mmio transport and their check
//! against guest memory.
//!
//! This module owns what the driver wrote into QueueNum, QueueReady and the
//! six address halves of one queue, and turns that into a
//! [`virtio_queue::Queue`] only when the driver sets DRIVER_OK. It must
//! never hand a device a ready queue whose size is invalid or whose rings
//! are misaligned or not entirely backed by guest memory.
//!
//! Why not rely on `virtio-queue` 0.17 alone: its address setters silently
//! keep the previous address when the new one is misaligned (so the queue
//! would run on an address the driver never chose), its size setter keeps
//! the previous size likewise, and `Queue::is_valid` checks only that the
//! address one past the end of each ring is in guest memory (not its first
//! byte, nor the bytes between, and it rejects a ring that ends exactly at
//! the end of RAM). The checks here cover the whole ring instead.

use std::fmt;
use std::sync::Arc;

use chitin_memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemory};

use crate::device::ActivateError;

/// The three parts of a split virtqueue (virtio 1.2 §2.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueArea {
    /// The descriptor table (QueueDescLow/High).
    Descriptor,
    /// The available ring, written by the driver (QueueDriverLow/High).
    Driver,
    /// The used ring, written by the device (QueueDeviceLow/High).
    Device,
}

impl QueueArea {
    /// Alignment the spec requires (virtio 1.2 §2.7, "Virtqueue Part
    /// Alignment"): 16 for the descriptor table, 2 for the available ring,
    /// 4 for the used ring.
    pub fn alignment(self) -> u64 {
        match self {
            QueueArea::Descriptor => 16,
            QueueArea::Driver => 2,
            QueueArea::Device => 4,
        }
    }

    /// Size in bytes for a queue of `size` entries (virtio 1.2 §2.7,
    /// "Virtqueue Part Size"): 16 bytes per descriptor; flags, idx, one
    /// 2-byte ring entry per descriptor and used_event for the available
    /// ring; flags, idx, one 8-byte element per descriptor and avail_event
    /// for the used ring. The event fields are counted whether or not
    /// VIRTIO_F_EVENT_IDX is negotiated, as `virtio-queue` may touch them.
    pub fn size_in_bytes(self, size: u16) -> u64 {
        let entries = u64::from(size);
        match self {
            QueueArea::Descriptor => 16 * entries,
            QueueArea::Driver => 6 + 2 * entries,
            QueueArea::Device => 6 + 8 * entries,
        }
    }
}

impl fmt::Display for QueueArea {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QueueArea::Descriptor => "descriptor",
            QueueArea::Driver => "driver",
            QueueArea::Device => "device",
        })
    }
}

/// Why the transport refused DRIVER_OK and set DEVICE_NEEDS_RESET instead.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ActivationError {
    /// The device reports a maximum queue size `virtio-queue` cannot use
    /// (zero, not a power of two, or above 32768): a device bug.
    #[error("queue {queue}: device maximum size {max} is not a power of two in 1..=32768")]
    InvalidMaxSize {
        /// Queue index.
        queue: usize,
        /// What the device reported.
        max: u16,
    },
    /// The driver made a queue ready after writing a QueueNum that is zero,
    /// not a power of two or above QueueNumMax.
    #[error("queue {queue}: size {size} is not a power of two in 1..={max}")]
    InvalidSize {
        /// Queue index.
        queue: usize,
        /// What the driver wrote.
        size: u32,
        /// QueueNumMax.
        max: u16,
    },
    /// A ring address breaks the spec's alignment.
    #[error("queue {queue}: {area} area {addr:#x} is not {}-byte aligned", area.alignment())]
    Misaligned {
        /// Queue index.
        queue: usize,
        /// Which ring.
        area: QueueArea,
        /// The address the driver wrote.
        addr: u64,
    },
    /// A ring is not entirely inside guest memory.
    #[error("queue {queue}: {area} area {addr:#x}+{len:#x} is outside guest memory")]
    OutsideMemory {
        /// Queue index.
        queue: usize,
        /// Which ring.
        area: QueueArea,
        /// The address the driver wrote.
        addr: u64,
        /// The ring's size in bytes.
        len: u64,
    },
    /// The available ring is at guest address 0, which `virtio-queue` 0.17
    /// takes for "not set up" and would never process.
    #[error("queue {queue}: driver area at guest address 0 is not supported")]
    DriverAreaAtZero {
        /// Queue index.
        queue: usize,
    },
    /// The device's `activate` returned an error.
    #[error("device refused activation")]
    Device(#[source] Arc<ActivateError>),
}

/// What the driver wrote for one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueueRegisters {
    /// QueueNumMax, from the device.
    max_size: u16,
    /// QueueNum: the last valid size written (the maximum after reset).
    size: u16,
    /// The last QueueNum write if it was invalid; cleared by a valid write.
    invalid_size: Option<u32>,
    /// QueueReady.
    ready: bool,
    /// QueueDescLow/High.
    desc: u64,
    /// QueueDriverLow/High.
    driver: u64,
    /// QueueDeviceLow/High.
    device: u64,
}

impl QueueRegisters {
    /// A queue in its reset state: not ready, the maximum size, addresses 0.
    pub(crate) fn new(max_size: u16) -> Self {
        QueueRegisters {
            max_size,
            size: max_size,
            invalid_size: None,
            ready: false,
            desc: 0,
            driver: 0,
            device: 0,
        }
    }

    /// Back to the state of [`QueueRegisters::new`] (device reset).
    pub(crate) fn reset(&mut self) {
        *self = QueueRegisters::new(self.max_size);
    }

    /// QueueNumMax.
    pub(crate) fn max_size(&self) -> u16 {
        self.max_size
    }

    /// QueueNum as read back: the last valid size.
    pub(crate) fn size(&self) -> u16 {
        self.size
    }

    /// QueueReady.
    pub(crate) fn ready(&self) -> bool {
        self.ready
    }

    /// QueueNum write. A split queue's size is a power of two no larger than
    /// QueueNumMax (virtio 1.2 §2.7); anything else keeps the previous size
    /// and poisons the queue until a valid size is written, so a driver that
    /// made a mistake cannot have its queue run with a size it did not choose.
    pub(crate) fn set_size(&mut self, value: u32) {
        match u16::try_from(value) {
            Ok(size) if size != 0 && size.is_power_of_two() && size <= self.max_size => {
                self.size = size;
                self.invalid_size = None;
            }
            _ => self.invalid_size = Some(value),
        }
    }

    /// QueueReady write: 1 makes the queue ready, 0 takes it back; other
    /// values are not defined by the spec and are ignored.
    pub(crate) fn set_ready(&mut self, value: u32) {
        match value {
            0 => self.ready = false,
            1 => self.ready = true,
            _ => {}
        }
    }

    /// Write the low (`high == false`) or high half of a ring address.
    pub(crate) fn set_address_half(&mut self, area: QueueArea, high: bool, value: u32) {
        let addr = self.address_mut(area);
        *addr = if high {
            (*addr & u64::from(u32::MAX)) | (u64::from(value) << 32)
        } else {
            (*addr & !u64::from(u32::MAX)) | u64::from(value)
        };
    }

    /// Read back the low or high half of a ring address.
    pub(crate) fn address_half(&self, area: QueueArea, high: bool) -> u32 {
        let addr = self.address(area);
        if high {
            (addr >> 32) as u32
        } else {
            // Truncation keeps the low half, which is what is asked for.
            addr as u32
        }
    }

    fn address(&self, area: QueueArea) -> u64 {
        match area {
            QueueArea::Descriptor => self.desc,
            QueueArea::Driver => self.driver,
            QueueArea::Device => self.device,
        }
    }

    fn address_mut(&mut self, area: QueueArea) -> &mut u64 {
        match area {
            QueueArea::Descriptor => &mut self.desc,
            QueueArea::Driver => &mut self.driver,
            QueueArea::Device => &mut self.device,
        }
    }

    /// For a snapshot: (size, the last invalid QueueNum write if any,
    /// ready, descriptor, driver, device).
    pub(crate) fn saved(&self) -> (u16, Option<u32>, bool, u64, u64, u64) {
        (
            self.size,
            self.invalid_size,
            self.ready,
            self.desc,
            self.driver,
            self.device,
        )
    }

    /// Registers from a snapshot, taken as the driver's writes would be:
    /// a size the queue could not take leaves it poisoned, as does a saved
    /// invalid write.
    pub(crate) fn load(
        &mut self,
        size: u16,
        invalid_size: Option<u32>,
        ready: bool,
        addresses: [u64; 3],
    ) {
        self.reset();
        self.set_size(u32::from(size));
        if let Some(bad) = invalid_size {
            self.invalid_size = Some(bad);
        }
        self.ready = ready;
        [self.desc, self.driver, self.device] = addresses;
    }

    /// The `Queue` a device gets at activation for queue number `index`.
    ///
    /// A queue the driver did not make ready is handed over in its reset
    /// state (`ready() == false`, nothing checked). A ready queue must have
    /// a valid size and three aligned rings that lie entirely in `mem`.
    pub(crate) fn to_queue(
        &self,
        index: usize,
        mem: &GuestMemoryMmap,
        event_idx: bool,
    ) -> Result<Queue, ActivationError> {
        let mut queue = Queue::new(self.max_size).map_err(|_| ActivationError::InvalidMaxSize {
            queue: index,
            max: self.max_size,
        })?;
        queue.set_event_idx(event_idx);
        if !self.ready {
            return Ok(queue);
        }

        let invalid_size = |size: u32| ActivationError::InvalidSize {
            queue: index,
            size,
            max: self.max_size,
        };
        if let Some(size) = self.invalid_size {
            return Err(invalid_size(size));
        }
        queue
            .try_set_size(self.size)
            .map_err(|_| invalid_size(self.size.into()))?;

        for area in [QueueArea::Descriptor, QueueArea::Driver, QueueArea::Device] {
            self.check_area(index, area, mem)?;
        }
        if self.driver == 0 {
            return Err(ActivationError::DriverAreaAtZero { queue: index });
        }

        // After `check_area` these cannot fail; map the errors anyway rather
        // than trusting that the two alignment tables agree.
        let misaligned = |area: QueueArea, addr: u64| ActivationError::Misaligned {
            queue: index,
            area,
            addr,
        };
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(|_| misaligned(QueueArea::Descriptor, self.desc))?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.driver))
            .map_err(|_| misaligned(QueueArea::Driver, self.driver))?;
        queue
            .try_set_used_ring_address(GuestAddress(self.device))
            .map_err(|_| misaligned(QueueArea::Device, self.device))?;
        queue.set_ready(true);
        Ok(queue)
    }

    /// One ring of a ready queue: aligned, and every byte in guest memory.
    fn check_area(
        &self,
        index: usize,
        area: QueueArea,
        mem: &GuestMemoryMmap,
    ) -> Result<(), ActivationError> {
        let addr = self.address(area);
        if addr % area.alignment() != 0 {
            return Err(ActivationError::Misaligned {
                queue: index,
                area,
                addr,
            });
        }
        let len = area.size_in_bytes(self.size);
        let in_memory = addr.checked_add(len).is_some()
            && usize::try_from(len).is_ok_and(|len| mem.check_range(GuestAddress(addr), len));
        if !in_memory {
            return Err(ActivationError::OutsideMemory {
                queue: index,
                area,
                addr,
                len,
            });
        }
        Ok(())
    }
}
