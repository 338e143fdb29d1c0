/*
 * Constants shared by every chitin test guest: the guest sources (*.S), the
 * bzImage setup sectors and the linker script all include this file through
 * the C preprocessor, so it holds nothing but #defines and comments.
 *
 * Each value names the document it comes from; the VMM side of the same
 * contract is described in the crate documentation (src/lib.rs).
 */
#ifndef CHITIN_TEST_GUESTS_DEFS_H
#define CHITIN_TEST_GUESTS_DEFS_H

/*
 * Load address of every image: the Linux boot protocol loads the
 * protected-mode kernel at 1 MiB (Documentation/x86/boot.rst, "LOADING THE
 * REST OF THE KERNEL"), and linux-loader's ELF loader places each PT_LOAD at
 * its p_paddr, which must lie at or above that "high memory" start.
 */
#define GUEST_LOAD_ADDR         0x100000

/* 16550 UART at the legacy COM1 base (PC/AT I/O map; 16550 register layout). */
#define COM1_BASE               0x3f8
#define COM1_THR                (COM1_BASE + 0)   // transmit holding register (write)
#define COM1_RBR                (COM1_BASE + 0)   // receive buffer register (read)
#define COM1_LSR                (COM1_BASE + 5)   // line status register
#define LSR_DATA_READY          0x01              // LSR bit 0: a byte waits in RBR

/*
 * i8042 keyboard controller command port. Command 0xFE pulses output port
 * bit 0, the CPU reset line; the VMM turns it into a Reset stop reason.
 */
#define I8042_COMMAND_PORT      0x64
#define I8042_PULSE_RESET       0xfe

/* ASCII bytes, spelled as numbers so no quoting rules of cpp or gas apply. */
#define ASCII_NL                0x0a
#define ASCII_SPACE             0x20
#define ASCII_ZERO              0x30
#define ASCII_Q                 0x71

/*
 * struct boot_params ("zero page") offsets, Documentation/x86/zero-page.rst,
 * and the setup header inside it at 0x1f1, Documentation/x86/boot.rst.
 */
#define BP_E820_ENTRIES         0x1e8   // u8  number of entries in e820_table
#define BP_CMD_LINE_PTR         0x228   // u32 hdr.cmd_line_ptr
#define BP_E820_TABLE           0x2d0   // struct boot_e820_entry[128]
#define E820_ENTRY_SIZE         20      // packed { u64 addr; u64 size; u32 type; }
#define E820_ENTRY_ADDR         0
#define E820_ENTRY_SIZE_FIELD   8
#define E820_ENTRY_TYPE         16
#define E820_MAX_ENTRIES_ZEROPAGE 128   // arch/x86/include/uapi/asm/setup_data.h

/*
 * Longest command line a guest prints: the bzImage header advertises
 * cmdline_size = 2047 (boot.rst: "maximum size of the command line without
 * the terminating zero"), so 2048 bytes always covers a well-formed one and
 * bounds the read if the terminator is missing.
 */
#define CMDLINE_SIZE            2047
#define CMDLINE_MAX             (CMDLINE_SIZE + 1)

/*
 * Intel MultiProcessor Specification 1.4.
 * §4.1 MP Floating Pointer Structure: 16 bytes, signature "_MP_", the
 * physical address of the configuration table at offset 4, a checksum over
 * all its bytes. §4.2 MP Configuration Table Header: 44 bytes, signature
 * "PCMP", base table length u16 at 4, checksum u8 at 7 over the base table,
 * entry count u16 at 34. §4.3 base table entries: processor (type 0) is 20
 * bytes with CPU flags at offset 3, bit 0 = EN (enabled); bus (1), I/O APIC
 * (2), I/O interrupt (3) and local interrupt (4) assignments are 8 bytes.
 */
#define MP_SEARCH_BASE          0x9fc00 // where the VMM writes the table
#define MP_SEARCH_LEN           0x400   // "the first kilobyte", §4 of the spec
#define MP_SEARCH_STEP          16      // the structure is paragraph aligned
#define MPF_SIGNATURE           0x5f504d5f  // "_MP_" read as a little-endian u32
#define MPF_PHYSPTR             4
#define MPF_SIZE                16
#define MPC_SIGNATURE           0x504d4350  // "PCMP" read as a little-endian u32
#define MPC_BASE_LENGTH         4
#define MPC_ENTRY_COUNT         34
#define MPC_HEADER_SIZE         44
#define MP_ENTRY_PROCESSOR      0
#define MP_ENTRY_PROCESSOR_SIZE 20
#define MP_PROCESSOR_CPU_FLAGS  3
#define MP_CPU_FLAG_ENABLED     0x01
#define MP_ENTRY_LAST_TYPE      4       // local interrupt assignment
#define MP_ENTRY_OTHER_SIZE     8
/*
 * The configuration table must end below 16 MiB, the smallest guest memory the
 * tests use: a bogus physptr then reads as "no MP table" instead of touching
 * unbacked guest-physical space.
 */
#define MP_TABLE_LIMIT          0x1000000

/*
 * Local APIC registers (Intel SDM Vol. 3A, "Advanced Programmable Interrupt
 * Controller (APIC)", table "Local APIC Register Address Map").
 */
#define LAPIC_BASE              0xfee00000
#define LAPIC_ID                0x020   // APIC ID in bits 31:24
#define LAPIC_ID_SHIFT          24
#define LAPIC_SVR               0x0f0   // spurious-interrupt vector register
#define LAPIC_ICR_LOW           0x300   // writing this dword sends the IPI
#define LAPIC_ICR_HIGH          0x310   // destination field, bits 63:56
/*
 * SVR value: bit 8 = APIC software enable, vector 0xff for spurious
 * interrupts (its low four bits must be ones on older processors).
 */
#define LAPIC_SVR_ENABLE        0x1ff
/*
 * ICR low dword (SDM figure "Interrupt Command Register"): bits 7:0 vector,
 * 10:8 delivery mode (101b INIT, 110b Start-Up), bit 12 delivery status
 * (1 = send pending), bit 14 level (1 = assert), bits 19:18 destination
 * shorthand (11b = all excluding self).
 */
#define ICR_DELIVERY_STATUS     0x00001000
#define ICR_INIT_ALL_BUT_SELF   0x000c4500
#define ICR_SIPI_ALL_BUT_SELF   0x000c4600

/*
 * AP trampoline. A Start-Up IPI with vector VV starts the AP in real mode at
 * CS = VV00h, IP = 0, i.e. physical 000VV000h (SDM Vol. 3A, "MP
 * Initialization Protocol Algorithm"; MP spec 1.4 §B.4.2). 0x10000..0x1ffff is
 * reserved for it by the VMM.
 */
#define TRAMP_BASE              0x10000
#define SIPI_VECTOR             (TRAMP_BASE >> 12)

/* Flat GDT selectors of the trampoline GDT (entry index * 8). */
#define TRAMP_CODE32_SEL        0x08
#define TRAMP_DATA32_SEL        0x10

/* Control register bits, SDM Vol. 3A "Control Registers". */
#define CR0_PE                  0x00000001

/*
 * PVH boot ABI (Xen docs/misc/pvh.pandoc, xen/include/public/arch-x86/
 * hvm/start_info.h): the 32-bit entry gets EBX = &struct hvm_start_info.
 */
#define XEN_HVM_START_MAGIC     0x336ec578
#define HVM_START_MAGIC         0       // u32
#define HVM_START_CMDLINE_PADDR 24      // u64
#define HVM_START_MEMMAP_ENTRIES 48     // u32, valid from version 1 on
#define XEN_ELFNOTE_PHYS32_ENTRY 18     // xen/include/public/elfnote.h

#endif /* CHITIN_TEST_GUESTS_DEFS_H */
