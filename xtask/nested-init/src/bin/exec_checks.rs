//! The nested tier's host-side checks of `Sandbox::exec`/`spawn` and vsock,
//! run inside L1 (where KVM runs Linux) against the default guest:
//!
//! `chitin-exec-checks exec|vsock|net|fs|... KERNEL INITRAMFS` (`net*`:
//! see the `net` module, `fs*`: the `fs` module), and
//! `chitin-exec-checks density KERNEL INITRAMFS N [MIB]` for bench-boot (the
//! `density` module)
//!
//! Each scenario ends with a `device-faults` check: the guest's drivers
//! must not have sent anything the devices refused as malformed (a packet
//! layout the device does not understand shows up there, not only as a
//! stalled stream). Faults are also logged to stderr as they happen.
//!
//! Prints one `chitin-check: <name> PASS|FAIL <detail>` line per check and
//! `chitin-agent: done pass=<n> fail=<m>`; exits 0 only if all passed.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use chitin::{
    Command, ExitStatus, GuestImage, RunningSandbox, Sandbox, SandboxBuilder, Seccomp, Signal,
    Stdio,
};

use chitin_nested_init::kvm_stats;
use chitin_testkit::{fnv1a, Report as Checks, FNV_BASIS, UP_MARKER};

#[path = "exec_checks/containerd.rs"]
mod containerd;
#[path = "exec_checks/cri.rs"]
mod cri;
#[path = "exec_checks/density.rs"]
mod density;
#[path = "exec_checks/fs.rs"]
mod fs;
#[path = "exec_checks/jail.rs"]
mod jail;
#[path = "exec_checks/net.rs"]
mod net;
#[path = "exec_checks/snapshot.rs"]
mod snapshot;

/// The seccomp mode of every sandbox the checks make: `CHITIN_SECCOMP`
/// (`enforce`, `log` or `off`; L1's kernel command line can set it for a
/// whole run), enforce by default.
fn seccomp_mode() -> Seccomp {
    match std::env::var("CHITIN_SECCOMP").as_deref() {
        Ok("log") => Seccomp::Log,
        Ok("off") => Seccomp::Off,
        _ => Seccomp::Enforce,
    }
}

/// The checks' sandbox: the test guest, 2 vCPUs, 256 MiB, the run's
/// seccomp mode.
fn agent_sandbox(kernel: &str, initramfs: &str) -> SandboxBuilder {
    Sandbox::builder()
        .guest(GuestImage::new(kernel, initramfs))
        .vcpus(2)
        .memory_mib(256)
        .seccomp(seccomp_mode())
}

/// The last check of every run: under `Seccomp::Log`, no chitin thread
/// made a syscall outside its filter (under `Enforce` one would have
/// killed this process before it got here).
fn seccomp_check() -> Result<String, String> {
    let mode = seccomp_mode();
    let seen = chitin::seccomp_violations();
    if !seen.is_empty() {
        let list: Vec<String> = seen.iter().map(ToString::to_string).collect();
        return Err(format!("{mode:?}: {}", list.join("; ")));
    }
    Ok(format!("{mode:?}: no syscall outside the filters"))
}

/// The names (or name prefixes) of the threads chitin starts.
const CHITIN_THREADS: &[&str] = &[
    "chitin-vcpu",
    "chitin-events",
    "chitin-fs",
    "chitin-agent-tx",
    "chitin-agent-rx",
    "chitin-stdin",
    "chitin-console",
    "chitin-output",
];

/// While commands run: every thread chitin started runs under a seccomp
/// filter, and the main thread (the embedder's) does not.
fn filtered_threads() -> Result<String, String> {
    let mut names = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").map_err(|e| e.to_string())? {
        let dir = task.map_err(|e| e.to_string())?.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        let name = name.trim();
        let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        let main = dir.file_name() == Some(std::ffi::OsStr::new(&std::process::id().to_string()));
        if main && mode != "0" {
            return Err(format!("the main thread shows Seccomp: {mode}"));
        }
        if !main && CHITIN_THREADS.iter().any(|t| name.starts_with(t)) {
            if mode != "2" && seccomp_mode() != Seccomp::Off {
                return Err(format!("{name} shows Seccomp: {mode}"));
            }
            names.push(name.to_string());
        }
    }
    names.sort();
    names.dedup();
    for kind in [
        "chitin-vcpu0",
        "chitin-events",
        "chitin-agent-rx",
        "chitin-agent-tx",
    ] {
        if !names.iter().any(|n| n == kind) {
            return Err(format!("no {kind} thread among {names:?}"));
        }
    }
    Ok(format!("Seccomp: 2 on {}", names.join(" ")))
}

fn sh(script: &str) -> Command {
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(script);
    cmd
}

/// The guest found chitin's ACPI tables and its kernel log (`dmesg`)
/// has no ACPI error or warning about them.
fn acpi_log(vm: &RunningSandbox) -> Result<String, String> {
    let out = vm
        .exec(&Command::new("dmesg"))
        .map_err(|e| format!("dmesg: {e}"))?;
    let log = String::from_utf8_lossy(&out.stdout);
    let bad = chitin_testkit::acpi_complaints(&log);
    let tables = vm
        .exec(
            Command::new("test")
                .arg("-d")
                .arg("/sys/firmware/acpi/tables"),
        )
        .map_err(|e| format!("test: {e}"))?;
    if tables.status != ExitStatus::Code(0) {
        return Err("the guest found no ACPI tables".into());
    }
    match bad.first() {
        None => Ok(format!(
            "acpi=on complaints=0 ({} log lines)",
            log.lines().count()
        )),
        Some(first) => Err(format!("{} ACPI complaints: {first}", bad.len())),
    }
}

fn exec_checks(vm: &RunningSandbox, c: &mut Checks) {
    let t = Instant::now();
    let first = vm.exec(&Command::new("true"));
    c.result(
        "first-exec",
        first
            .map(|o| {
                format!(
                    "status={:?} ms={} (includes boot)",
                    o.status,
                    t.elapsed().as_millis()
                )
            })
            .map_err(|e| e.to_string()),
    );
    let out = vm.exec(Command::new("echo").arg("hello"));
    c.result(
        "echo",
        match out {
            Ok(o) if o.stdout == b"hello\n" && o.status == ExitStatus::Code(0) => {
                Ok("hello".into())
            }
            other => Err(format!("{other:?}")),
        },
    );
    c.result(
        "exit-code",
        match vm.exec(&sh("exit 3")) {
            Ok(o) if o.status == ExitStatus::Code(3) => Ok("3".into()),
            other => Err(format!("{other:?}")),
        },
    );
    c.result(
        "stderr-separate",
        match vm.exec(&sh("echo out; echo err >&2")) {
            Ok(o) if o.stdout == b"out\n" && o.stderr == b"err\n" => {
                Ok("stdout=out stderr=err".into())
            }
            other => Err(format!("{other:?}")),
        },
    );
    let eight_mib = 8 << 20;
    let expected: Vec<u8> = b"abcdefg\n"
        .iter()
        .copied()
        .cycle()
        .take(eight_mib)
        .collect();
    let t = Instant::now();
    c.result(
        "stdout-8mib",
        match vm.exec(&sh(&format!("yes abcdefg | head -c {eight_mib}"))) {
            Ok(o)
                if o.stdout.len() == eight_mib
                    && fnv1a(FNV_BASIS, &o.stdout) == fnv1a(FNV_BASIS, &expected) =>
            {
                Ok(format!(
                    "8 MiB intact fnv={:016x} in {} ms",
                    fnv1a(FNV_BASIS, &o.stdout),
                    t.elapsed().as_millis()
                ))
            }
            Ok(o) => Err(format!(
                "got {} bytes, status {:?}",
                o.stdout.len(),
                o.status
            )),
            Err(e) => Err(e.to_string()),
        },
    );
    // 8 MiB in and out at once: cat writes before it has read everything,
    // so stdin is fed while stdout is collected.
    let input: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 251) as u8).collect();
    let t = Instant::now();
    c.result(
        "stdin-piped",
        match vm.exec(Command::new("cat").stdin(Stdio::bytes(input.clone()))) {
            Ok(o) if o.stdout == input => Ok(format!(
                "8 MiB through cat intact in {} ms",
                t.elapsed().as_millis()
            )),
            other => Err(format!("{:?}", other.map(|o| o.stdout.len()))),
        },
    );
    let results: Vec<Result<bool, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|i| {
                s.spawn(move || {
                    vm.exec(&sh(&format!("echo {i}")))
                        .map(|o| o.stdout == format!("{i}\n").as_bytes())
                        .map_err(|e| e.to_string())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err("panicked".into())))
            .collect()
    });
    let good = results.iter().filter(|r| matches!(r, Ok(true))).count();
    c.result(
        "concurrent-16",
        if good == 16 {
            Ok("16 of 16".into())
        } else {
            Err(format!("{good} of 16: {results:?}"))
        },
    );
    c.result(
        "kill",
        (|| {
            let mut child = vm
                .spawn(Command::new("sleep").arg("1000"))
                .map_err(|e| e.to_string())?;
            child.kill().map_err(|e| e.to_string())?;
            match child.wait().map_err(|e| e.to_string())? {
                ExitStatus::Signal(Signal::KILL) => Ok("sleep 1000 -> signal 9".to_string()),
                other => Err(format!("{other:?}")),
            }
        })(),
    );
    c.result(
        "kill-stdin-full",
        (|| {
            // sleep never reads its stdin: the writer is pushed back, and
            // the kill must still get through.
            let mut child = vm
                .spawn(Command::new("sleep").arg("1000").stdin(Stdio::piped()))
                .map_err(|e| e.to_string())?;
            let mut stdin = child.stdin.take().ok_or("no stdin")?;
            let writer = std::thread::spawn(move || stdin.write_all(&vec![b'x'; 4 << 20]));
            std::thread::sleep(Duration::from_millis(500));
            if writer.is_finished() {
                return Err("4 MiB went into a process that reads nothing".into());
            }
            child.kill().map_err(|e| e.to_string())?;
            let status = child
                .wait_timeout(Duration::from_secs(20))
                .map_err(|e| e.to_string())?;
            let written = writer.join().map_err(|_| "writer panicked")?;
            match (status, written) {
                (Some(ExitStatus::Signal(Signal::KILL)), Err(e)) => {
                    Ok(format!("writer blocked, kill -> signal 9, writer: {e}"))
                }
                other => Err(format!("{other:?}")),
            }
        })(),
    );
    c.result(
        "unread-child-no-stall",
        (|| {
            // `yes` floods a stdout nobody reads; other commands go on.
            let mut flood = vm.spawn(&Command::new("yes")).map_err(|e| e.to_string())?;
            std::thread::sleep(Duration::from_millis(500));
            let t = Instant::now();
            let out = vm
                .exec(
                    Command::new("echo")
                        .arg("still here")
                        .timeout(Duration::from_secs(20)),
                )
                .map_err(|e| e.to_string());
            let ms = t.elapsed().as_millis();
            let _ = flood.kill();
            let _ = flood.wait_timeout(Duration::from_secs(20));
            match out? {
                o if o.stdout == b"still here\n" => Ok(format!("echo answered in {ms} ms")),
                o => Err(format!("{o:?}")),
            }
        })(),
    );
    c.result(
        "orphans-reaped",
        (|| {
            // Five background sleeps outlive their shell: the kernel hands
            // them to PID 1, the agent, which must reap them when they end.
            let zombies = || -> Result<String, String> {
                let out = vm
                    .exec(&sh(
                        "grep -h '^State:' /proc/[0-9]*/status | grep -c zombie",
                    ))
                    .map_err(|e| e.to_string())?;
                Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
            };
            // A background `sleep 1000` also keeps the shell's stdout open,
            // so its stream stays open after the shell exits.
            let holder = vm
                .spawn(&sh("sleep 1000 & for i in 1 2 3 4 5; do sleep 0.3 & done"))
                .map_err(|e| e.to_string())?;
            std::thread::sleep(Duration::from_millis(1500));
            let left = zombies();
            drop(holder);
            match left?.as_str() {
                "0" => Ok("5 orphaned sleeps and their shell exited, 0 zombies left".into()),
                n => Err(format!("{n} zombies left")),
            }
        })(),
    );
    let exits_before = kvm_stats::exit_counts(std::process::id());
    let mut rtt: Vec<u128> = (0..EXEC_RUNS)
        .filter_map(|_| {
            let t = Instant::now();
            vm.exec(&Command::new("true"))
                .ok()
                .map(|_| t.elapsed().as_micros())
        })
        .collect();
    let exits_after = kvm_stats::exit_counts(std::process::id());
    rtt.sort_unstable();
    let median = rtt.get(rtt.len() / 2).copied();
    // A jailed run (its own mount namespace) sees no debugfs: nothing to
    // count there. Where debugfs is, the counts must be found.
    if kvm_stats::visible() {
        c.result(
            "exec-true-exits",
            match (exits_before, exits_after) {
                (Some(b), Some(a)) => Ok(format!(
                    "L1 KVM exits per exec true (mean of {}): {}",
                    rtt.len(),
                    kvm_stats::growth(&b, &a, rtt.len() as u64)
                )),
                _ => Err("no KVM statistics for this process's VM in debugfs".into()),
            },
        );
    }
    c.result(
        "exec-true-rtt",
        median
            .map(|m| format!("median {} us of {}", m, rtt.len()))
            .ok_or_else(|| "no exec succeeded".to_string()),
    );
    c.result("exec-overhead", exec_overhead(vm, median));
}

