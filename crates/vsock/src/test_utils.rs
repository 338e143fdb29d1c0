//! The driver side of the three vsock queues in test guest memory, a test
//! backend over socket pairs, and temporary directories.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use chitin_memory::GuestMemoryMmap;
use chitin_virtio::test_utils::{guest_memory, SplitQueueBuilder, TestDescriptor};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use crate::packet::{Header, Op, HEADER_LEN, HOST_CID, TYPE_STREAM};

pub const GUEST_CID: u64 = 3;
const MEM_SIZE: usize = 16 << 20;
const BUFFERS: u64 = 0x10_0000;
pub const RX_DATA_LEN: u32 = 4096;
const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;

/// A guest driver: RX, TX and event queues in guest memory.
pub struct Guest {
    pub mem: GuestMemoryMmap,
    rx: SplitQueueBuilder,
    tx: SplitQueueBuilder,
    ev: SplitQueueBuilder,
    next_buf: u64,
    rx_bufs: HashMap<u16, (GuestAddress, GuestAddress)>,
    rx_seen: u16,
}

impl Guest {
    pub fn new() -> Self {
        let mem = guest_memory(MEM_SIZE);
        let rx = SplitQueueBuilder::new(&mem, GuestAddress(0x1_0000), 256).unwrap();
        let tx = SplitQueueBuilder::new(&mem, GuestAddress(0x2_0000), 256).unwrap();
        let ev = SplitQueueBuilder::new(&mem, GuestAddress(0x3_0000), 256).unwrap();
        Guest {
            mem,
            rx,
            tx,
            ev,
            next_buf: BUFFERS,
            rx_bufs: HashMap::new(),
            rx_seen: 0,
        }
    }

    /// Device-side queues: rx, tx, event.
    pub fn queues(&self) -> Vec<Queue> {
        vec![
            self.rx.build().unwrap(),
            self.tx.build().unwrap(),
            self.ev.build().unwrap(),
        ]
    }

    pub fn alloc(&mut self, len: u64) -> GuestAddress {
        let addr = self.next_buf;
        self.next_buf += len.div_ceil(16) * 16;
        assert!(self.next_buf < MEM_SIZE as u64);
        GuestAddress(addr)
    }

    /// Offer `count` RX buffers of a header and RX_DATA_LEN bytes.
    pub fn post_rx(&mut self, count: usize) {
        for _ in 0..count {
            let hdr = self.alloc(HEADER_LEN as u64);
            let data = self.alloc(u64::from(RX_DATA_LEN));
            let head = self
                .rx
                .add_chain(&[
                    TestDescriptor::new(hdr.0, HEADER_LEN as u32, WRITE | NEXT),
                    TestDescriptor::new(data.0, RX_DATA_LEN, WRITE),
                ])
                .unwrap();
            self.rx_bufs.insert(head, (hdr, data));
        }
    }

    /// Offer `count` RX buffers the way Linux 6.7+ does: one descriptor
    /// holding the header and RX_DATA_LEN data bytes.
    pub fn post_rx_single(&mut self, count: usize) {
        for _ in 0..count {
            let buf = self.alloc(HEADER_LEN as u64 + u64::from(RX_DATA_LEN));
            let head = self
                .rx
                .add_chain(&[TestDescriptor::new(
                    buf.0,
                    HEADER_LEN as u32 + RX_DATA_LEN,
                    WRITE,
                )])
                .unwrap();
            self.rx_bufs
                .insert(head, (buf, GuestAddress(buf.0 + HEADER_LEN as u64)));
        }
    }

    /// Queue a TX packet the way Linux 6.7+ sends a non-linear buffer: the
    /// header alone, then `data` in descriptors of at most `fragment` bytes.
    pub fn send_fragmented(&mut self, header: Header, data: &[u8], fragment: usize) {
        let hdr = self.alloc(HEADER_LEN as u64);
        self.mem.write_slice(&header.to_bytes(), hdr).unwrap();
        let mut descs = vec![TestDescriptor::new(hdr.0, HEADER_LEN as u32, NEXT)];
        for piece in data.chunks(fragment) {
            let buf = self.alloc(piece.len() as u64);
            self.mem.write_slice(piece, buf).unwrap();
            descs.push(TestDescriptor::new(buf.0, piece.len() as u32, NEXT));
        }
        if let Some(last) = descs.last_mut() {
            *last = TestDescriptor::new(last.addr, last.len, 0);
        }
        self.add_tx_chain(&descs);
    }

