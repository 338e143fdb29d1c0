//! Host mounts the shim makes for a container: the snapshotter's rootfs
//! mounted into the bundle, and that root bound into the pod VM's shared
//! directory. Each is undone when the container is deleted.

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
}

fn mount(src: &Path, dst: &Path, flags: libc::c_ulong) -> io::Result<()> {
    let (src, dst) = (c_path(src)?, c_path(dst)?);
    // SAFETY: both paths are NUL-terminated strings that outlive the
    // call; a bind mount reads no file system type or data.
    let ret = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            std::ptr::null(),
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

/// A mount option that is a flag, and whether it sets or clears it.
const FLAG_OPTIONS: &[(&str, libc::c_ulong, bool)] = &[
    ("ro", libc::MS_RDONLY, true),
    ("rw", libc::MS_RDONLY, false),
    ("nosuid", libc::MS_NOSUID, true),
    ("suid", libc::MS_NOSUID, false),
    ("nodev", libc::MS_NODEV, true),
    ("dev", libc::MS_NODEV, false),
    ("noexec", libc::MS_NOEXEC, true),
    ("exec", libc::MS_NOEXEC, false),
    ("sync", libc::MS_SYNCHRONOUS, true),
    ("async", libc::MS_SYNCHRONOUS, false),
    ("noatime", libc::MS_NOATIME, true),
    ("atime", libc::MS_NOATIME, false),
    ("nodiratime", libc::MS_NODIRATIME, true),
    ("diratime", libc::MS_NODIRATIME, false),
    ("relatime", libc::MS_RELATIME, true),
    ("norelatime", libc::MS_RELATIME, false),
    ("strictatime", libc::MS_STRICTATIME, true),
    ("bind", libc::MS_BIND, true),
    ("rbind", libc::MS_BIND | libc::MS_REC, true),
];

/// containerd's mount options split into flags and the file system's
/// own data (`lowerdir=...`, joined by commas).
fn split_options(options: &[String]) -> (libc::c_ulong, String) {
    let mut flags = 0;
    let mut data = Vec::new();
    for o in options {
        match FLAG_OPTIONS.iter().find(|(name, _, _)| name == o) {
            Some((_, f, true)) => flags |= f,
            Some((_, f, false)) => flags &= !f,
            None => data.push(o.as_str()),
        }
    }
    (flags, data.join(","))
}

/// Mount one of the snapshotter's mounts (as containerd describes it:
/// type, source, options) on `target`, in this process: no helper
/// process is forked (the shim holds a running VM's threads). Options
/// longer than a page, which an overlay of very many layers needs, are
/// refused rather than cut.
pub fn mount_snapshot(
    fs_type: &str,
    source: &str,
    options: &[String],
    target: &Path,
) -> io::Result<()> {
    let (flags, data) = split_options(options);
    if data.len() >= 4096 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("mount options of {} bytes (at most 4095)", data.len()),
        ));
    }
    let c = |s: &str| {
        CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte"))
    };
    let (src, fstype, data_c) = (c(source)?, c(fs_type)?, c(&data)?);
    let dst = c_path(target)?;
    // SAFETY: NUL-terminated strings that outlive the call; the data is
    // a string, as every file system containerd mounts takes.
    let ret = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            if fs_type.is_empty() {
                std::ptr::null()
            } else {
                fstype.as_ptr()
            },
            flags,
            if data.is_empty() {
                std::ptr::null()
            } else {
                data_c.as_ptr().cast()
            },
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    // A bind ignores MS_RDONLY until remounted.
    if flags & libc::MS_BIND != 0 && flags & libc::MS_RDONLY != 0 {
        if let Err(e) = mount(Path::new("none"), target, flags | libc::MS_REMOUNT) {
            let _ = unmount(target);
            return Err(e);
        }
    }
    Ok(())
}

/// `/proc/self/fd/N`: the file `fd` is, as a path the kernel resolves to
/// exactly that file (no name lookup an attacker could redirect).
fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn c_name(name: &str) -> io::Result<CString> {
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{name:?} is not a single path component"),
        ));
    }
    CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a name with a NUL byte"))
}

