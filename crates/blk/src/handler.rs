//! The request queue loop: pop chains, execute them against a
//! [`BlockBackend`], write the status byte, fill the used ring, notify.
//!
//! [`QueueHandler`] is generic over the backend and the interrupt, so unit
//! tests, benches and the fuzz target drive it with plain structs and
//! anonymous guest memory, no KVM.
//!
//! Error policy:
//! - anything wrong with one request (malformed chain, out-of-range sector,
//!   read-only disk, a failed `pread` or `fdatasync`) becomes the status
//!   byte of that request; [`ExecuteError::status`] is the one place that
//!   maps errors to status bytes. The device keeps running.
//! - a chain without a single device-writable byte cannot carry a status:
//!   it is returned with used length 0.
//! - every request refused for what the guest sent (malformed, beyond the
//!   disk, a write to a read-only disk) is also counted with its reason in
//!   the handler's [`GuestFaults`] and logged, rate-limited; failures of
//!   the host's own disk are not the guest's and are not counted there.
//! - after the first failed FLUSH the disk stays failed: every later write,
//!   discard, write zeroes and flush is IOERR. Linux may drop the dirty
//!   pages whose write-back failed and report the error only once, so a
//!   FLUSH retried after it could succeed without the data ever reaching
//!   the disk; reads still work.
//! - a broken ring (available index too far ahead, a head index outside the
//!   queue, a used ring outside guest memory) is a [`HandlerError`]: the
//!   caller marks the device DEVICE_NEEDS_RESET.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use chitin_virtio::queue::drain;
use chitin_virtio::rate_limit::{Clock, RateLimiter};
use chitin_virtio::{GuestFaults, Severity, VirtioInterrupt};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::bitmap::MS;
use vm_memory::{Bytes, GuestMemory, GuestMemoryError, VolatileSlice};

use crate::backend::BlockBackend;
use crate::request::{self, total_len, DiscardRange, Request, RequestError, Segment};
#[cfg(doc)]
use crate::SEG_MAX;
use crate::{ID_BYTES, QUEUE_SIZE, SECTOR_SHIFT};

/// Most chains one [`QueueHandler::process_queue`] call completes before it
/// yields (with [`QueueRun::pending`] set), so a driver that keeps the ring
/// full cannot monopolise the event loop thread: half a ring.
pub const MAX_CHAINS_PER_RUN: usize = QUEUE_SIZE as usize / 2;

/// Most bytes of disk work (data moved, ranges zeroed or discarded) one
/// [`QueueHandler::process_queue`] call starts chains for: a run stops
/// before the next chain once it has done this much, so a run lasts a
/// fraction of a second even on a slow disk and the device lock (which the
/// guest's register accesses and `stop()` wait for) is never held long.
/// One request can do at most 254 MiB (a read or write of [`SEG_MAX`]
/// segments of [`SEG_SIZE_MAX`](crate::SEG_SIZE_MAX)) or 128 MiB (a
/// discard or write zeroes).
pub const MAX_BYTES_PER_RUN: u64 = 64 << 20;

