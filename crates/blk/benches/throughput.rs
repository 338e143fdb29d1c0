//! virtio-blk throughput: chitin's queue handler over a raw image file,
//! next to plain `pread`/`pwrite` of the same sizes on the same file.
//! Prints figures, asserts nothing.
//!
//! `cargo bench -p chitin-blk --bench throughput` runs, on a 256 MiB
//! temporary image:
//! - 1 MiB sequential writes, then 1 MiB sequential reads (MB/s);
//! - 4 KiB random reads at fixed-seed xorshift offsets (IOPS).
//!
//! Each case runs five times, alternating chitin and plain, and prints the
//! best pass of each.
//!
//! The chitin side builds real descriptor chains (header, one data buffer,
//! status) in anonymous guest memory once, then per batch rewrites the
//! headers' sectors, publishes the chains and runs the queue handler with a
//! `FileBackend`, exactly as the device does after a notification. The
//! image is in the page cache, so this measures the device's own cost, not
//! the disk.
//!
//! `cargo test --all-targets` runs this binary without `--bench`: it then
//! does one batch per case, to prove the bench still works.

#[allow(dead_code)]
#[path = "../src/test_utils.rs"]
mod test_utils;

use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use chitin_blk::{FileBackend, QueueHandler, ID_BYTES, QUEUE_SIZE};
use test_utils::{Desc, GuestQueue, RecordingInterrupt, TempImage};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

const IMAGE_SIZE: u64 = 256 << 20;
const BIG: u32 = 1 << 20;
const SMALL: u32 = 4 << 10;
/// Requests in flight per queue run: 3 descriptors each must fit the ring.
const BIG_BATCH: usize = 32;
const SMALL_BATCH: usize = 64;
/// 4 KiB random reads per full run.
const RANDOM_READS: usize = 64 * 1024;
const SEED: u64 = 0x2545_f491_4f6c_dd1d;
/// Timed passes per case under `cargo bench`; the best of each side counts.
const REPEATS: usize = 5;

/// Which way a case moves data.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

/// Prepared chains: `batch` requests of `len` bytes each.
struct Chains {
    guest: GuestQueue,
    queue: Queue,
    heads: Vec<u16>,
    headers: Vec<GuestAddress>,
    statuses: Vec<GuestAddress>,
}

impl Chains {
    fn new(op: Op, len: u32, batch: usize) -> Self {
        // Page-aligned buffers plus headers, statuses and gaps, plus the
        // rings.
        let mem_size = batch * (len as usize + 8192) + (1 << 20);
        let mut guest = GuestQueue::with_memory(mem_size, QUEUE_SIZE);
        let queue = guest.queue();
        let request_type = match op {
            Op::Read => VIRTIO_BLK_T_IN,
            Op::Write => VIRTIO_BLK_T_OUT,
        };
        let (mut heads, mut headers, mut statuses) = (vec![], vec![], vec![]);
        for i in 0..batch {
            let header = guest.header(request_type, 0);
            // Page-aligned, like a guest's page cache pages.
            let data = guest.alloc_aligned(len, 4096);
            let fill = vec![i as u8; len as usize];
            guest.memory().write_slice(&fill, data).unwrap();
            let status = guest.status_byte();
            let data = match op {
                Op::Read => Desc::writable(data, len),
                Op::Write => Desc::readable(data, len),
            };
            heads.push(guest.write_chain(&[
                Desc::readable(header, 16),
                data,
                Desc::writable(status, 1),
            ]));
            headers.push(header);
            statuses.push(status);
        }
        Chains {
            guest,
            queue,
            heads,
            headers,
            statuses,
        }
    }

    /// Submit one request per offset and run the handler until all are
    /// used. Returns how many did not complete with VIRTIO_BLK_S_OK.
    fn submit(
        &mut self,
        handler: &QueueHandler<FileBackend>,
        interrupt: &RecordingInterrupt,
        offsets: &[u64],
    ) -> usize {
        for (i, &offset) in offsets.iter().enumerate() {
            let sector = (offset / 512).to_le_bytes();
            let at = GuestAddress(self.headers[i].0 + 8);
            self.guest.memory().write_slice(&sector, at).unwrap();
            self.guest.publish(self.heads[i]);
        }
        let mut done = 0;
        while done < offsets.len() {
            let run = handler
                .process_queue(&mut self.queue, self.guest.memory(), interrupt)
                .expect("queue broke");
            done += run.completed;
        }
        self.statuses[..offsets.len()]
            .iter()
            .filter(|&&s| self.guest.read(s, 1)[0] != VIRTIO_BLK_S_OK as u8)
            .count()
    }
}

