//! The test scenarios the host can ask for with `chitin.scenario=<name>`.
//!
//! Each scenario checks what the guest kernel sees against what the host
//! configured (passed as `chitin.expect_*` command-line entries) and prints
//! one result line per check. Unknown scenarios fail one check.

use std::io::Write;
use std::os::fd::AsRawFd;

use chitin_agent::cmdline::KernelCmdline;
use chitin_testkit::{fnv1a, Report, CONSOLE_BEGIN, CONSOLE_END, FNV_BASIS};

/// Bytes of the console pattern: 4096 lines of 64 bytes.
const CONSOLE_PATTERN_LINES: usize = 4096;
/// One pattern line, newline included.
const CONSOLE_LINE_LEN: usize = 64;

/// How long the `bench` scenario stays quiet after the up line, so that
/// what the host counts when it sees that line (KVM exits by port, MSR,
/// address) is the boot's alone, not the lines printed after it.
const BENCH_QUIET: std::time::Duration = std::time::Duration::from_millis(500);

/// Run scenario `name`.
pub fn run(name: &str, cmdline: &KernelCmdline, report: &mut Report) {
    if name == "bench" {
        std::thread::sleep(BENCH_QUIET);
    }
    report.line(&format!("chitin-agent: cmdline {}", cmdline.raw()));
    // Which kernel this is, so the host can tell its guests apart.
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    report.line(&format!("chitin-agent: kernel {}", release.trim()));
    check_kernel_log(report);
    match name {
        "boot" | "smp4" => check_machine(cmdline, report),
        // `cargo xtask bench-boot`: only the up line's times count; stop
        // at once (power off where ACPI can, else reboot).
        "bench" => {}
        "reset" => {
            report.check("reset", true, "rebooting");
            report.done();
            chitin_agent::init::reboot();
        }
        "panic" => trigger_panic(report),
        "console" => console_pattern(report),
        "blk" => crate::blk::read_write(report),
        "blk-ro" => crate::blk::read_only(report),
        "blk-integrity" => crate::blk::integrity(report),
        "blk-discard" => crate::blk::discard(report),
        "net-upload" => crate::net::upload_scenario(cmdline, report),
        other => report.check("scenario", false, &format!("unknown scenario {other}")),
    }
}

/// The kernel log (`dmesg`), read with `syslog(SYSLOG_ACTION_READ_ALL)`.
fn kernel_log() -> Result<String, String> {
    const READ_ALL: libc::c_int = 3;
    const SIZE_BUFFER: libc::c_int = 10;
    // SAFETY: SIZE_BUFFER takes no buffer and returns the log's size.
    let size = unsafe { libc::klogctl(SIZE_BUFFER, std::ptr::null_mut(), 0) };
    let size = usize::try_from(size).map_err(|_| "klogctl size failed".to_string())?;
    let mut buf = vec![0u8; size.max(1)];
    let len = libc::c_int::try_from(buf.len()).unwrap_or(libc::c_int::MAX);
    // SAFETY: `buf` is valid for `len` bytes, which klogctl fills at most.
    let n = unsafe { libc::klogctl(READ_ALL, buf.as_mut_ptr().cast(), len) };
    let n = usize::try_from(n).map_err(|_| "klogctl read failed".to_string())?;
    buf.truncate(n);
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Whether the kernel parsed ACPI tables, and that it printed no ACPI error
/// or warning about them: `acpi=on|off complaints=<n>`.
fn check_kernel_log(report: &mut Report) {
    let acpi = if std::path::Path::new("/sys/firmware/acpi/tables").exists() {
        "on"
    } else {
        "off"
    };
    match kernel_log() {
        Ok(log) => {
            let bad = chitin_testkit::acpi_complaints(&log);
            let detail = format!("acpi={acpi} complaints={}", bad.len());
            match bad.first() {
                None => report.check("acpi-log", true, &detail),
                Some(first) => report.check("acpi-log", false, &format!("{detail}: {first}")),
            }
        }
        Err(e) => report.check("acpi-log", false, &e),
    }
}

/// Number of CPUs in a kernel CPU list such as `0-3,5`.
fn count_cpu_list(list: &str) -> Option<u32> {
    let mut count = 0;
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        count += match part.split_once('-') {
            Some((a, b)) => b.parse::<u32>().ok()?.checked_sub(a.parse::<u32>().ok()?)? + 1,
            None => {
                part.parse::<u32>().ok()?;
                1
            }
        };
    }
    Some(count)
}

/// `MemTotal` from /proc/meminfo, in KiB.
fn mem_total_kib(meminfo: &str) -> Option<u64> {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

fn check_machine(cmdline: &KernelCmdline, report: &mut Report) {
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    let cpus = count_cpu_list(&online);
    match cmdline.get_u64("chitin.expect_cpus") {
        Some(want) => report.check(
            "cpus",
            cpus == Some(want as u32),
            &format!("online={} want={want}", online.trim()),
        ),
        None => report.check("cpus", false, "no chitin.expect_cpus on the command line"),
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total = mem_total_kib(&meminfo);
    match (cmdline.get_u64("chitin.expect_mem_mib"), total) {
        (Some(mib), Some(kib)) => {
            // The kernel keeps its own image, page structures and reserved
            // low memory out of MemTotal: allow up to 20% (a minimal kernel
            // in 256 MiB keeps far less).
            let given = mib * 1024;
            let ok = kib <= given && kib >= given * 8 / 10;
            report.check(
                "memory",
                ok,
                &format!("mem_total_kib={kib} given_kib={given}"),
            );
        }
        _ => report.check("memory", false, "no chitin.expect_mem_mib or MemTotal"),
    }
}

fn trigger_panic(report: &mut Report) {
    report.line("chitin-agent: triggering a kernel panic through sysrq");
    let result = std::fs::OpenOptions::new()
        .write(true)
        .open("/proc/sysrq-trigger")
        .and_then(|mut f| f.write_all(b"c"));
    // Only reached when the panic did not happen.
    report.check("panic", false, &format!("sysrq-trigger: {result:?}"));
}

/// The deterministic pattern line `index`: 63 printable bytes and `\n`.
fn pattern_line(index: usize, line: &mut [u8; CONSOLE_LINE_LEN]) {
    // xorshift64 seeded by the line number: cheap and reproducible.
    let mut x = (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for byte in line.iter_mut().take(CONSOLE_LINE_LEN - 1) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *byte = b'!' + (x % 94) as u8;
    }
    line[CONSOLE_LINE_LEN - 1] = b'\n';
}

/// Turn off output post-processing (`\n` → `\r\n`) on the console so the
/// host receives exactly the bytes written; returns the previous settings.
fn raw_output(fd: i32) -> Option<libc::termios> {
    // SAFETY: termios is plain data; tcgetattr fills it or fails.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open for the duration; `saved` is a valid termios.
    if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
        return None;
    }
    let mut raw = saved;
    raw.c_oflag &= !libc::OPOST;
    // SAFETY: as above; TCSADRAIN waits for pending output first.
    if unsafe { libc::tcsetattr(fd, libc::TCSADRAIN, &raw) } != 0 {
        return None;
    }
    Some(saved)
}

fn console_pattern(report: &mut Report) {
    let stdout = std::io::stdout();
    let fd = stdout.as_raw_fd();
    let saved = raw_output(fd);
    let mut out = stdout.lock();
    let mut hash = FNV_BASIS;
    let mut line = [0u8; CONSOLE_LINE_LEN];
    let mut ok = writeln!(out, "{CONSOLE_BEGIN}").is_ok();
    for i in 0..CONSOLE_PATTERN_LINES {
        pattern_line(i, &mut line);
        hash = fnv1a(hash, &line);
        ok &= out.write_all(&line).is_ok();
    }
    ok &= writeln!(out, "{CONSOLE_END}").is_ok();
    ok &= out.flush().is_ok();
    drop(out);
    if let Some(saved) = saved {
        // SAFETY: restores the settings read above on the same open fd.
        unsafe { libc::tcsetattr(fd, libc::TCSADRAIN, &saved) };
    }
    let len = CONSOLE_PATTERN_LINES * CONSOLE_LINE_LEN;
    report.check(
        "console-pattern",
        ok && saved.is_some(),
        &format!("fnv={hash:016x} len={len}"),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_cpu_list_handles_ranges_and_singles() {
        assert_eq!(count_cpu_list("0-3\n"), Some(4));
        assert_eq!(count_cpu_list("0"), Some(1));
        assert_eq!(count_cpu_list("0-1,4,6-7"), Some(5));
        assert_eq!(count_cpu_list("3-1"), None);
        assert_eq!(count_cpu_list("x"), None);
    }

    #[test]
    fn mem_total_parses_kib() {
        let meminfo = "MemTotal:         245676 kB\nMemFree: 1 kB\n";
        assert_eq!(mem_total_kib(meminfo), Some(245_676));
        assert_eq!(mem_total_kib("MemFree: 1 kB"), None);
    }

    #[test]
    fn pattern_line_is_printable_and_deterministic() {
        let (mut a, mut b) = ([0u8; 64], [0u8; 64]);
        pattern_line(7, &mut a);
        pattern_line(7, &mut b);
        assert_eq!(a, b);
        assert!(a[..63].iter().all(|c| (b'!'..=b'~').contains(c)));
        assert_eq!(a[63], b'\n');
        pattern_line(8, &mut b);
        assert_ne!(a, b);
    }
}
