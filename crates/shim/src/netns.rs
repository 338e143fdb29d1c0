//! The pod's network, joined without any guest-side CNI (the model Kata
//! calls `tcfilter`): CNI has put a veth with the pod's address in the
//! pod's network namespace; the shim makes a tap next to it and has the
//! kernel's traffic control hand every frame arriving on one to the
//! other (an ingress qdisc and a `u32` filter matching everything, with a
//! `mirred` egress redirect, on each; `u32` rather than `matchall`, which
//! fewer kernels build). The guest's NIC gets the veth's MAC and
//! address and the namespace's default gateway, so the pod's IP answers
//! from inside the VM.
//!
//! Everything that needs the namespace runs on a short-lived thread that
//! entered it (`setns` changes only the calling thread); the tap's fd
//! works from any thread after.

use std::fs::File;
use std::io;
use std::mem::size_of;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use chitin::MacAddr;

/// The tap's name in the pod's namespace.
pub const TAP_NAME: &str = "chitin0";

/// What the guest's NIC takes over from the pod's veth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInterface {
    /// The veth's name (`eth0` under CRI).
    pub name: String,
    /// Its index in the namespace.
    pub index: i32,
    /// Its MAC, which the guest's NIC takes.
    pub mac: MacAddr,
    /// Its IPv4 address and prefix length.
    pub address: Ipv4Addr,
    pub prefix: u8,
    /// The namespace's default gateway through it, if any.
    pub gateway: Option<Ipv4Addr>,
}

/// The pod's network, joined: how to undo the redirects.
#[derive(Debug)]
pub struct PodNetwork {
    /// The namespace (kept open: the redirects are removed through it).
    netns: PathBuf,
    /// The interface the guest takes over.
    pub interface: PodInterface,
}

/// Run `f` on a thread that entered the network namespace at `netns`.
fn in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let ns = File::open(netns)?;
    std::thread::Builder::new()
        .name("shim-netns".into())
        .spawn(move || {
            // SAFETY: setns takes an fd this thread holds open and a
            // namespace type; it changes only the calling thread, which
            // ends after `f`.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            f()
        })?
        .join()
        .map_err(|_| io::Error::other("the network namespace thread panicked"))?
}

/// Join the pod's network namespace at `netns`: find its interface, make
/// the tap, set up the redirects both ways. Returns the tap's fd for
/// `Net::tap_fd` too (the tap disappears with its last fd).
pub fn join(netns: &Path) -> io::Result<(PodNetwork, OwnedFd)> {
    let (interface, tap) = in_netns(netns, || {
        let interface = find_interface()?;
        let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        let tap = chitin_net::tap::open_raw(TAP_NAME, flags)?;
        let sock = inet_socket()?;
        let tap_index = if_index(&sock, TAP_NAME)?;
        set_up(&sock, TAP_NAME)?;
        set_up(&sock, &interface.name)?;
        let mut nl = Netlink::open()?;
        let redirected = nl
            .redirect(interface.index, tap_index)
            .and_then(|()| nl.redirect(tap_index, interface.index));
        if let Err(e) = redirected {
            let _ = nl.delete_ingress(interface.index);
            return Err(e);
        }
        Ok((interface, tap))
    })?;
    let network = PodNetwork {
        netns: netns.to_path_buf(),
        interface,
    };
    Ok((network, tap))
}

impl PodNetwork {
    /// Undo the redirect on the veth (the tap's goes with the tap, when
    /// the VM closes it). A namespace already gone is fine.
    pub fn leave(self) {
        let index = self.interface.index;
        if !self.netns.exists() {
            return;
        }
        let left = in_netns(&self.netns, move || Netlink::open()?.delete_ingress(index));
        if let Err(e) = left {
            log::warn!("removing the redirect from {}: {e}", self.interface.name);
        }
    }
}

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket takes no pointers; a new fd nothing else owns.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socket returned a new fd, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= libc::IFNAMSIZ || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("interface name {name:?}"),
        ));
    }
    // SAFETY: ifreq is plain data, valid all zeros.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(req)
}

