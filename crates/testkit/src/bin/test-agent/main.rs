//! chitin-test-agent: PID 1 of the nested tier's test guest, the guest
//! agent plus what only tests need.
//!
//! It brings up the same minimal userspace as `chitin-agent`
//! (`chitin_agent::init`), announces itself with one machine-readable line,
//! runs the scenario the host named on the kernel command line
//! ([`scenario`]), prints one result line per check ([`Report`]), then
//! stops the VM: sync, then reboot, so the VMM sees a reset. Run as a
//! program (`/init <tool> ...`, through exec) it is one of the echo
//! [`tools`].
//!
//! Output protocol (one line each, on the console):
//! - `chitin-agent: up version=<protocol version> scenario=<name> boottime_ms=<n>`
//!   (`n`: the guest kernel's own clock, `CLOCK_BOOTTIME`, which starts
//!   with the kernel: the host splits VMM start → agent up into the time
//!   before the kernel ran and the kernel's own boot with it)
//! - `chitin-agent: cmdline <the kernel command line>` and
//!   `chitin-agent: kernel <release>` (when a scenario runs)
//! - `chitin-check: <check> PASS <detail>` or `chitin-check: <check> FAIL <detail>`
//! - `chitin-agent: done pass=<n> fail=<m>`
//!
//! With `chitin.agent=1` on the command line, or with no scenario at all
//! (printed as `scenario=agent`), it then serves the exec protocol on vsock
//! port 1024 (`chitin_agent::service`) instead of stopping, as the
//! production agent does; a client's SHUTDOWN stops the VM.
//!
//! The agent never panics on what it reads from the kernel: a missing file
//! is a failed check, not a crash (a PID 1 crash would panic the guest).

mod blk;
mod net;
mod scenario;
mod tools;

use std::time::Duration;

use chitin_agent::{cmdline, init, service};
use chitin_agent_protocol::{CMDLINE_KEY, VERSION};
use chitin_testkit::{Report, UP_MARKER};

/// Milliseconds on the kernel's `CLOCK_BOOTTIME` (0 when unreadable).
fn boottime_ms() -> u128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes only the timespec it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) } != 0 {
        return 0;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32).as_millis()
}

fn main() {
    // Started again by the agent as a container's set-up helper? Then
    // this never returns.
    let _ = chitin_agent::container::run_if_helper();
    // Run as a tool (through exec, not as PID 1)?
    let args: Vec<String> = std::env::args().collect();
    if let Some(code) = tools::run(&args) {
        std::process::exit(code);
    }
    let mut report = Report::new();
    if let Err(e) = init::mount_basics() {
        report.check("mounts", false, &e);
    }
    for line in init::load_modules() {
        match line {
            Ok(done) => report.line(&format!("chitin-agent: {done}")),
            Err(e) => report.check("modules", false, &e),
        }
    }
    let cmdline = cmdline::KernelCmdline::read();
    for line in chitin_agent::net::configure(&cmdline) {
        if let Err(e) = line {
            report.check("net-config", false, &e);
        }
    }
    for line in chitin_agent::share::mount_all(&cmdline) {
        if let Err(e) = line {
            report.check("share-mount", false, &e);
        }
    }
    let scenario = cmdline.get("chitin.scenario").map(str::to_string);
    let agent = cmdline.get(CMDLINE_KEY) == Some("1") || scenario.is_none();
    let name = scenario.as_deref().unwrap_or("agent");
    report.line(&format!(
        "{UP_MARKER} version={VERSION} scenario={name} boottime_ms={}",
        boottime_ms()
    ));
    if let Some(name) = &scenario {
        scenario::run(name, &cmdline, &mut report);
        report.done();
    }
    if agent {
        // Returns only when the socket cannot be set up.
        if let Err(e) = service::run() {
            report.check("agent-listen", false, &e.to_string());
        }
    }
    init::power_off();
}
