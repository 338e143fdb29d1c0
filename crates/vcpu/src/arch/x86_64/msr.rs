//! The model-specific registers chitin sets on every vCPU before boot.
//!
//! Linux expects the syscall MSRs cleared and fast strings enabled; MTRRs
//! default to write-back so the guest does not run with caching disabled
//! (Intel SDM vol. 3A §11.11.2.1).
//!
//! The TSC is deliberately not written: KVM starts every vCPU's TSC in
//! step, while writing it per vCPU at slightly different times made Linux
//! mark the TSC unstable ("TSCs unsynchronized") in the nested tier.

use kvm_bindings::kvm_msr_entry;

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// IA32_MISC_ENABLE bit 0: fast-string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: E (bit 11) enables MTRRs, type 6 = write-back.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// The boot MSR values, in the order they are written.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
    .into_iter()
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_msrs_enable_fast_strings_and_writeback_mtrr() {
        let msrs = boot_msrs();
        let get = |i| msrs.iter().find(|e| e.index == i).unwrap().data;
        assert_eq!(get(MSR_IA32_MISC_ENABLE), 1);
        assert_eq!(get(MSR_MTRR_DEF_TYPE), 0x806);
        assert_eq!(get(MSR_LSTAR), 0);
    }

    #[test]
    fn boot_msrs_have_unique_indices() {
        let mut idx: Vec<u32> = boot_msrs().iter().map(|e| e.index).collect();
        let n = idx.len();
        idx.sort_unstable();
        idx.dedup();
        assert_eq!(idx.len(), n);
    }
}
