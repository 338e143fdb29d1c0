//! Shared helpers of the host-KVM tests.
//!
//! Every test that needs KVM is `#[ignore = "needs /dev/kvm ..."]`, so a
//! plain `cargo test` reports it as not run (ignored) instead of passing it
//! untested; `cargo xtask test` runs them with `--ignored` when `/dev/kvm`
//! is usable (and fails when it is not and `CHITIN_REQUIRE_KVM=1`). Inside,
//! a test calls [`kvm_available`] first: run by hand without `/dev/kvm` it
//! prints why it skips, unless `CHITIN_REQUIRE_KVM=1`, which turns the skip
//! into a failure.

#![allow(dead_code)]

use std::fs::OpenOptions;
use std::time::Duration;

use chitin::{Console, ConsoleCapture, ExitReason, Sandbox, SandboxBuilder};
use chitin_test_guests::Guest;

/// Upper bound for any guest in these tests to finish; a guest that takes
/// longer is hung, and the test fails instead of hanging CI.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Whether KVM can be used; prints the reason when it cannot (and
/// panics instead under `CHITIN_REQUIRE_KVM=1`).
pub fn kvm_available(test: &str) -> bool {
    match OpenOptions::new().read(true).write(true).open("/dev/kvm") {
        Ok(_) => true,
        Err(e) => {
            let why = format!("{test}: skipped: /dev/kvm is not usable ({e})");
            if std::env::var("CHITIN_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{why}, but CHITIN_REQUIRE_KVM=1");
            }
            eprintln!("{why}");
            false
        }
    }
}

/// A builder for `guest` with its console captured.
pub fn guest_builder(guest: Guest, console: &ConsoleCapture) -> SandboxBuilder {
    Sandbox::builder()
        .kernel(guest.path())
        .memory_mib(64)
        .console(Console::capture(console))
}

/// Build, start and wait for a sandbox, failing the test if it hangs.
pub fn run_to_exit(builder: SandboxBuilder) -> ExitReason {
    let running = builder.build().expect("build").start().expect("start");
    match running.wait_timeout(GUEST_TIMEOUT) {
        Some(reason) => reason,
        None => {
            let reason = running.stop();
            panic!("guest did not stop within {GUEST_TIMEOUT:?} (stopped: {reason})");
        }
    }
}

/// The captured console as text.
pub fn text(console: &ConsoleCapture) -> String {
    String::from_utf8_lossy(&console.contents()).into_owned()
}

/// A scratch directory for one test (under the temp dir, named for the
/// test and this process, readable by all), removed when dropped.
pub struct Scratch(std::path::PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("chitin-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Self(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The numbers of the counter guest's complete `n <k>` lines, in order.
pub fn counted(out: &str) -> Vec<u64> {
    out.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim_end().strip_prefix("n "))
        .map(|n| n.parse().unwrap())
        .collect()
}

/// Wait until the counter guest has printed `n <at_least>`.
pub fn wait_for_count(console: &ConsoleCapture, at_least: u64) -> bool {
    let deadline = std::time::Instant::now() + GUEST_TIMEOUT;
    while std::time::Instant::now() < deadline {
        if counted(&text(console))
            .last()
            .is_some_and(|&n| n >= at_least)
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// The counter guest on two vCPUs (the second one never started by the
/// guest, so it waits in the kernel), counting.
pub fn start_counting(console: &ConsoleCapture) -> chitin::RunningSandbox {
    let running = guest_builder(Guest::Counter, console)
        .vcpus(2)
        .build()
        .unwrap()
        .start()
        .unwrap();
    assert!(wait_for_count(console, 3), "{}", text(console));
    running
}
