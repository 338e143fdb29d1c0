/*
 * common.S: serial output/input, reset and MP-table routines shared by the
 * chitin test guests. Every guest includes this file first (through the C
 * preprocessor), so each image carries its own copy; nothing here runs on its
 * own.
 *
 * Calling convention (both widths): the argument is in EDI/RDI (and ESI/RSI
 * for a second one), the result in EAX/RAX. The 64-bit routines may clobber
 * the System V caller-saved registers RAX, RCX, RDX, RSI, RDI, R8-R11; the
 * 32-bit ones EAX, ECX, EDX, ESI, EDI. Every other register survives, so
 * callers keep their state in RBX/EBX, RBP/EBP and R12-R15. No routine uses
 * SSE, so none depends on stack alignment; callers still keep RSP 16-byte
 * aligned at each call, as the System V ABI asks.
 *
 * Port I/O is one byte per OUT: every port access is a VM exit, and a string
 * OUTS would reach the VMM as one multi-byte access to the one-byte THR.
 */

#include "defs.h"

/*
 * PUTS64("text"): print a literal string from 64-bit code. The string goes
 * to .rodata under a numeric local label; "7777b" is the definition just
 * made, so the macro can be used any number of times.
 */
#define PUTS64(s) \
    .pushsection .rodata.str, "a"; 7777: .asciz s; .popsection; \
    lea 7777b(%rip), %rdi; call serial_puts

/* PUTC64(byte): print one byte (an immediate) from 64-bit code. */
#define PUTC64(c) mov $(c), %edi; call serial_putc

/* PUTS32 / PUTC32: the same for 32-bit protected-mode code (paging off). */
#define PUTS32(s) \
    .pushsection .rodata.str, "a"; 7777: .asciz s; .popsection; \
    mov $7777b, %edi; call serial_puts32
#define PUTC32(c) mov $(c), %edi; call serial_putc32

/*
 * The images never ask for an executable stack; saying so explicitly keeps
 * ld from assuming one (and warning about it).
 */
    .section .note.GNU-stack, "", @progbits

    .section .rodata
hex_digits:
    .ascii "0123456789abcdef"

    .text

/* ---------------------------------------------------------------------- */
/* 64-bit routines (long mode, identity-mapped low 4 GiB).                 */
/* ---------------------------------------------------------------------- */
    .code64

/* serial_putc: write the byte in DIL to COM1. */
serial_putc:
    mov %edi, %eax
    mov $COM1_THR, %dx
    outb %al, %dx
    ret

/* serial_puts: write the NUL-terminated string at RDI to COM1. */
serial_puts:
    mov $-1, %rsi                   // no length bound for the guest's own strings
    // fall through
/*
 * serial_putsn: write the string at RDI, stopping at its NUL or after RSI
 * bytes, whichever comes first. The bound is for strings the VMM supplies
 * (command lines), which a broken VMM might leave unterminated.
 */
serial_putsn:
    mov $COM1_THR, %dx
1:  test %rsi, %rsi
    jz 2f
    movzbl (%rdi), %eax
    test %al, %al
    jz 2f
    outb %al, %dx
    inc %rdi
    dec %rsi
    jmp 1b
2:  ret

/* serial_puthex64: write RDI as exactly 16 lower-case hex digits. */
serial_puthex64:
    mov $COM1_THR, %dx
    lea hex_digits(%rip), %rsi
    mov $16, %ecx
1:  rol $4, %rdi                    // bring the next nibble, most significant first, to bits 3:0
    mov %edi, %eax
    and $0xf, %eax
    movzbl (%rsi,%rax), %eax
    outb %al, %dx
    dec %ecx
    jnz 1b
    ret

/* serial_putdec64: write RDI as an unsigned decimal number, no padding. */
serial_putdec64:
    // 24 bytes of buffer hold the 20 digits of 2^64-1 and turn the
    // entry alignment (RSP = 8 mod 16) back into 0 mod 16.
    sub $24, %rsp
    lea 24(%rsp), %r8               // one past the buffer end
    mov %r8, %rsi                   // digits are stored backwards from here
    mov %rdi, %rax
    mov $10, %ecx
1:  xor %edx, %edx
    div %rcx                        // RDX:RAX / 10 -> RAX quotient, RDX digit
    add $ASCII_ZERO, %dl
    dec %rsi
    mov %dl, (%rsi)
    test %rax, %rax
    jnz 1b
    mov $COM1_THR, %dx
2:  movzbl (%rsi), %eax
    outb %al, %dx
    inc %rsi
    cmp %r8, %rsi
    jne 2b
    add $24, %rsp
    ret

/*
 * serial_getc: wait for a byte on COM1 and return it in EAX. Polls LSR bit 0
 * (data ready) as a 16550 driver without interrupts must; every poll is a VM
 * exit, which only the echo guest can afford.
 */
serial_getc:
    mov $COM1_LSR, %dx
1:  inb %dx, %al
    test $LSR_DATA_READY, %al
    jz 1b
    mov $COM1_RBR, %dx
    inb %dx, %al
    movzbl %al, %eax
    ret

/*
 * reset64: ask the i8042 to pulse the CPU reset line, which makes the VMM
 * stop with reason Reset. Never returns: should the VMM let the vCPU run on,
 * it parks with interrupts off.
 */
reset64:
    mov $I8042_PULSE_RESET, %al
    outb %al, $I8042_COMMAND_PORT
1:  cli
    hlt
    jmp 1b

/*
 * mp_count_cpus: find the MP floating pointer structure in the kilobyte at
 * MP_SEARCH_BASE, validate it and the configuration table it points to (MP
 * spec 1.4 §4.1, §4.2), and count the processor entries whose EN flag is set
 * (§4.3.1). Returns the count in RAX, or -1 when there is no valid table.
 * Every length read from the table is checked before the bytes it covers
 * are read.
 */
