//! Arbitrary sequences of register reads and writes against a virtio-mmio
//! transport with a dummy block-type device: the transport must never
//! panic, whatever the driver does.
//!
//! Input: 8-byte operations `[kind, offset lo, offset hi, width, value (4)]`.
//! Bit 0 of `kind` selects write; width is 1, 2, 4 or 8 bytes; offsets span
//! the control registers and the start of the configuration space.

#![no_main]

use std::sync::{Arc, Mutex};

use chitin_bus::BusDevice;
use chitin_virtio::mmio::MmioTransport;
use chitin_virtio::test_utils::{guest_memory, DummyDevice};
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest memory the queues may point into (or past).
const MEM_SIZE: usize = 64 << 10;
/// Covers the control registers (0..0x100) and 256 bytes of config space.
const OFFSET_SPAN: u64 = 0x200;

fuzz_target!(|data: &[u8]| {
    let Ok(device) = DummyDevice::new(2, &[256]) else {
        return;
    };
    let device = device.with_features(1 << 9).with_config(&[0x5a; 60]);
    let Ok(irq) = EventFd::new(EFD_NONBLOCK) else {
        return;
    };
    let transport = MmioTransport::new(Arc::new(Mutex::new(device)), guest_memory(MEM_SIZE), irq);
    for op in data.chunks_exact(8) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) % OFFSET_SPAN;
        let width = 1usize << (op[3] % 4);
        let value = u64::from(u32::from_le_bytes([op[4], op[5], op[6], op[7]]));
        let bytes = value.to_le_bytes();
        if op[0] & 1 == 1 {
            transport.write(offset, &bytes[..width]);
        } else {
            let mut buf = [0u8; 8];
            transport.read(offset, &mut buf[..width]);
        }
    }
});
