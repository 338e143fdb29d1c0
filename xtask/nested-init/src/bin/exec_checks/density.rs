//! Density in L1: `chitin-exec-checks density KERNEL INITRAMFS N [MIB]`
//! starts N sandboxes of the default guest (1 vCPU, 128 MiB unless MIB
//! says otherwise, as bench-boot's) in this one process, waits until every
//! agent answers, and prints what they cost: this process's resident memory (RSS, and PSS, which counts a
//! page shared by several mappings once) split into guest RAM the guests
//! touched and everything else, threads and fds, each after the first
//! sandbox and after all N, and L1's MemAvailable. Then it snapshots the
//! first, drops them all and checks that threads and fds are back where
//! they were; then restores N clones of that snapshot at once, each
//! answering an exec, prints the same for them, and drops them too.
//!
//! Prints `chitin-density: <key>=<value> ...` lines for bench-boot and one
//! `chitin-check: density PASS|FAIL` line; exits 0 only on PASS.

use std::time::{Duration, Instant};

use chitin::{Command, ExitStatus, GuestImage, RunningSandbox, Sandbox};

use chitin_testkit::Report as Checks;

use super::seccomp_mode;

/// Guest memory of each sandbox unless asked otherwise, as bench-boot's
/// boots have.
const MEM_MIB: u64 = 128;
/// How long the last of N concurrent boots may take to answer: they share
/// L1's one emulated CPU.
const UP_TIMEOUT: Duration = Duration::from_secs(1200);

/// How long to let L1 settle before the baseline.
const SETTLE: Duration = Duration::from_secs(2);

/// What this process and L1 hold at one moment.
#[derive(Clone, Copy, Debug, Default)]
struct Usage {
    rss_kib: u64,
    /// Proportional: a page mapped by n mappings counts 1/n in each (the
    /// clones' shared snapshot pages count once, not once per clone).
    pss_kib: u64,
    threads: u64,
    fds: u64,
    /// L1's MemAvailable.
    available_kib: u64,
}

fn status_field(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn usage() -> Result<Usage, String> {
    let status = std::fs::read_to_string("/proc/self/status").map_err(|e| e.to_string())?;
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").map_err(|e| e.to_string())?;
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(|e| e.to_string())?;
    let fds = std::fs::read_dir("/proc/self/fd")
        .map_err(|e| e.to_string())?
        .count() as u64;
    Ok(Usage {
        rss_kib: status_field(&status, "VmRSS:").ok_or("no VmRSS")?,
        pss_kib: status_field(&rollup, "Pss:").ok_or("no Pss")?,
        threads: status_field(&status, "Threads:").ok_or("no Threads")?,
        fds,
        available_kib: status_field(&meminfo, "MemAvailable:").ok_or("no MemAvailable")?,
    })
}

/// Guest RAM each of `vms` alone holds (for a clone, its copies of the
/// snapshot's pages), summed, in KiB.
fn guest_kib(vms: &[RunningSandbox]) -> Result<u64, String> {
    let mut bytes = 0;
    for vm in vms {
        bytes += vm.guest_memory_private().map_err(|e| e.to_string())?;
    }
    Ok(bytes / 1024)
}

/// One `key=value` line of what `vms` and this process hold.
fn report(label: &str, base: Usage, vms: &[RunningSandbox]) -> Result<Usage, String> {
    let now = usage()?;
    println!(
        "chitin-density: at={label} sandboxes={} rss_kib={} pss_kib={} guest_kib={} threads={} fds={} l1_available_drop_kib={}",
        vms.len(),
        now.rss_kib,
        now.pss_kib,
        guest_kib(vms)?,
        now.threads,
        now.fds,
        base.available_kib.saturating_sub(now.available_kib),
    );
    Ok(now)
}

/// Wait until the agent of `vm` answers; the time from `t0`.
fn up(vm: &RunningSandbox, t0: Instant) -> Result<u64, String> {
    let out = vm
        .exec(Command::new("true").timeout(UP_TIMEOUT))
        .map_err(|e| chitin::error_chain(&e))?;
    if out.status != ExitStatus::Code(0) {
        return Err(format!("true: {:?}", out.status));
    }
    Ok(t0.elapsed().as_millis() as u64)
}

/// Raise this process's soft limit on open files to its hard limit: each
/// sandbox holds a couple of dozen fds (VM, vCPU, eventfds, sockets), so
/// the common soft limit of 1024 ends a process at about 45 of them, as it
/// would any embedder that keeps many.
fn raise_fd_limit() -> Result<u64, String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limit into `limit`, a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(format!("getrlimit: {}", std::io::Error::last_os_error()));
    }
    limit.rlim_cur = limit.rlim_max;
    // SAFETY: setrlimit reads `limit`, a valid rlimit; raising the soft
    // limit up to the hard one needs no privilege.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(format!("setrlimit: {}", std::io::Error::last_os_error()));
    }
    Ok(limit.rlim_cur)
}

fn run(kernel: &str, initramfs: &str, count: usize, mem_mib: u64) -> Result<String, String> {
    if count == 0 {
        return Err("no sandboxes asked for".into());
    }
    let fd_limit = raise_fd_limit()?;
    // L1 frees the previous run's memory in the background for a moment.
    std::thread::sleep(SETTLE);
    let base = usage()?;
    println!(
        "chitin-density: at=base sandboxes=0 rss_kib={} pss_kib={} guest_kib=0 threads={} fds={} l1_available_drop_kib=0 fd_limit={fd_limit}",
        base.rss_kib, base.pss_kib, base.threads, base.fds
    );
    let builder = || {
        Sandbox::builder()
            .guest(GuestImage::new(kernel, initramfs))
            .vcpus(1)
            .memory_mib(mem_mib)
            .seccomp(seccomp_mode())
    };
    let start = |i: usize| {
        builder()
            .build()
            .and_then(Sandbox::start)
            .map_err(|e| format!("sandbox {i}: {}", chitin::error_chain(&e)))
    };
    // The first alone, so the cost of one is measured without the others.
    let t0 = Instant::now();
    let mut vms = vec![start(0)?];
    let first_ms = up(&vms[0], t0)?;
    let one = report("one", base, &vms)?;
    let t1 = Instant::now();
    for i in 1..count {
        vms.push(start(i)?);
    }
    let started_ms = t1.elapsed().as_millis() as u64;
    let mut up_ms = std::thread::scope(|s| {
        let waits: Vec<_> = vms[1..].iter().map(|vm| s.spawn(|| up(vm, t1))).collect();
        waits
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| Err("waiter panicked".into())))
            .collect::<Result<Vec<u64>, String>>()
    })?;
    up_ms.sort_unstable();
    let all = report("all", base, &vms)?;
    let median = up_ms.get(up_ms.len() / 2).copied().unwrap_or(first_ms);
    let last = up_ms.last().copied().unwrap_or(first_ms);
    println!(
        "chitin-density: at=times sandboxes={count} first_up_ms={first_ms} rest_started_ms={started_ms} rest_median_up_ms={median} rest_all_up_ms={last}"
    );
    let running = vms.iter().filter(|vm| vm.exit_reason().is_none()).count();
    if running != count {
        return Err(format!("{running} of {count} sandboxes still running"));
    }
    // The first, up and answering, becomes the clones' snapshot.
    let snap = std::path::Path::new(SNAPSHOT_DIR);
    let _ = std::fs::remove_dir_all(snap);
    vms[0].pause().map_err(|e| format!("pause: {e}"))?;
    vms[0]
        .snapshot(snap)
        .map_err(|e| format!("snapshot: {}", chitin::error_chain(&e)))?;
    drop(vms);
    // Threads end and fds close as each sandbox drops.
    let after = dropped("dropped", base)?;
    let clones = clones(count, base)?;
    let _ = std::fs::remove_dir_all(snap);
    Ok(format!(
        "{count} sandboxes answered (last {last} ms after the rest started); threads {} -> {} -> {}, fds {} -> {} -> {}; all dropped, threads and fds back to {} and {}; {clones}",
        base.threads, one.threads, all.threads, base.fds, one.fds, all.fds, after.threads, after.fds
    ))
}

/// Where the clones' snapshot is written.
const SNAPSHOT_DIR: &str = "/tmp/chitin-density-snapshot";

/// After a drop: the line at `label`, and an error unless threads and fds
/// are back to `base`'s.
fn dropped(label: &str, base: Usage) -> Result<Usage, String> {
    let after = usage()?;
    println!(
        "chitin-density: at={label} sandboxes=0 rss_kib={} pss_kib={} guest_kib=0 threads={} fds={} l1_available_drop_kib={}",
        after.rss_kib,
        after.pss_kib,
        after.threads,
        after.fds,
        base.available_kib.saturating_sub(after.available_kib)
    );
    if (after.threads, after.fds) != (base.threads, base.fds) {
        return Err(format!(
            "after a drop: {} threads and {} fds, {} and {} before",
            after.threads, after.fds, base.threads, base.fds
        ));
    }
    Ok(after)
}

/// `count` clones of the snapshot in [`SNAPSHOT_DIR`], restored at once,
/// each answering an exec: the `clones` line (against the `dropped` one
/// before them) and their times; then dropped like the cold ones.
fn clones(count: usize, base: Usage) -> Result<String, String> {
    let snapshot = chitin::Snapshot::open(SNAPSHOT_DIR).map_err(|e| chitin::error_chain(&e))?;
    let t0 = Instant::now();
    let started: Result<Vec<(RunningSandbox, u64)>, String> = std::thread::scope(|s| {
        let starts: Vec<_> = (0..count)
            .map(|i| {
                let snapshot = &snapshot;
                s.spawn(move || {
                    let vm = snapshot
                        .restore_builder()
                        .seccomp(seccomp_mode())
                        .build()
                        .and_then(Sandbox::start)
                        .map_err(|e| format!("clone {i}: {}", chitin::error_chain(&e)))?;
                    let ms = up(&vm, t0)?;
                    Ok((vm, ms))
                })
            })
            .collect();
        starts
            .into_iter()
            .map(|t| {
                t.join()
                    .unwrap_or_else(|_| Err("a restore panicked".into()))
            })
            .collect()
    });
    let (vms, mut up_ms): (Vec<RunningSandbox>, Vec<u64>) = started?.into_iter().unzip();
    up_ms.sort_unstable();
    report("clones", base, &vms)?;
    let median = up_ms.get(up_ms.len() / 2).copied().unwrap_or(0);
    let last = up_ms.last().copied().unwrap_or(0);
    println!(
        "chitin-density: at=clone-times sandboxes={count} median_up_ms={median} all_up_ms={last}"
    );
    drop(vms);
    dropped("clones-dropped", base)?;
    Ok(format!(
        "{count} clones of the first restored at once, all answered after {last} ms, dropped, threads and fds back"
    ))
}

/// The `density` mode; the process's exit code.
pub fn main(kernel: &str, initramfs: &str, count: Option<&str>, mem_mib: Option<&str>) -> i32 {
    let mut c = Checks::new();
    let mem_mib = match mem_mib.map(str::parse::<u64>) {
        None => Ok(MEM_MIB),
        Some(Ok(m)) => Ok(m),
        Some(Err(e)) => Err(format!("density memory: {e}")),
    };
    let result = match (count.map(str::parse::<usize>), mem_mib) {
        (Some(Ok(n)), Ok(m)) => run(kernel, initramfs, n, m),
        (_, Err(e)) => Err(e),
        (other, _) => Err(format!("density needs a count, got {other:?}")),
    };
    c.result("density", result);
    c.result("seccomp", super::seccomp_check());
    c.done();
    i32::from(c.failed() > 0)
}
