//! Developer commands for chitin: `cargo xtask <command>`.
//!
//! - `test`: the project's whole test command (what CI runs): installs what
//!   the tests need if missing, then formatting, lint, docs, unit and
//!   host-KVM tests, and the nested real-Linux tier.
//! - `guest [--kernel 6.1|6.12]`: prepare a guest (kernel + initramfs),
//!   cached.
//! - `nested [SCENARIO...]`: boot real Linux under chitin inside QEMU.
//! - `nested-stress [--runs N] [--spin K] [SCENARIO...]`: the nested tier
//!   N times on a host loaded with K busy loops.
//! - `nested-exec -- CMD...`: run one command in a sandbox inside L1 (for
//!   hosts whose KVM cannot run Linux; the `exec` example uses it).
//! - `bench-boot [--rounds N] [--density N] [--distro debian]`: boot
//!   times, KVM exits and memory of chitin next to QEMU (and Firecracker /
//!   Cloud Hypervisor when `CHITIN_PEER_FIRECRACKER` /
//!   `CHITIN_PEER_CLOUD_HYPERVISOR` name their binaries), interleaved
//!   rounds in one L1, then N sandboxes alive at once in one process.
//! - `fuzz --smoke [SECONDS]`: every fuzz target under ASan, 30 s each.
//! - `shim-install [--root DIR] [--bin-dir DIR]`: install the containerd
//!   shim, the guest it boots and its settings, and add the runtime to
//!   containerd's config (docs/kubernetes.md).
//!
//! Every step prints what it runs; the first failure stops the run with a
//! non-zero exit code naming the step.

mod containerd;
mod cpio;
mod disks;
mod fuzz;
mod fuzz_seeds;
mod guest;
mod nested;
mod shim_install;
mod util;

use std::process::ExitCode;
use std::time::Instant;

use util::{cargo, install_packages, run, Step};

/// Debian packages the host-KVM tests need (gcc/binutils assemble the test
/// guests).
/// Packages the tests need: the test guests' assembler and linker, and
/// `iasl` (acpica-tools), which decompiles chitin's ACPI tables.
const TEST_PACKAGES: &[&str] = &["gcc", "binutils", "acpica-tools"];

/// `cargo xtask rootfs DIR`: a busybox container root in DIR, for
/// `examples/container.rs` (busybox-static from apt provides the binary).
fn rootfs(args: &[String]) -> Result<(), String> {
    let [dir] = args else {
        return Err("usage: cargo xtask rootfs DIR".into());
    };
    util::install_packages(&["busybox-static"])?;
    chitin_testkit::rootfs::busybox_rootfs(
        std::path::Path::new(dir),
        std::path::Path::new("/bin/busybox"),
    )
    .map_err(|e| format!("cannot make a root file system in {dir}: {e}"))?;
    eprintln!("xtask: busybox root file system in {dir}");
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("guest") => guest::guest(&args[1..]),
        Some("nested") => nested::nested(&args[1..]),
        Some("nested-stress") => nested::stress(&args[1..]),
        Some("bench-boot") => nested::bench_boot(&args[1..]),
        Some("fuzz") => fuzz::fuzz(&args[1..]),
        Some("rootfs") => rootfs(&args[1..]),
        Some("shim-install") => shim_install::shim_install(&args[1..]),
        Some("nested-exec") => match nested::nested_exec(&args[1..]) {
            Ok(code) => std::process::exit(code),
            Err(e) => Err(e),
        },
        _ => {
            eprintln!(
                "usage: cargo xtask <test | guest [--kernel 6.1|6.12 | --distro debian] | nested [SCENARIO...] | nested-stress [--runs N] [--spin K] [SCENARIO...] | nested-exec [--distro debian] -- CMD... | bench-boot [--rounds N] [--density N] [--distro debian] | fuzz --smoke [SECONDS] | rootfs DIR | shim-install [--root DIR] [--bin-dir DIR]>"
            );
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Rounds of `bench-boot` in the test command, and sandboxes of its
/// density run.
const CI_BENCH_ROUNDS: usize = 3;
const CI_BENCH_DENSITY: usize = 6;

fn test() -> Step {
    let start = Instant::now();
    install_packages(TEST_PACKAGES)?;
    run(
        "cargo fmt --check",
        &mut cargo(&["fmt", "--all", "--check"]),
    )?;
    run(
        "cargo clippy",
        &mut cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--all-features",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    run(
        "cargo doc",
        cargo(&["doc", "--workspace", "--no-deps", "--all-features"])
            .env("RUSTDOCFLAGS", "-D warnings"),
    )?;
    run(
        "unit tests (host-KVM tests listed as ignored)",
        &mut cargo(&["test", "--workspace", "--all-targets", "--all-features"]),
    )?;
    // The host-KVM tests are `#[ignore = "needs /dev/kvm"]`: a run without
    // KVM shows them as not run, never as passed.
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => run(
            "host-KVM tests",
            cargo(&[
                "test",
                "--workspace",
                "--tests",
                "--all-features",
                "--",
                "--ignored",
            ])
            .env("CHITIN_REQUIRE_KVM", "1"),
        )?,
        Err(e) if std::env::var("CHITIN_REQUIRE_KVM").as_deref() == Ok("1") => {
            return Err(format!(
                "host-KVM tests: /dev/kvm is not usable ({e}), but CHITIN_REQUIRE_KVM=1"
            ));
        }
        Err(e) => eprintln!("xtask: host-KVM tests NOT RUN: /dev/kvm is not usable ({e})"),
    }
    run(
        "doc tests",
        &mut cargo(&["test", "--workspace", "--doc", "--all-features"]),
    )?;
    fuzz::fuzz(&["--smoke".to_string()])?;
    let nested_start = Instant::now();
    eprintln!("xtask: == nested real-Linux tier");
    if let Err(why) = nested::prerequisites() {
        if std::env::var("CHITIN_REQUIRE_KVM").as_deref() == Ok("1") {
            return Err(format!("nested tier prerequisites: {why}"));
        }
        eprintln!("xtask: nested tier skipped: cannot install QEMU and tools: {why}");
    } else {
        nested::nested(&[])?;
        eprintln!(
            "xtask: ok nested tier ({:.0} s)",
            nested_start.elapsed().as_secs_f64()
        );
        // The peer table runs in CI too (peers only where the environment
        // names them), with fewer rounds than a measurement wants.
        let bench_start = Instant::now();
        nested::bench_boot(&[
            "--rounds".to_string(),
            CI_BENCH_ROUNDS.to_string(),
            "--density".to_string(),
            CI_BENCH_DENSITY.to_string(),
        ])?;
        eprintln!(
            "xtask: ok bench-boot ({:.0} s)",
            bench_start.elapsed().as_secs_f64()
        );
    }
    eprintln!(
        "xtask: all test steps passed in {:.0} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
