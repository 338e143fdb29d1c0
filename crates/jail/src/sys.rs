//! Thin, checked wrappers of the syscalls the jail makes. Each returns the
//! OS error as an `io::Error`; none does more than its one call.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `-1` → the OS error, anything else → the value.
fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A path as a C string (paths with a NUL byte cannot exist).
pub(crate) fn cpath(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::ErrorKind::InvalidInput.into())
}

fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::ErrorKind::InvalidInput.into())
}

/// `mount(2)`; `source` and `fstype` may be absent.
pub(crate) fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(cpath).transpose()?;
    let target = cpath(target)?;
    let fstype = fstype.map(cstr).transpose()?;
    let data = data.map(cstr).transpose()?;
    let ptr = |s: &Option<CString>| s.as_ref().map_or(std::ptr::null(), |s| s.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that lives
    // across the call.
    cvt(unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    })
    .map(drop)
}

/// Open `path` as an `O_PATH` handle, refusing a symlink anywhere on the
/// way (`openat2` with `RESOLVE_NO_SYMLINKS`): what is bound into a jail
/// is the file checked, not what a swapped path component points at.
pub(crate) fn open_path_no_symlinks(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct OpenHow {
        flags: u64,
        mode: u64,
        resolve: u64,
    }
    /// `RESOLVE_NO_SYMLINKS`.
    const NO_SYMLINKS: u64 = 0x04;
    let path = cpath(path)?;
    let how = OpenHow {
        flags: (libc::O_PATH | libc::O_CLOEXEC) as u64,
        mode: 0,
        resolve: NO_SYMLINKS,
    };
    // SAFETY: a NUL-terminated path and an open_how of the size passed.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            libc::AT_FDCWD,
            path.as_ptr(),
            &how,
            std::mem::size_of::<OpenHow>(),
        )
    };
    let fd = cvt(fd as libc::c_int)?;
    // SAFETY: the fd was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `mount_setattr(2)` on `target` and every mount below it: set the
/// `MOUNT_ATTR_*` bits in `set`.
pub(crate) fn mount_setattr_recursive(target: &Path, set: u64) -> io::Result<()> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    /// `AT_RECURSIVE`.
    const RECURSIVE: libc::c_uint = 0x8000;
    let target = cpath(target)?;
    let attr = MountAttr {
        attr_set: set,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    // SAFETY: a NUL-terminated path and a mount_attr of the size passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            target.as_ptr(),
            RECURSIVE,
            &attr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    cvt(ret as libc::c_int).map(drop)
}

/// `MOUNT_ATTR_RDONLY`, `_NOSUID`, `_NODEV`.
pub(crate) const ATTR_RDONLY: u64 = 0x1;
pub(crate) const ATTR_NOSUID: u64 = 0x2;
pub(crate) const ATTR_NODEV: u64 = 0x4;

/// `setsid(2)`: a new session without a controlling terminal, so nothing
/// in it can push input into the caller's terminal (`TIOCSTI`).
pub(crate) fn setsid() -> io::Result<()> {
    // SAFETY: setsid takes no arguments.
    cvt(unsafe { libc::setsid() }).map(drop)
}

/// Join a new, empty session keyring: the caller's keys stay outside.
pub(crate) fn new_session_keyring() -> io::Result<()> {
    /// `KEYCTL_JOIN_SESSION_KEYRING`.
    const JOIN_SESSION_KEYRING: libc::c_long = 1;
    // SAFETY: a null name asks for a new anonymous keyring.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            JOIN_SESSION_KEYRING,
            std::ptr::null::<libc::c_char>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Put `SIGCHLD` back to its default action (an embedder that ignores it
/// would make the kernel reap children unasked, and waits never end);
/// the action it had, for [`restore_sigchld`].
pub(crate) fn default_sigchld() -> libc::sigaction {
    // SAFETY: sigaction is plain data; a zeroed one is SIG_DFL with no
    // flags, and the old action is written into `old`.
    unsafe {
        let default: libc::sigaction = std::mem::zeroed();
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGCHLD, &default, &mut old);
        old
    }
}

/// Put back what [`default_sigchld`] returned.
pub(crate) fn restore_sigchld(old: &libc::sigaction) {
    // SAFETY: an action read by sigaction itself.
    unsafe { libc::sigaction(libc::SIGCHLD, old, std::ptr::null_mut()) };
}

/// `umount2(2)`.
pub(crate) fn umount2(target: &Path, flags: libc::c_int) -> io::Result<()> {
    let target = cpath(target)?;
    // SAFETY: a NUL-terminated path that lives across the call.
    cvt(unsafe { libc::umount2(target.as_ptr(), flags) }).map(drop)
}

/// `pivot_root(".", ".")`: the current directory becomes the root, the old
/// root is stacked on it (and detached by the caller).
pub(crate) fn pivot_root_here() -> io::Result<()> {
    let dot = c".";
    // SAFETY: two NUL-terminated paths; pivot_root takes no other memory.
    let ret = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    cvt(ret as libc::c_int).map(drop)
}

/// `chroot(2)`.
pub(crate) fn chroot(path: &Path) -> io::Result<()> {
    let path = cpath(path)?;
    // SAFETY: a NUL-terminated path that lives across the call.
    cvt(unsafe { libc::chroot(path.as_ptr()) }).map(drop)
}

/// `mknod(2)` of a character device.
pub(crate) fn mknod_char(path: &Path, mode: libc::mode_t, rdev: libc::dev_t) -> io::Result<()> {
    let path = cpath(path)?;
    // SAFETY: a NUL-terminated path that lives across the call.
    cvt(unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | mode, rdev) }).map(drop)
}

/// `chown(2)`.
pub(crate) fn chown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let path = cpath(path)?;
    // SAFETY: a NUL-terminated path that lives across the call.
    cvt(unsafe { libc::chown(path.as_ptr(), uid, gid) }).map(drop)
}

/// `unshare(2)`.
pub(crate) fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare takes flags only.
    cvt(unsafe { libc::unshare(flags) }).map(drop)
}

/// `setns(2)` into the namespace file at `path`.
pub(crate) fn setns(path: &Path, kind: libc::c_int) -> io::Result<()> {
    let file = std::fs::File::open(path)?;
    // SAFETY: a valid open fd for the duration of the call.
    cvt(unsafe { libc::setns(file.as_raw_fd(), kind) }).map(drop)
}

/// `fork(2)`: the child's pid in the parent, 0 in the child.
///
/// # Safety
///
/// The calling process must have one thread, so the child inherits no
/// lock held by a thread that does not exist there.
pub(crate) unsafe fn fork() -> io::Result<libc::pid_t> {
    // SAFETY: the caller guarantees a single-threaded process.
    cvt(unsafe { libc::fork() })
}

/// `prctl(PR_SET_PDEATHSIG, SIGKILL)`: die with the parent.
pub(crate) fn die_with_parent() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) }).map(drop)
}

/// `sethostname(2)`.
pub(crate) fn sethostname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    cvt(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) }).map(drop)
}

/// `setrlimit(2)` with the same soft and hard limit.
pub(crate) fn setrlimit(resource: libc::__rlimit_resource_t, value: u64) -> io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: a valid rlimit for the duration of the call.
    cvt(unsafe { libc::setrlimit(resource, &limit) }).map(drop)
}

/// The audit architecture of this build's syscalls.
#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH: u32 = 0xc000_003e;
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH: u32 = 0xc000_00b7;

/// Syscalls a jail that stays root refuses in every thread: what would
/// reach past its root (`open_by_handle_at` with `CAP_DAC_READ_SEARCH`),
/// root's user keyring (the key syscalls, as uid 0), and other
/// processes' memory.
const ROOT_REFUSED: [libc::c_long; 7] = [
    libc::SYS_open_by_handle_at,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
];

/// A seccomp filter for the whole process and every thread it starts:
/// [`ROOT_REFUSED`] fail with `EPERM`, and so does every syscall of
/// another ABI (i386 through `int 0x80`, x32), whose numbers the filter
/// does not check. Needs `no_new_privs`.
pub(crate) fn refuse_root_escapes() -> io::Result<()> {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JGE_K: u16 = (libc::BPF_JMP | libc::BPF_JGE | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    const ALLOW: u32 = libc::SECCOMP_RET_ALLOW;
    const EPERM: u32 = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    let op = |code, jt, jf, k| libc::sock_filter { code, jt, jf, k };
    let n = ROOT_REFUSED.len() as u8;
    // `struct seccomp_data`: nr at 0, arch at 4. Jumps count from the
    // next instruction; the last one refuses.
    let mut program = vec![
        op(LD_W_ABS, 0, 0, 4),
        op(JEQ_K, 1, 0, AUDIT_ARCH),
        op(RET_K, 0, 0, EPERM),
        op(LD_W_ABS, 0, 0, 0),
        // x32's numbers have bit 30 set.
        op(JGE_K, n + 1, 0, 0x4000_0000),
    ];
    for (i, nr) in ROOT_REFUSED.iter().enumerate() {
        program.push(op(JEQ_K, n - i as u8, 0, *nr as u32));
    }
    program.push(op(RET_K, 0, 0, ALLOW));
    program.push(op(RET_K, 0, 0, EPERM));
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: a valid program that outlives the call; the kernel copies
    // it.
    cvt(unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER,
            std::ptr::addr_of!(prog),
            0,
            0,
        )
    })
    .map(drop)
}

/// `prctl(PR_SET_NO_NEW_PRIVS, 1)`.
pub(crate) fn no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    cvt(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) }).map(drop)
}

/// Empty the capability bounding set but for `keep` (a mask; dropping
/// needs `CAP_SETPCAP`) and the ambient set: nothing this process or a
/// program it execs runs can gain another capability again.
pub(crate) fn drop_bounding_and_ambient(keep: u64) -> io::Result<()> {
    for cap in 0..=63 {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments only.
        let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) };
        if ret == -1 {
            let err = io::Error::last_os_error();
            // EINVAL: past the kernel's last capability.
            if err.raw_os_error() == Some(libc::EINVAL) {
                break;
            }
            return Err(err);
        }
    }
    // SAFETY: prctl with integer arguments only.
    cvt(unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    })
    .map(drop)
}

/// `capset(2)`: effective and permitted sets of `keep` (a mask), an
/// empty inheritable set.
pub(crate) fn set_capabilities(keep: u64) -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: libc::c_int,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    /// `_LINUX_CAPABILITY_VERSION_3`: two data words.
    const VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let word = |i: u32| (keep >> (32 * i)) as u32;
    let data = [0, 1].map(|i| Data {
        effective: word(i),
        permitted: word(i),
        inheritable: 0,
    });
    // SAFETY: a valid header and the two data words version 3 reads.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    cvt(ret as libc::c_int).map(drop)
}

/// Drop to `uid`/`gid` for real, effective and saved ids; with
/// `groups`, also to no supplementary groups.
pub(crate) fn set_ids(uid: u32, gid: u32, groups: bool) -> io::Result<()> {
    if groups {
        // SAFETY: an empty list; the raw syscall changes this process
        // (single-threaded) only.
        let ret = unsafe { libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) };
        cvt(ret as libc::c_int)?;
    }
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::setresgid(gid, gid, gid) })?;
    // SAFETY: plain integer arguments.
    cvt(unsafe { libc::setresuid(uid, uid, uid) }).map(drop)
}

/// `access(2)` with the real ids.
pub(crate) fn access(path: &Path, mode: libc::c_int) -> io::Result<()> {
    let path = cpath(path)?;
    // SAFETY: a NUL-terminated path that lives across the call.
    cvt(unsafe { libc::access(path.as_ptr(), mode) }).map(drop)
}

/// A connected pair of Unix stream sockets, close-on-exec.
pub(crate) fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: both fds were just created and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Send all of `bytes` on a socket without raising SIGPIPE when the peer
/// is gone.
pub(crate) fn send_all(fd: RawFd, mut bytes: &[u8]) -> io::Result<()> {
    while !bytes.is_empty() {
        // SAFETY: the pointer and length describe `bytes`.
        let n = unsafe { libc::send(fd, bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        bytes = &bytes[n as usize..];
    }
    Ok(())
}

/// Close every fd above 2 but those in `keep`.
pub(crate) fn close_fds_except(keep: &[RawFd]) -> io::Result<()> {
    let mut keep: Vec<RawFd> = keep.iter().copied().filter(|&fd| fd > 2).collect();
    keep.sort_unstable();
    keep.dedup();
    let mut from: libc::c_uint = 3;
    for fd in keep.iter().map(|&fd| fd as libc::c_uint) {
        if fd > from {
            close_range(from, fd - 1)?;
        }
        from = fd + 1;
    }
    close_range(from, libc::c_uint::MAX)
}

fn close_range(first: libc::c_uint, last: libc::c_uint) -> io::Result<()> {
    // SAFETY: close_range takes integers; the fds it closes are this
    // (single-threaded) process's own, closed on purpose.
    let ret = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0) };
    cvt(ret as libc::c_int).map(drop)
}

/// The calling process's signal mask after blocking `signals`; the old
/// mask is returned for restoring.
pub(crate) fn block_signals(signals: &[libc::c_int]) -> io::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data that sigemptyset initialises.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid sigset_t values; the calls change only them and this
    // thread's mask.
    unsafe {
        libc::sigemptyset(&mut set);
        for &sig in signals {
            libc::sigaddset(&mut set, sig);
        }
        match libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) {
            0 => Ok(old),
            errno => Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

/// Put back a mask from [`block_signals`].
pub(crate) fn restore_signals(old: &libc::sigset_t) {
    // SAFETY: a valid mask saved by block_signals.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, old, std::ptr::null_mut()) };
}

/// Wait for one of the blocked `signals` (`sigwaitinfo`).
pub(crate) fn wait_signal(signals: &[libc::c_int]) -> io::Result<libc::c_int> {
    // SAFETY: as in block_signals.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: a valid set; sigwaitinfo may take a null info pointer.
    unsafe {
        libc::sigemptyset(&mut set);
        for &sig in signals {
            libc::sigaddset(&mut set, sig);
        }
        cvt(libc::sigwaitinfo(&set, std::ptr::null_mut()))
    }
}

/// `kill(2)`; a process that is already gone is not an error.
pub(crate) fn kill(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: plain integer arguments.
    unsafe { libc::kill(pid, sig) };
}

/// How a child ended, without blocking: `None` while it runs.
pub(crate) fn try_wait(pid: libc::pid_t) -> io::Result<Option<libc::c_int>> {
    let mut status = 0;
    // SAFETY: waitpid writes one int.
    let ret = cvt(unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) })?;
    Ok((ret == pid).then_some(status))
}

/// Wait for a child to end; its wait status.
pub(crate) fn wait(pid: libc::pid_t) -> io::Result<libc::c_int> {
    let mut status = 0;
    loop {
        // SAFETY: waitpid writes one int.
        match cvt(unsafe { libc::waitpid(pid, &mut status, 0) }) {
            Ok(_) => return Ok(status),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// End this process the way a child with wait status `status` ended:
/// the same exit code, or death by the same signal.
pub(crate) fn exit_like(status: libc::c_int) -> ! {
    if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        // No core of the supervisor (root) for a signal the jail died of.
        let _ = setrlimit(libc::RLIMIT_CORE, 0);
        // SAFETY: restore the default action and unblock, then raise; a
        // signal whose default is not to die falls through to _exit.
        unsafe {
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::raise(sig);
            libc::_exit(128 + sig)
        }
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        1
    };
    // SAFETY: _exit ends the process without running anything else.
    unsafe { libc::_exit(code) }
}

/// `_exit(2)`: end a forked helper without running the parent's cleanup.
pub(crate) fn exit_now(code: libc::c_int) -> ! {
    // SAFETY: _exit ends the process without running anything else.
    unsafe { libc::_exit(code) }
}

/// The process's thread count (`Threads:` of `/proc/self/status`).
pub(crate) fn thread_count() -> io::Result<usize> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no Threads line in /proc/self/status"))
}

/// The file-system type magic of the file system holding `path`.
pub(crate) fn fs_magic(path: &Path) -> io::Result<i64> {
    let path = cpath(path)?;
    // SAFETY: statfs is plain data that the call fills.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a NUL-terminated path and a valid buffer.
    cvt(unsafe { libc::statfs(path.as_ptr(), &mut buf) })?;
    Ok(buf.f_type)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_root_jails_filter_refuses_what_it_lists_only() {
        // In a child: the filter is for the whole process, for good.
        // SAFETY: the child only makes raw syscalls and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let refused = (|| {
                no_new_privs().ok()?;
                refuse_root_escapes().ok()?;
                // SAFETY: a bad fd and a null handle: the call fails
                // either way; the question is how.
                let ret = unsafe {
                    libc::syscall(libc::SYS_open_by_handle_at, -1, std::ptr::null::<u8>(), 0)
                };
                let errno = io::Error::last_os_error().raw_os_error();
                // Allowed unprivileged, and refused here.
                // SAFETY: KEYCTL_GET_KEYRING_ID of the session keyring,
                // without creating it: integers only.
                let key = unsafe { libc::syscall(libc::SYS_keyctl, 0, -3, 0) };
                let key_errno = io::Error::last_os_error().raw_os_error();
                // SAFETY: getpid has no preconditions.
                let pid_ok = unsafe { libc::getpid() } > 0;
                Some(
                    ret == -1
                        && errno == Some(libc::EPERM)
                        && key == -1
                        && key_errno == Some(libc::EPERM)
                        && pid_ok,
                )
            })();
            // SAFETY: ends the child without running the parent's
            // destructors or test harness.
            unsafe { libc::_exit(if refused == Some(true) { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waits for the child just forked.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "status {status:#x}"
        );
    }
}
