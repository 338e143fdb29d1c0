//! `cargo xtask bench-boot [--rounds N] [--distro debian]`: chitin's boot
//! next to its peers', in one L1, with counts that do not depend on how
//! busy the emulating host is.
//!
//! Every VMM boots the same L2 kernel and initramfs with the same vCPUs,
//! memory and command line (the test agent's `bench` scenario: up, then
//! power off), one boot per VMM per round, the order rotating each round.
//! Per VMM the table gives the median and spread of
//! - VMM start → kernel start: the time L1 saw the agent's up line minus
//!   the `boottime_ms` on it (the guest kernel's own clock, which starts
//!   with the kernel): the VMM's set-up, firmware and decompression;
//! - kernel start → agent up: the kernel's own boot;
//! - the VMM's resident memory at agent up (L1's `/proc/<pid>/status`);
//! - L1 KVM's exit counters at agent up (debugfs) and its trace-event
//!   histograms: exits by reason, exits to user space by reason, MSR
//!   accesses by index, port I/O by port, MMIO by address;
//!
//! and each peer's ratio to chitin (above 1: chitin is ahead).
//!
//! Then, with `--density N` (default [`DEFAULT_DENSITY`]; 0 skips it),
//! density: N sandboxes of the same guest alive at once in one chitin
//! process in the same L1 (`chitin-exec-checks density`), with the memory,
//! threads and fds of the first and of each additional one, next to the
//! resident memory of one peer VMM process per guest from the table.
//!
//! Peers: QEMU's microvm machine always (`acpi=on`, like chitin's
//! default); Firecracker when `CHITIN_PEER_FIRECRACKER` names its binary
//! (`--no-api --config-file`), Cloud Hypervisor when
//! `CHITIN_PEER_CLOUD_HYPERVISOR` does. Peers are built from their public
//! sources by whoever runs the bench (never committed); L1 gets each
//! binary and the shared libraries `ldd` lists for it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::l1::boot_l1;
use super::scenarios::{L2Kernel, KERNEL_6_1, KERNEL_DEBIAN, UP_MARKER, WARMUP};
use super::{build_tools, chitin_boot_argv, plan_line, prerequisites, qemu_microvm_argv};
use crate::disks::Disks;
use crate::guest;
use crate::util::Step;

/// Rounds when `--rounds` is not given.
const DEFAULT_ROUNDS: usize = 10;
/// Sandboxes of the density run when `--density` is not given.
pub const DEFAULT_DENSITY: usize = 50;
/// L1's memory: what the boots need, and per density sandbox what one
/// guest touches booting (bench-boot's RSS at agent up, rounded up).
const L1_BASE_MIB: u32 = super::L1_MEM_MIB;
const L1_MIB_PER_SANDBOX: u32 = 48;
/// How long the density run may take: its boots share L1's one CPU.
const DENSITY_TIMEOUT_S: u64 = 1800;
/// The run name of the density run.
const DENSITY_RUN: &str = "density";
/// vCPUs and memory of every bench guest.
const VCPUS: u32 = 1;
const MEM_MIB: u32 = 128;
/// How long one boot may take before L1's runner kills it.
const RUN_TIMEOUT_S: u64 = 60;
/// The environment variables naming peer binaries.
pub const ENV_FIRECRACKER: &str = "CHITIN_PEER_FIRECRACKER";
pub const ENV_CLOUD_HYPERVISOR: &str = "CHITIN_PEER_CLOUD_HYPERVISOR";
/// Where L1 finds Firecracker's configuration.
const FIRECRACKER_CONFIG: &str = "/nested/firecracker.json";

/// A VMM of the table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vmm {
    Chitin,
    Qemu,
    Firecracker,
    CloudHypervisor,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Chitin => "chitin",
            Vmm::Qemu => "qemu-microvm",
            Vmm::Firecracker => "firecracker",
            Vmm::CloudHypervisor => "cloud-hypervisor",
        }
    }

    /// Where a peer's binary lives inside L1.
    fn l1_binary(self) -> String {
        format!("/peers/{}", self.name())
    }

    /// The L2 command line: the same for all, but QEMU's microvm has no
    /// i8042 to reset through (`reboot=t`; the bench guest powers off
    /// through ACPI anyway where the machine describes `_S5_`).
    fn cmdline(self) -> String {
        let reboot = if self == Vmm::Qemu { "t" } else { "k" };
        // CHITIN_NESTED_EXTRA_CMDLINE (`loglevel=7 printk.time=1`) shows
        // where a boot's time goes, at the price of a chatty console.
        let extra = std::env::var("CHITIN_NESTED_EXTRA_CMDLINE").unwrap_or_default();
        format!(
            "console=ttyS0 reboot={reboot} panic=-1 quiet chitin.scenario=bench \
             chitin.expect_cpus={VCPUS} chitin.expect_mem_mib={MEM_MIB} {extra}"
        )
        .trim_end()
        .to_string()
    }

    /// The argv L1 runs for one boot of `kernel`.
    fn argv(self, kernel: L2Kernel) -> Vec<String> {
        let image = kernel.l1_path();
        let initramfs = kernel.l1_initramfs();
        let cmdline = self.cmdline();
        match self {
            Vmm::Chitin => {
                let mut argv = chitin_boot_argv(
                    &image,
                    &initramfs,
                    VCPUS,
                    MEM_MIB,
                    RUN_TIMEOUT_S - 10,
                    &cmdline,
                );
                argv.push("--timings".into());
                argv
            }
            Vmm::Qemu => qemu_microvm_argv(true, &image, &initramfs, VCPUS, MEM_MIB, &cmdline),
            Vmm::Firecracker => vec![
                self.l1_binary(),
                "--no-api".into(),
                "--config-file".into(),
                FIRECRACKER_CONFIG.into(),
            ],
            Vmm::CloudHypervisor => vec![
                self.l1_binary(),
                "--kernel".into(),
                image,
                "--initramfs".into(),
                initramfs,
                "--cmdline".into(),
                cmdline,
                "--cpus".into(),
                format!("boot={VCPUS}"),
                "--memory".into(),
                format!("size={MEM_MIB}M"),
                "--serial".into(),
                "tty".into(),
                "--console".into(),
                "off".into(),
            ],
        }
    }
}

/// Firecracker's configuration for `kernel` (JSON; every string is ours).
fn firecracker_config(kernel: L2Kernel) -> String {
    format!(
        "{{\n  \"boot-source\": {{\n    \"kernel_image_path\": \"{}\",\n    \"initrd_path\": \"{}\",\n    \"boot_args\": \"{}\"\n  }},\n  \"drives\": [],\n  \"machine-config\": {{\n    \"vcpu_count\": {VCPUS},\n    \"mem_size_mib\": {MEM_MIB}\n  }}\n}}\n",
        kernel.l1_path(),
        kernel.l1_initramfs(),
        Vmm::Firecracker.cmdline()
    )
}

