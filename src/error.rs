//! The one public error type of the facade.
//!
//! Every variant says what the caller can change; the underlying cause is
//! kept as the error's `source()` so a full chain can be printed.

use std::path::PathBuf;

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
    /// `.root_disk(..)` was called twice.
    #[error("only one disk can be the root disk")]
    SecondRootDisk,
    /// More devices than interrupt lines for them.
    #[error("too many virtio devices: at most {0}")]
    TooManyDevices(usize),
    /// A legacy device or the event loop could not be set up.
    #[error("cannot set up device: {0}")]
    Device(
        &'static str,
        #[source] Box<dyn std::error::Error + Send + Sync>,
    ),
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
