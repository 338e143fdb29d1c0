//! The TX path: each chain of the transmit queue parsed ([`parse_tx`]) and
//! written to the backend with one `writev`, straight from guest memory.
//!
//! A chain the parser refuses is dropped, counted in the fault table with
//! its reason, and returned; a write the backend refuses (the interface is
//! down, its queue full) drops the frame too, counted as a backend drop.
//! Used length is always 0: the device writes nothing into TX buffers.
//! With a rate limiter, a frame the limiter holds back is left in the
//! ring (the chain is given back, unread by the backend) and the run
//! stops with [`TxRun::throttled`]; the limiter's timer brings it back.

use chitin_virtio::queue::{has_available, next_chain, notify, QueueError, QueueRun};
use chitin_virtio::rate_limit::{Clock, RateLimiter};
use chitin_virtio::{GuestFaults, Severity, VirtioInterrupt};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

use crate::backend::NetBackend;
use crate::frame::parse_tx;

/// Most chains one [`transmit`] call takes before it yields with
/// [`TxRun::pending`].
pub const MAX_FRAMES_PER_RUN: usize = 64;

/// What one [`transmit`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TxRun {
    /// Frames the backend took.
    pub frames: usize,
    /// Their bytes, headers included.
    pub bytes: u64,
    /// Chains refused by the parser.
    pub malformed: usize,
    /// Frames the backend refused.
    pub backend_drops: usize,
    /// The run stopped at its bound with chains left.
    pub pending: bool,
    /// The limiter held a frame back; it stays in the ring.
    pub throttled: bool,
    /// Chains returned, and whether the driver was interrupted.
    pub queue: QueueRun,
}

