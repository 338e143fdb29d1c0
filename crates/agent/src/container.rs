//! Container processes: a command run with a root directory of its own.
//!
//! For an exec with a root, the agent does not set the process up in
//! its own (multi-threaded) process between fork and exec. It starts
//! itself again as a small single-threaded helper,
//! `/proc/self/exe --chitin-container <spec> -- <argv>`, which:
//!
//! 1. enters new mount and UTS namespaces and makes every mount private,
//!    so nothing it mounts is seen outside;
//! 2. bind-mounts the root onto itself and mounts, inside it, a fresh
//!    `/proc`, `/sys` (read-only), `/dev` (a tmpfs with `null`, `zero`,
//!    `full`, `random`, `urandom`, `tty`, a new `devpts` instance with
//!    `ptmx`, and a `shm` tmpfs) and `/tmp`; the root must already hold
//!    those four directories (every OCI image does);
//! 3. `pivot_root`s into it and detaches the old root (or, on the
//!    initial ramfs, which cannot be pivoted away from, moves it over `/`
//!    and `chroot`s, as runc does on a ramdisk);
//! 4. sets the hostname, and a hostname file over `/etc/hostname` when
//!    the image has one;
//! 5. drops to the group and user (no supplementary groups), changes to
//!    the working directory, and `exec`s the program (found through the request's `PATH` inside the
//!    new root). The helper *becomes* the program: its pid, its signals
//!    and its exit status are the program's.
//!
//! A step that fails is printed on the process's stderr as
//! `chitin-agent: container: <step>: <error>` and the process exits with
//! [`SETUP_FAILED`], before the program ever runs; a program that cannot
//! be found exits 127, one that cannot be run 126, as in a shell.
//!
//! There is no PID namespace yet: the container's `/proc` shows every
//! guest process, and a container process running as root can reach the
//! agent's files through `/proc/1/root`. The guest kernel, not this
//! container, is the boundary chitin relies on.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::Path;

/// The helper's first argument.
pub const HELPER_FLAG: &str = "--chitin-container";

/// Exit status of a container whose set-up failed (as `docker run`).
pub const SETUP_FAILED: i32 = 125;

/// What the helper needs besides the program and its arguments.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Spec {
    /// The new root, a directory in the agent's file system.
    pub root: OsString,
    /// Hostname inside the container (empty: the guest's).
    pub hostname: OsString,
    /// Working directory inside the new root (empty: `/`).
    pub cwd: OsString,
    /// Group and user to run as.
    pub gid: Option<u32>,
    /// User to run as.
    pub uid: Option<u32>,
}

impl Spec {
    /// The helper's argv before the program: flag, root, hostname, cwd,
    /// gid, uid, `--`.
    pub fn helper_args(&self) -> Vec<OsString> {
        let id = |v: Option<u32>| OsString::from(v.map(|v| v.to_string()).unwrap_or_default());
        vec![
            HELPER_FLAG.into(),
            self.root.clone(),
            self.hostname.clone(),
            self.cwd.clone(),
            id(self.gid),
            id(self.uid),
            "--".into(),
        ]
    }

    /// Read the spec back from the helper's argv (after `argv[0]`); returns
    /// it and the program's argv.
    pub fn parse(args: &[OsString]) -> Result<(Spec, &[OsString]), String> {
        let bad = || "malformed container helper arguments".to_string();
        if args.len() < 8 || args[0] != HELPER_FLAG || args[6] != "--" {
            return Err(bad());
        }
        let id = |s: &OsString| -> Result<Option<u32>, String> {
            if s.is_empty() {
                return Ok(None);
            }
            s.to_str()
                .and_then(|s| s.parse().ok())
                .map(Some)
                .ok_or_else(bad)
        };
        let spec = Spec {
            root: args[1].clone(),
            hostname: args[2].clone(),
            cwd: args[3].clone(),
            gid: id(&args[4])?,
            uid: id(&args[5])?,
        };
        Ok((spec, &args[7..]))
    }
}

/// Check in the agent, before starting the helper, what can be told
/// with a clear message: the root is a directory holding the mount
/// points.
pub fn precheck(root: &OsStr) -> Result<(), String> {
    let root = Path::new(root);
    if !root.is_absolute() {
        return Err(format!("container root {} is not absolute", root.display()));
    }
    if !root.is_dir() {
        return Err(format!(
            "container root {} is not a directory",
            root.display()
        ));
    }
    for dir in ["proc", "sys", "dev", "tmp"] {
        // Not followed: a mount point that is a symlink (`dev -> /`) would
        // put the container's mounts and device nodes in the agent's own
        // root.
        let real_dir = std::fs::symlink_metadata(root.join(dir)).is_ok_and(|m| m.is_dir());
        if !real_dir {
            return Err(format!(
                "container root {} has no /{dir} directory to mount on (a symlink is refused)",
                root.display()
            ));
        }
    }
    Ok(())
}

