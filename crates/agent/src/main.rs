//! chitin-agent: PID 1 of chitin's default guest.
//!
//! It brings up a minimal userspace ([`init`]), announces itself with one
//! machine-readable line, runs the scenario the host named on the kernel
//! command line ([`scenario`]), prints one result line per check, then stops
//! the VM: sync, then reboot, so the VMM sees a reset.
//!
//! Output protocol (one line each, on the console):
//! - `chitin-agent: up version=<protocol version> scenario=<name>`
//! - `chitin-agent: cmdline <the kernel command line>` and
//!   `chitin-agent: kernel <release>` (when a scenario runs)
//! - `chitin-check: <check> PASS <detail>` or `chitin-check: <check> FAIL <detail>`
//! - `chitin-agent: done pass=<n> fail=<m>`
//!
//! With `chitin.agent=1` on the command line, or with no scenario at all
//! (printed as `scenario=agent`), it then serves the exec protocol on vsock
//! port 1024 ([`service`], the library's `server`) instead of stopping; a
//! client's SHUTDOWN stops the VM.
//!
//! The agent never panics on what it reads from the kernel: a missing file
//! is a failed check, not a crash (a PID 1 crash would panic the guest).

mod blk;
mod cmdline;
mod init;
mod report;
mod scenario;
mod service;
mod tools;
mod vsock;

use report::Report;

/// Protocol version printed in the `up` line: the exec protocol's.
use chitin_agent::protocol::VERSION;

fn main() {
    // Run as a tool (through exec, not as PID 1)?
    let args: Vec<String> = std::env::args().collect();
    if let Some(code) = tools::run(&args) {
        std::process::exit(code);
    }
    let mut report = Report::new();
    if let Err(e) = init::mount_basics() {
        report.check("mounts", false, &e);
    }
    let cmdline = cmdline::KernelCmdline::read();
    let scenario = cmdline.get("chitin.scenario").map(str::to_string);
    let agent = cmdline.get("chitin.agent") == Some("1") || scenario.is_none();
    let name = scenario.as_deref().unwrap_or("agent");
    report.line(&format!(
        "chitin-agent: up version={VERSION} scenario={name}"
    ));
    if let Some(name) = &scenario {
        scenario::run(name, &cmdline, &mut report);
        report.line(&format!(
            "chitin-agent: done pass={} fail={}",
            report.passed(),
            report.failed()
        ));
    }
    if agent {
        // Returns only when the socket cannot be set up.
        service::run(&mut report);
    }
    init::power_off();
}
