//! The vsock queue loops and connection table: [`VsockHandler`].
//!
//! It is generic over the [`VsockBackend`] (where guest connections go) and
//! over the interrupt, so tests drive it with socket pairs and hand-built
//! queues, no KVM and no event loop. The event loop tells it which host
//! sockets are ready ([`VsockHandler::stream_event`]) and applies the
//! interest it asks for ([`VsockHandler::sync_interest`]).
//!
//! Policy for guest packets (virtio 1.2 §5.10.6):
//! - a chain [`packet::parse_tx`] refuses is returned unused; if its header
//!   is readable and it is not itself a reset, the guest gets a reset for it;
//! - a wrong CID, a type other than STREAM, an unknown op, or a packet for
//!   a connection that does not exist gets a reset (a reset never does);
//! - a connection whose guest breaks the protocol or its credit is reset.
//!
//! Every one of these is counted in the handler's [`GuestFaults`] with its
//! reason and logged (rate-limited), so a stream that stalls because the
//! device refused what the guest sent says why.
//!
//! RX fairness: connections with something to send wait in a round-robin
//! queue; each RX buffer goes to the next one, which goes to the back if it
//! has more. Resets for unknown connections go first.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use chitin_virtio::queue::{drain, has_available, next_chain, notify};
use chitin_virtio::{GuestFaults, Severity, VirtioInterrupt};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use crate::backend::{VsockBackend, VsockStream};
use crate::connection::{Connection, ConnectionError, Interest, RxOutcome, State};
use crate::host::parse_connect_line;
use crate::packet::{self, Direction, Header, Op, HEADER_LEN, HOST_CID, MAX_PKT_DATA, TYPE_STREAM};

/// Most connections (established, connecting, or waiting for their
/// `CONNECT` line) at once; more host connections are closed on accept and
/// more guest requests are reset.
pub const MAX_CONNECTIONS: usize = 1024;

/// Most queued resets for packets to unknown connections; beyond, they are
/// dropped. Resets of live connections the device closes are always
/// queued: there are at most [`MAX_CONNECTIONS`] of them on top.
pub const MAX_PENDING_RESETS: usize = 2 * MAX_CONNECTIONS;

/// Most chains one `process_*` call handles before it yields.
pub const MAX_CHAINS_PER_RUN: usize = 128;

/// Longest `CONNECT <port>\n` line, newline included.
pub const MAX_CONNECT_LINE: usize = 32;

/// Most host streams waiting for their `CONNECT` line at once; more are
/// closed on accept. With [`MAX_CONNECTIONS`] this bounds the sockets one
/// device holds open.
pub const MAX_ACCEPTING: usize = 64;

/// Connections kept for the reserved port (the sandbox's agent): others
/// may hold at most [`MAX_CONNECTIONS`] minus this many.
pub const RESERVED_SLOTS: usize = 16;

/// How long a host-initiated connection waits for the guest's
/// `OP_RESPONSE`, and a host stream for its `CONNECT` line, before it is
/// reset and closed (Firecracker gives up after 2 s too).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a host-initiated connection waits while the guest has no
/// driver running the device (the guest is still booting, or loads its
/// vsock module late): [`CONNECT_TIMEOUT`] starts only once the driver
/// is up, so a host that connects early is answered as soon as the guest
/// can; this bounds the wait for a guest whose driver never comes.
pub const DRIVER_WAIT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a connection whose host peer has gone (both directions
/// closed) and whose data all reached the guest (with SHUTDOWN after it)
/// waits for the guest to close its end before it is reset.
pub const LINGER_TIMEOUT: Duration = Duration::from_secs(2);

/// How long such a connection may still hold host data the guest does not
/// take (no credit, no RX buffers, its receive side shut) before it is
/// reset all the same.
pub const STUCK_TIMEOUT: Duration = Duration::from_secs(10);

/// First host port handed to host-initiated connections.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// (local host port, guest port).
pub type ConnKey = (u32, u32);

/// Why a queue became unusable; the device must be reset.
pub use chitin_virtio::queue::QueueError as HandlerError;
pub use chitin_virtio::queue::QueueRun;

/// How much state a handler holds: every collection the guest can make
/// grow, for checks that each stays within its cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandlerSizes {
    /// Connections (connecting or established).
    pub connections: usize,
    /// Host streams waiting for their `CONNECT` line.
    pub accepting: usize,
    /// Entries in the RX round-robin.
    pub round_robin: usize,
    /// Resets waiting for RX buffers.
    pub resets: usize,
    /// Guest bytes held for host sockets that did not take them yet.
    pub pending_bytes: usize,
}

