//! containerd in L1 with chitin's shim: `chitin-exec-checks shim-ctr`
//! mounts the disk of Debian's containerd, runc and CNI plugins the
//! harness attaches (serial `containerd`, with an OCI image archive the
//! harness built from busybox-static), starts containerd on tmpfs state,
//! and runs busybox containers through `ctr run` with chitin's shim
//! (`io.containerd.chitin.v2`, one VM per container) and, interleaved,
//! with containerd's own runc shim: from a root directory (`--rootfs`)
//! and from the imported image (overlayfs snapshots). Output and exit
//! code come back from both, and the time from `ctr run` to the first
//! output line is printed for each. A detached container then takes
//! `ctr task exec`, `ps` and `kill`; stopping containerd leaves no shim,
//! VM, mount, cgroup or shim directory behind.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::jail::status_field;
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
pub(crate) const SOCKET: &str = "/run/containerd/containerd.sock";
/// How long containerd may take to listen (Go start-up under TCG).
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one `ctr run` may take.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// The OCI image on the packages' disk (the harness's
/// `containerd::IMAGE_*`): its archive, name, and a file only it has (the
/// `--rootfs` root gets the same).
pub(crate) const IMAGE_ARCHIVE: &str = "/opt/containerd/chitin-images/busybox-oci.tar";
pub(crate) const IMAGE_NAME: &str = "docker.io/chitin/busybox:test";
pub(crate) const IMAGE_FILE: &str = "etc/os-release-of-image";
pub(crate) const IMAGE_FILE_TEXT: &str = "chitin-busybox-image";
/// The file in the host directory `ctr run --mount` binds.
const VOLUME_TEXT: &str = "from-a-host-volume";
/// What the container prints and how it exits.
const GREETING: &str = "hello-from-the-container";
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
pub(crate) fn processes(prefix: &str) -> Vec<String> {
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
    /// Start containerd; `plugins` is the rest of its config (after
    /// root, state and socket).
    fn start(log: &Path, plugins: &str) -> Result<Self, String> {
        mount("tmpfs", STATE, "tmpfs", 0)?;
        mount("tmpfs", ROOT, "tmpfs", 0)?;
        let config = Path::new(STATE).join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{ROOT}\"\nstate = \"{STATE}\"\n\
                 [grpc]\n  address = \"{SOCKET}\"\n{plugins}"
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

/// containerd's own runc shim.
const RUNC: &str = "io.containerd.runc.v2";
/// chitin's shim.
const CHITIN: &str = "io.containerd.chitin.v2";

/// What one `ctr` command did.
struct CtrOutput {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    /// When its first stdout line came, from its start.
    first_line_ms: Option<u128>,
}

/// Wait for the `ctr ARGS` started at `t` to end, killing it after
/// [`RUN_TIMEOUT`].
fn wait_ctr(
    child: &mut Child,
    t: Instant,
    args: &[&str],
) -> Result<std::process::ExitStatus, String> {
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            return Ok(status);
        }
        if t.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("ctr {args:?} did not end within {RUN_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Run `ctr ARGS` to its end (at most [`RUN_TIMEOUT`]).
fn ctr(args: &[&str]) -> Result<CtrOutput, String> {
    let t = Instant::now();
    let mut child = Command::new(format!("{PACKAGES}/usr/bin/ctr"))
        .args(["--address", SOCKET])
        .args(args)
        .envs(environment())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("start ctr: {e}"))?;
    let stdout = child.stdout.take().ok_or("no stdout")?;
    let out = std::thread::spawn(move || {
        let mut first = None;
        let mut all = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            first.get_or_insert_with(|| t.elapsed().as_millis());
            all.push_str(&line);
            all.push('\n');
        }
        (first, all)
    });
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let status = wait_ctr(&mut child, t, args)?;
    let (first_line_ms, stdout) = out.join().map_err(|_| "reader panicked")?;
    let stderr = err.join().map_err(|_| "reader panicked")?;
    Ok(CtrOutput {
        code: status.code(),
        stdout,
        stderr,
        first_line_ms,
    })
}

/// What a container runs from.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// A root directory (`ctr run --rootfs`).
    Rootfs(&'a Path),
    /// The imported image ([`IMAGE_NAME`]).
    Image,
}

/// `ctr run --rm` of `source` with `runtime`.
fn ctr_run(runtime: &str, source: Source<'_>, id: &str) -> Result<CtrOutput, String> {
    let script = format!("echo {GREETING}; cat /{IMAGE_FILE}; exit {EXIT_CODE}");
    let mut args = vec!["run", "--rm", "--runtime", runtime];
    if runtime == RUNC {
        // L1's root is its initramfs, which pivot_root cannot leave.
        args.push("--no-pivot");
    }
    match source {
        // A flag: the first argument is then the root directory.
        Source::Rootfs(root) => args.extend(["--rootfs", root.to_str().ok_or("rootfs path")?]),
        Source::Image => args.push(IMAGE_NAME),
    }
    args.extend([id, "/bin/sh", "-c", &script]);
    ctr(&args)
}

/// The same `ctr run` checked: the greeting, the image's file, exit 7.
fn checked_run(runtime: &str, source: Source<'_>, id: &str) -> Result<u128, String> {
    let run = ctr_run(runtime, source, id)?;
    let want = format!("{GREETING}\n{IMAGE_FILE_TEXT}\n");
    match run.first_line_ms {
        Some(ms) if run.stdout == want && run.code == Some(EXIT_CODE) => Ok(ms),
        _ => Err(format!(
            "{runtime} {id}: printed {:?}, exit {:?}, stderr {:?}",
            run.stdout,
            run.code,
            run.stderr.trim()
        )),
    }
}

/// Three `ctr run`s of `source` with runc and with chitin, interleaved so
/// that both see the same machine: the times to the first output line.
fn side_by_side(source: Source<'_>, name: &str) -> Result<String, String> {
    let (mut runc, mut chitin) = (Vec::new(), Vec::new());
    for round in 0..3 {
        runc.push(checked_run(RUNC, source, &format!("runc-{round}"))?);
        chitin.push(checked_run(CHITIN, source, &format!("chitin-{round}"))?);
    }
    let (r, ch) = (median(&runc), median(&chitin));
    Ok(format!(
        "ctr run {name} -> first output line, median of 3: runc {r} ms {runc:?}, chitin {ch} ms {chitin:?}, chitin/runc {:.2}; the image's file and exit {EXIT_CODE} came back from both",
        ch as f64 / r.max(1) as f64
    ))
}

/// The last warnings and errors in containerd's log (the shims' lines
/// and messages included), for a failure's message.
pub(crate) fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            // Warnings and errors, and what is not containerd's logfmt
            // (a shim's panic message).
            ["level=warn", "level=error", "level=fatal"]
                .iter()
                .any(|w| l.contains(w))
                || (!l.contains("level=") && !l.trim().is_empty())
        })
        .collect();
    lines[lines.len().saturating_sub(10)..].join(" | ")
}

