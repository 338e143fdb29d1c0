/*
 * counter: print the banner, then count forever, one line per number,
 * with a busy wait between lines. The count lives in guest memory and,
 * while a line is printed, in a callee-saved register, so a VM that is
 * paused, or snapshotted and restored, continues from exactly where it
 * stopped only if both its registers and its memory came back.
 *
 * Output (COM1):
 *   chitin-test: counter
 *   n 0
 *   n 1
 *   ...
 */
#include "common.S"

/*
 * Iterations of the busy loop between two lines: a microsecond natively,
 * a millisecond or two on a software hypervisor (this host's PVM takes
 * about 1.5 µs per iteration). No PAUSE in it, which hypervisors may
 * trap.
 */
#define DELAY_SPINS         1000

    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    cli
    cld
    lea stack_top(%rip), %rsp

    PUTS64("chitin-test: counter\n")

next:
    mov count(%rip), %rbx
    PUTS64("n ")
    mov %rbx, %rdi
    call serial_putdec64
    PUTC64(ASCII_NL)
    inc %rbx
    mov %rbx, count(%rip)
    mov $DELAY_SPINS, %ecx
1:  dec %ecx
    jnz 1b
    jmp next

    .bss
    .balign 16
count:
    .skip 8
stack_bottom:
    .skip 4096
stack_top:
