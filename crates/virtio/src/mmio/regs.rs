//! Register offsets, status bits and transport feature bits of virtio-mmio
//! version 2 (virtio 1.2 §4.2.2, §2.1, §6), as the `u64` offsets and masks
//! the transport matches on.
//!
//! This module owns only names for numbers: it keeps the transport's `match`
//! readable and every value traceable to `virtio-bindings`. It must never
//! hold state or logic.

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING, VIRTIO_MMIO_MAGIC_VALUE,
    VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW, VIRTIO_MMIO_QUEUE_DESC_HIGH,
    VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY, VIRTIO_MMIO_QUEUE_NUM,
    VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY, VIRTIO_MMIO_QUEUE_SEL,
    VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW, VIRTIO_MMIO_SHM_BASE_HIGH,
    VIRTIO_MMIO_SHM_BASE_LOW, VIRTIO_MMIO_SHM_LEN_HIGH, VIRTIO_MMIO_SHM_LEN_LOW,
    VIRTIO_MMIO_SHM_SEL, VIRTIO_MMIO_STATUS, VIRTIO_MMIO_VENDOR_ID, VIRTIO_MMIO_VERSION,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

// Control registers (virtio 1.2 §4.2.2, table "MMIO Device Register Layout").
pub(crate) const MAGIC_VALUE: u64 = VIRTIO_MMIO_MAGIC_VALUE as u64;
pub(crate) const VERSION: u64 = VIRTIO_MMIO_VERSION as u64;
pub(crate) const DEVICE_ID: u64 = VIRTIO_MMIO_DEVICE_ID as u64;
/// VendorID's offset (its value is [`super::VENDOR_ID`]).
pub(crate) const VENDOR_ID_OFFSET: u64 = VIRTIO_MMIO_VENDOR_ID as u64;
pub(crate) const DEVICE_FEATURES: u64 = VIRTIO_MMIO_DEVICE_FEATURES as u64;
pub(crate) const DEVICE_FEATURES_SEL: u64 = VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
pub(crate) const DRIVER_FEATURES: u64 = VIRTIO_MMIO_DRIVER_FEATURES as u64;
pub(crate) const DRIVER_FEATURES_SEL: u64 = VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
pub(crate) const QUEUE_SEL: u64 = VIRTIO_MMIO_QUEUE_SEL as u64;
pub(crate) const QUEUE_NUM_MAX: u64 = VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
pub(crate) const QUEUE_NUM: u64 = VIRTIO_MMIO_QUEUE_NUM as u64;
pub(crate) const QUEUE_READY: u64 = VIRTIO_MMIO_QUEUE_READY as u64;
pub(crate) const QUEUE_NOTIFY: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
pub(crate) const INTERRUPT_STATUS: u64 = VIRTIO_MMIO_INTERRUPT_STATUS as u64;
pub(crate) const INTERRUPT_ACK: u64 = VIRTIO_MMIO_INTERRUPT_ACK as u64;
pub(crate) const STATUS: u64 = VIRTIO_MMIO_STATUS as u64;
pub(crate) const QUEUE_DESC_LOW: u64 = VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
pub(crate) const QUEUE_DESC_HIGH: u64 = VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
pub(crate) const QUEUE_DRIVER_LOW: u64 = VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
pub(crate) const QUEUE_DRIVER_HIGH: u64 = VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
pub(crate) const QUEUE_DEVICE_LOW: u64 = VIRTIO_MMIO_QUEUE_USED_LOW as u64;
pub(crate) const QUEUE_DEVICE_HIGH: u64 = VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
pub(crate) const SHM_SEL: u64 = VIRTIO_MMIO_SHM_SEL as u64;
pub(crate) const SHM_LEN_LOW: u64 = VIRTIO_MMIO_SHM_LEN_LOW as u64;
pub(crate) const SHM_LEN_HIGH: u64 = VIRTIO_MMIO_SHM_LEN_HIGH as u64;
pub(crate) const SHM_BASE_LOW: u64 = VIRTIO_MMIO_SHM_BASE_LOW as u64;
pub(crate) const SHM_BASE_HIGH: u64 = VIRTIO_MMIO_SHM_BASE_HIGH as u64;
/// QueueReset (virtio 1.2 §4.2.2); `virtio-bindings` 0.2 has no name for it.
/// Only meaningful with `VIRTIO_F_RING_RESET`, which chitin does not offer.
pub(crate) const QUEUE_RESET: u64 = 0x0c0;
pub(crate) const CONFIG_GENERATION: u64 = VIRTIO_MMIO_CONFIG_GENERATION as u64;
/// First byte of the device-specific configuration space.
pub(crate) const CONFIG: u64 = VIRTIO_MMIO_CONFIG as u64;

/// "virt" read as a little-endian `u32` (virtio 1.2 §4.2.2).
pub(crate) const MAGIC: u32 = 0x7472_6976;
/// The non-legacy register layout (virtio 1.2 §4.2.2: "Devices compliant
/// with this specification MUST return value 0x2").
pub(crate) const LAYOUT_VERSION: u32 = 2;

// InterruptStatus bits (virtio 1.2 §4.2.2).
pub(crate) const INT_QUEUE: u32 = VIRTIO_MMIO_INT_VRING;
pub(crate) const INT_CONFIG: u32 = VIRTIO_MMIO_INT_CONFIG;

// Device status bits (virtio 1.2 §2.1).
pub(crate) const ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
pub(crate) const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
pub(crate) const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
pub(crate) const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
pub(crate) const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
pub(crate) const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;

/// The order in which the driver sets the status bits during
/// initialization (virtio 1.2 §3.1.1): each one only after all before it.
pub(crate) const INIT_SEQUENCE: [u32; 4] = [ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK];

// Feature bits the transport offers on top of the device's (virtio 1.2 §6).
pub(crate) const F_VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
pub(crate) const F_INDIRECT_DESC: u64 = 1 << VIRTIO_RING_F_INDIRECT_DESC;
pub(crate) const F_EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
/// What `virtio-queue` implements for every device: virtio 1.x, indirect
/// descriptor tables and used/available event suppression.
pub(crate) const TRANSPORT_FEATURES: u64 = F_VERSION_1 | F_INDIRECT_DESC | F_EVENT_IDX;
