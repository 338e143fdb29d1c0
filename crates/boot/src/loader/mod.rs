//! Loading the kernel, initrd and command line, and writing the boot
//! parameters the chosen boot protocol expects.
//!
//! The format is detected from the file contents, never the name. Headers
//! are checked here before linux-loader copies anything, so that a
//! malformed or oversized image gives a typed [`BootError`] and no header
//! field ever sizes an allocation. Placement follows
//! [`chitin_memory::layout`]: kernel from [`HIMEM_START`], initrd as high as
//! the kernel allows in low RAM, command line at [`CMDLINE_START`], zero page
//! or `hvm_start_info` at their fixed addresses.

mod bzimage;
mod elf;
mod initrd;
mod pvh;
mod zero_page;

#[cfg(test)]
mod tests;

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

use chitin_memory::layout::{CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START};
use chitin_memory::GuestRam;
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use vm_memory::{Bytes, GuestAddress};

use crate::BootError;

/// Kernel image formats chitin loads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    /// An uncompressed ELF `vmlinux`.
    Elf,
    /// A compressed `bzImage` (Linux boot protocol 2.12 or later).
    BzImage,
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BootProtocol {
    /// The Linux 64-bit boot protocol: long mode, zero page in `rsi`.
    #[default]
    Linux64,
    /// The PVH boot protocol: 32-bit protected mode, `hvm_start_info` in
    /// `ebx`. Needs an ELF kernel with a `XEN_ELFNOTE_PHYS32_ENTRY` note.
    Pvh,
}

/// What to load.
#[derive(Debug, Clone, Copy)]
pub struct BootParams<'a> {
    /// Kernel image: ELF or bzImage, detected by content.
    pub kernel: &'a Path,
    /// Optional initial ramdisk.
    pub initrd: Option<&'a Path>,
    /// The complete command line, as built by [`crate::build_cmdline`].
    pub cmdline: &'a Cmdline,
    /// The boot protocol. [`BootProtocol::Pvh`] fails for images without a
    /// PVH entry note, and for every bzImage.
    pub protocol: BootProtocol,
    /// Guest address of the ACPI RSDP, handed over in the zero page
    /// (`acpi_rsdp_addr`, boot protocol 2.14) or `hvm_start_info`
    /// (`rsdp_paddr`); `None` for a machine without ACPI tables.
    pub acpi_rsdp: Option<u64>,
}

/// Where things were loaded, for setting up the boot vCPU.
#[derive(Debug, Clone)]
pub struct BootInfo {
    /// Format of the kernel image.
    pub format: KernelFormat,
    /// The protocol the boot vCPU must follow.
    pub protocol: BootProtocol,
    /// 64-bit entry point (Linux64) or 32-bit PVH entry point (Pvh).
    pub entry: GuestAddress,
    /// One past the last byte of the kernel in guest memory.
    pub kernel_end: u64,
    /// The initrd as (guest address, size in bytes), when one was loaded.
    pub initrd: Option<(u64, u64)>,
    /// Command line length in bytes, without the terminating NUL.
    pub cmdline_len: usize,
}

/// Highest initrd address when the image gives none (ELF, or a bzImage
/// before protocol 2.03): the boot protocol's default (boot.rst,
/// `initrd_addr_max`).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// A kernel loaded into guest memory, before the boot parameters are
/// written.
#[derive(Debug, Clone, Copy)]
struct LoadedKernel {
    /// Entry point for the requested protocol.
    entry: GuestAddress,
    /// One past the last byte loaded (including zero-filled segment tails).
    end: u64,
    /// One past the last byte the kernel needs while it starts, at least
    /// `end` (a bzImage decompresses into `init_size` bytes): the initrd is
    /// placed above it.
    reserved_end: u64,
    /// Highest address the initrd may occupy (inclusive, boot.rst).
    initrd_addr_max: u64,
    /// Setup header to start the zero page from.
    header: setup_header,
}

/// Load the kernel (and initrd) described by `params` into `ram` and write
/// the command line and boot parameters.
///
/// The format is detected from the contents: ELF magic `\x7fELF`, or the
/// bzImage signatures `0xAA55` at 0x1fe and `HdrS` at 0x202. The kernel is
/// loaded at or above [`HIMEM_START`]; the initrd is page aligned, as high
/// as possible below the kernel's `initrd_addr_max` and the MMIO gap. For
/// [`BootProtocol::Linux64`] the zero page is written, for
/// [`BootProtocol::Pvh`] `hvm_start_info` with its memory map; both carry
/// the e820 map of `ram.layout().address_map()`.
///
/// # Errors
///
/// See [`BootError`]: unreadable or malformed files, a kernel or initrd
/// that does not fit, a command line over the VMM's or the kernel's limit,
/// a protocol the image does not support.
pub fn load_kernel(ram: &GuestRam, params: &BootParams) -> Result<BootInfo, BootError> {
    let mem = ram.memory();
    let layout = ram.layout();
    let cmdline = cmdline_cstring(params.cmdline)?;
    let cmdline_len = cmdline.as_bytes().len();

    let path = params.kernel;
    let file = File::open(path).map_err(|source| BootError::OpenKernel {
        path: path.to_path_buf(),
        source,
    })?;
    let image = KernelFile::new(&file, path)?;
    let format = detect_format(&image)?;
    let kernel = match format {
        KernelFormat::Elf => elf::load(mem, layout, &image, params.protocol)?,
        KernelFormat::BzImage => bzimage::load(mem, layout, &image, params.protocol, cmdline_len)?,
    };

    let initrd = match params.initrd {
        Some(initrd_path) => Some(initrd::load(mem, layout, initrd_path, &kernel)?),
        None => None,
    };

    mem.write_slice(cmdline.as_bytes_with_nul(), GuestAddress(CMDLINE_START))
        .map_err(BootError::GuestMemory)?;

    match params.protocol {
        BootProtocol::Linux64 => {
            zero_page::write(mem, layout, kernel.header, initrd, params.acpi_rsdp)?;
        }
        BootProtocol::Pvh => pvh::write(mem, layout, initrd, params.acpi_rsdp)?,
    }

    Ok(BootInfo {
        format,
        protocol: params.protocol,
        entry: kernel.entry,
        kernel_end: kernel.end,
        initrd,
        cmdline_len,
    })
}

/// The command line as C string, checked against the space reserved for it
/// at [`CMDLINE_START`].
fn cmdline_cstring(cmdline: &Cmdline) -> Result<CString, BootError> {
    let cstring = cmdline.as_cstring().map_err(BootError::CmdlineInvalid)?;
    let len = cstring.as_bytes().len();
    let max = CMDLINE_MAX_SIZE - 1;
    if len > max {
        return Err(BootError::CmdlineTooLong { len, max });
    }
    Ok(cstring)
}

/// An open kernel image: its path (for errors) and length.
struct KernelFile<'a> {
    file: &'a File,
    path: &'a Path,
    len: u64,
}

impl<'a> KernelFile<'a> {
    fn new(file: &'a File, path: &'a Path) -> Result<Self, BootError> {
        let len = file
            .metadata()
            .map_err(|source| BootError::ReadKernel {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        Ok(Self { file, path, len })
    }

    /// Fill `buf` from `offset`; a file too short gives
    /// [`BootError::InvalidKernel`] with `truncated` as the reason.
    fn read_exact_at(
        &self,
        buf: &mut [u8],
        offset: u64,
        truncated: &'static str,
    ) -> Result<(), BootError> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > self.len) {
            return Err(self.invalid(truncated));
        }
        self.file.read_exact_at(buf, offset).map_err(|source| {
            if source.kind() == io::ErrorKind::UnexpectedEof {
                self.invalid(truncated)
            } else {
                BootError::ReadKernel {
                    path: self.path.to_path_buf(),
                    source,
                }
            }
        })
    }

    fn invalid(&self, reason: &'static str) -> BootError {
        BootError::InvalidKernel {
            path: self.path.to_path_buf(),
            reason,
        }
    }

    fn load_error(&self, source: linux_loader::loader::Error) -> BootError {
        BootError::KernelLoad {
            path: self.path.to_path_buf(),
            source,
        }
    }
}

/// Bytes needed to tell the formats apart: up to the end of `HdrS`.
const DETECT_LEN: usize = 0x206;
/// ELF identification magic.
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// Offset and value of the boot sector signature in a bzImage.
const BOOT_FLAG_OFFSET: usize = 0x1fe;
const BOOT_FLAG: &[u8; 2] = &[0x55, 0xaa]; // 0xaa55, little-endian
/// Offset and value of the setup header magic in a bzImage.
const HDRS_OFFSET: usize = 0x202;
const HDRS_MAGIC: &[u8; 4] = b"HdrS";

fn detect_format(image: &KernelFile) -> Result<KernelFormat, BootError> {
    let mut head = Vec::with_capacity(DETECT_LEN);
    image
        .file
        .take(DETECT_LEN as u64)
        .read_to_end(&mut head)
        .map_err(|source| BootError::ReadKernel {
            path: image.path.to_path_buf(),
            source,
        })?;
    if head.starts_with(ELF_MAGIC) {
        return Ok(KernelFormat::Elf);
    }
    let is_bzimage = head.get(BOOT_FLAG_OFFSET..BOOT_FLAG_OFFSET + 2) == Some(BOOT_FLAG)
        && head.get(HDRS_OFFSET..HDRS_OFFSET + 4) == Some(HDRS_MAGIC);
    if is_bzimage {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::NotAKernel {
        path: image.path.to_path_buf(),
    })
}

/// Check that a kernel ending at `end` (`None`: the end overflowed) fits in
/// low RAM; return the end.
fn check_kernel_fits(end: Option<u64>, low_ram_end: u64) -> Result<u64, BootError> {
    match end {
        Some(end) if end <= low_ram_end => Ok(end),
        _ => Err(BootError::KernelDoesNotFit {
            end: end.unwrap_or(u64::MAX),
            limit: low_ram_end,
        }),
    }
}

/// Guest address where kernels are loaded.
const KERNEL_START: GuestAddress = GuestAddress(HIMEM_START);
