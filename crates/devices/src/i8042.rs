//! Just enough of the i8042 PS/2 controller for Linux to probe it and to
//! reset the machine through it (`reboot=k`).
//!
//! This module owns the controller's registers at ports `0x60` (data) and
//! `0x64` (status on read, command on write): the status byte, the controller
//! configuration byte, the output port, a one-byte output buffer, and the
//! commands that probing and reset use. No keyboard or mouse sits behind it
//! and it raises no interrupt: bytes the guest sends to a device are dropped.
//!
//! It must never panic on a guest access and must never call the reset
//! callback while holding its own lock (the callback may stop vCPUs that are
//! about to touch this device).

use std::fmt;
use std::sync::{Mutex, MutexGuard, PoisonError};

use chitin_bus::BusDevice;

/// The data port: reads return the controller's output byte, writes carry a
/// command's parameter.
pub const I8042_DATA_PORT: u64 = 0x60;
/// The command port: reads return the status byte, writes are commands.
pub const I8042_COMMAND_PORT: u64 = 0x64;
/// Length of the single bus range that covers both ports, `0x60..=0x64`.
pub const I8042_LEN: u64 = I8042_COMMAND_PORT - I8042_DATA_PORT + 1;

/// Offset of the data port in the device's range.
const DATA_OFFSET: u64 = 0;
/// Offset of the command/status port in the device's range.
const COMMAND_OFFSET: u64 = I8042_COMMAND_PORT - I8042_DATA_PORT;

/// What a read of a port this device does not implement returns: an idle ISA
/// bus floats high.
const FLOATING_BUS: u8 = 0xff;

// Status register bits.
/// Output buffer full: a byte waits in the data port for the guest.
const STATUS_OUTPUT_FULL: u8 = 1 << 0;
/// System flag: the controller passed its power-on self test.
const STATUS_SYSTEM_FLAG: u8 = 1 << 2;
/// The last byte written went to the command port (not the data port).
const STATUS_LAST_WAS_COMMAND: u8 = 1 << 3;
/// Status bit 4: keyboard not inhibited (no keylock). Clear, Linux warns
/// "Keylock active".
const STATUS_NOT_INHIBITED: u8 = 1 << 4;

// Controller configuration byte bits.
/// System flag, mirrored from the status register.
const CONFIG_SYSTEM_FLAG: u8 = 1 << 2;
/// First (keyboard) port clock disabled.
const CONFIG_KBD_DISABLED: u8 = 1 << 4;
/// Second (aux) port clock disabled.
const CONFIG_AUX_DISABLED: u8 = 1 << 5;
/// Scancode set 2 to set 1 translation.
const CONFIG_TRANSLATE: u8 = 1 << 6;
/// Ports enabled, interrupts off (there are no devices to interrupt for).
const DEFAULT_CONFIG: u8 = CONFIG_SYSTEM_FLAG | CONFIG_TRANSLATE;

// Output port bits.
/// System reset line, active low: writing 0 here resets the CPU.
const OUTPUT_PORT_RESET_DEASSERTED: u8 = 1 << 0;
/// A20 gate enabled.
const OUTPUT_PORT_A20: u8 = 1 << 1;
const DEFAULT_OUTPUT_PORT: u8 = OUTPUT_PORT_RESET_DEASSERTED | OUTPUT_PORT_A20;

// Controller commands.
const CMD_READ_CONFIG: u8 = 0x20;
const CMD_WRITE_CONFIG: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
/// Write the next data byte to the output buffer as if the keyboard sent it.
const CMD_KBD_LOOP: u8 = 0xd2;
/// Write the next data byte to the output buffer as if the AUX (mouse) port
/// sent it.
const CMD_AUX_LOOP: u8 = 0xd3;
/// Send the next data byte to the AUX device.
const CMD_WRITE_AUX: u8 = 0xd4;
/// `0xf0..=0xff` pulse the output port lines whose bit is clear in the low
/// nibble for 6 µs; `0xfe` pulses only the reset line.
const CMD_PULSE_FIRST: u8 = 0xf0;

/// Response to [`CMD_SELF_TEST`]: test passed.
const SELF_TEST_PASSED: u8 = 0x55;
/// Response to the port interface tests: no error.
const INTERFACE_TEST_PASSED: u8 = 0x00;
/// AUX interface test answer "clock line stuck low": there is no AUX port.
const INTERFACE_TEST_CLOCK_STUCK_LOW: u8 = 0x01;

