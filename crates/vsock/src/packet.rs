//! vsock packets (virtio 1.2 §5.10.6): the 44-byte `struct
//! virtio_vsock_hdr` and the buffers around it.
//!
//! The device must not assume how the driver splits a packet into
//! descriptors (virtio 1.2 §2.7.4, message framing), and drivers differ:
//! Linux up to 6.6 sends a header descriptor and one data descriptor; from
//! 6.7 on it sends a non-linear socket buffer as the header plus one
//! descriptor per page fragment, and its receive buffers are one descriptor
//! holding both header and data. So both directions here see a chain as a
//! byte stream over any number of descriptors (at most
//! [`MAX_DESCRIPTORS`]): the first [`HEADER_LEN`] bytes are the header,
//! wherever the descriptor boundaries fall, and the data follows.
//!
//! - TX chains (driver to device, all device-readable): [`parse_tx`] copies
//!   the header once into a [`Header`] (so the guest cannot change it
//!   between check and use) and then exactly `len` data bytes into the
//!   caller's buffer.
//! - RX chains (device to driver, all device-writable): [`parse_rx`] checks
//!   every descriptor against guest memory once and keeps them in an
//!   [`RxBuffer`], which writes the data and then the header across them.
//!
//! Nothing here allocates by a guest length, touches guest memory outside
//! the chain's checked buffers, or panics.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError};

/// The host's CID (virtio 1.2 §5.10.4: 2 is the host).
pub const HOST_CID: u64 = 2;

/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type this device supports.
pub const TYPE_STREAM: u16 = 1;

/// Length of `struct virtio_vsock_hdr`.
pub const HEADER_LEN: usize = 44;

/// Most descriptors one vsock chain may have. Linux sends at most a header,
/// a linear part and `CONFIG_MAX_SKB_FRAGS` (17 by default, 45 at most)
/// page fragments; longer chains are refused, which bounds the work and the
/// state per chain.
pub const MAX_DESCRIPTORS: usize = 64;

/// Largest data payload of one packet in either direction: 64 KiB, as Linux
/// and Firecracker use. Longer TX packets are refused.
pub const MAX_PKT_DATA: u32 = 64 * 1024;

/// `VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE`: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `VIRTIO_VSOCK_SHUTDOWN_F_SEND`: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// Packet operations (virtio 1.2 §5.10.6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Op {
    /// Connection request.
    Request = 1,
    /// Connection accepted.
    Response = 2,
    /// Reset: the connection is gone (or never existed).
    Rst = 3,
    /// Half or full close; `flags` carry [`SHUTDOWN_RCV`] / [`SHUTDOWN_SEND`].
    Shutdown = 4,
    /// Data.
    Rw = 5,
    /// Unsolicited credit information.
    CreditUpdate = 6,
    /// Ask the peer for a credit update.
    CreditRequest = 7,
}

