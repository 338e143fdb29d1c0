/*
 * idle: print the banner, then halt forever with interrupts off. The vCPU
 * sleeps in the kernel (HLT with the in-kernel irqchip never exits to the
 * VMM) until the VMM stops it: the cheapest sandbox that stays alive, for
 * density figures, and a check that a halted vCPU can be stopped.
 *
 * Output (COM1):
 *   chitin-test: idle
 */
#include "common.S"

    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    cli
    cld
    lea stack_top(%rip), %rsp

    PUTS64("chitin-test: idle\n")

    // With interrupts off nothing wakes the vCPU; loop in case something
    // (an NMI) does.
1:  hlt
    jmp 1b

    .bss
    .balign 16
stack_bottom:
    .skip 4096
stack_top:
