//! The pod VM's own process, confined by chitin's jail.
//!
//! The shim talks to containerd, mounts roots into the pod's share and
//! joins the pod's network: it needs root's powers. The VMM, which parses
//! everything the guest sends, does not: the shim starts it as
//! `containerd-shim-chitin-v2 vmm ...` and it enters a jail before it
//! builds the VM. Its namespaces are its own (mount, PID, IPC, UTS,
//! network), its root holds only the guest image, the pod's shared
//! directory, its run directory and `/dev/kvm`, its cgroup is below the
//! pod's (`vmm`, with memory and pids limits), and it keeps none of
//! root's capabilities but the six chitin-fs needs to serve container
//! roots as the guest's users (see [`KEPT_CAPABILITIES`]; an
//! unprivileged uid could not write a root-owned image). The tap arrives
//! as an open fd; mounts the shim adds to the shared directory later
//! show inside (the jail's mounts are slaves of the host's).
//!
//! The shim drives the guest through the VM's vsock socket with a
//! [`RemoteSandbox`], and the process itself through two pipes: its stdin
//! takes `stop` and `stats` lines (end of file: the shim is gone, the VM
//! stops), its stdout says `up`, `stats <counters>`, `exit <reason>` or
//! `error <message>`. Its stderr is the VMM's log, which the shim logs
//! as its own. Once the guest runs, the VMM may be the guest's: the
//! shim takes no path from it (it computes the VMM's cgroup itself),
//! reads lines of bounded length, keeps at most one answer waiting and
//! logs a bounded number of its lines.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, ChildStdout, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use chitin::jail::CgroupLimits;
use chitin::{Console, ExitReason, MacAddr, Net, NetStats, RemoteSandbox, Sandbox, Seccomp, Share};

use crate::config::Config;

/// The first argument that makes the binary the VMM process.
pub const SUBCOMMAND: &str = "vmm";
/// The VMM process's `argv[0]`.
const BINARY: &str = "containerd-shim-chitin-v2";
/// The shared directory's name in the shim's state directory.
pub const SHARED: &str = "shared";
/// The VMM's run directory (vsock socket, console log) in the shim's.
const RUN_DIR: &str = "vmm";
/// The jails' directory in the shim's.
const JAIL_DIR: &str = "jail";
/// The file in the shim's directory naming the cgroup parent of the
/// running VMM's cgroup, for the clean-up after a shim that died.
const CGROUP_RECORD: &str = "vmm.cgroup";
/// The jail's id: its directory in [`JAIL_DIR`] and its cgroup's name.
pub const JAIL_ID: &str = "vmm";
/// The share's tag, and where the guest mounts it: container `C`'s root
/// is `GUEST_SHARED/C/rootfs`.
const SHARE_TAG: &str = "chitin-pod";
pub const GUEST_SHARED: &str = "/run/chitin/pod";
/// Most console text of a pod VM kept (in the run directory).
const CONSOLE_LIMIT: u64 = 1 << 20;
/// The fd the tap arrives on.
const TAP_FD: RawFd = 3;
/// What the jailed VMM keeps of root's capabilities: `CAP_CHOWN`,
/// `CAP_DAC_OVERRIDE`, `CAP_DAC_READ_SEARCH`, `CAP_FOWNER`, `CAP_SETGID`
/// and `CAP_SETUID`, the set chitin-fs's serving thread keeps.
pub const KEPT_CAPABILITIES: [u32; 6] = [0, 1, 2, 3, 6, 7];
/// The VMM's memory limit beyond guest RAM (its own heap, device
/// buffers, the page cache of what the share's server reads and writes).
const MEMORY_OVERHEAD: u64 = 256 << 20;
/// Its tasks limit: vCPU and device threads, and the file server's.
const PIDS_MAX: u64 = 1024;
/// How long the VMM process may take to come up (the jail's set-up, the
/// VM's build and start; the guest boots after).
const UP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a stop may take before the VMM's cgroup is killed, and how
/// long that may take before its supervisor is.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// The run directory's tmpfs: the console log (at most
/// [`CONSOLE_LIMIT`]), the vsock sockets.
const RUN_DIR_SIZE: u64 = 2 << 20;
const RUN_DIR_INODES: u64 = 64;
/// How long a stats request may take.
const STATS_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest line the shim reads from the VMM process.
const MAX_LINE: usize = 4096;
/// Most lines of the VMM's (its log, or what it should not say) the
/// shim logs per [`LOG_WINDOW`]; the rest are counted and dropped, so a
/// VMM the guest took over cannot flood containerd's log.
const LOG_LINES: u32 = 100;
const LOG_WINDOW: Duration = Duration::from_secs(10);

/// The VMM's share of the shim's log.
struct LogBudget {
    window: std::time::Instant,
    logged: u32,
    dropped: u64,
}

impl LogBudget {
    fn new() -> Self {
        Self {
            window: std::time::Instant::now(),
            logged: 0,
            dropped: 0,
        }
    }

    /// Log `line` at `level` if the window has room.
    fn log(&mut self, level: log::Level, line: &str) {
        if self.window.elapsed() >= LOG_WINDOW {
            if self.dropped > 0 {
                log::warn!("vmm: {} lines dropped", self.dropped);
            }
            *self = Self::new();
        }
        if self.logged < LOG_LINES {
            self.logged += 1;
            // Escaped: no control character of the VMM's reaches the log.
            log::log!(level, "vmm: {}", line.escape_debug());
        } else {
            self.dropped += 1;
        }
    }
}

/// The pod's interface, which the tap at [`TAP_FD`] serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interface {
    pub mac: MacAddr,
    pub address: Ipv4Addr,
    pub prefix: u8,
    pub gateway: Option<Ipv4Addr>,
}

/// What the shim tells the VMM process, on its command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Args {
    /// The shim's directory: the shared, run and jail directories are in it.
    pub state_dir: PathBuf,
    /// The cgroup (below the cgroup v2 root) the VMM's is made in.
    pub cgroup_parent: String,
    /// The pod's interface, when the pod has a network.
    pub net: Option<Interface>,
}

impl Args {
    /// The arguments after the binary's name.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut out: Vec<OsString> = vec![
            SUBCOMMAND.into(),
            "--state".into(),
            self.state_dir.clone().into(),
            "--cgroup".into(),
            self.cgroup_parent.clone().into(),
        ];
        if let Some(i) = &self.net {
            out.push("--net".into());
            out.push(i.mac.to_string().into());
            out.push(format!("{}/{}", i.address, i.prefix).into());
            out.push(i.gateway.map_or("-".to_string(), |g| g.to_string()).into());
        }
        out
    }

    /// [`Args::to_args`] read back.
    pub fn parse(args: &[OsString]) -> Result<Self, String> {
        let text: Vec<&str> = args
            .iter()
            .map(|a| a.to_str().ok_or("an argument is not UTF-8"))
            .collect::<Result<_, _>>()?;
        let (mut state_dir, mut cgroup_parent, mut net) = (None, None, None);
        let mut rest = text.as_slice();
        if rest.first() != Some(&SUBCOMMAND) {
            return Err(format!("expected {SUBCOMMAND}"));
        }
        rest = &rest[1..];
        while let Some((flag, tail)) = rest.split_first() {
            let take = |n: usize| {
                tail.get(..n)
                    .ok_or_else(|| format!("{flag} needs {n} value(s)"))
            };
            let used = match *flag {
                "--state" => {
                    state_dir = Some(PathBuf::from(take(1)?[0]));
                    1
                }
                "--cgroup" => {
                    cgroup_parent = Some(take(1)?[0].to_string());
                    1
                }
                "--net" => {
                    let v = take(3)?;
                    let mac = v[0].parse().map_err(|e| format!("--net MAC: {e}"))?;
                    let (address, prefix) = v[1].split_once('/').ok_or("--net ADDRESS/PREFIX")?;
                    let gateway = match v[2] {
                        "-" => None,
                        g => Some(g.parse().map_err(|e| format!("--net gateway: {e}"))?),
                    };
                    net = Some(Interface {
                        mac,
                        address: address.parse().map_err(|e| format!("--net address: {e}"))?,
                        prefix: prefix.parse().map_err(|e| format!("--net prefix: {e}"))?,
                        gateway,
                    });
                    3
                }
                other => return Err(format!("unknown argument {other:?}")),
            };
            rest = &tail[used..];
        }
        Ok(Self {
            state_dir: state_dir.ok_or("--state is missing")?,
            cgroup_parent: cgroup_parent.ok_or("--cgroup is missing")?,
            net,
        })
    }

    fn run_dir(&self) -> PathBuf {
        self.state_dir.join(RUN_DIR)
    }

    fn socket(&self) -> PathBuf {
        self.run_dir().join("vsock.sock")
    }
}

/// The cgroup (below the v2 root) a pod's VMM cgroup is made in: the
/// pod sandbox container's `cgroupsPath`, as runc would make it
/// (`/kubepods/...` from the cgroupfs driver; `slice:prefix:name` from
/// the systemd driver is made a path the way systemd names it), or
/// `chitin/<namespace>/<pod>` without one. Refuses a path that leaves
/// the hierarchy.
pub fn cgroup_parent(path: Option<&str>, namespace: &str, pod: &str) -> Result<String, String> {
    let path = match path.filter(|p| !p.is_empty()) {
        None => format!("chitin/{namespace}/{pod}"),
        Some(p) if !p.starts_with('/') && p.matches(':').count() == 2 => {
            let mut parts = p.splitn(3, ':');
            let (slice, prefix, name) = (
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
                parts.next().unwrap_or_default(),
            );
            let slice = if slice.is_empty() {
                "system.slice"
            } else {
                slice
            };
            let Some(stem) = slice.strip_suffix(".slice") else {
                return Err(format!("cgroupsPath {p:?}: {slice:?} is not a slice"));
            };
            // `-.slice` is the root slice; `a-b-c.slice` lives in
            // `a.slice/a-b.slice/a-b-c.slice`; systemd refuses empty
            // parts (`a--b`, `-a`, `a-`) and slashes.
            let mut dirs: Vec<String> = Vec::new();
            if stem != "-" {
                if stem.is_empty() || stem.contains('/') || stem.split('-').any(str::is_empty) {
                    return Err(format!("cgroupsPath {p:?}: {slice:?} is not a valid slice"));
                }
                dirs = stem
                    .match_indices('-')
                    .map(|(i, _)| format!("{}.slice", &stem[..i]))
                    .collect();
                dirs.push(slice.to_string());
            }
            if prefix.contains('/') || name.contains('/') || name.is_empty() {
                return Err(format!("cgroupsPath {p:?}: not a scope name"));
            }
            let scope = if prefix.is_empty() {
                format!("{name}.scope")
            } else {
                format!("{prefix}-{name}.scope")
            };
            dirs.push(scope);
            dirs.join("/")
        }
        Some(p) => p.trim_start_matches('/').to_string(),
    };
    if stays_in_hierarchy(&path) {
        Ok(path)
    } else {
        Err(format!("cgroup path {path:?} leaves the cgroup hierarchy"))
    }
}

