//! The one error type of the boot crate.
//!
//! Every variant says what the caller can fix: which file is wrong and why,
//! or which limit was exceeded. Causes from the OS, vm-memory or
//! linux-loader are kept as `#[source]`, never repeated in the message.

use std::io;
use std::path::PathBuf;

use vm_memory::GuestMemoryError;

/// Why the guest could not be prepared for boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel image could not be opened.
    #[error("cannot open kernel image {}", path.display())]
    OpenKernel {
        /// The kernel image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel image could not be read (an I/O error, not a short file).
    #[error("cannot read kernel image {}", path.display())]
    ReadKernel {
        /// The kernel image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The file is neither an ELF (vmlinux) nor a bzImage.
    #[error("kernel image is neither ELF nor bzImage: {}", path.display())]
    NotAKernel {
        /// The kernel image path.
        path: PathBuf,
    },
    /// The file looks like a kernel image but its headers are inconsistent
    /// or the file is truncated.
    #[error("kernel image {} is malformed: {reason}", path.display())]
    InvalidKernel {
        /// The kernel image path.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A bzImage without the 64-bit entry point (boot protocol 2.12 with
    /// `XLF_KERNEL_64`), which chitin needs to enter it in long mode.
    #[error("bzImage has no 64-bit entry point: {}", path.display())]
    No64BitEntry {
        /// The kernel image path.
        path: PathBuf,
    },
    /// The PVH boot protocol was requested for an image without a PVH entry
    /// note (`XEN_ELFNOTE_PHYS32_ENTRY`); bzImages never have one.
    #[error("kernel image has no PVH entry point, boot it with the Linux 64-bit protocol: {}", path.display())]
    NoPvhEntry {
        /// The kernel image path.
        path: PathBuf,
    },
    /// The kernel does not fit in the guest RAM below the MMIO gap.
    #[error("kernel needs guest memory up to {end:#x} but low RAM ends at {limit:#x}: give the guest more memory")]
    KernelDoesNotFit {
        /// One past the last byte the kernel needs.
        end: u64,
        /// One past the last byte of RAM below the MMIO gap.
        limit: u64,
    },
    /// linux-loader refused the image.
    #[error("cannot load kernel image {}", path.display())]
    KernelLoad {
        /// The kernel image path.
        path: PathBuf,
        /// What linux-loader reported.
        #[source]
        source: linux_loader::loader::Error,
    },
    /// The initrd could not be opened or its size read.
    #[error("cannot open initrd {}", path.display())]
    OpenInitrd {
        /// The initrd path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The initrd could not be read into guest memory (I/O error, or the
    /// file shrank while it was read).
    #[error("cannot read initrd {}", path.display())]
    ReadInitrd {
        /// The initrd path.
        path: PathBuf,
        /// What vm-memory reported.
        #[source]
        source: GuestMemoryError,
    },
    /// The initrd file is empty.
    #[error("initrd is empty: {}", path.display())]
    EmptyInitrd {
        /// The initrd path.
        path: PathBuf,
    },
    /// There is no room for the initrd between the kernel and the highest
    /// address the kernel accepts for it.
    #[error("initrd of {size} bytes does not fit in the {available} bytes free for it: give the guest more memory")]
    InitrdDoesNotFit {
        /// Initrd size in bytes.
        size: u64,
        /// Bytes free between the kernel and the initrd limit.
        available: u64,
    },
    /// Something would be placed over memory already used for boot.
    #[error("{what} would overlap other boot data")]
    Overlap {
        /// What could not be placed.
        what: &'static str,
    },
    /// The command line is longer than the limit (VMM or kernel).
    #[error("kernel command line of {len} bytes exceeds the limit of {max} bytes")]
    CmdlineTooLong {
        /// Length in bytes, without the terminating NUL.
        len: usize,
        /// Largest accepted length, without the terminating NUL.
        max: usize,
    },
    /// linux-loader rejected the command line (non-printable character,
    /// interior NUL, init arguments without kernel arguments, ...).
    #[error("invalid kernel command line")]
    CmdlineInvalid(#[source] linux_loader::cmdline::Error),
    /// Writing a boot structure to guest memory failed.
    #[error("cannot write boot data to guest memory")]
    GuestMemory(#[source] GuestMemoryError),
    /// The MP table cannot describe this many vCPUs (0, or more than 254:
    /// APIC id 255 is the broadcast id and the IOAPIC takes the next id).
    #[error("MP table cannot describe {num_cpus} vCPUs: 1 to 254 are supported")]
    TooManyCpus {
        /// The vCPU count requested.
        num_cpus: u8,
    },
}
