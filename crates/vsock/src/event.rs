//! The event-loop adapter of [`Vsock`]: watch the three queue `EventFd`s,
//! the listener, and every host socket, and keep the socket registrations
//! in step with what the connections need (added on accept or guest
//! connect, `EPOLLIN` dropped while the guest has no credit, `EPOLLOUT`
//! only while bytes wait, removed before a socket is closed).

use std::os::fd::{AsRawFd, RawFd};

use chitin_virtio::VirtioDevice;
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use crate::connection::Interest;
use crate::device::Vsock;
use crate::{EVENT_QUEUE, RX_QUEUE, TX_QUEUE};

fn event_set(interest: Interest) -> EventSet {
    let mut set = EventSet::empty();
    if interest.read {
        set |= EventSet::IN;
    }
    if interest.write {
        set |= EventSet::OUT;
    }
    set
}

fn apply(ops: &mut EventOps, fd: RawFd, old: Option<Interest>, new: Option<Interest>) {
    // Failures mean epoll itself is broken; the connection then stalls,
    // which the guest sees as a peer that does not answer.
    match (old, new) {
        (None, Some(new)) => {
            let _ = ops.add(Events::new_raw(fd, event_set(new)));
        }
        (Some(_), Some(new)) => {
            let _ = ops.modify(Events::new_raw(fd, event_set(new)));
        }
        (Some(_), None) => {
            let _ = ops.remove(Events::empty_raw(fd));
        }
        (None, None) => {}
    }
}

impl MutEventSubscriber for Vsock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let set = events.event_set();
        let queue_fds: Vec<RawFd> = self.queue_events().iter().map(AsRawFd::as_raw_fd).collect();
        let mut run_tx = false;
        if fd == queue_fds[TX_QUEUE] {
            let _ = self.queue_events()[TX_QUEUE].read();
            run_tx = true;
        } else if fd == queue_fds[RX_QUEUE] {
            let _ = self.queue_events()[RX_QUEUE].read();
        } else if fd == queue_fds[EVENT_QUEUE] {
            // New event buffers: a pending event may go now, or the
            // driver refilled after handling it.
            let _ = self.queue_events()[EVENT_QUEUE].read();
            self.post_events();
        } else if fd == self.listener().as_raw_fd() {
            self.accept_all();
        } else if fd == self.timer().as_raw_fd() {
            self.on_timer();
        } else {
            self.handler_mut().stream_event(
                fd,
                set.contains(EventSet::IN),
                set.contains(EventSet::OUT),
                set.intersects(EventSet::HANG_UP | EventSet::READ_HANG_UP),
                set.contains(EventSet::ERROR),
            );
        }
        self.process_queues(run_tx);
        self.handler_mut()
            .sync_interest(|fd, old, new| apply(ops, fd, old, new));
        self.sync_timer();
        // Host connections wait in the backlog while the driver handles a
        // reset: the listener leaves the loop meanwhile (it would be
        // ready, and not accepted, every turn).
        let fd = self.listener().as_raw_fd();
        let (want, registered) = self.listener_interest();
        if want != *registered {
            let changed = if want {
                ops.add(Events::new_raw(fd, EventSet::IN))
            } else {
                ops.remove(Events::empty_raw(fd))
            };
            if changed.is_ok() {
                *registered = want;
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for event in self.queue_events() {
            let _ = ops.add(Events::new(event, EventSet::IN));
        }
        let _ = ops.add(Events::new(self.listener(), EventSet::IN));
        let _ = ops.add(Events::new(self.timer(), EventSet::IN));
    }
}

#[cfg(test)]
mod tests;
