//! The KVM VM: `/dev/kvm`, the VM file descriptor, the in-kernel interrupt
//! controllers (PIC, IOAPIC, LAPICs) and, on request, the PIT.
//!
//! Everything here happens before any guest code runs. Interrupt lines are
//! raised by devices through irqfds registered here; this module never
//! decides what a device does.

use kvm_bindings::{kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use chitin_memory::GuestRam;

use crate::arch::x86_64::cpuid::HostFeatures;
use crate::kick;

/// The legacy `struct kvm_xsave`'s size.
const LEGACY_XSAVE_SIZE: usize = 4096;
/// KVM API version every kernel since 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;
/// Three pages in the MMIO gap that Intel VMX needs for its real-mode TSS;
/// placed just below the identity-map page, inside the reserved gap.
const TSS_ADDRESS: usize = 0xfffb_d000;

/// Why a VM could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm (is KVM available and accessible?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// The kernel's KVM API version is not 12.
    #[error("unsupported KVM API version {0}")]
    ApiVersion(i32),
    /// A capability chitin needs is missing.
    #[error("KVM lacks a required capability: {0}")]
    MissingCapability(&'static str),
    /// A KVM ioctl failed while setting up the VM.
    #[error("KVM setup step failed: {step}")]
    Setup {
        /// What was being set up.
        step: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest RAM could not be registered as KVM memory slots.
    #[error("cannot register guest memory with KVM")]
    Memory(#[source] chitin_memory::MemoryError),
    /// The vCPU kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
}

/// A KVM virtual machine with its interrupt controllers.
#[derive(Debug)]
pub struct Vm {
    fd: VmFd,
    supported_cpuid: CpuId,
    host_features: HostFeatures,
    /// The MSRs KVM can save and restore (`KVM_GET_MSR_INDEX_LIST`).
    saved_msrs: Vec<u32>,
    /// Whether the in-kernel PIT exists.
    pit: bool,
    /// Bytes of a vCPU's XSAVE state as KVM copies it in and out
    /// (`KVM_CAP_XSAVE2`; 4 KiB without it).
    xsave_size: usize,
}

impl Vm {
    /// Open `/dev/kvm`, create a VM backed by `ram`, then the in-kernel
    /// irqchip, and with `pit` the in-kernel PIT (i8254).
    ///
    /// Linux guests built with `KVM_GUEST` never use the PIT: kvm-clock
    /// gives them the TSC rate, the TSC-deadline local APIC timer ticks,
    /// and the IO-APIC timer check is skipped (`no_timer_check`). Without
    /// it KVM keeps no timer thread for the VM, and tearing the VM down
    /// waits for four fewer SRCU grace periods. Kernels that calibrate or
    /// tick with the PIT need `pit`.
    ///
    /// Memory is registered before the irqchip on purpose: on some hosts
    /// (kvm-pvm here) adding the first memory slot after the irqchip exists
    /// costs milliseconds, before it well under one (`cargo bench --bench
    /// boot` prints both orders' cost).
    pub fn new(ram: &GuestRam, pit: bool) -> Result<Self, VmError> {
        kick::install_handler().map_err(VmError::SignalHandler)?;
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let version = kvm.get_api_version();
        if version != KVM_API_VERSION {
            return Err(VmError::ApiVersion(version));
        }
        for (cap, name) in [
            (Cap::Irqchip, "irqchip"),
            (Cap::Pit2, "PIT2"),
            (Cap::Irqfd, "irqfd"),
            (Cap::Ioeventfd, "ioeventfd"),
            (Cap::UserMemory, "user memory"),
            (Cap::ImmediateExit, "immediate exit"),
            (Cap::ExtCpuid, "extended CPUID"),
        ] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCapability(name));
            }
        }
        let host_features = HostFeatures {
            tsc_deadline_timer: kvm.check_extension(Cap::TscDeadlineTimer),
        };
        let setup = |step| move |source| VmError::Setup { step, source };
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(setup("get supported CPUID"))?;
        let saved_msrs = kvm
            .get_msr_index_list()
            .map_err(setup("get MSR index list"))?
            .as_slice()
            .to_vec();
        let fd = kvm.create_vm().map_err(setup("create VM"))?;
        fd.set_tss_address(TSS_ADDRESS)
            .map_err(setup("set TSS address"))?;
        ram.register(&fd).map_err(VmError::Memory)?;
        fd.create_irq_chip().map_err(setup("create irqchip"))?;
        if pit {
            let config = kvm_pit_config {
                // The speaker port is emulated as a dummy so port 0x61
                // reads work.
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            };
            fd.create_pit2(config).map_err(setup("create PIT"))?;
        }
        let xsave_size = usize::try_from(fd.check_extension_int(Cap::Xsave2))
            .unwrap_or(0)
            .max(LEGACY_XSAVE_SIZE);
        Ok(Self {
            fd,
            supported_cpuid,
            host_features,
            saved_msrs,
            pit,
            xsave_size,
        })
    }

    /// The MSRs a vCPU's saved state carries: every one KVM lists as
    /// saveable (those a vCPU cannot read are skipped when saving).
    pub fn saved_msrs(&self) -> &[u32] {
        &self.saved_msrs
    }

    /// Whether the VM has the in-kernel PIT.
    pub fn has_pit(&self) -> bool {
        self.pit
    }

    /// Bytes of a vCPU's XSAVE state as KVM copies it (above 4 KiB where
    /// the process asked for AMX's state).
    pub fn xsave_size(&self) -> usize {
        self.xsave_size
    }

    /// The VM file descriptor.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The CPUID KVM supports on this host, before per-vCPU adjustment.
    pub fn supported_cpuid(&self) -> &CpuId {
        &self.supported_cpuid
    }

    /// CPU features the host offers that the supported CPUID omits.
    pub fn host_features(&self) -> HostFeatures {
        self.host_features
    }

    /// Make a 4-byte guest write of `datamatch` to the MMIO address `addr`
    /// signal `event` inside KVM, without an exit to userspace (a virtio
    /// QueueNotify or InterruptACK register).
    pub fn register_mmio_notify(
        &self,
        event: &EventFd,
        addr: u64,
        datamatch: u32,
    ) -> Result<(), VmError> {
        self.fd
            .register_ioevent(event, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(|source| VmError::Setup {
                step: "register ioeventfd",
                source,
            })
    }

    /// Make writes to `event` raise interrupt line `gsi`.
    pub fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(event, gsi)
            .map_err(|source| VmError::Setup {
                step: "register irqfd",
                source,
            })
    }
}
