//! Per-vCPU CPUID adjustment.
//!
//! KVM reports what the host can virtualise (`KVM_GET_SUPPORTED_CPUID`); each
//! vCPU then needs its own APIC id and a topology that matches the MP table
//! chitin writes: `count` single-threaded cores in one package. Intel SDM vol. 2A
//! (CPUID) and AMD APM vol. 3 (E.4) define the leaves touched here.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX};

/// Leaf 1: version and feature information.
const LEAF_FEATURES: u32 = 0x1;
/// Leaf 4: deterministic cache parameters (Intel).
const LEAF_CACHE_PARAMS: u32 = 0x4;
/// Leaf 0xB: extended topology enumeration (Intel).
const LEAF_TOPOLOGY: u32 = 0xb;
/// Leaf 0x1F: V2 extended topology enumeration (Intel).
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
/// Leaf 0x8000_0008: AMD core count (ECX[7:0] = NC).
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
/// Leaf 0x8000_001E: AMD extended APIC id.
const LEAF_AMD_EXT_APIC: u32 = 0x8000_001e;

/// Leaf 1 ECX bit 31: running under a hypervisor.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX bit 24: the LAPIC timer has TSC-deadline mode.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 EDX bit 28: the package may hold more than one logical processor.
const EDX_HTT: u32 = 1 << 28;
/// Topology level types in leaf 0xB/0x1F ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to hold `count` distinct ids: ceil(log2(count)).
fn id_bits(count: u8) -> u32 {
    if count <= 1 {
        0
    } else {
        u32::BITS - (u32::from(count) - 1).leading_zeros()
    }
}

/// What the host's KVM offers beyond `KVM_GET_SUPPORTED_CPUID`.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostFeatures {
    /// `KVM_CAP_TSC_DEADLINE_TIMER`: the in-kernel LAPIC emulates the
    /// TSC-deadline timer, but KVM leaves advertising it to userspace.
    /// Without it Linux calibrates the LAPIC timer against another clock at
    /// boot, which cost about 0.26 s in the nested tier.
    pub tsc_deadline_timer: bool,
}

/// Adjust the supported CPUID for vCPU `id` of `count` vCPUs.
pub fn adjust(cpuid: &mut CpuId, id: u8, count: u8, host: HostFeatures) {
    let apic_id = u32::from(id);
    let count32 = u32::from(count);
    let has_topology = cpuid.as_slice().iter().any(|e| e.function == LEAF_TOPOLOGY);
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX[31:24] initial APIC id, EBX[23:16] logical processors
                // per package.
                entry.ebx = (entry.ebx & 0xffff) | (apic_id << 24) | (count32 << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if host.tsc_deadline_timer {
                    entry.ecx |= ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1. EAX[25:14]: logical
                // processors sharing this cache - 1: none for L1/L2, all
                // cores for the last level (EAX[7:5] = level 3).
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count32 - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff) | ((count32 - 1) << 26) | (sharing << 14);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => set_topology_level(entry, apic_id, count),
            LEAF_AMD_SIZES => {
                entry.ecx = (entry.ecx & !0xff) | (count32 - 1);
            }
            LEAF_AMD_EXT_APIC => {
                // EAX extended APIC id; EBX[7:0] compute unit id, EBX[15:8]
                // threads per compute unit - 1 (one thread); ECX[10:8] nodes
                // per processor - 1 (one node).
                entry.eax = apic_id;
                entry.ebx = apic_id & 0xff;
                entry.ecx &= !0x7ff;
            }
            _ => {}
        }
    }
    if !has_topology {
        // Older hosts may not list leaf 0xB; Linux uses it when the max basic
        // leaf allows, so add the two levels if the table has room.
        let max_basic = cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == 0)
            .map_or(0, |e| e.eax);
        if max_basic >= LEAF_TOPOLOGY {
            for index in 0..2 {
                let mut entry = kvm_cpuid_entry2 {
                    function: LEAF_TOPOLOGY,
                    index,
                    flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
                    ..Default::default()
                };
                set_topology_level(&mut entry, apic_id, count);
                // A full table only loses the topology hint, never the boot.
                let _ = cpuid.push(entry);
            }
        }
    }
}

/// Fill one subleaf of leaf 0xB/0x1F: level 0 is SMT (one thread per core),
/// level 1 is the core level holding all vCPUs, higher levels are invalid.
fn set_topology_level(entry: &mut kvm_cpuid_entry2, apic_id: u32, count: u8) {
    entry.edx = apic_id;
    match entry.index {
        0 => {
            entry.eax = 0;
            entry.ebx = 1;
            entry.ecx = LEVEL_SMT << 8;
        }
        1 => {
            entry.eax = id_bits(count);
            entry.ebx = u32::from(count);
            entry.ecx = (LEVEL_CORE << 8) | 1;
        }
        n => {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = n & 0xff;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn find(cpuid: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    fn sample() -> CpuId {
        let mut leaf0 = entry(0, 0);
        leaf0.eax = 0x1f; // max basic leaf
        let mut leaf1 = entry(1, 0);
        leaf1.ebx = 0xff00_0800; // stale APIC id 0xff, CLFLUSH size 8
        let mut l3 = entry(4, 3);
        l3.eax = 3 << 5; // a level-3 cache
        CpuId::from_entries(&[
            leaf0,
            leaf1,
            entry(4, 0),
            l3,
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(0x8000_0008, 0),
            entry(0x8000_001e, 0),
        ])
        .unwrap()
    }

    #[test]
    fn id_bits_rounds_up_to_power_of_two() {
        assert_eq!(
            [1, 2, 3, 4, 5, 8, 9, 255].map(id_bits),
            [0, 1, 2, 2, 3, 3, 4, 8]
        );
    }

    #[test]
    fn adjust_leaf1_sets_apic_id_count_and_hypervisor_bit() {
        let mut cpuid = sample();
        adjust(&mut cpuid, 3, 4, HostFeatures::default());
        let leaf1 = find(&cpuid, 1, 0);
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!(leaf1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(leaf1.ecx & ECX_HYPERVISOR, 0);
        assert_ne!(leaf1.edx & EDX_HTT, 0);
    }

    #[test]
    fn adjust_tsc_deadline_only_when_host_offers_it() {
        let mut without = sample();
        adjust(&mut without, 0, 1, HostFeatures::default());
        let mut with = sample();
        let host = HostFeatures {
            tsc_deadline_timer: true,
        };
        adjust(&mut with, 0, 1, host);
        assert_eq!(find(&without, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(find(&with, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
    }

    #[test]
    fn adjust_single_vcpu_clears_htt() {
        let mut cpuid = sample();
        adjust(&mut cpuid, 0, 1, HostFeatures::default());
        assert_eq!(find(&cpuid, 1, 0).edx & EDX_HTT, 0);
    }

    #[test]
    fn adjust_topology_leaf_reports_cores_and_x2apic_id() {
        let mut cpuid = sample();
        adjust(&mut cpuid, 2, 3, HostFeatures::default());
        let smt = find(&cpuid, 0xb, 0);
        let core = find(&cpuid, 0xb, 1);
        let invalid = find(&cpuid, 0xb, 2);
        assert_eq!((smt.ebx, smt.ecx >> 8, smt.edx), (1, LEVEL_SMT, 2));
        assert_eq!((core.eax, core.ebx, core.ecx >> 8), (2, 3, LEVEL_CORE));
        assert_eq!((invalid.ebx, invalid.ecx >> 8), (0, 0));
    }

    #[test]
    fn adjust_cache_leaf_shares_only_last_level() {
        let mut cpuid = sample();
        adjust(&mut cpuid, 0, 4, HostFeatures::default());
        assert_eq!(find(&cpuid, 4, 0).eax >> 26, 3);
        assert_eq!((find(&cpuid, 4, 0).eax >> 14) & 0xfff, 0);
        assert_eq!((find(&cpuid, 4, 3).eax >> 14) & 0xfff, 3);
    }

    #[test]
    fn adjust_amd_leaves_report_core_count_and_apic_id() {
        let mut cpuid = sample();
        adjust(&mut cpuid, 5, 8, HostFeatures::default());
        assert_eq!(find(&cpuid, 0x8000_0008, 0).ecx & 0xff, 7);
        assert_eq!(find(&cpuid, 0x8000_001e, 0).eax, 5);
    }

    #[test]
    fn adjust_adds_topology_leaf_when_missing() {
        let mut leaf0 = entry(0, 0);
        leaf0.eax = 0xd;
        let mut cpuid = CpuId::from_entries(&[leaf0, entry(1, 0)]).unwrap();
        adjust(&mut cpuid, 1, 2, HostFeatures::default());
        assert_eq!(find(&cpuid, 0xb, 1).ebx, 2);
        assert_eq!(find(&cpuid, 0xb, 0).edx, 1);
    }
}
