//! Boot benchmark: prints figures, asserts nothing.
//!
//! `cargo bench --bench boot` prints, over repeated runs of the repo's
//! `report` test guest on the host's KVM:
//! - `build()`: VM creation, memory mapping, kernel load;
//! - `start()` → the guest's first port-I/O write (its first COM1 byte);
//! - `start()` → exit (the guest reports and resets through the i8042);
//! - the VMM's resident memory outside guest RAM, for 128 MiB and 4 GiB
//!   guests, each measured in a fresh child process so one does not inflate
//!   the other. Equal figures show guest RAM costs nothing until touched.

use std::io::Write;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chitin::{Console, ConsoleCapture, ExitReason, Sandbox};
use chitin_test_guests::Guest;

/// Runs per timing under `cargo bench`; `cargo test --all-targets` runs the
/// bench binary without `--bench`, and then one run proves it still works.
const RUNS: usize = 30;
const CHILD_FLAG: &str = "--rss-child";

/// A console sink that records when the first byte arrives.
#[derive(Clone, Default)]
struct FirstByte(Arc<Mutex<Option<Instant>>>);

impl Write for FirstByte {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut first = self.0.lock().unwrap();
        first.get_or_insert_with(Instant::now);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

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

fn timings(runs: usize) {
    let (mut build, mut first_io, mut exit) = (vec![], vec![], vec![]);
    for _ in 0..runs {
        let first = FirstByte::default();
        let t0 = Instant::now();
        let sandbox = Sandbox::builder()
            .kernel(Guest::Report.path())
            .memory_mib(128)
            .console(Console::writer(first.clone()))
            .build()
            .expect("build");
        let t1 = Instant::now();
        let running = sandbox.start().expect("start");
        let reason = running.wait_timeout(Duration::from_secs(60));
        let t2 = Instant::now();
        assert_eq!(reason, Some(ExitReason::Reset));
        let first_write = first.0.lock().unwrap().expect("guest wrote nothing");
        build.push(t1 - t0);
        first_io.push(first_write - t1);
        exit.push(t2 - t1);
    }
    stats("build() (VM, memory, kernel load)", build);
    kvm_floor(runs);
    stats("start() -> first guest port-I/O write", first_io);
    stats("start() -> exit (report guest)", exit);
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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(pos) = args.iter().position(|a| a == CHILD_FLAG) {
        rss_child(args[pos + 1].parse().unwrap());
        return;
    }
    if !kvm_usable() {
        println!("boot bench skipped: /dev/kvm is not usable");
        return;
    }
    if args.iter().any(|a| a == "--bench") {
        timings(RUNS);
        rss();
    } else {
        println!("boot bench smoke run (use `cargo bench --bench boot` for figures)");
        timings(1);
    }
}
