/*
 * acpi: find the machine's ACPI tables the way Linux does and power off
 * through them.
 *
 * Output (COM1):
 *   chitin-test: acpi
 *   rsdp <boot_params.acpi_rsdp_addr, 16 hex digits>
 *   madt cpus <enabled local APIC entries in the MADT, decimal>
 *   sleep <sleep control port, 16 hex digits> <sleep status port, 16 hex digits>
 *   poweroff
 * then the VMM stops with reason PowerOff. It follows the zero page's
 * acpi_rsdp_addr (boot protocol 2.14) to the RSDP ("RSD PTR ", ACPI 6.5
 * §5.2.5.3), its XSDT pointer to the XSDT (§5.2.8), and the XSDT's entries
 * to the FADT ("FACP", §5.2.9) and MADT ("APIC", §5.2.12). It powers off as
 * Linux does on a hardware-reduced machine (ACPICA's
 * acpi_hw_extended_sleep): WAK_STS (0x80) to the FADT's sleep status
 * register, then SLP_TYP 5 << 2 | SLP_EN (0x20) to its sleep control
 * register. Missing or malformed tables print "acpi: no rsdp" or
 * "acpi: bad tables" and reset; a power-off the VMM ignores prints
 * "acpi: still running" and resets.
 */
#include "common.S"

#define BP_ACPI_RSDP_ADDR   0x70                    // u64 in struct boot_params
#define RSDP_SIGNATURE      0x2052545020445352      // "RSD PTR ", little endian
#define RSDP_XSDT_ADDRESS   24
#define SDT_LENGTH          4
#define SDT_HEADER_SIZE     36
#define XSDT_SIGNATURE      0x54445358              // "XSDT"
#define FACP_SIGNATURE      0x50434146              // "FACP"
#define APIC_SIGNATURE      0x43495041              // "APIC"
#define FADT_SLEEP_CONTROL  244                     // GAS; its address at +4
#define FADT_SLEEP_STATUS   256
#define GAS_ADDRESS         4
#define MADT_ENTRIES        44
#define MADT_LOCAL_APIC     0
#define LOCAL_APIC_FLAGS    4
#define TABLE_MAX_LENGTH    0x10000                 // no chitin table is larger
#define WAK_STS             0x80
#define SLP_S5_EN           ((5 << 2) | 0x20)

    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    cli
    cld
    lea stack_top(%rip), %rsp
    mov %rsi, %rbx                  // struct boot_params

    PUTS64("chitin-test: acpi\n")
    mov BP_ACPI_RSDP_ADDR(%rbx), %r12
    test %r12, %r12
    jz .Lno_rsdp
    movabs $RSDP_SIGNATURE, %rax
    cmp %rax, (%r12)
    jne .Lbad
    PUTS64("rsdp ")
    mov %r12, %rdi
    call serial_puthex64
    PUTC64(ASCII_NL)

    // The XSDT: header, then 8-byte table addresses.
    mov RSDP_XSDT_ADDRESS(%r12), %r13
    cmpl $XSDT_SIGNATURE, (%r13)
    jne .Lbad
    mov SDT_LENGTH(%r13), %ecx
    cmp $SDT_HEADER_SIZE, %ecx
    jb .Lbad
    cmp $TABLE_MAX_LENGTH, %ecx
    ja .Lbad
    lea (%r13,%rcx), %r14           // end of the XSDT
    lea SDT_HEADER_SIZE(%r13), %r15 // first entry
    xor %ebp, %ebp                  // the FADT, once found
    xor %r12d, %r12d                // the MADT, once found
.Lxsdt_entry:
    lea 8(%r15), %rax
    cmp %r14, %rax
    ja .Lxsdt_done
    mov (%r15), %rdi
    cmpl $FACP_SIGNATURE, (%rdi)
    jne 1f
    mov %rdi, %rbp
1:  cmpl $APIC_SIGNATURE, (%rdi)
    jne 2f
    mov %rdi, %r12
2:  add $8, %r15
    jmp .Lxsdt_entry
.Lxsdt_done:
    test %rbp, %rbp
    jz .Lbad
    test %r12, %r12
    jz .Lbad

    // Count the MADT's enabled local APICs.
    mov SDT_LENGTH(%r12), %ecx
    cmp $TABLE_MAX_LENGTH, %ecx
    ja .Lbad
    lea (%r12,%rcx), %r14           // end of the MADT
    lea MADT_ENTRIES(%r12), %rsi
    xor %r13d, %r13d                // enabled CPUs
.Lmadt_entry:
    lea 2(%rsi), %rax
    cmp %r14, %rax
    ja .Lmadt_done
    movzbl 1(%rsi), %ecx            // entry length
    cmp $2, %ecx
    jb .Lbad
    lea (%rsi,%rcx), %r8
    cmp %r14, %r8
    ja .Lbad
    cmpb $MADT_LOCAL_APIC, (%rsi)
    jne 3f
    testl $1, LOCAL_APIC_FLAGS(%rsi)
    jz 3f
    inc %r13
3:  mov %r8, %rsi
    jmp .Lmadt_entry
.Lmadt_done:
    PUTS64("madt cpus ")
    mov %r13, %rdi
    call serial_putdec64
    PUTC64(ASCII_NL)

    PUTS64("sleep ")
    mov FADT_SLEEP_CONTROL+GAS_ADDRESS(%rbp), %rdi
    call serial_puthex64
    PUTC64(ASCII_SPACE)
    mov FADT_SLEEP_STATUS+GAS_ADDRESS(%rbp), %rdi
    call serial_puthex64
    PUTC64(ASCII_NL)

    PUTS64("poweroff\n")
    mov FADT_SLEEP_STATUS+GAS_ADDRESS(%rbp), %rdx
    mov $WAK_STS, %al
    outb %al, %dx
    mov FADT_SLEEP_CONTROL+GAS_ADDRESS(%rbp), %rdx
    mov $SLP_S5_EN, %al
    outb %al, %dx
    PUTS64("acpi: still running\n")
    jmp reset64

.Lno_rsdp:
    PUTS64("acpi: no rsdp\n")
    jmp reset64
.Lbad:
    PUTS64("acpi: bad tables\n")
    jmp reset64

    .bss
    .balign 16
    .skip 4096
stack_top:
