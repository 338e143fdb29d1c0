//! Where guest connections to the host go: [`VsockBackend`], and
//! [`UnixBackend`], Firecracker's convention of one Unix socket per port.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
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
        // A Unix connect does not wait for the peer to accept; it blocks
        // only while the listener's backlog is full.
        let stream = UnixStream::connect(self.port_path(port))?;
        stream.set_nonblocking(true)?;
        Ok(stream)
    }
}
