//! Boot benchmark: prints figures, asserts nothing.
//!
//! `cargo bench --bench boot` prints, over repeated runs of the repo's
//! `report` test guest on the host's KVM:
//! - `build()`: VM creation, memory mapping, kernel load;
//! - `start()` → the guest's first port-I/O write (its first COM1 byte);
//! - `start()` → exit (the guest reports and resets through the i8042);
//! - the VMM's resident memory outside guest RAM, for 128 MiB and 4 GiB
//!   guests, each measured in a fresh child process so one does not inflate
//!   the other. Equal figures show guest RAM costs nothing until touched;
//! - what confinement costs: `build()` + `start()` → the first guest I/O
//!   with seccomp enforced and off (interleaved), and, in a fresh child
//!   process per run, `Jail::enter` (as uid 65534, run as root) followed by
//!   the same;
//! - density: [`DENSITY`] idle sandboxes alive at once in one (child)
//!   process: resident memory outside guest RAM, threads and file
//!   descriptors per additional sandbox, and how fast they were created;
//! - churn: sandboxes created, started to their first guest I/O and
//!   stopped per second, by one thread and by one thread per core;
//! - snapshots: pause and snapshot of the `counter` guest, the files'
//!   sizes, and restores from `Snapshot::open` to the restored guest's
//!   first COM1 byte.
//!
//! The first guest I/O is the first byte the guest writes to COM1, seen by
//! the bench's thread waiting on a console capture (the vCPU thread writes
//! it there directly).

use std::process::Command;
use std::time::{Duration, Instant};

use chitin::{Console, ConsoleCapture, ExitReason, Sandbox, Seccomp};
use chitin_jail::Jail;
use chitin_test_guests::Guest;

/// Runs per timing under `cargo bench`; `cargo test --all-targets` runs the
/// bench binary without `--bench`, and then one run proves it still works.
const RUNS: usize = 100;
/// Sandboxes alive at once for the density figures.
const DENSITY: usize = 200;
/// Guest memory of each density and churn sandbox.
const SMALL_MIB: u64 = 32;
/// How long each churn figure runs.
const CHURN_TIME: Duration = Duration::from_secs(10);
const CHILD_FLAG: &str = "--rss-child";
const DENSITY_CHILD_FLAG: &str = "--density-child";
const JAIL_CHILD_FLAG: &str = "--jail-child";

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn stats(name: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "{name:<38} median {:>9.1} µs   min {:>9.1} µs   max {:>9.1} µs   (n={})",
        us(samples[samples.len() / 2]),
        us(samples[0]),
        us(samples[samples.len() - 1]),
        samples.len()
    );
}

/// One run of the report guest: (build, start → first COM1 byte, start →
/// exit).
fn one_run(seccomp: Seccomp) -> (Duration, Duration, Duration) {
    let console = ConsoleCapture::default();
    let t0 = Instant::now();
    let sandbox = Sandbox::builder()
        .kernel(Guest::Report.path())
        .memory_mib(128)
        .seccomp(seccomp)
        .console(Console::capture(&console))
        .build()
        .expect("build");
    let t1 = Instant::now();
    let running = sandbox.start().expect("start");
    assert!(
        console.wait_for(b"c", Duration::from_secs(60)),
        "guest wrote nothing"
    );
    let first = Instant::now();
    let reason = running.wait_timeout(Duration::from_secs(60));
    let t2 = Instant::now();
    assert_eq!(reason, Some(ExitReason::Reset));
    (t1 - t0, first - t1, t2 - t1)
}

fn timings(runs: usize) {
    let (mut build, mut first_io, mut exit) = (vec![], vec![], vec![]);
    for _ in 0..runs {
        let (b, f, e) = one_run(Seccomp::Enforce);
        build.push(b);
        first_io.push(f);
        exit.push(e);
    }
    stats("build() (VM, memory, kernel load)", build);
    kvm_floor(runs);
    stats("start() -> first guest port-I/O write", first_io);
    stats("start() -> exit (report guest)", exit);
}

