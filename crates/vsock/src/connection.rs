//! One vsock stream connection: its state, its credit (virtio 1.2
//! §5.10.6.3) and the bytes waiting for the host socket.
//!
//! A [`Connection`] knows nothing about queues: the handler feeds it guest
//! packets ([`Connection::on_guest_rw`] and friends) and asks it for the next
//! packet to give the guest ([`Connection::next_rx`]). The host side is any
//! `Read + Write` non-blocking stream.
//!
//! A guest that sends beyond the credit it was given has broken the
//! protocol (a driver must not, §5.10.6.3), and that connection is reset.
//! The alternatives are worse: pausing the TX queue until the host socket
//! drains would stall every other connection of the guest behind this one,
//! and buffering the excess would let the guest grow host memory at will.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::Instant;

use crate::packet::{Header, Op, MAX_PKT_DATA, SHUTDOWN_SEND};

/// Receive buffer space advertised to the guest per connection: 256 KiB.
/// It bounds the bytes kept for a host socket that does not read.
pub const BUF_ALLOC: u32 = 256 * 1024;

/// Send the guest an `OP_CREDIT_UPDATE` once this many bytes were forwarded
/// to the host since the last advertised `fwd_cnt`.
pub const CREDIT_UPDATE_THRESHOLD: u32 = BUF_ALLOC / 4;

/// Credit accounting of one connection. All counters wrap at `u32`, as the
/// spec's free-running counters do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Credit {
    /// Our receive buffer, advertised in every packet.
    pub buf_alloc: u32,
    /// Guest bytes written to the host socket.
    pub fwd_cnt: u32,
    /// `fwd_cnt` as last advertised to the guest.
    pub last_fwd_cnt_sent: u32,
    /// Guest bytes received.
    pub rx_cnt: u32,
    /// The guest's receive buffer, from its last packet.
    pub peer_buf_alloc: u32,
    /// The guest's `fwd_cnt`, from its last packet.
    pub peer_fwd_cnt: u32,
    /// Bytes sent to the guest.
    pub tx_cnt: u32,
}

impl Credit {
    /// Fresh accounting with our receive buffer of `buf_alloc` bytes and no
    /// credit from the guest yet.
    pub fn new(buf_alloc: u32) -> Self {
        Credit {
            buf_alloc,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            rx_cnt: 0,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
        }
    }

    /// Take the guest's credit information from one of its packets.
    pub fn update_peer(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = header.fwd_cnt;
    }

    /// Bytes we may still send the guest:
    /// `peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`, with the subtraction in
    /// flight wrapping and the result 0 when a guest reports a `fwd_cnt`
    /// ahead of what we sent or shrinks its buffer below what is in flight.
    pub fn peer_free(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// `n` bytes were sent to the guest.
    pub fn record_sent(&mut self, n: u32) {
        self.tx_cnt = self.tx_cnt.wrapping_add(n);
    }

    /// `n` bytes arrived from the guest.
    pub fn record_received(&mut self, n: u32) {
        self.rx_cnt = self.rx_cnt.wrapping_add(n);
    }

    /// `n` guest bytes were written to the host socket.
    pub fn record_forwarded(&mut self, n: u32) {
        self.fwd_cnt = self.fwd_cnt.wrapping_add(n);
    }

    /// Guest bytes received but not yet forwarded.
    pub fn unforwarded(&self) -> u32 {
        self.rx_cnt.wrapping_sub(self.fwd_cnt)
    }

    /// Whether `len` more guest bytes would exceed our buffer: the guest
    /// sent beyond the credit we gave it.
    pub fn would_overflow(&self, len: u32) -> bool {
        u64::from(self.unforwarded()) + u64::from(len) > u64::from(self.buf_alloc)
    }

    /// Put our `buf_alloc` and `fwd_cnt` in an outgoing header.
    pub fn stamp(&mut self, header: &mut Header) {
        header.buf_alloc = self.buf_alloc;
        header.fwd_cnt = self.fwd_cnt;
        self.last_fwd_cnt_sent = self.fwd_cnt;
    }

    /// Whether the guest should hear about forwarded bytes now.
    pub fn needs_update(&self) -> bool {
        self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD
    }
}

/// Which readiness of a host socket the event loop should watch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Interest {
    /// `EPOLLIN`.
    pub read: bool,
    /// `EPOLLOUT`.
    pub write: bool,
}

