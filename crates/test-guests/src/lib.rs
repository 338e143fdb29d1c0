//! Tiny x86_64 test guests for chitin's host-KVM tests.
//!
//! The guests are GNU assembler sources in `guests/`, assembled and linked by
//! `build.rs` with the system's `gcc` and binutils into `$OUT_DIR` at build
//! time, so the repository holds no binaries. This crate only tells tests
//! where the images are; it never runs them.
//!
//! # The contract a guest runs under
//!
//! The ELF guests are static ELF64 executables whose `PT_LOAD` segments are
//! linked at 1 MiB (physical == virtual). They expect the Linux 64-bit boot
//! protocol (Documentation/x86/boot.rst): long mode with the low 4 GiB
//! identity mapped, interrupts off, RSI pointing at `struct boot_params`, and
//! they switch to their own stack at once. They talk through a 16550 UART at
//! COM1 (port 0x3f8), find CPUs in an Intel MP table (MP spec 1.4) written at
//! 0x9fc00, and end with an i8042 pulse reset (`out 0x64, 0xfe`), so the VMM
//! stops with reason Reset. [`Guest::Pvh`] also has a PVH entry point, and
//! [`Guest::ReportBzImage`] is [`Guest::Report`] packaged as a bzImage.
//!
//! Every guest prints `chitin-test: <name>` as its first line, where `<name>`
//! is [`Guest::name`]; each variant documents the rest of its output.

#![deny(missing_docs)]

use std::path::Path;

/// A test guest built by build.rs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guest {
    /// Prints what the VMM handed over, then resets:
    ///
    /// ```text
    /// chitin-test: report
    /// cmdline: <command line at hdr.cmd_line_ptr; empty if the pointer is 0>
    /// e820: <boot_params.e820_entries, decimal>
    /// e820 <addr: 16 lower-case hex digits> <size: 16 hex digits> <type, decimal>
    /// cpus: <enabled processor entries in the MP table, decimal, or "none">
    /// done
    /// ```
    ///
    /// with one `e820 ...` line per entry (at most 128). `cpus: none` means no
    /// `_MP_` structure in 0x9fc00..0xa0000, a zero or out-of-range
    /// configuration table pointer, a bad checksum or an unknown entry type.
    Report,
    /// [`Guest::Report`] as a Linux bzImage (boot protocol 2.15, not
    /// relocatable, loaded at 1 MiB, `XLF_KERNEL_64`): same output when
    /// started at the 64-bit entry, 0x200 bytes into the protected-mode part.
    /// Its 32-bit entry (`code32_start`) prints `chitin-test: report`,
    /// `report: entered via 32-bit entry`, and its 16-bit setup code prints
    /// `chitin-test: report`, `report: entered via 16-bit setup`; both reset.
    ReportBzImage,
    /// Wakes every application processor with INIT-SIPI-SIPI and has each CPU
    /// print its LAPIC ID, then resets:
    ///
    /// ```text
    /// chitin-test: smp
    /// apic <LAPIC ID, decimal>    (once per CPU, the BSP first)
    /// done
    /// ```
    ///
    /// The number of CPUs comes from the MP table; without a valid one it
    /// prints `cpus: none` and resets. If the APs do not all report within a
    /// few seconds it prints `timeout` instead of `done` and resets.
    Smp,
    /// Prints `chitin-test: triple_fault`, loads an IDT with limit 0 and
    /// executes `ud2`: the vCPU shuts down (`KVM_EXIT_SHUTDOWN`).
    TripleFault,
    /// Prints `chitin-test: spin`, then loops forever with interrupts off and
    /// no VM exits, until the VMM stops it.
    Spin,
    /// Prints `chitin-test: echo` and `ready`, then writes back every byte it
    /// reads from COM1 (polling LSR bit 0). On `q`, which it does not echo,
    /// it prints `"\nbye\n"` and resets.
    Echo,
    /// An ELF with a Xen `XEN_ELFNOTE_PHYS32_ENTRY` note (PVH boot). Started
    /// at the PVH entry it prints, then resets:
    ///
    /// ```text
    /// chitin-test: pvh
    /// pvh: magic ok               ("pvh: bad magic", then reset, otherwise)
    /// cmdline: <string at start_info.cmdline_paddr; empty if 0 or >= 4 GiB>
    /// memmap: <start_info.memmap_entries, decimal>
    /// done
    /// ```
    ///
    /// Started at its ELF `e_entry` (Linux 64-bit boot protocol) instead it
    /// prints `chitin-test: pvh`, `pvh: entered via 64-bit entry` and resets.
    Pvh,
    /// A hostile virtio-vsock driver: brings up the device in the first
    /// virtio-mmio window, posts four receive buffers, then makes four
    /// malformed transmit chains available at once (data shorter than the
    /// header says; a device-writable data descriptor; a header split in
    /// two with an unknown op; data outside guest memory), and prints:
    ///
    /// ```text
    /// chitin-test: vsock_hostile
    /// tx used <chains the device returned, decimal; 4 expected>
    /// rx used <receive buffers it filled (resets); 4 expected>
    /// int <InterruptStatus> <InterruptStatus after writing that back to
    ///     InterruptACK; 1 0 expected>
    /// done
    /// ```
    ///
    /// then resets. Without a vsock device in that window it prints `no
    /// vsock device` and resets. Needs 64 MiB of RAM.
    VsockHostile,
    /// Prints `chitin-test: flood`, writes 256 KiB to COM1 with `rep outsb`
    /// (lines of 63 `x` and a newline, 4 KiB per string instruction),
    /// prints `flood: done` and resets.
    Flood,
    /// Finds the ACPI tables from `boot_params.acpi_rsdp_addr` (RSDP, XSDT,
    /// FADT, MADT) and powers off through the FADT's sleep registers, as
    /// Linux does on a hardware-reduced machine:
    ///
    /// ```text
    /// chitin-test: acpi
    /// rsdp <RSDP address, 16 hex digits>
    /// madt cpus <enabled local APICs in the MADT, decimal>
    /// sleep <sleep control port> <sleep status port>   (16 hex digits each)
    /// poweroff
    /// ```
    ///
    /// and the VMM stops with reason PowerOff. Without tables it prints
    /// `acpi: no rsdp` (or `acpi: bad tables`) and resets; if the VMM
    /// ignores the power-off, `acpi: still running` and resets.
    Acpi,
    /// Prints `chitin-test: idle`, then halts with interrupts off: its vCPU
    /// sleeps in the kernel, costing no CPU, until the VMM stops it. The
    /// cheapest sandbox that stays alive (density figures).
    Idle,
    /// Prints `chitin-test: counter`, then `n 0`, `n 1`, ... forever, a
    /// busy wait between lines; the count is kept in guest memory, so a
    /// paused or restored VM shows whether it continued where it stopped.
    Counter,
}

