//! Snapshots: a paused sandbox saved to a directory, and new sandboxes
//! restored from it, copy-on-write over its memory.
//!
//! A snapshot directory holds two files:
//! - `memory-<16 hex digits>`: guest RAM, regions back to back in address
//!   order, sparse (pages that hold only zeroes are holes); a new name for
//!   every snapshot, so a snapshot never writes a file a restored sandbox
//!   maps;
//! - `state`: the magic `CHITINSN`, the format version (`u32`), the
//!   payload's length (`u64`), the payload, and a CRC-32 of everything
//!   before it (`u32`); integers little-endian. The payload is the machine
//!   (vCPU count, RAM size, ACPI, PIT, how the kernel was booted), the
//!   VM's interrupt controllers and clock, every vCPU's registers, and the
//!   legacy devices' registers; docs/snapshot.md lists it field by field.
//!
//! A reader checks the magic, the version (a newer one is refused by
//! name), the length against the file, and the checksum before it decodes
//! anything, and decoding checks every length against what is left: a
//! truncated, corrupted or foreign file is a typed error, never a panic.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use chitin_boot::{BootInfo, BootProtocol, KernelFormat};
use chitin_devices::{I8042State, RtcState, SerialState};
use chitin_memory::{GuestRam, MemoryError};
use chitin_vcpu::codec::{DecodeError, Reader, Writer};
use chitin_vcpu::{ExitReason, VcpuState, VmState};
use chitin_virtio::mmio::{QueueSnapshot, TransportSnapshot, TransportSnapshotError};
use vm_memory::GuestAddress;

use crate::SandboxBuilder;

/// The state file of a snapshot directory.
pub const STATE_FILE: &str = "state";
/// How the memory files of a snapshot directory are named: this and 16
/// hex digits.
const MEMORY_PREFIX: &str = "memory-";
/// The state file's first bytes.
const MAGIC: &[u8; 8] = b"CHITINSN";
/// The state format this chitin writes and the newest it reads. Format 2
/// added the virtio devices; a format 1 file (written before, without
/// them) reads as a snapshot without devices.
pub const SNAPSHOT_FORMAT: u32 = 2;
/// Magic, version and length.
const HEADER_LEN: usize = 8 + 4 + 8;
/// The checksum after the payload.
const TRAILER_LEN: usize = 4;
/// The largest state file chitin writes is a few hundred KiB (254 vCPUs
/// of about 8 KiB each); anything much larger is not one of its files.
const MAX_STATE_LEN: u64 = 16 << 20;

