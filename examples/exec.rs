//! Run a command in a fresh chitin sandbox and print its output:
//!
//! ```text
//! cargo run --release --example exec -- uname -a
//! cargo run --release --example exec -- --vcpus 2 --mem 256 -- sh -c 'echo hi; exit 3'
//! cargo run --release --example exec -- --jail --jail-uid 1000 --jail-gid 1000 -- id
//! cargo run --release --example exec -- --distro debian -- uname -r
//! ```
//!
//! `--distro debian` boots Debian's own cloud kernel as its package ships
//! it (`cargo xtask guest --distro debian`, seconds to prepare) instead of
//! the minimal kernel built from source: it finds its devices through
//! chitin's ACPI tables and loads its virtio modules from the initramfs.
//!
//! `--jail` confines the process with chitin-jail before the sandbox is
//! built: the guest's kernel and initramfs and `/dev/kvm` are all the jail
//! holds (the agent's vsock socket goes to the jail's private `/tmp`).
//!
//! It prepares the default guest if needed (`cargo xtask guest`), boots it,
//! runs the command through chitin's agent, prints the command's stdout
//! and stderr, and exits with the command's exit code (128 + signal number
//! when a signal killed it, 1 on a chitin error, printed as one line).
//!
//! On a host whose `/dev/kvm` cannot run stock Linux (kvm-pvm, a software
//! hypervisor), it says so in one line and runs the same sandbox inside the
//! nested tier (`cargo xtask nested-exec`): QEMU provides an L1 Linux with a
//! real KVM, where this same program runs the command.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use chitin::{error_chain, Command, ExitStatus, GuestImage, Sandbox};
use clap::Parser;

#[path = "support/jail.rs"]
mod jail;

/// Run a command in a chitin sandbox.
#[derive(Parser)]
struct Args {
    /// Guest image directory (vmlinux + initramfs.cpio); default: the one
    /// `cargo xtask guest` prepares.
    #[arg(long, conflicts_with = "distro")]
    guest_dir: Option<PathBuf>,
    /// Boot a distribution's stock kernel instead: `debian` (Debian 12's
    /// cloud kernel, prepared by `cargo xtask guest --distro debian`).
    #[arg(long, value_parser = ["debian"])]
    distro: Option<String>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    mem: u64,
    /// Kill the command after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    #[command(flatten)]
    jail: jail::JailArgs,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// Where kvm-pvm, this workplace's software hypervisor, shows itself.
const KVM_PVM: &str = "/sys/module/kvm_pvm";

fn main() -> ExitCode {
    // Guest faults the devices refused are worth seeing.
    chitin::log_to_stderr(log::LevelFilter::Warn);
    let args = Args::parse();
    if args.guest_dir.is_none() && Path::new(KVM_PVM).exists() {
        eprintln!(
            "chitin: this host's /dev/kvm is kvm-pvm, which cannot run stock Linux; \
             running the sandbox in the nested tier (QEMU L1 with its own KVM) instead"
        );
        return nested(&args);
    }
    match run(&args) {
        Ok(status) => ExitCode::from(exit_code(status)),
        Err(message) => {
            eprintln!("chitin: error: {message}");
            ExitCode::from(1)
        }
    }
}

fn exit_code(status: ExitStatus) -> u8 {
    match status {
        ExitStatus::Code(code) => code.clamp(0, 255) as u8,
        ExitStatus::Signal(signal) => (128 + signal.number()).clamp(0, 255) as u8,
    }
}

/// Boot the guest here and run the command.
fn run(args: &Args) -> Result<ExitStatus, String> {
    let image = match (&args.guest_dir, &args.distro) {
        (Some(dir), _) => GuestImage::in_dir(dir),
        (None, Some(_)) => prepared_debian_image()?,
        (None, None) => prepared_default_image()?,
    };
    let builder = Sandbox::builder()
        .guest(image)
        .vcpus(args.vcpus)
        .memory_mib(args.mem);
    args.jail.enter(&builder)?;
    let running = builder
        .build()
        .map_err(|e| error_chain(&e))?
        .start()
        .map_err(|e| error_chain(&e))?;
    let (program, rest) = args.command.split_first().ok_or("no command given")?;
    let mut cmd = Command::new(program);
    cmd.args(rest)
        .env("HOME", "/")
        .env("TERM", "linux")
        .timeout(Duration::from_secs(args.timeout));
    let output = running.exec(&cmd).map_err(|e| error_chain(&e))?;
    // Dropping the sandbox stops the guest; nothing of it outlives this.
    drop(running);
    let _ = std::io::stdout().write_all(&output.stdout);
    let _ = std::io::stderr().write_all(&output.stderr);
    let _ = std::io::stdout().flush();
    Ok(output.status)
}

/// The default image, prepared with `cargo xtask guest` when missing.
fn prepared_default_image() -> Result<GuestImage, String> {
    let image = GuestImage::default();
    if !image.exists() {
        eprintln!("chitin: preparing the default guest (cargo xtask guest; the first time builds a kernel, about 3 minutes)");
        cargo_xtask(&["guest"])?;
    }
    Ok(image)
}

/// Debian's cloud kernel and an agent initramfs with its modules, prepared
/// with `cargo xtask guest --distro debian` when missing (next to the
/// default guest's directory).
fn prepared_debian_image() -> Result<GuestImage, String> {
    let default = GuestImage::default_dir();
    let dir = default
        .parent()
        .map_or_else(|| PathBuf::from("guest-debian"), |p| p.join("guest-debian"));
    let image = GuestImage::in_dir(&dir);
    if !image.exists() {
        eprintln!("chitin: preparing the Debian guest (cargo xtask guest --distro debian)");
        cargo_xtask(&["guest", "--distro", "debian"])?;
    }
    Ok(GuestImage::in_dir(&dir))
}

fn cargo_xtask(args: &[&str]) -> Result<i32, String> {
    let status =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .arg("xtask")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .map_err(|e| format!("cannot run cargo xtask: {e}"))?;
    status
        .code()
        .ok_or_else(|| format!("cargo xtask {} was killed", args.join(" ")))
}

/// Run the command in the nested tier and mirror its exit code; `--jail`
/// and its options go along.
fn nested(args: &Args) -> ExitCode {
    let mut xtask: Vec<String> = vec!["nested-exec".into()];
    if let Some(distro) = &args.distro {
        xtask.extend(["--distro".into(), distro.clone()]);
    }
    let j = &args.jail;
    if j.jail {
        xtask.push("--jail".into());
        xtask.extend(["--jail-uid".into(), j.jail_uid.to_string()]);
        xtask.extend(["--jail-gid".into(), j.jail_gid.to_string()]);
        for (flag, value) in [
            ("--jail-mem-mib", j.jail_mem_mib),
            ("--jail-cpu-percent", j.jail_cpu_percent),
            ("--jail-pids", j.jail_pids),
        ] {
            if let Some(v) = value {
                xtask.extend([flag.to_string(), v.to_string()]);
            }
        }
    }
    xtask.push("--".into());
    xtask.extend(args.command.iter().cloned());
    let xtask: Vec<&str> = xtask.iter().map(String::as_str).collect();
    match cargo_xtask(&xtask) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(message) => {
            eprintln!("chitin: error: {message}");
            ExitCode::from(1)
        }
    }
}