/// Snapshot and restore of the counter guest (2 vCPUs, 128 MiB): pause,
/// snapshot and file sizes once, then `runs` restores, each timed from
/// `Snapshot::open` through `build()` and `start()` to the restored
/// guest's first COM1 byte.
fn snapshot_figures(runs: usize) {
    let dir = std::env::temp_dir().join(format!("chitin-bench-snapshot-{}", std::process::id()));
    let console = ConsoleCapture::default();
    let running = Sandbox::builder()
        .kernel(Guest::Counter.path())
        .memory_mib(128)
        .vcpus(2)
        .console(Console::capture(&console))
        .build()
        .expect("build")
        .start()
        .expect("start");
    assert!(
        console.wait_for(b"n 3\n", Duration::from_secs(60)),
        "the counter did not count"
    );
    let t0 = Instant::now();
    running.pause().expect("pause");
    let paused = t0.elapsed();
    let t1 = Instant::now();
    let info = running.snapshot(&dir).expect("snapshot");
    let saved = t1.elapsed();
    running.stop();
    println!(
        "snapshot of the counter guest (2 vCPUs, 128 MiB): pause {:.1} µs, snapshot {:.1} ms; state file {} B, memory file {} MiB with {} KiB written",
        paused.as_secs_f64() * 1e6,
        saved.as_secs_f64() * 1e3,
        info.state_bytes,
        info.memory_bytes >> 20,
        info.memory_written >> 10
    );
    let (mut build, mut first_io, mut total) = (vec![], vec![], vec![]);
    for _ in 0..runs {
        let console = ConsoleCapture::default();
        let t0 = Instant::now();
        let sandbox = chitin::Snapshot::open(&dir)
            .expect("open")
            .restore_builder()
            .console(Console::capture(&console))
            .build()
            .expect("restore build");
        let t1 = Instant::now();
        let running = sandbox.start().expect("start");
        // Any byte: the restored guest goes on with the line it was in.
        assert!(wait_any_byte(&console), "the restored guest wrote nothing");
        let t2 = Instant::now();
        running.stop();
        build.push(t1 - t0);
        first_io.push(t2 - t1);
        total.push(t2 - t0);
    }
    stats("restore: open + build()", build);
    stats("restore: start() -> first guest I/O", first_io);
    stats("restore: open -> first guest I/O", total);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Wait (up to a minute) until `console` holds at least one byte.
fn wait_any_byte(console: &ConsoleCapture) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if !console.contents().is_empty() {
            return true;
        }
        std::thread::yield_now();
    }
    false
}

/// The hypervisor's own share of `build()`: create a VM with one 128 MiB
/// memory slot and the in-kernel irqchip, in chitin's order (memory first)
/// and in the other order, which some hosts make far slower.
fn kvm_floor(runs: usize) {
    for memory_first in [true, false] {
        let mut samples = vec![];
        for _ in 0..runs {
            let ram = chitin_memory::GuestRam::new(128 << 20, chitin_memory::Backing::Anonymous)
                .expect("guest ram");
            let t0 = Instant::now();
            let kvm = kvm_ioctls::Kvm::new().expect("open /dev/kvm");
            let vm = kvm.create_vm().expect("create vm");
            if memory_first {
                ram.register(&vm).expect("register memory");
                vm.create_irq_chip().expect("irqchip");
            } else {
                vm.create_irq_chip().expect("irqchip");
                ram.register(&vm).expect("register memory");
            }
            samples.push(t0.elapsed());
        }
        let name = if memory_first {
            "  KVM only: VM + memslot, then irqchip"
        } else {
            "  KVM only: VM + irqchip, then memslot"
        };
        stats(name, samples);
    }
}

fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// In a child: run a spinning guest of `mib` MiB and print
/// `<process RSS KiB> <guest resident KiB>`.
fn rss_child(mib: u64) {
    let console = ConsoleCapture::default();
    let running = Sandbox::builder()
        .kernel(Guest::Spin.path())
        .memory_mib(mib)
        .console(Console::capture(&console))
        .build()
        .expect("build")
        .start()
        .expect("start");
    assert!(console.wait_for(b"chitin-test: spin\n", Duration::from_secs(60)));
    let rss = status_kib("VmRSS:");
    let guest = running.guest_memory_resident().unwrap() / 1024;
    println!("{rss} {guest}");
    running.stop();
}

fn rss() {
    let exe = std::env::current_exe().unwrap();
    for mib in [128u64, 4096] {
        let out = Command::new(&exe)
            .args([CHILD_FLAG, &mib.to_string()])
            .output()
            .expect("spawn child");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut it = text.split_whitespace().map(|v| v.parse::<u64>().unwrap());
        let (rss, guest) = (it.next().unwrap(), it.next().unwrap());
        println!(
            "VMM RSS outside guest RAM, {mib:>4} MiB guest: {:>6} KiB  (process {rss} KiB, guest-touched {guest} KiB)",
            rss - guest
        );
    }
}

/// Starting a thread until it is confined, per thread class, next to
/// starting one without a filter: the kernel's cost of installing each
/// class's filter (it compiles the BPF program for every thread).
fn confine_cost(runs: usize) {
    use chitin_seccomp::{spawn, ThreadClass};
    let start = |class, mode| {
        let t0 = Instant::now();
        let thread = spawn("chitin-bench", class, mode, || {}).expect("thread");
        let confined = t0.elapsed();
        thread.join().unwrap();
        confined
    };
    stats(
        "thread start, no filter",
        (0..runs)
            .map(|_| start(ThreadClass::Vcpu, Seccomp::Off))
            .collect(),
    );
    for class in ThreadClass::ALL {
        let name = format!("thread start + {class} filter");
        stats(
            &name,
            (0..runs).map(|_| start(class, Seccomp::Enforce)).collect(),
        );
    }
}

/// `build()` + `start()` → first guest I/O with seccomp enforced and
/// off, interleaved run by run so drift on the host hits both alike.
fn seccomp_cost(runs: usize) {
    let (mut on, mut off) = (vec![], vec![]);
    for _ in 0..runs {
        let (b, f, _) = one_run(Seccomp::Enforce);
        on.push(b + f);
        let (b, f, _) = one_run(Seccomp::Off);
        off.push(b + f);
    }
    stats("build+start -> first I/O, seccomp on", on);
    stats("build+start -> first I/O, seccomp off", off);
}

/// In a child (as root): enter a jail, then one run; print `<enter µs>
/// <build+start → first I/O µs>`. The supervisor half of the child waits
/// and exits as the jailed half does.
fn jail_child(state: &str) {
    let guest = Guest::Report.path().to_path_buf();
    let t0 = Instant::now();
    let jailed = Jail::new(format!("bench-{}", std::process::id()))
        .ids(65534, 65534)
        .state_dir(state)
        .read_only(&guest)
        .device("/dev/kvm")
        .enter();
    // Only the jailed process gets here (the supervisor exits with it); a
    // fork keeps the monotonic clock, so `t0` still holds.
    let entered = t0.elapsed();
    if let Err(e) = jailed {
        eprintln!("jail: {e}");
        std::process::exit(1);
    }
    let (b, f, _) = one_run(Seccomp::Enforce);
    println!("{} {}", entered.as_micros(), (b + f).as_micros());
}

/// `Jail::enter` and build+start → first I/O in a jail, a fresh process
/// per run (a jail is entered once per process).
fn jail_cost(runs: usize) {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("jail cost not measured: the jail needs root");
        return;
    }
    let state = std::env::temp_dir().join(format!("chitin-bench-jail-{}", std::process::id()));
    let exe = std::env::current_exe().unwrap();
    let (mut enter, mut first_io) = (vec![], vec![]);
    for _ in 0..runs {
        let out = Command::new(&exe)
            .args([JAIL_CHILD_FLAG, &state.display().to_string()])
            .output()
            .expect("spawn child");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut it = text
            .split_whitespace()
            .filter_map(|v| v.parse::<u64>().ok());
        match (it.next(), it.next()) {
            (Some(e), Some(f)) => {
                enter.push(Duration::from_micros(e));
                first_io.push(Duration::from_micros(f));
            }
            _ => {
                println!(
                    "jail cost not measured: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                let _ = std::fs::remove_dir_all(&state);
                return;
            }
        }
    }
    let _ = std::fs::remove_dir_all(&state);
    stats("Jail::enter (fork, namespaces, root, ids)", enter);
    stats("build+start -> first I/O, in the jail", first_io);
}

/// An idle sandbox (its vCPU halted in the kernel), started and seen
/// alive (its banner on the console).
fn idle_sandbox() -> chitin::RunningSandbox {
    let console = ConsoleCapture::default();
    let running = Sandbox::builder()
        .kernel(Guest::Idle.path())
        .memory_mib(SMALL_MIB)
        .console(Console::capture(&console))
        .build()
        .expect("build")
        .start()
        .expect("start");
    assert!(
        console.wait_for(b"chitin-test: idle\n", Duration::from_secs(60)),
        "idle guest wrote nothing"
    );
    running
}

/// This process's open file descriptors.
fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64)
}

/// The whole `(RSS KiB, threads, fds, guest-resident KiB)` of this
/// process and the `running` sandboxes.
fn footprint(running: &[chitin::RunningSandbox]) -> (u64, u64, u64, u64) {
    let guest: u64 = running
        .iter()
        .map(|r| r.guest_memory_resident().unwrap_or(0) / 1024)
        .sum();
    (
        status_kib("VmRSS:"),
        status_kib("Threads:"),
        open_fds(),
        guest,
    )
}

/// In a child: one idle sandbox, then `n - 1` more; print `<n> <RSS KiB>
/// <threads> <fds> <guest KiB>` with one alive and with all alive, then
/// the µs it took to start the `n - 1`.
fn density_child(n: usize) {
    // Each sandbox holds a dozen descriptors: lift the soft limit to the
    // hard one, as a runtime hosting many sandboxes would.
    // SAFETY: getrlimit/setrlimit write and read only the struct given.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
    let mut alive = vec![idle_sandbox()];
    let one = footprint(&alive);
    let t0 = Instant::now();
    for _ in 1..n {
        alive.push(idle_sandbox());
    }
    let started = t0.elapsed();
    let all = footprint(&alive);
    println!("1 {} {} {} {}", one.0, one.1, one.2, one.3);
    println!("{n} {} {} {} {}", all.0, all.1, all.2, all.3);
    println!("{}", started.as_micros());
    for running in alive {
        assert_eq!(running.stop(), ExitReason::Stopped);
    }
}

/// Per additional sandbox, with [`DENSITY`] alive in one process.
fn density(n: usize) {
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(&exe)
        .args([DENSITY_CHILD_FLAG, &n.to_string()])
        .output()
        .expect("spawn child");
    let text = String::from_utf8_lossy(&out.stdout);
    let rows: Vec<Vec<u64>> = text
        .lines()
        .map(|l| {
            l.split_whitespace()
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .collect();
    // The child checks every stop; a failed child fails the bench.
    assert!(
        out.status.success(),
        "density child failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let (Some(one), Some(all), Some(us)) = (rows.first(), rows.get(1), rows.get(2)) else {
        panic!("density child printed {text:?}");
    };
    assert!(
        one.len() == 5 && all.len() == 5 && us.len() == 1,
        "{text:?}"
    );
    let more = (n - 1) as f64;
    let per = |i: usize| (all[i] as f64 - one[i] as f64) / more;
    let outside = |row: &Vec<u64>| row[1] as f64 - row[4] as f64;
    println!(
        "density, {n} idle sandboxes ({SMALL_MIB} MiB each) in one process: per additional sandbox {:.0} KiB RSS outside guest RAM ({:.0} KiB guest-touched), {:.1} threads, {:.1} fds; one alone: {:.0} KiB outside guest RAM, {} threads",
        (outside(all) - outside(one)) / more,
        per(4),
        per(2),
        per(3),
        outside(one),
        one[2]
    );
    println!(
        "  started {} more one after another at {:.0} sandboxes/s (to the first guest I/O)",
        n - 1,
        more / (us[0] as f64 / 1e6)
    );
}

/// Sandboxes built, started to their first guest I/O and stopped per
/// second, by `threads` threads at once for [`CHURN_TIME`] (or `once`).
fn churn(threads: usize, once: bool) {
    let t0 = Instant::now();
    let total: usize = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || {
                    let mut done = 0;
                    while done == 0 || (!once && t0.elapsed() < CHURN_TIME) {
                        assert_eq!(idle_sandbox().stop(), ExitReason::Stopped);
                        done += 1;
                    }
                    done
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "churn, {threads} thread(s): {total} sandboxes built, started to first I/O and stopped in {secs:.1} s: {:.0} per second",
        total as f64 / secs
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(pos) = args.iter().position(|a| a == CHILD_FLAG) {
        rss_child(args[pos + 1].parse().unwrap());
        return;
    }
    if let Some(pos) = args.iter().position(|a| a == DENSITY_CHILD_FLAG) {
        density_child(args[pos + 1].parse().unwrap());
        return;
    }
    if let Some(pos) = args.iter().position(|a| a == JAIL_CHILD_FLAG) {
        jail_child(&args[pos + 1]);
        return;
    }
    if !kvm_usable() {
        println!("boot bench skipped: /dev/kvm is not usable");
        return;
    }
    if args.iter().any(|a| a == "--bench") {
        timings(RUNS);
        snapshot_figures(30);
        rss();
        density(DENSITY);
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        churn(1, false);
        churn(cores, false);
        confine_cost(100);
        seccomp_cost(100);
        jail_cost(RUNS);
    } else {
        println!("boot bench smoke run (use `cargo bench --bench boot` for figures)");
        timings(1);
        snapshot_figures(1);
        density(2);
        churn(2, true);
        confine_cost(1);
        seccomp_cost(1);
        jail_cost(1);
    }
}
