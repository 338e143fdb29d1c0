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

/// The environment variable that makes `restore_in_child` the child half
/// of `a_snapshot_is_restored_in_another_process`: the snapshot's
/// directory and the last number before it, `DIR:LAST`.
const CHILD_ENV: &str = "CHITIN_TEST_RESTORE_CHILD";

/// Where the child half leaves what its restored guest printed.
const CHILD_CONSOLE: &str = "child-console.txt";

/// The child half: restore the snapshot, let it count on, leave what it
/// printed in the snapshot's directory. Does nothing in a normal run.
#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn restore_in_child() {
    let Ok(arg) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (dir, last) = arg.rsplit_once(':').unwrap();
    let last: u64 = last.parse().unwrap();
    let console = ConsoleCapture::default();
    let restored = restore(Path::new(dir), &console);
    assert!(wait_for_count(&console, last + 3), "{}", text(&console));
    assert_eq!(restored.stop(), ExitReason::Stopped);
    std::fs::write(Path::new(dir).join(CHILD_CONSOLE), text(&console)).unwrap();
    println!("restored-in-child pid={}", std::process::id());
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn a_snapshot_is_restored_in_another_process() {
    if !kvm_available("snapshot_other_process") {
        return;
    }
    // Arrange: the snapshot taken here.
    let dir = Scratch::new("snapshot-child");
    let before = snapshot_counter(dir.path());
    let last = *counted(&before).last().unwrap();
    // Act: this test binary again, running only the child half.
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "restore_in_child",
            "--include-ignored",
            "--nocapture",
        ])
        .env(CHILD_ENV, format!("{}:{last}", dir.path().display()))
        .output()
        .unwrap();
    // Assert: the other process ran, and its guest went on from the
    // snapshot with no number repeated or skipped.
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("restored-in-child pid="),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!stdout.contains(&format!("pid={}\n", std::process::id())));
    let after = std::fs::read_to_string(dir.path().join(CHILD_CONSOLE)).unwrap();
    assert!(!after.contains("chitin-test"), "{after}");
    assert_consecutive(&format!("{before}{after}"));
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
    assert!(wait_for_count(&three, last + 2), "{}", text(&three));
    assert_consecutive(&format!("{before}{}", text(&three)));
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
    // What the clone had printed when it was saved, a line the pause cut
    // included: a restore of this snapshot completes that line.
    let saved_text = format!("{before}{}", text(&console));
    let at = *counted(&saved_text).last().unwrap();
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
    assert!(wait_for_count(&again, at + 3), "{}", text(&again));
    assert_consecutive(&format!("{saved_text}{}", text(&again)));
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
fn only_a_paused_sandbox_without_interfaces_or_shares_is_snapshotted() {
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
    // A sandbox with a shared folder: its open files live on the host.
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    let with_share = common::guest_builder(chitin_test_guests::Guest::Idle, &console)
        .share(chitin::Share::new(&shared, "data"))
        .build()
        .unwrap()
        .start()
        .unwrap();
    with_share.pause().unwrap();
    match with_share.snapshot(dir.path().join("snap")) {
        Err(SnapshotError::Unsupported(what)) => assert!(what.contains("shared folder"), "{what}"),
        other => panic!("{other:?}"),
    }
    assert!(!dir.path().join("snap").join("state").exists());
    assert_eq!(with_share.stop(), ExitReason::Stopped);
}

/// A raw disk image of `sectors` 512-byte sectors at `path`.
fn image(path: &Path, sectors: u64) -> std::path::PathBuf {
    let file = std::fs::File::create(path).unwrap();
    file.set_len(sectors * 512).unwrap();
    path.to_path_buf()
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn disks_and_vsock_are_carried_and_can_be_retargeted() {
    if !kvm_available("snapshot_devices") {
        return;
    }
    // Arrange: the counting guest with two disks and a vsock device.
    let dir = Scratch::new("snapshot-devices");
    let root = image(&dir.path().join("root.img"), 2048);
    let data = image(&dir.path().join("data.img"), 4096);
    let console = ConsoleCapture::default();
    let running = common::guest_builder(chitin_test_guests::Guest::Counter, &console)
        .vcpus(2)
        .disk(chitin::Disk::new(&root).read_only(true))
        .disk(chitin::Disk::new(&data))
        .vsock(7, dir.path().join("v.sock"))
        .build()
        .unwrap()
        .start()
        .unwrap();
    assert!(wait_for_count(&console, 3), "{}", text(&console));
    running.pause().unwrap();
    let snap = dir.path().join("snap");
    running.snapshot(&snap).unwrap();
    assert_eq!(running.stop(), ExitReason::Stopped);
    let snapshot = Snapshot::open(&snap).unwrap();
    let own: Vec<_> = snapshot
        .disks()
        .iter()
        .map(|d| (d.path().to_path_buf(), d.is_read_only()))
        .collect();
    assert_eq!(own, [(root.clone(), true), (data.clone(), false)]);

    // The caller's disks and socket, as the guest knows them: it goes on.
    let clone_data = image(&dir.path().join("clone-data.img"), 4096);
    let clone_socket = dir.path().join("clone.sock");
    let clone_console = ConsoleCapture::default();
    let clone = snapshot
        .restore_builder()
        .disk(chitin::Disk::new(&root).read_only(true))
        .disk(chitin::Disk::new(&clone_data))
        .vsock(7, &clone_socket)
        .console(chitin::Console::capture(&clone_console))
        .build()
        .unwrap()
        .start()
        .unwrap();
    assert!(clone_socket.exists(), "the clone listens on its own socket");
    assert!(
        wait_for_count(&clone_console, 2),
        "{}",
        text(&clone_console)
    );
    assert_eq!(clone.stop(), ExitReason::Stopped);
    assert!(!clone_socket.exists(), "the clone's socket goes with it");

    // Everything the guest would see differently is refused by name.
    let mismatch = |builder: chitin::SandboxBuilder, what: &str| match builder.build() {
        Err(SandboxError::Snapshot(SnapshotError::Mismatch { what: w, .. })) => {
            assert_eq!(w, what)
        }
        other => panic!("{what}: {other:?}"),
    };
    let small = image(&dir.path().join("small.img"), 2048);
    let retarget = |second: chitin::Disk| {
        snapshot
            .restore_builder()
            .disk(chitin::Disk::new(&root).read_only(true))
            .disk(second)
            .vsock(7, dir.path().join("x.sock"))
    };
    mismatch(
        retarget(chitin::Disk::new(&small)),
        "a disk of 512-byte sectors",
    );
    mismatch(
        retarget(chitin::Disk::new(&clone_data).read_only(true)),
        "a read-only disk (1: yes)",
    );
    mismatch(
        snapshot.restore_builder().disk(chitin::Disk::new(&root)),
        "disks",
    );
    mismatch(
        retarget(chitin::Disk::new(&clone_data)).vsock(8, dir.path().join("y.sock")),
        "vsock CID",
    );
    // A restore opens only the disks its caller names.
    assert!(matches!(
        snapshot.restore_builder().build(),
        Err(SandboxError::Snapshot(SnapshotError::DisksNeeded(2)))
    ));
    let own_disks = || {
        snapshot
            .disks()
            .into_iter()
            .fold(snapshot.restore_builder(), |b, d| b.disk(d))
    };
    assert!(matches!(
        own_disks().build(),
        Err(SandboxError::Snapshot(SnapshotError::VsockPathNeeded))
    ));
    // The serial the guest read stays.
    assert!(matches!(
        retarget(chitin::Disk::new(&clone_data).id("other")).build(),
        Err(SandboxError::Snapshot(SnapshotError::Unsupported(_)))
    ));
    // No socket or image is left behind by the refused restores.
    for name in ["x.sock", "y.sock"] {
        assert!(!dir.path().join(name).exists(), "{name}");
    }
}
