//! The port-I/O and MMIO bus of chitin microVMs: a map from guest address
//! ranges to devices, shared by the vCPUs that dispatch exits to it, the
//! legacy devices and the virtio transport that sit on it.
//!
//! This crate owns address-range bookkeeping and dispatch: it checks that
//! ranges never overlap when a device is inserted and turns a guest access at
//! an absolute address into a call on the one device that covers it, with the
//! offset from the start of that device's range.
//!
//! It must never lock a device on the device's behalf (devices own their
//! locking, so the bus cannot deadlock on a slow device) and must never panic
//! or dispatch a partial access, whatever address and length the guest uses.

#![deny(missing_docs)]

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

/// A device on the port-I/O or MMIO bus.
///
/// Devices own their locking (methods take `&self`); the bus never locks a
/// device for them. Both methods run on a vCPU thread, with guest-chosen
/// offsets and access sizes, so implementations must accept any `offset` and
/// any `data` length without panicking.
pub trait BusDevice: Send + Sync {
    /// Guest read of `data.len()` bytes at `offset` from the start of the
    /// device's range. Fill `data` completely.
    fn read(&self, offset: u64, data: &mut [u8]);

    /// Guest write of `data` at `offset` from the start of the device's range.
    fn write(&self, offset: u64, data: &[u8]);
}

/// Errors from [`Bus::insert`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The new range overlaps a range already on the bus.
    #[error("range {base:#x}+{len:#x} overlaps a registered device")]
    Overlap {
        /// First address of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
    /// A device cannot occupy an empty range.
    #[error("range at {base:#x} has zero length")]
    ZeroLength {
        /// First address of the rejected range.
        base: u64,
    },
    /// The end of the range does not fit in the 64-bit address space.
    #[error("range {base:#x}+{len:#x} overflows the address space")]
    Overflow {
        /// First address of the rejected range.
        base: u64,
        /// Length of the rejected range.
        len: u64,
    },
}

/// One registered range: its length and the device behind it.
struct BusRange {
    len: u64,
    device: Arc<dyn BusDevice>,
}

/// A set of non-overlapping address ranges, each served by one device.
///
/// Build it before the vCPUs start, then share it read-only (for example in an
/// `Arc<Bus>`): dispatch takes `&self` and holds no lock of its own.
#[derive(Default)]
pub struct Bus {
    /// Keyed by the first address of each range.
    ranges: BTreeMap<u64, BusRange>,
}

impl fmt::Debug for Bus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for (base, range) in &self.ranges {
            list.entry(&format_args!("{base:#x}+{:#x}", range.len));
        }
        list.finish()
    }
}

impl Bus {
    /// Creates an empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` for the addresses `[base, base + len)`.
    ///
    /// # Errors
    ///
    /// [`BusError::ZeroLength`] when `len` is 0, [`BusError::Overflow`] when
    /// `base + len` does not fit in a `u64`, and [`BusError::Overlap`] when
    /// the range shares an address with a registered range. The bus is left
    /// unchanged on error.
    pub fn insert(
        &mut self,
        device: Arc<dyn BusDevice>,
        base: u64,
        len: u64,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength { base });
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overflow { base, len })?;
        // Registered ranges are disjoint, so the only one that can overlap the
        // new range is the last one that starts before the new range ends.
        if let Some((&other_base, other)) = self.ranges.range(..end).next_back() {
            // `other_base + other.len` was checked on insert and cannot overflow.
            if other_base + other.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        self.ranges.insert(base, BusRange { len, device });
        Ok(())
    }

    /// Finds the device that covers `[addr, addr + len)` entirely and the
    /// offset of `addr` inside its range.
    fn resolve(&self, addr: u64, len: usize) -> Option<(&dyn BusDevice, u64)> {
        let len = u64::try_from(len).ok().filter(|&len| len > 0)?;
        let end = addr.checked_add(len)?;
        let (&base, range) = self.ranges.range(..=addr).next_back()?;
        // `base + range.len` was checked on insert and cannot overflow.
        if end > base + range.len {
            return None;
        }
        Some((range.device.as_ref(), addr - base))
    }

    /// Dispatches a guest read of `data.len()` bytes at `addr`.
    ///
    /// Returns `false`, leaving `data` untouched, when `data` is empty or no
    /// single device covers `[addr, addr + data.len())` entirely (an access
    /// that straddles the end of a range is not split between devices).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                device.read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Dispatches a guest write of `data` at `addr`.
    ///
    /// Returns `false` when `data` is empty or no single device covers
    /// `[addr, addr + data.len())` entirely.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                device.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Records every access it sees and answers reads with a fixed byte.
    struct Recorder {
        fill: u8,
        accesses: Mutex<Vec<(&'static str, u64, Vec<u8>)>>,
    }

    impl Recorder {
        fn new(fill: u8) -> Arc<Self> {
            Arc::new(Self {
                fill,
                accesses: Mutex::new(Vec::new()),
            })
        }

        fn accesses(&self) -> Vec<(&'static str, u64, Vec<u8>)> {
            self.accesses.lock().unwrap().clone()
        }
    }

    impl BusDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(self.fill);
            self.accesses
                .lock()
                .unwrap()
                .push(("read", offset, data.to_vec()));
        }

        fn write(&self, offset: u64, data: &[u8]) {
            self.accesses
                .lock()
                .unwrap()
                .push(("write", offset, data.to_vec()));
        }
    }

    /// A bus holding one device at [0x100, 0x110): base and length are
    /// arbitrary, chosen so ranges on both sides of it are easy to write.
    const BASE: u64 = 0x100;
    const LEN: u64 = 0x10;

    fn bus_with_one_device() -> (Bus, Arc<Recorder>) {
        let mut bus = Bus::new();
        let device = Recorder::new(0xaa);
        bus.insert(device.clone(), BASE, LEN).unwrap();
        (bus, device)
    }

    #[test]
    fn insert_identical_range_is_overlap() {
        // Arrange
        let (mut bus, _) = bus_with_one_device();

        // Act
        let result = bus.insert(Recorder::new(0), BASE, LEN);

        // Assert
        assert_eq!(
            result,
            Err(BusError::Overlap {
                base: BASE,
                len: LEN
            })
        );
    }

    #[test]
    fn insert_overlapping_start_is_overlap() {
        // Arrange
        let (mut bus, _) = bus_with_one_device();

        // Act: [0xf8, 0x108) covers the first 8 bytes of the device.
        let result = bus.insert(Recorder::new(0), BASE - 8, 0x10);

        // Assert
        assert_eq!(
            result,
            Err(BusError::Overlap {
                base: BASE - 8,
                len: 0x10
            })
        );
    }

    #[test]
    fn insert_overlapping_end_is_overlap() {
        // Arrange
        let (mut bus, _) = bus_with_one_device();

        // Act: [0x10f, 0x11f) shares only the last byte of the device.
        let result = bus.insert(Recorder::new(0), BASE + LEN - 1, 0x10);

        // Assert
        assert_eq!(
            result,
            Err(BusError::Overlap {
                base: BASE + LEN - 1,
                len: 0x10
            })
        );
    }

    #[test]
    fn insert_contained_range_is_overlap() {
        // Arrange
        let (mut bus, _) = bus_with_one_device();

        // Act: 4 bytes strictly inside the device's 16.
        let result = bus.insert(Recorder::new(0), BASE + 4, 4);

        // Assert
        assert_eq!(
            result,
            Err(BusError::Overlap {
                base: BASE + 4,
                len: 4
            })
        );
    }

    #[test]
    fn insert_containing_range_is_overlap() {
        // Arrange
        let (mut bus, _) = bus_with_one_device();

        // Act: [0, 0x1000) contains the whole device.
        let result = bus.insert(Recorder::new(0), 0, 0x1000);

        // Assert
        assert_eq!(
            result,
            Err(BusError::Overlap {
                base: 0,
                len: 0x1000
            })
        );
    }

    #[test]
    fn insert_zero_length_is_rejected() {
        // Arrange
        let mut bus = Bus::new();

        // Act
        let result = bus.insert(Recorder::new(0), BASE, 0);

        // Assert
        assert_eq!(result, Err(BusError::ZeroLength { base: BASE }));
    }

    #[test]
    fn insert_past_address_space_end_is_overflow() {
        // Arrange
        let mut bus = Bus::new();

        // Act: the last 16 addresses plus one more do not fit.
        let result = bus.insert(Recorder::new(0), u64::MAX - 0xf, 0x11);

        // Assert
        assert_eq!(
            result,
            Err(BusError::Overflow {
                base: u64::MAX - 0xf,
                len: 0x11
            })
        );
    }

    #[test]
    fn insert_adjacent_ranges_succeeds() {
        // Arrange
        let (mut bus, _) = bus_with_one_device();

        // Act: one range ending exactly at BASE, one starting exactly at its end.
        let below = bus.insert(Recorder::new(0), BASE - LEN, LEN);
        let above = bus.insert(Recorder::new(0), BASE + LEN, LEN);

        // Assert
        assert_eq!(below, Ok(()));
        assert_eq!(above, Ok(()));
    }

    #[test]
    fn insert_after_rejection_leaves_bus_unchanged() {
        // Arrange
        let (mut bus, device) = bus_with_one_device();
        let _ = bus.insert(Recorder::new(0x55), BASE, LEN);
        let mut data = [0u8; 1];

        // Act
        bus.read(BASE, &mut data);

        // Assert: the first device still answers.
        assert_eq!(data, [0xaa]);
        assert_eq!(device.accesses().len(), 1);
    }

    #[test]
    fn read_inside_range_reaches_device_with_offset() {
        // Arrange: two neighbouring devices that fill reads differently.
        let (mut bus, first) = bus_with_one_device();
        let second = Recorder::new(0xbb);
        bus.insert(second.clone(), BASE + LEN, LEN).unwrap();
        let mut data = [0u8; 2];

        // Act: 2 bytes at offset 3 of the second device.
        let handled = bus.read(BASE + LEN + 3, &mut data);

        // Assert
        assert!(handled);
        assert_eq!(data, [0xbb, 0xbb]);
        assert_eq!(second.accesses(), vec![("read", 3, vec![0xbb, 0xbb])]);
        assert!(first.accesses().is_empty());
    }

    #[test]
    fn write_inside_range_reaches_device_with_offset() {
        // Arrange
        let (bus, device) = bus_with_one_device();

        // Act: 4 bytes ending exactly at the last byte of the range.
        let handled = bus.write(BASE + LEN - 4, &[1, 2, 3, 4]);

        // Assert
        assert!(handled);
        assert_eq!(
            device.accesses(),
            vec![("write", LEN - 4, vec![1, 2, 3, 4])]
        );
    }

    #[test]
    fn read_straddling_range_end_is_unhandled() {
        // Arrange
        let (bus, device) = bus_with_one_device();
        let mut data = [0x11u8; 4];

        // Act: 4 bytes starting 2 bytes before the end of the range.
        let handled = bus.read(BASE + LEN - 2, &mut data);

        // Assert: data untouched, device never called.
        assert!(!handled);
        assert_eq!(data, [0x11; 4]);
        assert!(device.accesses().is_empty());
    }

    #[test]
    fn write_straddling_range_end_is_unhandled() {
        // Arrange
        let (bus, device) = bus_with_one_device();

        // Act
        let handled = bus.write(BASE + LEN - 1, &[1, 2]);

        // Assert
        assert!(!handled);
        assert!(device.accesses().is_empty());
    }

    #[test]
    fn read_unknown_address_is_unhandled() {
        // Arrange
        let (bus, _) = bus_with_one_device();
        let mut data = [0x11u8; 1];

        // Act: just below and just past the registered range.
        let below = bus.read(BASE - 1, &mut data);
        let above = bus.read(BASE + LEN, &mut data);

        // Assert
        assert!(!below);
        assert!(!above);
        assert_eq!(data, [0x11]);
    }

    #[test]
    fn write_unknown_address_is_unhandled() {
        // Arrange
        let (bus, _) = bus_with_one_device();

        // Act
        let handled = bus.write(0, &[1]);

        // Assert
        assert!(!handled);
    }

    #[test]
    fn read_empty_access_is_unhandled() {
        // Arrange
        let (bus, device) = bus_with_one_device();

        // Act
        let handled = bus.read(BASE, &mut []);

        // Assert
        assert!(!handled);
        assert!(device.accesses().is_empty());
    }

    #[test]
    fn read_wrapping_past_address_space_end_is_unhandled() {
        // Arrange: a device on the last 16 addresses below u64::MAX.
        let mut bus = Bus::new();
        let device = Recorder::new(0);
        bus.insert(device.clone(), u64::MAX - 0x10, 0x10).unwrap();
        let mut data = [0u8; 8];

        // Act: an 8-byte access at u64::MAX would wrap to address 6.
        let handled = bus.read(u64::MAX, &mut data);

        // Assert
        assert!(!handled);
        assert!(device.accesses().is_empty());
    }

    #[test]
    fn bus_is_send_and_sync() {
        // Compiles only if the bus can be shared between vCPU threads.
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Bus>();
    }
}
