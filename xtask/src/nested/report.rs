//! Reading L1's console log: one [`Run`] per scheduled run, judged by its
//! scenario's judge, and the results table.
//!
//! The log is untrusted text (a guest kernel and a VMM under test wrote
//! it): a judge passes a run only on the lines it needs, and a run with no
//! passing check at all fails.

use chitin_agent_protocol::VERSION as AGENT_VERSION;
use chitin_testkit::{CheckLine, Done, CHECK_PREFIX, UP_MARKER};

use super::scenarios::{l2_cmdline, Scenario, BOOT_REPEATS, WARMUP};
use super::SILENT_EXIT;
use crate::disks::{self, Disks};
use crate::util::Step;

/// What one scenario produced in the L1 log.
#[derive(Default)]
pub struct Run {
    /// The scenario's agent name (`boot` for `boot-qemu`).
    agent_scenario: String,
    /// The L2 command line passed.
    cmdline: String,
    /// The scenario's `--disk` values (`@serial[,options]`).
    disks: Vec<&'static str>,
    /// The L2 kernel version the scenario boots (`6.1`, `6.12`).
    kernel: &'static str,
    /// Debian's cloud kernel: its release ends in `-cloud-amd64`.
    debian: bool,
    /// Whether the guest must have found ACPI tables.
    acpi: bool,
    /// The line the VMM must end with (`chitin: guest powered off`), for
    /// chitin's own runs of the `boot` example.
    exit_line: Option<&'static str>,
    /// Console lines of the child (`| ` prefix removed) and its stderr.
    lines: Vec<String>,
    /// The child's stderr alone (`! ` lines): what the VMM itself said,
    /// which the guest cannot write.
    stderr: Vec<String>,
    marker_ms: Option<u64>,
    /// L1 KVM's exit counters of the run's VM at the marker, by label.
    exits: Vec<(String, u64)>,
    console: Option<String>,
    exit: Option<String>,
    ms: Option<u64>,
}

impl Run {
    fn has(&self, needle: &str) -> bool {
        self.lines.iter().any(|l| l.contains(needle))
    }

    /// Every well-formed check line, in order.
    fn checks(&self) -> Vec<CheckLine> {
        self.lines
            .iter()
            .filter_map(|l| CheckLine::parse(l))
            .collect()
    }

    /// The detail of check `name` if it passed.
    fn passed(&self, name: &str) -> Option<String> {
        self.checks()
            .into_iter()
            .find(|c| c.passed && c.name == name)
            .map(|c| c.detail)
    }

    /// The first failed check, as its line.
    fn first_failure(&self) -> Option<String> {
        self.checks()
            .into_iter()
            .find(|c| !c.passed)
            .map(|c| c.to_string())
    }

    /// Whether the run ended with a summary line that vouches for the
    /// check lines seen (at least one pass, no failure, counts agree).
    fn summary(&self) -> Result<(), String> {
        let done = self
            .lines
            .iter()
            .rev()
            .find_map(|l| Done::parse(l))
            .ok_or("no `chitin-agent: done pass=<n> fail=<m>` line")?;
        // Lines that began as check lines but were cut into.
        let garbled = self
            .lines
            .iter()
            .filter(|l| l.contains(CHECK_PREFIX.trim_end()) && CheckLine::parse(l).is_none())
            .count();
        done.vouches_for(&self.checks(), garbled)
    }
}

/// How chitin's `boot` example must report the end of scenario `s`: a
/// guest that powers off on an ACPI machine ends with `PowerOff`; a
/// reboot, a panic (`panic=-1`) and any stop on a machine without ACPI
/// with `Reset`. `None` for peers and host checks.
fn expected_exit_line(s: &Scenario) -> Option<&'static str> {
    if s.peer || s.host_checks.is_some() {
        None
    } else if s.no_acpi || s.agent == "reset" || s.agent == "panic" {
        Some("chitin: guest reset")
    } else {
        Some("chitin: guest powered off")
    }
}

