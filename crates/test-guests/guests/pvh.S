/*
 * pvh: a kernel with two entry points, so a test sees which boot protocol
 * the VMM chose.
 *
 * PVH entry (the 32-bit physical address in the Xen ELF note below).
 * Output (COM1):
 *   chitin-test: pvh
 *   pvh: magic ok                   ("pvh: bad magic" and a reset otherwise)
 *   cmdline: <start_info.cmdline_paddr string, empty if 0 or above 4 GiB>
 *   memmap: <start_info.memmap_entries, decimal>
 *   done
 * then an i8042 reset.
 *
 * ELF e_entry (Linux 64-bit boot protocol). Output (COM1):
 *   chitin-test: pvh
 *   pvh: entered via 64-bit entry
 * then an i8042 reset.
 *
 * PVH entry state (Xen docs/misc/pvh.pandoc): 32-bit flat protected mode,
 * paging off, CS/DS/ES/SS flat 4 GiB segments, interrupts off, EBX = physical
 * address of struct hvm_start_info; the stack pointer and the GDTR are
 * undefined, so this code sets its own stack and never reloads a segment.
 */
#include "common.S"

/*
 * The note linux-loader looks for (src/loader/elf/mod.rs, parse_elf_note):
 * an ELF note with name "Xen\0" (namesz 4) and type XEN_ELFNOTE_PHYS32_ENTRY
 * whose descriptor starts with the u32 entry address. Name and descriptor are
 * each padded to 4 bytes, the ELF64 note layout that loader and Linux
 * (include/linux/elfnote.h) both use.
 */
    .section .note.pvh, "a", @note
    .balign 4
    .long 2f - 1f                   // n_namesz, including the NUL
    .long 4f - 3f                   // n_descsz
    .long XEN_ELFNOTE_PHYS32_ENTRY  // n_type
1:  .asciz "Xen"
2:  .balign 4
3:  .long pvh_start32               // physical == virtual in this image
4:  .balign 4

    .section .text.entry, "ax"

/* Linux 64-bit boot protocol entry: the wrong protocol for this kernel. */
    .code64
    .globl _start
_start:
    cli
    cld
    lea stack_top(%rip), %rsp
    PUTS64("chitin-test: pvh\n")
    PUTS64("pvh: entered via 64-bit entry\n")
    jmp reset64

/* PVH entry. */
    .code32
pvh_start32:
    cli
    cld
    mov $stack_top, %esp
    // EBX = &hvm_start_info, kept across calls (they preserve EBX).

    PUTS32("chitin-test: pvh\n")

    cmpl $XEN_HVM_START_MAGIC, HVM_START_MAGIC(%ebx)
    je 1f
    // Nothing else in the structure can be trusted.
    PUTS32("pvh: bad magic\n")
    jmp reset32
1:  PUTS32("pvh: magic ok\n")

    // cmdline_paddr is a u64; with paging off only the low 4 GiB is
    // addressable, so a pointer above that prints as an empty line.
    PUTS32("cmdline: ")
    cmpl $0, HVM_START_CMDLINE_PADDR + 4(%ebx)
    jne 2f
    mov HVM_START_CMDLINE_PADDR(%ebx), %edi
    test %edi, %edi
    jz 2f
    mov $CMDLINE_MAX, %esi
    call serial_putsn32
2:  PUTC32(ASCII_NL)

    PUTS32("memmap: ")
    mov HVM_START_MEMMAP_ENTRIES(%ebx), %edi
    call serial_putdec32
    PUTC32(ASCII_NL)

    PUTS32("done\n")
    jmp reset32

    .bss
    .balign 16
stack_bottom:
    .skip 4096
stack_top:
