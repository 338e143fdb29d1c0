//! virtio-net for chitin microVMs, over tap devices (virtio 1.2 §5.1).
//!
//! Built in layers, as `chitin-blk` is:
//!
//! - [`device`]: [`Net`], the `VirtioDevice` the transport sees, with its
//!   event-loop adapter: one receive and one transmit queue over a tap,
//!   per-device counters, optional limits each way;
//! - [`frame`]: the TX parser, a descriptor chain to a checked
//!   [`TxFrame`] (every buffer in guest memory, the length bounded, the
//!   header checked against the accepted features) or a typed drop reason;
//! - [`rx`]: the RX path, frames from a [`NetBackend`] straight into the
//!   guest's posted buffers (mergeable or not), never queued on the host;
//! - [`tx`]: the TX path, each parsed chain written to the backend with
//!   one `writev` straight from guest memory, behind an optional
//!   [`RateLimiter`](chitin_virtio::RateLimiter);
//! - [`tap`]: the host side, a tap interface opened by name or handed over
//!   as an open fd by the embedder (CNI plugins and Kata create the tap in
//!   the pod's network namespace themselves), set up for the 12-byte
//!   `virtio_net_hdr_v1` and for exactly the offloads the guest accepts.
//!
//! Guest data is hostile here: nothing in this crate trusts a length or a
//! header that came from the guest.

#![deny(missing_docs)]

pub mod backend;
pub mod device;
mod event;
pub mod frame;
pub mod rx;
pub mod tap;
pub mod tx;

#[cfg(any(test, feature = "test-utils"))]
pub use backend::MemBackend;
pub use backend::NetBackend;
pub use device::{MacAddr, MacParseError, Net, NetConfig, NetCounters, NetError, NetStats};
pub use frame::{parse_tx, TxError, TxFrame, VnetHeader};
pub use rx::{receive, RxConfig, RxPool, RxRun};
pub use tx::{transmit, TxRun};

pub use tap::{Offloads, Tap, TapError};

/// Bytes of `virtio_net_hdr_v1`, the header in front of every frame once
/// `VIRTIO_F_VERSION_1` is negotiated (virtio 1.2 §5.1.6).
pub const VNET_HDR_LEN: usize = 12;
