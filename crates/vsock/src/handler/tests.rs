use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use chitin_virtio::test_utils::{RecordingInterrupt, TestDescriptor};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::connection::{State, BUF_ALLOC};
use crate::packet::{SHUTDOWN_RCV, SHUTDOWN_SEND};
use crate::test_utils::{Guest, PairBackend, GUEST_CID};

const GUEST_PORT: u32 = 1000;
const HOST_PORT: u32 = 52;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;

struct Harness {
    guest: Guest,
    handler: VsockHandler<PairBackend>,
    rx: Queue,
    tx: Queue,
    interrupt: RecordingInterrupt,
}

impl Harness {
    /// 64 ordinary RX buffers posted.
    fn new() -> Self {
        let mut h = Harness::bare();
        h.guest.post_rx(64);
        h
    }

    /// No RX buffers yet: the test posts its own.
    fn bare() -> Self {
        let guest = Guest::new();
        let mut queues = guest.queues();
        let tx = queues.remove(1);
        let rx = queues.remove(0);
        Harness {
            guest,
            handler: VsockHandler::new(PairBackend::default(), GUEST_CID),
            rx,
            tx,
            interrupt: RecordingInterrupt::new(),
        }
    }

    fn run(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mem = self.guest.mem.clone();
        self.handler
            .process_tx(&mut self.tx, &mem, &self.interrupt)
            .unwrap();
        self.handler
            .process_rx(&mut self.rx, &mem, &self.interrupt)
            .unwrap();
        self.guest.received()
    }

    fn send(&mut self, op: Op, data: &[u8]) {
        let mut header = self.guest.header(GUEST_PORT, HOST_PORT, op);
        header.len = data.len() as u32;
        self.guest.send(header, data);
    }

    /// A guest-initiated connection; returns the host's far end.
    fn connect(&mut self) -> UnixStream {
        self.send(Op::Request, &[]);
        let got = self.run();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0.op, Op::Response as u16);
        let far = self.handler.backend_mut().peers.remove(&HOST_PORT).unwrap();
        far.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        far
    }

    fn fd(&self) -> RawFd {
        self.handler
            .connection(HOST_PORT, GUEST_PORT)
            .unwrap()
            .stream()
            .as_raw_fd()
    }

    fn readable(&mut self) {
        let fd = self.fd();
        self.handler.stream_event(fd, true, false, false, false);
    }
}

fn ops(packets: &[(Header, Vec<u8>)]) -> Vec<u16> {
    packets.iter().map(|(h, _)| h.op).collect()
}

