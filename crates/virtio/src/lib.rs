//! virtio for chitin: the device trait and the virtio-mmio transport.
//!
//! - [`device`]: [`VirtioDevice`], what every device crate implements;
//! - [`active`]: [`Active`], a device's state between activation and
//!   reset, and the one rule for a broken ring;
//! - [`faults`]: [`GuestFaults`], per-device counts and rate-limited logs
//!   of what the driver got wrong;
//! - [`interrupt`]: [`VirtioInterrupt`], how a device raises interrupts;
//! - [`mmio`]: the virtio-mmio version 2 transport (virtio 1.2 §4.2);
//! - [`rate_limit`]: [`RateLimiter`], token buckets for bytes and
//!   operations per second, shared by every device that takes a limit;
//! - [`queue`]: chain popping, run bounds and notification shared by every
//!   device handler;
//! - `test_utils` (feature `test-utils`): guest memory, hand-built split
//!   queues, a recording interrupt and a dummy device for unit tests of
//!   device crates and for the fuzz target.
//!
//! Guest data is hostile here: every register value and queue address the
//! driver writes is checked before use, and nothing panics on it.

#![deny(missing_docs)]

pub mod active;
pub mod device;
pub mod faults;
pub mod interrupt;
pub mod mmio;
pub mod queue;
pub mod rate_limit;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

pub use active::Active;
pub use device::{read_config_bytes, ActivateContext, ActivateError, VirtioDevice};
pub use faults::{GuestFaults, Severity};
pub use interrupt::{InterruptKind, VirtioInterrupt};
pub use rate_limit::{Limit, RateLimit, RateLimiter};
pub use virtio_queue::{DescriptorChain, Queue, QueueT};
