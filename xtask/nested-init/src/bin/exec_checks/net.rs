//! The `net` scenario's host side: chitin's virtio-net over a tap in a
//! network namespace of this process's own (L1's QEMU has no network
//! device, and the namespace has only `lo` and the tap, so no frame can
//! go anywhere else), the guest configured through `Net::address`.
//!
//! Checks: ping to L1 (RTT), 64 MiB TCP each way checksummed at both
//! ends (MB/s), 100 concurrent TCP connections each echoing 64 KiB, and
//! a UDP flood at a guest socket nobody reads: the VMM's own memory
//! (resident set minus guest RAM) stays flat and the guest still answers
//! ping afterwards.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, UdpSocket};
use std::time::{Duration, Instant};

use chitin::{Command, ExitStatus, Net, RunningSandbox};
use chitin_testkit::{receive_all, send_pattern, Report as Checks};

/// The tap's name in the namespace.
pub const TAP: &str = "chitin0";
/// L1's end of the link.
pub const HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 1);
/// The guest's address.
pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const PREFIX: u8 = 24;
/// Bytes of each stream.
const STREAM_BYTES: u64 = 64 << 20;
const ECHO_CONNS: u64 = 100;
const ECHO_BYTES: u64 = 64 << 10;
/// How long L1 floods the guest.
const FLOOD: Duration = Duration::from_secs(5);
/// The most the VMM's own memory may grow over the flood.
const FLOOD_GROWTH_LIMIT: u64 = 4 << 20;

/// Move this process into a network namespace of its own with `lo` up.
/// Call before any thread starts: threads made later inherit it.
pub fn enter_namespace() -> Result<(), String> {
    // SAFETY: unshare with a flag only; the process (single-threaded at
    // this point) moves into a new, empty network namespace.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!(
            "unshare(CLONE_NEWNET): {}",
            std::io::Error::last_os_error()
        ));
    }
    chitin_agent::net::set_up("lo").map_err(|e| format!("lo up: {e}"))
}

/// The interface chitin gives the guest.
pub fn interface() -> Net {
    Net::tap(TAP).address(GUEST, PREFIX).gateway(HOST)
}

/// L1's end of the link, once `build()` made the tap. The tap's queue is
/// made long enough that a throttled receive limit holds L1's TCP back
/// by its window, not by drops at the tap (which would measure TCP's
/// recovery, not the limit).
pub fn host_side() -> Result<(), String> {
    chitin_agent::net::set_address(TAP, HOST, PREFIX).map_err(|e| format!("{TAP}: {e}"))?;
    set_tx_queue_len(TAP, 10_000).map_err(|e| format!("{TAP} txqueuelen: {e}"))
}

fn set_tx_queue_len(name: &str, len: i32) -> std::io::Result<()> {
    // SAFETY: socket takes integers; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let sock = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req.ifr_ifru.ifru_ifindex = len;
    // SAFETY: SIOCSIFTXQLEN reads one ifreq (its int member), alive for
    // the call.
    let ret = unsafe {
        libc::ioctl(
            std::os::fd::AsRawFd::as_raw_fd(&sock),
            libc::SIOCSIFTXQLEN,
            &mut req as *mut libc::ifreq,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn guest(vm: &RunningSandbox, args: &[&str]) -> Result<String, String> {
    let mut cmd = Command::new(args[0]);
    for a in &args[1..] {
        cmd.arg(a);
    }
    // Generous: the nested tier runs at the speed of QEMU's TCG on a
    // shared machine, which varies twofold between runs.
    cmd.timeout(Duration::from_secs(600));
    match vm.exec(&cmd) {
        Ok(o) if o.status == ExitStatus::Code(0) => {
            Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
        }
        Ok(o) => Err(format!(
            "{:?}: {} {}",
            o.status,
            String::from_utf8_lossy(&o.stdout).trim(),
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(chitin::error_chain(&e)),
    }
}

/// `key=value` from a tool's output line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

pub fn ping(vm: &RunningSandbox, count: u32) -> Result<String, String> {
    let out = guest(
        vm,
        &[
            "ping",
            "-c",
            &count.to_string(),
            "-W",
            "5",
            &HOST.to_string(),
        ],
    )?;
    // busybox: "round-trip min/avg/max = 0.321/0.402/0.513 ms"
    let rtt = out
        .lines()
        .find_map(|l| l.split_once("min/avg/max = ").map(|(_, r)| r.to_string()))
        .ok_or_else(|| format!("no RTT line in {out:?}"))?;
    Ok(format!("{count} replies, rtt min/avg/max {rtt}"))
}

fn listener() -> Result<(TcpListener, u16), String> {
    let l = TcpListener::bind((HOST, 0)).map_err(|e| format!("listen: {e}"))?;
    let port = l.local_addr().map_err(|e| e.to_string())?.port();
    Ok((l, port))
}

fn mbps(bytes: u64, ms: u128) -> f64 {
    bytes as f64 / 1e6 / (ms.max(1) as f64 / 1e3)
}

/// 64 MiB guest → L1.
pub fn upload(vm: &RunningSandbox, bytes: u64) -> Result<(f64, String), String> {
    let (l, port) = listener()?;
    let server = std::thread::spawn(move || -> Result<(u64, u64), String> {
        let (mut s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
        let got = receive_all(&mut s);
        let _ = s.shutdown(Shutdown::Both);
        Ok(got)
    });
    let out = guest(
        vm,
        &[
            "/init",
            "net-send",
            &format!("{HOST}:{port}"),
            &bytes.to_string(),
        ],
    )?;
    let (received, hash) = server.join().map_err(|_| "server panicked")??;
    let sent_hash = field(&out, "fnv").unwrap_or_default();
    let ms: u128 = field(&out, "ms").and_then(|m| m.parse().ok()).unwrap_or(0);
    if received != bytes || format!("{hash:016x}") != sent_hash {
        return Err(format!(
            "L1 got {received} bytes fnv={hash:016x}, the guest says {out}"
        ));
    }
    let rate = mbps(bytes, ms);
    Ok((
        rate,
        format!(
            "{} MiB intact fnv={hash:016x} in {ms} ms, {rate:.1} MB/s",
            bytes >> 20
        ),
    ))
}

/// 64 MiB L1 → guest.
fn download(vm: &RunningSandbox, bytes: u64) -> Result<String, String> {
    let (l, port) = listener()?;
    let server = std::thread::spawn(move || -> Result<(u64, u64), String> {
        let (mut s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
        let sent = send_pattern(&mut s, bytes);
        let _ = s.shutdown(Shutdown::Both);
        Ok(sent)
    });
    let out = guest(vm, &["/init", "net-recv", &format!("{HOST}:{port}")])?;
    let (sent, hash) = server.join().map_err(|_| "server panicked")??;
    let got: u64 = field(&out, "received")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let ms: u128 = field(&out, "ms").and_then(|m| m.parse().ok()).unwrap_or(0);
    if sent != bytes || got != bytes || field(&out, "fnv") != Some(&format!("{hash:016x}")) {
        return Err(format!(
            "L1 sent {sent} bytes fnv={hash:016x}, the guest says {out}"
        ));
    }
    Ok(format!(
        "{} MiB intact fnv={hash:016x} in {ms} ms, {:.1} MB/s",
        bytes >> 20,
        mbps(bytes, ms)
    ))
}

fn concurrent_echo(vm: &RunningSandbox) -> Result<String, String> {
    let (l, port) = listener()?;
    let server = std::thread::spawn(move || {
        let mut echoes = Vec::new();
        for _ in 0..ECHO_CONNS {
            let Ok((mut s, _)) = l.accept() else { break };
            echoes.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 16 << 10];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    }
                }
                let _ = s.shutdown(Shutdown::Write);
            }));
        }
        for e in echoes {
            let _ = e.join();
        }
    });
    let out = guest(
        vm,
        &[
            "/init",
            "net-echo-clients",
            &format!("{HOST}:{port}"),
            &ECHO_CONNS.to_string(),
            &ECHO_BYTES.to_string(),
        ],
    );
    let _ = server.join();
    let out = out?;
    Ok(format!(
        "{ECHO_CONNS} connections x {} KiB: {out}",
        ECHO_BYTES >> 10
    ))
}

/// The VMM's resident memory that is not guest RAM.
fn vmm_rss(vm: &RunningSandbox) -> Result<u64, String> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or("no VmRSS")?;
    let guest = vm.guest_memory_resident().map_err(|e| e.to_string())?;
    Ok((kib << 10).saturating_sub(guest))
}

