//! Device wiring: the legacy devices on the port-I/O bus and each virtio
//! device in its own virtio-mmio window with its ioeventfds and irqfd.
//!
//! This is the only place that decides guest addresses and interrupt lines
//! for devices; devices themselves never see KVM.

use std::sync::{Arc, Mutex};

use chitin_acpi::VirtioMmioDevice;
use chitin_blk::Block;
use chitin_devices::{
    AcpiPm, CmosRtc, I8042Device, PmEvent, SerialDevice, SerialInput, ACPI_PM_BASE, ACPI_PM_LEN,
    COM1_BASE, COM1_IRQ, COM1_LEN, RTC_BASE, RTC_LEN,
};
use chitin_memory::layout::VIRTIO_MMIO_START;
use chitin_memory::GuestRam;
use chitin_seccomp::Seccomp;
use chitin_vcpu::{ExitReason, IoBuses, Vm, VmControl};
use chitin_virtio::mmio::{
    MmioTransport, INTERRUPT_ACK_OFFSET, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET,
};
use chitin_virtio::VirtioDevice;
use chitin_vsock::{SocketFile, Vsock, VsockConfig};
use event_manager::MutEventSubscriber;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::console::{Console, ConsoleInput};
use crate::disk::{device_name, Disk};
use crate::error::SandboxError;
use crate::event_loop::EventLoop;
use crate::faults::FaultTables;
use crate::sandbox::VsockSettings;
use crate::snapshot::{DeviceRecord, LegacyState};

/// Port of the i8042 data register; the device spans 0x60..=0x64.
const I8042_BASE: u64 = 0x60;
/// The i8042 window: data port 0x60 through command port 0x64.
const I8042_LEN: u64 = 5;

/// Interrupt lines for virtio-mmio devices: the IOAPIC pins above the ISA
/// devices chitin emulates (timer 0, keyboard 1, COM1 4) and without the
/// RTC's 8.
const VIRTIO_GSIS: &[u32] = &[
    5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23,
];

/// A failed set-up step of a device, for `build()`'s caller.
pub(crate) fn device_err(
    device: &'static str,
    step: &'static str,
    e: impl std::error::Error + Send + Sync + 'static,
) -> SandboxError {
    SandboxError::Device {
        device,
        step,
        source: Box::new(e),
    }
}

/// A virtio device behind its virtio-mmio window.
pub(crate) struct VirtioAttached {
    /// Where it is, for the DSDT or the command line.
    pub(crate) mmio: VirtioMmioDevice,
    /// What it is, as a snapshot records it.
    pub(crate) record: DeviceRecord,
    /// Its transport, for snapshots.
    pub(crate) transport: Arc<MmioTransport>,
}

/// Puts virtio devices behind virtio-mmio windows, handing out windows and
/// interrupt lines in order: QueueNotify writes signal the device's queue
/// events inside KVM (ioeventfd) and its driver's usual InterruptACK write
/// is counted there too, its interrupt is an irqfd, its queues are
/// processed on the event loop.
pub(crate) struct Attacher<'a> {
    vm: &'a Vm,
    ram: &'a GuestRam,
    buses: &'a mut IoBuses,
    events: &'a mut EventLoop,
    /// Every device attached so far, in window order.
    pub(crate) devices: Vec<VirtioAttached>,
    /// Their guest fault tables.
    pub(crate) faults: FaultTables,
}

impl<'a> Attacher<'a> {
    pub(crate) fn new(
        vm: &'a Vm,
        ram: &'a GuestRam,
        buses: &'a mut IoBuses,
        events: &'a mut EventLoop,
    ) -> Self {
        Self {
            vm,
            ram,
            buses,
            events,
            devices: Vec::new(),
            faults: FaultTables::default(),
        }
    }

    /// Put `device` behind the next window.
    pub(crate) fn add<D>(&mut self, device: D, record: DeviceRecord) -> Result<(), SandboxError>
    where
        D: VirtioDevice + MutEventSubscriber + Send + 'static,
    {
        let slot = self.devices.len();
        let gsi = *VIRTIO_GSIS
            .get(slot)
            .ok_or(SandboxError::TooManyDevices(VIRTIO_GSIS.len()))?;
        let base = VIRTIO_MMIO_START + slot as u64 * MMIO_WINDOW_SIZE;
        for (queue, event) in device.queue_events().iter().enumerate() {
            self.vm
                .register_mmio_notify(event, base + QUEUE_NOTIFY_OFFSET, queue as u32)
                .map_err(|e| device_err("virtio-mmio", "ioeventfd for a queue", e))?;
        }
        let irq = EventFd::new(EFD_NONBLOCK)
            .map_err(|e| device_err("virtio-mmio", "interrupt eventfd", e))?;
        self.vm
            .register_irqfd(&irq, gsi)
            .map_err(|e| device_err("virtio-mmio", "irqfd", e))?;
        let device = Arc::new(Mutex::new(device));
        let transport = Arc::new(MmioTransport::new(
            device.clone(),
            self.ram.memory().clone(),
            irq,
        ));
        for (event, value) in transport.ack_events() {
            self.vm
                .register_mmio_notify(event, base + INTERRUPT_ACK_OFFSET, value)
                .map_err(|e| device_err("virtio-mmio", "ioeventfd for InterruptACK", e))?;
        }
        self.buses
            .mmio
            .insert(transport.clone(), base, MMIO_WINDOW_SIZE)
            .map_err(|e| device_err("virtio-mmio", "MMIO window", e))?;
        self.events.add(device);
        self.devices.push(VirtioAttached {
            mmio: VirtioMmioDevice {
                base,
                len: MMIO_WINDOW_SIZE,
                gsi,
            },
            record,
            transport,
        });
        Ok(())
    }

