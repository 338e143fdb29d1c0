//! [`Net`]: the virtio-net device the transport sees (virtio 1.2 §5.1),
//! one receive and one transmit queue over a [`Tap`].
//!
//! It owns the tap, the configuration space (MAC and link status), the
//! two queue notification `EventFd`s, the optional limiters of each
//! direction and the live [`NetCounters`]; between activate and reset
//! also the queues, guest memory and interrupt. The frame paths are
//! [`crate::rx`] and [`crate::tx`]; the event loop reaches them through
//! the `event` module, which also decides when the tap is watched: only
//! while the device runs, the guest has receive buffers posted, the
//! receive limiter lets frames through and the tap works. Otherwise the
//! tap's own queue holds what arrives (and drops past its length), and
//! nothing is read or buffered on the host.
//!
//! Offered features: `MAC`, `STATUS` (the link is always up),
//! `MRG_RXBUF`, and, unless offloads are turned off, `CSUM` with
//! `HOST_TSO4`/`HOST_TSO6` (the tap takes partial checksums and
//! segmentation requests on write) and the guest-side offloads the tap
//! really supports: `GUEST_CSUM`, then `GUEST_TSO4`/`GUEST_TSO6` and
//! `GUEST_UFO`/`HOST_UFO` when the tap can do them. The tap is set for
//! exactly the `GUEST_*` offloads the driver accepted, and for none
//! again on reset.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use chitin_virtio::active::kick;
use chitin_virtio::rate_limit::RateLimiterError;
use chitin_virtio::{
    read_config_bytes, ActivateContext, ActivateError, Active, GuestFaults, RateLimit, RateLimiter,
    Severity, VirtioDevice,
};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
    VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::frame::MAX_CHAIN_LEN;
use crate::rx::{receive, RxConfig, RxPool};
use crate::tap::{Offloads, Tap, TapError};
use crate::tx::transmit;

/// Virtio device ID of a network device (virtio 1.2 §5.1.1).
pub const DEVICE_TYPE_NET: u32 = 1;

/// Maximum size of each queue.
pub const QUEUE_SIZE: u16 = 256;

/// Bytes of configuration space the device defines: `mac`, `status` and
/// `max_virtqueue_pairs` of `struct virtio_net_config`. Reads beyond
/// return zeros.
pub const CONFIG_LEN: usize = 10;

/// Receive buffer room a frame needs without segmentation offloads: a
/// 1514-byte Ethernet frame and its header (virtio 1.2 §5.1.6.3.1).
pub const SMALL_FRAME_ROOM: usize = 1526;

/// Index of the receive queue.
pub(crate) const RX: usize = 0;
/// Index of the transmit queue.
pub(crate) const TX: usize = 1;

const QUEUE_MAX_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];

const fn feature(bit: u32) -> u64 {
    1 << bit
}

/// A MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random locally administered unicast address (`x2:..`), from the
    /// kernel's random source; a fixed one with the pid mixed in if that
    /// fails.
    pub fn random() -> MacAddr {
        let mut bytes = [0u8; 6];
        // SAFETY: getrandom writes at most `bytes.len()` bytes into the
        // array, which lives for the call.
        let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
        if n != bytes.len() as isize {
            let pid = std::process::id().to_le_bytes();
            bytes = [0, 0xc4, pid[0], pid[1], pid[2], pid[3]];
        }
        // Locally administered, unicast.
        bytes[0] = (bytes[0] & 0xfc) | 0x02;
        MacAddr(bytes)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MacAddr({self})")
    }
}

/// Why a MAC address string was refused.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a MAC address (six hex pairs separated by ':')")]
pub struct MacParseError(pub String);

impl std::str::FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError(s.to_string());
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(err)?;
            if part.len() != 2 {
                return Err(err());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(bytes))
    }
}

/// How to set up a network device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The guest's MAC address.
    pub mac: MacAddr,
    /// Offer checksum and segmentation offloads (those the tap supports).
    /// Off, every frame is a plain, fully checksummed Ethernet frame.
    pub offloads: bool,
    /// Limit on frames to the guest.
    pub rx_limit: RateLimit,
    /// Limit on frames from the guest.
    pub tx_limit: RateLimit,
}

