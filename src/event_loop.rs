//! The device event loop: one thread running event-manager for every
//! device event source: serial input, each virtio device's queue
//! notifications and timers, vsock's host sockets.
//!
//! It must never block on the guest; every subscriber does a bounded amount
//! of work per event. The loop stops when its stop event fires.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use chitin_seccomp::{Seccomp, Starting, ThreadClass};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The subscriber type the loop holds.
pub(crate) type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Sets `stopped` when its eventfd is written.
struct StopSubscriber {
    event: EventFd,
    stopped: Arc<AtomicBool>,
    /// Whether `init` registered the eventfd (without it the loop could
    /// never be stopped).
    registered: Arc<AtomicBool>,
}

impl MutEventSubscriber for StopSubscriber {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.event.read();
        self.stopped.store(true, Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        // A loop that cannot see its stop event could never be joined:
        // `EventLoop::new` fails when this did not register.
        let ok = ops.add(Events::new(&self.event, EventSet::IN)).is_ok();
        self.registered.store(ok, Ordering::SeqCst);
    }
}

/// A device event loop, built before start and run on its own thread.
pub(crate) struct EventLoop {
    manager: EventManager<Subscriber>,
    stop: EventFd,
    stopped: Arc<AtomicBool>,
}

impl EventLoop {
    pub(crate) fn new() -> std::io::Result<Self> {
        let mut manager = EventManager::<Subscriber>::new().map_err(std::io::Error::other)?;
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stopped = Arc::new(AtomicBool::new(false));
        let registered = Arc::new(AtomicBool::new(false));
        // `add_subscriber` runs the subscriber's `init` before it returns.
        manager.add_subscriber(Arc::new(Mutex::new(StopSubscriber {
            event: stop.try_clone()?,
            stopped: Arc::clone(&stopped),
            registered: Arc::clone(&registered),
        })));
        if !registered.load(Ordering::SeqCst) {
            return Err(std::io::Error::other(
                "cannot register the event loop's stop event with epoll",
            ));
        }
        Ok(Self {
            manager,
            stop,
            stopped,
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
        let stop = self.stop.try_clone()?;
        let Self {
            mut manager,
            stopped,
            ..
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
            starting: Some(starting),
            thread: None,
        })
    }
}

/// The running loop; stopping joins its thread.
pub(crate) struct RunningEventLoop {
    stop: EventFd,
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

    pub(crate) fn stop(&mut self) {
        let _ = self.confirm();
        if let Some(thread) = self.thread.take() {
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
