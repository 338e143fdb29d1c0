//! Network interfaces: what a runtime author configures ([`Net`],
//! [`RateLimit`]), and how each becomes a virtio-net device over a tap.
//!
//! The guest's side of an interface (its address, prefix and gateway,
//! and the sandbox's DNS servers) travels on the kernel command line as
//! `chitin.net=<mac>,<address>/<prefix>[,<gateway>]` entries, one per
//! configured interface, and `chitin.dns=<server>[,<server>...]`; chitin's
//! guest agent reads them as it starts, finds each interface by its MAC
//! and configures it before it serves the first command, so
//! `exec("ping -c1 <gateway>")` works at once. An interface without an
//! address is left down for the guest to configure itself.

use std::net::Ipv4Addr;
use std::num::NonZeroU64;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use chitin_net::{MacAddr, NetConfig, Tap};

use crate::error::SandboxError;

/// A limit on one direction of an interface, or on a disk: bytes per
/// second and operations (frames, requests) per second, each optional
/// and each with an optional one-time burst spent before the steady rate.
/// A limited device holds work back (the guest's queue fills, nothing is
/// dropped) and wakes on a timer, without spinning.
///
/// ```
/// use chitin::RateLimit;
///
/// // 8 MiB/s, with 64 MiB allowed at full speed first.
/// let limit = RateLimit::bytes_per_second(8 << 20).bytes_burst(64 << 20);
/// // At most 10 000 frames a second as well.
/// let limit = limit.ops_per_second(10_000);
/// # let _ = limit;
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    bytes: Option<(u64, u64)>,
    ops: Option<(u64, u64)>,
}

impl RateLimit {
    /// No limit.
    pub fn unlimited() -> Self {
        Self::default()
    }

    /// At most `rate` bytes a second (0 is refused by `build()`).
    pub fn bytes_per_second(rate: u64) -> Self {
        Self::default().and_bytes_per_second(rate)
    }

    /// Also limit bytes to `rate` a second.
    pub fn and_bytes_per_second(mut self, rate: u64) -> Self {
        let burst = self.bytes.map_or(0, |(_, b)| b);
        self.bytes = Some((rate, burst));
        self
    }

    /// Let `burst` bytes through once before the byte rate applies.
    pub fn bytes_burst(mut self, burst: u64) -> Self {
        let rate = self.bytes.map_or(0, |(r, _)| r);
        self.bytes = Some((rate, burst));
        self
    }

    /// Also limit operations to `rate` a second (0 is refused by
    /// `build()`).
    pub fn ops_per_second(mut self, rate: u64) -> Self {
        let burst = self.ops.map_or(0, |(_, b)| b);
        self.ops = Some((rate, burst));
        self
    }

    /// Let `burst` operations through once before the operation rate
    /// applies.
    pub fn ops_burst(mut self, burst: u64) -> Self {
        let rate = self.ops.map_or(0, |(r, _)| r);
        self.ops = Some((rate, burst));
        self
    }

    /// The device-side limit; a zero rate is an error naming `what`.
    pub(crate) fn to_device(self, what: &str) -> Result<chitin_virtio::RateLimit, SandboxError> {
        let limit = |part: Option<(u64, u64)>, unit: &str| {
            part.map(|(rate, burst)| {
                NonZeroU64::new(rate)
                    .map(|rate| chitin_virtio::Limit::per_second(rate).with_burst(burst))
                    .ok_or_else(|| {
                        SandboxError::InvalidRateLimit(if burst > 0 {
                            format!("{what}: a burst of {unit} without a rate")
                        } else {
                            format!("{what}: a rate of 0 {unit} a second lets nothing through")
                        })
                    })
            })
            .transpose()
        };
        Ok(chitin_virtio::RateLimit {
            bandwidth: limit(self.bytes, "bytes")?,
            ops: limit(self.ops, "operations")?,
        })
    }
}

/// Where an interface's frames go on the host.
#[derive(Debug, Clone)]
enum TapSource {
    /// A tap interface chitin opens (or creates) by name.
    Name(String),
    /// An open tap fd the embedder handed over.
    Fd(Arc<OwnedFd>),
}

/// A network interface given to the guest as virtio-net over a tap.
/// Interfaces appear in the guest in the order added: `eth0`, `eth1`, ...
///
/// ```
/// use std::net::Ipv4Addr;
/// use chitin::{Net, RateLimit};
///
/// let eth0 = Net::tap("tap0")
///     .mac("02:00:00:00:00:01".parse()?)
///     .address(Ipv4Addr::new(10, 0, 2, 15), 24)
///     .gateway(Ipv4Addr::new(10, 0, 2, 1))
///     .tx_limit(RateLimit::bytes_per_second(100 << 20));
/// # let _ = eth0;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Net {
    source: TapSource,
    mac: Option<MacAddr>,
    offloads: bool,
    rx_limit: RateLimit,
    tx_limit: RateLimit,
    address: Option<(Ipv4Addr, u8)>,
    gateway: Option<Ipv4Addr>,
}

impl Net {
    fn with_source(source: TapSource) -> Self {
        Self {
            source,
            mac: None,
            offloads: true,
            rx_limit: RateLimit::default(),
            tx_limit: RateLimit::default(),
            address: None,
            gateway: None,
        }
    }

    /// The tap interface `name`: chitin attaches to it (creating it if it
    /// does not exist, which needs CAP_NET_ADMIN) with
    /// `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`. A tap is attached by one
    /// sandbox at a time.
    pub fn tap(name: impl Into<String>) -> Self {
        Self::with_source(TapSource::Name(name.into()))
    }

    /// An open tap fd (`/dev/net/tun` after `TUNSETIFF` with `IFF_TAP |
    /// IFF_NO_PI | IFF_VNET_HDR`), as CNI plugins and Kata hand over a tap
    /// they made in the pod's network namespace. `build()` checks it and
    /// refuses anything else. chitin makes it non-blocking and sets its
    /// offloads; `O_NONBLOCK` lands on the open file description, so other
    /// fds of the same open file see it too. Each `build()` of a clone
    /// attaches the same tap: give one sandbox at a time a tap.
    pub fn tap_fd(fd: OwnedFd) -> Self {
        Self::with_source(TapSource::Fd(Arc::new(fd)))
    }

    /// The guest's MAC address; a random locally administered one if not
    /// set.
    pub fn mac(mut self, mac: MacAddr) -> Self {
        self.mac = Some(mac);
        self
    }

    /// Offer checksum and segmentation offloads (those the tap supports;
    /// on by default). Off, every frame is a plain, fully checksummed
    /// Ethernet frame of at most the MTU.
    pub fn offloads(mut self, on: bool) -> Self {
        self.offloads = on;
        self
    }

    /// Limit frames to the guest.
    pub fn rx_limit(mut self, limit: RateLimit) -> Self {
        self.rx_limit = limit;
        self
    }

    /// Limit frames from the guest.
    pub fn tx_limit(mut self, limit: RateLimit) -> Self {
        self.tx_limit = limit;
        self
    }

    /// The guest's IPv4 address on this interface, with its prefix length
    /// (1 to 32); chitin's agent configures it and brings the interface
    /// up before the first command runs.
    pub fn address(mut self, address: Ipv4Addr, prefix: u8) -> Self {
        self.address = Some((address, prefix));
        self
    }

    /// The default route through `gateway` (needs an address).
    pub fn gateway(mut self, gateway: Ipv4Addr) -> Self {
        self.gateway = Some(gateway);
        self
    }

    /// A short name for errors and fault tables.
    pub(crate) fn label(&self) -> String {
        match &self.source {
            TapSource::Name(name) => format!("tap {name}"),
            TapSource::Fd(_) => "a handed-over tap fd".to_string(),
        }
    }

    /// Check the settings alone (no tap is touched).
    pub(crate) fn validate(&self) -> Result<(), SandboxError> {
        let label = self.label();
        let bad = |what: String| Err(SandboxError::InvalidNet(format!("{label}: {what}")));
        if let Some(mac) = self.mac {
            if mac.0[0] & 1 != 0 || mac.0 == [0; 6] {
                return bad(format!("{mac} is not a unicast MAC address"));
            }
        }
        if let Some((address, prefix)) = self.address {
            if !(1..=32).contains(&prefix) {
                return bad(format!("prefix /{prefix} is not 1 to 32"));
            }
            if let Some(gateway) = self.gateway {
                let mask = u32::MAX << (32 - u32::from(prefix));
                let same_net = u32::from(gateway) & mask == u32::from(address) & mask;
                if gateway == address || !same_net || prefix == 32 {
                    return bad(format!(
                        "gateway {gateway} is not another host of {address}/{prefix}"
                    ));
                }
            }
        } else if self.gateway.is_some() {
            return bad("a gateway needs an address".into());
        }
        self.rx_limit.to_device(&format!("{label} rx_limit"))?;
        self.tx_limit.to_device(&format!("{label} tx_limit"))?;
        Ok(())
    }

    /// The MAC set with `.mac(..)`, if any.
    /// The handed-over tap fd, if the interface has one.
    pub(crate) fn handed_over_fd(&self) -> Option<std::os::fd::RawFd> {
        match &self.source {
            TapSource::Fd(fd) => Some(std::os::fd::AsRawFd::as_raw_fd(fd.as_ref())),
            TapSource::Name(_) => None,
        }
    }

    pub(crate) fn chosen_mac(&self) -> Option<MacAddr> {
        self.mac
    }

    /// Whether a gateway is set.
    pub(crate) fn has_gateway(&self) -> bool {
        self.gateway.is_some()
    }