/// The controller's registers.
/// What an i8042 carries across a snapshot: its registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct I8042State {
    /// The configuration byte.
    pub config: u8,
    /// The output port.
    pub output_port: u8,
    /// The byte waiting in the output buffer.
    pub output: Option<u8>,
    /// A command waiting for its parameter.
    pub awaiting_data: Option<u8>,
    /// Whether the last write went to the command port.
    pub last_was_command: bool,
}

#[derive(Debug)]
struct Controller {
    config: u8,
    output_port: u8,
    /// The byte the guest reads from the data port, if any.
    output: Option<u8>,
    /// A command that takes its parameter from the next data port write.
    awaiting_data: Option<u8>,
    last_was_command: bool,
}

impl Default for Controller {
    fn default() -> Self {
        Self {
            config: DEFAULT_CONFIG,
            output_port: DEFAULT_OUTPUT_PORT,
            output: None,
            awaiting_data: None,
            last_was_command: false,
        }
    }
}

/// Whether a guest write asked for a CPU reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reset {
    Requested,
    No,
}

impl Controller {
    fn status(&self) -> u8 {
        let mut status = STATUS_SYSTEM_FLAG | STATUS_NOT_INHIBITED;
        if self.output.is_some() {
            status |= STATUS_OUTPUT_FULL;
        }
        if self.last_was_command {
            status |= STATUS_LAST_WAS_COMMAND;
        }
        // Input buffer full (bit 1) stays clear: every write is consumed at once.
        status
    }

    fn read_data(&mut self) -> u8 {
        self.output.take().unwrap_or(0)
    }

    fn write_command(&mut self, command: u8) -> Reset {
        self.last_was_command = true;
        // A new command abandons one that still waited for its parameter.
        self.awaiting_data = None;
        match command {
            CMD_READ_CONFIG => self.output = Some(self.config),
            CMD_WRITE_CONFIG
            | CMD_WRITE_OUTPUT_PORT
            | CMD_KBD_LOOP
            | CMD_AUX_LOOP
            | CMD_WRITE_AUX => self.awaiting_data = Some(command),
            CMD_DISABLE_AUX => self.config |= CONFIG_AUX_DISABLED,
            CMD_ENABLE_AUX => self.config &= !CONFIG_AUX_DISABLED,
            CMD_DISABLE_KBD => self.config |= CONFIG_KBD_DISABLED,
            CMD_ENABLE_KBD => self.config &= !CONFIG_KBD_DISABLED,
            CMD_SELF_TEST => self.output = Some(SELF_TEST_PASSED),
            CMD_TEST_KBD => self.output = Some(INTERFACE_TEST_PASSED),
            // There is no AUX port. Saying so at once matters: Linux's i8042
            // driver otherwise waits 500 ms per unanswered AUX probe (over a
            // second of boot time measured in the nested tier).
            CMD_TEST_AUX => self.output = Some(INTERFACE_TEST_CLOCK_STUCK_LOW),
            CMD_READ_OUTPUT_PORT => self.output = Some(self.output_port),
            CMD_PULSE_FIRST..=u8::MAX if command & OUTPUT_PORT_RESET_DEASSERTED == 0 => {
                return Reset::Requested;
            }
            // Other pulses and unknown commands have no effect here.
            _ => {}
        }
        Reset::No
    }

    fn write_data(&mut self, byte: u8) -> Reset {
        self.last_was_command = false;
        match self.awaiting_data.take() {
            Some(CMD_WRITE_CONFIG) => self.config = byte,
            // Loop the byte back, always as keyboard data (status bit 5,
            // AUX data, stays clear): an AUX loopback that comes back as
            // keyboard data tells Linux at once that no AUX port exists.
            Some(CMD_KBD_LOOP | CMD_AUX_LOOP) => self.output = Some(byte),
            Some(CMD_WRITE_OUTPUT_PORT) => {
                self.output_port = byte;
                if byte & OUTPUT_PORT_RESET_DEASSERTED == 0 {
                    return Reset::Requested;
                }
            }
            // No command waits: the byte is for a keyboard that is not there.
            _ => {}
        }
        Reset::No
    }
}

/// The i8042 PS/2 controller, reduced to probing and CPU reset.
///
/// Register it on the port-I/O bus **once**, covering `0x60..=0x64`: base
/// [`I8042_DATA_PORT`], length [`I8042_LEN`] (5). Offset 0 is the data port
/// and offset 4 the status/command port. Offsets 1..=3 (ports `0x61..=0x63`,
/// not part of the controller) read `0xff` and ignore writes, as do accesses
/// wider than one byte.
///
/// Status register: bit 0 (output buffer full) is set while a response waits
/// in the data port, bit 1 (input buffer full) is always clear, bit 2 (system
/// flag) and bit 4 (keyboard not inhibited) are always set. Commands:
/// `0x20`/`0x60` read/write the configuration byte, `0xaa` self test
/// (answers `0x55`), `0xab` keyboard interface test (answers `0x00`), `0xa9`
/// AUX interface test (answers `0x01`: there is no AUX port), `0xd2`/`0xd3`
/// loop the next data byte back as keyboard data, `0xd4` swallows the next
/// data byte, `0xad`/`0xae`/`0xa7`/`0xa8` disable/enable the ports,
/// `0xd0`/`0xd1` read/write the output port (bit 0 clear resets), and
/// `0xf0..=0xff` with bit 0 clear (`0xfe` in practice) pulse the reset line.
/// Reading the data port returns the pending byte and clears bit 0 of the
/// status, or returns 0 when nothing is pending.
pub struct I8042Device {
    controller: Mutex<Controller>,
    on_reset: Box<dyn Fn() + Send + Sync>,
}

impl fmt::Debug for I8042Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("I8042Device")
            .field("controller", &*self.controller())
            .finish_non_exhaustive()
    }
}

impl I8042Device {
    /// Creates the controller. `on_reset` is called (from the vCPU thread,
    /// once per reset request) when the guest asks for a CPU reset.
    pub fn new(on_reset: Box<dyn Fn() + Send + Sync>) -> Self {
        Self {
            controller: Mutex::new(Controller::default()),
            on_reset,
        }
    }

    /// The controller's registers, for a snapshot.
    pub fn state(&self) -> I8042State {
        let c = self.controller();
        I8042State {
            config: c.config,
            output_port: c.output_port,
            output: c.output,
            awaiting_data: c.awaiting_data,
            last_was_command: c.last_was_command,
        }
    }

    /// A controller with a snapshot's `state`.
    pub fn with_state(on_reset: Box<dyn Fn() + Send + Sync>, state: &I8042State) -> Self {
        let device = Self::new(on_reset);
        {
            let mut c = device.controller();
            c.config = state.config;
            c.output_port = state.output_port;
            c.output = state.output;
            c.awaiting_data = state.awaiting_data;
            c.last_was_command = state.last_was_command;
        }
        device
    }

