//! The legacy PC devices of chitin microVMs, each a [`BusDevice`] on
//! `chitin-bus`'s port-I/O bus.
//!
//! This crate owns the few legacy devices a Linux guest expects on a PC:
//! the COM1 UART ([`SerialDevice`], fed host input by [`SerialInput`]), the
//! i8042 controller for CPU reset ([`I8042Device`]), the CMOS clock
//! ([`CmosRtc`]), and the ACPI sleep and reset registers ([`AcpiPm`]) the
//! FADT of an ACPI machine points at. [`ConsoleCapture`] collects console
//! output in memory.
//!
//! It must never depend on KVM: devices raise interrupts by writing to
//! EventFds that the VMM registers as irqfds, and are reached through the bus
//! from whatever loop runs the vCPUs. Every guest access is hostile input:
//! nothing here panics on any offset or access size.
//!
//! A VMM wires the devices on its port-I/O bus like this:
//!
//! ```
//! use std::sync::Arc;
//!
//! use chitin_bus::Bus;
//! use chitin_devices::{
//!     CmosRtc, ConsoleCapture, I8042Device, SerialDevice, COM1_BASE, COM1_LEN,
//!     I8042_DATA_PORT, I8042_LEN, RTC_BASE, RTC_LEN,
//! };
//! use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
//!
//! let console = ConsoleCapture::new();
//! // The VMM registers a clone of this EventFd as irqfd for COM1_IRQ.
//! let com1_irq = EventFd::new(EFD_NONBLOCK)?;
//! let serial = Arc::new(SerialDevice::new(com1_irq, Box::new(console.clone()))?);
//!
//! let mut pio = Bus::new();
//! pio.insert(serial, COM1_BASE, COM1_LEN)?;
//! pio.insert(Arc::new(I8042Device::new(Box::new(|| {}))), I8042_DATA_PORT, I8042_LEN)?;
//! pio.insert(Arc::new(CmosRtc::new()), RTC_BASE, RTC_LEN)?;
//!
//! // A vCPU exit for `outb 'A', 0x3f8`:
//! assert!(pio.write(COM1_BASE, b"A"));
//! assert_eq!(console.contents(), b"A");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(missing_docs)]

pub mod acpi_pm;
pub mod console;
pub mod i8042;
pub mod rtc;
pub mod serial;

pub use acpi_pm::{
    AcpiPm, PmEvent, ACPI_PM_BASE, ACPI_PM_LEN, RESET_PORT, RESET_VALUE, S5_SLEEP_TYPE,
    SLEEP_CONTROL_PORT, SLEEP_STATUS_PORT,
};
pub use chitin_bus::BusDevice;
pub use console::{BufferedSink, ConsoleCapture, DEFAULT_CAPTURE_LIMIT};
pub use i8042::{I8042Device, I8042State, I8042_COMMAND_PORT, I8042_DATA_PORT, I8042_LEN};
pub use rtc::{CmosRtc, RtcState, RTC_BASE, RTC_LEN};
pub use serial::{
    ReadFd, SerialDevice, SerialError, SerialInput, SerialState, COM1_BASE, COM1_IRQ, COM1_LEN,
};

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use super::*;

    /// Offsets inside and just past every device's range, plus the extremes.
    const OFFSETS: [u64; 12] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0x100, u64::MAX];
    /// Every access size up to 9 (one more than the widest x86 access) and a
    /// large slice, as a hostile or buggy exit handler could pass.
    const SIZES: [usize; 11] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 4096];

    fn all_devices() -> Vec<Arc<dyn BusDevice>> {
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let serial = SerialDevice::new(irq, Box::new(ConsoleCapture::new())).unwrap();
        vec![
            Arc::new(serial),
            Arc::new(I8042Device::new(Box::new(|| {}))),
            Arc::new(CmosRtc::new()),
        ]
    }

    #[test]
    fn devices_any_offset_and_size_do_not_panic() {
        // Arrange
        let devices = all_devices();

        for device in &devices {
            for offset in OFFSETS {
                for size in SIZES {
                    // Act: every byte value a guest is likely to try.
                    for value in [0x00, 0x80, 0xfe, 0xff] {
                        device.write(offset, &vec![value; size]);
                    }
                    let mut data = vec![0u8; size];
                    device.read(offset, &mut data);

                    // Assert: reaching here means no panic; wide accesses
                    // read as a floating bus.
                    if size > 1 {
                        assert!(data.iter().all(|&byte| byte == 0xff));
                    }
                }
            }
        }
    }

    #[test]
    fn devices_are_send_and_sync() {
        // Arrange / Act / Assert: compiles only if the types can be shared
        // between vCPU threads.
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<SerialDevice>();
        assert_send_sync::<I8042Device>();
        assert_send_sync::<CmosRtc>();
        assert_send_sync::<ConsoleCapture>();
    }
}
