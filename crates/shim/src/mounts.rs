//! Host mounts the shim makes for a container: the snapshotter's rootfs
//! mounted into the bundle, and that root bound into the pod VM's shared
//! directory. Each is undone when the container is deleted.

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

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

/// Bind `src` (with the mounts below it) onto the directory `dst`,
/// read-only if asked. On failure nothing stays mounted.
pub fn bind(src: &Path, dst: &Path, read_only: bool) -> io::Result<()> {
    mount(src, dst, libc::MS_BIND | libc::MS_REC)?;
    // Mounts and unmounts elsewhere do not travel into the bind.
    let private = mount(Path::new("none"), dst, libc::MS_PRIVATE | libc::MS_REC);
    let ro = if read_only && private.is_ok() {
        mount(
            Path::new("none"),
            dst,
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
        )
    } else {
        Ok(())
    };
    if let Err(e) = private.and(ro) {
        let _ = unmount(dst);
        return Err(e);
    }
    Ok(())
}

/// Detach the mount at `path` and everything below it. Not mounted is
/// not an error.
pub fn unmount(path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    loop {
        // SAFETY: a NUL-terminated path that outlives the call.
        let ret = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) };
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

    #[test]
    fn unmounting_what_is_not_mounted_is_fine() {
        let dir = std::env::temp_dir().join(format!("chitin-shim-um-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        unmount(&dir).unwrap();
        unmount(&dir.join("absent")).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
