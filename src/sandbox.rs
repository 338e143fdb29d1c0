//! The `Sandbox` life cycle, enforced by types:
//! [`SandboxBuilder`] → `build()` → [`Sandbox`] (configured, kernel loaded,
//! no guest code run) → `start()` → [`RunningSandbox`] (`wait`, `stop`,
//! commands) and any number of [`SandboxHandle`]s (`wait`, `stop` from any
//! thread). Only a running sandbox can be waited on or stopped, and
//! dropping either one tears everything down: no thread, fd or mapping
//! outlives it.

use std::fmt;
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chitin_agent_protocol::{CMDLINE_ENTRY as AGENT_ENTRY, CMDLINE_KEY as AGENT_KEY};
use chitin_boot::{BootInfo, BootParams, BootProtocol};
use chitin_fs::Fs;
use chitin_memory::layout::CMDLINE_MAX_SIZE;
use chitin_memory::{Backing, GuestRam};
use chitin_net::{NetCounters, NetStats};
use chitin_seccomp::Seccomp;
use chitin_vcpu::{ExitReason, IoBuses, ParkError, Vcpu, VcpuState, Vm, VmControl, VmState};
use chitin_virtio::mmio::TransportSnapshotError;
use chitin_vsock::SocketFile;

use crate::console::{Console, ConsoleInput};
use crate::devices::{
    device_err, legacy_devices, mmio_cmdline_entry, Attacher, Legacy, VirtioAttached,
};
use crate::disk::{device_name, Disk};
use crate::error::{ExecError, PauseError, SandboxError};
use crate::event_loop::{EventLoop, RunningEventLoop};
use crate::exec::{relock, AgentLink, Child, Command, ExitStatus, Output};
use crate::faults::{DeviceFaults, FaultTables};
use crate::guest::{GuestImage, GUEST_CMDLINE};
use crate::net::{dns_entry, Net};
use crate::share::Share;
use crate::snapshot::{
    new_memory_file_name, write_snapshot, DeviceRecord, Saved, SavedDevice, SnapshotError,
    SnapshotInfo,
};

/// Default guest memory in MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 128;
/// Default number of vCPUs.
pub const DEFAULT_VCPUS: u8 = 1;
/// Most vCPUs a sandbox can have: APIC ids 0..=253, with 254 left for the
/// IOAPIC and 255 being the broadcast id.
pub const MAX_VCPUS: u8 = 254;
/// The command line used when none is given: console on COM1, reset through
/// the i8042 on reboot, reboot at once on panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
/// Command-line entries chitin appends for its own machine. The i8042
/// exists only to reset the machine: it has no keyboard or mouse behind it,
/// and Linux's probe of a missing keyboard waited 0.4 s for answers that
/// never come, delaying boot and then shutdown (measured in the nested
/// tier). The machine has no PCI host bridge: without `pci=off` Linux
/// probes PCI configuration space through ports 0xcf8-0xcff anyway (its
/// early quirks scan bus 0), 225 port exits to the VMM per boot measured
/// by `cargo xtask bench-boot`. (A kernel built without `CONFIG_PCI` does
/// not know `pci=off` and hands it to init as an environment entry.)
pub const VMM_CMDLINE_ENTRIES: &[&str] = &["i8042.nokbd", "i8042.noaux", "pci=off"];

/// The guest CID chitin gives a sandbox's vsock device when the caller
/// asked for the agent but configured no vsock device itself.
pub const DEFAULT_GUEST_CID: u32 = 3;

/// Where the agent mounts a [`SandboxBuilder::rootfs`] share that has no
/// mount point of its own.
pub const ROOTFS_MOUNT: &str = "/run/chitin/rootfs";

/// The entry point: `Sandbox::builder()`.
///
/// ```no_run
/// use chitin::{Console, Sandbox};
///
/// let sandbox = Sandbox::builder()
///     .kernel("vmlinux")
///     .memory_mib(256)
///     .vcpus(2)
///     .console(Console::stdout())
///     .build()?;
/// let running = sandbox.start()?;
/// let reason = running.wait();
/// println!("guest stopped: {reason}");
/// # Ok::<(), chitin::SandboxError>(())
/// ```
pub struct Sandbox {
    // Field order is drop order: vCPUs and the VM go before guest RAM.
    vcpus: Vec<Vcpu>,
    buses: Arc<IoBuses>,
    control: Arc<VmControl>,
    events: EventLoop,
    vm: Vm,
    boot: BootInfo,
    ram: GuestRam,
    agent_socket: Option<PathBuf>,
    /// The rootfs share's mount point, the default root of every exec.
    rootfs: Option<std::ffi::OsString>,
    faults: FaultTables,
    nets: Vec<Arc<NetCounters>>,
    seccomp: Seccomp,
    /// The vsock listener's file, removed by the sandbox's owner once
    /// every thread is gone (the event loop, which drops the device, may
    /// not remove files).
    socket_file: Option<SocketFile>,
    /// The devices whose registers a snapshot carries.
    legacy: Legacy,
    /// The virtio devices, in window order.
    virtio: Vec<VirtioAttached>,
    /// What a snapshot needs to know of the machine.
    machine: Machine,
}

/// The machine as a snapshot records it.
#[derive(Debug, Clone, Copy)]
struct Machine {
    acpi: bool,
    pit: bool,
}

/// Configuration for a [`Sandbox`]. Setters never panic; the first invalid
/// value is reported by [`SandboxBuilder::build`].
#[derive(Debug)]
pub struct SandboxBuilder {
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    cmdline: Option<String>,
    vcpus: u8,
    memory_mib: u64,
    backing: Backing,
    protocol: BootProtocol,
    console: Console,
    input: Option<ConsoleInput>,
    disks: Vec<Disk>,
    root_disk: Option<usize>,
    nets: Vec<Net>,
    shares: Vec<Share>,
    /// Mount point of the share that is every exec's default root.
    rootfs: Option<String>,
    dns: Vec<Ipv4Addr>,
    vsock: Option<VsockSettings>,
    agent: bool,
    seccomp: Seccomp,
    acpi: bool,
    pit: bool,
    /// The snapshot this sandbox continues from, with its directory.
    restore: Option<(PathBuf, Arc<Saved>)>,
    first_error: Option<SandboxError>,
}

impl Default for SandboxBuilder {
    fn default() -> Self {
        Self {
            kernel: None,
            initrd: None,
            cmdline: None,
            vcpus: DEFAULT_VCPUS,
            memory_mib: DEFAULT_MEMORY_MIB,
            backing: Backing::Anonymous,
            protocol: BootProtocol::Linux64,
            console: Console::null(),
            input: None,
            disks: Vec::new(),
            root_disk: None,
            nets: Vec::new(),
            shares: Vec::new(),
            rootfs: None,
            dns: Vec::new(),
            vsock: None,
            agent: false,
            seccomp: Seccomp::Enforce,
            acpi: true,
            pit: false,
            restore: None,
            first_error: None,
        }
    }
}

impl SandboxBuilder {
    /// A builder for a sandbox continuing from the snapshot `saved` in
    /// `dir` ([`Snapshot::restore_builder`](crate::Snapshot::restore_builder)).
    pub(crate) fn restoring(dir: PathBuf, saved: Arc<Saved>) -> Self {
        Self {
            vcpus: saved.vcpus,
            memory_mib: saved.memory_bytes >> 20,
            acpi: saved.acpi,
            pit: saved.pit,
            restore: Some((dir, saved)),
            ..Self::default()
        }
    }

    fn fail(&mut self, error: SandboxError) {
        self.first_error.get_or_insert(error);
    }

    /// The guest kernel: an ELF vmlinux or a bzImage, told apart by content.
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.kernel = Some(path.into());
        self
    }

    /// An initramfs for the guest.
    pub fn initrd(mut self, path: impl Into<PathBuf>) -> Self {
        self.initrd = Some(path.into());
        self
    }

    /// The kernel command line (replaces [`DEFAULT_CMDLINE`], or
    /// [`GUEST_CMDLINE`] with `.guest(..)`, in whatever order the two are
    /// called). chitin appends its own entries for the devices it adds and,
    /// for a guest image, `chitin.agent=1` if the line lacks it; a line that
    /// sets `chitin.agent` otherwise fails `build()`.
    pub fn cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.cmdline = Some(cmdline.into());
        self
    }

    /// Number of vCPUs, 1 to [`MAX_VCPUS`].
    pub fn vcpus(mut self, count: u32) -> Self {
        match u8::try_from(count) {
            Ok(n) if (1..=MAX_VCPUS).contains(&n) => self.vcpus = n,
            _ => self.fail(SandboxError::InvalidVcpus(count)),
        }
        self
    }

    /// Guest memory in MiB.
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// What host memory backs guest RAM (default [`Backing::Anonymous`];
    /// [`Backing::Memfd`] lets another process map the same pages).
    pub fn memory_backing(mut self, backing: Backing) -> Self {
        self.backing = backing;
        self
    }

    /// How the boot vCPU enters the kernel (default
    /// [`BootProtocol::Linux64`]). [`BootProtocol::Pvh`] enters an ELF
    /// kernel through its PVH entry point (Xen PVH boot ABI); `build()`
    /// fails if the kernel has no PVH note.
    pub fn boot_protocol(mut self, protocol: BootProtocol) -> Self {
        self.protocol = protocol;
        self
    }

    /// Where the guest's serial console output goes (default: discarded).
    pub fn console(mut self, console: Console) -> Self {
        self.console = console;
        self
    }

    /// Where the guest's serial console input comes from (default: none).
    pub fn console_input(mut self, input: ConsoleInput) -> Self {
        self.input = Some(input);
        self
    }

    /// Add a disk; disks appear in the guest in the order added
    /// (`/dev/vda`, `/dev/vdb`, ...).
    pub fn disk(mut self, disk: Disk) -> Self {
        self.disks.push(disk);
        self
    }

    /// Add a disk and boot from it: chitin appends `root=/dev/vdX` and `rw`
    /// (or `ro` for a read-only disk) to the command line. Only one disk can
    /// be the root.
    pub fn root_disk(mut self, disk: Disk) -> Self {
        if self.root_disk.is_some() {
            self.fail(SandboxError::SecondRootDisk);
        } else {
            self.root_disk = Some(self.disks.len());
        }
        self.disks.push(disk);
        self
    }

    /// Share a host directory with the guest over virtio-fs; any number
    /// of shares, each with its own tag. A share with
    /// [`Share::mount_at`] is mounted by the agent before the first
    /// command runs.
    pub fn share(mut self, share: Share) -> Self {
        self.shares.push(share);
        self
    }

    /// Make `share` the root file system of every command: each exec runs
    /// as a container process in it (see [`Command::root`]) unless the
    /// command picks its own root or
    /// [`agent_root`](Command::agent_root). The agent mounts the share at
    /// its [`Share::mount_at`] point, or at `/run/chitin/rootfs`. Only one
    /// share can be the rootfs.
    pub fn rootfs(mut self, share: Share) -> Self {
        if self.rootfs.is_some() {
            self.fail(SandboxError::InvalidShare(
                "only one share can be the rootfs".into(),
            ));
            return self;
        }
        let share = match share.mount_point() {
            Some(_) => share,
            None => share.mount_at(ROOTFS_MOUNT),
        };
        self.rootfs = share.mount_point().map(str::to_string);
        self.shares.push(share);
        self
    }

    /// Add a network interface; interfaces appear in the guest in the
    /// order added (`eth0`, `eth1`, ...). With an address set, chitin's
    /// guest agent configures it before the first command runs.
    pub fn net(mut self, net: Net) -> Self {
        self.nets.push(net);
        self
    }

    /// A DNS server for the guest's `/etc/resolv.conf` (written by chitin's
    /// guest agent); servers are listed in the order added.
    pub fn dns(mut self, server: Ipv4Addr) -> Self {
        self.dns.push(server);
        self
    }

    /// Give the guest a virtio-vsock device with context id `cid` (3 or
    /// more). Host processes reach guest listeners through the Unix socket
    /// `uds_path` (write `CONNECT <port>\n`, read `OK <n>\n`, then the
    /// stream); a guest connection to CID 2 port `P` reaches the Unix
    /// listener at `<uds_path>_<P>`. The same device carries the agent's
    /// connection when the sandbox runs the agent.
    pub fn vsock(mut self, cid: u32, uds_path: impl Into<PathBuf>) -> Self {
        self.vsock = Some(VsockSettings {
            cid,
            path: uds_path.into(),
        });
        self
    }

    /// Boot a guest image that runs chitin's agent (see [`GuestImage`]):
    /// sets the kernel and initramfs, [`GUEST_CMDLINE`] unless
    /// `.cmdline(..)` gives another line (before or after this call), and
    /// enables [`RunningSandbox::exec`] and [`RunningSandbox::spawn`].
    /// Without `.vsock(..)`, chitin adds a private vsock device for the
    /// agent.
    pub fn guest(mut self, image: GuestImage) -> Self {
        self.kernel = Some(image.kernel);
        self.initrd = Some(image.initramfs);
        self.agent = true;
        self
    }

    /// How chitin's threads are confined (default [`Seccomp::Enforce`]):
    /// every thread chitin starts for this sandbox (vCPUs, the device
    /// event loop, each share's thread, the agent connection's threads,
    /// stdin feeders, console and output writers) installs the seccomp
    /// filter of its kind on itself before it touches guest data, and a
    /// syscall outside it kills the process. The calling process and the
    /// embedder's own threads are never filtered. [`Seccomp::Log`]
    /// reports what a filter would have refused (on stderr and in
    /// [`chitin::seccomp_violations`](crate::seccomp_violations)) and lets
    /// it through, for finding out what a setup needs; [`Seccomp::Off`]
    /// filters nothing. The filters and why each syscall is allowed are
    /// in `docs/security.md`.
    ///
    /// Code of the embedder's that chitin calls runs on chitin's threads
    /// under these filters: a [`Console::writer`] and a
    /// [`Stdio::writer`](crate::Stdio) run on writer threads, which refuse
    /// only what no writer needs (new processes, namespaces, mounts,
    /// credential changes); a logger (the `log` crate) may be called on any
    /// chitin thread and must then only write to an fd it already holds.
    pub fn seccomp(mut self, mode: Seccomp) -> Self {
        self.seccomp = mode;
        self
    }

    /// Describe the machine with ACPI tables (default `true`): a MADT with
    /// the vCPUs and the IOAPIC, a DSDT with every virtio-mmio device
    /// (`LNRO0005`), COM1 and the RTC, and a hardware-reduced FADT whose
    /// sleep and reset registers chitin emulates, so that a guest's
    /// `poweroff` ends the sandbox with [`ExitReason::PowerOff`] and an
    /// ACPI reboot with [`ExitReason::Reset`]. This is what distribution
    /// kernels need: they find virtio-mmio devices only through ACPI.
    /// The MP table is written either way, for kernels booted `acpi=off`.
    ///
    /// With `false` the machine has no ACPI tables: the kernel learns its
    /// CPUs from the MP table and its devices from the
    /// `virtio_mmio.device=` entries chitin then appends to the command
    /// line (the kernel needs `VIRTIO_MMIO_CMDLINE_DEVICES`), and can stop
    /// the sandbox only by rebooting.
    pub fn acpi(mut self, enabled: bool) -> Self {
        self.acpi = enabled;
        self
    }

    /// Give the machine a PIT (i8254 timer, in KVM; default `false`).
    /// Linux built with `KVM_GUEST` (distribution kernels, chitin's guest)
    /// never uses one: kvm-clock gives it the TSC rate, the local APIC's
    /// TSC-deadline timer ticks, and it skips the IO-APIC timer check.
    /// Without a PIT, KVM keeps no timer thread per sandbox and stopping
    /// a sandbox is faster (`cargo bench --bench boot`, churn). A kernel
    /// without `KVM_GUEST` that panics with `IO-APIC + timer doesn't
    /// work!` needs `pit(true)`.
    pub fn pit(mut self, enabled: bool) -> Self {
        self.pit = enabled;
        self
    }

    /// A jail ([`chitin::jail::Jail`](crate::jail::Jail)) named `id`
    /// holding exactly what this sandbox needs, for a process that runs
    /// only this sandbox: the kernel and initrd read-only, each disk and
    /// share read-only or writable as configured, the vsock socket's
    /// directory writable (a private socket goes to the jail's own
    /// `/tmp`), `/dev/kvm`, `/dev/net/tun` for interfaces opened by name
    /// (the tap must exist, owned by the jailed uid; see
    /// docs/security.md) and handed-over tap fds kept. Add the ids and
    /// limits, enter it, then build this builder in the jailed process:
    ///
    /// ```no_run
    /// use chitin::jail::CgroupLimits;
    /// use chitin::{GuestImage, Sandbox};
    ///
    /// let builder = Sandbox::builder().guest(GuestImage::default());
    /// builder
    ///     .jail("sandbox-1")
    ///     .ids(1000, 1000)
    ///     .cgroup(CgroupLimits { memory_max: Some(512 << 20), ..Default::default() })
    ///     .enter()?;
    /// // Only the jailed process gets here.
    /// let vm = builder.build()?.start()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn jail(&self, id: impl Into<String>) -> chitin_jail::Jail {
        let mut jail = chitin_jail::Jail::new(id).device("/dev/kvm");
        for file in self.kernel.iter().chain(&self.initrd) {
            jail = jail.read_only(file);
        }
        for disk in &self.disks {
            jail = if disk.is_read_only() {
                jail.read_only(disk.path())
            } else {
                jail.writable(disk.path())
            };
        }
        for share in &self.shares {
            jail = if share.is_read_only() {
                jail.read_only(share.host_dir())
            } else {
                jail.writable(share.host_dir())
            };
        }
        if let Some(dir) = self.vsock.as_ref().and_then(|v| v.path.parent()) {
            if !dir.as_os_str().is_empty() {
                jail = jail.writable(dir);
            }
        }
        if self.nets.iter().any(|n| n.handed_over_fd().is_none()) {
            jail = jail.device("/dev/net/tun");
        }
        for fd in self.nets.iter().filter_map(Net::handed_over_fd) {
            jail = jail.keep_fd(fd);
        }
        jail
    }

    /// Validate the configuration, create the VM and load the kernel. No
    /// guest code runs until [`Sandbox::start`].
    pub fn build(mut self) -> Result<Sandbox, SandboxError> {
        if let Some(error) = self.first_error {
            return Err(error);
        }
        if let Some((dir, saved)) = self.restore.take() {
            return self.build_restored(&dir, &saved);
        }
        let mut laps = Laps::new();
        let kernel = self.kernel.ok_or(SandboxError::MissingKernel)?;
        chitin_seccomp::check(self.seccomp).map_err(SandboxError::Seccomp)?;
        // Every interface's settings before any disk, tap or VM is taken.
        let mut macs = Vec::new();
        for net in &self.nets {
            net.validate()?;
            if let Some(mac) = net.chosen_mac() {
                if macs.contains(&mac) {
                    return Err(SandboxError::InvalidNet(format!(
                        "{}: MAC {mac} is already another interface's",
                        net.label()
                    )));
                }
                macs.push(mac);
            }
        }
        if self.nets.iter().filter(|n| n.has_gateway()).count() > 1 {
            return Err(SandboxError::InvalidNet(
                "more than one interface sets a gateway; the guest has one default route".into(),
            ));
        }
        for disk in &self.disks {
            disk.config()?;
        }
        for (i, share) in self.shares.iter().enumerate() {
            share.validate()?;
            for other in &self.shares[..i] {
                if other.tag() == share.tag() {
                    return Err(SandboxError::InvalidShare(format!(
                        "tag {} is used by two shares",
                        share.tag()
                    )));
                }
                if share.mount_point().is_some() && other.mount_point() == share.mount_point() {
                    return Err(SandboxError::InvalidShare(format!(
                        "{} and {} are both mounted at {}",
                        other.tag(),
                        share.tag(),
                        share.mount_point().unwrap_or_default()
                    )));
                }
            }
        }
        // An overflowing size saturates and is reported as too large.
        let memory_bytes = self.memory_mib.saturating_mul(1 << 20);
        laps.lap("checks");
        let ram = GuestRam::new(memory_bytes, self.backing)
            .map_err(|e| SandboxError::InvalidMemory(self.memory_mib, e))?;
        laps.lap("memory");
        let vm = Vm::new(&ram, self.pit).map_err(SandboxError::Kvm)?;
        laps.lap("vm");
        let control = Arc::new(VmControl::new());
        let mut events =
            EventLoop::new().map_err(|e| device_err("event loop", "epoll and stop event", e))?;
        let (mut buses, legacy) = legacy_devices(
            &vm,
            &control,
            self.console,
            self.input,
            &mut events,
            self.seccomp,
            self.acpi,
            None,
        )?;
        let base = match (&self.cmdline, self.agent) {
            (Some(line), _) => line.clone(),
            (None, true) => GUEST_CMDLINE.to_string(),
            (None, false) => DEFAULT_CMDLINE.to_string(),
        };
        let mut vmm_entries: Vec<String> =
            VMM_CMDLINE_ENTRIES.iter().map(|e| e.to_string()).collect();
        if self.agent {
            let key = |e: &&str| e.split_once('=').is_some_and(|(k, _)| k == AGENT_KEY);
            match base.split_whitespace().find(key) {
                Some(AGENT_ENTRY) => {}
                Some(other) => {
                    return Err(SandboxError::CmdlineConflict {
                        found: other.to_string(),
                        needed: AGENT_ENTRY,
                    })
                }
                None => vmm_entries.push(AGENT_ENTRY.to_string()),
            }
        }
        let mut attach = Attacher::new(&vm, &ram, &mut buses, &mut events);
        for (index, disk) in self.disks.iter().enumerate() {
            attach.disk(index, disk)?;
        }
        let mut nets = Vec::with_capacity(self.nets.len());
        for (index, net) in self.nets.iter().enumerate() {
            let device = net.device()?;
            attach.faults.add(format!("eth{index}"), device.faults());
            nets.push(device.counters());
            vmm_entries.extend(net.cmdline_entry(device.mac()));
            attach.add(
                device,
                DeviceRecord::Unsupported("a network interface (its tap's link lives on the host)"),
            )?;
        }
        vmm_entries.extend(dns_entry(&self.dns));
        for share in &self.shares {
            let device =
                Fs::new(share.config(self.seccomp)).map_err(|source| SandboxError::Share {
                    tag: share.tag().to_string(),
                    path: share.host_dir().to_path_buf(),
                    source,
                })?;
            attach
                .faults
                .add(format!("fs {}", share.tag()), device.faults());
            vmm_entries.extend(share.cmdline_entry());
            attach.add(
                device,
                DeviceRecord::Unsupported("a shared folder (its open files live on the host)"),
            )?;
        }
        let vsock = match (self.vsock, self.agent) {
            (Some(v), _) => Some(v),
            (None, true) => Some(VsockSettings::private()),
            (None, false) => None,
        };
        let socket_file = match &vsock {
            Some(v) => attach.vsock(v, self.agent)?,
            None => None,
        };
        let Attacher {
            devices: virtio,
            faults,
            ..
        } = attach;
        let mmio_devices: Vec<_> = virtio.iter().map(|d| d.mmio).collect();
        laps.lap("devices");
        // With ACPI the DSDT describes every device; without, the kernel
        // needs one command-line entry per device.
        let acpi_rsdp = if self.acpi {
            let config = chitin_acpi::AcpiConfig {
                vcpus: self.vcpus,
                virtio: &mmio_devices,
            };
            Some(chitin_acpi::setup_acpi(ram.memory(), &config).map_err(SandboxError::Acpi)?)
        } else {
            vmm_entries.extend(mmio_devices.iter().map(mmio_cmdline_entry));
            None
        };
        if let Some(root) = self.root_disk {
            let mode = if self.disks[root].is_read_only() {
                "ro"
            } else {
                "rw"
            };
            vmm_entries.push(format!("root=/dev/{}", device_name(root)));
            vmm_entries.push(mode.to_string());
        }
        let entries: Vec<&str> = vmm_entries.iter().map(String::as_str).collect();
        let cmdline = chitin_boot::build_cmdline(&base, &entries, CMDLINE_MAX_SIZE)
            .map_err(SandboxError::Cmdline)?;
        laps.lap("tables");
        let boot = chitin_boot::load_kernel(
            &ram,
            &BootParams {
                kernel: &kernel,
                initrd: self.initrd.as_deref(),
                cmdline: &cmdline,
                protocol: self.protocol,
                acpi_rsdp,
            },
        )
        .map_err(SandboxError::Boot)?;
        chitin_boot::setup_mptable(ram.memory(), self.vcpus).map_err(SandboxError::Boot)?;
        laps.lap("kernel");

        let mut vcpus = Vec::with_capacity(usize::from(self.vcpus));
        for id in 0..self.vcpus {
            vcpus.push(Vcpu::new(&vm, id, self.vcpus).map_err(SandboxError::Vcpu)?);
        }
        vcpus[0]
            .configure_boot(ram.memory(), &boot)
            .map_err(SandboxError::Vcpu)?;
        laps.lap("vcpus");
        laps.log("build()");

        Ok(Sandbox {
            vcpus,
            buses: Arc::new(buses),
            control,
            events,
            vm,
            boot,
            ram,
            agent_socket: vsock.filter(|_| self.agent).map(|v| v.path),
            rootfs: self.rootfs.map(Into::into),
            faults,
            nets,
            seccomp: self.seccomp,
            socket_file,
            legacy,
            virtio,
            machine: Machine {
                acpi: self.acpi,
                pit: self.pit,
            },
        })
    }

    /// `build()` for a sandbox continuing from a snapshot: the machine
    /// the snapshot describes, RAM mapped copy-on-write from its memory
    /// file, every vCPU's, the VM's and the devices' state put back; no
    /// kernel is loaded and nothing is written to guest memory.
    fn build_restored(self, dir: &Path, saved: &Saved) -> Result<Sandbox, SandboxError> {
        let snapshot_err = SandboxError::Snapshot;
        let mismatch = |what, snapshot: u64, asked: u64| {
            Err(snapshot_err(SnapshotError::Mismatch {
                what,
                snapshot,
                asked,
            }))
        };
        if self.vcpus != saved.vcpus {
            return mismatch("vCPUs", saved.vcpus.into(), self.vcpus.into());
        }
        let memory_bytes = self.memory_mib.saturating_mul(1 << 20);
        if memory_bytes != saved.memory_bytes {
            return mismatch("bytes of memory", saved.memory_bytes, memory_bytes);
        }
        if self.acpi != saved.acpi {
            return mismatch("ACPI (1: on)", saved.acpi.into(), self.acpi.into());
        }
        if self.pit != saved.pit {
            return mismatch("a PIT (1: yes)", saved.pit.into(), self.pit.into());
        }
        if self.kernel.is_some() || self.initrd.is_some() || self.cmdline.is_some() {
            return Err(snapshot_err(SnapshotError::Unsupported(
                "a kernel, initrd or command line: a restored guest continues, it does not boot",
            )));
        }
        if !self.nets.is_empty() || !self.shares.is_empty() || self.rootfs.is_some() {
            return Err(snapshot_err(SnapshotError::Unsupported(
                "network interfaces or shared folders",
            )));
        }
        if self.agent {
            return Err(snapshot_err(SnapshotError::Unsupported(
                "a guest image: a restored guest runs the snapshot's",
            )));
        }
        let (disks, vsock) = self.restored_devices(saved)?;
        chitin_seccomp::check(self.seccomp).map_err(SandboxError::Seccomp)?;
        let path = dir.join(&saved.memory_file);
        let file = File::open(&path).map_err(|source| {
            snapshot_err(SnapshotError::Io {
                path: path.clone(),
                source,
            })
        })?;
        let ram = GuestRam::from_snapshot(&file, saved.memory_bytes)
            .map_err(|e| SandboxError::InvalidMemory(self.memory_mib, e))?;
        let vm = Vm::new(&ram, self.pit).map_err(SandboxError::Kvm)?;
        // The vCPUs first (each with the CPUID the snapshot's host gave
        // it, or none), then the interrupt controllers that deliver to
        // them, then the devices, which may raise a line as they come.
        let mut vcpus = Vec::with_capacity(usize::from(self.vcpus));
        for (id, state) in (0..self.vcpus).zip(&saved.vcpu_states) {
            if Vcpu::cpuid_for(&vm, id, self.vcpus).as_slice() != state.cpuid.as_slice() {
                return Err(snapshot_err(SnapshotError::CpuMismatch { vcpu: id }));
            }
            let mut vcpu = Vcpu::new(&vm, id, self.vcpus).map_err(SandboxError::Vcpu)?;
            vcpu.restore(state, &vm).map_err(SandboxError::Vcpu)?;
            vcpus.push(vcpu);
        }
        saved.vm.restore(vm.fd()).map_err(|e| {
            snapshot_err(SnapshotError::Save {
                what: "VM (restoring)".into(),
                source: Box::new(e),
            })
        })?;
        let control = Arc::new(VmControl::new());
        let mut events =
            EventLoop::new().map_err(|e| device_err("event loop", "epoll and stop event", e))?;
        let (mut buses, legacy) = legacy_devices(
            &vm,
            &control,
            self.console,
            self.input,
            &mut events,
            self.seccomp,
            self.acpi,
            Some(&saved.legacy),
        )?;
        // The devices in the snapshot's window order (disks, then vsock),
        // each checked against what the guest knows of it, then its
        // transport put back: a running device starts again where it was.
        let mut attach = Attacher::new(&vm, &ram, &mut buses, &mut events);
        for (index, disk) in disks.iter().enumerate() {
            attach.disk(index, disk)?;
        }
        let agent = vsock.as_ref().is_some_and(|(_, agent)| *agent);
        let socket_file = match &vsock {
            Some((v, agent)) => attach.vsock(v, *agent)?,
            None => None,
        };
        let Attacher {
            devices: virtio,
            faults,
            ..
        } = attach;
        // The records are in window order; a kind out of place is caught
        // per device below, a count that differs here.
        if virtio.len() != saved.devices.len() {
            return Err(snapshot_err(SnapshotError::Corrupt(format!(
                "{} virtio devices recorded, {} of them disks or vsock",
                saved.devices.len(),
                virtio.len()
            ))));
        }
        for (index, (device, saved)) in virtio.iter().zip(&saved.devices).enumerate() {
            check_restored_device(index, device, saved)?;
            device
                .transport
                .restore(&saved.transport)
                .map_err(|source| {
                    snapshot_err(SnapshotError::Device {
                        device: device_label(&device.record, index),
                        source,
                    })
                })?;
        }
        Ok(Sandbox {
            vcpus,
            buses: Arc::new(buses),
            control,
            events,
            vm,
            boot: saved.boot.clone(),
            ram,
            agent_socket: vsock.filter(|_| agent).map(|(v, _)| v.path),
            rootfs: None,
            faults,
            nets: Vec::new(),
            seccomp: self.seccomp,
            socket_file,
            legacy,
            virtio,
            machine: Machine {
                acpi: self.acpi,
                pit: self.pit,
            },
        })
    }

    /// The disks and vsock device a restore attaches: the caller's disks
    /// (which must be what the guest knows: as many, each as large, as
    /// writable and with the same serial; never the paths the state file
    /// names, which the caller may not trust), and the vsock device with
    /// its CID: a device that served the agent gets a fresh socket path
    /// unless the caller names one; another needs the caller's.
    #[allow(clippy::type_complexity)]
    fn restored_devices(
        &self,
        saved: &Saved,
    ) -> Result<(Vec<Disk>, Option<(VsockSettings, bool)>), SandboxError> {
        let snapshot_err = SandboxError::Snapshot;
        let saved_disks = saved.disks();
        let saved_vsock = saved.vsock().map_err(snapshot_err)?;
        if self.disks.len() != saved_disks.len() {
            if self.disks.is_empty() {
                return Err(snapshot_err(SnapshotError::DisksNeeded(saved_disks.len())));
            }
            return Err(snapshot_err(SnapshotError::Mismatch {
                what: "disks",
                snapshot: saved_disks.len() as u64,
                asked: self.disks.len() as u64,
            }));
        }
        // The serial the guest read stays: a disk without one takes the
        // snapshot's, a disk with another is refused.
        let mut disks = Vec::with_capacity(self.disks.len());
        for (disk, saved) in self.disks.iter().zip(&saved_disks) {
            match (disk.serial(), saved.serial()) {
                (None, Some(id)) => disks.push(disk.clone().id(id)),
                (mine, theirs) if mine == theirs => disks.push(disk.clone()),
                _ => {
                    return Err(snapshot_err(SnapshotError::Unsupported(
                        "a disk serial (id) other than the one the guest read",
                    )))
                }
            }
        }
        let vsock = match (saved_vsock, &self.vsock) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(snapshot_err(SnapshotError::Mismatch {
                    what: "vsock devices",
                    snapshot: 0,
                    asked: 1,
                }))
            }
            (Some((cid, _)), Some(v)) if v.cid != cid => {
                return Err(snapshot_err(SnapshotError::Mismatch {
                    what: "vsock CID",
                    snapshot: cid.into(),
                    asked: v.cid.into(),
                }))
            }
            (Some((_, agent)), Some(v)) => Some((v.clone(), agent)),
            (Some((cid, true)), None) => Some((
                VsockSettings {
                    cid,
                    ..VsockSettings::private()
                },
                true,
            )),
            (Some((_, false)), None) => {
                return Err(snapshot_err(SnapshotError::VsockPathNeeded));
            }
        };
        Ok((disks, vsock))
    }
}

/// A device's name in errors: `vda`, `vsock`.
fn device_label(record: &DeviceRecord, index: usize) -> String {
    match record {
        DeviceRecord::Disk { .. } => device_name(index),
        DeviceRecord::Vsock { .. } => "vsock".into(),
        DeviceRecord::Unsupported(what) => (*what).into(),
    }
}

/// Whether the device attached for a restore is the one the guest knows:
/// the same window and line, the same kind, a disk as large and as
/// writable, the same CID.
fn check_restored_device(
    index: usize,
    device: &VirtioAttached,
    saved: &SavedDevice,
) -> Result<(), SandboxError> {
    let mismatch = |what, snapshot: u64, asked: u64| {
        Err(SandboxError::Snapshot(SnapshotError::Mismatch {
            what,
            snapshot,
            asked,
        }))
    };
    if device.mmio.base != saved.base || device.mmio.gsi != saved.gsi {
        return Err(SandboxError::Snapshot(SnapshotError::Corrupt(format!(
            "virtio device {index} at {:#x} (line {}), where it can only be at {:#x} (line {})",
            saved.base, saved.gsi, device.mmio.base, device.mmio.gsi
        ))));
    }
    match (&saved.record, &device.record) {
        (
            DeviceRecord::Disk {
                read_only: was_ro,
                sectors: was,
                ..
            },
            DeviceRecord::Disk {
                read_only, sectors, ..
            },
        ) => {
            if was_ro != read_only {
                return mismatch(
                    "a read-only disk (1: yes)",
                    (*was_ro).into(),
                    (*read_only).into(),
                );
            }
            if was != sectors {
                return mismatch("a disk of 512-byte sectors", *was, *sectors);
            }
            Ok(())
        }
        (DeviceRecord::Vsock { cid: was, .. }, DeviceRecord::Vsock { cid, .. }) => {
            if was != cid {
                return mismatch("vsock CID", (*was).into(), (*cid).into());
            }
            Ok(())
        }
        _ => Err(SandboxError::Snapshot(SnapshotError::Corrupt(format!(
            "virtio device {index} is not the kind the snapshot saved"
        )))),
    }
}

