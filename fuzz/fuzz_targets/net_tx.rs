//! Arbitrary guest memory and TX descriptor chains through chitin-net's
//! transmit path (parser, header checks, the write to an in-memory
//! backend), with arbitrary accepted features. Nothing may panic or touch
//! memory outside the guest's, and every frame that reaches the backend
//! is within the size bounds with a header the accepted features allow.
//!
//! Input: `[n_desc, n_heads, features]`, then the descriptors (16 bytes
//! each: addr u64, len u32, flags u16, next u16), the heads (1 byte each),
//! then bytes copied to the data area (headers and frames).

#![no_main]

use chitin_net::frame::{check_header, MAX_CHAIN_LEN};
use chitin_net::{transmit, MemBackend, VnetHeader, VNET_HDR_LEN};
use chitin_virtio::rate_limit::MonotonicClock;
use chitin_virtio::test_utils::{guest_memory, RecordingInterrupt, SplitQueueBuilder, TestDescriptor};
use chitin_virtio::GuestFaults;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

const MEM_SIZE: usize = 256 << 10;
const QUEUE_SIZE: u16 = 16;
const DATA_AREA: u64 = 0x4000;

fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, rest) = data.split_at(n.min(data.len()));
    *data = rest;
    head
}

/// Feature bits from one byte: CSUM, HOST_TSO4, HOST_TSO6, HOST_ECN,
/// HOST_UFO, VERSION_1.
fn features(byte: u8) -> u64 {
    let bits = [0u32, 11, 12, 13, 14, 32];
    bits.iter()
        .enumerate()
        .filter(|(i, _)| byte & (1 << i) != 0)
        .fold(0, |f, (_, &b)| f | (1u64 << b))
}

fuzz_target!(|input: &[u8]| {
    let [n_desc, n_heads, feature_byte, rest @ ..] = input else {
        return;
    };
    let mut rest = rest;
    let descs = take(&mut rest, usize::from(*n_desc % 17) * 16);
    let heads = take(&mut rest, usize::from(*n_heads % 17));
    let mem = guest_memory(MEM_SIZE);
    let room = MEM_SIZE - DATA_AREA as usize;
    let _ = mem.write_slice(&rest[..rest.len().min(room)], GuestAddress(DATA_AREA));
    let Ok(mut builder) = SplitQueueBuilder::new(&mem, GuestAddress(0), QUEUE_SIZE) else {
        return;
    };
    for (i, d) in descs.chunks_exact(16).enumerate() {
        let addr = u64::from_le_bytes(d[0..8].try_into().unwrap()) % (2 * MEM_SIZE as u64);
        let len = u32::from_le_bytes(d[8..12].try_into().unwrap());
        let desc = TestDescriptor::new(addr, len, u16::from_le_bytes([d[12], d[13]]))
            .with_next(u16::from_le_bytes([d[14], d[15]]));
        if builder.write_descriptor(i as u16, desc).is_err() {
            return;
        }
    }
    for &h in heads {
        if builder.publish(u16::from(h) % QUEUE_SIZE).is_err() {
            return;
        }
    }
    let Ok(mut queue) = builder.build() else {
        return;
    };
    let acked = features(*feature_byte);
    let backend = MemBackend::default();
    let interrupt = RecordingInterrupt::new();
    let faults = GuestFaults::new("fuzz net tx");
    // A ring error only ends the run (the device signals NEEDS_RESET).
    let _ = transmit::<_, _, _, MonotonicClock>(
        &mut queue, &mem, &backend, &interrupt, acked, &faults, None,
    );
    for frame in backend.outbound.borrow().iter() {
        assert!(frame.len() <= MAX_CHAIN_LEN, "{}", frame.len());
        assert!(frame.len() > VNET_HDR_LEN);
        let header: [u8; VNET_HDR_LEN] = frame[..VNET_HDR_LEN].try_into().unwrap();
        let header = VnetHeader::from_bytes(&header);
        assert!(check_header(&header, frame.len() - VNET_HDR_LEN, acked).is_ok());
    }
});