/// The command's options.
#[derive(Debug, PartialEq)]
struct Options {
    rounds: usize,
    kernel: L2Kernel,
    /// Sandboxes of the density run; 0: none.
    density: usize,
    /// Guest memory of each density sandbox, in MiB.
    density_mem: u32,
}

fn parse_options(args: &[String]) -> Step<Options> {
    let mut options = Options {
        rounds: DEFAULT_ROUNDS,
        kernel: KERNEL_6_1,
        density: DEFAULT_DENSITY,
        density_mem: MEM_MIB,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--rounds" => {
                options.rounds = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n > 0)
                    .ok_or("--rounds needs a number above 0")?;
            }
            "--density" => {
                options.density = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or("--density needs a number (0: no density run)")?;
            }
            "--density-mem" => {
                options.density_mem = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|n| *n >= 64)
                    .ok_or("--density-mem needs MiB, 64 or more")?;
            }
            "--distro" => match it.next().map(String::as_str) {
                Some("debian") => options.kernel = KERNEL_DEBIAN,
                other => return Err(format!("--distro {other:?}: known: debian")),
            },
            other => {
                return Err(format!(
                    "unknown option {other:?}; usage: cargo xtask bench-boot [--rounds N] [--density N] [--density-mem MIB] [--distro debian]"
                ))
            }
        }
    }
    Ok(options)
}

/// The peers named in the environment, with their host binaries.
fn peers_from_env(kernel: L2Kernel) -> Step<Vec<(Vmm, PathBuf)>> {
    let mut peers = Vec::new();
    for (vmm, var) in [
        (Vmm::Firecracker, ENV_FIRECRACKER),
        (Vmm::CloudHypervisor, ENV_CLOUD_HYPERVISOR),
    ] {
        let Some(path) = std::env::var_os(var).filter(|p| !p.is_empty()) else {
            eprintln!("xtask: bench-boot: {var} unset: no {} column", vmm.name());
            continue;
        };
        if vmm == Vmm::CloudHypervisor && kernel.bzimage {
            // It boots an ELF vmlinux (PVH entry) or firmware, no bzImage.
            eprintln!(
                "xtask: bench-boot: no {} column: it cannot boot a bzImage",
                vmm.name()
            );
            continue;
        }
        let path = PathBuf::from(path);
        if !path.is_file() {
            return Err(format!("{var}={}: no such file", path.display()));
        }
        peers.push((vmm, path));
    }
    Ok(peers)
}

/// The plan: a warm-up boot, then `rounds` rounds of one boot per VMM,
/// the order rotating so that no VMM always runs first after another, then
/// the density run of `density` sandboxes of `density_mem` MiB (none for
/// 0).
fn plan(
    vmms: &[Vmm],
    rounds: usize,
    kernel: L2Kernel,
    density: usize,
    density_mem: u32,
) -> Vec<(String, Vmm, String)> {
    let mut runs = vec![(
        WARMUP.name.to_string(),
        Vmm::Chitin,
        plan_line(WARMUP.name, &WARMUP),
    )];
    for round in 0..rounds {
        for k in 0..vmms.len() {
            let vmm = vmms[(round + k) % vmms.len()];
            let name = format!("{}#{}", vmm.name(), round + 1);
            let line = format!(
                "{name}\t{RUN_TIMEOUT_S}\t{UP_MARKER}\t{}",
                vmm.argv(kernel).join("\t")
            );
            runs.push((name, vmm, line));
        }
    }
    if density > 0 {
        let line = format!(
            "{DENSITY_RUN}\t{DENSITY_TIMEOUT_S}\t{DENSITY_PREFIX} at=all\t/bin/chitin-exec-checks\tdensity\t{}\t{}\t{density}\t{density_mem}",
            kernel.l1_path(),
            kernel.l1_initramfs()
        );
        runs.push((DENSITY_RUN.to_string(), Vmm::Chitin, line));
    }
    runs
}

/// How the density run's lines begin.
const DENSITY_PREFIX: &str = "chitin-density:";

/// The density run's report: its `chitin-density:` lines by `at=`, and
/// its check line.
#[derive(Debug, Default, PartialEq)]
struct Density {
    at: BTreeMap<String, Vec<(String, u64)>>,
    check: Option<String>,
}

impl Density {
    fn get(&self, at: &str, key: &str) -> Option<u64> {
        self.at
            .get(at)?
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
    }
}

fn parse_density(log: &[String]) -> Density {
    let mut density = Density::default();
    let mut inside = false;
    for line in log {
        if let Some(rest) = line.strip_prefix("nested: ") {
            let mut words = rest.split_whitespace();
            let (kind, name) = (words.next(), words.next());
            match (kind, name == Some(DENSITY_RUN)) {
                (Some("begin"), true) => inside = true,
                (Some("end"), true) => inside = false,
                _ => {}
            }
            continue;
        }
        let Some(text) = line.strip_prefix("| ").filter(|_| inside) else {
            continue;
        };
        if let Some(fields) = text.strip_prefix(DENSITY_PREFIX) {
            let at = fields
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix("at="))
                .unwrap_or("?")
                .to_string();
            density.at.insert(at, key_values(fields));
        } else if let Some(check) = text.strip_prefix("chitin-check: density ") {
            density.check = Some(check.to_string());
        }
    }
    density
}