#[test]
fn handler_guest_connection_request_rw_shutdown_rst() {
    let mut h = Harness::new();

    // Request -> response, addressed back to the guest with our credit.
    h.send(Op::Request, &[]);
    let got = h.run();
    let (response, _) = &got[0];
    assert_eq!(response.op, Op::Response as u16);
    assert_eq!((response.src_cid, response.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!(
        (response.src_port, response.dst_port),
        (HOST_PORT, GUEST_PORT)
    );
    assert_eq!(response.buf_alloc, BUF_ALLOC);
    assert!(h.interrupt.count(chitin_virtio::InterruptKind::Queue) > 0);
    let mut far = h.handler.backend_mut().peers.remove(&HOST_PORT).unwrap();
    far.set_read_timeout(Some(Duration::from_secs(2))).unwrap();

    // Guest -> host bytes.
    h.send(Op::Rw, b"ping");
    h.run();
    let mut buf = [0u8; 4];
    far.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    assert_eq!(h.guest.tx_used(), 2);

    // Host -> guest bytes.
    far.write_all(b"pong").unwrap();
    h.readable();
    let got = h.run();
    assert_eq!(ops(&got), [Op::Rw as u16]);
    assert_eq!(got[0].1, b"pong");
    assert_eq!(got[0].0.fwd_cnt, 4);

    // Guest shuts its sending side: the host sees EOF.
    h.shutdown(SHUTDOWN_SEND);
    h.run();
    assert_eq!(far.read(&mut buf).unwrap(), 0);
    assert!(h
        .handler
        .connection(HOST_PORT, GUEST_PORT)
        .unwrap()
        .guest_shut_send());

    // Host closes: the guest gets SHUTDOWN(SEND).
    drop(far);
    let fd = h.fd();
    h.handler.stream_event(fd, true, false, true, false);
    let got = h.run();
    assert_eq!(ops(&got), [Op::Shutdown as u16]);
    assert_eq!(got[0].0.flags, SHUTDOWN_SEND);

    // Guest shuts both ways: reset and forget.
    h.shutdown(SHUTDOWN_RCV | SHUTDOWN_SEND);
    let got = h.run();
    assert_eq!(ops(&got), [Op::Rst as u16]);
    assert_eq!(h.handler.connection_count(), 0);
}

impl Harness {
    /// Queue a guest SHUTDOWN with `flags`.
    fn shutdown(&mut self, flags: u32) {
        let mut header = self.guest.header(GUEST_PORT, HOST_PORT, Op::Shutdown);
        header.flags = flags;
        self.guest.send(header, &[]);
    }
}

#[test]
fn handler_refused_port_answers_rst() {
    let mut h = Harness::new();
    h.handler.backend_mut().refused.push(HOST_PORT);
    h.send(Op::Request, &[]);
    let got = h.run();
    assert_eq!(ops(&got), [Op::Rst as u16]);
    assert_eq!(
        (got[0].0.src_port, got[0].0.dst_port),
        (HOST_PORT, GUEST_PORT)
    );
    assert_eq!(h.handler.connection_count(), 0);
}

#[test]
fn handler_packet_for_unknown_connection_answers_rst() {
    let mut h = Harness::new();
    h.send(Op::Rw, b"data");
    h.send(Op::CreditUpdate, &[]);
    let got = h.run();
    assert_eq!(ops(&got), [Op::Rst as u16, Op::Rst as u16]);
}

#[test]
fn handler_rst_for_unknown_connection_not_answered() {
    let mut h = Harness::new();
    h.send(Op::Rst, &[]);
    assert!(h.run().is_empty());
    assert_eq!(h.guest.tx_used(), 1);
}

#[test]
fn handler_wrong_type_or_op_answers_rst_wrong_cid_is_dropped() {
    let mut h = Harness::new();
    let mut wrong_dst = h.guest.header(GUEST_PORT, HOST_PORT, Op::Request);
    wrong_dst.dst_cid = 7;
    let mut wrong_type = h.guest.header(GUEST_PORT, HOST_PORT, Op::Request);
    wrong_type.type_ = 2;
    let mut wrong_op = h.guest.header(GUEST_PORT, HOST_PORT, Op::Request);
    wrong_op.op = 99;
    let mut wrong_src = h.guest.header(GUEST_PORT, HOST_PORT, Op::Request);
    wrong_src.src_cid = 9;
    for header in [wrong_dst, wrong_type, wrong_op, wrong_src] {
        h.guest.send(header, &[]);
    }
    let got = h.run();
    // A packet not from this guest to the host is dropped, unanswered.
    assert_eq!(ops(&got), [Op::Rst as u16; 2]);
    assert_eq!(h.handler.connection_count(), 0);
    assert_eq!(h.guest.tx_used(), 4);
}

#[test]
fn handler_malformed_chain_with_header_answers_rst() {
    let mut h = Harness::new();
    // len 100 but no data descriptor.
    let mut header = h.guest.header(GUEST_PORT, HOST_PORT, Op::Rw);
    header.len = 100;
    h.guest.send(header, &[]);
    let got = h.run();
    assert_eq!(ops(&got), [Op::Rst as u16]);
    assert_eq!(h.guest.tx_used(), 1);
}

#[test]
fn handler_credit_exhaustion_stops_reads_and_update_resumes() {
    let mut h = Harness::new();
    let mut request = h.guest.header(GUEST_PORT, HOST_PORT, Op::Request);
    request.buf_alloc = 8;
    h.guest.send(request, &[]);
    h.run();
    let mut far = h.handler.backend_mut().peers.remove(&HOST_PORT).unwrap();
    far.write_all(&[7u8; 20]).unwrap();

    h.readable();
    let got = h.run();
    assert_eq!(ops(&got), [Op::Rw as u16]);
    assert_eq!(got[0].1.len(), 8);
    let conn = h.handler.connection(HOST_PORT, GUEST_PORT).unwrap();
    assert_eq!(conn.credit().peer_free(), 0);
    // No credit: the socket is not read and not watched for reading.
    assert_eq!(
        conn.desired_interest(),
        Some(Interest {
            read: false,
            write: false
        })
    );
    assert!(h.run().is_empty());

    // The guest consumed 8 bytes: 8 more come.
    let mut update = h.guest.header(GUEST_PORT, HOST_PORT, Op::CreditUpdate);
    update.buf_alloc = 8;
    update.fwd_cnt = 8;
    h.guest.send(update, &[]);
    let got = h.run();
    assert_eq!(ops(&got), [Op::Rw as u16]);
    assert_eq!(got[0].1.len(), 8);
    drop(far);
}

#[test]
fn handler_credit_request_answered_with_update() {
    let mut h = Harness::new();
    let _far = h.connect();
    h.send(Op::CreditRequest, &[]);
    let got = h.run();
    assert_eq!(ops(&got), [Op::CreditUpdate as u16]);
    assert_eq!(got[0].0.buf_alloc, BUF_ALLOC);
}

#[test]
fn handler_guest_beyond_credit_is_reset_and_memory_bounded() {
    let mut h = Harness::new();
    let _far = h.connect();
    // The host never reads: 10 x 64 KiB is beyond the 256 KiB we gave.
    let chunk = vec![1u8; MAX_PKT_DATA as usize];
    for _ in 0..10 {
        h.send(Op::Rw, &chunk);
    }
    let got = h.run();
    assert!(ops(&got).contains(&(Op::Rst as u16)));
    assert_eq!(h.handler.connection_count(), 0);
}

#[test]
fn handler_rx_without_buffers_waits_then_delivers() {
    let mut guest = Guest::new();
    let mut queues = guest.queues();
    let mut tx = queues.remove(1);
    let mut rx = queues.remove(0);
    let mut handler = VsockHandler::new(PairBackend::default(), GUEST_CID);
    let interrupt = RecordingInterrupt::new();
    let mem = guest.mem.clone();
    guest.send(guest.header(GUEST_PORT, HOST_PORT, Op::Request), &[]);
    handler.process_tx(&mut tx, &mem, &interrupt).unwrap();
    let run = handler.process_rx(&mut rx, &mem, &interrupt).unwrap();
    assert_eq!(run.completed, 0);
    assert!(handler.has_rx_work());

    guest.post_rx(1);
    handler.process_rx(&mut rx, &mem, &interrupt).unwrap();
    assert_eq!(ops(&guest.received()), [Op::Response as u16]);
}

#[test]
fn handler_host_connect_line_request_response_ok() {
    let mut h = Harness::new();
    let (near, mut far) = UnixStream::pair().unwrap();
    near.set_nonblocking(true).unwrap();
    far.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    far.write_all(b"CONNECT 52\nearly").unwrap();
    assert!(h.handler.add_host_stream(near));

    let got = h.run();
    assert_eq!(ops(&got), [Op::Request as u16]);
    let request = got[0].0;
    assert_eq!(request.dst_port, 52);
    assert_eq!(request.src_cid, HOST_CID);
    let local = request.src_port;
    assert_eq!(
        h.handler.connection(local, 52).unwrap().state(),
        State::Connecting
    );

    let mut response = h.guest.header(52, local, Op::Response);
    response.buf_alloc = 4096;
    h.guest.send(response, &[]);
    h.run();
    let mut line = [0u8; 64];
    let n = far.read(&mut line).unwrap();
    assert_eq!(&line[..n], format!("OK {local}\n").as_bytes());

    // The bytes after the line were not consumed by the line reader.
    let fd = h
        .handler
        .connection(local, 52)
        .unwrap()
        .stream()
        .as_raw_fd();
    h.handler.stream_event(fd, true, false, false, false);
    let got = h.run();
    assert_eq!(ops(&got), [Op::Rw as u16]);
    assert_eq!(got[0].1, b"early");
}

#[test]
fn handler_host_connect_guest_rst_closes_stream() {
    let mut h = Harness::new();
    let (near, mut far) = UnixStream::pair().unwrap();
    near.set_nonblocking(true).unwrap();
    far.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    far.write_all(b"CONNECT 52\n").unwrap();
    h.handler.add_host_stream(near);
    let local = h.run()[0].0.src_port;

    h.guest.send(h.guest.header(52, local, Op::Rst), &[]);
    h.run();
    assert_eq!(h.handler.connection_count(), 0);
    let mut buf = [0u8; 8];
    assert_eq!(far.read(&mut buf).unwrap(), 0);
}

#[test]
fn handler_overlong_connect_line_closes_stream() {
    let mut h = Harness::new();
    let (near, mut far) = UnixStream::pair().unwrap();
    near.set_nonblocking(true).unwrap();
    far.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    far.write_all(&[b'7'; 40]).unwrap();
    h.handler.add_host_stream(near);
    assert_eq!(h.handler.accepting_count(), 0);
    let mut buf = [0u8; 8];
    assert_eq!(far.read(&mut buf).unwrap(), 0);
    assert!(h.run().is_empty());
}

#[test]
fn parse_connect_line_valid_and_malformed() {
    assert_eq!(parse_connect_line(b"CONNECT 52\n"), Some(52));
    assert_eq!(parse_connect_line(b"CONNECT 4294967295\n"), Some(u32::MAX));
    assert_eq!(parse_connect_line(b"CONNECT 4294967296\n"), None);
    assert_eq!(parse_connect_line(b"CONNECT \n"), None);
    assert_eq!(parse_connect_line(b"CONNECT -1\n"), None);
    assert_eq!(parse_connect_line(b"connect 52\n"), None);
    assert_eq!(parse_connect_line(b"CONNECT 52"), None);
}

#[test]
fn handler_many_connections_round_robin() {
    let mut h = Harness::new();
    let mut fars = Vec::new();
    for port in 0..20u32 {
        h.guest.send(
            h.guest.header(GUEST_PORT + port, HOST_PORT, Op::Request),
            &[],
        );
        h.run();
        let far = h.handler.backend_mut().peers.remove(&HOST_PORT).unwrap();
        fars.push(far);
    }
    assert_eq!(h.handler.connection_count(), 20);
    // Every host end has lots to say; each connection gets one buffer in
    // turn rather than the first one taking them all.
    for (i, far) in fars.iter_mut().enumerate() {
        far.write_all(&[i as u8; 10_000]).unwrap();
        let fd = h
            .handler
            .connection(HOST_PORT, GUEST_PORT + i as u32)
            .unwrap()
            .stream()
            .as_raw_fd();
        h.handler.stream_event(fd, true, false, false, false);
    }
    h.guest.post_rx(40);
    let got = h.run();
    let first_twenty: Vec<u32> = got.iter().take(20).map(|(hd, _)| hd.dst_port).collect();
    let mut sorted = first_twenty.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), 20);
}

