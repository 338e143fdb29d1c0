//! ELF (`vmlinux`) kernels.
//!
//! The ELF and program headers are parsed and checked here first: 64-bit
//! little-endian x86_64, program headers and segment data inside the file,
//! every loadable segment inside low RAM from 1 MiB. Only then does
//! linux-loader copy the segments (and find the PVH note), so a hostile
//! header cannot make it read past the file, write over the boot structures
//! below 1 MiB or into the MMIO gap.

use chitin_memory::{GuestMemoryMmap, MemoryLayout};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use vm_memory::GuestAddress;

use super::{check_kernel_fits, zero_page, KernelFile, LoadedKernel, KERNEL_START};
use super::{BootProtocol, DEFAULT_INITRD_ADDR_MAX};
use crate::BootError;

/// Size of the ELF64 file header.
const EHDR_LEN: usize = 64;
/// Size of one ELF64 program header.
const PHDR_LEN: usize = 56;
/// `e_ident[EI_CLASS]`: 64-bit objects.
const ELFCLASS64: u8 = 2;
/// `e_ident[EI_DATA]`: little-endian.
const ELFDATA2LSB: u8 = 1;
/// `e_machine` of x86_64.
const EM_X86_64: u16 = 62;
/// Loadable segment.
const PT_LOAD: u32 = 1;
/// Note segment (where the PVH entry note lives).
const PT_NOTE: u32 = 4;

/// The program header fields the loader uses.
#[derive(Debug, Clone, Copy)]
struct Segment {
    kind: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
}

/// The file header fields the loader uses.
#[derive(Debug, Clone, Copy)]
struct Header {
    entry: u64,
    phoff: u64,
    phnum: u16,
}

/// Check and load an ELF kernel; the entry is `e_entry` for
/// [`BootProtocol::Linux64`], the PVH note's address for
/// [`BootProtocol::Pvh`].
pub(super) fn load(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    image: &KernelFile,
    protocol: BootProtocol,
) -> Result<LoadedKernel, BootError> {
    let header = read_header(image)?;
    let segments = read_segments(image, &header)?;
    let (start, end) = check_segments(image, &segments, layout.low_ram_end())?;

    // linux-loader seeks and reads through a shared handle of the file.
    let mut reader = image.file;
    let result =
        Elf::load(mem, None, &mut reader, Some(KERNEL_START)).map_err(|e| image.load_error(e))?;

    let entry = match protocol {
        BootProtocol::Linux64 => GuestAddress(header.entry),
        BootProtocol::Pvh => match result.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => addr,
            PvhBootCapability::PvhEntryNotPresent | PvhBootCapability::PvhEntryIgnored => {
                return Err(BootError::NoPvhEntry {
                    path: image.path.to_path_buf(),
                })
            }
        },
    };
    if !(start..end).contains(&entry.0) {
        return Err(image.invalid("entry point outside the loaded segments"));
    }

    Ok(LoadedKernel {
        entry,
        end,
        reserved_end: end,
        initrd_addr_max: DEFAULT_INITRD_ADDR_MAX,
        header: zero_page::elf_header(),
    })
}

fn read_header(image: &KernelFile) -> Result<Header, BootError> {
    let mut ehdr = [0u8; EHDR_LEN];
    image.read_exact_at(&mut ehdr, 0, "truncated ELF header")?;
    // e_ident[EI_CLASS] is byte 4, e_ident[EI_DATA] byte 5.
    if ehdr[4] != ELFCLASS64 || ehdr[5] != ELFDATA2LSB || le_u16(&ehdr, 18) != EM_X86_64 {
        return Err(image.invalid("not a 64-bit little-endian x86_64 ELF"));
    }
    let header = Header {
        entry: le_u64(&ehdr, 24),
        phoff: le_u64(&ehdr, 32),
        phnum: le_u16(&ehdr, 56),
    };
    if usize::from(le_u16(&ehdr, 54)) != PHDR_LEN {
        return Err(image.invalid("unexpected ELF program header size"));
    }
    if header.phoff < EHDR_LEN as u64 {
        return Err(image.invalid("ELF program headers overlap the ELF header"));
    }
    if header.phnum == 0 {
        return Err(image.invalid("ELF has no program headers"));
    }
    Ok(header)
}

fn read_segments(image: &KernelFile, header: &Header) -> Result<Vec<Segment>, BootError> {
    // At most 65535 × 56 bytes (3.5 MiB), and only if the file holds them:
    // read_exact_at checks the range against the file length first.
    let mut table = vec![0u8; usize::from(header.phnum) * PHDR_LEN];
    image.read_exact_at(
        &mut table,
        header.phoff,
        "ELF program headers extend past the end of the file",
    )?;
    Ok(table
        .chunks_exact(PHDR_LEN)
        .map(|phdr| Segment {
            kind: le_u32(phdr, 0),
            offset: le_u64(phdr, 8),
            paddr: le_u64(phdr, 24),
            filesz: le_u64(phdr, 32),
            memsz: le_u64(phdr, 40),
        })
        .collect())
}

/// Check every segment linux-loader will read; return the span
/// `[start, end)` the loadable segments occupy in guest memory.
fn check_segments(
    image: &KernelFile,
    segments: &[Segment],
    low_ram_end: u64,
) -> Result<(u64, u64), BootError> {
    let mut span: Option<(u64, u64)> = None;
    for seg in segments {
        if seg.kind != PT_LOAD && seg.kind != PT_NOTE {
            continue;
        }
        let in_file = seg
            .offset
            .checked_add(seg.filesz)
            .is_some_and(|end| end <= image.len);
        if !in_file {
            return Err(image.invalid("ELF segment extends past the end of the file"));
        }
        if seg.kind != PT_LOAD || (seg.memsz == 0 && seg.filesz == 0) {
            continue;
        }
        if seg.filesz > seg.memsz {
            return Err(image.invalid("ELF segment file size exceeds its memory size"));
        }
        if seg.paddr < KERNEL_START.0 {
            return Err(BootError::Overlap {
                what: "ELF segment below 1 MiB",
            });
        }
        let end = check_kernel_fits(seg.paddr.checked_add(seg.memsz), low_ram_end)?;
        span = Some(match span {
            None => (seg.paddr, end),
            Some((lo, hi)) => (lo.min(seg.paddr), hi.max(end)),
        });
    }
    span.ok_or_else(|| image.invalid("ELF has no loadable segment"))
}

fn le_u16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn le_u32(bytes: &[u8], at: usize) -> u32 {
    let mut raw = [0u8; 4];
    raw.copy_from_slice(&bytes[at..at + 4]);
    u32::from_le_bytes(raw)
}

fn le_u64(bytes: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(raw)
}
