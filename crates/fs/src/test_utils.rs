//! A FUSE driver over a split queue in anonymous guest memory, and
//! temporary directory trees: what the unit tests and the fuzz target need
//! to send the device any request a guest could, with no KVM.
//!
//! Compiled for this crate's tests and with the `test-utils` feature only.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use chitin_virtio::test_utils::RecordingInterrupt;
use chitin_virtio::test_utils::{guest_memory, SplitQueueBuilder, TestDescriptor};
use chitin_virtio::GuestFaults;
use fuse_backend_rs::abi::fuse_abi::{InHeader, OutHeader};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use crate::confine::{Confined, Policy};
use crate::device::{FsConfig, Served};
use crate::handler::{FsHandler, HandlerError, QueueRun};

/// Where the request is written in guest memory.
pub const REQUEST: u64 = 0x1_0000;
/// Where the reply goes.
pub const REPLY: u64 = 0x20_0000;
/// Descriptor flags: another descriptor follows.
pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
/// Descriptor flags: device-writable.
pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// Reply buffer size: a full 1 MiB read plus headers.
pub const REPLY_LEN: u32 = (1 << 20) + 4096;
/// Guest memory: rings, a request area, a reply area.
const MEM_SIZE: usize = 0x40_0000;
/// Rings of the one test queue.
const RINGS: u64 = 0x0;
/// Its size: chains recycle through its slots.
const QUEUE_LEN: u16 = 16;

/// A directory under the system's temp dir, removed with what it holds on
/// drop.
pub struct TempTree {
    path: PathBuf,
}

impl TempTree {
    /// A fresh empty directory.
    ///
    /// # Panics
    ///
    /// If it cannot be created: a test cannot go on without it.
    pub fn new(label: &str) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "chitin-fs-{label}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        Self { path }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A reply as the guest would see it.
#[derive(Debug)]
pub struct Reply {
    /// Bytes the device said it wrote (the used length).
    pub used: u32,
    /// The reply's header, if one was written.
    pub header: Option<OutHeader>,
    /// What followed the header.
    pub body: Vec<u8>,
}

impl Reply {
    /// The errno of the reply (0 on success), or `None` without a reply.
    pub fn errno(&self) -> Option<i32> {
        self.header.map(|h| -h.error)
    }

    /// The body read as `T`.
    ///
    /// # Panics
    ///
    /// If the body is shorter than `T`.
    pub fn obj<T: ByteValued>(&self) -> T {
        T::from_slice(&self.body[..std::mem::size_of::<T>()])
            .copied()
            .expect("reply body too short")
    }
}

/// Drives one queue of a share's handler like a guest's FUSE driver.
pub struct FuseDriver {
    mem: GuestMemoryMmap,
    builder: SplitQueueBuilder,
    queue: Queue,
    handler: FsHandler,
    interrupt: Arc<RecordingInterrupt>,
    faults: GuestFaults,
    unique: u64,
}

impl FuseDriver {
    /// A handler over a fresh passthrough file system of `root`, with
    /// `policy`'s limits (its `root_id`, when set, replaces the one read
    /// from `root`).
    ///
    /// # Panics
    ///
    /// If the share cannot be set up.
    pub fn new(root: &Path, policy: Policy) -> Self {
        let mut config = FsConfig::new(root, "test");
        config.read_only = policy.read_only;
        config.ids = policy.ids;
        config.max_open_files = policy.max_open_files;
        config.xattr = policy.xattr;
        let mut served = Served::new(&config).expect("share config");
        // A test may name another root identity (to play a replaced root).
        if policy.root_id.is_some() {
            served.policy.root_id = policy.root_id;
        }
        let faults = served.faults().clone();
        let confined: Confined = served.file_system().expect("passthrough file system");
        let handler = FsHandler::new(Arc::new(confined), faults.clone());
        let mem = guest_memory(MEM_SIZE);
        let builder = SplitQueueBuilder::new(&mem, GuestAddress(RINGS), QUEUE_LEN)
            .expect("queue")
            .recycling(true);
        let queue = builder.build().expect("queue");
        Self {
            mem,
            builder,
            queue,
            handler,
            interrupt: Arc::new(RecordingInterrupt::new()),
            faults,
            unique: 0,
        }
    }