#[test]
fn handler_clear_closes_every_connection() {
    let mut h = Harness::new();
    let mut far = h.connect();
    let mut seen = Vec::new();
    h.handler
        .sync_interest(|fd, old, new| seen.push((fd, old, new)));
    assert_eq!(seen.len(), 1);
    h.handler.clear();
    assert_eq!(h.handler.connection_count(), 0);
    let mut removed = Vec::new();
    h.handler
        .sync_interest(|fd, old, new| removed.push((fd, old, new)));
    assert_eq!(removed, [(seen[0].0, seen[0].2, None)]);
    let mut buf = [0u8; 8];
    assert_eq!(far.read(&mut buf).unwrap(), 0);
}

#[test]
fn handler_rx_avail_index_far_ahead_is_an_error_not_a_spin() {
    // Arrange: an RST pending for the guest, and an RX available ring whose
    // index claims 100 more buffers than the queue holds
    // (found by the vsock_packet fuzz target: this used to loop forever).
    let mut guest = Guest::new();
    let mut queues = guest.queues();
    let mut tx = queues.remove(1);
    let mut rx = queues.remove(0);
    let mut handler = VsockHandler::new(PairBackend::default(), GUEST_CID);
    handler.backend_mut().refused.push(HOST_PORT);
    let interrupt = RecordingInterrupt::new();
    let mem = guest.mem.clone();
    guest.send(guest.header(GUEST_PORT, HOST_PORT, Op::Request), &[]);
    handler.process_tx(&mut tx, &mem, &interrupt).unwrap();
    assert!(handler.has_rx_work());
    // The avail ring's idx field sits 2 bytes into the ring.
    let idx = rx.next_avail().wrapping_add(rx.size() + 100);
    vm_memory::Bytes::write_obj(&mem, idx, vm_memory::GuestAddress(rx.avail_ring() + 2)).unwrap();
    // Act
    let result = handler.process_rx(&mut rx, &mem, &interrupt);
    // Assert
    assert!(
        matches!(result, Err(HandlerError::AvailRing(_))),
        "{result:?}"
    );
}

