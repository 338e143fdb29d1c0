//! The virtio-mmio transport, version 2 register layout (virtio 1.2 §4.2).
//!
//! [`MmioTransport`] sits on the MMIO bus in front of one [`VirtioDevice`]
//! and owns everything the driver does through registers: discovery (magic,
//! version, IDs), feature negotiation (virtio 1.2 §2.2), the device status
//! state machine (§2.1, §3.1), queue setup and its validation against guest
//! memory, queue notifications (the fallback path when no KVM ioeventfd
//! caught them), the interrupt status and the forwarding of configuration
//! space accesses to the device.
//!
//! Every register value comes from a hostile guest. This module must never
//! panic, index out of bounds or allocate by a guest-supplied value, for any
//! sequence of accesses at any offset and width; it must never hand a device
//! a ready queue that is not entirely inside guest memory; and it must never
//! take its own register lock from a path a device thread can reach
//! ([`VirtioInterrupt`] is lock-free), so a device that raises an interrupt
//! while holding its lock cannot deadlock with a vCPU in here.
//!
//! Lock order: the register lock, then the device lock. Device threads take
//! only the device lock.

mod irq;
mod queue;
mod regs;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use chitin_bus::BusDevice;
use chitin_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use self::irq::MmioInterrupt;
use self::queue::QueueRegisters;
pub use self::queue::{ActivationError, QueueArea};
use self::regs::*;
use crate::device::{ActivateContext, VirtioDevice};
use crate::interrupt::VirtioInterrupt;

/// Size of each device's register window: 256 bytes of control registers,
/// then the device's configuration space, 4 KiB in all (one page, so every
/// device can be mapped and trapped separately).
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;

/// Offset of QueueNotify in the window. Register a KVM ioeventfd for each
/// queue at `base + QUEUE_NOTIFY_OFFSET`, 4 bytes wide, with the queue index
/// as datamatch, so notifications never reach userspace.
pub const QUEUE_NOTIFY_OFFSET: u64 = QUEUE_NOTIFY;

/// Offset of InterruptACK in the window. Register each of
/// [`MmioTransport::ack_events`] as a KVM ioeventfd at
/// `base + INTERRUPT_ACK_OFFSET`, 4 bytes wide, with its value as
/// datamatch, so a driver's usual acknowledgement never reaches userspace.
pub const INTERRUPT_ACK_OFFSET: u64 = INTERRUPT_ACK;

/// The VendorID register: "CHTN" read as a little-endian `u32`.
pub const VENDOR_ID: u32 = 0x4e54_4843;

/// What the driver configured; guarded by [`MmioTransport::registers`].
#[derive(Debug)]
struct Registers {
    /// Status bits the driver set and the transport accepted. Never holds
    /// DEVICE_NEEDS_RESET, which lives in [`MmioInterrupt`].
    status: u32,
    /// DeviceFeaturesSel.
    device_features_sel: u32,
    /// DriverFeaturesSel.
    driver_features_sel: u32,
    /// Features the driver accepted, always a subset of those offered.
    acked_features: u64,
    /// QueueSel; may name a queue that does not exist.
    queue_sel: u32,
    /// SHMSel; no shared memory region exists.
    shm_sel: u32,
    /// One entry per device queue, in index order.
    queues: Vec<QueueRegisters>,
    /// Why the last DRIVER_OK since reset did not activate the device.
    activation_error: Option<ActivationError>,
}

impl Registers {
    /// Registers after reset, for queues of the given maximum sizes.
    fn new(queue_max_sizes: &[u16]) -> Self {
        Registers {
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            shm_sel: 0,
            queues: queue_max_sizes
                .iter()
                .map(|&max| QueueRegisters::new(max))
                .collect(),
            activation_error: None,
        }
    }

    /// Device reset (status 0): everything back to [`Registers::new`].
    fn reset(&mut self) {
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        self.shm_sel = 0;
        self.queues.iter_mut().for_each(QueueRegisters::reset);
        self.activation_error = None;
    }

