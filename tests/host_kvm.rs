//! Host-KVM tier: the repo's tiny test guests boot through real KVM exits on
//! this host, and each test asserts what the guest reports and why it stopped.

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use chitin::{ConsoleCapture, ConsoleInput, ExitReason, Sandbox, SandboxError};
use chitin_test_guests::Guest;
use common::{
    counted, guest_builder, kvm_available, run_to_exit, start_counting, text, wait_for_count,
    GUEST_TIMEOUT,
};

/// The e820 map chitin reports for a 64 MiB guest, as the report guest
/// prints it: low RAM to the EBDA, EBDA + BIOS hole reserved, RAM from 1 MiB,
/// the MMIO gap from 3 GiB to 4 GiB reserved.
const E820_64MIB: &str = "e820: 4\n\
e820 0000000000000000 000000000009fc00 1\n\
e820 000000000009fc00 0000000000060400 2\n\
e820 0000000000100000 0000000003f00000 1\n\
e820 00000000c0000000 0000000040000000 2\n";

fn assert_report(guest: Guest) {
    // Arrange
    let console = ConsoleCapture::default();
    let builder = guest_builder(guest, &console)
        .cmdline("chitin.test=report quiet")
        .vcpus(3);
    // Act
    let reason = run_to_exit(builder);
    // Assert
    let out = text(&console);
    assert_eq!(reason, ExitReason::Reset, "console:\n{out}");
    assert!(out.starts_with("chitin-test: report\n"), "{out}");
    // The user's command line first, then chitin's own entries.
    let want = format!(
        "cmdline: chitin.test=report quiet {}\n",
        chitin::VMM_CMDLINE_ENTRIES.join(" ")
    );
    assert!(out.contains(&want), "{out}");
    assert!(out.contains(E820_64MIB), "{out}");
    assert!(out.contains("cpus: 3\n"), "{out}");
    assert!(out.ends_with("done\n"), "{out}");
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn report_guest_elf_reports_cmdline_e820_and_cpus() {
    if kvm_available("report_guest_elf") {
        assert_report(Guest::Report);
    }
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn report_guest_bzimage_reports_cmdline_e820_and_cpus() {
    if kvm_available("report_guest_bzimage") {
        assert_report(Guest::ReportBzImage);
    }
}

fn assert_apic_ids(vcpus: u32) {
    let console = ConsoleCapture::default();
    let reason = run_to_exit(guest_builder(Guest::Smp, &console).vcpus(vcpus));
    let out = text(&console);
    assert_eq!(reason, ExitReason::Reset, "console:\n{out}");
    let mut ids: Vec<u32> = out
        .lines()
        .filter_map(|l| l.strip_prefix("apic "))
        .map(|id| id.parse().unwrap())
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, (0..vcpus).collect::<Vec<_>>(), "{out}");
    assert!(out.ends_with("done\n"), "{out}");
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn smp_guest_two_vcpus_each_report_apic_id() {
    if kvm_available("smp_guest_two_vcpus") {
        assert_apic_ids(2);
    }
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn smp_guest_four_vcpus_each_report_apic_id() {
    if kvm_available("smp_guest_four_vcpus") {
        assert_apic_ids(4);
    }
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn triple_fault_guest_exits_with_triple_fault() {
    if !kvm_available("triple_fault_guest") {
        return;
    }
    let console = ConsoleCapture::default();
    let reason = run_to_exit(guest_builder(Guest::TripleFault, &console));
    assert_eq!(reason, ExitReason::TripleFault, "{}", text(&console));
    assert!(text(&console).starts_with("chitin-test: triple_fault\n"));
}

/// The spin guest on two vCPUs, started and spinning with interrupts off.
fn start_spinning(console: &ConsoleCapture) -> chitin::RunningSandbox {
    let running = guest_builder(Guest::Spin, console)
        .vcpus(2)
        .build()
        .unwrap()
        .start()
        .unwrap();
    assert!(console.wait_for(b"chitin-test: spin\n", GUEST_TIMEOUT));
    running
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn spin_guest_stop_interrupts_guest_code() {
    if !kvm_available("spin_guest_stop") {
        return;
    }
    // Arrange: a guest spinning with interrupts off, never exiting.
    let console = ConsoleCapture::default();
    let running = start_spinning(&console);
    assert_eq!(running.wait_timeout(Duration::from_millis(50)), None);
    // Act
    let reason = running.stop();
    // Assert
    assert_eq!(reason, ExitReason::Stopped);
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn a_pit_exists_only_when_asked_for() {
    if !kvm_available("pit_on_request") {
        return;
    }
    let vm = |pit| {
        let ram =
            chitin_memory::GuestRam::new(64 << 20, chitin_memory::Backing::Anonymous).unwrap();
        (chitin_vcpu::Vm::new(&ram, pit).unwrap(), ram)
    };
    // KVM_GET_PIT2 answers only for a VM that has a PIT.
    let (without, _ram) = vm(false);
    assert!(without.fd().get_pit2().is_err());
    let (with, _ram) = vm(true);
    assert!(with.fd().get_pit2().is_ok());
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn report_guest_runs_on_a_machine_with_a_pit() {
    if !kvm_available("report_with_pit") {
        return;
    }
    let console = ConsoleCapture::default();
    let reason = run_to_exit(guest_builder(Guest::Report, &console).pit(true));
    assert_eq!(reason, ExitReason::Reset, "{}", text(&console));
    assert!(text(&console).ends_with("done\n"), "{}", text(&console));
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn idle_guest_halted_with_interrupts_off_is_stopped() {
    if !kvm_available("idle_guest_stop") {
        return;
    }
    // Arrange: two vCPUs halted in the kernel with nothing to wake them.
    let console = ConsoleCapture::default();
    let running = guest_builder(Guest::Idle, &console)
        .vcpus(2)
        .build()
        .unwrap()
        .start()
        .unwrap();
    assert!(console.wait_for(b"chitin-test: idle\n", GUEST_TIMEOUT));
    assert_eq!(running.wait_timeout(Duration::from_millis(50)), None);
    // Act
    let reason = running.stop();
    // Assert
    assert_eq!(reason, ExitReason::Stopped);
    assert_eq!(text(&console), "chitin-test: idle\n");
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn handle_stops_from_another_thread_while_others_wait() {
    if !kvm_available("handle_stop") {
        return;
    }
    // Arrange: a spinning guest, two threads waiting on handles, one on
    // the sandbox itself.
    let console = ConsoleCapture::default();
    let running = start_spinning(&console);
    let handle = running.handle();
    assert!(handle.is_running());
    std::thread::scope(|s| {
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let h = handle.clone();
                s.spawn(move || h.wait())
            })
            .collect();
        let on_sandbox = s.spawn(|| running.wait_timeout(GUEST_TIMEOUT));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(handle.wait_timeout(Duration::from_millis(10)), None);
        // Act: a fifth thread stops it.
        let stopper = handle.clone();
        let stopped = s.spawn(move || stopper.stop()).join().unwrap();
        // Assert: everyone sees the stop; the vCPU threads are gone.
        assert_eq!(stopped, ExitReason::Stopped);
        for waiter in waiters {
            assert_eq!(waiter.join().unwrap(), ExitReason::Stopped);
        }
        assert_eq!(on_sandbox.join().unwrap(), Some(ExitReason::Stopped));
    });
    assert!(!handle.is_running());
    // A command on a stopped sandbox without an agent says why.
    assert!(matches!(
        running.output(&chitin::Command::new("true")),
        Err(chitin::ExecError::NoAgent)
    ));
    // The handle outlives the sandbox and goes on answering.
    drop(running);
    assert_eq!(handle.exit_reason(), Some(ExitReason::Stopped));
    assert_eq!(handle.stop(), ExitReason::Stopped);
    assert_eq!(handle.wait(), ExitReason::Stopped);
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn echo_guest_reads_console_input() {
    if !kvm_available("echo_guest") {
        return;
    }
    // Arrange: console input from one end of a socket pair.
    let (mut host, guest_end) = UnixStream::pair().unwrap();
    let console = ConsoleCapture::default();
    let running = guest_builder(Guest::Echo, &console)
        .console_input(ConsoleInput::new(guest_end))
        .build()
        .unwrap()
        .start()
        .unwrap();
    assert!(
        console.wait_for(b"ready\n", GUEST_TIMEOUT),
        "{}",
        text(&console)
    );
    // Act: more bytes than the 64-byte receive FIFO holds (digits only, so
    // no early quit key), then the quit key.
    let payload: String = (0..200)
        .map(|i| char::from(b'0' + (i % 10) as u8))
        .collect();
    host.write_all(payload.as_bytes()).unwrap();
    host.write_all(b"q").unwrap();
    let reason = running.wait_timeout(GUEST_TIMEOUT);
    // Assert
    let out = text(&console);
    assert_eq!(reason, Some(ExitReason::Reset), "{out}");
    // The guest echoes every byte but the quit key, then says bye.
    assert!(out.ends_with(&format!("ready\n{payload}\nbye\n")), "{out}");
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn pvh_guest_enters_through_pvh_note() {
    if !kvm_available("pvh_guest") {
        return;
    }
    let console = ConsoleCapture::default();
    let reason = run_to_exit(
        guest_builder(Guest::Pvh, &console)
            .boot_protocol(chitin::BootProtocol::Pvh)
            .cmdline("chitin.test=pvh"),
    );
    let out = text(&console);
    assert_eq!(reason, ExitReason::Reset, "{out}");
    assert!(out.contains("pvh: magic ok\n"), "{out}");
    assert!(
        out.contains("cmdline: chitin.test=pvh i8042.nokbd"),
        "{out}"
    );
    assert!(out.contains("memmap: 4\n"), "{out}");
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn pvh_guest_without_pvh_flag_uses_64bit_entry() {
    if !kvm_available("pvh_guest_64bit") {
        return;
    }
    let console = ConsoleCapture::default();
    let reason = run_to_exit(guest_builder(Guest::Pvh, &console));
    assert_eq!(reason, ExitReason::Reset);
    assert!(text(&console).contains("pvh: entered via 64-bit entry"));
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn two_sandboxes_run_at_the_same_time() {
    if !kvm_available("two_sandboxes") {
        return;
    }
    // Arrange: two spinning guests, both started before either is stopped.
    let (a_out, b_out) = (ConsoleCapture::default(), ConsoleCapture::default());
    let a = guest_builder(Guest::Spin, &a_out)
        .build()
        .unwrap()
        .start()
        .unwrap();
    let b = guest_builder(Guest::Spin, &b_out)
        .build()
        .unwrap()
        .start()
        .unwrap();
    // Act / Assert: both run concurrently, each stops on its own.
    assert!(a_out.wait_for(b"chitin-test: spin\n", GUEST_TIMEOUT));
    assert!(b_out.wait_for(b"chitin-test: spin\n", GUEST_TIMEOUT));
    assert_eq!(a.exit_reason(), None);
    assert_eq!(b.exit_reason(), None);
    assert_eq!(a.stop(), ExitReason::Stopped);
    assert_eq!(
        b.exit_reason(),
        None,
        "stopping one sandbox left the other running"
    );
    assert_eq!(b.stop(), ExitReason::Stopped);
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn build_not_a_kernel_is_a_typed_error() {
    if !kvm_available("build_not_a_kernel") {
        return;
    }
    let path = std::env::temp_dir().join(format!("chitin-not-a-kernel-{}", std::process::id()));
    std::fs::write(&path, b"#!/bin/sh\necho this is not a kernel\n").unwrap();
    let err = Sandbox::builder().kernel(&path).build().err().unwrap();
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(err, SandboxError::Boot(_)), "{err:?}");
    let line = chitin::error_chain(&err);
    assert!(line.contains("neither ELF nor bzImage"), "{line}");
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn build_missing_kernel_file_names_the_path() {
    if !kvm_available("build_missing_kernel") {
        return;
    }
    let err = Sandbox::builder()
        .kernel("/nonexistent/vmlinux")
        .build()
        .err()
        .unwrap();
    assert!(chitin::error_chain(&err).contains("/nonexistent/vmlinux"));
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn built_sandbox_dropped_without_start_runs_nothing() {
    if !kvm_available("built_not_started") {
        return;
    }
    let console = ConsoleCapture::default();
    let sandbox = guest_builder(Guest::Report, &console).build().unwrap();
    drop(sandbox);
    assert!(console.is_empty());
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn disks_appear_on_the_command_line_with_root() {
    if !kvm_available("disks_cmdline") {
        return;
    }
    // Arrange: two 1 MiB images, the second the read-only root.
    let dir = std::env::temp_dir().join(format!("chitin-disks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (data, root) = (dir.join("data.img"), dir.join("root.img"));
    for path in [&data, &root] {
        std::fs::File::create(path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
    }
    let console = ConsoleCapture::default();
    let builder = guest_builder(Guest::Report, &console)
        .cmdline("chitin.test=disks")
        .disk(chitin::Disk::new(&data))
        .root_disk(chitin::Disk::new(&root).read_only(true));
    let acpi_off = ConsoleCapture::default();
    let without_acpi = guest_builder(Guest::Report, &acpi_off)
        .acpi(false)
        .cmdline("chitin.test=disks")
        .disk(chitin::Disk::new(&data))
        .root_disk(chitin::Disk::new(&root).read_only(true));
    // Act
    let reason = run_to_exit(builder);
    let reason_acpi_off = run_to_exit(without_acpi);
    std::fs::remove_dir_all(&dir).unwrap();
    // Assert: with ACPI the DSDT describes the disks and the command line
    // names only the root; without, one virtio-mmio window per disk in
    // order, then the root.
    let out = text(&console);
    assert_eq!(reason, ExitReason::Reset, "{out}");
    assert!(out.contains("chitin.test=disks "), "{out}");
    assert!(out.contains(" root=/dev/vdb ro\n"), "{out}");
    assert!(!out.contains("virtio_mmio.device="), "{out}");
    let out = text(&acpi_off);
    assert_eq!(reason_acpi_off, ExitReason::Reset, "{out}");
    let want = "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
                root=/dev/vdb ro\n";
    assert!(out.contains(want), "{out}");
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn acpi_guest_finds_the_tables_and_powers_off_through_the_fadt() {
    if !kvm_available("acpi_power_off") {
        return;
    }
    // Arrange
    let console = ConsoleCapture::default();
    let builder = guest_builder(Guest::Acpi, &console).vcpus(3);
    // Act
    let reason = run_to_exit(builder);
    // Assert: the RSDP in the zero page, three CPUs in the MADT, the
    // sleep registers on chitin's ports, and a power-off (not a reset).
    let out = text(&console);
    assert_eq!(reason, ExitReason::PowerOff, "{out}");
    assert_eq!(
        out,
        "chitin-test: acpi\n\
         rsdp 00000000000e0000\n\
         madt cpus 3\n\
         sleep 0000000000000600 0000000000000601\n\
         poweroff\n"
    );
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn without_acpi_there_is_no_rsdp_and_no_sleep_register() {
    if !kvm_available("acpi_off") {
        return;
    }
    let console = ConsoleCapture::default();
    let reason = run_to_exit(guest_builder(Guest::Acpi, &console).acpi(false));
    let out = text(&console);
    assert_eq!(reason, ExitReason::Reset, "{out}");
    assert_eq!(out, "chitin-test: acpi\nacpi: no rsdp\n");
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn second_sandbox_on_a_read_write_image_fails_to_build() {
    if !kvm_available("shared_rw_image") {
        return;
    }
    // Arrange: one image, and a sandbox that has it open read-write.
    let image = std::env::temp_dir().join(format!("chitin-shared-{}.img", std::process::id()));
    std::fs::File::create(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let build = || {
        Sandbox::builder()
            .kernel(Guest::Report.path())
            .memory_mib(64)
            .disk(chitin::Disk::new(&image))
            .build()
    };
    let first = build().unwrap();
    // Act
    let err = build().err().unwrap();
    // Assert: the second is refused with a reason, and the image is free
    // again once the first is gone.
    let message = chitin::error_chain(&err);
    assert!(matches!(err, SandboxError::Disk { .. }), "{err:?}");
    assert!(message.contains("in use"), "{message}");
    drop(first);
    assert!(build().is_ok());
    std::fs::remove_file(&image).unwrap();
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn build_missing_disk_image_names_the_path() {
    if !kvm_available("build_missing_disk") {
        return;
    }
    let err = Sandbox::builder()
        .kernel(Guest::Report.path())
        .disk(chitin::Disk::new("/nonexistent/disk.img"))
        .build()
        .err()
        .unwrap();
    assert!(matches!(err, SandboxError::Disk { .. }), "{err:?}");
    assert!(chitin::error_chain(&err).contains("/nonexistent/disk.img"));
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn exec_without_agent_is_no_agent_error() {
    if !kvm_available("exec_without_agent") {
        return;
    }
    let console = ConsoleCapture::default();
    let running = guest_builder(Guest::Spin, &console)
        .build()
        .unwrap()
        .start()
        .unwrap();
    let err = running.exec(&chitin::Command::new("true")).err().unwrap();
    assert!(matches!(err, chitin::ExecError::NoAgent), "{err:?}");
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn exec_when_guest_stops_is_guest_stopped_error() {
    if !kvm_available("exec_guest_stopped") {
        return;
    }
    // Arrange: "boot an agent guest" whose kernel is the report guest: it
    // resets at once and never answers on vsock.
    let initrd = std::env::temp_dir().join(format!("chitin-fake-initrd-{}", std::process::id()));
    std::fs::write(&initrd, [0u8; 512]).unwrap();
    let image = chitin::GuestImage::new(Guest::Report.path(), &initrd);
    let running = Sandbox::builder()
        .guest(image)
        .memory_mib(64)
        .build()
        .unwrap()
        .start()
        .unwrap();
    // Act
    let err = running.exec(&chitin::Command::new("true")).err().unwrap();
    std::fs::remove_file(&initrd).unwrap();
    // Assert: a typed error naming why, not a hang.
    assert!(
        matches!(err, chitin::ExecError::GuestStopped(ExitReason::Reset)),
        "{err:?}"
    );
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn vsock_hostile_guest_faults_are_counted_and_answered() {
    if !kvm_available("vsock_hostile_guest") {
        return;
    }
    // Arrange: a vsock device in the first virtio-mmio window, where the
    // guest's own driver looks for it.
    let uds = std::env::temp_dir().join(format!("chitin-hostile-{}.vsock", std::process::id()));
    let _ = std::fs::remove_file(&uds);
    let console = ConsoleCapture::default();
    let running = guest_builder(Guest::VsockHostile, &console)
        .vsock(3, &uds)
        .build()
        .unwrap()
        .start()
        .unwrap();
    // Act: the guest sends four malformed chains and waits for the answers.
    let reason = running.wait_timeout(GUEST_TIMEOUT);
    // Assert: every chain came back, every one was answered with a reset
    // (the device kept working), and each is counted under its reason.
    let out = text(&console);
    assert_eq!(reason, Some(ExitReason::Reset), "{out}");
    // The driver's acknowledgement (counted by KVM, applied at the next
    // read) cleared the used-buffer bit it had read.
    assert!(
        out.contains("tx used 4\nrx used 4\nint 1 0\ndone\n"),
        "{out}"
    );
    let faults = running.device_faults();
    let vsock = faults
        .iter()
        .find(|d| d.device == "vsock")
        .expect("the sandbox reports its vsock device");
    for reason in [
        "tx chain: less data than the header says",
        "tx chain: device-writable descriptor",
        "unknown operation",
        "tx chain: buffer outside guest memory",
    ] {
        assert_eq!(vsock.count(reason), 1, "{reason}: {vsock:?}");
    }
    assert_eq!((vsock.total(), vsock.malformed), (4, 4), "{vsock:?}");
}

/// This process's resident memory.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// What the flood guest prints: its name line, 256 KiB, its done line.
/// (256 KiB, not more: a port write costs about 10 µs on this project's
/// kvm-pvm hosts, even inside `rep outsb`; the 100 MiB flood goes through
/// the same serial device in `chitin-devices`' unit tests.)
const FLOOD_BYTES: u64 = "chitin-test: flood\n".len() as u64 + (256 << 10) + 12;

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn flood_guest_to_com1_keeps_only_the_capture_limit() {
    if !kvm_available("flood_guest") {
        return;
    }
    let limit = 64 << 10;
    let console = ConsoleCapture::with_limit(limit);
    let before = rss_bytes();
    let reason = run_to_exit(guest_builder(Guest::Flood, &console));
    let grown = rss_bytes().saturating_sub(before);
    // Every byte arrived, through string I/O exits split per byte, and
    // only the last 64 KiB were kept.
    assert_eq!(reason, ExitReason::Reset);
    assert_eq!(console.len(), limit);
    assert_eq!(console.dropped() + limit as u64, FLOOD_BYTES);
    assert!(text(&console).ends_with("xxx\nflood: done\n"));
    // The ring holds at most twice its limit; 64 MiB leaves room for the
    // guest's own RAM, touched as it runs.
    eprintln!(
        "flood guest: capture kept {}, dropped {}, RSS grew {grown} bytes",
        console.len(),
        console.dropped()
    );
    assert!(grown < 64 << 20, "RSS grew by {grown} bytes");
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn flood_guest_to_a_file_stops_at_its_limit_in_few_writes() {
    if !kvm_available("flood_guest_file") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("chitin-flood-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("console.log");
    let limit = 100 << 10;
    let builder = Sandbox::builder()
        .kernel(Guest::Flood.path())
        .memory_mib(64)
        .console(chitin::Console::file_with_limit(&path, limit));
    assert_eq!(run_to_exit(builder), ExitReason::Reset);
    let written = std::fs::read(&path).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let notice = format!("\n[chitin: console output over {limit} bytes; the rest is dropped]\n");
    assert_eq!(written.len() as u64, limit + notice.len() as u64);
    assert!(written.starts_with(b"chitin-test: flood\nxxx"));
    assert!(written.ends_with(notice.as_bytes()));
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn flood_guest_to_a_writer_costs_far_fewer_writes_than_bytes() {
    if !kvm_available("flood_guest_writer") {
        return;
    }
    #[derive(Clone, Default)]
    struct Counting(std::sync::Arc<std::sync::Mutex<(u64, u64)>>);
    impl Write for Counting {
        fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
            let mut c = self.0.lock().unwrap();
            c.0 += 1;
            c.1 += data.len() as u64;
            Ok(data.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let counting = Counting::default();
    let builder = Sandbox::builder()
        .kernel(Guest::Flood.path())
        .memory_mib(64)
        .console(chitin::Console::writer(counting.clone()));
    assert_eq!(run_to_exit(builder), ExitReason::Reset);
    let (writes, bytes) = *counting.0.lock().unwrap();
    eprintln!("flood guest to a writer: {writes} writes for {bytes} bytes");
    assert_eq!(bytes, FLOOD_BYTES);
    // Batches of up to 8 KiB, cut at a newline at most every 20 ms: at a
    // port write per 10 µs, a batch of about 2 KiB or more (a write per
    // byte would be 262 000 writes).
    assert!(writes <= bytes / 1024, "{writes} writes for {bytes} bytes");
}

/// A guest image whose kernel is the report guest (it prints its command
/// line), with a stand-in initramfs; removed when dropped.
struct ReportImage(std::path::PathBuf);

impl ReportImage {
    fn new(tag: &str) -> Self {
        let initrd =
            std::env::temp_dir().join(format!("chitin-initrd-{tag}-{}", std::process::id()));
        std::fs::write(&initrd, [0u8; 512]).unwrap();
        Self(initrd)
    }

    fn image(&self) -> chitin::GuestImage {
        chitin::GuestImage::new(Guest::Report.path(), &self.0)
    }
}

impl Drop for ReportImage {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn cmdline_before_or_after_guest_keeps_the_agent_entry() {
    if !kvm_available("cmdline_guest_order") {
        return;
    }
    let files = ReportImage::new("order");
    for cmdline_first in [true, false] {
        let console = ConsoleCapture::default();
        let mut builder = Sandbox::builder().memory_mib(64);
        if cmdline_first {
            builder = builder.cmdline("console=ttyS0 mine=1").guest(files.image());
        } else {
            builder = builder.guest(files.image()).cmdline("console=ttyS0 mine=1");
        }
        let builder = builder.console(chitin::Console::capture(&console));
        assert_eq!(run_to_exit(builder), ExitReason::Reset);
        let out = text(&console);
        let line = out
            .lines()
            .find(|l| l.starts_with("cmdline: "))
            .unwrap_or_else(|| panic!("no cmdline line: {out}"));
        assert!(line.starts_with("cmdline: console=ttyS0 mine=1 "), "{line}");
        assert!(line.contains(" chitin.agent=1"), "{line}");
    }
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn cmdline_turning_the_agent_off_fails_build() {
    if !kvm_available("cmdline_agent_off") {
        return;
    }
    let files = ReportImage::new("off");
    let result = Sandbox::builder()
        .guest(files.image())
        .cmdline("console=ttyS0 chitin.agent=0")
        .build();
    match result {
        Err(SandboxError::CmdlineConflict { found, needed }) => {
            assert_eq!(
                (found.as_str(), needed),
                ("chitin.agent=0", "chitin.agent=1")
            );
        }
        other => panic!("expected CmdlineConflict, got {:?}", other.err()),
    }
}

/// A sandbox with a network interface, in a network namespace this test
/// makes: the guest's command line carries the interface's settings for
/// the agent and its virtio-mmio window, the sandbox reports one
/// interface's counters, and the tap chitin created is gone once the
/// sandbox is (no tap is leaked).
#[test]
#[ignore = "needs /dev/kvm and root: run with --include-ignored (cargo xtask test does)"]
fn a_network_interface_reaches_the_guest_command_line_and_its_tap_goes_with_the_sandbox() {
    use std::net::Ipv4Addr;

    if !kvm_available("network_interface") {
        return;
    }
    let made = std::thread::spawn(|| {
        // SAFETY: unshare with a flag only; it moves this thread alone
        // into a new network namespace, where the sandbox's threads (made
        // from it) live too.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let tap_exists = || {
            let name = std::ffi::CString::new("chitin-h0").unwrap();
            // SAFETY: a NUL-terminated name alive for the call.
            unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
        };
        let console = ConsoleCapture::default();
        let net = chitin::Net::tap("chitin-h0")
            .mac("02:00:00:00:00:0a".parse().unwrap())
            .address(Ipv4Addr::new(10, 0, 2, 15), 24)
            .gateway(Ipv4Addr::new(10, 0, 2, 1))
            .tx_limit(chitin::RateLimit::bytes_per_second(1 << 20));
        let vm = guest_builder(Guest::Report, &console)
            .cmdline("chitin.test=report quiet")
            .net(net)
            .dns(Ipv4Addr::new(10, 0, 2, 3))
            .build()
            .expect("build")
            .start()
            .expect("start");
        assert!(tap_exists(), "build() did not make the tap");
        assert_eq!(vm.wait_timeout(GUEST_TIMEOUT), Some(ExitReason::Reset));
        assert_eq!(vm.net_stats(), [chitin::NetStats::default()]);
        assert!(vm.device_faults().iter().any(|d| d.device == "eth0"));
        drop(vm);
        let out = text(&console);
        assert!(
            out.contains("chitin.net=02:00:00:00:00:0a,10.0.2.15/24,10.0.2.1"),
            "{out}"
        );
        assert!(out.contains("chitin.dns=10.0.2.3"), "{out}");
        // The DSDT describes the device, not the command line.
        assert!(!out.contains("virtio_mmio.device="), "{out}");
        assert!(!tap_exists(), "the tap outlived its sandbox");
        Ok(())
    })
    .join()
    .expect("the test thread panicked");
    if let Err(e) = made {
        let why = format!("cannot make a network namespace ({e})");
        assert!(
            std::env::var("CHITIN_REQUIRE_KVM").as_deref() != Ok("1"),
            "{why}, but CHITIN_REQUIRE_KVM=1"
        );
        eprintln!("network_interface NOT RUN: {why}");
    }
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn paused_guest_runs_nothing_and_resumes_where_it_stopped() {
    if !kvm_available("pause_resume") {
        return;
    }
    // Arrange
    let console = ConsoleCapture::default();
    let running = start_counting(&console);
    // Act: pause; the console must not move while paused.
    running.pause().unwrap();
    assert!(running.is_paused());
    let frozen = text(&console);
    std::thread::sleep(Duration::from_millis(300));
    let still = text(&console);
    // Pausing a paused sandbox changes nothing.
    running.pause().unwrap();
    running.resume();
    // Assert
    assert_eq!(still, frozen, "the guest ran while paused");
    assert!(!running.is_paused());
    let last = *counted(&frozen).last().unwrap();
    assert!(wait_for_count(&console, last + 3), "{}", text(&console));
    // A second pause, from a handle on another thread, and its resume.
    let handle = running.handle();
    std::thread::spawn(move || {
        handle.pause().unwrap();
        handle.resume();
    })
    .join()
    .unwrap();
    let last = *counted(&text(&console)).last().unwrap();
    assert!(wait_for_count(&console, last + 3), "{}", text(&console));
    // Every number once, in order: no reset, no repeat, no gap.
    let numbers = counted(&text(&console));
    assert_eq!(numbers, (0..numbers.len() as u64).collect::<Vec<_>>());
    assert!(text(&console).starts_with("chitin-test: counter\n"));
    assert_eq!(running.stop(), ExitReason::Stopped);
}

#[test]
#[ignore = "needs /dev/kvm: run with --include-ignored (cargo xtask test does)"]
fn paused_guest_can_be_stopped_and_cannot_be_paused_after() {
    if !kvm_available("pause_stop") {
        return;
    }
    // Arrange: a paused counter, a thread waiting for it to stop.
    let console = ConsoleCapture::default();
    let running = start_counting(&console);
    running.pause().unwrap();
    let handle = running.handle();
    let waiter = {
        let handle = handle.clone();
        std::thread::spawn(move || handle.wait())
    };
    std::thread::sleep(Duration::from_millis(50));
    assert!(!waiter.is_finished(), "a pause is not a stop");
    // Act
    let reason = handle.stop();
    // Assert
    assert_eq!(reason, ExitReason::Stopped);
    assert_eq!(waiter.join().unwrap(), ExitReason::Stopped);
    assert!(!running.is_paused());
    assert_eq!(
        running.pause(),
        Err(chitin::PauseError::GuestStopped(ExitReason::Stopped))
    );
    running.resume();
    assert_eq!(running.stop(), ExitReason::Stopped);
}