/// Print the density run next to the peers' per-VM processes; an error
/// when it did not pass.
fn print_density(count: usize, mem_mib: u32, density: &Density, all: &[Figures]) -> Step {
    let check = density
        .check
        .as_deref()
        .ok_or("the density run printed no verdict")?;
    let Some(detail) = check.strip_prefix("PASS") else {
        return Err(format!("density: {check}"));
    };
    let mib = |kib: u64| kib as f64 / 1024.0;
    let row = |label: &str, at: &str, from: &str, per: u64| -> Step<(f64, f64)> {
        let get = |at: &str, key: &str| {
            density
                .get(at, key)
                .ok_or_else(|| format!("density: no {key} at {at}"))
        };
        let diff = |key: &str| -> Step<f64> {
            Ok((get(at, key)? as f64 - get(from, key)? as f64) / per as f64)
        };
        let (rss, pss, guest) = (diff("rss_kib")?, diff("pss_kib")?, diff("guest_kib")?);
        println!(
            "  {label:<26} {:>9.1} MiB {:>9.1} MiB {:>9.1} MiB {:>9.1} MiB {:>8.1} {:>8.1} {:>9.1} MiB",
            mib(rss as u64),
            mib(pss as u64),
            mib(guest as u64),
            (pss - guest) / 1024.0,
            diff("threads")?,
            diff("fds")?,
            diff("l1_available_drop_kib")? / 1024.0,
        );
        Ok((rss, guest))
    };
    println!(
        "\ndensity: {count} sandboxes of this guest ({VCPUS} vCPU, {mem_mib} MiB) alive at once in one chitin process in L1:"
    );
    println!(
        "  first up after {} ms alone; the other {} started in {} ms, up after {} ms (median) and {} ms (last)",
        density.get("times", "first_up_ms").unwrap_or(0),
        count.saturating_sub(1),
        density.get("times", "rest_started_ms").unwrap_or(0),
        density.get("times", "rest_median_up_ms").unwrap_or(0),
        density.get("times", "rest_all_up_ms").unwrap_or(0),
    );
    println!(
        "  {:<26} {:>13} {:>13} {:>13} {:>13} {:>8} {:>8} {:>13}",
        "", "process RSS", "PSS", "guest RAM own", "PSS - own", "threads", "fds", "L1 avail. -"
    );
    let (first, _) = row("the first sandbox", "one", "base", 1)?;
    let mut additional = None;
    if count > 1 {
        additional = Some(row(
            "each additional (mean)",
            "all",
            "one",
            count as u64 - 1,
        )?);
    }
    // The first, snapshotted, restored `count` times: clones map its
    // memory file copy-on-write, so RSS counts a shared page once per
    // clone and PSS and L1's memory once in all.
    row("each clone (mean)", "clones", "dropped", count as u64)?;
    let per_vm = additional.map_or(first, |(rss, _)| rss);
    let peers: Vec<String> = all
        .iter()
        .filter(|f| f.vmm != Vmm::Chitin)
        .filter_map(|f| {
            let rss = f.rss_kib?.median as f64;
            Some(format!(
                "{} {:.1} MiB ({:.2}x)",
                f.vmm.name(),
                mib(rss as u64),
                rss / per_vm.max(1.0)
            ))
        })
        .collect();
    if !peers.is_empty() {
        println!(
            "  a peer runs a process per VM; its RSS at agent up (table above, {MEM_MIB} MiB guests{}; x: its ratio to chitin's {} sandbox): {}",
            if mem_mib == MEM_MIB { "" } else { ", not this run's" },
            if count > 1 { "additional" } else { "first" },
            peers.join(", ")
        );
    }
    println!(
        "  clones restored at once: up after {} ms (median) and {} ms (last)",
        density.get("clone-times", "median_up_ms").unwrap_or(0),
        density.get("clone-times", "all_up_ms").unwrap_or(0),
    );
    println!("  {}", detail.trim());
    Ok(())
}

/// What one boot reported.
#[derive(Default, Debug)]
struct Sample {
    /// VMM start → the up line, as L1 saw it.
    up_ms: Option<u64>,
    /// The guest kernel's clock on the up line.
    boottime_ms: Option<u64>,
    /// L1 KVM's exit counters at the up line.
    exits: Vec<(String, u64)>,
    rss_kib: Option<u64>,
    threads: Option<u64>,
    /// Histograms at the up line: label → (key, count).
    hists: BTreeMap<String, Vec<(String, u64)>>,
    exit: Option<String>,
    /// chitin's own `--timings` line: `main` → `start()` returned, µs.
    setup_us: Option<u64>,
    /// chitin's debug lines of `chitin::timing`: (`build() kernel`, µs).
    phases: Vec<(String, u64)>,
}

impl Sample {
    /// VMM start → kernel start.
    fn before_kernel_ms(&self) -> Option<u64> {
        self.up_ms?.checked_sub(self.boottime_ms?)
    }

    fn complete(&self) -> bool {
        self.up_ms.is_some() && self.boottime_ms.is_some()
    }
}

fn key_values(fields: &str) -> Vec<(String, u64)> {
    fields
        .split_whitespace()
        .filter_map(|kv| kv.rsplit_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect()
}

/// `build() 18.3 ms: checks 0.2 ms, memory 0.0 ms` → (`build() checks`,
/// 200), (`build() memory`, 0).
fn phases(line: &str) -> Vec<(String, u64)> {
    let Some((what, laps)) = line.split_once(": ") else {
        return Vec::new();
    };
    let what = what.split_whitespace().next().unwrap_or_default();
    laps.split(", ")
        .filter_map(|lap| {
            let (name, ms) = lap.strip_suffix(" ms")?.rsplit_once(' ')?;
            let us = (ms.parse::<f64>().ok()? * 1000.0) as u64;
            Some((format!("{what} {name}"), us))
        })
        .collect()
}

/// One [`Sample`] per run name of the log.
fn parse_log(log: &[String]) -> BTreeMap<String, Sample> {
    let mut samples: BTreeMap<String, Sample> = BTreeMap::new();
    let mut current: Option<String> = None;
    for line in log {
        let Some(rest) = line.strip_prefix("nested: ") else {
            if let (Some(name), Some(text)) = (&current, line.strip_prefix("! ")) {
                if let Some(fields) = text.strip_prefix("chitin: timings ") {
                    let start_ms = fields
                        .split_whitespace()
                        .find_map(|kv| kv.strip_prefix("start_ms="))
                        .and_then(|v| v.parse::<f64>().ok());
                    samples.entry(name.clone()).or_default().setup_us =
                        start_ms.map(|ms| (ms * 1000.0) as u64);
                }
                if let Some(line) = text.strip_prefix("DEBUG chitin::timing: ") {
                    samples
                        .entry(name.clone())
                        .or_default()
                        .phases
                        .extend(phases(line));
                }
            }
            if let (Some(name), Some(text)) = (&current, line.strip_prefix("| ")) {
                if let Some(at) = text.find(UP_MARKER) {
                    let ms = text[at..]
                        .split_whitespace()
                        .find_map(|kv| kv.strip_prefix("boottime_ms="))
                        .and_then(|v| v.parse().ok());
                    let sample = samples.entry(name.clone()).or_default();
                    sample.boottime_ms = sample.boottime_ms.or(ms);
                }
            }
            continue;
        };
        let (kind, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        let (name, fields) = rest.split_once(' ').unwrap_or((rest, ""));
        let name = name.to_string();
        match kind {
            "begin" => {
                samples.entry(name.clone()).or_default();
                current = Some(name);
            }
            "end" => {
                let sample = samples.entry(name).or_default();
                sample.exit = fields
                    .split_whitespace()
                    .find_map(|kv| kv.strip_prefix("exit="))
                    .map(str::to_string);
                current = None;
            }
            "marker" => samples.entry(name).or_default().up_ms = fields.trim().parse().ok(),
            "exits" => samples.entry(name).or_default().exits = key_values(fields),
            "memory" => {
                let sample = samples.entry(name).or_default();
                for (k, v) in key_values(fields) {
                    match k.as_str() {
                        "rss_kib" => sample.rss_kib = Some(v),
                        "threads" => sample.threads = Some(v),
                        _ => {}
                    }
                }
            }
            "hist" => {
                let (label, entries) = fields.split_once(' ').unwrap_or((fields, ""));
                samples
                    .entry(name)
                    .or_default()
                    .hists
                    .insert(label.to_string(), key_values(entries));
            }
            _ => {}
        }
    }
    samples
}

/// Median, lowest and highest.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Spread {
    median: u64,
    min: u64,
    max: u64,
}

fn spread(mut values: Vec<u64>) -> Option<Spread> {
    values.sort_unstable();
    let mid = values.len() / 2;
    // An even count's median is the mean of its two middle values (the
    // default 10 rounds are even).
    let median = if values.len() % 2 == 0 {
        let (a, b) = (*values.get(mid.checked_sub(1)?)?, *values.get(mid)?);
        a / 2 + b / 2 + (a % 2 + b % 2) / 2
    } else {
        *values.get(mid)?
    };
    Some(Spread {
        median,
        min: *values.first()?,
        max: *values.last()?,
    })
}

fn median(values: Vec<u64>) -> Option<u64> {
    spread(values).map(|s| s.median)
}

fn fmt_time(s: Option<Spread>) -> String {
    s.map_or("-".to_string(), |s| {
        format!(
            "{:.2} s ({:.2}-{:.2})",
            s.median as f64 / 1000.0,
            s.min as f64 / 1000.0,
            s.max as f64 / 1000.0
        )
    })
}

/// The name of an SVM exit code (AMD APM vol. 2, appendix C), as the
/// `kvm_exit` event's `exit_reason` gives it under `kvm_amd`.
fn svm_exit_name(code: u64) -> String {
    let name = match code {
        0x00..=0x0f => return format!("read_cr{}", code),
        0x10..=0x1f => return format!("write_cr{}", code - 0x10),
        0x20..=0x2f => return format!("read_dr{}", code - 0x20),
        0x30..=0x3f => return format!("write_dr{}", code - 0x30),
        0x40..=0x5f => return format!("exception_{}", code - 0x40),
        0x60 => "intr",
        0x61 => "nmi",
        0x62 => "smi",
        0x63 => "init",
        0x64 => "vintr",
        0x65 => "cr0_sel_write",
        0x6e => "rdtsc",
        0x6f => "rdpmc",
        0x72 => "cpuid",
        0x74 => "iret",
        0x76 => "invd",
        0x77 => "pause",
        0x78 => "hlt",
        0x79 => "invlpg",
        0x7b => "ioio",
        0x7c => "msr",
        0x7f => "shutdown",
        0x81 => "vmmcall",
        0x87 => "rdtscp",
        0x89 => "wbinvd",
        0x8a => "monitor",
        0x8b => "mwait",
        0x8d => "xsetbv",
        0x400 => "npf",
        0x401 => "avic_incomplete_ipi",
        0x402 => "avic_unaccelerated",
        _ => return format!("exit_{code:#x}"),
    };
    name.to_string()
}

/// What usually answers port `port` on these machines (the same ports
/// mean the same device under every VMM of the table).
fn port_device(port: u64) -> &'static str {
    match port {
        0x20..=0x21 | 0xa0..=0xa1 => "pic",
        0x40..=0x43 => "pit",
        0x60 | 0x64 => "i8042",
        0x61 => "port61",
        0x70..=0x71 => "rtc",
        0x80..=0x8f => "dma-page",
        0x3f8..=0x3ff => "com1",
        0x2f8..=0x2ff => "com2",
        0x510..=0x51b => "fw_cfg",
        0x600..=0x60f => "acpi-pm",
        0xcf8..=0xcff => "pci-conf",
        _ => "port",
    }
}

/// What usually answers guest physical address `gpa` (the local APIC and
/// IOAPIC are in L1's kernel; chitin's virtio-mmio window starts at
/// 0xd000_0000; QEMU's microvm has a second IOAPIC at 0xfec1_0000).
fn mmio_device(gpa: u64) -> &'static str {
    match gpa {
        0xfec0_0000..=0xfec0_0fff => "ioapic",
        0xfec1_0000..=0xfec1_0fff => "ioapic2",
        0xfee0_0000..=0xfeef_ffff => "lapic",
        0xd000_0000..=0xdfff_ffff => "virtio-mmio",
        _ => "mmio",
    }
}

/// A histogram key in words: `hex/flag` pairs as the triggers print them.
fn key_name(label: &str, key: &str) -> String {
    let mut parts = key.split('/');
    let first = parts.next().unwrap_or_default();
    let second = parts.next().unwrap_or_default();
    let hex = u64::from_str_radix(first.trim_start_matches("0x"), 16).ok();
    match (label, hex) {
        ("exit", Some(code)) => svm_exit_name(code),
        ("msr", Some(index)) => {
            let op = if second == "1" { "wrmsr" } else { "rdmsr" };
            format!("{op} {index:#x}")
        }
        ("pio", Some(port)) => {
            let op = if second == "1" { "out" } else { "in" };
            format!("{} {op} {port:#x}", port_device(port))
        }
        ("mmio", Some(gpa)) => {
            // kvm_mmio's type: 0 a read not yet satisfied (counted again
            // as 1 when it is), 1 read, 2 write.
            let op = match second {
                "0" => "read?",
                "1" => "read",
                "2" => "write",
                _ => "mmio",
            };
            format!("{} {op} {gpa:#x}", mmio_device(gpa))
        }
        ("user", _) => match first {
            "2" => "io".to_string(),
            "5" => "hlt".to_string(),
            "6" => "mmio".to_string(),
            "7" => "irq_window_open".to_string(),
            "8" => "shutdown".to_string(),
            "10" => "intr".to_string(),
            "17" => "internal_error".to_string(),
            "24" => "system_event".to_string(),
            other => format!("reason {other}"),
        },
        _ => key.to_string(),
    }
}

/// One VMM's figures over its rounds.
struct Figures {
    vmm: Vmm,
    rounds: usize,
    up: Option<Spread>,
    before_kernel: Option<Spread>,
    kernel: Option<Spread>,
    rss_kib: Option<Spread>,
    threads: Option<u64>,
    /// chitin's own set-up: `main` → `start()` returned.
    setup_us: Option<Spread>,
    /// Median of each of chitin's set-up phases, in order.
    phases: Vec<(String, u64)>,
    /// Median of each exit counter.
    exits: Vec<(String, u64)>,
    /// Median of each histogram entry (absent in a round: 0).
    hists: BTreeMap<String, Vec<(String, u64)>>,
    /// Median over the rounds of all exits to user space in a round.
    user_total: Option<u64>,
    /// Median over the rounds of each device's accesses in a round.
    devices: Vec<(&'static str, u64)>,
}

fn figures(vmm: Vmm, samples: &[&Sample]) -> Figures {
    let done: Vec<&&Sample> = samples.iter().filter(|s| s.complete()).collect();
    let values = |f: &dyn Fn(&Sample) -> Option<u64>| -> Vec<u64> {
        done.iter().filter_map(|s| f(s)).collect()
    };
    let mut exit_labels: Vec<String> = Vec::new();
    for s in &done {
        for (k, _) in &s.exits {
            if !exit_labels.contains(k) {
                exit_labels.push(k.clone());
            }
        }
    }
    let exits = exit_labels
        .into_iter()
        .filter_map(|label| {
            let m = median(values(&|s| {
                s.exits.iter().find(|(k, _)| *k == label).map(|(_, v)| *v)
            }))?;
            Some((label, m))
        })
        .collect();
    let mut hists: BTreeMap<String, Vec<(String, u64)>> = BTreeMap::new();
    let labels: Vec<String> = done
        .iter()
        .flat_map(|s| s.hists.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    for label in labels {
        let mut keys: Vec<String> = Vec::new();
        for s in &done {
            for (k, _) in s.hists.get(&label).into_iter().flatten() {
                if !keys.contains(k) {
                    keys.push(k.clone());
                }
            }
        }
        let mut entries: Vec<(String, u64)> = keys
            .into_iter()
            .filter_map(|key| {
                let counts = done
                    .iter()
                    .map(|s| {
                        s.hists
                            .get(&label)
                            .and_then(|e| e.iter().find(|(k, _)| *k == key))
                            .map_or(0, |(_, v)| *v)
                    })
                    .collect();
                Some((key, median(counts)?))
            })
            .collect();
        entries.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        hists.insert(label, entries);
    }
    let user_total = median(
        done.iter()
            .filter_map(|s| s.hists.get("user"))
            .map(|e| e.iter().fold(0u64, |t, (_, n)| t.saturating_add(*n)))
            .collect(),
    );
    let per_round: Vec<Vec<(&'static str, u64)>> =
        done.iter().map(|s| by_device(&s.hists)).collect();
    let mut device_names: Vec<&'static str> = Vec::new();
    for (d, _) in per_round.iter().flatten() {
        if !device_names.contains(d) {
            device_names.push(d);
        }
    }
    let devices = device_names
        .into_iter()
        .filter_map(|d| {
            let counts = per_round
                .iter()
                .map(|r| r.iter().find(|(x, _)| *x == d).map_or(0, |(_, n)| *n))
                .collect();
            Some((d, median(counts)?))
        })
        .collect();
    Figures {
        vmm,
        rounds: done.len(),
        user_total,
        devices,
        up: spread(values(&|s| s.up_ms)),
        before_kernel: spread(values(&|s| s.before_kernel_ms())),
        kernel: spread(values(&|s| s.boottime_ms)),
        rss_kib: spread(values(&|s| s.rss_kib)),
        threads: median(values(&|s| s.threads)),
        setup_us: spread(values(&|s| s.setup_us)),
        phases: {
            let mut names: Vec<String> = Vec::new();
            for s in &done {
                for (n, _) in &s.phases {
                    if !names.contains(n) {
                        names.push(n.clone());
                    }
                }
            }
            names
                .into_iter()
                .filter_map(|n| {
                    let m = median(values(&|s| {
                        s.phases.iter().find(|(k, _)| *k == n).map(|(_, v)| *v)
                    }))?;
                    Some((n, m))
                })
                .collect()
        },
        exits,
        hists,
    }
}

impl Figures {
    fn exit(&self, label: &str) -> Option<u64> {
        self.exits.iter().find(|(k, _)| k == label).map(|(_, v)| *v)
    }

    fn hist(&self, label: &str, key: &str) -> u64 {
        self.hists
            .get(label)
            .and_then(|e| e.iter().find(|(k, _)| k == key))
            .map_or(0, |(_, v)| *v)
    }
}

/// Port I/O and MMIO accesses summed by the device that answers them
/// ([`port_device`], [`mmio_device`]); an MMIO read that went to user
/// space is traced twice (unsatisfied, then read) and counted once.
fn by_device(hists: &BTreeMap<String, Vec<(String, u64)>>) -> Vec<(&'static str, u64)> {
    let mut sums: Vec<(&'static str, u64)> = Vec::new();
    let mut add = |device: &'static str, n: u64| match sums.iter_mut().find(|(d, _)| *d == device) {
        Some((_, sum)) => *sum = sum.saturating_add(n),
        None => sums.push((device, n)),
    };
    for (label, device_of) in [
        ("pio", port_device as fn(u64) -> &'static str),
        ("mmio", mmio_device),
    ] {
        for (key, n) in hists.get(label).into_iter().flatten() {
            let mut parts = key.split('/');
            let addr = parts
                .next()
                .and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok());
            let unsatisfied = label == "mmio" && parts.next() == Some("0");
            if let (Some(addr), false) = (addr, unsatisfied) {
                add(device_of(addr), *n);
            }
        }
    }
    sums
}

fn ratio(peer: Option<u64>, chitin: Option<u64>) -> String {
    match (peer, chitin) {
        (Some(p), Some(c)) if c > 0 => format!("{:.2}", p as f64 / c as f64),
        _ => "-".to_string(),
    }
}

/// At most this many keys of a histogram are shown.
const TOP_KEYS: usize = 12;

fn print_table(kernel: L2Kernel, rounds: usize, all: &[Figures]) {
    println!(
        "\nbench-boot: {} kernel, {VCPUS} vCPU, {MEM_MIB} MiB, {rounds} interleaved rounds in one L1; median (min-max)",
        kernel.label()
    );
    println!(
        "(L1 counts every KVM exit in trace histograms during these runs: each exit costs every VMM a little more time alike)"
    );
    println!(
        "  {:<17} {:>6}  {:<22} {:<22} {:<22} {:>9} {:>7}",
        "vmm",
        "rounds",
        "start -> kernel",
        "kernel -> agent up",
        "start -> agent up",
        "RSS@up",
        "threads"
    );
    for f in all {
        println!(
            "  {:<17} {:>6}  {:<22} {:<22} {:<22} {:>9} {:>7}",
            f.vmm.name(),
            f.rounds,
            fmt_time(f.before_kernel),
            fmt_time(f.kernel),
            fmt_time(f.up),
            f.rss_kib.map_or("-".to_string(), |r| format!(
                "{:.1} MiB",
                r.median as f64 / 1024.0
            )),
            f.threads.map_or("-".to_string(), |t| t.to_string())
        );
    }
    for f in all {
        if let Some(s) = f.setup_us {
            println!(
                "  {} set-up, main -> build() -> start() returned (vCPUs running): {:.1} ms ({:.1}-{:.1})",
                f.vmm.name(),
                s.median as f64 / 1000.0,
                s.min as f64 / 1000.0,
                s.max as f64 / 1000.0
            );
            let laps: Vec<String> = f
                .phases
                .iter()
                .map(|(n, us)| format!("{n} {:.1}", *us as f64 / 1000.0))
                .collect();
            if !laps.is_empty() {
                println!("    phases, ms (median): {}", laps.join(", "));
            }
        }
    }
    let labels: Vec<String> = all
        .iter()
        .flat_map(|f| f.exits.iter().map(|(k, _)| k.clone()))
        .fold(Vec::new(), |mut acc, k| {
            if !acc.contains(&k) {
                acc.push(k);
            }
            acc
        });
    let extra = ["user", "msr"];
    println!("\nL1 KVM exits, VMM start -> agent up (median; io, mmio, msr and user depend only on the guest, hlt/irq/emulated also on wall time):");
    let header: String = labels
        .iter()
        .map(String::as_str)
        .chain(extra)
        .map(|l| format!(" {l:>10}"))
        .collect();
    println!("  {:<17}{header}", "vmm");
    for f in all {
        let cells: String = labels
            .iter()
            .map(|l| f.exit(l))
            .chain([
                f.user_total,
                f.hists.get("exit").map(|_| f.hist("exit", "7c")),
            ])
            .map(|v| format!(" {:>10}", v.map_or("-".to_string(), |v| v.to_string())))
            .collect();
        println!("  {:<17}{cells}", f.vmm.name());
    }
    if let Some(chitin) = all.iter().find(|f| f.vmm == Vmm::Chitin) {
        if all.len() > 1 {
            println!("\nratios to chitin (peer / chitin; above 1: chitin is ahead):");
            println!(
                "  {:<17} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                "vmm", "start->up", "->kernel", "kernel", "exits", "user", "RSS"
            );
            for f in all.iter().filter(|f| f.vmm != Vmm::Chitin) {
                let med = |s: Option<Spread>| s.map(|s| s.median);
                println!(
                    "  {:<17} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                    f.vmm.name(),
                    ratio(med(f.up), med(chitin.up)),
                    ratio(med(f.before_kernel), med(chitin.before_kernel)),
                    ratio(med(f.kernel), med(chitin.kernel)),
                    ratio(f.exit("total"), chitin.exit("total")),
                    ratio(f.user_total, chitin.user_total),
                    ratio(med(f.rss_kib), med(chitin.rss_kib)),
                );
            }
        }
    }
    if all.iter().any(|f| f.hists.contains_key("pio")) {
        let sums: Vec<&Vec<(&'static str, u64)>> = all.iter().map(|f| &f.devices).collect();
        let mut devices: Vec<(&'static str, u64)> = Vec::new();
        for (d, n) in sums.iter().copied().flatten() {
            match devices.iter_mut().find(|(x, _)| x == d) {
                Some((_, most)) => *most = (*most).max(*n),
                None => devices.push((d, *n)),
            }
        }
        devices.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        println!("\nport I/O and MMIO accesses by device (median per boot; the lapic is in L1's kernel for all, the ioapic for chitin and Firecracker; the MMIO table's `read?` rows are reads that went to the VMM):");
        let header: String = all
            .iter()
            .map(|f| format!(" {:>16}", f.vmm.name()))
            .collect();
        println!("  {:<32}{header}", "");
        for (device, _) in &devices {
            let cells: String = sums
                .iter()
                .map(|s| {
                    let n = s.iter().find(|(d, _)| d == device).map_or(0, |(_, n)| *n);
                    format!(" {n:>16}")
                })
                .collect();
            println!("  {device:<32}{cells}");
        }
    }
    for (label, title) in [
        ("exit", "exits by reason"),
        ("user", "exits to the VMM (user space) by reason"),
        ("msr", "MSR accesses"),
        ("pio", "port I/O"),
        ("mmio", "MMIO"),
    ] {
        if !all.iter().any(|f| f.hists.contains_key(label)) {
            continue;
        }
        // Rows: the keys most hit under any VMM.
        let mut keys: Vec<(String, u64)> = Vec::new();
        for f in all {
            for (k, v) in f.hists.get(label).into_iter().flatten() {
                match keys.iter_mut().find(|(key, _)| key == k) {
                    Some((_, most)) => *most = (*most).max(*v),
                    None => keys.push((k.clone(), *v)),
                }
            }
        }
        keys.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        println!("\n{title} (median per boot, the {TOP_KEYS} most hit):");
        let header: String = all
            .iter()
            .map(|f| format!(" {:>16}", f.vmm.name()))
            .collect();
        println!("  {:<32}{header}", "");
        for (key, _) in keys.iter().take(TOP_KEYS) {
            let cells: String = all
                .iter()
                .map(|f| format!(" {:>16}", f.hist(label, key)))
                .collect();
            println!("  {:<32}{cells}", key_name(label, key));
        }
    }
}

/// Entry point.
pub fn bench_boot(args: &[String]) -> Step {
    let options = parse_options(args)?;
    prerequisites()?;
    let peers = peers_from_env(options.kernel)?;
    let mut vmms = vec![Vmm::Chitin, Vmm::Qemu];
    vmms.extend(peers.iter().map(|(v, _)| *v));
    let mut tools = build_tools(
        &[KERNEL_6_1, options.kernel],
        guest::test_initramfs,
        guest::debian_test_initramfs,
    )?;
    for (vmm, path) in &peers {
        tools.extra_files.push((vmm.l1_binary(), path.clone()));
    }
    tools.extra_data.push((
        FIRECRACKER_CONFIG.to_string(),
        firecracker_config(options.kernel).into_bytes(),
    ));
    // L1's init keeps the trace histograms when this file exists.
    tools
        .extra_data
        .push(("/nested/trace-exits".to_string(), b"yes\n".to_vec()));
    let runs = plan(
        &vmms,
        options.rounds,
        options.kernel,
        options.density,
        options.density_mem,
    );
    tools.l1_mem_mib = L1_BASE_MIB + L1_MIB_PER_SANDBOX * options.density as u32;
    let lines: Vec<String> = runs.iter().map(|(_, _, l)| l.clone()).collect();
    let disks = Disks {
        images: Vec::new(),
        discard_allocated_before: Vec::new(),
    };
    let log = boot_l1(&tools, &lines, &disks)?;
    let samples = parse_log(&log);
    let mut all = Vec::new();
    let mut missing = Vec::new();
    for vmm in &vmms {
        let mine: Vec<&Sample> = runs
            .iter()
            .filter(|(name, v, _)| v == vmm && name != WARMUP.name && name != DENSITY_RUN)
            .filter_map(|(name, _, _)| samples.get(name))
            .collect();
        let f = figures(*vmm, &mine);
        if f.rounds < options.rounds {
            let exits: Vec<String> = mine
                .iter()
                .filter(|s| !s.complete())
                .map(|s| s.exit.clone().unwrap_or_else(|| "never ran".into()))
                .collect();
            missing.push(format!(
                "{}: {} of {} boots reached agent up with its kernel time (the others ended: {})",
                vmm.name(),
                f.rounds,
                options.rounds,
                exits.join(", ")
            ));
        }
        all.push(f);
    }
    print_table(options.kernel, options.rounds, &all);
    if options.density > 0 {
        let density = parse_density(&log);
        if let Err(e) = print_density(options.density, options.density_mem, &density, &all) {
            missing.push(e);
        }
    }
    // L1's runner says what it could not count (a histogram it could not
    // read or that dropped events): the table must not pass zeros off as
    // counts.
    missing.extend(
        log.iter()
            .filter(|l| l.starts_with("nested: error"))
            .map(|l| l.trim_start_matches("nested: ").to_string()),
    );
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "bench-boot: {} (L1's console log has each run)",
            missing.join("; ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn options_default_and_parse() {
        assert_eq!(
            parse_options(&[]),
            Ok(Options {
                rounds: DEFAULT_ROUNDS,
                kernel: KERNEL_6_1,
                density: DEFAULT_DENSITY,
                density_mem: MEM_MIB,
            })
        );
        let args: Vec<String> = [
            "--rounds",
            "3",
            "--distro",
            "debian",
            "--density",
            "0",
            "--density-mem",
            "256",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            parse_options(&args),
            Ok(Options {
                rounds: 3,
                kernel: KERNEL_DEBIAN,
                density: 0,
                density_mem: 256,
            })
        );
        assert!(parse_options(&["--density-mem".into(), "8".into()]).is_err());
        assert!(parse_options(&["--density".into(), "x".into()]).is_err());
        assert!(parse_options(&["--rounds".into(), "0".into()]).is_err());
        assert!(parse_options(&["--fast".into()]).is_err());
    }

    #[test]
    fn plan_rotates_the_order_each_round_after_one_warm_up() {
        let runs = plan(
            &[Vmm::Chitin, Vmm::Qemu, Vmm::Firecracker],
            2,
            KERNEL_6_1,
            0,
            MEM_MIB,
        );
        let names: Vec<&str> = runs.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(
            names,
            [
                WARMUP.name,
                "chitin#1",
                "qemu-microvm#1",
                "firecracker#1",
                "qemu-microvm#2",
                "firecracker#2",
                "chitin#2"
            ]
        );
        // Same kernel, initramfs and guest for every VMM.
        for (_, _, line) in &runs[1..] {
            assert!(line.contains(&format!("\t{UP_MARKER}\t")), "{line}");
        }
        assert!(runs[1]
            .2
            .contains("/l2/6.1/vmlinux\t--initrd\t/l2/6.1/initramfs.cpio"));
        assert!(runs[3]
            .2
            .contains("--config-file\t/nested/firecracker.json"));
        let config = firecracker_config(KERNEL_6_1);
        assert!(config.contains("\"kernel_image_path\": \"/l2/6.1/vmlinux\""));
        assert!(config.contains("chitin.scenario=bench"));
        assert!(config.contains("\"vcpu_count\": 1"));
    }

    #[test]
    fn density_run_is_last_and_its_lines_are_parsed_by_moment() {
        let runs = plan(&[Vmm::Chitin], 1, KERNEL_6_1, 4, 256);
        let (name, _, line) = runs.last().unwrap();
        assert_eq!(name, DENSITY_RUN);
        assert!(line.ends_with(
            "/bin/chitin-exec-checks\tdensity\t/l2/6.1/vmlinux\t/l2/6.1/initramfs.cpio\t4\t256"
        ));
        assert!(line.contains("\tchitin-density: at=all\t"), "{line}");
        let log = lines(
            "| chitin-density: at=base sandboxes=0 rss_kib=1000 threads=1\n\
             nested: begin density\n\
             nested: marker density 5\n\
             | chitin-density: at=base sandboxes=0 rss_kib=2000 guest_kib=0 threads=1\n\
             | chitin-density: at=one sandboxes=1 rss_kib=30000 guest_kib=25000 threads=5\n\
             | chitin-check: density PASS 4 sandboxes answered\n\
             nested: end density exit=0 ms=9\n\
             | chitin-density: at=one rss_kib=7\n",
        );
        let d = parse_density(&log);
        assert_eq!(d.get("base", "rss_kib"), Some(2000));
        assert_eq!(d.get("one", "guest_kib"), Some(25000));
        assert_eq!(d.get("one", "rss_kib"), Some(30000));
        assert_eq!(d.get("all", "rss_kib"), None);
        assert_eq!(d.check.as_deref(), Some("PASS 4 sandboxes answered"));
        // A missing moment is an error, not a zero.
        assert!(print_density(4, 128, &d, &[]).is_err());
        let log = lines(
            "nested: begin density\n\
             | chitin-density: at=base sandboxes=0 rss_kib=1528 pss_kib=1500 guest_kib=0 threads=1 fds=4 l1_available_drop_kib=0\n\
             | chitin-density: at=one sandboxes=1 rss_kib=39480 pss_kib=39000 guest_kib=34816 threads=5 fds=25 l1_available_drop_kib=4580\n\
             | chitin-density: at=all sandboxes=6 rss_kib=216368 pss_kib=216000 guest_kib=208896 threads=26 fds=130 l1_available_drop_kib=184512\n\
             | chitin-density: at=times sandboxes=6 first_up_ms=2863 rest_started_ms=1454 rest_median_up_ms=16606 rest_all_up_ms=16648\n\
             | chitin-density: at=dropped sandboxes=0 rss_kib=1600 pss_kib=1550 guest_kib=0 threads=1 fds=4 l1_available_drop_kib=100\n\
             | chitin-density: at=clones sandboxes=6 rss_kib=60000 pss_kib=20000 guest_kib=50000 threads=26 fds=130 l1_available_drop_kib=20000\n\
             | chitin-density: at=clone-times sandboxes=6 median_up_ms=300 all_up_ms=400\n\
             | chitin-check: density PASS 6 sandboxes answered\n\
             nested: end density exit=0 ms=19901\n",
        );
        assert_eq!(print_density(6, 128, &parse_density(&log), &[]), Ok(()));
        let failed = Density {
            check: Some("FAIL sandbox 3: no kernel".into()),
            ..Density::default()
        };
        assert_eq!(
            print_density(4, 128, &failed, &[]),
            Err("density: FAIL sandbox 3: no kernel".to_string())
        );
    }

    #[test]
    fn log_gives_times_split_at_the_kernel_and_counts() {
        let log = lines(
            "nested: begin chitin#1\n\
             ! chitin: timings build_ms=12.5 start_ms=14.25\n\
             ! DEBUG chitin::timing: build() 12.0 ms: checks 0.5 ms, kernel 11.5 ms\n\
             | chitin-agent: up version=3 scenario=bench boottime_ms=1500\n\
             nested: marker chitin#1 2100\n\
             nested: exits chitin#1 total=900 io=300 mmio=40\n\
             nested: memory chitin#1 rss_kib=20480 hwm_kib=21000 threads=3\n\
             nested: hist chitin#1 exit 7b=300 7c=12\n\
             nested: hist chitin#1 pio 3f8/1=250\n\
             nested: end chitin#1 exit=0 ms=2500\n\
             nested: begin qemu-microvm#1\n\
             nested: end qemu-microvm#1 exit=timeout ms=60000\n",
        );
        let samples = parse_log(&log);
        let c = &samples["chitin#1"];
        assert_eq!(c.up_ms, Some(2100));
        assert_eq!(c.boottime_ms, Some(1500));
        assert_eq!(c.before_kernel_ms(), Some(600));
        assert_eq!(c.exits[0], ("total".to_string(), 900));
        assert_eq!(c.rss_kib, Some(20480));
        assert_eq!(c.threads, Some(3));
        assert_eq!(c.setup_us, Some(14250));
        assert_eq!(
            c.phases,
            [
                ("build() checks".to_string(), 500),
                ("build() kernel".to_string(), 11500)
            ]
        );
        assert_eq!(
            c.hists["exit"],
            [("7b".to_string(), 300), ("7c".to_string(), 12)]
        );
        let q = &samples["qemu-microvm#1"];
        assert!(!q.complete());
        assert_eq!(q.exit.as_deref(), Some("timeout"));
        let f = figures(Vmm::Chitin, &[c, q]);
        assert_eq!(f.rounds, 1);
        assert_eq!(f.kernel.map(|s| s.median), Some(1500));
        assert_eq!(f.exit("io"), Some(300));
        assert_eq!(f.hist("exit", "7c"), 12);
        assert_eq!(f.hist("exit", "7b"), 300);
    }

    #[test]
    fn spread_and_medians_count_missing_keys_as_zero() {
        assert_eq!(
            spread(vec![5, 1, 3]),
            Some(Spread {
                median: 3,
                min: 1,
                max: 5
            })
        );
        assert_eq!(spread(Vec::new()), None);
        // An even count: the mean of the two middle values.
        assert_eq!(spread(vec![10, 1, 3, 2]).map(|s| s.median), Some(2));
        assert_eq!(spread(vec![4, 6]).map(|s| s.median), Some(5));
        assert_eq!(
            spread(vec![u64::MAX, u64::MAX]).map(|s| s.median),
            Some(u64::MAX)
        );
        let a = Sample {
            up_ms: Some(10),
            boottime_ms: Some(5),
            hists: [("msr".to_string(), vec![("c0010007/1".to_string(), 4)])].into(),
            ..Sample::default()
        };
        let b = Sample {
            up_ms: Some(10),
            boottime_ms: Some(5),
            hists: [("msr".to_string(), Vec::new())].into(),
            ..Sample::default()
        };
        let c = Sample {
            up_ms: Some(10),
            boottime_ms: Some(5),
            hists: [("msr".to_string(), vec![("c0010007/1".to_string(), 2)])].into(),
            ..Sample::default()
        };
        let f = figures(Vmm::Chitin, &[&a, &b, &c]);
        assert_eq!(f.hist("msr", "c0010007/1"), 2);
    }

    #[test]
    fn accesses_are_summed_by_device_counting_a_user_space_read_once() {
        let sample = Sample {
            up_ms: Some(1),
            boottime_ms: Some(1),
            hists: [
                (
                    "pio".to_string(),
                    vec![("3f8/1".to_string(), 100), ("3fd/0".to_string(), 60)],
                ),
                (
                    "mmio".to_string(),
                    vec![
                        ("d0000050/0".to_string(), 5),
                        ("d0000050/1".to_string(), 5),
                        ("fee000b0/2".to_string(), 7),
                    ],
                ),
            ]
            .into(),
            ..Sample::default()
        };
        let sums = by_device(&sample.hists);
        let f = figures(Vmm::Chitin, &[&sample, &sample]);
        assert_eq!(f.devices, sums);
        assert!(sums.contains(&("com1", 160)), "{sums:?}");
        assert!(sums.contains(&("virtio-mmio", 5)), "{sums:?}");
        assert!(sums.contains(&("lapic", 7)), "{sums:?}");
    }

    #[test]
    fn keys_are_named() {
        assert_eq!(key_name("exit", "7c"), "msr");
        assert_eq!(key_name("exit", "400"), "npf");
        assert_eq!(key_name("exit", "4e"), "exception_14");
        assert_eq!(key_name("msr", "c0010007/1"), "wrmsr 0xc0010007");
        assert_eq!(key_name("pio", "3f8/1"), "com1 out 0x3f8");
        assert_eq!(key_name("pio", "0x70/0"), "rtc in 0x70");
        assert_eq!(key_name("pio", "cfc/0"), "pci-conf in 0xcfc");
        assert_eq!(
            key_name("mmio", "d0000000/2"),
            "virtio-mmio write 0xd0000000"
        );
        assert_eq!(key_name("mmio", "fee000b0/2"), "lapic write 0xfee000b0");
        assert_eq!(key_name("user", "2"), "io");
    }
}
