//! [`FileBackend`]: a raw disk image in a regular file or a host block
//! device.
//!
//! Data moves straight between the image and guest memory with
//! `preadv`/`pwritev` on the guest buffers (no bounce buffer, no shared seek
//! position). FLUSH is `fdatasync`. DISCARD punches a hole
//! (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`); WRITE_ZEROES uses
//! `FALLOC_FL_ZERO_RANGE`, or a hole when the driver allows unmapping. When
//! the filesystem or device does not support the `fallocate` mode
//! (`EOPNOTSUPP`, or `EINVAL` for the range), both fall back to writing
//! zeros, so a discarded range always reads back as zeros.
//!
//! The `unsafe` here is limited to the `preadv`/`pwritev`/`fallocate`
//! syscalls.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use crate::backend::BlockBackend;

/// Most iovecs passed to one `preadv`/`pwritev` (Linux takes up to
/// `UIO_MAXIOV`, 1024). They live on the stack; a request with more
/// segments (up to `SEG_MAX`) takes a few calls.
const IOV_BATCH: usize = 64;

/// Bytes of zeros written per `pwrite` when `fallocate` cannot zero.
const ZERO_CHUNK: usize = 64 << 10;

/// A raw disk image: a regular file or a block device.
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    size: u64,
}

impl FileBackend {
    /// Use `file` as the disk. Its size is where a seek to the end lands,
    /// which works for regular files and block devices alike.
    pub fn new(file: File) -> io::Result<Self> {
        let size = (&file).seek(SeekFrom::End(0))?;
        Ok(Self { file, size })
    }

    /// The image file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        let invalid = || io::Error::from_raw_os_error(libc::EINVAL);
        let offset = libc::off_t::try_from(offset).map_err(|_| invalid())?;
        let len = libc::off_t::try_from(len).map_err(|_| invalid())?;
        loop {
            // SAFETY: a plain syscall on a file descriptor we own; no memory
            // is passed to the kernel.
            let ret = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset, len) };
            if ret == 0 {
                return Ok(());
            }
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
    }

    /// `fallocate(mode)`, or writing zeros where the filesystem or device
    /// does not support the mode (`EOPNOTSUPP`) or not for this range
    /// (`EINVAL`: a block device with 4 KiB logical blocks refuses ranges
    /// that are only sector-aligned).
    fn zero_range(&self, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        match self.fallocate(mode, offset, len) {
            Err(error)
                if matches!(
                    error.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
                ) =>
            {
                self.write_zeros(offset, len)
            }
            other => other,
        }
    }

    /// Zero a range by writing zeros.
    fn write_zeros(&self, mut offset: u64, len: u64) -> io::Result<()> {
        static ZEROS: [u8; ZERO_CHUNK] = [0; ZERO_CHUNK];
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        while offset < end {
            // Bounded by ZERO_CHUNK, a usize.
            let chunk = (end - offset).min(ZERO_CHUNK as u64) as usize;
            self.file.write_all_at(&ZEROS[..chunk], offset)?;
            offset += chunk as u64;
        }
        Ok(())
    }
}

/// A guest buffer as the kernel sees it.
#[derive(Clone, Copy)]
struct RawBuf {
    ptr: *mut u8,
    len: usize,
}

/// Which way a vectored transfer goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    /// Disk to memory (`preadv`).
    Read,
    /// Memory to disk (`pwritev`).
    Write,
}

/// Move all of `bufs` at `offset`, resuming after short transfers and
/// `EINTR`, in batches of at most [`IOV_BATCH`] buffers.
///
/// The caller keeps the memory behind `bufs` mapped and valid for the whole
/// call (it holds the `VolatileSlice` pointer guards).
fn transfer(file: &File, offset: u64, bufs: &[RawBuf], direction: Direction) -> io::Result<()> {
    let mut first = 0usize; // first buffer not completely moved
    let mut first_done = 0usize; // bytes of it already moved
    let mut moved = 0u64;
    let empty = libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    };
    let mut iovecs = [empty; IOV_BATCH];
    loop {
        // Skip finished (and empty) buffers.
        while first < bufs.len() && first_done == bufs[first].len {
            first += 1;
            first_done = 0;
        }
        if first == bufs.len() {
            return Ok(());
        }
        let mut count = 0;
        for (iovec, buf) in iovecs.iter_mut().zip(&bufs[first..]) {
            let skip = if count == 0 { first_done } else { 0 };
            *iovec = libc::iovec {
                // In bounds: `skip < buf.len`.
                iov_base: buf.ptr.wrapping_add(skip).cast(),
                iov_len: buf.len - skip,
            };
            count += 1;
        }
        let position = offset
            .checked_add(moved)
            .and_then(|p| libc::off_t::try_from(p).ok())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let fd = file.as_raw_fd();
        let done = match (direction, &iovecs[..count]) {
            // One buffer: plain pread/pwrite, which skip copying an iovec
            // array into the kernel.
            // SAFETY: `fd` is an open file we own. The iovec was just
            // filled from `bufs`: it covers part of a live `VolatileSlice`
            // (its pointer guard is held by our caller for the duration of
            // this call), so the kernel writes only memory the slice owns.
            // That memory is shared with the guest, which may touch it
            // concurrently; the kernel copies bytes and no Rust reference to
            // it exists (the same contract as `VolatileSlice` itself).
            (Direction::Read, [one]) => unsafe {
                libc::pread(fd, one.iov_base, one.iov_len, position)
            },
            // SAFETY: as above; the kernel only reads the buffer. The
            // pointer was cast from a read guard to `*mut` only because
            // `iovec` has one pointer type for both directions.
            (Direction::Write, [one]) => unsafe {
                libc::pwrite(fd, one.iov_base, one.iov_len, position)
            },
            // SAFETY: as for pread, for each of `iovecs[..count]`; `count`
            // is at most IOV_BATCH, which fits a c_int.
            (Direction::Read, _) => unsafe {
                libc::preadv(fd, iovecs.as_ptr(), count as libc::c_int, position)
            },
            // SAFETY: as for pwrite, for each of `iovecs[..count]`.
            (Direction::Write, _) => unsafe {
                libc::pwritev(fd, iovecs.as_ptr(), count as libc::c_int, position)
            },
        };
        if done < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if done == 0 {
            return Err(match direction {
                Direction::Read => io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "disk image ended before the requested range",
                ),
                Direction::Write => io::Error::from(io::ErrorKind::WriteZero),
            });
        }
        // Non-negative, checked above.
        let mut done = done as usize;
        moved += done as u64;
        while done > 0 && first < bufs.len() {
            let left = bufs[first].len - first_done;
            if done >= left {
                done -= left;
                first += 1;
                first_done = 0;
            } else {
                first_done += done;
                done = 0;
            }
        }
    }
}

