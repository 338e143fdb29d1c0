use chitin_virtio::test_utils::TestDescriptor;
use chitin_virtio::QueueT;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use vm_memory::GuestAddress;

use super::*;
use crate::test_utils::Guest;

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;

fn sample() -> Header {
    Header {
        src_cid: 3,
        dst_cid: HOST_CID,
        src_port: 1234,
        dst_port: 52,
        len: 5,
        type_: TYPE_STREAM,
        op: Op::Rw as u16,
        flags: 0,
        buf_alloc: 4096,
        fwd_cnt: 7,
    }
}

/// Write `header` at `hdr`, then parse the TX chain `descs`.
fn parse(
    guest: &mut Guest,
    header: Header,
    hdr: GuestAddress,
    descs: &[TestDescriptor],
) -> Result<(Header, Vec<u8>), PacketError> {
    guest.mem.write_slice(&header.to_bytes(), hdr).unwrap();
    guest.add_tx_chain(descs);
    let mut queue = guest.queues().remove(1);
    let mem = guest.mem.clone();
    let mut chain = queue.pop_descriptor_chain(&mem).unwrap();
    let pkt = parse_tx(&mem, &mut chain)?;
    let mut data = vec![0u8; MAX_PKT_DATA as usize];
    let n = pkt.read_data(&mut data)?;
    data.truncate(n);
    Ok((*pkt.header(), data))
}

#[test]
fn header_bytes_round_trip_little_endian() {
    let header = sample();
    let bytes = header.to_bytes();
    assert_eq!(&bytes[0..8], &3u64.to_le_bytes());
    assert_eq!(&bytes[30..32], &5u16.to_le_bytes());
    assert_eq!(Header::from_bytes(&bytes), header);
}

#[test]
fn op_from_raw_unknown_is_none() {
    assert_eq!(Op::from_raw(5), Some(Op::Rw));
    assert_eq!(Op::from_raw(0), None);
    assert_eq!(Op::from_raw(8), None);
}

#[test]
fn parse_tx_header_then_data_yields_both() {
    let mut guest = Guest::new();
    let hdr = guest.alloc(64);
    let data = guest.alloc(64);
    guest.mem.write_slice(b"hello", data).unwrap();
    let (header, bytes) = parse(
        &mut guest,
        sample(),
        hdr,
        &[
            TestDescriptor::new(hdr.0, 44, NEXT),
            TestDescriptor::new(data.0, 5, 0),
        ],
    )
    .unwrap();
    assert_eq!(header, sample());
    assert_eq!(bytes, b"hello");
}

#[test]
fn parse_tx_single_descriptor_yields_data_after_header() {
    let mut guest = Guest::new();
    let hdr = guest.alloc(64);
    guest
        .mem
        .write_slice(b"hello", GuestAddress(hdr.0 + 44))
        .unwrap();
    let (_, bytes) = parse(
        &mut guest,
        sample(),
        hdr,
        &[TestDescriptor::new(hdr.0, 49, 0)],
    )
    .unwrap();
    assert_eq!(bytes, b"hello");
}

#[test]
fn parse_tx_header_short_refused() {
    let mut guest = Guest::new();
    let hdr = guest.alloc(64);
    let result = parse(
        &mut guest,
        sample(),
        hdr,
        &[TestDescriptor::new(hdr.0, 43, 0)],
    );
    assert!(matches!(result, Err(PacketError::Chain(_))));
}

#[test]
fn parse_tx_len_beyond_data_descriptor_refused() {
    let mut guest = Guest::new();
    let hdr = guest.alloc(64);
    let data = guest.alloc(64);
    let result = parse(
        &mut guest,
        sample(),
        hdr,
        &[
            TestDescriptor::new(hdr.0, 44, NEXT),
            TestDescriptor::new(data.0, 4, 0),
        ],
    );
    assert!(matches!(result, Err(PacketError::Chain(_))));
}