    /// Open the tap and make the device, with its MAC settled.
    pub(crate) fn device(&self) -> Result<chitin_net::Net, SandboxError> {
        let label = self.label();
        self.validate()?;
        let config = NetConfig {
            mac: self.mac.unwrap_or_else(MacAddr::random),
            offloads: self.offloads,
            rx_limit: self.rx_limit.to_device(&format!("{label} rx_limit"))?,
            tx_limit: self.tx_limit.to_device(&format!("{label} tx_limit"))?,
        };
        let tap = match &self.source {
            TapSource::Name(name) => Tap::open(name),
            TapSource::Fd(fd) => fd
                .try_clone()
                .map_err(|e| chitin_net::TapError::Setup {
                    name: "handed-over fd".to_string(),
                    step: "dup the handed-over fd",
                    source: e,
                })
                .and_then(Tap::from_fd),
        }
        .map_err(|source| SandboxError::Tap {
            tap: label.clone(),
            source,
        })?;
        chitin_net::Net::new(tap, config)
            .map_err(|source| SandboxError::NetDevice { tap: label, source })
    }

    /// The `chitin.net=` entry for the agent, if the guest side is
    /// configured.
    pub(crate) fn cmdline_entry(&self, mac: MacAddr) -> Option<String> {
        let (address, prefix) = self.address?;
        let mut entry = format!("chitin.net={mac},{address}/{prefix}");
        if let Some(gateway) = self.gateway {
            entry.push_str(&format!(",{gateway}"));
        }
        Some(entry)
    }
}

/// The `chitin.dns=` entry for `servers`, if any.
pub(crate) fn dns_entry(servers: &[Ipv4Addr]) -> Option<String> {
    if servers.is_empty() {
        return None;
    }
    let list: Vec<String> = servers.iter().map(Ipv4Addr::to_string).collect();
    Some(format!("chitin.dns={}", list.join(",")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limits_map_to_device_limits_and_zero_is_refused() {
        let limit = RateLimit::bytes_per_second(1000)
            .bytes_burst(5000)
            .ops_per_second(10);
        let device = limit.to_device("x").unwrap();
        assert_eq!(device.bandwidth.unwrap().rate(), 1000);
        assert_eq!(device.bandwidth.unwrap().burst(), 5000);
        assert_eq!(device.ops.unwrap().rate(), 10);
        assert!(RateLimit::unlimited()
            .to_device("x")
            .unwrap()
            .is_unlimited());
        let err = RateLimit::bytes_per_second(0)
            .to_device("eth0 tx")
            .unwrap_err();
        assert!(err.to_string().contains("eth0 tx"), "{err}");
        // A burst alone leaves a zero rate: refused too.
        assert!(RateLimit::default().ops_burst(3).to_device("x").is_err());
    }

    #[test]
    fn the_agent_entry_carries_mac_address_and_gateway() {
        let mac = MacAddr([2, 0, 0, 0, 0, 1]);
        let net = Net::tap("t").address(Ipv4Addr::new(10, 0, 2, 15), 24);
        assert_eq!(
            net.cmdline_entry(mac).unwrap(),
            "chitin.net=02:00:00:00:00:01,10.0.2.15/24"
        );
        let net = net.gateway(Ipv4Addr::new(10, 0, 2, 1));
        assert_eq!(
            net.cmdline_entry(mac).unwrap(),
            "chitin.net=02:00:00:00:00:01,10.0.2.15/24,10.0.2.1"
        );
        assert_eq!(Net::tap("t").cmdline_entry(mac), None);
        assert_eq!(
            dns_entry(&[Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(9, 9, 9, 9)]).unwrap(),
            "chitin.dns=1.1.1.1,9.9.9.9"
        );
        assert_eq!(dns_entry(&[]), None);
    }

    #[test]
    fn gateways_outside_the_subnet_and_non_unicast_macs_are_refused() {
        let ip = Ipv4Addr::new(10, 0, 2, 15);
        let refused = |net: Net| matches!(net.validate(), Err(SandboxError::InvalidNet(_)));
        assert!(refused(
            Net::tap("t")
                .address(ip, 24)
                .gateway(Ipv4Addr::new(10, 0, 3, 1))
        ));
        assert!(refused(Net::tap("t").address(ip, 24).gateway(ip)));
        assert!(refused(
            Net::tap("t")
                .address(ip, 32)
                .gateway(Ipv4Addr::new(10, 0, 2, 1))
        ));
        assert!(refused(Net::tap("t").mac(MacAddr([1, 0, 0, 0, 0, 1]))));
        assert!(refused(Net::tap("t").mac(MacAddr([0; 6]))));
        assert!(Net::tap("t")
            .address(ip, 24)
            .gateway(Ipv4Addr::new(10, 0, 2, 1))
            .validate()
            .is_ok());
    }

    #[test]
    fn bad_guest_settings_are_reported_before_any_tap_is_opened() {
        let err = Net::tap("t")
            .address(Ipv4Addr::new(10, 0, 0, 2), 33)
            .device()
            .unwrap_err();
        assert!(matches!(err, SandboxError::InvalidNet(_)), "{err}");
        let err = Net::tap("t")
            .gateway(Ipv4Addr::new(10, 0, 0, 1))
            .device()
            .unwrap_err();
        assert!(matches!(err, SandboxError::InvalidNet(_)), "{err}");
    }
}