impl Guest {
    /// Every guest, in declaration order.
    pub const ALL: [Guest; 12] = [
        Guest::Report,
        Guest::ReportBzImage,
        Guest::Smp,
        Guest::TripleFault,
        Guest::Spin,
        Guest::Echo,
        Guest::Pvh,
        Guest::VsockHostile,
        Guest::Flood,
        Guest::Acpi,
        Guest::Idle,
        Guest::Counter,
    ];

    /// Absolute path of the built image in `OUT_DIR`.
    pub fn path(self) -> &'static Path {
        let path = match self {
            Guest::Report => concat!(env!("OUT_DIR"), "/report.elf"),
            Guest::ReportBzImage => concat!(env!("OUT_DIR"), "/report.bzimage"),
            Guest::Smp => concat!(env!("OUT_DIR"), "/smp.elf"),
            Guest::TripleFault => concat!(env!("OUT_DIR"), "/triple_fault.elf"),
            Guest::Spin => concat!(env!("OUT_DIR"), "/spin.elf"),
            Guest::Echo => concat!(env!("OUT_DIR"), "/echo.elf"),
            Guest::Pvh => concat!(env!("OUT_DIR"), "/pvh.elf"),
            Guest::VsockHostile => concat!(env!("OUT_DIR"), "/vsock_hostile.elf"),
            Guest::Flood => concat!(env!("OUT_DIR"), "/flood.elf"),
            Guest::Acpi => concat!(env!("OUT_DIR"), "/acpi.elf"),
            Guest::Idle => concat!(env!("OUT_DIR"), "/idle.elf"),
            Guest::Counter => concat!(env!("OUT_DIR"), "/counter.elf"),
        };
        Path::new(path)
    }

    /// The name the guest prints in its first line, `chitin-test: <name>`.
    ///
    /// [`Guest::ReportBzImage`] is the `report` guest in another file format,
    /// so it prints, and returns, `report`.
    pub fn name(self) -> &'static str {
        match self {
            Guest::Report | Guest::ReportBzImage => "report",
            Guest::Smp => "smp",
            Guest::TripleFault => "triple_fault",
            Guest::Spin => "spin",
            Guest::Echo => "echo",
            Guest::Pvh => "pvh",
            Guest::VsockHostile => "vsock_hostile",
            Guest::Flood => "flood",
            Guest::Acpi => "acpi",
            Guest::Idle => "idle",
            Guest::Counter => "counter",
        }
    }
}

