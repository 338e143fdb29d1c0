//! Host-KVM tier: chitin's threads under their seccomp filters, with the
//! repo's tiny test guests. A binary of its own: log mode's record of
//! violations is per process, and a filter that kills must not take other
//! tests' sandboxes with it.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;

use chitin::{Console, ConsoleCapture, ConsoleInput, Disk, ExitReason, Sandbox, Seccomp, Share};
use chitin_test_guests::Guest;
use common::{kvm_available, text, Scratch, GUEST_TIMEOUT};

/// Held by each test: a thread listing must not catch another test's
/// thread between its start and its filter.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// `Seccomp:` of `/proc/<task>/status`: 0 unfiltered, 2 filtered.
fn seccomp_mode(status_path: &Path) -> String {
    std::fs::read_to_string(status_path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .unwrap_or("?")
        .trim()
        .to_string()
}

/// Every thread of this process: (name, seccomp mode).
fn threads() -> Vec<(String, String)> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| {
            let dir = t.ok()?.path();
            let name = std::fs::read_to_string(dir.join("comm")).ok()?;
            Some((name.trim().to_string(), seccomp_mode(&dir.join("status"))))
        })
        .collect()
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn every_chitin_thread_is_filtered_and_the_embedders_are_not() {
    if !kvm_available("every_chitin_thread_is_filtered") {
        return;
    }
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    // Arrange: a spinning guest on two vCPUs with a thread of every kind a
    // host-KVM sandbox has: console writer, event loop, a share's thread.
    let scratch = Scratch::new("seccomp-threads");
    let share = scratch.path().join("share");
    std::fs::create_dir(&share).unwrap();
    let running = Sandbox::builder()
        .kernel(Guest::Spin.path())
        .memory_mib(64)
        .vcpus(2)
        .console(Console::file(scratch.path().join("console")))
        .share(Share::new(&share, "data"))
        .build()
        .unwrap()
        .start()
        .unwrap();
    // Act
    let seen = threads();
    running.stop();
    // Assert: the kinds are all there and every one is filtered; this
    // test's own thread (the embedder's) is not.
    for wanted in [
        "chitin-vcpu0",
        "chitin-vcpu1",
        "chitin-events",
        "chitin-console",
        "chitin-fs",
    ] {
        assert!(
            seen.iter().any(|(name, _)| name == wanted),
            "no {wanted} thread: {seen:?}"
        );
    }
    for (name, mode) in &seen {
        if name.starts_with("chitin-") {
            assert_eq!(mode, "2", "{name} is not filtered: {seen:?}");
        }
    }
    assert_eq!(seccomp_mode(Path::new("/proc/thread-self/status")), "0");
}

/// Boot `guest` under `Seccomp::Log` with the devices a host test can
/// give it (a vsock device; a disk and a share too, but not for the
/// hostile vsock guest, which looks for its device in the first window),
/// and return its console and exit reason.
fn run_logged(
    guest: Guest,
    scratch: &Scratch,
    input: Option<ConsoleInput>,
) -> (ExitReason, String) {
    let console = ConsoleCapture::default();
    let share = scratch.path().join(format!("share-{guest:?}"));
    std::fs::create_dir_all(&share).unwrap();
    let image = scratch.path().join(format!("disk-{guest:?}.img"));
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let uds = scratch.path().join(format!("{guest:?}.vsock"));
    let mut builder = Sandbox::builder()
        .kernel(guest.path())
        .memory_mib(64)
        .seccomp(Seccomp::Log)
        .console(Console::capture(&console))
        .vsock(3, &uds);
    if guest != Guest::VsockHostile {
        builder = builder
            .disk(Disk::new(&image))
            .share(Share::new(&share, "data"));
    }
    if let Some(input) = input {
        builder = builder.console_input(input);
    }
    let running = builder.build().unwrap().start().unwrap();
    let reason = running
        .wait_timeout(GUEST_TIMEOUT)
        .unwrap_or_else(|| running.stop());
    (reason, text(&console))
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn log_mode_sandboxes_make_no_syscall_outside_their_filters() {
    if !kvm_available("log_mode_sandboxes") {
        return;
    }
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let scratch = Scratch::new("seccomp-log");
    // The vsock device's whole TX and RX path with malformed chains; the
    // disk and share are there for their set-up and teardown.
    let (reason, out) = run_logged(Guest::VsockHostile, &scratch, None);
    assert_eq!(reason, ExitReason::Reset, "{out}");
    assert!(out.contains("done\n"), "{out}");
    // Console input through the event loop, output through a file sink.
    let (mut host, guest_end) = UnixStream::pair().unwrap();
    host.write_all(b"0123456789q").unwrap();
    let (reason, out) = run_logged(Guest::Echo, &scratch, Some(ConsoleInput::new(guest_end)));
    assert_eq!(reason, ExitReason::Reset, "{out}");
    // Several vCPUs (the kick, the reset from one vCPU).
    let (reason, out) = run_logged(Guest::Smp, &scratch, None);
    assert_eq!(reason, ExitReason::Reset, "{out}");
    // A stop from the host while the guest spins.
    let running = Sandbox::builder()
        .kernel(Guest::Spin.path())
        .memory_mib(64)
        .vcpus(2)
        .seccomp(Seccomp::Log)
        .console(Console::file(scratch.path().join("spin-console")))
        .build()
        .unwrap()
        .start()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(running.stop(), ExitReason::Stopped);

    assert_eq!(chitin::seccomp_violations(), vec![]);
}
