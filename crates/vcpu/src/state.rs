//! A vCPU's and a VM's architectural state: saved from a paused VM (each
//! vCPU on its own thread) and restored into a new one before it runs.
//!
//! The order of the restore matters (KVM's api.rst, and what Firecracker
//! learned): MP state, then the registers, segments (which set the APIC
//! base), FPU/extended state, XCRs and debug registers, then the LAPIC,
//! then the MSRs (the TSC before the TSC deadline, which is relative to
//! it), and the pending-event state last, because setting registers drops
//! a pending exception. The MP state is saved first, before anything the
//! others could change.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::codec::{DecodeError, Reader, Writer};

/// `MSR_IA32_TSC_DEADLINE`: restored last among the MSRs.
const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// How many MSRs one KVM_GET_MSRS / KVM_SET_MSRS call carries.
const MSR_CHUNK: usize = 64;

/// A state ioctl that failed.
#[derive(Debug, thiserror::Error)]
#[error("{what} failed")]
pub struct StateError {
    /// The ioctl, or what was being done.
    pub what: &'static str,
    /// The KVM error.
    #[source]
    pub source: kvm_ioctls::Error,
}

fn err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError { what, source }
}

/// The state of one vCPU.
#[derive(Clone)]
pub struct VcpuState {
    /// `KVM_GET_MP_STATE`.
    pub mp_state: kvm_mp_state,
    /// `KVM_GET_REGS`.
    pub regs: kvm_regs,
    /// `KVM_GET_SREGS`.
    pub sregs: kvm_sregs,
    /// `KVM_GET_XSAVE`'s region: the legacy 4 KiB area, which holds every
    /// state component the CPUID chitin gives its guests enables.
    pub xsave: Box<[u32; 1024]>,
    /// `KVM_GET_XCRS`.
    pub xcrs: kvm_xcrs,
    /// `KVM_GET_DEBUGREGS`.
    pub debugregs: kvm_debugregs,
    /// `KVM_GET_LAPIC`.
    pub lapic: kvm_lapic_state,
    /// Every MSR of the VM's save list the vCPU could read.
    pub msrs: Vec<kvm_msr_entry>,
    /// `KVM_GET_VCPU_EVENTS`.
    pub events: kvm_vcpu_events,
    /// The guest TSC's frequency, kHz.
    pub tsc_khz: u32,
    /// The CPUID the vCPU had; a restore refuses a host that gives
    /// another.
    pub cpuid: Vec<kvm_cpuid_entry2>,
}

/// The legacy `struct kvm_xsave`: all the XSAVE state a snapshot carries.
const XSAVE_SIZE: usize = 4096;

/// An XSAVE area larger than the legacy one (AMX's, once the process
/// asked for it): `KVM_SET_XSAVE` would read past the 4 KiB struct.
fn xsave_too_large(size: usize) -> Result<(), StateError> {
    if size > XSAVE_SIZE {
        return Err(StateError {
            what: "KVM_GET/SET_XSAVE (an XSAVE area above 4 KiB, as with AMX, is not carried)",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        });
    }
    Ok(())
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("mp_state", &self.mp_state.mp_state)
            .field("msrs", &self.msrs.len())
            .field("tsc_khz", &self.tsc_khz)
            .finish_non_exhaustive()
    }
}

