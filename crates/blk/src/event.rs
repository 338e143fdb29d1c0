//! The event-loop adapter of [`Block`]: watch the queue notification
//! `EventFd` (and the limiter's timer, for a limited disk) and run the
//! queue when either fires.
//!
//! It only drains the eventfd and calls into the device; it must never
//! block (the eventfd is non-blocking) and holds no state of its own.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use crate::device::Block;

impl MutEventSubscriber for Block {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.queue_event().as_raw_fd() {
            // Drain the counter before processing: a notification that
            // arrives meanwhile makes the fd readable again, so none is
            // lost. EAGAIN (nothing to drain) is harmless.
            let _ = self.queue_event().read();
            self.process_queue();
        } else if self
            .limiter_timer()
            .is_some_and(|t| t.as_raw_fd() == events.fd())
        {
            // The throttle is over: run what it held back.
            if let Some(limiter) = self.limiter_mut() {
                limiter.on_timer();
            }
            self.process_queue();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // Adding a fresh fd only fails when epoll itself is broken; the
        // device then never runs its queue, which the guest sees as a
        // disk that does not answer. There is nothing better to do here.
        let _ = ops.add(Events::new(self.queue_event(), EventSet::IN));
        if let Some(timer) = self.limiter_timer() {
            let _ = ops.add(Events::new(timer, EventSet::IN));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use chitin_virtio::{ActivateContext, VirtioDevice};
    use event_manager::{EventManager, SubscriberOps};
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};

    use super::*;
    use crate::device::DiskConfig;
    use crate::test_utils::{Desc, GuestQueue, RecordingInterrupt, TempImage};
    use crate::QUEUE_SIZE;

    /// Generous bound for an event loop iteration that must see an event.
    const RUN_TIMEOUT_MS: i32 = 1000;
    /// Bound for an iteration that must see nothing.
    const IDLE_TIMEOUT_MS: i32 = 50;
    /// An 8-sector disk with a recognisable pattern.
    const DISK_SIZE: u64 = 8 * 512;

    /// Queue a one-sector read of `sector`; returns (data, status) addresses.
    fn queue_read(
        guest: &mut GuestQueue,
        sector: u64,
    ) -> (vm_memory::GuestAddress, vm_memory::GuestAddress) {
        let header = guest.header(VIRTIO_BLK_T_IN, sector);
        let data = guest.alloc(512);
        let status = guest.status_byte();
        guest.add_chain(&[
            Desc::readable(header, 16),
            Desc::writable(data, 512),
            Desc::writable(status, 1),
        ]);
        (data, status)
    }

    fn activate(block: &Mutex<Block>, guest: &GuestQueue, interrupt: &Arc<RecordingInterrupt>) {
        block
            .lock()
            .unwrap()
            .activate(ActivateContext {
                mem: guest.memory().clone(),
                queues: vec![guest.queue()],
                interrupt: interrupt.clone(),
                acked_features: 0,
            })
            .unwrap();
    }

    fn notify(block: &Mutex<Block>) {
        block.lock().unwrap().queue_events()[0].write(1).unwrap();
    }

    #[test]
    fn event_activate_reset_reactivate_processes_only_when_active() {
        // Arrange: a device in an event loop, activated over guest memory
        // holding one read request.
        let image = TempImage::with_pattern(DISK_SIZE);
        let expected = TempImage::pattern(DISK_SIZE);
        let block = Arc::new(Mutex::new(
            Block::new(DiskConfig {
                path: image.path().to_path_buf(),
                read_only: false,
                id: None,
                rate_limit: Default::default(),
            })
            .unwrap(),
        ));
        let mut manager = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
        manager.add_subscriber(block.clone());
        let interrupt = Arc::new(RecordingInterrupt::default());
        let mut guest = GuestQueue::new(QUEUE_SIZE);
        let (data, status) = queue_read(&mut guest, 1);
        activate(&block, &guest, &interrupt);

        // Act 1: the driver notifies.
        notify(&block);
        assert!(manager.run_with_timeout(RUN_TIMEOUT_MS).unwrap() > 0);

        // Assert 1: the read completed and the driver was interrupted.
        assert_eq!(guest.used_idx(), 1);
        assert_eq!(guest.read(status, 1), [VIRTIO_BLK_S_OK as u8]);
        assert_eq!(guest.read(data, 512), &expected[512..1024]);
        assert_eq!(interrupt.count(chitin_virtio::InterruptKind::Queue), 1);

        // Act 2: reset; the driver sets the rings up afresh, queues a read
        // and notifies before activating.
        block.lock().unwrap().reset();
        guest.restart();
        let (data, status) = queue_read(&mut guest, 2);
        notify(&block);
        manager.run_with_timeout(RUN_TIMEOUT_MS).unwrap();

        // Assert 2: nothing was processed while reset.
        assert_eq!(guest.used_idx(), 0);
        assert_eq!(guest.read(status, 1), [GuestQueue::STATUS_UNSET]);

        // Act 3: activate again.
        activate(&block, &guest, &interrupt);
        manager.run_with_timeout(RUN_TIMEOUT_MS).unwrap();

        // Assert 3: activation alone looks at the ring: the pending read
        // completed without a new notification.
        assert_eq!(guest.used_idx(), 1);
        assert_eq!(guest.read(status, 1), [VIRTIO_BLK_S_OK as u8]);
        assert_eq!(guest.read(data, 512), &expected[1024..1536]);
        assert_eq!(interrupt.count(chitin_virtio::InterruptKind::Queue), 2);
    }

    #[test]
    fn event_notification_before_activation_is_dropped_quietly() {
        let image = TempImage::with_pattern(DISK_SIZE);
        let block = Arc::new(Mutex::new(
            Block::new(DiskConfig {
                path: image.path().to_path_buf(),
                read_only: true,
                id: None,
                rate_limit: Default::default(),
            })
            .unwrap(),
        ));
        let mut manager = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
        manager.add_subscriber(block.clone());

        notify(&block);
        let first = manager.run_with_timeout(RUN_TIMEOUT_MS).unwrap();
        let second = manager.run_with_timeout(IDLE_TIMEOUT_MS).unwrap();

        // The event was seen once and drained, so the loop is idle after.
        assert_eq!(first, 1);
        assert_eq!(second, 0);
    }
}
