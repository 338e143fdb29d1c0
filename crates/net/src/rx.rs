//! The RX path: frames from the backend straight into the guest's receive
//! buffers, one `readv` per frame, with no host-side queue.
//!
//! Before each read the device holds enough posted buffers for the
//! largest frame the backend can hand over ([`RxConfig::need`]): one
//! chain without mergeable buffers, as many chains as it takes with them
//! (`VIRTIO_NET_F_MRG_RXBUF`, virtio 1.2 §5.1.6.4), or the whole ring if
//! it holds less. Chains a frame did not fill stay held ([`RxPool`]) for
//! the next one; none goes back to the ring. When the guest has not
//! posted enough, nothing is read: the frame stays in the backend (the
//! tap's own queue is the only buffer), the queue's notifications are
//! turned on, and the run reports [`RxRun::starved`] so the device stops
//! watching the backend until the guest adds buffers.
//!
//! A chain with a device-readable descriptor or a buffer outside guest
//! memory is returned used with length 0 and counted; without mergeable
//! buffers a chain too small for [`RxConfig::need`] is treated the same,
//! since a frame read into it could be lost. The header the driver sees
//! carries only what it accepted: checksum flags are cleared without
//! `GUEST_CSUM`, and a segmented frame without a GUEST segmentation
//! offload is dropped.

use std::io;

use std::collections::VecDeque;

use chitin_virtio::queue::{has_available, next_chain, notify, QueueError, QueueRun};
use chitin_virtio::rate_limit::{Clock, RateLimiter};
use chitin_virtio::{GuestFaults, Severity, VirtioInterrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use crate::backend::NetBackend;
use crate::VNET_HDR_LEN;

/// Most frames one [`receive`] call delivers before it yields with
/// [`RxRun::pending`], so a flood cannot hold the event loop.
pub const MAX_FRAMES_PER_RUN: usize = 64;

/// Times one run looks again for buffers that came as it ran out.
const MAX_RECHECKS: usize = 4;

/// Most buffers one frame is read into, summed over the chains gathered
/// for it: half the kernel's 1024 iovecs per `readv`, as a buffer crossing
/// a guest memory region boundary becomes two. A chain that would take a
/// frame past it is refused, so neither the gathered list nor the read
/// grows with what the guest posts.
pub const MAX_RX_BUFFERS: usize = 512;

/// Offset of `num_buffers` in `virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

/// How the driver set up its receive buffers and what it accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RxConfig {
    /// `VIRTIO_NET_F_MRG_RXBUF` was accepted.
    pub mergeable: bool,
    /// Bytes (header included) the largest frame can take: 1526, or 65562
    /// once a segmentation offload is on.
    pub need: usize,
    /// `VIRTIO_NET_F_GUEST_CSUM` was accepted: checksum flags pass.
    pub csum: bool,
    /// A GUEST segmentation offload was accepted: segmented frames pass.
    pub segmentation: bool,
}

/// What one [`receive`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RxRun {
    /// Frames delivered.
    pub frames: usize,
    /// Their bytes, headers included.
    pub bytes: u64,
    /// The guest has too few buffers posted: stop reading the backend
    /// until the queue is notified (notifications are on).
    pub starved: bool,
    /// The run stopped at its bound with the backend maybe not empty.
    pub pending: bool,
    /// The limiter holds further frames back until its timer.
    pub throttled: bool,
    /// Frames the backend lost because they did not fit what was
    /// gathered for them (a tap whose MTU is larger than the guest's).
    pub dropped: usize,
    /// The backend failed a read for a reason other than being empty or
    /// a frame not fitting; the run stopped there.
    pub read_error: Option<io::ErrorKind>,
    /// Chains returned, and whether the driver was interrupted.
    pub queue: QueueRun,
}

/// One posted chain: its head and its checked writable buffers.
#[derive(Debug)]
struct RxChain {
    head: u16,
    bufs: Vec<(GuestAddress, usize)>,
    room: usize,
}

