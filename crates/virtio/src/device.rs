//! The contract between the virtio transport and a virtio device.
//!
//! A device (block, vsock, ...) implements [`VirtioDevice`]; the virtio-mmio
//! transport ([`crate::mmio`]) owns the register file, feature negotiation,
//! the status state machine and queue setup, and calls into the device only
//! for what is device-specific: its type, queues, features, configuration
//! space, activation and reset. The device never sees a register write.
//!
//! Queue notifications reach the device through one `EventFd` per queue,
//! which the device owns (so it can watch them in the event loop before it
//! is activated) and the VMM registers with KVM as ioeventfds on the
//! QueueNotify register.

use std::sync::Arc;

use chitin_memory::GuestMemoryMmap;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::interrupt::VirtioInterrupt;

/// Everything a device needs to start processing, handed over when the
/// driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory, for reading and writing buffers.
    pub mem: GuestMemoryMmap,
    /// All the device's queues, in index order. Those the driver made ready
    /// are ready and validated against `mem` (size, alignment, rings inside
    /// guest memory); a queue the driver left unused comes in its reset
    /// state with `ready() == false` and must not be processed.
    pub queues: Vec<Queue>,
    /// Raise used-buffer or configuration-change interrupts.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// Features both sides agreed on (device and transport bits).
    pub acked_features: u64,
}

/// Why a device refused activation; the transport then sets
/// DEVICE_NEEDS_RESET (virtio 1.2 §2.1.2).
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues handed over.
        got: usize,
    },
    /// A device-specific reason.
    #[error("device activation failed: {0}")]
    Device(String),
}

/// A virtio device behind a transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (virtio 1.2 §5): 2 = block, 19 = socket.
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the slice length is the queue count.
    fn queue_max_sizes(&self) -> &[u16];

    /// One `EventFd` per queue, written when the driver notifies that queue.
    fn queue_events(&self) -> &[EventFd];

    /// Device-specific feature bits offered. The transport adds its own
    /// (`VIRTIO_F_VERSION_1`, `VIRTIO_RING_F_INDIRECT_DESC`,
    /// `VIRTIO_RING_F_EVENT_IDX`).
    fn device_features(&self) -> u64;

    /// Read `data.len()` bytes of configuration space at `offset`. Bytes
    /// past the end of the configuration space read as 0. Must not panic
    /// for any offset or length.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Write configuration space; devices ignore writes they do not define.
    /// Must not panic for any offset or length.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// The driver set DRIVER_OK: start processing the queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;

    /// The driver reset the device (status 0): stop using queues and guest
    /// memory and return to the state before activation. Must be callable
    /// when not activated.
    fn reset(&mut self);

    /// While activated, where the device is in each queue: (next available
    /// index to take, next used index to write), in queue order. `None`
    /// when not activated, or when the device cannot say (then it cannot
    /// be snapshotted while running).
    fn queue_positions(&self) -> Option<Vec<(u16, u16)>> {
        None
    }

    /// Why this device cannot be carried in a snapshot, if it cannot: state
    /// outside the guest that a snapshot would lose silently (a tap's link,
    /// a shared directory's open files). Devices must opt in.
    fn snapshot_refusal(&self) -> Option<&'static str> {
        Some("a device without snapshot support")
    }

    /// Activated again from a snapshot (after `activate`): what lived on
    /// the host (connections, open files) was not carried over; tell the
    /// driver as the device's specification says.
    fn restored(&mut self) {}
}

/// [`VirtioDevice::read_config`] for a configuration space held as bytes:
/// copies what `offset` and `data.len()` cover, and zeros past its end.
/// Never panics, whatever the offset.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = offset
            .checked_add(i as u64)
            .and_then(|at| usize::try_from(at).ok())
            .and_then(|at| config.get(at))
            .copied()
            .unwrap_or(0);
    }
}
