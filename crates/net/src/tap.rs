//! A tap interface as a virtio-net backend: frames in and out of the host
//! kernel's network stack, each preceded by a `virtio_net_hdr_v1`.
//!
//! [`Tap::open`] creates or attaches the interface by name (`TUNSETIFF`
//! with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`); [`Tap::from_fd`] takes one an
//! embedder opened, checks it is such a tap, and takes ownership. Either
//! way the fd is non-blocking and close-on-exec, and its header size is set
//! to [`VNET_HDR_LEN`]. [`Tap::supported_offloads`] probes which offloads
//! the host kernel takes, so the device offers only those;
//! [`Tap::set_offloads`] applies what the guest accepted.
//!
//! Every error names the step that failed and, where there is one, what
//! the caller can do about it.

use std::ffi::CStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use crate::VNET_HDR_LEN;

/// The control device every tap is made through.
pub const TUN_PATH: &str = "/dev/net/tun";

/// Longest interface name, without the terminating NUL (`IFNAMSIZ - 1`).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// The flags of a tap chitin can drive.
const TAP_FLAGS: libc::c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;

/// `struct ifreq` with the `ifr_flags` member of its union, padded to the
/// kernel's 40 bytes.
const _: () = assert!(std::mem::size_of::<IfReqFlags>() == 40);

#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReqFlags {
    fn new(name: &str, flags: libc::c_int) -> Self {
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            // The tap flags all fit the kernel's 16-bit field.
            flags: flags as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }

    fn name(&self) -> String {
        CStr::from_bytes_until_nul(&self.name)
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|_| String::from_utf8_lossy(&self.name).into_owned())
    }
}

/// Offloads a tap can do for the frames it hands over and takes, as
/// `TUNSETOFFLOAD` bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    /// Partial checksums (`TUN_F_CSUM`); every other offload needs it.
    pub csum: bool,
    /// TCP segmentation over IPv4 (`TUN_F_TSO4`).
    pub tso4: bool,
    /// TCP segmentation over IPv6 (`TUN_F_TSO6`).
    pub tso6: bool,
    /// UDP fragmentation (`TUN_F_UFO`).
    pub ufo: bool,
}

impl Offloads {
    /// Everything chitin knows how to use.
    pub const ALL: Offloads = Offloads {
        csum: true,
        tso4: true,
        tso6: true,
        ufo: true,
    };

    /// The `TUNSETOFFLOAD` argument. Segmentation without checksums is
    /// meaningless, so without `csum` the others are left out.
    pub fn bits(self) -> libc::c_uint {
        if !self.csum {
            return 0;
        }
        let mut bits = libc::TUN_F_CSUM;
        for (on, bit) in [
            (self.tso4, libc::TUN_F_TSO4),
            (self.tso6, libc::TUN_F_TSO6),
            (self.ufo, libc::TUN_F_UFO),
        ] {
            if on {
                bits |= bit;
            }
        }
        bits
    }

    /// Whether any segmentation offload is on, which makes frames up to
    /// 64 KiB.
    pub fn segments(self) -> bool {
        self.csum && (self.tso4 || self.tso6 || self.ufo)
    }
}

/// Why a tap could not be opened or set up.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The interface name is empty or longer than the kernel allows.
    #[error("tap name {name:?} must be 1 to {MAX_NAME_LEN} bytes")]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// The name holds a NUL, a '/' or white space, which no interface
    /// name can.
    #[error("tap name {name:?} holds a character no interface name can (NUL, '/', space)")]
    BadCharacter {
        /// The name given.
        name: String,
    },
    /// `/dev/net/tun` is missing: the `tun` module is not loaded or the
    /// device node was not created (in a container, bind it in).
    #[error(
        "{TUN_PATH} does not exist: load the tun module (modprobe tun) or make the device node"
    )]
    NoTunDevice,
    /// The caller may not open `/dev/net/tun` or create the interface:
    /// that needs CAP_NET_ADMIN in the network namespace, or a persistent
    /// tap made beforehand for this user (`ip tuntap add ... user ...`).
    #[error(
        "no permission to {step} (needs CAP_NET_ADMIN, or a persistent tap owned by this user)"
    )]
    Permission {
        /// What was refused.
        step: &'static str,
    },
    /// Another process (or another sandbox) has the interface open.
    #[error("tap {name} is in use by another open")]
    Busy {
        /// The interface name.
        name: String,
    },
    /// The interface exists but is not a tap (a tun, or a tap without
    /// `IFF_VNET_HDR` support), or a handed-over fd is not a tap.
    #[error("{what} is not a tap with virtio-net headers (flags {flags:#x})")]
    NotATap {
        /// The interface name or fd.
        what: String,
        /// The flags the kernel reported.
        flags: libc::c_int,
    },
    /// Another step failed.
    #[error("tap {name}: {step} failed")]
    Setup {
        /// The interface name (or the fd number).
        name: String,
        /// The step.
        step: &'static str,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
}

