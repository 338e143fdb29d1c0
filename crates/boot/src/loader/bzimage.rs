//! bzImage kernels (Linux boot protocol, `Documentation/arch/x86/boot.rst`).
//!
//! The setup header is read and checked here first: protocol 2.12 or later
//! with the 64-bit entry point (`XLF_KERNEL_64`), loaded high, the command
//! line within the kernel's `cmdline_size`, and the protected-mode part plus
//! its `init_size` decompression footprint inside low RAM. Then linux-loader
//! copies the protected-mode part to 1 MiB; the 64-bit entry is 0x200 bytes
//! into it. The real-mode setup code is never run, so it is not loaded.

use chitin_memory::{GuestMemoryMmap, MemoryLayout};
use linux_loader::loader::bootparam::{setup_header, LOADED_HIGH, XLF_KERNEL_64};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::KernelLoader;
use vm_memory::{ByteValued, GuestAddress};

use super::DEFAULT_INITRD_ADDR_MAX;
use super::{check_kernel_fits, BootProtocol, KernelFile, LoadedKernel, KERNEL_START};
use crate::BootError;

/// File offset of the setup header (boot.rst, "The Real-Mode Kernel Header").
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
/// Sector size the setup code is counted in.
const SECTOR_SIZE: u64 = 512;
/// `setup_sects` value 0 means 4 (boot.rst).
const DEFAULT_SETUP_SECTS: u64 = 4;
/// Offset of the 64-bit entry point from the protected-mode load address
/// (boot.rst, "64-bit Boot Protocol").
const ENTRY_64_OFFSET: u64 = 0x200;
/// Oldest protocol with a protected-mode kernel loaded high.
const PROTOCOL_2_00: u16 = 0x0200;
/// First protocol with `initrd_addr_max`.
const PROTOCOL_2_03: u16 = 0x0203;
/// First protocol with `cmdline_size`.
const PROTOCOL_2_06: u16 = 0x0206;
/// First protocol with `init_size`.
const PROTOCOL_2_10: u16 = 0x020a;
/// First protocol with `xloadflags`, hence with a 64-bit entry point.
const PROTOCOL_2_12: u16 = 0x020c;
/// Command line limit of kernels before protocol 2.06 (boot.rst).
const OLD_CMDLINE_MAX: usize = 255;

/// Check and load a bzImage for the Linux 64-bit protocol.
pub(super) fn load(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    image: &KernelFile,
    protocol: BootProtocol,
    cmdline_len: usize,
) -> Result<LoadedKernel, BootError> {
    if protocol == BootProtocol::Pvh {
        return Err(BootError::NoPvhEntry {
            path: image.path.to_path_buf(),
        });
    }
    let mut header = setup_header::default();
    image.read_exact_at(
        header.as_mut_slice(),
        SETUP_HEADER_OFFSET,
        "truncated bzImage setup header",
    )?;
    let version = header.version;
    if version < PROTOCOL_2_00 || u32::from(header.loadflags) & LOADED_HIGH == 0 {
        return Err(image.invalid("bzImage does not load its kernel above 1 MiB"));
    }
    if version < PROTOCOL_2_12 || u32::from(header.xloadflags) & XLF_KERNEL_64 == 0 {
        return Err(BootError::No64BitEntry {
            path: image.path.to_path_buf(),
        });
    }
    check_cmdline(&header, cmdline_len)?;

    let setup_sects = match u64::from(header.setup_sects) {
        0 => DEFAULT_SETUP_SECTS,
        n => n,
    };
    // At most 256 sectors: no overflow.
    let setup_len = (setup_sects + 1) * SECTOR_SIZE;
    let kernel_len = match image.len.checked_sub(setup_len) {
        Some(len) if len > ENTRY_64_OFFSET => len,
        _ => return Err(image.invalid("truncated bzImage: no kernel after the setup code")),
    };
    let init_size = if version >= PROTOCOL_2_10 {
        u64::from(header.init_size)
    } else {
        0
    };
    let low_ram_end = layout.low_ram_end();
    let end = check_kernel_fits(KERNEL_START.0.checked_add(kernel_len), low_ram_end)?;
    let reserved_end = check_kernel_fits(
        KERNEL_START.0.checked_add(kernel_len.max(init_size)),
        low_ram_end,
    )?;

    // linux-loader seeks and reads through a shared handle of the file.
    let mut reader = image.file;
    let result = BzImage::load(mem, Some(KERNEL_START), &mut reader, Some(KERNEL_START))
        .map_err(|e| image.load_error(e))?;
    // linux-loader returns the header it read, with code32_start set to
    // the load address.
    let header = result.setup_header.unwrap_or(header);

    let initrd_addr_max = if version >= PROTOCOL_2_03 {
        u64::from(header.initrd_addr_max)
    } else {
        DEFAULT_INITRD_ADDR_MAX
    };
    Ok(LoadedKernel {
        entry: GuestAddress(KERNEL_START.0 + ENTRY_64_OFFSET),
        end,
        reserved_end,
        initrd_addr_max,
        header,
    })
}

/// The command line must fit the kernel's own limit, without the NUL.
fn check_cmdline(header: &setup_header, len: usize) -> Result<(), BootError> {
    let max = if header.version >= PROTOCOL_2_06 {
        usize::try_from(header.cmdline_size).unwrap_or(usize::MAX)
    } else {
        OLD_CMDLINE_MAX
    };
    if len > max {
        return Err(BootError::CmdlineTooLong { len, max });
    }
    Ok(())
}