/// Middle of three or more.
pub(crate) fn median(ms: &[u128]) -> u128 {
    let mut sorted = ms.to_vec();
    sorted.sort_unstable();
    sorted[sorted.len() / 2]
}

/// Everything a containerd scenario stands on: the packages' disk, a
/// busybox root, containerd. Dropping it stops containerd and unmounts.
pub(crate) struct Ground {
    rootfs: PathBuf,
    daemon: Containerd,
    /// containerd's log (the shims' too).
    pub(crate) log: PathBuf,
}

/// containerd's config for `ctr` alone: no CRI.
const WITHOUT_CRI: &str = "disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n";

impl Ground {
    /// Mount the packages, make the busybox root under `base`, start
    /// containerd with `plugins` config.
    pub(crate) fn set_up(base: &Path, plugins: &str, c: &mut Checks) -> Option<Self> {
        let mounted =
            disk_by_serial(SERIAL).and_then(|dev| mount(&dev, PACKAGES, "ext4", libc::MS_RDONLY));
        if let Err(e) = mounted {
            c.result("containerd-disk", Err(e));
            return None;
        }
        let _ = std::fs::remove_dir_all(base);
        let rootfs = base.join("rootfs");
        let made = chitin_testkit::rootfs::busybox_rootfs(&rootfs, Path::new(L1_BUSYBOX))
            .and_then(|()| std::fs::write(rootfs.join(IMAGE_FILE), format!("{IMAGE_FILE_TEXT}\n")));
        if let Err(e) = made {
            let _ = umount(PACKAGES);
            c.result("rootfs", Err(e.to_string()));
            return None;
        }
        let log = base.join("containerd.log");
        match Containerd::start(&log, plugins) {
            Ok(daemon) => Some(Self {
                rootfs,
                daemon,
                log,
            }),
            Err(e) => {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = tail.lines().rev().take(5).collect();
                let _ = umount(PACKAGES);
                c.result("containerd", Err(format!("{e}; log: {}", tail.join(" | "))));
                None
            }
        }
    }

    pub(crate) fn tear_down(mut self) {
        self.daemon.stop();
        let _ = umount(PACKAGES);
    }
}

