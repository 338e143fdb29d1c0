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
//! 3. mounts the request's mounts (tmpfs, or binds of guest paths such
//!    as a share's files) in order: each destination is resolved inside
//!    the root with `openat2(RESOLVE_IN_ROOT)`, so an image's symlinks
//!    resolve as they would in the container and never lead out of it;
//!    missing directories (and, for a bind of a file, the file) are made;
//!    the mount goes on through that handle, then read-only, `nosuid`,
//!    `nodev` and `noexec` are applied;
//! 4. `pivot_root`s into it and detaches the old root (or, on the
//!    initial ramfs, which cannot be pivoted away from, moves it over `/`
//!    and `chroot`s, as runc does on a ramdisk);
//! 5. sets the hostname, and a hostname file over `/etc/hostname` when
//!    the image has one;
//! 6. sets the OOM score and rlimits (before the pivot), drops what the
//!    bounding set leaves out, sets the supplementary groups, the group
//!    and the user, the capability sets (ambient ones raised), the umask
//!    and no-new-privileges, changes to the working directory, and
//!    `exec`s the program (found through the request's `PATH` inside the
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
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::{Component, Path};

use chitin_inroot::{fd_path, make_in_root, open_in_root};

use chitin_agent_protocol::{
    Attributes, Capabilities, MountKind, MountRequest, Rlimit, MAX_GROUPS, MAX_MOUNTS, MAX_RLIMITS,
    MOUNT_FLAGS, MOUNT_NODEV, MOUNT_NOEXEC, MOUNT_NOSUID, MOUNT_READ_ONLY,
};

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
    /// Mounts inside the root, in order.
    pub mounts: Vec<MountRequest>,
    /// Groups, umask, rlimits, capabilities and the rest.
    pub attributes: Attributes,
}

/// Numbers joined by commas (empty for none).
fn join<T: ToString>(values: impl IntoIterator<Item = T>) -> OsString {
    values
        .into_iter()
        .map(|v| v.to_string())
        .collect::<Vec<_>>()
        .join(",")
        .into()
}

/// The inverse of [`join`], at most `cap` numbers.
fn split<T: std::str::FromStr>(arg: &OsStr, cap: usize) -> Option<Vec<T>> {
    let text = arg.to_str()?;
    if text.is_empty() {
        return Some(Vec::new());
    }
    let values: Option<Vec<T>> = text.split(',').map(|v| v.parse().ok()).collect();
    values.filter(|v| v.len() <= cap)
}

impl Spec {
    /// The helper's argv before the program: flag, root, hostname, cwd,
    /// gid, uid; the attributes (groups, umask, rlimits as
    /// `resource:soft:hard`, capabilities as five masks, no-new-privileges
    /// `0`/`1`, OOM score), numbers joined by commas, empty for none; the
    /// number of mounts and five arguments for each (kind, flags, source,
    /// destination, options); `--`.
    pub fn helper_args(&self) -> Vec<OsString> {
        let opt = |v: Option<String>| OsString::from(v.unwrap_or_default());
        let a = &self.attributes;
        let caps = a.capabilities.map(|c| {
            join([
                c.bounding,
                c.effective,
                c.permitted,
                c.inheritable,
                c.ambient,
            ])
        });
        let mut args = vec![
            HELPER_FLAG.into(),
            self.root.clone(),
            self.hostname.clone(),
            self.cwd.clone(),
            opt(self.gid.map(|v| v.to_string())),
            opt(self.uid.map(|v| v.to_string())),
            join(&a.groups),
            opt(a.umask.map(|v| v.to_string())),
            join(
                a.rlimits
                    .iter()
                    .map(|r| format!("{}:{}:{}", r.resource, r.soft, r.hard)),
            ),
            caps.unwrap_or_default(),
            u8::from(a.no_new_privileges).to_string().into(),
            opt(a.oom_score_adj.map(|v| v.to_string())),
            self.mounts.len().to_string().into(),
        ];
        for m in &self.mounts {
            let kind = match m.kind {
                MountKind::Bind => "bind",
                MountKind::Tmpfs => "tmpfs",
            };
            args.extend([
                kind.into(),
                m.flags.to_string().into(),
                m.source.clone(),
                m.destination.clone(),
                m.options.clone(),
            ]);
        }
        args.push("--".into());
        args
    }

