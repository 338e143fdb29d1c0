/*
 * vsock_hostile: a guest driver that breaks the virtio-vsock rules on
 * purpose, to prove through real KVM exits that the device refuses each
 * malformed chain, counts it, answers what deserves an answer, and keeps
 * working.
 *
 * It brings up the virtio-mmio (version 2) device in the first window
 * (virtio 1.2 §4.2.3.1: reset, ACKNOWLEDGE, DRIVER, VERSION_1,
 * FEATURES_OK, queues, DRIVER_OK), posts four receive buffers, then makes
 * four transmit chains available at once and notifies:
 *
 *   A  an RW header announcing 100 data bytes, and no data at all;
 *   B  an RW header, then a device-writable data descriptor;
 *   C  a header split over two descriptors (20 + 24 bytes) with op 99;
 *   D  an RW header, then 8 data bytes at 16 GiB, outside guest memory.
 *
 * The device must return all four (used index 4) and answer each with a
 * reset on the receive queue (used index 4 there too).
 *
 * Output (COM1):
 *   chitin-test: vsock_hostile
 *   tx used <n>            (4 expected)
 *   rx used <n>            (4 expected)
 *   int <a> <b>            InterruptStatus before and after writing it
 *                          back to InterruptACK (1 0 expected)
 *   done                   (or "no vsock device" / "features refused")
 * then an i8042 reset. Waits are bounded: a device that never answers shows
 * as a smaller count, not a hang.
 */
#include "common.S"

/* The first virtio-mmio window (chitin_memory::layout::VIRTIO_MMIO_START). */
#define MMIO_BASE           0xd0000000
/* virtio-mmio v2 registers (virtio 1.2 §4.2.2). */
#define MMIO_MAGIC          0x000
#define MMIO_VERSION        0x004
#define MMIO_DEVICE_ID      0x008
#define MMIO_DRV_FEATURES   0x020
#define MMIO_DRV_FEAT_SEL   0x024
#define MMIO_QUEUE_SEL      0x030
#define MMIO_QUEUE_NUM_MAX  0x034
#define MMIO_QUEUE_NUM      0x038
#define MMIO_QUEUE_READY    0x044
#define MMIO_QUEUE_NOTIFY   0x050
#define MMIO_INT_STATUS     0x060
#define MMIO_INT_ACK        0x064
#define MMIO_STATUS         0x070
#define MMIO_DESC_LOW       0x080
#define MMIO_DESC_HIGH      0x084
#define MMIO_DRIVER_LOW     0x090
#define MMIO_DRIVER_HIGH    0x094
#define MMIO_DEVICE_LOW     0x0a0
#define MMIO_DEVICE_HIGH    0x0a4
#define VIRTIO_MAGIC        0x74726976      // "virt"
#define DEVICE_ID_VSOCK     19
/* Device status bits (virtio 1.2 §2.1). */
#define S_ACK               1
#define S_DRIVER            2
#define S_DRIVER_OK         4
#define S_FEATURES_OK       8
/* Descriptor flags (virtio 1.2 §2.7.5). */
#define F_NEXT              1
#define F_WRITE             2

/*
 * Split rings of QSIZE entries, one 4 KiB page per queue from RINGS (well
 * inside the test guests' 64 MiB, above the image): descriptor table at
 * +0, available ring at +0x100, used ring at +0x200.
 */
#define QSIZE               16
#define RINGS               0x800000
#define RING(q)             (RINGS + (q) * 0x1000)
#define AVAIL_OFF           0x100
#define USED_OFF            0x200
#define RXQ                 0
#define TXQ                 1
#define EVQ                 2
/* Packet headers at HDRS (64 bytes apart), receive buffers at RXBUFS. */
#define HDRS                0x900000
#define HDR(i)              (HDRS + (i) * 64)
#define SCRATCH             0x901000
#define RXBUFS              0x910000
#define RXBUF_LEN           4096
/* 16 GiB: far above the 64 MiB of guest RAM. */
#define OUTSIDE_HIGH        0x4
/* How long to wait for the device: iterations of a PAUSE loop. */
#define WAIT_SPINS          200000000

/* vsock header fields (virtio 1.2 §5.10.6). */
#define H_SRC_CID           0
#define H_DST_CID           8
#define H_SRC_PORT          16
#define H_DST_PORT          20
#define H_LEN               24
#define H_TYPE              28
#define H_OP                30
#define H_BUF_ALLOC         36
#define OP_RW               5
#define OP_BOGUS            99

    .section .text.entry, "ax"
    .code64
    .globl _start
_start:
    cli
    cld
    lea stack_top(%rip), %rsp

    PUTS64("chitin-test: vsock_hostile\n")
    mov $MMIO_BASE, %rbx
    cmpl $VIRTIO_MAGIC, MMIO_MAGIC(%rbx)
    jne no_device
    cmpl $2, MMIO_VERSION(%rbx)
    jne no_device
    cmpl $DEVICE_ID_VSOCK, MMIO_DEVICE_ID(%rbx)
    jne no_device

    movl $0, MMIO_STATUS(%rbx)
    movl $S_ACK, MMIO_STATUS(%rbx)
    movl $(S_ACK | S_DRIVER), MMIO_STATUS(%rbx)
    movl $1, MMIO_DRV_FEAT_SEL(%rbx)        // features 32..63:
    movl $1, MMIO_DRV_FEATURES(%rbx)        // bit 32, VIRTIO_F_VERSION_1
    movl $0, MMIO_DRV_FEAT_SEL(%rbx)
    movl $0, MMIO_DRV_FEATURES(%rbx)
    movl $(S_ACK | S_DRIVER | S_FEATURES_OK), MMIO_STATUS(%rbx)
    testl $S_FEATURES_OK, MMIO_STATUS(%rbx)
    jz features_refused

    mov $RXQ, %edi
    call setup_queue
    mov $TXQ, %edi
    call setup_queue
    mov $EVQ, %edi
    call setup_queue

    /* Four receive buffers, device-writable, one descriptor each. */
    xor %ecx, %ecx
1:  mov %rcx, %rax
    shl $4, %rax                            // descriptor i at 16 * i
    mov %rcx, %rdx
    shl $12, %rdx
    add $RXBUFS, %rdx
    mov %rdx, RING(RXQ)(%rax)               // addr
    movl $RXBUF_LEN, RING(RXQ) + 8(%rax)    // len
    movw $F_WRITE, RING(RXQ) + 12(%rax)     // flags
    movw %cx, RING(RXQ) + AVAIL_OFF + 4(,%rcx,2)
    inc %ecx
    cmp $4, %ecx
    jb 1b
    movw $4, RING(RXQ) + AVAIL_OFF + 2      // avail idx

    movl $(S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK), MMIO_STATUS(%rbx)

    /* Headers: A (RW, len 100), B (RW, len 16), C (op 99), D (RW, len 8). */
    mov $HDR(0), %rdi
    mov $OP_RW, %esi
    mov $100, %edx
    call make_header
    mov $HDR(1), %rdi
    mov $OP_RW, %esi
    mov $16, %edx
    call make_header
    mov $HDR(2), %rdi
    mov $OP_BOGUS, %esi
    xor %edx, %edx
    call make_header
    mov $HDR(3), %rdi
    mov $OP_RW, %esi
    mov $8, %edx
    call make_header

    /* TX descriptors: [addr_low, addr_high, len, flags, next] per row. */
    lea tx_descs(%rip), %rsi
    mov $RING(TXQ), %rdi
    mov $7, %ecx
