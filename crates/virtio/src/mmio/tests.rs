//! Unit tests of the virtio-mmio transport, driving it through
//! `BusDevice` reads and writes the way a guest driver does.

use std::sync::{Arc, Mutex};

use chitin_bus::BusDevice;
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::interrupt::InterruptKind;
use crate::test_utils::{guest_memory, DummyDevice};

/// virtio block device ID (virtio 1.2 §5): any valid type will do.
const BLOCK_TYPE: u32 = 2;
/// Guest memory of the tests: 1 MiB, room for rings and buffers.
const MEM_SIZE: u64 = 0x10_0000;
/// QueueNumMax of the tests' queues.
const QUEUE_MAX: u16 = 256;
/// Queue size the tests' driver picks: a power of two below the maximum.
const QUEUE_SIZE: u32 = 128;
/// Ring addresses the tests' driver picks, in guest memory and aligned. For
/// 128 entries the descriptor table needs 2 KiB, the available ring 262
/// bytes, the used ring 1030 bytes, so 4 KiB apart keeps them apart.
const DESC_ADDR: u64 = 0x1_0000;
const DRIVER_ADDR: u64 = 0x1_1000;
const DEVICE_ADDR: u64 = 0x1_2000;
/// A device-specific feature bit (VIRTIO_BLK_F_RO, bit 5).
const DEVICE_FEATURE: u64 = 1 << 5;
/// VIRTIO_F_VERSION_1 as the driver sees it in the high feature window
/// (bit 32 - 32).
const VERSION_1_HIGH: u32 = 1;

/// A transport over a `DummyDevice` the test can inspect, plus a clone of
/// the irq EventFd so the test can see interrupts.
struct Fixture {
    device: Arc<Mutex<DummyDevice>>,
    transport: MmioTransport,
    irq: EventFd,
}

impl Fixture {
    /// Two queues of [`QUEUE_MAX`] entries, [`DEVICE_FEATURE`] offered and
    /// an 8-byte configuration space 0x10..=0x17.
    fn new() -> Self {
        Fixture::with_device(
            DummyDevice::new(BLOCK_TYPE, &[QUEUE_MAX, QUEUE_MAX])
                .unwrap()
                .with_features(DEVICE_FEATURE)
                .with_config(&[0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17]),
        )
    }

    fn with_device(device: DummyDevice) -> Self {
        let device = Arc::new(Mutex::new(device));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let transport = MmioTransport::new(
            device.clone(),
            guest_memory(MEM_SIZE as usize),
            irq.try_clone().unwrap(),
        );
        Fixture {
            device,
            transport,
            irq,
        }
    }

    fn read(&self, offset: u64) -> u32 {
        let mut data = [0xffu8; 4];
        self.transport.read(offset, &mut data);
        u32::from_le_bytes(data)
    }

    fn write(&self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    fn device(&self) -> std::sync::MutexGuard<'_, DummyDevice> {
        self.device.lock().unwrap()
    }

    /// Number of irq EventFd writes since the last call (0 if none).
    fn irq_count(&self) -> u64 {
        self.irq.read().unwrap_or(0)
    }

    /// ACKNOWLEDGE, DRIVER, then accept `high` in the upper feature window
    /// and `low` in the lower one (before FEATURES_OK).
    fn negotiate(&self, low: u32, high: u32) {
        self.write(STATUS, ACKNOWLEDGE);
        self.write(STATUS, ACKNOWLEDGE | DRIVER);
        self.write(DRIVER_FEATURES_SEL, 1);
        self.write(DRIVER_FEATURES, high);
        self.write(DRIVER_FEATURES_SEL, 0);
        self.write(DRIVER_FEATURES, low);
    }

    /// Negotiate VERSION_1 only and set FEATURES_OK.
    fn features_ok(&self) {
        self.negotiate(0, VERSION_1_HIGH);
        self.write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    }

    /// Set up queue `index` with [`QUEUE_SIZE`] and rings at `desc`,
    /// `driver`, `device`, and make it ready.
    fn setup_queue(&self, index: u32, desc: u64, driver: u64, device: u64) {
        self.write(QUEUE_SEL, index);
        self.write(QUEUE_NUM, QUEUE_SIZE);
        for (low, addr) in [
            (QUEUE_DESC_LOW, desc),
            (QUEUE_DRIVER_LOW, driver),
            (QUEUE_DEVICE_LOW, device),
        ] {
            self.write(low, addr as u32);
            self.write(low + 4, (addr >> 32) as u32);
        }
        self.write(QUEUE_READY, 1);
    }

    /// Queue 0 at the standard addresses, queue 1 16 KiB above.
    fn setup_queues(&self) {
        self.setup_queue(0, DESC_ADDR, DRIVER_ADDR, DEVICE_ADDR);
        let second = 0x4000;
        self.setup_queue(
            1,
            DESC_ADDR + second,
            DRIVER_ADDR + second,
            DEVICE_ADDR + second,
        );
    }

    fn driver_ok(&self) {
        self.write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    }

    /// The whole bring-up with valid queues.
    fn activate(&self) {
        self.features_ok();
        self.setup_queues();
        self.driver_ok();
    }
}

#[test]
fn mmio_identification_registers_read_spec_values() {
    // Arrange
    let fixture = Fixture::new();

    // Act
    let ids = [
        fixture.read(MAGIC_VALUE),
        fixture.read(VERSION),
        fixture.read(DEVICE_ID),
        fixture.read(VENDOR_ID_OFFSET),
    ];

    // Assert
    assert_eq!(
        ids,
        [u32::from_le_bytes(*b"virt"), 2, BLOCK_TYPE, VENDOR_ID]
    );
}

