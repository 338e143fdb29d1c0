//! What L1's init and the exec checks share: reading L1 KVM's statistics,
//! and a client of the Kubernetes CRI.

pub mod cri;
pub mod kvm_stats;
