use std::sync::Arc;

use virtio_queue::{Queue, QueueT};

use super::*;
use crate::test_utils::TempDir;

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
