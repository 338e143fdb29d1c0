//! The interrupt state one virtio-mmio transport shares with its device.
//!
//! This module owns the InterruptStatus bits, the DEVICE_NEEDS_RESET flag,
//! ConfigGeneration and the EventFd the VMM registered as irqfd for the
//! device's interrupt line. Device threads reach it through
//! [`VirtioInterrupt`] while vCPU threads read and acknowledge it through the
//! transport, so it must never take a lock: everything here is an atomic or
//! an EventFd write, and a device that triggers an interrupt while holding
//! its own lock can never deadlock against a vCPU inside the transport.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

use super::regs::{INT_CONFIG, INT_QUEUE};
use crate::interrupt::{InterruptKind, VirtioInterrupt};

/// InterruptStatus, NEEDS_RESET and ConfigGeneration of one transport.
#[derive(Debug)]
pub(crate) struct MmioInterrupt {
    /// InterruptStatus: [`INT_QUEUE`] and [`INT_CONFIG`].
    status: AtomicU32,
    /// The device (or the transport, for a failed activation) asked for a
    /// reset; read back as DEVICE_NEEDS_RESET in the status register.
    needs_reset: AtomicBool,
    /// ConfigGeneration (virtio 1.2 §4.2.2), bumped with every configuration
    /// interrupt so a driver reading the configuration across a change sees
    /// two different generations and retries (virtio 1.2 §2.5.1).
    config_generation: AtomicU32,
    /// Written to raise the interrupt line (a KVM irqfd).
    irq: EventFd,
}

impl MmioInterrupt {
    /// Interrupt state raising `irq`, with nothing pending.
    pub(crate) fn new(irq: EventFd) -> Self {
        MmioInterrupt {
            status: AtomicU32::new(0),
            needs_reset: AtomicBool::new(false),
            config_generation: AtomicU32::new(0),
            irq,
        }
    }

    /// The InterruptStatus register.
    pub(crate) fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// InterruptACK: clear the bits set in `bits`.
    pub(crate) fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Whether DEVICE_NEEDS_RESET is to be shown in the status register.
    pub(crate) fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// The ConfigGeneration register.
    pub(crate) fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::Acquire)
    }

    /// Device reset: drop pending interrupts and the NEEDS_RESET flag.
    /// ConfigGeneration keeps counting, so a driver never sees an old
    /// generation again.
    pub(crate) fn reset(&self) {
        self.status.store(0, Ordering::Release);
        self.needs_reset.store(false, Ordering::Release);
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        let bit = match kind {
            InterruptKind::Queue => INT_QUEUE,
            InterruptKind::Config => {
                // Atomic addition wraps at u32::MAX, which is what the
                // driver's comparison for inequality needs.
                self.config_generation.fetch_add(1, Ordering::AcqRel);
                INT_CONFIG
            }
        };
        // The bit is set before the line is raised, so the driver's handler
        // always finds it.
        self.status.fetch_or(bit, Ordering::AcqRel);
        self.irq.write(1)
    }

    fn signal_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::Release);
        // Nothing to report to: the flag is set, and a lost edge leaves it
        // visible to the next status read.
        let _ = self.trigger(InterruptKind::Config);
    }
}
