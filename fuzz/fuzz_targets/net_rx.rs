//! Arbitrary frames from an in-memory backend into arbitrary RX
//! descriptor chains through chitin-net's receive path, with arbitrary
//! receive settings (mergeable or not, small or 64 KiB frames, offloads),
//! over three runs that keep their held chains (the guest posts more
//! heads between them). Nothing may panic or touch memory outside the
//! guest's; every run stays within its bounds, the chains held never
//! exceed the ring, and no run reports more bytes than its frames had.
//!
//! Input: `[n_desc, n_heads, config, n_frames]`, then the descriptors (16
//! bytes each: addr u64, len u32, flags u16, next u16), the heads (1 byte
//! each; split over the three runs), the frame lengths (2 bytes each,
//! little-endian), then the bytes the frames are cut from.

#![no_main]

use chitin_net::rx::{MAX_CHAINS_PER_RUN, MAX_FRAMES_PER_RUN};
use chitin_net::{receive, MemBackend, RxConfig, RxPool};
use chitin_virtio::rate_limit::RateLimiter;
use chitin_virtio::test_utils::{guest_memory, RecordingInterrupt, SplitQueueBuilder, TestDescriptor};
use chitin_virtio::GuestFaults;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;

const MEM_SIZE: usize = 512 << 10;
const QUEUE_SIZE: u16 = 16;

fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, rest) = data.split_at(n.min(data.len()));
    *data = rest;
    head
}

fuzz_target!(|input: &[u8]| {
    let [n_desc, n_heads, config, n_frames, rest @ ..] = input else {
        return;
    };
    let mut rest = rest;
    let descs = take(&mut rest, usize::from(*n_desc % 17) * 16);
    let heads = take(&mut rest, usize::from(*n_heads % 25));
    let lens = take(&mut rest, usize::from(*n_frames % 9) * 2);
    let mem = guest_memory(MEM_SIZE);
    let Ok(mut builder) = SplitQueueBuilder::new(&mem, GuestAddress(0), QUEUE_SIZE) else {
        return;
    };
    for (i, d) in descs.chunks_exact(16).enumerate() {
        let addr = u64::from_le_bytes(d[0..8].try_into().unwrap()) % (2 * MEM_SIZE as u64);
        let len = u32::from_le_bytes(d[8..12].try_into().unwrap());
        let desc = TestDescriptor::new(addr, len, u16::from_le_bytes([d[12], d[13]]))
            .with_next(u16::from_le_bytes([d[14], d[15]]));
        if builder.write_descriptor(i as u16, desc).is_err() {
            return;
        }
    }
    let Ok(mut queue) = builder.build() else {
        return;
    };
    let config = RxConfig {
        mergeable: config & 1 != 0,
        need: if config & 2 != 0 { 65_562 } else { 1526 },
        csum: config & 4 != 0,
        segmentation: config & 8 != 0,
    };
    let backend = MemBackend::default();
    for pair in lens.chunks_exact(2) {
        let len = usize::from(u16::from_le_bytes([pair[0], pair[1]])) % 70_000;
        let mut frame: Vec<u8> = rest.iter().copied().cycle().take(len).collect();
        frame.resize(len, 0);
        backend.inbound.borrow_mut().push_back(frame);
    }
    let interrupt = RecordingInterrupt::new();
    let faults = GuestFaults::new("fuzz net rx");
    let mut pool = RxPool::new();
    let third = heads.len().div_ceil(3).max(1);
    for batch in heads.chunks(third).chain(std::iter::once(&[][..])) {
        for &h in batch {
            if builder.publish(u16::from(h) % QUEUE_SIZE).is_err() {
                return;
            }
        }
        // A ring error only ends the run (the device signals NEEDS_RESET).
        let Ok(run) = receive(
            &mut queue,
            &mem,
            &backend,
            &interrupt,
            config,
            &mut pool,
            &faults,
            None::<&mut RateLimiter>,
        ) else {
            return;
        };
        assert!(run.frames + run.dropped <= MAX_FRAMES_PER_RUN);
        assert!(run.queue.completed <= MAX_CHAINS_PER_RUN + usize::from(QUEUE_SIZE));
        assert!(pool.len() <= usize::from(QUEUE_SIZE));
        // (The used ring itself may be a buffer the guest posted, so its
        // entries are not checked here; the run's own figures are.)
        assert!(run.bytes <= run.frames as u64 * 70_000);
    }
});
