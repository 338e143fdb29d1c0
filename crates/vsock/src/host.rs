//! Both ends of the host side's line protocol on the device's Unix socket,
//! written once: a host process connects to `uds_path`, writes
//! `CONNECT <port>\n`, and reads `OK <host_port>\n` once the guest accepted
//! (the device closes the stream instead when it refuses); the stream then
//! carries the connection's bytes.
//!
//! [`connect`] is the host process's side; [`parse_connect_line`] and
//! [`ok_line`] are the device's.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Longest reply line [`connect`] reads (`OK <u32>\n` is at most 14 bytes).
const MAX_REPLY: usize = 64;

/// The line a host process sends to reach guest port `port`.
pub fn connect_line(port: u32) -> String {
    format!("CONNECT {port}\n")
}

/// The device's answer once the guest accepted: `OK <host_port>\n`.
pub fn ok_line(host_port: u32) -> String {
    format!("OK {host_port}\n")
}

/// The port of a `CONNECT <port>\n` line (digits only, newline included).
pub fn parse_connect_line(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    let rest = text.strip_prefix("CONNECT ")?.strip_suffix('\n')?;
    if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    rest.parse().ok()
}

/// Why [`connect`] did not get a connection.
#[derive(Debug, thiserror::Error)]
pub enum HostConnectError {
    /// Nothing listens at the socket path (the VM is not running, or the
    /// path is wrong).
    #[error("cannot connect to the vsock socket")]
    Socket(#[source] io::Error),
    /// The stream failed while the line was written or the reply read.
    #[error("vsock socket i/o")]
    Io(#[source] io::Error),
    /// The device closed the stream or answered something but `OK`: no
    /// guest program listens on the port (or it did not accept in time).
    #[error("guest port {port} refused the connection (reply {reply:?})")]
    Refused {
        /// The guest port.
        port: u32,
        /// What came back instead of `OK <n>` (empty: the stream closed).
        reply: String,
    },
    /// No answer before the deadline.
    #[error("no answer from guest port {0} before the deadline")]
    TimedOut(u32),
}

/// Connect to guest port `port` through the device's Unix socket at
/// `uds`, everything before `deadline`: write `CONNECT <port>`, then read
/// the reply byte by byte (nothing past its newline is consumed), each read
/// bounded by what is left, so a guest that dribbles its answer cannot
/// stretch the wait. The stream comes back with no timeouts set.
pub fn connect(uds: &Path, port: u32, deadline: Instant) -> Result<UnixStream, HostConnectError> {
    connect_with(uds, port, deadline, |_| {})
}

/// [`connect`], showing the stream to `connected` as soon as it exists (to
/// keep a second handle that another thread may shut down, cutting the
/// wait for the reply short).
pub fn connect_with(
    uds: &Path,
    port: u32,
    deadline: Instant,
    connected: impl FnOnce(&UnixStream),
) -> Result<UnixStream, HostConnectError> {
    let left = || deadline.saturating_duration_since(Instant::now());
    let mut stream = UnixStream::connect(uds).map_err(HostConnectError::Socket)?;
    connected(&stream);
    let bounded = |d: Duration| Some(d.max(Duration::from_millis(1)));
    stream
        .set_write_timeout(bounded(left()))
        .map_err(HostConnectError::Io)?;
    stream
        .write_all(connect_line(port).as_bytes())
        .map_err(|e| failed(e, port))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < MAX_REPLY && line.last() != Some(&b'\n') {
        let left = left();
        if left.is_zero() {
            return Err(HostConnectError::TimedOut(port));
        }
        stream
            .set_read_timeout(bounded(left))
            .map_err(HostConnectError::Io)?;
        match stream.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(failed(e, port)),
        }
    }
    let reply = String::from_utf8_lossy(&line).into_owned();
    let ok = reply
        .strip_prefix("OK ")
        .and_then(|r| r.strip_suffix('\n'))
        .is_some_and(|n| n.parse::<u32>().is_ok());
    if !ok {
        return Err(HostConnectError::Refused { port, reply });
    }
    stream
        .set_read_timeout(None)
        .and_then(|()| stream.set_write_timeout(None))
        .map_err(HostConnectError::Io)?;
    Ok(stream)
}

/// A write or read error: a deadline, the device closing the stream (a
/// refusal), or a real failure.
fn failed(e: io::Error, port: u32) -> HostConnectError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => HostConnectError::TimedOut(port),
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => HostConnectError::Refused {
            port,
            reply: String::new(),
        },
        _ => HostConnectError::Io(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn socket() -> (std::path::PathBuf, UnixListener) {
        let path = std::env::temp_dir().join(format!(
            "chitin-host-{}-{:?}.sock",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        (path, listener)
    }

    #[test]
    fn lines_round_trip_through_the_device_parser() {
        assert_eq!(
            parse_connect_line(connect_line(1024).as_bytes()),
            Some(1024)
        );
        assert_eq!(parse_connect_line(b"CONNECT \n"), None);
        assert_eq!(parse_connect_line(b"CONNECT +1\n"), None);
        assert_eq!(parse_connect_line(b"CONNECT 99999999999\n"), None);
        assert_eq!(ok_line(7), "OK 7\n");
    }

    #[test]
    fn connect_gets_the_stream_after_ok_and_nothing_past_it() {
        let (path, listener) = socket();
        let device = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut line = [0u8; 13];
            s.read_exact(&mut line).unwrap();
            assert_eq!(parse_connect_line(&line), Some(5000));
            // The reply and the first data bytes in one write.
            s.write_all(b"OK 1\ndata").unwrap();
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut stream = connect(&path, 5000, deadline).unwrap();
        let mut data = Vec::new();
        stream.read_to_end(&mut data).unwrap();
        assert_eq!(data, b"data");
        device.join().unwrap();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn a_closed_or_dribbling_device_is_refused_or_timed_out() {
        let (path, listener) = socket();
        let device = std::thread::spawn(move || {
            // First: closed without a reply.
            drop(listener.accept().unwrap());
            // Second: one byte, then silence.
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"O").unwrap();
            std::thread::sleep(Duration::from_millis(600));
        });
        let soon = || Instant::now() + Duration::from_millis(300);
        let refused = connect(&path, 1, soon());
        assert!(
            matches!(refused, Err(HostConnectError::Refused { port: 1, ref reply }) if reply.is_empty()),
            "{refused:?}"
        );
        let started = Instant::now();
        let slow = connect(&path, 1, soon());
        assert!(
            matches!(slow, Err(HostConnectError::TimedOut(1))),
            "{slow:?}"
        );
        assert!(started.elapsed() < Duration::from_millis(550));
        device.join().unwrap();
        let _ = std::fs::remove_file(&path);
    }
}