/// The phases of `build()` or `start()`, timed for one debug line under
/// target `chitin::timing` (`build() 1.2 ms: checks 0.1 ms, ...`): where a
/// sandbox's set-up time goes, for whoever logs at debug level.
struct Laps {
    last: Instant,
    laps: Vec<(&'static str, Duration)>,
}

impl Laps {
    fn new() -> Self {
        Self {
            last: Instant::now(),
            laps: Vec::new(),
        }
    }

    /// The phase `name` ended now.
    fn lap(&mut self, name: &'static str) {
        let now = Instant::now();
        self.laps.push((name, now - self.last));
        self.last = now;
    }

    fn log(&self, what: &str) {
        if !log::log_enabled!(target: "chitin::timing", log::Level::Debug) {
            return;
        }
        let total: Duration = self.laps.iter().map(|(_, d)| *d).sum();
        let phases: Vec<String> = self
            .laps
            .iter()
            .map(|(name, d)| format!("{name} {:.1} ms", d.as_secs_f64() * 1e3))
            .collect();
        log::debug!(
            target: "chitin::timing",
            "{what} {:.1} ms: {}",
            total.as_secs_f64() * 1e3,
            phases.join(", ")
        );
    }
}

/// A vsock device's settings.
#[derive(Debug, Clone)]
pub(crate) struct VsockSettings {
    pub(crate) cid: u32,
    pub(crate) path: PathBuf,
}

impl VsockSettings {
    /// A fresh socket path for a sandbox-private vsock device.
    fn private() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("chitin-{}-{n}.vsock", std::process::id());
        Self {
            cid: DEFAULT_GUEST_CID,
            path: std::env::temp_dir().join(name),
        }
    }
}

