//! Running L1: Debian's cloud kernel under QEMU TCG with nested SVM, its
//! console collected line by line, with three ways to stop a run that
//! will not finish:
//!
//! - L1 that never reaches its /init within [`L1_UP_TIMEOUT`] is retried
//!   once (QEMU TCG with nested SVM hangs early in about 1 boot in 25 on
//!   these machines);
//! - L1 that stops printing for [`SILENCE_LIMIT`] after it came up is
//!   wedged: L1's PID 1 prints a heartbeat every 10 s, so silence means
//!   its kernel no longer runs user space at all. The harness then
//!   diagnoses it ([`diagnose`]: how the host sees QEMU's threads, the
//!   LAPIC and registers from QEMU's monitor, magic SysRq backtraces from
//!   L1's kernel over the serial line), kills QEMU, fails the scenario
//!   that was running, and runs the rest of the plan in a fresh L1 after a
//!   warm-up of its own;
//! - the whole run has a budget.
//!
//! And one way to keep L1 from wedging in the first place: the console
//! keepalive. QEMU 7.2's TCG (Debian 12's; upstream's fix, a qemu-devel
//! series of August 2025, came after bookworm-backports' 10.0) updates a
//! vCPU's `interrupt_request` bits without the big QEMU
//! lock on every nested VMRUN and #VMEXIT (`cs->interrupt_request |=
//! CPU_INTERRUPT_VIRQ` / `&= ~CPU_INTERRUPT_VIRQ` in `svm_helper.c`), while
//! the main loop sets `CPU_INTERRUPT_POLL` from L1's LAPIC timer callback:
//! when the two collide, the POLL request is lost, the timer interrupt sits
//! in the LAPIC's IRR (seen in the monitor: `IRR 236`, one-shot timer
//! expired, `current_count = 0`) and nothing raises it again. L1's one-shot
//! timer never re-arms, its clock events stop, and L1 runs only what needs
//! no timer: a vCPU thread whose L2 spins waiting for another vCPU never
//! yields (the 22-minute freeze at 100 % CPU), a serial-heavy L2 keeps
//! going while L1's heartbeat stops (the `console` run, 2 in 5 before the
//! keepalive). Any later interrupt for that CPU re-evaluates the LAPIC and
//! delivers the lost one, so the harness sends one byte a second to L1's
//! serial line: its receive interrupt repairs a lost timer interrupt
//! within a second. L1's PID 1 reads and discards the bytes, with echo off.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{l1_initramfs, Tools, SILENT_EXIT};
use crate::disks::{self, Disks};
use crate::guest;
use crate::util::{self, cache_dir, Step};

/// How long L1 may take to reach its /init before the run counts as the
/// "L1 printed nothing" flake and is retried once.
pub const L1_UP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often the harness sends L1 a keepalive byte (see the module doc).
const KEEPALIVE: Duration = Duration::from_secs(1);
/// The keepalive byte: any but Ctrl-A, QEMU's mux escape.
const KEEPALIVE_BYTE: u8 = 0;
/// How long an L1 that came up may print nothing (its heartbeat comes
/// every 10 s) before it counts as wedged.
pub const SILENCE_LIMIT: Duration = Duration::from_secs(30);
/// Most fresh L1s one plan may need after wedged ones: a run that keeps
/// wedging L1 is reported, not retried forever.
const MAX_RESTARTS: usize = 3;

/// Pack L1's initramfs with `plan` (one line per run) and boot it with
/// `disks` attached. An L1 that never reached its /init is retried once;
/// one that went silent mid-plan gets its current run failed and the rest
/// of the plan in a fresh L1. Returns the console of every L1, in order.
pub fn boot_l1(tools: &Tools, plan: &[String], disks: &Disks) -> Step<Vec<String>> {
    let serials: Vec<&str> = disks.images.iter().map(|i| i.serial).collect();
    let qemu_disks = disks::qemu_args(disks);
    let mut remaining: Vec<String> = plan.to_vec();
    let mut log = Vec::new();
    let mut restarts = 0;
    let mut never_up_retried = false;
    let finish = |log: Vec<String>| -> Step<Vec<String>> {
        // Every L1's console, in order, in one file.
        let path = nested_dir().join("l1-console.log");
        let _ = util::write_atomic(&path, log.join("\n").as_bytes());
        progress_line(&format!("xtask: L1 console log: {}", path.display()));
        Ok(log)
    };
    loop {
        let initramfs = l1_initramfs(tools, &remaining.join("\n"), &serials)?;
        let budget = plan_budget(&remaining);
        match run_l1(tools, &initramfs, &qemu_disks, budget)? {
            L1Outcome::Ran(lines) => {
                log.extend(lines);
                return finish(log);
            }
            L1Outcome::NeverUp if !never_up_retried => {
                never_up_retried = true;
                eprintln!("xtask: L1 never reached /init; retrying once");
            }
            // After a restart, what ran so far is still worth judging.
            L1Outcome::NeverUp if restarts > 0 => {
                log.push("nested: a fresh L1 never reached /init".to_string());
                return finish(log);
            }
            L1Outcome::NeverUp => return Err("L1 never reached /init, twice".into()),
            L1Outcome::Silent(lines) => {
                let (closed, rest) = after_silence(&remaining, &lines);
                log.extend(lines);
                log.extend(closed);
                restarts += 1;
                if rest.is_empty() {
                    return finish(log);
                }
                if restarts > MAX_RESTARTS {
                    log.push(format!(
                        "nested: L1 went silent {restarts} times; {} runs not run",
                        rest.len()
                    ));
                    return finish(log);
                }
                eprintln!(
                    "xtask: L1 went silent; the remaining {} runs go to a fresh L1",
                    rest.len()
                );
                remaining = with_warm_up(plan, rest, restarts);
            }
        }
    }
}

