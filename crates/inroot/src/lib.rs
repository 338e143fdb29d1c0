//! Paths inside a directory tree taken as `/`: a container's root, where
//! an image's symlinks (`/var/run -> /run`, or `../../etc` aimed outside)
//! must resolve as they would inside the container and never lead out
//! of it. Every lookup is `openat2(RESOLVE_IN_ROOT)` (Linux 5.6), so `..`
//! stops at the root and absolute symlinks start there; nothing is
//! created through a symlink.
//!
//! The guest agent makes a container's mount points with it; the
//! containerd shim makes them on the host before a read-only root is
//! shared.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// `openat2(dir, path, O_PATH, RESOLVE_IN_ROOT)`: `path` resolved as if
/// `dir` were `/`, symlinks and `..` included, never leaving it.
pub fn open_in_root(dir: &OwnedFd, path: &Path) -> io::Result<OwnedFd> {
    // EAGAIN: a `..` met while something was renamed or mounted anywhere
    // on the system; the lookup is safe to repeat.
    let mut tries = 0;
    loop {
        match open_in_root_once(dir, path) {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && tries < 16 => tries += 1,
            done => return done,
        }
    }
}

fn open_in_root_once(dir: &OwnedFd, path: &Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: open_how is plain data, valid all zeros.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: a valid directory fd, a NUL-terminated path and an open_how
    // of the size passed, all outliving the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            std::ptr::addr_of!(how),
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// `dest` inside the root at `dir` (an `O_PATH` handle), made if missing:
/// its missing directories, and the last component as a directory
/// (`dir_wanted`) or an empty file. Every step resolves inside the root.
pub fn make_in_root(dir: &OwnedFd, dest: &Path, dir_wanted: bool) -> io::Result<OwnedFd> {
    match open_in_root(dir, dest) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        found => return found,
    }
    let names: Vec<&OsStr> = dest
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n),
            _ => None,
        })
        .collect();
    let mut at = PathBuf::from("/");
    let mut parent = open_in_root(dir, &at)?;
    for (i, name) in names.iter().enumerate() {
        at.push(name);
        match open_in_root(dir, &at) {
            Ok(fd) => {
                parent = fd;
                continue;
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
        let c = CString::new(name.as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let last = i + 1 == names.len();
        make_entry(&parent, &c, !last || dir_wanted)?;
        parent = open_in_root(dir, &at)?;
    }
    Ok(parent)
}

/// Make `name` (one component) in the directory `dir`: a directory, or
/// (`dir_wanted` false) an empty file. Neither follows a symlink at the
/// name; an existing entry is `EEXIST`.
pub fn make_entry(dir: &impl AsRawFd, name: &CStr, dir_wanted: bool) -> io::Result<()> {
    // SAFETY: a directory fd and a NUL-terminated single name that
    // outlive the calls; neither follows a symlink at the name.
    let ret = unsafe {
        if dir_wanted {
            libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), 0o755)
        } else {
            let fd = libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                0o644,
            );
            if fd >= 0 {
                libc::close(fd);
            }
            fd.min(0)
        }
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// `/proc/self/fd/<fd>`: a path to what `fd` holds.
pub fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_made_inside_the_root_whatever_its_symlinks() {
        let base = std::env::temp_dir().join(format!("chitin-mkroot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (root, outside) = (base.join("root"), base.join("outside"));
        std::fs::create_dir_all(root.join("run")).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        // An image's symlinks: relative, absolute (meaning the root's
        // /run), and one aimed outside through `..`.
        std::os::unix::fs::symlink("../run", root.join("varrun")).unwrap();
        std::os::unix::fs::symlink("/run", root.join("abs")).unwrap();
        std::os::unix::fs::symlink("../../outside", root.join("escape")).unwrap();
        let dir = std::fs::File::open(&root).map(OwnedFd::from).unwrap();
        make_in_root(&dir, Path::new("/varrun/secrets/token"), true).unwrap();
        assert!(root.join("run/secrets/token").is_dir());
        make_in_root(&dir, Path::new("/abs/hosts"), false).unwrap();
        assert!(root.join("run/hosts").is_file());
        // `..` stops at the root: the link names the root's `outside`,
        // missing, so nothing is made (a dangling link is not followed
        // out); once it exists, the mount point is made in it.
        assert!(make_in_root(&dir, Path::new("/escape/x"), true).is_err());
        std::fs::create_dir(root.join("outside")).unwrap();
        make_in_root(&dir, Path::new("/escape/x"), true).unwrap();
        assert!(root.join("outside/x").is_dir());
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        // What exists is opened, not made again.
        let again = make_in_root(&dir, Path::new("/run/hosts"), false).unwrap();
        assert!(std::fs::metadata(fd_path(&again)).unwrap().is_file());
        let _ = std::fs::remove_dir_all(&base);
    }
}
