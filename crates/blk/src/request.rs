//! From a descriptor chain to a typed virtio-blk [`Request`] (virtio 1.2
//! §5.2.6).
//!
//! A request is `struct virtio_blk_req { le32 type; le32 reserved; le64
//! sector; u8 data[]; u8 status; }`. The device must not assume anything
//! about how the driver splits it into descriptors (§2.7.4, message framing),
//! so the parser sees two byte streams: the device-readable descriptors (the
//! 16-byte header, then OUT/DISCARD/WRITE_ZEROES payload) and the
//! device-writable ones (IN/GET_ID payload, then the status byte, which is
//! the very last writable byte). Device-readable descriptors must all come
//! before device-writable ones (§2.7.4.2).
//!
//! What this module guarantees:
//! - every guest field (header, discard ranges) is read exactly once, into a
//!   local copy, so the guest cannot change it between check and use;
//! - every [`Segment`] handed out lies inside guest memory and inside the
//!   chain, and respects `seg_max`/`size_max`;
//! - allocations are bounded by device constants ([`MAX_DESCRIPTORS`],
//!   [`MAX_DISCARD_SEG`]), never by a guest-supplied length;
//! - it never writes guest memory and never panics.
//!
//! What it leaves to the handler: checks that need the disk (range against
//! capacity, read-only), and writing the status byte.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryError};

use crate::{
    MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG,
    SECTOR_SIZE, SEG_MAX, SEG_SIZE_MAX,
};

/// Length of the request header: type, reserved, sector.
pub const HEADER_LEN: usize = 16;

/// Length of one `struct virtio_blk_discard_write_zeroes`.
pub const RANGE_LEN: usize = 16;

/// Most descriptors a chain may have: a header, [`SEG_MAX`] data segments and
/// a status. Longer chains are refused (they cannot be a valid request),
/// which also bounds what the parser keeps per chain.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;

/// A guest buffer of a request, checked to lie inside guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    addr: GuestAddress,
    len: u32,
}

impl Segment {
    /// Guest physical address of the first byte.
    pub fn addr(&self) -> GuestAddress {
        self.addr
    }

    /// Length in bytes, never 0.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Always false: the parser never hands out empty segments.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One range of a discard or write-zeroes request, copied out of guest
/// memory and checked against the device limits (but not yet against the
/// disk capacity).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiscardRange {
    sector: u64,
    num_sectors: u32,
    unmap: bool,
}

impl DiscardRange {
    /// First sector of the range.
    pub fn sector(&self) -> u64 {
        self.sector
    }

    /// Number of sectors, at most the device's per-range limit.
    pub fn num_sectors(&self) -> u32 {
        self.num_sectors
    }

    /// Write zeroes only: the device may deallocate the range.
    pub fn unmap(&self) -> bool {
        self.unmap
    }
}

/// A well-formed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `VIRTIO_BLK_T_IN`: read sectors into device-writable `data`.
    In {
        /// First sector to read.
        sector: u64,
        /// Where to put the bytes, in order; a multiple of 512 in total.
        data: Vec<Segment>,
    },
    /// `VIRTIO_BLK_T_OUT`: write device-readable `data` to sectors.
    Out {
        /// First sector to write.
        sector: u64,
        /// The bytes to write, in order; a multiple of 512 in total.
        data: Vec<Segment>,
    },
    /// `VIRTIO_BLK_T_FLUSH`: make completed writes durable.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: copy the device ID string into `data`.
    GetId {
        /// Device-writable buffer for the ID.
        data: Vec<Segment>,
    },
    /// `VIRTIO_BLK_T_DISCARD`: the device may deallocate these ranges.
    Discard {
        /// At most [`MAX_DISCARD_SEG`] ranges.
        ranges: Vec<DiscardRange>,
    },
    /// `VIRTIO_BLK_T_WRITE_ZEROES`: these ranges must read back as zeros.
    WriteZeroes {
        /// At most [`MAX_WRITE_ZEROES_SEG`] ranges.
        ranges: Vec<DiscardRange>,
    },
}

impl Request {
    /// Bytes of disk work the request asks for: the data it moves, or the
    /// bytes its ranges cover (what a fallback to writing zeros writes).
    pub fn work(&self) -> u64 {
        match self {
            Request::In { data, .. } | Request::Out { data, .. } => total_len(data),
            Request::Discard { ranges } | Request::WriteZeroes { ranges } => ranges
                .iter()
                .map(|r| u64::from(r.num_sectors()) << crate::SECTOR_SHIFT)
                .sum(),
            // A flush may write back everything dirty: counted as an eighth
            // of a run, so one run flushes at most eight times.
            Request::Flush => crate::handler::MAX_BYTES_PER_RUN / 8,
            Request::GetId { .. } => 0,
        }
    }
}

/// Why a chain is not a well-formed request.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The chain has no device-writable byte, so no status can be
    /// returned; the request is not executed.
    #[error("chain has no device-writable byte for the status")]
    NoStatus,
    /// A device-readable descriptor follows a device-writable one.
    #[error("device-readable descriptor after a device-writable one")]
    ReadableAfterWritable,
    /// A descriptor of length 0.
    #[error("zero-length descriptor")]
    ZeroLengthDescriptor,
    /// More than [`MAX_DESCRIPTORS`] descriptors.
    #[error("chain has more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    /// Fewer than 16 device-readable bytes for the header.
    #[error("request header is shorter than {HEADER_LEN} bytes")]
    HeaderTooShort,
    /// The header or a discard range could not be read from guest memory.
    #[error("cannot read the request from guest memory")]
    GuestMemory(#[source] GuestMemoryError),
    /// A request type the device does not implement.
    #[error("unsupported request type {0}")]
    UnsupportedType(u32),
    /// More data segments than `seg_max`.
    #[error("{0} data segments, at most {SEG_MAX} allowed")]
    TooManySegments(usize),
    /// A data segment larger than `size_max`.
    #[error("data segment of {0} bytes, at most {SEG_SIZE_MAX} allowed")]
    SegmentTooLarge(u32),
    /// A data segment not (entirely) inside guest memory.
    #[error("data segment at {addr:#x} of {len} bytes is outside guest memory")]
    OutsideGuestMemory {
        /// Guest physical address of the segment.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A read, write or ID request without data.
    #[error("request has no data")]
    NoData,
    /// Read or write data that is not a whole number of sectors.
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    UnalignedLength(u64),
    /// Device-readable payload in a request that takes none.
    #[error("unexpected device-readable data")]
    UnexpectedReadable,
    /// Device-writable payload (besides the status) in a request that
    /// writes none.
    #[error("unexpected device-writable data")]
    UnexpectedWritable,
    /// A discard or write-zeroes payload that is not whole 16-byte ranges.
    #[error("range payload of {0} bytes is not a multiple of {RANGE_LEN}")]
    UnalignedRanges(u64),
    /// More ranges than `max_discard_seg` / `max_write_zeroes_seg`.
    #[error("{count} ranges, at most {max} allowed")]
    TooManyRanges {
        /// Ranges in the request.
        count: u64,
        /// The device limit.
        max: u32,
    },
    /// A range longer than `max_discard_sectors` /
    /// `max_write_zeroes_sectors`.
    #[error("range of {sectors} sectors, at most {max} allowed")]
    RangeTooLarge {
        /// Sectors in the range.
        sectors: u32,
        /// The device limit.
        max: u32,
    },
    /// Reserved flag bits set in a range (§5.2.6.2: UNSUPP).
    #[error("unknown range flags {0:#x}")]
    UnknownFlags(u32),
    /// The unmap flag on a discard range (§5.2.6.2: UNSUPP).
    #[error("unmap flag set on a discard range")]
    DiscardUnmap,
}

impl RequestError {
    /// A short fixed name for counting this fault (see
    /// [`chitin_virtio::GuestFaults`]).
    pub fn reason(&self) -> &'static str {
        match self {
            RequestError::NoStatus => "no status byte",
            RequestError::ReadableAfterWritable => "readable after writable descriptor",
            RequestError::ZeroLengthDescriptor => "zero-length descriptor",
            RequestError::TooManyDescriptors => "too many descriptors",
            RequestError::HeaderTooShort => "header too short",
            RequestError::GuestMemory(_) => "guest memory access failed",
            RequestError::UnsupportedType(_) => "unsupported request type",
            RequestError::TooManySegments(_) => "too many data segments",
            RequestError::SegmentTooLarge(_) => "data segment too large",
            RequestError::OutsideGuestMemory { .. } => "buffer outside guest memory",
            RequestError::NoData => "request without data",
            RequestError::UnalignedLength(_) => "data not whole sectors",
            RequestError::UnexpectedReadable => "unexpected device-readable data",
            RequestError::UnexpectedWritable => "unexpected device-writable data",
            RequestError::UnalignedRanges(_) => "ranges not whole",
            RequestError::TooManyRanges { .. } => "too many ranges",
            RequestError::RangeTooLarge { .. } => "range too large",
            RequestError::UnknownFlags(_) => "unknown range flags",
            RequestError::DiscardUnmap => "unmap flag on discard",
        }
    }
}

/// What the parser made of one chain.
#[derive(Debug)]
pub struct ParsedChain {
    /// Where the status byte goes: the last device-writable byte of the
    /// chain. `None` when the chain has no device-writable byte, so no
    /// status can be reported at all.
    pub status: Option<GuestAddress>,
    /// The request, or why there is none.
    pub request: Result<Request, RequestError>,
}

/// A descriptor's buffer, not yet checked against guest memory.
#[derive(Clone, Copy, Debug)]
struct Piece {
    addr: GuestAddress,
    len: u32,
}

/// The descriptors of a chain, sorted into the two streams.
struct Streams {
    readable: Vec<Piece>,
    writable: Vec<Piece>,
    status: Option<GuestAddress>,
    error: Option<RequestError>,
}

impl Streams {
    /// Walk the chain once. Keeps at most [`MAX_DESCRIPTORS`] pieces, but
    /// walks to the end to find the status byte; the walk itself is bounded
    /// by the descriptor iterator (virtio-queue stops after the queue size,
    /// or the indirect table size, so descriptor loops end).
    fn collect(descriptors: impl IntoIterator<Item = Descriptor>) -> Self {
        let mut streams = Streams {
            readable: Vec::new(),
            writable: Vec::new(),
            status: None,
            error: None,
        };
        let mut count = 0usize;
        let mut seen_writable = false;
        for desc in descriptors {
            count = count.saturating_add(1);
            let piece = Piece {
                addr: desc.addr(),
                len: desc.len(),
            };
            if desc.len() == 0 {
                streams.fail(RequestError::ZeroLengthDescriptor);
            }
            if desc.is_write_only() {
                seen_writable = true;
                if let Some(last) = piece.last_byte() {
                    streams.status = Some(last);
                }
            } else if seen_writable {
                streams.fail(RequestError::ReadableAfterWritable);
            }
            if count > MAX_DESCRIPTORS {
                streams.fail(RequestError::TooManyDescriptors);
            } else if desc.is_write_only() {
                streams.writable.push(piece);
            } else {
                streams.readable.push(piece);
            }
        }
        streams
    }

    /// Remember the first error only.
    fn fail(&mut self, error: RequestError) {
        self.error.get_or_insert(error);
    }
}

impl Piece {
    /// Address of the last byte, if the piece has one.
    fn last_byte(&self) -> Option<GuestAddress> {
        let last = self.len.checked_sub(1)?;
        self.addr.checked_add(u64::from(last))
    }
}

/// Parse one descriptor chain (the descriptors in chain order, as
/// `virtio_queue::DescriptorChain` yields them).
pub fn parse<M: GuestMemory>(
    mem: &M,
    descriptors: impl IntoIterator<Item = Descriptor>,
) -> ParsedChain {
    let mut streams = Streams::collect(descriptors);
    let status = streams.status;
    let request = match (streams.error.take(), status) {
        (Some(error), _) => Err(error),
        (None, None) => Err(RequestError::NoStatus),
        (None, Some(_)) => parse_request(mem, streams),
    };
    ParsedChain { status, request }
}

