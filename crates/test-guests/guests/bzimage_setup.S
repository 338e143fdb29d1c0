/*
 * bzimage_setup: the real-mode part of report.bzimage, i.e. its first
 * (1 + SETUP_SECTS) 512-byte sectors, which hold the Linux boot protocol
 * setup header (Documentation/x86/boot.rst, "THE REAL-MODE KERNEL HEADER").
 * build.rs assembles it with
 *   -DSYSSIZE=<protected-mode part size in 16-byte paragraphs>
 *   -DINIT_SIZE=<bytes the kernel needs from its load address>
 * links it at 0 and appends the flat protected-mode image of report (built
 * with -DBZIMAGE) right after it.
 *
 * Every field sits behind an `.org` at the offset boot.rst gives for it, so
 * a field of the wrong size fails the build instead of shifting the rest.
 *
 * A loader using the 16-bit boot protocol would run the code at
 * start_of_setup; it only prints a line naming that protocol and resets.
 */
#include "defs.h"

#ifndef SYSSIZE
#error "build.rs must define SYSSIZE"
#endif
#ifndef INIT_SIZE
#error "build.rs must define INIT_SIZE"
#endif

#define SETUP_SECTS             1       // setup code after the boot sector
#define SECTOR_SIZE             512
#define BOOT_FLAG               0xaa55
#define BOOT_PROTOCOL_VERSION   0x020f  // 2.15
#define LOADED_HIGH             0x01    // loadflags bit 0: loaded at 0x100000
#define XLF_KERNEL_64           0x0001  // xloadflags bit 0: 64-bit entry at +0x200
#define INITRD_ADDR_MAX         0x37ffffff
#define KERNEL_ALIGNMENT        0x200000
#define MIN_ALIGNMENT_LOG2      21      // log2(KERNEL_ALIGNMENT)

    .section .note.GNU-stack, "", @progbits

    .text
    .code16
    .globl bootsect
bootsect:
    // Sector 0, the legacy boot sector: no boot-protocol loader runs it.

    .org 0x1f1
hdr_setup_sects:        .byte SETUP_SECTS
    .org 0x1f2
hdr_root_flags:         .word 0
    .org 0x1f4
hdr_syssize:            .long SYSSIZE
    .org 0x1f8
hdr_ram_size:           .word 0         // obsolete
    .org 0x1fa
hdr_vid_mode:           .word 0xffff    // "normal" video mode
    .org 0x1fc
hdr_root_dev:           .word 0
    .org 0x1fe
hdr_boot_flag:          .word BOOT_FLAG
    .org 0x200
    // Short jump over the rest of the header, as Linux's header.S does.
hdr_jump:               .byte 0xeb, start_of_setup - 1f
1:
    .org 0x202
hdr_header:             .ascii "HdrS"
    .org 0x206
hdr_version:            .word BOOT_PROTOCOL_VERSION
    .org 0x208
hdr_realmode_swtch:     .long 0
    .org 0x20c
hdr_start_sys_seg:      .word 0x1000    // obsolete; Linux's value
    .org 0x20e
hdr_kernel_version:     .word kernel_version_str - 0x200
    .org 0x210
hdr_type_of_loader:     .byte 0
    .org 0x211
hdr_loadflags:          .byte LOADED_HIGH
    .org 0x212
hdr_setup_move_size:    .word 0x8000
    .org 0x214
hdr_code32_start:       .long GUEST_LOAD_ADDR
    .org 0x218
hdr_ramdisk_image:      .long 0
    .org 0x21c
hdr_ramdisk_size:       .long 0
    .org 0x220
hdr_bootsect_kludge:    .long 0
    .org 0x224
hdr_heap_end_ptr:       .word 0
    .org 0x226
hdr_ext_loader_ver:     .byte 0
    .org 0x227
hdr_ext_loader_type:    .byte 0
    .org 0x228
hdr_cmd_line_ptr:       .long 0         // written by the loader
    .org 0x22c
hdr_initrd_addr_max:    .long INITRD_ADDR_MAX
    .org 0x230
hdr_kernel_alignment:   .long KERNEL_ALIGNMENT
    .org 0x234
hdr_relocatable_kernel: .byte 0         // must be loaded at pref_address
    .org 0x235
hdr_min_alignment:      .byte MIN_ALIGNMENT_LOG2
    .org 0x236
hdr_xloadflags:         .word XLF_KERNEL_64
    .org 0x238
hdr_cmdline_size:       .long CMDLINE_SIZE
    .org 0x23c
hdr_hardware_subarch:   .long 0         // default x86 PC
    .org 0x240
hdr_hardware_subarch_data: .quad 0
    .org 0x248
hdr_payload_offset:     .long 0         // not a compressed kernel
    .org 0x24c
hdr_payload_length:     .long 0
    .org 0x250
hdr_setup_data:         .quad 0
    .org 0x258
hdr_pref_address:       .quad GUEST_LOAD_ADDR
    .org 0x260
hdr_init_size:          .long INIT_SIZE
    .org 0x264
hdr_handover_offset:    .long 0         // no EFI handover entry
    .org 0x268
hdr_kernel_info_offset: .long 0
    .org 0x26c                          // end of the 2.15 header

/*
 * 16-bit boot protocol entry: CS = setup segment + 0x20, IP = 0 (so CS
 * addresses offset 0x200 of this file on), DS = ES = SS = setup segment.
 * DS is derived from CS rather than trusted.
 */
start_of_setup:
    cli
    cld
    mov %cs, %ax
    sub $0x20, %ax                  // back to the segment of offset 0
    mov %ax, %ds
    mov $real_mode_msg, %si         // linked at 0: the symbol is the offset
    mov $COM1_THR, %dx
1:  lodsb
    test %al, %al
    jz 2f
    outb %al, %dx
    jmp 1b
2:  mov $I8042_PULSE_RESET, %al
    outb %al, $I8042_COMMAND_PORT
3:  cli
    hlt
    jmp 3b

real_mode_msg:
    .ascii "chitin-test: report\n"
    .asciz "report: entered via 16-bit setup\n"
kernel_version_str:
    .asciz "chitin-test report"

    // Pad the setup part to whole sectors; fails if it ever outgrows them.
    .org (SETUP_SECTS + 1) * SECTOR_SIZE
