//! The filter of each thread class: which syscalls it may make, with which
//! arguments, and how the tables become BPF.
//!
//! Allow-list classes (every class but [`ThreadClass::Writer`]) kill the
//! process on anything not listed. The writer class runs the embedder's
//! writers, whose syscalls chitin cannot know, so it lists what it
//! refuses instead: everything that starts processes, changes namespaces,
//! mounts, credentials or the kernel, traces or reads other processes,
//! or submits work the filter would not see (io_uring).
//!
//! Why each syscall is here is in `docs/security.md`; a change to these
//! tables changes that document too.

use std::collections::BTreeMap;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule,
};

use crate::{arch, Seccomp, ThreadClass};

/// The tables as they are built: per syscall, `None` when any arguments
/// are allowed, else the alternatives (each a list of conditions that
/// must all hold).
#[derive(Default)]
struct Rules(BTreeMap<i64, Option<Vec<Vec<SeccompCondition>>>>);

impl Rules {
    /// Allow (or, in a deny list, refuse) each of `nrs` whatever its
    /// arguments.
    fn any_args(&mut self, nrs: &[i64]) {
        for &nr in nrs {
            self.0.insert(nr, None);
        }
    }

    /// Allow `nr` when every condition of `conditions` holds (in addition
    /// to what is already allowed for it).
    fn when(&mut self, nr: i64, conditions: Vec<SeccompCondition>) {
        // `None`: already allowed with any arguments.
        if let Some(alternatives) = self.0.entry(nr).or_insert_with(|| Some(Vec::new())) {
            alternatives.push(conditions);
        }
    }

    /// Allow `nr` when argument `arg` (32 bits) is one of `values`.
    fn arg_in(&mut self, nr: i64, arg: u8, values: &[u64]) {
        for &v in values {
            self.when(nr, vec![dword(arg, SeccompCmpOp::Eq, v)]);
        }
    }

    /// Allow `nr` when argument `arg` has none of the bits of `mask`.
    fn arg_without(&mut self, nr: i64, arg: u8, mask: u64) {
        self.when(nr, vec![qword(arg, SeccompCmpOp::MaskedEq(mask), 0)]);
    }

    fn into_seccompiler(self) -> BTreeMap<i64, Vec<SeccompRule>> {
        self.0
            .into_iter()
            .map(|(nr, alternatives)| {
                let rules = alternatives
                    .unwrap_or_default()
                    .into_iter()
                    .map(|conditions| {
                        SeccompRule::new(conditions).expect("a rule has at least one condition")
                    })
                    .collect();
                (nr, rules)
            })
            .collect()
    }
}

/// ioctl request numbers chitin's threads use (Linux uapi).
pub(crate) mod ioctl {
    /// `KVM_RUN`: `_IO(KVMIO, 0x80)`.
    pub const KVM_RUN: u64 = 0xae80;
    /// `TUNSETOFFLOAD`: `_IOW('T', 208, unsigned int)`.
    pub const TUNSETOFFLOAD: u64 = 0x4004_54d0;
    /// `FIONBIO`: set or clear non-blocking mode.
    pub const FIONBIO: u64 = 0x5421;

    /// `_IOR(KVMIO, nr, size)`: a KVM ioctl that reads `size` bytes of
    /// state out (`_IOC_READ` is 2, the size field 14 bits at bit 16).
    const fn kvm_ior(nr: u64, size: u64) -> u64 {
        (2 << 30) | (size << 16) | (0xae << 8) | nr
    }

    /// The ioctls that read a parked vCPU's state for a snapshot, with the
    /// sizes of their structs on x86_64 (kvm_regs 144, kvm_sregs 312,
    /// kvm_lapic_state 1024, kvm_mp_state 4, kvm_vcpu_events 64,
    /// kvm_debugregs 128, kvm_xsave 4096, kvm_xcrs 392); KVM_GET_MSRS is
    /// `_IOWR` over the 8-byte kvm_msrs header, KVM_GET_TSC_KHZ `_IO`.
    pub const VCPU_STATE_READS: [u64; 10] = [
        kvm_ior(0x81, 144),
        kvm_ior(0x83, 312),
        (3 << 30) | (8 << 16) | 0xae88,
        kvm_ior(0x8e, 1024),
        kvm_ior(0x98, 4),
        kvm_ior(0x9f, 64),
        kvm_ior(0xa1, 128),
        kvm_ior(0xa4, 4096),
        kvm_ior(0xa6, 392),
        0xaea3,
    ];
}

/// One syscall condition: argument `arg` compared as a 32-bit value.
fn dword(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value).expect("argument index below 6")
}

/// One syscall condition on a 64-bit argument.
fn qword(arg: u8, op: SeccompCmpOp, value: u64) -> SeccompCondition {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, op, value).expect("argument index below 6")
}

/// futex operations chitin's threads use: wait and wake, private (Rust's
/// std: `FUTEX_WAIT_BITSET_PRIVATE` for waits, `FUTEX_WAKE_PRIVATE`;
/// glibc's internal locks: `FUTEX_WAIT_PRIVATE`) and shared
/// (`pthread_join` waits on the thread id with a `CLOCK_REALTIME` bitset
/// wait). No requeue, no priority inheritance.
const FUTEX_OPS: &[u64] = &[0x00, 0x01, 0x09, 0x80, 0x81, 0x89, 0x109, 0x189];

/// `TIOCSTI`: push a byte into a terminal's input.
const TIOCSTI: u64 = 0x5412;
/// `TIOCLINUX`: the Linux console's commands (selection paste among them).
const TIOCLINUX: u64 = 0x541c;

/// `SHUT_RDWR`.
const SHUT_RDWR: u64 = 2;
/// `SHUT_WR`.
const SHUT_WR: u64 = 1;

/// What every thread of an allow-list class needs from the runtime: memory
/// (never executable), locks and condition variables, clocks, thread exit
/// (Rust's std takes down the signal stack, glibc gives back the stack's
/// pages), signals (the vCPU kick and its return, a panic's abort; a
/// thread's signal mask), closing what it owns, the `write` of a logger
/// writing to an fd the embedder opened (stderr, a file, a pipe), and
/// `fcntl(F_GETFD)`, with which Rust's std checks an fd it closes in
/// debug builds.
fn runtime(rules: &mut Rules) {
    rules.any_args(&[
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_brk,
        libc::SYS_clock_gettime,
        libc::SYS_gettimeofday,
        libc::SYS_time,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_getrandom,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_sigaltstack,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_tgkill,
        libc::SYS_restart_syscall,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_close,
        libc::SYS_write,
        libc::SYS_writev,
    ]);
    rules.arg_in(libc::SYS_futex, 1, FUTEX_OPS);
    // What glibc's malloc and thread exit advise; never HWPOISON or
    // SOFT_OFFLINE, which take host pages out of service.
    rules.arg_in(
        libc::SYS_madvise,
        2,
        &[
            libc::MADV_DONTNEED as u64,
            libc::MADV_FREE as u64,
            libc::MADV_HUGEPAGE as u64,
        ],
    );
    rules.arg_without(libc::SYS_mmap, 2, libc::PROT_EXEC as u64);
    rules.arg_without(libc::SYS_mprotect, 2, libc::PROT_EXEC as u64);
    rules.arg_in(libc::SYS_fcntl, 1, &[libc::F_GETFD as u64]);
}

/// vCPU threads: `KVM_RUN` (and, parked, the ioctls that read their
/// state for a snapshot), and the device work of register accesses:
/// eventfd writes (irqfds, queue kicks, a share's stop) and 8-byte reads
/// (InterruptACK counts), a net device's
/// offload setting at activation and reset, vsock's shutdown of its
/// connections at reset and the agent link's at the VM's exit.
fn vcpu(rules: &mut Rules) {
    runtime(rules);
    // The InterruptACK counts KVM kept in eventfds, applied when the guest
    // reads InterruptStatus: eventfd reads, 8 bytes (all 64 bits compared,
    // so no larger count passes as 8).
    rules.when(libc::SYS_read, vec![qword(2, SeccompCmpOp::Eq, 8)]);
    rules.arg_in(libc::SYS_shutdown, 1, &[SHUT_RDWR]);
    rules.arg_in(libc::SYS_ioctl, 1, &[ioctl::KVM_RUN]);
    // A snapshot reads a parked vCPU's state on its own thread.
    rules.arg_in(libc::SYS_ioctl, 1, &ioctl::VCPU_STATE_READS);
    // The offloads are a value, not a pointer: CSUM, TSO4, TSO6, UFO.
    rules.when(
        libc::SYS_ioctl,
        vec![
            dword(1, SeccompCmpOp::Eq, ioctl::TUNSETOFFLOAD),
            qword(2, SeccompCmpOp::MaskedEq(!0x17), 0),
        ],
    );
}

