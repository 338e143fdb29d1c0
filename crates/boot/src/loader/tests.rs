//! Tests of [`load_kernel`] on generated ELF and bzImage files.

use std::path::{Path, PathBuf};

use chitin_memory::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, PAGE_SIZE, PVH_INFO_START, PVH_MEMMAP_START, ZERO_PAGE_START,
};
use chitin_memory::{Backing, GuestRam};
use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress};

use super::pvh::XEN_HVM_START_MAGIC;
use super::zero_page::{e820_type, E820_RAM, E820_RESERVED};
use super::*;
use crate::build_cmdline;
use crate::test_utils::{
    pattern, BzImageFixture, ElfFixture, TempDir, FIXTURE_LOAD_ADDR, FIXTURE_PAYLOAD_LEN,
};

const MIB: u64 = 1 << 20;
/// Guest RAM of every test: 64 MiB, one region below the MMIO gap.
const RAM_SIZE: u64 = 64 * MIB;
/// The command line most tests boot with.
const CMDLINE: &str = "console=ttyS0 panic=1";

fn ram() -> GuestRam {
    GuestRam::new(RAM_SIZE, Backing::Anonymous).unwrap()
}

fn cmdline(text: &str) -> Cmdline {
    build_cmdline(text, &[], CMDLINE_MAX_SIZE).unwrap()
}

/// A temp dir with one kernel file in it.
struct Setup {
    dir: TempDir,
    kernel: PathBuf,
}

impl Setup {
    fn new(name: &str, bytes: &[u8]) -> Self {
        let dir = TempDir::new("loader").unwrap();
        let kernel = dir.write(name, bytes).unwrap();
        Self { dir, kernel }
    }

    fn initrd(&self, bytes: &[u8]) -> PathBuf {
        self.dir.write("initrd.img", bytes).unwrap()
    }

    fn load(&self, ram: &GuestRam, protocol: BootProtocol) -> Result<BootInfo, BootError> {
        load_with(ram, &self.kernel, None, &cmdline(CMDLINE), protocol)
    }
}

fn load_with(
    ram: &GuestRam,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &Cmdline,
    protocol: BootProtocol,
) -> Result<BootInfo, BootError> {
    let params = BootParams {
        kernel,
        initrd,
        cmdline,
        protocol,
        acpi_rsdp: None,
    };
    load_kernel(ram, &params)
}

/// Load `kernel` with an RSDP address to hand over.
fn load_with_rsdp(ram: &GuestRam, kernel: &Path, protocol: BootProtocol, rsdp: u64) {
    let cmdline = cmdline(CMDLINE);
    let params = BootParams {
        kernel,
        initrd: None,
        cmdline: &cmdline,
        protocol,
        acpi_rsdp: Some(rsdp),
    };
    load_kernel(ram, &params).unwrap();
}

/// Load `bytes` as the kernel with the Linux 64-bit protocol.
fn load_bytes(bytes: &[u8]) -> Result<BootInfo, BootError> {
    Setup::new("kernel", bytes).load(&ram(), BootProtocol::Linux64)
}

fn read_bytes(ram: &GuestRam, addr: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    ram.memory()
        .read_slice(&mut buf, GuestAddress(addr))
        .unwrap();
    buf
}

fn zero_page(ram: &GuestRam) -> boot_params {
    ram.memory()
        .read_obj(GuestAddress(ZERO_PAGE_START))
        .unwrap()
}

fn is_invalid(result: Result<BootInfo, BootError>) -> bool {
    matches!(result, Err(BootError::InvalidKernel { .. }))
}

// ---- ELF ----

#[test]
fn load_kernel_elf_loads_segment_at_paddr() {
    let fixture = ElfFixture::default();
    let setup = Setup::new("vmlinux", &fixture.to_bytes());
    let ram = ram();

    let info = setup.load(&ram, BootProtocol::Linux64).unwrap();

    assert_eq!(info.format, KernelFormat::Elf);
    assert_eq!(info.protocol, BootProtocol::Linux64);
    assert_eq!(info.entry, GuestAddress(FIXTURE_LOAD_ADDR));
    assert_eq!(
        info.kernel_end,
        FIXTURE_LOAD_ADDR + FIXTURE_PAYLOAD_LEN as u64
    );
    assert_eq!(
        read_bytes(&ram, FIXTURE_LOAD_ADDR, FIXTURE_PAYLOAD_LEN),
        fixture.payload
    );
}

#[test]
fn load_kernel_elf_entry_inside_segment_is_used() {
    // Entry 0x100 bytes into the segment.
    let fixture = ElfFixture {
        entry: FIXTURE_LOAD_ADDR + 0x100,
        ..ElfFixture::default()
    };
    let info = load_bytes(&fixture.to_bytes()).unwrap();
    assert_eq!(info.entry, GuestAddress(FIXTURE_LOAD_ADDR + 0x100));
}

#[test]
fn load_kernel_elf_bss_counts_in_kernel_end() {
    // 1 MiB of memory size for 8 KiB of file data: the rest is bss.
    let fixture = ElfFixture {
        memsz: Some(MIB),
        ..ElfFixture::default()
    };
    let info = load_bytes(&fixture.to_bytes()).unwrap();
    assert_eq!(info.kernel_end, FIXTURE_LOAD_ADDR + MIB);
}

#[test]
fn load_kernel_elf_entry_outside_segments_is_invalid() {
    let fixture = ElfFixture {
        entry: 32 * MIB,
        ..ElfFixture::default()
    };
    assert!(is_invalid(load_bytes(&fixture.to_bytes())));
}

#[test]
fn load_kernel_truncated_elf_header_is_invalid() {
    // The magic and 16 more bytes: detected as ELF, header cut short.
    let bytes = ElfFixture::default().to_bytes()[..20].to_vec();
    let err = load_bytes(&bytes).unwrap_err();
    assert!(
        matches!(err, BootError::InvalidKernel { reason, .. } if reason.contains("ELF header"))
    );
}

#[test]
fn load_kernel_truncated_elf_program_headers_is_invalid() {
    // The ELF header is whole, its program header is cut in half.
    let bytes = ElfFixture::default().to_bytes()[..64 + 28].to_vec();
    assert!(is_invalid(load_bytes(&bytes)));
}

#[test]
fn load_kernel_elf_32bit_class_is_invalid() {
    // ELFCLASS32 = 1.
    let fixture = ElfFixture {
        class: 1,
        ..ElfFixture::default()
    };
    assert!(is_invalid(load_bytes(&fixture.to_bytes())));
}

#[test]
fn load_kernel_elf_filesz_beyond_file_is_invalid() {
    // The segment claims 1 MiB of file data; the file holds 8 KiB.
    let fixture = ElfFixture {
        filesz: Some(MIB),
        memsz: Some(MIB),
        ..ElfFixture::default()
    };
    let err = load_bytes(&fixture.to_bytes()).unwrap_err();
    assert!(
        matches!(err, BootError::InvalidKernel { reason, .. } if reason.contains("end of the file"))
    );
}

#[test]
fn load_kernel_elf_filesz_above_memsz_is_invalid() {
    let fixture = ElfFixture {
        memsz: Some(16),
        ..ElfFixture::default()
    };
    assert!(is_invalid(load_bytes(&fixture.to_bytes())));
}

#[test]
fn load_kernel_elf_absurd_memsz_does_not_fit() {
    // 1 TiB of bss.
    let fixture = ElfFixture {
        memsz: Some(1 << 40),
        ..ElfFixture::default()
    };
    let err = load_bytes(&fixture.to_bytes()).unwrap_err();
    assert!(matches!(
        err,
        BootError::KernelDoesNotFit { end, limit }
            if end == FIXTURE_LOAD_ADDR + (1 << 40) && limit == RAM_SIZE
    ));
}

#[test]
fn load_kernel_elf_memsz_overflowing_address_does_not_fit() {
    let fixture = ElfFixture {
        memsz: Some(u64::MAX),
        ..ElfFixture::default()
    };
    assert!(matches!(
        load_bytes(&fixture.to_bytes()),
        Err(BootError::KernelDoesNotFit { end: u64::MAX, .. })
    ));
}

#[test]
fn load_kernel_elf_segment_below_1m_overlaps() {
    // 0x7000: right over the zero page.
    let fixture = ElfFixture {
        load_addr: ZERO_PAGE_START,
        entry: ZERO_PAGE_START,
        ..ElfFixture::default()
    };
    assert!(matches!(
        load_bytes(&fixture.to_bytes()),
        Err(BootError::Overlap { .. })
    ));
}

