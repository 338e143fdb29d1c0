//! virtio-net device-side throughput, no guest: chitin's TX and RX paths
//! between a mock guest's queues and a real tap, next to a plain loop of
//! `write(2)`/`read(2)` on the same tap (the physical limit). Prints
//! figures, asserts nothing.
//!
//! `cargo bench -p chitin-net --bench throughput` (as root: it makes a
//! network namespace of its own with the tap in it, so no frame leaves)
//! runs, for 64 B, 1500 B and 64 KiB frames (the last a TCP segmentation
//! request, as a guest with TSO sends and receives them):
//! - TX: chains of one buffer (header and frame) published in batches of
//!   64 and sent with `transmit`, vs `write` of the same bytes;
//! - RX (64 B and 1500 B): a sender thread pumps frames into the
//!   interface through a packet socket; chitin's `receive` into mergeable
//!   4 KiB guest buffers (re-posted as a driver does) vs `read` into one
//!   buffer, each for a fixed time. (A packet socket's 64 KiB segments
//!   are marked untrusted and cut to 1500 B before a tap, so there is no
//!   64 KiB RX row.)
//!
//! Each figure is the best of three passes, chitin and plain alternating.
//! Without root (no namespace, no tap) it says it did not run. Under
//! `cargo test --all-targets` (no `--bench`) it does one short pass.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitin_net::{receive, transmit, Offloads, RxConfig, RxPool, Tap, VNET_HDR_LEN};
use chitin_virtio::rate_limit::{MonotonicClock, RateLimiter};
use chitin_virtio::test_utils::{
    guest_memory, RecordingInterrupt, SplitQueueBuilder, TestDescriptor,
};
use chitin_virtio::GuestFaults;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::{Bytes, GuestAddress};

const TAP: &str = "chitin-b0";
const SIZES: [usize; 3] = [64, 1500, 65_536];
const RX_SIZES: [usize; 2] = [64, 1500];
const BATCH: u16 = 64;
/// Guest RX buffers: mergeable, 4 KiB each, the whole ring posted.
const RX_BUF: u32 = 4096;
const RING: u16 = 256;

fn socket(domain: libc::c_int, kind: libc::c_int, protocol: libc::c_int) -> OwnedFd {
    // SAFETY: socket takes integers; the result is checked before use.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

/// Bring `name` up.
fn set_up(name: &str) {
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    let sock = socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
    // SAFETY: both requests read and write one ifreq, alive for the calls;
    // the flags member is the one SIOCGIFFLAGS filled.
    unsafe {
        assert_eq!(
            libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req),
            0
        );
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(
            libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req),
            0
        );
    }
}