    /// The queue QueueSel names, if it exists.
    fn selected_queue(&self) -> Option<&QueueRegisters> {
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|index| self.queues.get(index))
    }

    /// The queue QueueSel names, if it exists and may still be configured:
    /// queue registers are frozen once the driver set DRIVER_OK.
    fn configurable_queue(&mut self) -> Option<&mut QueueRegisters> {
        if self.status & DRIVER_OK != 0 {
            return None;
        }
        usize::try_from(self.queue_sel)
            .ok()
            .and_then(|index| self.queues.get_mut(index))
    }
}

/// A virtio device behind a virtio-mmio version 2 register window.
///
/// Put it on the MMIO bus at a 4 KiB window ([`MMIO_WINDOW_SIZE`]); it
/// serves any access at any offset and width without panicking. Control
/// registers (offsets below 0x100) answer only aligned 32-bit accesses;
/// other widths read as zeros and writes are ignored. Offsets from 0x100 are
/// the device's configuration space, forwarded with any width.
///
/// # Example
///
/// ```
/// use std::sync::{Arc, Mutex};
///
/// use chitin_bus::BusDevice;
/// use chitin_virtio::mmio::MmioTransport;
/// use chitin_virtio::test_utils::{guest_memory, DummyDevice};
/// use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
///
/// // A block device (type 2) with one queue of up to 256 entries.
/// let device = Arc::new(Mutex::new(DummyDevice::new(2, &[256]).unwrap()));
/// let irq = EventFd::new(EFD_NONBLOCK).unwrap();
/// let transport = MmioTransport::new(device, guest_memory(1 << 20), irq);
///
/// let mut magic = [0u8; 4];
/// transport.read(0x000, &mut magic);
/// assert_eq!(&magic, b"virt");
/// let mut device_id = [0u8; 4];
/// transport.read(0x008, &mut device_id);
/// assert_eq!(u32::from_le_bytes(device_id), 2);
/// ```
pub struct MmioTransport {
    /// The device; locked only for configuration space, activation and reset.
    device: Arc<Mutex<dyn VirtioDevice>>,
    /// Guest memory, handed to the device at activation.
    mem: GuestMemoryMmap,
    /// DeviceID, read once from the device.
    device_type: u32,
    /// Device features plus [`TRANSPORT_FEATURES`], read once.
    offered_features: u64,
    /// Clones of the device's queue EventFds, so a QueueNotify that reaches
    /// userspace never takes the device lock. `None` where duplicating the
    /// descriptor failed; those notifications go through the device.
    notifiers: Vec<Option<EventFd>>,
    /// The register file.
    registers: Mutex<Registers>,
    /// InterruptStatus, NEEDS_RESET, ConfigGeneration and the irq EventFd.
    interrupt: Arc<MmioInterrupt>,
}

/// One queue as a snapshot carries it: the driver's registers and, while
/// the device runs, where the device is in the rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSnapshot {
    /// QueueNum: the last valid size written.
    pub size: u16,
    /// The last QueueNum write if it was invalid (the queue refuses to
    /// start until a valid one).
    pub invalid_size: Option<u32>,
    /// QueueReady.
    pub ready: bool,
    /// The descriptor table's guest address.
    pub desc: u64,
    /// The available ring's.
    pub driver: u64,
    /// The used ring's.
    pub device: u64,
    /// The next available entry the device takes.
    pub next_avail: u16,
    /// The next used entry the device writes.
    pub next_used: u16,
}

/// A transport as a snapshot carries it (the device's own state aside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportSnapshot {
    /// DeviceID: a snapshot restores only into the same kind of device.
    pub device_type: u32,
    /// The status register, without DEVICE_NEEDS_RESET.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// SHMSel.
    pub shm_sel: u32,
    /// Every queue, in index order.
    pub queues: Vec<QueueSnapshot>,
    /// InterruptStatus bits the driver read and has not acknowledged.
    pub interrupt_status: u32,
    /// InterruptStatus bits raised since the driver's last read.
    pub interrupt_raised: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// DEVICE_NEEDS_RESET.
    pub needs_reset: bool,
}

