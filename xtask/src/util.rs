//! Helpers shared by the xtask commands: running programs, installing
//! Debian packages, the cache directory, a content hash.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Result type of every xtask step: the error is the line to print.
pub type Step<T = ()> = Result<T, String>;

/// The workspace root (the directory holding the top Cargo.toml).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

/// Where prepared artifacts (guest kernel, initramfs, L1 kernel) are kept:
/// `$CHITIN_CACHE`, or `target/chitin-cache` in the workspace.
pub fn cache_dir() -> PathBuf {
    match std::env::var_os("CHITIN_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => workspace_root().join("target").join("chitin-cache"),
    }
}

/// Whether a Debian package is installed.
pub fn have_package(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Install the packages that are not installed yet, with apt-get. Present
/// ones cost one dpkg query and no network.
pub fn install_packages(packages: &[&str]) -> Step {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !have_package(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages: {}", missing.join(" "));
    run(
        "apt-get update",
        Command::new("apt-get").args(["update", "-q"]),
    )?;
    run(
        "apt-get install",
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Quiet mode (for commands whose output is someone else's, like
/// `nested-exec`): steps print nothing unless they fail or take long.
static QUIET: AtomicBool = AtomicBool::new(false);

/// A quiet step that runs longer than this says what it is doing.
const QUIET_ANNOUNCE_AFTER: Duration = Duration::from_secs(2);

/// Turn quiet mode on or off.
pub fn set_quiet(on: bool) {
    QUIET.store(on, Ordering::Relaxed);
}

/// Whether quiet mode is on.
pub fn quiet() -> bool {
    QUIET.load(Ordering::Relaxed)
}

/// Run a command, echoing the step name and its duration; fail on a
/// non-zero exit. In quiet mode the command's output is kept back and
/// shown only if it fails, and the step is named only if it takes long.
pub fn run(step: &str, cmd: &mut Command) -> Step {
    if quiet() {
        return run_quiet(step, cmd);
    }
    let start = Instant::now();
    eprintln!("xtask: == {step}");
    let status = cmd
        .status()
        .map_err(|e| format!("{step}: cannot run {:?}: {e}", cmd.get_program()))?;
    if !status.success() {
        return Err(format!("{step}: {status}"));
    }
    eprintln!("xtask: ok {step} ({:.1} s)", start.elapsed().as_secs_f64());
    Ok(())
}

fn run_quiet(step: &str, cmd: &mut Command) -> Step {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{step}: cannot run {:?}: {e}", cmd.get_program()))?;
    // Drained from threads, so a chatty command never blocks on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_end(&mut text);
            }
            text
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let mut announced = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => return Err(format!("{step}: wait: {e}")),
        }
        if !announced && start.elapsed() >= QUIET_ANNOUNCE_AFTER {
            eprintln!("xtask: {step}...");
            announced = true;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    if !status.success() {
        eprint!("{}", String::from_utf8_lossy(&out));
        eprint!("{}", String::from_utf8_lossy(&err));
        return Err(format!("{step}: {status}"));
    }
    if announced {
        eprintln!("xtask: ok {step} ({:.1} s)", start.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Run a command quietly and return its stdout.
pub fn output(cmd: &mut Command) -> Step<String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        return Err(format!(
            "{:?} failed ({}): {}",
            cmd.get_program(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `cargo` with the workspace as working directory.
pub fn cargo(args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.args(args).current_dir(workspace_root());
    cmd
}

/// FNV-1a 64: a content hash for cache keys and console checksums (not a
/// security boundary), the one the guest prints.
pub use chitin_testkit::{fnv1a, FNV_BASIS};

/// Read a file or say which one could not be read.
pub fn read(path: &Path) -> Step<Vec<u8>> {
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The `.deb` file `apt-get download` left in `dir`.
pub fn find_deb(dir: &Path) -> Step<PathBuf> {
    std::fs::read_dir(dir)
        .map_err(|e| format!("read {}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| format!("apt-get download left no .deb in {}", dir.display()))
}

/// Write a file atomically (temp file + rename), creating its directory.
pub fn write_atomic(path: &Path, data: &[u8]) -> Step {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, data).map_err(|e| format!("write {}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("rename {}: {e}", path.display()))
}