/// Why a snapshot could not be taken, read or restored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// Only a paused sandbox can be snapshotted: pause it first.
    #[error("the sandbox is not paused")]
    NotPaused,
    /// The guest had stopped.
    #[error("the guest stopped: {0}")]
    GuestStopped(ExitReason),
    /// The sandbox has something this version cannot carry in a
    /// snapshot.
    #[error("cannot snapshot a sandbox with {0} yet")]
    Unsupported(&'static str),
    /// A file of the snapshot could not be read or written.
    #[error("{}", .path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The state file is not a chitin snapshot (no magic).
    #[error("{} is not a chitin snapshot state file", .0.display())]
    NotASnapshot(PathBuf),
    /// The state file was written by a newer chitin.
    #[error("snapshot format {found} is newer than this chitin's ({SNAPSHOT_FORMAT}): restore it with a newer chitin")]
    NewerFormat {
        /// The file's format version.
        found: u32,
    },
    /// The state file is shorter than its header says.
    #[error("the snapshot state file is truncated: {have} bytes, {want} expected")]
    Truncated {
        /// Bytes in the file.
        have: u64,
        /// Bytes its header announces.
        want: u64,
    },
    /// The state file's contents are damaged (checksum mismatch) or
    /// inconsistent.
    #[error("the snapshot state file is corrupt: {0}")]
    Corrupt(String),
    /// The restore asks for a machine the snapshot is not.
    #[error("the snapshot has {what} {snapshot}, the restore asks for {asked}")]
    Mismatch {
        /// What differs.
        what: &'static str,
        /// The snapshot's value.
        snapshot: u64,
        /// The restore's.
        asked: u64,
    },
    /// This host gives a vCPU other CPU features (CPUID) than the host
    /// the snapshot was taken on: the guest could not go on safely.
    #[error("this host gives vCPU {vcpu} other CPU features than the snapshot's host")]
    CpuMismatch {
        /// The first vCPU that differs.
        vcpu: u8,
    },
    /// A virtio device of the snapshot could not be put back.
    #[error("cannot restore {device}")]
    Device {
        /// Which device (`vda`, `vsock`).
        device: String,
        /// What its transport refused.
        #[source]
        source: TransportSnapshotError,
    },
    /// The snapshot has disks and the restore gave none: a restore opens
    /// only the images its caller names ([`Snapshot::disks`] lists the
    /// snapshot's own).
    #[error("the snapshot has {0} disks: give the restore its disks with .disk(..) (Snapshot::disks lists the snapshot's)")]
    DisksNeeded(usize),
    /// The snapshot's vsock device served no agent, so it has no path of
    /// its own to take: the restore must name one.
    #[error(
        "the snapshot has a vsock device: give the restore its socket path with .vsock(cid, path)"
    )]
    VsockPathNeeded,
    /// Saving a vCPU's or the VM's state failed in KVM.
    #[error("cannot save the {what} state")]
    Save {
        /// vCPU or VM.
        what: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl From<DecodeError> for SnapshotError {
    fn from(e: DecodeError) -> Self {
        SnapshotError::Corrupt(e.to_string())
    }
}

/// The registers of the legacy devices.
#[derive(Debug, Clone)]
pub(crate) struct LegacyState {
    pub(crate) serial: SerialState,
    pub(crate) rtc: RtcState,
    pub(crate) i8042: I8042State,
}

/// What a virtio device is, as a snapshot records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DeviceRecord {
    /// A disk: the guest knows its size and whether it may write.
    Disk {
        /// The image it had (the restore's default).
        path: PathBuf,
        read_only: bool,
        /// The serial the guest read.
        id: Option<String>,
        /// Its size in 512-byte sectors.
        sectors: u64,
    },
    /// The vsock device: the guest knows its CID.
    Vsock {
        cid: u32,
        /// Whether the sandbox's agent listens on it.
        agent: bool,
    },
    /// A device a snapshot cannot carry, and why.
    Unsupported(&'static str),
}

/// One virtio device in a snapshot.
#[derive(Debug, Clone)]
pub(crate) struct SavedDevice {
    pub(crate) record: DeviceRecord,
    /// Its window and interrupt line, which the guest's driver uses.
    pub(crate) base: u64,
    pub(crate) gsi: u32,
    pub(crate) transport: TransportSnapshot,
}

/// Everything a snapshot's state file holds.
#[derive(Debug)]
pub(crate) struct Saved {
    /// The memory file's name in the snapshot directory.
    pub(crate) memory_file: String,
    pub(crate) vcpus: u8,
    pub(crate) memory_bytes: u64,
    pub(crate) acpi: bool,
    pub(crate) pit: bool,
    pub(crate) boot: BootInfo,
    pub(crate) vm: VmState,
    pub(crate) vcpu_states: Vec<VcpuState>,
    pub(crate) legacy: LegacyState,
    /// The virtio devices, in window order.
    pub(crate) devices: Vec<SavedDevice>,
}

impl Saved {
    /// The disks as the snapshotted sandbox had them, `vda` first.
    pub(crate) fn disks(&self) -> Vec<crate::Disk> {
        self.devices
            .iter()
            .filter_map(|d| match &d.record {
                DeviceRecord::Disk {
                    path,
                    read_only,
                    id,
                    ..
                } => {
                    let disk = crate::Disk::new(path).read_only(*read_only);
                    Some(match id {
                        Some(id) => disk.id(id),
                        None => disk,
                    })
                }
                _ => None,
            })
            .collect()
    }

    /// The vsock device's CID and whether the agent listened on it.
    pub(crate) fn vsock(&self) -> Result<Option<(u32, bool)>, SnapshotError> {
        let mut found = None;
        for d in &self.devices {
            if let DeviceRecord::Vsock { cid, agent } = d.record {
                if found.replace((cid, agent)).is_some() {
                    return Err(SnapshotError::Corrupt("two vsock devices".into()));
                }
            }
        }
        Ok(found)
    }
}

/// CRC-32 (the ISO-HDLC / zlib polynomial, reflected), bit by bit: the
/// state file is small and read once.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = u32::MAX;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            let mask = (crc & 1).wrapping_neg();
            crc = (crc >> 1) ^ (0xedb8_8320 & mask);
        }
    }
    !crc
}

fn flag(r: &mut Reader<'_>, what: &'static str) -> Result<bool, DecodeError> {
    match r.u8(what)? {
        0 => Ok(false),
        1 => Ok(true),
        other => Err(DecodeError::Invalid {
            what,
            detail: other.to_string(),
        }),
    }
}

fn option_u8(w: &mut Writer, v: Option<u8>) {
    match v {
        Some(b) => {
            w.u8(1);
            w.u8(b);
        }
        None => w.u8(0),
    }
}

