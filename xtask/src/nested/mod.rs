//! `cargo xtask nested [SCENARIO...]`: the real-Linux tier.
//!
//! QEMU in software emulation (TCG, `-cpu EPYC` with SVM and nested paging)
//! runs an L1 Debian cloud kernel that loads `kvm_amd` and gets a real
//! `/dev/kvm`. chitin's `boot` example runs in L1 and boots an unmodified L2
//! Linux (the guests from `cargo xtask guest`: 6.1 as ELF and 6.12 as
//! bzImage), whose PID 1 is `chitin-agent` running the scenario named on
//! its command line. L1's PID 1 (`chitin-nested-init`) runs the scenarios
//! and reports on the serial console; this module builds everything
//! ([`scenarios`] says what runs), runs QEMU with hard timeouts and a
//! silence detector ([`l1`]), and judges each scenario from that log
//! ([`mod@report`]).

mod bench;
mod l1;
mod report;
mod scenarios;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;

pub use bench::bench_boot;
use l1::{boot_l1, l1_kernel, L1Kernel, QUIET};
use report::report;
use scenarios::{
    l2_cmdline, L2Kernel, Scenario, BOOT_REPEATS, KERNEL_6_1, KERNEL_DEBIAN, SCENARIOS, UP_MARKER,
    WARMUP,
};

use crate::cpio::Cpio;
use crate::disks::{self, Disks};
use crate::guest::{self, KernelVersion};
use crate::util::{self, cache_dir, install_packages, output, Step};

/// Packages the tier needs on the host.
const PACKAGES: &[&str] = &["qemu-system-x86", "busybox-static", "cpio", "e2fsprogs"];

/// The `exit=` the harness gives a run during which L1 went silent.
pub const SILENT_EXIT: &str = "l1-silent";

/// The line that times a host-checks run: its first exec answered.
const FIRST_EXEC_MARKER: &str = "chitin-check: first-exec";

/// Where L1 finds a static busybox (for the `container` scenario's root).
pub const L1_BUSYBOX: &str = "/nested/busybox";
/// L1's memory unless a plan asks for more.
const L1_MEM_MIB: u32 = 2048;

/// Where L1 finds the initramfs every minimal L2 kernel boots with (each
/// kernel's directory links to it; Debian's kernel has its own, with
/// modules).
const L1_INITRAMFS: &str = "/l2/initramfs.cpio";

/// One boot of `kernel` + `initramfs` under the `boot` example in L1 (the
/// scenario's own options come after).
fn chitin_boot_argv(
    kernel: &str,
    initramfs: &str,
    vcpus: u32,
    mem_mib: u32,
    timeout_s: u64,
    cmdline: &str,
) -> Vec<String> {
    [
        "/bin/chitin-boot",
        "--kernel",
        kernel,
        "--initrd",
        initramfs,
        "--vcpus",
        &vcpus.to_string(),
        "--mem",
        &mem_mib.to_string(),
        "--timeout",
        &timeout_s.to_string(),
        "--cmdline",
        cmdline,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The same boot under QEMU's microvm machine, the peer column (with or
/// without ACPI).
fn qemu_microvm_argv(
    acpi: bool,
    kernel: &str,
    initramfs: &str,
    vcpus: u32,
    mem_mib: u32,
    cmdline: &str,
) -> Vec<String> {
    [
        "/usr/bin/qemu-system-x86_64",
        "-M",
        if acpi {
            "microvm,acpi=on,rtc=on"
        } else {
            "microvm,acpi=off,rtc=on"
        },
        "-enable-kvm",
        "-cpu",
        "host",
        "-smp",
        &vcpus.to_string(),
        "-m",
        &format!("{mem_mib}M"),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-serial",
        "stdio",
        "-no-reboot",
        "-L",
        "/usr/share/qemu",
        "-kernel",
        kernel,
        "-initrd",
        initramfs,
        "-append",
        cmdline,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The plan line for L1's runner: name, timeout, marker, argv (tab separated).
fn plan_line(run_name: &str, s: &Scenario) -> String {
    let cmdline = l2_cmdline(s);
    let kernel = s.kernel.l1_path();
    let initramfs = s.kernel.l1_initramfs();
    let argv: Vec<String> = if let Some(which) = s.host_checks {
        ["/bin/chitin-exec-checks", which, &kernel, &initramfs]
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else if s.peer {
        qemu_microvm_argv(
            !s.no_acpi, &kernel, &initramfs, s.vcpus, s.mem_mib, &cmdline,
        )
    } else {
        chitin_boot_argv(
            &kernel,
            &initramfs,
            s.vcpus,
            s.mem_mib,
            u64::from(s.timeout_s),
            &cmdline,
        )
        .into_iter()
        .chain(
            s.disks
                .iter()
                .flat_map(|d| ["--disk".to_string(), d.to_string()]),
        )
        .chain(s.no_acpi.then(|| "--no-acpi".to_string()))
        .chain(
            s.jail
                .then_some(["--jail", "--jail-uid", "1000", "--jail-gid", "1000"])
                .into_iter()
                .flatten()
                .map(String::from),
        )
        .collect()
    };
    // The runner's own timeout is a little longer than the VMM's, so the
    // VMM's timeout (a clean stop) fires first.
    // Host checks time VMM start to the first exec's answer instead.
    let marker = if s.host_checks.is_some() {
        FIRST_EXEC_MARKER
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
    let runs = schedule(&selected);
    let kernels: Vec<L2Kernel> = runs.iter().map(|(_, s)| s.kernel).collect();
    let tools = build_tools(
        &kernels,
        guest::test_initramfs,
        guest::debian_test_initramfs,
    )?;
    let plan: Vec<String> = runs.iter().map(|(name, s)| plan_line(name, s)).collect();
    let disks = disks::create(&cache_dir().join("nested").join("disks"))?;
    let log = boot_l1(&tools, &plan, &disks)?;
    report(&selected, &runs, &log, &disks)
}

/// `cargo xtask nested-stress [--runs N] [--spin K] [SCENARIO...]`: the
/// nested tier `N` times (default 5) while `K` busy loops (default: one per
/// host core) compete with QEMU for the host, the way a loaded CI machine
/// does. Prints each run's verdict and the tally; fails unless every run
/// passed.
pub fn stress(args: &[String]) -> Step {
    let mut runs = 5usize;
    let mut spin = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut scenarios = Vec::new();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut number = |flag: &str| -> Step<usize> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{flag} needs a number"))
        };
        match arg.as_str() {
            "--runs" => runs = number("--runs")?,
            "--spin" => spin = number("--spin")?,
            _ => scenarios.push(arg.clone()),
        }
    }
    // Validate the selection before loading the host.
    select(&scenarios)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loops: Vec<_> = (0..spin)
        .map(|_| {
            let stop = std::sync::Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut x = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..1_000_000 {
                        x = std::hint::black_box(
                            x.wrapping_mul(6364136223846793005).wrapping_add(1),
                        );
                    }
                }
            })
        })
        .collect();
    eprintln!("xtask: == nested-stress: {runs} runs with {spin} busy loops on the host");
    let mut verdicts = Vec::new();
    for i in 1..=runs {
        let start = std::time::Instant::now();
        let result = nested(&scenarios);
        let line = format!(
            "run {i}/{runs}: {} in {:.0} s",
            match &result {
                Ok(()) => "PASS".to_string(),
                Err(e) => format!("FAIL ({e})"),
            },
            start.elapsed().as_secs_f64()
        );
        eprintln!("xtask: nested-stress {line}");
        verdicts.push((result.is_ok(), line));
    }
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        let _ = l.join();
    }
    let passed = verdicts.iter().filter(|(ok, _)| *ok).count();
    println!("\nnested-stress with {spin} busy loops:");
    for (_, line) in &verdicts {
        println!("  {line}");
    }
    println!("{passed} of {runs} runs passed");
    if passed == runs && runs > 0 {
        Ok(())
    } else {
        Err(format!(
            "{} of {runs} loaded nested runs failed",
            runs - passed
        ))
    }
}

/// Everything L1 needs, built and fetched.
pub struct Tools {
    /// Each L2 kernel image the plan boots, with the host file.
    kernels: Vec<(L2Kernel, PathBuf)>,
    /// The initramfs every minimal L2 kernel boots with: the test agent's
    /// for the scenarios, the production agent's for `nested-exec`.
    initramfs: PathBuf,
    /// The test initramfs with the Debian cloud kernel's modules, when
    /// the plan boots that kernel.
    debian_initramfs: Option<PathBuf>,
    /// `System.map` of each L2 kernel version, for monitor dumps.
    l2_system_maps: Vec<(String, PathBuf)>,
    boot: PathBuf,
    exec: PathBuf,
    checks: PathBuf,
    /// chitin's containerd shim (found by containerd on L1's PATH).
    shim: PathBuf,
    init: PathBuf,
    l1: L1Kernel,
    /// More executables for L1, at their L1 paths (peer VMMs), with the
    /// shared libraries `ldd` lists for them.
    extra_files: Vec<(String, PathBuf)>,
    /// More files for L1, by content.
    extra_data: Vec<(String, Vec<u8>)>,
    /// L1's memory.
    l1_mem_mib: u32,
}

/// Build or fetch what L1 needs to boot `kernels` (duplicates allowed)
/// with `initramfs` (built on demand), and Debian's kernel with
/// `debian_initramfs`.
fn build_tools(
    kernels: &[L2Kernel],
    initramfs: fn() -> Step<PathBuf>,
    debian_initramfs: fn(&guest::DebianKernel) -> Step<PathBuf>,
) -> Step<Tools> {
    let mut wanted: Vec<L2Kernel> = Vec::new();
    for k in kernels {
        if !wanted.contains(k) {
            wanted.push(*k);
        }
    }
    if wanted.is_empty() {
        return Err("the plan boots no L2 kernel".into());
    }
    let mut images = Vec::new();
    let mut l2_system_maps = Vec::new();
    for version in KernelVersion::ALL {
        if !wanted.iter().any(|k| k.version == version && !k.debian) {
            continue;
        }
        // Straight from the kernel cache: nothing is copied per run.
        let built = guest::kernel(version)?;
        for k in wanted.iter().filter(|k| k.version == version && !k.debian) {
            let file = if k.bzimage {
                &built.bzimage
            } else {
                &built.vmlinux
            };
            images.push((*k, file.clone()));
        }
        l2_system_maps.push((version.name().to_string(), built.system_map));
    }
    let mut debian_cpio = None;
    if wanted.contains(&KERNEL_DEBIAN) {
        let debian = guest::debian_cloud_kernel()?;
        // The rows say which version they boot; a host whose apt names
        // another cloud kernel (a newer Debian) must say so, not fail
        // every row on the guest's release.
        let want = format!("{}.", KERNEL_DEBIAN.version.name());
        if !debian.release.starts_with(&want) {
            return Err(format!(
                "the -debian rows expect Debian's {} cloud kernel, apt names {}",
                KERNEL_DEBIAN.version.name(),
                debian.package
            ));
        }
        images.push((KERNEL_DEBIAN, debian.vmlinuz.clone()));
        debian_cpio = Some(debian_initramfs(&debian)?);
    }
    Ok(Tools {
        kernels: images,
        initramfs: initramfs()?,
        debian_initramfs: debian_cpio,
        l2_system_maps,
        boot: guest::build_static(&["-p", "chitin", "--example", "boot"], "boot")?,
        exec: guest::build_static(&["-p", "chitin", "--example", "exec"], "exec")?,
        checks: guest::build_static(
            &["-p", "chitin-nested-init", "--bin", "chitin-exec-checks"],
            "chitin-exec-checks",
        )?,
        shim: guest::build_static(&["-p", "chitin-shim", "--bin", SHIM_BINARY], SHIM_BINARY)?,
        init: guest::build_static(
            &["-p", "chitin-nested-init", "--bin", "chitin-nested-init"],
            "chitin-nested-init",
        )?,
        l1: l1_kernel()?,
        extra_files: Vec::new(),
        extra_data: Vec::new(),
        l1_mem_mib: L1_MEM_MIB,
    })
}

