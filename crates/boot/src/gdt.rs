//! The boot GDT: segment descriptors and their KVM register form.
//!
//! The GDT written to guest memory and the hidden segment state handed to
//! KVM come from the same [`Descriptor`] values, so they cannot disagree.
//! Encoding per Intel SDM vol. 3 §3.4.5 (segment descriptors) and §7.2.2
//! (TSS descriptor). This module never decides which descriptors a boot
//! protocol needs; `regs` does.

use kvm_bindings::kvm_segment;

/// Access byte of a present, ring-0, execute/read, accessed code segment
/// (P=1, DPL=0, S=1, type 0xb).
const ACCESS_CODE: u8 = 0x9b;
/// Access byte of a present, ring-0, read/write, accessed data segment
/// (P=1, DPL=0, S=1, type 0x3).
const ACCESS_DATA: u8 = 0x93;
/// Access byte of a present busy 32/64-bit TSS (P=1, S=0, type 0xb). VM
/// entry requires TR to hold a busy TSS (SDM vol. 3 §26.3.1.2).
const ACCESS_TSS_BUSY: u8 = 0x8b;

/// Flags nibble: 4 KiB granularity (G, bit 3).
const FLAG_G: u8 = 0b1000;
/// Flags nibble: 32-bit default operand size (D/B, bit 2).
const FLAG_DB: u8 = 0b0100;
/// Flags nibble: 64-bit code segment (L, bit 1).
const FLAG_L: u8 = 0b0010;

/// Largest 20-bit segment limit; with G=1 it spans 4 GiB.
const LIMIT_4G_PAGES: u32 = 0xf_ffff;
/// Limit of a minimal 104-byte TSS (SDM vol. 3 §7.2.1), minus one.
const TSS_LIMIT: u32 = 0x67;

/// Selector of the code segment (GDT index 1).
pub(crate) const CODE_SELECTOR: u16 = 0x08;
/// Selector of the data segment (GDT index 2).
pub(crate) const DATA_SELECTOR: u16 = 0x10;
/// Selector of the TSS (GDT index 3).
pub(crate) const TSS_SELECTOR: u16 = 0x18;

/// One 8-byte segment descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Descriptor {
    base: u32,
    /// 20-bit limit, in bytes or in 4 KiB pages when G is set.
    limit: u32,
    access: u8,
    /// High nibble of byte 6: G, D/B, L, AVL.
    flags: u8,
}

impl Descriptor {
    /// The null descriptor (GDT index 0).
    pub(crate) const NULL: Self = Self {
        base: 0,
        limit: 0,
        access: 0,
        flags: 0,
    };
    /// Flat 64-bit code segment (L=1, D=0 as long mode requires).
    pub(crate) const CODE64: Self = Self {
        base: 0,
        limit: LIMIT_4G_PAGES,
        access: ACCESS_CODE,
        flags: FLAG_G | FLAG_L,
    };
    /// Flat 4 GiB 32-bit code segment (PVH entry).
    pub(crate) const CODE32: Self = Self {
        base: 0,
        limit: LIMIT_4G_PAGES,
        access: ACCESS_CODE,
        flags: FLAG_G | FLAG_DB,
    };
    /// Flat 4 GiB 32-bit read/write data segment.
    pub(crate) const DATA: Self = Self {
        base: 0,
        limit: LIMIT_4G_PAGES,
        access: ACCESS_DATA,
        flags: FLAG_G | FLAG_DB,
    };
    /// Busy TSS at address 0 with the minimal limit. Nobody loads it from
    /// the GDT during boot (the kernel installs its own); KVM needs valid
    /// TR state. In long mode the descriptor is 16 bytes: its upper half is
    /// the zeroed IDT that follows the GDT.
    pub(crate) const TSS: Self = Self {
        base: 0,
        limit: TSS_LIMIT,
        access: ACCESS_TSS_BUSY,
        flags: 0,
    };

    /// The descriptor as stored in the GDT.
    pub(crate) fn to_u64(self) -> u64 {
        let base = u64::from(self.base);
        let limit = u64::from(self.limit);
        (limit & 0xffff)
            | ((base & 0x00ff_ffff) << 16)
            | (u64::from(self.access) << 40)
            | (((limit >> 16) & 0xf) << 48)
            | (u64::from(self.flags & 0xf) << 52)
            | (((base >> 24) & 0xff) << 56)
    }

    /// The hidden segment state KVM loads for `selector`, as the CPU would
    /// after loading this descriptor.
    pub(crate) fn to_kvm_segment(self, selector: u16) -> kvm_segment {
        let granular = self.flags & FLAG_G != 0;
        let present = self.access >> 7;
        kvm_segment {
            base: u64::from(self.base),
            // KVM takes the limit in bytes: scale page-granular limits.
            limit: if granular {
                (self.limit << 12) | 0xfff
            } else {
                self.limit
            },
            selector,
            type_: self.access & 0xf,
            present,
            dpl: (self.access >> 5) & 0x3,
            db: (self.flags >> 2) & 1,
            s: (self.access >> 4) & 1,
            l: (self.flags >> 1) & 1,
            g: u8::from(granular),
            avl: self.flags & 1,
            unusable: u8::from(present == 0),
            padding: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_code64_encodes_like_linux_boot_gdt() {
        // 0x00af9b000000ffff: the __KERNEL_CS entry of Linux's boot GDT.
        assert_eq!(Descriptor::CODE64.to_u64(), 0x00af_9b00_0000_ffff);
    }

    #[test]
    fn descriptor_code32_and_data_encode_flat_4g() {
        // 0x00cf9b000000ffff / 0x00cf93000000ffff: flat 32-bit code / data.
        assert_eq!(Descriptor::CODE32.to_u64(), 0x00cf_9b00_0000_ffff);
        assert_eq!(Descriptor::DATA.to_u64(), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn descriptor_tss_encodes_busy_minimal_tss() {
        assert_eq!(Descriptor::TSS.to_u64(), 0x0000_8b00_0000_0067);
    }

    #[test]
    fn descriptor_null_is_zero_and_unusable() {
        assert_eq!(Descriptor::NULL.to_u64(), 0);
        assert_eq!(Descriptor::NULL.to_kvm_segment(0).unusable, 1);
    }

    #[test]
    fn to_kvm_segment_page_granular_limit_scales_to_4g() {
        let seg = Descriptor::DATA.to_kvm_segment(DATA_SELECTOR);
        assert_eq!(seg.limit, 0xffff_ffff);
        assert_eq!((seg.g, seg.db, seg.s, seg.present), (1, 1, 1, 1));
        assert_eq!(seg.type_, 0x3);
    }

    #[test]
    fn to_kvm_segment_byte_granular_limit_is_kept() {
        let seg = Descriptor::TSS.to_kvm_segment(TSS_SELECTOR);
        assert_eq!(seg.limit, TSS_LIMIT);
        assert_eq!((seg.type_, seg.s, seg.g), (0xb, 0, 0));
    }
}
