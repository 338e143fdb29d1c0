//! Debian's containerd, runc and CNI plugins for L1, on a disk of their
//! own: the `containerd-*` scenarios run containerd in L1 with the shims
//! it starts (runc's today), as a Kubernetes node would. The packages are
//! downloaded (`apt-get download`) and unpacked into the cache once per
//! version; nothing is installed on the host. The image is an ext4 file
//! system built from the unpacked tree, with the one library runc needs
//! that L1 lacks (libseccomp) under `lib/`, attached to L1 as a disk with
//! serial [`SERIAL`] that the scenario mounts read-only.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{cache_dir, find_deb, output, run, Step};

/// The packages, from the Debian archive apt is set up for.
const PACKAGES: &[&str] = &["containerd", "runc", "containernetworking-plugins"];

/// The disk's serial in L1.
pub const SERIAL: &str = "containerd";

/// libseccomp, which runc links and L1 has no other user of.
const LIBSECCOMP: &str = "/lib/x86_64-linux-gnu/libseccomp.so.2";

/// The version apt would install of `package`.
fn candidate(package: &str) -> Step<String> {
    let policy = output(Command::new("apt-cache").args(["policy", package]))?;
    policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate: "))
        .map(str::to_string)
        .filter(|v| v != "(none)")
        .ok_or_else(|| format!("apt knows no {package}: run apt-get update"))
}

/// The unpacked packages (cached by version), with libseccomp beside
/// them.
fn tree() -> Step<PathBuf> {
    let mut versions = Vec::new();
    for package in PACKAGES {
        let version = match candidate(package) {
            Ok(v) => v,
            Err(_) => {
                run(
                    "apt-get update",
                    Command::new("apt-get").args(["update", "-q"]),
                )?;
                candidate(package)?
            }
        };
        versions.push(format!("{package}_{version}"));
    }
    let name = versions.join("+").replace([':', '~'], "_");
    let dir = cache_dir().join("l1").join("containerd").join(name);
    let root = dir.join("root");
    let done = dir.join("unpacked");
    if done.exists() {
        return Ok(root);
    }
    let _ = std::fs::remove_dir_all(&dir);
    for package in PACKAGES {
        let download = dir.join("debs").join(package);
        std::fs::create_dir_all(&download)
            .map_err(|e| format!("mkdir {}: {e}", download.display()))?;
        run(
            &format!("apt-get download {package}"),
            Command::new("apt-get")
                .args(["download", package])
                .current_dir(&download),
        )?;
        let deb = find_deb(&download)?;
        run(
            &format!("unpack {package}"),
            Command::new("dpkg").arg("-x").arg(&deb).arg(&root),
        )?;
    }
    let lib = root.join("lib");
    std::fs::create_dir_all(&lib).map_err(|e| format!("mkdir {}: {e}", lib.display()))?;
    std::fs::copy(LIBSECCOMP, lib.join("libseccomp.so.2"))
        .map_err(|e| format!("copy {LIBSECCOMP} (package libseccomp2): {e}"))?;
    let _ = std::fs::remove_dir_all(dir.join("debs"));
    std::fs::write(&done, b"").map_err(|e| format!("write {}: {e}", done.display()))?;
    Ok(root)
}

/// The ext4 image of the packages at `path` (made afresh from the cached
/// tree).
pub fn image(path: &Path) -> Step<()> {
    let root = tree()?;
    let _ = std::fs::remove_file(path);
    run(
        "mkfs.ext4 containerd image",
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
            .arg(&root)
            .arg(path)
            .arg("256M"),
    )
}
