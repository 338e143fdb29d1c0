//! virtio-blk for chitin microVMs, over raw image files (virtio 1.2 §5.2).
//!
//! The device is built in three layers, each testable without KVM:
//!
//! - [`request`]: a pure parser from a descriptor chain to a typed
//!   [`Request`]. It reads every guest field once into a local copy and
//!   checks every buffer against guest memory before handing it out.
//! - [`handler`]: the queue loop ([`QueueHandler`]), generic over a
//!   [`BlockBackend`] and a [`VirtioInterrupt`]: it executes requests, writes
//!   the status byte the guest sees (mapped from errors in one place,
//!   [`ExecuteError::status`]), fills the used ring and raises interrupts
//!   subject to event suppression.
//! - [`device`] and `event`: [`Block`], the [`chitin_virtio::VirtioDevice`]
//!   (features, configuration space, activate/reset) and its
//!   [`event_manager::MutEventSubscriber`] adapter, which runs the queue when
//!   the driver's notification `EventFd` fires.
//!
//! Backends: [`FileBackend`] does positioned I/O straight between the image
//! (a regular file or a block device) and guest memory; `MemBackend`
//! (feature `test-utils`) keeps the disk in a `Vec` for tests, benches and
//! fuzzing.
//!
//! Guest data is hostile here: a malformed chain gets an error status, or a
//! used entry of length 0 when not even the status byte can be written; a
//! driver that breaks the rings themselves gets DEVICE_NEEDS_RESET. Nothing
//! panics on guest input, nothing is allocated by a guest-supplied length,
//! and no guest memory outside the chain is touched.
//!
//! [`VirtioInterrupt`]: chitin_virtio::VirtioInterrupt

#![deny(missing_docs)]

pub mod backend;
pub mod device;
mod event;
pub mod file;
pub mod handler;
pub mod request;
#[cfg(test)]
mod test_utils;

pub use backend::BlockBackend;
#[cfg(any(test, feature = "test-utils"))]
pub use backend::MemBackend;
pub use device::{BlkError, Block, DiskConfig};
pub use file::FileBackend;
pub use handler::{ExecuteError, HandlerError, QueueHandler, QueueRun};
pub use request::{DiscardRange, ParsedChain, Request, RequestError, Segment};

/// Bytes per sector: the unit of `capacity` and of request offsets, whatever
/// the block size (virtio 1.2 §5.2.4).
pub const SECTOR_SIZE: u64 = 512;

/// `log2(SECTOR_SIZE)`.
pub const SECTOR_SHIFT: u32 = 9;

/// The size of the device's only queue (requestq1).
pub const QUEUE_SIZE: u16 = 256;

/// Most data segments (descriptors besides the header and the status) in one
/// request, offered as `seg_max`. A driver without indirect descriptors can
/// fill the whole ring with one request of header + `seg_max` + status;
/// Linux sizes its scatter lists the same way.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

/// Largest single data segment in bytes, offered as `size_max`: 1 MiB.
/// Together with [`SEG_MAX`] this bounds one request to 254 MiB of data, so
/// used lengths always fit a `u32`.
pub const SEG_SIZE_MAX: u32 = 1 << 20;

/// Most sectors in one discard range, offered as `max_discard_sectors`:
/// 16 MiB. With [`MAX_DISCARD_SEG`] this bounds one request to 128 MiB of
/// work when a discard falls back to writing zeroes (a host file system
/// without hole punching); the driver splits larger discards.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 15;

/// Most ranges in one discard request, offered as `max_discard_seg`.
pub const MAX_DISCARD_SEG: u32 = 8;

/// Discard granularity in sectors, offered as `discard_sector_alignment`:
/// 4 KiB, the block size of the host filesystems we punch holes in.
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;

/// Most sectors in one write-zeroes range, offered as
/// `max_write_zeroes_sectors`: 16 MiB, for the same reason as discard
/// (`FALLOC_FL_ZERO_RANGE` is missing on tmpfs, for one).
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 15;

/// Most ranges in one write-zeroes request, offered as
/// `max_write_zeroes_seg`.
pub const MAX_WRITE_ZEROES_SEG: u32 = 8;

/// Length of the device ID string returned by `VIRTIO_BLK_T_GET_ID`.
pub const ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;
