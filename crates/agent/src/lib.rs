//! chitin-agent as a library: the exec protocol spoken between the host and
//! the guest agent, the guest-side server and the host-side client.
//!
//! - [`protocol`]: frames and their byte encoding (no I/O policy).
//! - [`server`]: runs processes for one connection (guest side).
//! - [`client`]: runs processes through one connection (host side).
//! - [`window`]: the per-stream flow-control credit both sides keep.
//!
//! The wire format is described in `docs/agent-protocol.md`.

pub mod client;
pub mod protocol;
pub mod server;
pub mod window;