/// Why a transport could not be saved or put back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportSnapshotError {
    /// The device cannot be carried in a snapshot.
    #[error("cannot snapshot {0}")]
    Refused(&'static str),
    /// The device runs but cannot say where it is in its queues.
    #[error("the device cannot report its queue positions")]
    NoPositions,
    /// The snapshot is of another kind of device.
    #[error("the snapshot is of virtio device type {saved}, this one is {has}")]
    DeviceType {
        /// The snapshot's DeviceID.
        saved: u32,
        /// This device's.
        has: u32,
    },
    /// The transport was already in use: restore only into a new one.
    #[error("restore into a transport the driver already used")]
    NotFresh,
    /// The status is not one the driver's bring-up can reach.
    #[error("device status {0:#x} cannot be reached by a driver")]
    InvalidStatus(u32),
    /// The snapshot is of another device.
    #[error("the snapshot is of a device with {saved} queues, this one has {has}")]
    QueueCount {
        /// Queues in the snapshot.
        saved: usize,
        /// Queues of the device.
        has: usize,
    },
    /// The snapshot's features include some the device does not offer.
    #[error("the snapshot's features {0:#x} include some this device does not offer")]
    Features(u64),
    /// The device could not be started again on the saved queues.
    #[error("the device did not start again: {0}")]
    Activation(String),
}

impl MmioTransport {
    /// The transport's registers, interrupt state and queue positions, for
    /// a snapshot. The VM must be paused (no vCPU in a register access,
    /// the device's thread at rest).
    pub fn snapshot(&self) -> Result<TransportSnapshot, TransportSnapshotError> {
        let regs = self.registers();
        let device = lock(&self.device);
        if let Some(why) = device.snapshot_refusal() {
            return Err(TransportSnapshotError::Refused(why));
        }
        let running = regs.status & DRIVER_OK != 0 && regs.activation_error.is_none();
        let positions = if running {
            device
                .queue_positions()
                .filter(|p| p.len() == regs.queues.len())
                .ok_or(TransportSnapshotError::NoPositions)?
        } else {
            vec![(0, 0); regs.queues.len()]
        };
        drop(device);
        let (interrupt_status, interrupt_raised, config_generation, needs_reset) =
            self.interrupt.saved();
        let queues = regs
            .queues
            .iter()
            .zip(positions)
            .map(|(q, (next_avail, next_used))| {
                let (size, invalid_size, ready, desc, driver, device) = q.saved();
                QueueSnapshot {
                    size,
                    invalid_size,
                    ready,
                    desc,
                    driver,
                    device,
                    next_avail,
                    next_used,
                }
            })
            .collect();
        Ok(TransportSnapshot {
            device_type: self.device_type,
            status: regs.status,
            device_features_sel: regs.device_features_sel,
            driver_features_sel: regs.driver_features_sel,
            acked_features: regs.acked_features,
            queue_sel: regs.queue_sel,
            shm_sel: regs.shm_sel,
            queues,
            interrupt_status,
            interrupt_raised,
            config_generation,
            needs_reset,
        })
    }

