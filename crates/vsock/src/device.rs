//! [`Vsock`]: the virtio-vsock device the transport sees (virtio 1.2
//! §5.10), with its host listener.
//!
//! It owns the listener at `uds_path`, the three queue `EventFd`s and the
//! [`VsockHandler`]; between activate and reset, also the queues, guest
//! memory and interrupt. The event loop reaches it through the `event`
//! module.

use std::io;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chitin_virtio::active::{kick, rearm};
use chitin_virtio::queue::{next_chain, notify, QueueError, QueueRun};
use chitin_virtio::{
    read_config_bytes, ActivateContext, ActivateError, Active, GuestFaults, Severity, VirtioDevice,
};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::backend::UnixBackend;
use crate::handler::{HandlerError, VsockHandler};
use crate::{EVENT_QUEUE, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};

/// Virtio device ID of a socket device (virtio 1.2 §5.10.1).
pub const DEVICE_TYPE_VSOCK: u32 = 19;

/// Bytes of configuration space: `le64 guest_cid`.
pub const CONFIG_LEN: usize = 8;

/// Lowest CID a guest may have: 0-2 are reserved (virtio 1.2 §5.10.4).
pub const MIN_GUEST_CID: u64 = 3;

/// Highest CID a guest may have: only the low 32 bits are used and
/// `0xffffffff` is reserved.
pub const MAX_GUEST_CID: u64 = 0xffff_fffe;

const QUEUE_MAX_SIZES: [u16; 3] = [QUEUE_SIZE; 3];

/// How to set the device up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID, in `3..=0xffff_fffe`.
    pub guest_cid: u64,
    /// Where host processes connect; guest connections to port `P` go to
    /// `<uds_path>_<P>`.
    pub uds_path: PathBuf,
}