2:  mov (%rsi), %eax
    mov %eax, (%rdi)
    mov 4(%rsi), %eax
    mov %eax, 4(%rdi)
    mov 8(%rsi), %eax
    mov %eax, 8(%rdi)
    mov 12(%rsi), %eax
    mov %ax, 12(%rdi)
    mov 16(%rsi), %eax
    mov %ax, 14(%rdi)
    add $20, %rsi
    add $16, %rdi
    dec %ecx
    jnz 2b
    /* Chain heads 0, 1, 3, 5; then publish all four at once. */
    movw $0, RING(TXQ) + AVAIL_OFF + 4
    movw $1, RING(TXQ) + AVAIL_OFF + 6
    movw $3, RING(TXQ) + AVAIL_OFF + 8
    movw $5, RING(TXQ) + AVAIL_OFF + 10
    movw $4, RING(TXQ) + AVAIL_OFF + 2
    movl $TXQ, MMIO_QUEUE_NOTIFY(%rbx)

    mov $RING(TXQ) + USED_OFF + 2, %edi
    call wait_used4
    PUTS64("tx used ")
    movzwl RING(TXQ) + USED_OFF + 2, %edi
    call serial_putdec64
    PUTC64(ASCII_NL)

    mov $RING(RXQ) + USED_OFF + 2, %edi
    call wait_used4
    PUTS64("rx used ")
    movzwl RING(RXQ) + USED_OFF + 2, %edi
    call serial_putdec64
    PUTC64(ASCII_NL)

    /*
     * InterruptStatus shows the used-buffer bit; writing back what was
     * read to InterruptACK (which KVM counts without an exit when chitin
     * registered it) clears it for the next read.
     */
    PUTS64("int ")
    movl MMIO_INT_STATUS(%rbx), %r12d
    mov %r12d, %edi
    call serial_putdec64
    PUTC64(ASCII_SPACE)
    movl %r12d, MMIO_INT_ACK(%rbx)
    movl MMIO_INT_STATUS(%rbx), %edi
    call serial_putdec64
    PUTC64(ASCII_NL)

    PUTS64("done\n")
    jmp reset64

no_device:
    PUTS64("no vsock device\n")
    jmp reset64
features_refused:
    PUTS64("features refused\n")
    jmp reset64

/* setup_queue: size, ring addresses and READY for queue EDI (0-2). */
setup_queue:
    mov %edi, MMIO_QUEUE_SEL(%rbx)
    mov %edi, %eax
    shl $12, %eax
    add $RINGS, %eax                        // RING(q)
    movl $QSIZE, MMIO_QUEUE_NUM(%rbx)
    mov %eax, MMIO_DESC_LOW(%rbx)
    movl $0, MMIO_DESC_HIGH(%rbx)
    lea AVAIL_OFF(%rax), %edx
    mov %edx, MMIO_DRIVER_LOW(%rbx)
    movl $0, MMIO_DRIVER_HIGH(%rbx)
    lea USED_OFF(%rax), %edx
    mov %edx, MMIO_DEVICE_LOW(%rbx)
    movl $0, MMIO_DEVICE_HIGH(%rbx)
    movl $1, MMIO_QUEUE_READY(%rbx)
    ret

/*
 * make_header: a 44-byte stream header at RDI from CID 3 port 1000 to the
 * host (CID 2) port 5000, op ESI, len EDX, 256 KiB of buffer.
 */
make_header:
    movq $3, H_SRC_CID(%rdi)
    movq $2, H_DST_CID(%rdi)
    movl $1000, H_SRC_PORT(%rdi)
    movl $5000, H_DST_PORT(%rdi)
    mov %edx, H_LEN(%rdi)
    movw $1, H_TYPE(%rdi)
    mov %si, H_OP(%rdi)
    movl $0x40000, H_BUF_ALLOC(%rdi)
    ret

/* wait_used4: spin (bounded) until the u16 at EDI reaches 4. */
wait_used4:
    mov $WAIT_SPINS, %ecx
1:  cmpw $4, (%rdi)
    jae 2f
    pause
    dec %ecx
    jnz 1b
2:  ret

    .section .rodata
    .balign 4
/* addr_low, addr_high, len, flags, next: one row per descriptor. */
tx_descs:
    .long HDR(0), 0, 44, 0, 0                     // 0: A, header alone
    .long HDR(1), 0, 44, F_NEXT, 2                // 1: B, header ...
    .long SCRATCH, 0, 16, F_WRITE, 0              // 2: ... writable data
    .long HDR(2), 0, 20, F_NEXT, 4                // 3: C, header part 1 ...
    .long HDR(2) + 20, 0, 24, 0, 0                // 4: ... part 2
    .long HDR(3), 0, 44, F_NEXT, 6                // 5: D, header ...
    .long 0, OUTSIDE_HIGH, 8, 0, 0                // 6: ... data at 16 GiB

    .bss
    .balign 16
stack_bottom:
    .skip 4096
stack_top:
