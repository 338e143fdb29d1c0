//! `cargo xtask nested [SCENARIO...]`: the real-Linux tier.
//!
//! QEMU in software emulation (TCG, `-cpu EPYC` with SVM and nested paging)
//! runs an L1 Debian cloud kernel that loads `kvm_amd` and gets a real
//! `/dev/kvm`. chitin's `boot` example runs in L1 and boots an unmodified L2
//! Linux (the default guest from `cargo xtask guest`), whose PID 1 is
//! `chitin-agent` running the scenario named on its command line. L1's PID 1
//! (`chitin-nested-init`) runs the scenarios and reports on the serial
//! console; this module builds everything, runs QEMU with hard timeouts and
//! judges each scenario from that log.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chitin_agent::protocol::VERSION as AGENT_VERSION;

use crate::cpio::Cpio;
use crate::disks::{self, Disks};
use crate::guest;
use crate::util::{self, cache_dir, install_packages, output, Step};

/// Packages the tier needs on the host.
const PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "cpio", "e2fsprogs"];
/// The meta package whose dependency names the current cloud kernel.
const L1_KERNEL_META: &str = "linux-image-cloud-amd64";
/// L2 command line shared by every chitin scenario: console on COM1, reset
/// through the i8042 on reboot, reboot at once on panic, quiet boot.
const L2_BASE_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet";
/// The agent's "up" line: VMM start → this line is the boot figure.
const UP_MARKER: &str = "chitin-agent: up";
/// How long L1 may take to reach its /init before the run counts as the
/// known "L1 printed nothing" flake and is retried once.
const L1_UP_TIMEOUT: Duration = Duration::from_secs(30);

/// A scenario: how to run it and how to judge it.
struct Scenario {
    name: &'static str,
    vcpus: u32,
    mem_mib: u32,
    timeout_s: u32,
    /// Run the peer (QEMU microvm) instead of chitin.
    peer: bool,
    /// Run `chitin-exec-checks <this>` in L1 (host-side checks through the
    /// library, against the agent guest) instead of the `boot` example.
    host_checks: Option<&'static str>,
    /// chitin `--disk` values, in L2 order; `@serial` stands for the L1
    /// block device of that image (see [`disks`]).
    disks: &'static [&'static str],
    judge: fn(&Run, &Disks) -> Result<String, String>,
}

const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "boot",
        vcpus: 2,
        mem_mib: 256,
        timeout_s: 60,
        peer: false,
        host_checks: None,
        disks: &[],
        judge: judge_checks,
    },
    Scenario {
        name: "boot-qemu",
        vcpus: 2,
        mem_mib: 256,
        timeout_s: 60,
        peer: true,
        host_checks: None,
        disks: &[],
        judge: judge_checks,
    },
    Scenario {
        name: "reset",
        vcpus: 1,
        mem_mib: 128,
        timeout_s: 60,
        peer: false,
        host_checks: None,
        disks: &[],
        judge: judge_checks,
    },
    Scenario {
        name: "panic",
        vcpus: 1,
        mem_mib: 128,
        timeout_s: 60,
        peer: false,
        host_checks: None,
        disks: &[],
        judge: judge_panic,
    },
    Scenario {
        name: "console",
        vcpus: 1,
        mem_mib: 128,
        timeout_s: 240,
        peer: false,
        host_checks: None,
        disks: &[],
        judge: judge_console,
    },
    Scenario {
        name: "smp4",
        vcpus: 4,
        mem_mib: 256,
        timeout_s: 90,
        peer: false,
        host_checks: None,
        disks: &[],
        judge: judge_checks,
    },
    Scenario {
        name: "blk",
        vcpus: 1,
        mem_mib: 128,
        timeout_s: 60,
        peer: false,
        host_checks: None,
        disks: &["@blk"],
        judge: judge_blk,
    },
    Scenario {
        name: "blk-ro",
        vcpus: 1,
        mem_mib: 128,
        timeout_s: 60,
        peer: false,
        host_checks: None,
        disks: &["@ro,ro"],
        judge: judge_checks,
    },
    Scenario {
        name: "blk-integrity",
        vcpus: 1,
        mem_mib: 192,
        timeout_s: 240,
        peer: false,
        host_checks: None,
        disks: &["@ro,ro", "@integrity"],
        judge: judge_integrity,
    },
    Scenario {
        name: "blk-discard",
        vcpus: 1,
        mem_mib: 128,
        timeout_s: 60,
        peer: false,
        host_checks: None,
        disks: &["@discard"],
        judge: judge_discard,
    },
    Scenario {
        name: "exec",
        vcpus: 2,
        mem_mib: 256,
        timeout_s: 180,
        peer: false,
        host_checks: Some("exec"),
        disks: &[],
        judge: judge_host_checks,
    },
    Scenario {
        name: "vsock",
        vcpus: 2,
        mem_mib: 256,
        timeout_s: 180,
        peer: false,
        host_checks: Some("vsock"),
        disks: &[],
        judge: judge_host_checks,
    },
];

/// What one scenario produced in the L1 log.
#[derive(Default)]
struct Run {
    /// The scenario's agent name (`boot` for `boot-qemu`).
    agent_scenario: String,
    /// The L2 command line passed.
    cmdline: String,
    /// Console lines of the child (`| ` prefix removed) and its stderr.
    lines: Vec<String>,
    marker_ms: Option<u64>,
    console: Option<String>,
    exit: Option<String>,
    ms: Option<u64>,
}

impl Run {
    fn has(&self, needle: &str) -> bool {
        self.lines.iter().any(|l| l.contains(needle))
    }
}

fn agent_scenario(s: &Scenario) -> &'static str {
    match s.name {
        "warm-up" => "reset",
        name => name.strip_suffix("-qemu").unwrap_or(name),
    }
}

fn l2_cmdline(s: &Scenario) -> String {
    let reboot = if s.peer {
        // QEMU's microvm has no i8042: stop through a triple fault.
        "console=ttyS0 reboot=t panic=-1 quiet"
    } else {
        L2_BASE_CMDLINE
    };
    // CHITIN_NESTED_EXTRA_CMDLINE adds entries for debugging a run, e.g.
    // `loglevel=8 printk.time=1` to see where boot time goes.
    let extra = std::env::var("CHITIN_NESTED_EXTRA_CMDLINE").unwrap_or_default();
    format!(
        "{reboot} chitin.scenario={} chitin.expect_cpus={} chitin.expect_mem_mib={} {extra}",
        agent_scenario(s),
        s.vcpus,
        s.mem_mib
    )
    .trim_end()
    .to_string()
}

