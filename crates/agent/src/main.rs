//! chitin-agent: PID 1 of chitin's guest image.
//!
//! It brings up a minimal userspace ([`chitin_agent::init`]) and the
//! network the VMM configured ([`chitin_agent::net`]), mounts the shares
//! it asked for ([`chitin_agent::share`]), prints
//! `chitin-agent: up version=<protocol version>` on the console, and serves
//! the exec protocol on vsock port 1024 ([`chitin_agent::service`]) for as
//! long as the guest runs; a client's SHUTDOWN stops the VM (sync, then
//! an ACPI power-off where the machine has one, else a reboot). If it
//! cannot serve, it says why and stops the VM the same way. Before all
//! that it loads the kernel modules the image carries for the running
//! kernel ([`chitin_agent::init::load_modules`]): a distribution kernel's
//! virtio drivers.
//!
//! The agent never panics on what it reads from the kernel or the host: a
//! PID 1 crash would panic the guest.

use chitin_agent::{cmdline, container, init, net, say, service, share};
use chitin_agent_protocol::VERSION;

fn main() {
    // Started again as a container's set-up helper? Then this never
    // returns.
    let _ = container::run_if_helper();
    if let Err(e) = init::mount_basics() {
        say(&format!("chitin-agent: {e}"));
    }
    for line in init::load_modules() {
        if let Err(e) = line {
            say(&format!("chitin-agent: {e}"));
        }
    }
    let cmdline = cmdline::KernelCmdline::read();
    for line in net::configure(&cmdline) {
        match line {
            Ok(done) => say(&format!("chitin-agent: net {done}")),
            Err(e) => say(&format!("chitin-agent: net error: {e}")),
        }
    }
    for line in share::mount_all(&cmdline) {
        match line {
            Ok(done) => say(&format!("chitin-agent: {done}")),
            Err(e) => say(&format!("chitin-agent: error: {e}")),
        }
    }
    say(&format!("chitin-agent: up version={VERSION}"));
    // Returns only when the socket cannot be set up.
    if let Err(e) = service::run() {
        say(&format!("chitin-agent: cannot serve: {e}"));
    }
    init::power_off();
}