/// The chitin shim's state directories (its `STATE_ROOT`).
pub(crate) const CHITIN_STATE: &str = "/run/chitin/shim";
/// The shim's settings file.
pub(crate) const SHIM_CONFIG: &str = "/etc/chitin/shim.conf";

/// Write the shim's settings: the guest of `kernel`'s directory.
pub(crate) fn write_shim_config(kernel: &str) -> Result<(), String> {
    let guest_dir = Path::new(kernel).parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all("/etc/chitin")
        .and_then(|()| {
            std::fs::write(
                SHIM_CONFIG,
                format!(
                    "# the nested tier's guest\nguest_dir = {}\nmemory_mib = 256\n",
                    guest_dir.display()
                ),
            )
        })
        .map_err(|e| format!("{SHIM_CONFIG}: {e}"))
}

/// The `shim-ctr` scenario: containerd runs busybox containers with
/// chitin's shim, each in its own VM booting `kernel`'s image; side by
/// side with runc.
pub fn shim_ctr_checks(kernel: &str, _initramfs: &str, c: &mut Checks) {
    if let Err(e) = write_shim_config(kernel) {
        return c.result("shim-config", Err(e));
    }
    let Some(ground) = Ground::set_up(Path::new("/tmp/chitin-shim"), WITHOUT_CRI, c) else {
        return;
    };
    let log = ground.log.clone();
    let with_log =
        |r: Result<String, String>| r.map_err(|e| format!("{e}; log: {}", log_tail(&log)));
    c.result(
        "shim-run",
        with_log(side_by_side(Source::Rootfs(&ground.rootfs), "--rootfs")),
    );
    let imported = ctr_ok(&["image", "import", IMAGE_ARCHIVE]).and_then(|_| {
        let list = ctr_ok(&["image", "ls", "-q"])?;
        match list.lines().any(|l| l == IMAGE_NAME) {
            true => Ok(()),
            false => Err(format!("ctr image ls lists no {IMAGE_NAME}: {list:?}")),
        }
    });
    c.result(
        "shim-image",
        with_log(imported.and_then(|()| side_by_side(Source::Image, IMAGE_NAME))),
    );
    c.result("shim-task", with_log(task_checks(&ground.rootfs)));
    c.result("shim-vmm-killed", with_log(vmm_killed(&ground.rootfs)));
    c.result("shim-tty", with_log(tty_checks(&ground.rootfs)));
    c.result("shim-pod", with_log(pod_checks(&ground.rootfs)));
    c.result("shim-net", with_log(net_checks(&ground.rootfs)));
    ground.tear_down();
    let _ = std::fs::remove_file(SHIM_CONFIG);
    c.result("shim-cleanup", leftovers("default"));
}

/// Expect `ctr ARGS` to exit 0; its stdout.
pub(crate) fn ctr_ok(args: &[&str]) -> Result<String, String> {
    let run = ctr(args)?;
    if run.code == Some(0) {
        return Ok(run.stdout);
    }
    Err(format!(
        "ctr {args:?}: exit {:?}, stdout {:?}, stderr {:?}",
        run.code,
        run.stdout.trim(),
        run.stderr.trim()
    ))
}

/// A detached chitin container: `ctr task exec` of a second process,
/// `ctr task ps`, `ctr task kill -s SIGUSR1` ending it with that signal,
/// then `ctr task rm` and `ctr container rm`.
fn task_checks(rootfs: &Path) -> Result<String, String> {
    let root = rootfs.to_str().ok_or("rootfs path")?;
    // A host directory bound read-only and a tmpfs, for the exec to see.
    let volume = rootfs.with_file_name("volume");
    std::fs::create_dir_all(&volume)
        .and_then(|()| std::fs::write(volume.join("file"), format!("{VOLUME_TEXT}\n")))
        .map_err(|e| format!("{}: {e}", volume.display()))?;
    let bind = format!(
        "type=bind,src={},dst=/data,options=rbind:ro",
        volume.display()
    );
    ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        CHITIN,
        "--mount",
        &bind,
        "--mount",
        "type=tmpfs,src=tmpfs,dst=/scratch,options=size=1m:nosuid",
        "--rootfs",
        root,
        "long",
        "/bin/sleep",
        "1000",
    ])?;
    let result = task_steps();
    // Whatever happened, take the container away.
    let _ = ctr(&["task", "kill", "-s", "SIGKILL", "long"]);
    let _ = wait_stopped("long");
    let _ = ctr(&["task", "rm", "long"]);
    let removed = ctr_ok(&["container", "rm", "long"]);
    let done = result?;
    removed?;
    Ok(done)
}