/// Receive chains the device took from the available ring and holds until
/// frames fill them (a device may hold buffers as long as it likes). They
/// are never given back to the ring, so no chain is ever taken twice and
/// the driver's view of what the device has seen stays exact (which the
/// event index of `VIRTIO_F_EVENT_IDX` needs). At most what one frame
/// needs is held, or the whole ring when the ring cannot hold more; a
/// reset drops them all.
#[derive(Debug, Default)]
pub struct RxPool {
    chains: VecDeque<RxChain>,
    room: usize,
    buffers: usize,
}

impl RxPool {
    /// An empty pool.
    pub fn new() -> Self {
        Self::default()
    }

    /// Chains held.
    pub fn len(&self) -> usize {
        self.chains.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty()
    }

    /// Forget every chain (the device was reset).
    pub fn clear(&mut self) {
        self.chains.clear();
        self.room = 0;
        self.buffers = 0;
    }

    fn push(&mut self, chain: RxChain) {
        self.room = self.room.saturating_add(chain.room);
        self.buffers += chain.bufs.len();
        self.chains.push_back(chain);
    }

    fn pop(&mut self) -> Option<RxChain> {
        let chain = self.chains.pop_front()?;
        self.room -= chain.room;
        self.buffers -= chain.bufs.len();
        Some(chain)
    }
}

/// Why a posted chain cannot take a frame.
#[derive(Clone, Copy)]
enum BadChain {
    Readable,
    OutOfMemory,
    TooSmall,
    TooManyBuffers,
}

impl BadChain {
    fn reason(self) -> &'static str {
        match self {
            BadChain::Readable => "device-readable RX descriptor",
            BadChain::OutOfMemory => "RX buffer outside guest memory",
            BadChain::TooSmall => "RX buffer smaller than the largest frame",
            BadChain::TooManyBuffers => "RX chain with too many buffers",
        }
    }
}

fn check_chain<M: GuestMemory>(
    chain: virtio_queue::DescriptorChain<&M>,
    mem: &M,
    config: RxConfig,
) -> Result<RxChain, (u16, BadChain)> {
    let head = chain.head_index();
    let mut bufs = Vec::new();
    let mut room = 0usize;
    for desc in chain {
        if !desc.is_write_only() {
            return Err((head, BadChain::Readable));
        }
        let len = desc.len() as usize;
        if len == 0 {
            continue;
        }
        if !mem.check_range(desc.addr(), len) {
            return Err((head, BadChain::OutOfMemory));
        }
        if bufs.len() == MAX_RX_BUFFERS {
            return Err((head, BadChain::TooManyBuffers));
        }
        bufs.push((desc.addr(), len));
        room = room.saturating_add(len);
    }
    // Without merging a chain takes the largest frame whole; with it, any
    // chain may start a frame, so it must hold the header.
    let least = if config.mergeable {
        VNET_HDR_LEN
    } else {
        config.need
    };
    if room < least {
        return Err((head, BadChain::TooSmall));
    }
    Ok(RxChain { head, bufs, room })
}

/// Write `bytes` at `offset` into the chain's buffers.
fn write_at<M: GuestMemory>(mem: &M, chain: &RxChain, mut offset: usize, mut bytes: &[u8]) {
    for &(addr, len) in &chain.bufs {
        if bytes.is_empty() {
            return;
        }
        if offset >= len {
            offset -= len;
            continue;
        }
        let n = (len - offset).min(bytes.len());
        // In guest memory: checked when the chain was gathered.
        let _ = mem.write_slice(&bytes[..n], addr.unchecked_add(offset as u64));
        bytes = &bytes[n..];
        offset = 0;
    }
}

/// Read `len` bytes at `offset` of the chain's buffers (zeros where the
/// read fails, which a checked chain never does).
fn read_at<M: GuestMemory>(mem: &M, chain: &RxChain, offset: usize, out: &mut [u8]) {
    let mut skip = offset;
    let mut at = 0;
    for &(addr, len) in &chain.bufs {
        if at == out.len() {
            return;
        }
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(out.len() - at);
        let _ = mem.read_slice(&mut out[at..at + n], addr.unchecked_add(skip as u64));
        at += n;
        skip = 0;
    }
}

/// Most chains one run returns in all (frames and refused chains), so a
/// driver that keeps posting bad chains cannot hold the event loop.
pub const MAX_CHAINS_PER_RUN: usize = 512;

