//! Queue plumbing every device's handler shares: popping chains without
//! mistaking a broken available ring for an empty one, noticing chains left
//! after a bounded run, and raising the used-buffer interrupt only when the
//! driver wants it (EVENT_IDX, virtio 1.2 §2.7.10).
//!
//! This module never interprets a chain; that is the device's parser.

use std::sync::atomic::Ordering;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemory;

use crate::interrupt::{InterruptKind, VirtioInterrupt};

/// Why a queue became unusable; the device must signal DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The available ring could not be read or is inconsistent (an index
    /// more than a queue ahead).
    #[error("cannot read the available ring")]
    AvailRing(#[source] virtio_queue::Error),
    /// A used element could not be written (bad head index, used ring
    /// outside guest memory).
    #[error("cannot write the used ring")]
    UsedRing(#[source] virtio_queue::Error),
    /// Notification suppression fields could not be accessed.
    #[error("cannot access the notification suppression fields")]
    Notification(#[source] virtio_queue::Error),
    /// The interrupt could not be raised.
    #[error("cannot raise the queue interrupt")]
    Interrupt(#[source] std::io::Error),
}

/// What one run over a queue did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueRun {
    /// Chains returned to the used ring.
    pub completed: usize,
    /// The run stopped at its bound with chains still available: call
    /// again (notifications stay disabled meanwhile).
    pub pending: bool,
    /// The driver was interrupted.
    pub notified: bool,
}

/// The next available chain. Unlike `Queue::pop_descriptor_chain`, a
/// broken available ring is an error rather than "nothing available":
/// otherwise a handler's notification loop, which sees buffers pending,
/// spins forever (found by the vsock_packet fuzz target).
pub fn next_chain<'a, M: GuestMemory>(
    queue: &mut Queue,
    mem: &'a M,
) -> Result<Option<DescriptorChain<&'a M>>, QueueError> {
    Ok(queue.iter(mem).map_err(QueueError::AvailRing)?.next())
}

/// Whether the driver made chains available that were not popped yet.
pub fn has_available<M: GuestMemory>(queue: &Queue, mem: &M) -> Result<bool, QueueError> {
    let available = queue
        .avail_idx(mem, Ordering::Acquire)
        .map_err(QueueError::AvailRing)?;
    Ok(available.0 != queue.next_avail())
}

/// After a run that completed chains, interrupt the driver if it asked to
/// hear about them.
pub fn notify<M: GuestMemory, I: VirtioInterrupt + ?Sized>(
    queue: &mut Queue,
    mem: &M,
    interrupt: &I,
    run: &mut QueueRun,
) -> Result<(), QueueError> {
    if run.completed > 0
        && queue
            .needs_notification(mem)
            .map_err(QueueError::Notification)?
    {
        interrupt
            .trigger(InterruptKind::Queue)
            .map_err(QueueError::Interrupt)?;
        run.notified = true;
    }
    Ok(())
}

/// Drain a queue: hand each available chain to `handle`, which returns the
/// chain's used length, put it in the used ring, and interrupt the driver
/// once at the end if it wants that.
///
/// Driver notifications are off while the ring is drained and re-enabled
/// before returning, with a last look for chains that arrived in between,
/// so none is lost. Once `more` says no (it sees the run so far before
/// each chain after the first) the run stops with [`QueueRun::pending`]
/// set if more are waiting (notifications then stay off): the caller
/// schedules another run, so one busy queue cannot hold the event loop.
pub fn drain<'a, M, I, F, G>(
    queue: &mut Queue,
    mem: &'a M,
    interrupt: &I,
    mut more: G,
    mut handle: F,
) -> Result<QueueRun, QueueError>
where
    M: GuestMemory,
    I: VirtioInterrupt + ?Sized,
    F: FnMut(DescriptorChain<&'a M>) -> u32,
    G: FnMut(&QueueRun) -> bool,
{
    let mut run = QueueRun::default();
    // A queue the driver never made ready has no rings: its addresses are
    // the reset defaults (guest physical 0), and even disabling
    // notifications would write guest memory the driver never gave us.
    if !queue.ready() {
        return Ok(run);
    }
    let mut stopped = false;
    'drain: loop {
        queue
            .disable_notification(mem)
            .map_err(QueueError::Notification)?;
        loop {
            if run.completed > 0 && !more(&run) {
                // The run is over: nothing more is taken, even a chain
                // published after this look.
                if has_available(queue, mem)? {
                    run.pending = true;
                    break 'drain;
                }
                stopped = true;
                break;
            }
            let Some(chain) = next_chain(queue, mem)? else {
                break;
            };
            let head = chain.head_index();
            let used_len = handle(chain);
            queue
                .add_used(mem, head, used_len)
                .map_err(QueueError::UsedRing)?;
            run.completed += 1;
        }
        if !queue
            .enable_notification(mem)
            .map_err(QueueError::Notification)?
        {
            break;
        }
        if stopped {
            // Chains came as the run ended: the caller runs again.
            run.pending = true;
            break;
        }
    }
    notify(queue, mem, interrupt, &mut run)?;
    Ok(run)
}

#[cfg(test)]
mod tests {
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::test_utils::{guest_memory, RecordingInterrupt};

    #[test]
    fn drain_queue_not_ready_touches_no_guest_memory() {
        // Guest memory full of a pattern; the queue keeps its reset state
        // (not ready, every ring at guest physical 0).
        let mem = guest_memory(0x1_0000);
        mem.write_slice(&[0xaa; 0x1000], GuestAddress(0)).unwrap();
        let mut queue = Queue::new(16).unwrap();
        let interrupt = RecordingInterrupt::new();
        let mut calls = 0;

        let run = drain(
            &mut queue,
            &mem,
            &interrupt,
            |run| run.completed < 8,
            |_| {
                calls += 1;
                0
            },
        )
        .unwrap();

        assert_eq!(run, QueueRun::default());
        assert_eq!(calls, 0);
        let mut after = [0u8; 0x1000];
        mem.read_slice(&mut after, GuestAddress(0)).unwrap();
        assert!(after.iter().all(|&b| b == 0xaa));
    }
}
