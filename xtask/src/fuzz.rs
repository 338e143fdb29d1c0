//! `cargo xtask fuzz --smoke [SECONDS]`: run every fuzz target of the
//! separate `fuzz/` workspace under AddressSanitizer on the nightly
//! toolchain, for 25 s each by default, and fail on any crash.
//!
//! Each target starts from seeds written from source ([`crate::fuzz_seeds`])
//! into a fresh `target/fuzz-corpus/<target>`, so the repo holds no binary
//! inputs and a run never dirties the work tree. The executions each target
//! reached are printed.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::util::{cargo, run, workspace_root, Step};

/// The fuzz targets, as named in `fuzz/Cargo.toml`.
pub const TARGETS: &[&str] = &[
    "virtio_mmio",
    "blk_request",
    "vsock_packet",
    "agent_frames",
    "net_tx",
    "net_rx",
    "fs_request",
    "snapshot_state",
];
/// Seconds per target in a smoke run.
const SMOKE_SECONDS: u64 = 25;

fn have_cargo_fuzz() -> bool {
    cargo(&["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Entry point.
pub fn fuzz(args: &[String]) -> Step {
    if args.first().map(String::as_str) != Some("--smoke") {
        return Err("usage: cargo xtask fuzz --smoke [SECONDS]".into());
    }
    let seconds = match args.get(1) {
        Some(s) => s
            .parse()
            .map_err(|_| format!("not a number of seconds: {s}"))?,
        None => SMOKE_SECONDS,
    };
    if !have_cargo_fuzz() {
        run(
            "cargo install cargo-fuzz",
            &mut cargo(&["install", "cargo-fuzz", "--locked"]),
        )?;
    }
    let root = workspace_root();
    let fuzz_dir = root.join("fuzz");
    run(
        "build fuzz targets (nightly, ASan)",
        Command::new("cargo")
            .args(["+nightly", "fuzz", "build", "--sanitizer", "address"])
            .current_dir(&fuzz_dir)
            .env_remove("CARGO"),
    )?;
    let mut summary = Vec::new();
    for target in TARGETS {
        let corpus = root.join("target").join("fuzz-corpus").join(target);
        write_seeds(target, &corpus)?;
        eprintln!("xtask: == fuzz {target} for {seconds} s (ASan, nightly)");
        let out = Command::new("cargo")
            .args(["+nightly", "fuzz", "run", "--sanitizer", "address", target])
            .arg(&corpus)
            .arg("--")
            .arg(format!("-max_total_time={seconds}"))
            // An input running this long is a hang (a guest-driven
            // infinite loop): report it instead of waiting 20 minutes.
            .arg("-timeout=10")
            .arg("-print_final_stats=1")
            .current_dir(&fuzz_dir)
            .env_remove("CARGO")
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| format!("cannot run cargo fuzz: {e}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let execs = log
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .map(|v| v.trim().to_string())
            .unwrap_or_else(|| "?".into());
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            for line in tail.iter().rev() {
                eprintln!("    {line}");
            }
            return Err(format!("fuzz target {target} failed ({})", out.status));
        }
        eprintln!("xtask: ok fuzz {target}: {execs} executions, no crash");
        summary.push(format!("{target}: {execs} executions"));
    }
    eprintln!("xtask: fuzz smoke passed: {}", summary.join(", "));
    Ok(())
}

/// A fresh working corpus holding `target`'s seeds.
fn write_seeds(target: &str, corpus: &Path) -> Step {
    let _ = std::fs::remove_dir_all(corpus);
    std::fs::create_dir_all(corpus).map_err(|e| format!("mkdir {}: {e}", corpus.display()))?;
    for (name, bytes) in crate::fuzz_seeds::seeds(target) {
        let path = corpus.join(name);
        std::fs::write(&path, bytes).map_err(|e| format!("write {}: {e}", path.display()))?;
    }
    Ok(())
}
