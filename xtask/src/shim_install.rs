//! `cargo xtask shim-install`: put chitin's containerd shim on a node.
//!
//! 1. builds `containerd-shim-chitin-v2` (release) and installs it next to
//!    the `containerd` on PATH (or `--bin-dir`);
//! 2. prepares the default guest (`cargo xtask guest`) and installs it in
//!    `/usr/share/chitin/guest`;
//! 3. writes `/etc/chitin/shim.conf` naming that guest, unless the file
//!    exists (an operator's settings are never overwritten);
//! 4. adds the `chitin` runtime to containerd's config
//!    (`/etc/containerd/config.toml`) for the CRI plugin of the config's
//!    version, unless it is there.
//!
//! Every step is idempotent: a second run changes nothing. `--root DIR`
//! installs under DIR instead of `/` (for images, and for the tests).
//! containerd reads its config at start: restart it afterwards.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::guest::{self, KernelVersion};
use crate::util::{cargo, run, workspace_root, Step};

/// The shim binary's name: containerd looks for it on its PATH.
pub const SHIM_BINARY: &str = "containerd-shim-chitin-v2";
/// containerd's runtime type for the shim, and the CRI handler name.
const RUNTIME_TYPE: &str = "io.containerd.chitin.v2";
const HANDLER: &str = "chitin";
const GUEST_DIR: &str = "usr/share/chitin/guest";
const SHIM_CONFIG: &str = "etc/chitin/shim.conf";
const CONTAINERD_CONFIG: &str = "etc/containerd/config.toml";

/// What the command line asked for.
struct Options {
    root: PathBuf,
    bin_dir: Option<PathBuf>,
}

fn parse(args: &[String]) -> Step<Options> {
    let mut o = Options {
        root: PathBuf::from("/"),
        bin_dir: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .map(PathBuf::from)
                .ok_or_else(|| format!("{a} needs a value"))
        };
        match a.as_str() {
            "--root" => o.root = value()?,
            "--bin-dir" => o.bin_dir = Some(value()?),
            _ => {
                return Err(format!(
                    "unknown option {a:?}; usage: cargo xtask shim-install [--root DIR] [--bin-dir DIR]"
                ))
            }
        }
    }
    Ok(o)
}

/// `cargo xtask shim-install [--root DIR] [--bin-dir DIR]`.
pub fn shim_install(args: &[String]) -> Step {
    let o = parse(args)?;
    run(
        "build the shim (release)",
        &mut cargo(&[
            "build",
            "--release",
            "-p",
            "chitin-shim",
            "--bin",
            SHIM_BINARY,
        ]),
    )?;
    let binary = workspace_root().join("target/release").join(SHIM_BINARY);
    let image = guest::prepare(KernelVersion::V6_1)?;
    let bin_dir = match o.bin_dir {
        Some(dir) => dir,
        None => containerd_dir().unwrap_or_else(|| PathBuf::from("/usr/local/bin")),
    };
    let done = install(
        &o.root,
        &binary,
        &rooted(&o.root, &bin_dir),
        &image.kernel,
        &image.initramfs,
    )?;
    for line in done {
        println!("shim-install: {line}");
    }
    println!(
        "shim-install: restart containerd to load the runtime (e.g. systemctl restart containerd)"
    );
    Ok(())
}

