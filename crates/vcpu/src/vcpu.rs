//! One vCPU: its KVM setup and its run loop.
//!
//! The loop dispatches port-I/O and MMIO exits to the buses and turns every
//! other exit into an [`ExitReason`]. It never panics on what the guest does:
//! an access nobody claims reads as all ones and is otherwise ignored, as on
//! an ISA bus with nothing plugged in.

use std::sync::Arc;

use chitin_boot::BootInfo;
use chitin_bus::Bus;
use chitin_memory::GuestMemoryMmap;
use chitin_seccomp::{Seccomp, Starting, ThreadClass};
use kvm_bindings::{
    CpuId, Msrs, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::arch::x86_64::{cpuid, lapic, msr};
use crate::exit::{ExitReason, VmControl};
use crate::kick;
use crate::vm::Vm;

/// Why a vCPU could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {id}: {step} failed")]
    Kvm {
        /// The vCPU.
        id: u8,
        /// What was being done.
        step: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM accepted only some of the boot MSRs.
    #[error("vCPU {id}: KVM accepted {set} of {wanted} boot MSRs (first refused: {refused:#x})")]
    Msrs {
        /// The vCPU.
        id: u8,
        /// How many were set.
        set: usize,
        /// How many were wanted.
        wanted: usize,
        /// The first MSR index KVM refused.
        refused: u32,
    },
    /// Writing the boot structures for the boot vCPU failed.
    #[error("vCPU {id}: boot state setup failed")]
    Boot {
        /// The vCPU.
        id: u8,
        /// The cause.
        #[source]
        source: chitin_boot::BootError,
    },
    /// Saved state could not be put into the vCPU.
    #[error("vCPU {id}: restoring its state failed")]
    Restore {
        /// The vCPU.
        id: u8,
        /// The ioctl that failed.
        #[source]
        source: crate::StateError,
    },
    /// The vCPU thread could not be spawned or confined.
    #[error("cannot start the thread of vCPU {id}")]
    Spawn {
        /// The vCPU.
        id: u8,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The port-I/O and MMIO buses a vCPU dispatches exits to.
#[derive(Default)]
pub struct IoBuses {
    /// Port I/O (16-bit port numbers).
    pub pio: Bus,
    /// Memory-mapped I/O.
    pub mmio: Bus,
}

/// A configured vCPU, ready to run on its own thread.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    id: u8,
}

impl Vcpu {
    /// Create vCPU `id` of `count` and set its CPUID, MSRs and LAPIC.
    pub fn new(vm: &Vm, id: u8, count: u8) -> Result<Self, VcpuError> {
        let kvm_err = |step| move |source| VcpuError::Kvm { id, step, source };
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("create"))?;
        fd.set_cpuid2(&Self::cpuid_for(vm, id, count))
            .map_err(kvm_err("set CPUID"))?;
        let entries = msr::boot_msrs();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Msrs {
            id,
            set: 0,
            wanted: entries.len(),
            refused: entries[0].index,
        })?;
        let set = fd.set_msrs(&msrs).map_err(kvm_err("set MSRs"))?;
        if set != entries.len() {
            return Err(VcpuError::Msrs {
                id,
                set,
                wanted: entries.len(),
                refused: entries[set].index,
            });
        }
        let mut lapic_state = fd.get_lapic().map_err(kvm_err("get LAPIC"))?;
        lapic::set_lint(&mut lapic_state);
        fd.set_lapic(&lapic_state).map_err(kvm_err("set LAPIC"))?;
        Ok(Self { fd, id })
    }

    /// The CPUID vCPU `id` of `count` gets on this host: what KVM
    /// supports, adjusted for topology and chitin's choices. A snapshot
    /// records it; a restore on a host that gives something else refuses.
    pub fn cpuid_for(vm: &Vm, id: u8, count: u8) -> CpuId {
        let mut cpuid = vm.supported_cpuid().clone();
        cpuid::adjust(&mut cpuid, id, count, vm.host_features());
        cpuid
    }

    /// This vCPU's index (and APIC id).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Put saved `state` into this vCPU (created, never run), on the
    /// thread that created it, instead of [`Vcpu::configure_boot`].
    pub fn restore(&mut self, state: &crate::VcpuState, vm: &Vm) -> Result<(), VcpuError> {
        let id = self.id;
        state
            .restore(&self.fd, vm.saved_msrs(), vm.xsave_size())
            .map_err(|e| VcpuError::Restore { id, source: e })
    }

    /// Put the boot vCPU at the kernel entry: registers, segments, page
    /// tables and FPU per the boot protocol the loader chose.
    pub fn configure_boot(
        &mut self,
        mem: &GuestMemoryMmap,
        info: &BootInfo,
    ) -> Result<(), VcpuError> {
        let id = self.id;
        let kvm_err = |step| move |source| VcpuError::Kvm { id, step, source };
        let mut sregs = self.fd.get_sregs().map_err(kvm_err("get sregs"))?;
        chitin_boot::setup_sregs(mem, info, &mut sregs)
            .map_err(|source| VcpuError::Boot { id, source })?;
        self.fd.set_sregs(&sregs).map_err(kvm_err("set sregs"))?;
        self.fd
            .set_regs(&chitin_boot::setup_regs(info))
            .map_err(kvm_err("set regs"))?;
        self.fd
            .set_fpu(&chitin_boot::setup_fpu())
            .map_err(kvm_err("set FPU"))?;
        Ok(())
    }

    /// Start the vCPU on its own thread, named `chitin-vcpu<id>`, which
    /// confines itself to the vCPU seccomp filter under `seccomp` and only
    /// then enters the guest; this does not wait for that (confirm with
    /// [`Starting::confirm`] once the other threads are started). The
    /// thread runs until `control` says stop, then records nothing more
    /// and exits.
    pub fn start(
        self,
        buses: Arc<IoBuses>,
        control: Arc<VmControl>,
        seccomp: Seccomp,
    ) -> Result<Starting, VcpuError> {
        let id = self.id;
        chitin_seccomp::start(
            format!("chitin-vcpu{id}"),
            ThreadClass::Vcpu,
            seccomp,
            move || self.run(&buses, &control),
        )
        .map_err(|source| VcpuError::Spawn { id, source })
    }

    fn run(mut self, buses: &IoBuses, control: &VmControl) {
        if kick::unblock_on_current_thread().is_err() {
            // Without its kick this vCPU could not be stopped.
            control.request_exit(ExitReason::VcpuError {
                vcpu: self.id,
                errno: libc::EINVAL,
            });
            return;
        }
        control.register_current_thread();
        let flag: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        kick::set_immediate_exit_target(flag);
        while !control.should_stop() {
            if control.pause_requested() {
                self.complete_pending_exit();
                control.park(self.id, &self.fd);
                continue;
            }
            if let Some(reason) = self.run_once(buses) {
                control.request_exit(reason);
            }
        }
        kick::set_immediate_exit_target(std::ptr::null_mut());
        control.unregister_current_thread();
    }

    /// Finish the exit handled last without running guest code: KVM
    /// completes a port or MMIO access (RIP past the instruction, read
    /// data into its register) only at the next `KVM_RUN`, so state read
    /// before that would replay the access. With `immediate_exit` set,
    /// `KVM_RUN` completes it and returns `EINTR` at once (api.rst,
    /// KVM_EXIT_IO and KVM_EXIT_MMIO). Nothing is lost if it fails: the
    /// next entry completes it.
    fn complete_pending_exit(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        let _ = self.fd.run();
        self.fd.set_kvm_immediate_exit(0);
    }

    /// Enter the guest once; `Some` when the VM must stop.
    fn run_once(&mut self, buses: &IoBuses) -> Option<ExitReason> {
        let vcpu = self.id;
        let exit = match self.fd.run() {
            Ok(exit) => exit,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                return None;
            }
            Err(e) => {
                return Some(ExitReason::VcpuError {
                    vcpu,
                    errno: e.errno(),
                })
            }
        };
        match exit {
            // `VcpuExit` drops the access size: `port_io` reads it from
            // kvm_run itself.
            VcpuExit::IoIn(port, _) => {
                self.port_io(buses, port, false);
                None
            }
            VcpuExit::IoOut(port, _) => {
                self.port_io(buses, port, true);
                None
            }
            VcpuExit::MmioRead(addr, data) => {
                if !buses.mmio.read(addr, data) {
                    data.fill(0xff);
                }
                None
            }
            VcpuExit::MmioWrite(addr, data) => {
                buses.mmio.write(addr, data);
                None
            }
            VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr => None,
            VcpuExit::Shutdown => Some(ExitReason::TripleFault),
            VcpuExit::SystemEvent(kind, _) => Some(match kind {
                KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                KVM_SYSTEM_EVENT_CRASH => ExitReason::Crash,
                other => ExitReason::UnhandledExit {
                    vcpu,
                    exit: format!("system event {other}"),
                },
            }),
            VcpuExit::FailEntry(reason, _cpu) => Some(ExitReason::FailEntry { vcpu, reason }),
            VcpuExit::InternalError => {
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the
                // kernel filled the `internal` member of the exit union.
                let suberror = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                Some(ExitReason::InternalError { vcpu, suberror })
            }
            other => Some(ExitReason::UnhandledExit {
                vcpu,
                exit: format!("{other:?}"),
            }),
        }
    }

    /// Hand a port I/O exit to the bus. A string instruction (`rep outsb`,
    /// `rep insw`) exits once for up to a page of data, `count` accesses of
    /// `size` bytes, which the devices see one by one, as the port would.
    fn port_io(&mut self, buses: &IoBuses, port: u16, out: bool) {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_IO, so KVM filled the `io`
        // member of the exit union.
        let io = unsafe { run.__bindgen_anon_1.io };
        let size = usize::from(io.size).max(1);
        let len = size * io.count as usize;
        let base: *mut u8 = (run as *mut kvm_bindings::kvm_run).cast();
        // SAFETY: KVM puts the exit's data at `data_offset` inside this
        // vCPU's kvm_run mapping (the page after the struct), `size * count`
        // bytes of it, as kvm-ioctls' own `VcpuExit::IoIn`/`IoOut` slice
        // assumes; `run` is a fresh unique borrow of that mapping, so nothing
        // else refers to those bytes while the slice lives.
        let data =
            unsafe { std::slice::from_raw_parts_mut(base.add(io.data_offset as usize), len) };
        for access in data.chunks_mut(size) {
            if out {
                buses.pio.write(u64::from(port), access);
            } else if !buses.pio.read(u64::from(port), access) {
                access.fill(0xff);
            }
        }
    }
}
