//! The TX parser: a descriptor chain from the guest's transmit queue to a
//! checked [`TxFrame`], or the reason it is dropped.
//!
//! A TX chain is a `virtio_net_hdr_v1` followed by one Ethernet frame,
//! spread over any number of device-readable descriptors (virtio 1.2
//! §5.1.6.2). The parser reads the header once into a local copy, checks
//! every buffer lies in guest memory, bounds the total length, and checks
//! the header against the features the driver accepted. The header is
//! sent from the checked local copy (flag bits the device does not know
//! masked off, `hdr_len` clamped to the frame, `num_buffers` 0), and only
//! the frame bytes after it come from guest memory, so nothing the guest
//! rewrites after the check changes the header the host kernel sees. It
//! allocates nothing by a guest-supplied length: the segment list holds
//! at most [`MAX_SEGMENTS`] buffers.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
    VIRTIO_NET_HDR_GSO_UDP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};

use crate::VNET_HDR_LEN;

/// Bytes of an Ethernet header: the shortest frame worth sending.
pub const ETH_HLEN: usize = 14;

/// Longest frame (header excluded) the device takes or gives: 64 KiB of
/// segmentation payload plus the Ethernet header.
pub const MAX_FRAME_LEN: usize = 65_536 + ETH_HLEN;

/// Longest TX chain: header plus [`MAX_FRAME_LEN`] (65 562 bytes, the
/// size Linux gives each RX buffer without mergeable buffers once it
/// accepted a segmentation offload).
pub const MAX_CHAIN_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;

/// Most buffers in one TX chain (after the header), well inside the
/// kernel's 1024 iovecs per `writev` even when guest memory regions split
/// some of them.
pub const MAX_SEGMENTS: usize = 256;

/// `virtio_net_hdr_v1`, read once from the guest, little-endian fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHeader {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`, with the ECN bit.
    pub gso_type: u8,
    /// Length of the headers to copy into each segment.
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where the checksum goes, from `csum_start`.
    pub csum_offset: u16,
    /// Buffers a received frame spans (mergeable RX buffers only).
    pub num_buffers: u16,
}

impl VnetHeader {
    /// Decode the 12 bytes.
    pub fn from_bytes(b: &[u8; VNET_HDR_LEN]) -> Self {
        let le = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHeader {
            flags: b[0],
            gso_type: b[1],
            hdr_len: le(2),
            gso_size: le(4),
            csum_start: le(6),
            csum_offset: le(8),
            num_buffers: le(10),
        }
    }

    /// Encode as 12 bytes.
    pub fn to_bytes(&self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        for (i, v) in [
            (2, self.hdr_len),
            (4, self.gso_size),
            (6, self.csum_start),
            (8, self.csum_offset),
            (10, self.num_buffers),
        ] {
            b[i..i + 2].copy_from_slice(&v.to_le_bytes());
        }
        b
    }
}

/// Why a TX chain is dropped. Each has a short fixed reason for the fault
/// table and the drop counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TxError {
    /// A descriptor the device would have to write (TX buffers are all
    /// device-readable).
    #[error("a TX descriptor is device-writable")]
    Writable,
    /// A buffer lies outside guest memory.
    #[error("a TX buffer at {addr:#x} ({len} bytes) is outside guest memory")]
    OutOfMemory {
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// Shorter than a header and an Ethernet header.
    #[error("the TX chain holds {0} bytes, less than a header and an Ethernet header")]
    TooShort(usize),
    /// More than [`MAX_SEGMENTS`] buffers.
    #[error("the TX chain has more than {MAX_SEGMENTS} buffers")]
    TooManySegments,
    /// Longer than [`MAX_CHAIN_LEN`].
    #[error("the TX chain holds more than {MAX_CHAIN_LEN} bytes")]
    TooLong,
    /// Header flags the device does not know, or a checksum request
    /// without `VIRTIO_NET_F_CSUM` or reaching past the frame.
    #[error("the TX header asks for a checksum the device cannot do")]
    BadChecksum,
    /// A segmentation type the driver did not negotiate, or one without a
    /// segment size or checksum request.
    #[error("the TX header asks for segmentation the device did not offer")]
    BadGso,
}

