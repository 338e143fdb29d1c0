//! Boot a guest kernel in a chitin sandbox, console on stdout.
//!
//! ```text
//! cargo run --release --example boot -- --kernel vmlinux [--initrd FILE]
//!     [--cmdline STR] [--mem MIB] [--vcpus N] [--disk PATH[,ro][,root]]... [--no-acpi]
//! cargo run --release --example boot -- --test-guest report
//! cargo run --release --example boot -- --test-guest report --jail --jail-uid 1000 --jail-gid 1000
//! ```
//!
//! `--jail` confines the process with chitin-jail before the sandbox is
//! built (see `--help` for the uid, gid and cgroup limits): the kernel,
//! the initrd and each disk are all the jail holds.
//!
//! Exit code: 0 when the guest reset or powered off, 2 on a triple fault,
//! 3 on a guest crash, 4 when `--timeout` expired, 1 for any error (printed
//! as one line on stderr).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use chitin::{
    error_chain, BootProtocol, Console, ConsoleInput, Disk, ExitReason, Sandbox, Seccomp,
};
use chitin_test_guests::Guest;
use clap::Parser;

#[path = "support/jail.rs"]
mod jail;

/// Boot a guest kernel in a chitin sandbox.
#[derive(Parser)]
struct Args {
    /// Guest kernel: ELF vmlinux or bzImage.
    #[arg(long, required_unless_present = "test_guest")]
    kernel: Option<PathBuf>,
    /// Boot one of the repo's test guests instead (report, smp, echo, ...).
    #[arg(long, conflicts_with = "kernel")]
    test_guest: Option<String>,
    /// Initramfs.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = chitin::DEFAULT_CMDLINE)]
    cmdline: String,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = chitin::DEFAULT_MEMORY_MIB)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Enter an ELF kernel through its PVH entry point.
    #[arg(long)]
    pvh: bool,
    /// No ACPI tables: the MP table and `virtio_mmio.device=` command-line
    /// entries describe the machine (the kernel needs
    /// VIRTIO_MMIO_CMDLINE_DEVICES), and the guest can only reboot.
    #[arg(long)]
    no_acpi: bool,
    /// Give the machine a PIT (for kernels without `KVM_GUEST`).
    #[arg(long)]
    pit: bool,
    /// Feed standard input to the guest's serial console.
    #[arg(long)]
    stdin: bool,
    /// A disk image or block device, as virtio-blk: `PATH[,ro][,root][,id=ID]`;
    /// repeat for more disks (vda, vdb, ... in order).
    #[arg(long = "disk", value_name = "PATH[,ro][,root][,id=ID]")]
    disks: Vec<String>,
    /// Stop the guest after this many seconds.
    #[arg(long)]
    timeout: Option<u64>,
    /// How chitin's threads are confined: `enforce` (the default), `log`
    /// (report syscalls outside the filters, then fail) or `off`; the
    /// `CHITIN_SECCOMP` environment variable sets the default.
    #[arg(long, value_parser = parse_seccomp)]
    seccomp: Option<Seccomp>,
    /// Print on stderr how long the VMM's own set-up took, from `main`:
    /// `chitin: timings build_ms=<n> start_ms=<n>` (`build()` done,
    /// `start()` returned with the vCPU threads running the guest), and
    /// chitin's debug log (where build() and start() spend it).
    #[arg(long)]
    timings: bool,
    #[command(flatten)]
    jail: jail::JailArgs,
}

fn parse_seccomp(mode: &str) -> Result<Seccomp, String> {
    match mode {
        "enforce" => Ok(Seccomp::Enforce),
        "log" => Ok(Seccomp::Log),
        "off" => Ok(Seccomp::Off),
        other => Err(format!("{other:?} is not enforce, log or off")),
    }
}

