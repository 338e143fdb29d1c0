//! The queue loop of a share: pop chains, hand each to the FUSE server
//! behind [`Confined`], return it with the length of the reply.
//!
//! [`FsHandler`] is generic over the interrupt only; unit tests and the
//! fuzz target drive it with anonymous guest memory and a real temporary
//! directory, no KVM.
//!
//! Error policy:
//! - a chain whose readable or writable part is larger than
//!   [`MAX_REQUEST_BYTES`], whose buffers are not in guest memory, or
//!   which the server cannot parse is returned with used length 0 and
//!   counted as malformed. Nothing the guest sends is allocated by its
//!   claimed size on the host;
//! - a request the server parsed but the file system refused carries its
//!   errno in the reply (the guest sees the error), as FUSE defines;
//! - a broken ring is a [`HandlerError`]: the device is marked
//!   DEVICE_NEEDS_RESET.

use std::sync::Arc;

use chitin_memory::GuestMemoryMmap;
use chitin_virtio::queue::drain;
use chitin_virtio::{GuestFaults, Severity, VirtioInterrupt};
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_queue::{DescriptorChain, Queue};

use crate::confine::Confined;

pub use chitin_virtio::queue::QueueError as HandlerError;
pub use chitin_virtio::queue::QueueRun;

/// The largest readable or writable part of one chain: the largest write
/// the server negotiates (1 MiB, `MAX_PAGES` of 4 KiB) plus a page for
/// the headers.
pub const MAX_REQUEST_BYTES: u64 = (1 << 20) + 4096;

/// Most chains one [`FsHandler::process_queue`] call completes before it
/// returns with [`QueueRun::pending`], so a reset (which waits for the
/// current run) is never held up for long.
pub const MAX_CHAINS_PER_RUN: usize = 64;

/// Serves the FUSE requests of one share's queues.
pub struct FsHandler {
    server: Server<Arc<Confined>>,
    fs: Arc<Confined>,
    faults: GuestFaults,
}

impl FsHandler {
    /// A handler serving `fs`; refusals are counted in `faults`.
    pub fn new(fs: Arc<Confined>, faults: GuestFaults) -> Self {
        Self {
            server: Server::new(Arc::clone(&fs)),
            fs,
            faults,
        }
    }

    /// The file system behind the server.
    pub fn fs(&self) -> &Confined {
        &self.fs
    }

    /// Serve up to [`MAX_CHAINS_PER_RUN`] chains of `queue`.
    pub fn process_queue<I: VirtioInterrupt + ?Sized>(
        &self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        interrupt: &I,
    ) -> Result<QueueRun, HandlerError> {
        drain(
            queue,
            mem,
            interrupt,
            |run| run.completed < MAX_CHAINS_PER_RUN,
            |chain| self.serve(mem, chain),
        )
    }

    /// One request; returns the bytes of reply written.
    fn serve(&self, mem: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>) -> u32 {
        let (readable, writable) = chain_sizes(&chain);
        if readable > MAX_REQUEST_BYTES || writable > MAX_REQUEST_BYTES {
            self.faults.record(
                Severity::Malformed,
                "request larger than the limit",
                &format_args!("{readable} bytes in, {writable} bytes out"),
            );
            return 0;
        }
        let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
            Ok(reader) => reader,
            Err(e) => {
                self.faults.record(
                    Severity::Malformed,
                    "request buffer not in guest memory",
                    &e,
                );
                return 0;
            }
        };
        let writer = match VirtioFsWriter::new(mem, chain) {
            Ok(writer) => writer,
            Err(e) => {
                self.faults
                    .record(Severity::Malformed, "reply buffer not in guest memory", &e);
                return 0;
            }
        };
        match self
            .server
            .handle_message(reader, writer.into(), None, None)
        {
            // The reply is at most `writable` bytes, which fits in a u32.
            Ok(len) => u32::try_from(len).unwrap_or(0),
            Err(e) => {
                self.faults
                    .record(Severity::Malformed, "request the server cannot parse", &e);
                0
            }
        }
    }
}

/// Bytes in the chain's readable and writable descriptors, saturating.
fn chain_sizes(chain: &DescriptorChain<&GuestMemoryMmap>) -> (u64, u64) {
    let mut readable = 0u64;
    let mut writable = 0u64;
    for desc in chain.clone() {
        let part = if desc.is_write_only() {
            &mut writable
        } else {
            &mut readable
        };
        *part = part.saturating_add(u64::from(desc.len()));
    }
    (readable, writable)
}
