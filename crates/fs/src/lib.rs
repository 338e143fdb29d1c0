//! virtio-fs for chitin: a host directory shared with the guest, served
//! in-process by the passthrough file system of `fuse-backend-rs`, behind
//! chitin's own confinement.
//!
//! Layers, as in chitin's other devices:
//! - [`confine`]: [`Confined`], the policy every request passes before it
//!   reaches the host: single-component names, no `..` above the root, no
//!   device nodes, no special file opened on the host, read-only shares,
//!   the open-file cap, id mapping;
//! - [`handler`]: [`FsHandler`], the queue loop handing chains to the
//!   FUSE server with size limits on every chain;
//! - [`device`]: [`Fs`], the virtio device (ID 26), its configuration
//!   space (tag, number of request queues) and the thread that serves it.
//!
//! The guest is hostile: it can send any bytes as a FUSE request, any
//! descriptor chain, any name. Nothing it sends can make the device open,
//! create or change a host file outside the shared directory, panic, or
//! hold more host fds than the share's cap.

#![deny(missing_docs)]

pub mod confine;
pub mod device;
pub mod handler;
pub mod idmap;
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;
#[cfg(test)]
mod tests;

pub use confine::{Confined, Policy};
pub use device::{Fs, FsConfig, FsError, DEFAULT_MAX_OPEN_FILES};
pub use handler::{FsHandler, MAX_REQUEST_BYTES};
pub use idmap::{IdMap, IdMapError, IdRange};

/// virtio device ID of a file system device (virtio 1.2 §5.11).
pub const VIRTIO_ID_FS: u32 = 26;

/// Size of the tag field in the configuration space.
pub const TAG_LEN: usize = 36;

/// Size of each queue.
pub const QUEUE_SIZE: u16 = 256;