/// The plan line for L1's runner: name, timeout, marker, argv (tab separated).
fn plan_line(run_name: &str, s: &Scenario) -> String {
    let cmdline = l2_cmdline(s);
    let argv: Vec<String> = if let Some(which) = s.host_checks {
        ["/bin/chitin-exec-checks", which, "/l2"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else if s.peer {
        [
            "/usr/bin/qemu-system-x86_64",
            "-M",
            "microvm,acpi=off,rtc=on",
            "-enable-kvm",
            "-cpu",
            "host",
            "-smp",
            &s.vcpus.to_string(),
            "-m",
            &format!("{}M", s.mem_mib),
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            "-no-reboot",
            "-L",
            "/usr/share/qemu",
            "-kernel",
            "/l2/vmlinux",
            "-initrd",
            "/l2/initramfs.cpio",
            "-append",
            &cmdline,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    } else {
        [
            "/bin/chitin-boot",
            "--kernel",
            "/l2/vmlinux",
            "--initrd",
            "/l2/initramfs.cpio",
            "--vcpus",
            &s.vcpus.to_string(),
            "--mem",
            &s.mem_mib.to_string(),
            "--timeout",
            &s.timeout_s.to_string(),
            "--cmdline",
            &cmdline,
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(
            s.disks
                .iter()
                .flat_map(|d| ["--disk".to_string(), d.to_string()]),
        )
        .collect()
    };
    // The runner's own timeout is a little longer than the VMM's, so the
    // VMM's timeout (a clean stop) fires first.
    // Host checks time VMM start to the first exec's answer instead.
    let marker = if s.host_checks.is_some() {
        "chitin-check: first-exec"
    } else {
        UP_MARKER
    };
    format!(
        "{run_name}\t{}\t{marker}\t{}",
        s.timeout_s + 15,
        argv.join("\t")
    )
}

/// Install what the tier needs on the host (idempotent).
pub fn prerequisites() -> Step {
    install_packages(PACKAGES)
}

/// Entry point.
pub fn nested(args: &[String]) -> Step {
    let selected = select(args)?;
    prerequisites()?;
    let tools = build_tools()?;
    let runs = schedule(&selected);
    let plan: Vec<String> = runs.iter().map(|(name, s)| plan_line(name, s)).collect();
    let disks = disks::create(&cache_dir().join("nested").join("disks"))?;
    let total: u64 = runs.iter().map(|(_, s)| u64::from(s.timeout_s) + 15).sum();
    let log = boot_l1(
        &tools,
        &plan.join("\n"),
        &disks,
        Duration::from_secs(total + 120),
    )?;
    report(&selected, &runs, &log, &disks)
}

/// Everything L1 needs, built and fetched.
struct Tools {
    image: guest::GuestImage,
    boot: PathBuf,
    exec: PathBuf,
    checks: PathBuf,
    init: PathBuf,
    l1: L1Kernel,
}

fn build_tools() -> Step<Tools> {
    Ok(Tools {
        image: guest::prepare()?,
        boot: guest::build_static(&["-p", "chitin", "--example", "boot"], "boot")?,
        exec: guest::build_static(&["-p", "chitin", "--example", "exec"], "exec")?,
        checks: guest::build_static(
            &["-p", "chitin-nested-init", "--bin", "chitin-exec-checks"],
            "chitin-exec-checks",
        )?,
        init: guest::build_static(
            &["-p", "chitin-nested-init", "--bin", "chitin-nested-init"],
            "chitin-nested-init",
        )?,
        l1: l1_kernel()?,
    })
}

/// Pack L1's initramfs with `plan` and boot it with `disks` attached;
/// retry once a run whose L1 never reached its /init.
fn boot_l1(tools: &Tools, plan: &str, disks: &Disks, budget: Duration) -> Step<Vec<String>> {
    let serials: Vec<&str> = disks.images.iter().map(|i| i.serial).collect();
    let initramfs = l1_initramfs(tools, plan, &serials)?;
    let qemu_disks = disks::qemu_args(disks);
    match run_l1(&tools.l1.vmlinuz, &initramfs, &qemu_disks, budget)? {
        L1Outcome::Ran(log) => Ok(log),
        L1Outcome::NeverUp => {
            eprintln!("xtask: L1 never reached /init; retrying once");
            match run_l1(&tools.l1.vmlinuz, &initramfs, &qemu_disks, budget)? {
                L1Outcome::Ran(log) => Ok(log),
                L1Outcome::NeverUp => Err("L1 never reached /init, twice".into()),
            }
        }
    }
}

/// How long a command run through `nested-exec` may take, L2 boot included.
const NESTED_EXEC_TIMEOUT_S: u64 = 300;

/// `cargo xtask nested-exec -- CMD [ARG...]`: run one command in a sandbox
/// inside L1 (for hosts whose KVM cannot run Linux). The command's stdout
/// and stderr are printed as they came; returns its exit code.
pub fn nested_exec(args: &[String]) -> Step<i32> {
    let argv: Vec<&String> = args.iter().skip_while(|a| *a == "--").collect();
    if argv.is_empty() {
        return Err("usage: cargo xtask nested-exec -- CMD [ARG...]".into());
    }
    if let Some(bad) = argv.iter().find(|a| a.contains(['\t', '\n'])) {
        return Err(format!(
            "arguments cannot contain tabs or newlines: {bad:?}"
        ));
    }
    // Preparing prints only what fails or takes long: the output is the
    // command's.
    util::set_quiet(true);
    QUIET.store(true, Ordering::Relaxed);
    prerequisites()?;
    let tools = build_tools()?;
    let mut plan = format!(
        "exec\t{NESTED_EXEC_TIMEOUT_S}\t\t/bin/chitin-exec\t--guest-dir\t/l2\t--timeout\t{}\t--",
        NESTED_EXEC_TIMEOUT_S - 10
    );
    for arg in &argv {
        plan.push('\t');
        plan.push_str(arg);
    }
    let disks = Disks {
        images: Vec::new(),
        discard_allocated_before: 0,
    };
    let log = boot_l1(
        &tools,
        &plan,
        &disks,
        Duration::from_secs(NESTED_EXEC_TIMEOUT_S + 120),
    )?;
    let mut code = None;
    let mut inside = false;
    for line in &log {
        if line == "nested: begin exec" {
            inside = true;
        } else if let Some(rest) = line.strip_prefix("nested: end exec ") {
            let exit = rest
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix("exit="));
            code = exit.and_then(|e| e.parse::<i32>().ok());
            inside = false;
        } else if inside {
            if let Some(out) = line.strip_prefix("| ") {
                println!("{out}");
            } else if let Some(err) = line.strip_prefix("! ") {
                eprintln!("{err}");
            }
        }
    }
    code.ok_or_else(|| "the nested sandbox did not report an exit code".to_string())
}

/// Runs of `boot` and `boot-qemu`, interleaved, whose median is reported:
/// one run each would let noise or order decide the comparison.
const BOOT_REPEATS: usize = 3;

/// The warm-up run: the first VMM started in a fresh L1 pays a one-time
/// cost (MACHINES.md), which must not land on a measured scenario.
const WARMUP: Scenario = Scenario {
    name: "warm-up",
    vcpus: 1,
    mem_mib: 128,
    timeout_s: 60,
    peer: false,
    host_checks: None,
    disks: &[],
    judge: judge_checks,
};

/// The ordered runs: a warm-up, then each scenario, with `boot` and its
/// peer interleaved [`BOOT_REPEATS`] times.
fn schedule(selected: &[&'static Scenario]) -> Vec<(String, &'static Scenario)> {
    let mut runs = vec![(WARMUP.name.to_string(), &WARMUP)];
    let peer = selected.iter().find(|s| s.peer);
    for s in selected.iter().filter(|s| !s.peer) {
        if s.name == "boot" {
            for k in 1..=BOOT_REPEATS {
                runs.push((format!("boot#{k}"), *s));
                if let Some(p) = peer {
                    runs.push((format!("{}#{k}", p.name), *p));
                }
            }
        } else {
            runs.push((s.name.to_string(), *s));
        }
    }
    runs
}

fn select(args: &[String]) -> Step<Vec<&'static Scenario>> {
    if args.is_empty() {
        return Ok(SCENARIOS.iter().collect());
    }
    let mut names: BTreeSet<&str> = BTreeSet::new();
    for a in args {
        if !SCENARIOS.iter().any(|s| s.name == a) {
            let known: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
            return Err(format!(
                "unknown scenario {a:?}; known: {}",
                known.join(" ")
            ));
        }
        names.insert(a);
        if a == "boot" {
            // The peer column always runs next to chitin's boot.
            names.insert("boot-qemu");
        }
    }
    Ok(SCENARIOS
        .iter()
        .filter(|s| names.contains(s.name))
        .collect())
}

/// The L1 kernel and the KVM modules, from Debian's cloud kernel package.
struct L1Kernel {
    vmlinuz: PathBuf,
    /// irqbypass, kvm, kvm-amd, then virtio-mmio and virtio-blk (for the
    /// disks handed to L1), in load order.
    modules: Vec<PathBuf>,
}

fn l1_kernel() -> Step<L1Kernel> {
    let deps = output(Command::new("apt-cache").args(["depends", L1_KERNEL_META]))?;
    let package = match deps
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-"))
    {
        Some(p) => p.trim().to_string(),
        None => {
            util::run(
                "apt-get update",
                Command::new("apt-get").args(["update", "-q"]),
            )?;
            let deps = output(Command::new("apt-cache").args(["depends", L1_KERNEL_META]))?;
            deps.lines()
                .filter_map(|l| l.trim().strip_prefix("Depends: "))
                .find(|p| p.starts_with("linux-image-"))
                .map(|p| p.trim().to_string())
                .ok_or_else(|| format!("apt-cache names no kernel for {L1_KERNEL_META}"))?
        }
    };
    let version = package.trim_start_matches("linux-image-").to_string();
    let dir = cache_dir().join("l1").join(&package);
    let root = dir.join("root");
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{version}"));
    if !vmlinuz.exists() {
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        util::run(
            &format!("apt-get download {package}"),
            Command::new("apt-get")
                .args(["download", &package])
                .current_dir(&dir),
        )?;
        let deb = std::fs::read_dir(&dir)
            .map_err(|e| format!("read {}: {e}", dir.display()))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or("apt-get download produced no .deb")?;
        util::run(
            "unpack L1 kernel",
            Command::new("dpkg").arg("-x").arg(&deb).arg(&root),
        )?;
        let _ = std::fs::remove_file(&deb);
    }
    let kmod = root.join("lib/modules").join(&version).join("kernel");
    let modules = vec![
        kmod.join("virt/lib/irqbypass.ko"),
        kmod.join("arch/x86/kvm/kvm.ko"),
        kmod.join("arch/x86/kvm/kvm-amd.ko"),
        kmod.join("drivers/virtio/virtio_ring.ko"),
        kmod.join("drivers/virtio/virtio.ko"),
        kmod.join("drivers/virtio/virtio_mmio.ko"),
        kmod.join("drivers/block/virtio_blk.ko"),
    ];
    for m in &modules {
        if !m.exists() {
            return Err(format!("L1 kernel package lacks {}", m.display()));
        }
    }
    Ok(L1Kernel { vmlinuz, modules })
}

/// Adds files at absolute paths, creating parent directories once.
struct Tree {
    cpio: Cpio,
    dirs: BTreeSet<String>,
}

impl Tree {
    fn dirs_for(&mut self, path: &str) {
        let mut prefix = String::new();
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            if self.dirs.insert(prefix.clone()) {
                self.cpio.dir(&prefix);
            }
        }
    }

    fn file(&mut self, path: &str, mode: u32, host: &Path) -> Step {
        self.dirs_for(path);
        self.cpio
            .file_from(path.trim_start_matches('/'), mode, host)
    }

    fn data(&mut self, path: &str, body: &[u8]) {
        self.dirs_for(path);
        self.cpio.file(path.trim_start_matches('/'), 0o644, body);
    }
}

/// Shared libraries a dynamic binary needs, as absolute paths (`ldd`).
fn shared_libraries(binary: &str) -> Step<Vec<String>> {
    let text = output(Command::new("ldd").arg(binary))?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let l = l.trim();
            let path = match l.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_string())
        })
        .collect())
}

fn l1_initramfs(tools: &Tools, plan: &str, serials: &[&str]) -> Step<PathBuf> {
    let (l1, image) = (&tools.l1, &tools.image);
    let mut tree = Tree {
        cpio: Cpio::new(),
        dirs: BTreeSet::new(),
    };
    for dir in ["dev", "proc", "sys", "tmp", "bin"] {
        tree.dirs.insert(dir.to_string());
        tree.cpio.dir(dir);
    }
    tree.cpio.char_dev("dev/console", 5, 1);
    tree.file("/init", 0o755, &tools.init)?;
    tree.file("/bin/chitin-boot", 0o755, &tools.boot)?;
    tree.file("/bin/chitin-exec", 0o755, &tools.exec)?;
    tree.file("/bin/chitin-exec-checks", 0o755, &tools.checks)?;
    tree.file("/l2/vmlinux", 0o644, &image.kernel)?;
    tree.file("/l2/initramfs.cpio", 0o644, &image.initramfs)?;
    let mut order = String::new();
    for m in &l1.modules {
        let name = m.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        tree.file(&format!("/nested/modules/{name}"), 0o644, m)?;
        order.push_str(name);
        order.push('\n');
    }
    tree.data("/nested/modules/order", order.as_bytes());
    tree.data("/nested/plan", plan.as_bytes());
    tree.data("/nested/disks", serials.join("\n").as_bytes());
    let qemu = "/usr/bin/qemu-system-x86_64";
    tree.file(qemu, 0o755, Path::new(qemu))?;
    for lib in shared_libraries(qemu)? {
        tree.file(&lib, 0o755, Path::new(&lib))?;
    }
    for rom in [
        "bios-microvm.bin",
        "qboot.rom",
        "pvh.bin",
        "linuxboot_dma.bin",
        "kvmvapic.bin",
    ] {
        let path = format!("/usr/share/qemu/{rom}");
        if Path::new(&path).exists() {
            tree.file(&path, 0o644, Path::new(&path))?;
        }
    }
    let path = cache_dir().join("nested").join("l1-initramfs.cpio");
    util::write_atomic(&path, &tree.cpio.finish())?;
    Ok(path)
}