impl Op {
    /// The operation for a raw `op` field, if known.
    pub fn from_raw(raw: u16) -> Option<Op> {
        Some(match raw {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }
}

/// A local copy of `struct virtio_vsock_hdr` (all fields little-endian on
/// the wire).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context ID.
    pub src_cid: u64,
    /// Destination context ID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Data bytes following the header.
    pub len: u32,
    /// Socket type (only [`TYPE_STREAM`] is supported).
    pub type_: u16,
    /// Raw operation; see [`Op`].
    pub op: u16,
    /// Operation flags (shutdown flags).
    pub flags: u32,
    /// Receive buffer space of the sender.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, wrapping.
    pub fwd_cnt: u32,
}

impl Header {
    /// The header as the wire bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut bytes = [0u8; HEADER_LEN];
        bytes[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        bytes[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        bytes[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        bytes[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        bytes[24..28].copy_from_slice(&self.len.to_le_bytes());
        bytes[28..30].copy_from_slice(&self.type_.to_le_bytes());
        bytes[30..32].copy_from_slice(&self.op.to_le_bytes());
        bytes[32..36].copy_from_slice(&self.flags.to_le_bytes());
        bytes[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        bytes[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        bytes
    }

    /// The header from its wire bytes.
    pub fn from_bytes(bytes: &[u8; HEADER_LEN]) -> Header {
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let u32_at = |at: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&bytes[at..at + 4]);
            u32::from_le_bytes(b)
        };
        let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// The operation, if known.
    pub fn op(&self) -> Option<Op> {
        Op::from_raw(self.op)
    }

    /// A stream header from the host (`src`) to the guest (`dst`) with no
    /// credit information yet and no data.
    pub fn host_to_guest(guest_cid: u64, src_port: u32, dst_port: u32, op: Op) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op: op as u16,
            ..Header::default()
        }
    }
}

/// Which way a chain goes, for naming faults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Driver to device: the TX queue.
    Tx,
    /// Device to driver: the RX queue.
    Rx,
}

/// Why a chain is not a usable vsock packet or receive buffer.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// More than [`MAX_DESCRIPTORS`] descriptors.
    #[error("chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    /// A device-writable descriptor in a TX chain, or a device-readable one
    /// in an RX chain.
    #[error("descriptor {index} has the wrong direction")]
    WrongDirection {
        /// Position of the descriptor in the chain.
        index: usize,
    },
    /// A buffer not (entirely) inside guest memory.
    #[error("buffer at {addr:#x} of {len} bytes is outside guest memory")]
    OutsideGuestMemory {
        /// Guest physical address of the buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// The chain holds fewer bytes than a header.
    #[error("chain holds {len} bytes, less than a {HEADER_LEN}-byte header")]
    HeaderTooShort {
        /// Bytes the chain holds.
        len: u64,
    },
    /// The header announces more data than a packet may carry.
    #[error("header announces {len} data bytes, more than {MAX_PKT_DATA}")]
    DataTooLong {
        /// The header's `len`.
        len: u32,
    },
    /// The header announces more data than the chain holds after it.
    #[error("header announces {len} data bytes, the chain holds {available}")]
    DataShort {
        /// The header's `len`.
        len: u32,
        /// Data bytes the chain holds.
        available: usize,
    },
    /// A checked guest buffer could not be accessed after all.
    #[error("cannot access a vsock buffer in guest memory")]
    Memory(#[source] GuestMemoryError),
    /// More data than the receive buffer or the caller's buffer holds.
    #[error("{len} data bytes do not fit a buffer of {capacity}")]
    TooLong {
        /// Bytes to write.
        len: usize,
        /// Room in the buffer.
        capacity: usize,
    },
}

impl PacketError {
    /// A short fixed name for counting this fault (see
    /// [`chitin_virtio::GuestFaults`]).
    pub fn reason(&self, direction: Direction) -> &'static str {
        use Direction::{Rx, Tx};
        match (direction, self) {
            (Tx, PacketError::TooManyDescriptors) => "tx chain: too many descriptors",
            (Tx, PacketError::WrongDirection { .. }) => "tx chain: device-writable descriptor",
            (Tx, PacketError::OutsideGuestMemory { .. }) => "tx chain: buffer outside guest memory",
            (Tx, PacketError::HeaderTooShort { .. }) => "tx chain: shorter than a header",
            (Tx, PacketError::DataTooLong { .. }) => "tx chain: data length over the limit",
            (Tx, PacketError::DataShort { .. }) => "tx chain: less data than the header says",
            (Tx, PacketError::Memory(_)) => "tx chain: guest memory access failed",
            (Tx, PacketError::TooLong { .. }) => "tx chain: data does not fit",
            (Rx, PacketError::TooManyDescriptors) => "rx buffer: too many descriptors",
            (Rx, PacketError::WrongDirection { .. }) => "rx buffer: device-readable descriptor",
            (Rx, PacketError::OutsideGuestMemory { .. }) => "rx buffer: outside guest memory",
            (Rx, PacketError::HeaderTooShort { .. }) => "rx buffer: shorter than a header",
            (Rx, PacketError::DataTooLong { .. } | PacketError::DataShort { .. }) => {
                "rx buffer: bad length"
            }
            (Rx, PacketError::Memory(_)) => "rx buffer: guest memory access failed",
            (Rx, PacketError::TooLong { .. }) => "rx buffer: data does not fit",
        }
    }
}

/// A descriptor's buffer, checked to lie inside guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Segment {
    addr: GuestAddress,
    len: u32,
}

/// Check a descriptor's buffer against guest memory. Zero-length buffers
/// touch no memory and are always accepted.
fn checked<M: GuestMemory>(mem: &M, desc: &Descriptor) -> Result<Segment, PacketError> {
    let segment = Segment {
        addr: desc.addr(),
        len: desc.len(),
    };
    if segment.len == 0 {
        return Ok(segment);
    }
    // The last byte must not wrap around the address space.
    let wraps = segment
        .addr
        .checked_add(u64::from(segment.len) - 1)
        .is_none();
    if wraps || !mem.check_range(segment.addr, segment.len as usize) {
        return Err(PacketError::OutsideGuestMemory {
            addr: segment.addr.raw_value(),
            len: segment.len,
        });
    }
    Ok(segment)
}

/// A parsed TX packet: the copied header and how many data bytes were
/// copied into the caller's buffer (exactly the header's `len`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxPacket {
    header: Header,
    data_len: usize,
}

