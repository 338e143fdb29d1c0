//! `cargo xtask guest [--kernel VERSION]`: prepare a guest, idempotently.
//!
//! - The kernel: Debian's `linux-source-<VERSION>`, `make tinyconfig` plus
//!   the project's fragment `guest/kernel.config`, built once per (version,
//!   fragment, source package version) and cached by their hash. Both the
//!   ELF vmlinux (what chitin boots by default: no decompression) and the
//!   bzImage are kept. [`KernelVersion`] lists the versions: 6.1, Debian
//!   12's own kernel and the default, and 6.12, the kernel of Debian 13 and
//!   of bookworm-backports, whose virtio-vsock driver lays packets out
//!   differently (one descriptor per page fragment).
//! - The initramfs: a newc cpio written by [`crate::cpio`] holding the
//!   static `chitin-agent` as /init and a static busybox; the same for
//!   every kernel. The nested tier's test guests boot another one,
//!   [`test_initramfs`], whose /init is `chitin-test-agent` (the agent plus
//!   the test scenarios and tools): the production image carries no tests.
//!
//! `linux-source-6.1` comes from the machine's own apt sources. 6.12 is in
//! bookworm-backports, which a Debian 12 machine usually does not list: it
//! is fetched with `apt-get download` through a private apt configuration
//! under the cache (its own sources list and package lists), so the
//! machine's apt setup is never changed and nothing is installed from
//! backports.
//!
//! A cached kernel costs one package query and a hash; nothing touches the
//! network unless a package is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::cpio::Cpio;
use crate::util::{self, cache_dir, install_packages, output, run, workspace_root, Step};

/// Packages every kernel build needs.
const BUILD_PACKAGES: &[&str] = &[
    "build-essential",
    "bc",
    "bison",
    "flex",
    "libelf-dev",
    "libssl-dev",
    "xz-utils",
];
/// Packages the initramfs needs.
const INITRAMFS_PACKAGES: &[&str] = &["busybox-static"];
/// The Debian archive used for bookworm-backports when the machine's own
/// apt sources name none.
const DEFAULT_DEBIAN_MIRROR: &str = "http://deb.debian.org/debian";
/// Where the machine's apt sources are.
const APT_SOURCES: &[&str] = &[
    "/etc/apt/sources.list.d/debian.sources",
    "/etc/apt/sources.list",
];

/// A guest kernel version the project builds and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelVersion {
    /// Linux 6.1, Debian 12's kernel: the default guest.
    V6_1,
    /// Linux 6.12, Debian 13's kernel (and bookworm-backports').
    V6_12,
}

impl KernelVersion {
    /// Every version, the default first.
    pub const ALL: [KernelVersion; 2] = [KernelVersion::V6_1, KernelVersion::V6_12];

    /// `6.1`, `6.12`.
    pub fn name(self) -> &'static str {
        match self {
            KernelVersion::V6_1 => "6.1",
            KernelVersion::V6_12 => "6.12",
        }
    }

    /// The version called `name`.
    pub fn parse(name: &str) -> Option<KernelVersion> {
        Self::ALL.into_iter().find(|v| v.name() == name)
    }

    /// Debian's source package.
    fn package(self) -> String {
        format!("linux-source-{}", self.name())
    }

    /// Whether the package comes from bookworm-backports rather than the
    /// machine's own apt sources.
    fn in_backports(self) -> bool {
        self == KernelVersion::V6_12
    }
}
/// The Rust target the static guest programs are built for (the only one
/// installed; static through `+crt-static`, never musl).
pub const GUEST_TARGET: &str = "x86_64-unknown-linux-gnu";

/// A prepared guest.
pub struct GuestImage {
    /// ELF vmlinux with a PVH note.
    pub kernel: PathBuf,
    /// The same kernel as a bzImage.
    pub bzimage: PathBuf,
    /// newc initramfs.
    pub initramfs: PathBuf,
}

/// A built kernel in the cache.
pub struct BuiltKernel {
    /// ELF vmlinux, debug info stripped.
    pub vmlinux: PathBuf,
    /// bzImage.
    pub bzimage: PathBuf,
    /// `System.map`.
    pub system_map: PathBuf,
}