impl HandlerSizes {
    /// Whether every collection is within its cap: connections within
    /// [`MAX_CONNECTIONS`], streams within [`MAX_ACCEPTING`], the
    /// round-robin at most one entry per connection, resets within
    /// [`MAX_PENDING_RESETS`] plus one per connection, and pending bytes
    /// within the buffer each connection advertised.
    pub fn within_caps(&self) -> bool {
        self.connections <= MAX_CONNECTIONS
            && self.accepting <= MAX_ACCEPTING
            && self.round_robin <= self.connections
            && self.resets <= MAX_PENDING_RESETS + MAX_CONNECTIONS
            && self.pending_bytes <= self.connections * crate::connection::BUF_ALLOC as usize
    }
}

/// A host stream waiting for its `CONNECT <port>\n` line.
struct Accepting<S> {
    stream: S,
    line: [u8; MAX_CONNECT_LINE],
    len: usize,
    registered: Option<Interest>,
    since: Instant,
}

/// Runs the vsock queues and the connections of one device.
pub struct VsockHandler<B: VsockBackend> {
    backend: B,
    guest_cid: u64,
    conns: HashMap<ConnKey, Connection<B::Stream>>,
    by_fd: HashMap<RawFd, ConnKey>,
    accepting: HashMap<RawFd, Accepting<B::Stream>>,
    rr: VecDeque<ConnKey>,
    resets: VecDeque<Header>,
    /// Closed streams still registered with the event loop.
    graveyard: Vec<(B::Stream, Option<Interest>)>,
    next_local_port: u32,
    /// Host connections to this guest port may use the reserved slots.
    reserved_port: Option<u32>,
    scratch: Box<[u8]>,
    faults: GuestFaults,
    /// Whether the guest's driver runs the device: until it does, host
    /// connections wait up to [`DRIVER_WAIT_TIMEOUT`] instead of
    /// [`CONNECT_TIMEOUT`].
    driver_ready: bool,
}

impl<B: VsockBackend> VsockHandler<B> {
    /// A handler for a guest with `guest_cid` and no connections.
    pub fn new(backend: B, guest_cid: u64) -> Self {
        VsockHandler {
            backend,
            guest_cid,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            accepting: HashMap::new(),
            rr: VecDeque::new(),
            resets: VecDeque::new(),
            graveyard: Vec::new(),
            next_local_port: FIRST_LOCAL_PORT,
            reserved_port: None,
            scratch: vec![0u8; MAX_PKT_DATA as usize].into_boxed_slice(),
            faults: GuestFaults::new("vsock"),
            driver_ready: true,
        }
    }

    /// Tell the handler whether the guest's driver runs the device (the
    /// device calls this on activation and reset). When it starts, the
    /// connect deadline of every host connection still waiting restarts
    /// at `now`: the time before counts as the guest's boot, not as a
    /// guest that does not answer.
    pub fn set_driver_ready(&mut self, ready: bool, now: Instant) {
        if ready && !self.driver_ready {
            for conn in self.conns.values_mut() {
                if conn.state() == State::Connecting {
                    conn.restart_clock(now);
                }
            }
        }
        self.driver_ready = ready;
    }

    /// Keep [`RESERVED_SLOTS`] connections for host connections to guest
    /// `port` (the sandbox's agent), so guest programs that hold every
    /// other slot cannot lock it out.
    pub fn reserve_port(&mut self, port: u32) {
        self.reserved_port = Some(port);
    }

    /// Whether a new connection to guest `port` fits now.
    fn has_room(&self, port: Option<u32>) -> bool {
        let limit = if port.is_some() && port == self.reserved_port {
            MAX_CONNECTIONS
        } else {
            MAX_CONNECTIONS - RESERVED_SLOTS
        };
        self.conns.len() < limit
    }

    /// Whether any connection or host stream runs against a timeout (the
    /// event loop then calls [`VsockHandler::reap`] now and then).
    pub fn has_deadlines(&self) -> bool {
        !self.accepting.is_empty()
            || self
                .conns
                .values()
                .any(|c| c.state() == State::Connecting || c.host_gone())
    }

