//! vsock packets (virtio 1.2 §5.10.6): the 44-byte `struct
//! virtio_vsock_hdr` and the buffers around it.
//!
//! TX chains (driver to device) are parsed with `virtio-vsock`'s
//! [`VsockPacket`], which checks that the header and `len` bytes of data lie
//! in device-readable descriptors inside guest memory; the header is then
//! copied once into a [`Header`], so the guest cannot change it between
//! check and use. RX chains (device to driver) become an [`RxBuffer`]: a
//! device-writable header slot and a data area of at most
//! [`MAX_PKT_DATA`] bytes.
//!
//! Nothing here allocates by a guest length, writes guest memory outside the
//! chain, or panics.

use virtio_queue::DescriptorChain;
use virtio_vsock::packet::{Error as VsockPacketError, VsockPacket, PKT_HEADER_SIZE};
use vm_memory::{Bytes, GuestMemoryMmap, VolatileMemoryError};

/// The host's CID (virtio 1.2 §5.10.4: 2 is the host).
pub const HOST_CID: u64 = 2;

/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type this device supports.
pub const TYPE_STREAM: u16 = 1;

/// Length of `struct virtio_vsock_hdr`.
pub const HEADER_LEN: usize = PKT_HEADER_SIZE;

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

/// Why a chain is not a usable vsock packet or receive buffer.
#[derive(Debug, thiserror::Error)]
pub enum PacketError {
    /// `virtio-vsock` refused the chain: header descriptor too short or
    /// device-writable, data shorter than `len` or missing, `len` above
    /// [`MAX_PKT_DATA`], buffers outside guest memory, wrong direction.
    #[error("malformed vsock descriptor chain")]
    Chain(#[source] VsockPacketError),
    /// A guest buffer could not be accessed.
    #[error("cannot access a vsock buffer in guest memory")]
    Memory(#[source] VolatileMemoryError),
    /// More data than the receive buffer holds.
    #[error("{len} data bytes do not fit a receive buffer of {capacity}")]
    TooLong {
        /// Bytes to write.
        len: usize,
        /// Room in the buffer.
        capacity: usize,
    },
}

/// A parsed TX packet: the copied header and, when `len > 0`, exactly `len`
/// bytes of checked device-readable data.
#[derive(Debug)]
pub struct TxPacket<'a> {
    header: Header,
    packet: VsockPacket<'a, ()>,
}

impl TxPacket<'_> {
    /// The header, read once.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// Copy the `len` data bytes into the front of `buf`. Fails if `buf` is
    /// too short (it never is for a `buf` of [`MAX_PKT_DATA`] bytes).
    pub fn read_data(&self, buf: &mut [u8]) -> Result<usize, PacketError> {
        let len = self.header.len as usize;
        if len == 0 {
            return Ok(0);
        }
        let capacity = buf.len();
        let dst = buf
            .get_mut(..len)
            .ok_or(PacketError::TooLong { len, capacity })?;
        let Some(data) = self.packet.data_slice() else {
            return Err(PacketError::TooLong { len, capacity: 0 });
        };
        data.read_slice(dst, 0).map_err(PacketError::Memory)?;
        Ok(len)
    }
}

/// Parse a TX chain (virtio 1.2 §5.10.6.1): a device-readable header,
/// followed by `len` data bytes in the same descriptor or the next one.
pub fn parse_tx<'a>(
    mem: &'a GuestMemoryMmap,
    chain: &mut DescriptorChain<&'a GuestMemoryMmap>,
) -> Result<TxPacket<'a>, PacketError> {
    let packet =
        VsockPacket::from_tx_virtq_chain(mem, chain, MAX_PKT_DATA).map_err(PacketError::Chain)?;
    let mut raw = [0u8; HEADER_LEN];
    packet
        .header_slice()
        .read_slice(&mut raw, 0)
        .map_err(PacketError::Memory)?;
    Ok(TxPacket {
        header: Header::from_bytes(&raw),
        packet,
    })
}

/// The header of a chain that [`parse_tx`] refused, if its first descriptor
/// is device-readable and holds a whole header: enough to address a reset.
pub fn peek_header(
    mem: &GuestMemoryMmap,
    chain: &DescriptorChain<&GuestMemoryMmap>,
) -> Option<Header> {
    let head = chain.clone().next()?;
    if head.is_write_only() || (head.len() as usize) < HEADER_LEN {
        return None;
    }
    let mut raw = [0u8; HEADER_LEN];
    mem.read_slice(&mut raw, head.addr()).ok()?;
    Some(Header::from_bytes(&raw))
}

/// A device-writable RX buffer: room for a header and up to
/// [`RxBuffer::capacity`] data bytes.
#[derive(Debug)]
pub struct RxBuffer<'a> {
    packet: VsockPacket<'a, ()>,
}

/// Parse an RX chain: a device-writable header, then data room in the same
/// descriptor or the next one.
pub fn parse_rx<'a>(
    mem: &'a GuestMemoryMmap,
    chain: &mut DescriptorChain<&'a GuestMemoryMmap>,
) -> Result<RxBuffer<'a>, PacketError> {
    let packet =
        VsockPacket::from_rx_virtq_chain(mem, chain, MAX_PKT_DATA).map_err(PacketError::Chain)?;
    Ok(RxBuffer { packet })
}

impl RxBuffer<'_> {
    /// Data bytes the buffer takes, at most [`MAX_PKT_DATA`].
    pub fn capacity(&self) -> usize {
        self.packet
            .data_slice()
            .map_or(0, |data| data.len())
            .min(MAX_PKT_DATA as usize)
    }

    /// Write `data` at the start of the data area.
    pub fn write_data(&self, data: &[u8]) -> Result<(), PacketError> {
        if data.is_empty() {
            return Ok(());
        }
        let capacity = self.capacity();
        let too_long = PacketError::TooLong {
            len: data.len(),
            capacity,
        };
        if data.len() > capacity {
            return Err(too_long);
        }
        let Some(slot) = self.packet.data_slice() else {
            return Err(too_long);
        };
        slot.write_slice(data, 0).map_err(PacketError::Memory)
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
        self.packet
            .set_header_from_raw(&header.to_bytes())
            .map_err(PacketError::Chain)?;
        // `len <= MAX_PKT_DATA`, so this cannot overflow.
        Ok(HEADER_LEN as u32 + header.len)
    }
}

#[cfg(test)]
mod tests;
