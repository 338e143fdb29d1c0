//! Where a block device keeps its bytes.
//!
//! [`BlockBackend`] is what the queue handler needs from a disk: positioned
//! transfers between the disk and guest memory, flush, discard and write
//! zeroes. Transfers take guest memory as [`VolatileSlice`]s so a backend can
//! move data without a bounce buffer ([`crate::FileBackend`] hands the
//! slices to `preadv`/`pwritev`). Backends are shared (`&self`) and keep no
//! seek position.
//!
//! The handler only calls a backend with byte ranges inside `0..size()`
//! (checked against the guest's sector numbers first), but a backend must
//! still fail, not misbehave, on any range.

use std::io;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

/// A disk behind a virtio-blk device.
pub trait BlockBackend {
    /// Disk size in bytes.
    fn size(&self) -> u64;

    /// Fill `bufs`, in order, with the disk bytes starting at `offset`: all
    /// of them, or an error (the buffers may then hold partial data).
    fn read_at<B: BitmapSlice>(&self, offset: u64, bufs: &[VolatileSlice<'_, B>])
        -> io::Result<()>;

    /// Write all of `bufs`, in order, to the disk starting at `offset`, or
    /// fail.
    fn write_at<B: BitmapSlice>(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_, B>],
    ) -> io::Result<()>;

    /// Make every completed write durable (survive a crash of the VMM and
    /// of the host).
    fn flush(&self) -> io::Result<()>;

    /// Deallocate `len` bytes at `offset` if the storage can; the range reads
    /// back as zeros afterwards.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// Make `len` bytes at `offset` read back as zeros; `unmap` allows
    /// deallocating them.
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()>;
}

#[cfg(any(test, feature = "test-utils"))]
pub use mem::MemBackend;

#[cfg(any(test, feature = "test-utils"))]
mod mem {
    use std::io;
    use std::ops::Range;
    use std::sync::{Mutex, MutexGuard, PoisonError};

    use vm_memory::bitmap::BitmapSlice;
    use vm_memory::VolatileSlice;

    use super::BlockBackend;

    /// A disk in a `Vec`, for tests, benches and fuzzing. Discard and write
    /// zeroes fill with zeros; flush does nothing.
    #[derive(Debug, Default)]
    pub struct MemBackend {
        bytes: Mutex<Vec<u8>>,
    }

    impl MemBackend {
        /// A zero-filled disk of `size` bytes.
        pub fn new(size: usize) -> Self {
            Self::from_bytes(vec![0; size])
        }

        /// A disk holding `bytes`.
        pub fn from_bytes(bytes: Vec<u8>) -> Self {
            Self {
                bytes: Mutex::new(bytes),
            }
        }

        /// A copy of the disk contents.
        pub fn contents(&self) -> Vec<u8> {
            self.lock().clone()
        }

        fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
            // A panic elsewhere cannot leave the bytes inconsistent.
            self.bytes.lock().unwrap_or_else(PoisonError::into_inner)
        }
    }

    /// `offset..offset + len` if it lies inside a disk of `size` bytes.
    fn span(offset: u64, len: u64, size: usize) -> io::Result<Range<usize>> {
        let start = usize::try_from(offset).ok();
        let end = offset
            .checked_add(len)
            .and_then(|end| usize::try_from(end).ok());
        match (start, end) {
            (Some(start), Some(end)) if end <= size => Ok(start..end),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "range beyond the end of the disk",
            )),
        }
    }

    impl BlockBackend for MemBackend {
        fn size(&self) -> u64 {
            self.lock().len() as u64
        }

        fn read_at<B: BitmapSlice>(
            &self,
            mut offset: u64,
            bufs: &[VolatileSlice<'_, B>],
        ) -> io::Result<()> {
            let bytes = self.lock();
            for buf in bufs {
                let range = span(offset, buf.len() as u64, bytes.len())?;
                buf.copy_from(&bytes[range]);
                offset += buf.len() as u64;
            }
            Ok(())
        }

        fn write_at<B: BitmapSlice>(
            &self,
            mut offset: u64,
            bufs: &[VolatileSlice<'_, B>],
        ) -> io::Result<()> {
            let mut bytes = self.lock();
            for buf in bufs {
                let range = span(offset, buf.len() as u64, bytes.len())?;
                buf.copy_to(&mut bytes[range]);
                offset += buf.len() as u64;
            }
            Ok(())
        }

        fn flush(&self) -> io::Result<()> {
            Ok(())
        }

        fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
            self.write_zeroes(offset, len, true)
        }

        fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> io::Result<()> {
            let mut bytes = self.lock();
            let range = span(offset, len, bytes.len())?;
            bytes[range].fill(0);
            Ok(())
        }
    }
}