enum L1Outcome {
    Ran(Vec<String>),
    NeverUp,
}

/// Boot L1 and collect its console until QEMU exits or `budget` passes.
fn run_l1(vmlinuz: &Path, initramfs: &Path, disks: &[String], budget: Duration) -> Step<L1Outcome> {
    progress_line("xtask: == booting L1 (QEMU TCG, nested SVM)");
    // QEMU's own stderr (TCG feature warnings, errors) goes to a file,
    // printed when L1 does not come up.
    let qemu_log_path = cache_dir().join("nested").join("qemu-stderr.log");
    if let Some(dir) = qemu_log_path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    }
    let qemu_log = std::fs::File::create(&qemu_log_path)
        .map_err(|e| format!("create {}: {e}", qemu_log_path.display()))?;
    let mut child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "tcg,thread=multi",
            "-M",
            "microvm",
            "-cpu",
            "EPYC",
        ])
        .args(["-smp", "1", "-m", "2G", "-nodefaults", "-no-user-config"])
        .args(["-nographic", "-serial", "stdio", "-no-reboot"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(l1_cmdline())
        .args(disks)
        .args(monitor_args())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(qemu_log)
        .spawn()
        .map_err(|e| format!("cannot start qemu-system-x86_64: {e}"))?;
    let stdout = child.stdout.take().ok_or("qemu stdout")?;
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
    let start = Instant::now();
    let mut log = Vec::new();
    let mut up = false;
    let log_path = cache_dir().join("nested").join("l1-console.log");
    // The log is also written as it arrives, for watching an L1 that hangs.
    let mut live = std::fs::File::create(log_path.with_extension("live.log")).ok();
    loop {
        let limit = if up { budget } else { L1_UP_TIMEOUT };
        let Some(left) = limit.checked_sub(start.elapsed()) else {
            let _ = child.kill();
            break;
        };
        match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(line) => {
                progress(&line, start);
                if let Some(live) = live.as_mut() {
                    let _ = writeln!(live, "{line}");
                }
                up |= line.contains("nested: l1 up");
                log.push(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let timed_out = start.elapsed() >= if up { budget } else { L1_UP_TIMEOUT };
    let _ = child.kill();
    let _ = child.wait();
    let _ = reader.join();
    let _ = util::write_atomic(&log_path, log.join("\n").as_bytes());
    progress_line(&format!("xtask: L1 console log: {}", log_path.display()));
    if !up {
        // TCG's "doesn't support requested feature" warnings are expected
        // noise; anything else QEMU said may explain the failure.
        let qemu = std::fs::read_to_string(&qemu_log_path).unwrap_or_default();
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
        return Ok(L1Outcome::NeverUp);
    }
    if timed_out {
        log.push(format!("nested: harness timeout after {budget:?}"));
    }
    Ok(L1Outcome::Ran(log))
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
/// `CHITIN_NESTED_L1_CMDLINE` adds entries for debugging L1 itself, e.g.
/// `loglevel=7`.
fn l1_cmdline() -> String {
    let tsc = match host_tsc_khz() {
        Some(khz) => format!("tsc_early_khz={khz} tsc=reliable"),
        None => String::new(),
    };
    let extra = std::env::var("CHITIN_NESTED_L1_CMDLINE").unwrap_or_default();
    format!("console=ttyS0 reboot=t panic=-1 quiet {tsc} {extra}")
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

/// `CHITIN_NESTED_MONITOR=<path>` gives L1's QEMU a monitor on that Unix
/// socket, for looking inside an L1 that stopped responding
/// (`info registers`, `x/20i $pc`).
fn monitor_args() -> Vec<String> {
    match std::env::var("CHITIN_NESTED_MONITOR") {
        Ok(path) if !path.is_empty() => {
            vec!["-monitor".into(), format!("unix:{path},server,nowait")]
        }
        _ => Vec::new(),
    }
}

/// Progress lines are off for `nested-exec`, whose output is the command's.
static QUIET: AtomicBool = AtomicBool::new(false);

fn progress_line(line: &str) {
    if !QUIET.load(Ordering::Relaxed) {
        eprintln!("{line}");
    }
}

/// Show a person what is happening while L1 runs.
fn progress(line: &str, start: Instant) {
    let t = start.elapsed().as_secs_f64();
    if let Some(rest) = line.strip_prefix("nested: ") {
        if !rest.starts_with("marker") {
            progress_line(&format!("xtask: [{t:6.1} s] {rest}"));
        }
    }
}

/// Split the log into one [`Run`] per scheduled run.
fn parse_runs(runs: &[(String, &Scenario)], log: &[String]) -> Vec<Run> {
    let mut parsed: Vec<Run> = runs
        .iter()
        .map(|(_, s)| Run {
            agent_scenario: agent_scenario(s).to_string(),
            cmdline: l2_cmdline(s),
            ..Run::default()
        })
        .collect();
    let index = |name: &str| runs.iter().position(|(n, _)| n == name);
    let mut current: Option<usize> = None;
    for line in log {
        if let Some(name) = line.strip_prefix("nested: begin ") {
            current = index(name.trim());
        } else if let Some(rest) = line.strip_prefix("nested: end ") {
            let mut f = rest.split_whitespace();
            if let Some(i) = f.next().and_then(index) {
                for kv in f {
                    match kv.split_once('=') {
                        Some(("exit", v)) => parsed[i].exit = Some(v.to_string()),
                        Some(("ms", v)) => parsed[i].ms = v.parse().ok(),
                        _ => {}
                    }
                }
            }
            current = None;
        } else if let Some(rest) = line.strip_prefix("nested: marker ") {
            let mut f = rest.split_whitespace();
            if let (Some(i), Some(ms)) = (f.next().and_then(index), f.next()) {
                parsed[i].marker_ms = ms.parse().ok();
            }
        } else if let Some(rest) = line.strip_prefix("nested: console ") {
            if let Some((name, sum)) = rest.split_once(' ') {
                if let Some(i) = index(name) {
                    parsed[i].console = Some(sum.to_string());
                }
            }
        } else if let Some(i) = current {
            let text = line
                .strip_prefix("| ")
                .or_else(|| line.strip_prefix("! "))
                .unwrap_or(line);
            parsed[i].lines.push(text.to_string());
        }
    }
    parsed
}

/// Common checks: the child exited 0, the agent came up for the right
/// scenario, reported every check passing, and saw our command line.
fn judge_checks(run: &Run, _disks: &Disks) -> Result<String, String> {
    let exit = run.exit.as_deref().unwrap_or("none");
    if exit != "0" {
        return Err(format!("VMM exit {exit}, want 0"));
    }
    let up = format!(
        "{UP_MARKER} version={AGENT_VERSION} scenario={}",
        run.agent_scenario
    );
    if !run.has(&up) {
        return Err(format!("no `{up}` line"));
    }
    if let Some(fail) = run
        .lines
        .iter()
        .find(|l| l.contains("chitin-check:") && l.contains(" FAIL"))
    {
        return Err(fail.clone());
    }
    if !run.has("chitin-agent: done") || !run.has(" fail=0") {
        return Err("agent did not finish with fail=0".into());
    }
    let seen = run
        .lines
        .iter()
        .find_map(|l| l.strip_prefix("chitin-agent: cmdline "))
        .unwrap_or_default();
    if !seen.contains(&run.cmdline) {
        return Err(format!(
            "guest command line {seen:?} lacks {:?}",
            run.cmdline
        ));
    }
    Ok(passed_checks(run))
}

/// The run's passed checks as `name: detail`, joined for the table.
fn passed_checks(run: &Run) -> String {
    run.lines
        .iter()
        .filter_map(|l| l.strip_prefix("chitin-check: "))
        .map(|l| l.split(" PASS ").collect::<Vec<_>>().join(": "))
        .collect::<Vec<_>>()
        .join("; ")
}

fn judge_panic(run: &Run, _disks: &Disks) -> Result<String, String> {
    let exit = run.exit.as_deref().unwrap_or("none");
    if !run.has(&format!(
        "{UP_MARKER} version={AGENT_VERSION} scenario=panic"
    )) {
        return Err("agent never came up".into());
    }
    if !run.has("Kernel panic - not syncing") {
        return Err("no `Kernel panic - not syncing` on the captured console".into());
    }
    if exit != "0" {
        return Err(format!("VMM exit {exit}, want 0 (reset after panic=-1)"));
    }
    Ok("panic message captured, guest reset".into())
}

fn judge_console(run: &Run, disks: &Disks) -> Result<String, String> {
    let sent = run
        .lines
        .iter()
        .find_map(|l| l.strip_prefix("chitin-check: console-pattern PASS "))
        .ok_or("agent did not report writing the pattern")?;
    let received = run
        .console
        .as_deref()
        .ok_or("no console block seen in L1")?;
    if sent.trim() != received.trim() {
        return Err(format!("guest wrote {sent}, L1 captured {received}"));
    }
    judge_checks(run, disks)?;
    Ok(format!("byte-exact: {received}"))
}

/// The `key=` value in the detail of the agent's `check` line.
fn check_value(run: &Run, check: &str, key: &str) -> Result<String, String> {
    let prefix = format!("chitin-check: {check} PASS ");
    run.lines
        .iter()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|detail| {
            detail
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        })
        .map(str::to_string)
        .ok_or_else(|| format!("no `{key}=` in a passing `{check}` check"))
}

/// Host-side checks: exit 0, every check passed, summary line.
fn judge_host_checks(run: &Run, _disks: &Disks) -> Result<String, String> {
    if let Some(fail) = run
        .lines
        .iter()
        .find(|l| l.contains("chitin-check:") && l.contains(" FAIL"))
    {
        return Err(fail.clone());
    }
    let exit = run.exit.as_deref().unwrap_or("none");
    if exit != "0" || !run.has("chitin-agent: done") || !run.has(" fail=0") {
        return Err(format!("checks did not all pass (exit {exit})"));
    }
    Ok(passed_checks(run))
}

fn judge_blk(run: &Run, disks: &Disks) -> Result<String, String> {
    judge_checks(run, disks)?;
    let fnv = check_value(run, "write-files", "big_fnv")?;
    disks::check_blk(disks, &fnv)
}

fn judge_integrity(run: &Run, disks: &Disks) -> Result<String, String> {
    judge_checks(run, disks)?;
    let fnv = check_value(run, "integrity", "fnv")?;
    disks::check_integrity(disks, &fnv)
}

fn judge_discard(run: &Run, disks: &Disks) -> Result<String, String> {
    judge_checks(run, disks)?;
    disks::check_discard(disks)
}

fn fmt_ms(ms: Option<u64>) -> String {
    ms.map_or("-".into(), |ms| format!("{:.2} s", ms as f64 / 1000.0))
}

fn median(mut values: Vec<u64>) -> Option<u64> {
    values.sort_unstable();
    values.get(values.len() / 2).copied()
}

/// Judge one run: it must have finished, within its timeout, and pass the
/// scenario's own checks.
fn judge(s: &Scenario, run: &Run, disks: &Disks) -> Result<String, String> {
    match run.exit.as_deref() {
        None => Err("never finished (L1 stopped or timed out)".to_string()),
        Some("timeout") => Err(format!("hung past its {} s timeout", s.timeout_s + 15)),
        Some(_) => (s.judge)(run, disks),
    }
}

fn report(
    selected: &[&Scenario],
    runs: &[(String, &Scenario)],
    log: &[String],
    disks: &Disks,
) -> Step {
    let parsed = parse_runs(runs, log);
    println!();
    println!(
        "{:<14} {:<6} {:>14} {:>10}  detail",
        "scenario", "result", "VMM start->up", "total"
    );
    let mut failures = Vec::new();
    let mut up_medians = Vec::new();
    let mut rows: Vec<&Scenario> = vec![&WARMUP];
    rows.extend(selected.iter().copied());
    for s in rows {
        let mine: Vec<(&String, &Run)> = runs
            .iter()
            .zip(&parsed)
            .filter(|((_, rs), _)| rs.name == s.name)
            .map(|((name, _), run)| (name, run))
            .collect();
        let mut detail = String::new();
        let mut failed = false;
        for (name, run) in &mine {
            match judge(s, run, disks) {
                Ok(d) => detail = d,
                Err(e) => {
                    failed = true;
                    detail = format!("{name}: {e}");
                    failures.push((name.to_string(), *run));
                    break;
                }
            }
        }
        let up = median(mine.iter().filter_map(|(_, r)| r.marker_ms).collect());
        let total = median(mine.iter().filter_map(|(_, r)| r.ms).collect());
        up_medians.push((s.name, up));
        let runs_note = if mine.len() > 1 {
            format!(" (median of {})", mine.len())
        } else {
            String::new()
        };
        println!(
            "{:<14} {:<6} {:>14} {:>10}  {detail}{runs_note}",
            s.name,
            if failed { "FAIL" } else { "PASS" },
            fmt_ms(up),
            fmt_ms(total),
        );
    }
    let find = |name: &str| {
        up_medians
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, m)| *m)
    };
    if let (Some(cm), Some(qm)) = (find("boot"), find("boot-qemu")) {
        println!(
            "boot, VMM start -> agent up (median of {BOOT_REPEATS}): chitin {:.2} s, QEMU microvm {:.2} s, QEMU/chitin {:.2}",
            cm as f64 / 1000.0,
            qm as f64 / 1000.0,
            qm as f64 / cm.max(1) as f64
        );
    }
    for (name, run) in &failures {
        println!("\n--- {name}: last console lines");
        let start = run.lines.len().saturating_sub(40);
        for line in &run.lines[start..] {
            println!("    {line}");
        }
    }
    let total = selected.len() + 1;
    println!(
        "{} passed, {} failed",
        total - failures.len().min(total),
        failures.len()
    );
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{} nested run(s) failed", failures.len()))
    }
}