/// Why one request failed; each maps to the status byte the guest sees.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError {
    /// The chain is not a well-formed request.
    #[error("malformed request")]
    Request(#[from] RequestError),
    /// A write, discard or write zeroes on a read-only disk.
    #[error("write request on a read-only disk")]
    ReadOnly,
    /// The request reaches past the end of the disk (or past `u64`).
    #[error("{len} bytes at sector {sector} are beyond the end of the disk")]
    OutOfRange {
        /// First sector of the request.
        sector: u64,
        /// Bytes requested.
        len: u64,
    },
    /// A checked guest buffer could not be mapped.
    #[error("cannot map a guest buffer")]
    GuestMemory(#[source] GuestMemoryError),
    /// The backend failed to read.
    #[error("disk read failed")]
    Read(#[source] io::Error),
    /// The backend failed to write.
    #[error("disk write failed")]
    Write(#[source] io::Error),
    /// The backend failed to flush.
    #[error("disk flush failed")]
    Flush(#[source] io::Error),
    /// The backend failed to discard.
    #[error("disk discard failed")]
    Discard(#[source] io::Error),
    /// The backend failed to write zeroes.
    #[error("disk write zeroes failed")]
    WriteZeroes(#[source] io::Error),
    /// An earlier flush failed; the disk takes no more writes or flushes.
    #[error("the disk failed an earlier flush and takes no more writes")]
    Failed,
}

impl ExecuteError {
    /// The fault reason if the guest caused this error, `None` if the
    /// host's disk failed.
    pub fn guest_fault(&self) -> Option<&'static str> {
        match self {
            ExecuteError::Request(e) => Some(e.reason()),
            ExecuteError::ReadOnly => Some("write to a read-only disk"),
            ExecuteError::OutOfRange { .. } => Some("request beyond the end of the disk"),
            ExecuteError::GuestMemory(_) => Some("guest memory access failed"),
            ExecuteError::Read(_)
            | ExecuteError::Write(_)
            | ExecuteError::Flush(_)
            | ExecuteError::Discard(_)
            | ExecuteError::WriteZeroes(_)
            | ExecuteError::Failed => None,
        }
    }
}

impl ExecuteError {
    /// The status byte the guest sees for this error (virtio 1.2 §5.2.6):
    /// `VIRTIO_BLK_S_UNSUPP` for request types the device does not
    /// implement and for unknown or forbidden discard/write-zeroes flags
    /// (§5.2.6.2 requires UNSUPP for those), `VIRTIO_BLK_S_IOERR` for
    /// everything else.
    pub fn status(&self) -> u8 {
        let status = match self {
            ExecuteError::Request(
                RequestError::UnsupportedType(_)
                | RequestError::UnknownFlags(_)
                | RequestError::DiscardUnmap,
            ) => VIRTIO_BLK_S_UNSUPP,
            ExecuteError::Request(_)
            | ExecuteError::ReadOnly
            | ExecuteError::OutOfRange { .. }
            | ExecuteError::GuestMemory(_)
            | ExecuteError::Read(_)
            | ExecuteError::Write(_)
            | ExecuteError::Flush(_)
            | ExecuteError::Discard(_)
            | ExecuteError::WriteZeroes(_)
            | ExecuteError::Failed => VIRTIO_BLK_S_IOERR,
        };
        // The status constants are single bytes.
        status as u8
    }
}

/// An error with its sources, for a log line.
struct ErrorChain<'a>(&'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

/// Why a queue became unusable; the device must be reset.
pub use chitin_virtio::queue::QueueError as HandlerError;
pub use chitin_virtio::queue::QueueRun;

/// Executes the requests of one virtio-blk queue against a backend.
#[derive(Debug)]
pub struct QueueHandler<B> {
    backend: B,
    read_only: bool,
    id: [u8; ID_BYTES],
    faults: GuestFaults,
    /// A flush failed: writes and flushes fail from now on.
    failed: AtomicBool,
}

impl<B: BlockBackend> QueueHandler<B> {
    /// A handler over `backend`. `read_only` refuses writes, discards and
    /// write zeroes; `id` is what GET_ID returns (NUL-padded).
    pub fn new(backend: B, read_only: bool, id: [u8; ID_BYTES]) -> Self {
        Self {
            backend,
            read_only,
            id,
            faults: GuestFaults::new("blk"),
            failed: AtomicBool::new(false),
        }
    }

    /// Whether a flush failed, so the disk takes no more writes.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Count faults in `faults` (which names the disk in log lines).
    pub fn with_faults(mut self, faults: GuestFaults) -> Self {
        self.faults = faults;
        self
    }

    /// What the guest sent that this disk refused, by reason.
    pub fn faults(&self) -> &GuestFaults {
        &self.faults
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Whether writes are refused.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Process available chains with [`drain`]: execute each, add it to the
    /// used ring, then interrupt the driver once if it wants that (it
    /// honours `used_event` when `EVENT_IDX` was negotiated).
    pub fn process_queue<M, I>(
        &self,
        queue: &mut Queue,
        mem: &M,
        interrupt: &I,
    ) -> Result<QueueRun, HandlerError>
    where
        M: GuestMemory,
        I: VirtioInterrupt + ?Sized,
    {
        self.process_queue_limited(queue, mem, interrupt, None::<&mut RateLimiter>)
    }

    /// [`QueueHandler::process_queue`] behind a limiter: each request must
    /// be admitted before it runs and is charged one operation and the
    /// bytes it read, wrote or zeroed once done. A request the limiter holds back
    /// stays in the ring, and nothing runs while it is throttled; the
    /// caller waits for the limiter's timer (the run reports no
    /// `pending` for what the limiter holds back, only for its own bound).
    pub fn process_queue_limited<M, I, C>(
        &self,
        queue: &mut Queue,
        mem: &M,
        interrupt: &I,
        limiter: Option<&mut RateLimiter<C>>,
    ) -> Result<QueueRun, HandlerError>
    where
        M: GuestMemory,
        I: VirtioInterrupt + ?Sized,
        C: Clock,
    {
        let limiter = std::cell::RefCell::new(limiter);
        let admit = || {
            limiter
                .borrow_mut()
                .as_deref_mut()
                .is_none_or(|l| l.admit())
        };
        if !admit() {
            return Ok(QueueRun::default());
        }
        let spent = std::cell::Cell::new(0u64);
        let more = |run: &QueueRun| {
            run.completed < MAX_CHAINS_PER_RUN && spent.get() < MAX_BYTES_PER_RUN && admit()
        };
        let mut run = drain(queue, mem, interrupt, more, |chain| {
            let (used, work, moved) = self.process_chain_costed(mem, chain);
            spent.set(spent.get().saturating_add(work));
            if let Some(l) = limiter.borrow_mut().as_deref_mut() {
                l.charge(moved);
            }
            used
        })?;
        if limiter
            .borrow()
            .as_deref()
            .is_some_and(|l| l.is_throttled())
        {
            // The timer brings the device back, not a rearm.
            run.pending = false;
        }
        Ok(run)
    }

    /// Parse and execute one chain and write its status byte. Returns the
    /// used length: the bytes written into device-writable buffers (data
    /// plus the status byte), or 0 when the chain has no room for a status
    /// (then nothing is executed).
    pub fn process_chain<M: GuestMemory>(&self, mem: &M, chain: DescriptorChain<&M>) -> u32 {
        self.process_chain_costed(mem, chain).0
    }

    /// [`QueueHandler::process_chain`], also returning the bytes of disk
    /// work the request did and the bytes it read or wrote (both 0 when it
    /// failed).
    fn process_chain_costed<M: GuestMemory>(
        &self,
        mem: &M,
        chain: DescriptorChain<&M>,
    ) -> (u32, u64, u64) {
        let parsed = request::parse(mem, chain);
        // Only what was done counts: a refused request did no work.
        let mut work = parsed.request.as_ref().map_or(0, Request::work);
        // What a limit charges: the bytes read or written, and what a write
        // zeroes may write (a file without ZERO_RANGE gets real zeros).
        let mut moved = match &parsed.request {
            Ok(Request::In { data, .. } | Request::Out { data, .. }) => total_len(data),
            Ok(r @ Request::WriteZeroes { .. }) => r.work(),
            _ => 0,
        };
        let Some(status_addr) = parsed.status else {
            let error = RequestError::NoStatus;
            self.faults
                .record(Severity::Malformed, error.reason(), &error);
            return (0, 0, 0);
        };
        if !mem.address_in_range(status_addr) {
            self.faults.record(
                Severity::Malformed,
                "status byte outside guest memory",
                &format_args!("at {:#x}", status_addr.0),
            );
            return (0, 0, 0);
        }
        let (status, data_len) = match parsed
            .request
            .map_err(ExecuteError::from)
            .and_then(|request| self.execute(mem, &request))
        {
            Ok(data_len) => (VIRTIO_BLK_S_OK as u8, data_len),
            Err(error) => {
                work = 0;
                moved = 0;
                if let Some(reason) = error.guest_fault() {
                    // A request type the device does not implement is
                    // allowed: the answer is UNSUPP (virtio 1.2 §5.2.6).
                    let severity = match error {
                        ExecuteError::Request(RequestError::UnsupportedType(_)) => {
                            Severity::Allowed
                        }
                        _ => Severity::Malformed,
                    };
                    self.faults.record(severity, reason, &ErrorChain(&error));
                }
                (error.status(), 0)
            }
        };
        let used = match mem.write_obj(status, status_addr) {
            Ok(()) => data_len + 1,
            Err(_) => 0,
        };
        (used, work, moved)
    }

    /// Execute a parsed request. Returns the bytes written into guest
    /// buffers (IN and GET_ID data).
    pub fn execute<M: GuestMemory>(&self, mem: &M, request: &Request) -> Result<u32, ExecuteError> {
        match request {
            Request::In { sector, data } => {
                let len = total_len(data);
                let offset = self.disk_range(*sector, len)?;
                let bufs = guest_slices(mem, data)?;
                self.backend
                    .read_at(offset, &bufs)
                    .map_err(ExecuteError::Read)?;
                // At most SEG_MAX * SEG_SIZE_MAX bytes: fits.
                Ok(len as u32)
            }
            Request::Out { sector, data } => {
                self.check_writable()?;
                let offset = self.disk_range(*sector, total_len(data))?;
                let bufs = guest_slices(mem, data)?;
                self.backend
                    .write_at(offset, &bufs)
                    .map_err(ExecuteError::Write)?;
                Ok(0)
            }
            Request::Flush => {
                if self.failed() {
                    return Err(ExecuteError::Failed);
                }
                if let Err(e) = self.backend.flush() {
                    if !self.failed.swap(true, Ordering::AcqRel) {
                        log::error!(
                            target: "chitin::blk",
                            "{}: flush failed ({e}); the disk fails every later write and flush",
                            self.faults.device()
                        );
                    }
                    return Err(ExecuteError::Flush(e));
                }
                Ok(0)
            }
            Request::GetId { data } => self.write_id(mem, data),
            Request::Discard { ranges } => {
                self.check_writable()?;
                self.check_ranges(ranges)?;
                for range in ranges {
                    let (offset, len) = self.range_bytes(range)?;
                    self.backend
                        .discard(offset, len)
                        .map_err(ExecuteError::Discard)?;
                }
                Ok(0)
            }
            Request::WriteZeroes { ranges } => {
                self.check_writable()?;
                self.check_ranges(ranges)?;
                for range in ranges {
                    let (offset, len) = self.range_bytes(range)?;
                    self.backend
                        .write_zeroes(offset, len, range.unmap())
                        .map_err(ExecuteError::WriteZeroes)?;
                }
                Ok(0)
            }
        }
    }

    fn check_writable(&self) -> Result<(), ExecuteError> {
        if self.read_only {
            Err(ExecuteError::ReadOnly)
        } else if self.failed() {
            Err(ExecuteError::Failed)
        } else {
            Ok(())
        }
    }

    /// The byte offset of `sector`, if `len` bytes from there fit the disk.
    fn disk_range(&self, sector: u64, len: u64) -> Result<u64, ExecuteError> {
        let out_of_range = || ExecuteError::OutOfRange { sector, len };
        let offset = sector
            .checked_mul(1 << SECTOR_SHIFT)
            .ok_or_else(out_of_range)?;
        let end = offset.checked_add(len).ok_or_else(out_of_range)?;
        if end > self.backend.size() {
            return Err(out_of_range());
        }
        Ok(offset)
    }

    fn range_bytes(&self, range: &DiscardRange) -> Result<(u64, u64), ExecuteError> {
        let len = u64::from(range.num_sectors()) << SECTOR_SHIFT;
        let offset = self.disk_range(range.sector(), len)?;
        Ok((offset, len))
    }

    /// Check every range before touching the disk, so an out-of-range
    /// request changes nothing.
    fn check_ranges(&self, ranges: &[DiscardRange]) -> Result<(), ExecuteError> {
        for range in ranges {
            self.range_bytes(range)?;
        }
        Ok(())
    }

    /// Copy the ID (or as much of it as fits) into `data`.
    fn write_id<M: GuestMemory>(&self, mem: &M, data: &[Segment]) -> Result<u32, ExecuteError> {
        let mut written = 0usize;
        for segment in data {
            if written == ID_BYTES {
                break;
            }
            // Bounded by ID_BYTES.
            let count = (ID_BYTES - written).min(segment.len() as usize);
            mem.write_slice(&self.id[written..written + count], segment.addr())
                .map_err(ExecuteError::GuestMemory)?;
            written += count;
        }
        // At most ID_BYTES.
        Ok(written as u32)
    }
}

/// Map checked segments to volatile slices (a segment spanning two memory
/// regions gives two slices).
fn guest_slices<'m, M: GuestMemory>(
    mem: &'m M,
    data: &[Segment],
) -> Result<Vec<VolatileSlice<'m, MS<'m, M>>>, ExecuteError> {
    let mut slices = Vec::with_capacity(data.len());
    for segment in data {
        // `len` is at most SEG_SIZE_MAX.
        for slice in mem.get_slices(segment.addr(), segment.len() as usize) {
            slices.push(slice.map_err(ExecuteError::GuestMemory)?);
        }
    }
    Ok(slices)
}

#[cfg(test)]
mod tests;