/// Open the directory `name` in `dir` without following a symlink there,
/// as an `O_PATH` handle (made first, mode 0755, if missing and `make`).
fn open_dir_at(dir: BorrowedFd<'_>, name: &str, make: bool) -> io::Result<OwnedFd> {
    open_at(dir, name, make, true)
}

/// `name` in `dir`, a directory or (`want_dir` false) a regular file,
/// made if `make` and missing, opened as an `O_PATH` handle without
/// following a symlink.
fn open_at(dir: BorrowedFd<'_>, name: &str, make: bool, want_dir: bool) -> io::Result<OwnedFd> {
    let c = c_name(name)?;
    if make {
        if let Err(e) = chitin_inroot::make_entry(&dir, &c, want_dir) {
            if e.raw_os_error() != Some(libc::EEXIST) {
                return Err(e);
            }
        }
    }
    let dir_flag = if want_dir { libc::O_DIRECTORY } else { 0 };
    // SAFETY: as above; the flags make a new fd that nothing else owns.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            c.as_ptr(),
            libc::O_PATH | dir_flag | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat returned a new fd, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    if !want_dir {
        // O_PATH | O_NOFOLLOW opens a symlink itself: refused, as is
        // anything but a plain file.
        let meta = fs::metadata(fd_path(&fd))?;
        if !meta.is_file() {
            return Err(io::Error::other(format!(
                "{name} in the shared directory is not a plain file"
            )));
        }
    }
    Ok(fd)
}

/// Open `path`, a directory the shim made (no part of it writable by a
/// guest), as an `O_PATH` handle.
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = c_path(path)?;
    // SAFETY: a NUL-terminated path that outlives the call; the flags
    // make a new fd that nothing else owns.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open returned a new fd, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the handle `a` is the file `b` (without opening it: a bind
/// source may be a socket or a device).
fn same_file(a: &OwnedFd, b: &std::fs::Metadata) -> io::Result<bool> {
    let m = fs::metadata(fd_path(a))?;
    Ok(m.dev() == b.dev() && m.ino() == b.ino())
}

/// Mount a tmpfs of `size` bytes and at most `inodes` files on `dir`: the
/// pod's shared directory, which the guest can write, takes no more of
/// the host's memory than that.
pub fn mount_tmpfs(dir: &Path, size: u64, inodes: u64) -> io::Result<()> {
    let dst = c_path(dir)?;
    let data = CString::new(format!("size={size},nr_inodes={inodes},mode=0755"))
        .map_err(|_| io::Error::other("tmpfs options"))?;
    // SAFETY: NUL-terminated strings that outlive the call.
    let ret = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            dst.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data.as_ptr().cast(),
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    // Under a shared /run (systemd's), it and the binds made in it would
    // show up in every peer mount namespace: private first, then shared
    // alone in a peer group of its own, so that the VMM's jail (whose
    // copy is a slave of it) sees the binds made in it later.
    for flag in [libc::MS_PRIVATE, libc::MS_SHARED] {
        if let Err(e) = mount(Path::new("none"), dir, flag) {
            let _ = unmount(dir);
            return Err(e);
        }
    }
    Ok(())
}

/// `struct mount_attr` of `mount_setattr(2)`.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}
const MOUNT_ATTR_RDONLY: u64 = 1;
const MOUNT_ATTR_NOSUID: u64 = 2;
const MOUNT_ATTR_NODEV: u64 = 4;
const AT_RECURSIVE: libc::c_int = 0x8000;

const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x04;
const MOVE_MOUNT_T_EMPTY_PATH: libc::c_uint = 0x40;