    /// The disk `index` (`vda` is 0).
    pub(crate) fn disk(&mut self, index: usize, disk: &Disk) -> Result<(), SandboxError> {
        let block = Block::new(disk.config()?).map_err(|source| SandboxError::Disk {
            path: disk.path().to_path_buf(),
            source,
        })?;
        self.faults.add(device_name(index), block.faults());
        let record = DeviceRecord::Disk {
            path: disk.path().to_path_buf(),
            read_only: block.read_only(),
            id: disk.serial().map(str::to_string),
            sectors: block.capacity_sectors(),
        };
        self.add(block, record)
    }

    /// The vsock device, its port for the agent kept free when `agent`;
    /// returns its socket file, for the sandbox's owner to remove.
    pub(crate) fn vsock(
        &mut self,
        settings: &VsockSettings,
        agent: bool,
    ) -> Result<Option<SocketFile>, SandboxError> {
        let mut device = Vsock::new(VsockConfig {
            guest_cid: u64::from(settings.cid),
            uds_path: settings.path.clone(),
        })
        .map_err(|source| SandboxError::Vsock {
            path: settings.path.clone(),
            source,
        })?;
        if agent {
            // Guest programs holding every other connection must not lock
            // exec out.
            device.reserve_port(crate::exec::AGENT_PORT);
        }
        self.faults.add("vsock", device.faults());
        let socket_file = device.take_socket_file();
        self.add(
            device,
            DeviceRecord::Vsock {
                cid: settings.cid,
                agent,
            },
        )?;
        Ok(socket_file)
    }
}

/// The `virtio_mmio.device=` entry a kernel without ACPI needs to find
/// `device` (`VIRTIO_MMIO_CMDLINE_DEVICES`).
pub(crate) fn mmio_cmdline_entry(device: &VirtioMmioDevice) -> String {
    format!(
        "virtio_mmio.device={}K@{:#x}:{}",
        device.len / 1024,
        device.base,
        device.gsi
    )
}

/// The legacy devices whose registers a snapshot carries.
pub(crate) struct Legacy {
    serial: Arc<SerialDevice>,
    rtc: Arc<CmosRtc>,
    i8042: Arc<I8042Device>,
}

impl Legacy {
    /// Their registers now (the VM paused).
    pub(crate) fn state(&self) -> LegacyState {
        LegacyState {
            serial: self.serial.state(),
            rtc: self.rtc.state(),
            i8042: self.i8042.state(),
        }
    }
}

/// COM1, the i8042 and the CMOS RTC on the port-I/O bus, and with `acpi`
/// the sleep and reset registers the FADT points at; with `state`, the
/// registers a snapshot saved.
#[allow(clippy::too_many_arguments)]
pub(crate) fn legacy_devices(
    vm: &Vm,
    control: &Arc<VmControl>,
    console: Console,
    input: Option<ConsoleInput>,
    events: &mut EventLoop,
    seccomp: Seccomp,
    acpi: bool,
    state: Option<&LegacyState>,
) -> Result<(IoBuses, Legacy), SandboxError> {
    let mut buses = IoBuses::default();

    let serial_irq =
        EventFd::new(EFD_NONBLOCK).map_err(|e| device_err("serial", "interrupt eventfd", e))?;
    vm.register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(|e| device_err("serial", "irqfd", e))?;
    let serial = Arc::new(
        SerialDevice::with_state(serial_irq, console.open(seccomp)?, state.map(|s| &s.serial))
            .map_err(|e| device_err("serial", "device", e))?,
    );
    buses
        .pio
        .insert(serial.clone(), COM1_BASE, COM1_LEN)
        .map_err(|e| device_err("serial", "port range", e))?;
    if let Some(ConsoleInput(source)) = input {
        events.add(Arc::new(Mutex::new(SerialInput::new(
            Arc::clone(&serial),
            source,
        ))));
    }

    let reset_control = Arc::clone(control);
    let on_reset = Box::new(move || {
        reset_control.request_exit(ExitReason::Reset);
    });
    let i8042 = Arc::new(match state {
        Some(s) => I8042Device::with_state(on_reset, &s.i8042),
        None => I8042Device::new(on_reset),
    });
    buses
        .pio
        .insert(i8042.clone(), I8042_BASE, I8042_LEN)
        .map_err(|e| device_err("i8042", "port range", e))?;
    let rtc = Arc::new(match state {
        Some(s) => CmosRtc::with_state(&s.rtc),
        None => CmosRtc::new(),
    });
    buses
        .pio
        .insert(rtc.clone(), RTC_BASE, RTC_LEN)
        .map_err(|e| device_err("rtc", "port range", e))?;
    if acpi {
        let pm_control = Arc::clone(control);
        let pm = AcpiPm::new(Box::new(move |event| {
            pm_control.request_exit(match event {
                PmEvent::PowerOff => ExitReason::PowerOff,
                PmEvent::Reset => ExitReason::Reset,
            });
        }));
        buses
            .pio
            .insert(Arc::new(pm), ACPI_PM_BASE, ACPI_PM_LEN)
            .map_err(|e| device_err("acpi-pm", "port range", e))?;
    }
    Ok((buses, Legacy { serial, rtc, i8042 }))
}