#[test]
fn load_kernel_elf_bigger_than_ram_does_not_fit() {
    // Arrange: a segment with 64 MiB of file data; the file is extended
    // sparsely so the test writes only the headers.
    let big = RAM_SIZE;
    let fixture = ElfFixture {
        payload: Vec::new(),
        filesz: Some(big),
        memsz: Some(big),
        ..ElfFixture::default()
    };
    let setup = Setup::new("vmlinux", &fixture.to_bytes());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&setup.kernel)
        .unwrap();
    file.set_len(0x1000 + big).unwrap();

    let err = setup.load(&ram(), BootProtocol::Linux64).unwrap_err();

    assert!(matches!(err, BootError::KernelDoesNotFit { limit, .. } if limit == RAM_SIZE));
}

// ---- bzImage ----

#[test]
fn load_kernel_bzimage_loads_protected_mode_part_at_1m() {
    let fixture = BzImageFixture::default();
    let setup = Setup::new("bzImage", &fixture.to_bytes());
    let ram = ram();

    let info = setup.load(&ram, BootProtocol::Linux64).unwrap();

    assert_eq!(info.format, KernelFormat::BzImage);
    // The 64-bit entry is 0x200 bytes into the protected-mode part.
    assert_eq!(info.entry, GuestAddress(FIXTURE_LOAD_ADDR + 0x200));
    assert_eq!(
        info.kernel_end,
        FIXTURE_LOAD_ADDR + FIXTURE_PAYLOAD_LEN as u64
    );
    assert_eq!(
        read_bytes(&ram, FIXTURE_LOAD_ADDR, FIXTURE_PAYLOAD_LEN),
        fixture.payload
    );
}

#[test]
fn load_kernel_bzimage_named_elf_is_detected_by_content() {
    let setup = Setup::new("kernel.elf", &BzImageFixture::default().to_bytes());
    let info = setup.load(&ram(), BootProtocol::Linux64).unwrap();
    assert_eq!(info.format, KernelFormat::BzImage);
}

#[test]
fn load_kernel_bzimage_zero_setup_sects_means_four() {
    let fixture = BzImageFixture {
        setup_sects: 0,
        ..BzImageFixture::default()
    };
    assert_eq!(fixture.setup_len(), 5 * 512);
    let setup = Setup::new("bzImage", &fixture.to_bytes());
    let ram = ram();
    setup.load(&ram, BootProtocol::Linux64).unwrap();
    assert_eq!(
        read_bytes(&ram, FIXTURE_LOAD_ADDR, FIXTURE_PAYLOAD_LEN),
        fixture.payload
    );
}

#[test]
fn load_kernel_bzimage_without_64bit_entry_is_rejected() {
    let fixture = BzImageFixture {
        xloadflags: 0,
        ..BzImageFixture::default()
    };
    assert!(matches!(
        load_bytes(&fixture.to_bytes()),
        Err(BootError::No64BitEntry { .. })
    ));
}

#[test]
fn load_kernel_bzimage_before_protocol_2_12_is_rejected() {
    // 2.11 has no xloadflags, so no 64-bit entry, whatever the byte says.
    let fixture = BzImageFixture {
        version: 0x020b,
        ..BzImageFixture::default()
    };
    assert!(matches!(
        load_bytes(&fixture.to_bytes()),
        Err(BootError::No64BitEntry { .. })
    ));
}

#[test]
fn load_kernel_bzimage_not_loaded_high_is_invalid() {
    let fixture = BzImageFixture {
        loadflags: 0,
        ..BzImageFixture::default()
    };
    assert!(is_invalid(load_bytes(&fixture.to_bytes())));
}

#[test]
fn load_kernel_truncated_bzimage_is_invalid() {
    // Signatures present, file cut inside the setup header.
    let bytes = BzImageFixture::default().to_bytes()[..0x210].to_vec();
    assert!(is_invalid(load_bytes(&bytes)));
}

#[test]
fn load_kernel_bzimage_without_kernel_part_is_invalid() {
    // A whole setup part with nothing after it.
    let fixture = BzImageFixture {
        payload: Vec::new(),
        ..BzImageFixture::default()
    };
    assert!(is_invalid(load_bytes(&fixture.to_bytes())));
}

