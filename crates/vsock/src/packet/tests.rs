//! The packet parser over every descriptor layout a driver may choose
//! (virtio 1.2 §2.7.4): header alone, header + one data descriptor,
//! header + many, a split header, header and data in one descriptor,
//! zero-length descriptors, and lengths that disagree with the header.

use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::GuestMemoryMmap;

use super::*;

/// 1 MiB of guest memory at 0: room for every buffer below.
const MEM_SIZE: usize = 1 << 20;
const HDR_ADDR: u64 = 0x1000;
const DATA_ADDR: u64 = 0x2_0000;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

fn readable(addr: u64, len: u32) -> Descriptor {
    Descriptor::new(addr, len, 0, 0)
}

fn writable(addr: u64, len: u32) -> Descriptor {
    Descriptor::new(addr, len, WRITE, 0)
}

/// A guest-to-host RW header announcing `len` data bytes.
fn header(len: u32) -> Header {
    Header {
        src_cid: 3,
        dst_cid: HOST_CID,
        src_port: 1234,
        dst_port: 52,
        len,
        type_: TYPE_STREAM,
        op: Op::Rw as u16,
        flags: 0,
        buf_alloc: 4096,
        fwd_cnt: 7,
    }
}

/// Recognisable data: byte `i` is `i * 7 + 1` (mod 256).
fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 1) as u8).collect()
}

/// Write `bytes` into guest memory as the byte stream the descriptors
/// `lens` (at consecutive addresses from `base`, 0x100 apart beyond their
/// lengths) carry, and return those descriptors.
fn spread(mem: &GuestMemoryMmap, base: u64, bytes: &[u8], lens: &[u32]) -> Vec<Descriptor> {
    let mut descs = Vec::new();
    let mut addr = base;
    let mut at = 0usize;
    for &len in lens {
        let end = (at + len as usize).min(bytes.len());
        mem.write_slice(&bytes[at..end], GuestAddress(addr))
            .unwrap();
        descs.push(readable(addr, len));
        at = end;
        addr += u64::from(len) + 0x100;
    }
    descs
}

/// The header bytes followed by `data`.
fn packet_bytes(header: &Header, data: &[u8]) -> Vec<u8> {
    let mut bytes = header.to_bytes().to_vec();
    bytes.extend_from_slice(data);
    bytes
}

fn parse(mem: &GuestMemoryMmap, descs: Vec<Descriptor>) -> Result<(Header, Vec<u8>), TxRefused> {
    let mut data = vec![0u8; MAX_PKT_DATA as usize];
    let pkt = parse_tx(mem, descs, &mut data)?;
    data.truncate(pkt.data_len());
    Ok((*pkt.header(), data))
}

#[test]
fn header_bytes_round_trip_little_endian() {
    let h = header(5);
    let bytes = h.to_bytes();
    assert_eq!(&bytes[0..8], &3u64.to_le_bytes());
    assert_eq!(&bytes[30..32], &5u16.to_le_bytes());
    assert_eq!(Header::from_bytes(&bytes), h);
}

#[test]
fn op_from_raw_unknown_is_none() {
    assert_eq!(Op::from_raw(5), Some(Op::Rw));
    assert_eq!(Op::from_raw(0), None);
    assert_eq!(Op::from_raw(8), None);
}

#[test]
fn parse_tx_header_alone_has_no_data() {
    let mem = memory();
    let h = Header {
        op: Op::CreditUpdate as u16,
        ..header(0)
    };
    let descs = spread(&mem, HDR_ADDR, &h.to_bytes(), &[44]);

    let (got, data) = parse(&mem, descs).unwrap();

    assert_eq!(got, h);
    assert!(data.is_empty());
}

#[test]
fn parse_tx_header_then_one_data_descriptor_yields_data() {
    let mem = memory();
    let data = pattern(5);
    let descs = spread(&mem, HDR_ADDR, &packet_bytes(&header(5), &data), &[44, 5]);

    let (got, bytes) = parse(&mem, descs).unwrap();

    assert_eq!(got, header(5));
    assert_eq!(bytes, data);
}

#[test]
fn parse_tx_header_then_page_fragments_yields_all_data() {
    // Linux 6.7+ sends a non-linear skb as header + one descriptor per
    // page fragment: here 16 full pages and a tail, 64 KiB in all.
    let mem = memory();
    let len = MAX_PKT_DATA as usize;
    let data = pattern(len);
    let mut lens = vec![44];
    lens.extend(std::iter::repeat_n(4096, 15));
    lens.push(4096);
    assert_eq!(lens[1..].iter().sum::<u32>(), MAX_PKT_DATA);
    let descs = spread(
        &mem,
        HDR_ADDR,
        &packet_bytes(&header(len as u32), &data),
        &lens,
    );

    let (got, bytes) = parse(&mem, descs).unwrap();

    assert_eq!(got.len, MAX_PKT_DATA);
    assert_eq!(bytes, data);
}

#[test]
fn parse_tx_uneven_fragments_keep_byte_order() {
    let mem = memory();
    let data = pattern(1000);
    let lens = [44, 1, 999 - 500, 3, 497];
    assert_eq!(lens[1..].iter().sum::<u32>(), 1000);
    let descs = spread(&mem, HDR_ADDR, &packet_bytes(&header(1000), &data), &lens);

    let (_, bytes) = parse(&mem, descs).unwrap();

    assert_eq!(bytes, data);
}

#[test]
fn parse_tx_header_split_over_descriptors_reads_it_whole() {
    let mem = memory();
    let data = pattern(300);
    // 10 + 30 + 4 header bytes; the fourth descriptor starts the data.
    let lens = [10, 30, 4, 300];
    let descs = spread(&mem, HDR_ADDR, &packet_bytes(&header(300), &data), &lens);

    let (got, bytes) = parse(&mem, descs).unwrap();

    assert_eq!(got, header(300));
    assert_eq!(bytes, data);
}

#[test]
fn parse_tx_split_header_sharing_a_descriptor_with_data() {
    let mem = memory();
    let data = pattern(100);
    // The second descriptor holds the header's last 24 bytes and 60 of data.
    let lens = [20, 24 + 60, 40];
    let descs = spread(&mem, HDR_ADDR, &packet_bytes(&header(100), &data), &lens);

    let (got, bytes) = parse(&mem, descs).unwrap();

    assert_eq!(got, header(100));
    assert_eq!(bytes, data);
}

#[test]
fn parse_tx_header_and_data_in_one_descriptor() {
    let mem = memory();
    let data = pattern(5);
    let descs = spread(&mem, HDR_ADDR, &packet_bytes(&header(5), &data), &[49]);

    let (_, bytes) = parse(&mem, descs).unwrap();

    assert_eq!(bytes, data);
}

#[test]
fn parse_tx_zero_length_descriptors_are_skipped() {
    let mem = memory();
    let data = pattern(64);
    let lens = [0, 44, 0, 32, 0, 32, 0];
    let descs = spread(&mem, HDR_ADDR, &packet_bytes(&header(64), &data), &lens);

    let (_, bytes) = parse(&mem, descs).unwrap();

    assert_eq!(bytes, data);
}

#[test]
fn parse_tx_more_data_than_header_len_copies_only_len() {
    let mem = memory();
    // The header says 5; the chain holds 64 bytes after it.
    let data = pattern(64);
    let descs = spread(&mem, HDR_ADDR, &packet_bytes(&header(5), &data), &[44, 64]);

    let (got, bytes) = parse(&mem, descs).unwrap();

    assert_eq!(got.len, 5);
    assert_eq!(bytes, &data[..5]);
}

#[test]
fn parse_tx_less_data_than_header_len_is_refused_with_header() {
    let mem = memory();
    let data = pattern(4);
    let descs = spread(&mem, HDR_ADDR, &packet_bytes(&header(5), &data), &[44, 4]);

    let refused = parse(&mem, descs).unwrap_err();

    assert!(matches!(
        refused.error,
        PacketError::DataShort {
            len: 5,
            available: 4
        }
    ));
    // The header was whole: the sender can be reset.
    assert_eq!(refused.header, Some(header(5)));
}

#[test]
fn parse_tx_len_without_data_descriptor_is_refused() {
    let mem = memory();
    let descs = spread(&mem, HDR_ADDR, &header(5).to_bytes(), &[44]);

    let refused = parse(&mem, descs).unwrap_err();

    assert!(matches!(refused.error, PacketError::DataShort { .. }));
}

#[test]
fn parse_tx_header_of_43_bytes_is_too_short() {
    let mem = memory();
    let descs = spread(&mem, HDR_ADDR, &header(0).to_bytes(), &[20, 23]);

    let refused = parse(&mem, descs).unwrap_err();

    assert!(matches!(
        refused.error,
        PacketError::HeaderTooShort { len: 43 }
    ));
    assert_eq!(refused.header, None);
}

#[test]
fn parse_tx_empty_chain_is_too_short() {
    let mem = memory();

    let refused = parse(&mem, Vec::new()).unwrap_err();

    assert!(matches!(
        refused.error,
        PacketError::HeaderTooShort { len: 0 }
    ));
}

#[test]
fn parse_tx_len_over_limit_is_refused_before_reading_data() {
    let mem = memory();
    let h = header(MAX_PKT_DATA + 1);
    let descs = vec![
        spread(&mem, HDR_ADDR, &h.to_bytes(), &[44])[0],
        readable(DATA_ADDR, u32::MAX),
    ];

    let refused = parse(&mem, descs).unwrap_err();

    assert!(matches!(
        refused.error,
        PacketError::DataTooLong { len } if len == MAX_PKT_DATA + 1
    ));
}

#[test]
fn parse_tx_len_beyond_callers_buffer_is_refused() {
    let mem = memory();
    let descs = spread(&mem, HDR_ADDR, &packet_bytes(&header(16), &[0; 16]), &[60]);
    let mut small = [0u8; 8];

    let refused = parse_tx(&mem, descs, &mut small).unwrap_err();

    assert!(matches!(
        refused.error,
        PacketError::TooLong {
            len: 16,
            capacity: 8
        }
    ));
}

#[test]
fn parse_tx_more_than_max_descriptors_is_refused() {
    let mem = memory();
    // A whole header, then MAX_DESCRIPTORS one-byte data descriptors: one
    // descriptor too many.
    let len = MAX_DESCRIPTORS as u32;
    let mut lens = vec![44];
    lens.extend(std::iter::repeat_n(1, MAX_DESCRIPTORS));
    let descs = spread(
        &mem,
        HDR_ADDR,
        &packet_bytes(&header(len), &pattern(64)),
        &lens,
    );

    let refused = parse(&mem, descs).unwrap_err();

    assert!(matches!(refused.error, PacketError::TooManyDescriptors));
}

#[test]
fn parse_tx_max_descriptors_is_accepted() {
    let mem = memory();
    let len = MAX_DESCRIPTORS as u32 - 1;
    let mut lens = vec![44];
    lens.extend(std::iter::repeat_n(1, MAX_DESCRIPTORS - 1));
    let data = pattern(len as usize);
    let descs = spread(&mem, HDR_ADDR, &packet_bytes(&header(len), &data), &lens);

    let (_, bytes) = parse(&mem, descs).unwrap();

    assert_eq!(bytes, data);
}

#[test]
fn parse_tx_writable_descriptor_is_refused() {
    let mem = memory();
    let mut descs = spread(&mem, HDR_ADDR, &packet_bytes(&header(5), &[1; 5]), &[44]);
    descs.push(writable(DATA_ADDR, 5));

    let refused = parse(&mem, descs).unwrap_err();

    assert!(matches!(
        refused.error,
        PacketError::WrongDirection { index: 1 }
    ));
}

#[test]
fn parse_tx_data_outside_memory_is_refused() {
    let mem = memory();
    let mut descs = spread(&mem, HDR_ADDR, &header(5).to_bytes(), &[44]);
    descs.push(readable(MEM_SIZE as u64 - 2, 5));

    let refused = parse(&mem, descs).unwrap_err();

    assert!(matches!(
        refused.error,
        PacketError::OutsideGuestMemory { len: 5, .. }
    ));
}

#[test]
fn parse_tx_address_wrapping_u64_is_refused() {
    let mem = memory();
    let mut descs = spread(&mem, HDR_ADDR, &header(5).to_bytes(), &[44]);
    descs.push(readable(u64::MAX - 2, 5));

    let refused = parse(&mem, descs).unwrap_err();

    assert!(matches!(
        refused.error,
        PacketError::OutsideGuestMemory { .. }
    ));
}

#[test]
fn parse_tx_header_is_a_copy() {
    let mem = memory();
    let descs = spread(&mem, HDR_ADDR, &packet_bytes(&header(3), &[9; 3]), &[44, 3]);
    let mut data = [0u8; 16];
    let pkt = parse_tx(&mem, descs, &mut data).unwrap();

    // The guest rewrites the header after the parse: the copy stands.
    mem.write_slice(&header(99).to_bytes(), GuestAddress(HDR_ADDR))
        .unwrap();

    assert_eq!(pkt.header().len, 3);
}

#[test]
fn packet_error_reasons_name_the_direction() {
    let e = PacketError::HeaderTooShort { len: 3 };
    assert!(e.reason(Direction::Tx).starts_with("tx"));
    assert!(e.reason(Direction::Rx).starts_with("rx"));
}

/// Read back what an RX buffer spread over `descs` holds as one stream.
fn read_stream(mem: &GuestMemoryMmap, descs: &[Descriptor], len: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for d in descs {
        let take = (d.len() as usize).min(len - out.len());
        let mut buf = vec![0u8; take];
        mem.read_slice(&mut buf, d.addr()).unwrap();
        out.extend_from_slice(&buf);
    }
    out
}

/// Fill an RX buffer over `descs` with `header` + `data`; the used length.
fn fill(mem: &GuestMemoryMmap, descs: &[Descriptor], h: &Header, data: &[u8]) -> u32 {
    let mut buffer = parse_rx(mem, descs.to_vec()).unwrap();
    buffer.write_data(data).unwrap();
    buffer.write_header(h).unwrap()
}

#[test]
fn rx_one_descriptor_holds_header_and_data() {
    // Linux 6.7+ receive buffers: one 4 KiB + header descriptor.
    let mem = memory();
    let descs = [writable(HDR_ADDR, 44 + 4096)];
    let data = pattern(4096);

    let used = fill(&mem, &descs, &header(4096), &data);

    assert_eq!(used, 44 + 4096);
    assert_eq!(
        read_stream(&mem, &descs, 44 + 4096),
        packet_bytes(&header(4096), &data)
    );
}

#[test]
fn rx_header_then_data_descriptor() {
    // Linux up to 6.6: a header descriptor and a data descriptor.
    let mem = memory();
    let descs = [writable(HDR_ADDR, 44), writable(DATA_ADDR, 4096)];
    let data = pattern(100);

    let used = fill(&mem, &descs, &header(100), &data);

    assert_eq!(used, 144);
    assert_eq!(
        read_stream(&mem, &descs, 144),
        packet_bytes(&header(100), &data)
    );
}

#[test]
fn rx_split_header_and_many_descriptors_keep_byte_order() {
    let mem = memory();
    let descs = [
        writable(HDR_ADDR, 7),
        writable(HDR_ADDR + 0x100, 40),
        writable(DATA_ADDR, 3),
        writable(DATA_ADDR + 0x100, 0),
        writable(DATA_ADDR + 0x200, 500),
    ];
    let data = pattern(400);

    let used = fill(&mem, &descs, &header(400), &data);

    assert_eq!(used, 444);
    assert_eq!(
        read_stream(&mem, &descs, 444),
        packet_bytes(&header(400), &data)
    );
}

#[test]
fn rx_capacity_is_room_after_header_capped_at_max() {
    let mem = memory();
    let small = parse_rx(&mem, vec![writable(HDR_ADDR, 44), writable(DATA_ADDR, 16)]).unwrap();
    let exact = parse_rx(&mem, vec![writable(HDR_ADDR, 44)]).unwrap();
    let big = parse_rx(&mem, vec![writable(0, MEM_SIZE as u32)]).unwrap();

    assert_eq!(small.capacity(), 16);
    assert_eq!(exact.capacity(), 0);
    assert_eq!(big.capacity(), MAX_PKT_DATA as usize);
}

#[test]
fn rx_write_beyond_capacity_is_refused() {
    let mem = memory();
    let mut buffer = parse_rx(&mem, vec![writable(HDR_ADDR, 44), writable(DATA_ADDR, 16)]).unwrap();

    assert!(matches!(
        buffer.write_data(&[0u8; 17]),
        Err(PacketError::TooLong {
            len: 17,
            capacity: 16
        })
    ));
    assert!(buffer.write_header(&header(17)).is_err());
    assert_eq!(buffer.write_header(&header(16)).unwrap(), 60);
}

#[test]
fn rx_readable_descriptor_is_refused() {
    let mem = memory();
    let result = parse_rx(&mem, vec![writable(HDR_ADDR, 44), readable(DATA_ADDR, 64)]);
    assert!(matches!(
        result,
        Err(PacketError::WrongDirection { index: 1 })
    ));
}