#[test]
fn mmio_device_features_windows_offer_device_and_transport_bits() {
    // Arrange
    let fixture = Fixture::new();

    // Act
    fixture.write(DEVICE_FEATURES_SEL, 0);
    let low = fixture.read(DEVICE_FEATURES);
    fixture.write(DEVICE_FEATURES_SEL, 1);
    let high = fixture.read(DEVICE_FEATURES);
    // Only 64 feature bits exist; window 2 is empty.
    fixture.write(DEVICE_FEATURES_SEL, 2);
    let beyond = fixture.read(DEVICE_FEATURES);

    // Assert: bit 5 from the device, 28 and 29 (INDIRECT_DESC, EVENT_IDX)
    // and 32 (VERSION_1) from the transport.
    assert_eq!(low, (1 << 5) | (1 << 28) | (1 << 29));
    assert_eq!(high, VERSION_1_HIGH);
    assert_eq!(beyond, 0);
}

#[test]
fn mmio_full_bring_up_activates_device_with_queues_and_features() {
    // Arrange
    let fixture = Fixture::new();
    fixture.negotiate(DEVICE_FEATURE as u32 | (1 << 29), VERSION_1_HIGH);
    fixture.write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    fixture.setup_queues();

    // Act
    fixture.driver_ok();

    // Assert
    assert_eq!(
        fixture.transport.status(),
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    );
    assert!(fixture.transport.activation_error().is_none());
    let device = fixture.device();
    assert_eq!(device.activate_count(), 1);
    let ctx = device.activation().expect("device activated");
    assert_eq!(
        ctx.acked_features,
        DEVICE_FEATURE | F_EVENT_IDX | F_VERSION_1
    );
    assert_eq!(ctx.queues.len(), 2);
    let queue = &ctx.queues[0];
    assert!(queue.ready());
    assert_eq!(u32::from(queue.size()), QUEUE_SIZE);
    assert_eq!(queue.desc_table(), DESC_ADDR);
    assert_eq!(queue.avail_ring(), DRIVER_ADDR);
    assert_eq!(queue.used_ring(), DEVICE_ADDR);
    assert!(queue.event_idx_enabled());
    assert_eq!(ctx.queues[1].desc_table(), DESC_ADDR + 0x4000);
}

#[test]
fn mmio_unready_queue_handed_over_not_ready() {
    // Arrange: only queue 0 is set up.
    let fixture = Fixture::new();
    fixture.features_ok();
    fixture.setup_queue(0, DESC_ADDR, DRIVER_ADDR, DEVICE_ADDR);

    // Act
    fixture.driver_ok();

    // Assert
    let device = fixture.device();
    let ctx = device.activation().expect("device activated");
    assert!(ctx.queues[0].ready());
    assert!(!ctx.queues[1].ready());
}

#[test]
fn mmio_features_ok_without_version_1_refused() {
    // Arrange: a legacy driver accepts only the device feature.
    let fixture = Fixture::new();
    fixture.negotiate(DEVICE_FEATURE as u32, 0);

    // Act
    fixture.write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);

    // Assert
    assert_eq!(fixture.read(STATUS), ACKNOWLEDGE | DRIVER);
}