#[test]
fn load_kernel_bzimage_huge_setup_sects_is_invalid() {
    // 255 setup sectors (the largest value) = 128 KiB more than the file.
    let fixture = BzImageFixture {
        setup_sects: 1,
        ..BzImageFixture::default()
    };
    let mut bytes = fixture.to_bytes();
    bytes[0x1f1] = 255;
    assert!(is_invalid(load_bytes(&bytes)));
}

#[test]
fn load_kernel_bzimage_bigger_than_ram_does_not_fit() {
    // 80 MiB file extended sparsely: more than the 64 MiB of RAM.
    let setup = Setup::new("bzImage", &BzImageFixture::default().to_bytes());
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&setup.kernel)
        .unwrap();
    file.set_len(80 * MIB).unwrap();
    assert!(matches!(
        setup.load(&ram(), BootProtocol::Linux64),
        Err(BootError::KernelDoesNotFit { .. })
    ));
}

#[test]
fn load_kernel_bzimage_absurd_init_size_does_not_fit() {
    // init_size 4 GiB - 1: the decompressed kernel cannot fit.
    let fixture = BzImageFixture {
        init_size: u32::MAX,
        ..BzImageFixture::default()
    };
    assert!(matches!(
        load_bytes(&fixture.to_bytes()),
        Err(BootError::KernelDoesNotFit { .. })
    ));
}

#[test]
fn load_kernel_bzimage_small_cmdline_size_rejects_longer_line() {
    // The kernel accepts 8 bytes; "console=ttyS0 panic=1" has 21.
    let fixture = BzImageFixture {
        cmdline_size: 8,
        ..BzImageFixture::default()
    };
    assert!(matches!(
        load_bytes(&fixture.to_bytes()),
        Err(BootError::CmdlineTooLong { len: 21, max: 8 })
    ));
}

#[test]
fn load_kernel_bzimage_cmdline_at_kernel_limit_is_accepted() {
    let fixture = BzImageFixture {
        cmdline_size: CMDLINE.len() as u32,
        ..BzImageFixture::default()
    };
    assert!(load_bytes(&fixture.to_bytes()).is_ok());
}

#[test]
fn load_kernel_bzimage_zero_page_keeps_kernel_header() {
    let setup = Setup::new("bzImage", &BzImageFixture::default().to_bytes());
    let ram = ram();
    setup.load(&ram, BootProtocol::Linux64).unwrap();
    let params = zero_page(&ram);
    assert_eq!({ params.hdr.version }, 0x020f);
    assert_eq!({ params.hdr.cmdline_size }, 2047);
    assert_eq!({ params.hdr.code32_start }, FIXTURE_LOAD_ADDR as u32);
    assert_eq!({ params.hdr.type_of_loader }, 0xff);
    assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
}

// ---- detection ----

#[test]
fn load_kernel_empty_file_is_not_a_kernel() {
    assert!(matches!(load_bytes(&[]), Err(BootError::NotAKernel { .. })));
}

#[test]
fn load_kernel_random_bytes_are_not_a_kernel() {
    let bytes = pattern(0x4000, 0x5a);
    assert!(matches!(
        load_bytes(&bytes),
        Err(BootError::NotAKernel { .. })
    ));
}

#[test]
fn load_kernel_wrong_elf_magic_is_not_a_kernel() {
    let mut bytes = ElfFixture::default().to_bytes();
    bytes[1] = b'X';
    assert!(matches!(
        load_bytes(&bytes),
        Err(BootError::NotAKernel { .. })
    ));
}

#[test]
fn load_kernel_wrong_hdrs_magic_is_not_a_kernel() {
    let mut bytes = BzImageFixture::default().to_bytes();
    bytes[0x202] = b'X';
    assert!(matches!(
        load_bytes(&bytes),
        Err(BootError::NotAKernel { .. })
    ));
}

#[test]
fn load_kernel_not_a_kernel_message_names_path() {
    let setup = Setup::new("junk.bin", b"not a kernel");
    let err = setup.load(&ram(), BootProtocol::Linux64).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "kernel image is neither ELF nor bzImage: {}",
            setup.kernel.display()
        )
    );
}