fn read_option_u8(r: &mut Reader<'_>, what: &'static str) -> Result<Option<u8>, DecodeError> {
    Ok(if flag(r, what)? {
        Some(r.u8(what)?)
    } else {
        None
    })
}

fn u16_field(r: &mut Reader<'_>, what: &'static str) -> Result<u16, DecodeError> {
    let v = r.u32(what)?;
    u16::try_from(v).map_err(|_| DecodeError::Invalid {
        what,
        detail: v.to_string(),
    })
}

fn encode_transport(w: &mut Writer, t: &TransportSnapshot) {
    w.u32(t.device_type);
    w.u32(t.status);
    w.u32(t.device_features_sel);
    w.u32(t.driver_features_sel);
    w.u64(t.acked_features);
    w.u32(t.queue_sel);
    w.u32(t.shm_sel);
    w.u32(t.queues.len() as u32);
    for q in &t.queues {
        w.u32(q.size.into());
        match q.invalid_size {
            Some(v) => {
                w.u8(1);
                w.u32(v);
            }
            None => w.u8(0),
        }
        w.u8(q.ready.into());
        w.u64(q.desc);
        w.u64(q.driver);
        w.u64(q.device);
        w.u32(q.next_avail.into());
        w.u32(q.next_used.into());
    }
    w.u32(t.interrupt_status);
    w.u32(t.interrupt_raised);
    w.u32(t.config_generation);
    w.u8(t.needs_reset.into());
}

/// Bytes of the smallest encoded queue.
const QUEUE_MIN_LEN: usize = 4 + 1 + 1 + 3 * 8 + 2 * 4;

fn decode_transport(r: &mut Reader<'_>) -> Result<TransportSnapshot, DecodeError> {
    let device_type = r.u32("virtio device type")?;
    let status = r.u32("virtio status")?;
    let device_features_sel = r.u32("DeviceFeaturesSel")?;
    let driver_features_sel = r.u32("DriverFeaturesSel")?;
    let acked_features = r.u64("virtio features")?;
    let queue_sel = r.u32("QueueSel")?;
    let shm_sel = r.u32("SHMSel")?;
    let count = r.count("virtio queue count", QUEUE_MIN_LEN)?;
    let mut queues = Vec::with_capacity(count);
    for _ in 0..count {
        queues.push(QueueSnapshot {
            size: u16_field(r, "queue size")?,
            invalid_size: if flag(r, "invalid queue size flag")? {
                Some(r.u32("invalid queue size")?)
            } else {
                None
            },
            ready: flag(r, "queue ready")?,
            desc: r.u64("descriptor table address")?,
            driver: r.u64("available ring address")?,
            device: r.u64("used ring address")?,
            next_avail: u16_field(r, "next available index")?,
            next_used: u16_field(r, "next used index")?,
        });
    }
    Ok(TransportSnapshot {
        device_type,
        status,
        device_features_sel,
        driver_features_sel,
        acked_features,
        queue_sel,
        shm_sel,
        queues,
        interrupt_status: r.u32("InterruptStatus")?,
        interrupt_raised: r.u32("raised interrupts")?,
        config_generation: r.u32("ConfigGeneration")?,
        needs_reset: flag(r, "NEEDS_RESET")?,
    })
}

/// Bytes of the smallest encoded device: a vsock record, window,
/// interrupt line and a transport without queues.
const DEVICE_MIN_LEN: usize = 1 + 4 + 1 + 8 + 4 + (7 * 4 + 8) + 3 * 4 + 1;

fn encode_device(w: &mut Writer, device: &SavedDevice) {
    match &device.record {
        DeviceRecord::Disk {
            path,
            read_only,
            id,
            sectors,
        } => {
            use std::os::unix::ffi::OsStrExt;
            w.u8(0);
            w.bytes(path.as_os_str().as_bytes());
            w.u8((*read_only).into());
            match id {
                Some(id) => {
                    w.u8(1);
                    w.bytes(id.as_bytes());
                }
                None => w.u8(0),
            }
            w.u64(*sectors);
        }
        DeviceRecord::Vsock { cid, agent } => {
            w.u8(1);
            w.u32(*cid);
            w.u8((*agent).into());
        }
        // Never saved: a snapshot refuses such devices.
        DeviceRecord::Unsupported(_) => w.u8(u8::MAX),
    }
    w.u64(device.base);
    w.u32(device.gsi);
    encode_transport(w, &device.transport);
}

