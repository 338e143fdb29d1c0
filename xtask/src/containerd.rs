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

/// The OCI image the scenarios import (`ctr image import`), by the name
/// its index gives it.
pub const IMAGE_NAME: &str = "docker.io/chitin/busybox:test";
/// The pod sandbox ("pause") image the CRI scenario's containerd is
/// configured with: the same layer, a command that waits to be killed.
pub const PAUSE_IMAGE_NAME: &str = "docker.io/chitin/pause:test";
const PAUSE_CMD: &str = r#"["/bin/sleep","2147483647"]"#;
/// Where the image archive is on the disk (both images).
pub const IMAGE_ARCHIVE: &str = "chitin-images/busybox-oci.tar";
/// The file only the image has, and its text.
pub const IMAGE_FILE: &str = "etc/os-release-of-image";
pub const IMAGE_FILE_TEXT: &str = "chitin-busybox-image";

/// Tar the tree at `dir` into `archive` reproducibly: sorted, mtime 0,
/// owned by root.
fn tar(step: &str, dir: &Path, archive: &Path) -> Step<()> {
    run(
        step,
        Command::new("tar")
            .args(["--sort=name", "--mtime=@0", "--owner=0", "--group=0"])
            .arg("--numeric-owner")
            .arg("-cf")
            .arg(archive)
            .arg("-C")
            .arg(dir)
            .arg("."),
    )
}

/// `sha256:<hex>` and the size of `path`.
fn digest(path: &Path) -> Step<(String, u64)> {
    let sum = output(Command::new("sha256sum").arg(path))?;
    let hex = sum
        .split_whitespace()
        .next()
        .filter(|h| h.len() == 64)
        .ok_or_else(|| format!("sha256sum {}: {sum:?}", path.display()))?;
    let size = std::fs::metadata(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .len();
    Ok((format!("sha256:{hex}"), size))
}

/// Put `body` in the layout's blobs; its digest and size.
fn blob(layout: &Path, body: &[u8]) -> Step<(String, u64)> {
    let tmp = layout.join("blob.tmp");
    std::fs::write(&tmp, body).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let (digest, size) = digest(&tmp)?;
    let to = layout.join("blobs/sha256").join(&digest["sha256:".len()..]);
    std::fs::rename(&tmp, &to).map_err(|e| format!("{}: {e}", to.display()))?;
    Ok((digest, size))
}

/// Build the OCI image archive of two images of a busybox root (static busybox from
/// the host's `busybox-static`, one uncompressed layer) at `archive`:
/// an image-layout tar as `ctr image import` takes it: [`IMAGE_NAME`]
/// (a shell) and [`PAUSE_IMAGE_NAME`]. The layer has no
/// `/dev` or `/sys`, as many images do not: the shim makes them.
fn oci_archive(archive: &Path) -> Step<()> {
    let work = cache_dir().join("l1").join("containerd").join("oci");
    let _ = std::fs::remove_dir_all(&work);
    let rootfs = work.join("rootfs");
    let fail = |e: std::io::Error| format!("busybox image: {e}");
    chitin_testkit::rootfs::busybox_rootfs(&rootfs, Path::new("/bin/busybox")).map_err(fail)?;
    std::fs::write(rootfs.join(IMAGE_FILE), format!("{IMAGE_FILE_TEXT}\n")).map_err(fail)?;
    for dir in ["dev", "sys"] {
        std::fs::remove_dir(rootfs.join(dir)).map_err(fail)?;
    }
    let layout = work.join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256")).map_err(fail)?;
    let layer = work.join("layer.tar");
    tar("tar the image layer", &rootfs, &layer)?;
    let (layer_digest, layer_size) = digest(&layer)?;
    let to = layout
        .join("blobs/sha256")
        .join(&layer_digest["sha256:".len()..]);
    std::fs::rename(&layer, &to).map_err(fail)?;
    // Both images share the layer; only their commands differ.
    let mut manifests = Vec::new();
    for (name, cmd) in [
        (IMAGE_NAME, r#"["/bin/sh"]"#),
        (PAUSE_IMAGE_NAME, PAUSE_CMD),
    ] {
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin:/sbin:/usr/bin:/usr/sbin"],"Cmd":{cmd},"WorkingDir":"/"}},"rootfs":{{"type":"layers","diff_ids":["{layer_digest}"]}}}}"#
        );
        let (config_digest, config_size) = blob(&layout, config.as_bytes())?;
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{config_size}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer_digest}","size":{layer_size}}}]}}"#
        );
        let (manifest_digest, manifest_size) = blob(&layout, manifest.as_bytes())?;
        let tag = name.rsplit(':').next().unwrap_or("latest");
        manifests.push(format!(
            r#"{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{manifest_digest}","size":{manifest_size},"platform":{{"architecture":"amd64","os":"linux"}},"annotations":{{"io.containerd.image.name":"{name}","org.opencontainers.image.ref.name":"{tag}"}}}}"#
        ));
    }
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{}]}}"#,
        manifests.join(",")
    );
    std::fs::write(layout.join("index.json"), index).map_err(fail)?;
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .map_err(fail)?;
    if let Some(dir) = archive.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    tar("tar the OCI image", &layout, archive)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// The ext4 image of the packages at `path` (made afresh from the cached
/// tree, with the OCI image archive built anew).
pub fn image(path: &Path) -> Step<()> {
    let root = tree()?;
    oci_archive(&root.join(IMAGE_ARCHIVE))?;
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