#[test]
fn handler_guest_close_with_bytes_pending_delivers_them_before_rst() {
    // Arrange: an established guest connection whose host end reads
    // nothing yet, and more guest data than the Unix socket buffer holds.
    let mut h = Harness::new();
    let mut far = h.connect();
    let chunk = vec![0x5au8; 4096];
    let chunks = 60; // 240 KiB: within the guest's 256 KiB credit
    for _ in 0..chunks {
        h.send(Op::Rw, &chunk);
        h.run();
    }
    // Act 1: the guest shuts both directions while bytes are still pending.
    h.shutdown(SHUTDOWN_RCV | SHUTDOWN_SEND);
    let early = h.run();
    // Assert 1: no RST yet, the connection lingers.
    assert!(
        !ops(&early).contains(&(Op::Rst as u16)),
        "{:?}",
        ops(&early)
    );
    assert_eq!(h.handler.connection_count(), 1);
    // Act 2: the host reads; each time the socket drains, it is writable.
    let mut got = 0usize;
    let mut buf = vec![0u8; 64 << 10];
    let mut rst_seen = false;
    while got < chunk.len() * chunks && !rst_seen {
        let n = far.read(&mut buf).unwrap();
        got += n;
        if h.handler.connection_count() == 1 {
            let fd = h.fd();
            h.handler.stream_event(fd, false, true, false, false);
        }
        rst_seen |= ops(&h.run()).contains(&(Op::Rst as u16));
    }
    // Drain what the last flush wrote.
    far.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    while let Ok(n) = far.read(&mut buf) {
        if n == 0 {
            break;
        }
        got += n;
    }
    // Assert 2: every byte arrived, then the guest got its RST.
    assert_eq!(got, chunk.len() * chunks);
    assert!(rst_seen || ops(&h.run()).contains(&(Op::Rst as u16)));
    assert_eq!(h.handler.connection_count(), 0);
}

