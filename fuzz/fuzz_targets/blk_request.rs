//! Arbitrary guest memory and descriptor chains through the virtio-blk
//! queue handler (parse and execute) against an in-memory disk: nothing may
//! panic, nothing outside guest memory is touched (ASan watches), and after
//! each chain the disk is unchanged outside the bytes that chain's request
//! named (an OUT's sectors, a DISCARD's or WRITE_ZEROES' ranges; nothing
//! for any other request, or on a read-only disk). Then the rest of the
//! queue goes through `process_queue`, whose result must be a queue error
//! or a run that completed what was available.
//!
//! Input: `[flags, n_desc, n_heads]`, then `n_desc` 16-byte descriptors
//! (addr u64, len u32, flags u16, next u16; addresses reduced modulo twice
//! the memory size so about half land inside it), then `n_heads` head
//! indices (1 byte each), then bytes copied into guest memory at the data
//! area, where request headers and payloads live.

#![no_main]

use chitin_blk::{MemBackend, QueueHandler, Request, ID_BYTES};
use chitin_virtio::test_utils::{guest_memory, RecordingInterrupt, SplitQueueBuilder, TestDescriptor};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

/// Guest memory: queue rings first, then the data area.
const MEM_SIZE: usize = 256 << 10;
/// Where input bytes are copied: past the rings of a 16-entry queue.
const DATA_AREA: u64 = 0x4000;
/// Queue size.
const QUEUE_SIZE: u16 = 16;
/// The in-memory disk: 64 KiB.
const DISK_SIZE: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let [flags, n_desc, n_heads, rest @ ..] = data else {
        return;
    };
    let n_desc = usize::from(*n_desc % (QUEUE_SIZE as u8 + 1));
    let n_heads = usize::from(*n_heads % 8);
    let (descs, rest) = rest.split_at((n_desc * 16).min(rest.len()));
    let (heads, payload) = rest.split_at(n_heads.min(rest.len()));

    let mem = guest_memory(MEM_SIZE);
    let Ok(mut queue) = SplitQueueBuilder::new(&mem, GuestAddress(0), QUEUE_SIZE) else {
        return;
    };
    queue = queue.with_event_idx(flags & 2 != 0);
    for (i, d) in descs.chunks_exact(16).enumerate() {
        let addr = u64::from_le_bytes(d[0..8].try_into().unwrap_or_default()) % (2 * MEM_SIZE as u64);
        let len = u32::from_le_bytes(d[8..12].try_into().unwrap_or_default());
        let desc_flags = u16::from_le_bytes([d[12], d[13]]);
        let next = u16::from_le_bytes([d[14], d[15]]);
        let desc = TestDescriptor::new(addr, len, desc_flags).with_next(next);
        if queue.write_descriptor(i as u16, desc).is_err() {
            return;
        }
    }
    for &head in heads {
        if queue.publish(u16::from(head) % QUEUE_SIZE).is_err() {
            return;
        }
    }
    let room = MEM_SIZE - DATA_AREA as usize;
    let _ = mem.write_slice(&payload[..payload.len().min(room)], GuestAddress(DATA_AREA));
    let Ok(mut q) = queue.build() else {
        return;
    };
    let read_only = flags & 1 != 0;
    // A patterned disk, so zeroing shows.
    let disk: Vec<u8> = (0..DISK_SIZE).map(|i| (i % 251) as u8 + 1).collect();
    let handler = QueueHandler::new(MemBackend::from_bytes(disk), read_only, [b'f'; ID_BYTES]);
    // The first chains one by one, each checked against what it named.
    for _ in 0..n_heads / 2 {
        let Ok(Some(chain)) = chitin_virtio::queue::next_chain(&mut q, &mem) else {
            break;
        };
        let named = if read_only {
            Vec::new()
        } else {
            named_ranges(&chitin_blk::request::parse(&mem, chain.clone()).request)
        };
        let before = handler.backend().contents();
        handler.process_chain(&mem, chain);
        let after = handler.backend().contents();
        if before == after {
            continue;
        }
        for (i, (b, a)) in before.iter().zip(&after).enumerate() {
            if b != a {
                let i = i as u64;
                assert!(
                    named.iter().any(|r| r.contains(&i)),
                    "disk byte {i} changed outside {named:?}"
                );
            }
        }
    }
    let interrupt = RecordingInterrupt::new();
    if let Ok(run) = handler.process_queue(&mut q, &mem, &interrupt) {
        assert!(run.completed <= usize::from(QUEUE_SIZE) && !run.pending);
    }
});

/// The disk bytes a request may change.
fn named_ranges(request: &Result<Request, chitin_blk::RequestError>) -> Vec<std::ops::Range<u64>> {
    match request {
        Ok(Request::Out { sector, data }) => {
            let start = sector.saturating_mul(512);
            vec![start..start.saturating_add(chitin_blk::request::total_len(data))]
        }
        Ok(Request::Discard { ranges } | Request::WriteZeroes { ranges }) => ranges
            .iter()
            .map(|r| {
                let start = r.sector().saturating_mul(512);
                start..start.saturating_add(u64::from(r.num_sectors()) * 512)
            })
            .collect(),
        _ => Vec::new(),
    }
}