impl Sandbox {
    /// Start configuring a sandbox.
    pub fn builder() -> SandboxBuilder {
        SandboxBuilder::default()
    }

    /// Where the kernel was loaded and how it will be entered.
    pub fn boot_info(&self) -> &BootInfo {
        &self.boot
    }

    /// Start the vCPU and device threads; the guest runs from here on.
    pub fn start(self) -> Result<RunningSandbox, SandboxError> {
        let Sandbox {
            vcpus,
            buses,
            control,
            events,
            vm,
            boot,
            ram,
            agent_socket,
            rootfs,
            faults,
            nets,
            seccomp,
            socket_file,
            legacy,
            virtio,
            machine,
        } = self;
        let mut laps = Laps::new();
        // Every thread is started before any is waited for, so their
        // filters are installed in parallel and the boot vCPU enters the
        // guest as soon as its own is.
        let events = events
            .start(seccomp)
            .map_err(|e| device_err("event loop", "thread", e))?;
        let running = RunningSandbox {
            life: Arc::new(Life {
                threads: Mutex::new(Vec::with_capacity(vcpus.len())),
                events: Mutex::new(events),
                agent: agent_socket.map(|socket| AgentLink::new(socket, rootfs, &control, seccomp)),
                control,
                vcpus: vcpus.len(),
                paused: Mutex::new(false),
            }),
            vm,
            ram,
            faults,
            nets,
            _socket_file: socket_file,
            legacy,
            virtio,
            machine,
            boot,
        };
        let mut starting = Vec::with_capacity(vcpus.len());
        let mut failed = None;
        for vcpu in vcpus {
            let id = vcpu.id();
            match vcpu.start(
                Arc::clone(&buses),
                Arc::clone(&running.life.control),
                seccomp,
            ) {
                Ok(thread) => starting.push((id, thread)),
                Err(e) => {
                    failed = Some(SandboxError::Vcpu(e));
                    break;
                }
            }
        }
        // Every started thread is confirmed (or has ended) before this
        // returns, so dropping `running` on an error joins them all.
        for (id, thread) in starting {
            match thread.confirm() {
                Ok(thread) => relock(&running.life.threads).push(thread),
                Err(source) => {
                    failed.get_or_insert(SandboxError::Vcpu(chitin_vcpu::VcpuError::Spawn {
                        id,
                        source,
                    }));
                }
            }
        }
        if let Err(e) = relock(&running.life.events).confirm() {
            failed.get_or_insert(device_err("event loop", "thread", e));
        }
        laps.lap("threads confirmed");
        laps.log("start()");
        match failed {
            // Dropping `running` stops and joins what already runs.
            Some(e) => Err(e),
            None => Ok(running),
        }
    }
}