/// Why a network device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// A queue notification eventfd could not be created.
    #[error("cannot create a queue notification eventfd")]
    EventFd(#[source] std::io::Error),
    /// A limiter's timer could not be created.
    #[error(transparent)]
    RateLimiter(#[from] RateLimiterError),
}

/// Live counts of one device, shared with whoever asked for them.
#[derive(Debug, Default)]
pub struct NetCounters {
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
    rx_read_errors: AtomicU64,
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    tx_malformed: AtomicU64,
    tx_backend_drops: AtomicU64,
    rx_throttled: AtomicU64,
    tx_throttled: AtomicU64,
}

/// A snapshot of [`NetCounters`]. Byte counts include the 12-byte
/// header of every frame.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetStats {
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Their bytes.
    pub rx_bytes: u64,
    /// Frames the tap held that did not fit the buffers gathered for them.
    pub rx_dropped: u64,
    /// Failed reads of the tap.
    pub rx_read_errors: u64,
    /// Frames from the guest the tap took.
    pub tx_frames: u64,
    /// Their bytes.
    pub tx_bytes: u64,
    /// Transmit chains refused as malformed (by reason in the faults).
    pub tx_malformed: u64,
    /// Frames from the guest the tap refused.
    pub tx_backend_drops: u64,
    /// Times the receive limiter held frames back.
    pub rx_throttled: u64,
    /// Times the transmit limiter held frames back.
    pub tx_throttled: u64,
}

impl NetCounters {
    fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// What the counters hold now.
    pub fn snapshot(&self) -> NetStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let counters = self;
        NetStats {
            rx_frames: get(&counters.rx_frames),
            rx_bytes: get(&counters.rx_bytes),
            rx_dropped: get(&counters.rx_dropped),
            rx_read_errors: get(&counters.rx_read_errors),
            tx_frames: get(&counters.tx_frames),
            tx_bytes: get(&counters.tx_bytes),
            tx_malformed: get(&counters.tx_malformed),
            tx_backend_drops: get(&counters.tx_backend_drops),
            rx_throttled: get(&counters.rx_throttled),
            tx_throttled: get(&counters.tx_throttled),
        }
    }
}

/// A virtio-net device over a tap.
pub struct Net {
    tap: Tap,
    features: u64,
    config: [u8; CONFIG_LEN],
    queue_events: [EventFd; 2],
    rx_limiter: Option<RateLimiter>,
    tx_limiter: Option<RateLimiter>,
    counters: Arc<NetCounters>,
    faults: GuestFaults,
    /// Set between activate and reset.
    active: Option<Active<2>>,
    acked: u64,
    rx_config: RxConfig,
    /// Receive chains taken from the ring, not yet filled.
    rx_pool: RxPool,
    /// The guest had too few receive buffers: wait for its notification.
    pub(crate) rx_starved: bool,
    /// The tap reported an error or hang-up, or failed a read: it is not
    /// watched again.
    pub(crate) tap_broken: bool,
    /// Whether the tap is in the event loop's interest list.
    pub(crate) tap_watched: bool,
}

impl fmt::Debug for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Net")
            .field("tap", &self.tap.name())
            .field("mac", &self.mac())
            .field("active", &self.active.is_some())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Net {
    /// A device over `tap`.
    pub fn new(tap: Tap, config: NetConfig) -> Result<Net, NetError> {
        let supported = if config.offloads {
            tap.supported_offloads()
        } else {
            Offloads::default()
        };
        let mut features = feature(VIRTIO_NET_F_MAC)
            | feature(VIRTIO_NET_F_STATUS)
            | feature(VIRTIO_NET_F_MRG_RXBUF);
        if config.offloads {
            // tun takes partial checksums and GSO frames on write whatever
            // TUNSETOFFLOAD says; that ioctl is about what it hands us.
            features |= feature(VIRTIO_NET_F_CSUM)
                | feature(VIRTIO_NET_F_HOST_TSO4)
                | feature(VIRTIO_NET_F_HOST_TSO6);
            if supported.ufo {
                features |= feature(VIRTIO_NET_F_HOST_UFO);
            }
        }
        if supported.csum {
            features |= feature(VIRTIO_NET_F_GUEST_CSUM);
            for (has, bit) in [
                (supported.tso4, VIRTIO_NET_F_GUEST_TSO4),
                (supported.tso6, VIRTIO_NET_F_GUEST_TSO6),
                (supported.ufo, VIRTIO_NET_F_GUEST_UFO),
            ] {
                if has {
                    features |= feature(bit);
                }
            }
        }
        let limiter = |limit: RateLimit| -> Result<Option<RateLimiter>, NetError> {
            if limit.is_unlimited() {
                Ok(None)
            } else {
                Ok(Some(RateLimiter::new(limit)?))
            }
        };
        let event = || EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd);
        let faults = GuestFaults::new(format!("net {}", tap.name()));
        Ok(Net {
            features,
            config: config_space(config.mac),
            queue_events: [event()?, event()?],
            rx_limiter: limiter(config.rx_limit)?,
            tx_limiter: limiter(config.tx_limit)?,
            counters: Arc::default(),
            faults,
            active: None,
            acked: 0,
            rx_config: rx_config(0, Offloads::default()),
            rx_pool: RxPool::new(),
            rx_starved: false,
            tap_broken: false,
            tap_watched: false,
            tap,
        })
    }

    /// The tap.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> MacAddr {
        let mut mac = [0u8; 6];
        mac.copy_from_slice(&self.config[..6]);
        MacAddr(mac)
    }

    /// What the guest sent that the device refused, by reason; a clone
    /// shares the live counts.
    pub fn faults(&self) -> &GuestFaults {
        &self.faults
    }

    /// The live counters; a clone shares them.
    pub fn counters(&self) -> Arc<NetCounters> {
        Arc::clone(&self.counters)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> NetStats {
        self.counters.snapshot()
    }

    pub(crate) fn queue_event(&self, index: usize) -> &EventFd {
        &self.queue_events[index]
    }

    pub(crate) fn rx_limiter_mut(&mut self) -> Option<&mut RateLimiter> {
        self.rx_limiter.as_mut()
    }

    pub(crate) fn tx_limiter_mut(&mut self) -> Option<&mut RateLimiter> {
        self.tx_limiter.as_mut()
    }

    pub(crate) fn limiters(&self) -> [Option<&RateLimiter>; 2] {
        [self.rx_limiter.as_ref(), self.tx_limiter.as_ref()]
    }

    /// Whether the event loop should watch the tap now.
    pub(crate) fn wants_tap(&self) -> bool {
        self.active.as_ref().is_some_and(|a| !a.failed())
            && !self.rx_starved
            && !self.tap_broken
            && !self.rx_limiter.as_ref().is_some_and(|l| l.is_throttled())
    }

    /// Move frames from the tap into the guest's receive buffers.
    pub(crate) fn process_rx(&mut self) {
        if self.tap_broken {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let (tap, config, faults, counters) =
            (&self.tap, self.rx_config, &self.faults, &self.counters);
        let (pool, event) = (&mut self.rx_pool, &self.queue_events[RX]);
        let mut limiter = self.rx_limiter.as_mut();
        let mut starved = false;
        let mut broken = false;
        active.run(|queues, mem, interrupt| {
            let run = receive(
                &mut queues[RX],
                mem,
                tap,
                interrupt,
                config,
                pool,
                faults,
                limiter.as_deref_mut(),
            )?;
            NetCounters::add(&counters.rx_frames, run.frames as u64);
            NetCounters::add(&counters.rx_bytes, run.bytes);
            NetCounters::add(&counters.rx_dropped, run.dropped as u64);
            if let Some(kind) = run.read_error {
                NetCounters::add(&counters.rx_read_errors, 1);
                log::error!(
                    "net {}: reading the tap failed ({kind}); no more frames reach the guest",
                    tap.name()
                );
                broken = true;
            }
            starved = run.starved;
            if run.pending {
                // Stopped at the run's bound: come back after the others.
                let _ = event.write(1);
            }
            if let Some(l) = limiter.as_deref() {
                counters
                    .rx_throttled
                    .store(l.throttle_count(), Ordering::Relaxed);
            }
            Ok::<(), chitin_virtio::queue::QueueError>(())
        });
        self.rx_starved = starved;
        self.tap_broken |= broken;
    }

    /// Send the guest's transmit chains through the tap.
    pub(crate) fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let (tap, acked, faults, counters) = (&self.tap, self.acked, &self.faults, &self.counters);
        let event = &self.queue_events[TX];
        let mut limiter = self.tx_limiter.as_mut();
        active.run(|queues, mem, interrupt| {
            let run = transmit(
                &mut queues[TX],
                mem,
                tap,
                interrupt,
                acked,
                faults,
                limiter.as_deref_mut(),
            )?;
            NetCounters::add(&counters.tx_frames, run.frames as u64);
            NetCounters::add(&counters.tx_bytes, run.bytes);
            NetCounters::add(&counters.tx_malformed, run.malformed as u64);
            NetCounters::add(&counters.tx_backend_drops, run.backend_drops as u64);
            if let Some(l) = limiter.as_deref() {
                counters
                    .tx_throttled
                    .store(l.throttle_count(), Ordering::Relaxed);
            }
            // More chains than one run takes: come back through the event
            // loop so the other queue and devices get their turn.
            if run.pending {
                let _ = event.write(1);
            }
            Ok::<(), chitin_virtio::queue::QueueError>(())
        });
    }

    /// The tap reported an error or hang-up: stop watching it for good.
    pub(crate) fn tap_failed(&mut self) {
        if !self.tap_broken {
            self.faults.record(
                Severity::Malformed,
                "tap error",
                &format_args!("the tap {} reported an error or hang-up", self.tap.name()),
            );
            log::error!(
                "net {}: the tap reported an error or hang-up; no more frames reach the guest",
                self.tap.name()
            );
        }
        self.tap_broken = true;
    }
}

