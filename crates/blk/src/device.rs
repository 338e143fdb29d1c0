//! [`Block`]: the virtio-blk device the transport sees (virtio 1.2 §5.2).
//!
//! It owns the disk, the configuration space and the queue notification
//! `EventFd`, and, between activate and reset, the queue, guest memory and
//! interrupt. Request processing itself is [`crate::handler`]; the event
//! loop reaches it through the `event` module.
//!
//! Offered features: `SEG_MAX`, `SIZE_MAX`, `BLK_SIZE` (512), `FLUSH`, and
//! either `DISCARD` + `WRITE_ZEROES` or, for a read-only disk, `RO`. The
//! writeback toggle (`CONFIG_WCE`) is not offered, so the driver assumes a
//! writeback cache and sends FLUSH, which is `fdatasync`.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use chitin_virtio::active::{kick, rearm};
use chitin_virtio::rate_limit::RateLimiterError;
use chitin_virtio::{
    read_config_bytes, ActivateContext, ActivateError, Active, GuestFaults, RateLimit, RateLimiter,
    VirtioDevice,
};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::BlockBackend;
use crate::file::FileBackend;
use crate::handler::QueueHandler;
use crate::{
    DISCARD_SECTOR_ALIGNMENT, ID_BYTES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG,
    MAX_WRITE_ZEROES_SECTORS, MAX_WRITE_ZEROES_SEG, QUEUE_SIZE, SECTOR_SIZE, SEG_MAX, SEG_SIZE_MAX,
};

/// Virtio device ID of a block device (virtio 1.2 §5.2.1).
pub const DEVICE_TYPE_BLOCK: u32 = 2;

/// Bytes of configuration space the device defines: `struct
/// virtio_blk_config` up to and including `unused1` after
/// `write_zeroes_may_unmap`. Reads beyond return zeros.
pub const CONFIG_LEN: usize = 60;

/// Field offsets in `struct virtio_blk_config` (virtio 1.2 §5.2.4).
pub mod config_offset {
    /// `le64 capacity`, in 512-byte sectors.
    pub const CAPACITY: usize = 0;
    /// `le32 size_max`.
    pub const SIZE_MAX: usize = 8;
    /// `le32 seg_max`.
    pub const SEG_MAX: usize = 12;
    /// `le32 blk_size`.
    pub const BLK_SIZE: usize = 20;
    /// `le32 max_discard_sectors`.
    pub const MAX_DISCARD_SECTORS: usize = 36;
    /// `le32 max_discard_seg`.
    pub const MAX_DISCARD_SEG: usize = 40;
    /// `le32 discard_sector_alignment`.
    pub const DISCARD_SECTOR_ALIGNMENT: usize = 44;
    /// `le32 max_write_zeroes_sectors`.
    pub const MAX_WRITE_ZEROES_SECTORS: usize = 48;
    /// `le32 max_write_zeroes_seg`.
    pub const MAX_WRITE_ZEROES_SEG: usize = 52;
    /// `u8 write_zeroes_may_unmap`.
    pub const WRITE_ZEROES_MAY_UNMAP: usize = 56;
}

/// The one queue's maximum size.
const QUEUE_MAX_SIZES: [u16; 1] = [QUEUE_SIZE];

/// What disk to attach and how.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    /// A raw image: a regular file or a block device.
    pub path: PathBuf,
    /// Open the image read-only and refuse every write from the guest.
    pub read_only: bool,
    /// The device ID string (GET_ID): ASCII, at most 20 bytes.
    pub id: Option<String>,
    /// Limit on requests (operations) and on the bytes they read and
    /// write.
    pub rate_limit: RateLimit,
}

/// Why a block device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum BlkError {
    /// The image could not be opened (missing, no permission, or a
    /// read-write open of a read-only file).
    #[error("cannot open disk image {}", path.display())]
    Open {
        /// The image path.
        path: PathBuf,
        /// What `open` reported.
        #[source]
        source: io::Error,
    },
    /// Another open of the image holds a lock that this one conflicts with:
    /// a read-write open needs the image to itself, a read-only one
    /// shares it only with other read-only opens.
    #[error("disk image {} is in use ({})", path.display(), if *read_only {
        "open read-write elsewhere"
    } else {
        "open elsewhere; a read-write disk cannot be shared"
    })]
    InUse {
        /// The image path.
        path: PathBuf,
        /// Whether this open was read-only.
        read_only: bool,
    },
    /// The image could not be locked for another reason.
    #[error("cannot lock disk image {}", path.display())]
    Lock {
        /// The image path.
        path: PathBuf,
        /// What `flock` reported.
        #[source]
        source: io::Error,
    },
    /// The image is neither a regular file nor a block device.
    #[error("disk image {} is neither a regular file nor a block device", path.display())]
    NotADisk {
        /// The image path.
        path: PathBuf,
    },
    /// The image size could not be determined.
    #[error("cannot determine the size of disk image {}", path.display())]
    Size {
        /// The image path.
        path: PathBuf,
        /// What `fstat` or `lseek` reported.
        #[source]
        source: io::Error,
    },
    /// The image is not a whole number of 512-byte sectors.
    #[error("disk image {} is {size} bytes, not a multiple of {SECTOR_SIZE}", path.display())]
    UnalignedSize {
        /// The image path.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// The device ID is longer than 20 bytes.
    #[error("disk id {id:?} is {} bytes long, at most {ID_BYTES} fit", id.len())]
    IdTooLong {
        /// The ID given.
        id: String,
    },
    /// The device ID is not ASCII (virtio 1.2 §5.2.6).
    #[error("disk id {id:?} is not ASCII")]
    IdNotAscii {
        /// The ID given.
        id: String,
    },
    /// The queue notification eventfd could not be created.
    #[error("cannot create the queue notification eventfd")]
    EventFd(#[source] io::Error),
    /// The rate limiter's timer could not be created.
    #[error(transparent)]
    RateLimiter(#[from] RateLimiterError),
}

/// Put `file` back in blocking mode (it was opened non-blocking only to
/// keep the open itself from waiting).
fn clear_nonblocking(file: &File) -> io::Result<()> {
    // SAFETY: F_GETFL and F_SETFL take no pointers; `file` is open.
    unsafe {
        let flags = libc::fcntl(file.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Take `flock` on the image for as long as `file` is open: shared when
/// read-only, exclusive when read-write, so two sandboxes never write one
/// image at once (nor read it while another writes). Advisory, as every
/// cooperating VMM's image lock is.
fn lock_image(file: &File, path: &Path, read_only: bool) -> Result<(), BlkError> {
    let mode = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        if unsafe { libc::flock(file.as_raw_fd(), mode | libc::LOCK_NB) } == 0 {
            return Ok(());
        }
        let source = io::Error::last_os_error();
        match source.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => {
                return Err(BlkError::InUse {
                    path: path.to_path_buf(),
                    read_only,
                })
            }
            _ => {
                return Err(BlkError::Lock {
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
    }
}

/// A virtio-blk device over a raw image.
pub struct Block {
    handler: QueueHandler<FileBackend>,
    config: [u8; CONFIG_LEN],
    queue_events: [EventFd; 1],
    limiter: Option<RateLimiter>,
    /// Set between activate and reset.
    active: Option<Active<1>>,
}

impl Block {
    /// Open the image (`O_RDONLY` when read-only) and size it by seeking to
    /// its end, which works for regular files and block devices.
    pub fn new(config: DiskConfig) -> Result<Block, BlkError> {
        let DiskConfig {
            path,
            read_only,
            id,
            rate_limit,
        } = config;
        let id = device_id(id)?;
        // Non-blocking so that a FIFO is refused below rather than waited
        // on here; never a controlling terminal.
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&path)
            .map_err(|source| BlkError::Open {
                path: path.clone(),
                source,
            })?;
        let file_type = file
            .metadata()
            .map_err(|source| BlkError::Size {
                path: path.clone(),
                source,
            })?
            .file_type();
        if !file_type.is_file() && !file_type.is_block_device() {
            return Err(BlkError::NotADisk { path });
        }
        clear_nonblocking(&file).map_err(|source| BlkError::Open {
            path: path.clone(),
            source,
        })?;
        lock_image(&file, &path, read_only)?;
        let backend = FileBackend::new(file).map_err(|source| BlkError::Size {
            path: path.clone(),
            source,
        })?;
        let size = backend.size();
        if size % SECTOR_SIZE != 0 {
            return Err(BlkError::UnalignedSize { path, size });
        }
        let queue_event = EventFd::new(EFD_NONBLOCK).map_err(BlkError::EventFd)?;
        let faults = GuestFaults::new(format!("blk {}", path.display()));
        Ok(Block {
            handler: QueueHandler::new(backend, read_only, id).with_faults(faults),
            config: config_space(size / SECTOR_SIZE, read_only),
            queue_events: [queue_event],
            limiter: if rate_limit.is_unlimited() {
                None
            } else {
                Some(RateLimiter::new(rate_limit)?)
            },
            active: None,
        })
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity_sectors(&self) -> u64 {
        self.handler.backend().size() / SECTOR_SIZE
    }

    /// Whether the disk refuses writes.
    pub fn read_only(&self) -> bool {
        self.handler.read_only()
    }

    /// What the guest sent that the disk refused, by reason; a clone shares
    /// the live counts.
    pub fn faults(&self) -> &GuestFaults {
        self.handler.faults()
    }

    /// The limiter, if the disk is limited.
    pub(crate) fn limiter_mut(&mut self) -> Option<&mut RateLimiter> {
        self.limiter.as_mut()
    }

    /// The limiter's timer, if the disk is limited.
    pub(crate) fn limiter_timer(&self) -> Option<&vmm_sys_util::timerfd::TimerFd> {
        self.limiter.as_ref().map(RateLimiter::timer)
    }

    /// The notification eventfd of the request queue.
    pub(crate) fn queue_event(&self) -> &EventFd {
        &self.queue_events[0]
    }

    /// Run the queue, if activated and not failed. Called by the event loop
    /// after the queue eventfd fired.
    pub(crate) fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let (handler, event) = (&mut self.handler, &self.queue_events[0]);
        let limiter = self.limiter.as_mut();
        active.run(|[queue], mem, interrupt| {
            // More chains than one run takes: come back through the event
            // loop so other devices get their turn.
            handler
                .process_queue_limited(queue, mem, interrupt, limiter)
                .map(|run| rearm(event, run))
        });
    }
}

/// The ID as GET_ID returns it: NUL-padded to 20 bytes.
fn device_id(id: Option<String>) -> Result<[u8; ID_BYTES], BlkError> {
    let mut bytes = [0u8; ID_BYTES];
    if let Some(id) = id {
        if !id.is_ascii() {
            return Err(BlkError::IdNotAscii { id });
        }
        if id.len() > ID_BYTES {
            return Err(BlkError::IdTooLong { id });
        }
        bytes[..id.len()].copy_from_slice(id.as_bytes());
    }
    Ok(bytes)
}

/// `struct virtio_blk_config`, little-endian. The discard and write-zeroes
/// fields stay 0 on a read-only disk, which does not offer those features.
fn config_space(capacity: u64, read_only: bool) -> [u8; CONFIG_LEN] {
    fn put(config: &mut [u8; CONFIG_LEN], offset: usize, bytes: &[u8]) {
        config[offset..offset + bytes.len()].copy_from_slice(bytes);
    }
    let mut config = [0u8; CONFIG_LEN];
    put(
        &mut config,
        config_offset::CAPACITY,
        &capacity.to_le_bytes(),
    );
    put(
        &mut config,
        config_offset::SIZE_MAX,
        &SEG_SIZE_MAX.to_le_bytes(),
    );
    put(&mut config, config_offset::SEG_MAX, &SEG_MAX.to_le_bytes());
    // SECTOR_SIZE is 512: fits.
    let blk_size = SECTOR_SIZE as u32;
    put(
        &mut config,
        config_offset::BLK_SIZE,
        &blk_size.to_le_bytes(),
    );
    if !read_only {
        put(
            &mut config,
            config_offset::MAX_DISCARD_SECTORS,
            &MAX_DISCARD_SECTORS.to_le_bytes(),
        );
        put(
            &mut config,
            config_offset::MAX_DISCARD_SEG,
            &MAX_DISCARD_SEG.to_le_bytes(),
        );
        put(
            &mut config,
            config_offset::DISCARD_SECTOR_ALIGNMENT,
            &DISCARD_SECTOR_ALIGNMENT.to_le_bytes(),
        );
        put(
            &mut config,
            config_offset::MAX_WRITE_ZEROES_SECTORS,
            &MAX_WRITE_ZEROES_SECTORS.to_le_bytes(),
        );
        put(
            &mut config,
            config_offset::MAX_WRITE_ZEROES_SEG,
            &MAX_WRITE_ZEROES_SEG.to_le_bytes(),
        );
        // A write zeroes with the unmap flag punches a hole.
        config[config_offset::WRITE_ZEROES_MAY_UNMAP] = 1;
    }
    config
}

const fn feature(bit: u32) -> u64 {
    1 << bit
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        DEVICE_TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_MAX_SIZES
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn device_features(&self) -> u64 {
        let common = feature(VIRTIO_BLK_F_SEG_MAX)
            | feature(VIRTIO_BLK_F_SIZE_MAX)
            | feature(VIRTIO_BLK_F_BLK_SIZE)
            | feature(VIRTIO_BLK_F_FLUSH);
        if self.read_only() {
            common | feature(VIRTIO_BLK_F_RO)
        } else {
            common | feature(VIRTIO_BLK_F_DISCARD) | feature(VIRTIO_BLK_F_WRITE_ZEROES)
        }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Every field is read-only: the writeback toggle (CONFIG_WCE) is not
        // offered.
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.active = Some(Active::from_context(ctx)?);
        kick(&self.queue_events);
        Ok(())
    }

    fn reset(&mut self) {
        // Drops the queue, guest memory and interrupt; the image stays open.
        self.active = None;
    }

    fn queue_positions(&self) -> Option<Vec<(u16, u16)>> {
        self.active.as_ref().map(Active::positions)
    }

    fn snapshot_refusal(&self) -> Option<&'static str> {
        // Every request is finished on the event loop before it takes the
        // next event, so a paused device has nothing in flight; the image
        // is the embedder's to keep (or give a clone its own copy).
        None
    }
}

#[cfg(test)]
mod tests {
    use std::mem::offset_of;

    use virtio_bindings::virtio_blk::virtio_blk_config;

    use std::sync::Arc;

    use super::*;
    use crate::test_utils::{GuestQueue, RecordingInterrupt, TempImage};

    /// A small disk: 16 sectors.
    const DISK_SIZE: u64 = 16 * SECTOR_SIZE;

    fn block(image: &TempImage, read_only: bool) -> Block {
        Block::new(DiskConfig {
            path: image.path().to_path_buf(),
            read_only,
            id: Some("disk-1".into()),
            rate_limit: RateLimit::default(),
        })
        .unwrap()
    }

    fn config_u32(block: &Block, offset: usize) -> u32 {
        let mut bytes = [0u8; 4];
        block.read_config(offset as u64, &mut bytes);
        u32::from_le_bytes(bytes)
    }

    #[test]
    fn config_offsets_match_virtio_blk_config_layout() {
        assert_eq!(
            config_offset::CAPACITY,
            offset_of!(virtio_blk_config, capacity)
        );
        assert_eq!(
            config_offset::SIZE_MAX,
            offset_of!(virtio_blk_config, size_max)
        );
        assert_eq!(
            config_offset::SEG_MAX,
            offset_of!(virtio_blk_config, seg_max)
        );
        assert_eq!(
            config_offset::BLK_SIZE,
            offset_of!(virtio_blk_config, blk_size)
        );
        assert_eq!(
            config_offset::MAX_DISCARD_SECTORS,
            offset_of!(virtio_blk_config, max_discard_sectors)
        );
        assert_eq!(
            config_offset::MAX_DISCARD_SEG,
            offset_of!(virtio_blk_config, max_discard_seg)
        );
        assert_eq!(
            config_offset::DISCARD_SECTOR_ALIGNMENT,
            offset_of!(virtio_blk_config, discard_sector_alignment)
        );
        assert_eq!(
            config_offset::MAX_WRITE_ZEROES_SECTORS,
            offset_of!(virtio_blk_config, max_write_zeroes_sectors)
        );
        assert_eq!(
            config_offset::MAX_WRITE_ZEROES_SEG,
            offset_of!(virtio_blk_config, max_write_zeroes_seg)
        );
        assert_eq!(
            config_offset::WRITE_ZEROES_MAY_UNMAP,
            offset_of!(virtio_blk_config, write_zeroes_may_unmap)
        );
        assert_eq!(
            CONFIG_LEN,
            offset_of!(virtio_blk_config, max_secure_erase_sectors)
        );
    }

    #[test]
    fn read_config_each_field_has_its_value() {
        let image = TempImage::filled(DISK_SIZE, 0);
        let block = block(&image, false);

        let mut capacity = [0u8; 8];
        block.read_config(config_offset::CAPACITY as u64, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), 16);
        assert_eq!(config_u32(&block, config_offset::SIZE_MAX), 1 << 20);
        assert_eq!(config_u32(&block, config_offset::SEG_MAX), 254);
        assert_eq!(config_u32(&block, config_offset::BLK_SIZE), 512);
        assert_eq!(
            config_u32(&block, config_offset::MAX_DISCARD_SECTORS),
            MAX_DISCARD_SECTORS
        );
        assert_eq!(
            config_u32(&block, config_offset::MAX_DISCARD_SEG),
            MAX_DISCARD_SEG
        );
        assert_eq!(
            config_u32(&block, config_offset::DISCARD_SECTOR_ALIGNMENT),
            DISCARD_SECTOR_ALIGNMENT
        );
        assert_eq!(
            config_u32(&block, config_offset::MAX_WRITE_ZEROES_SECTORS),
            MAX_WRITE_ZEROES_SECTORS
        );
        assert_eq!(
            config_u32(&block, config_offset::MAX_WRITE_ZEROES_SEG),
            MAX_WRITE_ZEROES_SEG
        );
        let mut may_unmap = [0u8; 1];
        block.read_config(config_offset::WRITE_ZEROES_MAY_UNMAP as u64, &mut may_unmap);
        assert_eq!(may_unmap, [1]);
    }

    #[test]
    fn read_config_unaligned_bytes_return_field_bytes() {
        // Capacity 0x0102 sectors: read its second byte alone, then two
        // bytes straddling capacity and size_max.
        let image = TempImage::filled(0x0102 * SECTOR_SIZE, 0);
        let block = block(&image, false);
        let mut byte = [0u8; 1];
        let mut straddle = [0u8; 2];

        block.read_config(1, &mut byte);
        block.read_config(7, &mut straddle);

        assert_eq!(byte, [0x01]);
        // Last byte of capacity (0), first byte of size_max (1 MiB: 0).
        assert_eq!(straddle, [0, 0]);
    }

    #[test]
    fn read_config_beyond_end_is_zero() {
        let image = TempImage::filled(DISK_SIZE, 0);
        let block = block(&image, false);
        let mut tail = [0xffu8; 8];
        let mut far = [0xffu8; 4];

        block.read_config(CONFIG_LEN as u64 - 2, &mut tail);
        block.read_config(u64::MAX - 1, &mut far);

        assert_eq!(tail, [0; 8]);
        assert_eq!(far, [0; 4]);
    }

    #[test]
    fn write_config_is_ignored() {
        let image = TempImage::filled(DISK_SIZE, 0);
        let mut block = block(&image, false);
        let mut before = [0u8; CONFIG_LEN];
        block.read_config(0, &mut before);

        block.write_config(0, &[0xff; CONFIG_LEN]);
        block.write_config(u64::MAX, &[1, 2, 3]);

        let mut after = [0u8; CONFIG_LEN];
        block.read_config(0, &mut after);
        assert_eq!(before, after);
    }

    #[test]
    fn device_features_read_write_offer_discard_not_ro() {
        let image = TempImage::filled(DISK_SIZE, 0);

        let features = block(&image, false).device_features();

        for bit in [
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ] {
            assert_ne!(features & feature(bit), 0, "bit {bit}");
        }
        assert_eq!(features & feature(VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn device_features_read_only_offer_ro_not_discard() {
        let image = TempImage::filled(DISK_SIZE, 0);
        let block = block(&image, true);

        let features = block.device_features();

        assert_ne!(features & feature(VIRTIO_BLK_F_RO), 0);
        assert_eq!(features & feature(VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(features & feature(VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_eq!(config_u32(&block, config_offset::MAX_DISCARD_SECTORS), 0);
    }

    #[test]
    fn device_type_and_queues_are_block_with_one_queue_of_256() {
        let image = TempImage::filled(DISK_SIZE, 0);
        let block = block(&image, false);

        assert_eq!(block.device_type(), 2);
        assert_eq!(block.queue_max_sizes(), &[256]);
        assert_eq!(block.queue_events().len(), 1);
    }

    #[test]
    fn new_capacity_is_size_in_sectors() {
        let image = TempImage::filled(DISK_SIZE, 0);

        assert_eq!(block(&image, false).capacity_sectors(), 16);
    }

    #[test]
    fn new_size_not_multiple_of_512_is_refused() {
        let image = TempImage::filled(DISK_SIZE + 1, 0);

        let result = Block::new(DiskConfig {
            path: image.path().to_path_buf(),
            read_only: false,
            id: None,
            rate_limit: RateLimit::default(),
        });

        assert!(
            matches!(result, Err(BlkError::UnalignedSize { size, .. }) if size == DISK_SIZE + 1)
        );
    }

    #[test]
    fn new_missing_image_is_open_error() {
        let image = TempImage::filled(DISK_SIZE, 0);
        let path = image.path().with_extension("missing");

        let result = Block::new(DiskConfig {
            path,
            read_only: true,
            id: None,
            rate_limit: RateLimit::default(),
        });

        assert!(matches!(result, Err(BlkError::Open { .. })));
    }

    #[test]
    fn new_image_open_read_write_elsewhere_is_in_use() {
        let image = TempImage::filled(DISK_SIZE, 0);
        let _first = block(&image, false);

        let result = Block::new(DiskConfig {
            path: image.path().to_path_buf(),
            read_only: false,
            id: None,
            rate_limit: RateLimit::default(),
        });

        let error = result.err().unwrap();
        assert!(matches!(
            error,
            BlkError::InUse {
                read_only: false,
                ..
            }
        ));
        assert!(error.to_string().contains("cannot be shared"), "{error}");
    }

    #[test]
    fn new_read_only_opens_share_an_image_but_not_with_a_writer() {
        let image = TempImage::filled(DISK_SIZE, 0);
        let first = block(&image, true);
        let _second = block(&image, true);
        assert!(matches!(
            Block::new(DiskConfig {
                path: image.path().to_path_buf(),
                read_only: false,
                id: None,
                rate_limit: RateLimit::default(),
            }),
            Err(BlkError::InUse { .. })
        ));
        drop(first);
        drop(_second);
        // The locks go with the devices.
        let _writer = block(&image, false);
    }

    #[test]
    fn new_fifo_is_not_a_disk_and_is_not_waited_on() {
        let dir = std::env::temp_dir().join(format!("chitin-blk-fifo-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);

        // Read-only: a blocking open would wait for a writer forever.
        let result = Block::new(DiskConfig {
            path: fifo,
            read_only: true,
            id: None,
            rate_limit: RateLimit::default(),
        });

        assert!(matches!(result, Err(BlkError::NotADisk { .. })));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn new_directory_is_not_a_disk() {
        let result = Block::new(DiskConfig {
            path: std::env::temp_dir(),
            read_only: true,
            id: None,
            rate_limit: RateLimit::default(),
        });

        assert!(matches!(result, Err(BlkError::NotADisk { .. })));
    }

    #[test]
    fn new_id_of_21_bytes_is_refused() {
        let image = TempImage::filled(DISK_SIZE, 0);

        let result = Block::new(DiskConfig {
            path: image.path().to_path_buf(),
            read_only: false,
            id: Some("x".repeat(ID_BYTES + 1)),
            rate_limit: RateLimit::default(),
        });

        assert!(matches!(result, Err(BlkError::IdTooLong { .. })));
    }

    #[test]
    fn new_id_of_20_bytes_is_accepted() {
        let image = TempImage::filled(DISK_SIZE, 0);

        let result = Block::new(DiskConfig {
            path: image.path().to_path_buf(),
            read_only: false,
            id: Some("x".repeat(ID_BYTES)),
            rate_limit: RateLimit::default(),
        });

        assert!(result.is_ok());
    }

    #[test]
    fn new_id_not_ascii_is_refused() {
        let image = TempImage::filled(DISK_SIZE, 0);

        let result = Block::new(DiskConfig {
            path: image.path().to_path_buf(),
            read_only: false,
            id: Some("disk-é".into()),
            rate_limit: RateLimit::default(),
        });

        assert!(matches!(result, Err(BlkError::IdNotAscii { .. })));
    }

    #[test]
    fn activate_two_queues_is_refused() {
        let image = TempImage::filled(DISK_SIZE, 0);
        let mut block = block(&image, false);
        let guest = GuestQueue::new(QUEUE_SIZE);

        let result = block.activate(ActivateContext {
            mem: guest.memory().clone(),
            queues: vec![guest.queue(), guest.queue()],
            interrupt: Arc::new(RecordingInterrupt::default()),
            acked_features: 0,
        });

        assert!(matches!(
            result,
            Err(ActivateError::QueueCount {
                expected: 1,
                got: 2
            })
        ));
    }

    #[test]
    fn queue_positions_exist_only_while_activated_and_snapshots_are_allowed() {
        let image = TempImage::filled(DISK_SIZE, 0);
        let mut block = block(&image, false);
        let guest = GuestQueue::new(QUEUE_SIZE);
        assert_eq!(block.snapshot_refusal(), None);
        assert_eq!(block.queue_positions(), None);

        block
            .activate(ActivateContext {
                mem: guest.memory().clone(),
                queues: vec![guest.queue()],
                interrupt: Arc::new(RecordingInterrupt::default()),
                acked_features: 0,
            })
            .unwrap();

        assert_eq!(block.queue_positions(), Some(vec![(0, 0)]));
        block.reset();
        assert_eq!(block.queue_positions(), None);
    }

    #[test]
    fn reset_before_activate_does_nothing() {
        let image = TempImage::filled(DISK_SIZE, 0);
        let mut block = block(&image, false);

        block.reset();
        block.process_queue();

        assert!(block.active.is_none());
    }
}
