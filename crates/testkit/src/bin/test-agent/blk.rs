//! virtio-blk scenarios: what the guest does with the disks the host gave
//! it, and what it checks. The host harness (`cargo xtask nested`) creates
//! the images with the constants below and checks the other side.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};

use chitin_testkit::{fnv1a, Report, FNV_BASIS};

/// The file the host puts in the ext4 images, and its content.
const KNOWN_FILE: &str = "/mnt/known.txt";
const KNOWN_CONTENT: &str = "chitin blk test: written on the host\n";
/// The file the guest writes in the `blk` scenario, and its content.
const GUEST_FILE: &str = "/mnt/from-guest.txt";
const GUEST_CONTENT: &str = "chitin blk test: written by the guest\n";
/// A larger guest-written file: 1 MiB of pattern, checked by checksum.
const GUEST_BIG_FILE: &str = "/mnt/from-guest.bin";
const GUEST_BIG_LEN: usize = 1 << 20;
/// Bytes the integrity scenario writes with O_DIRECT, in chunks.
const INTEGRITY_LEN: usize = 64 << 20;
const CHUNK: usize = 1 << 20;
/// The discard scenario discards the first half of its disk.
const DISCARD_LEN: u64 = 16 << 20;
/// `_IO(0x12, 119)`: discard a byte range of a block device.
const BLKDISCARD: libc::c_ulong = 0x1277;

