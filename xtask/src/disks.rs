//! Disk images for the nested tier's virtio-blk scenarios, and the host-side
//! checks that read them back after L1 has exited.
//!
//! Each image is attached to L1 as a QEMU virtio-blk device with a serial;
//! L1's runner finds the `/dev/vdX` of each serial and hands it to chitin,
//! which gives it to L2. So a write in L2 travels L2 → chitin (in L1) →
//! L1's block device → QEMU → the host file checked here.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{self, output, run, Step};

/// The file the host puts in the ext4 images (the agent checks it).
pub const KNOWN_FILE: &str = "known.txt";
/// Its content: must equal the agent's `KNOWN_CONTENT`.
pub const KNOWN_CONTENT: &str = "chitin blk test: written on the host\n";
/// What the agent writes in the `blk` scenario (must equal its
/// `GUEST_CONTENT`).
pub const GUEST_CONTENT: &str = "chitin blk test: written by the guest\n";
/// Size of the region the discard scenario discards.
const DISCARD_LEN: u64 = 16 << 20;

/// One image: its serial (how L1 finds it), file and size.
pub struct Image {
    /// Serial set on the QEMU device; L1 sees it in /sys/block/vdX/serial.
    pub serial: &'static str,
    /// Host file.
    pub path: PathBuf,
}

/// All images of one run.
pub struct Disks {
    /// In the order they are attached to L1.
    pub images: Vec<Image>,
    /// Allocated bytes of each discard image (by serial) before the run.
    pub discard_allocated_before: Vec<(&'static str, u64)>,
}

impl Disks {
    fn path(&self, serial: &str) -> Option<&Path> {
        self.images
            .iter()
            .find(|i| i.serial == serial)
            .map(|i| i.path.as_path())
    }
}

/// Make fresh images in `dir`: `blk` (ext4 with the known file), `ro`
/// (ext4 with the known file), `integrity` (64 MiB raw), `discard` (32 MiB
/// raw, fully written so every block is allocated).
pub fn create(dir: &Path) -> Step<Disks> {
    std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let content = dir.join("content");
    std::fs::create_dir_all(&content).map_err(|e| format!("mkdir: {e}"))?;
    std::fs::write(content.join(KNOWN_FILE), KNOWN_CONTENT).map_err(|e| format!("write: {e}"))?;
    let mut images = Vec::new();
    // `blk` images are written by their scenario: one per kernel that
    // runs it, so each run is checked on what it wrote itself.
    for (serial, mib) in [("blk", 32), ("ro", 16), ("blk-debian", 32)] {
        let path = dir.join(format!("{serial}.ext4"));
        let _ = std::fs::remove_file(&path);
        run(
            &format!("mkfs.ext4 {serial} image"),
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
                .arg(&content)
                .arg(&path)
                .arg(format!("{mib}M")),
        )?;
        images.push(Image { serial, path });
    }
    // One integrity image per kernel, so each kernel's run is checked on
    // what it wrote itself.
    for serial in ["integrity", "integrity-6.12", "integrity-debian"] {
        let path = dir.join(format!("{serial}.raw"));
        let _ = std::fs::remove_file(&path);
        let file = std::fs::File::create(&path).map_err(|e| format!("create: {e}"))?;
        file.set_len(64 << 20).map_err(|e| format!("size: {e}"))?;
        images.push(Image { serial, path });
    }
    let mut discard_allocated_before = Vec::new();
    for serial in ["discard", "discard-debian"] {
        let discard = dir.join(format!("{serial}.raw"));
        std::fs::write(&discard, vec![0xa5u8; 32 << 20]).map_err(|e| format!("write: {e}"))?;
        discard_allocated_before.push((serial, allocated(&discard)?));
        images.push(Image {
            serial,
            path: discard,
        });
    }
    // Debian's containerd, runc and CNI plugins, for the containerd
    // scenarios (read-only in L1).
    let path = dir.join(format!("{}.ext4", crate::containerd::SERIAL));
    crate::containerd::image(&path)?;
    images.push(Image {
        serial: crate::containerd::SERIAL,
        path,
    });
    Ok(Disks {
        images,
        discard_allocated_before,
    })
}

/// QEMU arguments attaching every image to L1 as virtio-blk with its
/// serial; discards pass through to the host file.
pub fn qemu_args(disks: &Disks) -> Vec<String> {
    let mut args = Vec::new();
    for (i, image) in disks.images.iter().enumerate() {
        args.push("-drive".to_string());
        args.push(format!(
            "id=d{i},file={},format=raw,if=none,discard=unmap",
            image.path.display()
        ));
        args.push("-device".to_string());
        args.push(format!(
            "virtio-blk-device,drive=d{i},serial={}",
            image.serial
        ));
    }
    args
}

/// Bytes the file system really allocated for `path`.
fn allocated(path: &Path) -> Step<u64> {
    let meta = std::fs::metadata(path).map_err(|e| format!("stat {}: {e}", path.display()))?;
    // st_blocks counts 512-byte units whatever the block size.
    Ok(meta.blocks() * 512)
}

/// `blk`: the guest's files, read out of the image with debugfs.
pub fn check_blk(disks: &Disks, serial: &str, guest_big_fnv: &str) -> Result<String, String> {
    let image = disks
        .path(serial)
        .ok_or_else(|| format!("no {serial} image"))?;
    let small = output(
        Command::new("debugfs")
            .args(["-R", "cat /from-guest.txt"])
            .arg(image),
    )?;
    if small != GUEST_CONTENT {
        return Err(format!(
            "host read {small:?} from the image, want {GUEST_CONTENT:?}"
        ));
    }
    let dump = image.with_extension("from-guest.bin");
    let _ = std::fs::remove_file(&dump);
    output(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("dump /from-guest.bin {}", dump.display()))
            .arg(image),
    )?;
    let big = util::read(&dump)?;
    let fnv = format!("{:016x}", util::fnv1a(util::FNV_BASIS, &big));
    if fnv != guest_big_fnv {
        return Err(format!(
            "1 MiB file: host checksum {fnv} ({} bytes), guest wrote {guest_big_fnv}",
            big.len()
        ));
    }
    Ok(format!("host read both guest files back (1 MiB fnv={fnv})"))
}

