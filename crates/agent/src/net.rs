//! The guest's network configuration, from the kernel command line.
//!
//! The VMM writes one `chitin.net=<mac>,<address>/<prefix>[,<gateway>]`
//! entry per interface it configured and `chitin.dns=<ip>[,<ip>...]`.
//! [`configure`] brings `lo` up, finds each interface by its MAC (the
//! order in which the kernel names them is not relied on), gives it its
//! address, brings it up, adds the default route, and writes
//! `/etc/resolv.conf`. Everything goes through the classic `SIOCSIF*` and
//! `SIOCADDRT` ioctls, which every kernel with `CONFIG_INET` has; no tool
//! is needed in the image.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use crate::cmdline::KernelCmdline;

/// The command line key of one interface's configuration.
pub const NET_KEY: &str = "chitin.net";
/// The command line key of the DNS servers.
pub const DNS_KEY: &str = "chitin.dns";

/// One interface's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Interface {
    /// Its MAC address, which finds it.
    pub mac: [u8; 6],
    /// Its address.
    pub address: Ipv4Addr,
    /// The prefix length, 1 to 32.
    pub prefix: u8,
    /// The default route's gateway.
    pub gateway: Option<Ipv4Addr>,
}

impl Interface {
    /// Parse `<mac>,<address>/<prefix>[,<gateway>]`.
    pub fn parse(entry: &str) -> Result<Interface, String> {
        let bad = |what: &str| format!("{NET_KEY}={entry}: {what}");
        let mut parts = entry.split(',');
        let mac = parse_mac(parts.next().unwrap_or_default()).ok_or_else(|| bad("bad MAC"))?;
        let (address, prefix) = parts
            .next()
            .and_then(|a| a.split_once('/'))
            .ok_or_else(|| bad("no <address>/<prefix>"))?;
        let address: Ipv4Addr = address.parse().map_err(|_| bad("bad address"))?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (1..=32).contains(p))
            .ok_or_else(|| bad("bad prefix"))?;
        let gateway = match parts.next() {
            Some(g) => Some(g.parse().map_err(|_| bad("bad gateway"))?),
            None => None,
        };
        if parts.next().is_some() {
            return Err(bad("too many fields"));
        }
        Ok(Interface {
            mac,
            address,
            prefix,
            gateway,
        })
    }

    /// The netmask of the prefix.
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX << (32 - u32::from(self.prefix)))
    }
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Configure the network from `cmdline`; returns one line per interface
/// configured and one per failure, for the console.
pub fn configure(cmdline: &KernelCmdline) -> Vec<Result<String, String>> {
    let mut report = Vec::new();
    if let Err(e) = set_up("lo") {
        report.push(Err(format!("lo up: {e}")));
    }
    for entry in cmdline.get_all(NET_KEY) {
        report.push(Interface::parse(entry).and_then(|iface| {
            let name = find_by_mac(Path::new("/sys/class/net"), iface.mac).ok_or_else(|| {
                format!(
                    "no interface has MAC {}",
                    entry.split(',').next().unwrap_or_default()
                )
            })?;
            apply(&name, &iface).map_err(|e| format!("{name}: {e}"))?;
            Ok(format!("{name} {}/{}", iface.address, iface.prefix))
        }));
    }
    if let Some(servers) = cmdline.get(DNS_KEY) {
        let mut text = String::new();
        for server in servers.split(',') {
            match server.parse::<Ipv4Addr>() {
                Ok(ip) => text.push_str(&format!("nameserver {ip}\n")),
                Err(_) => report.push(Err(format!("{DNS_KEY}: bad server {server:?}"))),
            }
        }
        if !text.is_empty() {
            let written = std::fs::create_dir_all("/etc")
                .and_then(|()| std::fs::write("/etc/resolv.conf", text));
            if let Err(e) = written {
                report.push(Err(format!("/etc/resolv.conf: {e}")));
            }
        }
    }
    report
}

/// The interface under `sys_class_net` whose `address` is `mac`.
pub fn find_by_mac(sys_class_net: &Path, mac: [u8; 6]) -> Option<String> {
    std::fs::read_dir(sys_class_net)
        .ok()?
        .filter_map(Result::ok)
        .find(|dir| {
            std::fs::read_to_string(dir.path().join("address"))
                .ok()
                .and_then(|a| parse_mac(a.trim()))
                == Some(mac)
        })
        .and_then(|dir| dir.file_name().into_string().ok())
}