fn udp_flood(vm: &RunningSandbox) -> Result<String, String> {
    let port = 9999u16;
    let holder = {
        let mut cmd = Command::new("/init");
        cmd.arg("net-udp-hold")
            .arg(port.to_string())
            .arg((FLOOD.as_secs() + 5).to_string());
        vm.spawn(&cmd).map_err(|e| chitin::error_chain(&e))?
    };
    // Let the guest bind before the flood.
    std::thread::sleep(Duration::from_secs(1));
    let before = vmm_rss(vm)?;
    let rx_before = vm.net_stats()[0].rx_frames;
    let sock = UdpSocket::bind((HOST, 0)).map_err(|e| e.to_string())?;
    let payload = [0x5au8; 1400];
    let (mut sent, start) = (0u64, Instant::now());
    while start.elapsed() < FLOOD {
        for _ in 0..64 {
            if sock.send_to(&payload, (GUEST, port)).is_ok() {
                sent += 1;
            }
        }
    }
    let after = vmm_rss(vm)?;
    let delivered = vm.net_stats()[0].rx_frames - rx_before;
    let _ = holder.wait_with_output();
    let growth = after.saturating_sub(before);
    let reply = ping(vm, 1)?;
    let text = format!(
        "{sent} datagrams of 1400 B in {} s, {delivered} frames reached the guest; \
         VMM memory outside guest RAM {} KiB -> {} KiB; afterwards {reply}",
        FLOOD.as_secs(),
        before >> 10,
        after >> 10
    );
    if growth > FLOOD_GROWTH_LIMIT {
        return Err(format!("grew by {} KiB: {text}", growth >> 10));
    }
    Ok(text)
}

/// Every `net` check, in order; returns chitin's upload MB/s for the
/// peer column.
pub fn checks(vm: &RunningSandbox, c: &mut Checks) -> Option<f64> {
    c.result(
        "net-config",
        guest(vm, &["ip", "addr", "show"]).and_then(|out| {
            if out.contains(&format!("inet {GUEST}/{PREFIX}")) {
                Ok(format!("eth0 has {GUEST}/{PREFIX}"))
            } else {
                Err(out)
            }
        }),
    );
    c.result("ping", ping(vm, 5));
    let uploaded = upload(vm, STREAM_BYTES);
    let rate = uploaded.as_ref().ok().map(|(rate, _)| *rate);
    c.result("tcp-upload-64mib", uploaded.map(|(_, text)| text));
    c.result("tcp-download-64mib", download(vm, STREAM_BYTES));
    c.result("tcp-100-echo", concurrent_echo(vm));
    c.result("udp-flood", udp_flood(vm));
    let stats = vm.net_stats();
    c.result(
        "net-counters",
        match stats.first() {
            Some(s) if s.tx_malformed == 0 && s.rx_frames > 0 && s.tx_frames > 0 => {
                Ok(format!("{s:?}"))
            }
            other => Err(format!("{other:?}")),
        },
    );
    rate
}