#[test]
fn rx_shorter_than_header_is_refused() {
    let mem = memory();
    let result = parse_rx(&mem, vec![writable(HDR_ADDR, 20), writable(DATA_ADDR, 23)]);
    assert!(matches!(
        result,
        Err(PacketError::HeaderTooShort { len: 43 })
    ));
}

#[test]
fn rx_outside_memory_is_refused() {
    let mem = memory();
    let result = parse_rx(
        &mem,
        vec![writable(HDR_ADDR, 44), writable(MEM_SIZE as u64 - 8, 16)],
    );
    assert!(matches!(
        result,
        Err(PacketError::OutsideGuestMemory { .. })
    ));
}

#[test]
fn rx_more_than_max_descriptors_is_refused() {
    let mem = memory();
    let descs: Vec<Descriptor> = (0..=MAX_DESCRIPTORS as u64)
        .map(|i| writable(DATA_ADDR + i * 0x100, 44))
        .collect();
    assert!(matches!(
        parse_rx(&mem, descs),
        Err(PacketError::TooManyDescriptors)
    ));
}

#[test]
fn rx_write_touches_nothing_outside_the_chain() {
    let mem = memory();
    // Guard bytes around a two-descriptor buffer must stay as they were.
    mem.write_slice(&[0xaa; 0x400], GuestAddress(HDR_ADDR))
        .unwrap();
    let descs = [
        writable(HDR_ADDR + 0x10, 30),
        writable(HDR_ADDR + 0x100, 30),
    ];

    let used = fill(&mem, &descs, &header(16), &pattern(16));

    assert_eq!(used, 60);
    let mut before = [0u8; 0x10];
    mem.read_slice(&mut before, GuestAddress(HDR_ADDR)).unwrap();
    let mut between = [0u8; 0x100 - 0x10 - 30];
    mem.read_slice(&mut between, GuestAddress(HDR_ADDR + 0x10 + 30))
        .unwrap();
    let mut after = [0u8; 0x10];
    mem.read_slice(&mut after, GuestAddress(HDR_ADDR + 0x100 + 30))
        .unwrap();
    assert!(before
        .iter()
        .chain(&between)
        .chain(&after)
        .all(|&b| b == 0xaa));
}

#[test]
fn parse_tx_zero_length_descriptors_anywhere_touch_no_memory() {
    let mem = memory();
    let data = pattern(8);
    let mut descs = spread(&mem, HDR_ADDR, &packet_bytes(&header(8), &data), &[44, 8]);
    // Empty buffers outside guest memory and at the very top of the
    // address space are harmless.
    descs.insert(1, readable(MEM_SIZE as u64 * 4, 0));
    descs.push(readable(u64::MAX, 0));

    let (_, bytes) = parse(&mem, descs).unwrap();

    assert_eq!(bytes, data);
}

#[test]
fn rx_zero_length_descriptors_anywhere_are_skipped() {
    let mem = memory();
    let descs = [
        writable(u64::MAX, 0),
        writable(HDR_ADDR, 44 + 16),
        writable(MEM_SIZE as u64 * 4, 0),
    ];

    let used = fill(&mem, &descs, &header(16), &pattern(16));

    assert_eq!(used, 60);
}

#[test]
fn rx_exactly_max_descriptors_is_accepted() {
    let mem = memory();
    let descs: Vec<Descriptor> = (0..MAX_DESCRIPTORS as u64)
        .map(|i| writable(DATA_ADDR + i * 0x100, 4))
        .collect();

    let buffer = parse_rx(&mem, descs).unwrap();

    // 64 descriptors of 4 bytes: 256 bytes, 44 of them for the header.
    assert_eq!(buffer.capacity(), 256 - 44);
}

#[test]
fn parse_tx_buffer_across_two_memory_regions_reads_both() {
    // Two adjacent regions; one descriptor spans the boundary.
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x1_0000),
        (GuestAddress(0x1_0000), 0x1_0000),
    ])
    .unwrap();
    let data = pattern(64);
    let at = 0x1_0000 - 20;
    mem.write_slice(&packet_bytes(&header(64), &data), GuestAddress(at))
        .unwrap();

    let (_, bytes) = parse(&mem, vec![readable(at, 44 + 64)]).unwrap();

    assert_eq!(bytes, data);
}