/// Why a vsock device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is reserved or does not fit 32 bits.
    #[error("guest CID {0} is outside {MIN_GUEST_CID}..={MAX_GUEST_CID}")]
    InvalidCid(u64),
    /// The listener could not be bound (for instance, the path exists).
    #[error("cannot listen on {}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// What `bind` reported.
        #[source]
        source: io::Error,
    },
    /// The listener could not be made non-blocking.
    #[error("cannot set up the listener")]
    Listener(#[source] io::Error),
    /// A queue notification eventfd could not be created.
    #[error("cannot create a queue notification eventfd")]
    EventFd(#[source] io::Error),
    /// The timer for connection timeouts could not be created.
    #[error("cannot create the connection timeout timer")]
    Timer(#[source] io::Error),
}

/// How often connection timeouts are checked while any may expire.
const REAP_TICK: std::time::Duration = std::time::Duration::from_millis(500);

/// The listener's socket file, removed when this is dropped.
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl SocketFile {
    /// Where the socket file is.
    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A virtio-vsock device with a Firecracker-style Unix socket backend.
pub struct Vsock {
    guest_cid: u64,
    uds_path: PathBuf,
    /// Removes the listener's file with the device, unless the owner took
    /// it ([`Vsock::take_socket_file`]).
    socket_file: Option<SocketFile>,
    listener: UnixListener,
    handler: VsockHandler<UnixBackend>,
    queue_events: [EventFd; 3],
    /// Ticks every [`REAP_TICK`] while a connection runs against a timeout.
    timer: TimerFd,
    timer_armed: bool,
    active: Option<Active<3>>,
    /// Where the transport-reset event of a restore is.
    reset: ResetEvent,
    /// Whether the listener is in the event loop (it is not while host
    /// connections are held).
    listener_registered: bool,
}

/// The transport-reset event a restored device owes its driver. Until the
/// driver has handled it, host connections wait in the listener's backlog:
/// one made at once would reach the guest before the reset and be torn
/// down by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResetEvent {
    /// None owed.
    Idle,
    /// Waiting for an event-queue buffer.
    Pending,
    /// Delivered when the event queue's available index was `avail`: the
    /// driver refills the buffer after handling the event, which moves
    /// it. Host connections wait until then, or until `RESET_GRACE` after
    /// `at` for a driver that does not refill.
    Sent { avail: u16, at: Instant },
}

/// How long host connections wait for a driver to handle the reset event.
const RESET_GRACE: Duration = Duration::from_secs(1);

impl Vsock {
    /// Bind the listener at `uds_path` (which must not exist; it is
    /// removed when the device is dropped, or when the [`SocketFile`]
    /// taken from it is).
    pub fn new(config: VsockConfig) -> Result<Vsock, VsockError> {
        let VsockConfig {
            guest_cid,
            uds_path,
        } = config;
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&guest_cid) {
            return Err(VsockError::InvalidCid(guest_cid));
        }
        let queue_events = [
            EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd)?,
            EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd)?,
            EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd)?,
        ];
        let timer = chitin_virtio::rate_limit::nonblocking_timer().map_err(VsockError::Timer)?;
        let listener = UnixListener::bind(&uds_path).map_err(|source| VsockError::Bind {
            path: uds_path.clone(),
            source,
        })?;
        if let Err(e) = listener.set_nonblocking(true) {
            let _ = std::fs::remove_file(&uds_path);
            return Err(VsockError::Listener(e));
        }
        let mut handler = VsockHandler::new(UnixBackend::new(uds_path.clone()), guest_cid);
        // No driver runs the device until the guest activates it.
        handler.set_driver_ready(false, std::time::Instant::now());
        Ok(Vsock {
            guest_cid,
            handler,
            socket_file: Some(SocketFile(uds_path.clone())),
            uds_path,
            listener,
            queue_events,
            timer,
            timer_armed: false,
            active: None,
            reset: ResetEvent::Idle,
            listener_registered: true,
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Where host processes connect.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Take over removing the listener's socket file: it then goes when
    /// the returned [`SocketFile`] is dropped, not with the device. For an
    /// owner that drops the device on a thread that may not remove files.
    pub fn take_socket_file(&mut self) -> Option<SocketFile> {
        self.socket_file.take()
    }

    /// Connections with a guest port.
    pub fn connection_count(&self) -> usize {
        self.handler.connection_count()
    }

    /// What the guest sent that the device refused or dropped, by reason;
    /// a clone shares the live counts.
    pub fn faults(&self) -> &GuestFaults {
        self.handler.faults()
    }

    /// Keep connection slots for host connections to guest `port` (the
    /// sandbox's agent): see [`VsockHandler::reserve_port`].
    pub fn reserve_port(&mut self, port: u32) {
        self.handler.reserve_port(port);
    }

    pub(crate) fn timer(&self) -> &TimerFd {
        &self.timer
    }

    /// The timer ticked: close what timed out, and end a wait for the
    /// driver to handle the reset event that ran out.
    pub(crate) fn on_timer(&mut self) {
        // Non-blocking: EAGAIN when the tick was cleared meanwhile; the
        // count does not matter.
        let _ = self.timer.wait();
        self.handler.reap(std::time::Instant::now());
        self.check_reset_handled();
    }

    /// Tick while some connection may time out, and only then (an idle
    /// sandbox wakes nobody).
    pub(crate) fn sync_timer(&mut self) {
        let want = self.handler.has_deadlines() || self.holding_host_connections();
        if want == self.timer_armed {
            return;
        }
        let result = if want {
            self.timer.reset(REAP_TICK, Some(REAP_TICK))
        } else {
            self.timer.clear()
        };
        // A timer that cannot be set only delays reaping.
        if result.is_ok() {
            self.timer_armed = want;
        }
    }

    pub(crate) fn listener(&self) -> &UnixListener {
        &self.listener
    }

    pub(crate) fn handler_mut(&mut self) -> &mut VsockHandler<UnixBackend> {
        &mut self.handler
    }

    /// Accept every pending host connection, unless they wait for the
    /// driver to handle a reset.
    pub(crate) fn accept_all(&mut self) {
        if self.holding_host_connections() {
            return;
        }
        // Bounded so a connect storm cannot hold the loop: the listener
        // stays readable and the rest come next iteration.
        for _ in 0..64 {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_ok() {
                        self.handler.add_host_stream(stream);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    /// Run the TX queue (if `tx`) then the RX queue, when active.
    pub(crate) fn process_queues(&mut self, tx: bool) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let (handler, events) = (&mut self.handler, &self.queue_events);
        // The event queue (the third) only carries the reset event
        // (`post_events`).
        active.run(|[rx_queue, tx_queue, _], mem, interrupt| {
            if tx {
                let run = handler.process_tx(tx_queue, mem, interrupt)?;
                rearm(&events[TX_QUEUE], run);
            }
            let run = handler.process_rx(rx_queue, mem, interrupt)?;
            rearm(&events[RX_QUEUE], run);
            Ok::<(), HandlerError>(())
        });
    }

    /// Whether a transport-reset event still waits for an event-queue
    /// buffer.
    pub fn reset_event_pending(&self) -> bool {
        self.reset == ResetEvent::Pending
    }

    /// Whether host connections wait for the driver to handle the reset
    /// event.
    pub fn holding_host_connections(&self) -> bool {
        self.reset != ResetEvent::Idle
    }

    /// Whether the listener should be in the event loop, and whether it
    /// is; the event loop brings the second in line with the first.
    pub(crate) fn listener_interest(&mut self) -> (bool, &mut bool) {
        (
            !self.holding_host_connections(),
            &mut self.listener_registered,
        )
    }

    /// Hand the pending transport-reset event, if any, to the driver in
    /// the next usable buffer of the event queue; a buffer it cannot use
    /// (too short, not writable) goes back empty and is recorded. Without
    /// one the event waits for the driver's next event-queue notification
    /// (asked for, with EVENT_IDX too). At most a queue's worth of
    /// buffers per call: a driver re-posting bad buffers cannot hold the
    /// event loop; the rest come on the next turn. Once the event is
    /// delivered, watch for the driver's refill: the sign it handled it.
    pub(crate) fn post_events(&mut self) {
        self.check_reset_handled();
        if self.reset != ResetEvent::Pending {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let (reset, faults) = (&mut self.reset, self.handler.faults());
        let event = &self.queue_events[EVENT_QUEUE];
        active.run(|[_, _, event_queue], mem, interrupt| {
            let mut run = QueueRun::default();
            while *reset == ResetEvent::Pending {
                if run.completed >= usize::from(QUEUE_SIZE) {
                    run.pending = true;
                    break;
                }
                let Some(chain) = next_chain(event_queue, mem)? else {
                    // Ask for the next buffer, then look once more: one
                    // may have come in between.
                    if event_queue
                        .enable_notification(mem)
                        .map_err(QueueError::Notification)?
                    {
                        continue;
                    }
                    break;
                };
                let head = chain.head_index();
                let used = match write_reset_event(mem, chain) {
                    Ok(()) => EVENT_LEN as u32,
                    Err(why) => {
                        faults.record(Severity::Malformed, "event buffer", &why);
                        0
                    }
                };
                event_queue
                    .add_used(mem, head, used)
                    .map_err(QueueError::UsedRing)?;
                run.completed += 1;
                if used > 0 {
                    let avail = ask_for_next_buffer(event_queue, mem)?;
                    *reset = ResetEvent::Sent {
                        avail,
                        at: Instant::now(),
                    };
                }
            }
            notify(event_queue, mem, interrupt, &mut run)?;
            rearm(event, run);
            Ok::<(), QueueError>(())
        });
    }

    /// After the reset event went out: host connections may go once the
    /// driver refilled the event queue (it handled the event), after
    /// [`RESET_GRACE`] regardless, or at once if the device stopped.
    pub(crate) fn check_reset_handled(&mut self) {
        let ResetEvent::Sent { avail, at } = self.reset else {
            return;
        };
        let Some(active) = self.active.as_mut() else {
            self.reset = ResetEvent::Idle;
            return;
        };
        let mut moved = false;
        active.run(|[_, _, event_queue], mem, _| {
            let now = event_queue
                .avail_idx(mem, Ordering::Acquire)
                .map_err(QueueError::AvailRing)?;
            moved = now.0 != avail;
            Ok::<(), QueueError>(())
        });
        if moved || active.failed() || at.elapsed() >= RESET_GRACE {
            self.reset = ResetEvent::Idle;
        }
    }
}

/// Make the driver notify the next buffer it adds to `queue`, whatever
/// buffers it had already posted: without EVENT_IDX, notifications on;
/// with it, `avail_event` at the current available index (the library's
/// own choice, the device's next index, would wait until the device had
/// taken every posted buffer). Returns that index.
fn ask_for_next_buffer<M: GuestMemory>(queue: &mut Queue, mem: &M) -> Result<u16, QueueError> {
    queue
        .enable_notification(mem)
        .map_err(QueueError::Notification)?;
    let avail = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(QueueError::AvailRing)?
        .0;
    if queue.event_idx_enabled() {
        // avail_event follows the used ring's entries (virtio 1.2 §2.7.10).
        let at = GuestAddress(queue.used_ring())
            .checked_add(4 + 8 * u64::from(queue.size()))
            .ok_or(QueueError::Notification(
                virtio_queue::Error::AddressOverflow,
            ))?;
        mem.write_obj(avail, at)
            .map_err(|e| QueueError::Notification(virtio_queue::Error::GuestMemory(e)))?;
        std::sync::atomic::fence(Ordering::SeqCst);
    }
    Ok(avail)
}

/// Bytes of a `struct virtio_vsock_event` (virtio 1.2 §5.10.6.5): `le32 id`.
const EVENT_LEN: usize = 4;

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: every connection is gone; the
/// driver drops them and reads the guest CID again.
const EVENT_TRANSPORT_RESET: u32 = 0;

/// Write the transport-reset event into the first device-writable
/// descriptor of `chain`.
fn write_reset_event<M: GuestMemory>(
    mem: &M,
    chain: DescriptorChain<&M>,
) -> Result<(), &'static str> {
    let desc = chain
        .writable()
        .next()
        .ok_or("an event buffer with no device-writable descriptor")?;
    if (desc.len() as usize) < EVENT_LEN {
        return Err("an event buffer shorter than an event");
    }
    mem.write_slice(&EVENT_TRANSPORT_RESET.to_le_bytes(), desc.addr())
        .map_err(|_| "an event buffer outside guest memory")
}

impl Drop for Vsock {
    fn drop(&mut self) {
        self.handler.clear();
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX_SIZES
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn device_features(&self) -> u64 {
        // Stream sockets only; VIRTIO_F_VERSION_1 comes from the transport.
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // guest_cid is read-only.
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.active = Some(Active::from_context(ctx)?);
        self.handler
            .set_driver_ready(true, std::time::Instant::now());
        // Look at both data rings once now.
        kick(&self.queue_events[..=TX_QUEUE]);
        Ok(())
    }

    fn queue_positions(&self) -> Option<Vec<(u16, u16)>> {
        self.active.as_ref().map(Active::positions)
    }

    fn snapshot_refusal(&self) -> Option<&'static str> {
        // Connections are host sockets and do not outlive the process; a
        // restored device starts with none and says so (`restored`).
        None
    }

    fn restored(&mut self) {
        // The transport was just activated on the saved rings: the
        // driver's connections have no host side here. The reset event
        // makes it drop them all (connected sockets see ECONNRESET,
        // listeners stay); host connections wait until it has.
        self.handler.clear();
        self.reset = ResetEvent::Pending;
        self.post_events();
    }

    fn reset(&mut self) {
        self.active = None;
        self.reset = ResetEvent::Idle;
        self.handler.clear();
        self.handler
            .set_driver_ready(false, std::time::Instant::now());
        // Closed streams are deregistered from the event loop, then closed,
        // on its next call: make sure there is one.
        let _ = self.queue_events[RX_QUEUE].write(1);
    }
}

#[cfg(test)]
mod tests;
