/*
 * triple_fault: print the banner, then fault with no usable IDT.
 *
 * Output (COM1):
 *   chitin-test: triple_fault
 * then the vCPU shuts down (KVM_EXIT_SHUTDOWN).
 *
 * With an IDT limit of 0 every vector lies outside the IDT. UD2 raises #UD;
 * delivering it needs IDT entry 6, beyond the limit, which raises #GP;
 * delivering that fails the same way, which is a double fault; and an
 * exception while delivering #DF puts the processor in shutdown (Intel SDM
 * Vol. 3A, "Interrupt 8—Double Fault Exception (#DF)", and "Interrupt
 * Descriptor Table (IDT)" on vectors beyond the limit).
 */
#include "common.S"

    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    cli
    cld
    lea stack_top(%rip), %rsp

    PUTS64("chitin-test: triple_fault\n")

    lidt empty_idtr(%rip)
    ud2
    // Not reached; should UD2 somehow return, park rather than run on.
1:  cli
    hlt
    jmp 1b

    .section .rodata
    .balign 16
/* Pseudo-descriptor for LIDT in 64-bit mode: u16 limit, u64 base. */
empty_idtr:
    .word 0                         // limit 0: no vector is inside the IDT
    .quad 0                         // base (irrelevant with limit 0)

    .bss
    .balign 16
stack_bottom:
    .skip 4096
stack_top:
