//! What each thread chitin starts may ask of the kernel, and how a thread
//! confines itself to that.
//!
//! chitin is a library inside someone else's process, so it never filters
//! the process: every thread chitin starts installs the filter of its
//! [`ThreadClass`] on itself ([`spawn`] does it first thing, before the
//! thread's work and so before it touches guest data), and the embedder's
//! own threads are never filtered. seccomp filters are inherited by the
//! threads a filtered thread creates, so no chitin thread creates threads
//! after it is confined: every thread is started by the embedder's thread
//! (`build()`, `start()`, `exec`).
//!
//! A syscall a class does not allow kills the whole process
//! ([`Seccomp::Enforce`], `SECCOMP_RET_KILL_PROCESS`): a thread that
//! could be a guest's foothold gets no second try. [`Seccomp::Log`] is for
//! finding out what a thread needs: the forbidden syscall traps into a
//! `SIGSYS` handler, which records it ([`violations`]), prints one line per
//! thread class and syscall on stderr, and then makes the syscall on the
//! thread's behalf, so the program runs as if unfiltered.
//!
//! The tables are in `filters.rs` and in `docs/security.md`; the filters
//! are built in Rust when first used, once per class and mode.
//!
//! This crate never decides the mode: the embedder does
//! (`SandboxBuilder::seccomp`), and every crate that starts a thread is
//! handed it.

mod arch;
mod filters;
mod log;

use std::fmt;
use std::io;
use std::sync::mpsc;
use std::sync::OnceLock;
use std::thread::JoinHandle;

pub use filters::allowed_syscalls;
pub use log::{violations, Violation};

/// Whether chitin's threads run under seccomp filters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Seccomp {
    /// Each thread runs under its class's filter; anything else kills the
    /// process (the default).
    #[default]
    Enforce,
    /// Each thread runs under its class's filter, but a syscall outside it
    /// is recorded, reported on stderr (thread name, class and syscall)
    /// and then made anyway. For finding out what a thread needs, never
    /// for production: nothing is enforced. Installs a process-wide
    /// `SIGSYS` handler.
    Log,
    /// No filters.
    Off,
}

/// The kinds of thread chitin starts, each with a filter of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadClass {
    /// `chitin-vcpu<N>`: `KVM_RUN` and the device work of port-I/O and
    /// MMIO exits (register reads and writes, virtio activation and reset).
    Vcpu,
    /// `chitin-events`: the device event loop (virtio queues, disk I/O,
    /// the tap, vsock's host sockets, timers, serial input).
    EventLoop,
    /// `chitin-fs`: one per share, serving the guest's FUSE requests on
    /// the host directory.
    Fs,
    /// `chitin-agent-tx` and `chitin-agent-rx`: the agent connection's
    /// writer and demultiplexer.
    Agent,
    /// `chitin-stdin`: feeds a command's stdin bytes into its window.
    Feeder,
    /// `chitin-console` and `chitin-output`: hand guest output to a writer
    /// the embedder gave chitin (a console or command output writer), so
    /// they run the embedder's code. Their filter refuses what no writer
    /// needs (new processes, namespaces, mounts, tracing, modules) rather
    /// than allowing a fixed list.
    Writer,
}

impl ThreadClass {
    /// Every class, in table order.
    pub const ALL: [ThreadClass; 6] = [
        ThreadClass::Vcpu,
        ThreadClass::EventLoop,
        ThreadClass::Fs,
        ThreadClass::Agent,
        ThreadClass::Feeder,
        ThreadClass::Writer,
    ];

