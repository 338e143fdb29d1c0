//! Queue handler tests: every request type against a real image file, every
//! malformed chain shape, notifications, and backend failures.

use std::fs::OpenOptions;
use std::os::unix::fs::MetadataExt;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::QueueT;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Address, GuestAddress};

use super::*;
use crate::backend::MemBackend;
use crate::file::FileBackend;
use crate::test_utils::{Desc, GuestQueue, RecordingInterrupt, TempImage};
use crate::{SEG_MAX, SEG_SIZE_MAX};

/// A 64 KiB disk: 128 sectors, 16 filesystem blocks of 4 KiB.
const DISK_SIZE: u64 = 64 << 10;
const DISK_SECTORS: u64 = DISK_SIZE / 512;
/// Host filesystem block, for the hole-punching tests.
const FS_BLOCK: u64 = 4096;
const OK: u8 = VIRTIO_BLK_S_OK as u8;
const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
/// A request type this device does not implement (VIRTIO_BLK_T_GET_LIFETIME).
const T_GET_LIFETIME: u32 = 10;
const ID: &[u8] = b"chitin-disk-0";

fn id_bytes(id: &[u8]) -> [u8; ID_BYTES] {
    let mut bytes = [0u8; ID_BYTES];
    bytes[..id.len()].copy_from_slice(id);
    bytes
}

/// A handler over a patterned image file, with a driver and a queue.
struct Fixture {
    image: TempImage,
    handler: QueueHandler<FileBackend>,
    guest: GuestQueue,
    queue: Queue,
    interrupt: RecordingInterrupt,
}

impl Fixture {
    fn new(read_only: bool) -> Self {
        let image = TempImage::with_pattern(DISK_SIZE);
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(image.path())
            .unwrap();
        let handler = QueueHandler::new(FileBackend::new(file).unwrap(), read_only, id_bytes(ID));
        let guest = GuestQueue::new(QUEUE_SIZE);
        let queue = guest.queue();
        Fixture {
            image,
            handler,
            guest,
            queue,
            interrupt: RecordingInterrupt::default(),
        }
    }

    fn run(&mut self) -> QueueRun {
        self.handler
            .process_queue(&mut self.queue, self.guest.memory(), &self.interrupt)
            .unwrap()
    }

    /// Run the queue and return the only new used element's length.
    fn run_one(&mut self) -> u32 {
        let before = self.guest.used_idx();
        let run = self.run();
        assert_eq!(run.completed, 1);
        assert_eq!(self.guest.used_idx(), before.wrapping_add(1));
        self.guest.used(before).1
    }

    fn status(&self, addr: GuestAddress) -> u8 {
        self.guest.read(addr, 1)[0]
    }

    fn file_untouched(&self) -> bool {
        self.image.contents() == TempImage::pattern(DISK_SIZE)
    }

    /// Queue header + one data buffer + status; returns (data, status).
    fn request(
        &mut self,
        request_type: u32,
        sector: u64,
        data: Desc,
    ) -> (GuestAddress, GuestAddress) {
        let header = self.guest.header(request_type, sector);
        let status = self.guest.status_byte();
        self.guest
            .add_chain(&[Desc::readable(header, 16), data, Desc::writable(status, 1)]);
        (data.addr, status)
    }

    fn read(&mut self, sector: u64, len: u32) -> (GuestAddress, GuestAddress) {
        let buf = self.guest.alloc(len);
        self.request(VIRTIO_BLK_T_IN, sector, Desc::writable(buf, len))
    }

    fn write(&mut self, sector: u64, bytes: &[u8]) -> GuestAddress {
        let buf = self.guest.alloc_bytes(bytes);
        // Test buffers are small.
        let len = bytes.len() as u32;
        self.request(VIRTIO_BLK_T_OUT, sector, Desc::readable(buf, len))
            .1
    }

    /// Header + status only (FLUSH, or a request missing its data).
    fn bare(&mut self, request_type: u32, sector: u64) -> GuestAddress {
        let header = self.guest.header(request_type, sector);
        let status = self.guest.status_byte();
        self.guest
            .add_chain(&[Desc::readable(header, 16), Desc::writable(status, 1)]);
        status
    }

    fn ranges(&mut self, request_type: u32, ranges: &[(u64, u32, u32)]) -> GuestAddress {
        let payload = self.guest.ranges(ranges);
        // At most a few ranges of 16 bytes.
        let len = (ranges.len() * 16) as u32;
        self.request(request_type, 0, Desc::readable(payload, len))
            .1
    }

    fn allocated_blocks(&self) -> u64 {
        self.image.path().metadata().unwrap().blocks()
    }
}

fn sector_bytes(sector: u64, count: u64) -> Vec<u8> {
    let pattern = TempImage::pattern(DISK_SIZE);
    pattern[(sector * 512) as usize..((sector + count) * 512) as usize].to_vec()
}

// ---- Requests that succeed, against a real file ----

#[test]
fn read_two_sectors_copies_file_bytes_into_guest() {
    let mut fx = Fixture::new(false);
    let (data, status) = fx.read(3, 1024);

    let used = fx.run_one();

    assert_eq!(fx.status(status), OK);
    assert_eq!(used, 1024 + 1);
    assert_eq!(fx.guest.read(data, 1024), sector_bytes(3, 2));
    assert!(fx.guest.outside_buffers_untouched());
}

#[test]
fn read_scattered_buffers_fills_each_in_order() {
    let mut fx = Fixture::new(false);
    let header = fx.guest.header(VIRTIO_BLK_T_IN, 10);
    let (a, b, c) = (fx.guest.alloc(100), fx.guest.alloc(900), fx.guest.alloc(24));
    let status = fx.guest.status_byte();
    fx.guest.add_chain(&[
        Desc::readable(header, 16),
        Desc::writable(a, 100),
        Desc::writable(b, 900),
        Desc::writable(c, 24),
        Desc::writable(status, 1),
    ]);

    let used = fx.run_one();

    assert_eq!(fx.status(status), OK);
    assert_eq!(used, 1025);
    let mut got = fx.guest.read(a, 100);
    got.extend(fx.guest.read(b, 900));
    got.extend(fx.guest.read(c, 24));
    assert_eq!(got, sector_bytes(10, 2));
    assert!(fx.guest.outside_buffers_untouched());
}

#[test]
fn read_last_sector_succeeds() {
    let mut fx = Fixture::new(false);
    let (data, status) = fx.read(DISK_SECTORS - 1, 512);

    fx.run_one();

    assert_eq!(fx.status(status), OK);
    assert_eq!(fx.guest.read(data, 512), sector_bytes(DISK_SECTORS - 1, 1));
}

#[test]
fn write_two_sectors_lands_in_file() {
    let mut fx = Fixture::new(false);
    let bytes = vec![0x5a; 1024];
    let status = fx.write(5, &bytes);

    let used = fx.run_one();

    assert_eq!(fx.status(status), OK);
    assert_eq!(used, 1);
    let mut expected = TempImage::pattern(DISK_SIZE);
    expected[5 * 512..7 * 512].fill(0x5a);
    assert_eq!(fx.image.contents(), expected);
}