/// `cargo xtask guest [--kernel VERSION | --distro debian]`: prepare the
/// guest; print where it is.
pub fn guest(args: &[String]) -> Step {
    if let [flag, distro] = args {
        if flag == "--distro" {
            if distro != "debian" {
                return Err(format!("unknown distribution {distro:?}; known: debian"));
            }
            let image = prepare_debian()?;
            println!("guest kernel:    {}", image.kernel.display());
            println!("guest initramfs: {}", image.initramfs.display());
            return Ok(());
        }
    }
    let version = match args {
        [] => KernelVersion::V6_1,
        [flag, name] if flag == "--kernel" => KernelVersion::parse(name).ok_or_else(|| {
            let known: Vec<&str> = KernelVersion::ALL.iter().map(|v| v.name()).collect();
            format!("unknown kernel {name:?}; known: {}", known.join(" "))
        })?,
        _ => return Err("usage: cargo xtask guest [--kernel 6.1|6.12 | --distro debian]".into()),
    };
    let image = prepare(version)?;
    println!("guest kernel:    {}", image.kernel.display());
    println!("guest bzImage:   {}", image.bzimage.display());
    println!("guest initramfs: {}", image.initramfs.display());
    Ok(())
}

/// Prepare kernel and initramfs (cached). The default version's image is
/// also copied to `guest/` in the cache, where `GuestImage::default()`
/// looks; others go to `guest-<version>/`.
pub fn prepare(version: KernelVersion) -> Step<GuestImage> {
    let built = kernel(version)?;
    let initramfs = agent_initramfs()?;
    let dir = match version {
        KernelVersion::V6_1 => cache_dir().join("guest"),
        other => cache_dir().join(format!("guest-{}", other.name())),
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let copy = |from: &Path, name: &str| -> Step<PathBuf> {
        let to = dir.join(name);
        copy_if_changed(from, &to)?;
        Ok(to)
    };
    let kernel = copy(&built.vmlinux, "vmlinux")?;
    let bzimage = copy(&built.bzimage, "bzImage")?;
    let initramfs = if dir.join("initramfs.cpio") == initramfs {
        initramfs
    } else {
        copy(&initramfs, "initramfs.cpio")?
    };
    Ok(GuestImage {
        kernel,
        bzimage,
        initramfs,
    })
}

/// The initramfs every guest kernel boots with: the static agent, built
/// first, and busybox.
pub fn agent_initramfs() -> Step<PathBuf> {
    initramfs(&production_agent()?, "initramfs.cpio", None)
}

fn production_agent() -> Step<PathBuf> {
    build_static(
        &["-p", "chitin-agent", "--bin", "chitin-agent"],
        "chitin-agent",
    )
}

fn test_agent() -> Step<PathBuf> {
    build_static(
        &["-p", "chitin-testkit", "--bin", "chitin-test-agent"],
        "chitin-test-agent",
    )
}

/// The test guests' initramfs: the static test agent and busybox.
pub fn test_initramfs() -> Step<PathBuf> {
    initramfs(&test_agent()?, "test-initramfs.cpio", None)
}

/// The test initramfs plus the Debian cloud kernel's modules a chitin
/// guest needs, for the nested tier's `-debian` rows.
pub fn debian_test_initramfs(kernel: &DebianKernel) -> Step<PathBuf> {
    let modules = guest_modules(kernel)?;
    initramfs(
        &test_agent()?,
        "test-initramfs-debian.cpio",
        Some((kernel, &modules)),
    )
}

/// The guest image's initramfs (production agent) plus the Debian cloud
/// kernel's modules: what `--distro debian` boots.
pub fn debian_agent_initramfs(kernel: &DebianKernel) -> Step<PathBuf> {
    let modules = guest_modules(kernel)?;
    initramfs(
        &production_agent()?,
        "initramfs-debian.cpio",
        Some((kernel, &modules)),
    )
}

/// The Debian package whose dependency names the versioned cloud kernel.
const DEBIAN_CLOUD_KERNEL: &str = "linux-image-cloud-amd64";

/// Debian's cloud kernel, unpacked from its package as shipped.
pub struct DebianKernel {
    /// `linux-image-<release>`.
    pub package: String,
    /// The kernel release (`uname -r`), e.g. `6.1.0-41-cloud-amd64`.
    pub release: String,
    /// Where `dpkg -x` unpacked the package.
    pub root: PathBuf,
    /// The bzImage.
    pub vmlinuz: PathBuf,
}

impl DebianKernel {
    /// `lib/modules/<release>` in the unpacked package.
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }
}

