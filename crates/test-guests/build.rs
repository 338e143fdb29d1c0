//! Build script of `chitin-test-guests`: assembles and links the test guests
//! in `guests/` into `$OUT_DIR` with the system's `gcc` (as the assembler
//! driver, for its C preprocessor), `ld` and `objcopy`.
//!
//! Outputs, all in `$OUT_DIR`:
//! - `report.elf`, `smp.elf`, `triple_fault.elf`, `spin.elf`, `echo.elf`,
//!   `pvh.elf`, `vsock_hostile.elf`, `flood.elf`, `acpi.elf`, `idle.elf`,
//!   `counter.elf`: static ELF64 images linked at 1 MiB
//!   (`guests/guest.lds.S`);
//! - `report.bzimage`: the `report` guest as a Linux bzImage, i.e. the setup
//!   sectors of `guests/bzimage_setup.S` followed by the flat image of
//!   `report_bz.elf` (`report.S` assembled with `-DBZIMAGE`);
//! - intermediates (`*.o`, `*.lds`, `report_bz.elf`, `*.bin`).
//!
//! It must never produce an image silently different from its sources: every
//! tool runs with warnings as errors, and a missing tool stops the build with
//! a message naming the package to install.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Size of a setup sector of a bzImage (Documentation/x86/boot.rst).
const SECTOR_SIZE: usize = 512;

/// Offset of `setup_sects` in a bzImage (boot.rst, real-mode kernel header).
const SETUP_SECTS_OFFSET: usize = 0x1f1;

/// Granularity `init_size` is rounded up to: a page, so the loader reserves
/// whole pages for the kernel.
const INIT_SIZE_ALIGN: usize = 4096;

/// Width of the `syssize` unit: 16-byte paragraphs (boot.rst, `syssize`).
const PARAGRAPH: usize = 16;

/// Tools the build needs, each with the Debian package that provides it.
const TOOLS: [(&str, &str); 3] = [("gcc", "gcc"), ("ld", "binutils"), ("objcopy", "binutils")];

/// One ELF guest: the output name, its source, extra preprocessor defines and
/// whether it carries the PVH note (and so needs the PT_NOTE program header).
struct ElfGuest {
    /// Output file stem: `$OUT_DIR/<stem>.elf`.
    stem: &'static str,
    /// Source file in `guests/`.
    source: &'static str,
    /// `-D` defines passed to the preprocessor.
    defines: &'static [&'static str],
    /// Link with the PT_NOTE program header for the Xen PVH note.
    pvh_note: bool,
}

/// Every ELF image the crate exposes, plus the bzImage's protected-mode part.
const ELF_GUESTS: [ElfGuest; 12] = [
    ElfGuest {
        stem: "report",
        source: "report.S",
        defines: &[],
        pvh_note: false,
    },
    ElfGuest {
        stem: "report_bz",
        source: "report.S",
        defines: &["BZIMAGE"],
        pvh_note: false,
    },
    ElfGuest {
        stem: "smp",
        source: "smp.S",
        defines: &[],
        pvh_note: false,
    },
    ElfGuest {
        stem: "triple_fault",
        source: "triple_fault.S",
        defines: &[],
        pvh_note: false,
    },
    ElfGuest {
        stem: "spin",
        source: "spin.S",
        defines: &[],
        pvh_note: false,
    },
    ElfGuest {
        stem: "echo",
        source: "echo.S",
        defines: &[],
        pvh_note: false,
    },
    ElfGuest {
        stem: "pvh",
        source: "pvh.S",
        defines: &[],
        pvh_note: true,
    },
    ElfGuest {
        stem: "vsock_hostile",
        source: "vsock_hostile.S",
        defines: &[],
        pvh_note: false,
    },
    ElfGuest {
        stem: "flood",
        source: "flood.S",
        defines: &[],
        pvh_note: false,
    },
    ElfGuest {
        stem: "acpi",
        source: "acpi.S",
        defines: &[],
        pvh_note: false,
    },
    ElfGuest {
        stem: "idle",
        source: "idle.S",
        defines: &[],
        pvh_note: false,
    },
    ElfGuest {
        stem: "counter",
        source: "counter.S",
        defines: &[],
        pvh_note: false,
    },
];

/// Every file in `guests/` the images are built from.
const SOURCES: [&str; 15] = [
    "defs.h",
    "common.S",
    "guest.lds.S",
    "report.S",
    "smp.S",
    "triple_fault.S",
    "spin.S",
    "echo.S",
    "pvh.S",
    "vsock_hostile.S",
    "flood.S",
    "acpi.S",
    "idle.S",
    "counter.S",
    "bzimage_setup.S",
];

fn main() {
    if let Err(message) = run() {
        eprintln!("error: chitin-test-guests: {message}");
        std::process::exit(1);
    }
}

/// Builds every image, or says what stopped it.
fn run() -> Result<(), String> {
    let manifest_dir = env::var_os("CARGO_MANIFEST_DIR").ok_or("CARGO_MANIFEST_DIR is not set")?;
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    let src_dir = Path::new(&manifest_dir).join("guests");

    println!("cargo:rerun-if-changed=build.rs");
    for source in SOURCES {
        println!("cargo:rerun-if-changed={}", src_dir.join(source).display());
    }

    for (tool, package) in TOOLS {
        check_tool(tool, package)?;
    }

    let guest_lds = preprocess_linker_script(&src_dir, &out_dir, "guest.lds", false)?;
    let pvh_lds = preprocess_linker_script(&src_dir, &out_dir, "pvh.lds", true)?;

    for guest in &ELF_GUESTS {
        let object = out_dir.join(format!("{}.o", guest.stem));
        assemble(
            &src_dir,
            &src_dir.join(guest.source),
            guest.defines,
            &object,
        )?;
        let script = if guest.pvh_note { &pvh_lds } else { &guest_lds };
        let elf = out_dir.join(format!("{}.elf", guest.stem));
        run_tool(
            Command::new("ld")
                .args(["-m", "elf_x86_64", "-nostdlib", "--build-id=none"])
                .args(["-z", "max-page-size=0x1000", "--fatal-warnings"])
                .arg("-T")
                .arg(script)
                .arg("-o")
                .arg(&elf)
                .arg(&object),
        )?;
    }

    build_bzimage(&src_dir, &out_dir)
}