    /// Read the spec back from the helper's argv (after `argv[0]`); returns
    /// it and the program's argv.
    pub fn parse(args: &[OsString]) -> Result<(Spec, &[OsString]), String> {
        let bad = || "malformed container helper arguments".to_string();
        let number = |s: &OsString| -> Result<u32, String> {
            s.to_str().and_then(|s| s.parse().ok()).ok_or_else(bad)
        };
        let id = |s: &OsString| -> Result<Option<u32>, String> {
            if s.is_empty() {
                return Ok(None);
            }
            number(s).map(Some)
        };
        if args.len() < 13 || args[0] != HELPER_FLAG {
            return Err(bad());
        }
        let attributes = Self::parse_attributes(&args[6..12]).ok_or_else(bad)?;
        let count = number(&args[12])? as usize;
        if count > MAX_MOUNTS {
            return Err(bad());
        }
        let program = 13 + 5 * count + 1;
        if args.len() <= program || args[program - 1] != "--" {
            return Err(bad());
        }
        let mut mounts = Vec::with_capacity(count);
        for m in args[13..program - 1].chunks_exact(5) {
            let kind = match m[0].to_str() {
                Some("bind") => MountKind::Bind,
                Some("tmpfs") => MountKind::Tmpfs,
                _ => return Err(bad()),
            };
            mounts.push(MountRequest {
                kind,
                flags: number(&m[1])?,
                source: m[2].clone(),
                destination: m[3].clone(),
                options: m[4].clone(),
            });
        }
        let spec = Spec {
            root: args[1].clone(),
            hostname: args[2].clone(),
            cwd: args[3].clone(),
            gid: id(&args[4])?,
            uid: id(&args[5])?,
            mounts,
            attributes,
        };
        Ok((spec, &args[program..]))
    }

    /// The six attribute arguments back.
    fn parse_attributes(args: &[OsString]) -> Option<Attributes> {
        let optional = |s: &OsString| -> Option<Option<String>> {
            let text = s.to_str()?;
            Some((!text.is_empty()).then(|| text.to_string()))
        };
        let rlimits = split::<String>(&args[2], MAX_RLIMITS)?
            .iter()
            .map(|r| {
                let mut parts = r.split(':');
                let limit = Rlimit {
                    resource: parts.next()?.parse().ok()?,
                    soft: parts.next()?.parse().ok()?,
                    hard: parts.next()?.parse().ok()?,
                };
                parts.next().is_none().then_some(limit)
            })
            .collect::<Option<Vec<_>>>()?;
        let capabilities = match split::<u64>(&args[3], 5)?.as_slice() {
            [] => None,
            &[bounding, effective, permitted, inheritable, ambient] => Some(Capabilities {
                bounding,
                effective,
                permitted,
                inheritable,
                ambient,
            }),
            _ => return None,
        };
        Some(Attributes {
            groups: split(&args[0], MAX_GROUPS)?,
            umask: optional(&args[1])?.map(|v| v.parse()).transpose().ok()?,
            rlimits,
            capabilities,
            no_new_privileges: match args[4].to_str()? {
                "0" => false,
                "1" => true,
                _ => return None,
            },
            oom_score_adj: optional(&args[5])?.map(|v| v.parse()).transpose().ok()?,
        })
    }
}