impl TxError {
    /// The fixed reason, for counters and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            TxError::Writable => "device-writable TX descriptor",
            TxError::OutOfMemory { .. } => "TX buffer outside guest memory",
            TxError::TooShort(_) => "TX frame too short",
            TxError::TooLong => "TX frame too long",
            TxError::TooManySegments => "TX chain with too many buffers",
            TxError::BadChecksum => "bad TX checksum request",
            TxError::BadGso => "bad TX segmentation request",
        }
    }
}

/// A checked TX chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxFrame {
    /// The frame's buffers after the header, each inside guest memory, in
    /// order. Zero-length buffers are left out.
    pub segments: Vec<(GuestAddress, u32)>,
    /// Header plus frame bytes.
    pub len: usize,
    /// The header to send: the guest's, checked and cleaned.
    pub header: VnetHeader,
}

/// Parse a TX chain against the features the driver accepted.
pub fn parse_tx<M: GuestMemory>(
    chain: DescriptorChain<&M>,
    acked_features: u64,
) -> Result<TxFrame, TxError> {
    let mem = chain.memory();
    let mut segments = Vec::new();
    let mut len = 0usize;
    let mut header = [0u8; VNET_HDR_LEN];
    let mut header_filled = 0usize;
    // The walk is bounded by virtio-queue (the queue size, or the indirect
    // table's), which ends a looped chain or one with a bad next index
    // there: the frame is then what the guest linked, its own data.
    for desc in chain.clone() {
        if desc.is_write_only() {
            return Err(TxError::Writable);
        }
        let (addr, desc_len) = (desc.addr(), desc.len());
        if desc_len == 0 {
            continue;
        }
        // u32 always fits usize on the 64-bit hosts chitin runs on.
        let n = desc_len as usize;
        if !mem.check_range(addr, n) {
            return Err(TxError::OutOfMemory {
                addr: addr.raw_value(),
                len: desc_len,
            });
        }
        len = len.saturating_add(n);
        if len > MAX_CHAIN_LEN {
            return Err(TxError::TooLong);
        }
        let mut skip = 0usize;
        if header_filled < VNET_HDR_LEN {
            let take = (VNET_HDR_LEN - header_filled).min(n);
            mem.read_slice(&mut header[header_filled..header_filled + take], addr)
                .map_err(|_| TxError::OutOfMemory {
                    addr: addr.raw_value(),
                    len: desc_len,
                })?;
            header_filled += take;
            skip = take;
        }
        if skip < n {
            if segments.len() == MAX_SEGMENTS {
                return Err(TxError::TooManySegments);
            }
            // `skip` < 12: fits, and inside the checked range.
            segments.push((addr.unchecked_add(skip as u64), desc_len - skip as u32));
        }
    }
    if len < VNET_HDR_LEN + ETH_HLEN {
        return Err(TxError::TooShort(len));
    }
    let mut header = VnetHeader::from_bytes(&header);
    check_header(&header, len - VNET_HDR_LEN, acked_features)?;
    // The device ignores flag bits it does not know (virtio 1.2
    // §5.1.6.2.2) and num_buffers on transmit; a header length past the
    // frame would only make the host kernel refuse the write.
    header.flags &= VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
    header.num_buffers = 0;
    header.hdr_len = header
        .hdr_len
        .min(u16::try_from(len - VNET_HDR_LEN).unwrap_or(u16::MAX));
    Ok(TxFrame {
        segments,
        len,
        header,
    })
}

fn acked(features: u64, bit: u32) -> bool {
    features & (1 << bit) != 0
}

/// Check a TX header against the frame length and the accepted features.
pub fn check_header(h: &VnetHeader, frame_len: usize, features: u64) -> Result<(), TxError> {
    // Other flag bits are ignored, not refused (virtio 1.2 §5.1.6.2.2).
    let needs_csum = h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM as u8 != 0;
    if needs_csum {
        let end = usize::from(h.csum_start) + usize::from(h.csum_offset) + 2;
        if !acked(features, VIRTIO_NET_F_CSUM) || end > frame_len {
            return Err(TxError::BadChecksum);
        }
    }
    let ecn = h.gso_type & VIRTIO_NET_HDR_GSO_ECN as u8 != 0;
    let gso = h.gso_type & !(VIRTIO_NET_HDR_GSO_ECN as u8);
    let (feature, tcp) = match u32::from(gso) {
        VIRTIO_NET_HDR_GSO_NONE => return if ecn { Err(TxError::BadGso) } else { Ok(()) },
        VIRTIO_NET_HDR_GSO_TCPV4 => (VIRTIO_NET_F_HOST_TSO4, true),
        VIRTIO_NET_HDR_GSO_TCPV6 => (VIRTIO_NET_F_HOST_TSO6, true),
        VIRTIO_NET_HDR_GSO_UDP => (VIRTIO_NET_F_HOST_UFO, false),
        _ => return Err(TxError::BadGso),
    };
    // ECN marks only TCP segmentation, and only with HOST_ECN.
    if ecn && (!tcp || !acked(features, VIRTIO_NET_F_HOST_ECN)) {
        return Err(TxError::BadGso);
    }
    // Segmentation needs a segment size and a partial checksum to finish.
    if !acked(features, feature) || h.gso_size == 0 || !needs_csum {
        return Err(TxError::BadGso);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use chitin_virtio::test_utils::{guest_memory, SplitQueueBuilder, TestDescriptor};
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::QueueOwnedT;

    use super::*;

    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;
    const DATA: u64 = 0x10_0000;
    const ALL: u64 = (1 << VIRTIO_NET_F_CSUM)
        | (1 << VIRTIO_NET_F_HOST_TSO4)
        | (1 << VIRTIO_NET_F_HOST_TSO6)
        | (1 << VIRTIO_NET_F_HOST_UFO);

    /// A descriptor: address, length, flags.
    type Desc = (u64, u32, u16);

    /// Parse the one chain `descs` make (NEXT is added between them) over
    /// memory whose bytes at `DATA` are `bytes`.
    fn parse(descs: &[Desc], bytes: &[u8], features: u64) -> Result<TxFrame, TxError> {
        let mem = guest_memory(0x40_0000);
        mem.write_slice(bytes, GuestAddress(DATA)).unwrap();
        let mut builder = SplitQueueBuilder::new(&mem, GuestAddress(0), 16).unwrap();
        let last = descs.len() - 1;
        let descs: Vec<TestDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(a, l, f))| TestDescriptor::new(a, l, if i < last { f | NEXT } else { f }))
            .collect();
        builder.add_chain(&descs).unwrap();
        let mut queue = builder.build().unwrap();
        let chain = queue.iter(&mem).unwrap().next().unwrap();
        parse_tx(chain, features)
    }

    fn header(h: VnetHeader) -> Vec<u8> {
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend((0..1500).map(|i| i as u8));
        bytes
    }

    #[test]
    fn a_frame_in_one_buffer_or_split_anywhere_parses_the_same() {
        let h = VnetHeader {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 0,
        };
        let bytes = header(h);
        let one = parse(&[(DATA, 1512, 0)], &bytes, ALL).unwrap();
        assert_eq!(one.header, h);
        assert_eq!(one.len, 1512);
        assert_eq!(one.segments, vec![(GuestAddress(DATA + 12), 1500)]);
        // The header itself split 5 + 7, then the frame in two pieces,
        // with an empty descriptor between.
        let split = parse(
            &[
                (DATA, 5, 0),
                (DATA + 5, 7, 0),
                (DATA + 12, 0, 0),
                (DATA + 12, 100, 0),
                (DATA + 112, 1400, 0),
            ],
            &bytes,
            ALL,
        )
        .unwrap();
        assert_eq!(split.header, h);
        assert_eq!(split.len, 1512);
        assert_eq!(
            split.segments,
            vec![
                (GuestAddress(DATA + 12), 100),
                (GuestAddress(DATA + 112), 1400)
            ]
        );
        // The header split 5 + 20: the frame starts 7 bytes into the second.
        let mid = parse(&[(DATA, 5, 0), (DATA + 5, 1507, 0)], &bytes, ALL).unwrap();
        assert_eq!(mid.segments, vec![(GuestAddress(DATA + 12), 1500)]);
    }

    #[test]
    fn the_sent_header_is_cleaned() {
        let h = VnetHeader {
            flags: 0xfe | VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
            hdr_len: 60_000,
            csum_start: 34,
            csum_offset: 16,
            num_buffers: 77,
            ..VnetHeader::default()
        };
        let frame = parse(&[(DATA, 1512, 0)], &header(h), ALL).unwrap();
        assert_eq!(frame.header.flags, VIRTIO_NET_HDR_F_NEEDS_CSUM as u8);
        assert_eq!(frame.header.hdr_len, 1500);
        assert_eq!(frame.header.num_buffers, 0);
    }

    #[test]
    fn more_buffers_than_the_cap_are_refused() {
        let mem = guest_memory(0x40_0000);
        mem.write_slice(&header(VnetHeader::default()), GuestAddress(DATA))
            .unwrap();
        let mut builder = SplitQueueBuilder::new(&mem, GuestAddress(0), 1024).unwrap();
        let descs: Vec<TestDescriptor> = (0..=MAX_SEGMENTS as u64 + 1)
            .map(|i| TestDescriptor::new(DATA + i * 12, 12, NEXT))
            .collect();
        builder.add_chain(&descs).unwrap();
        let mut queue = builder.build().unwrap();
        let chain = queue.iter(&mem).unwrap().next().unwrap();
        assert_eq!(parse_tx(chain, 0), Err(TxError::TooManySegments));
    }

    #[test]
    fn every_malformed_chain_class_is_refused() {
        let plain = header(VnetHeader::default());
        let cases: &[(&[Desc], TxError)] = &[
            (&[(DATA, 12, 0), (DATA + 12, 100, WRITE)], TxError::Writable),
            (&[(DATA, 100, WRITE)], TxError::Writable),
            (
                &[(DATA, 12, 0), (0x3f_ff00, 0x200, 0)],
                TxError::OutOfMemory {
                    addr: 0x3f_ff00,
                    len: 0x200,
                },
            ),
            (
                &[(u64::MAX - 4, 100, 0)],
                TxError::OutOfMemory {
                    addr: u64::MAX - 4,
                    len: 100,
                },
            ),
            (
                &[(DATA, u32::MAX, 0)],
                TxError::OutOfMemory {
                    addr: DATA,
                    len: u32::MAX,
                },
            ),
            (&[(DATA, 0, 0)], TxError::TooShort(0)),
            (&[(DATA, 0, 0), (DATA, 0, 0)], TxError::TooShort(0)),
            (&[(DATA, 8, 0)], TxError::TooShort(8)),
            (&[(DATA, 25, 0)], TxError::TooShort(25)),
            (
                &[(DATA, 0x1_0000, 0), (DATA, 0x1_0000, 0)],
                TxError::TooLong,
            ),
            (&[(DATA, MAX_CHAIN_LEN as u32 + 1, 0)], TxError::TooLong),
        ];
        for (descs, want) in cases {
            assert_eq!(parse(descs, &plain, ALL), Err(*want), "{descs:x?}");
        }
        // The longest chain passes.
        assert!(parse(&[(DATA, MAX_CHAIN_LEN as u32, 0)], &plain, ALL).is_ok());
    }

    #[test]
    fn a_looping_chain_ends_at_the_queue_size() {
        let mem = guest_memory(0x40_0000);
        mem.write_slice(&header(VnetHeader::default()), GuestAddress(DATA))
            .unwrap();
        let mut builder = SplitQueueBuilder::new(&mem, GuestAddress(0), 16).unwrap();
        // Descriptor 0 points at itself.
        builder
            .write_chain(&[TestDescriptor::new(DATA, 100, NEXT).with_next(0)])
            .unwrap();
        builder.publish(0).unwrap();
        let mut queue = builder.build().unwrap();
        let chain = queue.iter(&mem).unwrap().next().unwrap();
        let frame = parse_tx(chain, 0).unwrap();
        // Sixteen visits of the one descriptor, the first holding the
        // header.
        assert_eq!(frame.len, 16 * 100);
        assert_eq!(frame.segments.len(), 16);
    }

    #[test]
    fn headers_are_checked_against_the_accepted_features() {
        let csum = |start: u16, offset: u16| VnetHeader {
            flags: VIRTIO_NET_HDR_F_NEEDS_CSUM as u8,
            csum_start: start,
            csum_offset: offset,
            ..VnetHeader::default()
        };
        let gso = |kind: u32, size: u16| VnetHeader {
            gso_type: kind as u8,
            gso_size: size,
            ..csum(34, 16)
        };
        let frame = 1500;
        let csum_only = 1 << VIRTIO_NET_F_CSUM;
        let cases = [
            (VnetHeader::default(), 0, Ok(())),
            (csum(34, 16), csum_only, Ok(())),
            (csum(34, 16), 0, Err(TxError::BadChecksum)),
            (csum(1490, 8), csum_only, Ok(())),
            (csum(1490, 9), csum_only, Err(TxError::BadChecksum)),
            (
                csum(u16::MAX, u16::MAX),
                csum_only,
                Err(TxError::BadChecksum),
            ),
            (
                VnetHeader {
                    flags: 0x80,
                    ..VnetHeader::default()
                },
                ALL,
                Ok(()),
            ),
            (gso(VIRTIO_NET_HDR_GSO_TCPV4, 1448), ALL, Ok(())),
            (gso(VIRTIO_NET_HDR_GSO_TCPV6, 1428), ALL, Ok(())),
            (gso(VIRTIO_NET_HDR_GSO_UDP, 1472), ALL, Ok(())),
            (
                gso(VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN, 1448),
                ALL,
                Err(TxError::BadGso),
            ),
            (
                gso(VIRTIO_NET_HDR_GSO_TCPV4 | VIRTIO_NET_HDR_GSO_ECN, 1448),
                ALL | (1 << VIRTIO_NET_F_HOST_ECN),
                Ok(()),
            ),
            (
                gso(VIRTIO_NET_HDR_GSO_UDP | VIRTIO_NET_HDR_GSO_ECN, 1448),
                ALL | (1 << VIRTIO_NET_F_HOST_ECN),
                Err(TxError::BadGso),
            ),
            (
                gso(VIRTIO_NET_HDR_GSO_TCPV4, 1448),
                csum_only,
                Err(TxError::BadGso),
            ),
            (
                gso(VIRTIO_NET_HDR_GSO_TCPV6, 1448),
                csum_only | (1 << VIRTIO_NET_F_HOST_TSO4),
                Err(TxError::BadGso),
            ),
            (gso(VIRTIO_NET_HDR_GSO_TCPV4, 0), ALL, Err(TxError::BadGso)),
            (gso(2, 1448), ALL, Err(TxError::BadGso)),
            (gso(5, 1448), ALL, Err(TxError::BadGso)),
            (gso(VIRTIO_NET_HDR_GSO_ECN, 0), ALL, Err(TxError::BadGso)),
            (
                VnetHeader {
                    gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
                    gso_size: 1448,
                    ..VnetHeader::default()
                },
                ALL,
                Err(TxError::BadGso),
            ),
        ];
        for (h, features, want) in cases {
            assert_eq!(
                check_header(&h, frame, features),
                want,
                "{h:?} {features:#x}"
            );
        }
    }

    #[test]
    fn headers_round_trip_through_bytes() {
        let h = VnetHeader {
            flags: 1,
            gso_type: 4,
            hdr_len: 0x1234,
            gso_size: 0x5678,
            csum_start: 0x9abc,
            csum_offset: 0xdef0,
            num_buffers: 0x0102,
        };
        assert_eq!(VnetHeader::from_bytes(&h.to_bytes()), h);
        assert_eq!(h.to_bytes()[2..4], [0x34, 0x12]);
    }
}