    /// Reset and close what waited too long at `now`: host-initiated
    /// connections the guest never answered and host streams that never
    /// sent their `CONNECT` line ([`CONNECT_TIMEOUT`]), and connections
    /// whose host peer is gone while the guest keeps its end
    /// ([`LINGER_TIMEOUT`] once the guest has all the data,
    /// [`STUCK_TIMEOUT`] while it does not take it). Returns how many were
    /// closed.
    pub fn reap(&mut self, now: Instant) -> usize {
        let late = |since: Instant, limit: Duration| now.saturating_duration_since(since) >= limit;
        let stale: Vec<RawFd> = self
            .accepting
            .iter()
            .filter(|(_, acc)| late(acc.since, CONNECT_TIMEOUT))
            .map(|(&fd, _)| fd)
            .collect();
        let mut closed = stale.len();
        for fd in stale {
            if let Some(acc) = self.accepting.remove(&fd) {
                let _ = acc.stream.shutdown(Shutdown::Both);
                self.graveyard.push((acc.stream, acc.registered));
            }
        }
        let mut expired = Vec::new();
        let (answer_limit, answer_reason) = if self.driver_ready {
            (
                CONNECT_TIMEOUT,
                "connect timed out: the guest never answered",
            )
        } else {
            (
                DRIVER_WAIT_TIMEOUT,
                "connect timed out: the guest's driver never started",
            )
        };
        for (&key, conn) in self.conns.iter_mut() {
            if conn.state() == State::Connecting && late(conn.created(), answer_limit) {
                expired.push((key, answer_reason));
            } else if conn.host_gone() {
                let limit = if conn.host_eof() {
                    LINGER_TIMEOUT
                } else {
                    STUCK_TIMEOUT
                };
                match conn.linger_since {
                    None => conn.linger_since = Some(now),
                    Some(since) if late(since, limit) => {
                        expired.push((key, "close timed out: the guest kept a closed connection"));
                    }
                    Some(_) => {}
                }
            }
        }
        closed += expired.len();
        for (key, reason) in expired {
            self.faults.record(
                Severity::Limit,
                reason,
                &format_args!("host port {} guest port {}", key.0, key.1),
            );
            let rst = conn_rst(&self.conns, key);
            self.close(key, rst);
        }
        closed
    }

    /// What the guest sent that this device refused or dropped, by reason.
    pub fn faults(&self) -> &GuestFaults {
        &self.faults
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// Connections with a guest port (connecting or established).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Host streams still waiting for their `CONNECT` line.
    pub fn accepting_count(&self) -> usize {
        self.accepting.len()
    }

    /// The size of every collection the guest can make grow.
    pub fn sizes(&self) -> HandlerSizes {
        HandlerSizes {
            connections: self.conns.len(),
            accepting: self.accepting.len(),
            round_robin: self.rr.len(),
            resets: self.resets.len(),
            pending_bytes: self.conns.values().map(Connection::pending_len).sum(),
        }
    }

    /// Every host socket the handler holds (connections and streams
    /// waiting for their `CONNECT` line), as the event loop watches them.
    pub fn stream_fds(&self) -> Vec<RawFd> {
        self.accepting
            .keys()
            .copied()
            .chain(self.by_fd.keys().copied())
            .collect()
    }

    /// The connection between host `local_port` and guest `peer_port`.
    pub fn connection(&self, local_port: u32, peer_port: u32) -> Option<&Connection<B::Stream>> {
        self.conns.get(&(local_port, peer_port))
    }

    /// Whether an RX buffer would be used now.
    pub fn has_rx_work(&self) -> bool {
        !self.resets.is_empty() || !self.rr.is_empty()
    }

    /// A host process connected to the listener; it must send its
    /// `CONNECT` line next. Returns false (and closes it) at capacity.
    pub fn add_host_stream(&mut self, stream: B::Stream) -> bool {
        // Which port it wants is not known yet: it may be the reserved one.
        if self.accepting.len() >= MAX_ACCEPTING || self.conns.len() >= MAX_CONNECTIONS {
            let _ = stream.shutdown(Shutdown::Both);
            return false;
        }
        let fd = stream.as_raw_fd();
        self.accepting.insert(
            fd,
            Accepting {
                stream,
                line: [0; MAX_CONNECT_LINE],
                len: 0,
                registered: None,
                since: Instant::now(),
            },
        );
        // Data may already be there.
        self.read_connect_line(fd);
        true
    }

    /// The host socket `fd` is ready. Unknown descriptors are ignored.
    pub fn stream_event(
        &mut self,
        fd: RawFd,
        readable: bool,
        writable: bool,
        hangup: bool,
        error: bool,
    ) {
        if self.accepting.contains_key(&fd) {
            self.read_connect_line(fd);
            return;
        }
        let Some(&key) = self.by_fd.get(&fd) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if error {
            let rst = conn.rst();
            self.close(key, Some(rst));
            return;
        }
        if writable {
            if let Err(_e) = conn.flush() {
                let rst = conn.rst();
                self.close(key, Some(rst));
                return;
            }
            if conn.finished() {
                // The guest shut both directions earlier; its last bytes
                // have now reached the host.
                let rst = conn.rst();
                self.close(key, Some(rst));
                return;
            }
            self.shut_write_if_done(key);
        }
        if readable || hangup {
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.on_readable(hangup);
            }
        }
        self.schedule(key);
    }