/// Whether `path`, below the cgroup v2 root, stays there: plain
/// components only.
fn stays_in_hierarchy(path: &str) -> bool {
    !path.is_empty()
        && path
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'))
}

/// The VMM process's `main`: never returns.
pub fn main(args: &[OsString]) -> ! {
    chitin::log_to_stderr(log::LevelFilter::Info);
    let code = match run(args) {
        Ok(()) => 0,
        Err(e) => {
            log::error!("{e}");
            say(&format!("error {}", e.replace('\n', " ")));
            1
        }
    };
    std::process::exit(code)
}

/// One line to the shim; a shim that is gone cannot hear it.
fn say(line: &str) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn run(args: &[OsString]) -> Result<(), String> {
    let args = Args::parse(args)?;
    let config = Config::load().map_err(|e| e.to_string())?;
    let run_dir = args.run_dir();
    std::fs::create_dir_all(&run_dir).map_err(|e| format!("{}: {e}", run_dir.display()))?;
    let shared = args.state_dir.join(SHARED);
    let mut builder = Sandbox::builder()
        .guest(config.guest.clone())
        .memory_mib(config.memory_mib)
        .vcpus(config.vcpus)
        .console(Console::file_with_limit(
            run_dir.join("console.log"),
            CONSOLE_LIMIT,
        ))
        .share(Share::new(&shared, SHARE_TAG).mount_at(GUEST_SHARED))
        .vsock(chitin::DEFAULT_GUEST_CID, args.socket());
    if let Some(i) = &args.net {
        // SAFETY: the shim hands the tap over as fd 3 and holds no other
        // handle on it in this process: this is its only owner.
        let tap = unsafe { OwnedFd::from_raw_fd(TAP_FD) };
        let mut net = Net::tap_fd(tap).mac(i.mac).address(i.address, i.prefix);
        if let Some(gw) = i.gateway {
            net = net.gateway(gw);
        }
        builder = builder.net(net);
    }
    let jailed = builder
        .jail(JAIL_ID)
        .root_keeping(&KEPT_CAPABILITIES)
        .state_dir(args.state_dir.join(JAIL_DIR))
        .cgroup_parent(args.cgroup_parent.clone())
        .cgroup(CgroupLimits {
            memory_max: Some((config.memory_mib << 20) + MEMORY_OVERHEAD),
            cpu_max: None,
            pids_max: Some(PIDS_MAX),
        })
        .enter()
        .map_err(|e| {
            if let chitin::jail::JailError::Busy(path) = &e {
                // Not ours: the shim must leave it alone.
                say(&format!("busy {}", path.display()));
            }
            format!("jailing the VMM: {}", chitin::error_chain(&e))
        })?;
    // Only the jailed process gets here (the caller supervises the jail).
    let vm = builder
        .build()
        .and_then(|s| s.start())
        .map_err(|e| format!("booting the pod VM: {}", chitin::error_chain(&e)))?;
    log::info!(
        "pod VM up in jail {}, cgroup {}: {} MiB, {} vCPUs, {}",
        jailed.id(),
        jailed
            .cgroup()
            .map_or("-".into(), |c| c.display().to_string()),
        config.memory_mib,
        config.vcpus,
        config.guest.kernel().display()
    );
    say("up");
    let vm = Arc::new(vm);
    let served = Arc::clone(&vm);
    // The shim's requests, until it asks for the stop or is gone. This
    // thread and the main one run under the writer filter (everything
    // but what no VMM thread may do: no ptrace, no open_by_handle_at, no
    // mounts, namespaces or id changes), as chitin's threads run under
    // theirs: a guest that takes the VMM over finds no thread without.
    chitin_seccomp::spawn(
        "chitin-vmm-ctl",
        chitin_seccomp::ThreadClass::Writer,
        Seccomp::Enforce,
        move || {
            let mut lines = io::stdin().lock();
            let mut line = String::new();
            loop {
                line.clear();
                match lines.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if line.trim() == "stats" => {
                        say(&format!("stats {}", encode_stats(&served.net_stats())))
                    }
                    Ok(_) if line.trim() == "stop" => break,
                    Ok(_) => log::warn!("unknown request {:?}", line.trim()),
                }
            }
            served.handle().stop();
        },
    )
    .map_err(|e| format!("starting the control thread: {e}"))?;
    // Every thread of the VM is started; none is started from here on.
    chitin_seccomp::confine_current_thread(chitin_seccomp::ThreadClass::Writer, Seccomp::Enforce)
        .map_err(|e| format!("confining the main thread: {e}"))?;
    let reason = vm.wait();
    log::info!("pod VM stopped: {reason:?}");
    say(&format!("exit {}", encode_reason(&reason)));
    Ok(())
}