fn ioctl(sock: &OwnedFd, request: libc::Ioctl, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: every request used here reads or writes one `struct ifreq`,
    // which `req` is, and it lives for the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), request, req as *mut libc::ifreq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn if_index(sock: &OwnedFd, name: &str) -> io::Result<i32> {
    let mut req = ifreq(name)?;
    ioctl(sock, libc::SIOCGIFINDEX, &mut req)?;
    // SAFETY: SIOCGIFINDEX filled the union's index.
    Ok(unsafe { req.ifr_ifru.ifru_ifindex })
}

fn set_up(sock: &OwnedFd, name: &str) -> io::Result<()> {
    let mut req = ifreq(name)?;
    ioctl(sock, libc::SIOCGIFFLAGS, &mut req)?;
    // SAFETY: SIOCGIFFLAGS filled the union's flags.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    ioctl(sock, libc::SIOCSIFFLAGS, &mut req)
}

fn ipv4_of(req: &libc::ifreq) -> Ipv4Addr {
    // SAFETY: the address requests fill the union's sockaddr with a
    // sockaddr_in (AF_INET), which fits in it.
    let sin: libc::sockaddr_in =
        unsafe { std::ptr::read_unaligned(std::ptr::addr_of!(req.ifr_ifru.ifru_addr).cast()) };
    Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))
}

/// The namespace's interface with an IPv4 address (loopback and our tap
/// aside): the veth CNI made.
fn find_interface() -> io::Result<PodInterface> {
    let sock = inet_socket()?;
    let names = interface_names(&std::fs::read_to_string("/proc/thread-self/net/dev")?);
    let routes = std::fs::read_to_string("/proc/thread-self/net/route").unwrap_or_default();
    let mut found = Vec::new();
    for name in names {
        if name == "lo" || name == TAP_NAME {
            continue;
        }
        let mut req = ifreq(&name)?;
        if ioctl(&sock, libc::SIOCGIFADDR, &mut req).is_err() {
            continue; // no IPv4 address
        }
        let address = ipv4_of(&req);
        let mut req = ifreq(&name)?;
        ioctl(&sock, libc::SIOCGIFNETMASK, &mut req)?;
        let prefix = u32::from(ipv4_of(&req)).leading_ones() as u8;
        let mut req = ifreq(&name)?;
        ioctl(&sock, libc::SIOCGIFHWADDR, &mut req)?;
        // SAFETY: SIOCGIFHWADDR filled the union's hardware address.
        let hw = unsafe { req.ifr_ifru.ifru_hwaddr };
        let mut mac = [0u8; 6];
        for (d, s) in mac.iter_mut().zip(hw.sa_data.iter()) {
            *d = *s as u8;
        }
        found.push(PodInterface {
            index: if_index(&sock, &name)?,
            gateway: default_gateway(&routes, &name),
            mac: MacAddr(mac),
            address,
            prefix,
            name,
        });
    }
    if found.len() > 1 {
        let names: Vec<_> = found.iter().map(|i| i.name.as_str()).collect();
        log::warn!("the pod has {names:?}; only {} reaches the VM", names[0]);
    }
    found.into_iter().next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "the pod's network namespace has no interface with an IPv4 address",
        )
    })
}

/// Interface names in `/proc/net/dev`'s text.
fn interface_names(dev: &str) -> Vec<String> {
    dev.lines()
        .skip(2)
        .filter_map(|l| l.split_once(':'))
        .map(|(name, _)| name.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect()
}

/// The default route's gateway through `name`, from `/proc/net/route`'s
/// text (addresses in hex, in the kernel's byte order).
fn default_gateway(routes: &str, name: &str) -> Option<Ipv4Addr> {
    routes.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 8 || f[0] != name || f[1] != "00000000" || f[7] != "00000000" {
            return None;
        }
        let gw = u32::from_str_radix(f[2], 16).ok()?;
        // The kernel prints the address's bytes as a host-order number.
        (gw != 0).then(|| Ipv4Addr::from(gw.to_ne_bytes()))
    })
}