#[cfg(test)]
mod tests {
    //! Checks of the built files themselves: what a loader reads from them,
    //! without running anything.

    use std::collections::HashSet;
    use std::fs;

    use super::*;

    /// Physical load address of every image (Linux boot protocol: 1 MiB).
    const LOAD_ADDR: u64 = 0x10_0000;
    /// `cli; cld`: every entry point of every guest starts with these.
    const ENTRY_PROLOGUE: [u8; 2] = [0xfa, 0xfc];
    /// ELF `e_machine` of x86_64.
    const EM_X86_64: u16 = 62;
    /// ELF `e_type` of a static executable.
    const ET_EXEC: u16 = 2;
    /// `p_type` of a loadable segment.
    const PT_LOAD: u32 = 1;
    /// `p_type` of a note segment.
    const PT_NOTE: u32 = 4;
    /// Xen note type of the 32-bit PVH entry (xen/include/public/elfnote.h).
    const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
    /// Size of a bzImage setup sector.
    const SECTOR_SIZE: usize = 512;
    /// Offset of the 64-bit entry from the start of a bzImage's
    /// protected-mode part (boot.rst, 64-bit boot protocol).
    const BZIMAGE_ENTRY64_OFFSET: usize = 0x200;
    /// The protected-mode part of report.bzimage as an ELF, kept by build.rs.
    const REPORT_BZ_ELF: &str = concat!(env!("OUT_DIR"), "/report_bz.elf");

    /// Every guest that is an ELF file.
    const ELF_GUESTS: [Guest; 11] = [
        Guest::Report,
        Guest::Smp,
        Guest::TripleFault,
        Guest::Spin,
        Guest::Echo,
        Guest::Pvh,
        Guest::VsockHostile,
        Guest::Flood,
        Guest::Acpi,
        Guest::Idle,
        Guest::Counter,
    ];

    fn u16_at(bytes: &[u8], offset: usize) -> u16 {
        u16::from_le_bytes(bytes[offset..offset + 2].try_into().unwrap())
    }