/// Fails with an install hint unless `tool --version` runs.
fn check_tool(tool: &str, package: &str) -> Result<(), String> {
    match Command::new(tool).arg("--version").output() {
        Ok(output) if output.status.success() => Ok(()),
        _ => Err(format!(
            "`{tool}` is needed to assemble the x86_64 test guests but could not be run; \
             install it (Debian/Ubuntu: `apt-get install {package}`) and make sure it is on PATH"
        )),
    }
}

/// Runs the C preprocessor over `guests/guest.lds.S`, with `-DPVH_NOTE` when
/// `pvh_note`, into `$OUT_DIR/<name>`.
fn preprocess_linker_script(
    src_dir: &Path,
    out_dir: &Path,
    name: &str,
    pvh_note: bool,
) -> Result<PathBuf, String> {
    let output = out_dir.join(name);
    let mut command = Command::new("gcc");
    // -undef: no predefined macros, so `i386` or `linux` in the script stay
    // words; -P: no line markers, which ld cannot parse.
    command
        .args(["-E", "-P", "-undef", "-x", "c", "-nostdinc", "-Werror"])
        .arg("-I")
        .arg(src_dir);
    if pvh_note {
        command.arg("-DPVH_NOTE");
    }
    command
        .arg("-o")
        .arg(&output)
        .arg(src_dir.join("guest.lds.S"));
    run_tool(&mut command)?;
    Ok(output)
}

/// Assembles `source` (preprocessed, with `-D<define>` for each of `defines`)
/// into the object file `object`.
fn assemble(src_dir: &Path, source: &Path, defines: &[&str], object: &Path) -> Result<(), String> {
    let mut command = Command::new("gcc");
    command
        .args([
            "-c",
            "-m64",
            "-x",
            "assembler-with-cpp",
            "-nostdinc",
            "-Wall",
            "-Werror",
        ])
        .arg("-Wa,--fatal-warnings")
        .arg("-I")
        .arg(src_dir);
    for define in defines {
        command.arg(format!("-D{define}"));
    }
    command.arg("-o").arg(object).arg(source);
    run_tool(&mut command)
}

/// Builds `$OUT_DIR/report.bzimage`: setup sectors, then the flat image of
/// `report_bz.elf` as the protected-mode part loaded at `code32_start`.
fn build_bzimage(src_dir: &Path, out_dir: &Path) -> Result<(), String> {
    let protected_mode_bin = out_dir.join("report_bz.bin");
    run_tool(
        Command::new("objcopy")
            .args(["-O", "binary"])
            .arg(out_dir.join("report_bz.elf"))
            .arg(&protected_mode_bin),
    )?;
    let protected_mode = read(&protected_mode_bin)?;

    // boot.rst: syssize is the protected-mode code size in 16-byte
    // paragraphs; init_size the memory the kernel needs from its load
    // address before it reads the memory map. The image stores its zeroed
    // data (see guest.lds.S), so its file size is all it needs.
    let syssize = protected_mode.len().div_ceil(PARAGRAPH);
    let init_size = protected_mode.len().div_ceil(INIT_SIZE_ALIGN) * INIT_SIZE_ALIGN;

    let setup_object = out_dir.join("bzimage_setup.o");
    assemble(
        src_dir,
        &src_dir.join("bzimage_setup.S"),
        &[
            &format!("SYSSIZE={syssize:#x}"),
            &format!("INIT_SIZE={init_size:#x}"),
        ],
        &setup_object,
    )?;
    let setup_elf = out_dir.join("bzimage_setup.elf");
    run_tool(
        Command::new("ld")
            .args([
                "-m",
                "elf_x86_64",
                "-nostdlib",
                "--build-id=none",
                "--fatal-warnings",
            ])
            .args(["-Ttext=0", "-e", "bootsect"])
            .arg("-o")
            .arg(&setup_elf)
            .arg(&setup_object),
    )?;
    let setup_bin = out_dir.join("bzimage_setup.bin");
    run_tool(
        Command::new("objcopy")
            .args(["-O", "binary", "-j", ".text"])
            .arg(&setup_elf)
            .arg(&setup_bin),
    )?;
    let setup = read(&setup_bin)?;

    // The loader finds the protected-mode part at (setup_sects + 1) * 512.
    let setup_sects = usize::from(
        *setup
            .get(SETUP_SECTS_OFFSET)
            .ok_or("setup part is too short")?,
    );
    if setup.len() != (setup_sects + 1) * SECTOR_SIZE {
        return Err(format!(
            "setup part is {} bytes, but setup_sects = {setup_sects} says {}",
            setup.len(),
            (setup_sects + 1) * SECTOR_SIZE
        ));
    }

    let mut image = setup;
    image.extend_from_slice(&protected_mode);
    let path = out_dir.join("report.bzimage");
    fs::write(&path, image).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// Reads a whole file, naming it on failure.
fn read(path: &Path) -> Result<Vec<u8>, String> {
    fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Runs `command`; on failure returns the command line and its output.
fn run_tool(command: &mut Command) -> Result<(), String> {
    let output = command
        .output()
        .map_err(|e| format!("cannot run {command:?}: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{command:?} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}