/// Execs of `true` timed (and counted) for the round trip.
const EXEC_RUNS: usize = 20;

/// The `exec true` round trip next to the guest's own cost of the same
/// `true`: spawned and reaped by a loop inside the guest (the test agent's
/// `spawn-loop` tool), the floor under any agent.
fn exec_overhead(vm: &RunningSandbox, rtt_us: Option<u128>) -> Result<String, String> {
    let rtt = rtt_us.ok_or("no exec round trip to compare")?;
    let out = vm
        .exec(Command::new("/init").args(["spawn-loop", "20", "true"]))
        .map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out.stdout);
    if out.status != ExitStatus::Code(0) {
        return Err(format!("spawn-loop: {:?}: {text}", out.status));
    }
    let inside: u128 = text
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("median_us="))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no median in {text:?}"))?;
    Ok(format!(
        "exec true round trip median {rtt} us; in the guest, spawn + wait of true median {inside} us; ratio {:.1}",
        rtt as f64 / inside.max(1) as f64
    ))
}

/// Pause and resume under a real guest: a command streaming lines when the
/// pause comes; an exec sent while paused must not finish before the
/// resume; afterwards every line is there and exec works.
fn pause_resume(vm: &RunningSandbox) -> Result<String, String> {
    let lines = 40;
    let child = vm
        .spawn(&sh(&format!(
            "i=0; while [ $i -lt {lines} ]; do echo $i; i=$((i+1)); sleep 0.05; done"
        )))
        .map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    vm.pause().map_err(|e| e.to_string())?;
    let pause_us = t.elapsed().as_micros();
    if !vm.is_paused() {
        return Err("not paused after pause()".into());
    }
    let handle = vm.handle();
    let sent = std::thread::spawn(move || handle.output(Command::new("echo").arg("after")));
    std::thread::sleep(Duration::from_millis(500));
    let early = sent.is_finished();
    let t = Instant::now();
    vm.resume();
    let resume_us = t.elapsed().as_micros();
    if early {
        return Err("an exec finished while the sandbox was paused".into());
    }
    let after = sent
        .join()
        .map_err(|_| "the exec thread panicked".to_string())?
        .map_err(|e| e.to_string())?;
    if after.stdout != b"after\n" {
        return Err(format!("exec sent while paused: {after:?}"));
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let want: String = (0..lines).map(|i| format!("{i}\n")).collect();
    if out.status != ExitStatus::Code(0) || out.stdout != want.as_bytes() {
        return Err(format!(
            "the streaming command across the pause: {:?}, {:?}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        ));
    }
    Ok(format!(
        "paused in {pause_us} us with a command streaming; an exec sent meanwhile waited for the resume ({resume_us} us); all {lines} lines intact"
    ))
}

/// The async face (`chitin::tokio`) on a one-thread runtime: an exec, and
/// a spawned `sleep` killed while its wait is pending.
fn async_exec(vm: &RunningSandbox) -> Result<String, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let sandbox = chitin::tokio::AsyncSandbox::new(vm.handle());
    runtime.block_on(async {
        let t = Instant::now();
        let out = sandbox
            .output(Command::new("echo").arg("async"))
            .await
            .map_err(|e| e.to_string())?;
        if out.stdout != b"async\n" {
            return Err(format!("{out:?}"));
        }
        let ms = t.elapsed().as_millis();
        let child = sandbox
            .spawn(Command::new("sleep").arg("1000"))
            .await
            .map_err(|e| e.to_string())?;
        let (waited, killed) = tokio::join!(child.wait(), async { child.kill() });
        killed.map_err(|e| e.to_string())?;
        match waited {
            Ok(ExitStatus::Signal(Signal::KILL)) => Ok(format!(
                "echo in {ms} ms; sleep killed while its wait was pending -> signal 9"
            )),
            other => Err(format!("wait returned {other:?}")),
        }
    })
}

/// The guest resets while an exec (with no timeout) waits for `sleep
/// 1000`: the exec must end with `GuestStopped` within a second of the
/// VM's stop.
fn reset_mid_command(vm: &RunningSandbox) -> Result<String, String> {
    std::thread::scope(|s| {
        let pending = s.spawn(|| {
            let result = vm.exec(Command::new("sleep").arg("1000"));
            (result, Instant::now())
        });
        std::thread::sleep(Duration::from_millis(500));
        // `reboot -f` restarts the kernel at once (reboot=k: an i8042
        // reset pulse), which stops the VM with `Reset`.
        let reboot = vm.spawn(Command::new("reboot").arg("-f"));
        let deadline = Instant::now() + Duration::from_secs(20);
        while vm.exit_reason().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let stopped = Instant::now();
        let Some(reason) = vm.exit_reason() else {
            return Err(format!(
                "the VM did not stop within 20 s of reboot: {:?}",
                reboot.err()
            ));
        };
        let (result, returned) = pending.join().map_err(|_| "exec thread panicked")?;
        let ms = returned.saturating_duration_since(stopped).as_millis();
        match result {
            Err(chitin::ExecError::GuestStopped(r)) if ms < 1000 => Ok(format!(
                "VM stopped ({reason}); the pending exec returned GuestStopped({r}) after {ms} ms"
            )),
            other => Err(format!(
                "VM stopped ({reason}); exec returned {other:?} after {ms} ms"
            )),
        }
    })
}

/// Control from any thread: one thread waits on a handle, four run
/// `sleep 1000`, and a fifth stops the VM through its own handle. Every
/// exec must end with `GuestStopped(Stopped)` and the waiter with
/// `Stopped`, within a second of the stop.
fn stop_from_handle(vm: &RunningSandbox) -> Result<String, String> {
    let handle = vm.handle();
    std::thread::scope(|s| {
        let waiter = {
            let h = handle.clone();
            s.spawn(move || (h.wait(), Instant::now()))
        };
        let execs: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let result = vm.exec(Command::new("sleep").arg("1000"));
                    (result, Instant::now())
                })
            })
            .collect();
        // Let the four start (each is a running process in the guest).
        std::thread::sleep(Duration::from_millis(1500));
        if !handle.is_running() {
            return Err("the VM stopped by itself".into());
        }
        let stopper = handle.clone();
        let (reason, stopped) = s
            .spawn(move || (stopper.stop(), Instant::now()))
            .join()
            .map_err(|_| "stop thread panicked")?;
        let mut slowest = 0;
        for exec in execs {
            let (result, at) = exec.join().map_err(|_| "exec thread panicked")?;
            let ms = at.saturating_duration_since(stopped).as_millis();
            slowest = slowest.max(ms);
            match result {
                Err(chitin::ExecError::GuestStopped(chitin::ExitReason::Stopped)) if ms < 1000 => {}
                other => return Err(format!("an exec returned {other:?} {ms} ms after the stop")),
            }
        }
        let (waited, at) = waiter.join().map_err(|_| "wait thread panicked")?;
        let wait_ms = at.saturating_duration_since(stopped).as_millis();
        if waited != chitin::ExitReason::Stopped || reason != chitin::ExitReason::Stopped {
            return Err(format!("stop returned {reason}, wait returned {waited}"));
        }
        Ok(format!(
            "stop -> {reason}; 4 pending execs GuestStopped within {slowest} ms, waiter within {wait_ms} ms"
        ))
    })
}

/// Echo server on the host side for guest-initiated connections.
fn host_echo(listener: UnixListener) {
    if let Ok((mut stream, _)) = listener.accept() {
        chitin_testkit::echo(&mut stream);
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }
}

/// `CONNECT <port>` through the vsock device's socket; the stream after OK.
fn host_connect(uds: &Path, port: u32) -> Result<UnixStream, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    chitin_vsock::host::connect(uds, port, deadline).map_err(|e| chitin::error_chain(&e))
}

fn vsock_checks(vm: &RunningSandbox, uds: &Path, c: &mut Checks) {
    // Guest → host: the guest connects to CID 2 port 5000, which chitin
    // connects to <uds>_5000, our echo listener.
    let port_path = PathBuf::from(format!("{}_5000", uds.display()));
    let _ = std::fs::remove_file(&port_path);
    let listener = match UnixListener::bind(&port_path) {
        Ok(l) => l,
        Err(e) => return c.result("guest-to-host", Err(format!("bind: {e}"))),
    };
    let echo = std::thread::spawn(move || host_echo(listener));
    let four_mib = 4u64 << 20;
    let out =
        vm.exec(Command::new("/init").args(["vsock-echo-client", "5000", &four_mib.to_string()]));
    c.result(
        "guest-to-host-4mib",
        match out {
            Ok(o) if o.status.success() => {
                let text = String::from_utf8_lossy(&o.stdout).trim().to_string();
                let ms: u64 = text
                    .rsplit("ms=")
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
                let mbps = if ms > 0 {
                    (2 * four_mib) as f64 / 1e3 / ms as f64
                } else {
                    0.0
                };
                Ok(format!("{text} echo_throughput_MBps={mbps:.1}"))
            }
            other => Err(format!("{other:?}")),
        },
    );
    let _ = echo.join();
    let _ = std::fs::remove_file(&port_path);

    // Host → guest: a guest listener on port 5001 reached through CONNECT.
    c.result(
        "host-to-guest",
        (|| {
            let mut server = vm
                .spawn(Command::new("/init").args(["vsock-echo-server", "5001"]))
                .map_err(|e| e.to_string())?;
            let mut ready = [0u8; 16];
            if let Some(stdout) = server.stdout.as_mut() {
                let _ = stdout.read(&mut ready);
            }
            let mut stream = host_connect(uds, 5001)?;
            let payload: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 253) as u8).collect();
            let before = kvm_stats::exit_counts(std::process::id());
            let t = Instant::now();
            let mut writer = stream.try_clone().map_err(|e| e.to_string())?;
            let data = payload.clone();
            let sender = std::thread::spawn(move || {
                let r = writer.write_all(&data);
                let _ = writer.shutdown(std::net::Shutdown::Write);
                r
            });
            let mut back = Vec::new();
            stream.read_to_end(&mut back).map_err(|e| e.to_string())?;
            let ms = t.elapsed().as_millis().max(1);
            let after = kvm_stats::exit_counts(std::process::id());
            let exits = match (before, after) {
                (Some(b), Some(a)) => kvm_stats::growth(&b, &a, 1),
                _ => "unknown".to_string(),
            };
            sender
                .join()
                .map_err(|_| "sender panicked".to_string())?
                .map_err(|e| e.to_string())?;
            let _ = server.wait_timeout(Duration::from_secs(10));
            if back == payload {
                let mbps = (2 * payload.len()) as f64 / 1e3 / ms as f64;
                Ok(format!(
                    "4 MiB echoed intact in {ms} ms, echo_throughput_MBps={mbps:.1}; L1 KVM exits for it: {exits}"
                ))
            } else {
                Err(format!("echoed {} bytes, differ", back.len()))
            }
        })(),
    );

    // Hundreds of connections open at once: each reaches the agent (port
    // 1024) and completes the protocol handshake while all are open.
    let t = Instant::now();
    c.result(
        "concurrent-200",
        (|| {
            let mut clients = Vec::new();
            for i in 0..200 {
                let stream =
                    host_connect(uds, chitin::AGENT_PORT).map_err(|e| format!("#{i}: {e}"))?;
                clients.push(
                    chitin_agent_client::Client::handshake(stream)
                        .map_err(|e| format!("#{i} handshake: {e}"))?,
                );
            }
            let open = clients.len();
            // While all are open, every tenth runs a command, at once.
            let answered = std::thread::scope(|s| {
                let runs: Vec<_> = clients
                    .iter()
                    .enumerate()
                    .step_by(10)
                    .map(|(i, client)| {
                        s.spawn(move || {
                            let req =
                                chitin_agent_protocol::ExecRequest::new(["echo", &i.to_string()])
                                    .env("PATH", "/bin");
                            client
                                .exec(&req)
                                .is_ok_and(|o| o.stdout == format!("{i}\n").as_bytes())
                        })
                    })
                    .collect();
                runs.into_iter()
                    .filter_map(|h| h.join().ok())
                    .filter(|&ok| ok)
                    .count()
            });
            drop(clients);
            if answered != open / 10 {
                return Err(format!("{answered} of {} execs answered", open / 10));
            }
            Ok(format!(
                "{open} connections open at once, {answered} of them ran echo at once, {} ms",
                t.elapsed().as_millis()
            ))
        })(),
    );

    // A port nobody listens on: a clean refusal, no hang.
    let t = Instant::now();
    c.result(
        "refused-port",
        match chitin_vsock::host::connect(uds, 5999, t + Duration::from_secs(10)) {
            Err(e @ chitin_vsock::host::HostConnectError::Refused { .. }) => {
                Ok(format!("{e} after {} ms", t.elapsed().as_millis()))
            }
            Err(e) => Err(format!("not a refusal: {}", chitin::error_chain(&e))),
            Ok(_) => Err("port 5999 accepted a connection".into()),
        },
    );
}