fn decode_device(r: &mut Reader<'_>) -> Result<SavedDevice, DecodeError> {
    let record = match r.u8("virtio device kind")? {
        0 => {
            use std::os::unix::ffi::OsStrExt;
            let path = PathBuf::from(std::ffi::OsStr::from_bytes(r.bytes("disk path")?));
            let read_only = flag(r, "disk read-only flag")?;
            let id = if flag(r, "disk serial flag")? {
                let id = r.bytes("disk serial")?;
                Some(
                    std::str::from_utf8(id)
                        .map_err(|_| DecodeError::Invalid {
                            what: "disk serial",
                            detail: "not UTF-8".into(),
                        })?
                        .to_string(),
                )
            } else {
                None
            };
            DeviceRecord::Disk {
                path,
                read_only,
                id,
                sectors: r.u64("disk size")?,
            }
        }
        1 => DeviceRecord::Vsock {
            cid: r.u32("vsock CID")?,
            agent: flag(r, "agent flag")?,
        },
        other => {
            return Err(DecodeError::Invalid {
                what: "virtio device kind",
                detail: other.to_string(),
            })
        }
    };
    Ok(SavedDevice {
        record,
        base: r.u64("virtio-mmio window")?,
        gsi: r.u32("virtio interrupt line")?,
        transport: decode_transport(r)?,
    })
}

impl Saved {
    fn encode(&self) -> Vec<u8> {
        let mut w = Writer::new();
        w.bytes(self.memory_file.as_bytes());
        w.u8(self.vcpus);
        w.u64(self.memory_bytes);
        w.u8(self.acpi.into());
        w.u8(self.pit.into());
        w.u8(match self.boot.format {
            KernelFormat::Elf => 0,
            KernelFormat::BzImage => 1,
        });
        w.u8(match self.boot.protocol {
            BootProtocol::Linux64 => 0,
            BootProtocol::Pvh => 1,
        });
        w.u64(self.boot.entry.0);
        w.u64(self.boot.kernel_end);
        match self.boot.initrd {
            Some((addr, len)) => {
                w.u8(1);
                w.u64(addr);
                w.u64(len);
            }
            None => w.u8(0),
        }
        w.u64(self.boot.cmdline_len as u64);
        self.vm.encode(&mut w);
        for state in &self.vcpu_states {
            state.encode(&mut w);
        }
        let s = &self.legacy.serial;
        for b in [
            s.baud_divisor_low,
            s.baud_divisor_high,
            s.interrupt_enable,
            s.interrupt_identification,
            s.line_control,
            s.line_status,
            s.modem_control,
            s.modem_status,
            s.scratch,
        ] {
            w.u8(b);
        }
        w.bytes(&s.in_buffer);
        w.u8(self.legacy.rtc.index);
        w.bytes(&self.legacy.rtc.ram);
        let k = &self.legacy.i8042;
        w.u8(k.config);
        w.u8(k.output_port);
        option_u8(&mut w, k.output);
        option_u8(&mut w, k.awaiting_data);
        w.u8(k.last_was_command.into());
        w.u32(self.devices.len() as u32);
        for device in &self.devices {
            encode_device(&mut w, device);
        }
        w.finish()
    }