/// `path` (absolute) under `root`.
fn rooted(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// The directory of the `containerd` on PATH.
fn containerd_dir() -> Option<PathBuf> {
    let out = Command::new("sh")
        .args(["-c", "command -v containerd"])
        .output()
        .ok()?;
    let path = String::from_utf8(out.stdout).ok()?;
    Path::new(path.trim()).parent().map(Path::to_path_buf)
}

/// Copy `from` to `to` (mode `mode`) unless `to` already has the same
/// bytes; through a temporary file and a rename, so a running reader never
/// sees half a file. Whether it copied.
fn install_file(from: &Path, to: &Path, mode: u32) -> Step<bool> {
    use std::os::unix::fs::PermissionsExt;
    let new = fs::read(from).map_err(|e| format!("{}: {e}", from.display()))?;
    if fs::read(to).is_ok_and(|old| old == new) {
        return Ok(false);
    }
    let dir = to.parent().ok_or("no parent directory")?;
    fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let tmp = to.with_extension("chitin-tmp");
    fs::write(&tmp, &new).map_err(|e| format!("{}: {e}", tmp.display()))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    fs::rename(&tmp, to).map_err(|e| format!("{}: {e}", to.display()))?;
    Ok(true)
}

/// Steps 1-4 from built files: the binary into `bin_dir`, the guest under
/// `root`, the shim's settings, containerd's config. What was done, one
/// line each.
fn install(
    root: &Path,
    binary: &Path,
    bin_dir: &Path,
    kernel: &Path,
    initramfs: &Path,
) -> Step<Vec<String>> {
    let mut done = Vec::new();
    let mut note = |changed: bool, what: String| {
        done.push(format!(
            "{} {what}",
            if changed { "installed" } else { "unchanged" }
        ));
    };
    let to = bin_dir.join(SHIM_BINARY);
    note(install_file(binary, &to, 0o755)?, to.display().to_string());
    let guest_dir = root.join(GUEST_DIR);
    let kernel_name = if kernel.file_name().is_some_and(|n| n == "bzImage") {
        "bzImage"
    } else {
        "vmlinux"
    };
    for (from, name) in [(kernel, kernel_name), (initramfs, "initramfs.cpio")] {
        let to = guest_dir.join(name);
        note(install_file(from, &to, 0o644)?, to.display().to_string());
    }
    let shim_config = root.join(SHIM_CONFIG);
    if shim_config.exists() {
        done.push(format!("kept {} (the operator's)", shim_config.display()));
    } else {
        let text = format!(
            "# chitin's containerd shim: the guest a pod VM boots, and its size.\n\
             guest_dir = /{GUEST_DIR}\nmemory_mib = 256\nvcpus = 1\n"
        );
        let dir = shim_config.parent().ok_or("no parent directory")?;
        fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        fs::write(&shim_config, text).map_err(|e| format!("{}: {e}", shim_config.display()))?;
        done.push(format!("wrote {}", shim_config.display()));
    }
    let config = root.join(CONTAINERD_CONFIG);
    let old = match fs::read_to_string(&config) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("{}: {e}", config.display())),
    };
    match add_runtime(&old)? {
        Some(new) => {
            let dir = config.parent().ok_or("no parent directory")?;
            fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
            fs::write(&config, new).map_err(|e| format!("{}: {e}", config.display()))?;
            done.push(format!(
                "added runtime {HANDLER} ({RUNTIME_TYPE}) to {}",
                config.display()
            ));
        }
        None => done.push(format!(
            "{} already has runtime {HANDLER}",
            config.display()
        )),
    }
    Ok(done)
}

/// containerd's config with the `chitin` runtime added for its CRI
/// plugin, or `None` if it is there. The table's name depends on the
/// config's `version` (none: 1; 2: containerd 1.x; 3: containerd 2.x).
fn add_runtime(config: &str) -> Step<Option<String>> {
    let version = config.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "version").then(|| v.trim().to_string())
    });
    let cri = match version.as_deref() {
        None if config.trim().is_empty() => "\"io.containerd.grpc.v1.cri\"",
        None | Some("1") => "cri",
        Some("2") => "\"io.containerd.grpc.v1.cri\"",
        Some("3") => "\"io.containerd.cri.v1.runtime\"",
        Some(other) => return Err(format!("containerd config version {other} is not known")),
    };
    let table = format!("[plugins.{cri}.containerd.runtimes.{HANDLER}]");
    if config.lines().any(|l| l.trim() == table) {
        return Ok(None);
    }
    let mut out = if config.trim().is_empty() {
        "version = 2\n".to_string()
    } else {
        config.to_string()
    };
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&format!(
        "\n# chitin: a VM per pod (cargo xtask shim-install)\n{table}\n  runtime_type = \"{RUNTIME_TYPE}\"\n"
    ));
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_is_added_once_under_the_configs_version() {
        let fresh = add_runtime("").unwrap().unwrap();
        assert!(fresh.starts_with("version = 2\n"));
        assert!(
            fresh.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.chitin]")
        );
        assert!(fresh.contains("runtime_type = \"io.containerd.chitin.v2\""));
        assert_eq!(add_runtime(&fresh).unwrap(), None, "idempotent");

        let v1 = add_runtime("root = \"/var/lib/containerd\"")
            .unwrap()
            .unwrap();
        assert!(v1.starts_with("root = \"/var/lib/containerd\"\n"));
        assert!(v1.contains("[plugins.cri.containerd.runtimes.chitin]"));
        assert_eq!(add_runtime(&v1).unwrap(), None);

        let v3 = add_runtime("version = 3\n").unwrap().unwrap();
        assert!(
            v3.contains("[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.chitin]")
        );
        assert!(add_runtime("version = 9\n").is_err());
    }

    #[test]
    fn a_second_install_changes_nothing_and_settings_are_kept() {
        let base = std::env::temp_dir().join(format!("chitin-shim-install-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let built = base.join("built");
        fs::create_dir_all(&built).unwrap();
        let (bin, kernel, initramfs) = (
            built.join("shim"),
            built.join("vmlinux"),
            built.join("i.cpio"),
        );
        fs::write(&bin, b"shim").unwrap();
        fs::write(&kernel, b"kernel").unwrap();
        fs::write(&initramfs, b"initramfs").unwrap();
        let root = base.join("root");
        let bin_dir = root.join("usr/bin");
        fs::create_dir_all(root.join("etc/containerd")).unwrap();
        fs::write(
            root.join(CONTAINERD_CONFIG),
            "version = 2\n[grpc]\n  address = \"/x\"\n",
        )
        .unwrap();

        let first = install(&root, &bin, &bin_dir, &kernel, &initramfs).unwrap();
        assert!(first
            .iter()
            .any(|l| l.starts_with("installed") && l.contains(SHIM_BINARY)));
        assert!(first.iter().any(|l| l.starts_with("wrote")));
        assert!(first.iter().any(|l| l.starts_with("added runtime")));
        let config = fs::read_to_string(root.join(CONTAINERD_CONFIG)).unwrap();
        assert!(
            config.starts_with("version = 2\n[grpc]\n  address = \"/x\"\n"),
            "{config}"
        );
        let settings = fs::read_to_string(root.join(SHIM_CONFIG)).unwrap();
        assert!(settings.contains("guest_dir = /usr/share/chitin/guest"));
        assert_eq!(
            fs::read(root.join(GUEST_DIR).join("vmlinux")).unwrap(),
            b"kernel"
        );

        // An operator edits the settings; a second run keeps them and
        // changes nothing else.
        fs::write(root.join(SHIM_CONFIG), "memory_mib = 512\n").unwrap();
        let second = install(&root, &bin, &bin_dir, &kernel, &initramfs).unwrap();
        assert!(
            second
                .iter()
                .all(|l| !l.starts_with("installed") && !l.starts_with("added")),
            "{second:?}"
        );
        assert_eq!(
            fs::read_to_string(root.join(CONTAINERD_CONFIG)).unwrap(),
            config
        );
        assert_eq!(
            fs::read_to_string(root.join(SHIM_CONFIG)).unwrap(),
            "memory_mib = 512\n"
        );

        // A new build replaces the binary.
        fs::write(&bin, b"shim v2").unwrap();
        let third = install(&root, &bin, &bin_dir, &kernel, &initramfs).unwrap();
        assert!(third
            .iter()
            .any(|l| l.starts_with("installed") && l.contains(SHIM_BINARY)));
        assert_eq!(fs::read(bin_dir.join(SHIM_BINARY)).unwrap(), b"shim v2");
        fs::remove_dir_all(&base).unwrap();
    }
}
