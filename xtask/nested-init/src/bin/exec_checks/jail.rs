//! The `jail` scenario: the checks run in a VMM confined by chitin-jail as
//! uid/gid 1000, with cgroup v2 limits, against real Linux in L1.
//!
//! `chitin-exec-checks jail` (the outer process) prepares what the jail
//! exposes, then runs `chitin-exec-checks jail-inner` and passes its check
//! lines on. The inner process, single-threaded at that point, makes a
//! network namespace with a tap owned by uid 1000, enters the jail (which
//! stays in that network namespace), checks what it sees of itself
//! (ids, capabilities, namespaces, its root, its cgroup's limits) and runs
//! exec, blk, vsock, fs and net checks in a sandbox. When it has gone,
//! the outer process checks that nothing of the jail is left: no
//! directory, cgroup, mount or process of uid 1000.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio as ProcessStdio};

use chitin::{Command, Disk, ExitStatus, RunningSandbox, Share};
use chitin_jail::{CgroupLimits, Jail};
use chitin_testkit::{CheckLine, Report as Checks};

use super::net;

/// What the jail exposes writable: the disk, the share, the vsock socket.
const WORK: &str = "/tmp/chitin-jail";
/// The jailed uid and gid.
const ID: u32 = 1000;
/// The jail's cgroup limits: 1 GiB, two CPUs' worth, 1024 tasks (threads count:
/// the vsock checks hold 200 agent connections of two threads each).
const LIMITS: CgroupLimits = CgroupLimits {
    memory_max: Some(1 << 30),
    cpu_max: Some((200_000, 100_000)),
    pids_max: Some(1024),
};
/// The namespaces a jail makes (its network namespace is joined, not
/// made, here: the tap's).
const NEW_NAMESPACES: [&str; 4] = ["mnt", "pid", "ipc", "uts"];
/// Bytes of the blk check's marker.
const BLK_MARKER: &[u8] = b"jail-blk";

