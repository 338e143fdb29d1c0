//! The device event loop: one thread running event-manager for every
//! device event source: serial input, each virtio device's queue
//! notifications and timers, vsock's host sockets.
//!
//! It must never block on the guest; every subscriber does a bounded amount
//! of work per event. The loop stops when its stop event fires, and parks
//! (serving nothing until resumed or stopped) when its pause event fires:
//! every device handler runs on this thread and finishes what it took
//! before it returns, so a parked loop leaves the devices quiet.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chitin_seccomp::{Seccomp, Starting, ThreadClass};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The subscriber type the loop holds.
pub(crate) type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The loop's pause, shared by its thread and its owner.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    /// A pause is in force.
    requested: bool,
    /// The loop's thread is parked.
    parked: bool,
    /// The loop is being stopped: a parked thread leaves.
    stopped: bool,
}

impl Gate {
    fn state(&self) -> MutexGuard<'_, GateState> {
        // A poisoned lock only means a holder panicked; the flags are valid.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// On the loop's thread: park while a pause is in force.
    fn park_here(&self) {
        let mut state = self.state();
        if !state.requested || state.stopped {
            return;
        }
        state.parked = true;
        self.changed.notify_all();
        while state.requested && !state.stopped {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.parked = false;
        self.changed.notify_all();
    }

    fn set(&self, change: impl FnOnce(&mut GateState)) {
        change(&mut self.state());
        self.changed.notify_all();
    }
}

/// Sets `stopped` when its stop eventfd is written; parks the loop when
/// its pause eventfd is.
struct ControlSubscriber {
    stop: Arc<EventFd>,
    pause: Arc<EventFd>,
    stopped: Arc<AtomicBool>,
    gate: Arc<Gate>,
    /// Whether `init` registered both eventfds (without them the loop
    /// could never be stopped or paused).
    registered: Arc<AtomicBool>,
}

impl MutEventSubscriber for ControlSubscriber {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.pause.as_raw_fd() {
            let _ = self.pause.read();
            self.gate.park_here();
            return;
        }
        let _ = self.stop.read();
        self.stopped.store(true, Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        // A loop that cannot see its stop event could never be joined:
        // `EventLoop::new` fails when this did not register.
        let ok = ops.add(Events::new(&self.stop, EventSet::IN)).is_ok()
            && ops.add(Events::new(&self.pause, EventSet::IN)).is_ok();
        self.registered.store(ok, Ordering::SeqCst);
    }
}

/// A device event loop, built before start and run on its own thread.
pub(crate) struct EventLoop {
    manager: EventManager<Subscriber>,
    stop: Arc<EventFd>,
    pause: Arc<EventFd>,
    stopped: Arc<AtomicBool>,
    gate: Arc<Gate>,
}

impl EventLoop {
    pub(crate) fn new() -> std::io::Result<Self> {
        let mut manager = EventManager::<Subscriber>::new().map_err(std::io::Error::other)?;
        // Shared with the loop's control subscriber rather than
        // duplicated: two fds per sandbox fewer.
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let pause = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let stopped = Arc::new(AtomicBool::new(false));
        let gate = Arc::new(Gate::default());
        let registered = Arc::new(AtomicBool::new(false));
        // `add_subscriber` runs the subscriber's `init` before it returns.
        manager.add_subscriber(Arc::new(Mutex::new(ControlSubscriber {
            stop: Arc::clone(&stop),
            pause: Arc::clone(&pause),
            stopped: Arc::clone(&stopped),
            gate: Arc::clone(&gate),
            registered: Arc::clone(&registered),
        })));
        if !registered.load(Ordering::SeqCst) {
            return Err(std::io::Error::other(
                "cannot register the event loop's stop and pause events with epoll",
            ));
        }
        Ok(Self {
            manager,
            stop,
            pause,
            stopped,
            gate,
        })
    }

    pub(crate) fn add(&mut self, subscriber: Subscriber) {
        self.manager.add_subscriber(subscriber);
    }

    /// Run the loop on a thread named `chitin-events`, which confines
    /// itself to the event-loop seccomp filter under `seccomp` and serves
    /// nothing before; this does not wait for that
    /// ([`RunningEventLoop::confirm`]).
    pub(crate) fn start(self, seccomp: Seccomp) -> std::io::Result<RunningEventLoop> {
        let Self {
            mut manager,
            stop,
            stopped,
            pause,
            gate,
        } = self;
        let starting = chitin_seccomp::start(
            "chitin-events",
            ThreadClass::EventLoop,
            seccomp,
            move || {
                while !stopped.load(Ordering::SeqCst) {
                    if manager.run().is_err() {
                        // epoll_wait only fails for a broken epoll fd
                        // (EINTR is retried inside); nothing more can be
                        // served, so leave rather than spin.
                        break;
                    }
                }
            },
        )?;
        Ok(RunningEventLoop {
            stop,
            pause,
            gate,
            starting: Some(starting),
            thread: None,
        })
    }
}

/// The running loop; stopping joins its thread.
pub(crate) struct RunningEventLoop {
    stop: Arc<EventFd>,
    pause: Arc<EventFd>,
    gate: Arc<Gate>,
    /// The thread until it said it is confined.
    starting: Option<Starting>,
    thread: Option<JoinHandle<()>>,
}

impl RunningEventLoop {
    /// Wait until the loop's thread is confined; an error if it could not
    /// be (it then serves nothing and has ended).
    pub(crate) fn confirm(&mut self) -> std::io::Result<()> {
        match self.starting.take() {
            Some(starting) => {
                self.thread = Some(starting.confirm()?);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Park the loop's thread once it is done with what it is handling;
    /// waits up to `timeout` for that. On an error the loop runs on.
    pub(crate) fn pause(&mut self, timeout: Duration) -> std::io::Result<()> {
        self.confirm()?;
        if self.thread.is_none() {
            return Err(std::io::Error::other("the event loop has stopped"));
        }
        self.gate.set(|s| s.requested = true);
        self.pause.write(1)?;
        let deadline = Instant::now() + timeout;
        let mut state = self.gate.state();
        while !state.parked {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                state.requested = false;
                self.gate.changed.notify_all();
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the event loop did not park within {timeout:?}"),
                ));
            };
            state = self
                .gate
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(())
    }

    /// Let a parked loop serve again.
    pub(crate) fn resume(&mut self) {
        self.gate.set(|s| s.requested = false);
    }

    pub(crate) fn stop(&mut self) {
        let _ = self.confirm();
        if let Some(thread) = self.thread.take() {
            self.gate.set(|s| s.stopped = true);
            let _ = self.stop.write(1);
            let _ = thread.join();
        }
    }
}

impl Drop for RunningEventLoop {
    fn drop(&mut self) {
        self.stop();
    }
}