/// Split the log into one [`Run`] per scheduled run.
fn parse_runs(runs: &[(String, &Scenario)], log: &[String]) -> Vec<Run> {
    let mut parsed: Vec<Run> = runs
        .iter()
        .map(|(_, s)| Run {
            agent_scenario: s.agent.to_string(),
            cmdline: l2_cmdline(s),
            disks: s.disks.to_vec(),
            kernel: s.kernel.version.name(),
            debian: s.kernel.debian,
            acpi: !s.no_acpi,
            exit_line: expected_exit_line(s),
            ..Run::default()
        })
        .collect();
    let index = |name: &str| runs.iter().position(|(n, _)| n == name);
    let mut current: Option<usize> = None;
    for line in log {
        if line.starts_with("nested: alive") {
            // L1's heartbeat: only the harness's silence detector reads it.
        } else if let Some(name) = line.strip_prefix("nested: begin ") {
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
        } else if let Some(rest) = line.strip_prefix("nested: exits ") {
            let mut f = rest.split_whitespace();
            if let Some(i) = f.next().and_then(index) {
                parsed[i].exits = f
                    .filter_map(|kv| kv.split_once('='))
                    .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
                    .collect();
            }
        } else if let Some(rest) = line.strip_prefix("nested: console ") {
            if let Some((name, sum)) = rest.split_once(' ') {
                if let Some(i) = index(name) {
                    parsed[i].console = Some(sum.to_string());
                }
            }
        } else if let Some(i) = current {
            if let Some(err) = line.strip_prefix("! ") {
                parsed[i].stderr.push(err.to_string());
            }
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
pub fn judge_checks(run: &Run, _disks: &Disks) -> Result<String, String> {
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
    if let Some(fail) = run.first_failure() {
        return Err(fail);
    }
    run.summary()
        .map_err(|e| format!("agent did not finish with every check passed: {e}"))?;
    check_acpi_and_exit(run)?;
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
    let release = run
        .lines
        .iter()
        .find_map(|l| l.strip_prefix("chitin-agent: kernel "))
        .unwrap_or_default();
    check_kernel(run, release)?;
    passed_checks(run)
}

/// The guest found ACPI tables exactly when the run gave it some, and the
/// VMM (on its stderr, which the guest cannot write) reported the stop the
/// run expects.
fn check_acpi_and_exit(run: &Run) -> Result<(), String> {
    let acpi = check_value(run, "acpi-log", "acpi")?;
    let want = if run.acpi { "on" } else { "off" };
    if acpi != want {
        return Err(format!("the guest ran with acpi={acpi}, want acpi={want}"));
    }
    if let Some(line) = run.exit_line {
        if !run.stderr.iter().any(|l| l.trim() == line) {
            return Err(format!("the VMM did not end with `{line}`"));
        }
    }
    Ok(())
}

/// The guest reported a kernel `release` of the version the run meant to
/// boot (`6.12.95` for `6.12`): a mix-up of kernel images fails.
fn check_kernel(run: &Run, release: &str) -> Result<(), String> {
    if release.starts_with(&format!("{}.", run.kernel))
        && release.ends_with("-cloud-amd64") == run.debian
    {
        Ok(())
    } else {
        Err(format!(
            "guest runs kernel {release:?}, want Linux {}",
            run.kernel
        ))
    }
}

/// The run's passed checks as `name: detail`, joined for the table; a run
/// that passed no check at all fails.
fn passed_checks(run: &Run) -> Result<String, String> {
    let passed: Vec<String> = run
        .checks()
        .into_iter()
        .filter(|c| c.passed)
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect();
    if passed.is_empty() {
        return Err("no check passed".into());
    }
    Ok(passed.join("; "))
}

pub fn judge_panic(run: &Run, _disks: &Disks) -> Result<String, String> {
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
    check_acpi_and_exit(run)?;
    Ok("panic message captured, guest reset".into())
}

pub fn judge_console(run: &Run, disks: &Disks) -> Result<String, String> {
    let sent = run
        .passed("console-pattern")
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
    run.passed(check)
        .and_then(|detail| {
            detail
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_string))
        })
        .ok_or_else(|| format!("no `{key}=` in a passing `{check}` check"))
}

/// Host-side checks: exit 0, every check passed, summary line, and the
/// guest ran the scenario's kernel.
pub fn judge_host_checks(run: &Run, disks: &Disks) -> Result<String, String> {
    let passed = judge_l1_checks(run, disks)?;
    let release = run.passed("guest-kernel").unwrap_or_default();
    check_kernel(run, &release)?;
    Ok(passed)
}

/// Checks in L1, with or without a guest (containerd with runc boots
/// none): exit 0, every check passed, summary line.
pub fn judge_l1_checks(run: &Run, _disks: &Disks) -> Result<String, String> {
    if let Some(fail) = run.first_failure() {
        return Err(fail);
    }
    let exit = run.exit.as_deref().unwrap_or("none");
    if exit != "0" {
        return Err(format!("checks did not all pass (exit {exit})"));
    }
    run.summary()
        .map_err(|e| format!("checks did not all pass: {e}"))?;
    passed_checks(run)
}

/// What the `boot` example says once it is jailed.
pub const JAILED_LINE: &str = "chitin: jailed as uid 1000 gid 1000";

/// A boot whose VMM said it ran jailed as uid/gid 1000.
pub fn judge_jailed_boot(run: &Run, disks: &Disks) -> Result<String, String> {
    let checks = judge_checks(run, disks)?;
    let jailed = run
        .lines
        .iter()
        .find(|l| l.contains(JAILED_LINE))
        .ok_or_else(|| format!("no `{JAILED_LINE}` line: the VMM did not run jailed"))?;
    Ok(format!("{}; {checks}", jailed.trim_start_matches("! ")))
}

/// The serial of the scenario's first `@serial` disk.
fn first_serial(run: &Run) -> Result<&'static str, String> {
    run.disks
        .iter()
        .filter_map(|d| d.strip_prefix('@'))
        .map(|d| d.split(',').next().unwrap_or(d))
        .next()
        .ok_or_else(|| "the scenario has no disk".to_string())
}