/// What a running sandbox and its handles share: how to stop it and the
/// threads to join. Guest memory and the VM are not here: they belong to
/// the [`RunningSandbox`] alone, which joins every thread before they go.
struct Life {
    control: Arc<VmControl>,
    /// The way to the agent, when the sandbox runs one.
    agent: Option<AgentLink>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    events: Mutex<RunningEventLoop>,
    /// vCPUs of the VM (how many a pause waits for).
    vcpus: usize,
    /// Whether the sandbox is paused; held across pausing and resuming,
    /// so they happen one at a time.
    paused: Mutex<bool>,
}

/// How long a snapshot waits for a parked vCPU to read its own state.
const SNAPSHOT_VCPU_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a pause waits for the vCPUs, then for the device thread, to
/// come to rest: neither waits on the guest (a kick takes a vCPU out of
/// the guest at once; device handlers do bounded work), so this only
/// bounds a host too busy to schedule them.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

impl Life {
    /// Stop the guest (if it still runs) and join its threads; whoever
    /// comes second waits for the first to finish. Idempotent.
    fn teardown(&self) {
        // Every vCPU leaves the guest (the exit also shuts the agent
        // connection down, ending what waits on it), then the agent link
        // lets go of its client, then the threads are joined.
        self.control.request_exit(ExitReason::Stopped);
        if let Some(agent) = &self.agent {
            agent.close();
        }
        let mut threads = relock(&self.threads);
        for thread in threads.drain(..) {
            let _ = thread.join();
        }
        relock(&self.events).stop();
    }

    fn wait(&self) -> ExitReason {
        let reason = self.control.wait();
        self.teardown();
        reason
    }

    fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        let reason = self.control.wait_timeout(timeout)?;
        self.teardown();
        Some(reason)
    }

    fn stop(&self) -> ExitReason {
        self.control.request_exit(ExitReason::Stopped);
        self.teardown();
        self.control.exit_reason().unwrap_or(ExitReason::Stopped)
    }

    fn pause(&self) -> Result<(), PauseError> {
        let mut paused = relock(&self.paused);
        let stopped = |control: &VmControl| {
            PauseError::GuestStopped(control.exit_reason().unwrap_or(ExitReason::Stopped))
        };
        if let Some(reason) = self.control.exit_reason() {
            return Err(PauseError::GuestStopped(reason));
        }
        if *paused {
            return Ok(());
        }
        // vCPUs first, so the guest makes no new device work, then the
        // device thread, which finishes what it is handling.
        self.control
            .pause(self.vcpus, PAUSE_TIMEOUT)
            .map_err(|e| match e {
                ParkError::Timeout {
                    parked,
                    vcpus,
                    waited,
                } => PauseError::VcpusBusy {
                    parked,
                    vcpus,
                    waited,
                },
                _ => stopped(&self.control),
            })?;
        if let Err(e) = relock(&self.events).pause(PAUSE_TIMEOUT) {
            self.control.resume();
            if self.control.should_stop() {
                return Err(stopped(&self.control));
            }
            log::warn!("pause: {e}");
            return Err(PauseError::DevicesBusy(PAUSE_TIMEOUT));
        }
        *paused = true;
        Ok(())
    }

    fn resume(&self) {
        let mut paused = relock(&self.paused);
        if *paused {
            relock(&self.events).resume();
            self.control.resume();
            *paused = false;
        }
    }

    fn is_paused(&self) -> bool {
        *relock(&self.paused) && !self.control.should_stop()
    }

    fn agent(&self) -> Result<&AgentLink, ExecError> {
        self.agent.as_ref().ok_or(ExecError::NoAgent)
    }

    fn output(&self, cmd: &Command) -> Result<Output, ExecError> {
        self.agent()?.output(cmd)
    }

    fn status(&self, cmd: &Command) -> Result<ExitStatus, ExecError> {
        self.agent()?.status(cmd)
    }

    fn spawn(&self, cmd: &Command) -> Result<Child, ExecError> {
        self.agent()?.spawn(cmd)
    }
}

/// A started sandbox. Dropping it stops the guest and joins every thread.
///
/// Commands ([`output`](RunningSandbox::output),
/// [`spawn`](RunningSandbox::spawn)) may run from many threads at once
/// through `&RunningSandbox`; [`RunningSandbox::handle`] gives a cheap
/// handle that waits for or stops the guest from any thread.
pub struct RunningSandbox {
    // Field order is drop order: threads are joined (in Drop) before the VM
    // and guest RAM go away.
    life: Arc<Life>,
    #[allow(dead_code)] // kept alive for the vCPUs' sake
    vm: Vm,
    ram: GuestRam,
    faults: FaultTables,
    nets: Vec<Arc<NetCounters>>,
    /// Removed after every thread is joined (in Drop, before the fields).
    _socket_file: Option<SocketFile>,
    legacy: Legacy,
    virtio: Vec<VirtioAttached>,
    machine: Machine,
    boot: BootInfo,
}

impl fmt::Debug for RunningSandbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunningSandbox")
            .field("exit_reason", &self.exit_reason())
            .field("agent", &self.life.agent.is_some())
            .finish_non_exhaustive()
    }
}