fn mount(dev: &str, target: &str, fstype: &str, flags: libc::c_ulong) -> io::Result<()> {
    std::fs::create_dir_all(target)?;
    let c = |s: &str| CString::new(s).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e));
    let (dev, target, fstype) = (c(dev)?, c(target)?, c(fstype)?);
    // SAFETY: valid NUL-terminated strings outliving the call; null data.
    let ret = unsafe {
        libc::mount(
            dev.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn umount(target: &str) -> io::Result<()> {
    let target =
        CString::new(target).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: valid NUL-terminated string.
    if unsafe { libc::umount(target.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub use chitin_testkit::fill_pattern;

fn check_known_file(report: &mut Report) {
    let content = std::fs::read_to_string(KNOWN_FILE);
    let ok = content.as_deref().ok() == Some(KNOWN_CONTENT);
    report.check("known-file", ok, &format!("{content:?}"));
}

/// `blk`: mount the ext4 disk, check the host's file, write two files,
/// sync and unmount.
pub fn read_write(report: &mut Report) {
    if let Err(e) = mount("/dev/vda", "/mnt", "ext4", 0) {
        report.check("mount", false, &format!("/dev/vda: {e}"));
        return;
    }
    report.check("mount", true, "/dev/vda ext4 read-write");
    check_known_file(report);
    let small = std::fs::write(GUEST_FILE, GUEST_CONTENT);
    let mut big = vec![0u8; GUEST_BIG_LEN];
    fill_pattern(7, &mut big);
    let big_result = File::create(GUEST_BIG_FILE).and_then(|mut f| {
        f.write_all(&big)?;
        f.sync_all()
    });
    report.check(
        "write-files",
        small.is_ok() && big_result.is_ok(),
        &format!(
            "small={small:?} big={big_result:?} big_fnv={:016x}",
            fnv1a(FNV_BASIS, &big)
        ),
    );
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    let unmounted = umount("/mnt");
    report.check("umount", unmounted.is_ok(), &format!("{unmounted:?}"));
}

/// `blk-ro`: the disk is read-only to the guest kernel, mounts only
/// read-only, and every kind of write fails.
pub fn read_only(report: &mut Report) {
    let ro_flag = std::fs::read_to_string("/sys/block/vda/ro").unwrap_or_default();
    report.check(
        "ro-flag",
        ro_flag.trim() == "1",
        &format!("/sys/block/vda/ro={}", ro_flag.trim()),
    );
    let rw = mount("/dev/vda", "/mnt", "ext4", 0);
    if rw.is_ok() {
        let _ = umount("/mnt");
    }
    report.check("mount-rw-refused", rw.is_err(), &format!("{rw:?}"));
    if let Err(e) = mount("/dev/vda", "/mnt", "ext4", libc::MS_RDONLY) {
        report.check("mount-ro", false, &format!("{e}"));
        return;
    }
    report.check("mount-ro", true, "/dev/vda ext4 read-only");
    check_known_file(report);
    let create = std::fs::write("/mnt/should-fail.txt", b"x");
    report.check(
        "file-write-refused",
        create.is_err(),
        &format!("{create:?}"),
    );
    let _ = umount("/mnt");
    let raw = OpenOptions::new()
        .write(true)
        .open("/dev/vda")
        .and_then(|f| f.write_at(b"x", 0));
    report.check("raw-write-refused", raw.is_err(), &format!("{raw:?}"));
}

/// A page-aligned buffer for O_DIRECT.
struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len, 4096).ok()?;
        // SAFETY: the layout has a non-zero size (callers pass CHUNK).
        let ptr = unsafe { alloc_zeroed(layout) };
        (!ptr.is_null()).then_some(Self { ptr, layout })
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: ptr is a live allocation of layout.size() bytes owned by
        // self, and &mut self guarantees exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: ptr was allocated with exactly this layout.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

/// `blk-integrity`: 64 MiB of pattern to the raw /dev/vdb with O_DIRECT,
/// read back and compared; the checksum goes to the host.
pub fn integrity(report: &mut Report) {
    let result = (|| -> io::Result<(u64, usize)> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open("/dev/vdb")?;
        let mut buf = AlignedBuf::new(CHUNK).ok_or_else(|| io::Error::other("alloc"))?;
        let mut hash = FNV_BASIS;
        for i in 0..INTEGRITY_LEN / CHUNK {
            fill_pattern(i as u64 + 1, buf.as_mut());
            hash = fnv1a(hash, buf.as_mut());
            file.write_all_at(buf.as_mut(), (i * CHUNK) as u64)?;
        }
        file.sync_all()?;
        let mut mismatched = 0;
        let mut expect = vec![0u8; CHUNK];
        for i in 0..INTEGRITY_LEN / CHUNK {
            file.read_exact_at(buf.as_mut(), (i * CHUNK) as u64)?;
            fill_pattern(i as u64 + 1, &mut expect);
            if buf.as_mut() != expect.as_slice() {
                mismatched += 1;
            }
        }
        Ok((hash, mismatched))
    })();
    match result {
        Ok((hash, 0)) => report.check(
            "integrity",
            true,
            &format!("fnv={hash:016x} len={INTEGRITY_LEN}"),
        ),
        Ok((_, bad)) => report.check(
            "integrity",
            false,
            &format!("{bad} MiB chunks read back wrong"),
        ),
        Err(e) => report.check("integrity", false, &format!("/dev/vdb: {e}")),
    }
}

/// The `blk-write-direct DEV BYTES` tool: write BYTES of pattern to the
/// raw device DEV with O_DIRECT in 1 MiB chunks, then fsync; prints
/// `wrote=<n> ms=<ms>` (the time of the writes and the fsync).
pub fn write_direct_tool(args: &[String]) -> i32 {
    let (Some(dev), Some(bytes)) = (
        args.first(),
        args.get(1).and_then(|b| b.parse::<usize>().ok()),
    ) else {
        eprintln!("usage: blk-write-direct DEV BYTES");
        return 2;
    };
    let result = (|| -> io::Result<(usize, u128)> {
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(dev)?;
        let mut buf = AlignedBuf::new(CHUNK).ok_or_else(|| io::Error::other("alloc"))?;
        let start = std::time::Instant::now();
        let mut written = 0;
        while written < bytes {
            fill_pattern(written as u64 + 1, buf.as_mut());
            let n = CHUNK.min(bytes - written);
            file.write_all_at(&buf.as_mut()[..n], written as u64)?;
            written += n;
        }
        file.sync_all()?;
        Ok((written, start.elapsed().as_millis()))
    })();
    match result {
        Ok((written, ms)) => {
            println!("wrote={written} ms={ms}");
            0
        }
        Err(e) => {
            eprintln!("{dev}: {e}");
            1
        }
    }
}

/// `blk-discard`: discard the first 16 MiB of /dev/vda (blkdiscard), then
/// read it back as zeros.
pub fn discard(report: &mut Report) {
    let result = (|| -> io::Result<bool> {
        let file = OpenOptions::new().read(true).write(true).open("/dev/vda")?;
        let range: [u64; 2] = [0, DISCARD_LEN];
        // SAFETY: BLKDISCARD reads two u64 (start, length) from the pointer,
        // which points at `range` for the whole call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), BLKDISCARD, range.as_ptr()) };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        file.sync_all()?;
        let mut buf = vec![0u8; CHUNK];
        let mut zero = true;
        for off in (0..DISCARD_LEN).step_by(CHUNK) {
            file.read_exact_at(&mut buf, off)?;
            zero &= buf.iter().all(|&b| b == 0);
        }
        Ok(zero)
    })();
    match result {
        Ok(zero) => report.check(
            "discard",
            zero,
            &format!("discarded {DISCARD_LEN} bytes, reads back as zeros: {zero}"),
        ),
        Err(e) => report.check("discard", false, &format!("/dev/vda: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_pattern_is_deterministic_per_seed() {
        let (mut a, mut b, mut c) = ([0u8; 20], [0u8; 20], [0u8; 20]);
        fill_pattern(1, &mut a);
        fill_pattern(1, &mut b);
        fill_pattern(2, &mut c);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
