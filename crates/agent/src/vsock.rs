//! AF_VSOCK in the guest: the exec service's listener and outgoing
//! connections, a small syscall shim.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// Pending connections the kernel queues for us.
const BACKLOG: i32 = 16;

/// A listening vsock socket.
pub struct Listener {
    fd: OwnedFd,
}

fn check(ret: i32) -> io::Result<i32> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

impl Listener {
    /// Listen on `port` for any CID.
    pub fn bind(port: u32) -> io::Result<Self> {
        // SAFETY: socket takes no pointers; the result is checked.
        let raw = check(unsafe {
            libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0)
        })?;
        // SAFETY: `raw` is a fresh socket we own exclusively.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
        let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
        addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
        addr.svm_cid = libc::VMADDR_CID_ANY;
        addr.svm_port = port;
        // SAFETY: `addr` is a valid sockaddr_vm and the length matches it.
        check(unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
            )
        })?;
        // SAFETY: listen takes no pointers.
        check(unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) })?;
        Ok(Self { fd })
    }

    /// Wait for one connection; the stream is a plain file descriptor.
    pub fn accept(&self) -> io::Result<File> {
        loop {
            // SAFETY: null address pointers are allowed (peer not wanted).
            let ret = unsafe {
                libc::accept4(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            match check(ret) {
                // SAFETY: accept4 returned a new descriptor we now own.
                Ok(raw) => return Ok(File::from(unsafe { OwnedFd::from_raw_fd(raw) })),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

/// The host's CID: a guest connection to it reaches the VMM.
pub const HOST_CID: u32 = 2;

/// Connect to `cid`:`port`.
pub fn connect(cid: u32, port: u32) -> io::Result<File> {
    // SAFETY: socket takes no pointers; the result is checked.
    let raw =
        check(unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: `raw` is a fresh socket we own exclusively.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_vm is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = cid;
    addr.svm_port = port;
    // SAFETY: `addr` is a valid sockaddr_vm and the length matches it.
    check(unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_vm).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    })?;
    Ok(File::from(fd))
}

/// Stop sending on a connected socket (the peer reads EOF).
pub fn shutdown_write(stream: &File) -> io::Result<()> {
    // SAFETY: shutdown takes no pointers; the fd is open.
    check(unsafe { libc::shutdown(stream.as_raw_fd(), libc::SHUT_WR) }).map(|_| ())
}