/// The plan for a fresh L1: a warm-up of its own first (named
/// `warm-up-again-<n>`, which no judge reads), when the original plan
/// began with one, then `rest`.
fn with_warm_up(plan: &[String], rest: Vec<String>, restart: usize) -> Vec<String> {
    let warm_up = plan
        .first()
        .filter(|l| plan_name(l) == "warm-up")
        .and_then(|l| l.split_once('\t'))
        .map(|(_, fields)| format!("warm-up-again-{restart}\t{fields}"));
    warm_up.into_iter().chain(rest).collect()
}

/// The name of a plan line (its first tab-separated field).
fn plan_name(line: &str) -> &str {
    line.split('\t').next().unwrap_or_default()
}

/// The budget of a plan: every run's own timeout (the plan's second
/// field) plus two minutes for L1 itself.
fn plan_budget(plan: &[String]) -> Duration {
    let runs: u64 = plan
        .iter()
        .filter_map(|l| l.split('\t').nth(1)?.parse::<u64>().ok())
        .sum();
    Duration::from_secs(runs + 120)
}

/// After an L1 went silent with console `lines`: the `end` line of the run
/// it was in (judged as [`SILENT_EXIT`]), and the plan lines that never
/// started.
fn after_silence(plan: &[String], lines: &[String]) -> (Vec<String>, Vec<String>) {
    let mut begun = BTreeSet::new();
    let mut ended = BTreeSet::new();
    for line in lines {
        if let Some(name) = line.strip_prefix("nested: begin ") {
            begun.insert(name.trim().to_string());
        } else if let Some(rest) = line.strip_prefix("nested: end ") {
            if let Some(name) = rest.split_whitespace().next() {
                ended.insert(name.to_string());
            }
        }
    }
    let closed: Vec<String> = begun
        .difference(&ended)
        .map(|name| format!("nested: end {name} exit={SILENT_EXIT} ms=0"))
        .collect();
    let rest = plan
        .iter()
        .filter(|l| !begun.contains(plan_name(l)))
        .cloned()
        .collect();
    (closed, rest)
}

/// The L1 kernel and the KVM modules, from Debian's cloud kernel package.
pub struct L1Kernel {
    pub vmlinuz: PathBuf,
    /// irqbypass, kvm, kvm-amd, then virtio-mmio and virtio-blk (for the
    /// disks handed to L1), then tun (for the `net` scenario's tap),
    /// overlay (containerd's snapshotter) and the pod network's bridge,
    /// veth and traffic control, in load order.
    pub modules: Vec<PathBuf>,
    /// Whether the package has vhost-net (for the `net` peer column's
    /// note; the tier runs QEMU with `vhost=off`).
    pub vhost_net: bool,
}

pub fn l1_kernel() -> Step<L1Kernel> {
    let debian = guest::debian_cloud_kernel()?;
    let vmlinuz = debian.vmlinuz.clone();
    let kmod = debian.modules_dir().join("kernel");
    let modules = vec![
        kmod.join("virt/lib/irqbypass.ko"),
        kmod.join("arch/x86/kvm/kvm.ko"),
        kmod.join("arch/x86/kvm/kvm-amd.ko"),
        kmod.join("drivers/virtio/virtio_ring.ko"),
        kmod.join("drivers/virtio/virtio.ko"),
        kmod.join("drivers/virtio/virtio_mmio.ko"),
        kmod.join("drivers/block/virtio_blk.ko"),
        // The `net` scenarios' tap.
        kmod.join("drivers/net/tun.ko"),
        // containerd's overlayfs snapshotter (`shim-ctr`'s image).
        kmod.join("fs/overlayfs/overlay.ko"),
        // The pod network of `shim-ctr`: CNI's bridge and veth, and the
        // shim's traffic-control redirect between the veth and its tap.
        kmod.join("net/llc/llc.ko"),
        kmod.join("net/802/stp.ko"),
        kmod.join("net/bridge/bridge.ko"),
        kmod.join("drivers/net/veth.ko"),
        kmod.join("net/sched/sch_ingress.ko"),
        kmod.join("net/sched/cls_u32.ko"),
        kmod.join("net/sched/act_mirred.ko"),
    ];
    for m in &modules {
        if !m.exists() {
            return Err(format!("L1 kernel package lacks {}", m.display()));
        }
    }
    let vhost_net = kmod.join("drivers/vhost/vhost_net.ko").exists();
    Ok(L1Kernel {
        vmlinuz,
        modules,
        vhost_net,
    })
}

enum L1Outcome {
    /// QEMU exited (or the budget ran out): its whole console.
    Ran(Vec<String>),
    /// L1 never reached its /init.
    NeverUp,
    /// L1 came up, then printed nothing for [`SILENCE_LIMIT`]: its console
    /// up to then and the diagnosis.
    Silent(Vec<String>),
}

/// Where the nested tier's files go.
fn nested_dir() -> PathBuf {
    cache_dir().join("nested")
}

/// Start L1's QEMU: console on a stdio mux (so that the harness can send
/// the keepalive and a BREAK for magic SysRq), monitor on `monitor`,
/// QEMU's own stderr to `stderr`. QEMU dies with the harness.
fn spawn_qemu(
    tools: &Tools,
    initramfs: &Path,
    disks: &[String],
    monitor: &Path,
    stderr: std::fs::File,
) -> Step<Child> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-accel",
        "tcg,thread=multi",
        "-M",
        "microvm",
        "-cpu",
        "EPYC",
    ])
    .args(["-smp", "1", "-m", &format!("{}M", tools.l1_mem_mib)])
    .args(["-nodefaults", "-no-user-config"])
    .args(["-nographic", "-no-reboot"])
    .args(["-chardev", "stdio,id=console,mux=on,signal=off"])
    .args(["-serial", "chardev:console"])
    .arg("-kernel")
    .arg(&tools.l1.vmlinuz)
    .arg("-initrd")
    .arg(initramfs)
    .arg("-append")
    .arg(l1_cmdline())
    .args(disks)
    .arg("-monitor")
    .arg(format!("unix:{},server,nowait", monitor.display()))
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(stderr);
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no
    // memory of the parent; it runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| format!("cannot start qemu-system-x86_64: {e}"))
}

/// A thread that turns QEMU's stdout into lines on a channel.
fn read_console(stdout: ChildStdout) -> (mpsc::Receiver<String>, JoinHandle<()>) {
    let (tx, rx) = mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
            let text = String::from_utf8_lossy(&line)
                .trim_end_matches('\r')
                .to_string();
            if tx.send(text).is_err() {
                break;
            }
        }
    });
    (rx, reader)
}

/// How watching the console ended.
enum Watched {
    /// QEMU closed its console, or `budget` passed (`timed_out`).
    Ended { timed_out: bool },
    /// L1 never printed `nested: l1 up` within [`L1_UP_TIMEOUT`].
    NeverUp,
    /// L1 came up and then printed nothing for [`SILENCE_LIMIT`].
    Silent { quiet_for: Duration },
}

/// Collect console lines into `log` (and the live log) until QEMU closes
/// the console, L1 goes silent or never comes up, or `budget` passes.
fn watch(
    console: &mpsc::Receiver<String>,
    log: &mut Vec<String>,
    live: &mut Option<std::fs::File>,
    budget: Duration,
) -> Watched {
    let start = Instant::now();
    let mut up = false;
    let mut last_line = Instant::now();
    loop {
        let limit = if up { budget } else { L1_UP_TIMEOUT };
        let Some(left) = limit.checked_sub(start.elapsed()) else {
            return if up {
                Watched::Ended { timed_out: true }
            } else {
                Watched::NeverUp
            };
        };
        if up && last_line.elapsed() >= SILENCE_LIMIT {
            return Watched::Silent {
                quiet_for: last_line.elapsed(),
            };
        }
        match console.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(line) => {
                last_line = Instant::now();
                progress(&line, start);
                if let Some(live) = live.as_mut() {
                    let _ = writeln!(live, "{line}");
                }
                up |= line.contains("nested: l1 up");
                log.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return if up {
                    Watched::Ended { timed_out: false }
                } else {
                    Watched::NeverUp
                };
            }
        }
    }
}