/// Where a connection stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: `OP_REQUEST` queued or sent, waiting for the guest's
    /// `OP_RESPONSE`.
    Connecting,
    /// Data flows.
    Established,
}

/// What [`Connection::next_rx`] produced for the guest.
#[derive(Debug, PartialEq, Eq)]
pub enum RxOutcome {
    /// Nothing to send now.
    Nothing,
    /// Send this header, with `len` data bytes at the start of the scratch
    /// buffer.
    Packet(Header),
    /// The host socket failed: send this reset and forget the connection.
    Reset(Header),
}

/// Why a guest packet ends a connection with a reset.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The guest sent more than the credit it was given.
    #[error("guest sent {len} bytes beyond its credit")]
    CreditOverflow {
        /// Data length of the packet.
        len: u32,
    },
    /// The packet makes no sense in the connection's state.
    #[error("{op:?} is not valid in state {state:?}")]
    Protocol {
        /// The operation.
        op: Op,
        /// The state.
        state: State,
    },
    /// The host socket failed.
    #[error("host socket failed")]
    Io(#[source] io::Error),
}

/// One stream between a guest port and a host Unix socket.
#[derive(Debug)]
pub struct Connection<S> {
    stream: S,
    guest_cid: u64,
    local_port: u32,
    peer_port: u32,
    state: State,
    credit: Credit,
    /// Guest bytes the host socket did not take yet; at most `buf_alloc`.
    pending: VecDeque<u8>,
    /// The host socket is (or may be) readable and was not drained.
    read_pending: bool,
    /// The host socket reached EOF and the guest was sent SHUTDOWN(SEND).
    host_eof: bool,
    /// The guest will receive no more (SHUTDOWN with RCV).
    guest_shut_rcv: bool,
    /// The guest will send no more (SHUTDOWN with SEND).
    guest_shut_send: bool,
    /// `shutdown(Write)` was done on the host socket.
    write_shut: bool,
    /// The host socket hung up: it is no longer watched.
    hung_up: bool,
    send_request: bool,
    send_response: bool,
    send_credit_update: bool,
    /// When the connection was made (for the connect timeout).
    created: Instant,
    /// When the handler first saw the host peer gone while the guest still
    /// held the connection (for the linger timeout).
    pub(crate) linger_since: Option<Instant>,
    /// Queued in the handler's round-robin.
    pub(crate) in_rr: bool,
    /// What the event loop watches now, `None` when not registered.
    pub(crate) registered: Option<Interest>,
}

impl<S: Read + Write> Connection<S> {
    /// A host-initiated connection from local `local_port` to guest
    /// `peer_port`: an `OP_REQUEST` is queued for the guest.
    pub fn host_initiated(stream: S, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        let mut conn = Self::new(stream, guest_cid, local_port, peer_port, State::Connecting);
        conn.send_request = true;
        conn
    }

    /// A guest-initiated connection whose host socket is connected: an
    /// `OP_RESPONSE` is queued, with the guest's credit from its request.
    pub fn guest_initiated(stream: S, guest_cid: u64, local_port: u32, request: &Header) -> Self {
        let mut conn = Self::new(
            stream,
            guest_cid,
            local_port,
            request.src_port,
            State::Established,
        );
        conn.credit.update_peer(request);
        conn.send_response = true;
        conn
    }

    fn new(stream: S, guest_cid: u64, local_port: u32, peer_port: u32, state: State) -> Self {
        Connection {
            stream,
            guest_cid,
            local_port,
            peer_port,
            state,
            credit: Credit::new(BUF_ALLOC),
            pending: VecDeque::new(),
            read_pending: false,
            host_eof: false,
            guest_shut_rcv: false,
            guest_shut_send: false,
            write_shut: false,
            hung_up: false,
            send_request: false,
            send_response: false,
            send_credit_update: false,
            created: Instant::now(),
            linger_since: None,
            in_rr: false,
            registered: None,
        }
    }

