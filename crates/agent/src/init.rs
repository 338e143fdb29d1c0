//! PID 1 duties: the file systems a process expects, the kernel modules the
//! image carries, and stopping the VM.
//!
//! Stopping is `sync`, then a power-off where the machine's ACPI tables
//! offer one (the VMM sees `PowerOff`), else `reboot(RB_AUTOBOOT)` (a guest
//! booted with `reboot=k` pulses the i8042 reset line: `Reset`).

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
    // Terminals for commands that ask for one (/dev/ptmx finds them here).
    (
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
    ),
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

/// Mount /proc, /sys, /dev, /dev/pts, /tmp and /run. Returns the first failure as
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

/// Where an image keeps the modules for kernel release `R`:
/// `/lib/modules/R/`, with [`MODULE_LIST`] naming the files to load.
pub const MODULES_DIR: &str = "/lib/modules";
/// The list of modules to load, one path (relative to the release's
/// directory) per line, each after the modules it depends on.
pub const MODULE_LIST: &str = "chitin.modules";

/// `finit_module` flag: the kernel decompresses the file itself (needs
/// `CONFIG_MODULE_DECOMPRESS`; Debian 12's kernels ship plain `.ko`).
const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;

/// The running kernel's release (`uname -r`).
fn kernel_release() -> io::Result<String> {
    // SAFETY: utsname holds only c_char arrays, for which all zeros is a
    // valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: `uts` is a valid, writable utsname.
    if unsafe { libc::uname(&mut uts) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let bytes: Vec<u8> = uts
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Load one module file; a module that is loaded already is fine.
fn load_module(path: &std::path::Path) -> io::Result<()> {
    let file = std::fs::File::open(path)?;
    let compressed = path
        .extension()
        .is_some_and(|e| e == "xz" || e == "zst" || e == "gz");
    let flags = if compressed {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    let params = c"";
    // SAFETY: the fd is open for the call's duration and `params` is a
    // valid NUL-terminated string; finit_module reads only through them.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            std::os::fd::AsRawFd::as_raw_fd(&file),
            params.as_ptr(),
            flags,
        )
    };
    if ret != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EEXIST) {
            return Err(err);
        }
    }
    Ok(())
}

/// Load the modules the image lists for the running kernel
/// (`/lib/modules/<release>/chitin.modules`), in order: a distribution
/// kernel has its virtio transport, block, network, vsock and virtio-fs
/// drivers as modules, and devices appear only once they are loaded. An
/// image without a list for this kernel (one with every driver built in)
/// loads nothing. Returns what was loaded, then one error per module that
/// failed; the rest are still tried.
pub fn load_modules() -> Vec<Result<String, String>> {
    let release = match kernel_release() {
        Ok(r) => r,
        Err(e) => return vec![Err(format!("uname: {e}"))],
    };
    let dir = std::path::Path::new(MODULES_DIR).join(&release);
    let list = match std::fs::read_to_string(dir.join(MODULE_LIST)) {
        Ok(list) => list,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => return vec![Err(format!("{}/{MODULE_LIST}: {e}", dir.display()))],
    };
    let mut loaded = 0;
    let mut results = Vec::new();
    for name in list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        match load_module(&dir.join(name)) {
            Ok(()) => loaded += 1,
            Err(e) => results.push(Err(format!("module {name}: {e}"))),
        }
    }
    results.insert(0, Ok(format!("loaded {loaded} modules for {release}")));
    results
}

/// Whether this machine powers off through ACPI: the kernel parsed ACPI
/// tables whose DSDT has a `\_S5_` (soft-off) object. Without it Linux
/// turns a power-off request into a halt the VMM never sees.
fn acpi_power_off() -> bool {
    std::fs::read("/sys/firmware/acpi/tables/DSDT")
        .is_ok_and(|dsdt| dsdt.windows(4).any(|w| w == b"_S5_"))
}

/// Flush file systems and reset the machine; never returns.
pub fn reboot() -> ! {
    stop(libc::RB_AUTOBOOT)
}

/// Flush file systems and power off (through ACPI where the machine has
/// it, else by a reset); never returns.
pub fn power_off() -> ! {
    if acpi_power_off() {
        stop(libc::RB_POWER_OFF)
    } else {
        stop(libc::RB_AUTOBOOT)
    }
}

fn stop(how: libc::c_int) -> ! {
    // SAFETY: sync and reboot take no pointers; RB_AUTOBOOT restarts and
    // RB_POWER_OFF powers off the machine (PID 1 may call both).
    unsafe {
        libc::sync();
        libc::reboot(how);
    }
    // reboot only returns on error (EPERM outside PID 1's namespace); PID 1
    // must not exit, so wait for the VMM to stop us.
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
    }
}