fn main() -> ExitCode {
    let began = Instant::now();
    let args = Args::parse();
    // Guest faults the devices refused are worth seeing; `--timings` adds
    // the phases of build() and start() (debug lines of `chitin::timing`).
    chitin::log_to_stderr(if args.timings {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Warn
    });
    match run(args, began) {
        Ok(reason) => {
            eprintln!("chitin: {reason}");
            let violations = chitin::seccomp_violations();
            for v in &violations {
                eprintln!("chitin: seccomp (log): {v}");
            }
            if !violations.is_empty() {
                return ExitCode::from(1);
            }
            ExitCode::from(exit_code(&reason))
        }
        Err(message) => {
            eprintln!("chitin: error: {message}");
            ExitCode::from(1)
        }
    }
}

fn run(args: Args, began: Instant) -> Result<ExitReason, String> {
    let kernel = match (&args.kernel, &args.test_guest) {
        (Some(path), _) => path.clone(),
        (None, Some(name)) => Guest::ALL
            .into_iter()
            .find(|g| g.name() == name)
            .map(|g| g.path().to_path_buf())
            .ok_or_else(|| {
                let names: Vec<_> = Guest::ALL.iter().map(|g| g.name()).collect();
                format!("unknown test guest {name:?}; one of: {}", names.join(", "))
            })?,
        (None, None) => return Err("give --kernel FILE or --test-guest NAME".into()),
    };
    let seccomp = match (args.seccomp, std::env::var("CHITIN_SECCOMP")) {
        (Some(mode), _) => mode,
        (None, Ok(mode)) => parse_seccomp(&mode)?,
        (None, Err(_)) => Seccomp::Enforce,
    };
    let mut builder = Sandbox::builder()
        .kernel(kernel)
        .cmdline(args.cmdline)
        .memory_mib(args.mem)
        .vcpus(args.vcpus)
        .seccomp(seccomp)
        .acpi(!args.no_acpi)
        .pit(args.pit)
        .boot_protocol(if args.pvh {
            BootProtocol::Pvh
        } else {
            BootProtocol::Linux64
        })
        .console(Console::stdout());
    for spec in &args.disks {
        let (disk, root) = parse_disk(spec)?;
        builder = if root {
            builder.root_disk(disk)
        } else {
            builder.disk(disk)
        };
    }
    if let Some(initrd) = args.initrd {
        builder = builder.initrd(initrd);
    }
    if args.stdin {
        builder = builder.console_input(ConsoleInput::new(std::io::stdin()));
    }
    args.jail.enter(&builder)?;
    let sandbox = builder.build().map_err(|e| error_chain(&e))?;
    let built = began.elapsed();
    let running = sandbox.start().map_err(|e| error_chain(&e))?;
    if args.timings {
        eprintln!(
            "chitin: timings build_ms={:.1} start_ms={:.1}",
            built.as_secs_f64() * 1e3,
            began.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(match args.timeout {
        Some(secs) => match running.wait_timeout(Duration::from_secs(secs)) {
            Some(reason) => reason,
            None => {
                eprintln!("chitin: timeout after {secs} s, stopping the guest");
                running.stop()
            }
        },
        None => running.wait(),
    })
}

/// `PATH[,ro][,root][,id=ID]` → the disk and whether it is the root.
fn parse_disk(spec: &str) -> Result<(Disk, bool), String> {
    let mut parts = spec.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .ok_or("--disk needs a path")?;
    let mut disk = Disk::new(path);
    let mut root = false;
    for option in parts {
        match option {
            "ro" => disk = disk.read_only(true),
            "root" => root = true,
            _ => match option.strip_prefix("id=") {
                Some(id) => disk = disk.id(id),
                None => return Err(format!("unknown --disk option {option:?} in {spec:?}")),
            },
        }
    }
    Ok((disk, root))
}

fn exit_code(reason: &ExitReason) -> u8 {
    match reason {
        ExitReason::Reset | ExitReason::PowerOff => 0,
        ExitReason::Stopped => 4,
        ExitReason::TripleFault => 2,
        ExitReason::Crash => 3,
        _ => 1,
    }
}