/// Send the queue's chains through `backend`.
#[allow(clippy::too_many_arguments)]
pub fn transmit<M, T, I, C>(
    queue: &mut Queue,
    mem: &M,
    backend: &T,
    interrupt: &I,
    acked_features: u64,
    faults: &GuestFaults,
    mut limiter: Option<&mut RateLimiter<C>>,
) -> Result<TxRun, QueueError>
where
    M: GuestMemory,
    T: NetBackend,
    I: VirtioInterrupt + ?Sized,
    C: Clock,
{
    let mut run = TxRun::default();
    if !queue.ready() {
        return Ok(run);
    }
    queue
        .disable_notification(mem)
        .map_err(QueueError::Notification)?;
    loop {
        if run.queue.completed >= MAX_FRAMES_PER_RUN {
            run.pending = has_available(queue, mem)?;
            if run.pending {
                break;
            }
        }
        let Some(chain) = next_chain(queue, mem)? else {
            // Re-enable notifications, with a last look for chains that
            // came meanwhile.
            if queue
                .enable_notification(mem)
                .map_err(QueueError::Notification)?
            {
                queue
                    .disable_notification(mem)
                    .map_err(QueueError::Notification)?;
                continue;
            }
            break;
        };
        let head = chain.head_index();
        match parse_tx(chain, acked_features) {
            Err(e) => {
                faults.record(Severity::Malformed, e.reason(), &e);
                run.malformed += 1;
                // A refused chain is still an operation: it cannot get
                // around the limit.
                if let Some(limiter) = limiter.as_deref_mut() {
                    limiter.charge(0);
                }
            }
            Ok(frame) => {
                if let Some(limiter) = limiter.as_deref_mut() {
                    if !limiter.consume(frame.len as u64) {
                        queue.go_to_previous_position();
                        run.throttled = true;
                        break;
                    }
                }
                let slices: Result<Vec<_>, _> = frame
                    .segments
                    .iter()
                    .flat_map(|&(addr, len)| mem.get_slices(addr, len as usize))
                    .collect();
                let written = match slices {
                    Ok(slices) => backend.write_frame(&frame.header.to_bytes(), &slices).ok(),
                    Err(_) => None,
                };
                if written.is_some() {
                    run.frames += 1;
                    run.bytes += frame.len as u64;
                } else {
                    run.backend_drops += 1;
                }
            }
        }
        queue.add_used(mem, head, 0).map_err(QueueError::UsedRing)?;
        run.queue.completed += 1;
    }
    notify(queue, mem, interrupt, &mut run.queue)?;
    Ok(run)
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU64;

    use chitin_virtio::rate_limit::{Limit, MonotonicClock, RateLimit};
    use chitin_virtio::test_utils::{
        guest_memory, RecordingInterrupt, SplitQueueBuilder, TestDescriptor,
    };
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::backend::MemBackend;
    use crate::VNET_HDR_LEN;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const DATA: u64 = 0x10_0000;

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend((0..len - VNET_HDR_LEN).map(|i| (i as u8) ^ seed));
        f
    }

    struct Guest {
        mem: chitin_memory::GuestMemoryMmap,
        builder: SplitQueueBuilder,
        queue: Queue,
        next: u64,
    }

    impl Guest {
        fn new() -> Self {
            let mem = guest_memory(0x100_0000);
            let builder = SplitQueueBuilder::new(&mem, GuestAddress(0), 256).unwrap();
            let queue = builder.build().unwrap();
            Guest {
                mem,
                builder,
                queue,
                next: DATA,
            }
        }

        /// Queue `bytes` as a chain split at `splits`.
        fn send(&mut self, bytes: &[u8], splits: &[usize]) {
            let mut cuts = vec![0];
            cuts.extend_from_slice(splits);
            cuts.push(bytes.len());
            let mut descs = Vec::new();
            for (i, w) in cuts.windows(2).enumerate() {
                let addr = self.next;
                self.mem
                    .write_slice(&bytes[w[0]..w[1]], GuestAddress(addr))
                    .unwrap();
                self.next += ((w[1] - w[0]) as u64).next_multiple_of(0x1000).max(0x1000);
                let flags = if i + 2 < cuts.len() { NEXT } else { 0 };
                descs.push(TestDescriptor::new(addr, (w[1] - w[0]) as u32, flags));
            }
            self.builder.add_chain(&descs).unwrap();
        }
    }

    fn run(g: &mut Guest, backend: &MemBackend, limiter: Option<&mut RateLimiter>) -> TxRun {
        let interrupt = RecordingInterrupt::new();
        let faults = GuestFaults::new("net test");
        transmit(
            &mut g.queue,
            &g.mem,
            backend,
            &interrupt,
            0,
            &faults,
            limiter,
        )
        .unwrap()
    }

    #[test]
    fn frames_reach_the_backend_byte_exact_and_bad_ones_are_dropped() {
        let mut g = Guest::new();
        let backend = MemBackend::default();
        let a = frame(100, 1);
        let b = frame(1514, 2);
        g.send(&a, &[]);
        g.send(&b, &[5, 12, 700]);
        // Too short, then a device-writable descriptor.
        g.send(&frame(20, 3), &[]);
        g.builder
            .add_chain(&[TestDescriptor::new(DATA, 100, VRING_DESC_F_WRITE as u16)])
            .unwrap();
        let c = frame(60, 4);
        g.send(&c, &[]);

        let interrupt = RecordingInterrupt::new();
        let faults = GuestFaults::new("net test");
        let run = transmit::<_, _, _, MonotonicClock>(
            &mut g.queue,
            &g.mem,
            &backend,
            &interrupt,
            0,
            &faults,
            None,
        )
        .unwrap();

        assert_eq!(run.frames, 3);
        assert_eq!(run.malformed, 2);
        assert_eq!(run.queue.completed, 5);
        assert!(run.queue.notified);
        assert_eq!(*backend.outbound.borrow(), vec![a, b, c]);
        assert_eq!(faults.malformed(), 2);
        // Heads are descriptor indexes: the second chain took four.
        for (i, head) in [0, 1, 5, 6, 7].into_iter().enumerate() {
            assert_eq!(g.builder.used_element(i as u16).unwrap(), (head, 0));
        }
    }

    #[test]
    fn a_limited_queue_stops_with_the_frame_left_in_the_ring() {
        let mut g = Guest::new();
        let backend = MemBackend::default();
        for i in 0..3 {
            g.send(&frame(60, i), &[]);
        }
        // 1000 bytes/s: a 100-byte bucket takes one 60-byte frame.
        let limit = RateLimit {
            bandwidth: Some(Limit::per_second(NonZeroU64::new(1000).unwrap())),
            ops: None,
        };
        let mut limiter = RateLimiter::new(limit).unwrap();

        let first = run(&mut g, &backend, Some(&mut limiter));

        assert_eq!(first.frames, 1);
        assert!(first.throttled);
        assert_eq!(g.queue.next_avail(), 1);
        assert_eq!(backend.outbound.borrow().len(), 1);
        // Still throttled: nothing more goes, nothing is lost.
        let again = run(&mut g, &backend, Some(&mut limiter));
        assert_eq!(again.frames, 0);
        assert!(again.throttled);
        assert_eq!(g.queue.next_avail(), 1);
    }

    #[test]
    fn a_busy_queue_yields_after_a_bounded_run() {
        let mut g = Guest::new();
        let backend = MemBackend::default();
        for i in 0..100 {
            g.send(&frame(60, i), &[]);
        }
        let first = run(&mut g, &backend, None);
        assert_eq!(first.frames, MAX_FRAMES_PER_RUN);
        assert!(first.pending);
        let second = run(&mut g, &backend, None);
        assert_eq!(second.frames, 100 - MAX_FRAMES_PER_RUN);
        assert!(!second.pending);
    }
}