/// Read `indices` from `fd`, skipping those KVM refuses (an MSR the
/// host lists but this vCPU's CPUID does not give it).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut pos = 0;
    while pos < indices.len() {
        let chunk = &indices[pos..indices.len().min(pos + MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError {
            what: "KVM_GET_MSRS (too many entries)",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let read = fd.get_msrs(&mut msrs).map_err(err("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..read.min(chunk.len())]);
        pos += read;
        if read < chunk.len() {
            // KVM stops at the first MSR it cannot read: skip that one.
            pos += 1;
        }
    }
    Ok(out)
}

impl VcpuState {
    /// Save the state of the vCPU behind `fd` (not running: parked, or not
    /// started), with the MSRs of `msr_indices` it can read.
    pub fn save(
        fd: &VcpuFd,
        msr_indices: &[u32],
        xsave_size: usize,
        cpuid: Vec<kvm_cpuid_entry2>,
    ) -> Result<Self, StateError> {
        xsave_too_large(xsave_size)?;
        let mp_state = fd.get_mp_state().map_err(err("KVM_GET_MP_STATE"))?;
        let regs = fd.get_regs().map_err(err("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
        let xsave = Box::new(fd.get_xsave().map_err(err("KVM_GET_XSAVE"))?.region);
        let xcrs = fd.get_xcrs().map_err(err("KVM_GET_XCRS"))?;
        let debugregs = fd.get_debug_regs().map_err(err("KVM_GET_DEBUGREGS"))?;
        let lapic = fd.get_lapic().map_err(err("KVM_GET_LAPIC"))?;
        let msrs = read_msrs(fd, msr_indices)?;
        let events = fd.get_vcpu_events().map_err(err("KVM_GET_VCPU_EVENTS"))?;
        let tsc_khz = fd.get_tsc_khz().map_err(err("KVM_GET_TSC_KHZ"))?;
        Ok(VcpuState {
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            events,
            tsc_khz,
            cpuid,
        })
    }

    /// Put this state into the vCPU behind `fd` (created with its CPUID,
    /// not yet run), on a host whose KVM saves `allowed_msrs` and copies
    /// `xsave_size` bytes of XSAVE state.
    pub fn restore(
        &self,
        fd: &VcpuFd,
        allowed_msrs: &[u32],
        xsave_size: usize,
    ) -> Result<(), StateError> {
        xsave_too_large(xsave_size)?;
        if self.msrs.iter().any(|m| !allowed_msrs.contains(&m.index)) {
            return Err(StateError {
                what: "KVM_SET_MSRS (the snapshot holds an MSR this host's KVM does not list)",
                source: kvm_ioctls::Error::new(libc::EINVAL),
            });
        }
        if fd.get_tsc_khz().map_err(err("KVM_GET_TSC_KHZ"))? != self.tsc_khz {
            fd.set_tsc_khz(self.tsc_khz).map_err(err(
                "KVM_SET_TSC_KHZ (the host cannot run the guest's TSC rate)",
            ))?;
        }
        fd.set_mp_state(self.mp_state)
            .map_err(err("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(err("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(err("KVM_SET_SREGS"))?;
        let xsave = kvm_xsave {
            region: *self.xsave,
            ..Default::default()
        };
        // SAFETY: `xsave` is a whole `kvm_xsave` with no extra area, and
        // the legacy KVM_SET_XSAVE copies exactly that size (KVM checks
        // the contents).
        unsafe { fd.set_xsave(&xsave) }.map_err(err("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(err("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(err("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(err("KVM_SET_LAPIC"))?;
        let mut ordered: Vec<kvm_msr_entry> = self
            .msrs
            .iter()
            .filter(|m| m.index != MSR_TSC_DEADLINE)
            .copied()
            .collect();
        ordered.extend(self.msrs.iter().filter(|m| m.index == MSR_TSC_DEADLINE));
        for chunk in ordered.chunks(MSR_CHUNK) {
            let msrs = Msrs::from_entries(chunk).map_err(|_| StateError {
                what: "KVM_SET_MSRS (too many entries)",
                source: kvm_ioctls::Error::new(libc::E2BIG),
            })?;
            let set = fd.set_msrs(&msrs).map_err(err("KVM_SET_MSRS"))?;
            if set != chunk.len() {
                return Err(StateError {
                    what: "KVM_SET_MSRS (an MSR was refused)",
                    source: kvm_ioctls::Error::new(libc::EINVAL),
                });
            }
        }
        fd.set_vcpu_events(&self.events)
            .map_err(err("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

impl VcpuState {
    /// Append this state to `w`.
    pub fn encode(&self, w: &mut Writer) {
        w.raw(&self.mp_state);
        w.raw(&self.regs);
        w.raw(&self.sregs);
        w.raw(&*self.xsave);
        w.raw(&self.xcrs);
        w.raw(&self.debugregs);
        w.raw(&self.lapic);
        w.u32(u32::try_from(self.msrs.len()).unwrap_or(u32::MAX));
        for msr in &self.msrs {
            w.u32(msr.index);
            w.u64(msr.data);
        }
        w.raw(&self.events);
        w.u32(self.tsc_khz);
        w.u32(u32::try_from(self.cpuid.len()).unwrap_or(u32::MAX));
        for entry in &self.cpuid {
            w.raw(entry);
        }
    }

    /// Read a state [`VcpuState::encode`] wrote.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mp_state = r.raw("vCPU MP state")?;
        let regs = r.raw("vCPU registers")?;
        let sregs = r.raw("vCPU segment registers")?;
        let xsave = Box::new(r.raw("vCPU XSAVE area")?);
        let xcrs = r.raw("vCPU XCRs")?;
        let debugregs = r.raw("vCPU debug registers")?;
        let lapic = r.raw("vCPU LAPIC")?;
        let count = r.count("vCPU MSR count", 12)?;
        let mut msrs = Vec::with_capacity(count);
        for _ in 0..count {
            let index = r.u32("MSR index")?;
            let data = r.u64("MSR value")?;
            msrs.push(kvm_msr_entry {
                index,
                data,
                ..Default::default()
            });
        }
        let events = r.raw("vCPU events")?;
        let tsc_khz = r.u32("TSC frequency")?;
        let count = r.count("CPUID entry count", 4)?;
        let mut cpuid = Vec::with_capacity(count);
        for _ in 0..count {
            cpuid.push(r.raw("CPUID entry")?);
        }
        Ok(VcpuState {
            mp_state,
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            lapic,
            msrs,
            events,
            tsc_khz,
            cpuid,
        })
    }
}

/// The VM-wide state: the in-kernel interrupt controllers, the PIT when
/// there is one, and the kvmclock.
#[derive(Clone)]
pub struct VmState {
    /// PIC master, PIC slave, IOAPIC (`KVM_GET_IRQCHIP`).
    pub irqchips: [kvm_irqchip; 3],
    /// `KVM_GET_PIT2`, for a VM with the in-kernel PIT.
    pub pit: Option<kvm_pit_state2>,
    /// `KVM_GET_CLOCK`.
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("pit", &self.pit.is_some())
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

const IRQCHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

impl VmState {
    /// Append this state to `w`.
    pub fn encode(&self, w: &mut Writer) {
        for chip in &self.irqchips {
            w.raw(chip);
        }
        match &self.pit {
            Some(pit) => {
                w.u8(1);
                w.raw(pit);
            }
            None => w.u8(0),
        }
        w.u64(self.clock.clock);
    }

    /// Read a state [`VmState::encode`] wrote.
    pub fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let mut irqchips = [kvm_irqchip::default(); 3];
        for (chip, id) in irqchips.iter_mut().zip(IRQCHIPS) {
            *chip = r.raw("interrupt controller")?;
            if chip.chip_id != id {
                return Err(DecodeError::Invalid {
                    what: "interrupt controller",
                    detail: format!("chip {} where {id} belongs", chip.chip_id),
                });
            }
        }
        let pit = match r.u8("PIT flag")? {
            0 => None,
            1 => Some(r.raw("PIT")?),
            other => {
                return Err(DecodeError::Invalid {
                    what: "PIT flag",
                    detail: other.to_string(),
                })
            }
        };
        let clock = kvm_clock_data {
            clock: r.u64("kvmclock")?,
            ..Default::default()
        };
        Ok(VmState {
            irqchips,
            pit,
            clock,
        })
    }

    /// Save the state of `vm` (every vCPU parked), with its PIT if `pit`.
    pub fn save(vm: &VmFd, pit: bool) -> Result<Self, StateError> {
        let mut irqchips = [kvm_irqchip::default(); 3];
        for (chip, id) in irqchips.iter_mut().zip(IRQCHIPS) {
            chip.chip_id = id;
            vm.get_irqchip(chip).map_err(err("KVM_GET_IRQCHIP"))?;
        }
        let pit = if pit {
            Some(vm.get_pit2().map_err(err("KVM_GET_PIT2"))?)
        } else {
            None
        };
        let clock = vm.get_clock().map_err(err("KVM_GET_CLOCK"))?;
        Ok(VmState {
            irqchips,
            pit,
            clock,
        })
    }

    /// Put this state into `vm` (its irqchip, and PIT if the state has
    /// one, created; no vCPU run yet).
    pub fn restore(&self, vm: &VmFd) -> Result<(), StateError> {
        for chip in &self.irqchips {
            vm.set_irqchip(chip).map_err(err("KVM_SET_IRQCHIP"))?;
        }
        if let Some(pit) = &self.pit {
            vm.set_pit2(pit).map_err(err("KVM_SET_PIT2"))?;
        }
        // The clock continues from its saved value; the flags KVM_GET_CLOCK
        // reports (TSC_STABLE, REALTIME, HOST_TSC) are not for setting.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(err("KVM_SET_CLOCK"))?;
        Ok(())
    }
}
