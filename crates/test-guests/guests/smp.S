/*
 * smp: bring up every application processor (AP) the MP table lists, the
 * way firmware does on real hardware, and have each CPU say who it is.
 *
 * Output (COM1):
 *   chitin-test: smp
 *   apic <LAPIC ID, decimal>        exactly once per CPU, BSP first, APs in
 *                                   whatever order they win the print lock
 *   done                            once N-1 APs have checked in
 * then an i8042 reset. If the MP table is missing or invalid the BSP prints
 * "cpus: none" instead of any apic line and resets; if the APs do not all
 * check in within AP_WAIT_TICKS (several seconds) it prints "timeout" and
 * resets.
 *
 * The BSP (entered by the 64-bit boot protocol):
 *   1. counts N enabled processors in the MP table (MP spec 1.4 §4);
 *   2. prints its own line;
 *   3. copies the real-mode trampoline below to TRAMP_BASE (0x10000) and
 *      sends INIT, Start-Up, Start-Up to "all excluding self" (MP spec 1.4
 *      §B.4 "Application Processor Startup"; Intel SDM Vol. 3A, "MP
 *      Initialization Protocol Algorithm");
 *   4. polls ap_count in memory (not a port: port access is a VM exit)
 *      until it reaches N-1.
 * Each AP starts in real mode at 0x1000:0000, loads the trampoline's own
 * flat GDT, enables protection (SDM Vol. 3A, "Switching to Protected Mode")
 * and far-jumps into ap_entry32 in this image. There it takes print_lock,
 * reads its LAPIC ID from the LAPIC ID register (never CPUID: this host's
 * hypervisor shows the guest the host's CPUID), prints, increments ap_count
 * and parks with interrupts off.
 *
 * The APs share one stack: an AP touches it only while it holds print_lock.
 */
#include "common.S"

/*
 * Waits are measured in time-stamp-counter ticks, not loop iterations: on
 * the software hypervisor of chitin's test host a loop iteration costs about
 * a microsecond and `pause` traps to the host, while on hardware-assisted
 * KVM they cost nanoseconds, so no iteration count is right for both. The
 * TSC counts real time on both. Its rate is not something this guest can
 * learn reliably (CPUID shows the host's leaves, and there is no calibrated
 * timer it may assume), so the counts assume a 1-5 GHz TSC:
 *   INIT_DELAY_TICKS  2^25: 7-34 ms after INIT (MP spec 1.4 §B.4.1 asks 10 ms)
 *   SIPI_DELAY_TICKS  2^20: 0.2-1 ms after each Start-Up (§B.4.2: 200 us)
 *   AP_WAIT_TICKS     2^34: 3.4-17 s (6.6 s at 2.6 GHz) for all APs to check in
 * KVM's in-kernel LAPIC latches INIT and Start-Up as pending events, so the
 * two delays are for fidelity to the documented sequence, not correctness.
 */
#define INIT_DELAY_TICKS        (1 << 25)
#define SIPI_DELAY_TICKS        (1 << 20)
#define AP_WAIT_TICKS           (1 << 34)
/* Bound on polls of the ICR delivery-status bit; KVM reports idle at once. */
#define ICR_IDLE_POLLS          1024

/*
 * RDTSC_RAX: RAX = the 64-bit time-stamp counter (SDM Vol. 2, RDTSC: EDX:EAX,
 * upper halves of RAX and RDX cleared). Clobbers RDX.
 */
#define RDTSC_RAX rdtsc; shl $32, %rdx; or %rdx, %rax

/*
 * SPIN_LOCK(var): take a test-and-test-and-set spinlock. XCHG with a memory
 * operand is always locked (SDM Vol. 2, XCHG), and the LOCK prefix says so
 * for the reader. The waiting loop only reads, with `pause`, so it does not
 * bounce the cache line. Needs no stack; clobbers EAX. Works in 32-bit and
 * 64-bit code (the operand is an absolute or RIP-relative address).
 */
#define SPIN_LOCK(var) \
    9997: mov $1, %eax; lock xchg %eax, var; test %eax, %eax; jz 9999f; \
    9998: pause; cmpl $0, var; jne 9998b; jmp 9997b; \
    9999:
/*
 * SPIN_UNLOCK(var): x86 stores are not reordered with earlier loads or
 * stores (SDM Vol. 3A, "Memory Ordering in P6 and More Recent Processor
 * Families"), so a plain store releases the lock.
 */
#define SPIN_UNLOCK(var) movl $0, var

/* DELAY(ticks): wait at least `ticks` TSC ticks (delay_ticks). */
#define DELAY(ticks) mov $(ticks), %edi; call delay_ticks

    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    cli
    cld
    lea stack_top(%rip), %rsp

    PUTS64("chitin-test: smp\n")

    call mp_count_cpus
    cmp $1, %rax                    // -1 (no table) or 0 CPUs: nothing to do
    jge 1f
    PUTS64("cpus: none\n")
    jmp reset64
1:  mov %rax, %r12                  // R12 = N

    // The LAPIC is reached at its default physical base through the
    // identity map. A 64-bit disp32 would sign-extend 0xfee00000, so the
    // base goes through a register (MOV to a 32-bit register zero-extends).
    mov $LAPIC_BASE, %r14d

    // Software-enable the LAPIC (SVR bit 8) before using the ICR, as
    // firmware does: it is in its reset state under the boot protocol.
    movl $LAPIC_SVR_ENABLE, LAPIC_SVR(%r14)

    // Our own line, under the same lock the APs use.
    SPIN_LOCK(print_lock(%rip))
    PUTS64("apic ")
    mov LAPIC_ID(%r14), %edi
    shr $LAPIC_ID_SHIFT, %edi
    call serial_putdec64
    PUTC64(ASCII_NL)
    SPIN_UNLOCK(print_lock(%rip))

    cmp $1, %r12
    je .Lall_in

    // Place the trampoline where the Start-Up vector points.
    lea tramp_start(%rip), %rsi
    mov $TRAMP_BASE, %edi
    mov $(tramp_end - tramp_start), %ecx
    rep movsb

    // INIT, ~10 ms, Start-Up, ~200 us, Start-Up, ~200 us (MP spec §B.4).
    // The destination field (ICR high) is unused with a shorthand, but is
    // written first because writing ICR low is what sends the IPI.
    movl $0, LAPIC_ICR_HIGH(%r14)
    movl $ICR_INIT_ALL_BUT_SELF, LAPIC_ICR_LOW(%r14)
    call wait_icr_idle
    DELAY(INIT_DELAY_TICKS)

    movl $0, LAPIC_ICR_HIGH(%r14)
    movl $(ICR_SIPI_ALL_BUT_SELF | SIPI_VECTOR), LAPIC_ICR_LOW(%r14)
    call wait_icr_idle
    DELAY(SIPI_DELAY_TICKS)

    // The second Start-Up is for a processor that missed the first; one
    // that is already running ignores it (it is not in wait-for-SIPI).
    movl $0, LAPIC_ICR_HIGH(%r14)
    movl $(ICR_SIPI_ALL_BUT_SELF | SIPI_VECTOR), LAPIC_ICR_LOW(%r14)
    call wait_icr_idle
    DELAY(SIPI_DELAY_TICKS)

    // Wait, in memory, for the N-1 APs. ">=" rather than "==" so that
    // more CPUs than the MP table lists still end the wait.
    lea -1(%r12), %r13
    RDTSC_RAX
    mov %rax, %r15                  // R15 = start of the wait
    movabs $AP_WAIT_TICKS, %rbx
2:  mov ap_count(%rip), %eax
    cmp %r13, %rax
    jae .Lall_in
    pause
    RDTSC_RAX
    sub %r15, %rax
    cmp %rbx, %rax
    jb 2b

    SPIN_LOCK(print_lock(%rip))
    PUTS64("timeout\n")
    jmp reset64