impl BlockBackend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at<B: BitmapSlice>(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_, B>],
    ) -> io::Result<()> {
        let result = if let [buf] = bufs {
            // The common case, without allocating.
            let guard = buf.ptr_guard_mut();
            let raw = [RawBuf {
                ptr: guard.as_ptr(),
                len: guard.len(),
            }];
            transfer(&self.file, offset, &raw, Direction::Read)
        } else {
            let guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard_mut()).collect();
            let raw: Vec<RawBuf> = guards
                .iter()
                .map(|g| RawBuf {
                    ptr: g.as_ptr(),
                    len: g.len(),
                })
                .collect();
            transfer(&self.file, offset, &raw, Direction::Read)
        };
        // Raw pointer writes bypass dirty tracking; on failure the buffers
        // may still have been partly written.
        for buf in bufs {
            buf.bitmap().mark_dirty(0, buf.len());
        }
        result
    }

    fn write_at<B: BitmapSlice>(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_, B>],
    ) -> io::Result<()> {
        if let [buf] = bufs {
            // The common case, without allocating.
            let guard = buf.ptr_guard();
            let raw = [RawBuf {
                ptr: guard.as_ptr().cast_mut(),
                len: guard.len(),
            }];
            return transfer(&self.file, offset, &raw, Direction::Write);
        }
        let guards: Vec<_> = bufs.iter().map(|b| b.ptr_guard()).collect();
        let raw: Vec<RawBuf> = guards
            .iter()
            .map(|g| RawBuf {
                ptr: g.as_ptr().cast_mut(),
                len: g.len(),
            })
            .collect();
        transfer(&self.file, offset, &raw, Direction::Write)
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        self.zero_range(mode, offset, len)
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        let mode = if unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        self.zero_range(mode, offset, len)
    }
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::test_utils::TempImage;

    /// Filesystem block size the hole tests assume (ext4 and tmpfs: 4 KiB).
    const BLOCK: u64 = 4096;

    fn backend(image: &TempImage) -> FileBackend {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(image.path())
            .unwrap();
        FileBackend::new(file).unwrap()
    }

    fn slice(bytes: &mut [u8]) -> VolatileSlice<'_> {
        VolatileSlice::from(bytes)
    }

    #[test]
    fn file_backend_size_is_file_length() {
        let image = TempImage::filled(3 * 512, 0);

        assert_eq!(backend(&image).size(), 3 * 512);
    }

    #[test]
    fn file_backend_read_at_scatters_into_buffers_in_order() {
        let image = TempImage::with_pattern(4 * 512);
        let disk = backend(&image);
        let (mut a, mut b) = (vec![0u8; 100], vec![0u8; 924]);

        disk.read_at(512, &[slice(&mut a), slice(&mut b)]).unwrap();

        let expected = &image.contents()[512..1536];
        assert_eq!(&a[..], &expected[..100]);
        assert_eq!(&b[..], &expected[100..]);
    }

    #[test]
    fn file_backend_read_of_sparse_image_is_zeros() {
        let image = TempImage::sparse(4 * 512);
        let disk = backend(&image);
        let mut buf = vec![0xffu8; 2048];

        disk.read_at(0, &[slice(&mut buf)]).unwrap();

        assert_eq!(buf, [0; 2048]);
    }

    #[test]
    fn file_backend_read_past_end_is_unexpected_eof() {
        let image = TempImage::filled(512, 1);
        let disk = backend(&image);
        let mut buf = vec![0u8; 1024];

        let error = disk.read_at(0, &[slice(&mut buf)]).unwrap_err();

        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn file_backend_write_at_gathers_buffers_in_order() {
        let image = TempImage::filled(2048, 0);
        let disk = backend(&image);
        let (mut a, mut b) = (vec![1u8; 512], vec![2u8; 1024]);

        disk.write_at(512, &[slice(&mut a), slice(&mut b)]).unwrap();

        let contents = image.contents();
        assert!(contents[..512].iter().all(|&x| x == 0));
        assert!(contents[512..1024].iter().all(|&x| x == 1));
        assert!(contents[1024..].iter().all(|&x| x == 2));
    }

    #[test]
    fn file_backend_more_buffers_than_one_batch_are_all_moved() {
        // Four batches and a bit, of one sector each.
        let sectors = 4 * IOV_BATCH + 6;
        let image = TempImage::with_pattern(sectors as u64 * 512);
        let disk = backend(&image);
        let mut bytes = vec![0u8; sectors * 512];
        let bufs: Vec<VolatileSlice<'_>> = bytes.chunks_mut(512).map(VolatileSlice::from).collect();

        disk.read_at(0, &bufs).unwrap();

        drop(bufs);
        assert_eq!(bytes, image.contents());
    }

    #[test]
    fn file_backend_discard_reads_back_zeros_and_frees_blocks() {
        // 64 filesystem blocks of data, then a hole punched over 32 of them.
        let image = TempImage::with_pattern(64 * BLOCK);
        let disk = backend(&image);
        disk.flush().unwrap();
        let before = image.path().metadata().unwrap().blocks();

        disk.discard(16 * BLOCK, 32 * BLOCK).unwrap();

        let contents = image.contents();
        assert!(contents[16 * BLOCK as usize..48 * BLOCK as usize]
            .iter()
            .all(|&x| x == 0));
        assert!(contents[..16 * BLOCK as usize].iter().any(|&x| x != 0));
        let after = image.path().metadata().unwrap().blocks();
        assert!(after < before, "st_blocks {before} -> {after}");
        assert_eq!(image.path().metadata().unwrap().len(), 64 * BLOCK);
    }

    #[test]
    fn file_backend_write_zeroes_without_unmap_zeroes_range() {
        let image = TempImage::with_pattern(8 * 512);
        let disk = backend(&image);

        disk.write_zeroes(512, 3 * 512, false).unwrap();

        let contents = image.contents();
        assert!(contents[512..2048].iter().all(|&x| x == 0));
        assert_eq!(contents[..512], TempImage::pattern(8 * 512)[..512]);
        assert_eq!(contents[2048..], TempImage::pattern(8 * 512)[2048..]);
    }

    #[test]
    fn file_backend_write_zeros_fallback_zeroes_range_larger_than_chunk() {
        // The EOPNOTSUPP fallback path, called directly: ext4 and tmpfs do
        // support the fallocate modes. Two and a half zero chunks.
        let len = (5 * ZERO_CHUNK / 2) as u64;
        let image = TempImage::with_pattern(len + 1024);
        let disk = backend(&image);

        disk.write_zeros(512, len).unwrap();

        let contents = image.contents();
        assert!(contents[512..512 + len as usize].iter().all(|&x| x == 0));
        assert_ne!(contents[511], 0);
        assert_eq!(contents.len() as u64, len + 1024);
    }
}