    /// Decode a payload of format `version`.
    fn decode(payload: &[u8], version: u32) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let memory_file = r.bytes("memory file name")?;
        let memory_file = std::str::from_utf8(memory_file)
            .ok()
            .filter(|n| is_memory_file_name(n))
            .ok_or_else(|| DecodeError::Invalid {
                what: "memory file name",
                detail: String::from_utf8_lossy(memory_file).into_owned(),
            })?
            .to_string();
        let vcpus = r.u8("vCPU count")?;
        if vcpus == 0 || vcpus == u8::MAX {
            return Err(DecodeError::Invalid {
                what: "vCPU count",
                detail: vcpus.to_string(),
            });
        }
        let memory_bytes = r.u64("memory size")?;
        let acpi = flag(&mut r, "ACPI flag")?;
        let pit = flag(&mut r, "PIT flag")?;
        let format = match r.u8("kernel format")? {
            0 => KernelFormat::Elf,
            1 => KernelFormat::BzImage,
            other => {
                return Err(DecodeError::Invalid {
                    what: "kernel format",
                    detail: other.to_string(),
                })
            }
        };
        let protocol = match r.u8("boot protocol")? {
            0 => BootProtocol::Linux64,
            1 => BootProtocol::Pvh,
            other => {
                return Err(DecodeError::Invalid {
                    what: "boot protocol",
                    detail: other.to_string(),
                })
            }
        };
        let entry = GuestAddress(r.u64("kernel entry")?);
        let kernel_end = r.u64("kernel end")?;
        let initrd = if flag(&mut r, "initrd flag")? {
            Some((r.u64("initrd address")?, r.u64("initrd size")?))
        } else {
            None
        };
        let cmdline_len =
            usize::try_from(r.u64("command line length")?).map_err(|_| DecodeError::Invalid {
                what: "command line length",
                detail: "too large".into(),
            })?;
        let vm = VmState::decode(&mut r)?;
        let mut vcpu_states = Vec::with_capacity(usize::from(vcpus));
        for _ in 0..vcpus {
            vcpu_states.push(VcpuState::decode(&mut r)?);
        }
        let mut regs = [0u8; 9];
        for b in &mut regs {
            *b = r.u8("serial register")?;
        }
        let serial = SerialState {
            baud_divisor_low: regs[0],
            baud_divisor_high: regs[1],
            interrupt_enable: regs[2],
            interrupt_identification: regs[3],
            line_control: regs[4],
            line_status: regs[5],
            modem_control: regs[6],
            modem_status: regs[7],
            scratch: regs[8],
            in_buffer: r.bytes("serial receive FIFO")?.to_vec(),
        };
        let rtc = RtcState {
            index: r.u8("RTC index")?,
            ram: r.bytes("CMOS RAM")?.to_vec(),
        };
        let i8042 = I8042State {
            config: r.u8("i8042 configuration")?,
            output_port: r.u8("i8042 output port")?,
            output: read_option_u8(&mut r, "i8042 output")?,
            awaiting_data: read_option_u8(&mut r, "i8042 pending command")?,
            last_was_command: flag(&mut r, "i8042 last write")?,
        };
        let mut devices = Vec::new();
        if version >= 2 {
            let count = r.count("virtio device count", DEVICE_MIN_LEN)?;
            devices.reserve_exact(count);
            for _ in 0..count {
                devices.push(decode_device(&mut r)?);
            }
        }
        r.finish("state")?;
        Ok(Saved {
            memory_file,
            vcpus,
            memory_bytes,
            acpi,
            pit,
            boot: BootInfo {
                format,
                protocol,
                entry,
                kernel_end,
                initrd,
                cmdline_len,
            },
            vm,
            vcpu_states,
            legacy: LegacyState { serial, rtc, i8042 },
            devices,
        })
    }
}

/// Whether `name` is a memory file's name: the prefix and 16 lowercase
/// hex digits, nothing else (no path).
fn is_memory_file_name(name: &str) -> bool {
    name.strip_prefix(MEMORY_PREFIX).is_some_and(|hex| {
        hex.len() == 16 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// A fresh memory file name for a new snapshot.
pub(crate) fn new_memory_file_name() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    // Randomly keyed by std, with the time and a counter mixed in: two
    // snapshots never pick the same name in practice, and if they did the
    // second would fail to create it rather than overwrite it.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    h.write_u64(NEXT.fetch_add(1, Ordering::Relaxed));
    h.write_u32(std::process::id());
    format!("{MEMORY_PREFIX}{:016x}", h.finish())
}

/// Remove the memory files in `dir` other than `keep`: earlier
/// snapshots' (sandboxes restored from them keep their mappings; the
/// files go when the last one ends). Best effort.
fn remove_other_memory_files(dir: &Path, keep: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if let Some(name) = name.to_str() {
            if is_memory_file_name(name) && name != keep {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

/// The state file's bytes for `saved`.
fn state_file_bytes(saved: &Saved) -> Vec<u8> {
    let payload = saved.encode();
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TRAILER_LEN);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&SNAPSHOT_FORMAT.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&payload);
    let crc = crc32(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Parse a state file's bytes (`path` names it in errors).
pub(crate) fn parse_state(bytes: &[u8], path: &Path) -> Result<Saved, SnapshotError> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::NotASnapshot(path.to_path_buf()));
    }
    let have = bytes.len() as u64;
    if bytes.len() < HEADER_LEN {
        return Err(SnapshotError::Truncated {
            have,
            want: (HEADER_LEN + TRAILER_LEN) as u64,
        });
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version > SNAPSHOT_FORMAT {
        return Err(SnapshotError::NewerFormat { found: version });
    }
    if version == 0 {
        return Err(SnapshotError::Corrupt("format version 0".into()));
    }
    let mut len = [0u8; 8];
    len.copy_from_slice(&bytes[12..20]);
    let len = u64::from_le_bytes(len);
    if len > MAX_STATE_LEN {
        return Err(SnapshotError::Corrupt(format!(
            "a payload of {len} bytes announced"
        )));
    }
    let want = HEADER_LEN as u64 + len + TRAILER_LEN as u64;
    if have < want {
        return Err(SnapshotError::Truncated { have, want });
    }
    if have > want {
        return Err(SnapshotError::Corrupt(format!(
            "{} bytes after the checksum",
            have - want
        )));
    }
    let body = &bytes[..bytes.len() - TRAILER_LEN];
    let stored = u32::from_le_bytes([
        bytes[bytes.len() - 4],
        bytes[bytes.len() - 3],
        bytes[bytes.len() - 2],
        bytes[bytes.len() - 1],
    ]);
    if crc32(body) != stored {
        return Err(SnapshotError::Corrupt("checksum mismatch".into()));
    }
    Ok(Saved::decode(&body[HEADER_LEN..], version)?)
}

/// Open `path` for reading, refusing anything but a regular file (a FIFO
/// would block the open, a device could be read forever); symbolic links
/// are followed.
fn open_regular(path: &Path) -> Result<File, SnapshotError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(io_err(path))?;
    if !file.metadata().map_err(io_err(path))?.is_file() {
        return Err(SnapshotError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a regular file"),
        });
    }
    Ok(file)
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Write a snapshot into `dir` (created if missing): guest RAM into a new
/// memory file (`saved.memory_file`, never a file a restored sandbox may
/// map), synced; then the state file naming it, so a crash leaves the
/// previous snapshot whole; then the earlier snapshots' memory files go.
/// Returns the state file's bytes and the RAM bytes written.
///
/// # Safety
///
/// As [`GuestRam::save`]: nothing may write `ram` meanwhile.
pub(crate) unsafe fn write_snapshot(
    dir: &Path,
    saved: &Saved,
    ram: &GuestRam,
) -> Result<(u64, u64), SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let path = dir.join(&saved.memory_file);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io_err(&path))?;
    // SAFETY: the caller vouches that nothing writes `ram` meanwhile.
    let written = unsafe { ram.save(&file) }.and_then(|n| {
        file.sync_all().map_err(MemoryError::Snapshot)?;
        Ok(n)
    });
    let result = match written {
        Ok(n) => write_state(dir, saved).map(|state| (state, n)),
        Err(e) => Err(SnapshotError::Io {
            path: path.clone(),
            source: std::io::Error::other(crate::error::error_chain(&e)),
        }),
    };
    match result {
        Ok(sizes) => {
            remove_other_memory_files(dir, &saved.memory_file);
            Ok(sizes)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            Err(e)
        }
    }
}