/// An open tap interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

/// `ioctl` with a pointer argument, as an `io::Result`.
///
/// # Safety
/// `arg` must point to what `request` reads or writes, valid for the call.
unsafe fn ioctl_ptr<T>(fd: RawFd, request: libc::Ioctl, arg: *mut T) -> io::Result<()> {
    // SAFETY: the caller guarantees `arg` suits `request`.
    if unsafe { libc::ioctl(fd, request, arg) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Tap {
    /// Create the tap `name`, or attach to it if it exists and nobody has
    /// it open.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        check_name(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_PATH)
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => TapError::NoTunDevice,
                io::ErrorKind::PermissionDenied => TapError::Permission {
                    step: "open /dev/net/tun",
                },
                _ => TapError::Setup {
                    name: name.to_string(),
                    step: "open /dev/net/tun",
                    source,
                },
            })?;
        let mut req = IfReqFlags::new(name, TAP_FLAGS);
        // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `req` has
        // its layout and size and lives for the call.
        unsafe { ioctl_ptr(file.as_raw_fd(), libc::TUNSETIFF, &mut req) }.map_err(|source| {
            match source.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission {
                    step: "create or attach the tap (TUNSETIFF)",
                },
                Some(libc::EBUSY) => TapError::Busy {
                    name: name.to_string(),
                },
                // An existing interface of another kind (a tun, or a tap
                // made without IFF_VNET_HDR support).
                Some(libc::EINVAL) => TapError::NotATap {
                    what: format!("interface {name}"),
                    flags: TAP_FLAGS,
                },
                _ => TapError::Setup {
                    name: name.to_string(),
                    step: "TUNSETIFF",
                    source,
                },
            }
        })?;
        let tap = Tap {
            file,
            name: req.name(),
        };
        tap.set_header_size()?;
        Ok(tap)
    }

    /// Take over a tap the embedder opened (in whatever network namespace
    /// it was made): it must be a tap with `IFF_NO_PI | IFF_VNET_HDR`.
    /// A tun or a tap without `IFF_VNET_HDR` is refused; `IFF_NO_PI` is
    /// the caller's to get right, as the kernel does not report it (the
    /// bit reads as `IFF_NOFILTER`). The fd is made non-blocking and
    /// close-on-exec.
    pub fn from_fd(fd: OwnedFd) -> Result<Tap, TapError> {
        let raw = fd.as_raw_fd();
        let what = format!("fd {raw}");
        let mut req = IfReqFlags::new("", 0);
        // SAFETY: TUNGETIFF writes one `struct ifreq`; `req` has its
        // layout and size and lives for the call.
        if let Err(source) = unsafe { ioctl_ptr(raw, libc::TUNGETIFF, &mut req) } {
            return Err(match source.raw_os_error() {
                // Not a tun/tap fd, or one never attached to an interface.
                Some(libc::EBADFD) | Some(libc::EINVAL) | Some(libc::ENOTTY) => {
                    TapError::NotATap { what, flags: 0 }
                }
                _ => TapError::Setup {
                    name: what,
                    step: "TUNGETIFF",
                    source,
                },
            });
        }
        let flags = libc::c_int::from(req.flags) & 0xffff;
        // IFF_NO_PI cannot be checked: TUNGETIFF reports IFF_NOFILTER,
        // the same bit, for every fd without a filter attached.
        if flags & (libc::IFF_TAP | libc::IFF_TUN) != libc::IFF_TAP
            || flags & libc::IFF_VNET_HDR == 0
        {
            return Err(TapError::NotATap { what, flags });
        }
        let name = req.name();
        set_fd_flags(raw).map_err(|source| TapError::Setup {
            name: name.clone(),
            step: "set O_NONBLOCK and FD_CLOEXEC",
            source,
        })?;
        let tap = Tap {
            file: File::from(fd),
            name,
        };
        tap.set_header_size()?;
        // Whatever the embedder left on, offloads follow the guest.
        tap.set_offloads(Offloads::default())?;
        Ok(tap)
    }

    fn set_header_size(&self) -> Result<(), TapError> {
        let mut size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which lives for the call.
        unsafe { ioctl_ptr(self.file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &mut size) }.map_err(
            |source| TapError::Setup {
                name: self.name.clone(),
                step: "set the virtio-net header size (TUNSETVNETHDRSZ)",
                source,
            },
        )
    }

    /// The interface name the kernel gave the tap.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tell the kernel which offloads the guest accepted: frames it hands
    /// to the tap may then be partially checksummed or up to 64 KiB.
    pub fn set_offloads(&self, offloads: Offloads) -> Result<(), TapError> {
        self.try_offloads(offloads.bits())
            .map_err(|source| TapError::Setup {
                name: self.name.clone(),
                step: "set offloads (TUNSETOFFLOAD)",
                source,
            })
    }

    fn try_offloads(&self, bits: libc::c_uint) -> io::Result<()> {
        let arg = libc::c_ulong::from(bits);
        // SAFETY: TUNSETOFFLOAD takes an unsigned long by value, no pointer
        // is dereferenced.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), libc::TUNSETOFFLOAD, arg) } < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Which of chitin's offloads this kernel's tap takes, probed one by
    /// one (on top of checksums); leaves offloads off.
    pub fn supported_offloads(&self) -> Offloads {
        let csum = Offloads {
            csum: true,
            ..Offloads::default()
        };
        let mut found = Offloads::default();
        if self.try_offloads(csum.bits()).is_ok() {
            found.csum = true;
            found.tso4 = self
                .try_offloads(libc::TUN_F_CSUM | libc::TUN_F_TSO4)
                .is_ok();
            found.tso6 = self
                .try_offloads(libc::TUN_F_CSUM | libc::TUN_F_TSO6)
                .is_ok();
            found.ufo = self
                .try_offloads(libc::TUN_F_CSUM | libc::TUN_F_UFO)
                .is_ok();
        }
        let _ = self.try_offloads(0);
        found
    }

    /// Read one frame (header first) into `bufs`, returning the bytes
    /// copied. `WouldBlock` when the tap has nothing queued. A frame longer
    /// than `bufs` is consumed cut to fit, and tun reports only the bytes
    /// it copied, so callers must offer room for the largest frame the tap
    /// can hold (its MTU, or 64 KiB with segmentation offloads). A kernel
    /// that reports the whole length instead gets `EMSGSIZE` here.
    pub fn read_frame<B: BitmapSlice>(&self, bufs: &[VolatileSlice<'_, B>]) -> io::Result<usize> {
        let guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard_mut()).collect();
        let iovecs: Vec<libc::iovec> = guards
            .iter()
            .map(|g| libc::iovec {
                iov_base: g.as_ptr().cast(),
                iov_len: g.len(),
            })
            .collect();
        let count = iovec_count(&iovecs)?;
        let n = retry(|| {
            // SAFETY: each iovec covers a live `VolatileSlice` whose pointer
            // guard is held above for the whole call, so the kernel writes
            // only memory those slices own. That memory may be guest memory
            // the guest touches concurrently; the kernel copies bytes and
            // no Rust reference to it exists (VolatileSlice's own contract).
            unsafe { libc::readv(self.file.as_raw_fd(), iovecs.as_ptr(), count) }
        });
        // Raw pointer writes bypass dirty tracking; a failed read may
        // still have written part of the buffers.
        for buf in bufs {
            buf.bitmap().mark_dirty(0, buf.len());
        }
        // Never hand on a length past the buffers, whatever the kernel says.
        let room: usize = iovecs.iter().map(|v| v.iov_len).sum();
        match n {
            Ok(n) if n > room => Err(io::Error::from_raw_os_error(libc::EMSGSIZE)),
            other => other,
        }
    }

    /// Write one frame, `header` then the bytes gathered from `bufs`,
    /// returning the bytes written (a tap takes a frame whole or not at
    /// all).
    pub fn write_frame<B: BitmapSlice>(
        &self,
        header: &[u8; VNET_HDR_LEN],
        bufs: &[VolatileSlice<'_, B>],
    ) -> io::Result<usize> {
        let guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard()).collect();
        // `iovec` has one pointer type for both directions; writev only
        // reads.
        let iovecs: Vec<libc::iovec> = std::iter::once(libc::iovec {
            iov_base: header.as_ptr().cast_mut().cast(),
            iov_len: header.len(),
        })
        .chain(guards.iter().map(|g| libc::iovec {
            iov_base: g.as_ptr().cast_mut().cast(),
            iov_len: g.len(),
        }))
        .collect();
        let count = iovec_count(&iovecs)?;
        retry(|| {
            // SAFETY: as in `read_frame`, the guards keep every buffer
            // valid for the call, and `header` is borrowed for it; writev
            // only reads them.
            unsafe { libc::writev(self.file.as_raw_fd(), iovecs.as_ptr(), count) }
        })
    }
}