/// An exit reason as one word.
fn encode_reason(reason: &ExitReason) -> &'static str {
    match reason {
        ExitReason::Reset => "reset",
        ExitReason::PowerOff => "power-off",
        ExitReason::TripleFault => "triple-fault",
        ExitReason::Crash => "crash",
        ExitReason::Stopped => "stopped",
        _ => "failed",
    }
}

/// [`encode_reason`] read back; a failure the VMM logged in full, or
/// anything else, is [`ExitReason::VmmGone`].
fn decode_reason(word: &str) -> ExitReason {
    match word {
        "reset" => ExitReason::Reset,
        "power-off" => ExitReason::PowerOff,
        "triple-fault" => ExitReason::TripleFault,
        "crash" => ExitReason::Crash,
        "stopped" => ExitReason::Stopped,
        _ => ExitReason::VmmGone,
    }
}

/// Each interface's counters: space-separated, interfaces by `;`.
fn encode_stats(nets: &[NetStats]) -> String {
    nets.iter()
        .map(|n| {
            [
                n.rx_frames,
                n.rx_bytes,
                n.rx_dropped,
                n.rx_read_errors,
                n.tx_frames,
                n.tx_bytes,
                n.tx_malformed,
                n.tx_backend_drops,
                n.rx_throttled,
                n.tx_throttled,
            ]
            .map(|v| v.to_string())
            .join(" ")
        })
        .collect::<Vec<_>>()
        .join(";")
}

/// [`encode_stats`] read back; `None` if anything is off.
fn decode_stats(text: &str) -> Option<Vec<NetStats>> {
    if text.is_empty() {
        return Some(Vec::new());
    }
    text.split(';')
        .map(|one| {
            let v: Vec<u64> = one
                .split(' ')
                .map(|n| n.parse().ok())
                .collect::<Option<_>>()?;
            let [rx_frames, rx_bytes, rx_dropped, rx_read_errors, tx_frames, tx_bytes, tx_malformed, tx_backend_drops, rx_throttled, tx_throttled] =
                <[u64; 10]>::try_from(v).ok()?;
            Some(NetStats {
                rx_frames,
                rx_bytes,
                rx_dropped,
                rx_read_errors,
                tx_frames,
                tx_bytes,
                tx_malformed,
                tx_backend_drops,
                rx_throttled,
                tx_throttled,
            })
        })
        .collect()
}

/// Between the VMM's watcher and [`Vmm::start`]: the Vmm to tell when
/// the process ends, or why it ended before the Vmm was made.
#[derive(Default)]
struct Ended {
    vmm: Option<Arc<Vmm>>,
    reason: Option<ExitReason>,
}

/// The jailed VMM process of a pod, as the shim sees it.
pub struct Vmm {
    remote: RemoteSandbox,
    /// The vsock socket the VMM made, opened once it was up and reached
    /// only through this handle from then on: a VMM the guest took over
    /// cannot swap a symlink in and point the shim at another socket.
    _socket: OwnedFd,
    /// The process (the jail's supervisor), for signals that cannot hit
    /// another process once it is reaped.
    pidfd: OwnedFd,
    /// Its stdin, non-blocking: a VMM that stops reading cannot block
    /// the shim.
    stdin: Mutex<Option<ChildStdin>>,
    /// `stats` answers, in order.
    stats: Mutex<mpsc::Receiver<String>>,
    /// The VMM's cgroup on the host.
    cgroup: PathBuf,
    /// The cgroup the shim asked for it to be made in, below the v2 root.
    cgroup_parent: String,
    /// Its run directory (a tmpfs of the shim's).
    run_dir: PathBuf,
    /// The file that records its cgroup parent.
    record: PathBuf,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("remote", &self.remote)
            .field("cgroup", &self.cgroup)
            .finish_non_exhaustive()
    }
}

/// `pidfd_open(2)`.
fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: integer arguments only.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// `path`, which must be a socket, opened `O_PATH` without following a
/// symlink.
fn open_socket(path: &Path) -> io::Result<OwnedFd> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_NOFOLLOW)
        .open(path)?;
    if !file.metadata()?.file_type().is_socket() {
        return Err(io::Error::other(format!(
            "{} is not a socket",
            path.display()
        )));
    }
    Ok(file.into())
}