// rtnetlink and traffic control, as <linux/rtnetlink.h>,
// <linux/pkt_sched.h>, <linux/pkt_cls.h> and <linux/tc_act/tc_mirred.h>
// define them.
const RTM_NEWQDISC: u16 = 36;
const RTM_DELQDISC: u16 = 37;
const RTM_NEWTFILTER: u16 = 44;
const TCA_KIND: u16 = 1;
const TCA_OPTIONS: u16 = 2;
const TCA_U32_SEL: u16 = 5;
const TCA_U32_ACT: u16 = 7;
const TC_U32_TERMINAL: u8 = 1;
const TCA_ACT_KIND: u16 = 1;
const TCA_ACT_OPTIONS: u16 = 2;
const TCA_MIRRED_PARMS: u16 = 2;
const TCA_EGRESS_REDIR: i32 = 1;
const TC_ACT_STOLEN: i32 = 4;
const TC_H_INGRESS: u32 = 0xffff_fff1;
/// The ingress qdisc's handle, `ffff:`.
const INGRESS_HANDLE: u32 = 0xffff_0000;
const ETH_P_ALL: u16 = 0x0003;
const NLA_F_NESTED: u16 = 1 << 15;

/// A netlink message body under construction: a fixed header, then
/// attributes, nested ones patched with their length when closed.
struct Message {
    buf: Vec<u8>,
}

impl Message {
    fn new(header: &[u8]) -> Self {
        Self {
            buf: header.to_vec(),
        }
    }

    fn pad(&mut self) {
        while self.buf.len() % 4 != 0 {
            self.buf.push(0);
        }
    }

    fn attr(&mut self, kind: u16, data: &[u8]) -> &mut Self {
        let len = (4 + data.len()) as u16;
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.pad();
        self
    }

    fn open(&mut self, kind: u16) -> usize {
        let at = self.buf.len();
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        at
    }

    fn close(&mut self, at: usize) {
        let len = (self.buf.len() - at) as u16;
        self.buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

/// `struct tcmsg`.
fn tcmsg(ifindex: i32, handle: u32, parent: u32, info: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(20);
    b.extend_from_slice(&[libc::AF_UNSPEC as u8, 0, 0, 0]);
    b.extend_from_slice(&ifindex.to_ne_bytes());
    b.extend_from_slice(&handle.to_ne_bytes());
    b.extend_from_slice(&parent.to_ne_bytes());
    b.extend_from_slice(&info.to_ne_bytes());
    b
}

/// `struct tc_mirred` for an egress redirect to `ifindex`.
fn tc_mirred(ifindex: i32) -> Vec<u8> {
    let mut b = Vec::with_capacity(28);
    // tc_gen: index, capab, action, refcnt, bindcnt.
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&0u32.to_ne_bytes());
    b.extend_from_slice(&TC_ACT_STOLEN.to_ne_bytes());
    b.extend_from_slice(&0i32.to_ne_bytes());
    b.extend_from_slice(&0i32.to_ne_bytes());
    b.extend_from_slice(&TCA_EGRESS_REDIR.to_ne_bytes());
    b.extend_from_slice(&(ifindex as u32).to_ne_bytes());
    b
}

/// The ingress qdisc on `ifindex`.
fn ingress_qdisc(ifindex: i32) -> Vec<u8> {
    let mut m = Message::new(&tcmsg(ifindex, INGRESS_HANDLE, TC_H_INGRESS, 0));
    m.attr(TCA_KIND, b"ingress\0");
    m.buf
}

/// `struct tc_u32_sel` with one key that matches every packet (mask 0).
fn match_everything() -> Vec<u8> {
    let mut b = vec![0u8; 16 + 16];
    b[0] = TC_U32_TERMINAL; // flags
    b[2] = 1; // nkeys; the rest of the selector and the key stay zero
    b
}

/// A `u32` filter on `from`'s ingress redirecting every frame to `to`'s
/// egress.
fn redirect_filter(from: i32, to: i32) -> Vec<u8> {
    // Priority 1, every protocol (in network byte order).
    let info = (1u32 << 16) | u32::from(ETH_P_ALL.to_be());
    let mut m = Message::new(&tcmsg(from, 0, INGRESS_HANDLE, info));
    m.attr(TCA_KIND, b"u32\0");
    let options = m.open(TCA_OPTIONS);
    m.attr(TCA_U32_SEL, &match_everything());
    let actions = m.open(TCA_U32_ACT);
    let first = m.open(1);
    m.attr(TCA_ACT_KIND, b"mirred\0");
    let act_options = m.open(TCA_ACT_OPTIONS);
    m.attr(TCA_MIRRED_PARMS, &tc_mirred(to));
    m.close(act_options);
    m.close(first);
    m.close(actions);
    m.close(options);
    m.buf
}

/// A route netlink socket in the calling thread's namespace.
struct Netlink {
    fd: OwnedFd,
    seq: u32,
}

impl Netlink {
    fn open() -> io::Result<Self> {
        // SAFETY: socket takes no pointers; a new fd nothing else owns.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_ROUTE,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: socket returned a new fd, owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Answers that do not come in time are an error, not a hang.
        let timeout = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: SO_RCVTIMEO reads one timeval, which outlives the call.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                std::ptr::addr_of!(timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        Ok(Self { fd, seq: 0 })
    }

    /// Send one request and wait for its acknowledgement.
    fn request(&mut self, kind: u16, flags: u16, body: &[u8]) -> io::Result<()> {
        self.seq += 1;
        let len = (16 + body.len()) as u32;
        let mut msg = Vec::with_capacity(len as usize);
        msg.extend_from_slice(&len.to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        let flags = flags | libc::NLM_F_REQUEST as u16 | libc::NLM_F_ACK as u16;
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        // SAFETY: the buffer is valid for its length for the call; the
        // kernel is the destination (a zeroed sockaddr_nl).
        let sent = unsafe {
            let mut to: libc::sockaddr_nl = std::mem::zeroed();
            to.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                std::ptr::addr_of!(to).cast(),
                size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 8192];
        loop {
            // SAFETY: the buffer is valid and writable for its length.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(result) = ack(&buf[..n as usize], self.seq) {
                return result;
            }
        }
    }

    fn redirect(&mut self, from: i32, to: i32) -> io::Result<()> {
        let create = (libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
        match self.request(RTM_NEWQDISC, create, &ingress_qdisc(from)) {
            // One there already (the veth's from an earlier VM of a pod
            // that kept its namespace) serves as well.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            other => other?,
        }
        self.request(RTM_NEWTFILTER, create, &redirect_filter(from, to))
    }

    fn delete_ingress(&mut self, ifindex: i32) -> io::Result<()> {
        match self.request(RTM_DELQDISC, 0, &ingress_qdisc(ifindex)) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::EINVAL)) => Ok(()),
            other => other,
        }
    }
}

/// The answer to request `seq` in a datagram from the kernel, if it is
/// there: `NLMSG_ERROR` with 0 is success, a negative errno a failure.
fn ack(mut data: &[u8], seq: u32) -> Option<io::Result<()>> {
    while data.len() >= 16 {
        let len = u32::from_ne_bytes(data[0..4].try_into().ok()?) as usize;
        let kind = u16::from_ne_bytes(data[4..6].try_into().ok()?);
        let got = u32::from_ne_bytes(data[8..12].try_into().ok()?);
        if len < 16 || len > data.len() {
            return Some(Err(io::Error::other("a malformed netlink answer")));
        }
        if got == seq && kind == libc::NLMSG_ERROR as u16 && len >= 20 {
            let code = i32::from_ne_bytes(data[16..20].try_into().ok()?);
            return Some(if code == 0 {
                Ok(())
            } else {
                Err(io::Error::from_raw_os_error(-code))
            });
        }
        // Messages are 4-byte aligned; a last one that is not ends here.
        data = data.get((len + 3) & !3..).unwrap_or_default();
    }
    None
}

/// The network namespace a container's spec names (`linux.namespaces`,
/// type `network`, with a path), if any.
pub fn netns_path(spec: &oci_spec::runtime::Spec) -> Option<PathBuf> {
    use oci_spec::runtime::LinuxNamespaceType;
    spec.linux()
        .as_ref()?
        .namespaces()
        .as_ref()?
        .iter()
        .find(|n| n.typ() == LinuxNamespaceType::Network)?
        .path()
        .clone()
}