use crate::shim_install::SHIM_BINARY;

/// How long a command run through `nested-exec` may take, L2 boot included.
const NESTED_EXEC_TIMEOUT_S: u64 = 300;

/// `cargo xtask nested-exec [--distro debian] -- CMD [ARG...]`: run one
/// command in a sandbox inside L1 (for hosts whose KVM cannot run Linux),
/// on the default guest or Debian's cloud kernel. The command's stdout
/// and stderr are printed as they came; returns its exit code.
pub fn nested_exec(args: &[String]) -> Step<i32> {
    // Options for the exec example (`--jail ...`) come before `--`;
    // `--distro debian` picks the guest and is this command's own.
    let (mut options, argv): (Vec<&String>, Vec<&String>) =
        match args.iter().position(|a| a == "--") {
            Some(at) => (args[..at].iter().collect(), args[at + 1..].iter().collect()),
            None => (Vec::new(), args.iter().collect()),
        };
    let mut kernel = KERNEL_6_1;
    if let Some(at) = options.iter().position(|o| *o == "--distro") {
        match options.get(at + 1).map(|d| d.as_str()) {
            Some("debian") => kernel = KERNEL_DEBIAN,
            other => return Err(format!("--distro {other:?}: known: debian")),
        }
        options.drain(at..at + 2);
    }
    if argv.is_empty() {
        return Err(
            "usage: cargo xtask nested-exec [--distro debian] [EXAMPLE OPTIONS] -- CMD [ARG...]"
                .into(),
        );
    }
    if let Some(bad) = options
        .iter()
        .chain(&argv)
        .find(|a| a.contains(['\t', '\n']))
    {
        return Err(format!(
            "arguments cannot contain tabs or newlines: {bad:?}"
        ));
    }
    // Preparing prints only what fails or takes long: the output is the
    // command's.
    util::set_quiet(true);
    QUIET.store(true, Ordering::Relaxed);
    prerequisites()?;
    // The guest image a user gets, not the test agent.
    let tools = build_tools(
        &[kernel],
        guest::agent_initramfs,
        guest::debian_agent_initramfs,
    )?;
    let mut plan = format!(
        "exec\t{NESTED_EXEC_TIMEOUT_S}\t\t/bin/chitin-exec\t--guest-dir\t{}\t--timeout\t{}",
        kernel.l1_dir(),
        NESTED_EXEC_TIMEOUT_S - 10
    );
    for option in &options {
        plan.push('\t');
        plan.push_str(option);
    }
    plan.push_str("\t--");
    for arg in &argv {
        plan.push('\t');
        plan.push_str(arg);
    }
    let disks = Disks {
        images: Vec::new(),
        discard_allocated_before: Vec::new(),
    };
    let log = boot_l1(&tools, &[plan], &disks)?;
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

/// The ordered runs: a warm-up, then each scenario; the timed (boot) rows
/// run [`BOOT_REPEATS`] rounds, interleaved, where the first of them is.
fn schedule(selected: &[&'static Scenario]) -> Vec<(String, &'static Scenario)> {
    let mut runs = vec![(WARMUP.name.to_string(), &WARMUP)];
    let timed: Vec<&'static Scenario> = selected.iter().copied().filter(|s| s.timed).collect();
    let mut timed_done = false;
    for s in selected {
        if !s.timed {
            runs.push((s.name.to_string(), *s));
        } else if !timed_done {
            timed_done = true;
            for k in 1..=BOOT_REPEATS {
                for t in &timed {
                    runs.push((format!("{}#{k}", t.name), *t));
                }
            }
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
        // The peer column always runs next to chitin's boot.
        match a.as_str() {
            "boot" => {
                names.insert("boot-qemu-acpi");
            }
            "boot-acpi-off" => {
                names.insert("boot-qemu");
            }
            "boot-debian" => {
                names.insert("boot-qemu-debian");
            }
            _ => {}
        }
    }
    Ok(SCENARIOS
        .iter()
        .filter(|s| names.contains(s.name))
        .collect())
}

/// Adds files at absolute paths, creating parent directories once.
struct Tree {
    cpio: Cpio,
}

impl Tree {
    fn file(&mut self, path: &str, mode: u32, host: &Path) -> Step {
        let path = path.trim_start_matches('/');
        self.cpio.parents(path);
        self.cpio.file_from(path, mode, host)
    }

    fn data(&mut self, path: &str, body: &[u8]) {
        let path = path.trim_start_matches('/');
        self.cpio.parents(path);
        self.cpio.file(path, 0o644, body);
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
    let l1 = &tools.l1;
    let mut tree = Tree { cpio: Cpio::new() };
    for dir in ["dev", "proc", "sys", "tmp", "bin"] {
        tree.cpio.dir(dir);
    }
    tree.cpio.char_dev("dev/console", 5, 1);
    tree.file("/init", 0o755, &tools.init)?;
    tree.file("/bin/chitin-boot", 0o755, &tools.boot)?;
    tree.file("/bin/chitin-exec", 0o755, &tools.exec)?;
    tree.file("/bin/chitin-exec-checks", 0o755, &tools.checks)?;
    tree.file(&format!("/bin/{SHIM_BINARY}"), 0o755, &tools.shim)?;
    tree.file(L1_INITRAMFS, 0o644, &tools.initramfs)?;
    // The static busybox the `container` scenario makes its root from
    // (the L2 initramfs carries the same binary).
    tree.file(L1_BUSYBOX, 0o755, Path::new("/bin/busybox"))?;
    let mut linked = BTreeSet::new();
    for (kernel, file) in &tools.kernels {
        tree.file(&kernel.l1_path(), 0o644, file)?;
        // Each version's directory is a whole guest image for
        // `GuestImage::in_dir`: the kernel and (a link to) the initramfs;
        // Debian's kernel has its own, with its modules.
        let link = kernel.l1_initramfs();
        if linked.insert(link.clone()) {
            match (&tools.debian_initramfs, kernel.debian) {
                (Some(own), true) => tree.file(&link, 0o644, own)?,
                (None, true) => return Err("no initramfs for the Debian kernel".into()),
                (_, false) => tree
                    .cpio
                    .symlink(link.trim_start_matches('/'), "../initramfs.cpio"),
            }
        }
    }
    let mut order = String::new();
    for m in &l1.modules {
        let name = m.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        tree.file(&format!("/nested/modules/{name}"), 0o644, m)?;
        order.push_str(name);
        order.push('\n');
    }
    tree.data("/nested/modules/order", order.as_bytes());
    tree.data("/nested/plan", plan.as_bytes());
    let vhost_net: &[u8] = if l1.vhost_net { b"yes\n" } else { b"no\n" };
    tree.data("/nested/vhost-net", vhost_net);
    tree.data("/nested/disks", serials.join("\n").as_bytes());
    let qemu = "/usr/bin/qemu-system-x86_64";
    tree.file(qemu, 0o755, Path::new(qemu))?;
    let mut libraries = BTreeSet::new();
    libraries.extend(shared_libraries(qemu)?);
    for (path, host) in &tools.extra_files {
        tree.file(path, 0o755, host)?;
        let host = host.to_str().ok_or("a non-UTF-8 path")?;
        // `ldd` fails on a static binary: it needs none.
        libraries.extend(shared_libraries(host).unwrap_or_default());
    }
    for lib in &libraries {
        tree.file(lib, 0o755, Path::new(lib))?;
    }
    for (path, body) in &tools.extra_data {
        tree.data(path, body);
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
