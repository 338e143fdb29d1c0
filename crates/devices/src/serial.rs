//! The 16550A UART at COM1 and the pump that feeds it host input.
//!
//! This module owns the glue between the bus and `vm_superio::Serial`: the
//! register window of COM1 (ports `0x3f8..=0x3ff`), the interrupt trigger
//! (an EventFd the VMM registers as irqfd for IRQ 4), the host output sink,
//! and [`SerialInput`], the event-loop subscriber that moves bytes from a host
//! file descriptor into the receive FIFO with flow control.
//!
//! It must never panic on a guest access (any offset, any size), never block
//! the event loop on a full FIFO (the pump stops watching its source instead),
//! and never stop the VM because the host input or output failed.

use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vm_superio::serial::SerialEvents;
pub use vm_superio::serial::SerialState;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use chitin_bus::BusDevice;

/// First I/O port of COM1.
pub const COM1_BASE: u64 = 0x3f8;
/// Number of I/O ports of a 16550A register window.
pub const COM1_LEN: u64 = 8;
/// The legacy (ISA) interrupt line of COM1.
pub const COM1_IRQ: u32 = 4;

/// Depth of the 16550A receive FIFO, as emulated by `vm_superio`.
const FIFO_CAPACITY: usize = 64;

/// What a read of a register that does not exist returns: an idle ISA bus
/// floats high.
const FLOATING_BUS: u8 = 0xff;

