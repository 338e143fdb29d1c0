//! The part every device repeats between activation and reset: guest
//! memory, its queues, the interrupt, and whether a ring broke, with the
//! one rule for a broken ring (signal DEVICE_NEEDS_RESET once, then touch
//! nothing until the driver resets the device).
//!
//! A device keeps `Option<Active<N>>`: `Some` from
//! [`Active::from_context`] in `activate`, `None` again in `reset`, and
//! runs its queues through [`Active::run`].

use std::sync::Arc;

use chitin_memory::GuestMemoryMmap;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::device::{ActivateContext, ActivateError};
use crate::interrupt::VirtioInterrupt;
use crate::queue::QueueRun;

/// A device's state while the driver runs it, for a device of `N` queues.
pub struct Active<const N: usize> {
    mem: GuestMemoryMmap,
    queues: [Queue; N],
    interrupt: Arc<dyn VirtioInterrupt>,
    /// A ring broke: NEEDS_RESET was signalled, nothing more is processed
    /// until reset.
    failed: bool,
}

impl<const N: usize> Active<N> {
    /// Take what activation hands over; fails unless there are exactly `N`
    /// queues.
    pub fn from_context(ctx: ActivateContext) -> Result<Self, ActivateError> {
        let ActivateContext {
            mem,
            queues,
            interrupt,
            acked_features: _,
        } = ctx;
        let got = queues.len();
        let queues = <[Queue; N]>::try_from(queues)
            .map_err(|_| ActivateError::QueueCount { expected: N, got })?;
        Ok(Self {
            mem,
            queues,
            interrupt,
            failed: false,
        })
    }

    /// Whether a ring broke (the device waits for a reset).
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// (next available, next used) of each queue, for a snapshot.
    pub fn positions(&self) -> Vec<(u16, u16)> {
        use virtio_queue::QueueT;
        self.queues
            .iter()
            .map(|q| (q.next_avail(), q.next_used()))
            .collect()
    }

    /// Run `work` over the queues unless a ring broke before; an error
    /// from it marks the device failed and signals DEVICE_NEEDS_RESET.
    pub fn run<E>(
        &mut self,
        work: impl FnOnce(&mut [Queue; N], &GuestMemoryMmap, &dyn VirtioInterrupt) -> Result<(), E>,
    ) {
        if self.failed {
            return;
        }
        if work(&mut self.queues, &self.mem, self.interrupt.as_ref()).is_err() {
            self.failed = true;
            self.interrupt.signal_needs_reset();
        }
    }
}

/// After a bounded run that left chains: write the queue's notification
/// event so the event loop comes back to it, after other devices had their
/// turn. One write cannot overflow the counter.
pub fn rearm(event: &EventFd, run: QueueRun) {
    if run.pending {
        let _ = event.write(1);
    }
}

/// Look at every queue once right after activation: a notification that
/// came before it was read and dropped.
pub fn kick(events: &[EventFd]) {
    for event in events {
        // One write cannot overflow the counter.
        let _ = event.write(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{guest_memory, RecordingInterrupt, SplitQueueBuilder};
    use vm_memory::GuestAddress;

    fn context(queues: usize) -> (ActivateContext, Arc<RecordingInterrupt>) {
        let mem = guest_memory(0x10_0000);
        let queues = (0..queues)
            .map(|i| {
                SplitQueueBuilder::new(&mem, GuestAddress(0x1_0000 * (i as u64 + 1)), 16)
                    .unwrap()
                    .build()
                    .unwrap()
            })
            .collect();
        let interrupt = Arc::new(RecordingInterrupt::new());
        let ctx = ActivateContext {
            mem,
            queues,
            interrupt: interrupt.clone(),
            acked_features: 0,
        };
        (ctx, interrupt)
    }

    #[test]
    fn the_queue_count_must_match() {
        let (ctx, _) = context(2);
        assert!(matches!(
            Active::<3>::from_context(ctx),
            Err(ActivateError::QueueCount {
                expected: 3,
                got: 2
            })
        ));
    }

    #[test]
    fn a_failed_run_signals_needs_reset_once_and_stops_running() {
        let (ctx, interrupt) = context(2);
        let mut active = Active::<2>::from_context(ctx).unwrap();
        let mut runs = 0;
        active.run(|queues, _, _| {
            runs += 1;
            assert_eq!(queues.len(), 2);
            Ok::<(), ()>(())
        });
        assert!(!active.failed());
        active.run(|_, _, _| {
            runs += 1;
            Err(())
        });
        active.run(|_, _, _| {
            runs += 1;
            Ok::<(), ()>(())
        });
        assert_eq!(runs, 2);
        assert!(active.failed());
        assert_eq!(interrupt.needs_reset_count(), 1);
    }

    #[test]
    fn rearm_writes_only_when_work_is_left() {
        let event = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        rearm(&event, QueueRun::default());
        assert!(event.read().is_err());
        rearm(
            &event,
            QueueRun {
                pending: true,
                ..QueueRun::default()
            },
        );
        assert_eq!(event.read().unwrap(), 1);
    }
}