/// The first checks of a scenario with sandboxes of its own, on its first
/// sandbox: the first exec (timed from `start`, boot included) and the
/// guest's kernel.
fn first_checks(vm: &RunningSandbox, start: Instant, c: &mut Checks) {
    c.result(
        "first-exec",
        guest_kernel(vm)
            .map(|k| format!("{k} in {} ms (includes boot)", start.elapsed().as_millis())),
    );
    c.result("guest-kernel", guest_kernel(vm));
}

/// The guest kernel's release, from `uname -r` in the guest.
fn guest_kernel(vm: &RunningSandbox) -> Result<String, String> {
    match vm.exec(Command::new("uname").arg("-r")) {
        Ok(o) if o.status == ExitStatus::Code(0) && !o.stdout.is_empty() => {
            Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
        }
        other => Err(format!("{other:?}")),
    }
}

/// No device refused anything as malformed; races the protocol allows
/// (a packet for a connection just closed) are reported, not failed.
fn device_faults(vm: &RunningSandbox) -> Result<String, String> {
    let devices = vm.device_faults();
    let summary: Vec<String> = devices
        .iter()
        .map(|d| {
            let reasons: Vec<String> = d.reasons.iter().map(|(r, n)| format!("{r}={n}")).collect();
            format!(
                "{}: {} malformed, {} in all [{}]",
                d.device,
                d.malformed,
                d.total(),
                reasons.join(", ")
            )
        })
        .collect();
    let text = summary.join("; ");
    if devices.is_empty() {
        return Err("the sandbox reports no devices".into());
    }
    if devices.iter().any(|d| d.malformed > 0) {
        return Err(text);
    }
    Ok(text)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(which), Some(kernel), Some(initramfs)) = (args.get(1), args.get(2), args.get(3))
    else {
        eprintln!(
            "usage: chitin-exec-checks exec|vsock|net|net-offload|net-limit|net-reset|fs|fs-escape|fs-ro|fs-bench|container|jail|snapshot|shim-ctr|shim-cri KERNEL INITRAMFS | density KERNEL INITRAMFS N [MIB]"
        );
        std::process::exit(2);
    };
    if which == "jail-inner" {
        // The jailed half of the `jail` scenario: it must enter the jail
        // while this process has one thread.
        chitin::log_to_stderr(log::LevelFilter::Warn);
        std::process::exit(jail::inner(kernel, initramfs));
    }
    if which == "fs-writer" {
        // The child of the `fs` scenario's fsync-then-SIGKILL check.
        let share = args.get(4).map(String::as_str).unwrap_or("/nonexistent");
        std::process::exit(fs::writer(kernel, initramfs, share));
    }
    if which == "density" {
        chitin::log_to_stderr(log::LevelFilter::Warn);
        std::process::exit(density::main(
            kernel,
            initramfs,
            args.get(4).map(String::as_str),
            args.get(5).map(String::as_str),
        ));
    }
    let networked = which == "net";
    if which.starts_with("net") {
        if let Err(e) = net::enter_namespace() {
            Checks::new().check("netns", false, &e);
            std::process::exit(1);
        }
    }
    chitin::log_to_stderr(log::LevelFilter::Warn);
    let own: Option<fn(&str, &str, &mut Checks)> = match which.as_str() {
        "net-offload" => Some(net::offload_checks),
        "net-limit" => Some(net::limit_checks),
        "net-reset" => Some(net::reset_checks),
        "fs" => Some(fs::fs_checks),
        "fs-escape" => Some(fs::escape_checks),
        "fs-ro" => Some(fs::ro_checks),
        "container" => Some(fs::container_checks),
        "fs-bench" => Some(fs::bench_checks),
        "jail" => Some(jail::outer),
        "snapshot" => Some(snapshot::checks),
        "shim-ctr" => Some(containerd::shim_ctr_checks),
        "shim-cri" => Some(cri::shim_cri_checks),
        _ => None,
    };
    if let Some(checks) = own {
        // Sandboxes of their own, one after another.
        println!(
            "{UP_MARKER} version={} scenario={which} (host checks)",
            chitin_agent_protocol::VERSION
        );
        let mut c = Checks::new();
        checks(kernel, initramfs, &mut c);
        c.result("seccomp", seccomp_check());
        c.done();
        std::process::exit(i32::from(c.failed() > 0));
    }
    let uds = PathBuf::from(format!("/tmp/chitin-checks-{which}.vsock"));
    let _ = std::fs::remove_file(&uds);
    let mut builder = agent_sandbox(kernel, initramfs).vsock(3, &uds);
    if networked {
        builder = builder.net(net::interface());
    }
    let built = builder
        .build()
        .map_err(|e| chitin::error_chain(&e))
        .and_then(|s| {
            if networked {
                net::host_side()?;
            }
            s.start().map_err(|e| chitin::error_chain(&e))
        });
    let vm = match built {
        Ok(vm) => vm,
        Err(e) => {
            Checks::new().check("sandbox", false, &e);
            std::process::exit(1);
        }
    };
    println!(
        "{UP_MARKER} version={} scenario={which} (host checks)",
        chitin_agent_protocol::VERSION
    );
    let mut c = Checks::new();
    match which.as_str() {
        "exec" => exec_checks(&vm, &mut c),
        "vsock" => vsock_checks(&vm, &uds, &mut c),
        "net" => {
            // The first exec answers once the guest is up (and timed).
            c.result("first-exec", guest_kernel(&vm));
            let rate = net::checks(&vm, &mut c);
            c.result("net-peer-qemu", net::peer_column(rate, kernel, initramfs));
        }
        other => c.result("scenario", Err(format!("unknown {other}"))),
    }
    if which == "exec" {
        c.result("async-exec", async_exec(&vm));
        c.result("pause-resume", pause_resume(&vm));
    }
    // Which kernel answered, so the harness can tell the guests apart.
    c.result("guest-kernel", guest_kernel(&vm));
    c.result("acpi-log", acpi_log(&vm));
    c.result("device-faults", device_faults(&vm));
    if which == "exec" {
        c.result("seccomp-threads", filtered_threads());
    }
    // Last: the guest is gone after these.
    match which.as_str() {
        "exec" => c.result("reset-mid-command", reset_mid_command(&vm)),
        _ => c.result("stop-from-handle", stop_from_handle(&vm)),
    }
    c.result("seccomp", seccomp_check());
    c.done();
    drop(vm);
    std::process::exit(i32::from(c.failed() > 0));
}
