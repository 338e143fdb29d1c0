//! PID 1 of the nested tier's L1 Linux (QEMU TCG with a real KVM inside).
//!
//! It mounts the basics, loads irqbypass, kvm and kvm-amd, then runs every
//! scenario of `/nested/plan` as a child process (chitin's `boot` example,
//! or QEMU for the peer column) with a hard timeout, and reports on its
//! console in lines the host harness (`cargo xtask nested`) parses:
//!
//! - `nested: l1 up` — L1 reached /init (the harness may retry a run that
//!   never printed this, never one that did);
//! - `nested: alive <s>` — L1's uptime in seconds, at once, then every
//!   [`HEARTBEAT`] from a thread of its own, and once more before `done`:
//!   while it comes, L1 still runs user space, so a harness that hears
//!   nothing for much longer knows L1 itself is wedged, and gaps between
//!   the uptimes show a stall of L1's timers;
//! - `nested: kvm ready` or `nested: error <why>`;
//! - `nested: begin <scenario>`;
//! - `| <line>` — each console line of the child (L2's console);
//! - `nested: marker <scenario> <ms>` — first appearance of the plan's
//!   marker text, in ms since the child was spawned;
//! - `nested: exits <scenario> total=<n> io=<n> ...` — right after the
//!   marker, L1 KVM's exit counters of the child's VM so far (debugfs
//!   `kvm/<pid>-<fd>/`, summed over its vCPUs): counts that, unlike wall
//!   time, do not depend on how busy the emulating host is;
//! - `nested: memory <scenario> rss_kib=<n> hwm_kib=<n> threads=<n>` — at
//!   the marker too, the child's resident memory and threads
//!   (`/proc/<pid>/status`);
//! - `nested: hist <scenario> <what> <key>=<n> ...` — when
//!   `/nested/trace-exits` exists, also at the marker: L1 KVM's trace
//!   events since the child was spawned, counted by key with tracefs
//!   histogram triggers ([`HISTOGRAMS`]): exits by reason, MSR accesses by
//!   index, port I/O by port, MMIO by address, exits to user space by
//!   reason. Runs are sequential, so every event belongs to the child;
//! - `nested: console <scenario> fnv=<hex> len=<n>` — checksum of the bytes
//!   between `chitin-console-begin` and `chitin-console-end` lines (not
//!   forwarded);
//! - `nested: end <scenario> exit=<code|signal:N|timeout> ms=<ms>`;
//! - `nested: done`, then L1 reboots (QEMU runs with `-no-reboot` and exits).
//!
//! The harness sends a keepalive byte to the console every second (its
//! receive interrupt repairs a timer interrupt QEMU's TCG can lose; see
//! `xtask/src/nested/l1.rs`): the console is put in raw mode without echo
//! and a thread reads and discards what arrives.

use std::ffi::CString;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chitin_nested_init::kvm_stats;
use chitin_testkit::{fnv1a, CONSOLE_BEGIN, CONSOLE_END, FNV_BASIS};

const PLAN: &str = "/nested/plan";
const MODULES: &str = "/nested/modules";
/// Serials of the disks QEMU attached to L1, one per line.
const DISKS: &str = "/nested/disks";
/// How long to wait for L1's virtio-blk disks to appear.
const DISK_WAIT: Duration = Duration::from_secs(15);
/// How often L1 says it is alive.
const HEARTBEAT: Duration = Duration::from_secs(10);

fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn mount(source: &str, target: &str, fstype: &str) {
    let _ = std::fs::create_dir_all(target);
    let (s, t, f) = (
        CString::new(source).unwrap_or_default(),
        CString::new(target).unwrap_or_default(),
        CString::new(fstype).unwrap_or_default(),
    );
    // SAFETY: valid NUL-terminated strings that outlive the call; null data.
    let ret = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
    if ret != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) {
            say(&format!("nested: error mount {target}: {err}"));
        }
    }
}

/// Load a kernel module from a file with finit_module(2).
fn insmod(path: &str) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| format!("open {path}: {e}"))?;
    let params = CString::default();
    // SAFETY: the fd is open for the call; params is a valid empty string.
    let ret =
        unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), params.as_ptr(), 0) };
    if ret != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EEXIST) {
            return Err(format!("finit_module {path}: {err}"));
        }
    }
    Ok(())
}

fn load_kvm() -> Result<(), String> {
    let order = std::fs::read_to_string(format!("{MODULES}/order"))
        .map_err(|e| format!("read module order: {e}"))?;
    for name in order.lines().filter(|l| !l.is_empty()) {
        insmod(&format!("{MODULES}/{name}"))?;
    }
    std::fs::metadata("/dev/kvm").map_err(|e| format!("/dev/kvm after loading modules: {e}"))?;
    Ok(())
}

