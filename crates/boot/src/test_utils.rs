//! Kernel image fixtures and temporary files, for tests only.
//!
//! [`ElfFixture`] and [`BzImageFixture`] build the smallest images the
//! loader accepts, with every header field a test may want to break exposed
//! as a public field. [`TempDir`] holds the files and removes them on drop.
//! Nothing here is used outside `#[cfg(test)]` or the `test-utils` feature.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use linux_loader::loader::bootparam::setup_header;
use vm_memory::ByteValued;

/// Where test kernels are loaded: 1 MiB, chitin's `HIMEM_START`.
pub const FIXTURE_LOAD_ADDR: u64 = 0x10_0000;
/// Size of the default fixture payload (two pages).
pub const FIXTURE_PAYLOAD_LEN: usize = 0x2000;

/// A directory under [`std::env::temp_dir`] unique to this process and
/// call, removed with its contents on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Create a fresh directory whose name contains `tag`.
    pub fn new(tag: &str) -> io::Result<Self> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let name = format!("chitin-boot-{tag}-{}-{n}", std::process::id());
        let path = std::env::temp_dir().join(name);
        fs::create_dir_all(&path)?;
        Ok(Self { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write `bytes` to a file `name` in the directory; return its path.
    pub fn write(&self, name: &str, bytes: &[u8]) -> io::Result<PathBuf> {
        let path = self.path.join(name);
        fs::write(&path, bytes)?;
        Ok(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Best effort: a leftover temp dir must not fail a test.
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// `len` bytes of a recognisable pattern (`seed`, `seed + 7`, ...), so a
/// test can tell where loaded bytes came from.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i as u8).wrapping_mul(7)))
        .collect()
}

/// A minimal 64-bit x86_64 ELF with one `PT_LOAD` segment and, optionally,
/// a PVH entry note.
#[derive(Debug, Clone)]
pub struct ElfFixture {
    /// `e_ident[EI_CLASS]`: 2 for 64-bit.
    pub class: u8,
    /// `e_entry`.
    pub entry: u64,
    /// `p_paddr` of the loadable segment.
    pub load_addr: u64,
    /// The segment's file contents.
    pub payload: Vec<u8>,
    /// `p_filesz`; `None` for the payload length.
    pub filesz: Option<u64>,
    /// `p_memsz`; `None` for the payload length.
    pub memsz: Option<u64>,
    /// Address in a `XEN_ELFNOTE_PHYS32_ENTRY` note, if any.
    pub pvh_entry: Option<u32>,
}

impl Default for ElfFixture {
    fn default() -> Self {
        Self {
            class: 2,
            entry: FIXTURE_LOAD_ADDR,
            load_addr: FIXTURE_LOAD_ADDR,
            payload: pattern(FIXTURE_PAYLOAD_LEN, 0x11),
            filesz: None,
            memsz: None,
            pvh_entry: None,
        }
    }
}

/// ELF64 header size.
const EHDR_LEN: usize = 64;
/// ELF64 program header size.
const PHDR_LEN: usize = 56;
/// Note: 12-byte header, "Xen\0" name, 4-byte descriptor.
const PVH_NOTE_LEN: usize = 12 + 4 + 4;
/// `XEN_ELFNOTE_PHYS32_ENTRY` (Xen `public/elfnote.h`).
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

impl ElfFixture {
    /// The image bytes: ELF header, program headers, note, payload.
    pub fn to_bytes(&self) -> Vec<u8> {
        let phnum = if self.pvh_entry.is_some() { 2 } else { 1 };
        let note_offset = EHDR_LEN + phnum * PHDR_LEN;
        let note_len = if self.pvh_entry.is_some() {
            PVH_NOTE_LEN
        } else {
            0
        };
        // Payload 16-byte aligned after the note.
        let payload_offset = (note_offset + note_len).next_multiple_of(16);
        let payload_len = self.payload.len() as u64;

        let mut out = Vec::new();
        // e_ident: magic, class, little-endian, version 1, padding.
        out.extend_from_slice(b"\x7fELF");
        out.extend_from_slice(&[self.class, 1, 1]);
        out.resize(16, 0);
        put16(&mut out, 2); // e_type: ET_EXEC
        put16(&mut out, 62); // e_machine: EM_X86_64
        put32(&mut out, 1); // e_version
        put64(&mut out, self.entry);
        put64(&mut out, EHDR_LEN as u64); // e_phoff
        put64(&mut out, 0); // e_shoff
        put32(&mut out, 0); // e_flags
        put16(&mut out, EHDR_LEN as u16); // e_ehsize
        put16(&mut out, PHDR_LEN as u16); // e_phentsize
        put16(&mut out, phnum as u16);
        put16(&mut out, 0); // e_shentsize
        put16(&mut out, 0); // e_shnum
        put16(&mut out, 0); // e_shstrndx
        debug_assert_eq!(out.len(), EHDR_LEN);

        phdr(
            &mut out,
            1, // PT_LOAD
            payload_offset as u64,
            self.load_addr,
            self.filesz.unwrap_or(payload_len),
            self.memsz.unwrap_or(payload_len),
        );
        if let Some(entry) = self.pvh_entry {
            // PT_NOTE, not loaded.
            phdr(&mut out, 4, note_offset as u64, 0, PVH_NOTE_LEN as u64, 0);
            put32(&mut out, 4); // n_namesz: "Xen\0"
            put32(&mut out, 4); // n_descsz: 32-bit address
            put32(&mut out, XEN_ELFNOTE_PHYS32_ENTRY);
            out.extend_from_slice(b"Xen\0");
            put32(&mut out, entry);
        }
        out.resize(payload_offset, 0);
        out.extend_from_slice(&self.payload);
        out
    }
}

fn phdr(out: &mut Vec<u8>, kind: u32, offset: u64, paddr: u64, filesz: u64, memsz: u64) {
    put32(out, kind);
    put32(out, 0x7); // p_flags: RWX
    put64(out, offset);
    put64(out, paddr); // p_vaddr
    put64(out, paddr);
    put64(out, filesz);
    put64(out, memsz);
    put64(out, 0x1000); // p_align
}

fn put16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// A minimal bzImage: setup sectors holding a setup header, then the
/// protected-mode payload.
#[derive(Debug, Clone)]
pub struct BzImageFixture {
    /// Setup sectors after the boot sector (0 means 4).
    pub setup_sects: u8,
    /// Boot protocol version, e.g. 0x020f for 2.15.
    pub version: u16,
    /// `loadflags` (bit 0: LOADED_HIGH).
    pub loadflags: u8,
    /// `xloadflags` (bit 0: XLF_KERNEL_64).
    pub xloadflags: u16,
    /// The kernel's command line limit, without the NUL.
    pub cmdline_size: u32,
    /// Highest address the initrd may occupy.
    pub initrd_addr_max: u32,
    /// Decompression footprint from the load address.
    pub init_size: u32,
    /// The protected-mode part.
    pub payload: Vec<u8>,
}

impl Default for BzImageFixture {
    fn default() -> Self {
        Self {
            setup_sects: 1,
            version: 0x020f,
            loadflags: 1,
            xloadflags: 1,
            cmdline_size: 2047,
            initrd_addr_max: 0x7fff_ffff,
            init_size: 0,
            payload: pattern(FIXTURE_PAYLOAD_LEN, 0x22),
        }
    }
}

/// File offset of the setup header.
const SETUP_HEADER_OFFSET: usize = 0x1f1;

impl BzImageFixture {
    /// Size of the setup part (boot sector plus setup sectors).
    pub fn setup_len(&self) -> usize {
        let sects = if self.setup_sects == 0 {
            4
        } else {
            usize::from(self.setup_sects)
        };
        (sects + 1) * 512
    }

    /// The image bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let header = setup_header {
            setup_sects: self.setup_sects,
            boot_flag: 0xaa55,
            header: 0x5372_6448, // "HdrS"
            version: self.version,
            loadflags: self.loadflags,
            code32_start: FIXTURE_LOAD_ADDR as u32,
            initrd_addr_max: self.initrd_addr_max,
            kernel_alignment: 0x20_0000, // 2 MiB
            relocatable_kernel: 1,
            xloadflags: self.xloadflags,
            cmdline_size: self.cmdline_size,
            init_size: self.init_size,
            ..Default::default()
        };
        // The setup part is at least 1 KiB, past the header's end (0x26c).
        let mut out = vec![0u8; self.setup_len()];
        let bytes = header.as_slice();
        out[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + bytes.len()].copy_from_slice(bytes);
        out.extend_from_slice(&self.payload);
        out
    }
}
