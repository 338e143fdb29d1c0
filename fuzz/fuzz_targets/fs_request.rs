//! Arbitrary FUSE requests and descriptor chains through the virtio-fs
//! handler (the FUSE server behind chitin's confinement, over the
//! passthrough file system) against a real temporary directory: nothing
//! may panic, and after each input nothing outside the share was created,
//! changed or removed, and no device node exists in the share.
//!
//! Input: `[flags, n_msgs]`, then `n_msgs` messages of
//! `[len: u16 le][len bytes]`, each sent as its own chain (a readable
//! request, a writable 64 KiB reply buffer); flags bit 0: read-only
//! share, bit 1: send FUSE_INIT first, bit 2: cap the share at 4 open
//! files. Whatever follows the messages is one more chain of arbitrary
//! descriptors: `n_desc` (1 byte), then 16-byte descriptors (addr u64,
//! len u32, flags u16, next u16), then bytes copied into guest memory at
//! the request area.
//!
//! The share is made fresh for every input: a file, a directory with a
//! file, a symlink to `/`, a symlink to the outside file.

#![no_main]

use std::fs;
use std::os::unix::fs::{symlink, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use chitin_fs::test_utils::{FuseDriver, TempTree, REQUEST};
use chitin_fs::{IdMap, Policy};
use chitin_virtio::test_utils::TestDescriptor;
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress};

/// Reply buffer of each message.
const REPLY_LEN: u32 = 64 << 10;

struct Dirs {
    _tmp: TempTree,
    base: PathBuf,
    share: PathBuf,
    outside: PathBuf,
}

fn dirs() -> &'static Dirs {
    static DIRS: OnceLock<Dirs> = OnceLock::new();
    DIRS.get_or_init(|| {
        let tmp = TempTree::new("fuzz");
        let base = tmp.path().to_path_buf();
        let outside = base.join("outside");
        fs::create_dir_all(&outside).expect("outside dir");
        fs::write(outside.join("secret"), b"outside the share").expect("secret");
        Dirs {
            share: base.join("share"),
            base,
            outside,
            _tmp: tmp,
        }
    })
}

/// Names and contents of everything outside the share, and the names
/// beside it.
fn outside_state(d: &Dirs) -> (Vec<(PathBuf, Vec<u8>)>, Vec<PathBuf>) {
    let mut files: Vec<_> = fs::read_dir(&d.outside)
        .expect("outside dir")
        .map(|e| {
            let p = e.expect("entry").path();
            let bytes = fs::read(&p).unwrap_or_default();
            (p, bytes)
        })
        .collect();
    files.sort();
    let mut beside: Vec<_> = fs::read_dir(&d.base)
        .expect("base dir")
        .map(|e| e.expect("entry").path())
        .collect();
    beside.sort();
    (files, beside)
}

fn fresh_share(share: &Path) {
    let _ = fs::remove_dir_all(share);
    fs::create_dir_all(share.join("dir")).expect("share");
    fs::write(share.join("file"), b"inside").expect("file");
    fs::write(share.join("dir/inner"), b"inner").expect("inner");
    symlink("/", share.join("escape")).expect("symlink");
    symlink("../outside/secret", share.join("rel")).expect("symlink");
}

/// No block or character device anywhere in the share.
fn no_devices(dir: &Path) -> bool {
    let Ok(entries) = fs::read_dir(dir) else {
        return true;
    };
    entries.filter_map(|e| e.ok()).all(|e| {
        let Ok(t) = e.file_type() else { return true };
        if t.is_block_device() || t.is_char_device() {
            return false;
        }
        !t.is_dir() || no_devices(&e.path())
    })
}

fuzz_target!(|data: &[u8]| {
    let [flags, n_msgs, rest @ ..] = data else {
        return;
    };
    let mut rest: &[u8] = rest;
    let d = dirs();
    fresh_share(&d.share);
    let before = outside_state(d);
    let policy = Policy {
        read_only: flags & 1 != 0,
        ids: IdMap::default(),
        max_open_files: if flags & 4 != 0 { 4 } else { 1024 },
        root_id: None,
        xattr: false,
    };
    let mut driver = FuseDriver::new(&d.share, policy);
    if flags & 2 != 0 {
        // FUSE_INIT 7.31, no flags.
        let mut init = Vec::new();
        for v in [7u32, 31, 0, 0] {
            init.extend_from_slice(&v.to_le_bytes());
        }
        driver.call(26, 0, &init);
    }
    for _ in 0..*n_msgs % 32 {
        let &[lo, hi, ref tail @ ..] = rest else {
            break;
        };
        let len = usize::from(u16::from_le_bytes([lo, hi])).min(tail.len());
        let (msg, tail) = tail.split_at(len);
        driver.raw(msg, REPLY_LEN);
        rest = tail;
    }
    if let [n_desc, tail @ ..] = rest {
        let n_desc = usize::from(*n_desc % 8);
        let (descs, payload) = tail.split_at((n_desc * 16).min(tail.len()));
        let descs: Vec<TestDescriptor> = descs
            .chunks_exact(16)
            .map(|c| {
                let addr = u64::from_le_bytes(c[0..8].try_into().unwrap_or_default()) % (8 << 20);
                let len = u32::from_le_bytes(c[8..12].try_into().unwrap_or_default());
                // Chains stay linear here: loops and stray `next`s are the
                // virtio-queue crate's and the blk target's business.
                let flags = u16::from_le_bytes([c[12], c[13]]) & 0x3;
                TestDescriptor::new(addr, len, flags)
            })
            .collect();
        if !descs.is_empty() {
            let _ = driver
                .memory()
                .write_slice(&payload[..payload.len().min(64 << 10)], GuestAddress(REQUEST));
            let mut descs = descs;
            let last = descs.len() - 1;
            for (i, desc) in descs.iter_mut().enumerate() {
                desc.flags = if i == last { desc.flags & 2 } else { desc.flags | 1 };
            }
            // A reply written over the rings breaks them: the device then
            // reports the ring broken, which is the right outcome.
            let _ = driver.try_chain(&descs);
        }
    }
    drop(driver);
    assert_eq!(outside_state(d), before, "something outside the share changed");
    assert!(no_devices(&d.share), "a device node appeared in the share");
});
