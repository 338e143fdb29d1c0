//! chitin-agent: the guest side of chitin's agent, PID 1 of every guest
//! image: the minimal userspace a process expects ([`init`]), the kernel
//! command line ([`cmdline`]), the network configuration it carries
//! ([`net`]), the exec server for one connection
//! ([`server`]), the vsock service that accepts connections and serves each
//! ([`service`], over the [`vsock`] shim).
//!
//! The wire protocol is `chitin-agent-protocol`'s, the host side is
//! `chitin-agent-client`'s; the test scenarios and tools live in
//! `chitin-testkit`'s test agent, never in a production image.

use std::io::Write;

pub mod cmdline;
pub mod container;
pub mod entropy;
pub mod init;
pub mod net;
pub mod server;
pub mod service;
pub mod share;
pub mod vsock;

/// Print one line on the console and flush it, so it reaches the host even
/// if the VM stops right after.
pub fn say(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}