/// Check a container mount before anything is mounted: an absolute
/// destination other than `/` with no `..`, known flags, a bind's source
/// an absolute path that exists, no source for a tmpfs.
pub fn check_mount(m: &MountRequest) -> Result<(), String> {
    let dest = Path::new(&m.destination);
    let shown = dest.display();
    if !dest.is_absolute() || dest.components().any(|c| c == Component::ParentDir) {
        return Err(format!(
            "mount destination {shown} is not an absolute path without `..`"
        ));
    }
    if dest.components().all(|c| c == Component::RootDir) {
        return Err("a mount over the container's root is refused".into());
    }
    if m.flags & !MOUNT_FLAGS != 0 {
        return Err(format!("mount {shown}: unknown flags {:#x}", m.flags));
    }
    match m.kind {
        MountKind::Bind => {
            let source = Path::new(&m.source);
            if !source.is_absolute() {
                return Err(format!(
                    "bind source {} of {shown} is not absolute",
                    source.display()
                ));
            }
            std::fs::metadata(source)
                .map_err(|e| format!("bind source {} of {shown}: {e}", source.display()))?;
        }
        MountKind::Tmpfs if !m.source.is_empty() => {
            return Err(format!("tmpfs {shown} has a source"));
        }
        MountKind::Tmpfs => {}
    }
    Ok(())
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
    for m in &spec.mounts {
        container_mount(root, m)?;
    }
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
    let a = &spec.attributes;
    // Through the agent's /proc, before it is left behind.
    if let Some(score) = a.oom_score_adj {
        std::fs::write("/proc/self/oom_score_adj", score.to_string())
            .map_err(|e| ("oom_score_adj".to_string(), e))?;
    }
    let caps_known = match a.capabilities {
        Some(_) => Some(last_cap().map_err(|e| ("cap_last_cap".to_string(), e))?),
        None => None,
    };
    for r in &a.rlimits {
        let limit = libc::rlimit {
            rlim_cur: r.soft,
            rlim_max: r.hard,
        };
        // SAFETY: a valid rlimit that outlives the call; the resource is
        // checked by the kernel.
        check(&format!("setrlimit {}", r.resource), unsafe {
            libc::setrlimit(r.resource as _, &limit)
        })?;
    }
    std::env::set_current_dir(root).map_err(|e| ("chdir to the root".to_string(), e))?;
    pivot_or_move()?;
    if let (Some(caps), Some(last)) = (a.capabilities, caps_known) {
        for cap in 0..=last {
            if caps.bounding & (1 << cap) == 0 {
                let step = format!("drop capability {cap} from the bounding set");
                // SAFETY: prctl with integer arguments only.
                let ret =
                    unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
                check(&step, ret)?;
            }
        }
        if spec.uid.is_some_and(|u| u != 0) {
            // Keep the permitted set across the change of user, for the
            // capset below.
            // SAFETY: prctl with integer arguments only.
            check("keep capabilities", unsafe {
                libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0)
            })?;
        }
    }
    if spec.gid.is_some() || spec.uid.is_some() || !a.groups.is_empty() {
        // SAFETY: the pointer and length describe `a.groups` (an empty
        // list passes no entries).
        check("setgroups", unsafe {
            libc::setgroups(a.groups.len(), a.groups.as_ptr())
        })?;
    }
    // A terminal's slave comes from the guest's devpts, root's and 0600:
    // the user it runs as gets it, as runc gives its console.
    // SAFETY: isatty and fchown take an fd and ids only.
    if spec.uid.is_some_and(|u| u != 0) && unsafe { libc::isatty(0) } == 1 {
        let (uid, gid) = (spec.uid.unwrap_or(0), spec.gid.unwrap_or(u32::MAX));
        // SAFETY: as above; gid u32::MAX (-1) leaves the group.
        check("chown the terminal", unsafe { libc::fchown(0, uid, gid) })?;
    }
    if let Some(gid) = spec.gid {
        // SAFETY: setgid takes an id.
        check("setgid", unsafe { libc::setgid(gid) })?;
    }
    if let Some(uid) = spec.uid {
        // SAFETY: setuid takes an id.
        check("setuid", unsafe { libc::setuid(uid) })?;
    }
    if let (Some(caps), Some(last)) = (a.capabilities, caps_known) {
        set_capabilities(&caps, last)?;
    }
    if let Some(mask) = a.umask {
        // SAFETY: umask takes a mode and cannot fail.
        unsafe { libc::umask(mask as libc::mode_t) };
    }
    if a.no_new_privileges {
        // SAFETY: prctl with integer arguments only.
        check("no_new_privs", unsafe {
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        })?;
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

/// The guest kernel's highest capability number.
fn last_cap() -> io::Result<u32> {
    std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")?
        .trim()
        .parse::<u32>()
        .ok()
        .filter(|&n| n < 64)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "cap_last_cap"))
}