fn namespaces() -> String {
    NEW_NAMESPACES
        .iter()
        .map(|ns| {
            std::fs::read_link(format!("/proc/self/ns/{ns}"))
                .map(|l| l.display().to_string())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn chown_tree(path: &Path) -> std::io::Result<()> {
    std::os::unix::fs::chown(path, Some(ID), Some(ID))?;
    if path.is_dir() {
        for entry in std::fs::read_dir(path)? {
            chown_tree(&entry?.path())?;
        }
    }
    Ok(())
}

/// The outer process: prepare, run the jailed checks, check the cleanup.
pub fn outer(kernel: &str, initramfs: &str, c: &mut Checks) {
    let work = Path::new(WORK);
    let prepared = (|| -> std::io::Result<()> {
        let _ = std::fs::remove_dir_all(work);
        std::fs::create_dir_all(work.join("share"))?;
        std::fs::create_dir_all(work.join("sock"))?;
        std::fs::write(work.join("share/hello"), b"from L1\n")?;
        std::fs::File::create(work.join("disk.img"))?.set_len(16 << 20)?;
        chown_tree(work)?;
        std::fs::set_permissions(work, std::fs::Permissions::from_mode(0o755))
    })();
    if let Err(e) = prepared {
        c.check("jail-prepare", false, &e.to_string());
        return;
    }
    let child = Process::new("/proc/self/exe")
        .args(["jail-inner", kernel, initramfs])
        .env("CHITIN_JAIL_OUTER_NS", namespaces())
        .stdout(ProcessStdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) => {
            c.check("jail-start", false, &e.to_string());
            return;
        }
    };
    let id = format!("checks-{}", child.id());
    if let Some(out) = child.stdout.take() {
        for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
            match CheckLine::parse(&line) {
                Some(check) => c.check(&check.name, check.passed, &check.detail),
                None => c.line(&line),
            }
        }
    }
    let status = child.wait();
    c.result(
        "jail-exit",
        match status {
            Ok(s) if s.success() => Ok("the jailed checks ended with 0".into()),
            other => Err(format!("{other:?}")),
        },
    );
    c.result("jail-cleanup", cleanup(&id));
}

/// Nothing of jail `id` is left in L1.
fn cleanup(id: &str) -> Result<String, String> {
    let dir = Path::new(chitin_jail::DEFAULT_STATE_DIR).join(id);
    if dir.exists() {
        return Err(format!("{} is left", dir.display()));
    }
    let cgroup = Path::new("/sys/fs/cgroup")
        .join(chitin_jail::DEFAULT_CGROUP_PARENT)
        .join(id);
    if cgroup.exists() {
        return Err(format!("{} is left", cgroup.display()));
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    if let Some(line) = mounts
        .lines()
        .find(|l| l.contains(&dir.display().to_string()))
    {
        return Err(format!("a mount is left: {line}"));
    }
    for entry in std::fs::read_dir("/proc").map_err(|e| e.to_string())? {
        let path = entry.map_err(|e| e.to_string())?.path();
        let status = std::fs::read_to_string(path.join("status")).unwrap_or_default();
        let uid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|u| u.split_whitespace().next().map(str::to_string));
        if uid.as_deref() == Some(&ID.to_string()) {
            return Err(format!("a process of uid {ID} is left: {}", path.display()));
        }
    }
    Ok(format!(
        "no directory, cgroup, mount or uid {ID} process of {id} left"
    ))
}

/// A persistent tap named [`net::TAP`] in this (new) network namespace,
/// owned by the jailed uid and gid, with L1's end configured: the jailed
/// VMM, without capabilities, may attach to it.
fn owned_tap() -> Result<(), String> {
    const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
    const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
    const TUNSETOWNER: libc::c_ulong = 0x4004_54cc;
    const TUNSETGROUP: libc::c_ulong = 0x4004_54ce;
    const IFF_TAP: libc::c_short = 0x0002;
    const IFF_NO_PI: libc::c_short = 0x1000;
    const IFF_VNET_HDR: libc::c_short = 0x4000;
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|e| format!("/dev/net/tun: {e}"))?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        _pad: [0; 22],
    };
    req.name[..net::TAP.len()].copy_from_slice(net::TAP.as_bytes());
    let fd = std::os::fd::AsRawFd::as_raw_fd(&tun);
    // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is; the
    // other three take integers.
    let failed = unsafe {
        libc::ioctl(fd, TUNSETIFF, &mut req) < 0
            || libc::ioctl(fd, TUNSETOWNER, libc::c_ulong::from(ID)) < 0
            || libc::ioctl(fd, TUNSETGROUP, libc::c_ulong::from(ID)) < 0
            || libc::ioctl(fd, TUNSETPERSIST, 1 as libc::c_ulong) < 0
    };
    if failed {
        return Err(format!(
            "tap {}: {}",
            net::TAP,
            std::io::Error::last_os_error()
        ));
    }
    drop(tun);
    net::host_side()
}