/// Boot L1 and collect its console until QEMU exits, L1 goes silent, or
/// `budget` passes.
fn run_l1(tools: &Tools, initramfs: &Path, disks: &[String], budget: Duration) -> Step<L1Outcome> {
    progress_line("xtask: == booting L1 (QEMU TCG, nested SVM)");
    let dir = nested_dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let qemu_log_path = dir.join("qemu-stderr.log");
    let qemu_log = std::fs::File::create(&qemu_log_path)
        .map_err(|e| format!("create {}: {e}", qemu_log_path.display()))?;
    let monitor = monitor_path();
    let _ = std::fs::remove_file(&monitor);
    let mut child = spawn_qemu(tools, initramfs, disks, &monitor, qemu_log)?;
    let Some(stdout) = child.stdout.take() else {
        let _ = child.kill();
        let _ = child.wait();
        return Err("QEMU's stdout is not a pipe".into());
    };
    let (console, reader) = read_console(stdout);
    let stdin = Arc::new(Mutex::new(child.stdin.take()));
    let stop_keepalive = Arc::new(AtomicBool::new(false));
    let keepalive = (std::env::var("CHITIN_NESTED_NO_KEEPALIVE").as_deref() != Ok("1"))
        .then(|| spawn_keepalive(Arc::clone(&stdin), Arc::clone(&stop_keepalive)));
    let mut log = Vec::new();
    // The log is also written as it arrives, for watching an L1 that hangs.
    let mut live = std::fs::File::create(dir.join("l1-console.live.log")).ok();
    let watched = watch(&console, &mut log, &mut live, budget);
    if let Watched::Silent { quiet_for } = watched {
        log.push(format!(
            "nested: l1 silent for {} s; diagnosing",
            quiet_for.as_secs()
        ));
        let diagnosis = diagnose(&child, &stdin, &console, &monitor, &symbol_maps(tools));
        for line in &diagnosis {
            progress_line(&format!("xtask:   {line}"));
        }
        log.extend(diagnosis);
        let _ = util::write_atomic(&dir.join("l1-monitor.log"), log.join("\n").as_bytes());
    }
    stop_keepalive.store(true, Ordering::Relaxed);
    if let Some(thread) = keepalive {
        let _ = thread.join();
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    let _ = std::fs::remove_file(&monitor);
    Ok(match watched {
        Watched::NeverUp => {
            explain_never_up(&qemu_log_path);
            L1Outcome::NeverUp
        }
        Watched::Silent { .. } => L1Outcome::Silent(log),
        Watched::Ended { timed_out } => {
            if timed_out {
                log.push(format!("nested: harness timeout after {budget:?}"));
            }
            L1Outcome::Ran(log)
        }
    })
}

/// Say why L1 may not have come up: what QEMU printed, without TCG's
/// expected "doesn't support requested feature" warnings.
fn explain_never_up(qemu_log_path: &Path) {
    let qemu = std::fs::read_to_string(qemu_log_path).unwrap_or_default();
    let said: Vec<&str> = qemu
        .lines()
        .filter(|l| !l.contains("TCG doesn't support requested feature"))
        .collect();
    eprintln!(
        "xtask: L1 printed nothing within {L1_UP_TIMEOUT:?}{}",
        if said.is_empty() {
            String::new()
        } else {
            format!("; QEMU said: {}", said.join(" | "))
        }
    );
}

/// L1's kernel command line.
///
/// L1 is told the TSC frequency instead of calibrating it. Under TCG the
/// guest TSC is the host's, but Linux measures it against the emulated PIT
/// in a tight timing window, and when the host is busy that fails
/// ("Fast TSC calibration failed"): the TSC is marked unstable and the
/// delay loop is calibrated by waiting for a jiffies tick, a wait that
/// never ended (QEMU's monitor showed the vCPU spinning in
/// `calibrate_delay_converge`). With four busy loops on the host's two
/// cores, 12 of 12 L1 boots hung like that without these options and 6 of
/// 6 came up with them. `tsc=reliable` also turns off the clocksource
/// watchdog, which otherwise compares the TSC with the jiffies of the same
/// loaded emulator and throws it out.
///
/// `sysrq_always_enabled=1` lets the harness ask a wedged L1 for
/// backtraces (Debian enables only the harmless SysRq keys by default);
/// the soft-lockup detector, on in Debian's kernel, prints its own.
///
/// `CHITIN_NESTED_L1_CMDLINE` adds entries for debugging L1 itself, e.g.
/// `loglevel=7`.
fn l1_cmdline() -> String {
    let tsc = match host_tsc_khz() {
        Some(khz) => format!("tsc_early_khz={khz} tsc=reliable"),
        None => String::new(),
    };
    let extra = std::env::var("CHITIN_NESTED_L1_CMDLINE").unwrap_or_default();
    format!("console=ttyS0 reboot=t panic=-1 quiet {tsc} sysrq_always_enabled=1 {extra}")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The host's TSC frequency in kHz, measured against the monotonic clock
/// over 100 ms; `None` where there is no usable TSC.
fn host_tsc_khz() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        // A (TSC, time) pair read close together: retried when something
        // ran in between (more than 50 µs of TSC at any plausible rate).
        fn pair() -> Option<(u64, Instant)> {
            for _ in 0..100 {
                // SAFETY: RDTSC has no memory effects; every x86_64 CPU
                // has it.
                let before = unsafe { std::arch::x86_64::_rdtsc() };
                let now = Instant::now();
                // SAFETY: as above.
                let after = unsafe { std::arch::x86_64::_rdtsc() };
                if after.wrapping_sub(before) < 250_000 {
                    return Some((before / 2 + after / 2, now));
                }
            }
            None
        }
        let (c0, t0) = pair()?;
        std::thread::sleep(Duration::from_millis(100));
        let (c1, t1) = pair()?;
        let ns = t1.duration_since(t0).as_nanos();
        let cycles = u128::from(c1.checked_sub(c0)?);
        let khz = u64::try_from(cycles * 1_000_000 / ns.max(1)).ok()?;
        // Outside 100 MHz..10 GHz the TSC is not one to trust.
        (100_000..10_000_000).contains(&khz).then_some(khz)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// What can be learnt about a wedged L1, in the order that disturbs it
/// least: how the host sees QEMU's threads; the LAPIC and registers from
/// the monitor; whether L1 starts printing again after that monitor
/// request alone (which wakes QEMU's main loop); then SysRq backtraces
/// from L1's kernel; then RIP twice more. Each line starts with `nested:`
/// and the source (`host`, `monitor`, `after-poke`, `sysrq`).
fn diagnose(
    child: &std::process::Child,
    stdin: &Mutex<Option<ChildStdin>>,
    console: &mpsc::Receiver<String>,
    monitor: &Path,
    maps: &[(String, Symbols)],
) -> Vec<String> {
    let mut out: Vec<String> = qemu_threads(child.id())
        .into_iter()
        .map(|l| format!("nested: host {l}"))
        .collect();
    let first = ["info lapic", "info registers"];
    out.extend(
        monitor_dump_within(monitor, &first, maps)
            .into_iter()
            .map(|l| format!("nested: monitor {l}")),
    );
    let resumed = collect_for(console, Duration::from_secs(5));
    out.push(format!(
        "nested: after-poke L1 printed {} lines in the 5 s after the monitor request{}",
        resumed.len(),
        if resumed.is_empty() {
            ""
        } else {
            " (the monitor's wake-up of QEMU's main loop revived it)"
        }
    ));
    out.extend(
        resumed
            .into_iter()
            .map(|l| format!("nested: after-poke {l}")),
    );
    if let Some(stdin) = stdin.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        let answers = sysrq(stdin, console);
        out.push(format!(
            "nested: sysrq answered with {} lines{}",
            answers.len(),
            if answers.is_empty() {
                " (L1's kernel takes no interrupts)"
            } else {
                ""
            }
        ));
        out.extend(answers.into_iter().map(|l| format!("nested: sysrq {l}")));
    }
    let last = [
        "x/12i $pc",
        "info registers",
        "info registers",
        "info lapic",
    ];
    out.extend(
        monitor_dump_within(monitor, &last, maps)
            .into_iter()
            .map(|l| format!("nested: monitor {l}")),
    );
    out
}

/// Send [`KEEPALIVE_BYTE`] to L1's serial line every [`KEEPALIVE`] until
/// `stop` (or QEMU's stdin closes).
fn spawn_keepalive(
    stdin: Arc<Mutex<Option<ChildStdin>>>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(KEEPALIVE);
            let mut guard = stdin.lock().unwrap_or_else(|e| e.into_inner());
            let Some(pipe) = guard.as_mut() else {
                break;
            };
            if pipe
                .write_all(&[KEEPALIVE_BYTE])
                .and_then(|()| pipe.flush())
                .is_err()
            {
                break;
            }
        }
    })
}