/// Map each expected disk serial to its `/dev/vdX`, waiting for the
/// virtio-blk driver to probe them.
fn find_disks() -> Result<Vec<(String, String)>, String> {
    let wanted: Vec<String> = std::fs::read_to_string(DISKS)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    let deadline = Instant::now() + DISK_WAIT;
    loop {
        let mut found = Vec::new();
        if let Ok(entries) = std::fs::read_dir("/sys/block") {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let serial =
                    std::fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
                if wanted.iter().any(|w| w == serial.trim()) {
                    found.push((serial.trim().to_string(), format!("/dev/{name}")));
                }
            }
        }
        if found.len() == wanted.len() {
            return Ok(found);
        }
        if Instant::now() >= deadline {
            return Err(format!("disks {wanted:?}: found only {found:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Replace a leading `@serial` in an argument by that disk's device path.
fn resolve_disk(arg: &str, disks: &[(String, String)]) -> String {
    let Some(rest) = arg.strip_prefix('@') else {
        return arg.to_string();
    };
    let (serial, options) = rest.split_once(',').map_or((rest, ""), |(s, o)| (s, o));
    match disks.iter().find(|(s, _)| s == serial) {
        Some((_, dev)) if options.is_empty() => dev.clone(),
        Some((_, dev)) => format!("{dev},{options}"),
        None => arg.to_string(),
    }
}

/// One scenario of the plan.
struct Scenario {
    name: String,
    timeout: Duration,
    marker: String,
    argv: Vec<String>,
}

fn parse_plan(text: &str) -> Vec<Scenario> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| {
            let mut f = l.split('\t');
            let name = f.next()?.to_string();
            let timeout = Duration::from_secs(f.next()?.parse().ok()?);
            let marker = f.next()?.to_string();
            let argv: Vec<String> = f.map(str::to_string).collect();
            (!argv.is_empty()).then_some(Scenario {
                name,
                timeout,
                marker,
                argv,
            })
        })
        .collect()
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// `rss_kib=<n> hwm_kib=<n> threads=<n>` of process `pid`, from its
/// `/proc/<pid>/status` (`-` for a field it lacks).
fn memory_of(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or("-")
            .to_string()
    };
    format!(
        "rss_kib={} hwm_kib={} threads={}",
        field("VmRSS:"),
        field("VmHWM:"),
        field("Threads:")
    )
}

/// Present when the plan wants [`HISTOGRAMS`] (`cargo xtask bench-boot`).
const TRACE_EXITS: &str = "/nested/trace-exits";
/// Where L1's tracefs is mounted.
const TRACING: &str = "/sys/kernel/tracing";
/// At most this many keys of a histogram are printed (the most hit); the
/// triggers keep at most 4096, and QEMU's probe of its 24 virtio-mmio
/// slots alone makes about 150 MMIO keys.
const HIST_TOP: usize = 4096;

/// The histogram triggers kept per run: label, event, keys.
const HISTOGRAMS: &[(&str, &str, &str)] = &[
    ("exit", "kvm/kvm_exit", "exit_reason.hex"),
    ("msr", "kvm/kvm_msr", "ecx.hex,write"),
    ("pio", "kvm/kvm_pio", "port.hex,rw"),
    ("mmio", "kvm/kvm_mmio", "gpa.hex,type"),
    ("user", "kvm/kvm_userspace_exit", "reason"),
];

fn hist_spec(keys: &str) -> String {
    format!("hist:keys={keys}:sort=hitcount.descending:size=4096")
}

/// Install the histogram triggers (once per L1 boot), or zero their
/// counts (`clear`, before each run). Errors are said, not fatal: the
/// runs go on without histograms.
fn histograms(clear: bool) {
    for (_, event, keys) in HISTOGRAMS {
        let path = format!("{TRACING}/events/{event}/trigger");
        let spec = if clear {
            format!("{}:clear", hist_spec(keys))
        } else {
            hist_spec(keys)
        };
        let written = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(spec.as_bytes()));
        if let Err(e) = written {
            say(&format!("nested: error histogram {event}: {e}"));
        }
    }
}

/// One histogram's entries as `key=count` (keys joined by `/`), most hit
/// first, from a tracefs `hist` file's `{ k: v, k2: v2 } hitcount: n`
/// lines; and the events it dropped (`Dropped:`, a full table).
fn hist_entries(text: &str) -> (Vec<String>, u64) {
    let entries = text
        .lines()
        .filter_map(|l| {
            let (keys, rest) = l.trim().strip_prefix('{')?.split_once('}')?;
            let count = rest.trim().strip_prefix("hitcount:")?.trim();
            let key: Vec<&str> = keys
                .split(',')
                .filter_map(|kv| Some(kv.split_once(':')?.1.trim()))
                .collect();
            Some(format!("{}={count}", key.join("/")))
        })
        .take(HIST_TOP)
        .collect();
    let dropped = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Dropped:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    (entries, dropped)
}

/// `nested: hist` lines for run `name`; a histogram that cannot be read,
/// or that dropped events, is an error line instead (the bench fails on
/// it rather than count zeros).
fn say_histograms(name: &str) {
    for (label, event, _) in HISTOGRAMS {
        match std::fs::read_to_string(format!("{TRACING}/events/{event}/hist")) {
            Ok(text) => match hist_entries(&text) {
                (entries, 0) => say(&format!(
                    "nested: hist {name} {label} {}",
                    entries.join(" ")
                )),
                (_, dropped) => say(&format!(
                    "nested: error histogram {event}: {dropped} events dropped in {name}"
                )),
            },
            Err(e) => say(&format!("nested: error histogram {event} in {name}: {e}")),
        }
    }
}

/// Forward the child's console, timestamp the marker (and read the exit
/// counters of `pid`'s VM, its memory and the histograms then), checksum
/// the console pattern block.
fn pump_console(
    name: &str,
    marker: &str,
    start: Instant,
    pid: u32,
    trace: bool,
    stdout: impl Read,
) {
    let mut reader = BufReader::new(stdout);
    let mut line = Vec::new();
    let mut marker_seen = marker.is_empty();
    let mut block: Option<(u64, usize)> = None;
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let text = trim_eol(&line);
        if let Some((hash, len)) = block.as_mut() {
            if text == CONSOLE_END.as_bytes() {
                say(&format!("nested: console {name} fnv={hash:016x} len={len}"));
                block = None;
            } else {
                *hash = fnv1a(*hash, &line);
                *len += line.len();
            }
            continue;
        }
        if text == CONSOLE_BEGIN.as_bytes() {
            block = Some((FNV_BASIS, 0));
            continue;
        }
        let shown = String::from_utf8_lossy(text);
        say(&format!("| {shown}"));
        if !marker_seen && shown.contains(marker) {
            marker_seen = true;
            say(&format!(
                "nested: marker {name} {}",
                start.elapsed().as_millis()
            ));
            let exits = kvm_stats::exit_counts(pid);
            let exits = exits
                .as_deref()
                .map_or("none".to_string(), kvm_stats::format);
            say(&format!("nested: exits {name} {exits}"));
            say(&format!("nested: memory {name} {}", memory_of(pid)));
            if trace {
                say_histograms(name);
            }
        }
    }
    if block.is_some() {
        say(&format!("nested: console {name} unterminated"));
    }
}

fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
        }
    }
}

fn run_scenario(s: &Scenario, disks: &[(String, String)], trace: bool) {
    say(&format!("nested: begin {}", s.name));
    if trace {
        histograms(true);
    }
    let start = Instant::now();
    let argv: Vec<String> = s.argv.iter().map(|a| resolve_disk(a, disks)).collect();
    let spawned = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            say(&format!("nested: error spawn {}: {e}", s.argv[0]));
            say(&format!("nested: end {} exit=spawn-failed ms=0", s.name));
            return;
        }
    };
    let (done_tx, done_rx) = mpsc::channel();
    let stdout = child.stdout.take();
    let (name, marker) = (s.name.clone(), s.marker.clone());
    let pid = child.id();
    let out_thread = std::thread::spawn(move || {
        if let Some(stdout) = stdout {
            pump_console(&name, &marker, start, pid, trace, stdout);
        }
        let _ = done_tx.send(());
    });
    let stderr = child.stderr.take();
    let err_thread = std::thread::spawn(move || {
        if let Some(stderr) = stderr {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                say(&format!("! {line}"));
            }
        }
    });
    let status = wait_with_timeout(&mut child, s.timeout);
    let ms = start.elapsed().as_millis();
    // The pipes close when the child (and anything it spawned) exits; give
    // the readers a moment to drain. A grandchild may keep them open: then
    // the readers are left behind rather than stalling the plan.
    if done_rx.recv_timeout(Duration::from_secs(5)).is_ok() {
        let _ = out_thread.join();
        let _ = err_thread.join();
    }
    let exit = match status {
        None => "timeout".to_string(),
        Some(st) => match (st.code(), st.signal()) {
            (Some(code), _) => code.to_string(),
            (None, Some(sig)) => format!("signal:{sig}"),
            (None, None) => "unknown".to_string(),
        },
    };
    say(&format!("nested: end {} exit={exit} ms={ms}", s.name));
}

