//! Host-KVM tier: snapshots of a paused tiny guest, restored into new
//! sandboxes that continue where it stopped, and the errors for snapshot
//! files that are damaged, foreign or asked to be another machine.

mod common;

use std::path::Path;

use chitin::{
    ConsoleCapture, ExitReason, RunningSandbox, SandboxError, Snapshot, SnapshotError,
    SNAPSHOT_FORMAT,
};
use common::{counted, kvm_available, start_counting, text, wait_for_count, Scratch};

/// Pause the counting guest on `console`, snapshot it into `dir` and stop
/// it; what it had printed.
fn snapshot_counter(dir: &Path) -> String {
    let console = ConsoleCapture::default();
    let running = start_counting(&console);
    running.pause().unwrap();
    let info = running.snapshot(dir).unwrap();
    let printed = text(&console);
    assert_eq!(info.memory_bytes, 64 << 20);
    assert!(info.memory_written > 0 && info.memory_written < info.memory_bytes);
    assert_eq!(running.stop(), ExitReason::Stopped);
    printed
}

/// A sandbox restored from `dir`, its console captured.
fn restore(dir: &Path, console: &ConsoleCapture) -> RunningSandbox {
    Snapshot::open(dir)
        .unwrap()
        .restore_builder()
        .console(chitin::Console::capture(console))
        .build()
        .unwrap()
        .start()
        .unwrap()
}

/// Every number once, in order, from 0.
fn assert_consecutive(out: &str) {
    let numbers = counted(out);
    assert!(!numbers.is_empty(), "{out}");
    assert_eq!(
        numbers,
        (0..numbers.len() as u64).collect::<Vec<_>>(),
        "{out}"
    );
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn restored_guest_continues_where_the_snapshot_stopped_it() {
    if !kvm_available("snapshot_restore") {
        return;
    }
    // Arrange
    let dir = Scratch::new("snapshot-restore");
    let before = snapshot_counter(dir.path());
    let last = *counted(&before).last().unwrap();
    // Act
    let console = ConsoleCapture::default();
    let restored = restore(dir.path(), &console);
    assert!(wait_for_count(&console, last + 3), "{}", text(&console));
    // Assert: no reboot (no banner), no number repeated or skipped
    // across the snapshot, the line cut by the pause completed.
    let after = text(&console);
    assert!(!after.contains("chitin-test"), "{after}");
    assert_consecutive(&format!("{before}{after}"));
    assert_eq!(restored.stop(), ExitReason::Stopped);
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn two_clones_of_one_snapshot_run_at_once_and_diverge() {
    if !kvm_available("snapshot_clones") {
        return;
    }
    // Arrange
    let dir = Scratch::new("snapshot-clones");
    let before = snapshot_counter(dir.path());
    let last = *counted(&before).last().unwrap();
    // Act: two clones at once; the first is paused while the second runs.
    let (one, two) = (ConsoleCapture::default(), ConsoleCapture::default());
    let first = restore(dir.path(), &one);
    let second = restore(dir.path(), &two);
    assert!(wait_for_count(&one, last + 2), "{}", text(&one));
    first.pause().unwrap();
    let first_stopped_at = *counted(&format!("{before}{}", text(&one))).last().unwrap();
    assert!(wait_for_count(&two, first_stopped_at + 5), "{}", text(&two));
    // Assert: each continued the same past on its own; the paused one did
    // not move while the other ran on.
    for console in [&one, &two] {
        assert_consecutive(&format!("{before}{}", text(console)));
    }
    let first_now = *counted(&format!("{before}{}", text(&one))).last().unwrap();
    assert_eq!(first_now, first_stopped_at);
    first.resume();
    assert!(wait_for_count(&one, first_stopped_at + 2), "{}", text(&one));
    assert_eq!(first.stop(), ExitReason::Stopped);
    assert_eq!(second.stop(), ExitReason::Stopped);
    // The snapshot is unchanged by its clones: a third starts where they
    // did.
    let three = ConsoleCapture::default();
    let third = restore(dir.path(), &three);
    assert!(wait_for_count(&three, last + 1), "{}", text(&three));
    let third_first = counted(&text(&three));
    assert!(
        third_first.first().is_some_and(|&n| n <= last + 1),
        "{third_first:?}"
    );
    assert_eq!(third.stop(), ExitReason::Stopped);
}

/// The memory files (`memory-<hex>`) in `dir`.
fn memory_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("memory-"))
        })
        .collect();
    files.sort();
    files
}

