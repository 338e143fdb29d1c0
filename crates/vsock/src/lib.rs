//! virtio-vsock for chitin microVMs (virtio 1.2 §5.10), with a Unix-socket
//! backend compatible with Firecracker's.
//!
//! The device is built in three layers, each testable without KVM:
//!
//! - [`packet`]: a parser from descriptor chains to a typed [`Header`] plus
//!   checked data buffers (TX), and device-writable receive buffers (RX). It
//!   copies every guest header field once and bounds data by
//!   [`packet::MAX_PKT_DATA`].
//! - [`connection`] and [`handler`]: the per-connection state machine with
//!   credit-based flow control ([`Credit`]) and [`VsockHandler`], which runs
//!   the TX and RX queues over any [`VsockBackend`] and raises interrupts
//!   through a [`chitin_virtio::VirtioInterrupt`].
//! - [`device`] and `event`: [`Vsock`], the [`chitin_virtio::VirtioDevice`]
//!   owning the host listener, and its [`event_manager::MutEventSubscriber`]
//!   adapter, which watches the queue `EventFd`s, the listener and every
//!   connection socket.
//!
//! Host side (the Firecracker protocol): a host process connects to
//! `uds_path` and writes `CONNECT <port>\n`; once the guest accepts, it reads
//! `OK <host_port>\n` and then the stream carries the connection's bytes
//! ([`host`] has both ends of that line protocol). A guest connection to
//! CID 2 port `P` is connected to the Unix socket `<uds_path>_<P>`.
//!
//! Guest data is hostile here: a malformed packet is answered with a reset
//! or dropped, memory per connection is bounded by the credit it advertised,
//! the number of connections is bounded, and nothing panics on guest input.

#![deny(missing_docs)]

pub mod backend;
pub mod connection;
pub mod device;
mod event;
pub mod handler;
pub mod host;
pub mod packet;
#[cfg(test)]
mod test_utils;

#[cfg(feature = "test-utils")]
pub use backend::PairBackend;
pub use backend::{UnixBackend, VsockBackend};
pub use connection::{Credit, Interest};
pub use device::{SocketFile, Vsock, VsockConfig, VsockError, DEVICE_TYPE_VSOCK};
pub use handler::{HandlerError, HandlerSizes, QueueRun, VsockHandler};
pub use packet::{Header, Op, PacketError};

/// The size of each of the three queues (rx, tx, event).
pub const QUEUE_SIZE: u16 = 256;

/// Index of the receive queue (device to driver).
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue (driver to device).
pub const TX_QUEUE: usize = 1;
/// Index of the event queue (unused by this device).
pub const EVENT_QUEUE: usize = 2;