fn task_steps() -> Result<String, String> {
    let out = ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "second",
        "long",
        "/bin/sh",
        "-c",
        &format!(
            "echo exec-ok; cat /{IMAGE_FILE}; cat /data/file; \
             touch /data/x 2>/dev/null || echo data-read-only; \
             grep -c ' /scratch .* tmpfs ' /proc/self/mountinfo"
        ),
    ])?;
    if out != format!("exec-ok\n{IMAGE_FILE_TEXT}\n{VOLUME_TEXT}\ndata-read-only\n1\n") {
        return Err(format!("ctr task exec printed {out:?}"));
    }
    // `PID INFO` and one line per process: the sleep.
    let ps = ctr_ok(&["task", "ps", "long"])?;
    let pids: Vec<u32> = ps
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    if pids.len() != 1 {
        return Err(format!("ctr task ps listed {ps:?}"));
    }
    // The pod VM's usage, as cgroup v2 metrics.
    let metrics = ctr_ok(&["task", "metrics", "long"])?;
    let value = |key: &str| {
        metrics.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(key)).then(|| f.next()?.parse::<u64>().ok())?
        })
    };
    let (memory, cpu, procs) = (
        value("memory.usage"),
        value("cpu.usage_usec"),
        value("pids.current"),
    );
    if !matches!((memory, cpu, procs), (Some(m), Some(c), Some(1)) if m > 0 && c > 0) {
        return Err(format!("ctr task metrics: {metrics:?}"));
    }
    let jail = vmm_jail("default/long")?;
    ctr_ok(&["task", "kill", "-s", "SIGUSR1", "long"])?;
    wait_stopped("long")?;
    // `ctr task rm` reports the task's status: 128 + SIGUSR1.
    let want = 128 + libc::SIGUSR1;
    let rm = ctr(&["task", "rm", "long"])?;
    if !rm
        .stderr
        .contains(&format!("exit with non-zero exit code {want}\""))
    {
        return Err(format!(
            "ctr task rm after SIGUSR1 did not report status {want}: {:?} {:?}",
            rm.stdout.trim(),
            rm.stderr.trim()
        ));
    }
    Ok(format!(
        "ctr task exec printed the image's file, a host directory's file through a read-only bind (--mount type=bind) and found its tmpfs (--mount type=tmpfs); ctr task ps listed guest pid {}; {jail}; ctr task metrics: the VM's memory {} MiB, CPU {} ms; SIGUSR1 from ctr task kill ended it with status {}",
        pids[0],
        memory.unwrap_or(0) >> 20,
        cpu.unwrap_or(0) / 1000,
        128 + libc::SIGUSR1
    ))
}

/// The capabilities the jailed VMM keeps: CAP_CHOWN, CAP_DAC_OVERRIDE,
/// CAP_DAC_READ_SEARCH, CAP_FOWNER, CAP_SETGID, CAP_SETUID.
const VMM_CAPS: u64 = 0xcf;

/// A container whose VMM process is killed from the host: its task
/// ends (status 255: the guest is gone), and its removal leaves neither
/// the VMM's cgroup nor the container's.
fn vmm_killed(rootfs: &Path) -> Result<String, String> {
    let root = rootfs.to_str().ok_or("rootfs path")?;
    ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        CHITIN,
        "--rootfs",
        root,
        "doomed",
        "/bin/sleep",
        "1000",
    ])?;
    let result = (|| {
        let pid = jailed_vmm()?;
        // SAFETY: kill takes integers only.
        if unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) } != 0 {
            return Err(format!("kill {pid}: {}", std::io::Error::last_os_error()));
        }
        let killed = Instant::now();
        wait_stopped("doomed")?;
        let ended = killed.elapsed();
        let rm = ctr(&["task", "rm", "doomed"])?;
        if !rm.stderr.contains("exit with non-zero exit code 255\"") {
            return Err(format!(
                "ctr task rm after the VMM was killed: {:?} {:?}",
                rm.stdout.trim(),
                rm.stderr.trim()
            ));
        }
        Ok((pid, ended))
    })();
    let _ = ctr(&["task", "kill", "-s", "SIGKILL", "doomed"]);
    let _ = wait_stopped("doomed");
    let _ = ctr(&["task", "rm", "doomed"]);
    let removed = ctr_ok(&["container", "rm", "doomed"]);
    let (pid, ended) = result?;
    removed?;
    let cgroup = Path::new("/sys/fs/cgroup/default/doomed");
    if cgroup.exists() {
        return Err(format!("{} is left", cgroup.display()));
    }
    Ok(format!(
        "SIGKILL to the jailed VMM (pid {pid}) ended the task in {} ms with status 255; its removal left no cgroup",
        ended.as_millis()
    ))
}