.Lall_in:
    SPIN_LOCK(print_lock(%rip))
    PUTS64("done\n")
    jmp reset64

/*
 * wait_icr_idle: wait (bounded) until the ICR delivery-status bit reads
 * idle, as the SDM asks before the next IPI is sent. R14 = LAPIC base.
 * Clobbers ECX.
 */
wait_icr_idle:
    mov $ICR_IDLE_POLLS, %ecx
1:  testl $ICR_DELIVERY_STATUS, LAPIC_ICR_LOW(%r14)
    jz 2f
    pause
    dec %ecx
    jnz 1b
2:  ret

/*
 * delay_ticks: return after at least RDI TSC ticks, pausing between reads.
 * Clobbers RAX, RDX, RSI.
 */
delay_ticks:
    RDTSC_RAX
    mov %rax, %rsi
1:  pause
    RDTSC_RAX
    sub %rsi, %rax
    cmp %rdi, %rax
    jb 1b
    ret

/*
 * AP trampoline, real mode. Copied to TRAMP_BASE and entered there with
 * CS = SIPI_VECTOR << 8 (base TRAMP_BASE), IP = 0, so every address inside
 * it is taken relative to tramp_start and used with a segment whose base is
 * TRAMP_BASE. Only its copy runs; the assembled original is data.
 */
    .code16
    .balign 16
tramp_start:
    cli
    cld
    mov %cs, %ax                    // DS = CS: base TRAMP_BASE
    mov %ax, %ds
    // LGDT with a 32-bit operand loads a full 32-bit base (SDM Vol. 2,
    // LGDT: a 16-bit operand size uses only 24 bits of it).
    lgdtl tramp_gdtr - tramp_start
    mov %cr0, %eax
    or $CR0_PE, %eax
    mov %eax, %cr0
    // The far jump right after setting PE loads CS from the new GDT and
    // leaves real mode. Its 32-bit offset is an absolute address in this
    // image (linked at GUEST_LOAD_ADDR), valid wherever the trampoline is.
    ljmpl $TRAMP_CODE32_SEL, $ap_entry32

    .balign 8
tramp_gdt:
    .quad 0                         // null descriptor
    // Flat 4 GiB descriptors, base 0, limit 0xfffff in 4 KiB units (G=1),
    // 32-bit (D/B=1), present, DPL 0 (SDM Vol. 3A, "Segment Descriptors").
    // The accessed bit is preset so the CPU never writes to the GDT.
    .quad 0x00cf9b000000ffff        // TRAMP_CODE32_SEL: code, execute/read
    .quad 0x00cf93000000ffff        // TRAMP_DATA32_SEL: data, read/write
tramp_gdt_end:
tramp_gdtr:
    .word tramp_gdt_end - tramp_gdt - 1         // limit
    .long TRAMP_BASE + (tramp_gdt - tramp_start) // linear base of the copy
tramp_end:

/*
 * AP, 32-bit flat protected mode, paging off. Runs from the image itself.
 */
    .code32
ap_entry32:
    mov $TRAMP_DATA32_SEL, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs

    SPIN_LOCK(print_lock)
    // Only the lock holder uses the shared AP stack.
    mov $ap_stack_top, %esp
    PUTS32("apic ")
    mov LAPIC_BASE + LAPIC_ID, %edi // physical address: paging is off
    shr $LAPIC_ID_SHIFT, %edi
    call serial_putdec32
    PUTC32(ASCII_NL)
    // Check in while still holding the lock: when the BSP sees the last
    // increment, every AP line is complete on the wire.
    lock incl ap_count
    SPIN_UNLOCK(print_lock)
1:  cli
    hlt
    jmp 1b

    .data
    .balign 4
/* 0 = free, 1 = held; serialises whole lines on COM1 between CPUs. */
print_lock:
    .long 0
/* APs that have printed their line. */
ap_count:
    .long 0

    .bss
    .balign 16
stack_bottom:
    .skip 4096
stack_top:
ap_stack_bottom:
    .skip 1024
ap_stack_top:
