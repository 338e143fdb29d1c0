//! Run a command as a container process in a sandbox: a host directory
//! holding a root file system is shared into the VM (read-only unless
//! `--writable`) and every command runs in it, in namespaces of its own
//! after `pivot_root`, with fresh `/proc`, `/sys`, `/dev` and `/tmp`.
//!
//! ```text
//! cargo xtask rootfs /tmp/rootfs      # a busybox root file system
//! cargo run --release --example container -- --rootfs /tmp/rootfs \
//!     --hostname box --uid 1000 -- sh -c 'hostname; id; ls /'
//! ```
//!
//! It prints the command's stdout and stderr and exits with its exit code
//! (128 + signal number when a signal killed it; 125 when the container
//! could not be set up; 1 on a chitin error, printed as one line).
//!
//! It needs a `/dev/kvm` that runs stock Linux. On a kvm-pvm host (a
//! software hypervisor that cannot) the nested tier runs the same logic
//! through the library: `cargo xtask nested container`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use chitin::{error_chain, Command, ExitStatus, GuestImage, Sandbox, Share};
use clap::Parser;

/// Run a command in a container root inside a chitin sandbox.
#[derive(Parser)]
struct Args {
    /// The root file system: a host directory holding `bin`, `proc`,
    /// `sys`, `dev`, `tmp`, ...
    #[arg(long)]
    rootfs: PathBuf,
    /// Share the root read-write (default: read-only).
    #[arg(long)]
    writable: bool,
    /// The container's hostname.
    #[arg(long)]
    hostname: Option<String>,
    /// User id inside the container.
    #[arg(long)]
    uid: Option<u32>,
    /// Group id inside the container (default: the uid's number).
    #[arg(long)]
    gid: Option<u32>,
    /// Working directory inside the container.
    #[arg(long)]
    cwd: Option<String>,
    /// Guest image directory (vmlinux + initramfs.cpio); default: the one
    /// `cargo xtask guest` prepares.
    #[arg(long)]
    guest_dir: Option<PathBuf>,
    /// Kill the command after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// The command and its arguments.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// Where kvm-pvm, this workplace's software hypervisor, shows itself.
const KVM_PVM: &str = "/sys/module/kvm_pvm";

fn main() -> ExitCode {
    chitin::log_to_stderr(log::LevelFilter::Warn);
    let args = Args::parse();
    if Path::new(KVM_PVM).exists() {
        eprintln!(
            "chitin: this host's /dev/kvm is kvm-pvm, which cannot run stock Linux; \
             `cargo xtask nested container` runs this example's logic in the nested tier"
        );
        return ExitCode::from(1);
    }
    match run(&args) {
        Ok(ExitStatus::Code(code)) => ExitCode::from(code.clamp(0, 255) as u8),
        Ok(ExitStatus::Signal(signal)) => {
            ExitCode::from((128 + signal.number()).clamp(0, 255) as u8)
        }
        Err(message) => {
            eprintln!("chitin: error: {message}");
            ExitCode::from(1)
        }
    }
}

fn run(args: &Args) -> Result<ExitStatus, String> {
    let image = match &args.guest_dir {
        Some(dir) => GuestImage::in_dir(dir),
        None => GuestImage::default(),
    };
    let root = Share::new(&args.rootfs, "rootfs").read_only(!args.writable);
    let vm = Sandbox::builder()
        .guest(image)
        .memory_mib(256)
        .rootfs(root)
        .build()
        .and_then(|s| s.start())
        .map_err(|e| error_chain(&e))?;
    let mut cmd = Command::new(&args.command[0]);
    cmd.args(&args.command[1..])
        .timeout(Duration::from_secs(args.timeout));
    if let Some(name) = &args.hostname {
        cmd.hostname(name);
    }
    if let Some(uid) = args.uid {
        cmd.uid(uid).gid(args.gid.unwrap_or(uid));
    } else if let Some(gid) = args.gid {
        cmd.gid(gid);
    }
    if let Some(cwd) = &args.cwd {
        cmd.current_dir(cwd);
    }
    let out = vm.output(&cmd).map_err(|e| error_chain(&e))?;
    // Dropping the sandbox stops the guest; nothing of it outlives this.
    drop(vm);
    let _ = std::io::stdout().write_all(&out.stdout);
    let _ = std::io::stderr().write_all(&out.stderr);
    let _ = std::io::stdout().flush();
    Ok(out.status)
}
