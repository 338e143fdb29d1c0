//! Log mode: a syscall outside a thread's filter traps (`SIGSYS`) instead
//! of killing the process. The handler records the (class, syscall) pair,
//! prints it on stderr the first time it is seen, and makes the syscall
//! for the thread through the trampoline its filter lets through, so the
//! program goes on as if unfiltered and one run lists everything a thread
//! needed.
//!
//! The handler runs in signal context: it allocates nothing, takes no
//! lock and makes its own syscalls (the report's `write`, the thread
//! name's `prctl`) through the trampoline too.

use std::cell::Cell;
use std::fmt::Write as _;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use libc::{c_int, c_void, siginfo_t};

use crate::arch;
use crate::ThreadClass;

/// Syscall numbers below this are recorded exactly; others are counted
/// as one "other" entry per class (x86_64 numbers end in the 460s).
const RECORDED: usize = 512;
const WORDS: usize = RECORDED / 64;

/// Bit `nr` of `SEEN[class]`: a thread of that class made syscall `nr`
/// outside its filter.
static SEEN: [[AtomicU64; WORDS]; ThreadClass::ALL.len()] =
    [const { [const { AtomicU64::new(0) }; WORDS] }; ThreadClass::ALL.len()];
/// Syscalls at or above [`RECORDED`], per class.
static OTHER: [AtomicU64; ThreadClass::ALL.len()] =
    [const { AtomicU64::new(0) }; ThreadClass::ALL.len()];

/// No class: the thread was not confined by chitin.
const NO_CLASS: u8 = u8::MAX;

thread_local! {
    /// The class of the calling thread. Const-initialised and without a
    /// destructor, so the signal handler reads it without initialisation.
    static CLASS: Cell<u8> = const { Cell::new(NO_CLASS) };
}

pub(crate) fn set_thread_class(class: ThreadClass) {
    CLASS.with(|c| c.set(class as u8));
}

/// A syscall a thread made outside its filter under [`crate::Seccomp::Log`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Violation {
    /// The thread's class.
    pub class: ThreadClass,
    /// The syscall number; `None` for one above the recorded range.
    pub syscall: Option<i64>,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.syscall {
            Some(nr) => match crate::syscall_name(nr) {
                Some(name) => write!(f, "{} thread: syscall {nr} ({name})", self.class),
                None => write!(f, "{} thread: syscall {nr}", self.class),
            },
            None => write!(
                f,
                "{} thread: a syscall numbered {RECORDED} or more",
                self.class
            ),
        }
    }
}

/// Every (class, syscall) a thread made outside its filter in log mode,
/// since the process started, each once.
pub fn violations() -> Vec<Violation> {
    let mut found = Vec::new();
    for class in ThreadClass::ALL {
        for (word, bits) in SEEN[class.index()].iter().enumerate() {
            let mut bits = bits.load(Ordering::Relaxed);
            while bits != 0 {
                let bit = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                found.push(Violation {
                    class,
                    syscall: Some((word * 64 + bit) as i64),
                });
            }
        }
        if OTHER[class.index()].load(Ordering::Relaxed) != 0 {
            found.push(Violation {
                class,
                syscall: None,
            });
        }
    }
    found
}

/// Record that `class` made `nr`; true the first time.
fn record(class: ThreadClass, nr: i64) -> bool {
    match usize::try_from(nr) {
        Ok(n) if n < RECORDED => {
            let bit = 1u64 << (n % 64);
            SEEN[class.index()][n / 64].fetch_or(bit, Ordering::Relaxed) & bit == 0
        }
        _ => OTHER[class.index()].fetch_add(1, Ordering::Relaxed) == 0,
    }
}

/// Whether the handler is installed: `Err(errno)` for good if it could
/// not be (a filter trapping into no handler would kill the process).
static INSTALLED: OnceLock<Result<(), i32>> = OnceLock::new();

/// Install the process-wide `SIGSYS` handler (idempotent).
pub(crate) fn install_handler() -> io::Result<()> {
    let installed = INSTALLED.get_or_init(|| {
        // SAFETY: a zeroed sigaction is a valid starting point; every
        // field used is set below.
        let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
        let handler: extern "C" fn(c_int, *mut siginfo_t, *mut c_void) = on_sigsys;
        action.sa_sigaction = handler as usize;
        action.sa_flags = libc::SA_SIGINFO;
        // SAFETY: `action` is initialised; the old action is not wanted.
        let rc = unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EINVAL))
        }
    });
    installed.map_err(io::Error::from_raw_os_error)
}

/// The `SIGSYS` part of `siginfo_t` (`_sigsys` in the kernel's union),
/// which the libc crate does not name.
#[repr(C)]
struct SigsysInfo {
    signo: c_int,
    errno: c_int,
    code: c_int,
    _pad: c_int,
    call_addr: *mut c_void,
    syscall: c_int,
    arch: u32,
}

/// `si_code` of a seccomp trap.
const SYS_SECCOMP: c_int = 1;

extern "C" fn on_sigsys(_: c_int, info: *mut siginfo_t, context: *mut c_void) {
    // SAFETY: the kernel passes a valid siginfo for the signal being
    // handled; for SIGSYS it has the `_sigsys` layout above.
    let info = unsafe { &*info.cast::<SigsysInfo>() };
    if info.code != SYS_SECCOMP || context.is_null() {
        return;
    }
    // SAFETY: with SA_SIGINFO the third argument is the interrupted
    // thread's ucontext_t, ours to change until the handler returns.
    let context = unsafe { &mut *context.cast::<libc::ucontext_t>() };
    let nr = i64::from(info.syscall);
    let args = arch::syscall_args(context);
    let class = CLASS.try_with(Cell::get).unwrap_or(NO_CLASS);
    if let Some(class) = ThreadClass::ALL.get(usize::from(class)) {
        if record(*class, nr) {
            report(*class, nr);
        }
    }
    let result = if arch::cannot_be_made_for_caller(nr, &args) {
        -i64::from(libc::ENOSYS)
    } else {
        // SAFETY: the thread asked for exactly this syscall; log mode
        // makes it as if no filter were installed.
        unsafe { arch::raw_syscall(nr, args) }
    };
    arch::set_syscall_result(context, result);
}

/// A line on stderr: `chitin seccomp (log): <thread> (<class>) made
/// syscall <nr> (<name>)`.
fn report(class: ThreadClass, nr: i64) {
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes into the buffer.
    let got = unsafe {
        arch::raw_syscall(
            libc::SYS_prctl,
            [
                libc::PR_GET_NAME as u64,
                name.as_mut_ptr() as u64,
                0,
                0,
                0,
                0,
            ],
        )
    };
    let len = if got == 0 {
        name.iter().position(|&b| b == 0).unwrap_or(name.len())
    } else {
        0
    };
    let thread = std::str::from_utf8(&name[..len]).unwrap_or("?");
    let mut line = LineBuf::default();
    let _ = write!(
        line,
        "chitin seccomp (log): {thread} ({class}) made syscall {nr}"
    );
    if let Some(name) = crate::syscall_name(nr) {
        let _ = write!(line, " ({name})");
    }
    let _ = line.write_str(", outside its filter\n");
    let bytes = line.as_bytes();
    // SAFETY: writes `bytes` to stderr; the buffer outlives the call.
    unsafe {
        arch::raw_syscall(
            libc::SYS_write,
            [2, bytes.as_ptr() as u64, bytes.len() as u64, 0, 0, 0],
        );
    }
}

/// A fixed buffer for one report line (no allocation in a signal
/// handler); what does not fit is cut.
struct LineBuf {
    buf: [u8; 160],
    len: usize,
}

impl Default for LineBuf {
    fn default() -> Self {
        Self {
            buf: [0; 160],
            len: 0,
        }
    }
}

impl LineBuf {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::fmt::Write for LineBuf {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let room = self.buf.len() - self.len;
        let n = s.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}
