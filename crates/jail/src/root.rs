//! The jail's new root: a small tmpfs holding a mount point for each
//! resource at the path the embedder knows it by, each resource
//! bind-mounted there (read-only unless it is writable), device nodes,
//! a fresh `/proc` and a private `/tmp`; then the process moves into it
//! and the old root is detached.
//!
//! Runs in the jailed process, inside its own mount namespace, so nothing
//! of this is visible outside the jail or outlives it.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use crate::sys;
use crate::{Fail, Resource, ResourceKind};

/// `RAMFS_MAGIC` and `TMPFS_MAGIC`: what an initial ramfs root is.
const RAMFS_MAGIC: i64 = 0x8584_58f6;
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// How the process left its old root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RootSwitch {
    /// `pivot_root`, then the old root was unmounted: it is gone from the
    /// jail's mount namespace.
    PivotRoot,
    /// The old root is the initial ramfs, which cannot be pivoted away
    /// from: the new root was moved over `/` and `chroot`ed into (as runc
    /// does on a ramdisk). The old root's files stay under the new root's
    /// mount, out of reach of a process without `CAP_SYS_ADMIN` and
    /// `CAP_SYS_CHROOT`, which the jail drops.
    MoveAndChroot,
}

/// `path` below `root` (`path` is absolute and has no `..`).
fn inside(root: &Path, path: &Path) -> PathBuf {
    let mut out = root.to_path_buf();
    for part in path.components() {
        if let Component::Normal(p) = part {
            out.push(p);
        }
    }
    out
}

fn step<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Fail + 'a {
    move |source| Fail::step(step, Some(path), source)
}

/// Make `root` (an existing, empty directory) the new root: tmpfs, the
/// resources, `/dev`, `/proc`, `/tmp`; read-only where it can be. With
/// `processes_only`, `/proc` holds only the processes (for a jail that
/// stays root: no `/proc/sys`, no `/proc/sysrq-trigger`).
pub(crate) fn build(
    root: &Path,
    resources: &[Resource],
    owner: (u32, u32),
    user_ns: bool,
    processes_only: bool,
) -> Result<(), Fail> {
    let slash = Path::new("/");
    // Mounts made here must not show outside (host mounts made later
    // below a bound directory still show inside, as a slave receives).
    sys::mount(None, slash, None, libc::MS_SLAVE | libc::MS_REC, None)
        .map_err(step("make / a slave mount", slash))?;
    sys::mount(
        Some(Path::new("tmpfs")),
        root,
        Some("tmpfs"),
        libc::MS_NOSUID,
        Some("size=1m,nr_inodes=1024,mode=0755"),
    )
    .map_err(step("mount the root tmpfs", root))?;
    let tmp = root.join("tmp");
    std::fs::create_dir_all(&tmp).map_err(step("make /tmp", &tmp))?;
    // The jail's own scratch space (vsock sockets): small, no devices,
    // nothing executable, writable by the jailed ids. Resources below
    // `/tmp` get their mount points in it.
    sys::mount(
        Some(Path::new("tmpfs")),
        &tmp,
        Some("tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        Some("size=4m,nr_inodes=4096,mode=1777"),
    )
    .map_err(step("mount /tmp", &tmp))?;
    for resource in resources {
        place(root, resource, owner, user_ns)?;
    }
    let proc_dir = root.join("proc");
    std::fs::create_dir(&proc_dir).map_err(step("make /proc", &proc_dir))?;
    sys::mount(
        Some(Path::new("proc")),
        &proc_dir,
        Some("proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        processes_only.then_some("subset=pid"),
    )
    .map_err(step("mount /proc", &proc_dir))?;
    // The root itself holds only mount points: nothing may be added.
    sys::mount(
        None,
        root,
        None,
        libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
        None,
    )
    .map_err(step("make the root read-only", root))?;
    Ok(())
}

/// The mount point of `resource` under `root`, and its bind mount (or
/// device node). The source is opened without following any symlink and
/// must still be the file checked before the fork: a path component
/// swapped meanwhile fails the jail instead of exposing another file.
fn place(root: &Path, resource: &Resource, owner: (u32, u32), user_ns: bool) -> Result<(), Fail> {
    let target = inside(root, &resource.path);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent).map_err(step("make a mount point's parent", parent))?;
    }
    let handle = std::fs::File::from(
        sys::open_path_no_symlinks(&resource.source).map_err(step("open", &resource.path))?,
    );
    let meta = handle.metadata().map_err(step("look at", &resource.path))?;
    if (meta.dev(), meta.ino()) != resource.identity {
        return Err(Fail::step(
            "open",
            Some(&resource.path),
            io::Error::from_raw_os_error(libc::ESTALE),
        ));
    }
    if resource.kind == ResourceKind::Device && !meta.file_type().is_char_device() {
        return Err(Fail::step(
            "make a device node",
            Some(&resource.path),
            io::Error::from_raw_os_error(libc::ENODEV),
        ));
    }
    if resource.kind == ResourceKind::Device && !user_ns {
        // A node of its own, owned by the jailed ids, rather than the
        // host's node: the host's permissions stay as they are.
        sys::mknod_char(&target, 0o600, meta.rdev())
            .map_err(step("make a device node", &resource.path))?;
        return sys::chown(&target, owner.0, owner.1)
            .map_err(step("give a device node to the jailed ids", &resource.path));
    }
    if meta.is_dir() {
        std::fs::create_dir(&target).map_err(step("make a mount point", &resource.path))?;
    } else {
        std::fs::File::create(&target).map_err(step("make a mount point", &resource.path))?;
    }
    let by_fd = PathBuf::from(format!("/proc/self/fd/{}", handle.as_raw_fd()));
    let recursive = if meta.is_dir() { libc::MS_REC } else { 0 };
    sys::mount(Some(&by_fd), &target, None, libc::MS_BIND | recursive, None)
        .map_err(step("bind-mount", &resource.path))?;
    // On the mount and every mount below it (a read-only directory has
    // no writable submount).
    let attrs = match resource.kind {
        ResourceKind::ReadOnly => sys::ATTR_RDONLY | sys::ATTR_NOSUID | sys::ATTR_NODEV,
        ResourceKind::Writable => sys::ATTR_NOSUID | sys::ATTR_NODEV,
        ResourceKind::Device => sys::ATTR_NOSUID,
    };
    sys::mount_setattr_recursive(&target, attrs)
        .map_err(step("restrict the bind mount", &resource.path))
}

