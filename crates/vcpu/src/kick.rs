//! Kicking a vCPU thread out of `KVM_RUN`.
//!
//! A real-time signal interrupts `KVM_RUN` with `EINTR`. The handler also
//! sets the thread's `kvm_run.immediate_exit`, so a signal that lands between
//! the loop's stop check and the ioctl still makes the very next `KVM_RUN`
//! return at once (Documentation/virt/kvm/api.rst, `immediate_exit`). This is
//! the only place that touches signals; the handler does nothing but one
//! volatile store.

use std::cell::Cell;
use std::ptr;
use std::sync::Once;

use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// Offset from SIGRTMIN of the signal used for kicks.
const KICK_SIGNAL_OFFSET: c_int = 0;

thread_local! {
    /// This thread's `kvm_run.immediate_exit`, while it runs a vCPU.
    /// Const-initialised and without a destructor, so the signal handler can
    /// read it without lazy initialisation.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(ptr::null_mut()) };
}

static INSTALL: Once = Once::new();

/// The signal number used to kick vCPU threads.
pub fn kick_signal() -> c_int {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

extern "C" fn handle_kick(_: c_int, _: *mut siginfo_t, _: *mut c_void) {
    let _ = IMMEDIATE_EXIT.try_with(|cell| {
        let flag = cell.get();
        if !flag.is_null() {
            // SAFETY: the pointer was set by this thread to the
            // `immediate_exit` byte of its own live kvm_run mapping and is
            // cleared before that mapping goes away.
            unsafe { ptr::write_volatile(flag, 1) };
        }
    });
}

/// Install the process-wide handler for the kick signal (idempotent).
pub fn install_handler() -> Result<(), vmm_sys_util::errno::Error> {
    let mut result = Ok(());
    INSTALL.call_once(|| result = register_signal_handler(kick_signal(), handle_kick));
    result
}

/// Let the kick signal reach the calling thread (chitin's threads start
/// with every asynchronous signal blocked).
pub(crate) fn unblock_on_current_thread() -> std::io::Result<()> {
    // SAFETY: sigset_t is plain data that sigemptyset initialises.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t; the calls only change it and this
    // thread's mask.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, kick_signal());
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut())
    };
    match rc {
        0 => Ok(()),
        errno => Err(std::io::Error::from_raw_os_error(errno)),
    }
}

/// Point this thread's kick target at `flag` (the `immediate_exit` byte of
/// the vCPU it runs), or clear it with a null pointer.
pub(crate) fn set_immediate_exit_target(flag: *mut u8) {
    IMMEDIATE_EXIT.with(|cell| cell.set(flag));
}

/// Send the kick signal to `thread`.
pub(crate) fn kick(thread: libc::pthread_t) {
    // SAFETY: `thread` is a live thread registered with VmControl (callers
    // hold the registry lock); the signal has a handler installed.
    unsafe { libc::pthread_kill(thread, kick_signal()) };
}
