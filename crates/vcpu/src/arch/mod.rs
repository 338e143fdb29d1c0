//! Architecture-specific vCPU setup. Only x86_64 exists today; everything
//! that knows about CPUID leaves, MSRs or the local APIC lives below here.

pub mod x86_64;
