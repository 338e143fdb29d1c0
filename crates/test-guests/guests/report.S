/*
 * report: print what the VMM told the guest through the Linux 64-bit boot
 * protocol (Documentation/x86/boot.rst, "64-bit BOOT PROTOCOL") and the MP
 * table, then reset.
 *
 * Output (COM1), one line each:
 *   chitin-test: report
 *   cmdline: <hdr.cmd_line_ptr string, empty if the pointer is 0>
 *   e820: <boot_params.e820_entries, decimal>
 *   e820 <addr, 16 hex digits> <size, 16 hex digits> <type, decimal>   (per entry)
 *   cpus: <enabled processor entries in the MP table, or "none">
 *   done
 * then an i8042 reset.
 *
 * Built twice: as report.elf, entered at its first byte (0x100000), and with
 * -DBZIMAGE as the protected-mode part of report.bzimage. A bzImage's 64-bit
 * entry is "at the 32-bit entry + 0x200" (boot.rst, 64-bit boot protocol),
 * so that flavour puts a 32-bit entry stub at offset 0 (code32_start) and the
 * 64-bit entry at offset 0x200.
 *
 * Entry state (64-bit boot protocol): long mode, identity paging, interrupts
 * off, RSI = &struct boot_params (the zero page).
 */
#include "common.S"

    .section .text.entry, "ax"

#ifdef BZIMAGE
/*
 * 32-bit boot protocol entry (code32_start): flat protected mode, paging off,
 * ESI = &boot_params. The chitin VMM always uses the 64-bit entry below; a
 * loader that picks this one gets a line saying so, not a silent hang.
 */
    .code32
report_start32:
    cli
    cld
    mov $stack_top, %esp
    PUTS32("chitin-test: report\n")
    PUTS32("report: entered via 32-bit entry\n")
    jmp reset32

    // boot.rst: the 64-bit entry is 0x200 bytes after the 32-bit one.
    // Padding is int3 (0xcc); `.org` also fails the build if the stub
    // above ever outgrows it.
    .org 0x200, 0xcc
#endif

    .code64
    .globl _start
_start:
    cli
    cld
    lea stack_top(%rip), %rsp       // our own stack, not the VMM's
    mov %rsi, %rbx                  // RBX = zero page, kept across calls

    PUTS64("chitin-test: report\n")

    // cmdline: hdr.cmd_line_ptr (u32, zero-page 0x228), a NUL-terminated
    // string; 0 means "no command line".
    PUTS64("cmdline: ")
    mov BP_CMD_LINE_PTR(%rbx), %edi
    test %edi, %edi
    jz 1f
    mov $CMDLINE_MAX, %esi
    call serial_putsn
1:  PUTC64(ASCII_NL)

    // e820: the count as the VMM wrote it ...
    PUTS64("e820: ")
    movzbl BP_E820_ENTRIES(%rbx), %edi
    call serial_putdec64
    PUTC64(ASCII_NL)

    // ... then each entry, never more than the table has room for.
    movzbl BP_E820_ENTRIES(%rbx), %r12d
    cmp $E820_MAX_ENTRIES_ZEROPAGE, %r12d
    jbe 2f
    mov $E820_MAX_ENTRIES_ZEROPAGE, %r12d
2:  lea BP_E820_TABLE(%rbx), %r13
.Le820_loop:
    test %r12d, %r12d
    jz .Le820_done
    PUTS64("e820 ")
    mov E820_ENTRY_ADDR(%r13), %rdi
    call serial_puthex64
    PUTC64(ASCII_SPACE)
    mov E820_ENTRY_SIZE_FIELD(%r13), %rdi
    call serial_puthex64
    PUTC64(ASCII_SPACE)
    mov E820_ENTRY_TYPE(%r13), %edi
    call serial_putdec64
    PUTC64(ASCII_NL)
    add $E820_ENTRY_SIZE, %r13
    dec %r12d
    jmp .Le820_loop
.Le820_done:

    PUTS64("cpus: ")
    call mp_count_cpus
    cmp $-1, %rax
    je 3f
    mov %rax, %rdi
    call serial_putdec64
    PUTC64(ASCII_NL)
    jmp 4f
3:  PUTS64("none\n")
4:
    PUTS64("done\n")
    jmp reset64

    .bss
    .balign 16
stack_bottom:
    .skip 4096
stack_top:
