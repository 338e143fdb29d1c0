//! Twenty sandboxes built, run and dropped in sequence, then six paused
//! ones and six restored from a snapshot, dropped or stopped, leave the
//! process's fd and thread counts where they were. In its own test binary so no other
//! test's threads or fds move the counts.

mod common;

use chitin::{ConsoleCapture, ExitReason};
use chitin_test_guests::Guest;
use common::{guest_builder, kvm_available, run_to_exit, GUEST_TIMEOUT};

fn count_entries(dir: &str) -> usize {
    std::fs::read_dir(dir).unwrap().count()
}

/// The process has exactly `fds` open files and `threads` threads again.
fn assert_back_to(fds: usize, threads: usize, after: &str) {
    assert_eq!(
        count_entries("/proc/self/fd"),
        fds,
        "fd count changed after {after}"
    );
    assert_eq!(
        count_entries("/proc/self/task"),
        threads,
        "thread count changed after {after}"
    );
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn twenty_sandboxes_in_sequence_leak_no_fds_or_threads() {
    if !kvm_available("twenty_sandboxes") {
        return;
    }
    // Arrange: one warm-up run so process-wide one-time state (the signal
    // handler, stdio buffers) is in place before counting.
    let console = ConsoleCapture::default();
    assert_eq!(
        run_to_exit(guest_builder(Guest::Report, &console).vcpus(2)),
        ExitReason::Reset
    );
    let fds = count_entries("/proc/self/fd");
    let threads = count_entries("/proc/self/task");
    // Act
    for _ in 0..20 {
        let console = ConsoleCapture::default();
        let reason = run_to_exit(guest_builder(Guest::Report, &console).vcpus(2));
        assert_eq!(reason, ExitReason::Reset);
    }
    // Assert
    assert_back_to(fds, threads, "twenty sandboxes");

    // Act: paused sandboxes, half dropped and half stopped while paused.
    for i in 0..6 {
        let console = ConsoleCapture::default();
        let running = guest_builder(Guest::Counter, &console)
            .vcpus(2)
            .build()
            .unwrap()
            .start()
            .unwrap();
        assert!(console.wait_for(b"n 1\n", GUEST_TIMEOUT));
        running.pause().unwrap();
        if i % 2 == 0 {
            drop(running);
        } else {
            assert_eq!(running.stop(), ExitReason::Stopped);
        }
    }
    // Assert
    assert_back_to(fds, threads, "paused sandboxes");

    // Act: a snapshot of a sandbox with a disk and a vsock device, and
    // sandboxes restored from it, dropped or stopped, and restores that
    // fail after the devices were made.
    let dir = common::Scratch::new("leaks-snapshot");
    let image = dir.path().join("disk.img");
    std::fs::File::create(&image)
        .and_then(|f| f.set_len(1 << 20))
        .unwrap();
    {
        let console = ConsoleCapture::default();
        let running = guest_builder(Guest::Counter, &console)
            .vcpus(2)
            .disk(chitin::Disk::new(&image).read_only(true))
            .vsock(3, dir.path().join("original.sock"))
            .build()
            .unwrap()
            .start()
            .unwrap();
        assert!(console.wait_for(b"n 1\n", GUEST_TIMEOUT));
        running.pause().unwrap();
        running.snapshot(dir.path().join("snap")).unwrap();
    }
    let snapshot = chitin::Snapshot::open(dir.path().join("snap")).unwrap();
    for i in 0..6 {
        let console = ConsoleCapture::default();
        let socket = dir.path().join(format!("clone-{i}.sock"));
        let builder = snapshot
            .restore_builder()
            .disk(chitin::Disk::new(&image).read_only(true))
            .vsock(3, &socket)
            .console(chitin::Console::capture(&console));
        let running = builder.build().unwrap().start().unwrap();
        assert!(console.wait_for(b"\n", GUEST_TIMEOUT));
        if i % 2 == 0 {
            drop(running);
        } else {
            assert_eq!(running.stop(), ExitReason::Stopped);
        }
        assert!(!socket.exists(), "{}", socket.display());
    }
    // A disk of another size, found after the vsock device is made.
    let small = dir.path().join("small.img");
    std::fs::File::create(&small)
        .and_then(|f| f.set_len(1 << 19))
        .unwrap();
    let socket = dir.path().join("refused.sock");
    assert!(snapshot
        .restore_builder()
        .disk(chitin::Disk::new(&small).read_only(true))
        .vsock(3, &socket)
        .build()
        .is_err());
    assert!(!socket.exists());
    // Assert
    assert_back_to(fds, threads, "restored sandboxes");
}
