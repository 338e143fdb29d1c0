//! Pausing a VM: every vCPU thread parked outside the guest, and work run
//! on a parked vCPU's own thread (KVM wants a vCPU's ioctls from the thread
//! that runs it).
//!
//! A pause raises a flag and kicks every vCPU out of `KVM_RUN`; each vCPU
//! loop sees the flag before it would enter the guest again and parks in
//! [`Parking::park`] until the pause ends or the VM stops. While parked it
//! runs the jobs handed to it, one at a time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;

/// Work for a parked vCPU, run on its thread with its fd.
pub type VcpuJob = Box<dyn FnOnce(&VcpuFd) + Send>;

/// Why a pause, or work on a parked vCPU, did not happen.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParkError {
    /// The VM stopped first.
    #[error("the VM stopped")]
    Stopped,
    /// Not every vCPU parked in time; the pause was undone.
    #[error("{parked} of {vcpus} vCPUs parked within {waited:?}")]
    Timeout {
        /// vCPUs that had parked.
        parked: usize,
        /// vCPUs the VM has.
        vcpus: usize,
        /// How long the pause waited.
        waited: Duration,
    },
    /// Work was asked of a vCPU that is not parked (no pause, or no such
    /// vCPU), or the pause ended before it ran.
    #[error("vCPU {0} is not parked")]
    NotParked(u8),
    /// A parked vCPU did not finish its work in time.
    #[error("vCPU {0} did not finish its work in time")]
    JobTimeout(u8),
}

#[derive(Default)]
struct ParkState {
    /// A pause is in force.
    requested: bool,
    /// The vCPUs whose threads are parked.
    parked: BTreeSet<u8>,
    /// Work waiting for a parked vCPU, at most one per vCPU (a second
    /// replaces the first, whose caller then sees it dropped).
    jobs: BTreeMap<u8, VcpuJob>,
}

/// The pause state of one VM, inside its `VmControl`.
#[derive(Default)]
pub(crate) struct Parking {
    /// `ParkState::requested`, for the vCPU loops' check before each entry.
    requested: AtomicBool,
    state: Mutex<ParkState>,
    changed: Condvar,
}

impl std::fmt::Debug for Parking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parking")
            .field("requested", &self.requested.load(Ordering::SeqCst))
            .finish_non_exhaustive()
    }
}

impl Parking {
    fn state(&self) -> MutexGuard<'_, ParkState> {
        // A poisoned lock only means a job panicked; the state is valid.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'a>(
        &self,
        state: MutexGuard<'a, ParkState>,
        deadline: Instant,
    ) -> Option<MutexGuard<'a, ParkState>> {
        let left = deadline.checked_duration_since(Instant::now())?;
        Some(
            self.changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0,
        )
    }

    /// Whether vCPU loops must park before entering the guest.
    pub(crate) fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }

    /// Raise the pause flag (the caller then kicks every vCPU).
    pub(crate) fn request(&self) {
        let mut state = self.state();
        state.requested = true;
        self.requested.store(true, Ordering::SeqCst);
    }

    /// Wait until `vcpus` vCPUs are parked, the VM stops (`stopped`) or
    /// `timeout` passes.
    pub(crate) fn wait_parked(
        &self,
        vcpus: usize,
        timeout: Duration,
        stopped: &dyn Fn() -> bool,
    ) -> Result<(), ParkError> {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut state = self.state();
        loop {
            if stopped() {
                return Err(ParkError::Stopped);
            }
            if state.parked.len() >= vcpus {
                return Ok(());
            }
            match self.wait(state, deadline) {
                Some(s) => state = s,
                None => {
                    return Err(ParkError::Timeout {
                        parked: self.state().parked.len(),
                        vcpus,
                        waited: start.elapsed(),
                    })
                }
            }
        }
    }

    /// End the pause: parked vCPUs go back into the guest. Jobs not yet
    /// taken are dropped (their callers see the vCPU as gone).
    pub(crate) fn release(&self) {
        let mut state = self.state();
        state.requested = false;
        state.jobs.clear();
        self.requested.store(false, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// Wake parked vCPUs so they see that the VM stopped.
    pub(crate) fn wake(&self) {
        let _state = self.state();
        self.changed.notify_all();
    }

    /// Whether a pause is in force and every one of `vcpus` vCPUs parked.
    pub(crate) fn all_parked(&self, vcpus: usize) -> bool {
        let state = self.state();
        state.requested && state.parked.len() >= vcpus
    }

    /// Park vCPU `id` (on its own thread, holding its `fd`) until the pause
    /// ends or `stopped()`, running the jobs it is given meanwhile.
    pub(crate) fn park(&self, id: u8, fd: &VcpuFd, stopped: &dyn Fn() -> bool) {
        let mut state = self.state();
        state.parked.insert(id);
        self.changed.notify_all();
        while state.requested && !stopped() {
            if let Some(job) = state.jobs.remove(&id) {
                drop(state);
                // A job that panics loses its answer (its caller sees the
                // job dropped), not the vCPU thread, which stays parked.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(fd)));
                state = self.state();
                continue;
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.parked.remove(&id);
        state.jobs.remove(&id);
        self.changed.notify_all();
    }

    /// Hand `job` to parked vCPU `id`.
    pub(crate) fn submit(&self, id: u8, job: VcpuJob) -> Result<(), ParkError> {
        let mut state = self.state();
        if !state.requested || !state.parked.contains(&id) {
            return Err(ParkError::NotParked(id));
        }
        state.jobs.insert(id, job);
        self.changed.notify_all();
        Ok(())
    }
}