/// Enter `root`: `pivot_root` and detach the old root, or, from an initial
/// ramfs, move the new root over `/` and chroot.
pub(crate) fn enter(root: &Path) -> Result<RootSwitch, Fail> {
    std::env::set_current_dir(root).map_err(step("change into the new root", root))?;
    match sys::pivot_root_here() {
        Ok(()) => {
            let dot = Path::new(".");
            sys::umount2(dot, libc::MNT_DETACH).map_err(step("detach the old root", root))?;
            std::env::set_current_dir("/").map_err(step("change to /", root))?;
            Ok(RootSwitch::PivotRoot)
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) && on_initial_ramfs() => {
            sys::mount(
                Some(Path::new(".")),
                Path::new("/"),
                None,
                libc::MS_MOVE,
                None,
            )
            .map_err(step("move the new root over /", root))?;
            sys::chroot(Path::new(".")).map_err(step("chroot into the new root", root))?;
            std::env::set_current_dir("/").map_err(step("change to /", root))?;
            Ok(RootSwitch::MoveAndChroot)
        }
        Err(e) => Err(Fail::step("pivot_root into the new root", Some(root), e)),
    }
}

/// Whether `/` is the initial ramfs (which `pivot_root` refuses to leave).
fn on_initial_ramfs() -> bool {
    matches!(sys::fs_magic(Path::new("/")), Ok(RAMFS_MAGIC | TMPFS_MAGIC))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_keeps_the_path_below_the_root() {
        assert_eq!(
            inside(Path::new("/run/j/root"), Path::new("/dev/kvm")),
            PathBuf::from("/run/j/root/dev/kvm")
        );
        assert_eq!(inside(Path::new("/r"), Path::new("/")), PathBuf::from("/r"));
    }
}