/// `blk-integrity`: the host's checksum of the whole raw image.
pub fn check_integrity(disks: &Disks, serial: &str, guest_fnv: &str) -> Result<String, String> {
    let image = disks
        .path(serial)
        .ok_or_else(|| format!("no {serial} image"))?;
    let data = util::read(image)?;
    let fnv = format!("{:016x}", util::fnv1a(util::FNV_BASIS, &data));
    if fnv != guest_fnv {
        return Err(format!("host checksum {fnv}, guest wrote {guest_fnv}"));
    }
    Ok(format!("64 MiB, guest and host fnv={fnv}"))
}

/// `blk-discard`: the host file lost (most of) the discarded blocks.
pub fn check_discard(disks: &Disks, serial: &str) -> Result<String, String> {
    let image = disks
        .path(serial)
        .ok_or_else(|| format!("no {serial} image"))?;
    let after = allocated(image)?;
    let before = disks
        .discard_allocated_before
        .iter()
        .find(|(s, _)| *s == serial)
        .map(|(_, b)| *b)
        .ok_or_else(|| format!("no allocation recorded for {serial}"))?;
    let freed = before.saturating_sub(after);
    // Allow a quarter of slack for alignment at each layer.
    if freed < DISCARD_LEN * 3 / 4 {
        return Err(format!(
            "host allocation {before} -> {after} bytes: only {freed} freed of {DISCARD_LEN} discarded"
        ));
    }
    Ok(format!(
        "host allocation {} -> {} MiB",
        before >> 20,
        after >> 20
    ))
}
