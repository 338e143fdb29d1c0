//! The event-loop adapter of [`Net`]: the two queue notification
//! `EventFd`s, the tap, and the limiters' timers.
//!
//! The tap is watched level-triggered, and only while [`Net`] wants its
//! frames; every event ends by bringing the interest list in line with
//! that, so a device that stopped wanting frames (reset from a vCPU
//! thread, out of guest buffers, throttled, tap broken) is woken at most
//! once more by the tap. Nothing here blocks: every fd is non-blocking.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use crate::device::{Net, RX, TX};

impl Net {
    /// Watch the tap exactly when the device wants its frames.
    fn sync_tap_interest(&mut self, ops: &mut EventOps) {
        let want = self.wants_tap();
        if want == self.tap_watched {
            return;
        }
        let events = Events::new(self.tap(), EventSet::IN);
        let done = if want {
            ops.add(events)
        } else {
            ops.remove(events)
        };
        match done {
            Ok(()) => self.tap_watched = want,
            Err(e) => {
                // The interest list is out of step with the device: give
                // the tap up rather than risk a wake-up loop.
                log::error!(
                    "net {}: cannot change the tap's epoll interest: {e}",
                    self.tap().name()
                );
                self.tap_failed();
                if !want {
                    self.tap_watched = false;
                }
            }
        }
    }
}

impl MutEventSubscriber for Net {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.queue_event(RX).as_raw_fd() {
            // Drain before processing: a notification that arrives meanwhile
            // makes the fd readable again. EAGAIN is harmless.
            let _ = self.queue_event(RX).read();
            // The guest posted buffers: the device may read again.
            self.rx_starved = false;
            self.process_rx();
        } else if fd == self.queue_event(TX).as_raw_fd() {
            let _ = self.queue_event(TX).read();
            self.process_tx();
        } else if fd == self.tap().as_raw_fd() {
            if events
                .event_set()
                .intersects(EventSet::ERROR | EventSet::HANG_UP)
            {
                self.tap_failed();
            } else {
                self.process_rx();
            }
        } else if self.limiters()[RX].is_some_and(|l| l.timer().as_raw_fd() == fd) {
            if let Some(limiter) = self.rx_limiter_mut() {
                limiter.on_timer();
            }
            self.process_rx();
        } else if self.limiters()[TX].is_some_and(|l| l.timer().as_raw_fd() == fd) {
            if let Some(limiter) = self.tx_limiter_mut() {
                limiter.on_timer();
            }
            self.process_tx();
        }
        self.sync_tap_interest(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Adding fresh fds fails only when epoll itself is broken; the
        // device then never runs, which the guest sees as a link that
        // carries nothing. The tap is added once the device wants it.
        for queue in [RX, TX] {
            let _ = ops.add(Events::new(self.queue_event(queue), EventSet::IN));
        }
        for limiter in self.limiters().into_iter().flatten() {
            let _ = ops.add(Events::new(limiter.timer(), EventSet::IN));
        }
    }
}