#[test]
fn parse_tx_len_without_data_descriptor_refused() {
    let mut guest = Guest::new();
    let hdr = guest.alloc(64);
    let result = parse(
        &mut guest,
        sample(),
        hdr,
        &[TestDescriptor::new(hdr.0, 44, 0)],
    );
    assert!(matches!(result, Err(PacketError::Chain(_))));
}

#[test]
fn parse_tx_huge_len_refused() {
    let mut guest = Guest::new();
    let hdr = guest.alloc(64);
    let data = guest.alloc(64);
    let header = Header {
        len: u32::MAX,
        ..sample()
    };
    let result = parse(
        &mut guest,
        header,
        hdr,
        &[
            TestDescriptor::new(hdr.0, 44, NEXT),
            TestDescriptor::new(data.0, u32::MAX, 0),
        ],
    );
    assert!(matches!(result, Err(PacketError::Chain(_))));
}

#[test]
fn parse_tx_writable_descriptors_refused() {
    let mut guest = Guest::new();
    let hdr = guest.alloc(64);
    let data = guest.alloc(64);
    let result = parse(
        &mut guest,
        sample(),
        hdr,
        &[
            TestDescriptor::new(hdr.0, 44, WRITE | NEXT),
            TestDescriptor::new(data.0, 5, WRITE),
        ],
    );
    assert!(matches!(result, Err(PacketError::Chain(_))));
}

#[test]
fn parse_tx_data_outside_memory_refused() {
    let mut guest = Guest::new();
    let hdr = guest.alloc(64);
    let result = parse(
        &mut guest,
        sample(),
        hdr,
        &[
            TestDescriptor::new(hdr.0, 44, NEXT),
            TestDescriptor::new(u64::MAX - 2, 5, 0),
        ],
    );
    assert!(matches!(result, Err(PacketError::Chain(_))));
}

#[test]
fn peek_header_readable_head_reads_header() {
    let mut guest = Guest::new();
    let hdr = guest.alloc(64);
    guest.mem.write_slice(&sample().to_bytes(), hdr).unwrap();
    guest.add_tx_chain(&[TestDescriptor::new(hdr.0, 44, 0)]);
    let mut queue = guest.queues().remove(1);
    let mem = guest.mem.clone();
    let chain = queue.pop_descriptor_chain(&mem).unwrap();
    assert_eq!(peek_header(&mem, &chain), Some(sample()));
}

#[test]
fn parse_rx_readable_descriptor_refused() {
    let mut guest = Guest::new();
    let hdr = guest.alloc(64);
    let data = guest.alloc(64);
    // An RX chain whose buffers the device may not write.
    let mut rx_like = Guest::new();
    rx_like.add_tx_chain(&[
        TestDescriptor::new(hdr.0, 44, NEXT),
        TestDescriptor::new(data.0, 64, 0),
    ]);
    let mut queue = rx_like.queues().remove(1);
    let mem = rx_like.mem.clone();
    let mut chain = queue.pop_descriptor_chain(&mem).unwrap();
    assert!(matches!(
        parse_rx(&mem, &mut chain),
        Err(PacketError::Chain(_))
    ));
    drop(guest);
}

#[test]
fn rx_buffer_write_beyond_capacity_refused() {
    let mut guest = Guest::new();
    let hdr = guest.alloc(64);
    let data = guest.alloc(64);
    guest.add_tx_chain(&[
        TestDescriptor::new(hdr.0, 44, WRITE | NEXT),
        TestDescriptor::new(data.0, 16, WRITE),
    ]);
    let mut queue = guest.queues().remove(1);
    let mem = guest.mem.clone();
    let mut chain = queue.pop_descriptor_chain(&mem).unwrap();
    let mut buffer = parse_rx(&mem, &mut chain).unwrap();
    assert_eq!(buffer.capacity(), 16);
    assert!(buffer.write_data(&[0u8; 17]).is_err());
    let header = Header {
        len: 17,
        ..sample()
    };
    assert!(buffer.write_header(&header).is_err());
    let header = Header {
        len: 16,
        ..sample()
    };
    assert_eq!(buffer.write_header(&header).unwrap(), 60);
}