/// xorshift64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `count` offsets of `len`-byte requests: sequential from 0, or random
/// and `len`-aligned.
fn offsets(count: usize, len: u32, random: bool) -> Vec<u64> {
    let slots = IMAGE_SIZE / u64::from(len);
    let mut rng = Rng(SEED);
    (0..count as u64)
        .map(|i| {
            let slot = if random {
                rng.next() % slots
            } else {
                i % slots
            };
            slot * u64::from(len)
        })
        .collect()
}

fn chitin(
    handler: &QueueHandler<FileBackend>,
    op: Op,
    len: u32,
    batch: usize,
    offsets: &[u64],
) -> (Duration, usize) {
    let mut chains = Chains::new(op, len, batch);
    let interrupt = RecordingInterrupt::default();
    let mut failed = 0;
    let start = Instant::now();
    for group in offsets.chunks(batch) {
        failed += chains.submit(handler, &interrupt, group);
    }
    (start.elapsed(), failed)
}

/// The same transfers with `pread`/`pwrite`, cycling through as many
/// buffers as the chitin side has in flight, so both touch the same amount
/// of memory (a single hot buffer would stay in the CPU cache).
fn plain(file: &File, op: Op, len: u32, batch: usize, offsets: &[u64]) -> Duration {
    let mut bufs = vec![vec![0x3cu8; len as usize]; batch];
    let start = Instant::now();
    for (i, &offset) in offsets.iter().enumerate() {
        let buf = &mut bufs[i % batch];
        match op {
            Op::Read => file.read_exact_at(buf, offset).unwrap(),
            Op::Write => file.write_all_at(buf, offset).unwrap(),
        }
        black_box(buf);
    }
    start.elapsed()
}

fn report(name: &str, len: u32, ops: usize, chitin: Duration, plain: Duration, failed: usize) {
    // `failed` counts requests that did not return VIRTIO_BLK_S_OK over
    // all passes: it should be 0.
    let bytes = len as f64 * ops as f64;
    let mbps = |d: Duration| bytes / d.as_secs_f64() / 1e6;
    let iops = |d: Duration| ops as f64 / d.as_secs_f64();
    println!(
        "{name:<18} chitin {:>9.0} MB/s {:>10.0} IOPS   plain {:>9.0} MB/s {:>10.0} IOPS   chitin/plain {:.2}{}",
        mbps(chitin),
        iops(chitin),
        mbps(plain),
        iops(plain),
        plain.as_secs_f64() / chitin.as_secs_f64(),
        if failed > 0 {
            format!("   ({failed} requests FAILED)")
        } else {
            String::new()
        },
    );
}

fn main() {
    let full = std::env::args().any(|arg| arg == "--bench");
    let image = TempImage::sparse(IMAGE_SIZE);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(image.path())
        .unwrap();
    let handler = QueueHandler::new(
        FileBackend::new(file.try_clone().unwrap()).unwrap(),
        false,
        [0; ID_BYTES],
    );
    let (big_ops, small_ops) = if full {
        ((IMAGE_SIZE / u64::from(BIG)) as usize, RANDOM_READS)
    } else {
        (BIG_BATCH, SMALL_BATCH)
    };
    println!(
        "virtio-blk over a {} MiB image at {}",
        IMAGE_SIZE >> 20,
        image.path().display()
    );
    if !full {
        println!("smoke run (no --bench): one batch per case, figures are not meaningful");
    }

    // Fill the image first (untimed), so every timed pass finds allocated,
    // cached blocks rather than holes.
    let sequential = offsets(big_ops, BIG, false);
    plain(&file, Op::Write, BIG, 1, &sequential);

    let repeats = if full { REPEATS } else { 1 };
    let random = offsets(small_ops, SMALL, true);
    let cases = [
        ("seq write 1 MiB", Op::Write, BIG, BIG_BATCH, &sequential),
        ("seq read 1 MiB", Op::Read, BIG, BIG_BATCH, &sequential),
        ("rand read 4 KiB", Op::Read, SMALL, SMALL_BATCH, &random),
    ];
    for (name, op, len, batch, offsets) in cases {
        // Alternate the two sides and keep the best of each, so neither
        // gains from running second (warmer caches) or from noise.
        let (mut best_chitin, mut best_plain, mut failed) = (Duration::MAX, Duration::MAX, 0);
        for _ in 0..repeats {
            let (c, f) = chitin(&handler, op, len, batch, offsets);
            best_chitin = best_chitin.min(c);
            failed += f;
            best_plain = best_plain.min(plain(&file, op, len, batch, offsets));
        }
        report(name, len, offsets.len(), best_chitin, best_plain, failed);
    }
}
