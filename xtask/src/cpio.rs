//! A writer for the "newc" cpio format, the format Linux unpacks as an
//! initramfs (Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! Each entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex
//! fields), the NUL-terminated name padded to 4 bytes, then the data padded
//! to 4 bytes; the archive ends with the entry `TRAILER!!!`.

use std::collections::BTreeSet;
use std::path::Path;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// An in-memory newc archive.
#[derive(Default)]
pub struct Cpio {
    data: Vec<u8>,
    next_ino: u32,
    /// Directories added so far, for [`Cpio::parents`].
    dirs: BTreeSet<String>,
}

impl Cpio {
    /// An empty archive.
    pub fn new() -> Self {
        Self {
            data: Vec::new(),
            next_ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), body: &[u8]) {
        let ino = self.next_ino;
        self.next_ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let fields = [
            ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime: fixed, so archives are reproducible
            body.len() as u32,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check (only for the 070702 variant)
        ];
        self.data.extend_from_slice(b"070701");
        for f in fields {
            self.data.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.data.extend_from_slice(name.as_bytes());
        self.data.push(0);
        self.pad();
        self.data.extend_from_slice(body);
        self.pad();
    }

    fn pad(&mut self) {
        while self.data.len() % 4 != 0 {
            self.data.push(0);
        }
    }

    /// A directory (parents must be added first); one already added is
    /// not added again.
    pub fn dir(&mut self, name: &str) {
        if self.dirs.insert(name.to_string()) {
            self.entry(name, S_IFDIR | 0o755, (0, 0), &[]);
        }
    }

    /// Every directory above `path` (relative, `/`-separated) that is not
    /// in the archive yet, outermost first.
    pub fn parents(&mut self, path: &str) {
        let Some((parent, _)) = path.rsplit_once('/') else {
            return;
        };
        let mut prefix = String::new();
        for part in parent.split('/').filter(|p| !p.is_empty()) {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            self.dir(&prefix);
        }
    }

    /// A regular file with `mode` permission bits.
    pub fn file(&mut self, name: &str, mode: u32, body: &[u8]) {
        self.entry(name, S_IFREG | (mode & 0o7777), (0, 0), body);
    }

    /// A regular file copied from the host.
    pub fn file_from(&mut self, name: &str, mode: u32, host: &Path) -> Result<(), String> {
        let body = std::fs::read(host).map_err(|e| format!("read {}: {e}", host.display()))?;
        self.file(name, mode, &body);
        Ok(())
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, S_IFLNK | 0o777, (0, 0), target.as_bytes());
    }

    /// A character device node.
    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, S_IFCHR | 0o600, (major, minor), &[]);
    }

    /// Close the archive and return its bytes.
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        // Pad to 512 bytes like cpio(1); the kernel ignores trailing zeros.
        while self.data.len() % 512 != 0 {
            self.data.push(0);
        }
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_entry_has_newc_header_and_padding() {
        let mut cpio = Cpio::new();
        cpio.file("init", 0o755, b"abc");
        let data = cpio.finish();
        // Header: magic, ino 1, mode 0100755, ..., filesize 3, namesize 5.
        let header = std::str::from_utf8(&data[..110]).unwrap();
        assert!(header.starts_with("070701"));
        assert_eq!(&header[6..14], "00000001");
        assert_eq!(&header[14..22], "000081ed");
        assert_eq!(&header[54..62], "00000003");
        assert_eq!(&header[94..102], "00000005");
        // Name "init\0" at 110..115, padded to 116; data at 116.
        assert_eq!(&data[110..115], b"init\0");
        assert_eq!(&data[116..119], b"abc");
        assert_eq!(data.len() % 512, 0);
    }

    #[test]
    fn finish_ends_with_trailer() {
        let data = Cpio::new().finish();
        let text = String::from_utf8_lossy(&data);
        assert!(text.contains("TRAILER!!!"));
    }

    #[test]
    fn char_dev_records_rdev() {
        let mut cpio = Cpio::new();
        cpio.char_dev("dev/console", 5, 1);
        let data = cpio.finish();
        let header = std::str::from_utf8(&data[..110]).unwrap();
        assert_eq!(&header[14..22], "00002180");
        assert_eq!(&header[78..86], "00000005");
        assert_eq!(&header[86..94], "00000001");
    }

    /// The names of the archive's entries, in order.
    fn names(data: &[u8]) -> Vec<String> {
        let mut names = Vec::new();
        let mut at = 0;
        while at + 110 <= data.len() && &data[at..at + 6] == b"070701" {
            let field = |i: usize| {
                let hex = std::str::from_utf8(&data[at + 6 + i * 8..at + 14 + i * 8]).unwrap();
                usize::from_str_radix(hex, 16).unwrap()
            };
            let (size, namesize) = (field(6), field(11));
            let name = &data[at + 110..at + 110 + namesize - 1];
            names.push(String::from_utf8_lossy(name).into_owned());
            at = (at + 110 + namesize).next_multiple_of(4);
            at = (at + size).next_multiple_of(4);
        }
        names
    }

    #[test]
    fn parents_adds_each_missing_directory_once_outermost_first() {
        let mut cpio = Cpio::new();
        cpio.dir("lib");
        cpio.parents("lib/modules/6.1/kernel/a.ko");
        cpio.file("lib/modules/6.1/kernel/a.ko", 0o644, b"a");
        cpio.parents("lib/modules/6.1/kernel/b.ko");
        cpio.parents("top-level-file");
        cpio.dir("lib/modules");
        let names = names(&cpio.finish());
        assert_eq!(
            names,
            [
                "lib",
                "lib/modules",
                "lib/modules/6.1",
                "lib/modules/6.1/kernel",
                "lib/modules/6.1/kernel/a.ko",
                "TRAILER!!!"
            ]
        );
    }
}