/// Most iovecs one `readv`/`writev` takes (`UIO_MAXIOV`).
pub const MAX_IOVECS: usize = 1024;

fn iovec_count(iovecs: &[libc::iovec]) -> io::Result<libc::c_int> {
    if iovecs.len() > MAX_IOVECS {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    // At most 1024: fits.
    Ok(iovecs.len() as libc::c_int)
}

/// Run a syscall returning a length or -1, again after `EINTR`.
fn retry(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        match usize::try_from(call()) {
            Ok(n) => return Ok(n),
            Err(_) => {
                let error = io::Error::last_os_error();
                if error.kind() != io::ErrorKind::Interrupted {
                    return Err(error);
                }
            }
        }
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

fn check_name(name: &str) -> Result<(), TapError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(TapError::InvalidName {
            name: name.to_string(),
        });
    }
    if name
        .bytes()
        .any(|b| b == 0 || b == b'/' || b.is_ascii_whitespace())
    {
        return Err(TapError::BadCharacter {
            name: name.to_string(),
        });
    }
    Ok(())
}

fn set_fd_flags(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor the caller owns; these commands take
    // integer arguments, no pointers.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0
            && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
            && libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// An fd of `/dev/net/tun` attached to `name` with the given flags, as an
/// embedder (or a test) would hand over.
#[doc(hidden)]
pub fn open_raw(name: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    check_name(name).map_err(io::Error::other)?;
    let file = OpenOptions::new().read(true).write(true).open(TUN_PATH)?;
    let mut req = IfReqFlags::new(name, flags);
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `req` has its
    // layout and size and lives for the call.
    unsafe { ioctl_ptr(file.as_raw_fd(), libc::TUNSETIFF, &mut req) }?;
    let raw = std::os::fd::IntoRawFd::into_raw_fd(file);
    // SAFETY: `raw` came from into_raw_fd just now and is owned by nobody
    // else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_any_syscall() {
        assert!(matches!(Tap::open(""), Err(TapError::InvalidName { .. })));
        let long = "t".repeat(MAX_NAME_LEN + 1);
        assert!(matches!(
            Tap::open(&long),
            Err(TapError::InvalidName { .. })
        ));
        for bad in ["a/b", "a b", "a\0b"] {
            assert!(matches!(Tap::open(bad), Err(TapError::BadCharacter { .. })));
        }
    }

    #[test]
    fn offload_bits_follow_the_checksum_rule() {
        assert_eq!(Offloads::default().bits(), 0);
        let no_csum = Offloads {
            csum: false,
            ..Offloads::ALL
        };
        assert_eq!(no_csum.bits(), 0);
        assert!(!no_csum.segments());
        assert_eq!(
            Offloads::ALL.bits(),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO
        );
        assert!(Offloads::ALL.segments());
    }

    #[test]
    fn a_non_tap_fd_is_refused() {
        let file = File::open("/dev/null").unwrap();
        assert!(matches!(
            Tap::from_fd(OwnedFd::from(file)),
            Err(TapError::NotATap { .. })
        ));
    }
}