/// Errors of the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The eventfd that signals a drained receive FIFO could not be created.
    #[error("cannot create the serial input-ready eventfd")]
    InputReadyEvent(#[source] io::Error),
    /// The UART model failed; for host input this means the bytes were queued
    /// but the guest interrupt could not be raised.
    #[error("serial uart operation failed")]
    Uart(#[source] vm_superio::serial::Error<io::Error>),
}

/// Raises the UART interrupt by writing 1 to the irqfd of IRQ 4.
struct IrqTrigger(EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Reacts to UART events: a drained receive FIFO wakes the input pump.
struct SerialEventsImpl {
    input_ready: Arc<EventFd>,
}

impl SerialEvents for SerialEventsImpl {
    fn buffer_read(&self) {}

    fn out_byte(&self) {}

    fn tx_lost_byte(&self) {}

    fn in_buffer_empty(&self) {
        // The eventfd is non-blocking; the only possible failure is a counter
        // at its maximum, which means a wake-up is pending anyway.
        let _ = self.input_ready.write(1);
    }
}

type Uart = Serial<IrqTrigger, SerialEventsImpl, Box<dyn Write + Send>>;

/// The 16550A UART at COM1, over `vm_superio::Serial`.
///
/// Put it on the port-I/O bus at [`COM1_BASE`] with length [`COM1_LEN`].
/// Only single-byte accesses at offsets 0..8 reach the UART; wider or
/// out-of-range reads return `0xff` bytes and such writes are ignored.
///
/// Every byte the guest transmits is written and flushed to the output sink
/// on the vCPU thread, so a sink that blocks stalls that vCPU: give it a sink
/// that keeps up (a file, stdout, [`ConsoleCapture`](crate::ConsoleCapture)).
/// A sink that fails drops the byte; the guest does not notice.
pub struct SerialDevice {
    uart: Mutex<Uart>,
    input_ready: Arc<EventFd>,
}

impl fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SerialDevice")
            .field("input_space", &self.input_space())
            .finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// Creates the UART.
    ///
    /// `interrupt` is an EventFd the VMM registers as irqfd for IRQ 4 (the
    /// device writes 1 to it to raise the line); `out` receives every byte
    /// the guest transmits, flushed after each byte so a file or stdout sink
    /// sees output promptly.
    ///
    /// # Errors
    ///
    /// [`SerialError::InputReadyEvent`] when the eventfd behind
    /// [`input_ready_event`](Self::input_ready_event) cannot be created.
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> Result<Self, SerialError> {
        Self::with_state(interrupt, out, None)
    }

    /// [`SerialDevice::new`], with the registers and receive FIFO of a
    /// snapshot when `state` is given.
    ///
    /// # Errors
    ///
    /// As [`SerialDevice::new`]; [`SerialError::Uart`] for a state whose
    /// FIFO holds more than the UART's.
    pub fn with_state(
        interrupt: EventFd,
        out: Box<dyn Write + Send>,
        state: Option<&SerialState>,
    ) -> Result<Self, SerialError> {
        let input_ready =
            Arc::new(EventFd::new(EFD_NONBLOCK).map_err(SerialError::InputReadyEvent)?);
        let events = SerialEventsImpl {
            input_ready: Arc::clone(&input_ready),
        };
        let uart = match state {
            Some(state) => Serial::from_state(state, IrqTrigger(interrupt), events, out)
                .map_err(SerialError::Uart)?,
            None => Serial::with_events(IrqTrigger(interrupt), events, out),
        };
        Ok(Self {
            uart: Mutex::new(uart),
            input_ready,
        })
    }

    /// The registers and receive FIFO, for a snapshot.
    pub fn state(&self) -> SerialState {
        self.uart().state()
    }

    /// Locks the UART. A panic in another holder (only possible from inside
    /// the output sink) leaves the registers consistent, so a poisoned lock
    /// is taken over rather than propagated to the vCPU.
    fn uart(&self) -> MutexGuard<'_, Uart> {
        self.uart.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues host input bytes for the guest to read and raises the receive
    /// interrupt if the guest enabled it.
    ///
    /// Returns how many bytes fit in the receive FIFO; the rest must be
    /// retried later (wait for [`input_ready_event`](Self::input_ready_event)).
    /// Returns 0 while the FIFO is full, and also while the guest has put the
    /// UART in loopback mode (it then receives only its own output).
    ///
    /// # Errors
    ///
    /// [`SerialError::Uart`] when the interrupt could not be raised; the bytes
    /// were queued nonetheless.
    pub fn enqueue_input(&self, bytes: &[u8]) -> Result<usize, SerialError> {
        match self.uart().enqueue_raw_bytes(bytes) {
            Ok(queued) => Ok(queued),
            Err(vm_superio::serial::Error::FullFifo) => Ok(0),
            Err(e) => Err(SerialError::Uart(e)),
        }
    }

    /// Free space in the receive FIFO, in bytes.
    pub fn input_space(&self) -> usize {
        self.uart().fifo_capacity()
    }

    /// An EventFd that becomes readable when the guest has drained the
    /// receive FIFO, so an input pump can resume. Read it to re-arm it.
    pub fn input_ready_event(&self) -> &EventFd {
        &self.input_ready
    }

    /// The UART register addressed by a guest access, if the access is a
    /// single byte inside the register window.
    fn register(offset: u64, len: usize) -> Option<u8> {
        if len != 1 || offset >= COM1_LEN {
            return None;
        }
        u8::try_from(offset).ok()
    }
}

impl BusDevice for SerialDevice {
    fn read(&self, offset: u64, data: &mut [u8]) {
        match (Self::register(offset, data.len()), data.first_mut()) {
            (Some(register), Some(byte)) => *byte = self.uart().read(register),
            _ => data.fill(FLOATING_BUS),
        }
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if let (Some(register), Some(&byte)) = (Self::register(offset, data.len()), data.first()) {
            // A failed sink or irqfd loses this byte or interrupt; the guest
            // cannot be told and must not be stalled, so the error is dropped.
            let _ = self.uart().write(register, byte);
        }
    }
}

/// A readable host file descriptor: what [`SerialInput`] pumps from.
pub trait ReadFd: Read + AsRawFd + Send {}

impl<T: Read + AsRawFd + Send> ReadFd for T {}

/// Whether the pump is reading its source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceState {
    /// The source is in the epoll set and read when it becomes readable.
    Watching,
    /// The FIFO is full: the source is out of the epoll set until the guest
    /// drains the FIFO.
    Paused,
    /// The source reached EOF or failed and is unregistered for good.
    Closed,
}

/// Pumps a host input source (any pollable fd: stdin, a pipe, a pty, a
/// socket) into a [`SerialDevice`], as an `event_manager` subscriber.
///
/// It reads only as many bytes as fit in the receive FIFO. When the FIFO is
/// full it stops watching the source, so a source with more input does not
/// make the event loop spin, and resumes when the device's
/// [`input_ready_event`](SerialDevice::input_ready_event) fires. On EOF or an
/// error on the source it unregisters the source and the VM keeps running.
/// A regular file cannot be watched by epoll and is treated as closed.
pub struct SerialInput {
    serial: Arc<SerialDevice>,
    source: Box<dyn ReadFd>,
    state: SourceState,
    /// Bytes read from the source that the FIFO refused (only possible in
    /// loopback mode); delivered before anything else is read.
    pending: Vec<u8>,
}