#[test]
fn handler_rw_in_page_fragments_reaches_host_intact() {
    // Linux 6.7+ sends data as header + one descriptor per page fragment.
    let mut h = Harness::new();
    let mut far = h.connect();
    let data: Vec<u8> = (0..MAX_PKT_DATA).map(|i| (i % 251) as u8).collect();
    let mut header = h.guest.header(GUEST_PORT, HOST_PORT, Op::Rw);
    header.len = MAX_PKT_DATA;

    h.guest.send_fragmented(header, &data, 4096);
    h.run();

    let mut got = vec![0u8; data.len()];
    far.read_exact(&mut got).unwrap();
    assert_eq!(got, data);
    assert_eq!(h.handler.faults().total(), 0);
}

#[test]
fn handler_single_descriptor_rx_buffers_carry_host_bytes() {
    // Linux 6.7+ receive buffers: header and data in one descriptor.
    let mut h = Harness::bare();
    h.guest.post_rx_single(8);
    let mut far = h.connect();

    far.write_all(b"hello from the host").unwrap();
    h.readable();
    let got = h.run();

    assert_eq!(ops(&got), [Op::Rw as u16]);
    assert_eq!(got[0].1, b"hello from the host");
}

#[test]
fn handler_malformed_chain_is_counted_with_its_reason() {
    let mut h = Harness::new();
    let mut header = h.guest.header(GUEST_PORT, HOST_PORT, Op::Rw);
    header.len = 100;
    h.guest.send(header, &[]);

    h.run();

    let faults = h.handler.faults();
    assert_eq!(faults.count("tx chain: less data than the header says"), 1);
    assert_eq!(faults.total(), 1);
}

#[test]
fn handler_refused_packets_are_counted_by_reason() {
    let mut h = Harness::new();
    let mut wrong_cid = h.guest.header(GUEST_PORT, HOST_PORT, Op::Rw);
    wrong_cid.dst_cid = 7;
    let mut wrong_op = h.guest.header(GUEST_PORT, HOST_PORT, Op::Rw);
    wrong_op.op = 99;
    h.guest.send(wrong_cid, &[]);
    h.guest.send(wrong_op, &[]);
    // No connection exists for these two; the reset is not counted.
    h.send(Op::CreditUpdate, &[]);
    h.send(Op::Rst, &[]);

    h.run();

    let faults = h.handler.faults();
    assert_eq!(faults.count("wrong CID"), 1);
    assert_eq!(faults.count("unknown operation"), 1);
    assert_eq!(faults.count("no such connection"), 1);
    assert_eq!(faults.total(), 3);
}

#[test]
fn handler_credit_overrun_is_counted() {
    let mut h = Harness::new();
    let _far = h.connect();
    let chunk = vec![1u8; MAX_PKT_DATA as usize];
    for _ in 0..10 {
        h.send(Op::Rw, &chunk);
    }

    h.run();

    assert_eq!(h.handler.faults().count("credit exceeded"), 1);
}

#[test]
fn handler_unusable_rx_buffer_is_counted_and_returned_empty() {
    let mut h = Harness::bare();
    // One RX buffer, too short for a header.
    let buf = h.guest.alloc(16);
    h.guest
        .add_rx_chain(&[TestDescriptor::new(buf.0, 16, WRITE)]);
    h.send(Op::Request, &[]);

    h.run();

    assert_eq!(
        h.handler.faults().count("rx buffer: shorter than a header"),
        1
    );
    assert_eq!(h.guest.rx_used(0), Some(0));
}

#[test]
fn handler_malformed_chain_on_live_connection_closes_host_socket() {
    let mut h = Harness::new();
    let mut far = h.connect();
    // The header announces 100 bytes; the chain holds none.
    let mut header = h.guest.header(GUEST_PORT, HOST_PORT, Op::Rw);
    header.len = 100;
    h.guest.send(header, &[]);

    let got = h.run();

    // The guest gets a reset, the host peer sees the stream end, and the
    // connection is gone: nobody waits on the dropped bytes.
    assert_eq!(ops(&got), [Op::Rst as u16]);
    assert_eq!(h.handler.connection_count(), 0);
    let mut buf = [0u8; 1];
    assert_eq!(far.read(&mut buf).unwrap(), 0);
}

#[test]
fn handler_unknown_op_on_live_connection_closes_it() {
    let mut h = Harness::new();
    let mut far = h.connect();
    let mut header = h.guest.header(GUEST_PORT, HOST_PORT, Op::Rw);
    header.op = 99;
    h.guest.send(header, &[]);

    let got = h.run();

    assert_eq!(ops(&got), [Op::Rst as u16]);
    assert_eq!(h.handler.connection_count(), 0);
    assert_eq!(far.read(&mut [0u8; 1]).unwrap(), 0);
}

#[test]
fn handler_refused_reset_chain_is_not_answered() {
    let mut h = Harness::new();
    // A malformed RST (data announced, none there): dropped, no reply.
    let mut header = h.guest.header(GUEST_PORT, HOST_PORT, Op::Rst);
    header.len = 8;
    h.guest.send(header, &[]);

    assert!(h.run().is_empty());
    assert_eq!(h.handler.faults().malformed(), 1);
}

#[test]
fn handler_header_only_rx_buffer_does_not_stall_waiting_data() {
    let mut h = Harness::bare();
    h.guest.post_rx(1);
    let mut far = h.connect();
    far.write_all(b"waiting").unwrap();
    h.readable();

    // A buffer with room for a header only: returned empty, not held.
    let hdr = h.guest.alloc(HEADER_LEN as u64);
    h.guest
        .add_rx_chain(&[TestDescriptor::new(hdr.0, HEADER_LEN as u32, WRITE)]);
    assert!(h.run().is_empty());
    assert_eq!(h.guest.rx_used(1), Some(0));
    assert!(h.handler.has_rx_work());

    // The next real buffer carries the data.
    h.guest.post_rx(1);
    let got = h.run();
    assert_eq!(ops(&got), [Op::Rw as u16]);
    assert_eq!(got[0].1, b"waiting");
}

#[test]
fn handler_rx_queue_not_ready_touches_no_guest_memory() {
    let mut h = Harness::bare();
    // Below the rings: where an unready queue's reset addresses point.
    h.guest
        .mem
        .write_slice(&[0xaa; 0x1000], GuestAddress(0))
        .unwrap();
    // A packet for a connection that does not exist: a reset waits.
    h.send(Op::Rw, &[]);
    let mem = h.guest.mem.clone();
    h.handler.process_tx(&mut h.tx, &mem, &h.interrupt).unwrap();
    assert!(h.handler.has_rx_work());
    let mut unready = Queue::new(16).unwrap();

    let run = h
        .handler
        .process_rx(&mut unready, &mem, &h.interrupt)
        .unwrap();

    assert_eq!(run.completed, 0);
    let mut after = [0u8; 0x1000];
    mem.read_slice(&mut after, GuestAddress(0)).unwrap();
    assert!(after.iter().all(|&b| b == 0xaa));
}

#[test]
fn handler_request_rst_cycles_without_rx_buffers_keep_state_flat() {
    // A guest that connects and resets the same ports over and over and
    // never posts an RX buffer (so nothing queued for it is ever sent).
    let guest = Guest::new();
    let mut handler = VsockHandler::new(PairBackend::default(), GUEST_CID);
    let request = guest.header(GUEST_PORT, HOST_PORT, Op::Request);
    let rst = guest.header(GUEST_PORT, HOST_PORT, Op::Rst);

    for _ in 0..100_000 {
        handler.handle_guest_packet(&request, 0);
        handler.handle_guest_packet(&rst, 0);
        // As the event loop does after every event: closed streams go.
        handler.sync_interest(|_, _, _| {});
    }

    // Each RST ends the connection it reset: nothing accumulates.
    assert_eq!(handler.conns.len(), 0);
    assert_eq!(handler.rr.len(), 0);
    assert_eq!(handler.resets.len(), 0);
    assert_eq!(handler.graveyard.len(), 0);
}