/// `Snapshot::open` of a copy of `dir` whose state file was changed by
/// `damage`.
fn open_damaged(dir: &Path, name: &str, damage: impl FnOnce(&mut Vec<u8>)) -> SnapshotError {
    let copy = Scratch::new(name);
    let mut state = std::fs::read(dir.join("state")).unwrap();
    damage(&mut state);
    std::fs::write(copy.path().join("state"), &state).unwrap();
    for memory in memory_files(dir) {
        std::fs::copy(&memory, copy.path().join(memory.file_name().unwrap())).unwrap();
    }
    Snapshot::open(copy.path()).unwrap_err()
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn a_new_snapshot_in_the_directory_a_clone_maps_leaves_the_clone_intact() {
    if !kvm_available("snapshot_again") {
        return;
    }
    // Arrange: a clone of the snapshot in `dir`, counting.
    let dir = Scratch::new("snapshot-again");
    let before = snapshot_counter(dir.path());
    let last = *counted(&before).last().unwrap();
    let console = ConsoleCapture::default();
    let clone = restore(dir.path(), &console);
    assert!(wait_for_count(&console, last + 2), "{}", text(&console));
    let old_memory = memory_files(dir.path());
    // Act: the clone itself snapshotted into the same directory.
    clone.pause().unwrap();
    clone.snapshot(dir.path()).unwrap();
    let at = *counted(&format!("{before}{}", text(&console)))
        .last()
        .unwrap();
    clone.resume();
    // Assert: the clone's memory is its own (a snapshot writes a new
    // file and drops the old name), it counts on; a restore of the new
    // snapshot continues from where the clone was.
    let new_memory = memory_files(dir.path());
    assert_eq!(new_memory.len(), 1, "{new_memory:?}");
    assert_ne!(new_memory, old_memory);
    assert!(wait_for_count(&console, at + 3), "{}", text(&console));
    assert_consecutive(&format!("{before}{}", text(&console)));
    let again = ConsoleCapture::default();
    let second = restore(dir.path(), &again);
    assert!(wait_for_count(&again, at + 2), "{}", text(&again));
    let first_line = counted(&text(&again))[0];
    assert!(first_line <= at + 1, "{first_line} after {at}");
    assert_eq!(second.stop(), ExitReason::Stopped);
    assert_eq!(clone.stop(), ExitReason::Stopped);
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn damaged_foreign_or_mismatched_snapshots_are_typed_errors() {
    if !kvm_available("snapshot_errors") {
        return;
    }
    let dir = Scratch::new("snapshot-errors");
    snapshot_counter(dir.path());
    // Truncated anywhere: never a panic, always an error.
    let len = std::fs::read(dir.path().join("state")).unwrap().len();
    for cut in [0, 7, 12, 20, len / 2, len - 1] {
        let e = open_damaged(dir.path(), "snapshot-cut", |s| s.truncate(cut));
        assert!(
            matches!(
                e,
                SnapshotError::Truncated { .. } | SnapshotError::NotASnapshot(_)
            ),
            "cut at {cut}: {e}"
        );
    }
    // One bit flipped in the payload.
    let e = open_damaged(dir.path(), "snapshot-flip", |s| s[100] ^= 0x10);
    assert!(
        matches!(&e, SnapshotError::Corrupt(m) if m.contains("checksum")),
        "{e}"
    );
    // A newer format.
    let e = open_damaged(dir.path(), "snapshot-newer", |s| {
        s[8..12].copy_from_slice(&(SNAPSHOT_FORMAT + 1).to_le_bytes());
    });
    assert!(
        matches!(e, SnapshotError::NewerFormat { found } if found == SNAPSHOT_FORMAT + 1),
        "{e}"
    );
    // Not a snapshot at all.
    let e = open_damaged(dir.path(), "snapshot-foreign", |s| {
        *s = b"#!/bin/sh\necho hello\n".to_vec();
    });
    assert!(matches!(e, SnapshotError::NotASnapshot(_)), "{e}");
    // The memory file missing, of another size, or not a file.
    let copy = Scratch::new("snapshot-nomem");
    std::fs::copy(dir.path().join("state"), copy.path().join("state")).unwrap();
    assert!(matches!(
        Snapshot::open(copy.path()),
        Err(SnapshotError::Io { .. })
    ));
    let memory = copy
        .path()
        .join(memory_files(dir.path())[0].file_name().unwrap());
    std::fs::write(&memory, [0u8; 4096]).unwrap();
    assert!(matches!(
        Snapshot::open(copy.path()),
        Err(SnapshotError::Corrupt(_))
    ));
    std::fs::remove_file(&memory).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &memory).unwrap();
    assert!(matches!(
        Snapshot::open(copy.path()),
        Err(SnapshotError::Io { .. })
    ));
    // A state file that is a device: refused, not read forever.
    std::fs::remove_file(copy.path().join("state")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", copy.path().join("state")).unwrap();
    assert!(matches!(
        Snapshot::open(copy.path()),
        Err(SnapshotError::Io { .. })
    ));
    // Another machine asked of it.
    let snapshot = Snapshot::open(dir.path()).unwrap();
    assert_eq!((snapshot.vcpus(), snapshot.memory_mib()), (2, 64));
    for (builder, what) in [
        (snapshot.restore_builder().vcpus(3), "vCPUs"),
        (
            snapshot.restore_builder().memory_mib(128),
            "bytes of memory",
        ),
    ] {
        match builder.build() {
            Err(SandboxError::Snapshot(SnapshotError::Mismatch { what: w, .. })) => {
                assert_eq!(w, what)
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    assert!(matches!(
        snapshot.restore_builder().kernel("/vmlinux").build(),
        Err(SandboxError::Snapshot(SnapshotError::Unsupported(_)))
    ));
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn only_a_paused_sandbox_without_virtio_devices_is_snapshotted() {
    if !kvm_available("snapshot_refusals") {
        return;
    }
    let dir = Scratch::new("snapshot-refusals");
    let console = ConsoleCapture::default();
    let running = start_counting(&console);
    assert!(matches!(
        running.snapshot(dir.path()),
        Err(SnapshotError::NotPaused)
    ));
    assert_eq!(running.stop(), ExitReason::Stopped);
    // A sandbox with a vsock device.
    let with_vsock = common::guest_builder(chitin_test_guests::Guest::Idle, &console)
        .vsock(3, dir.path().join("v.sock"))
        .build()
        .unwrap()
        .start()
        .unwrap();
    with_vsock.pause().unwrap();
    assert!(matches!(
        with_vsock.snapshot(dir.path().join("snap")),
        Err(SnapshotError::Unsupported(_))
    ));
    assert_eq!(with_vsock.stop(), ExitReason::Stopped);
}