/// The peer's tap, link and guest.
const PEER_TAP: &str = "chitin1";
const PEER_HOST: Ipv4Addr = Ipv4Addr::new(10, 0, 3, 1);
const PEER_GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 3, 15);
const PEER_MAC: &str = "02:00:00:00:03:15";
const PEER_PORT: u16 = 5201;
/// How long the peer may take to boot and upload.
const PEER_TIMEOUT: Duration = Duration::from_secs(240);
/// Whether L1's kernel package has vhost-net, written by the harness.
const VHOST_NET_NOTE: &str = "/nested/vhost-net";

/// The same upload from a guest under QEMU microvm with
/// `-netdev tap,vhost=off` on an identical tap in this namespace: the
/// guest runs it at boot (`chitin.scenario=net-upload`), since QEMU has
/// no chitin exec. Returns QEMU's MB/s.
pub fn peer_upload(kernel: &str, initramfs: &str, bytes: u64) -> Result<(f64, String), String> {
    use std::io::BufRead;
    use std::process::{Command as Process, Stdio as ProcessStdio};

    let cmdline = format!(
        "console=ttyS0 reboot=t panic=-1 quiet chitin.scenario=net-upload \
         chitin.net={PEER_MAC},{PEER_GUEST}/{PREFIX},{PEER_HOST} \
         chitin.upload={PEER_HOST}:{PEER_PORT}:{bytes}"
    );
    let mut qemu = Process::new("/usr/bin/qemu-system-x86_64")
        .args([
            "-M",
            "microvm,acpi=off,rtc=on",
            "-enable-kvm",
            "-cpu",
            "host",
        ])
        .args(["-smp", "2", "-m", "256M", "-nodefaults", "-no-user-config"])
        .args([
            "-nographic",
            "-serial",
            "stdio",
            "-no-reboot",
            "-L",
            "/usr/share/qemu",
        ])
        .args(["-kernel", kernel, "-initrd", initramfs, "-append", &cmdline])
        .args([
            "-netdev",
            &format!("tap,id=n0,ifname={PEER_TAP},script=no,downscript=no,vhost=off"),
            "-device",
            &format!("virtio-net-device,netdev=n0,mac={PEER_MAC}"),
        ])
        .stdin(ProcessStdio::null())
        .stdout(ProcessStdio::piped())
        .stderr(ProcessStdio::piped())
        .spawn()
        .map_err(|e| format!("start qemu: {e}"))?;
    let result = (|| {
        // QEMU makes the tap as it starts; L1's end comes up once it is there.
        let until = Instant::now() + Duration::from_secs(20);
        // (Not /sys/class/net: sysfs shows the namespace that mounted it.)
        while !interface_exists(PEER_TAP) {
            if Instant::now() > until {
                return Err(format!("QEMU never made {PEER_TAP}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        chitin_agent::net::set_address(PEER_TAP, PEER_HOST, PREFIX)
            .map_err(|e| format!("{PEER_TAP}: {e}"))?;
        let l = TcpListener::bind((PEER_HOST, PEER_PORT)).map_err(|e| format!("listen: {e}"))?;
        let server = std::thread::spawn(move || -> Result<(u64, u64), String> {
            let (mut s, _) = l.accept().map_err(|e| format!("accept: {e}"))?;
            let got = receive_all(&mut s);
            let _ = s.shutdown(Shutdown::Both);
            Ok(got)
        });
        let stdout = qemu.stdout.take().ok_or("no QEMU stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("chitin-check: net-upload") && tx.send(line).is_err() {
                    break;
                }
            }
        });
        let line = rx
            .recv_timeout(PEER_TIMEOUT)
            .map_err(|_| "the QEMU guest reported no upload".to_string())?;
        let (received, hash) = server.join().map_err(|_| "server panicked")??;
        if !line.contains(" PASS ") {
            return Err(line);
        }
        let ms: u128 = field(&line, "ms").and_then(|m| m.parse().ok()).unwrap_or(0);
        if received != bytes || field(&line, "fnv") != Some(&format!("{hash:016x}")) {
            return Err(format!(
                "L1 got {received} bytes fnv={hash:016x}, the guest says {line}"
            ));
        }
        let rate = mbps(bytes, ms);
        Ok((
            rate,
            format!("{} MiB intact in {ms} ms, {rate:.1} MB/s", bytes >> 20),
        ))
    })();
    // The guest powers off after its check; whatever happened, QEMU goes.
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until && matches!(qemu.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = qemu.kill();
    let _ = qemu.wait();
    result
}

/// Whether this namespace has an interface `name`.
fn interface_exists(name: &str) -> bool {
    let Ok(name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: a NUL-terminated name that lives for the call.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

/// `yes`/`no`: whether L1's kernel could run vhost-net.
fn vhost_net_note() -> String {
    std::fs::read_to_string(VHOST_NET_NOTE)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Bytes QEMU's guest uploads for the peer column: its rate is a quarter
/// of chitin's here, so a quarter of chitin's stream takes about as long.
const PEER_BYTES: u64 = STREAM_BYTES / 4;

/// The peer column: chitin's upload MB/s next to QEMU's, with the ratio.
pub fn peer_column(chitin: Option<f64>, kernel: &str, initramfs: &str) -> Result<String, String> {
    let chitin = chitin.ok_or("chitin's upload failed: no figure to compare")?;
    let (qemu, detail) = peer_upload(kernel, initramfs, PEER_BYTES)?;
    Ok(format!(
        "guest->L1 upload: chitin {chitin:.1} MB/s ({} MiB), QEMU microvm tap vhost=off {qemu:.1} MB/s \
         ({detail}), ratio chitin/QEMU {:.2}; L1 kernel has vhost_net.ko: {}",
        STREAM_BYTES >> 20,
        chitin / qemu.max(f64::MIN_POSITIVE),
        vhost_net_note()
    ))
}

/// A sandbox of the default guest with `net` (and `disk`), L1's end of
/// the link set up between build and start.
pub fn sandbox(
    kernel: &str,
    initramfs: &str,
    net: Net,
    disk: Option<chitin::Disk>,
) -> Result<RunningSandbox, String> {
    let mut builder = super::agent_sandbox(kernel, initramfs).net(net);
    if let Some(disk) = disk {
        builder = builder.disk(disk);
    }
    let built = builder.build().map_err(|e| chitin::error_chain(&e))?;
    host_side()?;
    built.start().map_err(|e| chitin::error_chain(&e))
}

/// Mean bytes per frame the guest sent since `before`.
fn mean_tx_frame(vm: &RunningSandbox, before: chitin::NetStats) -> u64 {
    let now = vm.net_stats()[0];
    let frames = now.tx_frames - before.tx_frames;
    (now.tx_bytes - before.tx_bytes) / frames.max(1)
}

/// Bytes of each `net-offload` upload: without offloads the nested
/// guest sends under 1 MB/s, so 64 MiB (which `net` sends with them)
/// would take minutes.
const OFFLOAD_BYTES: u64 = 16 << 20;

/// `net-offload`: the upload with the offloads offered and
/// accepted, then with them refused (`Net::offloads(false)`); both
/// intact, with their MB/s and the mean frame the guest sent (above 1526
/// bytes only when the guest segments through the device).
pub fn offload_checks(kernel: &str, initramfs: &str, c: &mut Checks) {
    let start = Instant::now();
    for (name, on) in [("offloads-on", true), ("offloads-off", false)] {
        let result = sandbox(kernel, initramfs, interface().offloads(on), None).and_then(|vm| {
            if on {
                super::first_checks(&vm, start, c);
            }
            let before = vm.net_stats()[0];
            let (rate, text) = upload(&vm, OFFLOAD_BYTES)?;
            let mean = mean_tx_frame(&vm, before);
            let _ = vm.stop();
            let segmented = mean > 1526;
            if segmented != on {
                return Err(format!(
                    "mean TX frame {mean} B: the guest {} segment",
                    if on { "did not" } else { "did" }
                ));
            }
            Ok(format!(
                "upload {text} (mean TX frame {mean} B); upload_MBps={rate:.1}"
            ))
        });
        c.result(name, result);
    }
}

/// The RX and blk limits of `net-limit`, well under what the nested
/// tier's guest reaches unlimited (a limit above that would never
/// engage), and the bytes moved under them: 8 s worth.
const LIMIT_BYTES_PER_S: u64 = 1 << 20;
const LIMITED_BYTES: u64 = 8 << 20;
/// The TX limit is lower: while the device holds a frame back, the
/// guest's TCP small queues let it queue about two more, and each round
/// trip through L1's emulated CPU takes milliseconds, so an upload held
/// at 1 MiB/s cannot keep the bucket busy here.
const TX_LIMIT_BYTES_PER_S: u64 = 256 << 10;
const TX_LIMITED_BYTES: u64 = 2 << 20;
const LIMITED_SECONDS: f64 = 8.0;

/// The milliseconds of an `upload`/`download` result: `... in <ms> ms, ...`.
fn stream_ms(text: &str) -> u128 {
    text.split(" in ")
        .nth(1)
        .and_then(|t| t.split(" ms").next()?.parse().ok())
        .unwrap_or(0)
}

/// A limited stream's time against the limit's: it may not beat the
/// limit by more than 15 % (the limit holds), and may lag it by up to
/// 50 %. The lag is the nested tier's, not the limiter's: while L1's
/// emulated CPU keeps the guest from posting buffers or acknowledging,
/// the bucket fills to its cap and the tokens past it are lost. A
/// limiter that refilled at half the rate would still fail.
fn within_limit(ms: u128) -> Result<String, String> {
    let seconds = ms as f64 / 1e3;
    let off = (seconds - LIMITED_SECONDS) / LIMITED_SECONDS * 100.0;
    let text = format!("{seconds:.2} s for {LIMITED_SECONDS} s expected ({off:+.1} %)");
    if (-15.0..=50.0).contains(&off) {
        Ok(text)
    } else {
        Err(text)
    }
}

/// `net-limit`: an RX and a blk limit of 1 MiB/s, a TX limit of 256
/// KiB/s; 8 s worth through each takes no less than 8 s less 15 %, and
/// no more than half as long again (see [`within_limit`]).
pub fn limit_checks(kernel: &str, initramfs: &str, c: &mut Checks) {
    let image = "/tmp/chitin-limited.img";
    let made = std::fs::File::create(image).and_then(|f| f.set_len(LIMITED_BYTES + (1 << 20)));
    if let Err(e) = made {
        c.result("net-limit", Err(format!("{image}: {e}")));
        return;
    }
    let limit = chitin::RateLimit::bytes_per_second(LIMIT_BYTES_PER_S);
    let tx_limit = chitin::RateLimit::bytes_per_second(TX_LIMIT_BYTES_PER_S);
    let net = interface().tx_limit(tx_limit).rx_limit(limit);
    let disk = chitin::Disk::new(image).rate_limit(limit);
    let start = Instant::now();
    let vm = match sandbox(kernel, initramfs, net, Some(disk)) {
        Ok(vm) => vm,
        Err(e) => {
            c.result("net-limit", Err(e));
            return;
        }
    };
    super::first_checks(&vm, start, c);
    let ms = |out: &str| {
        field(out, "ms")
            .and_then(|m| m.parse::<u128>().ok())
            .unwrap_or(0)
    };
    c.result(
        "tx-limit-256kibps",
        upload(&vm, TX_LIMITED_BYTES)
            .and_then(|(_, text)| within_limit(stream_ms(&text)).map(|t| format!("{t}: {text}"))),
    );
    c.result(
        "rx-limit-1mibps",
        download(&vm, LIMITED_BYTES)
            .and_then(|text| within_limit(stream_ms(&text)).map(|t| format!("{t}: {text}"))),
    );
    c.result(
        "blk-limit-1mibps",
        guest(
            &vm,
            &[
                "/init",
                "blk-write-direct",
                "/dev/vda",
                &LIMITED_BYTES.to_string(),
            ],
        )
        .and_then(|out| within_limit(ms(&out)).map(|t| format!("{t}: O_DIRECT {out}"))),
    );
    let stats = vm.net_stats()[0];
    c.result(
        "limit-counters",
        if stats.tx_throttled > 0 && stats.rx_throttled > 0 {
            Ok(format!("{stats:?}"))
        } else {
            Err(format!("a limit never held anything back: {stats:?}"))
        },
    );
    let _ = vm.stop();
    let _ = std::fs::remove_file(image);
}

/// `net-reset`: the guest resets the device (driver unbound and bound
/// again) in the middle of an upload; chitin goes on, the guest's network
/// works again once configured, and a second sandbox on the same tap name
/// (after the first is gone) has a working network from its boot.
pub fn reset_checks(kernel: &str, initramfs: &str, c: &mut Checks) {
    let start = Instant::now();
    let vm = match sandbox(kernel, initramfs, interface(), None) {
        Ok(vm) => vm,
        Err(e) => {
            c.result("net-reset", Err(e));
            return;
        }
    };
    super::first_checks(&vm, start, c);
    c.result(
        "reset-mid-stream",
        (|| {
            let (l, port) = listener()?;
            let server = std::thread::spawn(move || {
                if let Ok((mut s, _)) = l.accept() {
                    // The guest's end goes away with the reset.
                    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                    let _ = receive_all(&mut s);
                }
            });
            let mut cmd = Command::new("/init");
            cmd.arg("net-send")
                .arg(format!("{HOST}:{port}"))
                .arg((1u64 << 30).to_string());
            let mut sender = vm.spawn(&cmd).map_err(|e| chitin::error_chain(&e))?;
            // Wait for the stream to be under way.
            let start = Instant::now();
            while vm.net_stats()[0].tx_bytes < (4 << 20) {
                if start.elapsed() > Duration::from_secs(60) {
                    return Err("the upload never got going".into());
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            let reset = guest(
                &vm,
                &[
                    "sh",
                    "-c",
                    "d=$(basename /sys/bus/virtio/drivers/virtio_net/virtio*) && \
                     echo $d > /sys/bus/virtio/drivers/virtio_net/unbind && \
                     echo $d > /sys/bus/virtio/drivers/virtio_net/bind && echo $d",
                ],
            )?;
            let sent_before = vm.net_stats()[0].tx_bytes;
            let _ = sender.kill();
            let _ = sender.wait_with_output();
            let _ = server.join();
            let config = guest(
                &vm,
                &[
                    "sh",
                    "-c",
                    &format!("ip addr add {GUEST}/{PREFIX} dev eth0 && ip link set eth0 up"),
                ],
            )?;
            let reply = ping(&vm, 3)?;
            let (_, again) = upload(&vm, 16 << 20)?;
            Ok(format!(
                "{reset} reset after {} MiB sent; {config}reconfigured, {reply}; \
                 16 MiB upload after: {again}",
                sent_before >> 20
            ))
        })(),
    );
    c.result("reset-device-faults", faults_of(&vm));
    // Stopped and dropped: its tap is closed (and gone with it).
    let _ = vm.stop();
    c.result(
        "next-boot",
        sandbox(kernel, initramfs, interface(), None).and_then(|vm| {
            let reply = ping(&vm, 3);
            let _ = vm.stop();
            reply.map(|r| format!("a new sandbox on {TAP}: {r}"))
        }),
    );
}

/// No device refused anything as malformed.
fn faults_of(vm: &RunningSandbox) -> Result<String, String> {
    let devices = vm.device_faults();
    let text: Vec<String> = devices
        .iter()
        .map(|d| format!("{}: {} malformed of {}", d.device, d.malformed, d.total()))
        .collect();
    if devices.iter().any(|d| d.malformed > 0) {
        Err(text.join("; "))
    } else {
        Ok(text.join("; "))
    }
}