fn parse_request<M: GuestMemory>(mem: &M, streams: Streams) -> Result<Request, RequestError> {
    let Streams {
        mut readable,
        mut writable,
        ..
    } = streams;
    let mut header = [0u8; HEADER_LEN];
    if !gather(mem, &readable, 0, &mut header).map_err(RequestError::GuestMemory)? {
        return Err(RequestError::HeaderTooShort);
    }
    // The header is now a local copy; `reserved` (bytes 4..8, formerly
    // ioprio) is ignored.
    let request_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);

    // Payloads: readable bytes after the header, writable bytes before the
    // status byte.
    trim_front(&mut readable, HEADER_LEN as u64)?;
    trim_back(&mut writable, 1);

    match request_type {
        VIRTIO_BLK_T_IN => {
            expect_empty(&readable, RequestError::UnexpectedReadable)?;
            let data = sectors(mem, &writable)?;
            Ok(Request::In { sector, data })
        }
        VIRTIO_BLK_T_OUT => {
            expect_empty(&writable, RequestError::UnexpectedWritable)?;
            let data = sectors(mem, &readable)?;
            Ok(Request::Out { sector, data })
        }
        VIRTIO_BLK_T_FLUSH => {
            expect_empty(&readable, RequestError::UnexpectedReadable)?;
            expect_empty(&writable, RequestError::UnexpectedWritable)?;
            Ok(Request::Flush)
        }
        VIRTIO_BLK_T_GET_ID => {
            expect_empty(&readable, RequestError::UnexpectedReadable)?;
            let data = segments(mem, &writable)?;
            if data.is_empty() {
                return Err(RequestError::NoData);
            }
            Ok(Request::GetId { data })
        }
        VIRTIO_BLK_T_DISCARD => {
            expect_empty(&writable, RequestError::UnexpectedWritable)?;
            let limits = RangeLimits {
                max_ranges: MAX_DISCARD_SEG,
                max_sectors: MAX_DISCARD_SECTORS,
                unmap_allowed: false,
            };
            let ranges = ranges(mem, &readable, limits)?;
            Ok(Request::Discard { ranges })
        }
        VIRTIO_BLK_T_WRITE_ZEROES => {
            expect_empty(&writable, RequestError::UnexpectedWritable)?;
            let limits = RangeLimits {
                max_ranges: MAX_WRITE_ZEROES_SEG,
                max_sectors: MAX_WRITE_ZEROES_SECTORS,
                unmap_allowed: true,
            };
            let ranges = ranges(mem, &readable, limits)?;
            Ok(Request::WriteZeroes { ranges })
        }
        other => Err(RequestError::UnsupportedType(other)),
    }
}

fn expect_empty(pieces: &[Piece], error: RequestError) -> Result<(), RequestError> {
    if pieces.is_empty() {
        Ok(())
    } else {
        Err(error)
    }
}

/// Check data pieces against `seg_max`, `size_max` and guest memory.
fn segments<M: GuestMemory>(mem: &M, pieces: &[Piece]) -> Result<Vec<Segment>, RequestError> {
    if pieces.len() > SEG_MAX as usize {
        return Err(RequestError::TooManySegments(pieces.len()));
    }
    let mut checked = Vec::with_capacity(pieces.len());
    for piece in pieces {
        if piece.len > SEG_SIZE_MAX {
            return Err(RequestError::SegmentTooLarge(piece.len));
        }
        // `len` fits in usize: it is at most SEG_SIZE_MAX.
        if !mem.check_range(piece.addr, piece.len as usize) {
            return Err(RequestError::OutsideGuestMemory {
                addr: piece.addr.raw_value(),
                len: piece.len,
            });
        }
        checked.push(Segment {
            addr: piece.addr,
            len: piece.len,
        });
    }
    Ok(checked)
}

/// [`segments`] for read/write data: non-empty whole sectors.
fn sectors<M: GuestMemory>(mem: &M, pieces: &[Piece]) -> Result<Vec<Segment>, RequestError> {
    let data = segments(mem, pieces)?;
    let len = total_len(&data);
    if len == 0 {
        return Err(RequestError::NoData);
    }
    if len % SECTOR_SIZE != 0 {
        return Err(RequestError::UnalignedLength(len));
    }
    Ok(data)
}

/// Total bytes of `segments`.
pub fn total_len(segments: &[Segment]) -> u64 {
    segments.iter().map(|s| u64::from(s.len)).sum()
}

#[derive(Clone, Copy)]
struct RangeLimits {
    max_ranges: u32,
    max_sectors: u32,
    unmap_allowed: bool,
}

