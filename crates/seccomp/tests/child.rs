//! The filters at work, each case in a fresh copy of this binary: a filter
//! that kills the process must not kill the test runner, and log mode's
//! record is per process. Its own harness (`harness = false`): the copy
//! runs the case named by `CHITIN_SECCOMP_TEST_CASE` and nothing else.
//!
//! No privileges or KVM needed: threads of each class make the syscalls
//! at issue themselves.

use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Output};
use std::sync::mpsc;

use chitin_seccomp::{spawn, violations, Seccomp, ThreadClass, Violation};

/// The environment variable naming the case a child process runs.
const CASE: &str = "CHITIN_SECCOMP_TEST_CASE";

/// Run `case` in a fresh copy of this binary.
fn in_child(case: &str) -> Output {
    Command::new(std::env::current_exe().unwrap())
        .env(CASE, case)
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Run `work` on a thread of `class` under `mode` and wait for it.
fn on_thread(class: ThreadClass, mode: Seccomp, work: impl FnOnce() + Send + 'static) {
    spawn("chitin-test", class, mode, work)
        .unwrap()
        .join()
        .unwrap();
}

/// A `/proc/<...>/status` line's value.
fn status_field(status: &str, field: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// What a child process runs; true when what it checks held (a kill says
/// so by its signal instead).
fn run_case(case: &str) -> bool {
    match case {
        "vcpu-execve" => {
            on_thread(ThreadClass::Vcpu, Seccomp::Enforce, || {
                let path = c"/bin/true";
                let argv = [path.as_ptr(), std::ptr::null()];
                // SAFETY: a valid path and null-terminated argv; the filter
                // stops the call before it execs anything.
                unsafe { libc::execv(path.as_ptr(), argv.as_ptr()) };
            });
            false
        }
        "vcpu-socket" => {
            on_thread(ThreadClass::Vcpu, Seccomp::Enforce, || {
                let _ = std::os::unix::net::UnixStream::pair();
            });
            false
        }
        "vcpu-exec-mapping" => {
            on_thread(ThreadClass::Vcpu, Seccomp::Enforce, || {
                // SAFETY: an anonymous mapping the filter refuses before
                // it exists.
                unsafe {
                    libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_EXEC,
                        libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
            });
            false
        }
        "vcpu-x32" => {
            on_thread(ThreadClass::Vcpu, Seccomp::Enforce, || {
                // getpid by its x32 number: the filter refuses the x32
                // range before it looks at the number.
                // SAFETY: getpid takes no arguments.
                unsafe { libc::syscall(libc::SYS_getpid | 0x4000_0000) };
            });
            false
        }
        "writer-clone-namespace" => {
            on_thread(ThreadClass::Writer, Seccomp::Enforce, || {
                // A "thread" in a new user namespace: the kernel would
                // refuse the combination (EINVAL); the filter must first.
                let flags =
                    libc::CLONE_THREAD | libc::CLONE_VM | libc::CLONE_SIGHAND | libc::CLONE_NEWUSER;
                // SAFETY: the call never reaches the kernel's clone, and
                // if it did, this flag set is refused there.
                unsafe { libc::syscall(libc::SYS_clone, flags as u64, 0u64, 0u64, 0u64, 0u64) };
            });
            false
        }
        "vcpu-open-refused" => {
            let (tx, rx) = mpsc::channel();
            on_thread(ThreadClass::Vcpu, Seccomp::Enforce, move || {
                let _ = tx.send(std::fs::File::open("/proc/self/status").map(|_| ()));
            });
            matches!(rx.recv(), Ok(Err(e)) if e.raw_os_error() == Some(libc::EACCES))
        }
        "writer-fork" => {
            on_thread(ThreadClass::Writer, Seccomp::Enforce, || {
                // SAFETY: the child (if there were one) exits at once.
                if unsafe { libc::fork() } == 0 {
                    // SAFETY: _exit in the forked child.
                    unsafe { libc::_exit(0) };
                }
            });
            false
        }
        "writer-threads-and-files" => {
            let (tx, rx) = mpsc::channel();
            on_thread(ThreadClass::Writer, Seccomp::Enforce, move || {
                let inner = std::thread::spawn(|| {
                    let path =
                        std::env::temp_dir().join(format!("chitin-seccomp-{}", std::process::id()));
                    std::fs::write(&path, b"x")?;
                    std::fs::remove_file(&path)
                });
                let _ = tx.send(inner.join().map(|r| r.is_ok()).unwrap_or(false));
            });
            rx.recv().unwrap_or(false)
        }
        "log-mode" => {
            let (tx, rx) = mpsc::channel();
            on_thread(ThreadClass::Vcpu, Seccomp::Log, move || {
                // SAFETY: getppid has no preconditions.
                let _ = tx.send(unsafe { libc::getppid() });
            });
            // SAFETY: as above.
            let expected = unsafe { libc::getppid() };
            rx.recv().ok() == Some(expected)
                && violations()
                    == vec![Violation {
                        class: ThreadClass::Vcpu,
                        syscall: Some(libc::SYS_getppid),
                    }]
        }
        "only-chitin-threads" => {
            let (tid_tx, tid_rx) = mpsc::channel();
            let (done_tx, done_rx) = mpsc::channel::<()>();
            let thread = spawn(
                "chitin-test",
                ThreadClass::Feeder,
                Seccomp::Enforce,
                move || {
                    // SAFETY: gettid has no preconditions.
                    let _ = tid_tx.send(unsafe { libc::gettid() });
                    let _ = done_rx.recv();
                },
            )
            .unwrap();
            let tid = tid_rx.recv().unwrap();
            let theirs = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
            let ours = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            drop(done_tx);
            thread.join().unwrap();
            let blocked = u64::from_str_radix(&status_field(&theirs, "SigBlk"), 16).unwrap();
            // SIGTERM blocked there (the embedder's handlers never run on a
            // chitin thread), SIGSYS not (log mode's trap).
            status_field(&theirs, "Seccomp") == "2"
                && status_field(&ours, "Seccomp") == "0"
                && blocked & (1 << (libc::SIGTERM - 1)) != 0
                && blocked & (1 << (libc::SIGSYS - 1)) == 0
        }
        other => panic!("unknown case {other}"),
    }
}

/// A case, what ending it must have, and its test name.
struct Test {
    name: &'static str,
    case: &'static str,
    killed: bool,
    stderr_has: Option<&'static str>,
}

const TESTS: &[Test] = &[
    Test {
        name: "vcpu_thread_execve_kills_the_process_with_sigsys",
        case: "vcpu-execve",
        killed: true,
        stderr_has: None,
    },
    Test {
        name: "vcpu_thread_socket_kills_the_process_with_sigsys",
        case: "vcpu-socket",
        killed: true,
        stderr_has: None,
    },
    Test {
        name: "vcpu_thread_executable_mapping_kills_the_process_with_sigsys",
        case: "vcpu-exec-mapping",
        killed: true,
        stderr_has: None,
    },
    Test {
        name: "vcpu_thread_x32_syscall_kills_the_process_with_sigsys",
        case: "vcpu-x32",
        killed: true,
        stderr_has: None,
    },
    Test {
        name: "writer_thread_clone_into_a_namespace_kills_the_process_with_sigsys",
        case: "writer-clone-namespace",
        killed: true,
        stderr_has: None,
    },
    Test {
        name: "vcpu_thread_open_is_refused_with_eacces_not_killed",
        case: "vcpu-open-refused",
        killed: false,
        stderr_has: None,
    },
    Test {
        name: "writer_thread_fork_kills_the_process_with_sigsys",
        case: "writer-fork",
        killed: true,
        stderr_has: None,
    },
    Test {
        name: "writer_thread_may_start_threads_and_write_files",
        case: "writer-threads-and-files",
        killed: false,
        stderr_has: None,
    },
    Test {
        name: "log_mode_makes_the_syscall_records_it_and_reports_the_thread",
        case: "log-mode",
        killed: false,
        stderr_has: Some(
            "chitin seccomp (log): chitin-test (vcpu) made syscall 110 (getppid), outside its filter",
        ),
    },
    Test {
        name: "confined_thread_shows_seccomp_2_and_blocks_signals_the_spawner_shows_0",
        case: "only-chitin-threads",
        killed: false,
        stderr_has: None,
    },
];

fn check(test: &Test) -> Result<(), String> {
    let out = in_child(test.case);
    let signal = out.status.signal();
    let ended = if test.killed {
        signal == Some(libc::SIGSYS)
    } else {
        out.status.code() == Some(0)
    };
    if !ended {
        return Err(format!("ended with {:?}: {}", out.status, stderr(&out)));
    }
    if let Some(needle) = test.stderr_has {
        if !stderr(&out).contains(needle) {
            return Err(format!("stderr lacks {needle:?}: {}", stderr(&out)));
        }
    }
    Ok(())
}

fn main() {
    if let Ok(case) = std::env::var(CASE) {
        std::process::exit(if run_case(&case) { 0 } else { 1 });
    }
    // `--ignored` alone asks for the ignored tests only: there are none.
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--ignored") {
        println!(
            "test result: ok. 0 passed; 0 failed ({} not ignored)",
            TESTS.len()
        );
        return;
    }
    let mut failed = 0;
    for test in TESTS {
        match check(test) {
            Ok(()) => println!("test {} ... ok", test.name),
            Err(why) => {
                println!("test {} ... FAILED\n{why}", test.name);
                failed += 1;
            }
        }
    }
    println!(
        "\ntest result: {}. {} passed; {failed} failed",
        if failed == 0 { "ok" } else { "FAILED" },
        TESTS.len() - failed
    );
    if failed > 0 {
        std::process::exit(1);
    }
}