/// The one jailed VMM process in L1.
pub(crate) fn jailed_vmm() -> Result<u32, String> {
    let jailed: Vec<u32> = std::fs::read_dir("/proc")
        .map_err(|e| format!("/proc: {e}"))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            args.len() > 1
                && args[0].ends_with(b"containerd-shim-chitin-v2")
                && args[1] == b"vmm"
                && status_field(&status, "NSpid").split_whitespace().last() == Some("1")
        })
        .collect();
    match jailed[..] {
        [pid] => Ok(pid),
        _ => Err(format!("jailed VMM processes: {jailed:?}")),
    }
}

/// The pod VM's process (`containerd-shim-chitin-v2 vmm`, PID 1 of its
/// own PID namespace) is confined: its cgroup is `vmm` below the
/// container's `cgroup` (a path below the cgroup v2 root), its
/// namespaces are not L1's, its root holds only its resources, it is
/// root with six capabilities, no others to gain, and every thread of
/// it runs under seccomp (chitin's own, and its main and control
/// threads under the writer filter).
fn vmm_jail(cgroup: &str) -> Result<String, String> {
    let pid = jailed_vmm()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("VMM status: {e}"))?;
    let field = |k: &str| status_field(&status, k);
    let cap = |k: &str| u64::from_str_radix(&field(k), 16).unwrap_or(u64::MAX);
    let ids_ok = field("Uid").split_whitespace().all(|u| u == "0")
        && cap("CapEff") == VMM_CAPS
        && cap("CapPrm") == VMM_CAPS
        && cap("CapBnd") == VMM_CAPS
        && cap("CapInh") == 0
        && cap("CapAmb") == 0
        && field("NoNewPrivs") == "1";
    if !ids_ok {
        return Err(format!(
            "VMM {pid}: Uid {} CapEff {} CapPrm {} CapBnd {} CapInh {} CapAmb {} NoNewPrivs {}",
            field("Uid"),
            field("CapEff"),
            field("CapPrm"),
            field("CapBnd"),
            field("CapInh"),
            field("CapAmb"),
            field("NoNewPrivs")
        ));
    }
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    let want = format!("0::/{cgroup}/vmm");
    if own.trim() != want {
        return Err(format!("VMM cgroup {:?}, want {want:?}", own.trim()));
    }
    let memory_max = std::fs::read_to_string(format!("/sys/fs/cgroup/{cgroup}/vmm/memory.max"))
        .unwrap_or_default();
    let pids_max = std::fs::read_to_string(format!("/sys/fs/cgroup/{cgroup}/vmm/pids.max"))
        .unwrap_or_default();
    if memory_max.trim().parse::<u64>().is_err() || pids_max.trim().parse::<u64>().is_err() {
        return Err(format!(
            "VMM cgroup limits: memory.max {memory_max:?} pids.max {pids_max:?}"
        ));
    }
    let shared = ["mnt", "pid", "net", "ipc", "uts"]
        .into_iter()
        .filter(|ns| {
            let link = |p: String| std::fs::read_link(p).ok();
            link(format!("/proc/{pid}/ns/{ns}")) == link(format!("/proc/self/ns/{ns}"))
        })
        .collect::<Vec<_>>();
    if !shared.is_empty() {
        return Err(format!("the VMM shares L1's namespaces {shared:?}"));
    }
    let mut root: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/root"))
        .map_err(|e| format!("VMM root: {e}"))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    root.sort();
    if ["etc", "usr", "bin", "home"]
        .iter()
        .any(|d| root.iter().any(|r| r == d))
    {
        return Err(format!("the VMM's root holds the host's: {root:?}"));
    }
    let (mut vcpus, mut threads) = (0, 0);
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| format!("VMM tasks: {e}"))?
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        let st = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        if status_field(&st, "Seccomp") != "2" {
            return Err(format!("VMM thread {} is not under seccomp", comm.trim()));
        }
        threads += 1;
        if comm.starts_with("chitin-vcpu") {
            vcpus += 1;
        }
    }
    if vcpus == 0 {
        return Err(format!("the jailed VMM {pid} has no vCPU thread"));
    }
    Ok(format!(
        "shim-jail: the pod VM's process is PID 1 of its own namespaces (mnt pid net ipc uts), cgroup /{cgroup}/vmm (memory.max {} MiB, pids.max {}), root {root:?}, uid 0 with CapEff/CapBnd {VMM_CAPS:#x} and nothing inheritable or ambient, NoNewPrivs 1, all its {threads} threads ({vcpus} vCPU) under seccomp",
        memory_max.trim().parse::<u64>().unwrap_or(0) >> 20,
        pids_max.trim()
    ))
}