fn apply(name: &str, iface: &Interface) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_addr = sockaddr(iface.address);
    ioctl(&sock, libc::SIOCSIFADDR, &mut req, "SIOCSIFADDR")?;
    req.ifr_ifru.ifru_netmask = sockaddr(iface.netmask());
    ioctl(&sock, libc::SIOCSIFNETMASK, &mut req, "SIOCSIFNETMASK")?;
    set_up(name)?;
    if let Some(gateway) = iface.gateway {
        let mut route = RtEntry {
            rt_dst: sockaddr(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr(gateway),
            rt_genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
            rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
            ..RtEntry::default()
        };
        // SAFETY: SIOCADDRT reads one `struct rtentry`, which `route` is
        // laid out as (size checked below); it lives for the call, and
        // its device pointer is null (any interface).
        let ret = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &mut route) };
        if ret != 0 {
            let e = io::Error::last_os_error();
            // A route the kernel already has is what was asked for.
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(io::Error::new(e.kind(), format!("default route: {e}")));
            }
        }
    }
    Ok(())
}

/// Bring `name` up.
pub fn set_up(name: &str) -> io::Result<()> {
    let sock = inet_socket()?;
    let mut req = ifreq(name)?;
    ioctl(&sock, libc::SIOCGIFFLAGS, &mut req, "SIOCGIFFLAGS")?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    ioctl(&sock, libc::SIOCSIFFLAGS, &mut req, "SIOCSIFFLAGS")
}

/// Give `name` the address `address/prefix` and bring it up (for the
/// host side of a test link).
pub fn set_address(name: &str, address: Ipv4Addr, prefix: u8) -> io::Result<()> {
    let iface = Interface {
        mac: [0; 6],
        address,
        prefix: prefix.clamp(1, 32),
        gateway: None,
    };
    apply(name, &iface)
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket takes integers; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    // SAFETY: ifreq is plain data (a name and a union of plain data):
    // all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn ioctl(
    sock: &OwnedFd,
    request: libc::c_ulong,
    req: &mut libc::ifreq,
    what: &str,
) -> io::Result<()> {
    // SAFETY: every request used here reads or writes one `struct ifreq`,
    // which `req` is, alive for the call.
    let ret = unsafe { libc::ioctl(sock.as_raw_fd(), request, req as *mut libc::ifreq) };
    if ret != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn sockaddr(ip: Ipv4Addr) -> libc::sockaddr {
    let inet = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16 bytes of plain data
    // (the kernel reads a sockaddr_in through the sockaddr).
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}

/// The kernel's `struct rtentry` (include/uapi/linux/route.h), which the
/// libc crate has only for musl.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

#[cfg(target_pointer_width = "64")]
const _: () = {
    assert!(std::mem::size_of::<RtEntry>() == 120);
    assert!(std::mem::offset_of!(RtEntry, rt_dst) == 8);
    assert!(std::mem::offset_of!(RtEntry, rt_flags) == 56);
    assert!(std::mem::offset_of!(RtEntry, rt_metric) == 80);
    assert!(std::mem::offset_of!(RtEntry, rt_dev) == 88);
    assert!(std::mem::offset_of!(RtEntry, rt_irtt) == 112);
};

impl Default for RtEntry {
    fn default() -> Self {
        let zero = sockaddr(Ipv4Addr::UNSPECIFIED);
        Self {
            rt_pad1: 0,
            rt_dst: zero,
            rt_gateway: zero,
            rt_genmask: zero,
            rt_flags: 0,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: std::ptr::null_mut(),
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_parse_with_and_without_a_gateway() {
        let iface = Interface::parse("02:00:00:00:00:0a,10.0.2.15/24,10.0.2.1").unwrap();
        assert_eq!(iface.mac, [2, 0, 0, 0, 0, 10]);
        assert_eq!(iface.address, Ipv4Addr::new(10, 0, 2, 15));
        assert_eq!(iface.netmask(), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(iface.gateway, Some(Ipv4Addr::new(10, 0, 2, 1)));
        let iface = Interface::parse("02:00:00:00:00:0a,192.168.1.2/32").unwrap();
        assert_eq!(iface.gateway, None);
        assert_eq!(iface.netmask(), Ipv4Addr::BROADCAST);
        for bad in [
            "",
            "02:00:00:00:00,10.0.2.15/24",
            "02:00:00:00:00:0a,10.0.2.15",
            "02:00:00:00:00:0a,10.0.2.15/0",
            "02:00:00:00:00:0a,10.0.2.15/33",
            "02:00:00:00:00:0a,10.0.2/24",
            "02:00:00:00:00:0a,10.0.2.15/24,x",
            "02:00:00:00:00:0a,10.0.2.15/24,10.0.2.1,y",
        ] {
            assert!(Interface::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn interfaces_are_found_by_the_mac_in_sysfs() {
        let dir = std::env::temp_dir().join(format!("chitin-net-sys-{}", std::process::id()));
        for (name, mac) in [("eth0", "02:00:00:00:00:01"), ("eth1", "02:00:00:00:00:02")] {
            std::fs::create_dir_all(dir.join(name)).unwrap();
            std::fs::write(dir.join(name).join("address"), format!("{mac}\n")).unwrap();
        }
        assert_eq!(
            find_by_mac(&dir, [2, 0, 0, 0, 0, 2]).as_deref(),
            Some("eth1")
        );
        assert_eq!(find_by_mac(&dir, [2, 0, 0, 0, 0, 3]), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