/// Fetch (once) and unpack the versioned package `linux-image-cloud-amd64`
/// depends on, with `apt-get download`: no kernel is installed or rebuilt.
/// The nested tier's L1 boots the same kernel.
pub fn debian_cloud_kernel() -> Step<DebianKernel> {
    let versioned = |deps: &str| {
        deps.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with("linux-image-"))
            .map(|p| p.trim().to_string())
    };
    let deps = output(Command::new("apt-cache").args(["depends", DEBIAN_CLOUD_KERNEL]))?;
    let package = match versioned(&deps) {
        Some(p) => p,
        None => {
            run(
                "apt-get update",
                Command::new("apt-get").args(["update", "-q"]),
            )?;
            let deps = output(Command::new("apt-cache").args(["depends", DEBIAN_CLOUD_KERNEL]))?;
            versioned(&deps)
                .ok_or_else(|| format!("apt-cache names no kernel for {DEBIAN_CLOUD_KERNEL}"))?
        }
    };
    let release = package.trim_start_matches("linux-image-").to_string();
    let dir = cache_dir().join("l1").join(&package);
    let root = dir.join("root");
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{release}"));
    if !vmlinuz.exists() {
        std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        run(
            &format!("apt-get download {package}"),
            Command::new("apt-get")
                .args(["download", &package])
                .current_dir(&dir),
        )?;
        let deb = util::find_deb(&dir)?;
        run(
            &format!("unpack {package}"),
            Command::new("dpkg").arg("-x").arg(&deb).arg(&root),
        )?;
        let _ = std::fs::remove_file(&deb);
    }
    Ok(DebianKernel {
        package,
        release,
        root,
        vmlinuz,
    })
}

/// The modules a chitin guest's devices need: the virtio-mmio transport
/// (ACPI `LNRO0005`), virtio-blk, virtio-net, vsock over virtio,
/// virtio-fs, ext4 and the virtio entropy source.
const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "vmw_vsock_virtio_transport",
    "virtiofs",
    "ext4",
    "virtio_rng",
];

