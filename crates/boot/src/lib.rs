//! Linux kernel loading and x86_64 boot structures for chitin microVMs.
//!
//! This crate puts a guest in the state the Linux x86 boot protocol
//! (`Documentation/arch/x86/boot.rst`) or the PVH boot ABI (Xen
//! `arch-x86/hvm/start_info.h`) expects at the kernel entry point:
//!
//! - [`build_cmdline`] joins the user's command line with the VMM's own
//!   entries and checks the length limit;
//! - [`load_kernel`] detects ELF or bzImage by content, loads the kernel at
//!   1 MiB, places the initrd, writes the command line and the zero page
//!   (Linux 64-bit protocol) or `hvm_start_info` (PVH), with the e820 map of
//!   [`chitin_memory::MemoryLayout::address_map`];
//! - [`setup_regs`], [`setup_sregs`] and [`setup_fpu`] give the boot vCPU's
//!   registers, segments, boot GDT and identity page tables;
//! - [`setup_mptable`] writes the Intel MP table that tells the guest about
//!   its vCPUs and the IOAPIC.
//!
//! Kernel and initrd files are untrusted input: a malformed file gives a
//! [`BootError`], never a panic or an allocation sized by a header field.
//! Every guest address used comes from [`chitin_memory::layout`]. This crate
//! never talks to KVM: it only fills guest memory and plain register structs.

#![deny(missing_docs)]

mod cmdline;
mod error;
mod gdt;
mod loader;
mod mptable;
mod paging;
mod regs;

#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils;

pub use cmdline::build_cmdline;
pub use error::BootError;
pub use loader::{load_kernel, BootInfo, BootParams, BootProtocol, KernelFormat};
pub use mptable::setup_mptable;
pub use regs::{setup_fpu, setup_regs, setup_sregs};