/// Make `fd` non-blocking.
fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we hold, integer arguments only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A line of at most [`MAX_LINE`] bytes, without its newline; `None` at
/// the end of the stream or on an error.
fn read_line<R: BufRead>(reader: &mut R) -> Option<String> {
    let mut buf = Vec::new();
    let n = Read::take(&mut *reader, MAX_LINE as u64)
        .read_until(b'\n', &mut buf)
        .ok()?;
    if n == 0 {
        return None;
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
    } else if n == MAX_LINE {
        // Too long: the rest of it is skipped, none of it kept.
        while let Ok(chunk) = reader.fill_buf() {
            if chunk.is_empty() {
                break;
            }
            match chunk.iter().position(|b| *b == b'\n') {
                Some(end) => {
                    reader.consume(end + 1);
                    break;
                }
                None => {
                    let len = chunk.len();
                    reader.consume(len);
                }
            }
        }
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

impl Vmm {
    /// Start the VMM process and wait until its VM runs. `tap` is the
    /// pod's tap, handed over as fd 3.
    pub fn start(args: &Args, tap: Option<OwnedFd>) -> Result<Arc<Vmm>, String> {
        // Computed here: nothing the VMM says is trusted with a path. A
        // cgroup that is there already is not ours to use, kill or
        // remove.
        let cgroup = chitin::jail::Jail::new(JAIL_ID)
            .cgroup_parent(args.cgroup_parent.clone())
            .cgroup_path()
            .map_err(|e| format!("the VMM's cgroup: {e}"))?;
        if cgroup.exists() {
            return Err(format!("the VMM's cgroup {} exists", cgroup.display()));
        }
        // Where it goes, for containerd's clean-up after a shim that
        // died (out of the jail's reach).
        let record = args.state_dir.join(CGROUP_RECORD);
        std::fs::write(&record, &args.cgroup_parent)
            .map_err(|e| format!("{}: {e}", record.display()))?;
        // Its run directory: a small tmpfs, so the VMM cannot fill the
        // host's /run through it.
        let run_dir = args.run_dir();
        let mounted = std::fs::create_dir_all(&run_dir)
            .and_then(|()| crate::mounts::unmount(&run_dir))
            .and_then(|()| crate::mounts::mount_tmpfs(&run_dir, RUN_DIR_SIZE, RUN_DIR_INODES))
            .map_err(|e| {
                (
                    false,
                    format!("the VMM's run directory {}: {e}", run_dir.display()),
                )
            });
        match mounted.and_then(|()| Self::spawn(args, tap, &cgroup)) {
            Ok(vmm) => Ok(vmm),
            Err((busy, e)) => {
                // The process is gone; what its jail made goes, unless
                // the cgroup turned out to be another's.
                if !busy {
                    remove_cgroups(&cgroup, &args.cgroup_parent);
                }
                let _ = crate::mounts::unmount(&run_dir);
                let _ = std::fs::remove_file(&record);
                Err(e)
            }
        }
    }

    /// [`Vmm::start`]'s process and threads. On an error the process has
    /// ended (or was killed and waited for); `true` with it: the jail
    /// found its cgroup made by another meanwhile.
    fn spawn(args: &Args, tap: Option<OwnedFd>, cgroup: &Path) -> Result<Arc<Vmm>, (bool, String)> {
        let failed = |e: String| (false, e);
        let (up_tx, up_rx) = mpsc::channel::<Result<(), (bool, String)>>();
        // One answer waits at most: a VMM that sends more is not heard.
        let (stats_tx, stats_rx) = mpsc::sync_channel::<String>(1);
        // The Vmm once it exists, or how the process ended before.
        let remote_slot: Arc<Mutex<Ended>> = Arc::default();
        let watched = Arc::clone(&remote_slot);
        // The watcher first, so that no process runs without one: it
        // gets the process once it is started.
        let (child_tx, child_rx) = mpsc::channel::<(std::process::Child, ChildStdout)>();
        let watcher = std::thread::Builder::new()
            .name("vmm-watch".into())
            .spawn(move || {
                let Ok((mut child, stdout)) = child_rx.recv() else {
                    return;
                };
                let mut reader = BufReader::new(stdout);
                let mut reason = None;
                let mut up = Some(up_tx);
                let mut budget = LogBudget::new();
                while let Some(line) = read_line(&mut reader) {
                    let (word, rest) = line.split_once(' ').unwrap_or((&line, ""));
                    match word {
                        "up" if up.is_some() => {
                            let _ = up.take().map(|tx| tx.send(Ok(())));
                        }
                        "error" | "busy" => {
                            budget.log(log::Level::Error, rest);
                            let busy = word == "busy";
                            let text = rest.escape_debug().to_string();
                            let _ = up.take().map(|tx| tx.send(Err((busy, text))));
                        }
                        "stats" => {
                            let _ = stats_tx.try_send(rest.to_string());
                        }
                        "exit" => reason = Some(decode_reason(rest)),
                        _ => budget.log(log::Level::Warn, &format!("said {line}")),
                    }
                }
                let status = child.wait();
                log::info!("VMM process ended: {status:?}");
                let _ = up.take().map(|tx| {
                    tx.send(Err((
                        false,
                        format!(
                            "the VMM process ended ({})",
                            status.map_or_else(|e| e.to_string(), |s| s.to_string())
                        ),
                    )))
                });
                let reason = reason.unwrap_or(ExitReason::VmmGone);
                let mut slot = crate::process::relock(&watched);
                match slot.vmm.take() {
                    Some(vmm) => vmm.remote.stopped(reason),
                    // Not made yet: it sees the reason when it is.
                    None => slot.reason = Some(reason),
                }
            })
            .map_err(|e| failed(format!("starting the VMM watcher: {e}")))?;
        drop(watcher);
        let tap_fd = tap.as_ref().map(AsRawFd::as_raw_fd);
        // This very binary, even if the file was replaced since, under
        // its own name for `ps`.
        let mut cmd = std::process::Command::new("/proc/self/exe");
        cmd.arg0(BINARY)
            .args(args.to_args())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: between fork and exec the closure only makes async-
        // signal-safe calls (dup2, fcntl) on fds and integers.
        unsafe {
            cmd.pre_exec(move || {
                if let Some(fd) = tap_fd {
                    if fd == TAP_FD {
                        let flags = libc::fcntl(fd, libc::F_GETFD);
                        if flags < 0
                            || libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                        {
                            return Err(io::Error::last_os_error());
                        }
                    } else if libc::dup2(fd, TAP_FD) < 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                // No parent-death signal: it follows the forking thread,
                // a ttrpc worker that may end first. The VM ends with the
                // shim anyway: its stdin reaches end of file (and
                // containerd's clean-up after a dead shim kills the
                // VMM's cgroup).
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| failed(format!("starting the VMM process: {e}")))?;
        drop(tap);
        let stop_now = |child: &mut std::process::Child, e: String| {
            let _ = child.kill();
            let _ = child.wait();
            failed(e)
        };
        let pidfd = match pidfd_open(child.id()) {
            Ok(fd) => fd,
            Err(e) => return Err(stop_now(&mut child, format!("pidfd_open of the VMM: {e}"))),
        };
        let (stdin, stdout, stderr) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let (Some(stdin), Some(stdout)) = (stdin, stdout) else {
            return Err(stop_now(&mut child, "the VMM process has no pipes".into()));
        };
        if let Err(e) = set_nonblocking(stdin.as_raw_fd()) {
            return Err(stop_now(&mut child, format!("the VMM's stdin: {e}")));
        }
        if let Some(stderr) = stderr {
            // The VMM's log, as the shim's (without the thread, the VMM
            // writes to a closed pipe).
            let _ = std::thread::Builder::new()
                .name("vmm-log".into())
                .spawn(move || {
                    let mut reader = BufReader::new(stderr);
                    let mut budget = LogBudget::new();
                    while let Some(line) = read_line(&mut reader) {
                        budget.log(log::Level::Info, &line);
                    }
                });
        }
        if let Err(mpsc::SendError((mut child, _))) = child_tx.send((child, stdout)) {
            return Err(stop_now(&mut child, "the VMM watcher is gone".into()));
        }
        let up = match up_rx.recv_timeout(UP_TIMEOUT) {
            Ok(Ok(())) => open_socket(&args.socket())
                .map_err(|e| failed(format!("the pod VM's vsock socket: {e}"))),
            Ok(Err((busy, e))) => Err((busy, format!("the pod VM did not start: {e}"))),
            Err(_) => Err(failed(format!(
                "the pod VM did not start within {UP_TIMEOUT:?}"
            ))),
        };
        let socket = match up {
            Ok(socket) => socket,
            Err(e) => {
                // Killed if it still runs, and reaped by the watcher.
                send_signal(&pidfd, libc::SIGKILL);
                for _ in 0..500 {
                    if crate::process::relock(&remote_slot).reason.is_some() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                return Err(e);
            }
        };
        let vmm = Arc::new(Vmm {
            remote: RemoteSandbox::new(chitin_inroot::fd_path(&socket), Seccomp::Enforce),
            _socket: socket,
            pidfd,
            stdin: Mutex::new(Some(stdin)),
            stats: Mutex::new(stats_rx),
            cgroup: cgroup.to_path_buf(),
            cgroup_parent: args.cgroup_parent.clone(),
            run_dir: args.run_dir(),
            record: args.state_dir.join(CGROUP_RECORD),
        });
        let mut slot = crate::process::relock(&remote_slot);
        match slot.reason.take() {
            Some(reason) => vmm.remote.stopped(reason),
            None => slot.vmm = Some(Arc::clone(&vmm)),
        }
        drop(slot);
        Ok(vmm)
    }

    /// The guest, through its agent.
    pub fn remote(&self) -> &RemoteSandbox {
        &self.remote
    }

    /// The VMM's cgroup on the host.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// The VM's interfaces' counters; none if the VMM does not answer.
    pub fn net_stats(&self) -> Vec<NetStats> {
        let answers = crate::process::relock(&self.stats);
        // Answers to earlier requests that timed out.
        while answers.try_recv().is_ok() {}
        if !self.send("stats") {
            return Vec::new();
        }
        match answers.recv_timeout(STATS_TIMEOUT) {
            Ok(text) => decode_stats(&text).unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    }

    /// One request line; `false` if it could not all go at once (the
    /// pipe is full: the VMM does not read) or the VMM is gone.
    fn send(&self, line: &str) -> bool {
        let mut stdin = crate::process::relock(&self.stdin);
        match stdin.as_mut() {
            // A line is far below PIPE_BUF: it goes whole or not at all.
            Some(s) => s
                .write(format!("{line}\n").as_bytes())
                .is_ok_and(|n| n == line.len() + 1),
            None => false,
        }
    }

    /// Stop the VM and wait for the process to end; why the VM stopped.
    /// A VMM that does not stop within [`STOP_TIMEOUT`] has its cgroup
    /// killed (the jail's supervisor, outside it, then cleans up), and
    /// its supervisor is killed if even that does not end it. Then its
    /// cgroup, the one the shim asked for, and its run directory go.
    pub fn stop(&self) -> ExitReason {
        if self.remote.exit_reason().is_none() {
            self.send("stop");
        }
        // End of file: the VMM stops its VM if the line did not reach it.
        crate::process::relock(&self.stdin).take();
        let reason = self.remote.wait_timeout(STOP_TIMEOUT).or_else(|| {
            log::warn!("the VMM did not stop within {STOP_TIMEOUT:?}: killing its cgroup");
            if let Err(e) = std::fs::write(self.cgroup.join("cgroup.kill"), "1") {
                log::warn!("{}: {e}", self.cgroup.join("cgroup.kill").display());
            }
            self.remote.wait_timeout(KILL_TIMEOUT)
        });
        let reason = reason.unwrap_or_else(|| {
            log::warn!("the VMM's supervisor did not end: killing it");
            send_signal(&self.pidfd, libc::SIGKILL);
            self.remote
                .wait_timeout(KILL_TIMEOUT)
                .unwrap_or(ExitReason::VmmGone)
        });
        remove_cgroups(&self.cgroup, &self.cgroup_parent);
        if let Err(e) = crate::mounts::unmount(&self.run_dir) {
            log::warn!("unmounting {}: {e}", self.run_dir.display());
        }
        let _ = std::fs::remove_file(&self.record);
        reason
    }
}

/// What a killed jail supervisor could not remove: the VMM's `cgroup`
/// (its processes killed first); and the cgroup it was made in, the
/// shim's `parent`, once empty (runc removes a container's cgroup too;
/// the levels above are the kubelet's or containerd's).
pub fn remove_cgroups(cgroup: &Path, parent: &str) {
    if cgroup.exists() {
        if let Err(e) = std::fs::write(cgroup.join("cgroup.kill"), "1") {
            log::warn!("{}: {e}", cgroup.join("cgroup.kill").display());
        }
        for _ in 0..200 {
            if std::fs::remove_dir(cgroup).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    if let Some(dir) = cgroup.parent().filter(|d| d.ends_with(parent)) {
        let _ = std::fs::remove_dir(dir);
    }
}

/// `pidfd_send_signal(2)`; a process already gone is fine.
fn send_signal(pidfd: &OwnedFd, signo: libc::c_int) {
    // SAFETY: a valid pidfd, a signal number, no siginfo, no flags.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signo,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
}

/// The cgroup of the VMM the shim in `state_dir` ran, and its parent, as
/// it recorded them; for containerd's clean-up after a shim that died.
pub fn recorded_cgroup(state_dir: &Path) -> Option<(PathBuf, String)> {
    let parent = std::fs::read_to_string(state_dir.join(CGROUP_RECORD)).ok()?;
    if !stays_in_hierarchy(&parent) {
        return None;
    }
    let cgroup = chitin::jail::Jail::new(JAIL_ID)
        .cgroup_parent(parent.clone())
        .cgroup_path()
        .ok()?;
    Some((cgroup, parent))
}

/// Remove the VMM's run directory in `state_dir` (its tmpfs detached
/// with whatever the VMM left in it) and the jail's directory, which the
/// jail's supervisor removes unless it was killed.
pub fn remove_run_dir(state_dir: &Path) {
    let run = state_dir.join(RUN_DIR);
    if let Err(e) = crate::mounts::unmount(&run) {
        log::warn!("unmounting {}: {e}", run.display());
    }
    let _ = std::fs::remove_dir(&run);
    let _ = std::fs::remove_file(state_dir.join(CGROUP_RECORD));
    let jails = state_dir.join(JAIL_DIR);
    let jail = jails.join(JAIL_ID);
    let _ = std::fs::remove_dir(jail.join("root"));
    let _ = std::fs::remove_dir(&jail);
    let _ = std::fs::remove_dir(&jails);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_round_trip() {
        let mut args = Args {
            state_dir: PathBuf::from("/run/chitin/shim/k8s.io/pod1"),
            cgroup_parent: "kubepods/besteffort/pod1/abc".into(),
            net: None,
        };
        assert_eq!(Args::parse(&args.to_args()).unwrap(), args);
        args.net = Some(Interface {
            mac: "02:00:00:00:00:01".parse().unwrap(),
            address: Ipv4Addr::new(10, 89, 0, 2),
            prefix: 16,
            gateway: Some(Ipv4Addr::new(10, 89, 0, 1)),
        });
        assert_eq!(Args::parse(&args.to_args()).unwrap(), args);
        args.net.as_mut().unwrap().gateway = None;
        assert_eq!(Args::parse(&args.to_args()).unwrap(), args);
        let bad = |v: &[&str]| {
            let v: Vec<OsString> = v.iter().map(OsString::from).collect();
            Args::parse(&v).unwrap_err()
        };
        assert!(bad(&["vmm", "--state"]).contains("needs"));
        assert!(bad(&["vmm", "--cgroup", "x"]).contains("--state"));
        assert!(bad(&["vmm", "--state", "/x", "--cgroup", "y", "--what"]).contains("unknown"));
        assert!(bad(&["other"]).contains("expected"));
        assert!(bad(&[
            "vmm",
            "--state",
            "/x",
            "--cgroup",
            "y",
            "--net",
            "zz",
            "1.2.3.4/8",
            "-"
        ])
        .contains("MAC"));
    }

    #[test]
    fn cgroup_parents_stay_in_the_hierarchy() {
        assert_eq!(
            cgroup_parent(Some("/default/c1"), "default", "c1").unwrap(),
            "default/c1"
        );
        assert_eq!(
            cgroup_parent(None, "k8s.io", "p1").unwrap(),
            "chitin/k8s.io/p1"
        );
        assert_eq!(
            cgroup_parent(Some("-.slice:cri:x"), "n", "x").unwrap(),
            "cri-x.scope"
        );
        assert_eq!(
            cgroup_parent(
                Some("kubepods-besteffort-pod12.slice:cri-containerd:abc"),
                "k8s.io",
                "abc"
            )
            .unwrap(),
            "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice/cri-containerd-abc.scope"
        );
        assert_eq!(
            cgroup_parent(Some(":runc:x"), "n", "x").unwrap(),
            "system.slice/runc-x.scope"
        );
        for bad in [
            "/a/../../b",
            "/a//b",
            "/./a",
            "/",
            "a:b:c",
            "a--b.slice:p:x",
            "-a.slice:p:x",
            "a-.slice:p:x",
            "a/b.slice:p:x",
            "a.slice:p:../x",
        ] {
            assert!(cgroup_parent(Some(bad), "n", "p").is_err(), "{bad}");
        }
    }

    #[test]
    fn reasons_and_stats_cross_the_pipe() {
        for r in [
            ExitReason::Reset,
            ExitReason::PowerOff,
            ExitReason::TripleFault,
            ExitReason::Crash,
            ExitReason::Stopped,
        ] {
            assert_eq!(decode_reason(encode_reason(&r)), r);
        }
        assert_eq!(
            decode_reason(encode_reason(&ExitReason::VcpuError { vcpu: 0, errno: 5 })),
            ExitReason::VmmGone
        );
        let nets = vec![
            NetStats {
                rx_frames: 1,
                rx_bytes: 2,
                tx_throttled: 10,
                ..Default::default()
            },
            NetStats::default(),
        ];
        assert_eq!(decode_stats(&encode_stats(&nets)).unwrap(), nets);
        assert_eq!(decode_stats("").unwrap(), Vec::new());
        assert!(decode_stats("1 2 3").is_none());
        assert!(decode_stats("a b c d e f g h i j").is_none());
    }

    #[test]
    fn the_vmms_share_of_the_log_is_bounded() {
        let mut budget = LogBudget::new();
        for i in 0..LOG_LINES + 50 {
            budget.log(log::Level::Trace, &i.to_string());
        }
        assert_eq!((budget.logged, budget.dropped), (LOG_LINES, 50));
        // A new window starts afresh.
        budget.window -= LOG_WINDOW;
        budget.log(log::Level::Trace, "again");
        assert_eq!((budget.logged, budget.dropped), (1, 0));
    }

    #[test]
    fn the_vsock_socket_is_opened_only_as_the_socket_itself() {
        let dir = std::env::temp_dir().join(format!("chitin-vmm-sock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("vsock.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let fd = open_socket(&socket).unwrap();
        // Reached through the handle: the socket it was.
        std::os::unix::net::UnixStream::connect(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&socket, &link).unwrap();
        assert!(open_socket(&link).is_err(), "a symlink is not followed");
        let file = dir.join("file");
        std::fs::write(&file, "x").unwrap();
        assert!(open_socket(&file).is_err(), "a file is not a socket");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_recorded_cgroup_is_read_back_only_if_it_stays_in_the_hierarchy() {
        let dir = std::env::temp_dir().join(format!("chitin-vmm-rec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(recorded_cgroup(&dir).is_none(), "nothing recorded");
        for bad in ["", "a/../../b", "/a", "a//b"] {
            std::fs::write(dir.join(CGROUP_RECORD), bad).unwrap();
            assert!(recorded_cgroup(&dir).is_none(), "{bad:?}");
        }
        std::fs::write(dir.join(CGROUP_RECORD), "default/c1").unwrap();
        if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            let (cgroup, parent) = recorded_cgroup(&dir).unwrap();
            assert!(cgroup.ends_with("default/c1/vmm"), "{}", cgroup.display());
            assert_eq!(parent, "default/c1");
        }
        remove_run_dir(&dir);
        assert!(!dir.join(CGROUP_RECORD).exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn long_lines_are_cut_and_skipped() {
        let mut text = vec![b'x'; MAX_LINE + 10];
        text.extend_from_slice(b"\nup -\n");
        let mut reader = BufReader::new(&text[..]);
        assert_eq!(read_line(&mut reader).unwrap().len(), MAX_LINE);
        assert_eq!(read_line(&mut reader).unwrap(), "up -");
        assert!(read_line(&mut reader).is_none());
    }
}
