//! Why a VM stopped, and the shared state that records it.
//!
//! The first terminal event wins: a vCPU exit, a device (the i8042 reset
//! line) or the host's `stop()`. Recording it also kicks every vCPU out of
//! the guest, so one reason always stops the whole VM and nothing is left
//! running.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;

use crate::kick;
use crate::park::{ParkError, Parking};

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitReason {
    /// The guest reset the machine: an i8042 reset pulse (Linux `reboot=k`)
    /// or a KVM reset system event.
    Reset,
    /// The guest powered the machine off (KVM shutdown system event).
    PowerOff,
    /// A vCPU triple-faulted (`KVM_EXIT_SHUTDOWN`).
    TripleFault,
    /// The guest reported a crash (KVM crash system event).
    Crash,
    /// The host stopped the VM with `stop()`.
    Stopped,
    /// KVM could not emulate a guest instruction (`KVM_EXIT_INTERNAL_ERROR`).
    InternalError {
        /// The vCPU that failed.
        vcpu: u8,
        /// `kvm_run.internal.suberror` (1 = emulation failure).
        suberror: u32,
    },
    /// The hardware refused to enter the guest (`KVM_EXIT_FAIL_ENTRY`).
    FailEntry {
        /// The vCPU that failed.
        vcpu: u8,
        /// The hardware's entry failure reason.
        reason: u64,
    },
    /// A vCPU exited for a reason chitin does not handle.
    UnhandledExit {
        /// The vCPU that exited.
        vcpu: u8,
        /// The exit, as KVM named it.
        exit: String,
    },
    /// `KVM_RUN` itself failed.
    VcpuError {
        /// The vCPU whose run failed.
        vcpu: u8,
        /// The OS error number.
        errno: i32,
    },
    /// The process that ran the VM (a VMM in a process of its own,
    /// driven from another) ended without saying why: it was killed or
    /// failed.
    VmmGone,
}

impl ExitReason {
    /// Whether the guest ended itself in an orderly way (reset or power-off)
    /// or the host stopped it.
    pub fn is_clean(&self) -> bool {
        matches!(self, Self::Reset | Self::PowerOff | Self::Stopped)
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Reset => write!(f, "guest reset"),
            Self::PowerOff => write!(f, "guest powered off"),
            Self::TripleFault => write!(f, "guest triple fault"),
            Self::Crash => write!(f, "guest crashed"),
            Self::Stopped => write!(f, "stopped by the host"),
            Self::InternalError { vcpu, suberror } => {
                write!(f, "KVM internal error {suberror} on vCPU {vcpu}")
            }
            Self::FailEntry { vcpu, reason } => {
                write!(f, "KVM entry failure {reason:#x} on vCPU {vcpu}")
            }
            Self::UnhandledExit { vcpu, exit } => write!(f, "unhandled exit {exit} on vCPU {vcpu}"),
            Self::VcpuError { vcpu, errno } => write!(
                f,
                "KVM_RUN failed on vCPU {vcpu}: {}",
                std::io::Error::from_raw_os_error(*errno)
            ),
            Self::VmmGone => write!(f, "the VMM process ended without saying why"),
        }
    }
}

/// Work to do once when the VM stops.
type ExitHook = Box<dyn FnOnce() + Send>;

/// The hooks waiting for the VM to stop.
#[derive(Default)]
struct ExitHooks(Mutex<Vec<ExitHook>>);

impl fmt::Debug for ExitHooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.0.lock().map_or(0, |h| h.len());
        write!(f, "ExitHooks({n})")
    }
}

/// Shared between the vCPU threads, the devices and the host handle: the stop
/// flag, the first exit reason and the threads to kick.
#[derive(Debug, Default)]
pub struct VmControl {
    stop: AtomicBool,
    reason: Mutex<Option<ExitReason>>,
    exited: Condvar,
    threads: Mutex<Vec<libc::pthread_t>>,
    hooks: ExitHooks,
    parking: Parking,
}

impl VmControl {
    /// A control block for a VM that has not stopped.
    pub fn new() -> Self {
        Self::default()
    }

    fn reason(&self) -> MutexGuard<'_, Option<ExitReason>> {
        // A poisoned lock only means a thread panicked while holding it; the
        // Option inside is still valid.
        self.reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record `reason` unless another was recorded first, then kick every
    /// vCPU out of the guest. Returns whether this call's reason won.
    pub fn request_exit(&self, reason: ExitReason) -> bool {
        let won = {
            let mut slot = self.reason();
            if slot.is_none() {
                *slot = Some(reason);
                true
            } else {
                false
            }
        };
        self.stop.store(true, Ordering::SeqCst);
        self.exited.notify_all();
        self.kick_all();
        self.parking.wake();
        if won {
            let hooks = std::mem::take(&mut *self.hooks());
            hooks.into_iter().for_each(|hook| hook());
        }
        won
    }

    fn hooks(&self) -> MutexGuard<'_, Vec<ExitHook>> {
        // A poisoned lock only means a hook panicked; the list is valid.
        self.hooks.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `hook` once when the VM stops (on the thread that stops it), or
    /// now if it has stopped. Hooks must be quick and must not block: they
    /// run on vCPU and device threads.
    pub fn on_exit(&self, hook: impl FnOnce() + Send + 'static) {
        let mut hooks = self.hooks();
        // Checked under the hooks lock: an exit recorded from here on takes
        // the lock after recording its reason, so it finds this hook.
        if self.exit_reason().is_some() {
            drop(hooks);
            hook();
        } else {
            hooks.push(Box::new(hook));
        }
    }

