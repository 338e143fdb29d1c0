//! The exec service of PID 1: accept vsock connections and serve each on
//! its own thread with [`chitin_agent::server`]. SHUTDOWN stops the VM.

use std::thread;
use std::time::Duration;

use chitin_agent::server::{self, ServerHooks};

use crate::init;
use crate::report::Report;
use crate::vsock::{Listener, PORT};

/// Pause after a failed accept, so a persistent error does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// SHUTDOWN: sync and reboot, as at the end of a scenario.
struct PowerOff;

impl ServerHooks for PowerOff {
    fn shutdown(&self) {
        init::power_off();
    }
}

/// Serve forever; if the socket cannot be set up, report it and return.
pub fn run(report: &mut Report) {
    let listener = match Listener::bind(PORT) {
        Ok(l) => l,
        Err(e) => {
            report.check("agent-listen", false, &format!("vsock port {PORT}: {e}"));
            return;
        }
    };
    // From here on every child of PID 1 is a connection's, or an orphan.
    if let Err(e) = server::spawn_orphan_reaper() {
        report.line(&format!("chitin-agent: no orphan reaper: {e}"));
    }
    report.line(&format!("chitin-agent: listening vsock port={PORT}"));
    loop {
        let stream = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                report.line(&format!("chitin-agent: accept: {e}"));
                thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        let reader = match stream.try_clone() {
            Ok(r) => r,
            Err(e) => {
                report.line(&format!("chitin-agent: dup: {e}"));
                continue;
            }
        };
        let spawned = thread::Builder::new()
            .name("agent-conn".into())
            .spawn(move || {
                if let Err(e) = server::serve(reader, stream, &PowerOff) {
                    Report::new().line(&format!("chitin-agent: connection: {e}"));
                }
            });
        if let Err(e) = spawned {
            report.line(&format!("chitin-agent: thread: {e}"));
        }
    }
}