    /// When the connection was made (or its connect deadline restarted).
    pub fn created(&self) -> Instant {
        self.created
    }

    /// Count the connect deadline from `now`.
    pub(crate) fn restart_clock(&mut self, now: Instant) {
        self.created = now;
    }

    /// The host peer closed both directions: the connection can only end.
    pub fn host_gone(&self) -> bool {
        self.hung_up
    }

    /// The host socket.
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// Give up the host socket.
    pub fn into_stream(self) -> S {
        self.stream
    }

    /// The state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The credit accounting.
    pub fn credit(&self) -> &Credit {
        &self.credit
    }

    /// Bytes waiting for the host socket.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// Whether the guest shut down its sending side.
    pub fn guest_shut_send(&self) -> bool {
        self.guest_shut_send
    }

    /// Whether the guest shut down its receiving side.
    pub fn guest_shut_rcv(&self) -> bool {
        self.guest_shut_rcv
    }

    /// Whether the host side reached EOF.
    pub fn host_eof(&self) -> bool {
        self.host_eof
    }

    /// A header for this connection, from the host to the guest.
    pub fn header(&self, op: Op) -> Header {
        Header::host_to_guest(self.guest_cid, self.local_port, self.peer_port, op)
    }

    /// The reset for this connection.
    pub fn rst(&self) -> Header {
        self.header(Op::Rst)
    }

    /// Whether reading the host socket is allowed and useful now.
    fn can_read(&self) -> bool {
        self.state == State::Established && !self.host_eof && !self.guest_shut_rcv
    }

    /// Whether [`Connection::next_rx`] may produce a packet.
    pub fn wants_rx(&self) -> bool {
        self.send_request
            || self.send_response
            || self.send_credit_update
            || (self.read_pending && self.can_read() && self.credit.peer_free() > 0)
    }

    /// What the event loop should watch; `None` once the socket hung up
    /// (`EPOLLHUP` would fire forever; the handler drains it instead).
    pub fn desired_interest(&self) -> Option<Interest> {
        if self.hung_up {
            return None;
        }
        Some(Interest {
            read: self.can_read() && !self.read_pending,
            write: !self.pending.is_empty(),
        })
    }

    /// The host socket is readable (or hung up, `hup`).
    pub fn on_readable(&mut self, hup: bool) {
        self.read_pending = true;
        self.hung_up |= hup;
    }

    /// Every guest packet carries its credit; a credit update may unblock
    /// reading.
    pub fn on_guest_credit(&mut self, header: &Header) {
        self.credit.update_peer(header);
    }

    /// The guest asked for our credit.
    pub fn on_credit_request(&mut self) {
        self.send_credit_update = true;
    }

    /// The guest accepted a host-initiated connection: tell the host
    /// process `OK <local_port>\n`.
    pub fn on_response(&mut self) -> Result<(), ConnectionError> {
        if self.state != State::Connecting || self.send_request {
            return Err(ConnectionError::Protocol {
                op: Op::Response,
                state: self.state,
            });
        }
        let line = crate::host::ok_line(self.local_port);
        // A fresh socket has an empty send buffer: a line this short goes
        // out whole or the peer is gone.
        match self.stream.write(line.as_bytes()) {
            Ok(n) if n == line.len() => {}
            Ok(_) => {
                return Err(ConnectionError::Io(io::Error::from(
                    io::ErrorKind::WriteZero,
                )))
            }
            Err(e) => return Err(ConnectionError::Io(e)),
        }
        self.state = State::Established;
        Ok(())
    }

    /// Guest data: `data` goes to the host socket, or waits in the pending
    /// buffer when the socket would block.
    pub fn on_guest_rw(&mut self, data: &[u8]) -> Result<(), ConnectionError> {
        if self.state != State::Established || self.guest_shut_send {
            return Err(ConnectionError::Protocol {
                op: Op::Rw,
                state: self.state,
            });
        }
        // `data` is at most MAX_PKT_DATA bytes.
        let len = data.len().min(MAX_PKT_DATA as usize) as u32;
        if self.credit.would_overflow(len) {
            return Err(ConnectionError::CreditOverflow { len });
        }
        self.credit.record_received(len);
        self.pending.extend(data);
        self.flush().map_err(ConnectionError::Io)
    }