/// `mac`, `status` (link up) and `max_virtqueue_pairs` (1),
/// little-endian.
fn config_space(mac: MacAddr) -> [u8; CONFIG_LEN] {
    let mut config = [0u8; CONFIG_LEN];
    config[..6].copy_from_slice(&mac.0);
    // VIRTIO_NET_S_LINK_UP is bit 0: fits a u16.
    config[6..8].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    config[8..10].copy_from_slice(&1u16.to_le_bytes());
    config
}

/// The tap offloads matching what the driver accepted.
fn guest_offloads(acked: u64) -> Offloads {
    let has = |bit: u32| acked & feature(bit) != 0;
    let csum = has(VIRTIO_NET_F_GUEST_CSUM);
    Offloads {
        csum,
        // Segmentation needs checksum offload (virtio 1.2 §5.1.3.1).
        tso4: csum && has(VIRTIO_NET_F_GUEST_TSO4),
        tso6: csum && has(VIRTIO_NET_F_GUEST_TSO6),
        ufo: csum && has(VIRTIO_NET_F_GUEST_UFO),
    }
}

/// Receive room for the largest frame the tap hands over with `offloads`
/// on: a whole 64 KiB segment once any segmentation is on.
fn rx_config(acked: u64, offloads: Offloads) -> RxConfig {
    RxConfig {
        mergeable: acked & feature(VIRTIO_NET_F_MRG_RXBUF) != 0,
        csum: offloads.csum,
        segmentation: offloads.segments(),
        need: if offloads.segments() {
            MAX_CHAIN_LEN
        } else {
            SMALL_FRAME_ROOM
        },
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX_SIZES
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is writable only with VIRTIO_NET_F_CTRL_MAC_ADDR's
        // legacy path, which is not offered: every field is read-only.
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let acked = ctx.acked_features;
        let offloads = guest_offloads(acked);
        let active = Active::from_context(ctx)?;
        self.tap.set_offloads(offloads).map_err(|e: TapError| {
            ActivateError::Device(format!("tap {}: {e}", self.tap.name()))
        })?;
        self.active = Some(active);
        self.acked = acked;
        self.rx_pool.clear();
        self.rx_config = rx_config(acked, offloads);
        self.rx_starved = false;
        kick(&self.queue_events);
        Ok(())
    }

    fn reset(&mut self) {
        // Drops the queues, guest memory and interrupt; the tap stays open
        // and queues what arrives until the next activation (the event
        // loop stops watching it on its next look). It hands over no
        // segmented frames meanwhile.
        self.active = None;
        self.acked = 0;
        self.rx_starved = false;
        self.rx_pool.clear();
        if let Err(e) = self.tap.set_offloads(Offloads::default()) {
            log::warn!(
                "net {}: turning offloads off on reset: {e}",
                self.tap.name()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parses_and_prints_both_ways() {
        let mac: MacAddr = "02:ab:cd:00:11:ff".parse().unwrap();
        assert_eq!(mac.0, [0x02, 0xab, 0xcd, 0x00, 0x11, 0xff]);
        assert_eq!(mac.to_string(), "02:ab:cd:00:11:ff");
        for bad in [
            "",
            "02:ab:cd:00:11",
            "02:ab:cd:00:11:ff:00",
            "2:ab:cd:00:11:ff",
            "zz:ab:cd:00:11:ff",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn random_macs_are_local_unicast_and_differ() {
        let (a, b) = (MacAddr::random(), MacAddr::random());
        for mac in [a, b] {
            assert_eq!(mac.0[0] & 0x03, 0x02, "{mac}");
        }
        assert_ne!(a, b);
    }

    #[test]
    fn config_space_holds_mac_link_up_and_one_pair() {
        let config = config_space(MacAddr([1, 2, 3, 4, 5, 6]));
        assert_eq!(config, [1, 2, 3, 4, 5, 6, 1, 0, 1, 0]);
    }

    #[test]
    fn segmentation_needs_checksum_offload_and_sizes_the_receive_room() {
        let all = feature(VIRTIO_NET_F_GUEST_TSO4) | feature(VIRTIO_NET_F_GUEST_TSO6);
        assert_eq!(guest_offloads(all), Offloads::default());
        let with_csum = all | feature(VIRTIO_NET_F_GUEST_CSUM);
        let offloads = guest_offloads(with_csum);
        assert!(offloads.csum && offloads.tso4 && offloads.tso6 && !offloads.ufo);
        assert_eq!(rx_config(with_csum, offloads).need, 65_562);
        let plain = rx_config(feature(VIRTIO_NET_F_MRG_RXBUF), Offloads::default());
        assert!(plain.mergeable);
        assert_eq!(plain.need, 1526);
    }
}
