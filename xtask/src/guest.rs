//! `cargo xtask guest`: prepare the default guest, idempotently.
//!
//! - The kernel: Debian's `linux-source-6.1`, `make tinyconfig` plus the
//!   project's fragment `guest/kernel.config`, built once per (fragment,
//!   source version) and cached by their hash. The ELF vmlinux is what
//!   chitin boots (no decompression).
//! - The initramfs: a newc cpio written by [`crate::cpio`] holding the
//!   static `chitin-agent` as /init and a static busybox.
//!
//! A cached kernel costs one dpkg query and a hash; nothing touches the
//! network unless a package is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cpio::Cpio;
use crate::util::{self, cache_dir, install_packages, output, run, workspace_root, Step};

/// Packages the kernel build needs.
const KERNEL_PACKAGES: &[&str] = &[
    "linux-source-6.1",
    "build-essential",
    "bc",
    "bison",
    "flex",
    "libelf-dev",
    "libssl-dev",
];
/// Packages the initramfs needs.
const INITRAMFS_PACKAGES: &[&str] = &["busybox-static"];
const SOURCE_PACKAGE: &str = "linux-source-6.1";
const SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
/// The Rust target the static guest programs are built for (the only one
/// installed; static through `+crt-static`, never musl).
pub const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// The prepared default guest.
pub struct GuestImage {
    /// ELF vmlinux with a PVH note.
    pub kernel: PathBuf,
    /// newc initramfs.
    pub initramfs: PathBuf,
}

/// Prepare kernel and initramfs; print where they are.
pub fn guest() -> Step {
    let image = prepare()?;
    println!("guest kernel:    {}", image.kernel.display());
    println!("guest initramfs: {}", image.initramfs.display());
    Ok(())
}

/// Prepare kernel and initramfs (cached).
pub fn prepare() -> Step<GuestImage> {
    let kernel = kernel()?;
    let agent = build_static(
        &["-p", "chitin-agent", "--bin", "chitin-agent"],
        "chitin-agent",
    )?;
    let initramfs = initramfs(&agent)?;
    let dir = cache_dir().join("guest");
    let kernel_link = dir.join("vmlinux");
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    std::fs::copy(&kernel, &kernel_link).map_err(|e| format!("copy {}: {e}", kernel.display()))?;
    Ok(GuestImage {
        kernel: kernel_link,
        initramfs,
    })
}

/// Build a static binary of this workspace for the guest; returns its path.
/// `args` selects the package and target (`-p X --bin Y` or `--example Z`).
pub fn build_static(args: &[&str], name: &str) -> Step<PathBuf> {
    let target_dir = workspace_root().join("target").join("static");
    let mut cmd = util::cargo(&["build", "--release", "--target", GUEST_TARGET]);
    // Guest binaries ship in initramfs images: no debug info, no symbols.
    cmd.args(["--config", "profile.release.debug=false"])
        .args(["--config", "profile.release.strip=true"])
        .args(args)
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static");
    run(&format!("build static {name}"), &mut cmd)?;
    let sub = if args.contains(&"--example") {
        "release/examples"
    } else {
        "release"
    };
    Ok(target_dir.join(GUEST_TARGET).join(sub).join(name))
}

fn source_version() -> Step<String> {
    let v = output(Command::new("dpkg-query").args(["-W", "-f=${Version}", SOURCE_PACKAGE]))?;
    Ok(v.trim().to_string())
}

/// The config fragment's path.
fn fragment_path() -> PathBuf {
    workspace_root().join("guest").join("kernel.config")
}

/// Build (or find cached) the guest vmlinux; returns its path.
pub fn kernel() -> Step<PathBuf> {
    install_packages(KERNEL_PACKAGES)?;
    let fragment = util::read(&fragment_path())?;
    let version = source_version()?;
    let mut key_input = fragment.clone();
    key_input.push(b'\n');
    key_input.extend_from_slice(version.as_bytes());
    let key = format!("{:016x}", util::fnv1a(util::FNV_BASIS, &key_input));
    let cache = cache_dir();
    let done = cache.join(format!("vmlinux-{key}"));
    if done.exists() {
        if !util::quiet() {
            eprintln!("xtask: guest kernel cached ({})", done.display());
        }
        return Ok(done);
    }
    let src = unpack_source(&cache)?;
    let out = cache.join(format!("kernel-out-{key}"));
    configure(&src, &out, &fragment)?;
    build_vmlinux(&src, &out)?;
    let built = out.join("vmlinux");
    let tmp = done.with_extension("tmp");
    // Keep symbols out of the cached image: linux-loader only reads PT_LOAD
    // and PT_NOTE, and a smaller file loads faster.
    run(
        "strip guest vmlinux",
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(&built)
            .arg(&tmp),
    )?;
    std::fs::rename(&tmp, &done).map_err(|e| format!("rename {}: {e}", done.display()))?;
    Ok(done)
}

fn unpack_source(cache: &Path) -> Step<PathBuf> {
    let dir = cache.join("kernel-src");
    let src = dir.join("linux-source-6.1");
    if src.join("Makefile").exists() {
        return Ok(src);
    }
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    run(
        "unpack linux-source-6.1",
        Command::new("tar")
            .arg("xf")
            .arg(SOURCE_TARBALL)
            .current_dir(&dir),
    )?;
    Ok(src)
}

fn make(src: &Path, out: &Path) -> Command {
    let mut cmd = Command::new("make");
    cmd.arg("-C").arg(src).arg(format!("O={}", out.display()));
    cmd
}

/// `tinyconfig`, then the fragment, then `olddefconfig`; every option the
/// fragment sets must come out as set.
fn configure(src: &Path, out: &Path, fragment: &[u8]) -> Step {
    std::fs::create_dir_all(out).map_err(|e| format!("mkdir {}: {e}", out.display()))?;
    run(
        "kernel tinyconfig",
        make(src, out).arg("tinyconfig").stdout(Stdio::null()),
    )?;
    let config_path = out.join(".config");
    let mut config = util::read(&config_path)?;
    config.push(b'\n');
    config.extend_from_slice(fragment);
    std::fs::write(&config_path, &config).map_err(|e| format!("write .config: {e}"))?;
    run(
        "kernel olddefconfig",
        make(src, out).arg("olddefconfig").stdout(Stdio::null()),
    )?;
    let final_config = String::from_utf8_lossy(&util::read(&config_path)?).into_owned();
    let missing = missing_options(&String::from_utf8_lossy(fragment), &final_config);
    if !missing.is_empty() {
        return Err(format!(
            "kernel config options did not land (dependencies missing?): {}",
            missing.join(", ")
        ));
    }
    Ok(())
}

/// Options of `fragment` that `config` does not carry as requested.
pub fn missing_options(fragment: &str, config: &str) -> Vec<String> {
    let lines: Vec<&str> = config.lines().collect();
    fragment
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("CONFIG_"))
        .filter(|wanted| {
            let (key, value) = wanted.split_once('=').unwrap_or((wanted, ""));
            let found = if value == "n" {
                !lines.iter().any(|l| l.starts_with(&format!("{key}=")))
            } else {
                lines.contains(wanted)
            };
            !found
        })
        .map(str::to_string)
        .collect()
}

/// `make vmlinux` with a progress line every 20 s instead of silence.
fn build_vmlinux(src: &Path, out: &Path) -> Step {
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let log_path = out.join("build.log");
    let log = std::fs::File::create(&log_path).map_err(|e| format!("create build log: {e}"))?;
    let log_err = log.try_clone().map_err(|e| format!("build log: {e}"))?;
    eprintln!(
        "xtask: == building the guest kernel with {jobs} jobs (about 3-5 minutes on 2 cores; log: {})",
        log_path.display()
    );
    let start = Instant::now();
    let mut child = make(src, out)
        .arg(format!("-j{jobs}"))
        .arg("vmlinux")
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|e| format!("cannot run make: {e}"))?;
    let mut last = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().map_err(|e| format!("make: {e}"))? {
            break status;
        }
        std::thread::sleep(Duration::from_millis(500));
        if last.elapsed() >= Duration::from_secs(20) {
            last = Instant::now();
            let lines = std::fs::read_to_string(&log_path)
                .map(|s| s.lines().count())
                .unwrap_or(0);
            eprintln!(
                "xtask:    ... kernel build running, {:.0} s, {lines} build steps so far",
                start.elapsed().as_secs_f64()
            );
        }
    };
    if !status.success() {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        for line in tail.iter().rev() {
            eprintln!("    {line}");
        }
        return Err(format!(
            "kernel build failed ({status}); log: {}",
            log_path.display()
        ));
    }
    eprintln!(
        "xtask: ok guest kernel built ({:.0} s)",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Write the guest initramfs: /init = the agent, busybox with a shell link,
/// the directories the agent mounts on, and /dev/console (the kernel opens
/// it for init before devtmpfs is mounted).
fn initramfs(agent: &Path) -> Step<PathBuf> {
    install_packages(INITRAMFS_PACKAGES)?;
    let mut cpio = Cpio::new();
    for dir in ["bin", "dev", "proc", "sys", "tmp", "run", "etc", "mnt"] {
        cpio.dir(dir);
    }
    cpio.char_dev("dev/console", 5, 1);
    cpio.file_from("init", 0o755, agent)?;
    cpio.file_from("bin/busybox", 0o755, Path::new("/bin/busybox"))?;
    // One link per applet, so `uname`, `cat`, `sleep`, ... resolve in PATH.
    let applets = util::output(Command::new("/bin/busybox").arg("--list"))?;
    for applet in applets
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && !a.contains('/'))
    {
        if applet != "busybox" {
            cpio.symlink(&format!("bin/{applet}"), "busybox");
        }
    }
    let path = cache_dir().join("guest").join("initramfs.cpio");
    util::write_atomic(&path, &cpio.finish())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_options_finds_unset_and_wrong_values() {
        let fragment = "# comment\nCONFIG_A=y\nCONFIG_B=y\nCONFIG_C=n\nCONFIG_D=64\nCONFIG_E=n\n";
        let config = "CONFIG_A=y\nCONFIG_B=m\n# CONFIG_C is not set\nCONFIG_D=64\nCONFIG_E=y\n";
        assert_eq!(
            missing_options(fragment, config),
            vec!["CONFIG_B=y", "CONFIG_E=n"]
        );
    }
}
