//! The registers an ACPI hardware-reduced machine powers off and resets
//! through (ACPI 6.5 §4.8.3.7 sleep control and status registers, §4.8.3.6
//! reset register).
//!
//! chitin's FADT points its `SLEEP_CONTROL_REG`, `SLEEP_STATUS_REG` and
//! `RESET_REG` at three byte-wide I/O ports starting at [`ACPI_PM_BASE`],
//! and its DSDT's `\_S5_` object names [`S5_SLEEP_TYPE`]. Linux powers off
//! by writing `WAK_STS` to the status register, then
//! `SLP_TYP << 2 | SLP_EN` to the control register; it reboots through
//! ACPI by writing [`RESET_VALUE`] to the reset register. This device turns
//! those writes into a [`PmEvent`] for the VMM. Nothing else is modelled:
//! the status register reads as zero (no wake event is ever pending), other
//! sleep types are ignored, and every other access is dropped. No access
//! panics; the callback runs with no lock held.

use std::fmt;

use chitin_bus::BusDevice;

/// First port: the sleep control register.
pub const ACPI_PM_BASE: u64 = 0x600;
/// Ports the device answers: control, status, reset.
pub const ACPI_PM_LEN: u64 = 3;
/// The sleep control register (`SLEEP_CONTROL_REG` in the FADT).
pub const SLEEP_CONTROL_PORT: u64 = ACPI_PM_BASE;
/// The sleep status register (`SLEEP_STATUS_REG` in the FADT).
pub const SLEEP_STATUS_PORT: u64 = ACPI_PM_BASE + 1;
/// The reset register (`RESET_REG` in the FADT).
pub const RESET_PORT: u64 = ACPI_PM_BASE + 2;
/// The value written to [`RESET_PORT`] that resets the machine
/// (`RESET_VALUE` in the FADT).
pub const RESET_VALUE: u8 = 0x01;
/// The `SLP_TYP` value of the soft-off state, `\_S5_`'s first element.
pub const S5_SLEEP_TYPE: u8 = 5;

/// `SLP_EN`, bit 5 of the sleep control register.
const SLEEP_ENABLE: u8 = 1 << 5;
/// `SLP_TYPx`, bits 2-4 of the sleep control register.
const SLEEP_TYPE_SHIFT: u8 = 2;
const SLEEP_TYPE_MASK: u8 = 0b111;

/// What the guest asked the machine to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PmEvent {
    /// It entered S5 (soft off): `poweroff`.
    PowerOff,
    /// It wrote the reset value to the reset register: `reboot`.
    Reset,
}

/// The sleep and reset registers, calling back on power-off and reset.
pub struct AcpiPm {
    on_event: Box<dyn Fn(PmEvent) + Send + Sync>,
}

impl AcpiPm {
    /// A device that calls `on_event` when the guest powers off or resets.
    pub fn new(on_event: Box<dyn Fn(PmEvent) + Send + Sync>) -> Self {
        Self { on_event }
    }

    /// The event a byte written at `offset` (from [`ACPI_PM_BASE`]) asks
    /// for, if any.
    fn decode(offset: u64, value: u8) -> Option<PmEvent> {
        match offset {
            o if o == SLEEP_CONTROL_PORT - ACPI_PM_BASE => {
                let sleep_type = (value >> SLEEP_TYPE_SHIFT) & SLEEP_TYPE_MASK;
                (value & SLEEP_ENABLE != 0 && sleep_type == S5_SLEEP_TYPE)
                    .then_some(PmEvent::PowerOff)
            }
            o if o == RESET_PORT - ACPI_PM_BASE => (value == RESET_VALUE).then_some(PmEvent::Reset),
            _ => None,
        }
    }
}

impl fmt::Debug for AcpiPm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcpiPm").finish_non_exhaustive()
    }
}

impl BusDevice for AcpiPm {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        // No wake status is ever pending; control and reset read as 0.
        data.fill(0);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        // The registers are one byte wide (the FADT says so); a wider
        // access is not one Linux makes and is dropped.
        if let &[value] = data {
            if let Some(event) = Self::decode(offset, value) {
                (self.on_event)(event);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    fn device() -> (AcpiPm, Arc<Mutex<Vec<PmEvent>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let pm = AcpiPm::new(Box::new(move |e| log.lock().unwrap().push(e)));
        (pm, seen)
    }

    #[test]
    fn linux_power_off_sequence_powers_off_once() {
        let (pm, seen) = device();
        // acpi_hw_extended_sleep: clear WAK_STS, then SLP_TYP | SLP_EN.
        pm.write(SLEEP_STATUS_PORT - ACPI_PM_BASE, &[0x80]);
        assert!(seen.lock().unwrap().is_empty());
        pm.write(0, &[(S5_SLEEP_TYPE << 2) | SLEEP_ENABLE]);
        assert_eq!(*seen.lock().unwrap(), [PmEvent::PowerOff]);
    }

    #[test]
    fn other_sleep_types_and_missing_enable_do_nothing() {
        let (pm, seen) = device();
        pm.write(0, &[S5_SLEEP_TYPE << 2]);
        for typ in (0..8).filter(|&t| t != S5_SLEEP_TYPE) {
            pm.write(0, &[(typ << 2) | SLEEP_ENABLE]);
        }
        assert!(seen.lock().unwrap().is_empty());
    }

    #[test]
    fn reset_register_resets_only_on_its_value() {
        let (pm, seen) = device();
        pm.write(RESET_PORT - ACPI_PM_BASE, &[0x02]);
        pm.write(RESET_PORT - ACPI_PM_BASE, &[RESET_VALUE]);
        assert_eq!(*seen.lock().unwrap(), [PmEvent::Reset]);
    }

    #[test]
    fn hostile_accesses_neither_panic_nor_fire() {
        let (pm, seen) = device();
        for offset in [0, 1, 2, 3, u64::MAX] {
            pm.write(offset, &[]);
            pm.write(offset, &[0xff, 0xff]);
            pm.write(offset, &[0xff; 8]);
            let mut buf = [0xaa; 4];
            pm.read(offset, &mut buf);
            assert_eq!(buf, [0; 4]);
        }
        pm.write(3, &[RESET_VALUE]);
        pm.write(u64::MAX, &[0x34]);
        assert!(seen.lock().unwrap().is_empty());
    }
}