/// Deliver frames from `backend` into the guest's posted buffers until
/// the backend is empty, the guest's buffers run out, the limiter says
/// stop (it is asked before each frame and charged after it), or the
/// run's bound. `pool` holds the chains taken from the ring but not yet
/// filled, from one run to the next.
#[allow(clippy::too_many_arguments)]
pub fn receive<M, T, I, C>(
    queue: &mut Queue,
    mem: &M,
    backend: &T,
    interrupt: &I,
    config: RxConfig,
    pool: &mut RxPool,
    faults: &GuestFaults,
    mut limiter: Option<&mut RateLimiter<C>>,
) -> Result<RxRun, QueueError>
where
    M: GuestMemory,
    T: NetBackend,
    I: VirtioInterrupt + ?Sized,
    C: Clock,
{
    let mut run = RxRun::default();
    if !queue.ready() {
        // A driver that never made the queue ready posts nothing: wait
        // (for a reset) without reading.
        run.starved = true;
        return Ok(run);
    }
    queue
        .disable_notification(mem)
        .map_err(QueueError::Notification)?;
    let ring = usize::from(queue.size());
    let mut rechecks = 0;
    'frames: while run.frames + run.dropped < MAX_FRAMES_PER_RUN {
        if run.queue.completed >= MAX_CHAINS_PER_RUN {
            run.pending = true;
            break;
        }
        if let Some(limiter) = limiter.as_deref_mut() {
            if !limiter.admit() {
                run.throttled = true;
                break;
            }
        }
        // Hold room for the largest frame, or the whole ring if it holds
        // less.
        while pool.room < config.need && (config.mergeable || pool.is_empty()) && pool.len() < ring
        {
            let Some(chain) = next_chain(queue, mem)? else {
                // Not enough posted: ask the driver to say when it adds
                // more. Buffers it added before seeing that request
                // brought no notification: look again, a few times.
                queue
                    .enable_notification(mem)
                    .map_err(QueueError::Notification)?;
                if has_available(queue, mem)? {
                    if rechecks < MAX_RECHECKS {
                        rechecks += 1;
                        queue
                            .disable_notification(mem)
                            .map_err(QueueError::Notification)?;
                        continue;
                    }
                    // A driver adding buffers without end: come back.
                    run.pending = true;
                } else {
                    run.starved = true;
                }
                break 'frames;
            };
            let checked = check_chain(chain, mem, config).and_then(|c| {
                // The held buffers stay within what one read may take.
                if pool.buffers + c.bufs.len() > MAX_RX_BUFFERS {
                    Err((c.head, BadChain::TooManyBuffers))
                } else {
                    Ok(c)
                }
            });
            match checked {
                Ok(c) => pool.push(c),
                Err((head, bad)) => {
                    faults.record(
                        Severity::Malformed,
                        bad.reason(),
                        &format_args!("head {head}"),
                    );
                    queue.add_used(mem, head, 0).map_err(QueueError::UsedRing)?;
                    run.queue.completed += 1;
                    if run.queue.completed >= MAX_CHAINS_PER_RUN {
                        run.pending = true;
                        break 'frames;
                    }
                }
            }
        }
        // The chains this frame may fill: as many as cover the largest
        // frame (all held buffers are within the cap).
        let mut take = 0;
        let mut room = 0;
        for chain in &pool.chains {
            if take > 0 && (room >= config.need || !config.mergeable) {
                break;
            }
            take += 1;
            room += chain.room;
        }
        let slices: Result<Vec<_>, _> = pool
            .chains
            .iter()
            .take(take)
            .flat_map(|c| c.bufs.iter())
            .flat_map(|&(addr, len)| mem.get_slices(addr, len))
            .collect();
        let read = match slices {
            Ok(slices) => backend.read_frame(&slices),
            Err(_) => Err(io::Error::from_raw_os_error(libc::EFAULT)),
        };
        let len = match read {
            Ok(len) if len >= VNET_HDR_LEN => len,
            // The frame was taken from the backend but did not fit (or
            // was shorter than a header): it is lost, the chains stay
            // held for the next one.
            Ok(_) => {
                run.dropped += 1;
                continue;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.raw_os_error() == Some(libc::EMSGSIZE) => {
                run.dropped += 1;
                continue;
            }
            Err(e) => {
                run.read_error = Some(e.kind());
                break;
            }
        };
        let Some(first) = pool.chains.front() else {
            break;
        };
        // The header as the driver may see it (virtio 1.2 §5.1.6.4.1):
        // no checksum flags without GUEST_CSUM, no segmented frame
        // without a GUEST segmentation offload (one queued in the tap
        // from before a reset is dropped).
        let mut header = [0u8; 2];
        read_at(mem, first, 0, &mut header);
        if !config.segmentation && header[1] != 0 {
            run.dropped += 1;
            continue;
        }
        if !config.csum && header[0] != 0 {
            write_at(mem, first, 0, &[0]);
        }
        // Spread the frame over the chains in order.
        let mut left = len;
        let mut used = Vec::with_capacity(take);
        for chain in pool.chains.iter().take(take) {
            if left == 0 {
                break;
            }
            let n = chain.room.min(left);
            used.push((chain.head, n));
            left -= n;
        }
        // At most MAX_RX_BUFFERS chains: fits a u16.
        let count = used.len() as u16;
        write_at(mem, first, NUM_BUFFERS_OFFSET, &count.to_le_bytes());
        for (head, n) in used {
            pool.pop();
            // `n` is at most the frame length, which fits a u32.
            queue
                .add_used(mem, head, n as u32)
                .map_err(QueueError::UsedRing)?;
            run.queue.completed += 1;
        }
        run.frames += 1;
        run.bytes += len as u64;
        if let Some(limiter) = limiter.as_deref_mut() {
            limiter.charge(len as u64);
        }
    }
    if run.frames + run.dropped == MAX_FRAMES_PER_RUN {
        run.pending = true;
    }
    notify(queue, mem, interrupt, &mut run.queue)?;
    Ok(run)
}