    /// Whether the VM must stop: vCPU loops check this before every entry.
    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The exit reason, if the VM has stopped.
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.reason().clone()
    }

    /// Block until the VM stops.
    pub fn wait(&self) -> ExitReason {
        let mut slot = self.reason();
        loop {
            if let Some(reason) = slot.as_ref() {
                return reason.clone();
            }
            slot = self.exited.wait(slot).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Block until the VM stops or `timeout` passes.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        let deadline = Instant::now() + timeout;
        let mut slot = self.reason();
        loop {
            if let Some(reason) = slot.as_ref() {
                return Some(reason.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            slot = self
                .exited
                .wait_timeout(slot, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Pause: kick every vCPU out of the guest and wait (up to `timeout`)
    /// until all `vcpus` of them are parked outside it. On an error nothing
    /// stays paused.
    pub fn pause(&self, vcpus: usize, timeout: Duration) -> Result<(), ParkError> {
        if self.should_stop() {
            return Err(ParkError::Stopped);
        }
        self.parking.request();
        self.kick_all();
        let parked = self
            .parking
            .wait_parked(vcpus, timeout, &|| self.should_stop());
        if parked.is_err() {
            self.parking.release();
        }
        parked
    }

    /// End a pause: the parked vCPUs enter the guest again. Nothing
    /// happens without one.
    pub fn resume(&self) {
        self.parking.release();
    }

    /// Whether a pause is in force with all `vcpus` vCPUs parked.
    pub fn is_paused(&self, vcpus: usize) -> bool {
        self.parking.all_parked(vcpus)
    }

    /// Run `work` on the thread of parked vCPU `id` with its fd, and
    /// return what it returns; waits up to `timeout` for it.
    pub fn on_parked_vcpu<T, F>(&self, id: u8, timeout: Duration, work: F) -> Result<T, ParkError>
    where
        T: Send + 'static,
        F: FnOnce(&VcpuFd) -> T + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        self.parking.submit(
            id,
            Box::new(move |fd| {
                let _ = tx.send(work(fd));
            }),
        )?;
        match rx.recv_timeout(timeout) {
            Ok(value) => Ok(value),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(ParkError::JobTimeout(id)),
            // The job was dropped untaken: the pause ended or the VM stopped.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) if self.should_stop() => {
                Err(ParkError::Stopped)
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Err(ParkError::NotParked(id)),
        }
    }

    /// Whether the vCPU loops must park before entering the guest.
    pub(crate) fn pause_requested(&self) -> bool {
        self.parking.requested()
    }

    /// Park vCPU `id` (called on its thread) until the pause ends or the
    /// VM stops, running the work [`VmControl::on_parked_vcpu`] hands it.
    pub(crate) fn park(&self, id: u8, fd: &VcpuFd) {
        self.parking.park(id, fd, &|| self.should_stop());
    }

    /// Register the calling thread as a vCPU thread to kick on exit.
    pub(crate) fn register_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        self.threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(me);
    }

    /// Unregister the calling thread; it must not be kicked after this.
    pub(crate) fn unregister_current_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        threads.retain(|&t| t != me);
    }

    fn kick_all(&self) {
        // Holding the lock keeps every listed thread alive: a thread
        // unregisters (under this lock) before it can exit.
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        for &thread in threads.iter() {
            kick::kick(thread);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn request_exit_first_reason_wins() {
        let control = VmControl::new();
        assert!(control.request_exit(ExitReason::Reset));
        assert!(!control.request_exit(ExitReason::Stopped));
        assert_eq!(control.exit_reason(), Some(ExitReason::Reset));
        assert!(control.should_stop());
    }

    #[test]
    fn wait_timeout_without_exit_returns_none() {
        let control = VmControl::new();
        assert_eq!(control.wait_timeout(Duration::from_millis(10)), None);
    }

    #[test]
    fn wait_returns_reason_set_by_other_thread() {
        let control = Arc::new(VmControl::new());
        let other = Arc::clone(&control);
        let t = std::thread::spawn(move || other.request_exit(ExitReason::TripleFault));
        assert_eq!(control.wait(), ExitReason::TripleFault);
        t.join().unwrap();
    }

    #[test]
    fn on_exit_hooks_run_once_at_the_first_exit_and_at_once_after_it() {
        use std::sync::atomic::AtomicUsize;
        let control = VmControl::new();
        let runs = Arc::new(AtomicUsize::new(0));
        let counter = |runs: &Arc<AtomicUsize>| {
            let runs = Arc::clone(runs);
            move || {
                runs.fetch_add(1, Ordering::SeqCst);
            }
        };
        control.on_exit(counter(&runs));
        control.on_exit(counter(&runs));
        assert_eq!(runs.load(Ordering::SeqCst), 0);
        control.request_exit(ExitReason::Reset);
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        control.request_exit(ExitReason::Stopped);
        assert_eq!(
            runs.load(Ordering::SeqCst),
            2,
            "a later exit runs none again"
        );
        control.on_exit(counter(&runs));
        assert_eq!(
            runs.load(Ordering::SeqCst),
            3,
            "registered after the exit: runs now"
        );
    }

    #[test]
    fn exit_reason_clean_only_for_orderly_stops() {
        assert!(ExitReason::PowerOff.is_clean());
        assert!(!ExitReason::TripleFault.is_clean());
        assert!(!ExitReason::VcpuError { vcpu: 0, errno: 22 }.is_clean());
        assert!(!ExitReason::VmmGone.is_clean());
    }
}
