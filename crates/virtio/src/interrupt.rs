//! How a device tells the driver that something happened.
//!
//! The transport implements [`VirtioInterrupt`]: it sets the matching bit of
//! its InterruptStatus register (virtio 1.2 §4.2.2) and raises the device's
//! interrupt line. Devices call it after adding used buffers (subject to
//! event suppression) or when their configuration changes.

/// Which InterruptStatus bit to set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// Bit 0: used buffers were added to a queue.
    Queue,
    /// Bit 1: the configuration (or the device status) changed.
    Config,
}

/// Raises a device's interrupt.
pub trait VirtioInterrupt: Send + Sync {
    /// Set the InterruptStatus bit for `kind` and raise the line.
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()>;

    /// The device hit an error it cannot recover from without a reset: set
    /// DEVICE_NEEDS_RESET in the status register and raise a configuration
    /// interrupt (virtio 1.2 §2.1.2). The device stops processing.
    fn signal_needs_reset(&self);
}