#[test]
fn mmio_unoffered_feature_bits_dropped() {
    // Arrange
    let fixture = Fixture::new();

    // Act: accept every bit in both windows.
    fixture.negotiate(u32::MAX, u32::MAX);
    fixture.write(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    fixture.setup_queues();
    fixture.driver_ok();

    // Assert: only what was offered remains.
    let device = fixture.device();
    let ctx = device.activation().expect("device activated");
    assert_eq!(ctx.acked_features, DEVICE_FEATURE | TRANSPORT_FEATURES);
}

#[test]
fn mmio_driver_features_after_features_ok_ignored() {
    // Arrange
    let fixture = Fixture::new();
    fixture.features_ok();

    // Act: try to add the device feature late.
    fixture.write(DRIVER_FEATURES_SEL, 0);
    fixture.write(DRIVER_FEATURES, DEVICE_FEATURE as u32);

    // Assert
    assert_eq!(fixture.read(DRIVER_FEATURES), 0);
}

#[test]
fn mmio_queue_num_max_of_missing_queue_reads_zero() {
    // Arrange: the fixture has queues 0 and 1.
    let fixture = Fixture::new();

    // Act
    fixture.write(QUEUE_SEL, 2);
    let missing = fixture.read(QUEUE_NUM_MAX);
    fixture.write(QUEUE_SEL, 1);
    let present = fixture.read(QUEUE_NUM_MAX);

    // Assert
    assert_eq!(missing, 0);
    assert_eq!(present, u32::from(QUEUE_MAX));
}

#[test]
fn mmio_queue_num_not_power_of_two_rejected() {
    // Arrange
    let fixture = Fixture::new();
    fixture.features_ok();
    fixture.setup_queues();

    // Act: 100 is below the maximum but not a power of two.
    fixture.write(QUEUE_SEL, 0);
    fixture.write(QUEUE_NUM, 100);
    let read_back = fixture.read(QUEUE_NUM);
    fixture.driver_ok();

    // Assert: the old size is kept and the queue cannot go live.
    assert_eq!(read_back, QUEUE_SIZE);
    assert_eq!(fixture.device().activate_count(), 0);
    assert!(matches!(
        fixture.transport.activation_error(),
        Some(ActivationError::InvalidSize {
            queue: 0,
            size: 100,
            ..
        })
    ));
    assert_ne!(fixture.read(STATUS) & NEEDS_RESET, 0);
}

#[test]
fn mmio_queue_num_above_max_rejected() {
    // Arrange
    let fixture = Fixture::new();
    fixture.features_ok();
    fixture.setup_queues();
    let above_max = u32::from(QUEUE_MAX) * 2;

    // Act
    fixture.write(QUEUE_SEL, 1);
    fixture.write(QUEUE_NUM, above_max);
    let read_back = fixture.read(QUEUE_NUM);
    fixture.driver_ok();

    // Assert
    assert_eq!(read_back, QUEUE_SIZE);
    assert_eq!(fixture.device().activate_count(), 0);
    assert!(matches!(
        fixture.transport.activation_error(),
        Some(ActivationError::InvalidSize { queue: 1, .. })
    ));
}

#[test]
fn mmio_queue_num_valid_after_invalid_accepted() {
    // Arrange
    let fixture = Fixture::new();
    fixture.features_ok();
    fixture.setup_queues();
    fixture.write(QUEUE_SEL, 0);
    fixture.write(QUEUE_NUM, 0);

    // Act: the driver corrects itself.
    fixture.write(QUEUE_NUM, QUEUE_SIZE);
    fixture.driver_ok();

    // Assert
    assert_eq!(fixture.device().activate_count(), 1);
}

/// Bring up with queue 1's `area` at `addr`; returns the fixture after
/// DRIVER_OK.
fn bring_up_with_ring(area: QueueArea, addr: u64) -> Fixture {
    let fixture = Fixture::new();
    fixture.features_ok();
    fixture.setup_queues();
    fixture.write(QUEUE_SEL, 1);
    let low = match area {
        QueueArea::Descriptor => QUEUE_DESC_LOW,
        QueueArea::Driver => QUEUE_DRIVER_LOW,
        QueueArea::Device => QUEUE_DEVICE_LOW,
    };
    fixture.write(low, addr as u32);
    fixture.write(low + 4, (addr >> 32) as u32);
    fixture.irq_count();
    fixture.driver_ok();
    fixture
}

/// NEEDS_RESET shown, one configuration interrupt, no activation.
fn assert_needs_reset(fixture: &Fixture) {
    assert_ne!(fixture.read(STATUS) & NEEDS_RESET, 0);
    assert_eq!(fixture.read(INTERRUPT_STATUS), INT_CONFIG);
    assert_eq!(fixture.irq_count(), 1);
    assert_eq!(fixture.device().activate_count(), 0);
    assert!(fixture.device().activation().is_none());
}

#[test]
fn mmio_ring_outside_memory_needs_reset() {
    // Arrange / Act: the used ring starts 16 bytes below the end of memory
    // but needs 1030 bytes for 128 entries.
    let fixture = bring_up_with_ring(QueueArea::Device, MEM_SIZE - 16);

    // Assert
    assert_needs_reset(&fixture);
    assert!(matches!(
        fixture.transport.activation_error(),
        Some(ActivationError::OutsideMemory {
            queue: 1,
            area: QueueArea::Device,
            ..
        })
    ));
}

#[test]
fn mmio_ring_above_4g_outside_memory_needs_reset() {
    // Arrange / Act: a descriptor table set through the high half, far
    // above the 1 MiB of memory.
    let fixture = bring_up_with_ring(QueueArea::Descriptor, 0x1_0000_0000);

    // Assert
    assert_needs_reset(&fixture);
    assert!(matches!(
        fixture.transport.activation_error(),
        Some(ActivationError::OutsideMemory {
            area: QueueArea::Descriptor,
            ..
        })
    ));
}

#[test]
fn mmio_ring_wrapping_address_space_needs_reset() {
    // Arrange / Act: a driver ring whose end overflows u64.
    let fixture = bring_up_with_ring(QueueArea::Driver, u64::MAX - 1);

    // Assert
    assert_needs_reset(&fixture);
}

#[test]
fn mmio_misaligned_descriptor_table_needs_reset() {
    // Arrange / Act: the descriptor table must be 16-byte aligned; 8 off.
    let fixture = bring_up_with_ring(QueueArea::Descriptor, DESC_ADDR + 0x4008);

    // Assert
    assert_needs_reset(&fixture);
    assert!(matches!(
        fixture.transport.activation_error(),
        Some(ActivationError::Misaligned {
            area: QueueArea::Descriptor,
            ..
        })
    ));
}

#[test]
fn mmio_misaligned_device_ring_needs_reset() {
    // Arrange / Act: the used ring must be 4-byte aligned; 2 off.
    let fixture = bring_up_with_ring(QueueArea::Device, DEVICE_ADDR + 0x4002);

    // Assert
    assert_needs_reset(&fixture);
    assert!(matches!(
        fixture.transport.activation_error(),
        Some(ActivationError::Misaligned {
            area: QueueArea::Device,
            ..
        })
    ));
}

#[test]
fn mmio_ring_ending_at_end_of_memory_accepted() {
    // Arrange: a used ring of 1030 bytes (128 entries) whose last byte is
    // the last byte of memory, 4-byte aligned (1030 rounded up to 1032).
    let used = MEM_SIZE - 1032;
    let fixture = bring_up_with_ring(QueueArea::Device, used);

    // Assert: `virtio-queue`'s own check would refuse this ring.
    assert_eq!(fixture.device().activate_count(), 1);
    assert_eq!(fixture.read(STATUS) & NEEDS_RESET, 0);
}

#[test]
fn mmio_device_activate_error_needs_reset() {
    // Arrange
    let fixture = Fixture::with_device(
        DummyDevice::new(BLOCK_TYPE, &[QUEUE_MAX])
            .unwrap()
            .with_failing_activation(),
    );
    fixture.features_ok();
    fixture.setup_queue(0, DESC_ADDR, DRIVER_ADDR, DEVICE_ADDR);

    // Act
    fixture.driver_ok();

    // Assert
    assert_ne!(fixture.read(STATUS) & NEEDS_RESET, 0);
    assert_eq!(fixture.read(INTERRUPT_STATUS), INT_CONFIG);
    assert!(matches!(
        fixture.transport.activation_error(),
        Some(ActivationError::Device(_))
    ));
}

#[test]
fn mmio_status_out_of_order_ignored() {
    // Arrange
    let fixture = Fixture::new();

    // Act: DRIVER before ACKNOWLEDGE, then FEATURES_OK skipping DRIVER.
    fixture.write(STATUS, DRIVER);
    let after_driver = fixture.read(STATUS);
    fixture.write(STATUS, ACKNOWLEDGE);
    fixture.write(STATUS, ACKNOWLEDGE | FEATURES_OK);
    let after_skip = fixture.read(STATUS);

    // Assert
    assert_eq!(after_driver, 0);
    assert_eq!(after_skip, ACKNOWLEDGE);
}

#[test]
fn mmio_status_driver_ok_before_features_ok_ignored() {
    // Arrange
    let fixture = Fixture::new();
    fixture.negotiate(0, VERSION_1_HIGH);
    fixture.setup_queues();

    // Act
    fixture.write(STATUS, ACKNOWLEDGE | DRIVER | DRIVER_OK);

    // Assert
    assert_eq!(fixture.read(STATUS), ACKNOWLEDGE | DRIVER);
    assert_eq!(fixture.device().activate_count(), 0);
}

#[test]
fn mmio_status_clearing_bits_ignored() {
    // Arrange
    let fixture = Fixture::new();
    fixture.features_ok();

    // Act: drop DRIVER while keeping the others.
    fixture.write(STATUS, ACKNOWLEDGE | FEATURES_OK);

    // Assert
    assert_eq!(fixture.read(STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
}

#[test]
fn mmio_status_failed_accepted_then_halts_progress() {
    // Arrange
    let fixture = Fixture::new();
    fixture.write(STATUS, ACKNOWLEDGE);

    // Act
    fixture.write(STATUS, ACKNOWLEDGE | FAILED);
    fixture.write(STATUS, ACKNOWLEDGE | FAILED | DRIVER);

    // Assert
    assert_eq!(fixture.read(STATUS), ACKNOWLEDGE | FAILED);
}

#[test]
fn mmio_status_needs_reset_cannot_be_set_by_driver() {
    // Arrange
    let fixture = Fixture::new();

    // Act
    fixture.write(STATUS, NEEDS_RESET);

    // Assert
    assert_eq!(fixture.read(STATUS), 0);
}

#[test]
fn mmio_reset_resets_device_queues_features_and_interrupts() {
    // Arrange
    let fixture = Fixture::new();
    fixture.activate();
    fixture
        .transport
        .interrupt()
        .trigger(InterruptKind::Queue)
        .unwrap();
    let resets_before = fixture.device().reset_count();

    // Act
    fixture.write(STATUS, 0);

    // Assert
    assert_eq!(fixture.read(STATUS), 0);
    assert_eq!(fixture.read(INTERRUPT_STATUS), 0);
    assert_eq!(fixture.device().reset_count(), resets_before + 1);
    assert!(fixture.device().activation().is_none());
    fixture.write(QUEUE_SEL, 0);
    assert_eq!(fixture.read(QUEUE_READY), 0);
    assert_eq!(fixture.read(QUEUE_NUM), u32::from(QUEUE_MAX));
    assert_eq!(fixture.read(QUEUE_DESC_LOW), 0);
    fixture.write(DRIVER_FEATURES_SEL, 1);
    assert_eq!(fixture.read(DRIVER_FEATURES), 0);
}

#[test]
fn mmio_reset_clears_needs_reset_and_allows_new_bring_up() {
    // Arrange
    let fixture = bring_up_with_ring(QueueArea::Device, MEM_SIZE - 16);

    // Act
    fixture.write(STATUS, 0);
    fixture.activate();

    // Assert
    assert_eq!(
        fixture.read(STATUS),
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    );
    assert_eq!(fixture.device().activate_count(), 1);
    assert!(fixture.transport.activation_error().is_none());
}

#[test]
fn mmio_reset_keeps_config_generation() {
    // Arrange
    let fixture = Fixture::new();
    fixture
        .transport
        .interrupt()
        .trigger(InterruptKind::Config)
        .unwrap();
    let generation = fixture.read(CONFIG_GENERATION);

    // Act
    fixture.write(STATUS, 0);

    // Assert
    assert_eq!(fixture.read(CONFIG_GENERATION), generation);
}

#[test]
fn mmio_queue_notify_writes_queue_event() {
    // Arrange
    let fixture = Fixture::new();
    fixture.activate();

    // Act
    fixture.write(QUEUE_NOTIFY, 1);

    // Assert: queue 1's EventFd counts one notification, queue 0's none.
    let device = fixture.device();
    assert_eq!(device.queue_events()[1].read().unwrap(), 1);
    assert!(device.queue_events()[0].read().is_err());
}

#[test]
fn mmio_queue_notify_out_of_range_ignored() {
    // Arrange
    let fixture = Fixture::new();
    fixture.activate();

    // Act: the fixture has 2 queues.
    fixture.write(QUEUE_NOTIFY, 2);
    fixture.write(QUEUE_NOTIFY, u32::MAX);

    // Assert
    let device = fixture.device();
    assert!(device
        .queue_events()
        .iter()
        .all(|event| event.read().is_err()));
}

#[test]
fn mmio_queue_notify_offset_matches_register() {
    // Arrange / Act / Assert: KVM ioeventfds are registered at this offset.
    assert_eq!(QUEUE_NOTIFY_OFFSET, 0x50);
}

#[test]
fn mmio_interrupt_trigger_sets_status_and_raises_irq() {
    // Arrange
    let fixture = Fixture::new();
    let interrupt = fixture.transport.interrupt();

    // Act
    interrupt.trigger(InterruptKind::Queue).unwrap();

    // Assert
    assert_eq!(fixture.read(INTERRUPT_STATUS), INT_QUEUE);
    assert_eq!(fixture.irq_count(), 1);
}

#[test]
fn mmio_interrupt_ack_clears_written_bits_only() {
    // Arrange
    let fixture = Fixture::new();
    let interrupt = fixture.transport.interrupt();
    interrupt.trigger(InterruptKind::Queue).unwrap();
    interrupt.trigger(InterruptKind::Config).unwrap();

    // Act
    fixture.write(INTERRUPT_ACK, INT_QUEUE);

    // Assert
    assert_eq!(fixture.read(INTERRUPT_STATUS), INT_CONFIG);
}

/// Count one acknowledgement of `value` the way KVM's ioeventfd does.
fn counted_ack(fixture: &Fixture, value: u32) {
    let (event, _) = fixture
        .transport
        .ack_events()
        .find(|(_, v)| *v == value)
        .unwrap();
    event.write(1).unwrap();
}

#[test]
fn mmio_ack_events_cover_the_value_a_driver_acknowledges_most() {
    // Arrange
    let fixture = Fixture::new();

    // Act
    let mut values: Vec<u32> = fixture.transport.ack_events().map(|(_, v)| v).collect();

    // Assert: Linux writes back exactly what it read, nearly always 1
    // (used buffers); a configuration change's 2 or 3 still exits.
    values.sort_unstable();
    assert_eq!(values, [INT_QUEUE]);
    assert_eq!(INTERRUPT_ACK_OFFSET, 0x64);
}

#[test]
fn mmio_counted_ack_clears_what_the_driver_read() {
    // Arrange: an interrupt, read by the driver.
    let fixture = Fixture::new();
    let interrupt = fixture.transport.interrupt();
    interrupt.trigger(InterruptKind::Queue).unwrap();
    assert_eq!(fixture.read(INTERRUPT_STATUS), INT_QUEUE);

    // Act: KVM counts the acknowledgement of what it read.
    counted_ack(&fixture, INT_QUEUE);

    // Assert
    assert_eq!(fixture.read(INTERRUPT_STATUS), 0);
    assert_eq!(fixture.read(INTERRUPT_STATUS), 0);
}

#[test]
fn mmio_counted_ack_never_clears_a_bit_raised_after_the_read_it_answers() {
    // Arrange: the driver read the queue bit; the device raises it again
    // before the driver's acknowledgement is applied.
    let fixture = Fixture::new();
    let interrupt = fixture.transport.interrupt();
    interrupt.trigger(InterruptKind::Queue).unwrap();
    assert_eq!(fixture.read(INTERRUPT_STATUS), INT_QUEUE);
    interrupt.trigger(InterruptKind::Queue).unwrap();
    counted_ack(&fixture, INT_QUEUE);

    // Act
    let status = fixture.read(INTERRUPT_STATUS);

    // Assert: the second interrupt's bit survives the first's ack.
    assert_eq!(status, INT_QUEUE);
    assert_eq!(fixture.irq_count(), 2);
    counted_ack(&fixture, INT_QUEUE);
    assert_eq!(fixture.read(INTERRUPT_STATUS), 0);
}

#[test]
fn mmio_counted_ack_only_clears_its_own_value() {
    // Arrange
    let fixture = Fixture::new();
    let interrupt = fixture.transport.interrupt();
    interrupt.trigger(InterruptKind::Queue).unwrap();
    interrupt.trigger(InterruptKind::Config).unwrap();
    assert_eq!(fixture.read(INTERRUPT_STATUS), INT_QUEUE | INT_CONFIG);

    // Act: a driver that acknowledges the used-buffer bit alone.
    counted_ack(&fixture, INT_QUEUE);

    // Assert
    assert_eq!(fixture.read(INTERRUPT_STATUS), INT_CONFIG);
    fixture.write(INTERRUPT_ACK, INT_CONFIG);
    assert_eq!(fixture.read(INTERRUPT_STATUS), 0);
}

#[test]
fn mmio_reset_drops_counted_acks() {
    // Arrange: an acknowledgement counted, then a device reset.
    let fixture = Fixture::new();
    let interrupt = fixture.transport.interrupt();
    interrupt.trigger(InterruptKind::Queue).unwrap();
    assert_eq!(fixture.read(INTERRUPT_STATUS), INT_QUEUE);
    counted_ack(&fixture, INT_QUEUE);
    fixture.write(STATUS, 0);

    // Act: the next interrupt after the reset.
    interrupt.trigger(InterruptKind::Queue).unwrap();
    let first = fixture.read(INTERRUPT_STATUS);
    let again = fixture.read(INTERRUPT_STATUS);

    // Assert: the stale count did not clear it.
    assert_eq!((first, again), (INT_QUEUE, INT_QUEUE));
}

#[test]
fn mmio_config_interrupt_bumps_generation() {
    // Arrange
    let fixture = Fixture::new();
    let before = fixture.read(CONFIG_GENERATION);

    // Act
    fixture
        .transport
        .interrupt()
        .trigger(InterruptKind::Config)
        .unwrap();

    // Assert
    assert_ne!(fixture.read(CONFIG_GENERATION), before);
}

#[test]
fn mmio_signal_needs_reset_sets_status_and_config_interrupt() {
    // Arrange
    let fixture = Fixture::new();
    fixture.activate();

    // Act
    fixture.transport.interrupt().signal_needs_reset();

    // Assert
    assert_eq!(
        fixture.read(STATUS),
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | NEEDS_RESET
    );
    assert_eq!(fixture.read(INTERRUPT_STATUS), INT_CONFIG);
    assert_eq!(fixture.irq_count(), 1);
}

#[test]
fn mmio_config_read_forwarded_with_offset_any_width() {
    // Arrange: configuration bytes are 0x10 + their offset.
    let fixture = Fixture::new();

    // Act
    let mut byte = [0u8; 1];
    fixture.transport.read(CONFIG + 3, &mut byte);
    let mut word = [0u8; 2];
    fixture.transport.read(CONFIG + 1, &mut word);
    let mut quad = [0u8; 8];
    fixture.transport.read(CONFIG, &mut quad);

    // Assert
    assert_eq!(byte, [0x13]);
    assert_eq!(word, [0x11, 0x12]);
    assert_eq!(quad, [0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17]);
}

#[test]
fn mmio_config_write_forwarded_with_offset() {
    // Arrange
    let fixture = Fixture::new();

    // Act: 3 bytes at configuration offset 2.
    fixture.transport.write(CONFIG + 2, &[0xa, 0xb, 0xc]);

    // Assert
    let device = fixture.device();
    assert_eq!(device.last_config_write(), Some((2, &[0xa, 0xb, 0xc][..])));
    assert_eq!(device.config()[2..5], [0xa, 0xb, 0xc]);
}

#[test]
fn mmio_config_access_past_window_ignored() {
    // Arrange
    let fixture = Fixture::new();

    // Act: 8 bytes starting 4 before the end of the window.
    let mut data = [0xffu8; 8];
    fixture.transport.read(MMIO_WINDOW_SIZE - 4, &mut data);
    fixture.transport.write(MMIO_WINDOW_SIZE - 4, &[1; 8]);

    // Assert
    assert_eq!(data, [0; 8]);
    assert!(fixture.device().last_config_write().is_none());
}

#[test]
fn mmio_control_register_narrow_read_returns_zeros() {
    // Arrange
    let fixture = Fixture::new();

    // Act: 1-, 2- and 8-byte reads of MagicValue.
    let mut byte = [0xffu8; 1];
    fixture.transport.read(MAGIC_VALUE, &mut byte);
    let mut half = [0xffu8; 2];
    fixture.transport.read(MAGIC_VALUE, &mut half);
    let mut wide = [0xffu8; 8];
    fixture.transport.read(MAGIC_VALUE, &mut wide);

    // Assert
    assert_eq!(byte, [0]);
    assert_eq!(half, [0; 2]);
    assert_eq!(wide, [0; 8]);
}

#[test]
fn mmio_control_register_unaligned_read_returns_zeros() {
    // Arrange
    let fixture = Fixture::new();

    // Act: 4 bytes one past MagicValue.
    let mut data = [0xffu8; 4];
    fixture.transport.read(MAGIC_VALUE + 1, &mut data);

    // Assert
    assert_eq!(data, [0; 4]);
}

#[test]
fn mmio_control_register_narrow_or_unaligned_write_ignored() {
    // Arrange
    let fixture = Fixture::new();

    // Act: ACKNOWLEDGE as one byte, as two bytes, and 4 bytes misaligned.
    fixture.transport.write(STATUS, &[ACKNOWLEDGE as u8]);
    fixture.transport.write(STATUS, &[ACKNOWLEDGE as u8, 0]);
    fixture
        .transport
        .write(STATUS + 1, &ACKNOWLEDGE.to_le_bytes());

    // Assert
    assert_eq!(fixture.read(STATUS), 0);
}

#[test]
fn mmio_read_only_register_write_ignored() {
    // Arrange
    let fixture = Fixture::new();

    // Act
    fixture.write(MAGIC_VALUE, 0);
    fixture.write(DEVICE_ID, 0);
    fixture.write(QUEUE_NUM_MAX, 1);

    // Assert
    assert_eq!(fixture.read(MAGIC_VALUE), u32::from_le_bytes(*b"virt"));
    assert_eq!(fixture.read(DEVICE_ID), BLOCK_TYPE);
    assert_eq!(fixture.read(QUEUE_NUM_MAX), u32::from(QUEUE_MAX));
}

#[test]
fn mmio_shared_memory_registers_read_all_ones() {
    // Arrange
    let fixture = Fixture::new();
    fixture.write(SHM_SEL, 0);

    // Act
    let values = [SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH].map(|r| fixture.read(r));

    // Assert: ~0 length means "no such region" (virtio 1.2 §4.2.2).
    assert_eq!(values, [u32::MAX; 4]);
}

#[test]
fn mmio_queue_registers_after_driver_ok_ignored() {
    // Arrange
    let fixture = Fixture::new();
    fixture.activate();

    // Act
    fixture.write(QUEUE_SEL, 0);
    fixture.write(QUEUE_NUM, 16);
    fixture.write(QUEUE_READY, 0);
    fixture.write(QUEUE_DESC_LOW, 0x2_0000);

    // Assert
    assert_eq!(fixture.read(QUEUE_NUM), QUEUE_SIZE);
    assert_eq!(fixture.read(QUEUE_READY), 1);
    assert_eq!(fixture.read(QUEUE_DESC_LOW), DESC_ADDR as u32);
}

#[test]
fn mmio_queue_registers_of_missing_queue_ignored() {
    // Arrange: the fixture has queues 0 and 1.
    let fixture = Fixture::new();

    // Act
    fixture.write(QUEUE_SEL, 7);
    fixture.write(QUEUE_NUM, 16);
    fixture.write(QUEUE_READY, 1);

    // Assert
    assert_eq!(fixture.read(QUEUE_NUM), 0);
    assert_eq!(fixture.read(QUEUE_READY), 0);
}

#[test]
fn mmio_driver_ok_twice_activates_once() {
    // Arrange
    let fixture = Fixture::new();
    fixture.activate();

    // Act
    fixture.driver_ok();

    // Assert
    assert_eq!(fixture.device().activate_count(), 1);
}

#[test]
fn mmio_notify_without_device_lock_when_device_busy() {
    // Arrange
    let fixture = Fixture::new();
    fixture.activate();
    let device = fixture.device.clone();
    let held = device.lock().unwrap();

    // Act: the device lock is held (as by a device thread); a notification
    // must still get through without blocking.
    fixture.write(QUEUE_NOTIFY, 0);

    // Assert
    assert_eq!(held.queue_events()[0].read().unwrap(), 1);
}

#[test]
fn mmio_random_register_accesses_never_panic() {
    // Arrange: a tiny xorshift64 with a fixed seed, so any failure
    // reproduces. 10 rounds of 10 000 accesses; every other round starts
    // from a live device, so the frozen-queue and reset paths are hit too.
    const ROUNDS: usize = 10;
    const ACCESSES_PER_ROUND: usize = 10_000;
    let fixture = Fixture::new();
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };

    // Act
    for round in 0..ROUNDS {
        fixture.write(STATUS, 0);
        if round % 2 == 1 {
            fixture.activate();
        }
        for _ in 0..ACCESSES_PER_ROUND {
            let r = next();
            // Mostly in-window offsets, biased towards aligned control
            // registers; sometimes anything at all.
            let offset = match r % 8 {
                0 => next(),
                1..=4 => ((r >> 8) % CONFIG) & !3,
                _ => (r >> 8) % MMIO_WINDOW_SIZE,
            };
            // Widths a guest can use, plus 0 and 16 which no CPU produces.
            let width = [1, 2, 4, 4, 4, 8, 0, 16][((r >> 40) % 8) as usize];
            // Small values hit the status machine, selectors and queue
            // indices (300 > 255, the largest status); large ones hit
            // addresses and feature bits.
            let value = if r & (1 << 50) != 0 {
                next() % 300
            } else {
                next()
            };
            let mut data = value.to_le_bytes().repeat(2);
            data.truncate(width);
            if r & (1 << 60) != 0 {
                fixture.transport.write(offset, &data);
            } else {
                fixture.transport.read(offset, &mut data);
            }
        }
    }

    // Assert: the transport still brings the device up after a reset.
    fixture.write(STATUS, 0);
    fixture.activate();
    assert_eq!(
        fixture.read(STATUS),
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    );
    assert!(fixture.device().activation().is_some());
}

#[test]
fn mmio_snapshot_restores_registers_interrupts_and_queue_positions() {
    use virtio_queue::QueueT;
    // Arrange: a running device part way through its rings, an interrupt
    // pending, a configuration change seen.
    let fixture = Fixture::new();
    fixture.activate();
    {
        let mut device = fixture.device();
        let queues = &mut device.activation_mut().unwrap().queues;
        queues[0].set_next_avail(3);
        queues[0].set_next_used(2);
        queues[1].set_next_avail(5);
        queues[1].set_next_used(5);
    }
    let interrupt = fixture.transport.interrupt();
    interrupt.trigger(InterruptKind::Config).unwrap();
    interrupt.trigger(InterruptKind::Queue).unwrap();
    fixture.write(QUEUE_SEL, 1);
    let generation = fixture.read(CONFIG_GENERATION);

    // Act
    let snap = fixture.transport.snapshot().unwrap();
    let again = Fixture::new();
    again.transport.restore(&snap).unwrap();
    // Taken before the driver reads anything, a second snapshot of the
    // restored transport is the same.
    let second = again.transport.snapshot().unwrap();

    // Assert: the driver reads what it read before; the device runs on the
    // same rings from the same places, and was told it was restored.
    assert_eq!(second, snap);
    assert_eq!(snap.queues[0].next_avail, 3);
    assert_eq!(
        again.read(STATUS),
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
    );
    assert_eq!(again.read(QUEUE_SEL), 1);
    assert_eq!(again.read(QUEUE_NUM), QUEUE_SIZE);
    assert_eq!(again.read(QUEUE_READY), 1);
    assert_eq!(again.read(CONFIG_GENERATION), generation);
    assert_eq!(again.read(INTERRUPT_STATUS), INT_QUEUE | INT_CONFIG);
    assert!(again.irq_count() > 0, "pending bits raise the line again");
    let device = again.device();
    let ctx = device.activation().expect("activated on the saved rings");
    let at: Vec<(u16, u16)> = ctx
        .queues
        .iter()
        .map(|q| (q.next_avail(), q.next_used()))
        .collect();
    assert_eq!(at, [(3, 2), (5, 5)]);
    assert_eq!(ctx.queues[0].desc_table(), DESC_ADDR);
    assert_eq!(device.restored_calls(), 1);
}

#[test]
fn mmio_snapshot_before_driver_ok_restores_without_starting_the_device() {
    // Arrange
    let fixture = Fixture::new();
    fixture.features_ok();
    fixture.setup_queue(0, DESC_ADDR, DRIVER_ADDR, DEVICE_ADDR);

    // Act
    let snap = fixture.transport.snapshot().unwrap();
    let again = Fixture::new();
    again.transport.restore(&snap).unwrap();

    // Assert
    assert_eq!(again.read(STATUS), ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(again.device().activate_count(), 0);
    assert_eq!(again.device().restored_calls(), 0);
    again.write(QUEUE_SEL, 0);
    assert_eq!(again.read(QUEUE_READY), 1);
}

#[test]
fn mmio_restore_refuses_a_snapshot_of_another_device() {
    // Arrange
    let fixture = Fixture::new();
    fixture.activate();
    let snap = fixture.transport.snapshot().unwrap();
    let one_queue = Fixture::with_device(DummyDevice::new(BLOCK_TYPE, &[QUEUE_MAX]).unwrap());
    let mut foreign = snap.clone();
    foreign.acked_features |= 1 << 40;

    // Act / Assert
    assert_eq!(
        one_queue.transport.restore(&snap),
        Err(TransportSnapshotError::QueueCount { saved: 2, has: 1 })
    );
    let again = Fixture::new();
    assert!(matches!(
        again.transport.restore(&foreign),
        Err(TransportSnapshotError::Features(_))
    ));
    assert_eq!(again.device().activate_count(), 0);
}

#[test]
fn mmio_snapshot_keeps_the_late_acknowledgement_rule() {
    // Arrange: the driver read the queue bit, the device raised it again,
    // then the VM was snapshotted before the driver's acknowledgement.
    let fixture = Fixture::new();
    fixture.activate();
    let interrupt = fixture.transport.interrupt();
    interrupt.trigger(InterruptKind::Queue).unwrap();
    assert_eq!(fixture.read(INTERRUPT_STATUS), INT_QUEUE);
    interrupt.trigger(InterruptKind::Queue).unwrap();
    let snap = fixture.transport.snapshot().unwrap();
    let again = Fixture::new();
    again.transport.restore(&snap).unwrap();

    // Act: the acknowledgement of the first read, counted by KVM after
    // the restore.
    counted_ack(&again, INT_QUEUE);

    // Assert: the second interrupt's bit survives it, in the original
    // (the snapshot changed nothing there) and in the restored copy.
    assert_eq!(again.read(INTERRUPT_STATUS), INT_QUEUE);
    counted_ack(&fixture, INT_QUEUE);
    assert_eq!(fixture.read(INTERRUPT_STATUS), INT_QUEUE);
}

#[test]
fn mmio_restore_refuses_unreachable_states_and_used_transports() {
    // Arrange
    let fixture = Fixture::new();
    fixture.activate();
    let snap = fixture.transport.snapshot().unwrap();
    let with = |change: &dyn Fn(&mut TransportSnapshot)| {
        let mut s = snap.clone();
        change(&mut s);
        s
    };

    // Act / Assert: DRIVER_OK without FEATURES_OK; FEATURES_OK without
    // VERSION_1; an unknown status bit; another device type.
    for (bad, what) in [
        (
            with(&|s| s.status = ACKNOWLEDGE | DRIVER | DRIVER_OK),
            "skipped step",
        ),
        (with(&|s| s.acked_features &= !F_VERSION_1), "no VERSION_1"),
        (with(&|s| s.status |= 0x20), "unknown bit"),
    ] {
        let again = Fixture::new();
        assert!(
            matches!(
                again.transport.restore(&bad),
                Err(TransportSnapshotError::InvalidStatus(_))
            ),
            "{what}"
        );
        assert_eq!(again.read(STATUS), 0, "{what}: untouched");
    }
    let other = Fixture::with_device(DummyDevice::new(19, &[QUEUE_MAX, QUEUE_MAX]).unwrap());
    assert!(matches!(
        other.transport.restore(&snap),
        Err(TransportSnapshotError::DeviceType {
            saved: BLOCK_TYPE,
            has: 19
        })
    ));
    // A transport the driver already started.
    assert_eq!(
        fixture.transport.restore(&snap),
        Err(TransportSnapshotError::NotFresh)
    );
}

#[test]
fn mmio_restore_with_rings_outside_memory_leaves_the_transport_new() {
    // Arrange: a snapshot whose queue 0 lies past the end of guest memory.
    let fixture = Fixture::new();
    fixture.activate();
    let mut snap = fixture.transport.snapshot().unwrap();
    snap.queues[0].desc = MEM_SIZE * 4;

    // Act
    let again = Fixture::new();
    let result = again.transport.restore(&snap);

    // Assert
    assert!(matches!(result, Err(TransportSnapshotError::Activation(_))));
    assert_eq!(again.read(STATUS), 0);
    assert_eq!(again.device().activate_count(), 0);
    assert_eq!(again.read(INTERRUPT_STATUS), 0);
}
