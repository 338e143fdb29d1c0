//! What L1's init and the exec checks share: reading L1 KVM's statistics.

pub mod kvm_stats;