/// Console lines that arrive within `wait`.
fn collect_for(console: &mpsc::Receiver<String>, wait: Duration) -> Vec<String> {
    let mut lines = Vec::new();
    let until = Instant::now() + wait;
    while let Some(left) = until.checked_duration_since(Instant::now()) {
        match console.recv_timeout(left) {
            Ok(line) => lines.push(line),
            Err(_) => break,
        }
    }
    lines
}

/// Each thread of process `pid` as the host sees it: name, state, CPU
/// share over one second, and where in the kernel it waits.
fn qemu_threads(pid: u32) -> Vec<String> {
    let task = PathBuf::from(format!("/proc/{pid}/task"));
    let ticks = |tid: &str| -> Option<u64> {
        let stat = std::fs::read_to_string(task.join(tid).join("stat")).ok()?;
        // Fields after the `(comm)`: state is the 1st, utime the 12th,
        // stime the 13th.
        let rest = stat.rsplit_once(')')?.1;
        let f: Vec<&str> = rest.split_whitespace().collect();
        Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
    };
    let tids: Vec<String> = std::fs::read_dir(&task)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let before: Vec<Option<u64>> = tids.iter().map(|t| ticks(t)).collect();
    std::thread::sleep(Duration::from_secs(1));
    let read = |tid: &str, file: &str| {
        std::fs::read_to_string(task.join(tid).join(file))
            .unwrap_or_default()
            .trim()
            .to_string()
    };
    tids.iter()
        .zip(before)
        .map(|(tid, before)| {
            // Clock ticks are 1/100 s on Linux: a delta over 1 s is a
            // percentage.
            let busy = match (before, ticks(tid)) {
                (Some(a), Some(b)) => format!("{}%", b.saturating_sub(a)),
                _ => "?".to_string(),
            };
            let state = read(tid, "stat")
                .rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(str::to_string))
                .unwrap_or_default();
            format!(
                "thread {tid} {:?} state {state} cpu {busy} wchan {}{}",
                read(tid, "comm"),
                read(tid, "wchan"),
                poll_timeout(pid, &read(tid, "syscall"))
                    .map(|t| format!(" (in poll, timeout {t})"))
                    .unwrap_or_default()
            )
        })
        .collect()
}