    /// The faults the share counted.
    pub fn faults(&self) -> &GuestFaults {
        &self.faults
    }

    /// The file system (for its open-file count).
    pub fn fs(&self) -> &Confined {
        self.handler.fs()
    }

    /// Guest memory, for crafted chains.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Send `opcode` for `nodeid` with `body` after a correct header, as
    /// guest uid/gid 0.
    pub fn call(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> Reply {
        self.call_as(opcode, nodeid, body, 0, 0)
    }

    /// [`FuseDriver::call`] as guest user `uid` and group `gid`.
    pub fn call_as(&mut self, opcode: u32, nodeid: u64, body: &[u8], uid: u32, gid: u32) -> Reply {
        self.unique += 1;
        let header = InHeader {
            len: (std::mem::size_of::<InHeader>() + body.len()) as u32,
            opcode,
            unique: self.unique,
            nodeid,
            uid,
            gid,
            pid: 1,
            padding: 0,
        };
        let mut request = header.as_slice().to_vec();
        request.extend_from_slice(body);
        self.raw(&request, REPLY_LEN)
    }

    /// Send `request` as it is (any bytes) with a reply buffer of
    /// `reply_len` bytes (0: no writable descriptor).
    pub fn raw(&mut self, request: &[u8], reply_len: u32) -> Reply {
        self.mem
            .write_slice(request, GuestAddress(REQUEST))
            .expect("request fits in guest memory");
        let descs = if reply_len > 0 {
            vec![
                TestDescriptor::new(REQUEST, request.len() as u32, NEXT),
                TestDescriptor::new(REPLY, reply_len, WRITE),
            ]
        } else {
            vec![TestDescriptor::new(REQUEST, request.len() as u32, 0)]
        };
        self.chain(&descs)
    }

    /// Send a chain of any descriptors (flags as given: set [`NEXT`] on all
    /// but the last); the reply is read from [`REPLY`].
    ///
    /// # Panics
    ///
    /// If the ring broke: see [`FuseDriver::try_chain`].
    pub fn chain(&mut self, descs: &[TestDescriptor]) -> Reply {
        self.try_chain(descs)
            .expect("the ring stays usable and the device returns just this chain")
    }

    /// [`FuseDriver::chain`], or `None` when the run did not end with just
    /// this chain returned: a reply written over the rings breaks them
    /// (or makes them show more chains), as a guest could do to itself.
    pub fn try_chain(&mut self, descs: &[TestDescriptor]) -> Option<Reply> {
        // The reply area starts as a canary, so a reply that was not
        // written shows as no header.
        let canary = vec![0xa5u8; 64];
        self.mem
            .write_slice(&canary, GuestAddress(REPLY))
            .expect("reply area in guest memory");
        self.builder.add_chain(descs).expect("chain fits the queue");
        let run = self.try_run().ok()?;
        if run.completed != 1 {
            return None;
        }
        let used_idx = self.builder.used_idx().ok()?;
        let (_, used) = self.builder.used_element(used_idx.wrapping_sub(1)).ok()?;
        let mut head = [0u8; 16];
        self.mem
            .read_slice(&mut head, GuestAddress(REPLY))
            .expect("reply area");
        let header = (used >= 16 && head != canary[..16])
            .then(|| *OutHeader::from_slice(&head).expect("16 bytes"));
        let body_len = header.map_or(0, |h| (h.len as usize).saturating_sub(16));
        let mut body = vec![0u8; body_len.min(REPLY_LEN as usize)];
        self.mem
            .read_slice(&mut body, GuestAddress(REPLY + 16))
            .expect("reply area");
        Some(Reply { used, header, body })
    }

    /// Run the queue once.
    pub fn try_run(&mut self) -> Result<QueueRun, HandlerError> {
        self.handler
            .process_queue(&mut self.queue, &self.mem, self.interrupt.as_ref())
    }
}

/// A NUL-terminated name, as FUSE sends it.
pub fn name(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// `obj`'s bytes followed by `rest`.
pub fn body<T: ByteValued>(obj: T, rest: &[u8]) -> Vec<u8> {
    let mut v = obj.as_slice().to_vec();
    v.extend_from_slice(rest);
    v
}
