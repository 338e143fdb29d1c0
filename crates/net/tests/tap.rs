//! The tap backend against a real tap, inside a network namespace this
//! test makes (no frame reaches any other interface). Needs root (or
//! CAP_NET_ADMIN) and /dev/net/tun: listed as ignored, run by the host
//! tier (`cargo xtask test` runs ignored tests), where a missing
//! prerequisite is a failure under CHITIN_REQUIRE_KVM=1.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use chitin_net::tap::{open_raw, Offloads, Tap, TapError};
use chitin_net::VNET_HDR_LEN;
use vm_memory::VolatileSlice;

const ETHERTYPE_OUT: u16 = 0x88b5;
const ETHERTYPE_IN: u16 = 0x88b6;
const WAIT: Duration = Duration::from_secs(5);

/// Run `test` on a thread of its own in a fresh network namespace; returns
/// false (after saying why) when the namespace cannot be made.
fn in_netns(test: impl FnOnce() + Send + 'static) -> bool {
    let made = std::thread::spawn(move || {
        // SAFETY: unshare with a flag only; it moves this thread alone
        // into a new network namespace, which dies with the thread's
        // sockets and fds.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        test();
        Ok(())
    })
    .join()
    .expect("the test thread panicked");
    match made {
        Ok(()) => true,
        Err(e) => {
            let why = format!("cannot make a network namespace ({e})");
            if std::env::var("CHITIN_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{why}, but CHITIN_REQUIRE_KVM=1");
            }
            eprintln!("tap tests NOT RUN: {why}");
            false
        }
    }
}

fn socket(domain: libc::c_int, kind: libc::c_int, protocol: libc::c_int) -> OwnedFd {
    // SAFETY: socket takes integers; the result is checked before use.
    let fd = unsafe { libc::socket(domain, kind | libc::SOCK_CLOEXEC, protocol) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn set_up(name: &str) {
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let sock = socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
    let mut req = IfReq {
        name: [0; 16],
        flags: 0,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one ifreq, which
    // `req` is laid out as and which lives for both calls.
    unsafe {
        assert_eq!(
            libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req),
            0
        );
        req.flags |= libc::IFF_UP as libc::c_short;
        assert_eq!(
            libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &mut req),
            0
        );
    }
}

/// A packet socket on `name` that sees and sends whole Ethernet frames.
fn packet_socket(name: &str) -> (OwnedFd, libc::c_int) {
    let protocol = (libc::ETH_P_ALL as u16).to_be() as libc::c_int;
    let sock = socket(libc::AF_PACKET, libc::SOCK_RAW, protocol);
    let cname = std::ffi::CString::new(name).unwrap();
    // SAFETY: a NUL-terminated name that lives for the call.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) } as libc::c_int;
    assert!(index > 0, "no interface {name}");
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol as u16;
    addr.sll_ifindex = index;
    // SAFETY: `addr` is a sockaddr_ll of the size passed, alive for the
    // call.
    let bound = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(bound, 0, "bind: {}", std::io::Error::last_os_error());
    (sock, index)
}

fn wait_readable(fd: RawFd, until: Instant) -> bool {
    let left = until.saturating_duration_since(Instant::now());
    let mut poll = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the call.
    unsafe { libc::poll(&mut poll, 1, left.as_millis() as libc::c_int) == 1 }
}

fn frame(ethertype: u16, len: usize) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend((0..len).map(|i| (i * 7 + 3) as u8));
    f
}

fn ethertype(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[12], frame[13]])
}

fn slice(buf: &mut [u8]) -> VolatileSlice<'_> {
    VolatileSlice::from(buf)
}

#[test]
#[ignore = "needs root and /dev/net/tun: run with --include-ignored (cargo xtask test does)"]
fn a_tap_moves_frames_byte_exact_both_ways() {
    in_netns(|| {
        let tap = Tap::open("chitin-t0").expect("open the tap");
        assert_eq!(tap.name(), "chitin-t0");
        // A second open of an attached tap is refused as busy.
        assert!(matches!(Tap::open("chitin-t0"), Err(TapError::Busy { .. })));
        let supported = tap.supported_offloads();
        assert!(supported.csum, "every Linux tap takes checksum offload");
        tap.set_offloads(supported).unwrap();
        tap.set_offloads(Offloads::default()).unwrap();
        set_up("chitin-t0");
        let (sock, _) = packet_socket("chitin-t0");

        // Guest -> host: header and frame in separate iovecs, as a chain
        // split over descriptors gives them.
        let out = frame(ETHERTYPE_OUT, 1000);
        let header = [0u8; VNET_HDR_LEN];
        let mut copy = out.clone();
        let (first, second) = copy.split_at_mut(20);
        let written = tap.write_frame(&header, &[slice(first), slice(second)]);
        assert_eq!(written.unwrap(), VNET_HDR_LEN + out.len());
        let until = Instant::now() + WAIT;
        let mut buf = vec![0u8; 65536];
        let seen = loop {
            assert!(
                wait_readable(sock.as_raw_fd(), until),
                "the frame never came out of the tap"
            );
            // SAFETY: `buf` is writable for its length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            assert!(n > 0);
            let got = &buf[..n as usize];
            if ethertype(got) == ETHERTYPE_OUT {
                break got.to_vec();
            }
        };
        assert_eq!(seen, out);

        // Host -> guest: nothing queued reads as WouldBlock, then a frame
        // sent on the interface arrives after a zero header.
        let mut hold = vec![0u8; 65562];
        loop {
            match tap.read_frame(&[slice(&mut hold)]) {
                Ok(_) => continue, // IPv6 chatter from bringing it up
                Err(e) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
                    break;
                }
            }
        }
        let inbound = frame(ETHERTYPE_IN, 1400);
        // SAFETY: `inbound` is readable for its length.
        let sent =
            unsafe { libc::send(sock.as_raw_fd(), inbound.as_ptr().cast(), inbound.len(), 0) };
        assert_eq!(sent as usize, inbound.len());
        let until = Instant::now() + WAIT;
        let (mut head, mut rest) = (vec![0u8; VNET_HDR_LEN + 6], vec![0u8; 65562]);
        let got = loop {
            assert!(
                wait_readable(tap.as_raw_fd(), until),
                "the frame never reached the tap"
            );
            head.fill(0xaa);
            let n = tap
                .read_frame(&[slice(&mut head), slice(&mut rest)])
                .unwrap();
            let mut whole = head.clone();
            whole.extend_from_slice(&rest);
            whole.truncate(n);
            if n >= VNET_HDR_LEN + 14 && ethertype(&whole[VNET_HDR_LEN..]) == ETHERTYPE_IN {
                break whole;
            }
        };
        // The kernel writes the 10-byte legacy header and skips the rest
        // of the 12 (num_buffers is the device's to fill).
        assert_eq!(&got[..10], &[0u8; 10]);
        assert_eq!(&got[VNET_HDR_LEN..], &inbound[..]);

        // A frame longer than the buffers is cut to fit (tun reports only
        // what it copied) and never written past them.
        // SAFETY: `inbound` is readable for its length.
        let sent =
            unsafe { libc::send(sock.as_raw_fd(), inbound.as_ptr().cast(), inbound.len(), 0) };
        assert_eq!(sent as usize, inbound.len());
        let until = Instant::now() + WAIT;
        let mut small = [0x55u8; 200];
        loop {
            assert!(
                wait_readable(tap.as_raw_fd(), until),
                "the frame never reached the tap"
            );
            let n = tap.read_frame(&[slice(&mut small[..100])]).unwrap();
            assert!(n <= 100, "{n} bytes reported read into 100");
            assert!(
                small[100..].iter().all(|&b| b == 0x55),
                "written past the buffer"
            );
            if n == 100 && ethertype(&small[VNET_HDR_LEN..]) == ETHERTYPE_IN {
                assert_eq!(&small[VNET_HDR_LEN..100], &inbound[..100 - VNET_HDR_LEN]);
                break;
            }
        }
    });
}

#[test]
#[ignore = "needs root and /dev/net/tun: run with --include-ignored (cargo xtask test does)"]
fn a_handed_over_fd_is_taken_only_if_it_is_a_vnet_tap() {
    in_netns(|| {
        let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        let fd = open_raw("chitin-fd0", flags).unwrap();
        let tap = Tap::from_fd(fd).expect("a vnet tap fd");
        assert_eq!(tap.name(), "chitin-fd0");
        // SAFETY: F_GETFL/F_GETFD take no pointers.
        let (fl, fd_flags) = unsafe {
            (
                libc::fcntl(tap.as_raw_fd(), libc::F_GETFL),
                libc::fcntl(tap.as_raw_fd(), libc::F_GETFD),
            )
        };
        assert_ne!(fl & libc::O_NONBLOCK, 0);
        assert_ne!(fd_flags & libc::FD_CLOEXEC, 0);

        for (name, flags) in [
            (
                "chitin-tun0",
                libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR,
            ),
            ("chitin-nohdr0", libc::IFF_TAP | libc::IFF_NO_PI),
        ] {
            let fd = open_raw(name, flags).unwrap();
            assert!(
                matches!(Tap::from_fd(fd), Err(TapError::NotATap { .. })),
                "{name} was taken"
            );
        }
        // An unattached /dev/net/tun fd is no tap either.
        let bare = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")
            .unwrap();
        assert!(matches!(
            Tap::from_fd(OwnedFd::from(bare)),
            Err(TapError::NotATap { .. })
        ));
    });
}

/// The RX and TX paths between a mock guest's queues and a real tap.
#[test]
#[ignore = "needs root and /dev/net/tun: run with --include-ignored (cargo xtask test does)"]
fn mock_guest_queues_move_frames_through_a_real_tap() {
    use chitin_net::{receive, transmit, RxConfig};
    use chitin_virtio::rate_limit::{MonotonicClock, RateLimiter};
    use chitin_virtio::test_utils::{
        guest_memory, RecordingInterrupt, SplitQueueBuilder, TestDescriptor,
    };
    use chitin_virtio::GuestFaults;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use vm_memory::{Bytes, GuestAddress};

    in_netns(|| {
        let tap = Tap::open("chitin-q0").expect("open the tap");
        set_up("chitin-q0");
        let (sock, _) = packet_socket("chitin-q0");
        let mem = guest_memory(0x100_0000);
        let interrupt = RecordingInterrupt::new();
        let faults = GuestFaults::new("net tap test");

        // TX: a chain of header + frame split in three.
        let mut tx = SplitQueueBuilder::new(&mem, GuestAddress(0), 256).unwrap();
        let out = frame(ETHERTYPE_OUT, 1486);
        let mut bytes = vec![0u8; VNET_HDR_LEN];
        bytes.extend_from_slice(&out);
        mem.write_slice(&bytes, GuestAddress(0x10_0000)).unwrap();
        let next = VRING_DESC_F_NEXT as u16;
        tx.add_chain(&[
            TestDescriptor::new(0x10_0000, 12, next),
            TestDescriptor::new(0x10_000c, 100, next),
            TestDescriptor::new(0x10_0070, bytes.len() as u32 - 112, 0),
        ])
        .unwrap();
        let mut tx_queue = tx.build().unwrap();
        let run = transmit::<_, _, _, MonotonicClock>(
            &mut tx_queue,
            &mem,
            &tap,
            &interrupt,
            0,
            &faults,
            None,
        )
        .unwrap();
        assert_eq!((run.frames, run.malformed, run.backend_drops), (1, 0, 0));
        let until = Instant::now() + WAIT;
        let mut buf = vec![0u8; 65536];
        let seen = loop {
            assert!(
                wait_readable(sock.as_raw_fd(), until),
                "the frame never left the tap"
            );
            // SAFETY: `buf` is writable for its length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            assert!(n > 0);
            if ethertype(&buf[..n as usize]) == ETHERTYPE_OUT {
                break buf[..n as usize].to_vec();
            }
        };
        assert_eq!(seen, out);

        // RX with no buffers posted: the tap is not read.
        let mut rx = SplitQueueBuilder::new(&mem, GuestAddress(0x8_0000), 256).unwrap();
        let mut rx_queue = rx.build().unwrap();
        let config = RxConfig {
            mergeable: false,
            need: 1526,
            csum: false,
            segmentation: false,
        };
        let mut pool = chitin_net::RxPool::new();
        let inbound = frame(ETHERTYPE_IN, 1200);
        // SAFETY: `inbound` is readable for its length.
        let sent =
            unsafe { libc::send(sock.as_raw_fd(), inbound.as_ptr().cast(), inbound.len(), 0) };
        assert_eq!(sent as usize, inbound.len());
        assert!(wait_readable(tap.as_raw_fd(), Instant::now() + WAIT));
        let run = receive(
            &mut rx_queue,
            &mem,
            &tap,
            &interrupt,
            config,
            &mut pool,
            &faults,
            None::<&mut RateLimiter>,
        )
        .unwrap();
        assert!(run.starved);
        assert_eq!(run.frames, 0);
        assert!(
            wait_readable(tap.as_raw_fd(), Instant::now()),
            "the frame must still wait in the tap"
        );

        // Buffers posted: the frame lands in one of them, byte-exact.
        let write = VRING_DESC_F_WRITE as u16;
        let base = 0x20_0000u64;
        mem.write_slice(&[0xaa; 16 * 0x1000], GuestAddress(base))
            .unwrap();
        for i in 0..16u64 {
            rx.add_chain(&[TestDescriptor::new(base + i * 0x1000, 1526, write)])
                .unwrap();
        }
        let run = receive(
            &mut rx_queue,
            &mem,
            &tap,
            &interrupt,
            config,
            &mut pool,
            &faults,
            None::<&mut RateLimiter>,
        )
        .unwrap();
        assert!(run.frames >= 1);
        let mut found = false;
        for i in 0..rx.used_idx().unwrap() {
            let (head, len) = rx.used_element(i).unwrap();
            let mut got = vec![0u8; len as usize];
            mem.read_slice(&mut got, GuestAddress(base + u64::from(head) * 0x1000))
                .unwrap();
            if got.len() > VNET_HDR_LEN + 14 && ethertype(&got[VNET_HDR_LEN..]) == ETHERTYPE_IN {
                assert_eq!(&got[VNET_HDR_LEN..], &inbound[..]);
                // num_buffers is 1; the rest of the header is the tap's zeros.
                assert_eq!(&got[..VNET_HDR_LEN], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
                found = true;
            }
        }
        assert!(
            found,
            "the frame sent on the interface never reached the guest"
        );
        assert_eq!(faults.total(), 0);
    });
}

/// The whole device in an event loop over a real tap: frames both ways,
/// the tap unwatched while the guest has no receive buffers and after a
/// reset (it wakes the loop at most once more), counters readable.
#[test]
#[ignore = "needs root and /dev/net/tun: run with --include-ignored (cargo xtask test does)"]
fn the_device_in_an_event_loop_reads_the_tap_only_while_it_can_deliver() {
    use std::sync::{Arc, Mutex};

    use chitin_net::{MacAddr, Net, NetConfig};
    use chitin_virtio::test_utils::{
        guest_memory, RecordingInterrupt, SplitQueueBuilder, TestDescriptor,
    };
    use chitin_virtio::{ActivateContext, VirtioDevice};
    use event_manager::{EventManager, SubscriberOps};
    use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::{Bytes, GuestAddress};

    in_netns(|| {
        let tap = Tap::open("chitin-d0").expect("open the tap");
        set_up("chitin-d0");
        let (sock, _) = packet_socket("chitin-d0");
        let net = Net::new(
            tap,
            NetConfig {
                mac: MacAddr([0x02, 0, 0, 0, 0, 0x09]),
                offloads: true,
                rx_limit: Default::default(),
                tx_limit: Default::default(),
            },
        )
        .unwrap();
        let tap_fd = net.tap().as_raw_fd();
        let net = Arc::new(Mutex::new(net));
        let mut manager = EventManager::<Arc<Mutex<Net>>>::new().unwrap();
        manager.add_subscriber(net.clone());
        let mem = guest_memory(0x100_0000);
        let mut rx = SplitQueueBuilder::new(&mem, GuestAddress(0), 256).unwrap();
        let mut tx = SplitQueueBuilder::new(&mem, GuestAddress(0x8000), 256).unwrap();
        let interrupt = Arc::new(RecordingInterrupt::new());
        let acked = (1u64 << VIRTIO_NET_F_MRG_RXBUF) | (1 << 32);
        net.lock()
            .unwrap()
            .activate(ActivateContext {
                mem: mem.clone(),
                queues: vec![rx.build().unwrap(), tx.build().unwrap()],
                interrupt: interrupt.clone(),
                acked_features: acked,
            })
            .unwrap();
        // Activation looked at both queues: no receive buffers.
        while manager.run_with_timeout(100).unwrap() > 0 {}

        // A frame for the guest waits in the tap while it has no buffers.
        let inbound = frame(ETHERTYPE_IN, 900);
        // SAFETY: `inbound` is readable for its length.
        let sent =
            unsafe { libc::send(sock.as_raw_fd(), inbound.as_ptr().cast(), inbound.len(), 0) };
        assert_eq!(sent as usize, inbound.len());
        assert!(wait_readable(tap_fd, Instant::now() + WAIT));
        assert_eq!(manager.run_with_timeout(200).unwrap(), 0);
        assert!(wait_readable(tap_fd, Instant::now()), "the tap was read");

        // Buffers posted and notified: the frame lands byte-exact.
        let base = 0x20_0000u64;
        for i in 0..32u64 {
            rx.add_chain(&[TestDescriptor::new(
                base + i * 0x1000,
                2048,
                VRING_DESC_F_WRITE as u16,
            )])
            .unwrap();
        }
        net.lock().unwrap().queue_events()[0].write(1).unwrap();
        let until = Instant::now() + WAIT;
        let mut found = false;
        while !found && Instant::now() < until {
            manager.run_with_timeout(100).unwrap();
            for i in 0..rx.used_idx().unwrap() {
                let (head, len) = rx.used_element(i).unwrap();
                let mut got = vec![0u8; len as usize];
                mem.read_slice(&mut got, GuestAddress(base + u64::from(head) * 0x1000))
                    .unwrap();
                if got.len() > VNET_HDR_LEN + 14 && ethertype(&got[VNET_HDR_LEN..]) == ETHERTYPE_IN
                {
                    assert_eq!(&got[VNET_HDR_LEN..], &inbound[..]);
                    found = true;
                }
            }
        }
        assert!(found, "the frame never reached the guest's buffers");

        // A transmit chain leaves the tap byte-exact.
        let out = frame(ETHERTYPE_OUT, 700);
        let mut bytes = vec![0u8; VNET_HDR_LEN];
        bytes.extend_from_slice(&out);
        mem.write_slice(&bytes, GuestAddress(0x10_0000)).unwrap();
        tx.add_chain(&[TestDescriptor::new(0x10_0000, bytes.len() as u32, 0)])
            .unwrap();
        net.lock().unwrap().queue_events()[1].write(1).unwrap();
        manager.run_with_timeout(1000).unwrap();
        let until = Instant::now() + WAIT;
        let mut buf = vec![0u8; 65536];
        loop {
            assert!(
                wait_readable(sock.as_raw_fd(), until),
                "no frame left the tap"
            );
            // SAFETY: `buf` is writable for its length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 && ethertype(&buf[..n as usize]) == ETHERTYPE_OUT {
                assert_eq!(&buf[..n as usize], &out[..]);
                break;
            }
        }
        let stats = net.lock().unwrap().stats();
        assert!(stats.rx_frames >= 1 && stats.tx_frames == 1, "{stats:?}");
        assert_eq!(stats.tx_bytes, bytes.len() as u64);
        assert_eq!((stats.tx_malformed, stats.rx_dropped), (0, 0));

        // Reset: a frame arriving afterwards wakes the loop at most once,
        // then waits in the tap.
        net.lock().unwrap().reset();
        // SAFETY: `inbound` is readable for its length.
        let sent =
            unsafe { libc::send(sock.as_raw_fd(), inbound.as_ptr().cast(), inbound.len(), 0) };
        assert_eq!(sent as usize, inbound.len());
        assert!(wait_readable(tap_fd, Instant::now() + WAIT));
        let mut wakes = 0;
        for _ in 0..5 {
            wakes += manager.run_with_timeout(50).unwrap();
        }
        assert!(wakes <= 1, "the reset device was woken {wakes} times");
        assert!(
            wait_readable(tap_fd, Instant::now()),
            "the reset device read the tap"
        );
        assert_eq!(net.lock().unwrap().faults().total(), 0);
    });
}
