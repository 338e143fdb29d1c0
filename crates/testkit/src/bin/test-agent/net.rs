//! TCP and UDP tools for the nested tier's `net` scenarios, run through
//! exec as `/init <tool> ...` against a peer in L1:
//!
//! - `net-send ADDR:PORT BYTES`: connect, send BYTES of pattern, close the
//!   write side, wait for the peer to close; prints
//!   `sent=<n> fnv=<hex> ms=<ms>`.
//! - `net-recv ADDR:PORT`: connect and read to the end; prints
//!   `received=<n> fnv=<hex> ms=<ms>`.
//! - `net-echo-clients ADDR:PORT CONNS BYTES`: open CONNS connections at
//!   once, each sending BYTES of its own pattern while reading the echo
//!   back; prints `intact=<n> of=<CONNS> ms=<ms>`, exit 0 only if all
//!   came back intact.
//! - `net-udp-hold PORT SECONDS`: bind a UDP socket on PORT and never read
//!   it for SECONDS (a guest that does not keep up with a flood); prints
//!   `bound=<port>` first.
//!
//! The `net-upload` scenario (`chitin.scenario=net-upload`) is `net-send`
//! run at boot, for a VMM without chitin's exec (the peer column): its
//! target is `chitin.upload=<addr>:<port>:<bytes>`, its result one check
//! line.

use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use chitin_agent::cmdline::KernelCmdline;
use chitin_testkit::{receive_all, send_pattern, Report};

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

pub fn run(tool: &str, args: &[String]) -> i32 {
    let addr = args.first().and_then(|a| a.parse::<SocketAddr>().ok());
    let num = |i: usize| args.get(i).and_then(|a| a.parse::<u64>().ok());
    let result = match (tool, addr) {
        ("net-send", Some(addr)) => num(1).map(|bytes| send(addr, bytes)),
        ("net-recv", Some(addr)) => Some(recv(addr)),
        ("net-echo-clients", Some(addr)) => match (num(1), num(2)) {
            (Some(conns), Some(bytes)) => Some(echo_clients(addr, conns, bytes)),
            _ => None,
        },
        ("net-udp-hold", _) => match (num(0), num(1)) {
            (Some(port), Some(seconds)) => Some(udp_hold(port, seconds)),
            _ => None,
        },
        _ => None,
    };
    match result {
        Some(Ok(())) => 0,
        Some(Err(e)) => {
            eprintln!("{tool}: {e}");
            1
        }
        None => {
            eprintln!(
                "usage: net-send ADDR:PORT BYTES | net-recv ADDR:PORT | \
                 net-echo-clients ADDR:PORT CONNS BYTES | net-udp-hold PORT SECONDS"
            );
            2
        }
    }
}

/// Connect, trying again for [`CONNECT_TIMEOUT`] while the peer is not
/// there yet (its end of the link may come up after the guest's).
fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let until = Instant::now() + CONNECT_TIMEOUT;
    loop {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= until => return Err(format!("connect {addr}: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// `net-send` at boot, to `chitin.upload=<addr>:<port>:<bytes>`.
pub fn upload_scenario(cmdline: &KernelCmdline, report: &mut Report) {
    let target = cmdline.get("chitin.upload").and_then(|t| {
        let (addr, bytes) = t.rsplit_once(':')?;
        Some((addr.parse::<SocketAddr>().ok()?, bytes.parse::<u64>().ok()?))
    });
    let Some((addr, bytes)) = target else {
        report.check(
            "net-upload",
            false,
            "no chitin.upload=<addr>:<port>:<bytes>",
        );
        return;
    };
    match upload(addr, bytes) {
        Ok(line) => report.check("net-upload", true, &line),
        Err(e) => report.check("net-upload", false, &e),
    }
}

fn send(addr: SocketAddr, bytes: u64) -> Result<(), String> {
    println!("{}", upload(addr, bytes)?);
    Ok(())
}

/// Send `bytes` of pattern to `addr`; the result line.
fn upload(addr: SocketAddr, bytes: u64) -> Result<String, String> {
    let mut stream = connect(addr)?;
    let start = Instant::now();
    let (sent, hash) = send_pattern(&mut stream, bytes);
    let _ = stream.shutdown(Shutdown::Write);
    // The peer closes once it has read everything.
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    let line = format!(
        "sent={sent} fnv={hash:016x} ms={}",
        start.elapsed().as_millis()
    );
    if sent == bytes {
        Ok(line)
    } else {
        Err(format!("sent {sent} of {bytes} bytes: {line}"))
    }
}

fn recv(addr: SocketAddr) -> Result<(), String> {
    let mut stream = connect(addr)?;
    let start = Instant::now();
    let (received, hash) = receive_all(&mut stream);
    println!(
        "received={received} fnv={hash:016x} ms={}",
        start.elapsed().as_millis()
    );
    Ok(())
}

fn echo_clients(addr: SocketAddr, conns: u64, bytes: u64) -> Result<(), String> {
    let start = Instant::now();
    let streams: Vec<TcpStream> = (0..conns)
        .map(|i| connect(addr).map_err(|e| format!("#{i}: {e}")))
        .collect::<Result<_, _>>()?;
    let intact = std::thread::scope(|s| {
        let runs: Vec<_> = streams
            .iter()
            .map(|stream| {
                s.spawn(move || -> Result<bool, String> {
                    let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
                    let sender = std::thread::spawn(move || {
                        let sent = send_pattern(&mut writer, bytes);
                        let _ = writer.shutdown(Shutdown::Write);
                        sent
                    });
                    let mut reader = stream;
                    let back = receive_all(&mut reader);
                    let sent = sender.join().map_err(|_| "sender panicked")?;
                    Ok(sent == back && sent.0 == bytes)
                })
            })
            .collect();
        runs.into_iter()
            .map(|h| h.join().ok().and_then(Result::ok).unwrap_or(false))
            .filter(|&ok| ok)
            .count() as u64
    });
    println!(
        "intact={intact} of={conns} ms={}",
        start.elapsed().as_millis()
    );
    if intact == conns {
        Ok(())
    } else {
        Err(format!(
            "{} connections came back damaged or short",
            conns - intact
        ))
    }
}

fn udp_hold(port: u64, seconds: u64) -> Result<(), String> {
    let port = u16::try_from(port).map_err(|_| format!("bad port {port}"))?;
    let socket = UdpSocket::bind(("0.0.0.0", port)).map_err(|e| format!("bind {port}: {e}"))?;
    println!("bound={port}");
    std::thread::sleep(Duration::from_secs(seconds));
    drop(socket);
    Ok(())
}
