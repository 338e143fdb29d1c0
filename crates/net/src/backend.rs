//! What the device moves frames through: [`NetBackend`], implemented by
//! [`Tap`] and, for tests, benches and fuzzing, by
//! `MemBackend` (feature `test-utils`), which keeps frames in queues.

use std::io;

use vm_memory::bitmap::BitmapSlice;
use vm_memory::VolatileSlice;

use crate::{Tap, VNET_HDR_LEN};

/// A source and sink of frames, each preceded by a `virtio_net_hdr_v1`.
pub trait NetBackend {
    /// Read one frame into `bufs`: its length, or `WouldBlock` when none
    /// is queued. A frame that does not fit is lost (as a tap loses it).
    fn read_frame<B: BitmapSlice>(&self, bufs: &[VolatileSlice<'_, B>]) -> io::Result<usize>;

    /// Write one frame: `header`, then the bytes gathered from `bufs`.
    fn write_frame<B: BitmapSlice>(
        &self,
        header: &[u8; VNET_HDR_LEN],
        bufs: &[VolatileSlice<'_, B>],
    ) -> io::Result<usize>;
}

impl NetBackend for Tap {
    fn read_frame<B: BitmapSlice>(&self, bufs: &[VolatileSlice<'_, B>]) -> io::Result<usize> {
        Tap::read_frame(self, bufs)
    }

    fn write_frame<B: BitmapSlice>(
        &self,
        header: &[u8; VNET_HDR_LEN],
        bufs: &[VolatileSlice<'_, B>],
    ) -> io::Result<usize> {
        Tap::write_frame(self, header, bufs)
    }
}

/// Frames in memory: `inbound` is what the "host" sends the guest,
/// `outbound` collects what the guest sent.
#[cfg(any(test, feature = "test-utils"))]
#[derive(Debug, Default)]
pub struct MemBackend {
    /// Frames (header included) waiting to be read, first first.
    pub inbound: std::cell::RefCell<std::collections::VecDeque<Vec<u8>>>,
    /// Frames (header included) written, in order.
    pub outbound: std::cell::RefCell<Vec<Vec<u8>>>,
}

#[cfg(any(test, feature = "test-utils"))]
impl NetBackend for MemBackend {
    fn read_frame<B: BitmapSlice>(&self, bufs: &[VolatileSlice<'_, B>]) -> io::Result<usize> {
        let frame = self
            .inbound
            .borrow_mut()
            .pop_front()
            .ok_or_else(|| io::Error::from(io::ErrorKind::WouldBlock))?;
        let room: usize = bufs.iter().map(|b| b.len()).sum();
        if frame.len() > room {
            // The frame is taken and lost, as `Tap::read_frame` reports
            // one that did not fit.
            return Err(io::Error::from_raw_os_error(libc::EMSGSIZE));
        }
        let mut at = 0;
        for buf in bufs {
            if at == frame.len() {
                break;
            }
            let n = buf.len().min(frame.len() - at);
            buf.subslice(0, n)
                .map_err(io::Error::other)?
                .copy_from(&frame[at..at + n]);
            at += n;
        }
        Ok(frame.len())
    }

    fn write_frame<B: BitmapSlice>(
        &self,
        header: &[u8; VNET_HDR_LEN],
        bufs: &[VolatileSlice<'_, B>],
    ) -> io::Result<usize> {
        let mut frame = header.to_vec();
        for buf in bufs {
            let start = frame.len();
            frame.resize(start + buf.len(), 0);
            buf.copy_to(&mut frame[start..]);
        }
        let n = frame.len();
        self.outbound.borrow_mut().push(frame);
        Ok(n)
    }
}
