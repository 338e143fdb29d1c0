//! Where guest connections to the host go: [`VsockBackend`], and
//! [`UnixBackend`], Firecracker's convention of one Unix socket per port.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

/// A host-side stream: non-blocking, pollable, half-closable.
pub trait VsockStream: Read + Write + AsRawFd {
    /// `shutdown(2)` one or both directions.
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
}

impl VsockStream for UnixStream {
    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        UnixStream::shutdown(self, how)
    }
}

/// Opens host streams for guest-initiated connections.
pub trait VsockBackend {
    /// The stream type.
    type Stream: VsockStream;

    /// Connect to whatever serves host `port`; the stream must come back
    /// non-blocking.
    fn connect(&mut self, port: u32) -> io::Result<Self::Stream>;
}

/// Guest connections to host port `P` go to the Unix socket
/// `<uds_path>_<P>` (Firecracker's convention).
#[derive(Clone, Debug)]
pub struct UnixBackend {
    uds_path: PathBuf,
}

impl UnixBackend {
    /// A backend for the device listening at `uds_path`.
    pub fn new(uds_path: PathBuf) -> Self {
        UnixBackend { uds_path }
    }

    /// The socket serving host `port`.
    pub fn port_path(&self, port: u32) -> PathBuf {
        port_path(&self.uds_path, port)
    }
}

/// `<uds_path>_<port>`.
pub fn port_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut path = OsString::from(uds_path.as_os_str());
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

impl VsockBackend for UnixBackend {
    type Stream = UnixStream;

    fn connect(&mut self, port: u32) -> io::Result<UnixStream> {
        connect_nonblocking(&self.port_path(port))
    }
}

/// Connect a non-blocking Unix stream socket to `path` without waiting.
///
/// A Unix connect does not wait for the peer to accept, but a blocking one
/// waits while the listener's backlog is full, and this runs on the event
/// loop, which every device shares: a host listener that stops accepting
/// would freeze them all. A non-blocking connect fails at once instead
/// (`WouldBlock`), and the guest's request is refused.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data, for which all zeros is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path empty or too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // The path and its NUL, after the family.
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    // SAFETY: creates a socket; no memory is passed.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a socket just created and owned by nobody else; the
    // OwnedFd closes it on every path from here.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    loop {
        // SAFETY: `addr` is a sockaddr_un valid for `len` bytes (a NUL-ended
        // path shorter than sun_path) and outlives the call.
        let ret = unsafe {
            libc::connect(
                socket.as_raw_fd(),
                (&addr as *const libc::sockaddr_un).cast::<libc::sockaddr>(),
                len as libc::socklen_t,
            )
        };
        if ret == 0 {
            return Ok(UnixStream::from(socket));
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// Host sockets for guest connections over socket pairs, for tests and
/// fuzzing: every connect succeeds (except to ports in `refused`) with one
/// end of a fresh pair; the caller keeps the other end, by port, to write
/// to, read from or close.
#[cfg(any(test, feature = "test-utils"))]
#[derive(Debug, Default)]
pub struct PairBackend {
    /// The far end of the latest connection to each port.
    pub peers: std::collections::HashMap<u32, UnixStream>,
    /// Ports whose connects fail.
    pub refused: Vec<u32>,
}

#[cfg(any(test, feature = "test-utils"))]
impl VsockBackend for PairBackend {
    type Stream = UnixStream;

    fn connect(&mut self, port: u32) -> io::Result<UnixStream> {
        if self.refused.contains(&port) {
            return Err(io::Error::from(io::ErrorKind::ConnectionRefused));
        }
        let (near, far) = UnixStream::pair()?;
        near.set_nonblocking(true)?;
        self.peers.insert(port, far);
        Ok(near)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::test_utils::TempDir;

    /// A listener that never accepts and whose backlog holds no one.
    fn deaf_listener(path: &Path) -> OwnedFd {
        let listener = UnixListener::bind(path).unwrap();
        // SAFETY: re-listen with a backlog of 0 on a socket we own.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        OwnedFd::from(listener)
    }

    #[test]
    fn connect_to_listener_with_full_backlog_fails_at_once() {
        let dir = TempDir::new();
        let path = dir.path().join("v.sock_52");
        let _listener = deaf_listener(&path);
        // The backlog's one slot is taken by a connection nobody accepts.
        let _first = connect_nonblocking(&path).unwrap();
        let (tx, rx) = mpsc::channel();
        let second = path.clone();
        std::thread::spawn(move || {
            let _ = tx.send(connect_nonblocking(&second).map(|_| ()));
        });

        // A blocking connect would wait here for ever.
        let result = rx
            .recv_timeout(Duration::from_secs(2))
            .expect("connect waited");

        assert_eq!(result.unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn connect_to_accepting_listener_gives_a_nonblocking_stream() {
        let dir = TempDir::new();
        let path = dir.path().join("v.sock_53");
        let listener = UnixListener::bind(&path).unwrap();

        let stream = connect_nonblocking(&path).unwrap();
        let (mut accepted, _) = listener.accept().unwrap();

        accepted.write_all(b"x").unwrap();
        let mut buf = [0u8; 1];
        // Non-blocking: a read either finds the byte or would block.
        let mut stream = stream;
        let got = loop {
            match stream.read(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::yield_now(),
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!((got, buf[0]), (1, b'x'));
    }

    #[test]
    fn connect_to_missing_socket_is_refused() {
        let dir = TempDir::new();
        let err = connect_nonblocking(&dir.path().join("nobody")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn connect_with_overlong_path_is_invalid_input() {
        let long = PathBuf::from("/".to_string() + &"x".repeat(200));
        let err = connect_nonblocking(&long).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