    /// Locks the registers. They are plain bytes, always consistent, so a
    /// lock poisoned by a panicking holder is taken over.
    fn controller(&self) -> MutexGuard<'_, Controller> {
        self.controller
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl BusDevice for I8042Device {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (DATA_OFFSET, 1) => self.controller().read_data(),
            (COMMAND_OFFSET, 1) => self.controller().status(),
            _ => FLOATING_BUS,
        };
        data.fill(value);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let reset = match (offset, data) {
            (DATA_OFFSET, &[byte]) => self.controller().write_data(byte),
            (COMMAND_OFFSET, &[command]) => self.controller().write_command(command),
            _ => Reset::No,
        };
        // The lock guard is a temporary of the match above: it is released
        // before the callback runs.
        if reset == Reset::Requested {
            (self.on_reset)();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    /// A controller whose reset callback counts its calls.
    fn counting_device() -> (I8042Device, Arc<AtomicUsize>) {
        let resets = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&resets);
        let device = I8042Device::new(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        (device, resets)
    }

    fn read_port(device: &I8042Device, offset: u64) -> u8 {
        let mut data = [0u8; 1];
        device.read(offset, &mut data);
        data[0]
    }

    #[test]
    fn i8042_pulse_reset_command_calls_on_reset_once_per_write() {
        // Arrange
        let (device, resets) = counting_device();

        // Act
        device.write(COMMAND_OFFSET, &[0xfe]);
        let after_first = resets.load(Ordering::SeqCst);
        device.write(COMMAND_OFFSET, &[0xfe]);

        // Assert
        assert_eq!(after_first, 1);
        assert_eq!(resets.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn i8042_pulse_without_reset_bit_does_not_reset() {
        // Arrange: 0xff pulses no line, 0xfd pulses only A20.
        let (device, resets) = counting_device();

        // Act
        device.write(COMMAND_OFFSET, &[0xff]);
        device.write(COMMAND_OFFSET, &[0xfd]);

        // Assert
        assert_eq!(resets.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn i8042_self_test_answers_55_through_data_port() {
        // Arrange
        let (device, _) = counting_device();
        let status_before = read_port(&device, COMMAND_OFFSET);

        // Act
        device.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        let status_pending = read_port(&device, COMMAND_OFFSET);
        let answer = read_port(&device, DATA_OFFSET);
        let status_after = read_port(&device, COMMAND_OFFSET);

        // Assert
        assert_eq!(status_before & STATUS_OUTPUT_FULL, 0);
        assert_ne!(status_pending & STATUS_OUTPUT_FULL, 0);
        assert_eq!(answer, SELF_TEST_PASSED);
        assert_eq!(status_after & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn i8042_status_input_full_clear_and_system_flag_set() {
        // Arrange
        let (device, _) = counting_device();
        // Status bit 1: input buffer full.
        let input_full = 1 << 1;

        // Act
        let status = read_port(&device, COMMAND_OFFSET);

        // Assert
        assert_eq!(status & input_full, 0);
        assert_ne!(status & STATUS_SYSTEM_FLAG, 0);
    }

    #[test]
    fn i8042_interface_tests_report_keyboard_ok_and_no_aux() {
        // Arrange
        let (device, _) = counting_device();

        // Act
        device.write(COMMAND_OFFSET, &[CMD_TEST_KBD]);
        let kbd = read_port(&device, DATA_OFFSET);
        device.write(COMMAND_OFFSET, &[CMD_TEST_AUX]);
        let aux = read_port(&device, DATA_OFFSET);

        // Assert
        assert_eq!(kbd, INTERFACE_TEST_PASSED);
        assert_eq!(aux, INTERFACE_TEST_CLOCK_STUCK_LOW);
    }

    #[test]
    fn i8042_aux_loopback_answers_at_once_as_keyboard_data() {
        // Arrange: Linux's AUX probe sends 0xd3 then 0x5a and waits for the
        // byte to come back with status bit 5 (AUX data) set.
        let (device, _) = counting_device();
        let aux_data = 1 << 5;

        // Act
        device.write(COMMAND_OFFSET, &[CMD_AUX_LOOP]);
        device.write(DATA_OFFSET, &[0x5a]);
        let status = read_port(&device, COMMAND_OFFSET);
        let byte = read_port(&device, DATA_OFFSET);

        // Assert: an answer is pending at once, but not as AUX data.
        assert_ne!(status & STATUS_OUTPUT_FULL, 0);
        assert_eq!(status & aux_data, 0);
        assert_eq!(byte, 0x5a);
    }

    #[test]
    fn i8042_status_reports_keyboard_not_inhibited() {
        let (device, _) = counting_device();
        assert_ne!(read_port(&device, COMMAND_OFFSET) & STATUS_NOT_INHIBITED, 0);
    }

    #[test]
    fn i8042_config_byte_round_trips() {
        // Arrange: an arbitrary pattern with both interrupt bits set.
        let (device, _) = counting_device();
        let config = 0x47;

        // Act
        device.write(COMMAND_OFFSET, &[CMD_WRITE_CONFIG]);
        device.write(DATA_OFFSET, &[config]);
        device.write(COMMAND_OFFSET, &[CMD_READ_CONFIG]);
        let read_back = read_port(&device, DATA_OFFSET);

        // Assert
        assert_eq!(read_back, config);
    }

    #[test]
    fn i8042_disable_enable_ports_update_config() {
        // Arrange
        let (device, _) = counting_device();
        let read_config = |device: &I8042Device| {
            device.write(COMMAND_OFFSET, &[CMD_READ_CONFIG]);
            read_port(device, DATA_OFFSET)
        };

        // Act
        device.write(COMMAND_OFFSET, &[CMD_DISABLE_KBD]);
        device.write(COMMAND_OFFSET, &[CMD_DISABLE_AUX]);
        let disabled = read_config(&device);
        device.write(COMMAND_OFFSET, &[CMD_ENABLE_KBD]);
        device.write(COMMAND_OFFSET, &[CMD_ENABLE_AUX]);
        let enabled = read_config(&device);

        // Assert
        assert_eq!(
            disabled & (CONFIG_KBD_DISABLED | CONFIG_AUX_DISABLED),
            CONFIG_KBD_DISABLED | CONFIG_AUX_DISABLED
        );
        assert_eq!(enabled & (CONFIG_KBD_DISABLED | CONFIG_AUX_DISABLED), 0);
    }

    #[test]
    fn i8042_write_output_port_reset_bit_clear_resets() {
        // Arrange: 0xfe keeps A20 and everything else up, drops only reset.
        let (device, resets) = counting_device();

        // Act
        device.write(COMMAND_OFFSET, &[CMD_WRITE_OUTPUT_PORT]);
        device.write(DATA_OFFSET, &[0xfe]);

        // Assert
        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn i8042_write_output_port_reset_bit_set_does_not_reset() {
        // Arrange
        let (device, resets) = counting_device();

        // Act
        device.write(COMMAND_OFFSET, &[CMD_WRITE_OUTPUT_PORT]);
        device.write(DATA_OFFSET, &[DEFAULT_OUTPUT_PORT]);
        device.write(COMMAND_OFFSET, &[CMD_READ_OUTPUT_PORT]);
        let read_back = read_port(&device, DATA_OFFSET);

        // Assert
        assert_eq!(resets.load(Ordering::SeqCst), 0);
        assert_eq!(read_back, DEFAULT_OUTPUT_PORT);
    }

    #[test]
    fn i8042_data_write_without_command_is_ignored() {
        // Arrange: 0x00 would reset if it were taken as an output port value.
        let (device, resets) = counting_device();

        // Act
        device.write(DATA_OFFSET, &[0x00]);
        device.write(COMMAND_OFFSET, &[CMD_READ_CONFIG]);
        let config = read_port(&device, DATA_OFFSET);

        // Assert
        assert_eq!(resets.load(Ordering::SeqCst), 0);
        assert_eq!(config, DEFAULT_CONFIG);
    }

    #[test]
    fn i8042_data_read_with_nothing_pending_returns_zero() {
        // Arrange
        let (device, _) = counting_device();

        // Act
        let value = read_port(&device, DATA_OFFSET);

        // Assert
        assert_eq!(value, 0);
    }

    #[test]
    fn i8042_hostile_accesses_read_ff_and_ignore_writes() {
        // Arrange
        let (device, resets) = counting_device();
        let mut gap = [0u8; 1];
        let mut wide = [0u8; 8];
        let mut far = [0u8; 2];

        // Act: a port between data and command, an 8-byte access, an empty
        // access, an offset far outside the range, and a wide reset write.
        device.read(1, &mut gap);
        device.read(COMMAND_OFFSET, &mut wide);
        device.read(DATA_OFFSET, &mut []);
        device.read(u64::MAX, &mut far);
        device.write(COMMAND_OFFSET, &[0xfe, 0xfe]);
        device.write(3, &[0xfe]);
        device.write(DATA_OFFSET, &[]);

        // Assert
        assert_eq!(gap, [0xff]);
        assert_eq!(wide, [0xff; 8]);
        assert_eq!(far, [0xff; 2]);
        assert_eq!(resets.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn i8042_reset_callback_may_use_device_without_deadlock() {
        // Arrange: a callback that reads the status of the device itself.
        let device = Arc::new_cyclic(|weak: &std::sync::Weak<I8042Device>| {
            let weak = weak.clone();
            I8042Device::new(Box::new(move || {
                if let Some(device) = weak.upgrade() {
                    let mut status = [0u8; 1];
                    device.read(COMMAND_OFFSET, &mut status);
                }
            }))
        });

        // Act: returns only if the lock was released before the callback.
        device.write(COMMAND_OFFSET, &[0xfe]);

        // Assert
        assert_eq!(read_port(&device, DATA_OFFSET), 0);
    }
}
