//! Register state of the boot vCPU at the kernel entry point.
//!
//! Two entry states are supported:
//! - Linux 64-bit boot protocol (boot.rst, "64-bit Boot Protocol"): long
//!   mode with paging on an identity map, flat segments, `rsi` pointing at
//!   the zero page;
//! - PVH (Xen `arch-x86/hvm/start_info.h`): 32-bit protected mode, paging
//!   off, flat 4 GiB segments, `ebx` pointing at `hvm_start_info`.
//!
//! The functions here only fill plain structs and the boot GDT/IDT/page
//! tables in guest memory; handing them to KVM is the vCPU crate's job.

use chitin_memory::layout::{
    BOOT_GDT_ENTRIES, BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PML4_START,
    PVH_INFO_START, ZERO_PAGE_START,
};
use chitin_memory::GuestMemoryMmap;
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::gdt::{Descriptor, CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use crate::{paging, BootError, BootInfo, BootProtocol};

/// RFLAGS bit 1 is reserved and always reads as one (SDM vol. 1 §3.4.3);
/// every other flag, IF included, starts clear.
const RFLAGS_RESERVED: u64 = 0x2;

/// CR0.PE: protected mode.
const CR0_PE: u64 = 1 << 0;
/// CR0.ET: math coprocessor type, hard-wired to one on modern CPUs.
const CR0_ET: u64 = 1 << 4;
/// CR0.PG: paging.
const CR0_PG: u64 = 1 << 31;
/// CR4.PAE: physical address extension, required for long mode.
const CR4_PAE: u64 = 1 << 5;
/// EFER.LME: long mode enable.
const EFER_LME: u64 = 1 << 8;
/// EFER.LMA: long mode active (KVM wants it set with LME and CR0.PG).
const EFER_LMA: u64 = 1 << 10;

/// x87 control word after FNINIT: all exceptions masked, 64-bit precision,
/// round to nearest (SDM vol. 1 §8.1.5).
const FPU_CONTROL_WORD: u16 = 0x37f;
/// MXCSR at reset: all SIMD exceptions masked (SDM vol. 1 §10.2.3).
const MXCSR_DEFAULT: u32 = 0x1f80;

/// General-purpose registers of the boot vCPU for `info`.
///
/// Linux 64-bit: `rip` = entry, `rsi` = zero page, `rsp` = `rbp` = boot
/// stack. PVH: `rip` = entry, `rbx` = `hvm_start_info`. `rflags` = 0x2.
pub fn setup_regs(info: &BootInfo) -> kvm_regs {
    let mut regs = kvm_regs {
        rip: info.entry.0,
        rflags: RFLAGS_RESERVED,
        ..Default::default()
    };
    match info.protocol {
        BootProtocol::Linux64 => {
            regs.rsi = ZERO_PAGE_START;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
        }
        BootProtocol::Pvh => regs.rbx = PVH_INFO_START,
    }
    regs
}

/// Write the boot GDT, an empty IDT and (Linux 64-bit only) the identity
/// page tables to `mem`, and set the matching segment, descriptor-table,
/// control and EFER registers in `sregs`. Other fields of `sregs` (APIC
/// base, interrupt bitmap, LDT, ...) are left as given.
///
/// # Errors
///
/// [`BootError::GuestMemory`] when the boot structures cannot be written
/// (guest memory does not cover the first 64 KiB).
pub fn setup_sregs(
    mem: &GuestMemoryMmap,
    info: &BootInfo,
    sregs: &mut kvm_sregs,
) -> Result<(), BootError> {
    let code = match info.protocol {
        BootProtocol::Linux64 => Descriptor::CODE64,
        BootProtocol::Pvh => Descriptor::CODE32,
    };
    let gdt = [Descriptor::NULL, code, Descriptor::DATA, Descriptor::TSS];
    write_gdt_and_idt(mem, &gdt)?;

    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (BOOT_GDT_ENTRIES * 8 - 1) as u16;
    // An empty IDT: one zeroed 8-byte slot. The kernel installs its own
    // before enabling interrupts.
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;

    sregs.cs = code.to_kvm_segment(CODE_SELECTOR);
    let data = Descriptor::DATA.to_kvm_segment(DATA_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = Descriptor::TSS.to_kvm_segment(TSS_SELECTOR);

    match info.protocol {
        BootProtocol::Linux64 => {
            paging::write_identity_map(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 = CR4_PAE;
            sregs.efer = EFER_LME | EFER_LMA;
            sregs.cr0 = CR0_PE | CR0_ET | CR0_PG;
        }
        BootProtocol::Pvh => {
            // PVH: paging off, CR4 zero, long mode off.
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
            sregs.cr0 = CR0_PE | CR0_ET;
        }
    }
    Ok(())
}

/// FPU state of a freshly initialised x87/SSE unit.
pub fn setup_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: FPU_CONTROL_WORD,
        mxcsr: MXCSR_DEFAULT,
        ..Default::default()
    }
}

fn write_gdt_and_idt(mem: &GuestMemoryMmap, gdt: &[Descriptor]) -> Result<(), BootError> {
    debug_assert_eq!(gdt.len() as u64, BOOT_GDT_ENTRIES);
    let mut bytes = Vec::with_capacity(gdt.len() * 8 + 8);
    for desc in gdt {
        bytes.extend_from_slice(&desc.to_u64().to_le_bytes());
    }
    // The empty IDT directly follows the GDT.
    bytes.extend_from_slice(&0u64.to_le_bytes());
    debug_assert_eq!(BOOT_GDT_START + gdt.len() as u64 * 8, BOOT_IDT_START);
    mem.write_slice(&bytes, GuestAddress(BOOT_GDT_START))
        .map_err(BootError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use chitin_memory::layout::{PDE_START, PDPTE_START};
    use chitin_memory::{Backing, GuestRam};

    use super::*;
    use crate::KernelFormat;

    const MIB: u64 = 1 << 20;

    fn info(protocol: BootProtocol) -> BootInfo {
        BootInfo {
            format: KernelFormat::Elf,
            protocol,
            // 16 MiB: the usual physical entry of an x86_64 vmlinux.
            entry: GuestAddress(16 * MIB),
            kernel_end: 20 * MIB,
            initrd: None,
            cmdline_len: 0,
        }
    }

    fn ram() -> GuestRam {
        GuestRam::new(64 * MIB, Backing::Anonymous).unwrap()
    }

    #[test]
    fn setup_regs_linux64_points_rsi_at_zero_page() {
        let regs = setup_regs(&info(BootProtocol::Linux64));
        assert_eq!(regs.rip, 16 * MIB);
        assert_eq!(regs.rsi, ZERO_PAGE_START);
        assert_eq!(
            (regs.rsp, regs.rbp),
            (BOOT_STACK_POINTER, BOOT_STACK_POINTER)
        );
        assert_eq!(regs.rflags, 0x2);
        assert_eq!(regs.rbx, 0);
    }

    #[test]
    fn setup_regs_pvh_points_rbx_at_start_info() {
        let regs = setup_regs(&info(BootProtocol::Pvh));
        assert_eq!(regs.rip, 16 * MIB);
        assert_eq!(regs.rbx, PVH_INFO_START);
        assert_eq!(regs.rflags, 0x2);
        assert_eq!(regs.rsi, 0);
    }

    #[test]
    fn setup_fpu_sets_reset_control_words() {
        let fpu = setup_fpu();
        assert_eq!(fpu.fcw, 0x37f);
        assert_eq!(fpu.mxcsr, 0x1f80);
    }

    #[test]
    fn setup_sregs_linux64_enters_long_mode() {
        let ram = ram();
        let mut sregs = kvm_sregs::default();
        setup_sregs(ram.memory(), &info(BootProtocol::Linux64), &mut sregs).unwrap();
        assert_eq!(sregs.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
        assert_eq!(sregs.cr4 & CR4_PAE, CR4_PAE);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr3, PML4_START);
    }

    #[test]
    fn setup_sregs_linux64_segments_are_flat_64bit() {
        let ram = ram();
        let mut sregs = kvm_sregs::default();
        setup_sregs(ram.memory(), &info(BootProtocol::Linux64), &mut sregs).unwrap();
        assert_eq!(sregs.cs.selector, 0x08);
        assert_eq!((sregs.cs.l, sregs.cs.db), (1, 0));
        for seg in [sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss] {
            assert_eq!(seg.selector, 0x10);
            assert_eq!(seg.base, 0);
        }
        assert_eq!(sregs.tr.selector, 0x18);
        assert_eq!(sregs.gdt.base, BOOT_GDT_START);
        assert_eq!(sregs.idt.base, BOOT_IDT_START);
    }

    #[test]
    fn setup_sregs_linux64_writes_gdt_matching_segments() {
        let ram = ram();
        let mem = ram.memory();
        let mut sregs = kvm_sregs::default();
        setup_sregs(mem, &info(BootProtocol::Linux64), &mut sregs).unwrap();
        let code: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(code, Descriptor::CODE64.to_u64());
        let idt: u64 = mem.read_obj(GuestAddress(BOOT_IDT_START)).unwrap();
        assert_eq!(idt, 0);
    }

    #[test]
    fn setup_sregs_linux64_identity_maps_4g_with_2m_pages() {
        let ram = ram();
        let mem = ram.memory();
        let mut sregs = kvm_sregs::default();
        setup_sregs(mem, &info(BootProtocol::Linux64), &mut sregs).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPTE_START);
        // Entry 8 of the first directory maps 16 MiB; 0x83 = P | RW | PS.
        let pde: u64 = mem.read_obj(GuestAddress(PDE_START + 8 * 8)).unwrap();
        assert_eq!(pde, (16 * MIB) | 0x83);
        // Entry 0 of the fourth directory maps 3 GiB (the MMIO gap start).
        let pde: u64 = mem.read_obj(GuestAddress(PDE_START + 3 * 0x1000)).unwrap();
        assert_eq!(pde, 0xc000_0000 | 0x83);
    }

    #[test]
    fn setup_sregs_pvh_is_flat_32bit_without_paging() {
        let ram = ram();
        let mut sregs = kvm_sregs::default();
        setup_sregs(ram.memory(), &info(BootProtocol::Pvh), &mut sregs).unwrap();
        assert_eq!(sregs.cr0 & CR0_PE, CR0_PE);
        assert_eq!(sregs.cr0 & CR0_PG, 0);
        assert_eq!((sregs.cr4, sregs.efer), (0, 0));
        assert_eq!((sregs.cs.l, sregs.cs.db, sregs.cs.g), (0, 1, 1));
        assert_eq!((sregs.cs.base, sregs.cs.limit), (0, 0xffff_ffff));
        assert_eq!((sregs.ds.base, sregs.ds.limit), (0, 0xffff_ffff));
        assert_eq!(sregs.tr.limit, 0x67);
    }

    #[test]
    fn setup_sregs_pvh_writes_32bit_code_descriptor() {
        let ram = ram();
        let mem = ram.memory();
        let mut sregs = kvm_sregs::default();
        setup_sregs(mem, &info(BootProtocol::Pvh), &mut sregs).unwrap();
        let code: u64 = mem.read_obj(GuestAddress(BOOT_GDT_START + 8)).unwrap();
        assert_eq!(code, Descriptor::CODE32.to_u64());
    }

    #[test]
    fn setup_sregs_keeps_unrelated_fields() {
        let ram = ram();
        // 0xfee00900: default LAPIC base with the BSP and enable bits.
        let mut sregs = kvm_sregs {
            apic_base: 0xfee0_0900,
            ..Default::default()
        };
        setup_sregs(ram.memory(), &info(BootProtocol::Linux64), &mut sregs).unwrap();
        assert_eq!(sregs.apic_base, 0xfee0_0900);
    }
}
