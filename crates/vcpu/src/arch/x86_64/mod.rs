//! x86_64 vCPU setup: CPUID, boot MSRs and the local APIC's LINT pins.
//!
//! Pure functions over KVM's data structures where possible, so the logic is
//! unit-tested without KVM; the thin wrappers that issue ioctls are in
//! [`crate::Vcpu`].

pub mod cpuid;
pub mod lapic;
pub mod msr;
