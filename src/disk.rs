//! Disks: what a runtime author configures, and how each becomes a
//! virtio-blk device behind a virtio-mmio window.

use std::path::{Path, PathBuf};

use crate::error::SandboxError;
use crate::net::RateLimit;

/// A raw disk image (or block device) given to the guest as virtio-blk.
/// Disks appear in the order they were added: `/dev/vda`, `/dev/vdb`, ...
///
/// ```
/// use chitin::Disk;
///
/// let data = Disk::new("/var/lib/images/data.img").id("data-1");
/// let base = Disk::new("/var/lib/images/base.ext4").read_only(true);
/// # let _ = (data, base);
/// ```
#[derive(Debug, Clone)]
pub struct Disk {
    path: PathBuf,
    read_only: bool,
    id: Option<String>,
    rate_limit: RateLimit,
}

impl Disk {
    /// A writable disk backed by `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            read_only: false,
            id: None,
            rate_limit: RateLimit::default(),
        }
    }

    /// Offer the disk read-only: the guest sees `VIRTIO_BLK_F_RO` and every
    /// write it attempts fails; chitin opens the image read-only.
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    /// The serial the guest reads with `VIRTIO_BLK_T_GET_ID` (at most 20
    /// bytes; longer is reported by `build()`).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Limit the guest's requests (operations per second) and the bytes
    /// they read and write (bytes per second). A limited disk holds
    /// requests back in the guest's queue; nothing fails.
    pub fn rate_limit(mut self, limit: RateLimit) -> Self {
        self.rate_limit = limit;
        self
    }

    /// The serial the guest reads (`id`), if set.
    pub(crate) fn serial(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the disk is read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub(crate) fn config(&self) -> Result<chitin_blk::DiskConfig, SandboxError> {
        Ok(chitin_blk::DiskConfig {
            path: self.path.clone(),
            read_only: self.read_only,
            id: self.id.clone(),
            rate_limit: self
                .rate_limit
                .to_device(&format!("disk {}", self.path.display()))?,
        })
    }
}

/// Guest device name of the disk at `index`: vda, vdb, ...
pub(crate) fn device_name(index: usize) -> String {
    let letter = char::from(b'a' + (index % 26) as u8);
    format!("vd{letter}")
}