    /// Guest SHUTDOWN with `flags`. Returns true when both directions are
    /// now shut: the caller answers with a reset and closes.
    pub fn on_guest_shutdown(&mut self, flags: u32) -> Result<bool, ConnectionError> {
        self.guest_shut_rcv |= flags & crate::packet::SHUTDOWN_RCV != 0;
        self.guest_shut_send |= flags & SHUTDOWN_SEND != 0;
        self.flush().map_err(ConnectionError::Io)?;
        if self.guest_shut_rcv && self.guest_shut_send {
            // Answer with RST and close only once the host has every byte
            // the guest sent: closing with bytes still pending (the host
            // reading slower than the guest wrote) lost the tail of the
            // stream in the nested vsock echo test.
            return Ok(self.pending.is_empty());
        }
        Ok(false)
    }

    /// Both directions are shut by the guest and every guest byte reached
    /// the host: the connection can be answered with RST and closed.
    pub fn finished(&self) -> bool {
        self.guest_shut_rcv && self.guest_shut_send && self.pending.is_empty()
    }

    /// Write pending bytes to the host socket until it would block; then,
    /// if the guest will send no more, shut the socket's write side.
    pub fn flush(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
                Ok(n) => {
                    self.pending.drain(..n);
                    // `n <= pending.len() <= BUF_ALLOC`.
                    self.credit.record_forwarded(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.credit.needs_update() {
            self.send_credit_update = true;
        }
        Ok(())
    }

    /// Whether the write side of the host socket should be shut now.
    pub fn should_shut_write(&self) -> bool {
        self.guest_shut_send && self.pending.is_empty() && !self.write_shut
    }

    /// Record that the write side was shut.
    pub fn mark_write_shut(&mut self) {
        self.write_shut = true;
    }

    /// The next packet for the guest, with room for `capacity` data bytes
    /// in `scratch`: a queued control packet, else data read from the host
    /// socket (within the guest's credit), else EOF as SHUTDOWN(SEND), else
    /// a credit update.
    pub fn next_rx(&mut self, scratch: &mut [u8], capacity: usize) -> RxOutcome {
        if self.send_request {
            self.send_request = false;
            return RxOutcome::Packet(self.stamped(Op::Request));
        }
        if self.send_response {
            self.send_response = false;
            return RxOutcome::Packet(self.stamped(Op::Response));
        }
        if self.read_pending && self.can_read() {
            let want = (self.credit.peer_free() as usize)
                .min(capacity)
                .min(scratch.len());
            if want > 0 {
                match self.read_into(&mut scratch[..want]) {
                    Ok(Some(0)) => {
                        self.host_eof = true;
                        self.read_pending = false;
                        let mut header = self.stamped(Op::Shutdown);
                        header.flags = SHUTDOWN_SEND;
                        return RxOutcome::Packet(header);
                    }
                    Ok(Some(n)) => {
                        let mut header = self.stamped(Op::Rw);
                        // `n <= want <= MAX_PKT_DATA`.
                        header.len = n as u32;
                        self.credit.record_sent(header.len);
                        return RxOutcome::Packet(header);
                    }
                    Ok(None) => self.read_pending = false,
                    Err(_) => return RxOutcome::Reset(self.rst()),
                }
            }
        }
        if self.send_credit_update {
            return RxOutcome::Packet(self.stamped(Op::CreditUpdate));
        }
        RxOutcome::Nothing
    }

    /// A header for `op` carrying our credit; any packet is a credit update.
    fn stamped(&mut self, op: Op) -> Header {
        let mut header = self.header(op);
        self.credit.stamp(&mut header);
        self.send_credit_update = false;
        header
    }

    /// `Some(n)` bytes read (0 at EOF), `None` when it would block.
    fn read_into(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match self.stream.read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests;
