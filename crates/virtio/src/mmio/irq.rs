//! The interrupt state one virtio-mmio transport shares with its device.
//!
//! This module owns the InterruptStatus bits, the DEVICE_NEEDS_RESET flag,
//! ConfigGeneration and the EventFd the VMM registered as irqfd for the
//! device's interrupt line. Device threads reach it through
//! [`VirtioInterrupt`], which never takes a lock: raising an interrupt is an
//! atomic OR and an EventFd write, so a device that triggers one while
//! holding its own lock can never deadlock against a vCPU inside the
//! transport. vCPU threads read and acknowledge InterruptStatus under a
//! lock of this module's own, held for nothing but the bits.
//!
//! InterruptACK need not leave the guest: the VMM can register the
//! [`MmioInterrupt::ack_events`] as KVM ioeventfds matching the value a
//! driver writes after nearly every interrupt (1, the used-buffer bit: it
//! acknowledges what it read), so KVM only counts them and the vCPU
//! carries on. Acknowledgements of a configuration change (2 or 3) are
//! rare and still reach the VMM: one eventfd per device, not three. A counted acknowledgement is applied
//! when the driver next reads InterruptStatus (or writes InterruptACK
//! through the VMM, or resets the device), before anything else, which is
//! where the driver could first tell the difference. Bits raised since the
//! driver's last read are kept apart from the ones it read, so an
//! acknowledgement counted late never clears a bit raised after the read
//! it answered. At worst a bit raised between a read and its
//! acknowledgement shows once more after the driver already handled its
//! buffers: one spurious interrupt, which a driver on a line it may share
//! must take anyway (Linux's virtio-mmio handler finds nothing new and
//! returns IRQ_NONE; for the configuration bit, its change handler runs
//! twice). Where this departs from virtio 1.2 §4.2.2 otherwise: a counted
//! acknowledgement of a bit the driver never read clears nothing.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::regs::{INT_CONFIG, INT_QUEUE};
use crate::interrupt::{InterruptKind, VirtioInterrupt};

/// The InterruptACK values KVM counts: what a driver writes back after an
/// interrupt for used buffers alone.
const ACK_VALUES: [u32; 1] = [INT_QUEUE];

/// InterruptStatus, NEEDS_RESET and ConfigGeneration of one transport.
#[derive(Debug)]
pub(crate) struct MmioInterrupt {
    /// Bits raised ([`INT_QUEUE`], [`INT_CONFIG`]) since the driver last
    /// read InterruptStatus.
    raised: AtomicU32,
    /// Bits the driver has read and not acknowledged; InterruptStatus
    /// shows these and [`Self::raised`].
    shown: Mutex<u32>,
    /// Acknowledgements KVM counted, one EventFd per value of
    /// [`ACK_VALUES`]; empty when the EventFd could not be made (then
    /// every acknowledgement reaches [`Self::acknowledge`]).
    acks: Vec<(EventFd, u32)>,
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
        let acks = ACK_VALUES
            .iter()
            .map(|&value| EventFd::new(EFD_NONBLOCK).map(|e| (e, value)))
            .collect::<io::Result<Vec<_>>>()
            .unwrap_or_else(|e| {
                log::warn!("virtio-mmio: no eventfds for InterruptACK ({e}): every ack exits");
                Vec::new()
            });
        MmioInterrupt {
            raised: AtomicU32::new(0),
            shown: Mutex::new(0),
            acks,
            needs_reset: AtomicBool::new(false),
            config_generation: AtomicU32::new(0),
            irq,
        }
    }

    /// EventFds that count InterruptACK writes of each value, for the VMM
    /// to register as ioeventfds with a 4-byte datamatch on the value.
    pub(crate) fn ack_events(&self) -> impl Iterator<Item = (&EventFd, u32)> {
        self.acks.iter().map(|(event, value)| (event, *value))
    }

    /// The bits shown, with the acknowledgements KVM counted applied.
    fn shown(&self) -> MutexGuard<'_, u32> {
        // A poisoned lock only means a holder panicked; the bits are valid.
        let mut shown = self.shown.lock().unwrap_or_else(|e| e.into_inner());
        for (event, value) in &self.acks {
            // EAGAIN: none of this value since the last look.
            if matches!(event.read(), Ok(n) if n > 0) {
                *shown &= !value;
            }
        }
        shown
    }

    /// The InterruptStatus register, as the driver reads it.
    pub(crate) fn status(&self) -> u32 {
        let mut shown = self.shown();
        *shown |= self.raised.swap(0, Ordering::AcqRel);
        *shown
    }

    /// InterruptACK that reached the VMM: clear the bits set in `bits`,
    /// read or not (the write is ordered with everything else here).
    pub(crate) fn acknowledge(&self, bits: u32) {
        let mut shown = self.shown();
        *shown &= !bits;
        self.raised.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Whether DEVICE_NEEDS_RESET is to be shown in the status register.
    pub(crate) fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// The ConfigGeneration register.
    pub(crate) fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::Acquire)
    }

    /// For a snapshot, without changing anything the driver could see:
    /// (the bits the driver read and has not acknowledged, the bits raised
    /// since its last read, ConfigGeneration, NEEDS_RESET). The two sets
    /// stay apart so an acknowledgement counted after the restore keeps
    /// its rule (it never clears a bit raised after the read it answers).
    pub(crate) fn saved(&self) -> (u32, u32, u32, bool) {
        let shown = *self.shown();
        (
            shown,
            self.raised.load(Ordering::Acquire),
            self.config_generation(),
            self.needs_reset(),
        )
    }

    /// Put back what [`MmioInterrupt::saved`] returned; the line is raised
    /// again for pending bits, whose interrupt the old VM may not have
    /// delivered (at worst one interrupt more, which finds nothing new).
    pub(crate) fn load(&self, shown: u32, raised: u32, config_generation: u32, needs_reset: bool) {
        let bits = INT_QUEUE | INT_CONFIG;
        let mut current = self.shown();
        *current = shown & bits;
        self.raised.store(raised & bits, Ordering::Release);
        self.config_generation
            .store(config_generation, Ordering::Release);
        self.needs_reset.store(needs_reset, Ordering::Release);
        if (shown | raised) & bits != 0 {
            let _ = self.irq.write(1);
        }
    }

    /// Device reset: drop pending interrupts, counted acknowledgements and
    /// the NEEDS_RESET flag. ConfigGeneration keeps counting, so a driver
    /// never sees an old generation again.
    pub(crate) fn reset(&self) {
        let mut shown = self.shown();
        *shown = 0;
        self.raised.store(0, Ordering::Release);
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
        self.raised.fetch_or(bit, Ordering::AcqRel);
        self.irq.write(1)
    }

    fn signal_needs_reset(&self) {
        self.needs_reset.store(true, Ordering::Release);
        // Nothing to report to: the flag is set, and a lost edge leaves it
        // visible to the next status read.
        let _ = self.trigger(InterruptKind::Config);
    }
}