/// `capset(2)`'s header and one of its two 32-bit data halves.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets in two halves.
const CAP_VERSION_3: u32 = 0x2008_0522;

/// Set the effective, permitted and inheritable sets, then raise the
/// ambient ones; bits past capability `last` are dropped.
fn set_capabilities(caps: &Capabilities, last: u32) -> Result<(), (String, io::Error)> {
    let known = if last >= 63 {
        u64::MAX
    } else {
        (1u64 << (last + 1)) - 1
    };
    let (e, p, i) = (
        caps.effective & known,
        caps.permitted & known,
        caps.inheritable & known,
    );
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: e as u32,
            permitted: p as u32,
            inheritable: i as u32,
        },
        CapData {
            effective: (e >> 32) as u32,
            permitted: (p >> 32) as u32,
            inheritable: (i >> 32) as u32,
        },
    ];
    // SAFETY: capset reads the header and two data structs, laid out as
    // the kernel's, which outlive the call.
    check("capset", unsafe {
        libc::syscall(
            libc::SYS_capset,
            std::ptr::addr_of_mut!(header),
            data.as_ptr(),
        ) as libc::c_int
    })?;
    for cap in 0..=last {
        if caps.ambient & (1 << cap) != 0 {
            // SAFETY: prctl with integer arguments only.
            check(&format!("raise ambient capability {cap}"), unsafe {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    cap as libc::c_ulong,
                    0,
                    0,
                )
            })?;
        }
    }
    Ok(())
}

fn invalid(step: String, message: String) -> (String, io::Error) {
    (step, io::Error::new(io::ErrorKind::InvalidInput, message))
}

