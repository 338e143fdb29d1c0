//! PID 1 duties: the file systems a process expects, and stopping the VM.
//!
//! Stopping is `sync` then `reboot(RB_AUTOBOOT)`: a guest booted with
//! `reboot=k` pulses the i8042 reset line and the VMM sees `Reset`.

use std::ffi::CString;
use std::io;

/// (source, target, fstype, flags) of each mount, in order.
const MOUNTS: &[(&str, &str, &str, libc::c_ulong)] = &[
    (
        "proc",
        "/proc",
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    ),
    (
        "sysfs",
        "/sys",
        "sysfs",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
    ),
    ("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID),
    ("tmpfs", "/tmp", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV),
    ("tmpfs", "/run", "tmpfs", libc::MS_NOSUID | libc::MS_NODEV),
];

/// Mount `source` on `target` (created if missing); EBUSY (mounted
/// already) is not an error.
pub(crate) fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
) -> io::Result<()> {
    std::fs::create_dir_all(target)?;
    let c = |s: &str| CString::new(s).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e));
    let (source, target_c, fstype) = (c(source)?, c(target)?, c(fstype)?);
    // SAFETY: all pointers are valid NUL-terminated strings that outlive the
    // call; a null data pointer is allowed.
    let ret = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if ret != 0 {
        let err = io::Error::last_os_error();
        // The kernel may have mounted devtmpfs already (DEVTMPFS_MOUNT).
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(err);
        }
    }
    Ok(())
}

/// Mount /proc, /sys, /dev, /tmp and /run. Returns the first failure as
/// text, after trying every mount.
pub fn mount_basics() -> Result<(), String> {
    let mut first_error = None;
    for &(source, target, fstype, flags) in MOUNTS {
        if let Err(e) = mount(source, target, fstype, flags) {
            first_error.get_or_insert(format!("mount {target}: {e}"));
        }
    }
    match first_error {
        None => Ok(()),
        Some(e) => Err(e),
    }
}

/// Flush file systems and reboot; never returns.
pub fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers; reboot with RB_AUTOBOOT
    // restarts the machine (PID 1 may call it).
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // reboot only returns on error (EPERM outside PID 1's namespace); PID 1
    // must not exit, so wait for the VMM to stop us.
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
    }
}
