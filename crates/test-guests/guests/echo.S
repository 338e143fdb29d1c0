/*
 * echo: copy COM1 input back to COM1 until a 'q' arrives.
 *
 * Output (COM1):
 *   chitin-test: echo
 *   ready
 *   <every byte read, written back unchanged, except the final 'q'>
 *   <NL>bye<NL>                     on reading 'q' (not echoed)
 * then an i8042 reset. So the input "abq" produces "ab\nbye\n" after "ready\n".
 *
 * Input is polled through LSR bit 0 (data ready): interrupts stay off, and a
 * 16550 has no other way to say a byte arrived.
 */
#include "common.S"

    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    cli
    cld
    lea stack_top(%rip), %rsp

    PUTS64("chitin-test: echo\n")
    PUTS64("ready\n")

1:  call serial_getc
    cmp $ASCII_Q, %eax
    je 2f
    mov %eax, %edi
    call serial_putc
    jmp 1b

2:  PUTS64("\nbye\n")
    jmp reset64

    .bss
    .balign 16
stack_bottom:
    .skip 4096
stack_top:
