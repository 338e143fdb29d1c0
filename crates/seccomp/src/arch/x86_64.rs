//! x86_64: the seccomp target, log mode's syscall trampoline, and where a
//! trapped syscall's number, arguments and return value sit in the signal
//! frame (`ucontext_t`).

use std::arch::global_asm;

/// The seccomp target of this architecture.
pub(crate) const TARGET: seccompiler::TargetArch = seccompiler::TargetArch::x86_64;

// Makes one syscall: `chitin_seccomp_syscall(nr, a0, a1, a2, a3, a4, a5)`
// in the System V calling convention (nr in rdi, a0..a4 in rsi, rdx, rcx,
// r8, r9, a5 on the stack) moved into the syscall convention (rax, rdi,
// rsi, rdx, r10, r8, r9). `chitin_seccomp_syscall_ret` is the address
// after the `syscall` instruction, which is what the kernel reports as the
// instruction pointer of a syscall made here (`seccomp_data`): log mode's
// filters allow every syscall from that one address, so the SIGSYS handler
// can make a trapped syscall on the thread's behalf.
global_asm!(
    ".pushsection .text.chitin_seccomp_syscall,\"ax\",@progbits",
    ".globl chitin_seccomp_syscall",
    ".type chitin_seccomp_syscall,@function",
    "chitin_seccomp_syscall:",
    "mov rax, rdi",
    "mov rdi, rsi",
    "mov rsi, rdx",
    "mov rdx, rcx",
    "mov r10, r8",
    "mov r8, r9",
    "mov r9, [rsp + 8]",
    "syscall",
    ".globl chitin_seccomp_syscall_ret",
    "chitin_seccomp_syscall_ret:",
    "ret",
    ".size chitin_seccomp_syscall, . - chitin_seccomp_syscall",
    ".popsection",
);

extern "C" {
    fn chitin_seccomp_syscall(nr: i64, a0: u64, a1: u64, a2: u64, a3: u64, a4: u64, a5: u64)
        -> i64;
    static chitin_seccomp_syscall_ret: u8;
}

/// The instruction pointer the kernel sees for syscalls made by
/// [`raw_syscall`].
pub(crate) fn trampoline_ip() -> u64 {
    std::ptr::addr_of!(chitin_seccomp_syscall_ret) as u64
}

/// Make syscall `nr` with `args`; the kernel's return value (a negative
/// errno on failure).
///
/// # Safety
///
/// The syscall and its arguments must be ones the caller may make: this
/// is a raw syscall, checked by nothing.
pub(crate) unsafe fn raw_syscall(nr: i64, args: [u64; 6]) -> i64 {
    // SAFETY: the trampoline follows the C calling convention declared
    // above; what the syscall does is the caller's responsibility.
    unsafe { chitin_seccomp_syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]) }
}

/// A trapped syscall's arguments, from the signal frame.
pub(crate) fn syscall_args(context: &libc::ucontext_t) -> [u64; 6] {
    let regs = &context.uc_mcontext.gregs;
    [
        libc::REG_RDI,
        libc::REG_RSI,
        libc::REG_RDX,
        libc::REG_R10,
        libc::REG_R8,
        libc::REG_R9,
    ]
    .map(|r| regs[r as usize] as u64)
}

/// Set the value the trapped syscall returns when the handler returns.
pub(crate) fn set_syscall_result(context: &mut libc::ucontext_t, value: i64) {
    context.uc_mcontext.gregs[libc::REG_RAX as usize] = value;
}

/// The syscall that creates a thread or process sharing the caller's
/// memory and stack cannot be made from a signal handler on the caller's
/// behalf: the child would start on the handler's stack. `clone` without
/// `CLONE_VM` (a plain fork) can.
pub(crate) fn cannot_be_made_for_caller(nr: i64, args: &[u64; 6]) -> bool {
    match nr {
        libc::SYS_clone => args[0] & libc::CLONE_VM as u64 != 0,
        libc::SYS_clone3 | libc::SYS_vfork => true,
        _ => false,
    }
}