/// One of the spec's mounts, inside the root: the destination is
/// resolved (and made) inside it, then mounted on through its handle,
/// so a symlink in the image cannot send the mount outside the root.
fn container_mount(root: &Path, m: &MountRequest) -> Result<(), (String, io::Error)> {
    let dest = Path::new(&m.destination);
    let step = format!("mount {}", dest.display());
    check_mount(m).map_err(|e| invalid(step.clone(), e))?;
    let root_fd = std::fs::File::open(root)
        .map(OwnedFd::from)
        .map_err(|e| (format!("{step}: open the root"), e))?;
    let dir_wanted = match m.kind {
        MountKind::Tmpfs => true,
        MountKind::Bind => std::fs::metadata(&m.source)
            .map_err(|e| (format!("{step}: its source"), e))?
            .is_dir(),
    };
    let target = make_in_root(&root_fd, dest, dir_wanted)
        .map_err(|e| (format!("{step}: make its mount point"), e))?;
    let is_dir = std::fs::metadata(fd_path(&target))
        .map_err(|e| (step.clone(), e))?
        .is_dir();
    if is_dir != dir_wanted {
        let what = if dir_wanted { "directory" } else { "file" };
        return Err(invalid(step, format!("a {what} cannot be mounted there")));
    }
    let mut flags = 0;
    for (bit, flag) in [
        (MOUNT_READ_ONLY, libc::MS_RDONLY),
        (MOUNT_NOSUID, libc::MS_NOSUID),
        (MOUNT_NODEV, libc::MS_NODEV),
        (MOUNT_NOEXEC, libc::MS_NOEXEC),
    ] {
        if m.flags & bit != 0 {
            flags |= flag;
        }
    }
    let options = m
        .options
        .to_str()
        .ok_or_else(|| invalid(step.clone(), "mount options are not UTF-8".into()))?;
    match m.kind {
        MountKind::Tmpfs => mount("tmpfs", &fd_path(&target), "tmpfs", flags, options)
            .map_err(|(_, e)| (format!("{step}: tmpfs"), e)),
        MountKind::Bind => {
            let source = m
                .source
                .to_str()
                .ok_or_else(|| invalid(step.clone(), "a bind source that is not UTF-8".into()))?;
            mount(
                source,
                &fd_path(&target),
                "",
                libc::MS_BIND | libc::MS_REC,
                "",
            )
            .map_err(|(_, e)| (format!("{step}: bind {source}"), e))?;
            if flags == 0 {
                return Ok(());
            }
            // The new mount, not the one it covers: resolved again.
            let bound = open_in_root(&root_fd, dest).map_err(|e| (step.clone(), e))?;
            mount(
                "none",
                &fd_path(&bound),
                "",
                libc::MS_BIND | libc::MS_REMOUNT | flags,
                "",
            )
            .map_err(|(_, e)| (format!("{step}: remount with its flags"), e))
        }
    }
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
            mounts: vec![
                MountRequest {
                    kind: MountKind::Bind,
                    source: "/run/chitin/pod/c1/m0".into(),
                    destination: "/etc/hosts".into(),
                    flags: MOUNT_READ_ONLY,
                    options: "".into(),
                },
                MountRequest {
                    kind: MountKind::Tmpfs,
                    source: "".into(),
                    // An argument that looks like the separator survives.
                    destination: "--".into(),
                    flags: 0,
                    options: "size=1m".into(),
                },
            ],
            attributes: Attributes {
                groups: vec![10, 20],
                umask: Some(0o027),
                rlimits: vec![
                    Rlimit {
                        resource: 7,
                        soft: 1024,
                        hard: u64::MAX,
                    },
                    Rlimit {
                        resource: 0,
                        soft: 1,
                        hard: 2,
                    },
                ],
                capabilities: Some(Capabilities {
                    bounding: 1 << 21,
                    effective: 1,
                    permitted: 3,
                    inheritable: 0,
                    ambient: 1 << 40,
                }),
                no_new_privileges: true,
                oom_score_adj: Some(-999),
            },
        };
        let plain = Spec {
            root: "/r".into(),
            ..Spec::default()
        };
        let (back, _) = Spec::parse(&[plain.helper_args(), vec!["true".into()]].concat()).unwrap();
        assert_eq!(back, plain);
        let mut args = spec.helper_args();
        args.extend(["ls".into(), "-l".into()]);
        let (back, argv) = Spec::parse(&args).unwrap();
        assert_eq!(back, spec);
        assert_eq!(argv, ["ls", "-l"]);
        assert!(Spec::parse(&args[..args.len() - 2]).is_err(), "no program");
        let bad_args = [
            (4, "x"),
            (6, "1,,2"),
            (7, "-1"),
            (8, "7:1"),
            (8, "7:1:2:3"),
            (9, "1,2,3"),
            (10, "2"),
            (11, "x"),
            (12, "3"),
            (12, "99999"),
            (13, "overlay"),
            (14, "z"),
        ];
        for (at, value) in bad_args {
            let mut bad = args.clone();
            bad[at] = value.into();
            assert!(Spec::parse(&bad).is_err(), "{at} {value}");
        }
    }

    #[test]
    fn mounts_are_checked_before_anything_is_mounted() {
        let tmpfs = |dest: &str| MountRequest {
            kind: MountKind::Tmpfs,
            source: "".into(),
            destination: dest.into(),
            flags: MOUNT_NOSUID,
            options: "".into(),
        };
        assert!(check_mount(&tmpfs("/cache")).is_ok());
        for dest in ["cache", "/", "//", "/a/../../etc", ""] {
            assert!(check_mount(&tmpfs(dest)).is_err(), "{dest:?}");
        }
        let mut flags = tmpfs("/t");
        flags.flags = 0x100;
        assert!(check_mount(&flags).is_err());
        let mut sourced = tmpfs("/t");
        sourced.source = "/x".into();
        assert!(check_mount(&sourced).is_err());
        let bind = |source: &str| MountRequest {
            kind: MountKind::Bind,
            source: source.into(),
            destination: "/data".into(),
            flags: 0,
            options: "".into(),
        };
        assert!(check_mount(&bind("/")).is_ok());
        assert!(check_mount(&bind("relative")).is_err());
        assert!(check_mount(&bind("/nonexistent/chitin")).is_err());
    }
}