    /// A short name for reports and docs.
    pub fn name(self) -> &'static str {
        match self {
            ThreadClass::Vcpu => "vcpu",
            ThreadClass::EventLoop => "event-loop",
            ThreadClass::Fs => "fs",
            ThreadClass::Agent => "agent",
            ThreadClass::Feeder => "feeder",
            ThreadClass::Writer => "writer",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for ThreadClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a thread could not be confined.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The filter could not be compiled (a bug in the tables).
    #[error("cannot compile the seccomp filter of {class} threads: {detail}")]
    Compile {
        /// The thread class.
        class: ThreadClass,
        /// seccompiler's description.
        detail: String,
    },
    /// The kernel refused the filter (no seccomp filter support, or the
    /// thread may not install one).
    #[error("cannot install the seccomp filter of {class} threads")]
    Install {
        /// The thread class.
        class: ThreadClass,
        /// The kernel's answer.
        #[source]
        source: io::Error,
    },
    /// The `SIGSYS` handler of [`Seccomp::Log`] could not be installed.
    #[error("cannot install the SIGSYS handler of seccomp log mode")]
    Handler(#[source] io::Error),
}

/// The compiled filter of `class` under `mode` (never [`Seccomp::Off`]),
/// built once per process.
fn program(
    class: ThreadClass,
    mode: Seccomp,
) -> Result<&'static [seccompiler::sock_filter], SeccompError> {
    type Slot = OnceLock<Result<seccompiler::BpfProgram, String>>;
    static ENFORCE: [Slot; ThreadClass::ALL.len()] =
        [const { OnceLock::new() }; ThreadClass::ALL.len()];
    static LOG: [Slot; ThreadClass::ALL.len()] =
        [const { OnceLock::new() }; ThreadClass::ALL.len()];
    let slot = match mode {
        Seccomp::Log => &LOG[class.index()],
        _ => &ENFORCE[class.index()],
    };
    slot.get_or_init(|| filters::compile(class, mode))
        .as_deref()
        .map_err(|detail| SeccompError::Compile {
            class,
            detail: detail.clone(),
        })
}

/// Confine the calling thread to `class`'s filter under `mode` (nothing
/// for [`Seccomp::Off`]). Irreversible for this thread and every thread
/// it creates afterwards.
pub fn confine_current_thread(class: ThreadClass, mode: Seccomp) -> Result<(), SeccompError> {
    if mode == Seccomp::Off {
        return Ok(());
    }
    let program = program(class, mode)?;
    if mode == Seccomp::Log {
        log::install_handler().map_err(SeccompError::Handler)?;
    }
    log::set_thread_class(class);
    seccompiler::apply_filter(program).map_err(|e| SeccompError::Install {
        class,
        source: match e {
            seccompiler::Error::Prctl(e) | seccompiler::Error::Seccomp(e) => e,
            other => io::Error::other(other.to_string()),
        },
    })
}

/// Check, without confining anything, that this process can confine
/// threads under `mode`: every filter compiles and the kernel supports
/// seccomp filters. For reporting a configuration error before any thread
/// starts.
pub fn check(mode: Seccomp) -> Result<(), SeccompError> {
    if mode == Seccomp::Off {
        return Ok(());
    }
    for class in ThreadClass::ALL {
        program(class, mode)?;
    }
    // SAFETY: PR_GET_SECCOMP takes no pointer; it fails with EINVAL on a
    // kernel without seccomp.
    if unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) } < 0 {
        return Err(SeccompError::Install {
            class: ThreadClass::Vcpu,
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Start a thread named `name` that confines itself to `class` under
/// `mode` and then runs `work`. Returns once the thread is confined; if it
/// could not be, the thread ends without running `work` and the error
/// says why.
pub fn spawn<F>(
    name: impl Into<String>,
    class: ThreadClass,
    mode: Seccomp,
    work: F,
) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    spawn_prepared(name, class, mode, || Ok(()), work)
}

/// [`spawn`], with `prepare` run on the new thread before it confines
/// itself: for set-up the filter would refuse and that touches no guest
/// data (giving the thread its own file-system attributes, dropping
/// capabilities). An error from `prepare` ends the thread and is returned.
pub fn spawn_prepared<P, F>(
    name: impl Into<String>,
    class: ThreadClass,
    mode: Seccomp,
    prepare: P,
    work: F,
) -> io::Result<JoinHandle<()>>
where
    P: FnOnce() -> io::Result<()> + Send + 'static,
    F: FnOnce() + Send + 'static,
{
    start_prepared(name, class, mode, prepare, work)?.confirm()
}

/// [`spawn`] without waiting: the thread confines itself while the
/// caller goes on (starting others, so their filters are installed in
/// parallel); [`Starting::confirm`] says whether it did. The thread does
/// no work unless it is confined.
pub fn start<F>(
    name: impl Into<String>,
    class: ThreadClass,
    mode: Seccomp,
    work: F,
) -> io::Result<Starting>
where
    F: FnOnce() + Send + 'static,
{
    start_prepared(name, class, mode, || Ok(()), work)
}

/// [`spawn_prepared`] without waiting (see [`start`]).
pub fn start_prepared<P, F>(
    name: impl Into<String>,
    class: ThreadClass,
    mode: Seccomp,
    prepare: P,
    work: F,
) -> io::Result<Starting>
where
    P: FnOnce() -> io::Result<()> + Send + 'static,
    F: FnOnce() + Send + 'static,
{
    let (ready_tx, ready_rx) = mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let result = block_async_signals()
                .and_then(|()| prepare())
                .and_then(|()| confine_current_thread(class, mode).map_err(io::Error::other));
            let ok = result.is_ok();
            // The channel holds one message: this never blocks, and a
            // starter that went away needs no answer.
            let _ = ready_tx.send(result);
            drop(ready_tx);
            if ok {
                work();
            }
        })?;
    Ok(Starting {
        thread,
        ready: ready_rx,
        class,
    })
}

/// A thread that is confining itself ([`start`]).
#[derive(Debug)]
pub struct Starting {
    thread: JoinHandle<()>,
    ready: mpsc::Receiver<io::Result<()>>,
    class: ThreadClass,
}

impl Starting {
    /// Wait until the thread is confined and return it; if it could not
    /// be, it has ended without doing its work, and the error says why.
    pub fn confirm(self) -> io::Result<JoinHandle<()>> {
        match self.ready.recv() {
            Ok(Ok(())) => Ok(self.thread),
            Ok(Err(e)) => {
                let _ = self.thread.join();
                Err(e)
            }
            Err(_) => {
                // The thread ended without a word: it panicked getting
                // ready.
                let _ = self.thread.join();
                Err(io::Error::other(format!(
                    "the {} thread ended before it was confined",
                    self.class
                )))
            }
        }
    }
}

/// Block every signal on the calling thread but those a fault raises
/// synchronously (which cannot wait; blocked, they would kill the process
/// instead of reaching their handler) and `SIGSYS` (log mode's trap).
/// Signals sent to the process are then handled on the embedder's
/// threads, never by a handler running under a chitin thread's filter; a
/// thread that must take a signal (a vCPU's kick) unblocks it itself.
fn block_async_signals() -> io::Result<()> {
    // SAFETY: sigset_t is plain data that sigfillset initialises.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the calls only change it and
    // this thread's mask.
    unsafe {
        libc::sigfillset(&mut set);
        for sig in [
            libc::SIGSYS,
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGILL,
            libc::SIGFPE,
            libc::SIGTRAP,
            libc::SIGABRT,
        ] {
            libc::sigdelset(&mut set, sig);
        }
        match libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) {
            0 => Ok(()),
            errno => Err(io::Error::from_raw_os_error(errno)),
        }
    }
}

/// The name of syscall `nr` on this architecture, where chitin knows it.
pub fn syscall_name(nr: i64) -> Option<&'static str> {
    filters::NAMES
        .iter()
        .find(|(n, _)| *n == nr)
        .map(|(_, name)| name.trim_start_matches("SYS_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_in_both_modes() {
        check(Seccomp::Enforce).unwrap();
        check(Seccomp::Log).unwrap();
        check(Seccomp::Off).unwrap();
    }

    /// Syscalls no allow-list class may have: they start processes,
    /// trace, change namespaces, mounts or credentials, or load code.
    const NEVER: &[i64] = &[
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_fork,
        libc::SYS_vfork,
        libc::SYS_clone,
        libc::SYS_clone3,
        libc::SYS_ptrace,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_bpf,
        libc::SYS_process_vm_writev,
        libc::SYS_io_uring_setup,
        libc::SYS_open_by_handle_at,
        libc::SYS_setuid,
        libc::SYS_capset,
    ];

    fn allows(class: ThreadClass, nr: i64) -> bool {
        allowed_syscalls(class).iter().any(|(n, _, _)| *n == nr)
    }

    #[test]
    fn no_allow_list_class_allows_process_namespace_mount_or_module_syscalls() {
        for class in ThreadClass::ALL {
            if class == ThreadClass::Writer {
                continue;
            }
            for &nr in NEVER {
                assert!(!allows(class, nr), "{class} allows {:?}", syscall_name(nr));
            }
        }
    }

    #[test]
    fn only_the_share_thread_opens_paths_and_only_the_event_loop_makes_sockets() {
        for class in ThreadClass::ALL {
            if class == ThreadClass::Writer {
                continue;
            }
            assert_eq!(allows(class, libc::SYS_openat), class == ThreadClass::Fs);
            assert_eq!(
                allows(class, libc::SYS_socket),
                class == ThreadClass::EventLoop
            );
            assert_eq!(
                allows(class, libc::SYS_connect),
                class == ThreadClass::EventLoop
            );
        }
    }

    #[test]
    fn writer_deny_list_refuses_the_never_list() {
        for &nr in NEVER {
            if nr == libc::SYS_clone3 {
                continue; // Answered ENOSYS before the list.
            }
            assert!(
                allows(ThreadClass::Writer, nr),
                "writer threads may make {:?}",
                syscall_name(nr)
            );
        }
    }

    /// The syscalls `docs/security.md` lists under `### <section>`.
    fn documented(doc: &str, section: &str) -> std::collections::BTreeSet<String> {
        let heading = format!("### {section}");
        doc.lines()
            .skip_while(|l| l.trim() != heading)
            .skip(1)
            .take_while(|l| !l.starts_with('#'))
            .filter_map(|l| {
                l.strip_prefix("| `")?
                    .split_once('`')
                    .map(|(n, _)| n.to_string())
            })
            .collect()
    }

    #[test]
    fn security_doc_lists_exactly_what_each_filter_allows_or_refuses() {
        let doc = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/security.md"
        ))
        .unwrap();
        let runtime = documented(&doc, "runtime");
        assert!(runtime.contains("futex"), "no runtime table");
        for class in ThreadClass::ALL {
            let mut listed = documented(&doc, class.name());
            if class != ThreadClass::Writer {
                listed.extend(runtime.iter().cloned());
            }
            let actual: std::collections::BTreeSet<String> = allowed_syscalls(class)
                .into_iter()
                .map(|(_, name, _)| name.to_string())
                .collect();
            assert_eq!(
                listed.symmetric_difference(&actual).collect::<Vec<_>>(),
                Vec::<&String>::new(),
                "docs/security.md and the {class} filter differ"
            );
        }
    }

    #[test]
    fn every_listed_syscall_has_a_name() {
        for class in ThreadClass::ALL {
            for (nr, name, _) in allowed_syscalls(class) {
                assert_ne!(name, "?", "syscall {nr} of {class}");
            }
        }
    }
}