/// A host stream that sent `line`, and its far end.
fn host_stream(line: &[u8]) -> (UnixStream, UnixStream) {
    let (near, mut far) = UnixStream::pair().unwrap();
    near.set_nonblocking(true).unwrap();
    far.write_all(line).unwrap();
    (near, far)
}

#[test]
fn host_connect_flood_the_guest_never_answers_cannot_lock_out_the_agent_and_times_out() {
    const AGENT_PORT: u32 = 1024;
    let mut h = Harness::bare();
    h.handler.reserve_port(AGENT_PORT);
    // 2 000 host connections to a guest port whose guest never answers:
    // all but the reserved slots fill, the rest are closed at once.
    let mut far_ends = Vec::new();
    for _ in 0..2000 {
        let (near, far) = host_stream(b"CONNECT 5000\n");
        h.handler.add_host_stream(near);
        far_ends.push(far);
    }
    assert_eq!(
        h.handler.connection_count(),
        MAX_CONNECTIONS - RESERVED_SLOTS
    );
    assert_eq!(h.handler.accepting_count(), 0);
    // The agent's port still gets in.
    let (near, _agent_far) = host_stream(b"CONNECT 1024\n");
    h.handler.add_host_stream(near);
    assert_eq!(
        h.handler.connection_count(),
        MAX_CONNECTIONS - RESERVED_SLOTS + 1
    );
    let agent = h
        .handler
        .conns
        .iter()
        .find(|(key, _)| key.1 == AGENT_PORT)
        .map(|(key, _)| *key)
        .expect("the agent connection was admitted");
    // Another port does not.
    let (near, mut other) = host_stream(b"CONNECT 77\n");
    h.handler.add_host_stream(near);
    other
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    assert_eq!(other.read(&mut [0u8; 8]).unwrap(), 0, "closed at once");
    assert!(h.handler.has_deadlines());
    // Before the timeout nothing goes; after it, everything the guest
    // never answered is reset and its host stream closed.
    let start = Instant::now();
    assert_eq!(h.handler.reap(start + CONNECT_TIMEOUT / 2), 0);
    let reaped = h.handler.reap(start + CONNECT_TIMEOUT);
    assert_eq!(reaped, MAX_CONNECTIONS - RESERVED_SLOTS + 1);
    assert_eq!(h.handler.connection_count(), 0);
    assert!(!h.handler.conns.contains_key(&agent));
    assert!(!h.handler.has_deadlines());
    h.handler.sync_interest(|_, _, _| {});
    assert_eq!(h.handler.graveyard.len(), 0);
    far_ends[0]
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(
        far_ends[0].read(&mut buf).unwrap(),
        0,
        "the host stream is closed"
    );
    assert_eq!(
        h.handler
            .faults()
            .count("connect timed out: the guest never answered"),
        (MAX_CONNECTIONS - RESERVED_SLOTS + 1) as u64
    );
    // The slots are back.
    let (near, _far) = host_stream(b"CONNECT 5000\n");
    h.handler.add_host_stream(near);
    assert_eq!(h.handler.connection_count(), 1);
}

#[test]
fn guest_request_flood_leaves_the_reserved_slots_to_the_agent() {
    let mut h = Harness::bare();
    h.handler.reserve_port(1024);
    for i in 0..2000 {
        let request = h.guest.header(20_000 + i, 5000 + i, Op::Request);
        h.handler.handle_guest_packet(&request, 0);
    }
    assert_eq!(
        h.handler.connection_count(),
        MAX_CONNECTIONS - RESERVED_SLOTS
    );
    assert_eq!(
        h.handler.faults().count("connection limit reached"),
        (2000 - (MAX_CONNECTIONS - RESERVED_SLOTS)) as u64
    );
    let (near, _far) = host_stream(b"CONNECT 1024\n");
    h.handler.add_host_stream(near);
    assert_eq!(
        h.handler.connection_count(),
        MAX_CONNECTIONS - RESERVED_SLOTS + 1
    );
}