/// The inner process: make the tap, enter the jail, run the checks.
/// Prints check lines (the outer process counts them); returns the exit
/// code.
pub fn inner(kernel: &str, initramfs: &str) -> i32 {
    let mut c = Checks::new();
    if let Err(e) = net::enter_namespace().and_then(|()| owned_tap()) {
        c.check("jail-tap", false, &e);
        return 1;
    }
    let work = Path::new(WORK);
    let entered = Jail::new(format!("checks-{}", std::process::id()))
        .ids(ID, ID)
        .read_only(kernel)
        .read_only(initramfs)
        .writable(work)
        .device("/dev/kvm")
        .device("/dev/net/tun")
        // Stay in the tap's network namespace.
        .netns("/proc/self/ns/net")
        .cgroup(LIMITS)
        .max_open_files(4096)
        .keep_env("CHITIN_SECCOMP")
        .keep_env("CHITIN_JAIL_OUTER_NS")
        .enter();
    let jailed = match entered {
        Ok(j) => j,
        Err(e) => {
            c.check("jail-enter", false, &chitin::error_chain(&e));
            return 1;
        }
    };
    c.check(
        "jail-enter",
        true,
        &format!(
            "{:?}, cgroup {}",
            jailed.root_switch(),
            jailed
                .cgroup()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ),
    );
    c.result("jail-ids", ids());
    c.result("jail-namespaces", new_namespaces());
    c.result("jail-root", root(kernel, initramfs));
    c.result("jail-cgroup", cgroup_limits());
    let uds = work.join("sock/vsock");
    let built = super::agent_sandbox(kernel, initramfs)
        .vsock(3, &uds)
        .disk(Disk::new(work.join("disk.img")))
        .share(Share::new(work.join("share"), "jail").mount_at("/mnt/jail"))
        .net(net::interface())
        .build()
        .and_then(|s| s.start());
    let vm = match built {
        Ok(vm) => vm,
        Err(e) => {
            c.check("sandbox", false, &chitin::error_chain(&e));
            return 1;
        }
    };
    super::exec_checks(&vm, &mut c);
    super::vsock_checks(&vm, &uds, &mut c);
    c.result("jail-blk", blk(&vm, work));
    c.result("jail-fs", fs(&vm, work));
    c.result("jail-net-ping", net::ping(&vm, 3));
    c.result("jail-net-upload", net::upload(&vm, 4 << 20).map(|(_, d)| d));
    // Which kernel answered, so the harness can tell the guests apart.
    c.result("guest-kernel", super::guest_kernel(&vm));
    c.result("seccomp-threads", super::filtered_threads());
    c.result("device-faults", super::device_faults(&vm));
    c.result("stop-from-handle", super::stop_from_handle(&vm));
    c.result("seccomp", super::seccomp_check());
    drop(vm);
    i32::from(c.failed() > 0)
}

/// A `Field:` line's value in `/proc/<pid>/status`, its whitespace runs
/// made single spaces.
pub(crate) fn status_field(status: &str, field: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// uid and gid 1000 throughout, no capability in any set, no new
/// privileges.
fn ids() -> Result<String, String> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let id = vec![ID.to_string(); 4].join(" ");
    let mut wrong = Vec::new();
    for field in ["Uid", "Gid"] {
        if status_field(&status, field) != id {
            wrong.push(format!("{field} {}", status_field(&status, field)));
        }
    }
    for field in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        if status_field(&status, field) != "0000000000000000" {
            wrong.push(format!("{field} {}", status_field(&status, field)));
        }
    }
    if status_field(&status, "NoNewPrivs") != "1" {
        wrong.push("NoNewPrivs 0".into());
    }
    if wrong.is_empty() {
        Ok(format!(
            "uid/gid {ID}, CapEff/CapPrm/CapBnd/CapAmb 0, NoNewPrivs 1"
        ))
    } else {
        Err(wrong.join(", "))
    }
}

/// mount, PID, IPC and UTS namespaces differ from the outer process's.
fn new_namespaces() -> Result<String, String> {
    let outer = std::env::var("CHITIN_JAIL_OUTER_NS").map_err(|e| e.to_string())?;
    let ours = namespaces();
    let same: Vec<_> = outer
        .split(' ')
        .zip(ours.split(' '))
        .zip(NEW_NAMESPACES)
        .filter(|((a, b), _)| a == b)
        .map(|(_, kind)| kind)
        .collect();
    if same.is_empty() && std::process::id() == 1 {
        Ok(format!(
            "new {}; PID 1 of its namespace",
            NEW_NAMESPACES.join(" ")
        ))
    } else {
        Err(format!(
            "shares {same:?} with L1 (pid {})",
            std::process::id()
        ))
    }
}

fn listing(dir: &Path, out: &mut BTreeSet<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        out.insert(path.display().to_string());
        let own = ["/proc", "/tmp", "/sys/fs/cgroup", WORK];
        if !own.iter().any(|o| path == Path::new(o)) && path.is_dir() {
            listing(&path, out);
        }
    }
}

/// The root holds the kernel, the initramfs, the work directory, the
/// device nodes, `/proc`, `/tmp` and the cgroup view, and nothing else.
fn root(kernel: &str, initramfs: &str) -> Result<String, String> {
    let mut seen = BTreeSet::new();
    listing(Path::new("/"), &mut seen);
    let mut expected: BTreeSet<String> = [
        "/dev",
        "/dev/kvm",
        "/dev/net",
        "/dev/net/tun",
        "/dev/urandom",
        "/proc",
        "/tmp",
        "/sys",
        "/sys/fs",
        "/sys/fs/cgroup",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    for path in [kernel, initramfs, WORK] {
        // What is below /tmp is in the jail's own /tmp, not listed.
        for a in Path::new(path)
            .ancestors()
            .filter(|a| *a != Path::new("/") && (*a == Path::new("/tmp") || !a.starts_with("/tmp")))
        {
            expected.insert(a.display().to_string());
        }
    }
    if seen == expected {
        Ok(format!("{} entries, exactly the jail's", seen.len()))
    } else {
        let extra: Vec<_> = seen.difference(&expected).collect();
        let missing: Vec<_> = expected.difference(&seen).collect();
        Err(format!("extra {extra:?}, missing {missing:?}"))
    }
}

/// The jail's own cgroup, seen read-only at `/sys/fs/cgroup`, has the
/// limits asked for.
fn cgroup_limits() -> Result<String, String> {
    let read = |f: &str| {
        std::fs::read_to_string(PathBuf::from("/sys/fs/cgroup").join(f))
            .map(|s| s.trim().to_string())
            .map_err(|e| format!("{f}: {e}"))
    };
    let got = (read("memory.max")?, read("cpu.max")?, read("pids.max")?);
    let want = (
        "1073741824".to_string(),
        "200000 100000".to_string(),
        "1024".to_string(),
    );
    if got == want {
        Ok(format!(
            "memory.max {} cpu.max {} pids.max {}; memory.current {}",
            got.0,
            got.1,
            got.2,
            read("memory.current").unwrap_or_default()
        ))
    } else {
        Err(format!("got {got:?}, want {want:?}"))
    }
}

/// The guest writes a marker to its disk with O_DIRECT; the jailed VMM's
/// host side reads it back from the image.
fn blk(vm: &RunningSandbox, work: &Path) -> Result<String, String> {
    let marker = String::from_utf8_lossy(BLK_MARKER);
    let script =
        format!("printf {marker} | dd of=/dev/vda bs=512 conv=sync,fsync oflag=direct 2>&1");
    let out = vm
        .exec(Command::new("sh").arg("-c").arg(&script))
        .map_err(|e| e.to_string())?;
    if out.status != ExitStatus::Code(0) {
        return Err(format!("dd: {}", String::from_utf8_lossy(&out.stdout)));
    }
    let image = std::fs::read(work.join("disk.img")).map_err(|e| e.to_string())?;
    if image.starts_with(BLK_MARKER) {
        Ok(format!("{marker} written by the guest, read in the image"))
    } else {
        Err(format!(
            "the image starts with {:?}",
            &image[..16.min(image.len())]
        ))
    }
}

/// The guest reads the host's file through the share and writes one back.
fn fs(vm: &RunningSandbox, work: &Path) -> Result<String, String> {
    let out = vm
        .exec(
            Command::new("sh")
                .arg("-c")
                .arg("cat /mnt/jail/hello && echo from-guest > /mnt/jail/back"),
        )
        .map_err(|e| e.to_string())?;
    let back = std::fs::read_to_string(work.join("share/back")).unwrap_or_default();
    if out.stdout == b"from L1\n" && back == "from-guest\n" {
        Ok("host file read in the guest, guest file read on the host".into())
    } else {
        Err(format!("{out:?}, back {back:?}"))
    }
}
