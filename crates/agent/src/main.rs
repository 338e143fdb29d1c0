//! chitin-agent: PID 1 of chitin's default guest.
//!
//! It brings up a minimal userspace ([`init`]), announces itself with one
//! machine-readable line, runs the scenario the host named on the kernel
//! command line ([`scenario`]), prints one result line per check, then stops
//! the VM: sync, then reboot, so the VMM sees a reset.
//!
//! Output protocol (one line each, on the console):
//! - `chitin-agent: up version=1 scenario=<name>`
//! - `chitin-check: <check> PASS <detail>` or `chitin-check: <check> FAIL <detail>`
//! - `chitin-agent: done pass=<n> fail=<m>`
//!
//! The agent never panics on what it reads from the kernel: a missing file
//! is a failed check, not a crash (a PID 1 crash would panic the guest).

mod blk;
mod cmdline;
mod init;
mod report;
mod scenario;

use report::Report;

/// Protocol version printed in the `up` line.
const VERSION: u32 = 1;

fn main() {
    let mut report = Report::new();
    if let Err(e) = init::mount_basics() {
        report.check("mounts", false, &e);
    }
    let cmdline = cmdline::KernelCmdline::read();
    let name = cmdline.get("chitin.scenario").unwrap_or("boot").to_string();
    report.line(&format!(
        "chitin-agent: up version={VERSION} scenario={name}"
    ));
    scenario::run(&name, &cmdline, &mut report);
    report.line(&format!(
        "chitin-agent: done pass={} fail={}",
        report.passed(),
        report.failed()
    ));
    init::power_off();
}
