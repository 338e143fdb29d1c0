//! Local APIC LINT0/LINT1 wiring.
//!
//! As on a PC, LINT0 takes the legacy PIC's interrupt (ExtINT) and LINT1 the
//! NMI line (Intel SDM vol. 3A §10.5.1, MP spec 1.4 §5.1 virtual wire mode).
//! Linux relies on this when it boots without ACPI.

use kvm_bindings::kvm_lapic_state;

/// Offset of the LVT LINT0 register in the APIC page.
const APIC_LVT_LINT0: usize = 0x350;
/// Offset of the LVT LINT1 register in the APIC page.
const APIC_LVT_LINT1: usize = 0x360;
/// Delivery mode field, bits 10:8 of an LVT entry.
const DELIVERY_MODE_MASK: u32 = 0x700;
const DELIVERY_MODE_NMI: u32 = 0x4 << 8;
const DELIVERY_MODE_EXTINT: u32 = 0x7 << 8;

fn read_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| state.regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn write_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, b) in value.to_le_bytes().into_iter().enumerate() {
        state.regs[offset + i] = b as _;
    }
}

/// Route LINT0 as ExtINT and LINT1 as NMI in a LAPIC state read from KVM.
pub fn set_lint(state: &mut kvm_lapic_state) {
    let lint0 = read_reg(state, APIC_LVT_LINT0);
    write_reg(
        state,
        APIC_LVT_LINT0,
        (lint0 & !DELIVERY_MODE_MASK) | DELIVERY_MODE_EXTINT,
    );
    let lint1 = read_reg(state, APIC_LVT_LINT1);
    write_reg(
        state,
        APIC_LVT_LINT1,
        (lint1 & !DELIVERY_MODE_MASK) | DELIVERY_MODE_NMI,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_lint_sets_delivery_modes_and_keeps_other_bits() {
        let mut state = kvm_lapic_state::default();
        // Masked (bit 16) with a stale fixed vector 0x30.
        write_reg(&mut state, APIC_LVT_LINT0, 0x1_0030);
        set_lint(&mut state);
        assert_eq!(read_reg(&state, APIC_LVT_LINT0), 0x1_0730);
        assert_eq!(read_reg(&state, APIC_LVT_LINT1), 0x400);
    }
}