    /// Put `key` in the RX round-robin if it has something to send.
    fn schedule(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.in_rr && conn.wants_rx() {
                conn.in_rr = true;
                self.rr.push_back(key);
            }
        }
    }

    fn shut_write_if_done(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if conn.should_shut_write() {
                let _ = conn.stream().shutdown(Shutdown::Write);
                conn.mark_write_shut();
            }
        }
    }

    /// Read the `CONNECT` line byte by byte (so no connection data is
    /// consumed), then start the connection or close the stream.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(acc) = self.accepting.get_mut(&fd) else {
            return;
        };
        let port = loop {
            let mut byte = [0u8; 1];
            match io::Read::read(&mut acc.stream, &mut byte) {
                Ok(0) => break None,
                Ok(_) => {
                    if acc.len >= MAX_CONNECT_LINE {
                        break None;
                    }
                    acc.line[acc.len] = byte[0];
                    acc.len += 1;
                    if byte[0] == b'\n' {
                        break parse_connect_line(&acc.line[..acc.len]);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break None,
            }
        };
        let Some(acc) = self.accepting.remove(&fd) else {
            return;
        };
        let local_port = match port {
            Some(port) if self.has_room(Some(port)) => self.allocate_local_port(port),
            _ => None,
        };
        match (port, local_port) {
            (Some(peer_port), Some(local_port)) => {
                // The stream stays registered under the same fd.
                let mut conn =
                    Connection::host_initiated(acc.stream, self.guest_cid, local_port, peer_port);
                conn.registered = acc.registered;
                let key = (local_port, peer_port);
                self.by_fd.insert(fd, key);
                self.conns.insert(key, conn);
                self.schedule(key);
            }
            _ => {
                let _ = acc.stream.shutdown(Shutdown::Both);
                self.graveyard.push((acc.stream, acc.registered));
            }
        }
    }

    /// A host port not used with `peer_port`.
    fn allocate_local_port(&mut self, peer_port: u32) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_local_port;
            self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&(port, peer_port)) {
                return Some(port);
            }
        }
        None
    }

    /// Forget connection `key`, closing its stream, and queue `rst`.
    fn close(&mut self, key: ConnKey, rst: Option<Header>) {
        if let Some(conn) = self.conns.remove(&key) {
            if conn.in_rr {
                // A later connection on the same ports must not find a
                // stale entry, or each REQUEST/RST cycle of a guest that
                // posts no RX buffers would grow the round-robin for ever.
                self.rr.retain(|k| *k != key);
            }
            let fd = conn.stream().as_raw_fd();
            self.by_fd.remove(&fd);
            let registered = conn.registered;
            let stream = conn.into_stream();
            let _ = stream.shutdown(Shutdown::Both);
            self.graveyard.push((stream, registered));
        }
        if let Some(rst) = rst {
            self.queue_reset(rst, true);
        }
    }

    /// Queue `rst` for the guest. Resets of connections that existed
    /// (`known`) always go in; the rest only up to [`MAX_PENDING_RESETS`].
    fn queue_reset(&mut self, rst: Header, known: bool) {
        let limit = if known {
            MAX_PENDING_RESETS + MAX_CONNECTIONS
        } else {
            MAX_PENDING_RESETS
        };
        if self.resets.len() < limit {
            self.resets.push_back(rst);
        } else {
            self.faults.record(
                Severity::Limit,
                "reset not sent: too many pending",
                &format_args!("{} resets wait for RX buffers", self.resets.len()),
            );
        }
    }

    /// Close every connection and forget all state (device reset). The
    /// streams are shut down now and closed at the next
    /// [`VsockHandler::sync_interest`].
    pub fn clear(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.close(key, None);
        }
        for (_, acc) in self.accepting.drain() {
            let _ = acc.stream.shutdown(Shutdown::Both);
            self.graveyard.push((acc.stream, acc.registered));
        }
        self.rr.clear();
        self.resets.clear();
        self.by_fd.clear();
    }

    /// Bring the event loop's registrations up to date: `update(fd, old,
    /// new)` is called for every stream whose interest changed (`None`:
    /// not registered). Closed streams get `new == None` and are dropped
    /// (closed) right after.
    pub fn sync_interest(
        &mut self,
        mut update: impl FnMut(RawFd, Option<Interest>, Option<Interest>),
    ) {
        for (stream, registered) in self.graveyard.drain(..) {
            if registered.is_some() {
                update(stream.as_raw_fd(), registered, None);
            }
        }
        for acc in self.accepting.values_mut() {
            let desired = Some(Interest {
                read: true,
                write: false,
            });
            if acc.registered != desired {
                update(acc.stream.as_raw_fd(), acc.registered, desired);
                acc.registered = desired;
            }
        }
        for conn in self.conns.values_mut() {
            let desired = conn.desired_interest();
            if conn.registered != desired {
                update(conn.stream().as_raw_fd(), conn.registered, desired);
                conn.registered = desired;
            }
        }
    }

    /// Drain the TX queue: handle each guest packet, return its chain, and
    /// interrupt the driver if it wants to hear about it.
    pub fn process_tx<I>(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        interrupt: &I,
    ) -> Result<QueueRun, HandlerError>
    where
        I: VirtioInterrupt + ?Sized,
    {
        let more = |run: &QueueRun| run.completed < MAX_CHAINS_PER_RUN;
        drain(queue, mem, interrupt, more, |chain| {
            match packet::parse_tx(mem, chain, &mut self.scratch) {
                Ok(pkt) => self.handle_guest_packet(pkt.header(), pkt.data_len()),
                Err(refused) => {
                    let reason = refused.error.reason(Direction::Tx);
                    match &refused.header {
                        Some(h) => self.faults.record(
                            Severity::Malformed,
                            reason,
                            &format_args!("{} (packet {})", refused.error, Brief(h)),
                        ),
                        None => self
                            .faults
                            .record(Severity::Malformed, reason, &refused.error),
                    }
                    if let Some(header) = refused.header {
                        self.refuse(&header);
                    }
                }
            }
            0
        })
    }

    /// Fill RX buffers with what connections have to send, round-robin, and
    /// interrupt the driver if it wants to hear about it.
    pub fn process_rx<I>(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        interrupt: &I,
    ) -> Result<QueueRun, HandlerError>
    where
        I: VirtioInterrupt + ?Sized,
    {
        let mut run = QueueRun::default();
        // An RX queue the driver never made ready has no rings to touch.
        if !self.has_rx_work() || !queue.ready() {
            return Ok(run);
        }
        loop {
            queue
                .disable_notification(mem)
                .map_err(HandlerError::Notification)?;
            let mut starved = false;
            loop {
                if !self.has_rx_work() {
                    break;
                }
                if run.completed >= MAX_CHAINS_PER_RUN {
                    run.pending = has_available(queue, mem)?;
                    break;
                }
                let Some(chain) = next_chain(queue, mem)? else {
                    starved = true;
                    break;
                };
                let head = chain.head_index();
                let used = match packet::parse_rx(mem, chain) {
                    // A buffer the device cannot use goes back empty.
                    Err(e) => {
                        self.faults
                            .record(Severity::Malformed, e.reason(Direction::Rx), &e);
                        0
                    }
                    Ok(mut buffer) => match self.fill_rx(&mut buffer) {
                        Some(used) => used,
                        None => {
                            queue.go_to_previous_position();
                            break;
                        }
                    },
                };
                queue
                    .add_used(mem, head, used)
                    .map_err(HandlerError::UsedRing)?;
                run.completed += 1;
            }
            let more = queue
                .enable_notification(mem)
                .map_err(HandlerError::Notification)?;
            if !(more && starved && self.has_rx_work()) {
                break;
            }
        }
        notify(queue, mem, interrupt, &mut run)?;
        Ok(run)
    }

    /// Write the next packet into `buffer`; `None` when nobody had
    /// anything after all.
    fn fill_rx(&mut self, buffer: &mut packet::RxBuffer<'_, GuestMemoryMmap>) -> Option<u32> {
        if let Some(rst) = self.resets.pop_front() {
            return Some(self.write_control(buffer, &rst));
        }
        let capacity = buffer.capacity();
        // Connections with data but nothing for a buffer without data room.
        let mut starved = Vec::new();
        let used = self.fill_from_connections(buffer, capacity, &mut starved);
        let had_starved = !starved.is_empty();
        for key in starved {
            self.schedule(key);
        }
        match used {
            Some(used) => Some(used),
            // Nothing fits this buffer, but data waits: give it back empty
            // rather than block the ring on it forever.
            None if had_starved => {
                self.faults.record(
                    Severity::Allowed,
                    "rx buffer: no room for data",
                    &format_args!("a buffer of {HEADER_LEN} bytes while data waits"),
                );
                Some(0)
            }
            None => None,
        }
    }

    /// The round-robin part of [`VsockHandler::fill_rx`]; connections that
    /// want to send data a buffer of `capacity` 0 cannot take go to
    /// `starved` (out of the round-robin until the caller puts them back).
    fn fill_from_connections(
        &mut self,
        buffer: &mut packet::RxBuffer<'_, GuestMemoryMmap>,
        capacity: usize,
        starved: &mut Vec<ConnKey>,
    ) -> Option<u32> {
        while let Some(key) = self.rr.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rr = false;
            match conn.next_rx(&mut self.scratch, capacity) {
                RxOutcome::Nothing => {
                    if capacity == 0 && conn.wants_rx() {
                        starved.push(key);
                    }
                    continue;
                }
                RxOutcome::Reset(rst) => {
                    self.close(key, None);
                    return Some(self.write_control(buffer, &rst));
                }
                RxOutcome::Packet(header) => {
                    let data = &self.scratch[..header.len as usize];
                    let written = buffer
                        .write_data(data)
                        .and_then(|()| buffer.write_header(&header));
                    match written {
                        Ok(used) => {
                            self.schedule(key);
                            return Some(used);
                        }
                        Err(e) => {
                            // The bytes left the host socket and cannot be
                            // delivered: the stream is broken, reset it.
                            self.faults.record(
                                Severity::Malformed,
                                e.reason(Direction::Rx),
                                &format_args!("{e}; connection {} reset", Brief(&header)),
                            );
                            let rst = conn_rst(&self.conns, key);
                            self.close(key, rst);
                            return Some(0);
                        }
                    }
                }
            }
        }
        None
    }

    /// Write a packet without data (a reset); the used length, 0 if the
    /// buffer could not take it.
    fn write_control(
        &mut self,
        buffer: &mut packet::RxBuffer<'_, GuestMemoryMmap>,
        header: &Header,
    ) -> u32 {
        match buffer.write_header(header) {
            Ok(used) => used,
            Err(e) => {
                self.faults.record(
                    Severity::Malformed,
                    e.reason(Direction::Rx),
                    &format_args!("{e}; {} not delivered", Brief(header)),
                );
                0
            }
        }
    }

    /// Reset the sender of a packet we cannot handle, unless it is itself
    /// a reset (virtio 1.2 §5.10.6.3: never answer RST with RST).
    ///
    /// A packet not between this guest and the host is dropped. A refused
    /// packet of a live connection ends that connection: the guest gets the
    /// reset and the host socket is closed, so neither side waits on a
    /// stream whose bytes were dropped.
    fn refuse(&mut self, header: &Header) {
        if header.op == Op::Rst as u16
            || header.src_cid != self.guest_cid
            || header.dst_cid != HOST_CID
        {
            return;
        }
        let key = (header.dst_port, header.src_port);
        if let Some(rst) = conn_rst(&self.conns, key) {
            self.close(key, Some(rst));
            return;
        }
        let rst = Header::host_to_guest(self.guest_cid, header.dst_port, header.src_port, Op::Rst);
        self.queue_reset(rst, false);
    }

    /// One well-formed TX packet with `len` data bytes in the scratch
    /// buffer.
    fn handle_guest_packet(&mut self, header: &Header, len: usize) {
        let wrong = if header.src_cid != self.guest_cid || header.dst_cid != HOST_CID {
            Some("wrong CID")
        } else if header.type_ != TYPE_STREAM {
            Some("unsupported socket type")
        } else if header.op().is_none() {
            Some("unknown operation")
        } else {
            None
        };
        if let Some(reason) = wrong {
            self.faults
                .record(Severity::Malformed, reason, &Brief(header));
            self.refuse(header);
            return;
        }
        let Some(op) = header.op() else {
            return;
        };
        let key = (header.dst_port, header.src_port);
        if op == Op::Request {
            self.guest_connect(header);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            // Also what a guest does in a race with a host close; a reset
            // never gets an answer, so that is not counted.
            if op != Op::Rst {
                self.faults
                    .record(Severity::Allowed, "no such connection", &Brief(header));
            }
            self.refuse(header);
            return;
        };
        conn.on_guest_credit(header);
        let result = match op {
            Op::Request => Ok(false),
            Op::Rst => {
                self.close(key, None);
                return;
            }
            Op::Response => conn.on_response().map(|()| false),
            Op::Rw => conn.on_guest_rw(&self.scratch[..len]).map(|()| false),
            Op::CreditUpdate => Ok(false),
            Op::CreditRequest => {
                conn.on_credit_request();
                Ok(false)
            }
            Op::Shutdown => conn.on_guest_shutdown(header.flags),
        };
        match result {
            Ok(false) => {
                self.shut_write_if_done(key);
                self.schedule(key);
            }
            Ok(true) => {
                let rst = conn_rst(&self.conns, key);
                self.close(key, rst);
            }
            Err(e) => {
                // A host socket failing is not the guest's fault.
                let reason = match &e {
                    ConnectionError::CreditOverflow { .. } => Some("credit exceeded"),
                    ConnectionError::Protocol { .. } => Some("protocol violation"),
                    ConnectionError::Io(_) => None,
                };
                if let Some(reason) = reason {
                    self.faults.record(
                        Severity::Malformed,
                        reason,
                        &format_args!("{e}; connection {} reset", Brief(header)),
                    );
                }
                let rst = conn_rst(&self.conns, key);
                self.close(key, rst);
            }
        }
    }

    /// The guest connects to host port `header.dst_port`.
    fn guest_connect(&mut self, header: &Header) {
        let key = (header.dst_port, header.src_port);
        if self.conns.contains_key(&key) {
            // A second request for a live connection: reset both.
            self.faults.record(
                Severity::Malformed,
                "request for a live connection",
                &Brief(header),
            );
            let rst = conn_rst(&self.conns, key);
            self.close(key, rst);
            return;
        }
        if !self.has_room(None) {
            self.faults.record(
                Severity::Limit,
                "connection limit reached",
                &format_args!(
                    "{} connections open; {} refused",
                    self.conns.len(),
                    Brief(header)
                ),
            );
            self.refuse(header);
            return;
        }
        match self.backend.connect(header.dst_port) {
            Ok(stream) => {
                let fd = stream.as_raw_fd();
                let conn =
                    Connection::guest_initiated(stream, self.guest_cid, header.dst_port, header);
                self.by_fd.insert(fd, key);
                self.conns.insert(key, conn);
                self.schedule(key);
            }
            Err(_) => self.refuse(header),
        }
    }
}

impl<B: VsockBackend> Drop for VsockHandler<B> {
    fn drop(&mut self) {
        self.clear();
    }
}

/// The reset for connection `key`, if it still exists.
fn conn_rst<S: io::Read + io::Write>(
    conns: &HashMap<ConnKey, Connection<S>>,
    key: ConnKey,
) -> Option<Header> {
    conns.get(&key).map(Connection::rst)
}

/// A header as a log line shows it: ports, op and length.
struct Brief<'a>(&'a Header);

impl std::fmt::Display for Brief<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = self.0;
        write!(
            f,
            "{}:{} -> {}:{} op {} len {}",
            h.src_cid, h.src_port, h.dst_cid, h.dst_port, h.op, h.len
        )
    }
}

#[cfg(test)]
mod tests;