    fn u32_at(bytes: &[u8], offset: usize) -> u32 {
        u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap())
    }

    fn u64_at(bytes: &[u8], offset: usize) -> u64 {
        u64::from_le_bytes(bytes[offset..offset + 8].try_into().unwrap())
    }

    /// The ELF64 program header fields these tests look at.
    #[derive(Debug)]
    struct Segment {
        kind: u32,
        offset: usize,
        vaddr: u64,
        paddr: u64,
        filesz: usize,
        memsz: usize,
    }

    /// The ELF64 header fields these tests look at, plus the file.
    struct Elf {
        bytes: Vec<u8>,
        kind: u16,
        machine: u16,
        entry: u64,
        segments: Vec<Segment>,
    }

    impl Elf {
        /// Parses an ELF64 little-endian file (System V gABI, ELF header and
        /// program header table), asserting what every guest must satisfy.
        fn read(path: &Path) -> Elf {
            let bytes = fs::read(path).unwrap();
            assert_eq!(&bytes[..4], b"\x7fELF", "{}: ELF magic", path.display());
            assert_eq!(bytes[4], 2, "{}: ELFCLASS64", path.display());
            assert_eq!(bytes[5], 1, "{}: ELFDATA2LSB", path.display());
            let phoff = usize::try_from(u64_at(&bytes, 0x20)).unwrap();
            let phentsize = usize::from(u16_at(&bytes, 0x36));
            let phnum = usize::from(u16_at(&bytes, 0x38));
            // linux-loader rejects any other program header size.
            assert_eq!(phentsize, 56, "{}: e_phentsize", path.display());
            let segments = (0..phnum)
                .map(|i| {
                    let ph = &bytes[phoff + i * phentsize..][..phentsize];
                    Segment {
                        kind: u32_at(ph, 0),
                        offset: usize::try_from(u64_at(ph, 8)).unwrap(),
                        vaddr: u64_at(ph, 16),
                        paddr: u64_at(ph, 24),
                        filesz: usize::try_from(u64_at(ph, 32)).unwrap(),
                        memsz: usize::try_from(u64_at(ph, 40)).unwrap(),
                    }
                })
                .collect();
            Elf {
                kind: u16_at(&bytes, 0x10),
                machine: u16_at(&bytes, 0x12),
                entry: u64_at(&bytes, 0x18),
                segments,
                bytes,
            }
        }

        fn segments_of(&self, kind: u32) -> impl Iterator<Item = &Segment> {
            self.segments.iter().filter(move |s| s.kind == kind)
        }

        /// `len` bytes the loader places at physical address `addr`.
        fn loaded_bytes(&self, addr: u64, len: usize) -> &[u8] {
            let segment = self
                .segments_of(PT_LOAD)
                .find(|s| s.paddr <= addr && addr + len as u64 <= s.paddr + s.filesz as u64)
                .unwrap_or_else(|| panic!("{addr:#x} is not loaded"));
            let start = segment.offset + usize::try_from(addr - segment.paddr).unwrap();
            &self.bytes[start..start + len]
        }

        /// Guest memory from LOAD_ADDR up to the last loaded byte, as the
        /// loader leaves it (gaps zero).
        fn flat_image(&self) -> Vec<u8> {
            let mut image = Vec::new();
            for segment in self.segments_of(PT_LOAD) {
                let start = usize::try_from(segment.paddr - LOAD_ADDR).unwrap();
                let end = start + segment.filesz;
                if image.len() < end {
                    image.resize(end, 0);
                }
                image[start..end]
                    .copy_from_slice(&self.bytes[segment.offset..segment.offset + segment.filesz]);
            }
            image
        }

        /// Every note as (name, type, descriptor), from every PT_NOTE.
        fn notes(&self) -> Vec<(Vec<u8>, u32, Vec<u8>)> {
            let mut notes = Vec::new();
            for segment in self.segments_of(PT_NOTE) {
                let data = &self.bytes[segment.offset..segment.offset + segment.filesz];
                let mut at = 0;
                // ELF note: u32 namesz, descsz, type; name and descriptor
                // each padded to 4 bytes.
                while at + 12 <= data.len() {
                    let namesz = u32_at(data, at) as usize;
                    let descsz = u32_at(data, at + 4) as usize;
                    let kind = u32_at(data, at + 8);
                    let name = data[at + 12..at + 12 + namesz].to_vec();
                    let desc_at = at + 12 + namesz.next_multiple_of(4);
                    let desc = data[desc_at..desc_at + descsz].to_vec();
                    notes.push((name, kind, desc));
                    at = desc_at + descsz.next_multiple_of(4);
                }
            }
            notes
        }
    }

    fn bzimage() -> Vec<u8> {
        fs::read(Guest::ReportBzImage.path()).unwrap()
    }

    /// The protected-mode part: everything after the (1 + setup_sects)
    /// setup sectors.
    fn protected_mode_part(image: &[u8]) -> &[u8] {
        let setup_sects = usize::from(image[0x1f1]);
        &image[(setup_sects + 1) * SECTOR_SIZE..]
    }

    #[test]
    fn path_of_every_guest_is_a_built_nonempty_file() {
        for guest in Guest::ALL {
            let metadata = fs::metadata(guest.path()).unwrap();

            assert!(metadata.is_file() && metadata.len() > 0, "{guest:?}");
        }
    }

    #[test]
    fn path_of_every_guest_is_absolute_and_distinct() {
        let paths: HashSet<_> = Guest::ALL.iter().map(|g| g.path()).collect();

        assert_eq!(paths.len(), Guest::ALL.len());
        assert!(paths.iter().all(|p| p.is_absolute()));
    }

    #[test]
    fn all_lists_every_guest_once() {
        for (i, guest) in Guest::ALL.iter().enumerate() {
            assert!(
                !Guest::ALL[i + 1..].contains(guest),
                "{guest:?} listed twice"
            );
        }
    }

    #[test]
    fn name_of_bzimage_flavour_is_report() {
        assert_eq!(Guest::ReportBzImage.name(), Guest::Report.name());
        assert_eq!(Guest::Report.name(), "report");
    }

    #[test]
    fn elf_guest_header_is_x86_64_executable_entered_at_1mib() {
        for guest in ELF_GUESTS {
            let elf = Elf::read(guest.path());

            assert_eq!(elf.kind, ET_EXEC, "{guest:?}");
            assert_eq!(elf.machine, EM_X86_64, "{guest:?}");
            assert_eq!(elf.entry, LOAD_ADDR, "{guest:?}");
            assert_eq!(elf.loaded_bytes(elf.entry, 2), ENTRY_PROLOGUE, "{guest:?}");
        }
    }

    #[test]
    fn elf_guest_segments_load_at_or_above_1mib_with_data_stored() {
        for guest in ELF_GUESTS {
            let elf = Elf::read(guest.path());

            assert!(elf.segments_of(PT_LOAD).count() > 0, "{guest:?}");
            for segment in elf.segments_of(PT_LOAD) {
                assert!(segment.paddr >= LOAD_ADDR, "{guest:?}: {segment:?}");
                assert_eq!(segment.paddr, segment.vaddr, "{guest:?}: {segment:?}");
                // Zeroed data is in the file: loaders copy p_filesz only.
                assert_eq!(segment.filesz, segment.memsz, "{guest:?}: {segment:?}");
            }
        }
    }

    #[test]
    fn pvh_guest_note_is_xen_phys32_entry_to_32bit_code() {
        let elf = Elf::read(Guest::Pvh.path());

        let notes = elf.notes();

        // linux-loader uses the last PT_NOTE it sees, so there is one.
        assert_eq!(elf.segments_of(PT_NOTE).count(), 1);
        let (_, _, desc) = notes
            .iter()
            .find(|(name, kind, _)| name == b"Xen\0" && *kind == XEN_ELFNOTE_PHYS32_ENTRY)
            .expect("Xen PHYS32_ENTRY note");
        let entry32 = u64::from(u32_at(desc, 0));
        assert_ne!(entry32, elf.entry);
        assert_eq!(elf.loaded_bytes(entry32, 2), ENTRY_PROLOGUE);
    }

    #[test]
    fn non_pvh_guest_has_no_note_segment() {
        for guest in ELF_GUESTS.into_iter().filter(|g| *g != Guest::Pvh) {
            let elf = Elf::read(guest.path());

            assert_eq!(elf.segments_of(PT_NOTE).count(), 0, "{guest:?}");
        }
    }

    #[test]
    fn bzimage_header_has_boot_protocol_magic_and_flags() {
        let image = bzimage();

        assert!(image[0x1f1] >= 1, "setup_sects");
        assert_eq!(u16_at(&image, 0x1fe), 0xaa55, "boot_flag");
        assert_eq!(&image[0x202..0x206], b"HdrS", "header");
        assert_eq!(u16_at(&image, 0x206), 0x020f, "version");
        assert_eq!(image[0x211] & 0x01, 0x01, "loadflags LOADED_HIGH");
        assert_eq!(u32_at(&image, 0x214), 0x10_0000, "code32_start");
        assert_eq!(u32_at(&image, 0x22c), 0x37ff_ffff, "initrd_addr_max");
        assert_eq!(u32_at(&image, 0x230), 0x20_0000, "kernel_alignment");
        assert_eq!(image[0x234], 0, "relocatable_kernel");
        assert_eq!(
            u16_at(&image, 0x236) & 0x0001,
            0x0001,
            "xloadflags XLF_KERNEL_64"
        );
        assert_eq!(u32_at(&image, 0x238), 2047, "cmdline_size");
        assert_eq!(u64_at(&image, 0x258), 0x10_0000, "pref_address");
    }

    #[test]
    fn bzimage_header_sizes_cover_protected_mode_part() {
        let image = bzimage();

        let protected_mode = protected_mode_part(&image);

        let syssize = u32_at(&image, 0x1f4) as usize;
        let init_size = u32_at(&image, 0x260) as usize;
        assert_eq!(
            syssize,
            protected_mode.len().div_ceil(16),
            "syssize in paragraphs"
        );
        assert!(init_size >= protected_mode.len(), "init_size");
    }

    #[test]
    fn bzimage_jump_at_0x200_lands_after_the_header() {
        let image = bzimage();

        // boot.rst: the two bytes at 0x200 are a short jump (0xeb, rel8),
        // which must skip the header, ending at 0x26c for version 2.15.
        assert_eq!(image[0x200], 0xeb);
        assert!(0x202 + usize::from(image[0x201]) >= 0x26c);
    }

    #[test]
    fn bzimage_protected_mode_part_has_64bit_entry_at_0x200() {
        let image = bzimage();
        let report_bz = Elf::read(Path::new(REPORT_BZ_ELF));

        let protected_mode = protected_mode_part(&image);

        assert_eq!(report_bz.entry, LOAD_ADDR + BZIMAGE_ENTRY64_OFFSET as u64);
        assert_eq!(protected_mode, report_bz.flat_image().as_slice());
        assert_eq!(
            protected_mode[BZIMAGE_ENTRY64_OFFSET..][..2],
            ENTRY_PROLOGUE
        );
        // The 32-bit entry (code32_start) is code too.
        assert_eq!(protected_mode[..2], ENTRY_PROLOGUE);
    }
}