/// If this process was started as the helper, set the container up and
/// exec its program; returns only if it was not (then `None`), never
/// when it was.
pub fn run_if_helper() -> Option<std::convert::Infallible> {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    if args.first().map(OsString::as_os_str) != Some(OsStr::new(HELPER_FLAG)) {
        return None;
    }
    let fail = |step: &str, e: &dyn std::fmt::Display| -> ! {
        eprintln!("chitin-agent: container: {step}: {e}");
        std::process::exit(SETUP_FAILED)
    };
    let (spec, argv) = match Spec::parse(&args) {
        Ok(parsed) => parsed,
        Err(e) => fail("arguments", &e),
    };
    if let Err((step, e)) = enter(&spec) {
        fail(&step, &e);
    }
    let e = std::process::Command::new(&argv[0]).args(&argv[1..]).exec();
    // As a shell: 127 for a program not found, 126 for one that cannot
    // run, so 125 stays the set-up's own.
    eprintln!(
        "chitin-agent: container: exec {}: {e}",
        argv[0].to_string_lossy()
    );
    std::process::exit(if e.kind() == io::ErrorKind::NotFound {
        127
    } else {
        126
    })
}

fn cstr(s: impl AsRef<OsStr>) -> Result<CString, (String, io::Error)> {
    CString::new(s.as_ref().as_bytes()).map_err(|e| {
        (
            "path".into(),
            io::Error::new(io::ErrorKind::InvalidInput, e),
        )
    })
}

fn check(step: &str, ret: libc::c_int) -> Result<(), (String, io::Error)> {
    if ret == 0 {
        Ok(())
    } else {
        Err((step.to_string(), io::Error::last_os_error()))
    }
}

fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), (String, io::Error)> {
    let step = format!("mount {fstype} on {}", target.display());
    let (s, t, f, d) = (cstr(source)?, cstr(target)?, cstr(fstype)?, cstr(data)?);
    // SAFETY: every pointer is a valid NUL-terminated string that outlives
    // the call.
    let ret = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            f.as_ptr(),
            flags,
            d.as_ptr().cast::<libc::c_void>(),
        )
    };
    check(&step, ret)
}

/// The character devices of the container's /dev: (name, major, minor).
const DEVICES: &[(&str, u32, u32)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// Steps 1 to 5 of the module documentation, up to the exec.
fn enter(spec: &Spec) -> Result<(), (String, io::Error)> {
    let root = Path::new(&spec.root);
    // Again here, right before the mounts: a writable image could have
    // changed since the agent's check.
    precheck(root.as_os_str()).map_err(|e| {
        (
            "mount points".to_string(),
            io::Error::new(io::ErrorKind::InvalidInput, e),
        )
    })?;
    // SAFETY: unshare takes flags only.
    check("unshare mount and UTS namespaces", unsafe {
        libc::unshare(libc::CLONE_NEWNS | libc::CLONE_NEWUTS)
    })?;
    let slash = cstr("/")?;
    // SAFETY: valid strings; null source, type and data are allowed for a
    // propagation change.
    check("make mounts private", unsafe {
        libc::mount(
            std::ptr::null(),
            slash.as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    })?;
    let root_c = cstr(root)?;
    // SAFETY: as above; a bind mount takes no type or data.
    check("bind the root onto itself", unsafe {
        libc::mount(
            root_c.as_ptr(),
            root_c.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            std::ptr::null(),
        )
    })?;
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("proc", &root.join("proc"), "proc", nosuid_nodev_noexec, "")?;
    mount(
        "sysfs",
        &root.join("sys"),
        "sysfs",
        nosuid_nodev_noexec | libc::MS_RDONLY,
        "",
    )?;
    let dev = root.join("dev");
    mount(
        "tmpfs",
        &dev,
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "mode=755,size=64k",
    )?;
    for &(name, major, minor) in DEVICES {
        let path = cstr(dev.join(name))?;
        // SAFETY: a valid path; mknod writes nothing of ours.
        check(&format!("mknod /dev/{name}"), unsafe {
            libc::mknod(
                path.as_ptr(),
                libc::S_IFCHR | 0o666,
                libc::makedev(major, minor),
            )
        })?;
        // The umask must not narrow the mode.
        // SAFETY: as above.
        check(&format!("chmod /dev/{name}"), unsafe {
            libc::chmod(path.as_ptr(), 0o666)
        })?;
    }
    for dir in ["pts", "shm"] {
        std::fs::create_dir(dev.join(dir)).map_err(|e| (format!("mkdir /dev/{dir}"), e))?;
    }
    mount(
        "devpts",
        &dev.join("pts"),
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )?;
    std::os::unix::fs::symlink("pts/ptmx", dev.join("ptmx"))
        .map_err(|e| ("symlink /dev/ptmx".to_string(), e))?;
    mount(
        "shm",
        &dev.join("shm"),
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    )?;
    mount(
        "tmpfs",
        &root.join("tmp"),
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    )?;
    if !spec.hostname.is_empty() {
        let name = spec.hostname.as_bytes();
        // SAFETY: the pointer and length describe `name`.
        check("sethostname", unsafe {
            libc::sethostname(name.as_ptr().cast(), name.len())
        })?;
        let etc_hostname = root.join("etc/hostname");
        let real = |p: &Path| std::fs::symlink_metadata(p).map(|m| m.file_type());
        let bindable = real(&root.join("etc")).is_ok_and(|t| t.is_dir())
            && real(&etc_hostname).is_ok_and(|t| t.is_file());
        if bindable {
            // The image's own file is not changed: a file on the /dev
            // tmpfs is bound over it inside this namespace only.
            let file = dev.join(".hostname");
            let mut text = spec.hostname.clone().into_vec();
            text.push(b'\n');
            std::fs::write(&file, text).map_err(|e| ("write the hostname file".to_string(), e))?;
            let (f, t) = (cstr(&file)?, cstr(&etc_hostname)?);
            // SAFETY: valid strings; a bind mount takes no type or data.
            check("bind /etc/hostname", unsafe {
                libc::mount(
                    f.as_ptr(),
                    t.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            })?;
        }
    }
    std::env::set_current_dir(root).map_err(|e| ("chdir to the root".to_string(), e))?;
    pivot_or_move()?;
    if spec.gid.is_some() || spec.uid.is_some() {
        // SAFETY: setgroups reads 0 entries from a null list.
        check("setgroups", unsafe { libc::setgroups(0, std::ptr::null()) })?;
    }
    if let Some(gid) = spec.gid {
        // SAFETY: setgid takes an id.
        check("setgid", unsafe { libc::setgid(gid) })?;
    }
    if let Some(uid) = spec.uid {
        // SAFETY: setuid takes an id.
        check("setuid", unsafe { libc::setuid(uid) })?;
    }
    // After the ids: the user must be able to reach its directory.
    let cwd = if spec.cwd.is_empty() {
        OsStr::new("/")
    } else {
        spec.cwd.as_os_str()
    };
    std::env::set_current_dir(cwd)
        .map_err(|e| (format!("chdir to {}", cwd.to_string_lossy()), e))?;
    Ok(())
}

/// Make the current directory the root. `pivot_root(".", ".")` stacks
/// the old root on the new one, which is then detached, so nothing of
/// the agent's file system stays reachable. Linux refuses to pivot away
/// from the initial ramfs (`EINVAL`), where the agent usually runs: the
/// new root is then moved over `/` and entered with `chroot`, as `runc`
/// does for a ramdisk root. The agent's files stay hidden beneath it, but
/// a process that keeps `CAP_SYS_CHROOT` (root in the container) could
/// climb back to them with a second `chroot`; the guest kernel, not the
/// container, is the boundary chitin relies on.
fn pivot_or_move() -> Result<(), (String, io::Error)> {
    let dot = cstr(".")?;
    // SAFETY: pivot_root has no libc wrapper; both arguments are valid
    // NUL-terminated strings.
    let pivoted =
        unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) } as libc::c_int;
    if pivoted == 0 {
        // SAFETY: a valid string; MNT_DETACH unmounts lazily.
        return check("detach the old root", unsafe {
            libc::umount2(dot.as_ptr(), libc::MNT_DETACH)
        });
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINVAL) {
        return Err(("pivot_root".into(), err));
    }
    let slash = cstr("/")?;
    // SAFETY: valid strings; a move takes no type or data.
    check("move the root over /", unsafe {
        libc::mount(
            dot.as_ptr(),
            slash.as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        )
    })?;
    // SAFETY: a valid string.
    check("chroot", unsafe { libc::chroot(dot.as_ptr()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_through_helper_args() {
        let spec = Spec {
            root: "/mnt/root".into(),
            hostname: "box".into(),
            cwd: "/work".into(),
            gid: Some(100),
            uid: None,
        };
        let mut args = spec.helper_args();
        args.extend(["ls".into(), "-l".into()]);
        let (back, argv) = Spec::parse(&args).unwrap();
        assert_eq!(back, spec);
        assert_eq!(argv, ["ls", "-l"]);
        assert!(Spec::parse(&args[..7]).is_err(), "no program");
        let mut bad = args.clone();
        bad[4] = "x".into();
        assert!(Spec::parse(&bad).is_err());
    }
}
