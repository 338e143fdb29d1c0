/*
 * spin: print the banner, then spin forever with interrupts off, never
 * exiting to the VMM, so a test can check that the VMM stops a vCPU that
 * will not stop by itself.
 *
 * Output (COM1):
 *   chitin-test: spin
 */
#include "common.S"

    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    cli
    cld
    lea stack_top(%rip), %rsp

    PUTS64("chitin-test: spin\n")

    // No pause, no hlt, no port access: nothing here causes a VM exit.
1:  jmp 1b

    .bss
    .balign 16
stack_bottom:
    .skip 4096
stack_top:
