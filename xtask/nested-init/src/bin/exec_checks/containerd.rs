//! Containerd in L1 (issue 18's ground): `chitin-exec-checks
//! containerd-runc` mounts the disk of Debian's containerd, runc and CNI
//! plugins the harness attaches (serial `containerd`), starts containerd
//! on tmpfs state, and runs a busybox container through `ctr run` with
//! containerd's own runc shim: its output and exit code come back, the
//! time from `ctr run` to the first output line is printed (the runc side
//! of the shim comparison), and stopping containerd leaves no shim, mount
//! or cgroup behind.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chitin_testkit::Report as Checks;

/// The packages disk's serial (the harness's `containerd::SERIAL`).
const SERIAL: &str = "containerd";
/// L1's static busybox (the harness puts it there).
const L1_BUSYBOX: &str = "/nested/busybox";
/// Where the packages' disk is mounted.
const PACKAGES: &str = "/opt/containerd";
/// containerd's state and root: tmpfs.
const STATE: &str = "/run/containerd";
const ROOT: &str = "/var/lib/containerd";
/// Its socket.
const SOCKET: &str = "/run/containerd/containerd.sock";
/// How long containerd may take to listen (Go start-up under TCG).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one `ctr run` may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// What the container prints and how it exits.
const GREETING: &str = "hello-from-runc";
const EXIT_CODE: i32 = 7;

fn c_str(s: &str) -> Result<std::ffi::CString, String> {
    std::ffi::CString::new(s).map_err(|_| format!("{s:?} has a NUL"))
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong) -> Result<(), String> {
    std::fs::create_dir_all(target).map_err(|e| format!("mkdir {target}: {e}"))?;
    let (s, t, f) = (c_str(source)?, c_str(target)?, c_str(fstype)?);
    // SAFETY: NUL-terminated strings that live for the call, no data.
    let ret = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, std::ptr::null()) };
    if ret != 0 {
        return Err(format!(
            "mount {source} on {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

fn umount(target: &str) -> Result<(), String> {
    let t = c_str(target)?;
    // SAFETY: a NUL-terminated path that lives for the call.
    if unsafe { libc::umount2(t.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(format!(
            "umount {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// The `/dev/vdX` whose serial is `serial`.
fn disk_by_serial(serial: &str) -> Result<String, String> {
    let entries = std::fs::read_dir("/sys/block").map_err(|e| format!("/sys/block: {e}"))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let found = std::fs::read_to_string(entry.path().join("serial")).unwrap_or_default();
        if found.trim() == serial {
            return Ok(format!("/dev/{name}"));
        }
    }
    Err(format!("no disk with serial {serial}"))
}

/// Live processes (zombies aside: reaping orphans is L1's init's job)
/// whose command name starts with `prefix`, as `pid name state`.
fn processes(prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ...`; comm may hold spaces.
            let (head, tail) = stat.rsplit_once(") ")?;
            let comm = head.split_once(" (")?.1;
            let state = tail.split_whitespace().next()?;
            (comm.starts_with(prefix) && state != "Z").then(|| format!("{pid} {comm} {state}"))
        })
        .collect()
}

/// containerd, started and listening.
struct Containerd {
    child: Child,
}

impl Containerd {
    fn start(log: &Path) -> Result<Self, String> {
        mount("tmpfs", STATE, "tmpfs", 0)?;
        mount("tmpfs", ROOT, "tmpfs", 0)?;
        let config = Path::new(STATE).join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{ROOT}\"\nstate = \"{STATE}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{SOCKET}\"\n"
            ),
        )
        .map_err(|e| format!("write {}: {e}", config.display()))?;
        let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(format!("{PACKAGES}/usr/bin/containerd"))
            .arg("--config")
            .arg(&config)
            .envs(environment())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("start containerd: {e}"))?;
        let mut daemon = Self { child };
        let t = Instant::now();
        while !Path::new(SOCKET).exists() {
            if let Ok(Some(status)) = daemon.child.try_wait() {
                return Err(format!("containerd exited: {status}"));
            }
            if t.elapsed() > START_TIMEOUT {
                daemon.stop();
                return Err(format!(
                    "containerd did not listen within {START_TIMEOUT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        println!(
            "chitin-containerd: listening after {} ms",
            t.elapsed().as_millis()
        );
        Ok(daemon)
    }

    /// Stop it (SIGTERM, then SIGKILL after 30 s) and unmount its state.
    fn stop(&mut self) {
        // SAFETY: kill takes no pointers; the pid is our child's.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let t = Instant::now();
        while matches!(self.child.try_wait(), Ok(None)) && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = umount(ROOT);
        let _ = umount(STATE);
    }
}

/// PATH with the packages' binaries (containerd finds its shims and the
/// shim finds runc there), and their library directory.
fn environment() -> [(&'static str, String); 2] {
    [
        (
            "PATH",
            format!("{PACKAGES}/usr/bin:{PACKAGES}/usr/sbin:/bin:/usr/bin"),
        ),
        ("LD_LIBRARY_PATH", format!("{PACKAGES}/lib")),
    ]
}

/// `ctr run` of `rootfs` with containerd's runc shim: the time to the first
/// output line, the output, and the exit code.
fn ctr_run(rootfs: &Path, id: &str) -> Result<(u128, String, Option<i32>), String> {
    let t = Instant::now();
    let mut ctr = Command::new(format!("{PACKAGES}/usr/bin/ctr"))
        .args(["--address", SOCKET, "run", "--rm"])
        .args(["--runtime", "io.containerd.runc.v2"])
        // L1's root is its initramfs, which pivot_root cannot leave.
        .arg("--no-pivot")
        // A flag: the first argument is then the root directory.
        .arg("--rootfs")
        .arg(rootfs)
        .args([id, "/bin/sh", "-c"])
        .arg(format!(
            "echo {GREETING}; cat /etc/hostname-of-image; exit {EXIT_CODE}"
        ))
        .envs(environment())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("start ctr: {e}"))?;
    let stdout = ctr.stdout.take().ok_or("no stdout")?;
    let reader = std::thread::spawn(move || {
        let mut first = None;
        let mut all = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            first.get_or_insert_with(|| t.elapsed().as_millis());
            all.push_str(&line);
            all.push('\n');
        }
        (first, all)
    });
    let status = loop {
        if let Some(status) = ctr.try_wait().map_err(|e| e.to_string())? {
            break status;
        }
        if t.elapsed() > RUN_TIMEOUT {
            let _ = ctr.kill();
            let _ = ctr.wait();
            return Err(format!("ctr run did not end within {RUN_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    if let Some(mut e) = ctr.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    let (first, out) = reader.join().map_err(|_| "reader panicked")?;
    let first = first.ok_or_else(|| format!("no output; {status}; stderr: {}", err.trim()))?;
    Ok((first, out, status.code()))
}

/// The `containerd-runc` scenario.
pub fn runc_checks(_kernel: &str, _initramfs: &str, c: &mut Checks) {
    let mounted =
        disk_by_serial(SERIAL).and_then(|dev| mount(&dev, PACKAGES, "ext4", libc::MS_RDONLY));
    if let Err(e) = mounted {
        return c.result("containerd-disk", Err(e));
    }
    let base = PathBuf::from("/tmp/chitin-containerd");
    let _ = std::fs::remove_dir_all(&base);
    let rootfs = base.join("rootfs");
    let made = chitin_testkit::rootfs::busybox_rootfs(&rootfs, Path::new(L1_BUSYBOX))
        .and_then(|()| std::fs::write(rootfs.join("etc/hostname-of-image"), "busybox-image\n"));
    if let Err(e) = made {
        let _ = umount(PACKAGES);
        return c.result("rootfs", Err(e.to_string()));
    }
    let log = base.join("containerd.log");
    let mut daemon = match Containerd::start(&log) {
        Ok(d) => d,
        Err(e) => {
            let tail = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(5).collect();
            let _ = umount(PACKAGES);
            return c.result("containerd", Err(format!("{e}; log: {}", tail.join(" | "))));
        }
    };
    let mut first_ms = Vec::new();
    for round in 0..3 {
        let result = ctr_run(&rootfs, &format!("runc-{round}")).and_then(|(ms, out, code)| {
            let want = format!("{GREETING}\nbusybox-image\n");
            if out != want || code != Some(EXIT_CODE) {
                return Err(format!("printed {out:?}, exit {code:?}"));
            }
            Ok(ms)
        });
        match result {
            Ok(ms) => first_ms.push(ms),
            Err(e) => {
                c.result("runc-run", Err(e));
                break;
            }
        }
    }
    if first_ms.len() == 3 {
        let mut sorted = first_ms.clone();
        sorted.sort_unstable();
        c.result(
            "runc-run",
            Ok(format!(
                "ctr run --runtime io.containerd.runc.v2 -> first output line median {} ms {first_ms:?}; the image's file and exit {EXIT_CODE} came back",
                sorted[1]
            )),
        );
    }
    daemon.stop();
    let _ = umount(PACKAGES);
    c.result("containerd-cleanup", leftovers());
}

/// Nothing of containerd's left: processes, mounts, the containers'
/// cgroups.
fn leftovers() -> Result<String, String> {
    let running = processes("containerd");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounts: Vec<&str> = mountinfo
        .lines()
        .filter(|l| [PACKAGES, STATE, ROOT].iter().any(|m| l.contains(m)))
        .collect();
    // ctr puts its containers' cgroups under its namespace's name.
    let cgroups: Vec<String> = std::fs::read_dir("/sys/fs/cgroup/default")
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if running.is_empty() && mounts.is_empty() && cgroups.is_empty() {
        Ok("no containerd or shim process, mount or container cgroup left".into())
    } else {
        Err(format!(
            "left: processes {running:?}, mounts {mounts:?}, cgroups {cgroups:?}"
        ))
    }
}
