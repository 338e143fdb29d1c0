//! Host entropy into the guest kernel's pool: a sandbox restored from a
//! snapshot starts with its snapshot's random state, the same in every
//! clone, until something reseeds it. ENTROPY hands the agent fresh host
//! bytes; they are mixed into the input pool (`RNDADDENTROPY`, credited)
//! and the kernel's generator is reseeded from it at once
//! (`RNDRESEEDCRNG`), so what `/dev/urandom` and `getrandom` return next
//! differs between clones.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use chitin_agent_protocol::MAX_ENTROPY;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)` (Linux 4.17 and later).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// `struct rand_pool_info` with room for [`MAX_ENTROPY`] bytes.
#[repr(C)]
struct PoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; MAX_ENTROPY],
}

/// Mix `bytes` into the kernel's pool, credited as entropy (they come from
/// the host's generator), and reseed the kernel's generator from it.
/// Needs `CAP_SYS_ADMIN`; at most [`MAX_ENTROPY`] bytes.
pub fn add(bytes: &[u8]) -> io::Result<()> {
    if bytes.len() > MAX_ENTROPY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "more entropy bytes than MAX_ENTROPY",
        ));
    }
    if bytes.is_empty() {
        return Ok(());
    }
    let random = File::options().write(true).open("/dev/urandom")?;
    let mut info = PoolInfo {
        entropy_count: (bytes.len() * 8) as libc::c_int,
        buf_size: bytes.len() as libc::c_int,
        buf: [0; MAX_ENTROPY],
    };
    info.buf[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: `info` is a `rand_pool_info` whose `buf_size` bytes of `buf`
    // are initialised and inside the struct; the kernel only reads it, and
    // `random` is an open descriptor of the random device.
    let ret = unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, &info) };
    if ret != 0 {
        return Err(io::Error::other(format!(
            "RNDADDENTROPY: {}",
            io::Error::last_os_error()
        )));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let ret = unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) };
    if ret != 0 {
        return Err(io::Error::other(format!(
            "RNDRESEEDCRNG: {}",
            io::Error::last_os_error()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_many_bytes_are_refused_before_any_ioctl() {
        let e = add(&[0; MAX_ENTROPY + 1]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        // Nothing to add is nothing to do.
        add(&[]).unwrap();
    }

    #[test]
    fn pool_info_matches_the_kernels_layout() {
        // Two ints, then the bytes.
        assert_eq!(std::mem::offset_of!(PoolInfo, buf), 8);
    }
}
