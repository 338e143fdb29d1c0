/*
 * Linker script for every chitin test guest, run through the C preprocessor
 * by build.rs (with -DPVH_NOTE for the pvh guest).
 *
 * The result is a static ELF64 executable, physical == virtual, whose program
 * headers are exactly what linux-loader's ELF loader reads
 * (linux-loader 0.13 src/loader/elf/mod.rs):
 *   - PT_LOAD segments, copied to guest memory at p_paddr; p_paddr must be at
 *     or above 1 MiB, the start of "high memory" for the Linux boot protocol.
 *   - for the pvh guest only, one PT_NOTE segment holding the Xen
 *     XEN_ELFNOTE_PHYS32_ENTRY note. The loader keeps the result of the last
 *     PT_NOTE it parses, so no other note segment may follow it; the PHDRS
 *     command below makes ld emit no program header we did not ask for
 *     (no PT_GNU_STACK, no build-id note).
 *
 * Zero-initialised data (.bss) is placed inside .data, so it is stored in
 * the file: the loader copies p_filesz bytes only, and `objcopy -O binary`
 * (used for the bzImage) drops trailing NOBITS sections. Storing the zeros
 * makes every image self-contained whatever the guest memory held before.
 */
#include "defs.h"

OUTPUT_FORMAT("elf64-x86-64")
OUTPUT_ARCH(i386:x86-64)
ENTRY(_start)

PHDRS
{
    text PT_LOAD FLAGS(5);      /* R + X */
    data PT_LOAD FLAGS(6);      /* R + W */
#ifdef PVH_NOTE
    note PT_NOTE FLAGS(4);      /* R */
#endif
}

SECTIONS
{
    . = GUEST_LOAD_ADDR;

    /* .text.entry first: the 64-bit entry of the bzImage flavour must sit at
     * a fixed offset (0x200) from the start of the image. */
    .text : {
        KEEP(*(.text.entry))
        *(.text .text.*)
    } :text

    .rodata : {
        *(.rodata .rodata.*)
    } :text

#ifdef PVH_NOTE
    /* Loaded with the text (as in a Linux vmlinux) and described once more
     * by the PT_NOTE header that the loader scans. */
    .note.pvh : {
        KEEP(*(.note.pvh))
    } :text :note
#endif

    . = ALIGN(16);
    .data : {
        *(.data .data.*)
        *(.bss .bss.*)
        *(COMMON)
        . = ALIGN(16);
    } :data

    /DISCARD/ : {
        *(.note.GNU-stack)
        *(.note.gnu.*)
        *(.comment)
        *(.eh_frame)
    }
}