/// A bind of `src` (with the mounts below it if `recursive`) made as a
/// detached mount tree, private, `nosuid` and `nodev` and, if asked,
/// read-only throughout: so it is complete before anything can see it
/// (Linux 5.12 or later: `open_tree`, `mount_setattr`). The VMM's jail
/// sees it too (it arrives there by propagation, after the jail applied
/// its own flags): a device node in an image or a volume opens nothing
/// there, and chitin-fs never opens one for the guest either.
fn detached_bind(src: &Path, read_only: bool, recursive: bool) -> io::Result<OwnedFd> {
    let c = c_path(src)?;
    let recursive_flag = if recursive {
        AT_RECURSIVE as libc::c_uint
    } else {
        0
    };
    let flags = OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | recursive_flag;
    // SAFETY: a NUL-terminated path that outlives the call; the flags
    // make a new fd that nothing else owns.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) };
    if fd < 0 {
        return Err(needs_new_mount_api(io::Error::last_os_error()));
    }
    // SAFETY: open_tree returned a new fd, owned by nothing else.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_NOSUID
            | MOUNT_ATTR_NODEV
            | if read_only { MOUNT_ATTR_RDONLY } else { 0 },
        attr_clr: 0,
        propagation: libc::MS_PRIVATE,
        userns_fd: 0,
    };
    // SAFETY: an fd we hold, an empty NUL-terminated path, and the
    // attribute struct with its size; all outlive the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH | AT_RECURSIVE,
            std::ptr::addr_of!(attr),
            size_of::<MountAttr>(),
        )
    };
    if ret != 0 {
        return Err(needs_new_mount_api(io::Error::last_os_error()));
    }
    Ok(tree)
}

/// ENOSYS from the mount API, said plainly.
fn needs_new_mount_api(e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => io::Error::other(
            "this kernel lacks open_tree or mount_setattr: the shim needs Linux 5.12 or later",
        ),
        _ => e,
    }
}

/// Attach the detached tree `tree` on the mount point `target` holds.
fn attach(tree: &OwnedFd, target: &OwnedFd) -> io::Result<()> {
    // SAFETY: two fds we hold and empty NUL-terminated paths that outlive
    // the call.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            target.as_raw_fd(),
            c"".as_ptr(),
            MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Remove `name` from `dir` and `id` from `shared` if empty, never
/// following a symlink (what a failed bind leaves).
fn remove_entries(shared: &OwnedFd, id: &str, dir: &OwnedFd, name: &str, is_dir: bool) {
    let entries = [(dir, name, is_dir), (shared, id, true)];
    for (dir, name, is_dir) in entries {
        if let Ok(c) = c_name(name) {
            let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
            // SAFETY: a NUL-terminated name and a directory fd that
            // outlive the call; unlinkat never follows a symlink.
            unsafe { libc::unlinkat(dir.as_raw_fd(), c.as_ptr(), flags) };
        }
    }
}

/// A container's root (or one of its mounts) bound into the shared
/// directory, undone by [`Bound::release`]. It is held by handles, not
/// paths: the guest can rename or replace anything in the shared
/// directory, and no path lookup there is trusted.
#[derive(Debug)]
pub struct Bound {
    /// The shared directory.
    shared: OwnedFd,
    /// `shared/<id>`.
    parent: OwnedFd,
    /// The bind's root.
    root: OwnedFd,
    id: String,
    /// Its name in `shared/<id>`, and whether it is a directory.
    name: String,
    dir: bool,
}

/// Bind `src` (with the mounts below it if `recursive`) onto
/// `shared/<id>/<name>`, a directory or a file as `src` is, read-only if
/// asked, never following a symlink in the shared directory. The bind is
/// made detached, private and read-only first, then attached: the guest
/// never sees it writable, and undoing it never propagates to the host's
/// own mounts. On failure nothing stays mounted.
pub fn bind_beneath(
    shared: &Path,
    id: &str,
    name: &str,
    src: &Path,
    read_only: bool,
    recursive: bool,
) -> io::Result<Bound> {
    let source = fs::metadata(src)?;
    let dir = source.is_dir();
    let tree = detached_bind(src, read_only, recursive)?;
    let shared = open_dir(shared)?;
    let parent = open_dir_at(shared.as_fd(), id, true)?;
    let attached = open_at(parent.as_fd(), name, true, dir)
        .and_then(|target| attach(&tree, &target).map(|()| target));
    let target = match attached {
        Ok(target) => target,
        Err(e) => {
            remove_entries(&shared, id, &parent, name, dir);
            return Err(e);
        }
    };
    drop(tree);
    // Through the same handle's name, the mount's root: check that it is
    // (a guest may have put another directory in its place meanwhile).
    let root = match open_at(parent.as_fd(), name, false, dir) {
        Ok(root) => root,
        Err(e) => {
            let _ = unmount(&fd_path(&target));
            remove_entries(&shared, id, &parent, name, dir);
            return Err(e);
        }
    };
    let bound = Bound {
        shared,
        parent,
        root,
        id: id.to_string(),
        name: name.to_string(),
        dir,
    };
    match same_file(&bound.root, &source) {
        Ok(true) => Ok(bound),
        failed => {
            let _ = unmount(&fd_path(&target));
            bound.release();
            Err(failed.err().unwrap_or_else(|| {
                io::Error::other("the bind's mount point was replaced in the shared directory")
            }))
        }
    }
}

impl Bound {
    /// Unmount the bind and remove its mount point, and the container's
    /// directory once empty (if the guest left them where they were).
    pub fn release(self) {
        if let Err(e) = unmount(&fd_path(&self.root)) {
            log::warn!("unmounting {}'s {}: {e}", self.id, self.name);
        }
        drop(self.root);
        remove_entries(&self.shared, &self.id, &self.parent, &self.name, self.dir);
    }
}

/// Detach the mount at `path` and everything below it. Not mounted is
/// not an error. `path` may be a `/proc/self/fd` link (it is followed).
pub fn unmount(path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    loop {
        // SAFETY: a NUL-terminated path that outlives the call.
        let ret = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        if ret != 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                // Not a mount point (any more), or gone.
                Some(libc::EINVAL) | Some(libc::ENOENT) => Ok(()),
                _ => Err(e),
            };
        }
        // Stacked mounts: take each off until none is left.
    }
}

/// The directories `Command::root` needs in a container root: made when
/// missing (an image need not ship them, runc makes them too).
pub fn ensure_mount_points(root: &Path) -> io::Result<()> {
    for dir in ["proc", "sys", "dev", "tmp"] {
        let path = root.join(dir);
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(io::Error::other(format!(
                    "{} is not a directory",
                    path.display()
                )))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(&path)?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Make the mount point of a container mount at `dest` (absolute,
/// inside the container root `root`) on the host, a directory or
/// (`dir` false) an empty file, before the root is shared, so that a
/// read-only root (CRI's sandbox has one, with `/etc/resolv.conf` bound
/// in) has it, as runc makes them. The path is resolved inside the root,
/// the image's symlinks included (`/var/run -> /run`), never leaving it.
pub fn make_mount_point(root: &Path, dest: &Path, dir: bool) -> io::Result<()> {
    let root = OwnedFd::from(File::open(root)?);
    chitin_inroot::make_in_root(&root, dest, dir).map(drop)
}

/// Whether `path` is a mount point in this mount namespace (binds within
/// one file system included).
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(text) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.as_os_str().as_bytes();
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| unescape(m).as_slice() == want)
}

/// mountinfo's octal escapes (`\040` for a space) undone.
fn unescape(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(u8::is_ascii_digit) {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_and_data() {
        let opts: Vec<String> = [
            "ro",
            "nosuid",
            "lowerdir=/a:/b",
            "upperdir=/u",
            "rw",
            "index=off",
        ]
        .map(String::from)
        .to_vec();
        let (flags, data) = split_options(&opts);
        assert_eq!(flags, libc::MS_NOSUID, "rw after ro clears it");
        assert_eq!(data, "lowerdir=/a:/b,upperdir=/u,index=off");
        let (flags, data) = split_options(&["rbind".to_string(), "ro".to_string()]);
        assert_eq!(flags, libc::MS_BIND | libc::MS_REC | libc::MS_RDONLY);
        assert!(data.is_empty());
    }

    #[test]
    fn overlong_options_are_refused_before_mounting() {
        let long = vec![format!("lowerdir={}", "/x".repeat(3000))];
        let err =
            mount_snapshot("overlay", "overlay", &long, Path::new("/nonexistent")).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    #[ignore = "needs root (mounts): run with --include-ignored (cargo xtask test does)"]
    fn a_read_only_bind_from_options_is_read_only() {
        let base = scratch("snap");
        let (src, dst) = (base.join("src"), base.join("dst"));
        fs::create_dir_all(&src).unwrap();
        fs::create_dir_all(&dst).unwrap();
        fs::write(src.join("f"), b"1").unwrap();
        let opts = ["rbind".to_string(), "ro".to_string()];
        mount_snapshot("", src.to_str().unwrap(), &opts, &dst).unwrap();
        assert_eq!(fs::read(dst.join("f")).unwrap(), b"1");
        assert_eq!(
            fs::write(dst.join("g"), b"2").unwrap_err().raw_os_error(),
            Some(libc::EROFS)
        );
        unmount(&dst).unwrap();
        assert!(!is_mount_point(&dst));
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/a\040b"), b"/a b");
        assert_eq!(unescape("/plain"), b"/plain");
        assert_eq!(unescape(r"/end\04"), br"/end\04");
    }

    #[test]
    fn root_is_a_mount_point_and_a_fresh_directory_is_not() {
        assert!(is_mount_point(Path::new("/")));
        let dir = std::env::temp_dir().join(format!("chitin-shim-mp-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        assert!(!is_mount_point(&dir));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn mount_points_are_made_and_a_file_in_the_way_is_refused() {
        let dir = std::env::temp_dir().join(format!("chitin-shim-root-{}", std::process::id()));
        fs::create_dir_all(dir.join("proc")).unwrap();
        ensure_mount_points(&dir).unwrap();
        for d in ["proc", "sys", "dev", "tmp"] {
            assert!(dir.join(d).is_dir(), "{d}");
        }
        fs::remove_dir(dir.join("tmp")).unwrap();
        fs::write(dir.join("tmp"), b"").unwrap();
        assert!(ensure_mount_points(&dir).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A directory of the test's own, removed at the end.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("chitin-shim-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    #[ignore = "needs root (mounts): run with --include-ignored (cargo xtask test does)"]
    fn binds_follow_no_symlink_a_guest_planted_and_release_survives_renames() {
        let base = scratch("bind");
        let shared = base.join("shared");
        let src = base.join("src");
        let outside = base.join("outside");
        for d in [&shared, &src, &outside] {
            fs::create_dir_all(d).unwrap();
        }
        mount_tmpfs(&shared, 1 << 20, 64).unwrap();
        fs::write(src.join("file"), b"image").unwrap();

        // A writable bind: the file reads and writes through it.
        let rw = bind_beneath(&shared, "c1", "rootfs", &src, false, true).unwrap();
        assert!(is_mount_point(&shared.join("c1/rootfs")));
        assert_eq!(fs::read(shared.join("c1/rootfs/file")).unwrap(), b"image");
        fs::write(shared.join("c1/rootfs/new"), b"x").unwrap();
        assert!(src.join("new").exists());

        // A read-only bind refuses writes, in the mounts below its root
        // too.
        fs::create_dir_all(src.join("sub")).unwrap();
        mount_tmpfs(&src.join("sub"), 1 << 16, 16).unwrap();
        let ro = bind_beneath(&shared, "c2", "rootfs", &src, true, true).unwrap();
        let err = fs::write(shared.join("c2/rootfs/other"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));
        let err = fs::write(shared.join("c2/rootfs/sub/other"), b"x").unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::EROFS),
            "a submount stayed writable"
        );
        fs::write(src.join("sub/direct"), b"x").unwrap();
        // A plain bind (not rbind) leaves the mounts below out.
        let plain = bind_beneath(&shared, "c7", "rootfs", &src, false, false).unwrap();
        assert!(!is_mount_point(&shared.join("c7/rootfs/sub")));
        plain.release();

        // What a guest can plant in the shared directory: a symlink as
        // the container's directory, or as its rootfs.
        std::os::unix::fs::symlink(&outside, shared.join("c3")).unwrap();
        assert!(bind_beneath(&shared, "c3", "rootfs", &src, false, true).is_err());
        fs::create_dir(shared.join("c4")).unwrap();
        std::os::unix::fs::symlink(&outside, shared.join("c4/rootfs")).unwrap();
        assert!(bind_beneath(&shared, "c4", "rootfs", &src, false, true).is_err());
        assert_eq!(
            fs::read_dir(&outside).unwrap().count(),
            0,
            "nothing made outside"
        );
        assert!(!is_mount_point(&outside));
        // Bad ids never reach a path.
        for id in ["", "..", "a/b"] {
            assert!(
                bind_beneath(&shared, id, "rootfs", &src, false, true).is_err(),
                "{id:?}"
            );
        }

        // A file (CRI's /etc/hosts, say) binds onto a file, read-only;
        // a symlink planted where it goes is refused.
        let hosts = base.join("hosts");
        fs::write(&hosts, b"127.0.0.1 pod\n").unwrap();
        let file = bind_beneath(&shared, "c5", "m0", &hosts, true, true).unwrap();
        assert_eq!(fs::read(shared.join("c5/m0")).unwrap(), b"127.0.0.1 pod\n");
        let err = fs::write(shared.join("c5/m0"), b"x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));
        fs::create_dir(shared.join("c6")).unwrap();
        fs::write(outside.join("real"), b"keep").unwrap();
        std::os::unix::fs::symlink(outside.join("real"), shared.join("c6/m0")).unwrap();
        assert!(bind_beneath(&shared, "c6", "m0", &hosts, false, true).is_err());
        assert_eq!(fs::read(outside.join("real")).unwrap(), b"keep");
        assert!(!is_mount_point(&outside.join("real")));
        fs::remove_file(outside.join("real")).unwrap();
        file.release();
        assert!(!shared.join("c5").exists(), "the file and directory went");

        // The guest renames the container's directory: release still
        // unmounts the bind it made, through its handle.
        fs::rename(shared.join("c1"), shared.join("moved")).unwrap();
        rw.release();
        assert!(!is_mount_point(&shared.join("moved/rootfs")));
        ro.release();
        assert!(!shared.join("c2").exists(), "the directories went with it");
        unmount(&src.join("sub")).unwrap();

        unmount(&shared).unwrap();
        assert!(!is_mount_point(&shared));
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn mount_points_are_made_inside_the_root_only() {
        let base = scratch("points");
        let (root, outside) = (base.join("root"), base.join("outside"));
        fs::create_dir_all(root.join("etc")).unwrap();
        fs::create_dir_all(root.join("run")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        // An image's symlinks: absolute (the root's /run), and one aimed
        // at the host's directory.
        std::os::unix::fs::symlink("/run", root.join("var")).unwrap();
        std::os::unix::fs::symlink(&outside, root.join("host")).unwrap();
        make_mount_point(&root, Path::new("/etc/resolv.conf"), false).unwrap();
        assert!(root.join("etc/resolv.conf").is_file());
        make_mount_point(&root, Path::new("/data/sub"), true).unwrap();
        assert!(root.join("data/sub").is_dir());
        // Already there: fine.
        make_mount_point(&root, Path::new("/etc/resolv.conf"), false).unwrap();
        make_mount_point(&root, Path::new("/var/secrets/token"), true).unwrap();
        assert!(root.join("run/secrets/token").is_dir());
        // The host path the link names is taken inside the root: made
        // there or refused, never outside.
        let _ = make_mount_point(&root, Path::new("/host/x"), true);
        let _ = make_mount_point(&root, Path::new("/etc/../../x"), true);
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
        assert!(!base.join("x").exists());
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn unmounting_what_is_not_mounted_is_fine() {
        let dir = std::env::temp_dir().join(format!("chitin-shim-um-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        unmount(&dir).unwrap();
        unmount(&dir.join("absent")).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