    /// Put a snapshot back into this transport (new, its device never
    /// activated): the registers, the interrupt state, and, when the driver
    /// had started the device, the device started again on the saved rings
    /// at the saved positions, then told it was restored.
    pub fn restore(&self, snap: &TransportSnapshot) -> Result<(), TransportSnapshotError> {
        let mut regs = self.registers();
        // Everything is checked before anything changes: a refused
        // snapshot leaves the transport as new.
        if snap.device_type != self.device_type {
            return Err(TransportSnapshotError::DeviceType {
                saved: snap.device_type,
                has: self.device_type,
            });
        }
        if regs.status != 0 {
            return Err(TransportSnapshotError::NotFresh);
        }
        if snap.queues.len() != regs.queues.len() {
            return Err(TransportSnapshotError::QueueCount {
                saved: snap.queues.len(),
                has: regs.queues.len(),
            });
        }
        if snap.acked_features & !self.offered_features != 0 {
            return Err(TransportSnapshotError::Features(snap.acked_features));
        }
        // The status must be a step of the bring-up (virtio 1.2 §3.1.1),
        // FAILED aside, and FEATURES_OK needs VERSION_1, as the register
        // state machine enforces.
        let known = INIT_SEQUENCE.iter().fold(FAILED, |acc, bit| acc | bit);
        let base = snap.status & !FAILED;
        let reachable = (0..=INIT_SEQUENCE.len())
            .any(|n| INIT_SEQUENCE[..n].iter().fold(0, |acc, bit| acc | bit) == base);
        if snap.status & !known != 0
            || !reachable
            || (base & FEATURES_OK != 0 && snap.acked_features & F_VERSION_1 == 0)
        {
            return Err(TransportSnapshotError::InvalidStatus(snap.status));
        }
        let mut queues_regs = regs.queues.clone();
        for (q, saved) in queues_regs.iter_mut().zip(&snap.queues) {
            q.load(
                saved.size,
                saved.invalid_size,
                saved.ready,
                [saved.desc, saved.driver, saved.device],
            );
        }
        let running = base & DRIVER_OK != 0 && !snap.needs_reset;
        let mut queues = Vec::new();
        if running {
            let event_idx = snap.acked_features & F_EVENT_IDX != 0;
            for (index, (q, saved)) in queues_regs.iter().zip(&snap.queues).enumerate() {
                let mut queue = q
                    .to_queue(index, &self.mem, event_idx)
                    .map_err(|e| TransportSnapshotError::Activation(e.to_string()))?;
                if saved.ready {
                    use virtio_queue::QueueT;
                    queue.set_next_avail(saved.next_avail);
                    queue.set_next_used(saved.next_used);
                }
                queues.push(queue);
            }
        }
        regs.status = snap.status;
        regs.device_features_sel = snap.device_features_sel;
        regs.driver_features_sel = snap.driver_features_sel;
        regs.acked_features = snap.acked_features;
        regs.queue_sel = snap.queue_sel;
        regs.shm_sel = snap.shm_sel;
        regs.queues = queues_regs;
        self.interrupt.load(
            snap.interrupt_status,
            snap.interrupt_raised,
            snap.config_generation,
            snap.needs_reset,
        );
        if !running {
            return Ok(());
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            interrupt: self.interrupt(),
            acked_features: regs.acked_features,
        };
        let mut device = lock(&self.device);
        match device.activate(ctx) {
            Ok(()) => {
                device.restored();
                Ok(())
            }
            Err(e) => {
                // Back to new, as a refused snapshot leaves it.
                drop(device);
                self.reset(&mut regs);
                Err(TransportSnapshotError::Activation(e.to_string()))
            }
        }
    }