impl TxPacket {
    /// The header, read once.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Data bytes copied to the front of the caller's buffer.
    pub fn data_len(&self) -> usize {
        self.data_len
    }
}

/// A TX chain [`parse_tx`] refused: why, and the header if the chain held a
/// whole one (enough to address a reset to the sender).
#[derive(Debug)]
pub struct TxRefused {
    /// The header, if the first [`HEADER_LEN`] bytes could be read.
    pub header: Option<Header>,
    /// Why the chain is not a packet.
    pub error: PacketError,
}

/// Parse a TX chain (virtio 1.2 §5.10.6): device-readable descriptors
/// holding a header and then at least `len` data bytes, split any way.
/// The data is copied into the front of `data`, which must hold `len`
/// bytes ([`MAX_PKT_DATA`] always does). Bytes past `len` are ignored.
pub fn parse_tx<M: GuestMemory>(
    mem: &M,
    descriptors: impl IntoIterator<Item = Descriptor>,
    data: &mut [u8],
) -> Result<TxPacket, TxRefused> {
    let mut raw = [0u8; HEADER_LEN];
    let mut header_bytes = 0usize;
    let mut header: Option<Header> = None;
    let mut copied = 0usize;
    let refuse = |header, error| Err(TxRefused { header, error });
    for (index, desc) in descriptors.into_iter().enumerate() {
        if index >= MAX_DESCRIPTORS {
            return refuse(header, PacketError::TooManyDescriptors);
        }
        if desc.is_write_only() {
            return refuse(header, PacketError::WrongDirection { index });
        }
        let segment = match checked(mem, &desc) {
            Ok(segment) => segment,
            Err(error) => return refuse(header, error),
        };
        let mut offset = 0usize;
        let seg_len = segment.len as usize;
        if header_bytes < HEADER_LEN {
            let n = (HEADER_LEN - header_bytes).min(seg_len);
            if let Err(e) = mem.read_slice(&mut raw[header_bytes..header_bytes + n], segment.addr) {
                return refuse(header, PacketError::Memory(e));
            }
            header_bytes += n;
            offset = n;
            if header_bytes == HEADER_LEN {
                let parsed = Header::from_bytes(&raw);
                header = Some(parsed);
                if parsed.len > MAX_PKT_DATA {
                    return refuse(header, PacketError::DataTooLong { len: parsed.len });
                }
                if parsed.len as usize > data.len() {
                    let error = PacketError::TooLong {
                        len: parsed.len as usize,
                        capacity: data.len(),
                    };
                    return refuse(header, error);
                }
            }
        }
        let Some(parsed) = header else {
            continue;
        };
        let want = parsed.len as usize - copied;
        let n = want.min(seg_len - offset);
        if n > 0 {
            // `offset <= HEADER_LEN` and the segment was checked, so the
            // address cannot wrap.
            let at = segment.addr.unchecked_add(offset as u64);
            if let Err(e) = mem.read_slice(&mut data[copied..copied + n], at) {
                return refuse(header, PacketError::Memory(e));
            }
            copied += n;
        }
    }
    let Some(parsed) = header else {
        let error = PacketError::HeaderTooShort {
            len: header_bytes as u64,
        };
        return refuse(None, error);
    };
    if copied < parsed.len as usize {
        let error = PacketError::DataShort {
            len: parsed.len,
            available: copied,
        };
        return refuse(header, error);
    }
    Ok(TxPacket {
        header: parsed,
        data_len: copied,
    })
}

/// A device-writable RX buffer: room for a header and up to
/// [`RxBuffer::capacity`] data bytes, over up to [`MAX_DESCRIPTORS`]
/// checked guest buffers.
#[derive(Debug)]
pub struct RxBuffer<'a, M> {
    mem: &'a M,
    segments: [Segment; MAX_DESCRIPTORS],
    count: usize,
    /// Bytes in all segments, header room included.
    total: u64,
}

/// Parse an RX chain: device-writable descriptors holding at least a
/// header, split any way.
pub fn parse_rx<M: GuestMemory>(
    mem: &M,
    descriptors: impl IntoIterator<Item = Descriptor>,
) -> Result<RxBuffer<'_, M>, PacketError> {
    let mut buffer = RxBuffer {
        mem,
        segments: [Segment::default(); MAX_DESCRIPTORS],
        count: 0,
        total: 0,
    };
    for (index, desc) in descriptors.into_iter().enumerate() {
        if index >= MAX_DESCRIPTORS {
            return Err(PacketError::TooManyDescriptors);
        }
        if !desc.is_write_only() {
            return Err(PacketError::WrongDirection { index });
        }
        let segment = checked(mem, &desc)?;
        if segment.len == 0 {
            continue;
        }
        buffer.segments[buffer.count] = segment;
        buffer.count += 1;
        buffer.total += u64::from(segment.len);
    }
    if buffer.total < HEADER_LEN as u64 {
        return Err(PacketError::HeaderTooShort { len: buffer.total });
    }
    Ok(buffer)
}

impl<M: GuestMemory> RxBuffer<'_, M> {
    /// Data bytes the buffer takes, at most [`MAX_PKT_DATA`].
    pub fn capacity(&self) -> usize {
        let room = self.total.saturating_sub(HEADER_LEN as u64);
        room.min(u64::from(MAX_PKT_DATA)) as usize
    }

    /// Write `bytes` at byte `offset` of the chain's stream.
    fn write_at(&self, mut offset: usize, mut bytes: &[u8]) -> Result<(), PacketError> {
        for segment in &self.segments[..self.count] {
            if bytes.is_empty() {
                break;
            }
            let seg_len = segment.len as usize;
            if offset >= seg_len {
                offset -= seg_len;
                continue;
            }
            let n = (seg_len - offset).min(bytes.len());
            // The segment was checked and `offset < seg_len`: no wrap.
            let at = segment.addr.unchecked_add(offset as u64);
            self.mem
                .write_slice(&bytes[..n], at)
                .map_err(PacketError::Memory)?;
            bytes = &bytes[n..];
            offset = 0;
        }
        if bytes.is_empty() {
            Ok(())
        } else {
            Err(PacketError::TooLong {
                len: bytes.len(),
                capacity: self.capacity(),
            })
        }
    }

    /// Write `data` at the start of the data area.
    pub fn write_data(&self, data: &[u8]) -> Result<(), PacketError> {
        let capacity = self.capacity();
        if data.len() > capacity {
            return Err(PacketError::TooLong {
                len: data.len(),
                capacity,
            });
        }
        self.write_at(HEADER_LEN, data)
    }

    /// Write `header`; returns the used length (`HEADER_LEN + header.len`).
    pub fn write_header(&mut self, header: &Header) -> Result<u32, PacketError> {
        let capacity = self.capacity();
        if header.len as usize > capacity {
            return Err(PacketError::TooLong {
                len: header.len as usize,
                capacity,
            });
        }
        self.write_at(0, &header.to_bytes())?;
        // `len <= MAX_PKT_DATA`, so this cannot overflow.
        Ok(HEADER_LEN as u32 + header.len)
    }
}

#[cfg(test)]
mod tests;