/// An Ethernet + IPv4 + TCP frame of `len` bytes (to a MAC nobody has),
/// and its `virtio_net_hdr`: a TCP segmentation request with a partial
/// checksum when it is longer than one 1500-byte packet.
fn frame(len: usize) -> ([u8; VNET_HDR_LEN], Vec<u8>) {
    let mut f = vec![0u8; len];
    f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    let mut header = [0u8; VNET_HDR_LEN];
    if len < 54 {
        // Too short for IP: an experimental ethertype.
        f[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
        return (header, f);
    }
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (len - 14).min(65_535) as u16;
    f[14] = 0x45;
    f[16..18].copy_from_slice(&ip_len.to_be_bytes());
    f[22] = 64;
    f[23] = 6;
    f[26..30].copy_from_slice(&[10, 9, 0, 1]);
    f[30..34].copy_from_slice(&[10, 9, 0, 2]);
    // IPv4 header checksum.
    let mut sum = 0u32;
    for pair in f[14..34].chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    f[24..26].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f[34..36].copy_from_slice(&5001u16.to_be_bytes());
    f[36..38].copy_from_slice(&5002u16.to_be_bytes());
    f[46] = 0x50;
    f[47] = 0x18;
    f[48..50].copy_from_slice(&0xffffu16.to_be_bytes());
    if len > 1514 {
        header[0] = 1; // NEEDS_CSUM
        header[1] = 1; // GSO_TCPV4
        header[2..4].copy_from_slice(&54u16.to_le_bytes());
        header[4..6].copy_from_slice(&1448u16.to_le_bytes());
        header[6..8].copy_from_slice(&34u16.to_le_bytes());
        header[8..10].copy_from_slice(&16u16.to_le_bytes());
    }
    (header, f)
}

struct Figure {
    frames: u64,
    bytes: u64,
    elapsed: Duration,
}

impl Figure {
    fn fps(&self) -> f64 {
        self.frames as f64 / self.elapsed.as_secs_f64()
    }
    fn mbps(&self) -> f64 {
        self.bytes as f64 / 1e6 / self.elapsed.as_secs_f64()
    }
}

fn tx_chitin(tap: &Tap, len: usize, frames: u64) -> Figure {
    let (header, body) = frame(len);
    let mem = guest_memory(16 << 20);
    let mut queue_mem = SplitQueueBuilder::new(&mem, GuestAddress(0), RING).unwrap();
    let base = 0x10_0000u64;
    let stride = (VNET_HDR_LEN + len).next_multiple_of(4096) as u64;
    let mut heads = Vec::new();
    for i in 0..u64::from(BATCH) {
        let at = base + i * stride;
        mem.write_slice(&header, GuestAddress(at)).unwrap();
        mem.write_slice(&body, GuestAddress(at + VNET_HDR_LEN as u64))
            .unwrap();
        let desc = TestDescriptor::new(at, (VNET_HDR_LEN + len) as u32, 0);
        queue_mem.write_descriptor(i as u16, desc).unwrap();
        heads.push(i as u16);
    }
    let mut queue = queue_mem.build().unwrap();
    let interrupt = RecordingInterrupt::new();
    let faults = GuestFaults::new("bench");
    let acked = (1 << VIRTIO_NET_F_CSUM) | (1 << VIRTIO_NET_F_HOST_TSO4) | (1u64 << 32);
    let (mut sent, mut bytes) = (0u64, 0u64);
    let start = Instant::now();
    while sent < frames {
        for &h in &heads {
            queue_mem.publish(h).unwrap();
        }
        let mut done = 0;
        while done < usize::from(BATCH) {
            let run = transmit::<_, _, _, MonotonicClock>(
                &mut queue, &mem, tap, &interrupt, acked, &faults, None,
            )
            .unwrap();
            done += run.queue.completed;
            sent += run.frames as u64;
            bytes += run.bytes;
            assert_eq!(run.malformed, 0, "{:?}", faults.counts());
        }
    }
    Figure {
        frames: sent,
        bytes,
        elapsed: start.elapsed(),
    }
}

fn tx_plain(tap: &Tap, len: usize, frames: u64) -> Figure {
    let (header, body) = frame(len);
    let mut buf = header.to_vec();
    buf.extend_from_slice(&body);
    let start = Instant::now();
    let (mut sent, mut bytes) = (0u64, 0u64);
    for _ in 0..frames {
        // SAFETY: `buf` is readable for its length.
        let n = unsafe { libc::write(tap.as_raw_fd(), buf.as_ptr().cast(), buf.len()) };
        if n > 0 {
            sent += 1;
            bytes += n as u64;
        }
    }
    Figure {
        frames: sent,
        bytes,
        elapsed: start.elapsed(),
    }
}

/// Pump `len`-byte frames into the tap's interface until `stop`.
fn pump(len: usize, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Result<(), String>> {
    std::thread::spawn(move || {
        let protocol = (libc::ETH_P_ALL as u16).to_be() as libc::c_int;
        let sock = socket(libc::AF_PACKET, libc::SOCK_RAW, protocol);
        let on: libc::c_int = 1;
        // SAFETY: PACKET_VNET_HDR takes one int, alive for the call.
        let set = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_VNET_HDR,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        if set != 0 {
            return Err(format!(
                "PACKET_VNET_HDR: {}",
                std::io::Error::last_os_error()
            ));
        }
        let name = std::ffi::CString::new(TAP).unwrap();
        // SAFETY: sockaddr_ll is plain data; all-zero is valid.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol as u16;
        // SAFETY: a NUL-terminated name alive for the call.
        addr.sll_ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as libc::c_int;
        // SAFETY: `addr` is a sockaddr_ll of the size passed.
        let bound = unsafe {
            libc::bind(
                sock.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if bound != 0 {
            return Err(format!("bind: {}", std::io::Error::last_os_error()));
        }
        // A packet socket takes the 10-byte legacy header.
        let (header, body) = frame(len);
        let mut buf = header[..10].to_vec();
        buf.extend_from_slice(&body);
        while !stop.load(Ordering::Relaxed) {
            // SAFETY: `buf` is readable for its length.
            let n = unsafe { libc::send(sock.as_raw_fd(), buf.as_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                match e.raw_os_error() {
                    // The tap's queue is full: the reader is behind.
                    Some(libc::ENOBUFS) | Some(libc::EAGAIN) => std::thread::yield_now(),
                    _ => return Err(format!("send: {e}")),
                }
            }
        }
        Ok(())
    })
}

/// Stop the sender, then drain what it left in the tap.
fn stop_pump(
    tap: &Tap,
    stop: &AtomicBool,
    sender: std::thread::JoinHandle<Result<(), String>>,
) -> Result<(), String> {
    stop.store(true, Ordering::Relaxed);
    let pumped = sender.join().map_err(|_| "sender panicked")?;
    drain(tap);
    pumped
}

/// Drain whatever the tap holds.
fn drain(tap: &Tap) {
    let mut buf = vec![0u8; 70_000];
    // SAFETY: `buf` is writable for its length.
    while unsafe { libc::read(tap.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
}

fn rx_chitin(tap: &Tap, len: usize, window: Duration) -> Result<Figure, String> {
    let mem = guest_memory(8 << 20);
    let mut ring = SplitQueueBuilder::new(&mem, GuestAddress(0), RING).unwrap();
    let base = 0x10_0000u64;
    for i in 0..RING {
        let desc = TestDescriptor::new(
            base + u64::from(i) * u64::from(RX_BUF),
            RX_BUF,
            VRING_DESC_F_WRITE as u16,
        );
        ring.write_descriptor(i, desc).unwrap();
        ring.publish(i).unwrap();
    }
    let mut queue = ring.build().unwrap();
    let interrupt = RecordingInterrupt::new();
    let faults = GuestFaults::new("bench");
    let mut pool = RxPool::new();
    let config = RxConfig {
        mergeable: true,
        need: 65_562,
        csum: true,
        segmentation: true,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let sender = pump(len, stop.clone());
    let (mut frames, mut bytes, mut seen) = (0u64, 0u64, 0u16);
    let start = Instant::now();
    while start.elapsed() < window {
        let run = receive(
            &mut queue,
            &mem,
            tap,
            &interrupt,
            config,
            &mut pool,
            &faults,
            None::<&mut RateLimiter>,
        )
        .unwrap();
        frames += run.frames as u64;
        bytes += run.bytes;
        // The driver takes the used buffers and posts them again.
        let used = ring.used_idx().unwrap();
        while seen != used {
            let (head, _) = ring.used_element(seen).unwrap();
            ring.publish(head as u16).unwrap();
            seen = seen.wrapping_add(1);
        }
    }
    let elapsed = start.elapsed();
    stop_pump(tap, &stop, sender)?;
    Ok(Figure {
        frames,
        bytes,
        elapsed,
    })
}

fn rx_plain(tap: &Tap, len: usize, window: Duration) -> Result<Figure, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let sender = pump(len, stop.clone());
    let mut buf = vec![0u8; 65_562];
    let (mut frames, mut bytes) = (0u64, 0u64);
    let start = Instant::now();
    while start.elapsed() < window {
        // SAFETY: `buf` is writable for its length.
        let n = unsafe { libc::read(tap.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n > 0 {
            frames += 1;
            bytes += n as u64;
        }
    }
    let elapsed = start.elapsed();
    stop_pump(tap, &stop, sender)?;
    Ok(Figure {
        frames,
        bytes,
        elapsed,
    })
}

fn row(what: &str, chitin: &Figure, plain: &Figure) {
    println!(
        "{what:<14} chitin {:>10.0} frames/s {:>8.1} MB/s | plain {:>10.0} frames/s {:>8.1} MB/s | ratio {:.2}",
        chitin.fps(),
        chitin.mbps(),
        plain.fps(),
        plain.mbps(),
        chitin.mbps() / plain.mbps().max(f64::MIN_POSITIVE)
    );
}

fn best(figures: impl Iterator<Item = Figure>) -> Figure {
    figures
        .max_by(|a, b| a.mbps().total_cmp(&b.mbps()))
        .expect("at least one pass")
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    // SAFETY: unshare with a flag only, before any thread starts: the
    // process moves into a new, empty network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        println!(
            "net throughput bench NOT RUN: cannot make a network namespace ({}); run as root",
            std::io::Error::last_os_error()
        );
        return;
    }
    let tap = match Tap::open(TAP) {
        Ok(tap) => tap,
        Err(e) => {
            println!("net throughput bench NOT RUN: {e}");
            return;
        }
    };
    set_up(TAP);
    // Segments reach the reader whole, as they do for a guest with TSO.
    let _ = tap.set_offloads(Offloads {
        csum: true,
        tso4: true,
        tso6: true,
        ufo: false,
    });
    let (passes, frames, window) = if bench {
        (3, 200_000u64, Duration::from_secs(1))
    } else {
        (1, 256, Duration::from_millis(50))
    };
    println!("virtio-net device paths vs plain write/read on the same tap (best of {passes})");
    for len in SIZES {
        // 64 KiB frames cost about 40 small ones: fewer of them.
        let count = if len > 1514 { frames / 20 } else { frames };
        let mut chitin = Vec::new();
        let mut plain = Vec::new();
        for _ in 0..passes {
            chitin.push(tx_chitin(&tap, len, count));
            plain.push(tx_plain(&tap, len, count));
        }
        row(
            &format!("TX {len} B"),
            &best(chitin.into_iter()),
            &best(plain.into_iter()),
        );
    }
    // A packet socket's GSO frames are marked untrusted (SKB_GSO_DODGY),
    // which a tap does not take whole: the kernel segments them before
    // the tap, so RX runs at the sizes one packet holds.
    println!("RX 65536 B     not run: a packet socket's 64 KiB segments reach a tap cut to 1500 B");
    for len in RX_SIZES {
        let mut chitin = Vec::new();
        let mut plain = Vec::new();
        for _ in 0..passes {
            match (rx_chitin(&tap, len, window), rx_plain(&tap, len, window)) {
                (Ok(c), Ok(p)) => {
                    chitin.push(c);
                    plain.push(p);
                }
                (Err(e), _) | (_, Err(e)) => {
                    println!("RX {len} B NOT RUN: {e}");
                    break;
                }
            }
        }
        if !chitin.is_empty() {
            row(
                &format!("RX {len} B"),
                &best(chitin.into_iter()),
                &best(plain.into_iter()),
            );
        }
    }
}