/// Waits for, stops, or runs commands in a running sandbox from any thread:
/// cheap to clone, `Send + Sync`, and safe to keep after the sandbox is
/// gone (it then reports the sandbox's exit reason; `stop` and `wait`
/// return it at once, commands fail with [`ExecError::GuestStopped`]).
///
/// ```no_run
/// # use chitin::{ExitReason, GuestImage, Sandbox};
/// let vm = Sandbox::builder().guest(GuestImage::default()).build()?.start()?;
/// let handle = vm.handle();
/// let supervisor = std::thread::spawn(move || handle.wait());
/// // ... commands on `vm` from other threads ...
/// vm.handle().stop();
/// assert_eq!(supervisor.join().unwrap(), ExitReason::Stopped);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct SandboxHandle {
    life: Arc<Life>,
}

impl fmt::Debug for SandboxHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxHandle")
            .field("exit_reason", &self.exit_reason())
            .finish_non_exhaustive()
    }
}

impl SandboxHandle {
    /// Stop the guest, even one spinning in guest code, and return once
    /// its vCPU and device threads have ended: [`ExitReason::Stopped`], or
    /// the guest's own reason if it had already stopped. Pending commands
    /// end with [`ExecError::GuestStopped`].
    pub fn stop(&self) -> ExitReason {
        self.life.stop()
    }

    /// Block until the guest stops and its threads have ended; why it
    /// stopped. Any number of threads may wait at once.
    pub fn wait(&self) -> ExitReason {
        self.life.wait()
    }

    /// Like [`SandboxHandle::wait`], but give up after `timeout` and return
    /// `None` with the guest still running.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        self.life.wait_timeout(timeout)
    }

    /// Why the guest stopped, or `None` while it runs (without blocking).
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.life.control.exit_reason()
    }

    /// Whether the guest still runs (paused or not).
    pub fn is_running(&self) -> bool {
        self.exit_reason().is_none()
    }

    /// Pause the guest: every vCPU leaves the guest and waits, and the
    /// device thread finishes what it is handling and waits, until
    /// [`SandboxHandle::resume`]; the guest then continues exactly where
    /// it was (its clocks see the pause as time that passed). A paused
    /// sandbox can still be stopped or dropped; commands sent to it wait
    /// (within their timeouts) for the resume. Pausing a paused sandbox
    /// does nothing. On an error the sandbox runs on.
    pub fn pause(&self) -> Result<(), PauseError> {
        self.life.pause()
    }

    /// End a pause (nothing happens without one).
    pub fn resume(&self) {
        self.life.resume()
    }

    /// Whether the sandbox is paused (and not stopped).
    pub fn is_paused(&self) -> bool {
        self.life.is_paused()
    }

    /// [`RunningSandbox::output`], from wherever the handle is.
    pub fn output(&self, cmd: &Command) -> Result<Output, ExecError> {
        self.life.output(cmd)
    }

    /// [`RunningSandbox::status`], from wherever the handle is.
    pub fn status(&self, cmd: &Command) -> Result<ExitStatus, ExecError> {
        self.life.status(cmd)
    }

    /// [`RunningSandbox::spawn`], from wherever the handle is.
    pub fn spawn(&self, cmd: &Command) -> Result<Child, ExecError> {
        self.life.spawn(cmd)
    }

    /// A handle on an agent link alone, with no VM behind it: for tests of
    /// what runs on top of the link.
    #[cfg(all(test, feature = "tokio"))]
    pub(crate) fn detached(agent: AgentLink, control: Arc<VmControl>) -> Self {
        let mut events = EventLoop::new()
            .and_then(|events| events.start(Seccomp::Enforce))
            .expect("an empty event loop");
        events.confirm().expect("a confined event loop");
        SandboxHandle {
            life: Arc::new(Life {
                control,
                agent: Some(agent),
                threads: Mutex::new(Vec::new()),
                events: Mutex::new(events),
                vcpus: 0,
                paused: Mutex::new(false),
            }),
        }
    }
}

impl RunningSandbox {
    /// A handle that waits for or stops this sandbox from any thread.
    pub fn handle(&self) -> SandboxHandle {
        SandboxHandle {
            life: Arc::clone(&self.life),
        }
    }

    /// Block until the guest stops, tear down its threads and return why it
    /// stopped.
    pub fn wait(&self) -> ExitReason {
        self.life.wait()
    }

    /// Like [`RunningSandbox::wait`], but give up after `timeout` and return
    /// `None` with the guest still running.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        self.life.wait_timeout(timeout)
    }

    /// What the guest sent that each of its virtio devices refused or
    /// dropped, by reason: malformed descriptor chains, packets for
    /// connections that do not exist, requests beyond a disk's end. One
    /// entry per device, also when it saw no fault. Each fault is also
    /// logged through the `log` crate (target `chitin::guest`, a few lines
    /// a minute per device at most).
    ///
    /// ```no_run
    /// # use chitin::{GuestImage, Sandbox};
    /// let vm = Sandbox::builder().guest(GuestImage::default()).build()?.start()?;
    /// for device in vm.device_faults() {
    ///     for (reason, count) in &device.reasons {
    ///         eprintln!("{}: {reason}: {count}", device.device);
    ///     }
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn device_faults(&self) -> Vec<DeviceFaults> {
        self.faults.snapshot()
    }

    /// Frames and bytes each way and drops by cause, one entry per
    /// network interface in `.net(..)` order (`eth0` first).
    pub fn net_stats(&self) -> Vec<NetStats> {
        self.nets.iter().map(|n| n.snapshot()).collect()
    }

    /// Bytes of guest RAM resident on the host: what the guest has touched.
    /// For a sandbox restored from a snapshot this includes the snapshot
    /// file's pages it reads, shared with its clones and the page cache;
    /// [`RunningSandbox::guest_memory_private`] leaves those out.
    pub fn guest_memory_resident(&self) -> std::io::Result<u64> {
        self.ram.resident_bytes()
    }

    /// Bytes of guest RAM this sandbox alone holds: what the guest has
    /// touched, or, restored from a snapshot, the pages it has written
    /// (its copies of the snapshot's).
    pub fn guest_memory_private(&self) -> std::io::Result<u64> {
        self.ram.private_bytes()
    }

    /// Run `cmd` in the guest and collect its status and piped output,
    /// like `std::process::Command::output`. Waits for the agent while
    /// the guest boots: up to the command's timeout, or 60 s without one.
    /// A command that outruns its timeout or output limit is killed.
    pub fn output(&self, cmd: &Command) -> Result<Output, ExecError> {
        self.life.output(cmd)
    }

    /// [`RunningSandbox::output`] under the name runtimes use for it
    /// (`docker exec`, `kubectl exec`).
    pub fn exec(&self, cmd: &Command) -> Result<Output, ExecError> {
        self.life.output(cmd)
    }

    /// Run `cmd` in the guest and return how it ended, like
    /// `std::process::Command::status`: outputs left [`Stdio::piped`](crate::Stdio::piped) are
    /// thrown away (others go where the command says).
    pub fn status(&self, cmd: &Command) -> Result<ExitStatus, ExecError> {
        self.life.status(cmd)
    }

    /// Start `cmd` in the guest and return it running, with its piped
    /// streams, `wait()`, `try_wait()`, `kill()` and `signal()`, like
    /// `std::process::Command::spawn`.
    pub fn spawn(&self, cmd: &Command) -> Result<Child, ExecError> {
        self.life.spawn(cmd)
    }

    /// Why the guest stopped, or `None` while it runs (without blocking).
    pub fn exit_reason(&self) -> Option<ExitReason> {
        self.life.control.exit_reason()
    }

    /// Pause the guest until [`RunningSandbox::resume`]; see
    /// [`SandboxHandle::pause`].
    pub fn pause(&self) -> Result<(), PauseError> {
        self.life.pause()
    }

    /// End a pause (nothing happens without one).
    pub fn resume(&self) {
        self.life.resume()
    }

    /// Whether the sandbox is paused (and not stopped).
    pub fn is_paused(&self) -> bool {
        self.life.is_paused()
    }

    /// Save the paused sandbox to `dir` (created if missing; a snapshot
    /// already there is replaced): guest RAM to `memory` (sparse), every
    /// vCPU's, the VM's and the devices' state to `state`. The sandbox
    /// stays paused; resume it, or stop it, afterwards. Restore with
    /// [`Snapshot::open`](crate::Snapshot::open). Disks, the vsock device
    /// and the agent are carried (vsock connections are not: a restored
    /// guest is told they were reset); network interfaces and shared
    /// folders are not, and a sandbox with one is refused.
    pub fn snapshot(&self, dir: impl AsRef<Path>) -> Result<SnapshotInfo, SnapshotError> {
        let dir = dir.as_ref();
        // Held throughout, so no resume can start the guest meanwhile.
        let paused = relock(&self.life.paused);
        if let Some(reason) = self.life.control.exit_reason() {
            return Err(SnapshotError::GuestStopped(reason));
        }
        if !*paused {
            return Err(SnapshotError::NotPaused);
        }
        let mut devices = Vec::with_capacity(self.virtio.len());
        for (index, device) in self.virtio.iter().enumerate() {
            if let DeviceRecord::Unsupported(what) = device.record {
                return Err(SnapshotError::Unsupported(what));
            }
            let transport = device.transport.snapshot().map_err(|e| match e {
                TransportSnapshotError::Refused(why) => SnapshotError::Unsupported(why),
                e => SnapshotError::Save {
                    what: device_label(&device.record, index),
                    source: Box::new(e),
                },
            })?;
            devices.push(SavedDevice {
                record: device.record.clone(),
                base: device.mmio.base,
                gsi: device.mmio.gsi,
                transport,
            });
        }
        let mut vcpu_states = Vec::with_capacity(self.life.vcpus);
        let count = self.life.vcpus as u8;
        for id in 0..count {
            let msrs = self.vm.saved_msrs().to_vec();
            let xsave_size = self.vm.xsave_size();
            let cpuid = Vcpu::cpuid_for(&self.vm, id, count).as_slice().to_vec();
            let state = self
                .life
                .control
                .on_parked_vcpu(id, SNAPSHOT_VCPU_TIMEOUT, move |fd| {
                    VcpuState::save(fd, &msrs, xsave_size, cpuid)
                });
            let save_err = |source: Box<dyn std::error::Error + Send + Sync>| SnapshotError::Save {
                what: format!("vCPU {id}"),
                source,
            };
            match state {
                Ok(Ok(state)) => vcpu_states.push(state),
                Ok(Err(e)) => return Err(save_err(Box::new(e))),
                Err(e) => return Err(save_err(Box::new(e))),
            }
        }
        let vm =
            VmState::save(self.vm.fd(), self.vm.has_pit()).map_err(|e| SnapshotError::Save {
                what: "VM".into(),
                source: Box::new(e),
            })?;
        let saved = Saved {
            memory_file: new_memory_file_name(),
            vcpus: count,
            memory_bytes: self.ram.layout().ram_size(),
            acpi: self.machine.acpi,
            pit: self.machine.pit,
            boot: self.boot.clone(),
            vm,
            vcpu_states,
            legacy: self.legacy.state(),
            devices,
        };
        // SAFETY: the sandbox is paused (every vCPU and the event loop
        // parked, and the devices it carries, disks and vsock, work on
        // the event loop only; a share's worker would not, but a sandbox
        // with a share was refused above): nothing writes guest RAM until
        // `paused` is released.
        let (state_bytes, memory_written) = unsafe { write_snapshot(dir, &saved, &self.ram) }?;
        drop(paused);
        Ok(SnapshotInfo {
            state_bytes,
            memory_bytes: saved.memory_bytes,
            memory_written,
        })
    }

    /// Stop the guest, even one spinning in guest code, and return why it
    /// stopped: [`ExitReason::Stopped`], or the guest's own reason if it had
    /// already stopped.
    pub fn stop(self) -> ExitReason {
        self.life.stop()
    }
}

impl Drop for RunningSandbox {
    fn drop(&mut self) {
        self.life.teardown();
    }
}

impl fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sandbox")
            .field("vcpus", &self.vcpus.len())
            .field("boot", &self.boot)
            .field("agent", &self.agent_socket.is_some())
            .finish_non_exhaustive()
    }
}

// What a runtime author relies on: the running sandbox is shared by
// reference across threads, and its handle is sent anywhere.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<RunningSandbox>();
    assert_send_sync::<SandboxHandle>();
    assert_send_sync::<Sandbox>();
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_without_kernel_is_missing_kernel() {
        let err = Sandbox::builder().build().err().unwrap();
        assert!(matches!(err, SandboxError::MissingKernel));
    }

    #[test]
    fn vcpus_zero_is_reported_by_build() {
        let err = Sandbox::builder()
            .kernel("k")
            .vcpus(0)
            .build()
            .err()
            .unwrap();
        assert!(matches!(err, SandboxError::InvalidVcpus(0)));
    }

    #[test]
    fn vcpus_above_max_is_reported_by_build() {
        let err = Sandbox::builder()
            .kernel("k")
            .vcpus(255)
            .build()
            .err()
            .unwrap();
        assert!(matches!(err, SandboxError::InvalidVcpus(255)));
    }

    #[test]
    fn first_error_wins_over_later_ones() {
        let err = Sandbox::builder()
            .vcpus(0)
            .vcpus(1000)
            .build()
            .err()
            .unwrap();
        assert!(matches!(err, SandboxError::InvalidVcpus(0)));
    }

    #[test]
    fn second_root_disk_is_reported_by_build() {
        let err = Sandbox::builder()
            .kernel("k")
            .root_disk(Disk::new("a"))
            .root_disk(Disk::new("b"))
            .build()
            .err()
            .unwrap();
        assert!(matches!(err, SandboxError::SecondRootDisk));
    }

    #[test]
    fn jail_holds_the_builders_files_as_configured_and_kvm() {
        let jail = Sandbox::builder()
            .kernel("/k/vmlinux")
            .initrd("/k/initrd")
            .disk(Disk::new("/d/ro.img").read_only(true))
            .disk(Disk::new("/d/rw.img"))
            .share(Share::new("/s/data", "data").read_only(true))
            .vsock(3, "/run/v/sock")
            .net(Net::tap("tap0"))
            .jail("j");
        let text = format!("{jail:?}");
        for expected in [
            r#"("/dev/kvm", Device)"#,
            r#"("/k/vmlinux", ReadOnly)"#,
            r#"("/k/initrd", ReadOnly)"#,
            r#"("/d/ro.img", ReadOnly)"#,
            r#"("/d/rw.img", Writable)"#,
            r#"("/s/data", ReadOnly)"#,
            r#"("/run/v", Writable)"#,
            r#"("/dev/net/tun", Device)"#,
        ] {
            assert!(text.contains(expected), "{expected} not in {text}");
        }
    }

    #[test]
    fn memory_zero_is_invalid_memory() {
        let err = Sandbox::builder()
            .kernel("k")
            .memory_mib(0)
            .build()
            .err()
            .unwrap();
        assert!(matches!(err, SandboxError::InvalidMemory(0, _)));
    }

    #[test]
    fn memory_overflowing_bytes_is_invalid_memory() {
        let err = Sandbox::builder()
            .kernel("k")
            .memory_mib(u64::MAX)
            .build()
            .err()
            .unwrap();
        assert!(matches!(err, SandboxError::InvalidMemory(u64::MAX, _)));
    }
}
