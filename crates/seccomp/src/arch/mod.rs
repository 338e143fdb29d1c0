//! The architecture-specific parts: the seccomp target, the syscall
//! trampoline of log mode and the registers a trapped syscall left in its
//! signal frame.

#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
pub(crate) use x86_64::*;