/// The event loop: epoll, eventfds and timerfds, disk I/O on open images,
/// frames to and from the tap, and vsock's Unix sockets (it connects to
/// host listeners and accepts host connections).
fn event_loop(rules: &mut Rules) {
    runtime(rules);
    rules.any_args(&[
        libc::SYS_epoll_wait,
        libc::SYS_read,
        libc::SYS_readv,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_fdatasync,
        libc::SYS_connect,
        libc::SYS_recvfrom,
    ]);
    // Writes to vsock's host streams: Rust's std sends on a Unix stream
    // with MSG_NOSIGNAL.
    rules.arg_in(libc::SYS_sendto, 3, &[libc::MSG_NOSIGNAL as u64]);
    rules.arg_in(
        libc::SYS_epoll_ctl,
        1,
        &[
            libc::EPOLL_CTL_ADD as u64,
            libc::EPOLL_CTL_DEL as u64,
            libc::EPOLL_CTL_MOD as u64,
        ],
    );
    // Discard and write zeroes: punch a hole or zero a range, size kept.
    rules.arg_in(
        libc::SYS_fallocate,
        1,
        &[
            (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE) as u64,
            (libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE) as u64,
        ],
    );
    rules.arg_in(libc::SYS_timerfd_settime, 1, &[0]);
    rules.when(
        libc::SYS_socket,
        vec![
            dword(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64),
            dword(
                1,
                SeccompCmpOp::Eq,
                (libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC) as u64,
            ),
        ],
    );
    rules.arg_in(libc::SYS_accept4, 3, &[libc::SOCK_CLOEXEC as u64]);
    rules.arg_in(libc::SYS_shutdown, 1, &[SHUT_WR, SHUT_RDWR]);
    rules.arg_in(libc::SYS_ioctl, 1, &[ioctl::FIONBIO]);
}

/// A share's thread: the file operations of the passthrough file system
/// on fds below the share's root (with the extended-attribute calls on
/// `/proc/self/fd/<n>` paths), the per-thread credential switch to the
/// guest's mapped ids, eventfds (its queues, its stop, the irqfd), and the
/// look at `/proc/self/fd` and `/proc/self/mountinfo` each activation
/// makes.
fn fs(rules: &mut Rules) {
    runtime(rules);
    rules.any_args(&[
        libc::SYS_poll,
        libc::SYS_read,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_lseek,
        libc::SYS_openat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_getdents64,
        libc::SYS_readlinkat,
        libc::SYS_mkdirat,
        libc::SYS_symlinkat,
        libc::SYS_linkat,
        libc::SYS_unlinkat,
        libc::SYS_renameat2,
        libc::SYS_fchmod,
        libc::SYS_fchmodat,
        libc::SYS_fchownat,
        libc::SYS_utimensat,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_fstatfs,
        libc::SYS_getxattr,
        libc::SYS_setxattr,
        libc::SYS_listxattr,
        libc::SYS_removexattr,
        libc::SYS_dup,
        libc::SYS_geteuid,
        libc::SYS_setresuid,
        libc::SYS_setresgid,
    ]);
    rules.arg_in(libc::SYS_fcntl, 1, &[libc::F_SETFL as u64]);
    rules.arg_in(libc::SYS_umask, 0, &[0]);
    // FIFOs, sockets and regular files; never a device node.
    for kind in [libc::S_IFIFO, libc::S_IFSOCK, libc::S_IFREG] {
        rules.when(
            libc::SYS_mknodat,
            vec![dword(
                2,
                SeccompCmpOp::MaskedEq(libc::S_IFMT.into()),
                kind.into(),
            )],
        );
    }
}

/// The agent connection's writer and demultiplexer: reads and writes on
/// the connection's socket (`write`, `recvfrom`), the writer's deadline on each write
/// (`SO_SNDTIMEO`), and the connection's shutdown.
fn agent(rules: &mut Rules) {
    runtime(rules);
    rules.any_args(&[libc::SYS_recvfrom]);
    // Rust's std writes to a Unix or TCP stream with `send(..,
    // MSG_NOSIGNAL)`.
    rules.arg_in(libc::SYS_sendto, 3, &[libc::MSG_NOSIGNAL as u64]);
    rules.arg_in(libc::SYS_shutdown, 1, &[SHUT_RDWR]);
    rules.when(
        libc::SYS_setsockopt,
        vec![
            dword(1, SeccompCmpOp::Eq, libc::SOL_SOCKET as u64),
            dword(2, SeccompCmpOp::Eq, libc::SO_SNDTIMEO as u64),
        ],
    );
}

/// A stdin feeder only moves bytes between memory and a window.
fn feeder(rules: &mut Rules) {
    runtime(rules);
}

/// What a writer thread may never do (the deny list): start a process
/// (clone without `CLONE_THREAD`; `clone3` is answered `ENOSYS` first, so
/// glibc falls back to `clone`, whose flags the filter can see), exec,
/// trace or read another process, enter or make namespaces, mount, change
/// credentials or capabilities, load modules or kexec, reboot, load BPF,
/// open files by handle, or submit work through io_uring.
fn writer_refusals(rules: &mut Rules) {
    rules.any_args(&[
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_fork,
        libc::SYS_vfork,
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_pidfd_getfd,
        libc::SYS_kcmp,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_mount_setattr,
        libc::SYS_mknod,
        libc::SYS_mknodat,
        libc::SYS_setuid,
        libc::SYS_setgid,
        libc::SYS_setreuid,
        libc::SYS_setregid,
        libc::SYS_setresuid,
        libc::SYS_setresgid,
        libc::SYS_setfsuid,
        libc::SYS_setfsgid,
        libc::SYS_setgroups,
        libc::SYS_capset,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_reboot,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_open_by_handle_at,
        libc::SYS_name_to_handle_at,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_acct,
        libc::SYS_quotactl,
        libc::SYS_iopl,
        libc::SYS_ioperm,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_adjtimex,
        libc::SYS_clock_adjtime,
        libc::SYS_syslog,
        libc::SYS_personality,
        libc::SYS_fanotify_init,
    ]);
    // A clone that is not a thread of this process, or that makes
    // namespaces.
    rules.when(
        libc::SYS_clone,
        vec![qword(
            0,
            SeccompCmpOp::MaskedEq(libc::CLONE_THREAD as u64),
            0,
        )],
    );
    for new in [
        libc::CLONE_NEWNS,
        libc::CLONE_NEWCGROUP,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWNET,
    ] {
        rules.when(
            libc::SYS_clone,
            vec![qword(0, SeccompCmpOp::MaskedEq(new as u64), new as u64)],
        );
    }
    // Typing into a terminal, and the console's own commands.
    rules.arg_in(libc::SYS_ioctl, 1, &[TIOCSTI, TIOCLINUX]);
}

fn rules_of(class: ThreadClass) -> Rules {
    let mut rules = Rules::default();
    match class {
        ThreadClass::Vcpu => vcpu(&mut rules),
        ThreadClass::EventLoop => event_loop(&mut rules),
        ThreadClass::Fs => fs(&mut rules),
        ThreadClass::Agent => agent(&mut rules),
        ThreadClass::Feeder => feeder(&mut rules),
        ThreadClass::Writer => writer_refusals(&mut rules),
    }
    rules
}

/// Syscalls a class answers with an error instead of its filter's verdict:
/// glibc's malloc opens `/proc/sys/vm/overcommit_memory` once per process
/// from whichever thread first trims a heap, and carries on when that
/// fails, so threads that never open files get `EACCES` rather than a
/// dead process; writer threads get `ENOSYS` for `clone3`, so glibc falls
/// back to `clone`, whose flags the filter sees.
fn answered(class: ThreadClass) -> &'static [(i64, i32)] {
    match class {
        ThreadClass::Fs => &[],
        ThreadClass::Writer => &[(libc::SYS_clone3, libc::ENOSYS)],
        _ => &[
            (libc::SYS_openat, libc::EACCES),
            (libc::SYS_open, libc::EACCES),
        ],
    }
}

/// The syscalls `class` allows (for an allow-list class) or refuses (for
/// the writer class), with their names and whether only some arguments
/// are allowed: the table `docs/security.md` shows.
pub fn allowed_syscalls(class: ThreadClass) -> Vec<(i64, &'static str, bool)> {
    rules_of(class)
        .0
        .into_iter()
        .map(|(nr, alternatives)| {
            (
                nr,
                crate::syscall_name(nr).unwrap_or("?"),
                alternatives.is_some(),
            )
        })
        .collect()
}

// Classic BPF opcodes and seccomp_data offsets (linux/filter.h,
// linux/seccomp.h), for the few instructions written by hand.
const BPF_LD_W_ABS: u16 = 0x20;
const BPF_JMP_JEQ_K: u16 = 0x15;
const BPF_JMP_JGE_K: u16 = 0x35;
/// `__X32_SYSCALL_BIT`.
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const BPF_RET_K: u16 = 0x06;
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const DATA_IP_LOW: u32 = 8;
const DATA_IP_HIGH: u32 = 12;
/// `AUDIT_ARCH_X86_64`.
const AUDIT_ARCH: u32 = 62 | 0x8000_0000 | 0x4000_0000;

fn stmt(code: u16, k: u32) -> sock_filter {
    sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

fn jump(code: u16, k: u32, jt: u8, jf: u8) -> sock_filter {
    sock_filter { code, jt, jf, k }
}

/// Instructions put before seccompiler's program: in log mode, allow what
/// the trampoline makes; refuse x32 syscalls; then the syscalls the class
/// answers with an error ([`answered`]). Each part falls through to the
/// next instruction when it does not apply.
fn prefix(class: ThreadClass, mode: Seccomp) -> Vec<sock_filter> {
    let mut out = Vec::new();
    if mode == Seccomp::Log {
        let ip = arch::trampoline_ip();
        out.extend([
            stmt(BPF_LD_W_ABS, DATA_IP_LOW),
            jump(BPF_JMP_JEQ_K, ip as u32, 0, 3),
            stmt(BPF_LD_W_ABS, DATA_IP_HIGH),
            jump(BPF_JMP_JEQ_K, (ip >> 32) as u32, 0, 1),
            stmt(BPF_RET_K, libc::SECCOMP_RET_ALLOW),
        ]);
    }
    let answers = answered(class);
    // Syscall numbers mean something only for this architecture; any
    // other goes on to seccompiler's own arch check, which refuses it.
    let skip = u8::try_from(3 + 2 * answers.len()).expect("a short list");
    out.extend([
        stmt(BPF_LD_W_ABS, DATA_ARCH),
        jump(BPF_JMP_JEQ_K, AUDIT_ARCH, 0, skip),
        stmt(BPF_LD_W_ABS, DATA_NR),
        // x32 syscalls (bit 30) carry this architecture's audit value but
        // are other numbers for the same calls: refused outright.
        jump(BPF_JMP_JGE_K, X32_SYSCALL_BIT, 0, 1),
        stmt(BPF_RET_K, refused(mode)),
    ]);
    for &(nr, errno) in answers {
        out.extend([
            jump(BPF_JMP_JEQ_K, nr as u32, 0, 1),
            stmt(BPF_RET_K, libc::SECCOMP_RET_ERRNO | errno as u32),
        ]);
    }
    out
}

/// What a refused syscall gets under `mode`.
fn refused_action(mode: Seccomp) -> SeccompAction {
    match mode {
        Seccomp::Log => SeccompAction::Trap,
        _ => SeccompAction::KillProcess,
    }
}

/// [`refused_action`] as the filter's return value.
fn refused(mode: Seccomp) -> u32 {
    refused_action(mode).into()
}

/// The BPF program of `class` under `mode` (Enforce or Log).
pub(crate) fn compile(class: ThreadClass, mode: Seccomp) -> Result<BpfProgram, String> {
    let refused = refused_action(mode);
    let (mismatch, matched) = match class {
        ThreadClass::Writer => (SeccompAction::Allow, refused),
        _ => (refused, SeccompAction::Allow),
    };
    let filter = SeccompFilter::new(
        rules_of(class).into_seccompiler(),
        mismatch,
        matched,
        arch::TARGET,
    )
    .map_err(|e| e.to_string())?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| e.to_string())?;
    let mut full = prefix(class, mode);
    full.extend(program);
    Ok(full)
}

macro_rules! names {
    ($($name:ident),* $(,)?) => {
        &[$((libc::$name, stringify!($name))),*]
    };
}

/// Syscall numbers and their `SYS_` names: every syscall the tables
/// mention and others worth naming in a report.
pub(crate) const NAMES: &[(i64, &str)] = names![
    SYS_accept,
    SYS_accept4,
    SYS_access,
    SYS_acct,
    SYS_add_key,
    SYS_adjtimex,
    SYS_alarm,
    SYS_arch_prctl,
    SYS_bind,
    SYS_bpf,
    SYS_brk,
    SYS_capget,
    SYS_capset,
    SYS_chdir,
    SYS_chmod,
    SYS_chown,
    SYS_chroot,
    SYS_clock_adjtime,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_clock_settime,
    SYS_clone,
    SYS_clone3,
    SYS_close,
    SYS_connect,
    SYS_copy_file_range,
    SYS_creat,
    SYS_delete_module,
    SYS_dup,
    SYS_dup2,
    SYS_dup3,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_pwait,
    SYS_epoll_pwait2,
    SYS_epoll_wait,
    SYS_eventfd2,
    SYS_execve,
    SYS_execveat,
    SYS_exit,
    SYS_exit_group,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_fadvise64,
    SYS_fallocate,
    SYS_fanotify_init,
    SYS_fchdir,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_fchown,
    SYS_fchownat,
    SYS_fcntl,
    SYS_fdatasync,
    SYS_fgetxattr,
    SYS_finit_module,
    SYS_flistxattr,
    SYS_flock,
    SYS_fork,
    SYS_fremovexattr,
    SYS_fsconfig,
    SYS_fsetxattr,
    SYS_fsmount,
    SYS_fsopen,
    SYS_fspick,
    SYS_fstat,
    SYS_fstatfs,
    SYS_fsync,
    SYS_ftruncate,
    SYS_futex,
    SYS_getcwd,
    SYS_getdents,
    SYS_getdents64,
    SYS_getegid,
    SYS_geteuid,
    SYS_getgid,
    SYS_getgroups,
    SYS_getpeername,
    SYS_getpid,
    SYS_getppid,
    SYS_getrandom,
    SYS_getrlimit,
    SYS_getrusage,
    SYS_getsockname,
    SYS_getsockopt,
    SYS_gettid,
    SYS_gettimeofday,
    SYS_getuid,
    SYS_getxattr,
    SYS_init_module,
    SYS_inotify_add_watch,
    SYS_inotify_init1,
    SYS_io_uring_enter,
    SYS_io_uring_register,
    SYS_io_uring_setup,
    SYS_ioctl,
    SYS_ioperm,
    SYS_iopl,
    SYS_kcmp,
    SYS_kexec_file_load,
    SYS_kexec_load,
    SYS_keyctl,
    SYS_kill,
    SYS_lchown,
    SYS_link,
    SYS_linkat,
    SYS_listen,
    SYS_listxattr,
    SYS_lseek,
    SYS_lstat,
    SYS_madvise,
    SYS_membarrier,
    SYS_memfd_create,
    SYS_mincore,
    SYS_mkdir,
    SYS_mkdirat,
    SYS_mknod,
    SYS_mknodat,
    SYS_mlock,
    SYS_mmap,
    SYS_mount,
    SYS_mount_setattr,
    SYS_move_mount,
    SYS_mprotect,
    SYS_mremap,
    SYS_msync,
    SYS_munlock,
    SYS_munmap,
    SYS_name_to_handle_at,
    SYS_nanosleep,
    SYS_newfstatat,
    SYS_open,
    SYS_open_by_handle_at,
    SYS_open_tree,
    SYS_openat,
    SYS_openat2,
    SYS_pause,
    SYS_perf_event_open,
    SYS_personality,
    SYS_pidfd_getfd,
    SYS_pidfd_open,
    SYS_pidfd_send_signal,
    SYS_pipe,
    SYS_pipe2,
    SYS_pivot_root,
    SYS_poll,
    SYS_ppoll,
    SYS_prctl,
    SYS_pread64,
    SYS_preadv,
    SYS_prlimit64,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_pselect6,
    SYS_ptrace,
    SYS_pwrite64,
    SYS_pwritev,
    SYS_quotactl,
    SYS_read,
    SYS_readahead,
    SYS_readlink,
    SYS_readlinkat,
    SYS_readv,
    SYS_reboot,
    SYS_recvfrom,
    SYS_recvmmsg,
    SYS_recvmsg,
    SYS_removexattr,
    SYS_rename,
    SYS_renameat,
    SYS_renameat2,
    SYS_request_key,
    SYS_restart_syscall,
    SYS_rmdir,
    SYS_rseq,
    SYS_rt_sigaction,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_rt_sigtimedwait,
    SYS_sched_getaffinity,
    SYS_sched_setaffinity,
    SYS_sched_yield,
    SYS_seccomp,
    SYS_select,
    SYS_sendfile,
    SYS_sendmmsg,
    SYS_sendmsg,
    SYS_sendto,
    SYS_set_robust_list,
    SYS_set_tid_address,
    SYS_setfsgid,
    SYS_setfsuid,
    SYS_setgid,
    SYS_setgroups,
    SYS_setitimer,
    SYS_setns,
    SYS_setregid,
    SYS_setresgid,
    SYS_setresuid,
    SYS_setreuid,
    SYS_setrlimit,
    SYS_setsid,
    SYS_setsockopt,
    SYS_settimeofday,
    SYS_setuid,
    SYS_setxattr,
    SYS_shutdown,
    SYS_sigaltstack,
    SYS_socket,
    SYS_socketpair,
    SYS_splice,
    SYS_stat,
    SYS_statfs,
    SYS_statx,
    SYS_swapoff,
    SYS_swapon,
    SYS_symlink,
    SYS_symlinkat,
    SYS_sync,
    SYS_syncfs,
    SYS_sysinfo,
    SYS_syslog,
    SYS_tee,
    SYS_tgkill,
    SYS_time,
    SYS_timerfd_create,
    SYS_timerfd_gettime,
    SYS_timerfd_settime,
    SYS_tkill,
    SYS_truncate,
    SYS_umask,
    SYS_umount2,
    SYS_uname,
    SYS_unlink,
    SYS_unlinkat,
    SYS_unshare,
    SYS_userfaultfd,
    SYS_utimensat,
    SYS_vfork,
    SYS_wait4,
    SYS_waitid,
    SYS_write,
    SYS_writev,
];

#[cfg(test)]
mod tests {
    use super::ioctl;

    /// `_IOC(dir, KVMIO, nr, size)` from the struct itself.
    fn kvm_ioc<T>(dir: u64, nr: u64) -> u64 {
        (dir << 30) | ((std::mem::size_of::<T>() as u64) << 16) | (0xae << 8) | nr
    }

    #[test]
    fn vcpu_state_reads_are_the_kvm_ioctls_of_those_structs() {
        use kvm_bindings::*;
        let want = [
            kvm_ioc::<kvm_regs>(2, 0x81),
            kvm_ioc::<kvm_sregs>(2, 0x83),
            kvm_ioc::<kvm_msrs>(3, 0x88),
            kvm_ioc::<kvm_lapic_state>(2, 0x8e),
            kvm_ioc::<kvm_mp_state>(2, 0x98),
            kvm_ioc::<kvm_vcpu_events>(2, 0x9f),
            kvm_ioc::<kvm_debugregs>(2, 0xa1),
            kvm_ioc::<kvm_xsave>(2, 0xa4),
            kvm_ioc::<kvm_xcrs>(2, 0xa6),
            0xaea3,
        ];
        assert_eq!(ioctl::VCPU_STATE_READS, want);
    }
}