#[test]
fn write_then_read_round_trips() {
    let mut fx = Fixture::new(false);
    let bytes: Vec<u8> = (0..2048u32).map(|i| (i * 7) as u8).collect();
    fx.write(20, &bytes);
    fx.run_one();
    let (data, status) = fx.read(20, 2048);

    fx.run_one();

    assert_eq!(fx.status(status), OK);
    assert_eq!(fx.guest.read(data, 2048), bytes);
}

#[test]
fn flush_after_write_succeeds() {
    let mut fx = Fixture::new(false);
    fx.write(0, &[1; 512]);
    fx.run_one();
    let status = fx.bare(VIRTIO_BLK_T_FLUSH, 0);

    let used = fx.run_one();

    assert_eq!(fx.status(status), OK);
    assert_eq!(used, 1);
}

#[test]
fn get_id_returns_id_nul_padded() {
    let mut fx = Fixture::new(false);
    let buf = fx.guest.alloc_bytes(&[0xff; ID_BYTES]);
    let (_, status) = fx.request(VIRTIO_BLK_T_GET_ID, 0, Desc::writable(buf, ID_BYTES as u32));

    let used = fx.run_one();

    assert_eq!(fx.status(status), OK);
    assert_eq!(used, ID_BYTES as u32 + 1);
    assert_eq!(fx.guest.read(buf, ID_BYTES), id_bytes(ID));
}

#[test]
fn get_id_without_id_is_zero_filled() {
    let mut fx = Fixture::new(false);
    fx.handler = QueueHandler::new(
        FileBackend::new(std::fs::File::open(fx.image.path()).unwrap()).unwrap(),
        true,
        [0; ID_BYTES],
    );
    let buf = fx.guest.alloc_bytes(&[0xff; ID_BYTES]);
    let (_, status) = fx.request(VIRTIO_BLK_T_GET_ID, 0, Desc::writable(buf, ID_BYTES as u32));

    fx.run_one();

    assert_eq!(fx.status(status), OK);
    assert_eq!(fx.guest.read(buf, ID_BYTES), [0; ID_BYTES]);
}

#[test]
fn get_id_short_buffer_gets_prefix() {
    let mut fx = Fixture::new(false);
    let buf = fx.guest.alloc(8);
    let (_, status) = fx.request(VIRTIO_BLK_T_GET_ID, 0, Desc::writable(buf, 8));

    let used = fx.run_one();

    assert_eq!(fx.status(status), OK);
    assert_eq!(used, 8 + 1);
    assert_eq!(fx.guest.read(buf, 8), &ID[..8]);
    assert!(fx.guest.outside_buffers_untouched());
}

#[test]
fn discard_range_reads_back_zeros_and_frees_blocks() {
    let mut fx = Fixture::new(false);
    fx.handler.backend().flush().unwrap();
    let before = fx.allocated_blocks();
    // Filesystem blocks 4..12: sectors 32..96.
    let sectors_per_block = (FS_BLOCK / 512) as u32;
    let status = fx.ranges(VIRTIO_BLK_T_DISCARD, &[(32, 8 * sectors_per_block, 0)]);

    let used = fx.run_one();

    assert_eq!(fx.status(status), OK);
    assert_eq!(used, 1);
    let contents = fx.image.contents();
    assert!(contents[32 * 512..96 * 512].iter().all(|&b| b == 0));
    assert_eq!(contents[..32 * 512], sector_bytes(0, 32)[..]);
    assert_eq!(
        contents[96 * 512..],
        sector_bytes(96, DISK_SECTORS - 96)[..]
    );
    let after = fx.allocated_blocks();
    assert!(after < before, "st_blocks {before} -> {after}");
}

#[test]
fn discard_two_ranges_zeroes_both() {
    let mut fx = Fixture::new(false);
    let status = fx.ranges(VIRTIO_BLK_T_DISCARD, &[(0, 8, 0), (64, 16, 0)]);

    fx.run_one();

    assert_eq!(fx.status(status), OK);
    let contents = fx.image.contents();
    assert!(contents[..8 * 512].iter().all(|&b| b == 0));
    assert!(contents[64 * 512..80 * 512].iter().all(|&b| b == 0));
    assert_eq!(contents[8 * 512..64 * 512], sector_bytes(8, 56)[..]);
}

#[test]
fn write_zeroes_without_unmap_zeroes_range() {
    let mut fx = Fixture::new(false);
    let status = fx.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[(3, 5, 0)]);

    let used = fx.run_one();

    assert_eq!(fx.status(status), OK);
    assert_eq!(used, 1);
    let contents = fx.image.contents();
    assert!(contents[3 * 512..8 * 512].iter().all(|&b| b == 0));
    assert_eq!(contents[..3 * 512], sector_bytes(0, 3)[..]);
    assert_eq!(contents[8 * 512..], sector_bytes(8, DISK_SECTORS - 8)[..]);
}