/// Write `saved` as `dir`'s state file: to a temporary name first, synced,
/// then renamed, so a crash never leaves a half-written state file.
fn write_state(dir: &Path, saved: &Saved) -> Result<u64, SnapshotError> {
    let bytes = state_file_bytes(saved);
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let path = dir.join(STATE_FILE);
    let mut file = File::create(&tmp).map_err(io_err(&tmp))?;
    file.write_all(&bytes).map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    // The rename itself reaches the disk with the directory.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))?;
    Ok(bytes.len() as u64)
}

/// What [`RunningSandbox::snapshot`](crate::RunningSandbox::snapshot)
/// wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// Bytes of the state file.
    pub state_bytes: u64,
    /// Guest RAM's size: the memory file's length.
    pub memory_bytes: u64,
    /// Bytes of guest RAM actually written (the rest are holes).
    pub memory_written: u64,
}

/// A snapshot directory, read and checked, ready to restore sandboxes
/// from: any number of them, each copy-on-write over the same memory file.
#[derive(Debug, Clone)]
pub struct Snapshot {
    dir: PathBuf,
    saved: Arc<Saved>,
}

impl Snapshot {
    /// Read and check the snapshot in `dir`.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self, SnapshotError> {
        let dir = dir.as_ref().to_path_buf();
        let path = dir.join(STATE_FILE);
        let limit = MAX_STATE_LEN + (HEADER_LEN + TRAILER_LEN) as u64;
        let file = open_regular(&path)?;
        let len = file.metadata().map_err(io_err(&path))?.len();
        if len > limit {
            return Err(SnapshotError::Corrupt(format!(
                "a state file of {len} bytes"
            )));
        }
        // Read no more than the limit even if the file grows meanwhile.
        let mut bytes = Vec::with_capacity(len as usize);
        file.take(limit + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err(&path))?;
        let saved = parse_state(&bytes, &path)?;
        let memory = dir.join(&saved.memory_file);
        let have = open_regular(&memory)?
            .metadata()
            .map_err(io_err(&memory))?
            .len();
        if have != saved.memory_bytes {
            return Err(SnapshotError::Corrupt(format!(
                "the memory file holds {have} bytes, the state says {}",
                saved.memory_bytes
            )));
        }
        Ok(Self {
            dir,
            saved: Arc::new(saved),
        })
    }

    /// vCPUs of the snapshotted machine.
    pub fn vcpus(&self) -> u32 {
        u32::from(self.saved.vcpus)
    }

    /// Guest RAM of the snapshotted machine, in MiB.
    pub fn memory_mib(&self) -> u64 {
        self.saved.memory_bytes >> 20
    }

    /// The disks of the snapshotted sandbox, `vda` first, as it had them
    /// (image path, read-only, serial; rate limits are not recorded): pass
    /// them to [`SandboxBuilder::disk`] to restore onto the same images,
    /// or copies of them for a clone that writes. The paths come from the
    /// state file: trust them as much as whoever wrote it.
    pub fn disks(&self) -> Vec<crate::Disk> {
        self.saved.disks()
    }

    /// Whether the snapshotted sandbox ran the agent (a restored one then
    /// runs commands too).
    pub fn has_agent(&self) -> bool {
        self.saved
            .devices
            .iter()
            .any(|d| matches!(d.record, DeviceRecord::Vsock { agent: true, .. }))
    }

    /// A builder for a sandbox that continues from this snapshot: the
    /// machine (vCPUs, memory, ACPI, PIT) is the snapshot's; set where its
    /// console goes and its seccomp mode, then `build()` and `start()`.
    ///
    /// Devices are re-targeted here. Disks are the caller's, always: as
    /// many as the snapshot had, each as large and as writable as the
    /// guest knows it ([`Snapshot::disks`] gives the snapshot's own; two
    /// clones must not write one image). A vsock device keeps its CID;
    /// `.vsock(cid, path)` names its socket (the agent's gets a fresh
    /// private one otherwise). `build()` refuses settings the snapshot
    /// cannot honour.
    pub fn restore_builder(&self) -> SandboxBuilder {
        SandboxBuilder::restoring(self.dir.clone(), Arc::clone(&self.saved))
    }
}

/// Entry points for the `snapshot_state` fuzz target; not part of the API.
#[doc(hidden)]
pub mod fuzzing {
    use std::path::Path;

    use super::{parse_state, Saved, SnapshotError};

    /// Parse `bytes` as a whole state file (header, length, checksum, then
    /// the payload).
    pub fn parse_state_file(bytes: &[u8]) -> Result<(), SnapshotError> {
        parse_state(bytes, Path::new("fuzz-input")).map(|_| ())
    }

    /// Decode `payload` as if a valid header and checksum carried it; what
    /// it decodes to, encoded again (which must be `payload` itself).
    pub fn reencode_payload(payload: &[u8]) -> Result<Vec<u8>, SnapshotError> {
        Ok(Saved::decode(payload, super::SNAPSHOT_FORMAT)?.encode())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn memory_file_names_are_fresh_and_plain() {
        let a = new_memory_file_name();
        let b = new_memory_file_name();
        assert_ne!(a, b);
        assert!(is_memory_file_name(&a), "{a}");
        for bad in [
            "memory",
            "memory-0123",
            "memory-0123456789abcdeF",
            "memory-../../etc/pass",
            "../memory-0123456789abcdef",
        ] {
            assert!(!is_memory_file_name(bad), "{bad}");
        }
    }

    /// A state as a snapshot of a 2-vCPU machine holds it (KVM structs at
    /// their defaults but for what the reader checks).
    fn sample() -> Saved {
        use kvm_bindings::{kvm_cpuid_entry2, kvm_irqchip, kvm_msr_entry};
        let mut irqchips = [kvm_irqchip::default(); 3];
        for (i, chip) in irqchips.iter_mut().enumerate() {
            chip.chip_id = i as u32;
        }
        let vcpu = VcpuState {
            mp_state: Default::default(),
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Box::new([7; 1024]),
            xcrs: Default::default(),
            debugregs: Default::default(),
            lapic: Default::default(),
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                data: 1 << 40,
                ..Default::default()
            }],
            events: Default::default(),
            tsc_khz: 2_000_000,
            cpuid: vec![kvm_cpuid_entry2 {
                function: 1,
                eax: 0x806f8,
                ..Default::default()
            }],
        };
        Saved {
            memory_file: new_memory_file_name(),
            vcpus: 2,
            memory_bytes: 64 << 20,
            acpi: true,
            pit: false,
            boot: BootInfo {
                format: KernelFormat::BzImage,
                protocol: BootProtocol::Linux64,
                entry: GuestAddress(0x100_0200),
                kernel_end: 0x200_0000,
                initrd: Some((0x300_0000, 4096)),
                cmdline_len: 42,
            },
            vm: VmState {
                irqchips,
                pit: None,
                clock: Default::default(),
            },
            vcpu_states: vec![vcpu.clone(), vcpu],
            legacy: LegacyState {
                serial: SerialState::default(),
                rtc: RtcState {
                    index: 3,
                    ram: vec![1; 128],
                },
                i8042: I8042State {
                    config: 0x47,
                    output_port: 1,
                    output: Some(0xfa),
                    awaiting_data: None,
                    last_was_command: true,
                },
            },
            devices: vec![
                SavedDevice {
                    record: DeviceRecord::Disk {
                        path: "/images/root.ext4".into(),
                        read_only: true,
                        id: Some("root".into()),
                        sectors: 2048,
                    },
                    base: 0xd000_0000,
                    gsi: 5,
                    transport: transport(2, 1),
                },
                SavedDevice {
                    record: DeviceRecord::Vsock {
                        cid: 3,
                        agent: true,
                    },
                    base: 0xd000_1000,
                    gsi: 6,
                    transport: transport(19, 3),
                },
            ],
        }
    }

    /// A running transport of `queues` queues.
    fn transport(device_type: u32, queues: usize) -> TransportSnapshot {
        TransportSnapshot {
            device_type,
            status: 0xf,
            device_features_sel: 1,
            driver_features_sel: 1,
            acked_features: 1 << 32,
            queue_sel: queues as u32 - 1,
            shm_sel: 0,
            queues: (0..queues as u64)
                .map(|i| QueueSnapshot {
                    size: 256,
                    invalid_size: (i == 1).then_some(3),
                    ready: true,
                    desc: 0x10_0000 + i * 0x1000,
                    driver: 0x10_0800 + i * 0x1000,
                    device: 0x10_0c00 + i * 0x1000,
                    next_avail: 65535,
                    next_used: 7,
                })
                .collect(),
            interrupt_status: 1,
            interrupt_raised: 2,
            config_generation: 4,
            needs_reset: false,
        }
    }

    #[test]
    fn state_files_round_trip_and_every_damage_is_an_error() {
        let saved = sample();
        let file = state_file_bytes(&saved);
        let parsed = parse_state(&file, Path::new("t")).unwrap();
        assert_eq!(parsed.encode(), saved.encode());
        assert_eq!(parsed.memory_file, saved.memory_file);
        assert_eq!(parsed.boot.initrd, Some((0x300_0000, 4096)));
        // Every cut, and a flipped bit anywhere, is refused.
        for cut in 0..file.len() {
            assert!(parse_state(&file[..cut], Path::new("t")).is_err(), "{cut}");
        }
        for at in (0..file.len()).step_by(97) {
            let mut bad = file.clone();
            bad[at] ^= 1;
            assert!(parse_state(&bad, Path::new("t")).is_err(), "bit at {at}");
        }
        // Behind a valid checksum, every cut of the payload still fails
        // to decode, and what decodes encodes to itself.
        let payload = saved.encode();
        for cut in 0..payload.len() {
            assert!(fuzzing::reencode_payload(&payload[..cut]).is_err(), "{cut}");
        }
        assert_eq!(fuzzing::reencode_payload(&payload).unwrap(), payload);
    }

    #[test]
    fn a_format_1_file_reads_as_a_snapshot_without_devices() {
        let mut saved = sample();
        saved.devices.clear();
        let mut payload = saved.encode();
        // Format 1 ended after the i8042: no device count.
        assert_eq!(payload.split_off(payload.len() - 4), [0; 4]);
        let mut file = MAGIC.to_vec();
        file.extend_from_slice(&1u32.to_le_bytes());
        file.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        file.extend_from_slice(&payload);
        let crc = crc32(&file);
        file.extend_from_slice(&crc.to_le_bytes());
        let parsed = parse_state(&file, Path::new("v1")).unwrap();
        assert!(parsed.devices.is_empty());
        assert_eq!(parsed.encode(), saved.encode());
    }

    #[test]
    fn saved_devices_give_the_disks_and_one_vsock() {
        let mut saved = sample();
        let disks = saved.disks();
        assert_eq!(disks.len(), 1);
        assert_eq!(disks[0].path(), Path::new("/images/root.ext4"));
        assert!(disks[0].is_read_only());
        assert_eq!(saved.vsock().unwrap(), Some((3, true)));
        let again = saved.devices[1].clone();
        saved.devices.push(again);
        assert!(matches!(saved.vsock(), Err(SnapshotError::Corrupt(_))));
    }

    #[test]
    fn crc32_matches_the_reference_check_value() {
        // The CRC-32 check value of "123456789" (ISO-HDLC).
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }
}