/// The files to load for [`GUEST_MODULES`] and their dependencies, from
/// `modules.dep`, each after what it depends on: paths relative to
/// `lib/modules/<release>`. A module the kernel has built in is not in
/// `modules.dep` and is skipped.
pub fn guest_modules(kernel: &DebianKernel) -> Step<Vec<String>> {
    let dep_path = kernel.modules_dir().join("modules.dep");
    if !dep_path.exists() {
        // The package leaves modules.dep to depmod at install time; make
        // it in the unpacked tree (nothing is installed on the host).
        install_packages(&["kmod"])?;
        // Root's PATH may lack the sbin directories.
        let depmod = ["/usr/sbin/depmod", "/sbin/depmod"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("depmod");
        run(
            "depmod for the Debian kernel",
            Command::new(depmod)
                .arg("-b")
                .arg(&kernel.root)
                .arg(&kernel.release),
        )?;
    }
    let text = std::fs::read_to_string(&dep_path)
        .map_err(|e| format!("read {}: {e}", dep_path.display()))?;
    Ok(module_load_order(&text, GUEST_MODULES))
}

/// The module name of a `modules.dep` path: `kernel/fs/fuse/virtiofs.ko`
/// is `virtiofs`, `vmw_vsock-virtio.ko.xz` would be `vmw_vsock_virtio`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Load order for `wanted` under the `modules.dep` text `dep`: each
/// module after its dependencies, each file once.
pub fn module_load_order(dep: &str, wanted: &[&str]) -> Vec<String> {
    let mut deps: std::collections::HashMap<String, (String, Vec<String>)> = Default::default();
    for line in dep.lines() {
        let Some((path, rest)) = line.split_once(':') else {
            continue;
        };
        let needs = rest.split_whitespace().map(str::to_string).collect();
        deps.insert(module_name(path), (path.trim().to_string(), needs));
    }
    fn visit(
        path: &str,
        deps: &std::collections::HashMap<String, (String, Vec<String>)>,
        order: &mut Vec<String>,
        depth: usize,
    ) {
        if order.iter().any(|p| p == path) || depth > 64 {
            return;
        }
        if let Some((_, needs)) = deps.get(&module_name(path)) {
            for need in needs {
                visit(need, deps, order, depth + 1);
            }
        }
        order.push(path.to_string());
    }
    let mut order = Vec::new();
    for name in wanted {
        if let Some((path, _)) = deps.get(*name) {
            visit(path, &deps, &mut order, 0);
        }
    }
    order
}

/// `cargo xtask guest --distro debian`: Debian's cloud kernel as shipped
/// (bzImage) and an initramfs with the production agent, busybox and the
/// modules its devices need, in `guest-debian/` of the cache
/// (`GuestImage::in_dir` finds the `bzImage`).
pub fn prepare_debian() -> Step<GuestImage> {
    let kernel = debian_cloud_kernel()?;
    let modules = guest_modules(&kernel)?;
    let initramfs = debian_agent_initramfs(&kernel)?;
    let dir = cache_dir().join("guest-debian");
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    let bzimage = dir.join("bzImage");
    copy_if_changed(&kernel.vmlinuz, &bzimage)?;
    let cpio = dir.join("initramfs.cpio");
    copy_if_changed(&initramfs, &cpio)?;
    eprintln!(
        "xtask: ok Debian guest: {} with {} modules",
        kernel.package,
        modules.len()
    );
    Ok(GuestImage {
        kernel: bzimage.clone(),
        bzimage,
        initramfs: cpio,
    })
}

/// Copy `from` to `to` unless `to` already holds it (same length, not
/// older): a cached kernel is not copied again on every run.
fn copy_if_changed(from: &Path, to: &Path) -> Step {
    let meta = |p: &Path| std::fs::metadata(p).ok();
    if let (Some(src), Some(dst)) = (meta(from), meta(to)) {
        let newer = match (src.modified(), dst.modified()) {
            (Ok(s), Ok(d)) => d >= s,
            _ => false,
        };
        if src.len() == dst.len() && newer {
            return Ok(());
        }
    }
    std::fs::copy(from, to).map_err(|e| format!("copy {}: {e}", from.display()))?;
    Ok(())
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

/// Where a kernel's source tarball is, and its package version.
struct Source {
    tarball: PathBuf,
    package_version: String,
}

/// Install (6.1) or fetch (6.12) the source package.
fn source(version: KernelVersion) -> Step<Source> {
    let package = version.package();
    if !version.in_backports() {
        install_packages(&[package.as_str()])?;
        let v = output(Command::new("dpkg-query").args(["-W", "-f=${Version}", &package]))?;
        return Ok(Source {
            tarball: PathBuf::from(format!("/usr/src/{package}.tar.xz")),
            package_version: v.trim().to_string(),
        });
    }
    fetch_backports_source(&package)
}

/// The apt options of the private bookworm-backports configuration rooted
/// at `dir`: only its own sources list, package lists and cache.
fn backports_apt(dir: &Path, tool: &str) -> Command {
    let mut cmd = Command::new(tool);
    for (key, path) in [
        ("Dir::Etc::SourceList", dir.join("sources.list")),
        ("Dir::Etc::SourceParts", dir.join("sources.list.d")),
        ("Dir::State::Lists", dir.join("lists")),
        ("Dir::Cache", dir.join("cache")),
    ] {
        cmd.arg("-o").arg(format!("{key}={}", path.display()));
    }
    // The download lands in the cache, which apt's sandbox user may not
    // be able to write.
    cmd.args(["-o", "APT::Sandbox::User=root"]);
    cmd
}

/// The Debian archive the machine's apt sources use for bookworm (so a
/// machine that reaches only its own mirror fetches backports from it),
/// from deb822 `URIs:` lines or one-line `deb URI bookworm ...` entries;
/// [`DEFAULT_DEBIAN_MIRROR`] if none is found.
fn debian_mirror(files: &[&str]) -> String {
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .find_map(|text| mirror_in(&text))
        .unwrap_or_else(|| DEFAULT_DEBIAN_MIRROR.to_string())
}

/// The first Debian archive URI for bookworm in one sources file.
fn mirror_in(text: &str) -> Option<String> {
    // deb822: a stanza with `Suites: bookworm ...` and `URIs: ...`; the
    // security archive is a different tree and is skipped.
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
        };
        if let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:")) {
            if suites.split_whitespace().any(|s| s == "bookworm") {
                if let Some(uri) = uris.split_whitespace().find(|u| !u.contains("security")) {
                    return Some(uri.trim_end_matches('/').to_string());
                }
            }
        }
    }
    // One-line format: `deb [options] URI bookworm components`.
    text.lines().find_map(|l| {
        let mut words = l.split_whitespace().filter(|w| !w.starts_with('['));
        (words.next()? == "deb").then_some(())?;
        let uri = words.next()?;
        (words.next()? == "bookworm" && !uri.contains("security"))
            .then(|| uri.trim_end_matches('/').to_string())
    })
}

/// `apt-get download` `package` from bookworm-backports into the cache and
/// unpack it there (`dpkg -x`, nothing installed). Cached: a second call
/// reads the version file and returns.
fn fetch_backports_source(package: &str) -> Step<Source> {
    let root = cache_dir().join("backports").join(package);
    let tarball = root.join("root/usr/src").join(format!("{package}.tar.xz"));
    let version_file = root.join("version");
    if let (true, Ok(v)) = (tarball.exists(), std::fs::read_to_string(&version_file)) {
        return Ok(Source {
            tarball,
            package_version: v.trim().to_string(),
        });
    }
    let apt = cache_dir().join("apt-bookworm-backports");
    for sub in ["sources.list.d", "lists/partial", "cache/archives/partial"] {
        let d = apt.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| format!("mkdir {}: {e}", d.display()))?;
    }
    let mirror = debian_mirror(APT_SOURCES);
    let source = format!(
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror} bookworm-backports main\n"
    );
    util::write_atomic(&apt.join("sources.list"), source.as_bytes())?;
    run(
        "apt-get update (bookworm-backports, private lists)",
        backports_apt(&apt, "apt-get").args(["update", "-q"]),
    )?;
    let download = root.join("download");
    let _ = std::fs::remove_dir_all(&download);
    std::fs::create_dir_all(&download).map_err(|e| format!("mkdir {}: {e}", download.display()))?;
    run(
        &format!("apt-get download {package} (bookworm-backports)"),
        backports_apt(&apt, "apt-get")
            .args(["download", "-q", package])
            .current_dir(&download),
    )?;
    let deb = util::find_deb(&download)?;
    let version = output(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Version"))?;
    run(
        &format!("unpack {package}"),
        Command::new("dpkg")
            .arg("-x")
            .arg(&deb)
            .arg(root.join("root")),
    )?;
    let _ = std::fs::remove_dir_all(&download);
    if !tarball.exists() {
        return Err(format!("{package} holds no {}", tarball.display()));
    }
    util::write_atomic(&version_file, version.trim().as_bytes())?;
    Ok(Source {
        tarball,
        package_version: version.trim().to_string(),
    })
}

/// The config fragment's path.
fn fragment_path() -> PathBuf {
    workspace_root().join("guest").join("kernel.config")
}

/// The cache key of a kernel: its version, the fragment and the source
/// package version.
fn kernel_key(version: KernelVersion, fragment: &[u8], package_version: &str) -> String {
    let mut key_input = fragment.to_vec();
    key_input.push(b'\n');
    key_input.extend_from_slice(package_version.as_bytes());
    key_input.push(b'\n');
    key_input.extend_from_slice(version.name().as_bytes());
    format!("{:016x}", util::fnv1a(util::FNV_BASIS, &key_input))
}

/// Build (or find cached) the guest kernel of `version`.
pub fn kernel(version: KernelVersion) -> Step<BuiltKernel> {
    install_packages(BUILD_PACKAGES)?;
    let fragment = util::read(&fragment_path())?;
    let source = source(version)?;
    let key = kernel_key(version, &fragment, &source.package_version);
    let cache = cache_dir();
    let name = version.name();
    let done = BuiltKernel {
        vmlinux: cache.join(format!("vmlinux-{name}-{key}")),
        bzimage: cache.join(format!("bzImage-{name}-{key}")),
        system_map: cache.join(format!("System.map-{name}-{key}")),
    };
    if done.vmlinux.exists() && done.bzimage.exists() && done.system_map.exists() {
        if !util::quiet() {
            eprintln!(
                "xtask: guest kernel {name} cached ({})",
                done.vmlinux.display()
            );
        }
        return Ok(done);
    }
    let src = unpack_source(&cache, version, &source)?;
    let out = cache.join(format!("kernel-out-{name}-{key}"));
    configure(&src, &out, &fragment)?;
    build_kernel(&src, &out, name)?;
    // Each file goes in whole (copy to a temporary, then rename), the
    // vmlinux last: a cache entry is complete once all three exist.
    for (from, to) in [
        (out.join("arch/x86/boot/bzImage"), &done.bzimage),
        (out.join("System.map"), &done.system_map),
    ] {
        let tmp = to.with_extension("tmp");
        std::fs::copy(&from, &tmp).map_err(|e| format!("copy {}: {e}", from.display()))?;
        std::fs::rename(&tmp, to).map_err(|e| format!("rename {}: {e}", to.display()))?;
    }
    let tmp = done.vmlinux.with_extension("tmp");
    // Keep symbols out of the cached image: linux-loader only reads PT_LOAD
    // and PT_NOTE, and a smaller file loads faster.
    run(
        &format!("strip guest vmlinux {name}"),
        Command::new("objcopy")
            .arg("--strip-debug")
            .arg(out.join("vmlinux"))
            .arg(&tmp),
    )?;
    std::fs::rename(&tmp, &done.vmlinux)
        .map_err(|e| format!("rename {}: {e}", done.vmlinux.display()))?;
    Ok(done)
}

/// The unpacked source tree of `version` (unpacked once per package
/// version).
fn unpack_source(cache: &Path, version: KernelVersion, source: &Source) -> Step<PathBuf> {
    let package = version.package();
    let dir = cache.join("kernel-src").join(&source.package_version);
    let src = dir.join(&package);
    // Written once tar has finished: a tree cut short is unpacked again.
    let unpacked = dir.join("unpacked");
    if unpacked.exists() {
        return Ok(src);
    }
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    run(
        &format!("unpack {package}"),
        Command::new("tar")
            .arg("xf")
            .arg(&source.tarball)
            .current_dir(&dir),
    )?;
    util::write_atomic(&unpacked, b"")?;
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

/// `make bzImage` (which builds vmlinux first) with a progress line every
/// 20 s instead of silence.
fn build_kernel(src: &Path, out: &Path, name: &str) -> Step {
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let log_path = out.join("build.log");
    let log = std::fs::File::create(&log_path).map_err(|e| format!("create build log: {e}"))?;
    let log_err = log.try_clone().map_err(|e| format!("build log: {e}"))?;
    eprintln!(
        "xtask: == building guest kernel {name} with {jobs} jobs (about 3-5 minutes on 2 cores; log: {})",
        log_path.display()
    );
    let start = Instant::now();
    let mut child = make(src, out)
        .arg(format!("-j{jobs}"))
        .arg("bzImage")
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
                "xtask:    ... kernel {name} build running, {:.0} s, {lines} build steps so far",
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
        "xtask: ok guest kernel {name} built ({:.0} s)",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Write a guest initramfs named `name`: /init = `agent`, busybox with a
/// link per applet, the directories the agent mounts on, and /dev/console
/// (the kernel opens it for init before devtmpfs is mounted); with
/// `modules`, those module files of a Debian kernel under
/// `lib/modules/<release>/` and the list the agent loads them from.
fn initramfs(
    agent: &Path,
    name: &str,
    modules: Option<(&DebianKernel, &[String])>,
) -> Step<PathBuf> {
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
    if let Some((kernel, files)) = modules {
        let base = format!("lib/modules/{}", kernel.release);
        for file in files {
            let full = format!("{base}/{file}");
            cpio.parents(&full);
            cpio.file_from(&full, 0o644, &kernel.modules_dir().join(file))?;
        }
        let list: String = files.iter().map(|f| format!("{f}\n")).collect();
        cpio.file(&format!("{base}/chitin.modules"), 0o644, list.as_bytes());
    }
    let path = cache_dir().join("guest").join(name);
    util::write_atomic(&path, &cpio.finish())?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_in_reads_deb822_and_one_line_sources() {
        let deb822 = "Types: deb\nURIs: http://mirror.example/debian/\nSuites: bookworm bookworm-updates\nComponents: main\n\nTypes: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            mirror_in(deb822).as_deref(),
            Some("http://mirror.example/debian")
        );
        let one_line = "# comment\ndeb [arch=amd64] http://m.example/debian bookworm main\n";
        assert_eq!(
            mirror_in(one_line).as_deref(),
            Some("http://m.example/debian")
        );
        assert_eq!(
            mirror_in("deb http://x/debian-security bookworm-security main"),
            None
        );
        assert_eq!(mirror_in(""), None);
    }

    #[test]
    fn module_load_order_puts_dependencies_first_once() {
        let dep = "kernel/drivers/virtio/virtio.ko:\n\
kernel/drivers/virtio/virtio_ring.ko:\n\
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n\
kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n\
kernel/fs/fuse/virtiofs.ko: kernel/fs/fuse/fuse.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko\n\
kernel/fs/fuse/fuse.ko:\n\
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko kernel/net/vmw_vsock/vsock.ko\n\
kernel/net/vmw_vsock/vmw_vsock_virtio_transport_common.ko: kernel/net/vmw_vsock/vsock.ko\n\
kernel/net/vmw_vsock/vsock.ko:\n";
        let order = module_load_order(
            dep,
            &[
                "virtio_mmio",
                "virtio_blk",
                "virtiofs",
                "vmw_vsock_virtio_transport",
                "ext4",
            ],
        );
        let pos = |m: &str| {
            order
                .iter()
                .position(|p| p.ends_with(&format!("/{m}.ko")))
                .unwrap()
        };
        assert_eq!(order.len(), 9, "{order:?}");
        assert!(pos("virtio_ring") < pos("virtio_mmio"));
        assert!(pos("virtio") < pos("virtio_mmio"));
        assert!(pos("fuse") < pos("virtiofs"));
        assert!(pos("vsock") < pos("vmw_vsock_virtio_transport_common"));
        assert!(pos("vmw_vsock_virtio_transport_common") < pos("vmw_vsock_virtio_transport"));
        assert_eq!(
            module_name("kernel/net/vmw_vsock/vmw_vsock-virtio.ko.xz"),
            "vmw_vsock_virtio"
        );
    }

    #[test]
    fn kernel_version_parse_round_trips_names() {
        for v in KernelVersion::ALL {
            assert_eq!(KernelVersion::parse(v.name()), Some(v));
        }
        assert_eq!(KernelVersion::parse("6.2"), None);
    }

    #[test]
    fn kernel_key_differs_by_version_fragment_and_package() {
        let a = kernel_key(KernelVersion::V6_1, b"CONFIG_A=y", "6.1.1");
        assert_ne!(a, kernel_key(KernelVersion::V6_12, b"CONFIG_A=y", "6.1.1"));
        assert_ne!(a, kernel_key(KernelVersion::V6_1, b"CONFIG_A=n", "6.1.1"));
        assert_ne!(a, kernel_key(KernelVersion::V6_1, b"CONFIG_A=y", "6.1.2"));
        assert_eq!(a, kernel_key(KernelVersion::V6_1, b"CONFIG_A=y", "6.1.1"));
    }

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