#[test]
fn load_kernel_missing_file_is_open_error() {
    let dir = TempDir::new("missing").unwrap();
    let path = dir.path().join("no-such-kernel");
    let result = load_with(
        &ram(),
        &path,
        None,
        &cmdline(CMDLINE),
        BootProtocol::Linux64,
    );
    assert!(matches!(result, Err(BootError::OpenKernel { path: p, .. }) if p == path));
}

#[test]
fn load_kernel_directory_is_read_error() {
    let dir = TempDir::new("dir").unwrap();
    let result = load_with(
        &ram(),
        dir.path(),
        None,
        &cmdline(CMDLINE),
        BootProtocol::Linux64,
    );
    assert!(matches!(result, Err(BootError::ReadKernel { .. })));
}

// ---- PVH ----

#[test]
fn load_kernel_pvh_without_note_is_rejected() {
    let setup = Setup::new("vmlinux", &ElfFixture::default().to_bytes());
    assert!(matches!(
        setup.load(&ram(), BootProtocol::Pvh),
        Err(BootError::NoPvhEntry { .. })
    ));
}

#[test]
fn load_kernel_pvh_bzimage_is_rejected() {
    let setup = Setup::new("bzImage", &BzImageFixture::default().to_bytes());
    assert!(matches!(
        setup.load(&ram(), BootProtocol::Pvh),
        Err(BootError::NoPvhEntry { .. })
    ));
}

/// An ELF whose PVH entry is 0x40 bytes into its segment.
fn pvh_elf() -> ElfFixture {
    ElfFixture {
        pvh_entry: Some(FIXTURE_LOAD_ADDR as u32 + 0x40),
        ..ElfFixture::default()
    }
}

#[test]
fn load_kernel_pvh_with_note_uses_note_entry() {
    let setup = Setup::new("vmlinux", &pvh_elf().to_bytes());
    let info = setup.load(&ram(), BootProtocol::Pvh).unwrap();
    assert_eq!(info.protocol, BootProtocol::Pvh);
    assert_eq!(info.entry, GuestAddress(FIXTURE_LOAD_ADDR + 0x40));
}

#[test]
fn load_kernel_linux64_with_pvh_note_uses_elf_entry() {
    let setup = Setup::new("vmlinux", &pvh_elf().to_bytes());
    let info = setup.load(&ram(), BootProtocol::Linux64).unwrap();
    assert_eq!(info.entry, GuestAddress(FIXTURE_LOAD_ADDR));
}

#[test]
fn load_kernel_pvh_writes_start_info_and_memmap() {
    let setup = Setup::new("vmlinux", &pvh_elf().to_bytes());
    let ram = ram();

    setup.load(&ram, BootProtocol::Pvh).unwrap();

    let mem = ram.memory();
    let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
    assert_eq!(info.magic, 0x336e_c578);
    assert_eq!(info.magic, XEN_HVM_START_MAGIC);
    assert_eq!(info.version, 1);
    assert_eq!(info.cmdline_paddr, CMDLINE_START);
    assert_eq!(info.memmap_paddr, PVH_MEMMAP_START);
    assert_eq!(info.nr_modules, 0);
    assert_eq!(info.rsdp_paddr, 0, "no ACPI tables, no RSDP");
    let map = ram.layout().address_map();
    assert_eq!(info.memmap_entries as usize, map.len());
    for (i, range) in map.iter().enumerate() {
        let addr = PVH_MEMMAP_START + (i * size_of::<hvm_memmap_table_entry>()) as u64;
        let entry: hvm_memmap_table_entry = mem.read_obj(GuestAddress(addr)).unwrap();
        assert_eq!(entry.addr, range.start);
        assert_eq!(entry.size, range.len);
        assert_eq!(entry.type_, e820_type(range.kind));
    }
}

#[test]
fn the_rsdp_address_is_handed_over_in_zero_page_and_start_info() {
    let ram = ram();
    let elf = Setup::new("vmlinux", &pvh_elf().to_bytes());
    load_with_rsdp(&ram, &elf.kernel, BootProtocol::Pvh, 0xe_0000);
    let info: hvm_start_info = ram.memory().read_obj(GuestAddress(PVH_INFO_START)).unwrap();
    assert_eq!(info.rsdp_paddr, 0xe_0000);

    let ram = self::ram();
    load_with_rsdp(&ram, &elf.kernel, BootProtocol::Linux64, 0xe_0000);
    assert_eq!({ zero_page(&ram).acpi_rsdp_addr }, 0xe_0000);
    let ram = self::ram();
    elf.load(&ram, BootProtocol::Linux64).unwrap();
    assert_eq!({ zero_page(&ram).acpi_rsdp_addr }, 0);
}

#[test]
fn load_kernel_pvh_initrd_is_module_zero() {
    let setup = Setup::new("vmlinux", &pvh_elf().to_bytes());
    let initrd = setup.initrd(&pattern(3 * PAGE_SIZE as usize, 0x33));
    let ram = ram();

    let info = load_with(
        &ram,
        &setup.kernel,
        Some(&initrd),
        &cmdline(CMDLINE),
        BootProtocol::Pvh,
    )
    .unwrap();

    let mem = ram.memory();
    let start: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
    assert_eq!(start.nr_modules, 1);
    let module: hvm_modlist_entry = mem.read_obj(GuestAddress(start.modlist_paddr)).unwrap();
    assert_eq!(Some((module.paddr, module.size)), info.initrd);
}

// ---- command line and zero page ----

#[test]
fn load_kernel_writes_nul_terminated_cmdline() {
    let setup = Setup::new("vmlinux", &ElfFixture::default().to_bytes());
    let ram = ram();
    let info = setup.load(&ram, BootProtocol::Linux64).unwrap();
    assert_eq!(info.cmdline_len, CMDLINE.len());
    let written = read_bytes(&ram, CMDLINE_START, CMDLINE.len() + 1);
    assert_eq!(written, format!("{CMDLINE}\0").into_bytes());
}

#[test]
fn load_kernel_cmdline_over_reserved_space_is_too_long() {
    // A Cmdline built with a larger limit than the space at CMDLINE_START.
    let text = "a".repeat(CMDLINE_MAX_SIZE);
    let big = build_cmdline(&text, &[], 2 * CMDLINE_MAX_SIZE).unwrap();
    let setup = Setup::new("vmlinux", &ElfFixture::default().to_bytes());
    let result = load_with(&ram(), &setup.kernel, None, &big, BootProtocol::Linux64);
    assert!(matches!(
        result,
        Err(BootError::CmdlineTooLong { len, max })
            if len == CMDLINE_MAX_SIZE && max == CMDLINE_MAX_SIZE - 1
    ));
}

#[test]
fn load_kernel_zero_page_e820_matches_address_map() {
    let setup = Setup::new("vmlinux", &ElfFixture::default().to_bytes());
    let ram = ram();

    setup.load(&ram, BootProtocol::Linux64).unwrap();

    let params = zero_page(&ram);
    let map = ram.layout().address_map();
    assert_eq!(usize::from(params.e820_entries), map.len());
    let table = params.e820_table;
    for (entry, range) in table.iter().zip(&map) {
        assert_eq!({ entry.addr }, range.start);
        assert_eq!({ entry.size }, range.len);
        let expected = match range.kind {
            chitin_memory::layout::RangeKind::Ram => E820_RAM,
            chitin_memory::layout::RangeKind::Reserved => E820_RESERVED,
        };
        assert_eq!({ entry.type_ }, expected);
    }
}

#[test]
fn load_kernel_elf_zero_page_has_built_header() {
    let setup = Setup::new("vmlinux", &ElfFixture::default().to_bytes());
    let ram = ram();

    setup.load(&ram, BootProtocol::Linux64).unwrap();

    let hdr = zero_page(&ram).hdr;
    assert_eq!({ hdr.boot_flag }, 0xaa55);
    assert_eq!({ hdr.header }, 0x5372_6448); // "HdrS"
    assert_eq!({ hdr.type_of_loader }, 0xff);
    assert_eq!({ hdr.kernel_alignment }, 0x0100_0000);
    assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
    assert_eq!({ hdr.ramdisk_image }, 0);
    assert_eq!({ hdr.ramdisk_size }, 0);
}

// ---- initrd ----

#[test]
fn load_kernel_initrd_is_page_aligned_high_and_intact() {
    // 3 pages + 5 bytes, so the size is not page aligned.
    let contents = pattern(3 * PAGE_SIZE as usize + 5, 0x44);
    let setup = Setup::new("vmlinux", &ElfFixture::default().to_bytes());
    let initrd = setup.initrd(&contents);
    let ram = ram();

    let info = load_with(
        &ram,
        &setup.kernel,
        Some(&initrd),
        &cmdline(CMDLINE),
        BootProtocol::Linux64,
    )
    .unwrap();

    let (addr, size) = info.initrd.unwrap();
    assert_eq!(size, contents.len() as u64);
    assert_eq!(addr % PAGE_SIZE, 0);
    assert!(addr >= info.kernel_end);
    assert!(addr + size <= RAM_SIZE);
    // As high as possible: less than a page below the end of RAM.
    assert!(RAM_SIZE - (addr + size) < PAGE_SIZE);
    assert_eq!(read_bytes(&ram, addr, contents.len()), contents);
    let params = zero_page(&ram);
    assert_eq!(u64::from(params.hdr.ramdisk_image), addr);
    assert_eq!(u64::from(params.hdr.ramdisk_size), size);
}

#[test]
fn load_kernel_initrd_stays_below_initrd_addr_max() {
    // The kernel accepts the initrd only up to 16 MiB - 1.
    let fixture = BzImageFixture {
        initrd_addr_max: 0xff_ffff,
        ..BzImageFixture::default()
    };
    let setup = Setup::new("bzImage", &fixture.to_bytes());
    let initrd = setup.initrd(&pattern(PAGE_SIZE as usize, 0x55));

    let info = load_with(
        &ram(),
        &setup.kernel,
        Some(&initrd),
        &cmdline(CMDLINE),
        BootProtocol::Linux64,
    )
    .unwrap();

    let (addr, size) = info.initrd.unwrap();
    assert_eq!(addr + size, 16 * MIB);
}

#[test]
fn load_kernel_initrd_above_init_size() {
    // The bzImage needs 40 MiB from 1 MiB to decompress; initrd_addr_max
    // leaves room only if the initrd could go inside that footprint.
    let fixture = BzImageFixture {
        init_size: 40 * MIB as u32,
        initrd_addr_max: (40 * MIB) as u32,
        ..BzImageFixture::default()
    };
    let setup = Setup::new("bzImage", &fixture.to_bytes());
    let initrd = setup.initrd(&pattern(PAGE_SIZE as usize, 0x55));
    let result = load_with(
        &ram(),
        &setup.kernel,
        Some(&initrd),
        &cmdline(CMDLINE),
        BootProtocol::Linux64,
    );
    assert!(matches!(
        result,
        Err(BootError::InitrdDoesNotFit { available: 0, .. })
    ));
}

#[test]
fn load_kernel_initrd_too_large_does_not_fit() {
    // 64 MiB of initrd in 64 MiB of RAM: sparse, nothing is written.
    let setup = Setup::new("vmlinux", &ElfFixture::default().to_bytes());
    let initrd = setup.initrd(&[1]);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&initrd)
        .unwrap()
        .set_len(RAM_SIZE)
        .unwrap();

    let result = load_with(
        &ram(),
        &setup.kernel,
        Some(&initrd),
        &cmdline(CMDLINE),
        BootProtocol::Linux64,
    );

    assert!(matches!(
        result,
        Err(BootError::InitrdDoesNotFit { size, .. }) if size == RAM_SIZE
    ));
}

#[test]
fn load_kernel_empty_initrd_is_rejected() {
    let setup = Setup::new("vmlinux", &ElfFixture::default().to_bytes());
    let initrd = setup.initrd(&[]);
    let result = load_with(
        &ram(),
        &setup.kernel,
        Some(&initrd),
        &cmdline(CMDLINE),
        BootProtocol::Linux64,
    );
    assert!(matches!(result, Err(BootError::EmptyInitrd { .. })));
}

#[test]
fn load_kernel_missing_initrd_is_open_error() {
    let setup = Setup::new("vmlinux", &ElfFixture::default().to_bytes());
    let missing = setup.dir.path().join("no-initrd");
    let result = load_with(
        &ram(),
        &setup.kernel,
        Some(&missing),
        &cmdline(CMDLINE),
        BootProtocol::Linux64,
    );
    assert!(matches!(result, Err(BootError::OpenInitrd { .. })));
}
