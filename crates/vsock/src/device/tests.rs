use std::sync::Arc;
use std::time::Duration;

use chitin_virtio::test_utils::{RecordingInterrupt, TestDescriptor};
use chitin_virtio::InterruptKind;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;

use super::*;
use crate::test_utils::TempDir;
use crate::{EVENT_QUEUE, QUEUE_SIZE};

const WRITE: u16 = VRING_DESC_F_WRITE as u16;

fn config(dir: &TempDir, guest_cid: u64) -> VsockConfig {
    VsockConfig {
        guest_cid,
        uds_path: dir.path().join("v.sock"),
    }
}

#[test]
fn vsock_new_reserved_cid_refused() {
    let dir = TempDir::new();
    assert!(matches!(
        Vsock::new(config(&dir, 2)),
        Err(VsockError::InvalidCid(2))
    ));
    assert!(matches!(
        Vsock::new(config(&dir, 1 << 32)),
        Err(VsockError::InvalidCid(_))
    ));
}

#[test]
fn vsock_new_existing_path_refused_and_drop_removes_socket() {
    let dir = TempDir::new();
    let vsock = Vsock::new(config(&dir, 3)).unwrap();
    assert!(matches!(
        Vsock::new(config(&dir, 4)),
        Err(VsockError::Bind { .. })
    ));
    let path = vsock.uds_path().to_path_buf();
    assert!(path.exists());
    drop(vsock);
    assert!(!path.exists());
}

#[test]
fn vsock_config_space_is_guest_cid_le() {
    let dir = TempDir::new();
    let vsock = Vsock::new(config(&dir, 0x1234_5678)).unwrap();
    assert_eq!(vsock.device_type(), DEVICE_TYPE_VSOCK);
    assert_eq!(vsock.queue_max_sizes(), [256, 256, 256]);
    assert_eq!(vsock.queue_events().len(), 3);
    let mut data = [0xffu8; 12];
    vsock.read_config(0, &mut data);
    assert_eq!(data, [0x78, 0x56, 0x34, 0x12, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut far = [0xffu8; 4];
    vsock.read_config(u64::MAX - 1, &mut far);
    assert_eq!(far, [0; 4]);
}

#[test]
fn vsock_activate_wrong_queue_count_refused() {
    let dir = TempDir::new();
    let mut vsock = Vsock::new(config(&dir, 3)).unwrap();
    let result = vsock.activate(ActivateContext {
        mem: chitin_virtio::test_utils::guest_memory(0x10000),
        queues: vec![Queue::new(16).unwrap()],
        interrupt: Arc::new(chitin_virtio::test_utils::RecordingInterrupt::new()),
        acked_features: 0,
    });
    assert!(matches!(
        result,
        Err(ActivateError::QueueCount {
            expected: 3,
            got: 1
        })
    ));
}

/// A device activated on `guest`'s queues, as the transport does after
/// restoring them.
fn activated(dir: &TempDir, guest: &crate::test_utils::Guest) -> (Vsock, Arc<RecordingInterrupt>) {
    let mut vsock = Vsock::new(config(dir, 3)).unwrap();
    let interrupt = Arc::new(RecordingInterrupt::new());
    vsock
        .activate(ActivateContext {
            mem: guest.mem.clone(),
            queues: guest.queues(),
            interrupt: interrupt.clone(),
            acked_features: 0,
        })
        .unwrap();
    (vsock, interrupt)
}

#[test]
fn restored_device_sends_the_transport_reset_event() {
    let dir = TempDir::new();
    let mut guest = crate::test_utils::Guest::new();
    let buf = guest.alloc(8);
    guest.mem.write_slice(&[0xaa; 8], buf).unwrap();
    guest.add_event_chain(&[TestDescriptor::new(buf.0, 8, WRITE)]);
    let (mut vsock, interrupt) = activated(&dir, &guest);
    assert_eq!(vsock.snapshot_refusal(), None);
    assert_eq!(vsock.queue_positions(), Some(vec![(0, 0); 3]));

    vsock.restored();
    assert!(!vsock.reset_event_pending());
    let (_, len) = guest.event_used(0).expect("the event buffer was used");
    assert_eq!(len, 4);
    let mut event = [0u8; 8];
    guest.mem.read_slice(&mut event, buf).unwrap();
    assert_eq!(event, [0, 0, 0, 0, 0xaa, 0xaa, 0xaa, 0xaa]);
    assert_eq!(interrupt.count(InterruptKind::Queue), 1);
    assert_eq!(vsock.queue_positions(), Some(vec![(0, 0), (0, 0), (1, 1)]));
    // One event only.
    vsock.post_events();
    assert_eq!(guest.event_used(1), None);
}

#[test]
fn reset_event_waits_for_a_buffer_and_skips_unusable_ones() {
    let dir = TempDir::new();
    let mut guest = crate::test_utils::Guest::new();
    let (mut vsock, interrupt) = activated(&dir, &guest);
    vsock.restored();
    assert!(vsock.reset_event_pending());
    assert_eq!(interrupt.count(InterruptKind::Queue), 0);

    // A buffer too short and one the device may not write go back empty
    // (recorded); the next good one takes the event.
    let short = guest.alloc(2);
    let read_only = guest.alloc(4);
    let good = guest.alloc(4);
    guest.mem.write_slice(&[0xff; 4], good).unwrap();
    guest.add_event_chain(&[TestDescriptor::new(short.0, 2, WRITE)]);
    guest.add_event_chain(&[TestDescriptor::new(read_only.0, 4, 0)]);
    guest.add_event_chain(&[TestDescriptor::new(good.0, 4, WRITE)]);
    vsock.post_events();
    assert!(!vsock.reset_event_pending());
    assert_eq!(guest.event_used(0).map(|u| u.1), Some(0));
    assert_eq!(guest.event_used(1).map(|u| u.1), Some(0));
    assert_eq!(guest.event_used(2).map(|u| u.1), Some(4));
    assert_eq!(guest.mem.read_obj::<u32>(good).unwrap(), 0);
    assert_eq!(vsock.faults().total(), 2);

    // A reset drops a pending event.
    vsock.restored();
    vsock.reset();
    assert!(!vsock.reset_event_pending());
}

#[test]
fn reset_event_with_event_idx_asks_for_the_next_buffer() {
    let dir = TempDir::new();
    let mut guest = crate::test_utils::Guest::new().with_event_idx();
    let (mut vsock, _) = activated(&dir, &guest);
    // Make avail_event stale, as a device that never asked leaves it.
    let at = guest.event_avail_event();
    assert_eq!(at, 0);
    let bad = guest.alloc(2);
    guest.add_event_chain(&[TestDescriptor::new(bad.0, 2, WRITE)]);
    vsock.restored();
    // The short buffer went back; the device asked to hear of the next.
    assert!(vsock.reset_event_pending());
    assert_eq!(guest.event_used(0).map(|u| u.1), Some(0));
    assert_eq!(guest.event_avail_event(), 1);
}

#[test]
fn a_queue_of_bad_event_buffers_is_taken_a_queue_at_a_time() {
    let dir = TempDir::new();
    let mut guest = crate::test_utils::Guest::new();
    for _ in 0..QUEUE_SIZE {
        let bad = guest.alloc(2);
        guest.add_event_chain(&[TestDescriptor::new(bad.0, 2, WRITE)]);
    }
    let (mut vsock, _) = activated(&dir, &guest);
    let _ = vsock.queue_events()[EVENT_QUEUE].read();
    vsock.restored();
    // All returned empty in one call, the event still pending, and the
    // event loop asked to come back.
    assert!(vsock.reset_event_pending());
    assert_eq!(guest.event_used(QUEUE_SIZE - 1).map(|u| u.1), Some(0));
    assert_eq!(vsock.queue_events()[EVENT_QUEUE].read().unwrap(), 1);
}

#[test]
fn host_connections_wait_until_the_driver_refills_after_the_reset() {
    let dir = TempDir::new();
    let mut guest = crate::test_utils::Guest::new().with_event_idx();
    let bufs: Vec<_> = (0..2).map(|_| guest.alloc(4)).collect();
    for buf in &bufs {
        guest.add_event_chain(&[TestDescriptor::new(buf.0, 4, WRITE)]);
    }
    let (mut vsock, _) = activated(&dir, &guest);
    assert!(!vsock.holding_host_connections());
    vsock.restored();
    // Delivered in the first buffer; the driver is asked to notify its
    // next one although one is still posted (avail_event at 2, not 1).
    assert!(!vsock.reset_event_pending());
    assert!(vsock.holding_host_connections());
    assert!(!vsock.listener_interest().0);
    assert_eq!(guest.event_avail_event(), 2);
    // A host connection now stays in the backlog.
    let _client = std::os::unix::net::UnixStream::connect(vsock.uds_path()).unwrap();
    vsock.accept_all();
    assert_eq!(vsock.handler_mut().accepting_count(), 0);
    vsock.post_events();
    assert!(vsock.holding_host_connections());
    // The driver handled the event and gave the buffer back.
    let refill = guest.alloc(4);
    guest.add_event_chain(&[TestDescriptor::new(refill.0, 4, WRITE)]);
    vsock.post_events();
    assert!(!vsock.holding_host_connections());
    assert!(vsock.listener_interest().0);
    vsock.accept_all();
    assert_eq!(vsock.handler_mut().accepting_count(), 1);
}

#[test]
fn host_connections_go_after_the_grace_when_the_driver_never_refills() {
    let dir = TempDir::new();
    let mut guest = crate::test_utils::Guest::new();
    let buf = guest.alloc(4);
    guest.add_event_chain(&[TestDescriptor::new(buf.0, 4, WRITE)]);
    let (mut vsock, _) = activated(&dir, &guest);
    vsock.restored();
    assert!(vsock.holding_host_connections());
    std::thread::sleep(RESET_GRACE + Duration::from_millis(50));
    vsock.on_timer();
    assert!(!vsock.holding_host_connections());
}
