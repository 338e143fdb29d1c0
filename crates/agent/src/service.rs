//! The exec service of PID 1: accept vsock connections and serve each on
//! its own thread with [`crate::server`]. SHUTDOWN stops the VM.

use std::io;
use std::thread;
use std::time::Duration;

use chitin_agent_protocol::PORT;

use crate::server::{self, ServerHooks};
use crate::vsock::Listener;
use crate::{init, say};

/// Pause after a failed accept, so a persistent error does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// SHUTDOWN: sync and reboot, as at the end of a scenario.
struct PowerOff;

impl ServerHooks for PowerOff {
    fn shutdown(&self) {
        init::power_off();
    }

    fn add_entropy(&self, bytes: &[u8]) -> io::Result<()> {
        crate::entropy::add(bytes)
    }
}

/// Serve forever; returns only the error that kept the listening socket
/// from being set up.
pub fn run() -> io::Result<()> {
    let listener = Listener::bind(PORT)
        .map_err(|e| io::Error::new(e.kind(), format!("vsock port {PORT}: {e}")))?;
    // From here on every child of PID 1 is a connection's, or an orphan.
    if let Err(e) = server::spawn_orphan_reaper() {
        say(&format!("chitin-agent: no orphan reaper: {e}"));
    }
    say(&format!("chitin-agent: listening vsock port={PORT}"));
    loop {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                say(&format!("chitin-agent: accept: {e}"));
                thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        let reader = match stream.try_clone() {
            Ok(r) => r,
            Err(e) => {
                say(&format!("chitin-agent: dup: {e}"));
                continue;
            }
        };
        let spawned = thread::Builder::new()
            .name("agent-conn".into())
            .spawn(move || {
                if let Err(e) = server::serve(reader, stream, &PowerOff) {
                    say(&format!("chitin-agent: connection: {e}"));
                }
            });
        if let Err(e) = spawned {
            say(&format!("chitin-agent: thread: {e}"));
        }
    }
}