#[test]
fn host_stream_that_never_sends_its_connect_line_is_closed_after_the_timeout() {
    let mut h = Harness::bare();
    let (near, mut far) = host_stream(b"CONN");
    h.handler.add_host_stream(near);
    assert_eq!(h.handler.accepting_count(), 1);
    assert!(h.handler.has_deadlines());
    assert_eq!(h.handler.reap(Instant::now() + CONNECT_TIMEOUT), 1);
    assert_eq!(h.handler.accepting_count(), 0);
    far.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    assert_eq!(far.read(&mut [0u8; 8]).unwrap(), 0);
}

#[test]
fn guest_keeping_a_connection_its_host_peer_closed_is_reset_after_linger() {
    let mut h = Harness::new();
    let far = h.connect();
    // The host peer closes both directions; the guest is told (SHUTDOWN
    // with SEND) and then never closes its end.
    drop(far);
    let fd = h.fd();
    h.handler.stream_event(fd, true, false, true, false);
    let got = h.run();
    assert_eq!(ops(&got), [Op::Shutdown as u16]);
    assert!(h.handler.has_deadlines());
    let start = Instant::now();
    // The first look starts the linger clock; it ends LINGER_TIMEOUT later.
    assert_eq!(h.handler.reap(start), 0);
    assert_eq!(h.handler.reap(start + LINGER_TIMEOUT / 2), 0);
    assert_eq!(h.handler.reap(start + LINGER_TIMEOUT), 1);
    assert_eq!(h.handler.connection_count(), 0);
    let got = h.run();
    assert_eq!(ops(&got), [Op::Rst as u16]);
    assert_eq!(
        h.handler
            .faults()
            .count("close timed out: the guest kept a closed connection"),
        1
    );
}

#[test]
fn guest_refusing_the_data_of_a_closed_host_peer_is_reset_after_stuck_timeout() {
    let mut h = Harness::new();
    let mut far = h.connect();
    // The guest will receive no more; the host peer sends and closes.
    let mut shutdown = h.guest.header(GUEST_PORT, HOST_PORT, Op::Shutdown);
    shutdown.flags = SHUTDOWN_RCV;
    h.guest.send(shutdown, &[]);
    h.run();
    far.write_all(b"never read").unwrap();
    drop(far);
    let fd = h.fd();
    h.handler.stream_event(fd, true, false, true, false);
    h.run();
    assert!(h.handler.has_deadlines());
    let start = Instant::now();
    assert_eq!(h.handler.reap(start), 0);
    // Data is still undelivered: the short linger does not apply.
    assert_eq!(h.handler.reap(start + LINGER_TIMEOUT), 0);
    assert_eq!(h.handler.reap(start + STUCK_TIMEOUT), 1);
    assert_eq!(h.handler.connection_count(), 0);
}

#[test]
fn host_connections_wait_for_the_guest_driver_before_their_deadline_starts() {
    let mut h = Harness::new();
    // The guest is still booting: no driver runs the device.
    let booting = Instant::now();
    h.handler.set_driver_ready(false, booting);
    let (near, _far) = host_stream(b"CONNECT 1024\n");
    h.handler.add_host_stream(near);
    assert_eq!(h.handler.connection_count(), 1);
    // What would time out a running guest's connection does not.
    assert_eq!(h.handler.reap(booting + CONNECT_TIMEOUT * 3), 0);
    assert_eq!(h.handler.connection_count(), 1);
    // The driver comes up: the deadline counts from now.
    let ready = booting + CONNECT_TIMEOUT * 4;
    h.handler.set_driver_ready(true, ready);
    assert_eq!(h.handler.reap(ready + CONNECT_TIMEOUT / 2), 0);
    assert_eq!(h.handler.reap(ready + CONNECT_TIMEOUT), 1);
    assert_eq!(h.handler.connection_count(), 0);
    assert_eq!(
        h.handler
            .faults()
            .count("connect timed out: the guest never answered"),
        1
    );
}

#[test]
fn a_driver_that_never_starts_still_ends_the_wait() {
    let mut h = Harness::new();
    let booting = Instant::now();
    h.handler.set_driver_ready(false, booting);
    let (near, _far) = host_stream(b"CONNECT 5000\n");
    h.handler.add_host_stream(near);
    let made = Instant::now();
    assert_eq!(h.handler.reap(made + DRIVER_WAIT_TIMEOUT / 2), 0);
    assert_eq!(h.handler.reap(made + DRIVER_WAIT_TIMEOUT), 1);
    assert_eq!(
        h.handler
            .faults()
            .count("connect timed out: the guest's driver never started"),
        1
    );
}