    /// A transport for `device`, whose queues live in `mem`.
    ///
    /// `interrupt` is the EventFd the VMM registers as irqfd for this
    /// device's GSI; the transport writes it whenever it or the device
    /// raises an interrupt.
    ///
    /// The device type, its features, queue sizes and queue EventFds are
    /// read once, here: a device must not change them afterwards.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        interrupt: EventFd,
    ) -> Self {
        let (device_type, offered_features, queue_max_sizes, notifiers) = {
            let device = lock(&device);
            let queue_max_sizes = device.queue_max_sizes().to_vec();
            let notifiers = device
                .queue_events()
                .iter()
                .take(queue_max_sizes.len())
                .map(|event| event.try_clone().ok())
                .collect();
            (
                device.device_type(),
                device.device_features() | TRANSPORT_FEATURES,
                queue_max_sizes,
                notifiers,
            )
        };
        MmioTransport {
            device,
            mem,
            device_type,
            offered_features,
            notifiers,
            registers: Mutex::new(Registers::new(&queue_max_sizes)),
            interrupt: Arc::new(MmioInterrupt::new(interrupt)),
        }
    }

    /// The interrupt handle the transport gives the device at activation.
    ///
    /// Triggering it sets InterruptStatus bits and writes the irq EventFd;
    /// it never takes a lock.
    pub fn interrupt(&self) -> Arc<dyn VirtioInterrupt> {
        self.interrupt.clone()
    }

    /// EventFds counting the driver's InterruptACK writes, each with the
    /// value it stands for (see [`INTERRUPT_ACK_OFFSET`]). Registering them
    /// is optional: an acknowledgement KVM does not catch reaches the
    /// transport as a write and is applied at once, to every bit it names;
    /// a counted one is applied at the driver's next read, to the bits the
    /// driver had read (see the `irq` module).
    pub fn ack_events(&self) -> impl Iterator<Item = (&EventFd, u32)> {
        self.interrupt.ack_events()
    }

    /// The device status register as the driver reads it, including
    /// DEVICE_NEEDS_RESET.
    pub fn status(&self) -> u32 {
        self.status_of(&self.registers())
    }

    /// Why the driver's last DRIVER_OK since the last reset did not activate
    /// the device, if it did not.
    pub fn activation_error(&self) -> Option<ActivationError> {
        self.registers().activation_error.clone()
    }

    fn registers(&self) -> MutexGuard<'_, Registers> {
        lock(&self.registers)
    }

    fn status_of(&self, registers: &Registers) -> u32 {
        let needs_reset = if self.interrupt.needs_reset() {
            NEEDS_RESET
        } else {
            0
        };
        registers.status | needs_reset
    }

    /// A 32-bit read of the control register at `offset` (below 0x100,
    /// aligned).
    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            MAGIC_VALUE => MAGIC,
            VERSION => LAYOUT_VERSION,
            DEVICE_ID => self.device_type,
            VENDOR_ID_OFFSET => VENDOR_ID,
            INTERRUPT_STATUS => self.interrupt.status(),
            CONFIG_GENERATION => self.interrupt.config_generation(),
            // No shared memory regions: all ones (virtio 1.2 §4.2.2).
            SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH => u32::MAX,
            _ => self.read_stateful_register(offset),
        }
    }

    /// The registers that depend on what the driver wrote.
    fn read_stateful_register(&self, offset: u64) -> u32 {
        let regs = self.registers();
        let queue = regs.selected_queue();
        match offset {
            DEVICE_FEATURES => feature_window(self.offered_features, regs.device_features_sel),
            DEVICE_FEATURES_SEL => regs.device_features_sel,
            DRIVER_FEATURES => feature_window(regs.acked_features, regs.driver_features_sel),
            DRIVER_FEATURES_SEL => regs.driver_features_sel,
            QUEUE_SEL => regs.queue_sel,
            // 0 tells the driver the queue does not exist.
            QUEUE_NUM_MAX => queue.map_or(0, |q| q.max_size().into()),
            QUEUE_NUM => queue.map_or(0, |q| q.size().into()),
            QUEUE_READY => queue.map_or(0, |q| q.ready().into()),
            STATUS => self.status_of(&regs),
            SHM_SEL => regs.shm_sel,
            _ => match address_register(offset) {
                Some((area, high)) => queue.map_or(0, |q| q.address_half(area, high)),
                None => 0,
            },
        }
    }

    /// A 32-bit write of `value` to the control register at `offset`.
    fn write_register(&self, offset: u64, value: u32) {
        match offset {
            // Without the register lock: a device thread may be inside the
            // interrupt state at the same time (which never waits for a
            // device thread).
            QUEUE_NOTIFY => self.notify(value),
            INTERRUPT_ACK => self.interrupt.acknowledge(value),
            _ => self.write_stateful_register(offset, value),
        }
    }

    fn write_stateful_register(&self, offset: u64, value: u32) {
        let mut regs = self.registers();
        match offset {
            DEVICE_FEATURES_SEL => regs.device_features_sel = value,
            DRIVER_FEATURES => self.write_driver_features(&mut regs, value),
            DRIVER_FEATURES_SEL => regs.driver_features_sel = value,
            // Selecting changes nothing in the device, so it stays allowed
            // after DRIVER_OK (reading QueueReady back needs it).
            QUEUE_SEL => regs.queue_sel = value,
            QUEUE_NUM => {
                if let Some(queue) = regs.configurable_queue() {
                    queue.set_size(value);
                }
            }
            QUEUE_READY => {
                if let Some(queue) = regs.configurable_queue() {
                    queue.set_ready(value);
                }
            }
            STATUS => self.write_status(&mut regs, value),
            SHM_SEL => regs.shm_sel = value,
            // VIRTIO_F_RING_RESET is not offered, so there is nothing to
            // reset a single queue for.
            QUEUE_RESET => {}
            // Queue addresses; read-only registers and unknown offsets.
            _ => {
                if let Some((area, high)) = address_register(offset) {
                    if let Some(queue) = regs.configurable_queue() {
                        queue.set_address_half(area, high, value);
                    }
                }
            }
        }
    }

    /// DriverFeatures: replace the selected half of the accepted features,
    /// dropping bits not offered. Frozen from FEATURES_OK on (virtio 1.2
    /// §3.1.1: the driver must not accept new features after it).
    fn write_driver_features(&self, regs: &mut Registers, value: u32) {
        if regs.status & FEATURES_OK != 0 {
            return;
        }
        let shift = match regs.driver_features_sel {
            0 => 0,
            1 => 32,
            // Only 64 feature bits exist; nothing is offered above them.
            _ => return,
        };
        let half = u64::from(u32::MAX) << shift;
        let accepted = (u64::from(value) << shift) & self.offered_features;
        regs.acked_features = (regs.acked_features & !half) | accepted;
    }

    /// QueueNotify that reached userspace (no ioeventfd caught it).
    fn notify(&self, value: u32) {
        let Ok(index) = usize::try_from(value) else {
            return;
        };
        match self.notifiers.get(index) {
            // The device drains the counter; an error only means it is
            // already saturated, so there is nothing more to signal.
            Some(Some(event)) => {
                let _ = event.write(1);
            }
            Some(None) => {
                let device = lock(&self.device);
                if let Some(event) = device.queue_events().get(index) {
                    let _ = event.write(1);
                }
            }
            None => {}
        }
    }

    /// The device status state machine (virtio 1.2 §2.1, §3.1.1).
    ///
    /// 0 resets. Otherwise the write must keep every bit already set and may
    /// add FAILED and the next bit of ACKNOWLEDGE → DRIVER → FEATURES_OK →
    /// DRIVER_OK; anything else is ignored. After FAILED or
    /// DEVICE_NEEDS_RESET only FAILED may still be added: the driver has to
    /// reset.
    fn write_status(&self, regs: &mut Registers, value: u32) {
        if value == 0 {
            self.reset(regs);
            return;
        }
        let current = self.status_of(regs);
        if value & current != current {
            return;
        }
        let added = value & !current;
        let step = added & !FAILED;
        if step != 0 {
            let expected = INIT_SEQUENCE.into_iter().find(|&bit| current & bit == 0);
            let halted = current & (FAILED | NEEDS_RESET) != 0;
            if halted || Some(step) != expected {
                return;
            }
        }
        match step {
            FEATURES_OK => {
                // Refusing leaves the bit clear; the driver reads it back and
                // gives up (virtio 1.2 §3.1.1 step 6). Only virtio 1.x is
                // implemented, so a driver without VERSION_1 is refused.
                if regs.acked_features & F_VERSION_1 == 0 {
                    return;
                }
                regs.status |= added;
            }
            DRIVER_OK => {
                regs.status |= added;
                self.activate(regs);
            }
            _ => regs.status |= added,
        }
    }

    /// DRIVER_OK: check every ready queue and start the device, or set
    /// DEVICE_NEEDS_RESET and raise a configuration interrupt (virtio 1.2
    /// §2.1.2) without starting it.
    fn activate(&self, regs: &mut Registers) {
        let acked_features = regs.acked_features;
        let event_idx = acked_features & F_EVENT_IDX != 0;
        let queues = regs
            .queues
            .iter()
            .enumerate()
            .map(|(index, queue)| queue.to_queue(index, &self.mem, event_idx))
            .collect::<Result<Vec<_>, _>>();
        let result = queues.and_then(|queues| {
            let ctx = ActivateContext {
                mem: self.mem.clone(),
                queues,
                interrupt: self.interrupt(),
                acked_features,
            };
            lock(&self.device)
                .activate(ctx)
                .map_err(|e| ActivationError::Device(Arc::new(e)))
        });
        if let Err(error) = result {
            regs.activation_error = Some(error);
            self.interrupt.signal_needs_reset();
        }
    }

    /// Status 0: reset the device, then the queues, features and interrupt
    /// state. ConfigGeneration keeps counting.
    fn reset(&self, regs: &mut Registers) {
        let mut device = lock(&self.device);
        device.reset();
        // Cleared while the device lock is still held: a device thread that
        // signalled before the reset cannot leave a stale NEEDS_RESET or
        // interrupt bit behind.
        self.interrupt.reset();
        drop(device);
        regs.reset();
    }

    /// Configuration space read; `data` is already zeroed.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        if let Some(config_offset) = config_offset(offset, data.len()) {
            lock(&self.device).read_config(config_offset, data);
        }
    }

    /// Configuration space write.
    fn write_config(&self, offset: u64, data: &[u8]) {
        if let Some(config_offset) = config_offset(offset, data.len()) {
            lock(&self.device).write_config(config_offset, data);
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset >= CONFIG {
            self.read_config(offset, data);
        } else if offset % 4 == 0 {
            // Anything but a 4-byte access to a control register reads as 0.
            if let Ok(bytes) = <&mut [u8; 4]>::try_from(data) {
                *bytes = self.read_register(offset).to_le_bytes();
            }
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset >= CONFIG {
            self.write_config(offset, data);
        } else if offset % 4 == 0 {
            if let Ok(bytes) = <[u8; 4]>::try_from(data) {
                self.write_register(offset, u32::from_le_bytes(bytes));
            }
        }
    }
}

/// The 32 feature bits of `features` that selector `sel` picks (0: bits
/// 0-31, 1: bits 32-63, anything else: none).
fn feature_window(features: u64, sel: u32) -> u32 {
    match sel {
        0 => features as u32,
        1 => (features >> 32) as u32,
        _ => 0,
    }
}

/// Which queue address half, if any, the register at `offset` is.
fn address_register(offset: u64) -> Option<(QueueArea, bool)> {
    match offset {
        QUEUE_DESC_LOW => Some((QueueArea::Descriptor, false)),
        QUEUE_DESC_HIGH => Some((QueueArea::Descriptor, true)),
        QUEUE_DRIVER_LOW => Some((QueueArea::Driver, false)),
        QUEUE_DRIVER_HIGH => Some((QueueArea::Driver, true)),
        QUEUE_DEVICE_LOW => Some((QueueArea::Device, false)),
        QUEUE_DEVICE_HIGH => Some((QueueArea::Device, true)),
        _ => None,
    }
}

/// The configuration space offset of an access of `len` bytes at window
/// offset `offset` (at least 0x100), if it lies entirely in the window.
fn config_offset(offset: u64, len: usize) -> Option<u64> {
    let end = offset.checked_add(u64::try_from(len).ok()?)?;
    if end > MMIO_WINDOW_SIZE {
        return None;
    }
    offset.checked_sub(CONFIG)
}

/// Lock `mutex` even if a thread panicked while holding it: the state
/// behind it stays consistent between statements, and the VMM must keep
/// serving the guest.
fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
