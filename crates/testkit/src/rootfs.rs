//! A minimal container root file system made from a static busybox: what
//! `examples/container.rs` and the nested `container` scenario run
//! commands in (`cargo xtask rootfs DIR` makes one on the host).

use std::fs;
use std::io;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;

/// What `/etc/os-release` of the root says, to tell it from the agent's.
pub const ROOTFS_NAME: &str = "chitin busybox rootfs";

/// The hostname file the image ships (a container's hostname replaces it
/// inside the container).
pub const IMAGE_HOSTNAME: &str = "busybox-rootfs";

/// The top-level directories of the root, sorted.
pub const ROOTFS_DIRS: &[&str] = &["bin", "dev", "etc", "home", "proc", "root", "sys", "tmp"];

/// Make a root file system in `dir` (emptied first) from the static
/// `busybox` binary: the top-level directories, busybox with a link per
/// applet in `/bin`, and `/etc` with `passwd`, `group`, `hostname` and
/// `os-release` (users root and `user`, uid/gid 1000).
pub fn busybox_rootfs(dir: &Path, busybox: &Path) -> io::Result<()> {
    if dir.exists() {
        fs::remove_dir_all(dir)?;
    }
    for sub in ROOTFS_DIRS {
        fs::create_dir_all(dir.join(sub))?;
    }
    fs::create_dir_all(dir.join("home/user"))?;
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    let bin = dir.join("bin");
    fs::copy(busybox, bin.join("busybox"))?;
    fs::set_permissions(bin.join("busybox"), fs::Permissions::from_mode(0o755))?;
    let list = std::process::Command::new(busybox).arg("--list").output()?;
    if !list.status.success() {
        return Err(io::Error::other(format!(
            "{} --list failed",
            busybox.display()
        )));
    }
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        let applet = applet.trim();
        if !applet.is_empty() && applet != "busybox" && !applet.contains('/') {
            symlink("busybox", bin.join(applet))?;
        }
    }
    let etc = dir.join("etc");
    fs::write(
        etc.join("passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
    )?;
    fs::write(etc.join("group"), "root:x:0:\nuser:x:1000:\n")?;
    fs::write(etc.join("hostname"), format!("{IMAGE_HOSTNAME}\n"))?;
    fs::write(etc.join("os-release"), format!("NAME=\"{ROOTFS_NAME}\"\n"))?;
    Ok(())
}
