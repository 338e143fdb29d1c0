//! KVM VMs and vCPUs for chitin microVMs.
//!
//! This crate owns the KVM file descriptors: VM creation with the in-kernel
//! irqchip and PIT ([`Vm`]), per-vCPU setup (CPUID, MSRs, LAPIC) and run
//! loops on their own threads ([`Vcpu`]), the kick that interrupts a vCPU
//! stuck in the guest, pausing (every vCPU parked outside the guest, with
//! work run on a parked vCPU's own thread), and the typed [`ExitReason`]
//! every stop ends in.
//! Devices never see KVM: they sit on the [`IoBuses`] and raise interrupts
//! through irqfds.

#![deny(missing_docs)]

pub mod arch;
pub mod codec;
mod exit;
mod kick;
mod park;
mod state;
mod vcpu;
mod vm;

pub use exit::{ExitReason, VmControl};
pub use kick::kick_signal;
pub use park::{ParkError, VcpuJob};
pub use state::{StateError, VcpuState, VmState};
pub use vcpu::{IoBuses, Vcpu, VcpuError};
pub use vm::{Vm, VmError};
