//! The facade's public error types, one per concern: [`SandboxError`]
//! (building and starting a sandbox) and [`ExecError`] (running a command
//! in it).
//!
//! Every variant says what the caller can change; the underlying cause is
//! kept as the error's `source()` so a full chain can be printed.

use std::path::PathBuf;
use std::time::Duration;

use chitin_vcpu::ExitReason;

/// Why a sandbox could not be built or started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SandboxError {
    /// `build()` was called without `.kernel(..)`.
    #[error("no guest kernel configured: call .kernel(path)")]
    MissingKernel,
    /// The vCPU count is outside 1..=254.
    #[error("invalid vCPU count {0}: chitin supports 1 to 254 vCPUs")]
    InvalidVcpus(u32),
    /// The memory size is unusable.
    #[error("invalid guest memory size of {0} MiB")]
    InvalidMemory(u64, #[source] chitin_memory::MemoryError),
    /// The command line could not be built.
    #[error("invalid kernel command line")]
    Cmdline(#[source] chitin_boot::BootError),
    /// The command line sets an entry the sandbox needs to another value
    /// (for a guest image: `chitin.agent=1`, which starts the agent).
    #[error("the kernel command line sets {found}, but this sandbox needs {needed}")]
    CmdlineConflict {
        /// The caller's entry.
        found: String,
        /// What chitin needs there.
        needed: &'static str,
    },
    /// KVM is missing or refused to create the VM.
    #[error("cannot create a KVM virtual machine")]
    Kvm(#[source] chitin_vcpu::VmError),
    /// The kernel or initrd could not be loaded.
    #[error("cannot load the guest kernel")]
    Boot(#[source] chitin_boot::BootError),
    /// The ACPI tables could not be built or written.
    #[error("cannot write the ACPI tables")]
    Acpi(#[source] chitin_acpi::AcpiError),
    /// A vCPU could not be created or started.
    #[error("cannot set up a vCPU")]
    Vcpu(#[source] chitin_vcpu::VcpuError),
    /// The console output file could not be opened.
    #[error("cannot open console output file {}", .path.display())]
    ConsoleFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A disk image could not be opened or is unusable.
    #[error("cannot use a disk image")]
    Disk {
        /// The image.
        path: PathBuf,
        /// What was wrong.
        #[source]
        source: chitin_blk::BlkError,
    },
    /// The vsock device could not be created (bad CID, socket path in use).
    #[error("cannot set up the vsock device at {}", .path.display())]
    Vsock {
        /// The Unix socket path.
        path: PathBuf,
        /// What was wrong.
        #[source]
        source: chitin_vsock::VsockError,
    },
    /// A network interface's tap could not be opened or is unusable: no
    /// /dev/net/tun, no permission, a bad or busy name, or a handed-over
    /// fd that is not a vnet tap.
    #[error("cannot use {tap}")]
    Tap {
        /// `tap <name>` or `a handed-over tap fd`.
        tap: String,
        /// Which step failed and why.
        #[source]
        source: chitin_net::TapError,
    },
    /// A network device could not be set up over its tap.
    #[error("cannot set up the network device on {tap}")]
    NetDevice {
        /// `tap <name>` or `a handed-over tap fd`.
        tap: String,
        /// What failed.
        #[source]
        source: chitin_net::NetError,
    },
    /// A shared directory cannot be served (missing, not a directory).
    #[error("cannot share {} as {tag}", .path.display())]
    Share {
        /// The share's tag.
        tag: String,
        /// The host directory.
        path: PathBuf,
        /// What was wrong.
        #[source]
        source: chitin_fs::FsError,
    },
    /// A share's settings are invalid (tag, mount point, limits) or two
    /// shares use one tag or mount point.
    #[error("invalid share: {0}")]
    InvalidShare(String),
    /// A network interface's guest settings are inconsistent.
    #[error("invalid network interface settings: {0}")]
    InvalidNet(String),
    /// A rate limit lets nothing through.
    #[error("invalid rate limit: {0}")]
    InvalidRateLimit(String),
    /// `.root_disk(..)` was called twice.
    #[error("only one disk can be the root disk")]
    SecondRootDisk,
    /// More devices than interrupt lines for them.
    #[error("too many virtio devices: at most {0}")]
    TooManyDevices(usize),
    /// A device, its wiring or a VMM thread could not be set up: the host
    /// is out of a resource (fds, memory, threads) or KVM refused a step.
    #[error("cannot set up {device}: {step} failed")]
    Device {
        /// The device (`serial`, `virtio-mmio`, `event loop`, ...).
        device: &'static str,
        /// The step that failed (`irqfd`, `ioeventfd`, `thread`, ...).
        step: &'static str,
        /// The host's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// chitin's threads cannot be confined as [`SandboxBuilder::seccomp`]
    /// asks: the kernel lacks seccomp filters (use `Seccomp::Off` there,
    /// knowing what is given up).
    ///
    /// [`SandboxBuilder::seccomp`]: crate::SandboxBuilder::seccomp
    #[error("seccomp confinement is unavailable")]
    Seccomp(#[source] chitin_seccomp::SeccompError),
    /// The snapshot a restore builder came from cannot be restored as
    /// configured.
    #[error("cannot restore the snapshot")]
    Snapshot(#[source] crate::snapshot::SnapshotError),
}

/// Why a command could not be run in the guest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecError {
    /// The sandbox was not built with `.guest(..)`: no agent runs in it.
    #[error("this sandbox runs no agent: build it with .guest(GuestImage)")]
    NoAgent,
    /// The agent did not come up before the timeout (the guest may not
    /// have booted, or its image has no agent).
    #[error("the guest agent did not come up within {0:?}")]
    AgentUnreachable(Duration),
    /// The guest stopped (before or while the command ran).
    #[error("the guest stopped: {0}")]
    GuestStopped(ExitReason),
    /// The command did not finish within its timeout; it was killed.
    #[error("the command did not finish within {0:?} and was killed")]
    Timeout(Duration),
    /// The command wrote more than its output limit to stdout or stderr.
    #[error("the command wrote more than {limit} bytes to {stream}")]
    OutputLimit {
        /// `stdout` or `stderr`.
        stream: &'static str,
        /// The limit, in bytes.
        limit: usize,
    },
    /// The agent could not start the program: it does not exist, is not
    /// executable, or its directory, user or group is wrong in the guest.
    #[error("cannot start {program:?} in the guest: {reason}")]
    SpawnFailed {
        /// The program.
        program: String,
        /// The agent's reason.
        reason: String,
    },
    /// The command's settings are out of range (a umask over 0777, an
    /// OOM score outside -1000..=1000, too many mounts, groups or
    /// rlimits); nothing was sent to the guest.
    #[error("invalid command: {0}")]
    InvalidCommand(String),
    /// A stream was given a [`Stdio`](crate::Stdio) it cannot take
    /// (bytes for an output, a writer for stdin).
    #[error("{stream} cannot be Stdio::{what}")]
    InvalidStdio {
        /// `stdin`, `stdout` or `stderr`.
        stream: &'static str,
        /// The value given.
        what: &'static str,
    },
    /// A signal number the guest reported back, outside 1 to 64.
    #[error("invalid signal number {0}: signals are 1 to 64")]
    InvalidSignal(i32),
    /// The guest image's agent speaks another protocol version: build the
    /// guest image from the same chitin release as the host.
    #[error("the guest agent speaks protocol version {agent}, this host {host}: rebuild the guest image")]
    AgentVersion {
        /// The agent's version.
        agent: u32,
        /// The host's.
        host: u32,
    },
    /// The agent accepted the connection but did not answer a request
    /// within this long.
    #[error("the guest agent did not answer within {0:?}")]
    AgentUnresponsive(Duration),
    /// The agent stopped reading its connection: a message could not be
    /// written within this long, so the connection was closed (the next
    /// command opens a new one).
    #[error("the guest agent stopped reading: a message took over {0:?}; connection closed")]
    AgentStalled(Duration),
    /// The agent sent something that is not the protocol: the guest is
    /// broken or hostile. The connection was closed.
    #[error("the guest agent broke the protocol: {0}")]
    AgentMisbehaved(String),
    /// The agent reported a failure of a running command.
    #[error("the guest agent failed: {0}")]
    AgentFailed(String),
    /// The connection to the agent broke (the agent died or the guest's
    /// vsock driver reset); the next command opens a new one.
    #[error("the connection to the guest agent broke")]
    ConnectionLost(#[source] std::io::Error),
    /// The host's random generator failed: no entropy to hand the guest
    /// before its first command.
    #[error("cannot read host random bytes for the guest")]
    HostEntropy(#[source] std::io::Error),
    /// Writing the command's stdin failed.
    #[error("cannot write the command's stdin")]
    Stdin(#[source] std::io::Error),
    /// The host could not start the thread that feeds the command's stdin
    /// or copies one of its outputs (out of threads or memory).
    #[error("cannot start a host thread for the command's {0}")]
    Thread(&'static str, #[source] std::io::Error),
}

/// Why a sandbox could not be paused. On every error the sandbox runs on
/// as before (or has stopped).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PauseError {
    /// The guest had stopped, or stopped while pausing.
    #[error("the guest stopped: {0}")]
    GuestStopped(ExitReason),
    /// Not every vCPU left the guest in time (a vCPU thread busy in a
    /// device); the pause was undone.
    #[error("{parked} of {vcpus} vCPUs left the guest within {waited:?}; the sandbox runs on")]
    VcpusBusy {
        /// vCPUs that had parked.
        parked: usize,
        /// vCPUs the sandbox has.
        vcpus: usize,
        /// How long the pause waited.
        waited: Duration,
    },
    /// The device thread did not finish what it was handling in time; the
    /// pause was undone.
    #[error("the device thread did not come to rest within {0:?}; the sandbox runs on")]
    DevicesBusy(Duration),
}

/// Render an error and its whole `source()` chain on one line, as
/// `outer: inner: innermost`.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        line.push_str(": ");
        line.push_str(&e.to_string());
        cause = e.source();
    }
    line
}