/// Copy the discard/write-zeroes ranges out of the payload, checking each.
fn ranges<M: GuestMemory>(
    mem: &M,
    pieces: &[Piece],
    limits: RangeLimits,
) -> Result<Vec<DiscardRange>, RequestError> {
    let payload = segments(mem, pieces)?;
    let len = total_len(&payload);
    if len == 0 {
        return Err(RequestError::NoData);
    }
    if len % RANGE_LEN as u64 != 0 {
        return Err(RequestError::UnalignedRanges(len));
    }
    let count = len / RANGE_LEN as u64;
    if count > u64::from(limits.max_ranges) {
        return Err(RequestError::TooManyRanges {
            count,
            max: limits.max_ranges,
        });
    }
    let pieces: Vec<Piece> = payload
        .iter()
        .map(|s| Piece {
            addr: s.addr,
            len: s.len,
        })
        .collect();
    // `count` is at most `max_ranges`, a device constant.
    let mut ranges = Vec::with_capacity(count as usize);
    for index in 0..count {
        let mut raw = [0u8; RANGE_LEN];
        let offset = index * RANGE_LEN as u64;
        // Cannot come up short: the payload holds `count` whole ranges.
        if !gather(mem, &pieces, offset, &mut raw).map_err(RequestError::GuestMemory)? {
            return Err(RequestError::UnalignedRanges(len));
        }
        ranges.push(range(&raw, limits)?);
    }
    Ok(ranges)
}

/// Decode one `struct virtio_blk_discard_write_zeroes` (little-endian).
fn range(raw: &[u8; RANGE_LEN], limits: RangeLimits) -> Result<DiscardRange, RequestError> {
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&raw[0..8]);
    let sector = u64::from_le_bytes(sector);
    let num_sectors = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
    let flags = u32::from_le_bytes([raw[12], raw[13], raw[14], raw[15]]);

    if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
        return Err(RequestError::UnknownFlags(flags));
    }
    let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
    if unmap && !limits.unmap_allowed {
        return Err(RequestError::DiscardUnmap);
    }
    if num_sectors > limits.max_sectors {
        return Err(RequestError::RangeTooLarge {
            sectors: num_sectors,
            max: limits.max_sectors,
        });
    }
    Ok(DiscardRange {
        sector,
        num_sectors,
        unmap,
    })
}

/// Copy `buf.len()` bytes of the stream `pieces`, starting `skip` bytes in,
/// into `buf`. `Ok(false)` when the stream is too short.
fn gather<M: GuestMemory>(
    mem: &M,
    pieces: &[Piece],
    mut skip: u64,
    buf: &mut [u8],
) -> Result<bool, GuestMemoryError> {
    let mut filled = 0usize;
    for piece in pieces {
        if filled == buf.len() {
            break;
        }
        let len = u64::from(piece.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let start = piece
            .addr
            .checked_add(skip)
            .ok_or(GuestMemoryError::GuestAddressOverflow)?;
        let wanted = buf.len() - filled;
        // Bounded by `wanted`, a usize.
        let count = (len - skip).min(wanted as u64) as usize;
        mem.read_slice(&mut buf[filled..filled + count], start)?;
        filled += count;
        skip = 0;
    }
    Ok(filled == buf.len())
}

/// Drop the first `count` bytes of the stream `pieces`.
fn trim_front(pieces: &mut Vec<Piece>, mut count: u64) -> Result<(), RequestError> {
    let mut consumed = 0;
    for piece in pieces.iter_mut() {
        let len = u64::from(piece.len);
        if count >= len {
            count -= len;
            consumed += 1;
            continue;
        }
        if count > 0 {
            piece.addr = piece
                .addr
                .checked_add(count)
                .ok_or(RequestError::OutsideGuestMemory {
                    addr: piece.addr.raw_value(),
                    len: piece.len,
                })?;
            // `count < len <= u32::MAX`.
            piece.len -= count as u32;
        }
        break;
    }
    pieces.drain(..consumed);
    Ok(())
}

/// Drop the last `count` bytes of the stream `pieces`.
fn trim_back(pieces: &mut Vec<Piece>, mut count: u64) {
    while count > 0 {
        let Some(last) = pieces.last_mut() else { break };
        let len = u64::from(last.len);
        if count >= len {
            count -= len;
            pieces.pop();
        } else {
            // `count < len <= u32::MAX`.
            last.len -= count as u32;
            count = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use vm_memory::GuestMemoryMmap;

    use super::*;

    /// 1 MiB of guest memory at 0: room for every buffer below.
    const MEM_SIZE: usize = 1 << 20;
    const HEADER_ADDR: u64 = 0x1000;
    const DATA_ADDR: u64 = 0x2000;
    const STATUS_ADDR: u64 = 0x8000;
    /// A request type the device does not know (VIRTIO_BLK_T_GET_LIFETIME).
    const T_GET_LIFETIME: u32 = 10;

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
    }

    fn write_header(mem: &GuestMemoryMmap, request_type: u32, sector: u64) {
        let mut header = [0u8; HEADER_LEN];
        header[0..4].copy_from_slice(&request_type.to_le_bytes());
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&header, GuestAddress(HEADER_ADDR)).unwrap();
    }

    fn readable(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, 0, 0)
    }

    fn writable(addr: u64, len: u32) -> Descriptor {
        Descriptor::new(addr, len, VRING_DESC_F_WRITE as u16, 0)
    }

    fn write_range(mem: &GuestMemoryMmap, index: u64, sector: u64, sectors: u32, flags: u32) {
        let mut raw = [0u8; RANGE_LEN];
        raw[0..8].copy_from_slice(&sector.to_le_bytes());
        raw[8..12].copy_from_slice(&sectors.to_le_bytes());
        raw[12..16].copy_from_slice(&flags.to_le_bytes());
        let addr = GuestAddress(DATA_ADDR + index * RANGE_LEN as u64);
        mem.write_slice(&raw, addr).unwrap();
    }

    #[test]
    fn parse_read_in_three_descriptors_gives_in_request() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 7);

        let parsed = parse(
            &mem,
            [
                readable(HEADER_ADDR, 16),
                writable(DATA_ADDR, 1024),
                writable(STATUS_ADDR, 1),
            ],
        );

        assert_eq!(parsed.status, Some(GuestAddress(STATUS_ADDR)));
        let Request::In { sector, data } = parsed.request.unwrap() else {
            panic!("not a read");
        };
        assert_eq!(sector, 7);
        assert_eq!(data.len(), 1);
        assert_eq!(data[0].addr(), GuestAddress(DATA_ADDR));
        assert_eq!(data[0].len(), 1024);
    }

    #[test]
    fn parse_header_and_data_in_one_descriptor_gives_same_request() {
        // Any framing is legal (§2.7.4): here the header and 512 bytes of
        // write data share one device-readable descriptor.
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_OUT, 3);

        let parsed = parse(
            &mem,
            [readable(HEADER_ADDR, 16 + 512), writable(STATUS_ADDR, 1)],
        );

        let Request::Out { sector, data } = parsed.request.unwrap() else {
            panic!("not a write");
        };
        assert_eq!(sector, 3);
        let expected = Segment {
            addr: GuestAddress(HEADER_ADDR + 16),
            len: 512,
        };
        assert_eq!(data, vec![expected]);
    }

    #[test]
    fn parse_header_split_over_descriptors_reads_it_whole() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0x0102_0304_0506_0708);

        let parsed = parse(
            &mem,
            [
                readable(HEADER_ADDR, 5),
                readable(HEADER_ADDR + 5, 11),
                writable(DATA_ADDR, 512),
                writable(STATUS_ADDR, 1),
            ],
        );

        let Request::In { sector, .. } = parsed.request.unwrap() else {
            panic!("not a read");
        };
        assert_eq!(sector, 0x0102_0304_0506_0708);
    }

    #[test]
    fn parse_status_merged_into_data_descriptor_uses_its_last_byte() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);

        // 512 bytes of data and the status byte in one 513-byte buffer.
        let parsed = parse(&mem, [readable(HEADER_ADDR, 16), writable(DATA_ADDR, 513)]);

        assert_eq!(parsed.status, Some(GuestAddress(DATA_ADDR + 512)));
        let Request::In { data, .. } = parsed.request.unwrap() else {
            panic!("not a read");
        };
        assert_eq!(total_len(&data), 512);
    }

    #[test]
    fn parse_no_writable_descriptor_has_no_status() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);

        let parsed = parse(&mem, [readable(HEADER_ADDR, 16)]);

        assert_eq!(parsed.status, None);
        assert!(matches!(parsed.request, Err(RequestError::NoStatus)));
    }

    #[test]
    fn parse_header_of_15_bytes_is_too_short() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);

        let parsed = parse(&mem, [readable(HEADER_ADDR, 15), writable(STATUS_ADDR, 1)]);

        assert!(matches!(parsed.request, Err(RequestError::HeaderTooShort)));
        assert_eq!(parsed.status, Some(GuestAddress(STATUS_ADDR)));
    }

    #[test]
    fn parse_header_outside_memory_is_guest_memory_error() {
        let mem = memory();

        let parsed = parse(
            &mem,
            [readable(MEM_SIZE as u64 - 8, 16), writable(STATUS_ADDR, 1)],
        );

        assert!(matches!(parsed.request, Err(RequestError::GuestMemory(_))));
    }

    #[test]
    fn parse_readable_after_writable_is_refused() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);

        let parsed = parse(
            &mem,
            [
                readable(HEADER_ADDR, 16),
                writable(DATA_ADDR, 512),
                readable(STATUS_ADDR, 1),
            ],
        );

        assert!(matches!(
            parsed.request,
            Err(RequestError::ReadableAfterWritable)
        ));
        // The status goes to the last writable byte the chain has.
        assert_eq!(parsed.status, Some(GuestAddress(DATA_ADDR + 511)));
    }

    #[test]
    fn parse_zero_length_descriptor_is_refused() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);

        let parsed = parse(
            &mem,
            [
                readable(HEADER_ADDR, 16),
                writable(DATA_ADDR, 0),
                writable(STATUS_ADDR, 1),
            ],
        );

        assert!(matches!(
            parsed.request,
            Err(RequestError::ZeroLengthDescriptor)
        ));
    }

    #[test]
    fn parse_more_than_max_descriptors_is_refused_without_keeping_them() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        let data = (0..MAX_DESCRIPTORS as u64).map(|i| writable(DATA_ADDR + i * 512, 512));
        let chain = std::iter::once(readable(HEADER_ADDR, 16))
            .chain(data)
            .chain(std::iter::once(writable(STATUS_ADDR, 1)));

        let parsed = parse(&mem, chain);

        assert!(matches!(
            parsed.request,
            Err(RequestError::TooManyDescriptors)
        ));
        assert_eq!(parsed.status, Some(GuestAddress(STATUS_ADDR)));
    }

    #[test]
    fn parse_seg_max_plus_one_segments_is_refused() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        // SEG_MAX + 1 writable data descriptors of 512 bytes; the last one
        // also carries the status byte, so the chain (header + 255) still
        // fits MAX_DESCRIPTORS and only the segment count is wrong.
        let data_descriptors = u64::from(SEG_MAX) + 1;
        let mut chain = vec![readable(HEADER_ADDR, 16)];
        for i in 0..data_descriptors {
            let len = if i + 1 == data_descriptors { 513 } else { 512 };
            chain.push(writable(DATA_ADDR + i * 512, len));
        }

        let parsed = parse(&mem, chain);

        assert!(matches!(
            parsed.request,
            Err(RequestError::TooManySegments(n)) if n == SEG_MAX as usize + 1
        ));
    }

    #[test]
    fn parse_segment_over_size_max_is_refused() {
        // 4 MiB of memory, so the oversized segment itself is in memory.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);

        let parsed = parse(
            &mem,
            [
                readable(HEADER_ADDR, 16),
                writable(0x10_0000, SEG_SIZE_MAX + 512),
                writable(STATUS_ADDR, 1),
            ],
        );

        assert!(matches!(
            parsed.request,
            Err(RequestError::SegmentTooLarge(_))
        ));
    }

    #[test]
    fn parse_data_outside_memory_is_refused() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);

        let parsed = parse(
            &mem,
            [
                readable(HEADER_ADDR, 16),
                writable(MEM_SIZE as u64 - 256, 512),
                writable(STATUS_ADDR, 1),
            ],
        );

        assert!(matches!(
            parsed.request,
            Err(RequestError::OutsideGuestMemory { .. })
        ));
    }

    #[test]
    fn parse_data_address_wrapping_u64_is_refused() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);

        let parsed = parse(
            &mem,
            [
                readable(HEADER_ADDR, 16),
                writable(u64::MAX - 255, 512),
                writable(STATUS_ADDR, 1),
            ],
        );

        assert!(matches!(
            parsed.request,
            Err(RequestError::OutsideGuestMemory { .. })
        ));
    }

    #[test]
    fn parse_read_of_511_bytes_is_unaligned() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);

        let parsed = parse(
            &mem,
            [
                readable(HEADER_ADDR, 16),
                writable(DATA_ADDR, 511),
                writable(STATUS_ADDR, 1),
            ],
        );

        assert!(matches!(
            parsed.request,
            Err(RequestError::UnalignedLength(511))
        ));
    }

    #[test]
    fn parse_read_without_data_is_refused() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);

        let parsed = parse(&mem, [readable(HEADER_ADDR, 16), writable(STATUS_ADDR, 1)]);

        assert!(matches!(parsed.request, Err(RequestError::NoData)));
    }

    #[test]
    fn parse_write_with_writable_data_is_refused() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_OUT, 0);

        let parsed = parse(
            &mem,
            [
                readable(HEADER_ADDR, 16),
                writable(DATA_ADDR, 512),
                writable(STATUS_ADDR, 1),
            ],
        );

        assert!(matches!(
            parsed.request,
            Err(RequestError::UnexpectedWritable)
        ));
    }

    #[test]
    fn parse_unknown_type_is_unsupported() {
        let mem = memory();
        write_header(&mem, T_GET_LIFETIME, 0);

        let parsed = parse(
            &mem,
            [
                readable(HEADER_ADDR, 16),
                writable(DATA_ADDR, 8),
                writable(STATUS_ADDR, 1),
            ],
        );

        assert!(matches!(
            parsed.request,
            Err(RequestError::UnsupportedType(T_GET_LIFETIME))
        ));
    }

    #[test]
    fn parse_discard_ranges_are_copied() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        write_range(&mem, 0, 8, 16, 0);
        write_range(&mem, 1, 100, 1, 0);

        let parsed = parse(
            &mem,
            [
                readable(HEADER_ADDR, 16),
                readable(DATA_ADDR, 32),
                writable(STATUS_ADDR, 1),
            ],
        );

        let Request::Discard { ranges } = parsed.request.unwrap() else {
            panic!("not a discard");
        };
        assert_eq!(ranges.len(), 2);
        assert_eq!((ranges[0].sector(), ranges[0].num_sectors()), (8, 16));
        assert_eq!((ranges[1].sector(), ranges[1].num_sectors()), (100, 1));
        assert!(!ranges[0].unmap());
    }

    #[test]
    fn parse_discard_with_unmap_is_refused() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        write_range(&mem, 0, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);

        let parsed = parse(
            &mem,
            [
                readable(HEADER_ADDR, 16),
                readable(DATA_ADDR, 16),
                writable(STATUS_ADDR, 1),
            ],
        );

        assert!(matches!(parsed.request, Err(RequestError::DiscardUnmap)));
    }

    #[test]
    fn parse_write_zeroes_with_reserved_flag_is_refused() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        // Bit 1: the first reserved bit.
        write_range(&mem, 0, 0, 8, 0b10);

        let parsed = parse(
            &mem,
            [
                readable(HEADER_ADDR, 16),
                readable(DATA_ADDR, 16),
                writable(STATUS_ADDR, 1),
            ],
        );

        assert!(matches!(parsed.request, Err(RequestError::UnknownFlags(2))));
    }

    #[test]
    fn parse_write_zeroes_partial_range_is_refused() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);

        let parsed = parse(
            &mem,
            [
                readable(HEADER_ADDR, 16),
                readable(DATA_ADDR, 20),
                writable(STATUS_ADDR, 1),
            ],
        );

        assert!(matches!(
            parsed.request,
            Err(RequestError::UnalignedRanges(20))
        ));
    }

    #[test]
    fn parse_too_many_discard_ranges_is_refused() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        let len = (MAX_DISCARD_SEG + 1) * RANGE_LEN as u32;

        let parsed = parse(
            &mem,
            [
                readable(HEADER_ADDR, 16),
                readable(DATA_ADDR, len),
                writable(STATUS_ADDR, 1),
            ],
        );

        assert!(matches!(
            parsed.request,
            Err(RequestError::TooManyRanges { .. })
        ));
    }

    #[test]
    fn parse_write_zeroes_range_over_limit_is_refused() {
        let mem = memory();
        write_header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        write_range(&mem, 0, 0, MAX_WRITE_ZEROES_SECTORS + 1, 0);

        let parsed = parse(
            &mem,
            [
                readable(HEADER_ADDR, 16),
                readable(DATA_ADDR, 16),
                writable(STATUS_ADDR, 1),
            ],
        );

        assert!(matches!(
            parsed.request,
            Err(RequestError::RangeTooLarge { .. })
        ));
    }
}