/// The timeout of the `ppoll` (271) or `poll` (7) a thread of `pid` is
/// blocked in, from its `/proc/<tid>/syscall` line (number, then the
/// arguments in hex) and, for `ppoll`, the timespec in its memory.
fn poll_timeout(pid: u32, syscall: &str) -> Option<String> {
    let f: Vec<&str> = syscall.split_whitespace().collect();
    let arg = |i: usize| u64::from_str_radix(f.get(i)?.trim_start_matches("0x"), 16).ok();
    match *f.first()? {
        "7" => Some(format!("{} ms", arg(3)? as i32)),
        "271" => {
            let tsp = arg(3)?;
            if tsp == 0 {
                return Some("none (forever)".into());
            }
            let mut mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
            let mut raw = [0u8; 16];
            std::io::Seek::seek(&mut mem, std::io::SeekFrom::Start(tsp)).ok()?;
            mem.read_exact(&mut raw).ok()?;
            let sec = i64::from_le_bytes(raw[..8].try_into().ok()?);
            let nsec = i64::from_le_bytes(raw[8..].try_into().ok()?);
            Some(format!("{sec}.{nsec:09} s"))
        }
        _ => None,
    }
}

/// Magic SysRq on L1's console: `9` (print everything), `l` (backtrace of
/// the CPU), `w` (blocked tasks), each after a BREAK, which QEMU's mux
/// sends for Ctrl-A b. Returns what L1 printed in answer (3 s per key).
fn sysrq(stdin: &mut impl Write, console: &mpsc::Receiver<String>) -> Vec<String> {
    let mut answers = Vec::new();
    for key in [b'9', b'l', b'w'] {
        let sent = stdin
            .write_all(&[0x01, b'b'])
            .and_then(|()| stdin.flush())
            .and_then(|()| {
                std::thread::sleep(Duration::from_millis(200));
                stdin.write_all(&[key])
            })
            .and_then(|()| stdin.flush());
        if sent.is_err() {
            break;
        }
        let until = Instant::now() + Duration::from_secs(3);
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match console.recv_timeout(left) {
                Ok(line) => answers.push(line),
                Err(_) => break,
            }
        }
    }
    answers
}

/// The monitor socket of L1's QEMU: `CHITIN_NESTED_MONITOR` if set (to
/// look inside a running L1 by hand: `socat - UNIX-CONNECT:<path>`), else
/// one in the cache.
fn monitor_path() -> PathBuf {
    match std::env::var_os("CHITIN_NESTED_MONITOR") {
        Some(path) if !path.is_empty() => PathBuf::from(path),
        _ => nested_dir().join("qemu-monitor.sock"),
    }
}

/// What the monitor answers to `commands`, with every kernel address
/// symbolised. A second `info registers` comes a second after the first
/// and keeps only RIP (does it move?). Empty lines, prompts and the
/// echoed command are dropped.
fn monitor_dump(path: &Path, commands: &[&str], maps: &[(String, Symbols)]) -> Vec<String> {
    let mut out = Vec::new();
    let mut stream = match UnixStream::connect(path) {
        Ok(stream) => stream,
        Err(e) => {
            return vec![format!(
                "cannot reach the monitor at {}: {e}",
                path.display()
            )]
        }
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = read_available(&mut stream);
    let mut registers_seen = false;
    for command in commands {
        let rip_only = *command == "info registers" && registers_seen;
        if rip_only {
            std::thread::sleep(Duration::from_secs(1));
        }
        registers_seen |= *command == "info registers";
        if writeln!(stream, "{command}").is_err() {
            out.push(format!("monitor closed before `{command}`"));
            break;
        }
        let text = read_available(&mut stream);
        out.push(format!("> {command}"));
        for line in clean_monitor_text(&text) {
            if rip_only && !line.contains("RIP=") {
                continue;
            }
            let symbols = symbolise(&line, maps);
            out.push(line);
            out.extend(symbols);
        }
    }
    out
}

/// Everything the monitor sends until it pauses for half a second (at
/// most 64 KiB).
fn read_available(stream: &mut UnixStream) -> String {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 4096];
    while bytes.len() < 64 << 10 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Monitor output without terminal escapes, prompts, echoed commands and
/// blank lines.
fn clean_monitor_text(text: &str) -> Vec<String> {
    let mut clean = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ params final-byte.
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        if c != '\r' {
            clean.push(c);
        }
    }
    clean
        .lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !l.starts_with("(qemu)") && !l.starts_with("QEMU "))
        // The monitor echoes a command as it is typed: `iininfo...`.
        .filter(|l| !l.starts_with("ii") && !l.starts_with("xx"))
        .map(str::to_string)
        .collect()
}

/// A kernel's `System.map`: sorted text symbols.
#[derive(Clone)]
pub struct Symbols(Vec<(u64, String)>);

impl Symbols {
    /// Read `System.map` lines (`<hex address> <type> <name>`); text
    /// symbols only.
    pub fn parse(text: &str) -> Symbols {
        let mut symbols: Vec<(u64, String)> = text
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let addr = u64::from_str_radix(f.next()?, 16).ok()?;
                let kind = f.next()?;
                let name = f.next()?;
                matches!(kind, "t" | "T" | "w" | "W").then(|| (addr, name.to_string()))
            })
            .collect();
        symbols.sort();
        Symbols(symbols)
    }

    /// `name+0xoffset` of the symbol at or below `addr`, if `addr` is in
    /// this kernel's text (at most 1 MiB past its last symbol).
    pub fn lookup(&self, addr: u64) -> Option<String> {
        let (first, last) = (self.0.first()?, self.0.last()?);
        if addr < first.0 || addr > last.0.saturating_add(1 << 20) {
            return None;
        }
        let i = self.0.partition_point(|(a, _)| *a <= addr).checked_sub(1)?;
        let (base, name) = &self.0[i];
        Some(format!("{name}+{:#x}", addr - base))
    }
}

/// The System.maps to symbolise a dump with: each L2 kernel's. L1 cannot
/// be symbolised here: Debian ships its real System.map only in the `-dbg`
/// package and L1 runs with KASLR; its own SysRq backtraces name L1's
/// functions instead. An address is named under each L2 map, which means
/// something only if the CPU was in that L2 at the time.
fn symbol_maps(tools: &Tools) -> Vec<(String, Symbols)> {
    tools
        .l2_system_maps
        .iter()
        .filter_map(|(version, path)| {
            let text = std::fs::read_to_string(path).ok()?;
            Some((format!("L2 {version} (if in L2)"), Symbols::parse(&text)))
        })
        .collect()
}

/// [`monitor_dump`] on a thread of its own, given up after 20 s: a
/// connect to a monitor whose QEMU no longer serves it can block. The
/// thread ends when QEMU is killed.
fn monitor_dump_within(path: &Path, commands: &[&str], maps: &[(String, Symbols)]) -> Vec<String> {
    let (tx, rx) = mpsc::channel();
    let path = path.to_path_buf();
    let commands: Vec<String> = commands.iter().map(|c| c.to_string()).collect();
    let maps = maps.to_vec();
    std::thread::spawn(move || {
        let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
        let _ = tx.send(monitor_dump(&path, &commands, &maps));
    });
    rx.recv_timeout(Duration::from_secs(20))
        .unwrap_or_else(|_| vec!["the monitor did not answer within 20 s".to_string()])
}

/// For every kernel address (`ffffffff8...`) in `line`, the symbol it
/// falls in under each map that knows it.
fn symbolise(line: &str, maps: &[(String, Symbols)]) -> Vec<String> {
    let mut out = Vec::new();
    for word in line.split(|c: char| !c.is_ascii_hexdigit() && c != 'x') {
        let hex = word.trim_start_matches("0x");
        if hex.len() != 16 || !hex.to_ascii_lowercase().starts_with("ffffffff8") {
            continue;
        }
        let Ok(addr) = u64::from_str_radix(hex, 16) else {
            continue;
        };
        for (label, symbols) in maps {
            if let Some(sym) = symbols.lookup(addr) {
                out.push(format!("    {addr:#x} = {label} {sym}"));
            }
        }
    }
    out
}

/// Progress lines are off for `nested-exec`, whose output is the command's.
pub static QUIET: AtomicBool = AtomicBool::new(false);

pub fn progress_line(line: &str) {
    if !QUIET.load(Ordering::Relaxed) {
        eprintln!("{line}");
    }
}

/// Show a person what is happening while L1 runs (not the heartbeat, nor
/// the long histogram lines, which the console log keeps).
fn progress(line: &str, start: Instant) {
    let t = start.elapsed().as_secs_f64();
    if let Some(rest) = line.strip_prefix("nested: ") {
        if !["marker", "alive", "hist"]
            .iter()
            .any(|k| rest.starts_with(k))
        {
            progress_line(&format!("xtask: [{t:6.1} s] {rest}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn after_silence_closes_the_running_run_and_keeps_the_unstarted() {
        let plan = lines("a\t60\t\t/bin/x\nb\t60\t\t/bin/x\nc\t60\t\t/bin/x");
        let console = lines(
            "nested: l1 up\nnested: begin a\n| ok\nnested: end a exit=0 ms=5\nnested: begin b\n| stuck",
        );

        let (closed, rest) = after_silence(&plan, &console);

        assert_eq!(closed, [format!("nested: end b exit={SILENT_EXIT} ms=0")]);
        assert_eq!(rest, ["c\t60\t\t/bin/x"]);
    }

    #[test]
    fn after_silence_between_runs_closes_nothing() {
        let plan = lines("a\t60\t\t/bin/x\nb\t60\t\t/bin/x");
        let console = lines("nested: begin a\nnested: end a exit=0 ms=5");

        let (closed, rest) = after_silence(&plan, &console);

        assert!(closed.is_empty());
        assert_eq!(rest, ["b\t60\t\t/bin/x"]);
    }

    #[test]
    fn with_warm_up_repeats_the_plans_warm_up_under_a_new_name() {
        let plan = lines("warm-up\t75\tm\t/bin/x\na\t60\t\t/bin/y");
        let fresh = with_warm_up(&plan, lines("a\t60\t\t/bin/y"), 1);
        assert_eq!(fresh, ["warm-up-again-1\t75\tm\t/bin/x", "a\t60\t\t/bin/y"]);
        // A plan without a warm-up (nested-exec) gets none.
        let exec = lines("exec\t300\t\t/bin/chitin-exec");
        assert_eq!(with_warm_up(&exec, exec.clone(), 1), exec);
    }

    #[test]
    fn plan_budget_sums_timeouts_plus_l1() {
        let plan = lines("a\t75\tm\t/bin/x\nb\t195\t\t/bin/y\nbad line");
        assert_eq!(plan_budget(&plan), Duration::from_secs(75 + 195 + 120));
    }

    #[test]
    fn symbols_lookup_finds_enclosing_text_symbol() {
        let map = Symbols::parse(
            "ffffffff81000000 T _text\nffffffff81001000 t do_idle\nffffffff81002000 D some_data\nffffffff81003000 T kvm_run\n",
        );
        assert_eq!(
            map.lookup(0xffff_ffff_8100_1010).as_deref(),
            Some("do_idle+0x10")
        );
        // Data symbols are skipped: 0x...2800 is still in do_idle's span.
        assert_eq!(
            map.lookup(0xffff_ffff_8100_2800).as_deref(),
            Some("do_idle+0x1800")
        );
        assert_eq!(map.lookup(0xffff_ffff_8000_0000), None);
        assert_eq!(map.lookup(0xffff_ffff_9000_0000), None);
    }

    #[test]
    fn symbolise_names_rip_in_each_map() {
        let l1 = Symbols::parse("ffffffff81000000 T l1_start\n");
        let l2 = Symbols::parse("ffffffff81000000 T l2_start\n");
        let maps = vec![("L1".to_string(), l1), ("L2 6.1".to_string(), l2)];

        let out = symbolise("RIP=ffffffff81000040 RFL=00000246", &maps);

        assert_eq!(
            out,
            [
                "    0xffffffff81000040 = L1 l1_start+0x40",
                "    0xffffffff81000040 = L2 6.1 l2_start+0x40"
            ]
        );
    }

    #[test]
    fn poll_timeout_reads_poll_and_ignores_other_syscalls() {
        // poll(fds, nfds, 2500): the third argument is the timeout in ms.
        assert_eq!(
            poll_timeout(1, "7 0x5555 0x3 0x9c4 0x0 0x0 0x0 0x7ffd 0x7f00").as_deref(),
            Some("2500 ms")
        );
        assert_eq!(
            poll_timeout(1, "271 0x5555 0x3 0x0 0x0 0x8 0x0 0x7ffd 0x7f00").as_deref(),
            Some("none (forever)")
        );
        assert_eq!(poll_timeout(1, "202 0x1 0x2 0x3"), None);
        assert_eq!(poll_timeout(1, "running"), None);
    }

    #[test]
    fn clean_monitor_text_drops_escapes_and_prompts() {
        let raw = "QEMU 7.2 monitor - type 'help'\r\n(qemu) info registers\r\n\u{1b}[K\u{1b}[DRAX=0000000000000000\r\n\r\n(qemu) ";
        assert_eq!(clean_monitor_text(raw), ["RAX=0000000000000000"]);
    }
}