/// `ctr ARGS` on a terminal of `rows` × `cols` in L1 (ctr takes its
/// terminal for `-t`): its exit code and what appeared on the terminal.
fn ctr_on_terminal(args: &[&str], rows: u16, cols: u16) -> Result<(Option<i32>, String), String> {
    use std::os::fd::FromRawFd;
    // L1's init mounts no devpts; openpty needs one.
    if !Path::new("/dev/pts/ptmx").exists() {
        mount(
            "devpts",
            "/dev/pts",
            "devpts",
            libc::MS_NOSUID | libc::MS_NOEXEC,
        )?;
    }
    let (mut master, mut slave) = (0, 0);
    let size = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two fds into the ints given and reads the
    // winsize; a null name and termios are allowed.
    let ret = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    if ret != 0 {
        return Err(format!("openpty: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: two new fds from openpty, owned by nothing else.
    let (mut master, slave) = unsafe {
        (
            std::fs::File::from_raw_fd(master),
            std::fs::File::from_raw_fd(slave),
        )
    };
    let dup = |f: &std::fs::File| f.try_clone().map_err(|e| e.to_string());
    let t = Instant::now();
    let mut child = Command::new(format!("{PACKAGES}/usr/bin/ctr"))
        .args(["--address", SOCKET])
        .args(args)
        .envs(environment())
        .stdin(dup(&slave)?)
        .stdout(dup(&slave)?)
        .stderr(slave)
        .spawn()
        .map_err(|e| format!("start ctr: {e}"))?;
    // The terminal ends (EIO) when ctr, the last holder of its slave side,
    // exits.
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        let _ = std::io::Read::read_to_end(&mut master, &mut all);
        String::from_utf8_lossy(&all).into_owned()
    });
    let status = wait_ctr(&mut child, t, args)?;
    let output = reader.join().map_err(|_| "terminal reader panicked")?;
    Ok((status.code(), output))
}

/// `ctr run -t` on a 33 × 101 terminal: the container's stdin is a
/// terminal, and it ends up the size of ctr's (`ResizePty`, or the
/// spec's console size), its output and exit code come back.
fn tty_checks(rootfs: &Path) -> Result<String, String> {
    let root = rootfs.to_str().ok_or("rootfs path")?;
    // Until the resize arrives the size is the shim's 24 × 80.
    let script = "test -t 0 && echo is-a-tty; i=0; \
                  while [ \"$(stty size)\" = '24 80' ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done; \
                  stty size; exit 3";
    let (code, output) = ctr_on_terminal(
        &[
            "run",
            "-t",
            "--rm",
            "--runtime",
            CHITIN,
            "--rootfs",
            root,
            "tty1",
            "/bin/sh",
            "-c",
            script,
        ],
        33,
        101,
    )?;
    let lines: Vec<&str> = output
        .split(['\r', '\n'])
        .filter(|l| !l.is_empty())
        .collect();
    if code != Some(3) || !lines.contains(&"is-a-tty") || lines.last() != Some(&"33 101") {
        return Err(format!("ctr run -t: exit {code:?}, terminal {output:?}"));
    }
    Ok(format!(
        "ctr run -t: the container's stdin was a terminal, 33x101 as ctr's ({}), exit 3",
        lines.join(" | ")
    ))
}

/// Wait until `ctr task ls` shows task `id` STOPPED or no more (at most
/// 60 s).
fn wait_stopped(id: &str) -> Result<(), String> {
    let t = Instant::now();
    loop {
        let list = ctr_ok(&["task", "ls"])?;
        let Some(line) = list
            .lines()
            .find(|l| l.split_whitespace().next() == Some(id))
        else {
            // Gone (deleted) is stopped too.
            return Ok(());
        };
        let status = line.split_whitespace().nth(2).map(str::to_string);
        if status.as_deref() == Some("STOPPED") {
            return Ok(());
        }
        if t.elapsed() > Duration::from_secs(60) {
            return Err(format!("task {id} not stopped after 60 s: {status:?}"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// containerd's CRI names a container's pod with this annotation; the
/// shim groups containers by it.
const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";

/// The guest's boot id as `ctr task exec` in `task` reads it.
fn boot_id(task: &str, exec_id: &str) -> Result<String, String> {
    let out = ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        exec_id,
        task,
        "/bin/cat",
        "/proc/sys/kernel/random/boot_id",
    ])?;
    Ok(out.trim().to_string())
}

/// A pod of two containers (annotated as CRI does): one shim process and
/// one VM serve both (the same guest boot id); the pod's VM outlives the
/// removal of its second container.
fn pod_checks(rootfs: &Path) -> Result<String, String> {
    let root = rootfs.to_str().ok_or("rootfs path")?;
    let pod = format!("{SANDBOX_ID}=pod1");
    let run = |id: &str| {
        ctr_ok(&[
            "run",
            "-d",
            "--runtime",
            CHITIN,
            "--annotation",
            &pod,
            "--rootfs",
            root,
            id,
            "/bin/sleep",
            "1000",
        ])
    };
    let remove = |id: &str| {
        let _ = ctr(&["task", "kill", "-s", "SIGKILL", id]);
        let _ = wait_stopped(id);
        let _ = ctr(&["task", "rm", id]);
        ctr_ok(&["container", "rm", id])
    };
    let result = run("pod1").and_then(|_| run("app1")).and_then(|_| {
        let shims = processes("containerd-shim");
        let (a, b) = (boot_id("pod1", "b1")?, boot_id("app1", "b2")?);
        if a.is_empty() || a != b {
            return Err(format!("two VMs for one pod: boot ids {a:?} and {b:?}"));
        }
        if shims.len() != 1 {
            return Err(format!("one pod, shim processes {shims:?}"));
        }
        remove("app1")?;
        let after = boot_id("pod1", "b3")?;
        if after != a {
            return Err(format!("the pod's VM changed after app1 left: {after:?}"));
        }
        Ok(format!(
            "pod1 and app1 (annotated {SANDBOX_ID}=pod1) ran in one shim and one VM (boot id {}...), which served pod1 on after app1 was removed",
            &a[..8.min(a.len())]
        ))
    });
    let _ = remove("app1");
    let removed = remove("pod1");
    let done = result?;
    removed?;
    Ok(done)
}

/// The pod network namespace the net check makes, as CRI would.
const NETNS: &str = "/run/netns/chitin-pod";
/// The CNI plugins on the packages' disk.
pub(crate) const CNI_DIR: &str = "/opt/containerd/usr/lib/cni";
/// The bridge network CNI puts the pod on (a bridge `cni0` in L1 as
/// gateway).
const CNI_CONFIG: &str = r#"{"cniVersion":"0.4.0","name":"chitin-pods","type":"bridge","bridge":"cni0","isGateway":true,"ipMasq":false,"ipam":{"type":"host-local","ranges":[[{"subnet":"10.88.0.0/16"}]],"routes":[{"dst":"0.0.0.0/0"}],"dataDir":"/run/chitin-cni"}}"#;
/// What the pod serves, and where.
pub(crate) const POD_PORT: u16 = 8080;
pub(crate) const POD_REPLY: &str = "reply-from-the-pod-vm";

/// Make a network namespace at [`NETNS`] (a file its handle is bound to).
fn make_netns() -> Result<(), String> {
    std::fs::create_dir_all("/run/netns").map_err(|e| format!("/run/netns: {e}"))?;
    std::fs::File::create(NETNS).map_err(|e| format!("{NETNS}: {e}"))?;
    std::thread::spawn(|| {
        // SAFETY: unshare takes flags only; it changes this thread alone,
        // which ends right after.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!("unshare: {}", std::io::Error::last_os_error()));
        }
        let (src, dst) = (c_str("/proc/thread-self/ns/net")?, c_str(NETNS)?);
        // SAFETY: NUL-terminated paths that live for the call; a bind
        // takes no type or data.
        let ret = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        if ret != 0 {
            return Err(format!(
                "bind the netns: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(())
    })
    .join()
    .map_err(|_| "the netns thread panicked")?
}

/// Run CNI's bridge plugin (`ADD` or `DEL`) for the pod's namespace, as
/// containerd's CRI does; its stdout.
fn cni(command: &str) -> Result<String, String> {
    use std::io::Write;
    let mut child = Command::new(format!("{CNI_DIR}/bridge"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", "chitin-pod")
        .env("CNI_NETNS", NETNS)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", CNI_DIR)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("start the bridge plugin: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(CNI_CONFIG.as_bytes())
            .map_err(|e| format!("CNI config: {e}"))?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "CNI {command}: {}; {stdout} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(stdout)
}

/// The pod's IPv4 address in a CNI result (`"address":"10.88.0.2/16"`).
fn cni_address(result: &str) -> Option<std::net::Ipv4Addr> {
    let compact: String = result.chars().filter(|c| !c.is_whitespace()).collect();
    let key = "\"address\":\"";
    let at = compact.find(key)? + key.len();
    compact[at..].split(['/', '"']).next()?.parse().ok()
}

/// Interfaces of the pod's namespace (from a thread inside it).
fn netns_interfaces() -> Result<Vec<String>, String> {
    let ns = std::fs::File::open(NETNS).map_err(|e| format!("{NETNS}: {e}"))?;
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        // SAFETY: an fd this thread holds; only this thread changes
        // namespace, and it ends right after.
        if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(format!("setns: {}", std::io::Error::last_os_error()));
        }
        let dev =
            std::fs::read_to_string("/proc/thread-self/net/dev").map_err(|e| e.to_string())?;
        Ok(dev
            .lines()
            .skip(2)
            .filter_map(|l| Some(l.split_once(':')?.0.trim().to_string()))
            .collect())
    })
    .join()
    .map_err(|_| "the netns thread panicked")?
}

/// The pod network: CNI's bridge plugin gives a namespace a veth and an
/// address; a chitin container joining that namespace (`--with-ns`)
/// serves a TCP port from inside its VM, and L1 reaches it at the pod's
/// IP. Afterwards the shim's tap is gone from the namespace.
fn net_checks(rootfs: &Path) -> Result<String, String> {
    make_netns()?;
    let result = cni("ADD").and_then(|added| {
        let ip = cni_address(&added).ok_or_else(|| format!("no address in {added:?}"))?;
        let served = serve_and_connect(rootfs, ip);
        let _ = ctr(&["task", "kill", "-s", "SIGKILL", "web"]);
        let _ = wait_stopped("web");
        let _ = ctr(&["task", "rm", "web"]);
        let _ = ctr(&["container", "rm", "web"]);
        let reply = served?;
        let left = netns_interfaces()?;
        if left.iter().any(|i| i.starts_with("chitin")) {
            return Err(format!("the shim's tap is still in the pod's namespace: {left:?}"));
        }
        Ok(format!(
            "the pod's IP {ip} (CNI bridge; its veth joined to the VM's tap by tc redirects) answered a TCP connection from L1 from inside the VM ({reply:?}); the tap left with the VM"
        ))
    });
    let _ = cni("DEL");
    let _ = umount(NETNS);
    let _ = std::fs::remove_file(NETNS);
    result
}

/// Start the pod's server and connect to it at `ip`.
fn serve_and_connect(rootfs: &Path, ip: std::net::Ipv4Addr) -> Result<String, String> {
    let root = rootfs.to_str().ok_or("rootfs path")?;
    let netns = format!("network:{NETNS}");
    let script = format!("echo {POD_REPLY} | nc -l -p {POD_PORT}");
    ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        CHITIN,
        "--with-ns",
        &netns,
        "--rootfs",
        root,
        "web",
        "/bin/sh",
        "-c",
        &script,
    ])?;
    read_reply(ip)
}

/// Connect to the pod's server at `ip` and read its reply line (the
/// guest boots meanwhile: retried for up to a minute).
pub(crate) fn read_reply(ip: std::net::Ipv4Addr) -> Result<String, String> {
    let addr = std::net::SocketAddr::from((ip, POD_PORT));
    let t = Instant::now();
    let mut last = String::new();
    while t.elapsed() < Duration::from_secs(60) {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(stream) => {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
                // One line: nc may keep the connection open after it.
                let mut got = String::new();
                match BufReader::new(stream).read_line(&mut got) {
                    Ok(_) if got.trim() == POD_REPLY => return Ok(got.trim().to_string()),
                    Ok(_) => last = format!("read {got:?}"),
                    Err(e) => last = format!("read: {e}"),
                }
            }
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    Err(format!("{addr} did not answer within 60 s: {last}"))
}

/// Nothing of containerd's left: processes, mounts, the containers'
/// cgroups and the shim's directories in containerd namespace
/// `namespace`.
pub(crate) fn leftovers(namespace: &str) -> Result<String, String> {
    let running = processes("containerd");
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mounts: Vec<&str> = mountinfo
        .lines()
        .filter(|l| {
            [PACKAGES, STATE, ROOT, CHITIN_STATE]
                .iter()
                .any(|m| l.contains(m))
        })
        .collect();
    // ctr puts its containers' cgroups under its namespace's name.
    let cgroups: Vec<String> = std::fs::read_dir(format!("/sys/fs/cgroup/{namespace}"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    // The chitin shim's directories (one per pod, under its namespace).
    let state: Vec<String> = std::fs::read_dir(format!("{CHITIN_STATE}/{namespace}"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    if running.is_empty() && mounts.is_empty() && cgroups.is_empty() && state.is_empty() {
        Ok("no containerd or shim process, mount, container cgroup or shim directory left".into())
    } else {
        Err(format!(
            "left: processes {running:?}, mounts {mounts:?}, cgroups {cgroups:?}, shim directories {state:?}"
        ))
    }
}