    /// Offer an RX chain of raw descriptors (not read back by `received`).
    pub fn add_rx_chain(&mut self, descs: &[TestDescriptor]) {
        self.rx.add_chain(descs).unwrap();
    }

    /// The used length of the `index`th RX chain the device returned.
    pub fn rx_used(&self, index: u16) -> Option<u32> {
        let used = self.rx.used_idx().unwrap();
        (index < used).then(|| self.rx.used_element(index).unwrap().1)
    }

    /// Have the device's queues use VIRTIO_F_EVENT_IDX.
    pub fn with_event_idx(mut self) -> Self {
        self.rx = self.rx.with_event_idx(true);
        self.tx = self.tx.with_event_idx(true);
        self.ev = self.ev.with_event_idx(true);
        self
    }

    /// The event queue's `avail_event`: the available index at which the
    /// device asked to be notified (EVENT_IDX).
    pub fn event_avail_event(&self) -> u16 {
        let at = self.ev.used_ring_addr().0 + 4 + 8 * u64::from(self.ev.size());
        self.mem.read_obj(GuestAddress(at)).unwrap()
    }

    /// Offer an event-queue chain of raw descriptors.
    pub fn add_event_chain(&mut self, descs: &[TestDescriptor]) {
        self.ev.add_chain(descs).unwrap();
    }

    /// The `index`th event-queue chain the device returned: (head, used
    /// length).
    pub fn event_used(&self, index: u16) -> Option<(u32, u32)> {
        let used = self.ev.used_idx().unwrap();
        (index < used).then(|| self.ev.used_element(index).unwrap())
    }

    /// Queue a TX chain of raw descriptors.
    pub fn add_tx_chain(&mut self, descs: &[TestDescriptor]) {
        self.tx.add_chain(descs).unwrap();
    }

    /// Queue a TX packet: header descriptor, then data descriptor.
    pub fn send(&mut self, header: Header, data: &[u8]) {
        let hdr = self.alloc(HEADER_LEN as u64);
        self.mem.write_slice(&header.to_bytes(), hdr).unwrap();
        if data.is_empty() {
            self.add_tx_chain(&[TestDescriptor::new(hdr.0, HEADER_LEN as u32, 0)]);
        } else {
            let buf = self.alloc(data.len() as u64);
            self.mem.write_slice(data, buf).unwrap();
            self.add_tx_chain(&[
                TestDescriptor::new(hdr.0, HEADER_LEN as u32, NEXT),
                TestDescriptor::new(buf.0, data.len() as u32, 0),
            ]);
        }
    }

    /// A stream header from the guest to the host.
    pub fn header(&self, src_port: u32, dst_port: u32, op: Op) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            type_: TYPE_STREAM,
            op: op as u16,
            buf_alloc: 256 * 1024,
            ..Header::default()
        }
    }

    /// TX chains the device returned.
    pub fn tx_used(&self) -> u16 {
        self.tx.used_idx().unwrap()
    }

    /// Packets the device put in RX buffers since the last call.
    pub fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let used = self.rx.used_idx().unwrap();
        let mut packets = Vec::new();
        while self.rx_seen != used {
            let (id, len) = self.rx.used_element(self.rx_seen).unwrap();
            self.rx_seen = self.rx_seen.wrapping_add(1);
            if len == 0 {
                continue;
            }
            let (hdr, data) = self.rx_bufs[&(id as u16)];
            let mut raw = [0u8; HEADER_LEN];
            self.mem.read_slice(&mut raw, hdr).unwrap();
            let header = Header::from_bytes(&raw);
            assert_eq!(len, HEADER_LEN as u32 + header.len);
            let mut bytes = vec![0u8; header.len as usize];
            self.mem.read_slice(&mut bytes, data).unwrap();
            packets.push((header, bytes));
        }
        packets
    }
}

pub use crate::backend::PairBackend;

/// A directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Self {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let n = COUNT.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!("chitin-vsock-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        TempDir(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