pub fn judge_blk(run: &Run, disks: &Disks) -> Result<String, String> {
    judge_checks(run, disks)?;
    let fnv = check_value(run, "write-files", "big_fnv")?;
    disks::check_blk(disks, first_serial(run)?, &fnv)
}

/// The integrity image is the scenario's `@integrity*` disk.
pub fn judge_integrity(run: &Run, disks: &Disks) -> Result<String, String> {
    judge_checks(run, disks)?;
    let fnv = check_value(run, "integrity", "fnv")?;
    let serial = run
        .disks
        .iter()
        .filter_map(|d| d.strip_prefix('@'))
        .map(|d| d.split(',').next().unwrap_or(d))
        .find(|serial| serial.starts_with("integrity"))
        .ok_or("the scenario has no integrity disk")?;
    disks::check_integrity(disks, serial, &fnv)
}

pub fn judge_discard(run: &Run, disks: &Disks) -> Result<String, String> {
    judge_checks(run, disks)?;
    disks::check_discard(disks, first_serial(run)?)
}

/// Whether a line is the harness's diagnosis of a wedged L1.
fn is_diagnosis(line: &str) -> bool {
    [
        "nested: l1 silent",
        "nested: host",
        "nested: monitor",
        "nested: after-poke",
        "nested: sysrq",
    ]
    .iter()
    .any(|p| line.starts_with(p))
}

/// A failed run's last 40 console lines, then the whole diagnosis of a
/// wedged L1 if there is one.
fn print_failure(name: &str, run: &Run) {
    println!("\n--- {name}: last console lines");
    let console: Vec<&String> = run.lines.iter().filter(|l| !is_diagnosis(l)).collect();
    for line in &console[console.len().saturating_sub(40)..] {
        println!("    {line}");
    }
    let diagnosis: Vec<&String> = run.lines.iter().filter(|l| is_diagnosis(l)).collect();
    if !diagnosis.is_empty() {
        println!("--- {name}: L1 went silent");
        for line in diagnosis {
            println!("    {line}");
        }
    }
}

fn fmt_ms(ms: Option<u64>) -> String {
    ms.map_or("-".into(), |ms| format!("{:.2} s", ms as f64 / 1000.0))
}

/// Each exit counter's median over `runs` (those that reported it).
fn median_exits(runs: &[&Run]) -> Vec<(String, u64)> {
    let Some(first) = runs.iter().find(|r| !r.exits.is_empty()) else {
        return Vec::new();
    };
    first
        .exits
        .iter()
        .filter_map(|(label, _)| {
            let values = runs
                .iter()
                .filter_map(|r| r.exits.iter().find(|(l, _)| l == label).map(|(_, v)| *v))
                .collect();
            Some((label.clone(), median(values)?))
        })
        .collect()
}

/// The timed rows' exit counters at agent up, chitin next to QEMU, and
/// the ratio of their totals.
fn print_exit_table(pairs: &[(&str, &str, &str)], medians: &[(&str, Vec<(String, u64)>)]) {
    let find = |name: &str| {
        medians
            .iter()
            .find(|(n, e)| *n == name && !e.is_empty())
            .map(|(_, e)| e)
    };
    if !pairs
        .iter()
        .any(|(_, c, q)| find(c).is_some() || find(q).is_some())
    {
        return;
    }
    let labels: Vec<&String> = medians
        .iter()
        .find(|(_, e)| !e.is_empty())
        .map(|(_, e)| e.iter().map(|(l, _)| l).collect())
        .unwrap_or_default();
    println!(
        "L1 KVM exits, VMM start -> agent up (median of {BOOT_REPEATS}; io and mmio depend only on the guest, hlt/irq/emulated also grow with wall time):"
    );
    let header: String = labels.iter().map(|l| format!(" {l:>10}")).collect();
    println!("  {:<18}{header}", "row");
    for (_, chitin, qemu) in pairs {
        for name in [chitin, qemu] {
            if let Some(exits) = find(name) {
                let cells: String = labels
                    .iter()
                    .map(|l| {
                        let v = exits.iter().find(|(k, _)| k == *l).map(|(_, v)| *v);
                        format!(" {:>10}", v.map_or("-".to_string(), |v| v.to_string()))
                    })
                    .collect();
                println!("  {name:<18}{cells}");
            }
        }
        let total = |name: &str| {
            find(name).and_then(|e| e.iter().find(|(k, _)| k == "total").map(|(_, v)| *v))
        };
        if let (Some(c), Some(q)) = (total(chitin), total(qemu)) {
            println!(
                "  {:<18} QEMU/chitin total exits {:.2}",
                "",
                q as f64 / c.max(1) as f64
            );
        }
    }
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
        Some(SILENT_EXIT) => Err(
            "L1 went silent during this run (no console line, not even its heartbeat); \
             the diagnosis is below"
                .to_string(),
        ),
        Some(_) => (s.judge)(run, disks),
    }
}

