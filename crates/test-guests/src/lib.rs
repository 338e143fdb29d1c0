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
}

impl Guest {
    /// Every guest, in declaration order.
    pub const ALL: [Guest; 7] = [
        Guest::Report,
        Guest::ReportBzImage,
        Guest::Smp,
        Guest::TripleFault,
        Guest::Spin,
        Guest::Echo,
        Guest::Pvh,
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
        }
    }
}