#[test]
fn write_zeroes_with_unmap_zeroes_range_and_frees_blocks() {
    let mut fx = Fixture::new(false);
    fx.handler.backend().flush().unwrap();
    let before = fx.allocated_blocks();
    let status = fx.ranges(
        VIRTIO_BLK_T_WRITE_ZEROES,
        &[(0, 64, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
    );

    fx.run_one();

    assert_eq!(fx.status(status), OK);
    assert!(fx.image.contents()[..64 * 512].iter().all(|&b| b == 0));
    let after = fx.allocated_blocks();
    assert!(after < before, "st_blocks {before} -> {after}");
}

// ---- Requests refused by type or flags ----

#[test]
fn unknown_type_is_unsupp() {
    let mut fx = Fixture::new(false);
    let buf = fx.guest.alloc(8);
    let (_, status) = fx.request(T_GET_LIFETIME, 0, Desc::writable(buf, 8));

    let used = fx.run_one();

    assert_eq!(fx.status(status), UNSUPP);
    assert_eq!(used, 1);
    assert_eq!(fx.guest.read(buf, 8), [0; 8]);
}

#[test]
fn discard_with_unmap_flag_is_unsupp_and_file_untouched() {
    let mut fx = Fixture::new(false);
    let status = fx.ranges(
        VIRTIO_BLK_T_DISCARD,
        &[(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
    );

    fx.run_one();

    assert_eq!(fx.status(status), UNSUPP);
    assert!(fx.file_untouched());
}

#[test]
fn write_zeroes_with_reserved_flag_is_unsupp_and_file_untouched() {
    let mut fx = Fixture::new(false);
    // Bit 31: reserved.
    let status = fx.ranges(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, 1 << 31)]);

    fx.run_one();

    assert_eq!(fx.status(status), UNSUPP);
    assert!(fx.file_untouched());
}

#[test]
fn discard_second_range_past_end_changes_nothing() {
    let mut fx = Fixture::new(false);
    let status = fx.ranges(VIRTIO_BLK_T_DISCARD, &[(0, 8, 0), (DISK_SECTORS - 4, 8, 0)]);

    fx.run_one();

    assert_eq!(fx.status(status), IOERR);
    assert!(fx.file_untouched());
}

// ---- Read-only disk ----

#[test]
fn read_only_write_is_ioerr_and_file_untouched() {
    let mut fx = Fixture::new(true);
    let status = fx.write(0, &[0; 512]);

    let used = fx.run_one();

    assert_eq!(fx.status(status), IOERR);
    assert_eq!(used, 1);
    assert!(fx.file_untouched());
}

#[test]
fn read_only_discard_is_ioerr_and_file_untouched() {
    let mut fx = Fixture::new(true);
    let status = fx.ranges(VIRTIO_BLK_T_DISCARD, &[(0, 8, 0)]);

    fx.run_one();

    assert_eq!(fx.status(status), IOERR);
    assert!(fx.file_untouched());
}

#[test]
fn read_only_write_zeroes_is_ioerr_and_file_untouched() {
    let mut fx = Fixture::new(true);
    let status = fx.ranges(
        VIRTIO_BLK_T_WRITE_ZEROES,
        &[(0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)],
    );

    fx.run_one();

    assert_eq!(fx.status(status), IOERR);
    assert!(fx.file_untouched());
}

#[test]
fn read_only_read_and_flush_succeed() {
    let mut fx = Fixture::new(true);
    let (data, read_status) = fx.read(1, 512);
    let flush_status = fx.bare(VIRTIO_BLK_T_FLUSH, 0);

    assert_eq!(fx.run().completed, 2);

    assert_eq!(fx.status(read_status), OK);
    assert_eq!(fx.guest.read(data, 512), sector_bytes(1, 1));
    assert_eq!(fx.status(flush_status), OK);
}

// ---- Hostile chains ----

#[test]
fn chain_descriptor_loop_ends_with_ioerr() {
    // header -> data -> status -> status -> ... : the status descriptor
    // points at itself. The chain iterator stops after a queue's worth of
    // descriptors; the request is malformed.
    let mut fx = Fixture::new(false);
    let header = fx.guest.header(VIRTIO_BLK_T_IN, 0);
    let data = fx.guest.alloc(512);
    let status = fx.guest.status_byte();
    let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    fx.guest.set_desc(0, header, 16, next, 1);
    fx.guest.set_desc(1, data, 512, next | write, 2);
    fx.guest.set_desc(2, status, 1, next | write, 2);
    fx.guest.publish(0);

    let used = fx.run_one();

    assert_eq!(fx.status(status), IOERR);
    assert_eq!(used, 1);
    assert!(fx.guest.outside_buffers_untouched());
}

#[test]
fn chain_loop_back_to_head_ends_with_ioerr() {
    // header -> data -> status -> header -> ...
    let mut fx = Fixture::new(false);
    let header = fx.guest.header(VIRTIO_BLK_T_OUT, 0);
    let data = fx.guest.alloc_bytes(&[9; 512]);
    let status = fx.guest.status_byte();
    let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    fx.guest.set_desc(0, header, 16, next, 1);
    fx.guest.set_desc(1, data, 512, next, 2);
    fx.guest.set_desc(2, status, 1, next | write, 0);
    fx.guest.publish(0);

    let used = fx.run_one();

    assert_eq!(fx.status(status), IOERR);
    assert_eq!(used, 1);
    assert!(fx.file_untouched());
}

#[test]
fn chain_next_index_beyond_queue_is_truncated_and_refused() {
    // The data descriptor's next is 300 > queue size: the chain ends there,
    // without a status descriptor.
    let mut fx = Fixture::new(false);
    let header = fx.guest.header(VIRTIO_BLK_T_OUT, 0);
    let data = fx.guest.alloc_bytes(&[9; 512]);
    let next = VRING_DESC_F_NEXT as u16;
    fx.guest.set_desc(0, header, 16, next, 1);
    fx.guest.set_desc(1, data, 512, next, 300);
    fx.guest.publish(0);

    let used = fx.run_one();

    assert_eq!(used, 0);
    assert!(fx.file_untouched());
}

#[test]
fn chain_data_outside_guest_memory_is_ioerr() {
    let mut fx = Fixture::new(false);
    let end = fx.guest.memory().last_addr().raw_value() + 1;
    let (_, status) = fx.request(
        VIRTIO_BLK_T_IN,
        0,
        Desc::writable(GuestAddress(end - 256), 512),
    );

    let used = fx.run_one();

    assert_eq!(fx.status(status), IOERR);
    assert_eq!(used, 1);
    assert!(fx.guest.outside_buffers_untouched());
}

#[test]
fn chain_write_data_outside_guest_memory_is_ioerr_and_file_untouched() {
    let mut fx = Fixture::new(false);
    let (_, status) = fx.request(
        VIRTIO_BLK_T_OUT,
        0,
        Desc::readable(GuestAddress(u64::MAX - 511), 512),
    );

    fx.run_one();

    assert_eq!(fx.status(status), IOERR);
    assert!(fx.file_untouched());
}

#[test]
fn chain_header_outside_guest_memory_is_ioerr() {
    let mut fx = Fixture::new(false);
    let data = fx.guest.alloc(512);
    let status = fx.guest.status_byte();
    fx.guest.add_chain(&[
        Desc::readable(GuestAddress(1 << 40), 16),
        Desc::writable(data, 512),
        Desc::writable(status, 1),
    ]);

    let used = fx.run_one();

    assert_eq!(fx.status(status), IOERR);
    assert_eq!(used, 1);
    assert_eq!(fx.guest.read(data, 512), [0; 512]);
}

#[test]
fn chain_status_outside_guest_memory_is_used_with_zero_and_not_executed() {
    let mut fx = Fixture::new(false);
    let header = fx.guest.header(VIRTIO_BLK_T_OUT, 0);
    let data = fx.guest.alloc_bytes(&[9; 512]);
    fx.guest.add_chain(&[
        Desc::readable(header, 16),
        Desc::readable(data, 512),
        Desc::writable(GuestAddress(1 << 40), 1),
    ]);

    let used = fx.run_one();

    assert_eq!(used, 0);
    assert!(fx.file_untouched());
    assert!(fx.guest.outside_buffers_untouched());
}

#[test]
fn chain_zero_length_data_descriptor_is_ioerr() {
    let mut fx = Fixture::new(false);
    let buf = fx.guest.alloc(512);
    let (_, status) = fx.request(VIRTIO_BLK_T_IN, 0, Desc::writable(buf, 0));

    let used = fx.run_one();

    assert_eq!(fx.status(status), IOERR);
    assert_eq!(used, 1);
    assert_eq!(fx.guest.read(buf, 512), [0; 512]);
}

#[test]
fn chain_huge_data_length_is_ioerr() {
    // 2 GiB claimed in a 2 MiB guest.
    let mut fx = Fixture::new(false);
    let buf = fx.guest.alloc(512);
    let (_, status) = fx.request(VIRTIO_BLK_T_IN, 0, Desc::writable(buf, 1 << 31));

    let used = fx.run_one();

    assert_eq!(fx.status(status), IOERR);
    assert_eq!(used, 1);
    assert!(fx.guest.outside_buffers_untouched());
}

#[test]
fn chain_longer_than_4_gib_is_cut_and_used_with_zero() {
    // The chain iterator stops before the descriptor that takes the chain
    // past 2^32 bytes (virtio 1.2 §2.7.5.2 forbids such chains), so the
    // status descriptor is never seen.
    let mut fx = Fixture::new(false);
    let buf = fx.guest.alloc(512);
    let (_, status) = fx.request(VIRTIO_BLK_T_IN, 0, Desc::writable(buf, u32::MAX - 1));

    let used = fx.run_one();

    assert_eq!(used, 0);
    assert_eq!(fx.status(status), GuestQueue::STATUS_UNSET);
    assert!(fx.guest.outside_buffers_untouched());
}

#[test]
fn chain_segment_over_size_max_is_ioerr() {
    // 4 MiB of guest memory so the oversized segment is itself valid memory.
    let mut fx = Fixture::new(false);
    fx.guest = GuestQueue::with_memory(4 << 20, QUEUE_SIZE);
    fx.queue = fx.guest.queue();
    let len = SEG_SIZE_MAX + 512;
    let buf = fx.guest.alloc(len);
    let (_, status) = fx.request(VIRTIO_BLK_T_IN, 0, Desc::writable(buf, len));

    fx.run_one();

    assert_eq!(fx.status(status), IOERR);
    assert!(fx.guest.read(buf, len as usize).iter().all(|&b| b == 0));
}

#[test]
fn chain_seg_max_plus_one_segments_is_ioerr() {
    let mut fx = Fixture::new(false);
    let header = fx.guest.header(VIRTIO_BLK_T_IN, 0);
    let mut chain = vec![Desc::readable(header, 16)];
    let segments = SEG_MAX + 1;
    let mut last = GuestAddress(0);
    for i in 0..segments {
        // The last data buffer carries the status byte too, so the chain
        // (header + 255 descriptors) fits the 256-entry queue.
        let len = if i + 1 == segments { 513 } else { 512 };
        last = fx.guest.alloc(len);
        chain.push(Desc::writable(last, len));
    }
    fx.guest.add_chain(&chain);

    let used = fx.run_one();

    assert_eq!(fx.guest.read(last.unchecked_add(512), 1), [IOERR]);
    assert_eq!(used, 1);
}

#[test]
fn chain_read_length_not_multiple_of_512_is_ioerr() {
    let mut fx = Fixture::new(false);
    let (data, status) = fx.read(0, 700);

    let used = fx.run_one();

    assert_eq!(fx.status(status), IOERR);
    assert_eq!(used, 1);
    assert_eq!(fx.guest.read(data, 700), [0; 700]);
}

#[test]
fn chain_write_length_not_multiple_of_512_is_ioerr_and_file_untouched() {
    let mut fx = Fixture::new(false);
    let status = fx.write(0, &[7; 513]);

    fx.run_one();

    assert_eq!(fx.status(status), IOERR);
    assert!(fx.file_untouched());
}

#[test]
fn chain_header_writable_is_ioerr() {
    let mut fx = Fixture::new(false);
    let header = fx.guest.header(VIRTIO_BLK_T_IN, 0);
    let data = fx.guest.alloc(512);
    let status = fx.guest.status_byte();
    fx.guest.add_chain(&[
        Desc::writable(header, 16),
        Desc::writable(data, 512),
        Desc::writable(status, 1),
    ]);

    let used = fx.run_one();

    assert_eq!(fx.status(status), IOERR);
    assert_eq!(used, 1);
    assert_eq!(fx.guest.read(data, 512), [0; 512]);
}

#[test]
fn chain_read_data_readable_is_ioerr() {
    let mut fx = Fixture::new(false);
    let buf = fx.guest.alloc(512);
    let (_, status) = fx.request(VIRTIO_BLK_T_IN, 0, Desc::readable(buf, 512));

    fx.run_one();

    assert_eq!(fx.status(status), IOERR);
    assert_eq!(fx.guest.read(buf, 512), [0; 512]);
}

#[test]
fn chain_write_data_writable_is_ioerr_and_file_untouched() {
    let mut fx = Fixture::new(false);
    let buf = fx.guest.alloc_bytes(&[3; 512]);
    let (_, status) = fx.request(VIRTIO_BLK_T_OUT, 0, Desc::writable(buf, 512));

    fx.run_one();

    assert_eq!(fx.status(status), IOERR);
    assert!(fx.file_untouched());
    assert_eq!(fx.guest.read(buf, 512), [3; 512]);
}

#[test]
fn chain_status_readable_after_write_data_is_refused_in_chain() {
    // IN whose status descriptor is device-readable: a readable descriptor
    // after a writable one. The error goes to the last device-writable
    // byte the chain has (the data buffer's), nothing outside it.
    let mut fx = Fixture::new(false);
    let header = fx.guest.header(VIRTIO_BLK_T_IN, 0);
    let data = fx.guest.alloc(512);
    let status = fx.guest.status_byte();
    fx.guest.add_chain(&[
        Desc::readable(header, 16),
        Desc::writable(data, 512),
        Desc::readable(status, 1),
    ]);

    let used = fx.run_one();

    assert_eq!(used, 1);
    assert_eq!(fx.guest.read(data.unchecked_add(511), 1), [IOERR]);
    assert_eq!(fx.status(status), GuestQueue::STATUS_UNSET);
    assert!(fx.guest.outside_buffers_untouched());
}

#[test]
fn chain_write_with_readable_status_is_used_with_zero_and_file_untouched() {
    let mut fx = Fixture::new(false);
    let header = fx.guest.header(VIRTIO_BLK_T_OUT, 0);
    let data = fx.guest.alloc_bytes(&[3; 512]);
    let status = fx.guest.status_byte();
    fx.guest.add_chain(&[
        Desc::readable(header, 16),
        Desc::readable(data, 512),
        Desc::readable(status, 1),
    ]);

    let used = fx.run_one();

    assert_eq!(used, 0);
    assert_eq!(fx.status(status), GuestQueue::STATUS_UNSET);
    assert!(fx.file_untouched());
}

#[test]
fn chain_read_without_status_descriptor_is_ioerr_in_last_data_byte() {
    let mut fx = Fixture::new(false);
    let header = fx.guest.header(VIRTIO_BLK_T_IN, 0);
    let data = fx.guest.alloc(512);
    fx.guest
        .add_chain(&[Desc::readable(header, 16), Desc::writable(data, 512)]);

    let used = fx.run_one();

    // Without a separate status, the last writable byte is the status and
    // 511 bytes of data are not whole sectors.
    assert_eq!(used, 1);
    let bytes = fx.guest.read(data, 512);
    assert_eq!(bytes[..511], [0; 511]);
    assert_eq!(bytes[511], IOERR);
}

#[test]
fn chain_write_without_status_descriptor_is_used_with_zero() {
    let mut fx = Fixture::new(false);
    let header = fx.guest.header(VIRTIO_BLK_T_OUT, 0);
    let data = fx.guest.alloc_bytes(&[3; 512]);
    fx.guest
        .add_chain(&[Desc::readable(header, 16), Desc::readable(data, 512)]);

    let used = fx.run_one();

    assert_eq!(used, 0);
    assert!(fx.file_untouched());
}

#[test]
fn chain_zero_length_status_descriptor_is_used_with_zero() {
    let mut fx = Fixture::new(false);
    let header = fx.guest.header(VIRTIO_BLK_T_OUT, 0);
    let data = fx.guest.alloc_bytes(&[3; 512]);
    let status = fx.guest.status_byte();
    fx.guest.add_chain(&[
        Desc::readable(header, 16),
        Desc::readable(data, 512),
        Desc::writable(status, 0),
    ]);

    let used = fx.run_one();

    assert_eq!(used, 0);
    assert_eq!(fx.status(status), GuestQueue::STATUS_UNSET);
    assert!(fx.file_untouched());
}

#[test]
fn chain_sector_overflowing_u64_is_ioerr() {
    let mut fx = Fixture::new(false);
    // sector * 512 overflows u64.
    let (data, status) = fx.read(u64::MAX / 512 + 1, 512);

    fx.run_one();

    assert_eq!(fx.status(status), IOERR);
    assert_eq!(fx.guest.read(data, 512), [0; 512]);
}

#[test]
fn chain_sector_plus_length_overflowing_u64_is_ioerr_and_file_untouched() {
    let mut fx = Fixture::new(false);
    // sector * 512 fits, adding 1024 bytes does not.
    let status = fx.write(u64::MAX / 512, &[1; 1024]);

    fx.run_one();

    assert_eq!(fx.status(status), IOERR);
    assert!(fx.file_untouched());
}

#[test]
fn chain_read_past_end_of_disk_is_ioerr() {
    let mut fx = Fixture::new(false);
    // The last sector plus one more.
    let (data, status) = fx.read(DISK_SECTORS - 1, 1024);

    fx.run_one();

    assert_eq!(fx.status(status), IOERR);
    assert_eq!(fx.guest.read(data, 1024), [0; 1024]);
}

#[test]
fn chain_write_at_capacity_is_ioerr_and_file_untouched() {
    let mut fx = Fixture::new(false);
    let status = fx.write(DISK_SECTORS, &[1; 512]);

    fx.run_one();

    assert_eq!(fx.status(status), IOERR);
    assert!(fx.file_untouched());
    assert_eq!(fx.image.contents().len() as u64, DISK_SIZE);
}

#[test]
fn chain_header_shorter_than_16_bytes_is_ioerr() {
    let mut fx = Fixture::new(false);
    let header = fx.guest.header(VIRTIO_BLK_T_FLUSH, 0);
    let status = fx.guest.status_byte();
    fx.guest
        .add_chain(&[Desc::readable(header, 8), Desc::writable(status, 1)]);

    let used = fx.run_one();

    assert_eq!(fx.status(status), IOERR);
    assert_eq!(used, 1);
}

#[test]
fn chain_of_one_readable_descriptor_is_used_with_zero() {
    let mut fx = Fixture::new(false);
    let header = fx.guest.header(VIRTIO_BLK_T_FLUSH, 0);
    fx.guest.add_chain(&[Desc::readable(header, 16)]);

    let used = fx.run_one();

    assert_eq!(used, 0);
    assert!(fx.guest.outside_buffers_untouched());
}

#[test]
fn chain_of_one_writable_descriptor_is_ioerr_in_its_last_byte() {
    let mut fx = Fixture::new(false);
    let buf = fx.guest.alloc(16);
    fx.guest.add_chain(&[Desc::writable(buf, 16)]);

    let used = fx.run_one();

    assert_eq!(used, 1);
    let bytes = fx.guest.read(buf, 16);
    assert_eq!(bytes[..15], [0; 15]);
    assert_eq!(bytes[15], IOERR);
}

#[test]
fn chain_flush_with_data_is_ioerr() {
    let mut fx = Fixture::new(false);
    let buf = fx.guest.alloc(512);
    let (_, status) = fx.request(VIRTIO_BLK_T_FLUSH, 0, Desc::readable(buf, 512));

    fx.run_one();

    assert_eq!(fx.status(status), IOERR);
}

#[test]
fn chain_through_indirect_table_is_served() {
    let mut fx = Fixture::new(false);
    let header = fx.guest.header(VIRTIO_BLK_T_IN, 4);
    let data = fx.guest.alloc(512);
    let status = fx.guest.status_byte();
    let table = fx.guest.alloc(3 * 16);
    let (next, write) = (VRING_DESC_F_NEXT as u16, VRING_DESC_F_WRITE as u16);
    let entries = [
        (header, 16, next, 1u16),
        (data, 512, next | write, 2),
        (status, 1, write, 0),
    ];
    for (i, (addr, len, flags, next)) in entries.into_iter().enumerate() {
        let desc = virtio_queue::desc::RawDescriptor::from(
            virtio_queue::desc::split::Descriptor::new(addr.raw_value(), len, flags, next),
        );
        fx.guest
            .memory()
            .write_obj(desc, table.unchecked_add(16 * i as u64))
            .unwrap();
    }
    fx.guest
        .set_desc(0, table, 3 * 16, VRING_DESC_F_INDIRECT as u16, 0);
    fx.guest.publish(0);

    let used = fx.run_one();

    assert_eq!(fx.status(status), OK);
    assert_eq!(used, 513);
    assert_eq!(fx.guest.read(data, 512), sector_bytes(4, 1));
}

// ---- Broken rings ----

#[test]
fn ring_head_index_beyond_queue_is_handler_error() {
    let mut fx = Fixture::new(false);
    // Avail entry 300 is not a descriptor of a 256-entry queue.
    fx.guest.publish(300);

    let result = fx
        .handler
        .process_queue(&mut fx.queue, fx.guest.memory(), &fx.interrupt);

    assert!(matches!(result, Err(HandlerError::UsedRing(_))));
    assert!(fx.file_untouched());
}

#[test]
fn ring_avail_index_too_far_ahead_is_handler_error() {
    let mut fx = Fixture::new(false);
    // More entries published than the queue has: avail idx 257.
    for _ in 0..=QUEUE_SIZE {
        fx.guest.publish(0);
    }

    let result = fx
        .handler
        .process_queue(&mut fx.queue, fx.guest.memory(), &fx.interrupt);

    assert!(matches!(result, Err(HandlerError::AvailRing(_))));
    assert_eq!(fx.guest.used_idx(), 0);
}

// ---- Notifications ----

#[test]
fn notification_empty_queue_raises_no_interrupt() {
    let mut fx = Fixture::new(false);

    let run = fx.run();

    assert_eq!(run, QueueRun::default());
    assert_eq!(fx.interrupt.count(chitin_virtio::InterruptKind::Queue), 0);
}

#[test]
fn notification_without_event_idx_interrupts_once_per_run() {
    let mut fx = Fixture::new(false);
    fx.bare(VIRTIO_BLK_T_FLUSH, 0);
    fx.bare(VIRTIO_BLK_T_FLUSH, 0);
    fx.bare(VIRTIO_BLK_T_FLUSH, 0);

    let run = fx.run();

    assert_eq!(run.completed, 3);
    assert!(run.notified);
    assert_eq!(fx.interrupt.count(chitin_virtio::InterruptKind::Queue), 1);
}

#[test]
fn notification_with_event_idx_interrupts_only_when_used_event_passed() {
    let mut fx = Fixture::new(false);
    fx.queue.set_event_idx(true);
    // The driver wants an interrupt once used entry 2 is written.
    fx.guest.set_used_event(2);
    fx.bare(VIRTIO_BLK_T_FLUSH, 0);
    fx.bare(VIRTIO_BLK_T_FLUSH, 0);

    // Used idx 0 -> 2: entry 2 not yet written.
    let first = fx.run();
    fx.bare(VIRTIO_BLK_T_FLUSH, 0);
    // Used idx 2 -> 3: entry 2 written.
    let second = fx.run();

    assert!(!first.notified);
    assert!(second.notified);
    assert_eq!(fx.interrupt.count(chitin_virtio::InterruptKind::Queue), 1);
}

#[test]
fn notification_with_event_idx_publishes_avail_event() {
    let mut fx = Fixture::new(false);
    fx.queue.set_event_idx(true);
    fx.bare(VIRTIO_BLK_T_FLUSH, 0);
    fx.bare(VIRTIO_BLK_T_FLUSH, 0);

    fx.run();

    // avail_event, after the used ring's 256 elements: the device asks to
    // be notified when the driver publishes entry 2.
    let at = fx.queue.used_ring() + 4 + 8 * u64::from(QUEUE_SIZE);
    let avail_event: u16 = fx.guest.memory().read_obj(GuestAddress(at)).unwrap();
    assert_eq!(u16::from_le(avail_event), 2);
}

// ---- Run budget ----

/// A handler over a Vec, for tests that need no file.
fn mem_handler(size: usize) -> QueueHandler<MemBackend> {
    QueueHandler::new(MemBackend::new(size), false, [0; ID_BYTES])
}

#[test]
fn run_more_chains_than_budget_yields_pending_then_finishes() {
    let handler = mem_handler(DISK_SIZE as usize);
    let mut guest = GuestQueue::new(QUEUE_SIZE);
    let mut queue = guest.queue();
    let interrupt = RecordingInterrupt::default();
    // One GET_ID chain published 200 times (a driver may reuse a chain
    // once it is used; here all entries are out at once, which the device
    // handles the same way). GET_ID does no disk work, so only the chain
    // count bounds the run.
    let header = guest.header(VIRTIO_BLK_T_GET_ID, 0);
    let id = guest.alloc(20);
    let status = guest.status_byte();
    let head = guest.add_chain(&[
        Desc::readable(header, 16),
        Desc::writable(id, 20),
        Desc::writable(status, 1),
    ]);
    for _ in 1..200 {
        guest.publish(head);
    }

    let first = handler
        .process_queue(&mut queue, guest.memory(), &interrupt)
        .unwrap();
    let second = handler
        .process_queue(&mut queue, guest.memory(), &interrupt)
        .unwrap();

    assert_eq!(first.completed, MAX_CHAINS_PER_RUN);
    assert!(first.pending);
    assert!(first.notified);
    assert_eq!(second.completed, 200 - MAX_CHAINS_PER_RUN);
    assert!(!second.pending);
    assert_eq!(guest.used_idx(), 200);
}

/// A disk without `FALLOC_FL_ZERO_RANGE`: zeroing and discarding write
/// zeros at 1 GiB/s (a millisecond a MiB), as the file backend's fallback
/// does on tmpfs. Counts the bytes it zeroed.
struct SlowZeroes(MemBackend, std::sync::atomic::AtomicU64);

impl SlowZeroes {
    fn zeroed(&self) -> u64 {
        self.1.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl BlockBackend for SlowZeroes {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at<B: BitmapSlice>(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_, B>],
    ) -> io::Result<()> {
        self.0.read_at(offset, bufs)
    }
    fn write_at<B: BitmapSlice>(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_, B>],
    ) -> io::Result<()> {
        self.0.write_at(offset, bufs)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len, true)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        std::thread::sleep(std::time::Duration::from_millis(len >> 20));
        self.1.fetch_add(len, std::sync::atomic::Ordering::SeqCst);
        self.0.write_zeroes(offset, len, unmap)
    }
}

/// 16 MiB: one full-size range.
const ZERO_DISK: u64 = (crate::MAX_WRITE_ZEROES_SECTORS as u64) << 9;

fn slow_zeroes_handler() -> QueueHandler<SlowZeroes> {
    let backend = SlowZeroes(MemBackend::new(ZERO_DISK as usize), Default::default());
    QueueHandler::new(backend, false, [0; ID_BYTES])
}

/// Queue a WRITE_ZEROES of `ranges` ranges of `sectors` each, all at 0.
fn queue_write_zeroes(guest: &mut GuestQueue, ranges: usize, sectors: u32) -> GuestAddress {
    let header = guest.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
    let payload = guest.ranges(&vec![(0, sectors, 0); ranges]);
    let status = guest.status_byte();
    guest.add_chain(&[
        Desc::readable(header, 16),
        Desc::readable(payload, (ranges * 16) as u32),
        Desc::writable(status, 1),
    ]);
    status
}

#[test]
fn write_zeroes_of_32_ranges_of_1_gib_is_refused_before_any_work() {
    let handler = slow_zeroes_handler();
    let mut guest = GuestQueue::new(QUEUE_SIZE);
    let mut queue = guest.queue();
    let interrupt = RecordingInterrupt::default();
    // What the device offered before: 32 ranges of 1 GiB, 32 GiB of
    // zeros in one request (terabytes in one run of 128 such chains).
    let status = queue_write_zeroes(&mut guest, 32, 1 << 21);
    let run = handler
        .process_queue(&mut queue, guest.memory(), &interrupt)
        .unwrap();
    assert_eq!(run.completed, 1);
    assert_ne!(guest.read(status, 1)[0], OK);
    assert_eq!(handler.backend().zeroed(), 0);
}

#[test]
fn run_of_full_size_write_zeroes_stops_at_its_byte_budget_and_stays_short() {
    let handler = slow_zeroes_handler();
    let mut guest = GuestQueue::with_memory(4 << 20, QUEUE_SIZE);
    let mut queue = guest.queue();
    let interrupt = RecordingInterrupt::default();
    // The most one request may ask: MAX_WRITE_ZEROES_SEG ranges of the
    // most sectors, 128 MiB; 64 of them (all the ring holds, at three
    // descriptors each) would keep one run busy for 8 s at 1 GiB/s.
    let seg = crate::MAX_WRITE_ZEROES_SEG as usize;
    let statuses: Vec<_> = (0..64)
        .map(|_| queue_write_zeroes(&mut guest, seg, crate::MAX_WRITE_ZEROES_SECTORS))
        .collect();
    let per_request = seg as u64 * ZERO_DISK;
    let started = std::time::Instant::now();
    let run = handler
        .process_queue(&mut queue, guest.memory(), &interrupt)
        .unwrap();
    let took = started.elapsed();
    // The run stopped once it had done its budget: one request here (the
    // first always runs), and came back pending.
    assert!(run.pending);
    let done = handler.backend().zeroed();
    assert!(done >= MAX_BYTES_PER_RUN, "{done}");
    assert!(done < MAX_BYTES_PER_RUN + per_request, "{done}");
    assert_eq!(done % per_request, 0);
    assert_eq!(run.completed as u64, done / per_request);
    assert_eq!(guest.read(statuses[0], 1)[0], OK);
    eprintln!(
        "full-size write zeroes: one run did {done} bytes in {took:?}, pending={}",
        run.pending
    );
    // What stop() waits for at most: one run (128 ms of zeros here).
    assert!(
        took < std::time::Duration::from_secs(1),
        "one run took {took:?}"
    );
}

#[test]
fn run_of_flushes_stops_after_eight() {
    let handler = mem_handler(DISK_SIZE as usize);
    let mut guest = GuestQueue::new(QUEUE_SIZE);
    let mut queue = guest.queue();
    let interrupt = RecordingInterrupt::default();
    let header = guest.header(VIRTIO_BLK_T_FLUSH, 0);
    let status = guest.status_byte();
    let head = guest.add_chain(&[Desc::readable(header, 16), Desc::writable(status, 1)]);
    for _ in 1..20 {
        guest.publish(head);
    }
    let run = handler
        .process_queue(&mut queue, guest.memory(), &interrupt)
        .unwrap();
    // A flush may write back everything dirty: an eighth of a run each.
    assert_eq!(run.completed, 8);
    assert!(run.pending);
}

// ---- Backend failures ----

/// A MemBackend whose first flush fails with EIO, as `fdatasync` does
/// after a lost write-back, and whose later flushes succeed, as Linux's do
/// once it has reported the error (the data is gone all the same).
struct FlushFails(MemBackend, std::sync::atomic::AtomicBool);

impl FlushFails {
    fn new(bytes: Vec<u8>) -> Self {
        FlushFails(
            MemBackend::from_bytes(bytes),
            std::sync::atomic::AtomicBool::new(false),
        )
    }
}

impl BlockBackend for FlushFails {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at<B: BitmapSlice>(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_, B>],
    ) -> io::Result<()> {
        self.0.read_at(offset, bufs)
    }
    fn write_at<B: BitmapSlice>(
        &self,
        offset: u64,
        bufs: &[VolatileSlice<'_, B>],
    ) -> io::Result<()> {
        self.0.write_at(offset, bufs)
    }
    fn flush(&self) -> io::Result<()> {
        if self.1.swap(true, std::sync::atomic::Ordering::SeqCst) {
            Ok(())
        } else {
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.0.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> io::Result<()> {
        self.0.write_zeroes(offset, len, unmap)
    }
}

#[test]
fn backend_flush_eio_is_ioerr_and_device_keeps_serving() {
    let bytes = TempImage::pattern(DISK_SIZE);
    let handler = QueueHandler::new(FlushFails::new(bytes.clone()), false, [0; ID_BYTES]);
    let mut guest = GuestQueue::new(QUEUE_SIZE);
    let mut queue = guest.queue();
    let interrupt = RecordingInterrupt::default();
    let header = guest.header(VIRTIO_BLK_T_FLUSH, 0);
    let flush_status = guest.status_byte();
    guest.add_chain(&[Desc::readable(header, 16), Desc::writable(flush_status, 1)]);
    let header = guest.header(VIRTIO_BLK_T_IN, 2);
    let data = guest.alloc(512);
    let read_status = guest.status_byte();
    guest.add_chain(&[
        Desc::readable(header, 16),
        Desc::writable(data, 512),
        Desc::writable(read_status, 1),
    ]);

    let run = handler
        .process_queue(&mut queue, guest.memory(), &interrupt)
        .unwrap();

    assert_eq!(run.completed, 2);
    assert_eq!(guest.read(flush_status, 1), [IOERR]);
    assert_eq!(guest.read(read_status, 1), [OK]);
    assert_eq!(guest.read(data, 512), &bytes[1024..1536]);
    assert_eq!(interrupt.needs_reset_count(), 0);
}

#[test]
fn backend_flush_eio_once_fails_every_later_flush_and_write() {
    let bytes = TempImage::pattern(DISK_SIZE);
    let handler = QueueHandler::new(FlushFails::new(bytes.clone()), false, [0; ID_BYTES]);
    let mut guest = GuestQueue::new(QUEUE_SIZE);
    let mut queue = guest.queue();
    let interrupt = RecordingInterrupt::default();
    let flush = |guest: &mut GuestQueue| {
        let header = guest.header(VIRTIO_BLK_T_FLUSH, 0);
        let status = guest.status_byte();
        guest.add_chain(&[Desc::readable(header, 16), Desc::writable(status, 1)]);
        status
    };
    let first = flush(&mut guest);
    // The backend's second flush would succeed: the device must not.
    let second = flush(&mut guest);
    let header = guest.header(VIRTIO_BLK_T_OUT, 0);
    let data = guest.alloc_bytes(&[7; 512]);
    let write = guest.status_byte();
    guest.add_chain(&[
        Desc::readable(header, 16),
        Desc::readable(data, 512),
        Desc::writable(write, 1),
    ]);
    let header = guest.header(VIRTIO_BLK_T_IN, 2);
    let buf = guest.alloc(512);
    let read = guest.status_byte();
    guest.add_chain(&[
        Desc::readable(header, 16),
        Desc::writable(buf, 512),
        Desc::writable(read, 1),
    ]);

    handler
        .process_queue(&mut queue, guest.memory(), &interrupt)
        .unwrap();

    assert_eq!(guest.read(first, 1), [IOERR]);
    assert_eq!(guest.read(second, 1), [IOERR]);
    assert_eq!(guest.read(write, 1), [IOERR]);
    assert_eq!(handler.backend().0.contents()[..512], bytes[..512]);
    // Reads still work.
    assert_eq!(guest.read(read, 1), [OK]);
    assert_eq!(guest.read(buf, 512), &bytes[1024..1536]);
    assert!(handler.failed());
}

#[test]
fn execute_error_status_maps_unsupported_kinds_to_unsupp_rest_to_ioerr() {
    let eio = || io::Error::from_raw_os_error(libc::EIO);

    assert_eq!(
        ExecuteError::from(RequestError::UnsupportedType(99)).status(),
        UNSUPP
    );
    assert_eq!(
        ExecuteError::from(RequestError::UnknownFlags(2)).status(),
        UNSUPP
    );
    assert_eq!(
        ExecuteError::from(RequestError::DiscardUnmap).status(),
        UNSUPP
    );
    assert_eq!(
        ExecuteError::from(RequestError::HeaderTooShort).status(),
        IOERR
    );
    assert_eq!(ExecuteError::ReadOnly.status(), IOERR);
    assert_eq!(
        ExecuteError::OutOfRange { sector: 0, len: 0 }.status(),
        IOERR
    );
    assert_eq!(ExecuteError::Read(eio()).status(), IOERR);
    assert_eq!(ExecuteError::Write(eio()).status(), IOERR);
    assert_eq!(ExecuteError::Flush(eio()).status(), IOERR);
    assert_eq!(ExecuteError::Discard(eio()).status(), IOERR);
    assert_eq!(ExecuteError::WriteZeroes(eio()).status(), IOERR);
    assert_eq!(ExecuteError::Failed.status(), IOERR);
}

// ---- Random hostile rings ----

/// xorshift64: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
}

#[test]
fn random_descriptor_tables_never_panic() {
    // Small queues full of random descriptors over a MemBackend: random
    // addresses (some outside memory), lengths (some huge), flags (NEXT,
    // WRITE, INDIRECT) and next indices, and headers of random types.
    const QUEUE: u16 = 16;
    const ROUNDS: usize = 300;
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for _ in 0..ROUNDS {
        let handler = mem_handler(DISK_SIZE as usize);
        let mut guest = GuestQueue::new(QUEUE);
        let mut queue = guest.queue();
        queue.set_event_idx(rng.below(2) == 1);
        let interrupt = RecordingInterrupt::default();
        let mem_end = guest.memory().last_addr().raw_value() + 1;
        let mut buffers = Vec::new();
        // Where the driver let the device write, directly.
        let mut writable = Vec::new();
        for _ in 0..8 {
            let request_type = [0, 1, 4, 8, 11, 13, 99][rng.below(7) as usize];
            buffers.push(guest.header(request_type, rng.below(DISK_SECTORS + 4)));
            buffers.push(guest.alloc(1024));
        }
        for index in 0..QUEUE {
            let addr = match rng.below(8) {
                0 => GuestAddress(rng.next()),
                1 => GuestAddress(mem_end - rng.below(64)),
                _ => buffers[rng.below(buffers.len() as u64) as usize],
            };
            let len = match rng.below(6) {
                0 => rng.next() as u32,
                1 => 0,
                _ => [1, 16, 20, 32, 512, 1024][rng.below(6) as usize],
            };
            let flags = (rng.below(8) as u16)
                & (VRING_DESC_F_NEXT | VRING_DESC_F_WRITE | VRING_DESC_F_INDIRECT) as u16;
            let next = rng.below(u64::from(QUEUE) + 2) as u16;
            guest.set_desc(index, addr, len, flags, next);
            if flags & VRING_DESC_F_WRITE as u16 != 0 {
                writable.push((addr.0, addr.0.saturating_add(u64::from(len))));
            }
        }
        let published = rng.below(u64::from(QUEUE) + 1) as u16;
        for _ in 0..published {
            guest.publish(rng.below(u64::from(QUEUE)) as u16);
        }
        let disk_before = handler.backend().contents();
        // Any buffer may serve as a chain's header: where each would aim.
        let aimed: Vec<std::ops::Range<usize>> = buffers
            .iter()
            .map(|&buffer| {
                let header = guest.read(buffer, 16);
                let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
                let start = sector.saturating_mul(512).min(u64::MAX / 2) as usize;
                start..start + 8192
            })
            .collect();

        // Any outcome but a panic is fine; a broken ring is an error.
        let run = handler.process_queue(&mut queue, guest.memory(), &interrupt);

        // Whatever the tables said: nothing outside the buffers and the
        // device-writable descriptors was written (indirect tables made
        // of buffer bytes point below the buffers or outside memory), no chain was completed twice or made up,
        // every used element names a descriptor of the table and claims no
        // more than the memory could hold, and the disk changed only where
        // a request header could have aimed a write (its sector and the
        // 8 KiB after it: at most 8 data descriptors of 1 KiB).
        assert!(
            guest.untouched_outside(&writable),
            "a write outside the chains"
        );
        let used = guest.used_idx();
        assert!(used <= published, "{used} used of {published} published");
        if let Ok(run) = &run {
            assert_eq!(usize::from(used), run.completed);
        }
        for i in 0..used {
            let (id, len) = guest.used(i);
            assert!(id < u32::from(QUEUE), "used id {id}");
            assert!(u64::from(len) <= mem_end, "used len {len}");
        }
        let disk_after = handler.backend().contents();
        for (i, (b, a)) in disk_before.iter().zip(&disk_after).enumerate() {
            assert!(
                b == a || aimed.iter().any(|r| r.contains(&i)),
                "disk byte {i} changed where no header aimed"
            );
        }
        assert_eq!(handler.backend().size(), DISK_SIZE);
    }
}

// ---- Faults the guest caused are counted by reason ----

#[test]
fn faults_read_past_end_and_unknown_type_are_counted() {
    let mut fx = Fixture::new(false);
    fx.read(DISK_SECTORS - 1, 1024);
    fx.bare(T_GET_LIFETIME, 0);

    fx.run();

    let faults = fx.handler.faults();
    assert_eq!(faults.count("request beyond the end of the disk"), 1);
    assert_eq!(faults.count("unsupported request type"), 1);
    assert_eq!(faults.total(), 2);
}

#[test]
fn faults_write_to_read_only_disk_is_counted() {
    let mut fx = Fixture::new(true);
    fx.write(0, &[1; 512]);

    fx.run_one();

    assert_eq!(fx.handler.faults().count("write to a read-only disk"), 1);
}

#[test]
fn faults_good_requests_count_nothing() {
    let mut fx = Fixture::new(false);
    fx.read(0, 1024);
    fx.write(2, &[1; 512]);
    fx.bare(VIRTIO_BLK_T_FLUSH, 0);

    fx.run();

    assert_eq!(fx.handler.faults().total(), 0);
}

#[test]
fn a_limited_queue_runs_what_the_limiter_admits_and_leaves_the_rest_in_the_ring() {
    use std::num::NonZeroU64;

    use chitin_virtio::{Limit, RateLimit};

    let mut fx = Fixture::new(false);
    for sector in 0..6 {
        let data = fx.guest.alloc(512);
        fx.request(VIRTIO_BLK_T_IN, sector, Desc::writable(data, 512));
    }
    // 20 requests a second: the bucket holds two.
    let mut limiter = RateLimiter::new(RateLimit {
        bandwidth: None,
        ops: Some(Limit::per_second(NonZeroU64::new(20).unwrap())),
    })
    .unwrap();

    let run = fx
        .handler
        .process_queue_limited(
            &mut fx.queue,
            fx.guest.memory(),
            &fx.interrupt,
            Some(&mut limiter),
        )
        .unwrap();

    assert_eq!(run.completed, 2);
    // Held back by the limiter, not by the run's bound: no rearm.
    assert!(!run.pending);
    assert!(limiter.is_throttled());
    assert_eq!(fx.guest.used_idx(), 2);
    // Throttled: a run does nothing until the timer.
    let run = fx
        .handler
        .process_queue_limited(
            &mut fx.queue,
            fx.guest.memory(),
            &fx.interrupt,
            Some(&mut limiter),
        )
        .unwrap();
    assert_eq!(run.completed, 0);
    assert_eq!(fx.guest.used_idx(), 2);
}

#[test]
fn a_limiter_charges_the_bytes_read_and_written() {
    use std::num::NonZeroU64;

    use chitin_virtio::{Limit, RateLimit};

    let mut fx = Fixture::new(false);
    for sector in 0..4 {
        let data = fx.guest.alloc(4096);
        fx.request(VIRTIO_BLK_T_OUT, sector * 8, Desc::readable(data, 4096));
    }
    // 40 000 bytes/s: the bucket holds 4000 bytes, so the first 4 KiB
    // write passes (a whole token was there) and leaves it in debt.
    let mut limiter = RateLimiter::new(RateLimit {
        bandwidth: Some(Limit::per_second(NonZeroU64::new(40_000).unwrap())),
        ops: None,
    })
    .unwrap();

    let run = fx
        .handler
        .process_queue_limited(
            &mut fx.queue,
            fx.guest.memory(),
            &fx.interrupt,
            Some(&mut limiter),
        )
        .unwrap();

    assert_eq!(run.completed, 1);
    assert!(limiter.is_throttled());
}
