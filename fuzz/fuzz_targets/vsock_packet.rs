//! Arbitrary TX and RX descriptor chains and guest memory through the
//! virtio-vsock handler over a socket-pair backend (every guest connect
//! succeeds, and the host ends write back and hang up): packet parsing, the
//! connection state machine, credit, the RX round-robin and the reaping of
//! timed-out connections. Nothing may panic or touch memory outside the
//! guest's, and after every step every collection the guest can grow stays
//! within its cap.
//!
//! Input: `[n_tx_desc, n_tx_heads, n_rx_desc, n_rx_heads]`, then the TX
//! descriptors (16 bytes each: addr u64, len u32, flags u16, next u16),
//! TX heads (1 byte each), RX descriptors, RX heads, then bytes copied to
//! the data area (packet headers and payloads).

#![no_main]

use chitin_virtio::test_utils::{guest_memory, RecordingInterrupt, SplitQueueBuilder, TestDescriptor};
use std::io::Write;
use std::time::{Duration, Instant};

use chitin_vsock::{PairBackend, VsockHandler};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: usize = 256 << 10;
const QUEUE_SIZE: u16 = 16;
/// TX queue rings at 0, RX rings at 0x2000, data from 0x4000.
const TX_BASE: u64 = 0;
const RX_BASE: u64 = 0x2000;
const DATA_AREA: u64 = 0x4000;
const GUEST_CID: u64 = 3;

fn build(
    mem: &chitin_memory::GuestMemoryMmap,
    base: u64,
    descs: &[u8],
    heads: &[u8],
) -> Option<virtio_queue::Queue> {
    let mut q = SplitQueueBuilder::new(mem, GuestAddress(base), QUEUE_SIZE).ok()?;
    for (i, d) in descs.chunks_exact(16).enumerate() {
        let addr = u64::from_le_bytes(d[0..8].try_into().ok()?) % (2 * MEM_SIZE as u64);
        let len = u32::from_le_bytes(d[8..12].try_into().ok()?);
        let desc = TestDescriptor::new(addr, len, u16::from_le_bytes([d[12], d[13]]))
            .with_next(u16::from_le_bytes([d[14], d[15]]));
        q.write_descriptor(i as u16, desc).ok()?;
    }
    for &h in heads {
        q.publish(u16::from(h) % QUEUE_SIZE).ok()?;
    }
    q.build().ok()
}

fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, rest) = data.split_at(n.min(data.len()));
    *data = rest;
    head
}

fuzz_target!(|input: &[u8]| {
    let [n_tx, h_tx, n_rx, h_rx, rest @ ..] = input else {
        return;
    };
    let mut rest = rest;
    let tx_descs = take(&mut rest, usize::from(*n_tx % 17) * 16);
    let tx_heads = take(&mut rest, usize::from(*h_tx % 8));
    let rx_descs = take(&mut rest, usize::from(*n_rx % 17) * 16);
    let rx_heads = take(&mut rest, usize::from(*h_rx % 8));
    let mem = guest_memory(MEM_SIZE);
    let room = MEM_SIZE - DATA_AREA as usize;
    let _ = mem.write_slice(&rest[..rest.len().min(room)], GuestAddress(DATA_AREA));
    let (Some(mut tx), Some(mut rx)) = (
        build(&mem, TX_BASE, tx_descs, tx_heads),
        build(&mem, RX_BASE, rx_descs, rx_heads),
    ) else {
        return;
    };
    let mut handler = VsockHandler::new(PairBackend::default(), GUEST_CID);
    let interrupt = RecordingInterrupt::new();
    let bounded = |h: &VsockHandler<PairBackend>| {
        let sizes = h.sizes();
        assert!(sizes.within_caps(), "{sizes:?}");
    };
    // A ring error only ends the run (the device would signal
    // NEEDS_RESET); it must not break the handler's bounds.
    let _ = handler.process_tx(&mut tx, &mem, &interrupt);
    bounded(&handler);
    // The host ends answer with some bytes (the input's first) and then,
    // every other one, hang up; the handler sees every socket ready.
    let reply = &rest[..rest.len().min(64)];
    for (i, far) in handler.backend_mut().peers.values_mut().enumerate() {
        let _ = far.set_nonblocking(true);
        let _ = far.write(reply);
        if i % 2 == 1 {
            let _ = far.shutdown(std::net::Shutdown::Both);
        }
    }
    for fd in handler.stream_fds() {
        handler.stream_event(fd, true, true, false, false);
    }
    let _ = handler.process_rx(&mut rx, &mem, &interrupt);
    bounded(&handler);
    // Then every socket reports a hang-up (true for the ones shut down
    // above), which starts their linger.
    for fd in handler.stream_fds() {
        handler.stream_event(fd, true, false, true, false);
    }
    bounded(&handler);
    let _ = handler.process_rx(&mut rx, &mem, &interrupt);
    bounded(&handler);
    // Later, every timeout has passed: whatever waited is reaped, and what
    // is left is live.
    let later = Instant::now() + Duration::from_secs(5);
    handler.reap(later);
    handler.reap(later + Duration::from_secs(20));
    bounded(&handler);
    let _ = handler.process_rx(&mut rx, &mem, &interrupt);
    handler.sync_interest(|_, _, _| {});
    bounded(&handler);
});