impl fmt::Debug for SerialInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SerialInput")
            .field("source_fd", &self.source.as_raw_fd())
            .field("state", &self.state)
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl SerialInput {
    /// Creates a pump from `source` into `serial`. Nothing is read until it
    /// is added to an `EventManager`.
    pub fn new(serial: Arc<SerialDevice>, source: Box<dyn ReadFd>) -> Self {
        Self {
            serial,
            source,
            state: SourceState::Watching,
            pending: Vec::new(),
        }
    }

    /// Whether the source hit EOF or an error (or could not be watched) and
    /// no more input will be read from it.
    pub fn is_closed(&self) -> bool {
        self.state == SourceState::Closed
    }

    fn source_events(&self) -> Events {
        Events::new_raw(self.source.as_raw_fd(), EventSet::IN)
    }

    fn input_ready_events(&self) -> Events {
        Events::new(self.serial.input_ready_event(), EventSet::IN)
    }

    /// Hands pending bytes to the FIFO; returns whether none are left.
    fn flush_pending(&mut self) -> bool {
        if self.pending.is_empty() {
            return true;
        }
        match self.serial.enqueue_input(&self.pending) {
            Ok(queued) => {
                self.pending.drain(..queued.min(self.pending.len()));
            }
            // Only a failed interrupt is reported, after the bytes were
            // queued: they are delivered, so forget them.
            Err(_) => self.pending.clear(),
        }
        self.pending.is_empty()
    }

    fn on_source_readable(&mut self, ops: &mut EventOps) {
        if !self.flush_pending() {
            self.pause(ops);
            return;
        }
        let mut buf = [0u8; FIFO_CAPACITY];
        let want = self.serial.input_space().min(buf.len());
        if want == 0 {
            self.pause(ops);
            return;
        }
        match self.source.read(&mut buf[..want]) {
            Ok(0) => self.close(ops),
            Ok(read) => {
                self.pending.extend_from_slice(&buf[..read]);
                // Stop watching as soon as the FIFO is full, rather than wake
                // up once more just to find that out.
                if !self.flush_pending() || self.serial.input_space() == 0 {
                    self.pause(ops);
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => self.close(ops),
        }
    }

    fn on_input_ready(&mut self, ops: &mut EventOps) {
        // Re-arm the eventfd; an empty counter (EAGAIN) is harmless.
        let _ = self.serial.input_ready_event().read();
        if self.state == SourceState::Paused
            && self.flush_pending()
            && self.serial.input_space() > 0
        {
            self.resume(ops);
        }
    }

    fn pause(&mut self, ops: &mut EventOps) {
        if self.state == SourceState::Watching {
            let _ = ops.remove(self.source_events());
            self.state = SourceState::Paused;
        }
    }

    fn resume(&mut self, ops: &mut EventOps) {
        match ops.add(self.source_events()) {
            // Already registered means a failed removal earlier: it is being
            // watched, which is what we want.
            Ok(()) | Err(event_manager::Error::FdAlreadyRegistered) => {
                self.state = SourceState::Watching;
            }
            Err(_) => self.close(ops),
        }
    }

    fn close(&mut self, ops: &mut EventOps) {
        if self.state == SourceState::Watching {
            let _ = ops.remove(self.source_events());
        }
        if self.state != SourceState::Closed {
            let _ = ops.remove(self.input_ready_events());
        }
        self.state = SourceState::Closed;
        self.pending.clear();
    }
}

impl MutEventSubscriber for SerialInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.source.as_raw_fd() {
            if self.state == SourceState::Watching {
                self.on_source_readable(ops);
            }
        } else if fd == self.serial.input_ready_event().as_raw_fd() {
            self.on_input_ready(ops);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Without the wake-up a paused source could never resume, so a pump
        // that cannot watch both fds (the source is a regular file, or another
        // pump already feeds this device) reads nothing at all.
        if ops.add(self.input_ready_events()).is_err() {
            self.state = SourceState::Closed;
            return;
        }
        if ops.add(self.source_events()).is_err() {
            let _ = ops.remove(self.input_ready_events());
            self.state = SourceState::Closed;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use event_manager::{EventManager, SubscriberOps};

    use super::*;
    use crate::console::ConsoleCapture;
    use chitin_seccomp::Seccomp;

    /// UART register offsets (16550A datasheet, table 2).
    const RBR_THR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;
    /// IER bit 1: transmitter holding register empty interrupt.
    const IER_THR_EMPTY: u8 = 0b10;
    /// LSR bit 0: data ready.
    const LSR_DATA_READY: u8 = 0b1;
    /// Generous bound for an event loop iteration that must see an event.
    const RUN_TIMEOUT_MS: i32 = 1000;

    fn nonblocking_eventfd() -> EventFd {
        EventFd::new(EFD_NONBLOCK).unwrap()
    }

    fn serial_with_capture() -> (SerialDevice, ConsoleCapture, EventFd) {
        let capture = ConsoleCapture::default();
        let irq = nonblocking_eventfd();
        let serial =
            SerialDevice::new(irq.try_clone().unwrap(), Box::new(capture.clone())).unwrap();
        (serial, capture, irq)
    }

    fn read_register(serial: &SerialDevice, offset: u64) -> u8 {
        let mut data = [0u8; 1];
        serial.read(offset, &mut data);
        data[0]
    }

    /// Reads the receive buffer until data ready clears.
    fn drain_rbr(serial: &SerialDevice) -> Vec<u8> {
        let mut received = Vec::new();
        while read_register(serial, LSR) & LSR_DATA_READY != 0 {
            received.push(read_register(serial, RBR_THR));
        }
        received
    }

    /// This process's resident memory.
    fn rss_bytes() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    /// `mib` MiB written to THR a byte at a time, as a guest's port writes
    /// reach the device.
    fn flood(serial: &SerialDevice, mib: u64) -> u64 {
        let line: Vec<u8> = (0..64)
            .map(|i| if i == 63 { b'\n' } else { b'x' })
            .collect();
        let total = mib << 20;
        for _ in 0..total / 64 {
            for b in &line {
                serial.write(RBR_THR, std::slice::from_ref(b));
            }
        }
        total
    }

    #[test]
    fn serial_32_mib_into_a_capture_holds_only_its_limit() {
        // 32 MiB: twice what the RSS bound below allows, so a capture that
        // kept everything fails it (a debug build moves a byte at a time).
        let capture = ConsoleCapture::with_limit(1 << 20);
        let serial = SerialDevice::new(nonblocking_eventfd(), Box::new(capture.clone())).unwrap();
        let before = rss_bytes();
        let total = flood(&serial, 32);
        let grown = rss_bytes().saturating_sub(before);
        eprintln!(
            "32 MiB to COM1: capture kept {}, dropped {}, RSS grew {grown} bytes",
            capture.len(),
            capture.dropped()
        );
        assert_eq!(capture.len(), 1 << 20);
        assert_eq!(capture.dropped() + (1 << 20), total);
        // The ring holds at most twice its limit: 2 MiB, 16 MiB with slack.
        assert!(grown < 16 << 20, "RSS grew by {grown} bytes");
    }

    #[test]
    fn serial_16_mib_into_a_buffered_sink_is_written_in_8_kib_batches() {
        #[derive(Clone, Default)]
        struct Counting(Arc<Mutex<(u64, u64)>>);
        impl Write for Counting {
            fn write(&mut self, data: &[u8]) -> io::Result<usize> {
                let mut c = self.0.lock().unwrap();
                *c = (c.0 + 1, c.1 + data.len() as u64);
                Ok(data.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let counting = Counting::default();
        let sink =
            crate::BufferedSink::new(Box::new(counting.clone()), None, Seccomp::Enforce).unwrap();
        let serial = SerialDevice::new(nonblocking_eventfd(), Box::new(sink)).unwrap();
        let total = flood(&serial, 16);
        drop(serial);
        let (writes, bytes) = *counting.0.lock().unwrap();
        eprintln!("16 MiB to COM1 through a buffered sink: {writes} writes for {bytes} bytes");
        assert_eq!(bytes, total);
        // 2 048 full batches, and the few a newline or the timer cut.
        assert!(writes < 2 * 2_048, "{writes} writes");
    }

    /// A writer into a shared buffer, for the sink tests.
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, data: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(data);
            Ok(data.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn buffered_sink_stops_at_its_limit_and_says_so_once() {
        let counting = Arc::new(Mutex::new(Vec::new()));
        let mut sink = crate::BufferedSink::new(
            Box::new(Shared(Arc::clone(&counting))),
            Some(10),
            Seccomp::Enforce,
        )
        .unwrap();
        sink.write_all(b"0123456789abcdef").unwrap();
        sink.write_all(b"more").unwrap();
        drop(sink);
        let notice = "\n[chitin: console output over 10 bytes; the rest is dropped]\n";
        assert_eq!(
            *counting.lock().unwrap(),
            [b"0123456789", notice.as_bytes()].concat()
        );
    }

    #[test]
    fn buffered_sink_writes_a_prompt_without_newline_within_its_delay() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let mut sink =
            crate::BufferedSink::new(Box::new(Shared(Arc::clone(&out))), None, Seccomp::Enforce)
                .unwrap();
        sink.write_all(b"login: ").unwrap();
        // Nothing forces it out but the timer; the sink stays alive.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while out.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(*out.lock().unwrap(), b"login: ");
        drop(sink);
    }

    #[test]
    fn serial_guest_writes_thr_reaches_sink() {
        // Arrange
        let (serial, capture, _irq) = serial_with_capture();

        // Act
        serial.write(RBR_THR, b"h");
        serial.write(RBR_THR, b"i");

        // Assert
        assert_eq!(capture.contents(), b"hi");
    }

    #[test]
    fn serial_thr_empty_interrupt_enabled_raises_irq() {
        // Arrange
        let (serial, _capture, irq) = serial_with_capture();

        // Act
        serial.write(IER, &[IER_THR_EMPTY]);
        serial.write(RBR_THR, b"x");

        // Assert: the THR is always empty, so the interrupt fired.
        assert!(irq.read().unwrap() >= 1);
    }

    #[test]
    fn serial_interrupts_disabled_leaves_irq_quiet() {
        // Arrange
        let (serial, _capture, irq) = serial_with_capture();

        // Act
        serial.write(RBR_THR, b"x");

        // Assert: reading a zero non-blocking eventfd would block.
        assert_eq!(irq.read().unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn serial_host_input_readable_through_rbr() {
        // Arrange
        let (serial, _capture, _irq) = serial_with_capture();

        // Act
        let queued = serial.enqueue_input(b"ok").unwrap();

        // Assert
        assert_eq!(queued, 2);
        assert_ne!(read_register(&serial, LSR) & LSR_DATA_READY, 0);
        assert_eq!(read_register(&serial, RBR_THR), b'o');
        assert_eq!(read_register(&serial, RBR_THR), b'k');
        assert_eq!(read_register(&serial, LSR) & LSR_DATA_READY, 0);
    }

    #[test]
    fn serial_enqueue_beyond_fifo_returns_short_count() {
        // Arrange: 100 bytes is more than the 64-byte FIFO.
        let (serial, _capture, _irq) = serial_with_capture();
        let input = [b'a'; 100];

        // Act
        let first = serial.enqueue_input(&input).unwrap();
        let second = serial.enqueue_input(&input[first..]).unwrap();

        // Assert
        assert_eq!(first, FIFO_CAPACITY);
        assert_eq!(second, 0);
        assert_eq!(serial.input_space(), 0);
    }

    #[test]
    fn serial_guest_drains_fifo_fires_input_ready() {
        // Arrange
        let (serial, _capture, _irq) = serial_with_capture();
        serial.enqueue_input(b"ab").unwrap();
        let before = serial.input_ready_event().read();

        // Act
        let received = drain_rbr(&serial);

        // Assert
        assert_eq!(before.unwrap_err().kind(), io::ErrorKind::WouldBlock);
        assert_eq!(received, b"ab");
        assert!(serial.input_ready_event().read().is_ok());
        assert_eq!(serial.input_space(), FIFO_CAPACITY);
    }

    #[test]
    fn serial_hostile_accesses_read_ff_and_ignore_writes() {
        // Arrange
        let (serial, capture, _irq) = serial_with_capture();
        let mut wide = [0u8; 8];
        let mut far = [0u8; 1];
        let mut empty = [0u8; 0];

        // Act: an offset past the window, an 8-byte access, an empty access,
        // and the largest possible offset.
        serial.read(100, &mut far);
        serial.read(RBR_THR, &mut wide);
        serial.read(RBR_THR, &mut empty);
        serial.write(100, b"x");
        serial.write(RBR_THR, b"12345678");
        serial.write(RBR_THR, b"");
        serial.write(u64::MAX, b"x");

        // Assert
        assert_eq!(far, [0xff]);
        assert_eq!(wide, [0xff; 8]);
        assert!(capture.is_empty());
    }

    /// A pump fed by one end of a socket pair, registered with an event loop.
    struct PumpFixture {
        serial: Arc<SerialDevice>,
        host: UnixStream,
        manager: EventManager<SerialInput>,
        id: event_manager::SubscriberId,
    }

    fn pump_fixture() -> PumpFixture {
        let (serial, _capture, _irq) = serial_with_capture();
        let serial = Arc::new(serial);
        let (host, source) = UnixStream::pair().unwrap();
        let mut manager = EventManager::new().unwrap();
        let id = manager.add_subscriber(SerialInput::new(Arc::clone(&serial), Box::new(source)));
        PumpFixture {
            serial,
            host,
            manager,
            id,
        }
    }

    #[test]
    fn serial_input_source_bytes_reach_rbr() {
        // Arrange
        let mut fixture = pump_fixture();
        fixture.host.write_all(b"abc").unwrap();

        // Act
        let events = fixture.manager.run_with_timeout(RUN_TIMEOUT_MS).unwrap();

        // Assert
        assert_eq!(events, 1);
        assert_eq!(drain_rbr(&fixture.serial), b"abc");
    }

    #[test]
    fn serial_input_full_fifo_pauses_until_guest_drains() {
        // Arrange: 100 bytes, 36 more than the FIFO holds.
        let mut fixture = pump_fixture();
        let input: Vec<u8> = (0..100).collect();
        fixture.host.write_all(&input).unwrap();

        // Act: fill the FIFO, then poll while it stays full.
        fixture.manager.run_with_timeout(RUN_TIMEOUT_MS).unwrap();
        let events_while_full = fixture.manager.run_with_timeout(0).unwrap();
        let first = drain_rbr(&fixture.serial);
        // The drain wakes the pump, which resumes reading the source.
        let wakeups = fixture.manager.run_with_timeout(RUN_TIMEOUT_MS).unwrap();
        fixture.manager.run_with_timeout(RUN_TIMEOUT_MS).unwrap();
        let rest = drain_rbr(&fixture.serial);

        // Assert: nothing was polled while full (no busy loop) and no byte
        // was lost or reordered.
        assert_eq!(events_while_full, 0);
        assert_eq!(wakeups, 1);
        assert_eq!(first, input[..FIFO_CAPACITY]);
        assert_eq!(rest, input[FIFO_CAPACITY..]);
    }

    #[test]
    fn serial_input_source_eof_closes_source() {
        // Arrange
        let mut fixture = pump_fixture();
        drop(fixture.host);

        // Act
        fixture.manager.run_with_timeout(RUN_TIMEOUT_MS).unwrap();
        let events_after_close = fixture.manager.run_with_timeout(0).unwrap();

        // Assert
        let pump = fixture.manager.subscriber_mut(fixture.id).unwrap();
        assert!(pump.is_closed());
        assert_eq!(events_after_close, 0);
    }

    #[test]
    fn serial_input_regular_file_source_is_closed() {
        // Arrange: epoll refuses regular files (EPERM); the test binary is one.
        let (serial, _capture, _irq) = serial_with_capture();
        let file = std::fs::File::open(std::env::current_exe().unwrap()).unwrap();
        let mut manager = EventManager::new().unwrap();

        // Act
        let id = manager.add_subscriber(SerialInput::new(Arc::new(serial), Box::new(file)));

        // Assert
        assert!(manager.subscriber_mut(id).unwrap().is_closed());
        assert_eq!(manager.run_with_timeout(0).unwrap(), 0);
    }
}