/// A name for logs.
pub fn describe(i: &PodInterface) -> String {
    let gw = i.gateway.map(|g| format!(" via {g}")).unwrap_or_default();
    format!("{} {}/{} {}{gw}", i.name, i.address, i.prefix, i.mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(args: &[&str]) -> String {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "ip {args:?}: {:?}", out);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn tc_filters(ns: &str, dev: &str) -> String {
        let out = std::process::Command::new("tc")
            .args(["-n", ns, "filter", "show", "dev", dev, "ingress"])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Packets received by `dev` in the calling thread's namespace.
    fn rx_packets(dev: &str) -> u64 {
        let text = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
        text.lines()
            .find_map(|l| {
                let (name, rest) = l.split_once(':')?;
                (name.trim() == dev).then(|| rest.split_whitespace().nth(1)?.parse().ok())?
            })
            .unwrap()
    }

    /// An Ethernet frame from `src` to broadcast, with a marker payload.
    fn frame(src: [u8; 6]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&src);
        f.extend_from_slice(&[0x88, 0xb5]); // local experimental ethertype
        f.extend_from_slice(b"chitin-redirect-test-payload-000000000000000000");
        f
    }

    #[test]
    #[ignore = "needs root and /dev/net/tun: run with --include-ignored (cargo xtask test does)"]
    fn joins_a_pod_namespace_and_frames_cross_both_ways() {
        let ns = format!("chitin-shim-{}", std::process::id());
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &ns])
            .status();
        ip(&["netns", "add", &ns]);
        ip(&[
            "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
        ]);
        ip(&["-n", &ns, "addr", "add", "10.77.0.2/24", "dev", "eth0"]);
        ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        ip(&["-n", &ns, "link", "set", "peer0", "up"]);
        ip(&["-n", &ns, "route", "add", "default", "via", "10.77.0.1"]);
        let path = PathBuf::from(format!("/run/netns/{ns}"));

        let (net, tap) = join(&path).unwrap();
        let i = net.interface.clone();
        assert_eq!(
            (i.name.as_str(), i.address, i.prefix),
            ("eth0", Ipv4Addr::new(10, 77, 0, 2), 24)
        );
        assert_eq!(i.gateway, Some(Ipv4Addr::new(10, 77, 0, 1)));
        let link = ip(&["-n", &ns, "link", "show", "eth0"]);
        assert!(link.contains(&i.mac.to_string()), "{link} / {}", i.mac);
        for (dev, to) in [("eth0", TAP_NAME), (TAP_NAME, "eth0")] {
            let f = tc_filters(&ns, dev);
            assert!(
                f.contains("u32") && f.contains("mirred") && f.contains(to),
                "{dev}: {f}"
            );
        }
        // A second join finds the tap in use and fails cleanly.
        assert!(join(&path).is_err());

        // Tap → eth0's egress → peer0.
        let before = in_netns(&path, || Ok(rx_packets("peer0"))).unwrap();
        let mut out = vec![0u8; 10]; // the default virtio-net header
        out.extend_from_slice(&frame([2, 0, 0, 0, 0, 1]));
        // SAFETY: the buffer is valid for its length.
        let n = unsafe { libc::write(tap.as_raw_fd(), out.as_ptr().cast(), out.len()) };
        assert_eq!(n, out.len() as isize, "{}", io::Error::last_os_error());
        std::thread::sleep(std::time::Duration::from_millis(200));
        let after = in_netns(&path, || Ok(rx_packets("peer0"))).unwrap();
        assert!(after > before, "peer0 received {before} then {after}");

        // peer0 → eth0's ingress → the tap.
        let sent = frame([2, 0, 0, 0, 0, 2]);
        let to_send = sent.clone();
        in_netns(&path, move || {
            let peer = if_index(&inet_socket()?, "peer0")?;
            // SAFETY: a new fd nothing else owns.
            let fd =
                unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
            assert!(fd >= 0);
            // SAFETY: owned from here.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: sockaddr_ll is plain data; zeros are valid.
            let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            to.sll_family = libc::AF_PACKET as u16;
            to.sll_ifindex = peer;
            to.sll_halen = 6;
            // SAFETY: the frame and address are valid for the call.
            let n = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    to_send.as_ptr().cast(),
                    to_send.len(),
                    0,
                    std::ptr::addr_of!(to).cast(),
                    size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
        .unwrap();
        let mut got = false;
        for _ in 0..50 {
            let mut pfd = libc::pollfd {
                fd: tap.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd, valid for the call.
            if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
                continue;
            }
            let mut buf = vec![0u8; 2048];
            // SAFETY: the buffer is valid and writable for its length.
            let n = unsafe { libc::read(tap.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n > 0 && buf[..n as usize].ends_with(&sent[6..]) {
                got = true;
                break;
            }
        }
        assert!(got, "the frame sent from peer0 never reached the tap");

        drop(tap);
        net.leave();
        assert!(
            !tc_filters(&ns, "eth0").contains("mirred"),
            "the redirect stayed"
        );
        ip(&["netns", "del", &ns]);
    }

    #[test]
    fn proc_net_dev_names() {
        let dev = "Inter-|   Receive\n face |bytes\n    lo: 1 2\n  eth0: 3 4\nchitin0: 5\n";
        assert_eq!(interface_names(dev), ["lo", "eth0", "chitin0"]);
    }

    #[test]
    fn the_default_route_through_the_interface_is_the_gateway() {
        let routes = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\n\
                      eth0\t00000000\t0100580A\t0003\t0\t0\t0\t00000000\n\
                      eth0\t0000580A\t00000000\t0001\t0\t0\t0\t0000FFFF\n";
        assert_eq!(
            default_gateway(routes, "eth0"),
            Some(Ipv4Addr::new(10, 88, 0, 1))
        );
        assert_eq!(default_gateway(routes, "eth1"), None);
        assert_eq!(default_gateway("", "eth0"), None);
    }

    #[test]
    fn acks_are_matched_by_sequence_and_carry_the_errno() {
        let msg = |seq: u32, code: i32| {
            let mut b = Vec::new();
            b.extend_from_slice(&36u32.to_ne_bytes());
            b.extend_from_slice(&(libc::NLMSG_ERROR as u16).to_ne_bytes());
            b.extend_from_slice(&0u16.to_ne_bytes());
            b.extend_from_slice(&seq.to_ne_bytes());
            b.extend_from_slice(&0u32.to_ne_bytes());
            b.extend_from_slice(&code.to_ne_bytes());
            b.extend_from_slice(&[0u8; 16]);
            b
        };
        assert!(ack(&msg(3, 0), 3).unwrap().is_ok());
        let err = ack(&msg(3, -libc::EEXIST), 3).unwrap().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
        assert!(ack(&msg(2, 0), 3).is_none(), "another request's answer");
        let mut bad = msg(3, 0);
        bad[0..4].copy_from_slice(&999u32.to_ne_bytes());
        assert!(ack(&bad, 3).unwrap().is_err());
        assert!(ack(&[0u8; 8], 3).is_none());
    }

    #[test]
    fn the_redirect_filter_nests_mirred_under_u32() {
        let m = redirect_filter(2, 5);
        // tcmsg: ifindex 2 on the ingress qdisc, all protocols.
        assert_eq!(i32::from_ne_bytes(m[4..8].try_into().unwrap()), 2);
        assert_eq!(
            u32::from_ne_bytes(m[12..16].try_into().unwrap()),
            INGRESS_HANDLE
        );
        let text = String::from_utf8_lossy(&m);
        assert!(text.contains("u32\0") && text.contains("mirred\0"));
        // The last 8 bytes of the mirred parameters: egress redirect to 5.
        assert_eq!(
            &m[m.len() - 8..m.len() - 4],
            &TCA_EGRESS_REDIR.to_ne_bytes()
        );
        assert_eq!(&m[m.len() - 4..], &5u32.to_ne_bytes());
        // Every nested attribute's length covers what follows it.
        assert_eq!(m.len() % 4, 0);
        let options_at = 20 + 4 + 4; // tcmsg, TCA_KIND "u32\0"
        let options_len = u16::from_ne_bytes(m[options_at..options_at + 2].try_into().unwrap());
        assert_eq!(options_at + usize::from(options_len), m.len());
    }
}
