/*
 * flood: write 256 KiB to COM1 as fast as a guest can, with `rep outsb`
 * (4 KiB per string instruction), then report and reset.
 *
 * Output (COM1):
 *   chitin-test: flood
 *   <64 times a 4 KiB block: 63 bytes of 'x' and a newline, 64 times>
 *   flood: done
 * then an i8042 reset.
 */
#include "common.S"

#define FLOOD_BLOCK     4096
#define FLOOD_BLOCKS    64               // 64 * 4 KiB = 256 KiB

    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    cli
    cld
    lea stack_top(%rip), %rsp

    PUTS64("chitin-test: flood\n")

    // The block: lines of 63 'x' and a newline.
    lea block(%rip), %rdi
    xor %ecx, %ecx
1:  mov $'x', %al
    mov %ecx, %edx
    and $63, %edx
    cmp $63, %edx
    jne 2f
    mov $'\n', %al
2:  mov %al, (%rdi,%rcx)
    inc %ecx
    cmp $FLOOD_BLOCK, %ecx
    jb 1b

    mov $FLOOD_BLOCKS, %r8d
3:  lea block(%rip), %rsi
    mov $FLOOD_BLOCK, %ecx
    mov $COM1_THR, %dx
    rep outsb
    dec %r8d
    jnz 3b

    PUTS64("flood: done\n")
    jmp reset64

    .bss
    .balign 16
block:
    .skip FLOOD_BLOCK
stack_bottom:
    .skip 4096
stack_top:
