//! chitin: a hardened, embeddable KVM microVM monitor.
//!
//! A runtime links chitin to give each workload its own KVM virtual machine:
//! configure a [`Sandbox`] (kernel, initrd, command line, vCPUs, memory,
//! console, disks, network interfaces, vsock, a guest image with chitin's agent), `build()` it
//! (everything is validated and the kernel loaded), `start()` it, run
//! commands in it ([`Command`], [`RunningSandbox::output`] and
//! [`RunningSandbox::spawn`]), and `wait()` for or `stop()` it (from any
//! thread through a [`SandboxHandle`]) to get a typed [`ExitReason`].
//!
//! ```no_run
//! use chitin::{Console, ConsoleCapture, ExitReason, Sandbox};
//!
//! let console = ConsoleCapture::default();
//! let vm = Sandbox::builder()
//!     .kernel("/path/to/vmlinux")
//!     .initrd("/path/to/initramfs.cpio.gz")
//!     .cmdline("console=ttyS0 reboot=k panic=-1")
//!     .vcpus(2)
//!     .memory_mib(256)
//!     .console(Console::capture(&console))
//!     .build()?
//!     .start()?;
//! assert_eq!(vm.wait(), ExitReason::Reset);
//! print!("{}", String::from_utf8_lossy(&console.contents()));
//! # Ok::<(), chitin::SandboxError>(())
//! ```
//!
//! The facade owns no device or KVM logic itself: it composes
//! `chitin-memory` (guest RAM), `chitin-boot` (kernel loading),
//! `chitin-vcpu` (the VM and its vCPUs), `chitin-devices` (serial, i8042,
//! RTC), `chitin-virtio` (the virtio-mmio transport), `chitin-blk`,
//! `chitin-net` and `chitin-vsock` (the virtio devices), and the host side of
//! `chitin-agent`'s protocol. None of their types but the plain
//! configuration enums ([`BootProtocol`], [`Backing`]), the MAC address
//! ([`MacAddr`]) and results ([`ExitReason`], [`BootInfo`],
//! [`NetStats`]) appear in its API.

#![deny(missing_docs)]
#![deny(missing_debug_implementations)]

mod console;
mod devices;
mod disk;
mod error;
mod event_loop;
mod exec;
mod faults;
mod guest;
mod logging;
mod net;
mod remote;
mod sandbox;
mod share;
mod snapshot;
#[cfg(feature = "tokio")]
pub mod tokio;

pub use chitin_boot::{BootInfo, BootProtocol, KernelFormat};
pub use chitin_fs::IdRange;
pub use chitin_memory::Backing;
pub use chitin_net::{MacAddr, MacParseError, NetStats};
pub use chitin_vcpu::ExitReason;
pub use console::{
    Console, ConsoleCapture, ConsoleInput, DEFAULT_CAPTURE_LIMIT, DEFAULT_FILE_LIMIT,
};
pub use disk::Disk;
pub use error::{error_chain, ExecError, PauseError, SandboxError};
pub use exec::{
    Capabilities, Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Mount, Output,
    Signal, Signaller, Stdio, AGENT_PORT, DEFAULT_OUTPUT_LIMIT,
};
pub use faults::DeviceFaults;
pub use guest::{GuestImage, GUEST_CMDLINE};
pub use logging::log_to_stderr;
pub use net::{Net, RateLimit};
pub use remote::RemoteSandbox;
pub use sandbox::{
    RunningSandbox, Sandbox, SandboxBuilder, SandboxHandle, DEFAULT_CMDLINE, DEFAULT_GUEST_CID,
    DEFAULT_MEMORY_MIB, DEFAULT_VCPUS, MAX_VCPUS, ROOTFS_MOUNT, VMM_CMDLINE_ENTRIES,
};
pub use share::Share;
#[doc(hidden)]
pub use snapshot::fuzzing;
pub use snapshot::{Snapshot, SnapshotError, SnapshotInfo, SNAPSHOT_FORMAT};

pub use chitin_seccomp::{Seccomp, ThreadClass as SeccompThread, Violation as SeccompViolation};

/// Confining a process that runs one sandbox: namespaces, a root holding
/// only the sandbox's files, cgroup limits, no capabilities, unprivileged
/// ids (`chitin-jail`; [`SandboxBuilder::jail`] fills one in from a
/// sandbox's configuration). See docs/security.md.
pub mod jail {
    pub use chitin_jail::*;
}

/// What chitin's threads did outside their seccomp filters while running
/// under [`Seccomp::Log`], each (thread kind, syscall) once, since the
/// process started. Empty when every filter held, and always under
/// [`Seccomp::Enforce`] (a violation kills the process there).
pub fn seccomp_violations() -> Vec<SeccompViolation> {
    chitin_seccomp::violations()
}
