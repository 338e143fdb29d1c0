//! Developer commands for chitin: `cargo xtask <command>`.
//!
//! - `test`: the project's whole test command (what CI runs): installs the
//!   Debian packages the tests need if they are missing, then runs
//!   formatting, lint, documentation and every test tier available.
//!
//! Every step prints what it runs; the first failure stops the run with a
//! non-zero exit code naming the step.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Instant;

/// Debian packages the test suite needs, with a binary that proves each is
/// installed.
const TEST_PACKAGES: &[(&str, &str)] = &[("gcc", "gcc"), ("binutils", "ld")];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(),
        Some("install-deps") => install_packages(TEST_PACKAGES),
        _ => {
            eprintln!("usage: cargo xtask <test | install-deps>");
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

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

fn have(binary: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {binary} >/dev/null 2>&1")])
        .status()
        .is_ok_and(|s| s.success())
}

/// Install the missing packages with apt-get (idempotent: present ones are
/// skipped without touching the network).
fn install_packages(packages: &[(&str, &str)]) -> Result<(), String> {
    let missing: Vec<&str> = packages
        .iter()
        .filter(|(_, bin)| !have(bin))
        .map(|(pkg, _)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    println!("xtask: installing {}", missing.join(" "));
    run(
        "apt-get update",
        Command::new("apt-get").args(["update", "-q"]),
    )?;
    run(
        "apt-get install",
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing),
    )
}

fn run(step: &str, cmd: &mut Command) -> Result<(), String> {
    let start = Instant::now();
    println!("xtask: == {step}");
    let status = cmd
        .status()
        .map_err(|e| format!("{step}: cannot run: {e}"))?;
    if !status.success() {
        return Err(format!("{step}: {status}"));
    }
    println!("xtask: ok {step} ({:.1} s)", start.elapsed().as_secs_f64());
    Ok(())
}

fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args).current_dir(workspace_root());
    cmd
}

fn test() -> Result<(), String> {
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
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    run(
        "cargo doc",
        cargo(&["doc", "--workspace", "--no-deps"]).env("RUSTDOCFLAGS", "-D warnings"),
    )?;
    run(
        "unit and host-KVM tests",
        &mut cargo(&["test", "--workspace", "--all-targets"]),
    )?;
    run("doc tests", &mut cargo(&["test", "--workspace", "--doc"]))?;
    println!(
        "xtask: all test steps passed in {:.0} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