#[cfg(test)]
mod tests {
    use chitin_memory::GuestMemoryMmap;
    use chitin_virtio::test_utils::{
        guest_memory, RecordingInterrupt, SplitQueueBuilder, TestDescriptor,
    };
    use chitin_virtio::InterruptKind;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

    use super::*;
    use crate::backend::MemBackend;

    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const BUFS: u64 = 0x10_0000;
    const PLAIN: RxConfig = RxConfig {
        mergeable: false,
        need: 1526,
        csum: false,
        segmentation: false,
    };
    const MERGE: RxConfig = RxConfig {
        mergeable: true,
        ..PLAIN
    };

    struct Guest {
        mem: GuestMemoryMmap,
        builder: SplitQueueBuilder,
        queue: Queue,
        next: u64,
        backend: MemBackend,
        interrupt: RecordingInterrupt,
        faults: GuestFaults,
        pool: RxPool,
    }

    impl Guest {
        fn new() -> Self {
            Self::with_queue_size(256)
        }

        fn with_queue_size(size: u16) -> Self {
            let mem = guest_memory(0x100_0000);
            let builder = SplitQueueBuilder::new(&mem, GuestAddress(0), size).unwrap();
            let queue = builder.build().unwrap();
            Guest {
                mem,
                builder,
                queue,
                next: BUFS,
                backend: MemBackend::default(),
                interrupt: RecordingInterrupt::new(),
                faults: GuestFaults::new("net test"),
                pool: RxPool::new(),
            }
        }

        /// Post one chain of writable buffers of these sizes; returns
        /// their addresses.
        fn post(&mut self, sizes: &[u32]) -> Vec<u64> {
            let mut addrs = Vec::new();
            let descs: Vec<TestDescriptor> = sizes
                .iter()
                .enumerate()
                .map(|(i, &len)| {
                    let addr = self.next;
                    self.next += u64::from(len).next_multiple_of(0x1000);
                    addrs.push(addr);
                    let flags = if i + 1 < sizes.len() {
                        WRITE | NEXT
                    } else {
                        WRITE
                    };
                    TestDescriptor::new(addr, len, flags)
                })
                .collect();
            self.builder.add_chain(&descs).unwrap();
            addrs
        }