/// Turn the console's echo and line editing off and discard its input.
fn sink_console_input() {
    // SAFETY: tcgetattr/tcsetattr on fd 0 with a termios that lives for
    // the calls; failures leave the terminal as it was.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(0, &mut t) == 0 {
            t.c_lflag &= !(libc::ECHO | libc::ICANON | libc::ISIG | libc::IEXTEN);
            t.c_iflag &= !(libc::ICRNL | libc::IXON);
            let _ = libc::tcsetattr(0, libc::TCSANOW, &t);
        }
    }
    std::thread::spawn(|| {
        let mut buf = [0u8; 256];
        let mut stdin = std::io::stdin().lock();
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => std::thread::sleep(Duration::from_secs(1)),
                Ok(_) => {}
            }
        }
    });
}

fn main() {
    sink_console_input();
    mount("proc", "/proc", "proc");
    mount("sysfs", "/sys", "sysfs");
    mount("devtmpfs", "/dev", "devtmpfs");
    mount("tmpfs", "/tmp", "tmpfs");
    // The jail scenario's cgroup limits need cgroup v2.
    mount("cgroup2", "/sys/fs/cgroup", "cgroup2");
    // KVM's per-VM exit counters (`nested: exits`).
    mount("debugfs", "/sys/kernel/debug", "debugfs");
    // The trace events' histograms (`nested: hist`).
    let trace = std::path::Path::new(TRACE_EXITS).exists();
    if trace {
        mount("tracefs", TRACING, "tracefs");
    }
    say("nested: l1 up");
    let up = Instant::now();
    let alive = move || say(&format!("nested: alive {}", up.elapsed().as_secs()));
    alive();
    std::thread::spawn(move || loop {
        std::thread::sleep(HEARTBEAT);
        alive();
    });
    match load_kvm() {
        Ok(()) => {
            say("nested: kvm ready");
            let disks = find_disks().unwrap_or_else(|e| {
                say(&format!("nested: error {e}"));
                Vec::new()
            });
            for (serial, dev) in &disks {
                say(&format!("nested: disk {serial} {dev}"));
            }
            if trace {
                histograms(false);
            }
            let plan = std::fs::read_to_string(PLAN).unwrap_or_default();
            for scenario in parse_plan(&plan) {
                run_scenario(&scenario, &disks, trace);
            }
        }
        Err(e) => say(&format!("nested: error {e}")),
    }
    alive();
    say("nested: done");
    // SAFETY: sync and reboot take no pointers; as PID 1 we may reboot.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    loop {
        // SAFETY: pause has no preconditions; PID 1 must never exit.
        unsafe { libc::pause() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_plan_reads_tab_separated_scenarios() {
        let plan = "boot\t30\tchitin-agent: up\t/bin/chitin\t--vcpus\t2\n\nbad\tx\t\t/bin/a\n";
        let s = parse_plan(plan);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].name, "boot");
        assert_eq!(s[0].timeout, Duration::from_secs(30));
        assert_eq!(s[0].marker, "chitin-agent: up");
        assert_eq!(s[0].argv, ["/bin/chitin", "--vcpus", "2"]);
    }

    #[test]
    fn resolve_disk_replaces_serial_and_keeps_options() {
        let disks = vec![("ro".to_string(), "/dev/vdb".to_string())];
        assert_eq!(resolve_disk("@ro,ro", &disks), "/dev/vdb,ro");
        assert_eq!(resolve_disk("@ro", &disks), "/dev/vdb");
        assert_eq!(resolve_disk("@other", &disks), "@other");
        assert_eq!(resolve_disk("--disk", &disks), "--disk");
    }

    #[test]
    fn hist_entries_read_keys_and_counts() {
        let text = "# event histogram\n#\n# trigger info: hist:keys=port.hex,rw:vals=hitcount\n\n\
            { port: 0x3f8, rw: 1 } hitcount:        120\n\
            { port: 0x60, rw: 0 } hitcount:          3\n\nTotals:\n    Hits: 123\n";
        assert_eq!(
            hist_entries(text),
            (vec!["0x3f8/1=120".to_string(), "0x60/0=3".to_string()], 0)
        );
        assert_eq!(
            hist_entries("Totals:\n    Hits: 9\n    Dropped: 2\n"),
            (vec![], 2)
        );
    }

    #[test]
    fn trim_eol_strips_crlf() {
        assert_eq!(trim_eol(b"abc\r\n"), b"abc");
        assert_eq!(trim_eol(b"abc"), b"abc");
    }
}