pub fn report(
    selected: &[&Scenario],
    runs: &[(String, &Scenario)],
    log: &[String],
    disks: &Disks,
) -> Step {
    let parsed = parse_runs(runs, log);
    println!();
    println!(
        "{:<21} {:<12} {:<6} {:>14} {:>10}  detail",
        "scenario", "L2 kernel", "result", "VMM start->up", "total"
    );
    let mut failures = Vec::new();
    let mut up_medians = Vec::new();
    let mut exit_medians: Vec<(&str, Vec<(String, u64)>)> = Vec::new();
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
        if s.timed {
            let runs: Vec<&Run> = mine.iter().map(|(_, r)| *r).collect();
            exit_medians.push((s.name, median_exits(&runs)));
        }
        let runs_note = if mine.len() > 1 {
            format!(" (median of {})", mine.len())
        } else {
            String::new()
        };
        println!(
            "{:<21} {:<12} {:<6} {:>14} {:>10}  {detail}{runs_note}",
            s.name,
            s.kernel.label(),
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
    let pairs = [
        ("minimal 6.1 ELF, ACPI", "boot", "boot-qemu-acpi"),
        ("minimal 6.1 ELF, acpi=off", "boot-acpi-off", "boot-qemu"),
        (
            "Debian cloud 6.1 bzImage, ACPI",
            "boot-debian",
            "boot-qemu-debian",
        ),
    ];
    if pairs
        .iter()
        .any(|(_, c, q)| find(c).is_some() || find(q).is_some())
    {
        println!("boot, VMM start -> agent up (median of {BOOT_REPEATS} interleaved rounds):");
        println!(
            "  {:<32} {:>8} {:>14} {:>12}",
            "guest", "chitin", "QEMU microvm", "QEMU/chitin"
        );
        for (label, chitin, qemu) in pairs {
            let (c, q) = (find(chitin), find(qemu));
            let ratio = match (c, q) {
                (Some(c), Some(q)) => format!("{:.2}", q as f64 / c.max(1) as f64),
                _ => "-".to_string(),
            };
            println!(
                "  {label:<32} {:>8} {:>14} {ratio:>12}",
                fmt_ms(c),
                fmt_ms(q)
            );
        }
    }
    print_exit_table(&pairs, &exit_medians);
    let health = l1_health(log);
    println!(
        "{:<21} {:<12} {:<6} {:>14} {:>10}  {}",
        "l1-health",
        "-",
        if health.is_ok() { "PASS" } else { "FAIL" },
        "-",
        "-",
        match &health {
            Ok(d) | Err(d) => d,
        }
    );
    for (name, run) in &failures {
        print_failure(name, run);
    }
    if health.is_err() && failures.is_empty() {
        // A wedge between runs belongs to no run: show its diagnosis here.
        let diagnosis: Vec<&String> = log.iter().filter(|l| is_diagnosis(l)).collect();
        if !diagnosis.is_empty() {
            println!("\n--- l1-health: L1 went silent");
            for line in diagnosis {
                println!("    {line}");
            }
        }
    }
    let failed = failures.len() + usize::from(health.is_err());
    let total = selected.len() + 2;
    println!("{} passed, {failed} failed", total - failed.min(total));
    if failed == 0 {
        Ok(())
    } else {
        Err(format!("{failed} nested run(s) failed"))
    }
}

/// Longest time L1's heartbeat may take: it comes every 10 s, and a
/// longer gap means L1's timers stopped for a while even if the run did
/// not go silent long enough to be called wedged.
const HEARTBEAT_GAP_LIMIT_S: u64 = 20;

/// Whether L1 itself stayed healthy over the whole log: it never went
/// silent, its kernel reported no soft lockup, and no heartbeat gap was
/// above [`HEARTBEAT_GAP_LIMIT_S`] (uptimes in `nested: alive <s>`, from
/// L1's start to its `done`; a fresh L1 starts counting again).
fn l1_health(log: &[String]) -> Result<String, String> {
    if let Some(silent) = log.iter().find(|l| l.starts_with("nested: l1 silent")) {
        return Err(format!("L1 went silent: {silent}"));
    }
    let lockups: Vec<&String> = log.iter().filter(|l| l.contains("soft lockup")).collect();
    let mut beats = 0usize;
    let mut longest = 0u64;
    let mut last: Option<u64> = None;
    for line in log {
        if line.contains("nested: l1 up") {
            last = Some(0);
        }
        let Some(up) = line
            .strip_prefix("nested: alive ")
            .and_then(|v| v.trim().parse::<u64>().ok())
        else {
            continue;
        };
        beats += 1;
        if let Some(prev) = last.filter(|p| *p <= up) {
            longest = longest.max(up - prev);
        }
        last = Some(up);
    }
    let summary = format!("{beats} heartbeats, longest gap {longest} s");
    if let Some(first) = lockups.first() {
        return Err(format!(
            "L1's kernel reported {} soft lockup(s) ({summary}): {first}",
            lockups.len()
        ));
    }
    if beats == 0 {
        return Err("no heartbeat from L1 at all".into());
    }
    if longest > HEARTBEAT_GAP_LIMIT_S {
        return Err(format!(
            "L1's timers stalled: {summary}, above {HEARTBEAT_GAP_LIMIT_S} s"
        ));
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nested::scenarios::SCENARIOS;

    fn scenario(name: &str) -> &'static Scenario {
        SCENARIOS.iter().find(|s| s.name == name).unwrap()
    }

    fn no_disks() -> Disks {
        Disks {
            images: Vec::new(),
            discard_allocated_before: Vec::new(),
        }
    }

    /// The console of one run of `s` named `name`, between its begin and
    /// end lines.
    fn console(name: &str, body: &[String], exit: &str) -> Vec<String> {
        let mut log = vec![format!("nested: begin {name}")];
        log.extend(body.iter().cloned());
        log.push(format!("nested: end {name} exit={exit} ms=1234"));
        log
    }

    fn host_check_lines(checks: &[&str], fail: u32) -> Vec<String> {
        let mut lines = vec![format!(
            "| chitin-agent: up version={AGENT_VERSION} scenario=exec (host checks)"
        )];
        lines.extend(checks.iter().map(|c| format!("| chitin-check: {c}")));
        lines.push(format!(
            "| chitin-agent: done pass={} fail={fail}",
            checks.len()
        ));
        lines
    }

    fn judge_one(name: &str, log: &[String]) -> Result<String, String> {
        let s = scenario(name);
        let runs = vec![(name.to_string(), s)];
        let parsed = parse_runs(&runs, log);
        judge(s, &parsed[0], &no_disks())
    }

    const ACPI_ON: &str = "chitin-check: acpi-log PASS acpi=on complaints=0";

    fn boot_lines(extra: &[&str]) -> Vec<String> {
        let mut lines = vec![format!(
            "| {UP_MARKER} version={AGENT_VERSION} scenario=boot"
        )];
        lines.push(format!(
            "| chitin-agent: cmdline {}",
            l2_cmdline(scenario("boot-jail"))
        ));
        lines.push("| chitin-agent: kernel 6.1.192".into());
        lines.push(format!("| {ACPI_ON}"));
        lines.push("| chitin-check: cpus PASS online=0-1 want=2".into());
        lines.push("| chitin-agent: done pass=2 fail=0".into());
        lines.extend(extra.iter().map(|l| l.to_string()));
        lines.push("! chitin: guest powered off".into());
        lines
    }

    #[test]
    fn jailed_boot_with_its_jailed_line_is_a_pass() {
        let body = boot_lines(&["! chitin: jailed as uid 1000 gid 1000 (MoveAndChroot)"]);
        let result = judge_one("boot-jail", &console("boot-jail", &body, "0"));
        assert!(result
            .unwrap()
            .starts_with("chitin: jailed as uid 1000 gid 1000"));
    }

    #[test]
    fn jailed_boot_without_its_jailed_line_fails() {
        let body = boot_lines(&["! chitin: jailed as uid 0 gid 0 (MoveAndChroot)"]);
        let result = judge_one("boot-jail", &console("boot-jail", &body, "0"));
        assert!(result.unwrap_err().contains("did not run jailed"));
    }

    #[test]
    fn host_checks_all_passing_is_a_pass() {
        let body = host_check_lines(
            &[
                "guest-kernel PASS 6.12.95",
                "echo PASS hello",
                "device-faults PASS vsock: 0",
            ],
            0,
        );
        let result = judge_one("exec-6.12", &console("exec-6.12", &body, "0"));
        assert_eq!(
            result.unwrap(),
            "guest-kernel: 6.12.95; echo: hello; device-faults: vsock: 0"
        );
    }

    #[test]
    fn host_checks_on_the_wrong_kernel_fail() {
        // 6.1.x does not start with "6.12.", and 6.12.x not with "6.1.".
        let body = host_check_lines(&["guest-kernel PASS 6.1.192", "echo PASS hello"], 0);
        let result = judge_one("exec-6.12", &console("exec-6.12", &body, "0"));
        assert!(result.unwrap_err().contains("want Linux 6.12"));
        let body = host_check_lines(&["guest-kernel PASS 6.12.95", "echo PASS hello"], 0);
        let result = judge_one("exec", &console("exec", &body, "0"));
        assert!(result.unwrap_err().contains("want Linux 6.1"));
    }

    #[test]
    fn host_checks_one_failing_fails_with_its_line() {
        let body = host_check_lines(
            &["echo PASS hello", "stdout-8mib FAIL agent request failed"],
            1,
        );
        let result = judge_one("exec", &console("exec", &body, "1"));
        assert_eq!(
            result.unwrap_err(),
            "chitin-check: stdout-8mib FAIL agent request failed"
        );
    }

    #[test]
    fn host_checks_with_no_check_at_all_fails() {
        let body = host_check_lines(&["guest-kernel PASS 6.1.192"], 0);
        let result = judge_one("vsock", &console("vsock", &body, "0"));
        assert_eq!(result.unwrap(), "guest-kernel: 6.1.192");
        // Not even that: nothing passed.
        let mut bare = vec![format!(
            "| chitin-agent: up version={AGENT_VERSION} scenario=vsock (host checks)"
        )];
        bare.push("| chitin-agent: done pass=0 fail=0".to_string());
        let log = console("vsock", &bare, "0");
        let s = scenario("vsock");
        let runs = vec![("vsock".to_string(), s)];
        let parsed = parse_runs(&runs, &log);
        assert_eq!(passed_checks(&parsed[0]).unwrap_err(), "no check passed");
    }

    #[test]
    fn run_that_never_ended_fails() {
        let log = vec!["nested: begin exec".to_string(), "| booting".to_string()];
        assert!(judge_one("exec", &log)
            .unwrap_err()
            .contains("never finished"));
    }

    #[test]
    fn silent_l1_fails_with_the_reason_and_keeps_the_diagnosis() {
        let body = vec![
            "| chitin-check: echo PASS hello".to_string(),
            "nested: alive 30".to_string(),
            "nested: l1 silent for 45 s after 80 s; asking its kernel".to_string(),
            "nested: monitor RIP=ffffffff81000040".to_string(),
        ];
        let log = console("exec", &body, SILENT_EXIT);
        let s = scenario("exec");
        let runs = vec![("exec".to_string(), s)];
        let parsed = parse_runs(&runs, &log);

        let result = judge(s, &parsed[0], &no_disks());

        assert!(result.unwrap_err().contains("L1 went silent"));
        // The heartbeat is not console output; the diagnosis is kept.
        assert!(!parsed[0].has("nested: alive"));
        assert!(parsed[0].has("nested: monitor RIP="));
    }

    fn lines(text: &str) -> Vec<String> {
        text.lines().map(str::to_string).collect()
    }

    #[test]
    fn l1_health_regular_heartbeats_pass() {
        let log = lines("nested: l1 up\nnested: alive 10\n| x\nnested: alive 20\nnested: alive 31");
        assert_eq!(l1_health(&log).unwrap(), "3 heartbeats, longest gap 11 s");
    }

    #[test]
    fn l1_health_gap_of_a_stalled_timer_fails() {
        // A heartbeat that should have come at 30 came at 73.
        let log = lines("nested: l1 up\nnested: alive 10\nnested: alive 20\nnested: alive 73");
        assert!(l1_health(&log).unwrap_err().contains("longest gap 53 s"));
    }

    #[test]
    fn l1_health_soft_lockup_fails() {
        let log = lines(
            "nested: l1 up\nnested: alive 10\n[ 97.7] watchdog: BUG: soft lockup - CPU#0 stuck for 43s! [init:89]",
        );
        assert!(l1_health(&log).unwrap_err().contains("1 soft lockup"));
    }

    #[test]
    fn l1_health_silence_between_runs_fails() {
        let log = lines("nested: l1 up\nnested: alive 0\nnested: l1 silent for 30 s; diagnosing");
        assert!(l1_health(&log).unwrap_err().starts_with("L1 went silent"));
    }

    #[test]
    fn l1_health_without_heartbeat_fails() {
        assert!(l1_health(&lines("nested: l1 up\nnested: done")).is_err());
    }

    #[test]
    fn l1_health_fresh_l1_restarts_the_count() {
        let log = lines(
            "nested: l1 up\nnested: alive 10\nnested: alive 20\nnested: l1 up\nnested: alive 10",
        );
        assert_eq!(l1_health(&log).unwrap(), "3 heartbeats, longest gap 10 s");
    }

    #[test]
    fn boot_checks_need_the_agent_up_line_for_this_scenario() {
        let s = scenario("boot-6.12");
        let body = vec![
            format!("| {UP_MARKER} version={AGENT_VERSION} scenario=reset"),
            "| chitin-check: cpus PASS 2".to_string(),
            "| chitin-agent: done pass=1 fail=0".to_string(),
            format!("| chitin-agent: cmdline {}", l2_cmdline(s)),
        ];
        let result = judge_one("boot-6.12", &console("boot-6.12", &body, "0"));
        assert!(result.unwrap_err().starts_with("no `chitin-agent: up"));
    }

    #[test]
    fn boot_checks_passing_on_second_kernel_is_a_pass() {
        let s = scenario("boot-6.12");
        let body = vec![
            format!("| {UP_MARKER} version={AGENT_VERSION} scenario=boot"),
            format!("| chitin-agent: cmdline {} i8042.nokbd", l2_cmdline(s)),
            "| chitin-agent: kernel 6.12.95".to_string(),
            format!("| {ACPI_ON}"),
            "| chitin-check: cpus PASS 2".to_string(),
            "| chitin-agent: done pass=2 fail=0".to_string(),
            "! chitin: guest powered off".to_string(),
        ];
        let result = judge_one("boot-6.12", &console("boot-6.12", &body, "0"));
        assert_eq!(result.unwrap(), BOTH_PASSED);
    }

    /// What a boot run with the ACPI and cpus checks passing reports.
    const BOTH_PASSED: &str = "acpi-log: acpi=on complaints=0; cpus: 2";

    /// A boot run of scenario `name` on kernel `release`, reporting
    /// `acpi` and ending with `exit_line`.
    fn boot_run_of(
        name: &str,
        release: &str,
        acpi: &str,
        exit_line: &str,
    ) -> Result<String, String> {
        let s = scenario(name);
        let body = vec![
            format!("| {UP_MARKER} version={AGENT_VERSION} scenario=boot"),
            format!("| chitin-agent: cmdline {}", l2_cmdline(s)),
            format!("| chitin-agent: kernel {release}"),
            format!("| chitin-check: acpi-log PASS acpi={acpi} complaints=0"),
            "| chitin-check: cpus PASS 2".to_string(),
            "| chitin-agent: done pass=2 fail=0".to_string(),
            format!("! {exit_line}"),
        ];
        judge_one(name, &console(name, &body, "0"))
    }

    #[test]
    fn exit_counters_are_parsed_per_run_and_their_median_taken() {
        let s = scenario("boot");
        let runs: Vec<(String, &Scenario)> = (1..=3).map(|k| (format!("boot#{k}"), s)).collect();
        let mut log = Vec::new();
        for (k, total) in [(1, 900u64), (2, 700), (3, 800)] {
            log.push(format!("nested: begin boot#{k}"));
            log.push(format!(
                "nested: exits boot#{k} total={total} io={} mmio=5",
                total / 2
            ));
            log.push(format!("nested: end boot#{k} exit=0 ms=1"));
        }
        // A run whose VM the runner could not find reports no counters.
        log.push("nested: exits boot#3 none".into());
        let parsed = parse_runs(&runs, &log);
        assert_eq!(parsed[0].exits[0], ("total".to_string(), 900));
        assert!(parsed[2].exits.is_empty());
        let refs: Vec<&Run> = parsed.iter().collect();
        let medians = median_exits(&refs);
        assert_eq!(
            medians,
            [
                ("total".to_string(), 900),
                ("io".to_string(), 450),
                ("mmio".to_string(), 5)
            ]
        );
    }

    #[test]
    fn the_guest_cannot_print_the_vmm_exit_line() {
        let s = scenario("boot-debian");
        let body = vec![
            format!("| {UP_MARKER} version={AGENT_VERSION} scenario=boot"),
            format!("| chitin-agent: cmdline {}", l2_cmdline(s)),
            "| chitin-agent: kernel 6.1.0-41-cloud-amd64".to_string(),
            format!("| {ACPI_ON}"),
            "| chitin-check: cpus PASS 2".to_string(),
            "| chitin-agent: done pass=2 fail=0".to_string(),
            "| chitin: guest powered off".to_string(),
            "! chitin: guest reset".to_string(),
        ];
        let e = judge_one("boot-debian", &console("boot-debian", &body, "0")).unwrap_err();
        assert!(e.contains("did not end with"), "{e}");
    }

    #[test]
    fn acpi_rows_need_the_right_kernel_acpi_mode_and_exit() {
        let debian = "6.1.0-41-cloud-amd64";
        let off = "chitin: guest powered off";
        assert!(boot_run_of("boot-debian", debian, "on", off).is_ok());
        // The minimal kernel where Debian's was meant, and the reverse.
        let e = boot_run_of("boot-debian", "6.1.158", "on", off).unwrap_err();
        assert!(e.contains("guest runs kernel"), "{e}");
        let e = boot_run_of("boot", debian, "on", off).unwrap_err();
        assert!(e.contains("guest runs kernel"), "{e}");
        // A guest that found no tables, or a VMM that saw a reset.
        let e = boot_run_of("boot-debian", debian, "off", off).unwrap_err();
        assert!(e.contains("acpi=off, want acpi=on"), "{e}");
        let e = boot_run_of("boot-debian", debian, "on", "chitin: guest reset").unwrap_err();
        assert!(
            e.contains("did not end with `chitin: guest powered off`"),
            "{e}"
        );
        // Without ACPI: MP table, and the guest can only reset.
        assert!(boot_run_of("boot-acpi-off", "6.1.158", "off", "chitin: guest reset").is_ok());
        let e = boot_run_of("boot-acpi-off", "6.1.158", "on", "chitin: guest reset").unwrap_err();
        assert!(e.contains("want acpi=off"), "{e}");
    }

    /// A boot-6.12 run whose agent printed `summary` after one passing
    /// check (and `extra` lines before it).
    fn boot_run_with(extra: &[&str], summary: &str) -> Result<String, String> {
        let s = scenario("boot-6.12");
        let mut body = vec![
            format!("| {UP_MARKER} version={AGENT_VERSION} scenario=boot"),
            format!("| chitin-agent: cmdline {}", l2_cmdline(s)),
            "| chitin-agent: kernel 6.12.95".to_string(),
            format!("| {ACPI_ON}"),
            "| chitin-check: cpus PASS 2".to_string(),
        ];
        body.extend(extra.iter().map(|l| format!("| {l}")));
        if !summary.is_empty() {
            body.push(format!("| {summary}"));
        }
        body.push("! chitin: guest powered off".to_string());
        judge_one("boot-6.12", &console("boot-6.12", &body, "0"))
    }

    #[test]
    fn judges_reject_summaries_that_do_not_vouch_for_the_checks() {
        // The honest run passes.
        assert_eq!(
            boot_run_with(&[], "chitin-agent: done pass=2 fail=0").unwrap(),
            BOTH_PASSED
        );
        // pass=0: nothing vouched for, whatever check lines say.
        let e = boot_run_with(&[], "chitin-agent: done pass=0 fail=0").unwrap_err();
        assert!(e.contains("no check passed"), "{e}");
        // Any other line containing ` fail=0` is not a summary.
        let e = boot_run_with(&["guest says pass=1 fail=0"], "").unwrap_err();
        assert!(e.contains("no `chitin-agent: done"), "{e}");
        let e = boot_run_with(&["chitin-check: x PASS fail=0"], "").unwrap_err();
        assert!(e.contains("no `chitin-agent: done"), "{e}");
        // A summary that counts more passes than were printed.
        let e = boot_run_with(&[], "chitin-agent: done pass=5 fail=0").unwrap_err();
        assert!(e.contains("5 passed, but 2 PASS"), "{e}");
        // One check line cut by a kernel message: the count may include it.
        let cut = ["chitin-check: mem PA[    1.2] reboot: Restarting system"];
        assert_eq!(
            boot_run_with(&cut, "chitin-agent: done pass=3 fail=0").unwrap(),
            BOTH_PASSED
        );
        // A failed check fails the run even under a clean summary.
        let e = boot_run_with(
            &["chitin-check: mem FAIL 12"],
            "chitin-agent: done pass=1 fail=0",
        )
        .unwrap_err();
        assert_eq!(e, "chitin-check: mem FAIL 12");
    }

    #[test]
    fn host_judge_rejects_a_pass_zero_summary() {
        let mut body = host_check_lines(&["guest-kernel PASS 6.1.192"], 0);
        *body.last_mut().unwrap() = "| chitin-agent: done pass=0 fail=0".to_string();
        let e = judge_one("exec", &console("exec", &body, "0")).unwrap_err();
        assert!(e.contains("no check passed"), "{e}");
    }
}