        fn receive(&mut self, config: RxConfig) -> RxRun {
            receive(
                &mut self.queue,
                &self.mem,
                &self.backend,
                &self.interrupt,
                config,
                &mut self.pool,
                &self.faults,
                None::<&mut RateLimiter>,
            )
            .unwrap()
        }

        fn receive_limited(&mut self, config: RxConfig, limiter: &mut RateLimiter) -> RxRun {
            receive(
                &mut self.queue,
                &self.mem,
                &self.backend,
                &self.interrupt,
                config,
                &mut self.pool,
                &self.faults,
                Some(limiter),
            )
            .unwrap()
        }

        fn read(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut buf = vec![0; len];
            self.mem.read_slice(&mut buf, GuestAddress(addr)).unwrap();
            buf
        }

        fn used(&self, i: u16) -> (u32, u32) {
            self.builder.used_element(i).unwrap()
        }
    }

    /// A frame as the tap gives it: zero header (num_buffers 0), then
    /// a recognisable body.
    fn frame(len: usize, seed: u8) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend((0..len - VNET_HDR_LEN).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)));
        f
    }

    fn with_num_buffers(mut f: Vec<u8>, n: u16) -> Vec<u8> {
        f[10..12].copy_from_slice(&n.to_le_bytes());
        f
    }

    #[test]
    fn a_limiter_stops_the_run_after_what_it_admits_and_the_frames_wait() {
        let mut g = Guest::new();
        for _ in 0..8 {
            g.post(&[1526]);
        }
        g.backend
            .inbound
            .borrow_mut()
            .extend((0..5).map(|i| frame(1000, i)));
        // 20 frames/s: the bucket holds two.
        let mut limiter = RateLimiter::new(chitin_virtio::RateLimit {
            bandwidth: None,
            ops: Some(chitin_virtio::Limit::per_second(
                std::num::NonZeroU64::new(20).unwrap(),
            )),
        })
        .unwrap();

        let run = g.receive_limited(PLAIN, &mut limiter);

        assert_eq!(run.frames, 2);
        assert!(run.throttled && !run.starved && !run.pending);
        assert!(limiter.is_throttled());
        assert_eq!(g.backend.inbound.borrow().len(), 3);
        // Throttled: nothing more until the timer.
        assert_eq!(g.receive_limited(PLAIN, &mut limiter).frames, 0);
    }

    #[test]
    fn a_frame_that_does_not_fit_is_counted_and_the_next_one_delivered() {
        let mut g = Guest::new();
        let a = g.post(&[1526])[0];
        g.backend
            .inbound
            .borrow_mut()
            .extend([frame(3000, 1), frame(100, 2)]);

        let run = g.receive(PLAIN);

        assert_eq!((run.frames, run.dropped), (1, 1));
        assert_eq!(run.read_error, None);
        assert_eq!(g.used(0), (0, 100));
        assert_eq!(g.read(a, 100), with_num_buffers(frame(100, 2), 1));
    }

    #[test]
    fn plain_buffers_take_one_frame_each_and_starve_without_reading_more() {
        let mut g = Guest::new();
        let a = g.post(&[1526])[0];
        let b = g.post(&[12, 1514]);
        let frames = [frame(100, 1), frame(1526, 2), frame(60, 3)];
        g.backend
            .inbound
            .borrow_mut()
            .extend(frames.iter().cloned());

        let run = g.receive(PLAIN);

        assert_eq!(run.frames, 2);
        assert!(run.starved && !run.pending);
        assert_eq!(run.queue.completed, 2);
        assert!(run.queue.notified);
        assert_eq!(g.interrupt.count(InterruptKind::Queue), 1);
        assert_eq!(g.used(0), (0, 100));
        assert_eq!(g.used(1), (1, 1526));
        assert_eq!(g.read(a, 100), with_num_buffers(frames[0].clone(), 1));
        let mut second = g.read(b[0], 12);
        second.extend(g.read(b[1], 1514));
        assert_eq!(second, with_num_buffers(frames[1].clone(), 1));
        // The third frame was never read: it waits in the backend.
        assert_eq!(g.backend.inbound.borrow().len(), 1);

        // The guest posts a buffer: the next run delivers it.
        let c = g.post(&[1526])[0];
        let run = g.receive(PLAIN);
        assert_eq!(run.frames, 1);
        // Out of buffers again (whether or not more frames wait).
        assert!(run.starved);
        assert!(g.backend.inbound.borrow().is_empty());
        assert_eq!(g.read(c, 60), with_num_buffers(frames[2].clone(), 1));
    }

    #[test]
    fn mergeable_frames_span_chains_and_unfilled_chains_go_back() {
        let mut g = Guest::new();
        let chains: Vec<u64> = (0..4).map(|_| g.post(&[1000])[0]).collect();
        let frames = [frame(1400, 7), frame(900, 8), frame(200, 9)];
        g.backend
            .inbound
            .borrow_mut()
            .extend(frames.iter().cloned());

        let run = g.receive(MERGE);

        // Frame 1: chains 0 and 1. Frame 2: chains 2 and 3 gathered, only
        // 2 used, 3 given back. Frame 3: chain 3 alone is too little room.
        assert_eq!(run.frames, 2);
        assert!(run.starved);
        assert_eq!(g.used(0), (0, 1000));
        assert_eq!(g.used(1), (1, 400));
        assert_eq!(g.used(2), (2, 900));
        assert_eq!(g.builder.used_idx().unwrap(), 3);
        let mut first = g.read(chains[0], 1000);
        first.extend(g.read(chains[1], 400));
        assert_eq!(first, with_num_buffers(frames[0].clone(), 2));
        assert_eq!(
            g.read(chains[2], 900),
            with_num_buffers(frames[1].clone(), 1)
        );
        // Chain 3 untouched.
        assert_eq!(g.read(chains[3], 1000), vec![0; 1000]);
        assert_eq!(g.backend.inbound.borrow().len(), 1);

        // One more buffer makes room: chain 3 takes the frame.
        g.post(&[1000]);
        let run = g.receive(MERGE);
        assert_eq!(run.frames, 1);
        assert_eq!(g.used(3), (3, 200));
        assert_eq!(
            g.read(chains[3], 200),
            with_num_buffers(frames[2].clone(), 1)
        );
    }

    #[test]
    fn bad_chains_are_returned_empty_and_counted() {
        let mut g = Guest::new();
        // Readable descriptor; outside memory; too small without merging.
        g.builder
            .add_chain(&[TestDescriptor::new(BUFS, 1526, 0)])
            .unwrap();
        g.builder
            .add_chain(&[TestDescriptor::new(0xfff_0000, 0x10_0000, WRITE)])
            .unwrap();
        g.post(&[1000]);
        let good = g.post(&[1526])[0];
        let f = frame(500, 4);
        g.backend.inbound.borrow_mut().push_back(f.clone());

        let run = g.receive(PLAIN);

        assert_eq!(run.frames, 1);
        assert_eq!(run.queue.completed, 4);
        for i in 0..3 {
            assert_eq!(g.used(i), (u32::from(i), 0));
        }
        assert_eq!(g.used(3), (3, 500));
        assert_eq!(g.read(good, 500), with_num_buffers(f, 1));
        assert_eq!(g.faults.malformed(), 3);
    }

    #[test]
    fn an_empty_backend_holds_one_chain_and_returns_none() {
        let mut g = Guest::new();
        g.post(&[1526]);
        g.post(&[1526]);
        let run = g.receive(PLAIN);
        assert_eq!(run, RxRun::default());
        assert_eq!(g.queue.next_avail(), 1);
        assert_eq!(g.pool.len(), 1);
        assert_eq!(g.builder.used_idx().unwrap(), 0);
        // Held, not taken twice: the next frame lands in it.
        g.backend.inbound.borrow_mut().push_back(frame(80, 3));
        let run = g.receive(PLAIN);
        assert_eq!(run.frames, 1);
        assert_eq!(g.used(0), (0, 80));
    }

    #[test]
    fn a_flood_yields_after_a_bounded_run() {
        let mut g = Guest::new();
        for _ in 0..200 {
            g.post(&[1526]);
        }
        for i in 0..100 {
            g.backend.inbound.borrow_mut().push_back(frame(64, i));
        }
        let run = g.receive(PLAIN);
        assert_eq!(run.frames, MAX_FRAMES_PER_RUN);
        assert!(run.pending);
        let run = g.receive(PLAIN);
        assert_eq!(run.frames, 100 - MAX_FRAMES_PER_RUN);
        assert!(!run.pending && !run.starved);
    }

    #[test]
    fn chains_past_the_buffer_cap_are_refused_and_the_frame_still_lands() {
        let mut g = Guest::with_queue_size(2048);
        // Head 0: one chain of more buffers than a frame may take.
        g.post(&vec![1; MAX_RX_BUFFERS + 1]);
        // Head 513: 400 buffers, 800 bytes; head 913: 200 more buffers
        // would take the frame past the cap; head 1113: one buffer.
        g.post(&vec![2; 400]);
        g.post(&vec![8; 200]);
        g.post(&[2000]);
        let f = frame(1000, 5);
        g.backend.inbound.borrow_mut().push_back(f.clone());

        let run = g.receive(MERGE);

        assert_eq!(run.frames, 1);
        assert_eq!(g.faults.count("RX chain with too many buffers"), 2);
        assert_eq!(g.used(0), (0, 0));
        assert_eq!(g.used(1), (913, 0));
        assert_eq!(g.used(2), (513, 800));
        assert_eq!(g.used(3), (1113, 200));
        assert!(g.backend.inbound.borrow().is_empty());
    }

    #[test]
    fn too_little_posted_room_starves_at_once_and_reads_nothing() {
        // Mergeable, 64 KiB frames possible, 8 KiB posted: must not spin.
        let mut g = Guest::new();
        for _ in 0..8 {
            g.post(&[1024]);
        }
        g.backend.inbound.borrow_mut().push_back(frame(64, 1));
        let config = RxConfig {
            need: 65_562,
            ..MERGE
        };
        let run = g.receive(config);
        assert!(run.starved);
        assert_eq!(run.frames, 0);
        // Every posted chain is held, none returned.
        assert_eq!(g.pool.len(), 8);
        assert_eq!(g.builder.used_idx().unwrap(), 0);
        assert_eq!(g.backend.inbound.borrow().len(), 1);
        // More buffers, enough room: the frame lands in the first held one.
        for _ in 0..60 {
            g.post(&[1024]);
        }
        let run = g.receive(config);
        assert_eq!(run.frames, 1);
        assert_eq!(g.used(0), (0, 64));
    }

    #[test]
    fn a_ring_too_small_for_the_largest_frame_still_delivers() {
        // 8 entries of 1 KiB cannot hold 64 KiB: the whole ring is used.
        let mut g = Guest::with_queue_size(8);
        for _ in 0..8 {
            g.post(&[1024]);
        }
        g.backend.inbound.borrow_mut().push_back(frame(1500, 2));
        let run = g.receive(RxConfig {
            need: 65_562,
            ..MERGE
        });
        assert_eq!(run.frames, 1);
        assert_eq!((g.used(0), g.used(1)), ((0, 1024), (1, 476)));
    }

    #[test]
    fn the_header_carries_only_what_the_driver_accepted() {
        let mut g = Guest::new();
        let a = g.post(&[1526])[0];
        g.post(&[1526]);
        let mut csum = frame(100, 1);
        csum[0] = 2; // VIRTIO_NET_HDR_F_DATA_VALID
        let mut gso = frame(200, 2);
        gso[1] = 1; // VIRTIO_NET_HDR_GSO_TCPV4
        g.backend.inbound.borrow_mut().extend([gso, csum.clone()]);

        let run = g.receive(PLAIN);

        // The segmented frame is dropped; the flags are cleared.
        assert_eq!((run.frames, run.dropped), (1, 1));
        assert_eq!(g.used(0), (0, 100));
        csum[0] = 0;
        assert_eq!(g.read(a, 100), with_num_buffers(csum, 1));
    }

    #[test]
    fn a_queue_never_made_ready_starves_the_reader() {
        let mut g = Guest::new();
        g.queue.set_ready(false);
        g.backend.inbound.borrow_mut().push_back(frame(64, 1));
        let run = g.receive(PLAIN);
        assert!(run.starved);
        assert_eq!(g.backend.inbound.borrow().len(), 1);
    }
}