mp_count_cpus:
    mov $MP_SEARCH_BASE, %esi
.Lmp_search:
    cmpl $MPF_SIGNATURE, (%rsi)
    jne .Lmp_next
    // §4.1: all 16 bytes of the floating pointer sum to zero (mod 256).
    xor %eax, %eax
    xor %ecx, %ecx
1:  add (%rsi,%rcx), %al
    inc %ecx
    cmp $MPF_SIZE, %ecx
    jb 1b
    test %al, %al
    jz .Lmp_found
.Lmp_next:
    // A signature with a bad checksum may be stray data: keep looking.
    add $MP_SEARCH_STEP, %esi
    cmp $(MP_SEARCH_BASE + MP_SEARCH_LEN), %esi
    jb .Lmp_search
    jmp .Lmp_invalid
.Lmp_found:
    // A zero physptr means "use a default configuration" (§4.1), which
    // carries no processor entries to count.
    mov MPF_PHYSPTR(%rsi), %edi
    test %edi, %edi
    jz .Lmp_invalid
    lea MPC_HEADER_SIZE(%rdi), %rax
    cmp $MP_TABLE_LIMIT, %rax
    ja .Lmp_invalid
    cmpl $MPC_SIGNATURE, (%rdi)
    jne .Lmp_invalid
    movzwl MPC_BASE_LENGTH(%rdi), %ecx
    cmp $MPC_HEADER_SIZE, %ecx
    jb .Lmp_invalid
    lea (%rdi,%rcx), %r10           // end of the base table
    cmp $MP_TABLE_LIMIT, %r10
    ja .Lmp_invalid
    // §4.2: the whole base table, header included, sums to zero.
    xor %eax, %eax
    mov %rdi, %rsi
2:  add (%rsi), %al
    inc %rsi
    cmp %r10, %rsi
    jb 2b
    test %al, %al
    jnz .Lmp_invalid
    // Walk the entries; each must lie inside the base table length.
    movzwl MPC_ENTRY_COUNT(%rdi), %r9d
    lea MPC_HEADER_SIZE(%rdi), %rsi
    xor %eax, %eax                  // enabled processors so far
.Lmp_entry:
    test %r9d, %r9d
    jz .Lmp_done
    cmp %r10, %rsi
    jae .Lmp_invalid
    movzbl (%rsi), %edx             // entry type is the first byte
    cmp $MP_ENTRY_PROCESSOR, %edx
    jne .Lmp_other
    lea MP_ENTRY_PROCESSOR_SIZE(%rsi), %r11
    cmp %r10, %r11
    ja .Lmp_invalid
    testb $MP_CPU_FLAG_ENABLED, MP_PROCESSOR_CPU_FLAGS(%rsi)
    jz 3f
    inc %eax
3:  mov %r11, %rsi
    dec %r9d
    jmp .Lmp_entry
.Lmp_other:
    // Types 1..4 are 8 bytes; an unknown type has no known length, so
    // the rest of the table cannot be walked.
    cmp $MP_ENTRY_LAST_TYPE, %edx
    ja .Lmp_invalid
    lea MP_ENTRY_OTHER_SIZE(%rsi), %r11
    cmp %r10, %r11
    ja .Lmp_invalid
    mov %r11, %rsi
    dec %r9d
    jmp .Lmp_entry
.Lmp_done:
    ret
.Lmp_invalid:
    mov $-1, %rax
    ret

/* ---------------------------------------------------------------------- */
/* 32-bit routines (flat protected mode, paging off): used by the PVH      */
/* entry, the application processors and the bzImage 32-bit entry.        */
/* ---------------------------------------------------------------------- */
    .code32

/* serial_putc32: write the byte in EDI (low 8 bits) to COM1. */
serial_putc32:
    mov %edi, %eax
    mov $COM1_THR, %dx
    outb %al, %dx
    ret

/* serial_puts32: write the NUL-terminated string at EDI to COM1. */
serial_puts32:
    mov $-1, %esi
    // fall through
/* serial_putsn32: as serial_putsn, for 32-bit code (EDI string, ESI bound). */
serial_putsn32:
    mov $COM1_THR, %dx
1:  test %esi, %esi
    jz 2f
    movzbl (%edi), %eax
    test %al, %al
    jz 2f
    outb %al, %dx
    inc %edi
    dec %esi
    jmp 1b
2:  ret

/* serial_putdec32: write EDI as an unsigned decimal number, no padding. */
serial_putdec32:
    // 12 bytes hold the 10 digits of 2^32-1.
    sub $12, %esp
    lea 12(%esp), %ecx              // one past the buffer end
    push %ebx                       // EBX belongs to the caller
    mov %ecx, %esi
    mov %edi, %eax
    mov $10, %ebx
1:  xor %edx, %edx
    div %ebx                        // EDX:EAX / 10 -> EAX quotient, EDX digit
    add $ASCII_ZERO, %dl
    dec %esi
    mov %dl, (%esi)
    test %eax, %eax
    jnz 1b
    mov $COM1_THR, %dx
2:  movzbl (%esi), %eax
    outb %al, %dx
    inc %esi
    cmp %ecx, %esi
    jne 2b
    pop %ebx
    add $12, %esp
    ret

/* reset32: as reset64, for 32-bit code. */
reset32:
    mov $I8042_PULSE_RESET, %al
    outb %al, $I8042_COMMAND_PORT
1:  cli
    hlt
    jmp 1b

    // Leave the including file in 64-bit mode, the mode its entry runs in.
    .code64
