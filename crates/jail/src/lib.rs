//! chitin-jail: confine a process that runs one sandbox, before it builds
//! the sandbox, the way Firecracker's jailer confines its VMM; for
//! embedders that run a sandbox per process (a containerd shim per pod, a
//! CLI, chitin's `boot` and `exec` examples).
//!
//! [`Jail::enter`] must be called while the process has one thread. It
//! forks: the calling process stays outside as the jail's supervisor and
//! never returns from `enter` once the jail is up (it waits, removes the
//! jail's cgroup and directory when the jail ends, and exits the way the
//! jailed process did); a child makes the namespaces, and its child, PID
//! 1 of a new PID namespace, is the jailed process: `enter` returns there,
//! in
//!
//! - new mount, PID, IPC, UTS and network namespaces (or the network
//!   namespace at a given path, as CNI hands them over), and optionally a
//!   user namespace;
//! - a fresh root holding only the resources the sandbox needs, each at
//!   the path the embedder knows it by, bind-mounted read-only unless it
//!   is writable, device nodes of its own, a fresh `/proc` and a private
//!   `/tmp`; the old root is detached (`pivot_root`);
//! - a cgroup v2 with `memory.max`, `cpu.max` and `pids.max`, which the
//!   jail sees read-only at `/sys/fs/cgroup`;
//! - `RLIMIT_NOFILE` and `RLIMIT_FSIZE`, no inherited fd above stderr
//!   but those kept on purpose, a cleared environment but for names kept,
//!   no capabilities (bounding and ambient sets emptied), `no_new_privs`,
//!   and the requested unprivileged uid and gid.
//!
//! Every step that fails is reported by `enter` in the calling process,
//! which is then as it was: the helpers are gone, and so are the cgroup
//! and directory. The PID namespace is why `enter` forks, and why a
//! process with threads is refused ([`JailError::Threads`]): the child of
//! a fork has only the forking thread, so the other threads' work (and any
//! lock they held) would silently vanish.
//!
//! This crate never starts a thread and never changes the process but
//! through the steps above.

mod cgroup;
mod root;
mod sys;

use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

pub use root::RootSwitch;

/// Where jails' root directories are made unless [`Jail::state_dir`]
/// says otherwise: `<state dir>/<id>/root`.
pub const DEFAULT_STATE_DIR: &str = "/run/chitin/jail";

/// The cgroup (below the cgroup v2 root) that holds every jail's cgroup
/// unless [`Jail::cgroup_parent`] says otherwise.
pub const DEFAULT_CGROUP_PARENT: &str = "chitin";

/// Where a jail with a cgroup sees its own cgroup (read-only): its limits
/// and its usage (`memory.current`, `pids.current`, `cpu.stat`).
pub const CGROUP_VIEW: &str = "/sys/fs/cgroup";

/// How long the jail's set-up may take before `enter` gives up on it.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Signals the supervisor passes on to the jailed process. The jailed
/// process is PID 1 of its namespace: the kernel delivers them only if it
/// installed a handler (SIGKILL always ends it).
pub const FORWARDED_SIGNALS: [libc::c_int; 4] =
    [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGQUIT];

/// cgroup v2 limits of a jail. `None` leaves a limit as the parent's.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupLimits {
    /// `memory.max`, bytes.
    pub memory_max: Option<u64>,
    /// `cpu.max`: (quota, period) in microseconds.
    pub cpu_max: Option<(u64, u64)>,
    /// `pids.max`.
    pub pids_max: Option<u64>,
}

/// How a resource is exposed in the jail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ResourceKind {
    ReadOnly,
    Writable,
    Device,
}

/// A host file, directory or device the jail exposes at `path`.
#[derive(Clone, Debug)]
struct Resource {
    /// Where the jail shows it: the path as the embedder gave it.
    path: PathBuf,
    /// What is mounted: the path with symlinks resolved.
    source: PathBuf,
    /// The source's device and inode when it was checked: what is bound
    /// must be the same file.
    identity: (u64, u64),
    kind: ResourceKind,
}

/// Why a process could not be jailed.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The jail's id names its cgroup and directory: 1 to 64 of
    /// `[A-Za-z0-9_.-]`, not starting with a dot.
    #[error("jail id {0:?} must be 1 to 64 of A-Z a-z 0-9 _ . - and not start with a dot")]
    InvalidId(String),
    /// Root ids are refused: the jail drops to an unprivileged uid and
    /// gid (in a user namespace, the host's ids of its root).
    #[error("{what} 0 is not allowed for a jail")]
    IdNotAllowed {
        /// `uid` or `gid`.
        what: &'static str,
    },
    /// [`Jail::root_keeping`] was given a capability number past 63.
    #[error("capability {0} does not exist")]
    InvalidCapability(u32),
    /// [`Jail::root_keeping`] and [`Jail::user_namespace`] together: a
    /// jail that stays root has no user namespace.
    #[error("a jail that stays root cannot have a user namespace")]
    RootInUserNamespace,
    /// A resource path is relative or holds `..`.
    #[error("jail path {0} must be absolute without ..")]
    InvalidPath(PathBuf),
    /// A resource does not exist.
    #[error("jail resource {path} is missing")]
    PathMissing {
        /// The path given.
        path: PathBuf,
        /// Why it could not be resolved.
        #[source]
        source: io::Error,
    },
    /// Two resources overlap: one would be mounted inside the other.
    #[error("jail resources {0} and {1} overlap")]
    Overlap(PathBuf, PathBuf),
    /// The process has threads: the jail's fork would drop them.
    #[error("the process has {0} threads; a jail must be entered before any thread starts")]
    Threads(usize),
    /// Limits were asked for but no cgroup v2 hierarchy is mounted.
    #[error("no cgroup v2 hierarchy is mounted (cgroup limits need one)")]
    NoCgroupV2,
    /// A limit's controller is not available at the cgroup v2 root.
    #[error("the cgroup v2 root {} has no {controller} controller", .root.display())]
    ControllerMissing {
        /// `memory`, `cpu` or `pids`.
        controller: &'static str,
        /// The cgroup v2 root.
        root: PathBuf,
    },
    /// A jail with this id exists (its cgroup or directory is there).
    #[error("a jail with this id exists: {}", .0.display())]
    Busy(PathBuf),
    /// The jailed ids cannot use a resource as the jail exposes it.
    #[error("uid {uid} gid {gid} cannot {access} {}", .path.display())]
    NoAccess {
        /// The resource.
        path: PathBuf,
        /// `read`, `write` or `open`.
        access: &'static str,
        /// The jailed uid.
        uid: u32,
        /// The jailed gid.
        gid: u32,
    },
    /// A set-up step failed.
    #[error("jail set-up: cannot {step}{}", .path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Step {
        /// What was being done.
        step: &'static str,
        /// The path it was done to, if any.
        path: Option<PathBuf>,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The set-up did not finish within [`SETUP_TIMEOUT`].
    #[error("the jail's set-up did not finish within {0:?}")]
    Timeout(Duration),
    /// A set-up helper ended without saying how the set-up went.
    #[error("the jail's set-up ended without a report ({0})")]
    Lost(String),
}

/// A failure inside the jail's helpers, as it crosses the report pipe.
#[derive(Debug)]
pub(crate) enum Fail {
    Step {
        step: String,
        path: Option<PathBuf>,
        errno: i32,
    },
    NoAccess {
        path: PathBuf,
        access: String,
    },
}

impl Fail {
    pub(crate) fn step(step: &'static str, path: Option<&Path>, source: io::Error) -> Fail {
        Fail::Step {
            step: step.to_string(),
            path: path.map(Path::to_path_buf),
            errno: source.raw_os_error().unwrap_or(libc::EIO),
        }
    }

    /// One line: `step\t<errno>\t<step>\t<path>` or `access\t<what>\t<path>`.
    fn encode(&self) -> String {
        let text = |p: &Option<PathBuf>| {
            p.as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        };
        match self {
            Fail::Step { step, path, errno } => format!("step\t{errno}\t{step}\t{}\n", text(path)),
            Fail::NoAccess { path, access } => format!("access\t{access}\t{}\n", path.display()),
        }
    }

    fn decode(line: &str) -> Option<Fail> {
        let mut parts = line.trim_end_matches('\n').split('\t');
        match parts.next()? {
            "step" => {
                let errno = parts.next()?.parse().ok()?;
                let step = parts.next()?.to_string();
                let path = parts.next().filter(|p| !p.is_empty()).map(PathBuf::from);
                Some(Fail::Step { step, path, errno })
            }
            "access" => {
                let access = parts.next()?.to_string();
                let path = PathBuf::from(parts.next()?);
                Some(Fail::NoAccess { path, access })
            }
            _ => None,
        }
    }

    fn into_error(self, uid: u32, gid: u32) -> JailError {
        match self {
            Fail::Step { step, path, errno } => JailError::Step {
                step: known_step(&step),
                path,
                source: io::Error::from_raw_os_error(errno),
            },
            Fail::NoAccess { path, access } => JailError::NoAccess {
                path,
                access: match access.as_str() {
                    "read" => "read",
                    "write" => "write",
                    _ => "open",
                },
                uid,
                gid,
            },
        }
    }
}

/// The static name of a step a helper reported (steps are this crate's
/// own strings; anything else is named as unknown).
fn known_step(step: &str) -> &'static str {
    const STEPS: &[&str] = &[
        "make / a slave mount",
        "mount the root tmpfs",
        "make /proc",
        "mount /proc",
        "make /tmp",
        "mount /tmp",
        "make the root read-only",
        "make a mount point's parent",
        "look at",
        "make a device node",
        "give a device node to the jailed ids",
        "make a mount point",
        "bind-mount",
        "look at the mount of",
        "restrict the bind mount",
        "change into the new root",
        "detach the old root",
        "change to /",
        "move the new root over /",
        "chroot into the new root",
        "pivot_root into the new root",
        "die with the supervisor",
        "join the network namespace",
        "make a user namespace",
        "make the namespaces",
        "start the jailed process",
        "set the hostname",
        "set RLIMIT_NOFILE",
        "set RLIMIT_FSIZE",
        "drop the capability bounding and ambient sets",
        "set no_new_privs",
        "install the seccomp filter",
        "drop to the jailed ids",
        "clear the capabilities",
        "close inherited fds",
        "become the user namespace's root",
        "leave the caller's session",
        "join a new session keyring",
        "open",
        "wait for the id maps",
        "write the id maps",
    ];
    STEPS
        .iter()
        .find(|s| **s == step)
        .copied()
        .unwrap_or("do an unknown step")
}

/// What the jailed process gets back from [`Jail::enter`].
#[derive(Debug)]
pub struct Jailed {
    id: String,
    uid: u32,
    gid: u32,
    switch: RootSwitch,
    cgroup: Option<PathBuf>,
}

impl Jailed {
    /// The jail's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The uid and gid the process runs as.
    pub fn ids(&self) -> (u32, u32) {
        (self.uid, self.gid)
    }

    /// How the process left its old root.
    pub fn root_switch(&self) -> RootSwitch {
        self.switch
    }

    /// The jail's cgroup, as the host sees it (not reachable from inside).
    pub fn cgroup(&self) -> Option<&Path> {
        self.cgroup.as_deref()
    }
}

/// A jail's configuration; [`Jail::enter`] applies it to the calling
/// process.
///
/// ```no_run
/// use chitin_jail::{CgroupLimits, Jail};
///
/// let jailed = Jail::new("sandbox-1")
///     .ids(1000, 1000)
///     .read_only("/var/lib/chitin/vmlinux")
///     .read_only("/var/lib/chitin/initramfs.cpio")
///     .writable("/run/sandbox-1")
///     .device("/dev/kvm")
///     .cgroup(CgroupLimits {
///         memory_max: Some(512 << 20),
///         cpu_max: Some((100_000, 100_000)),
///         pids_max: Some(64),
///     })
///     .enter()?;
/// // Only here (the jailed process): build and run the sandbox.
/// # Ok::<(), chitin_jail::JailError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Jail {
    id: String,
    uid: u32,
    gid: u32,
    user_ns: bool,
    paths: Vec<(PathBuf, ResourceKind)>,
    netns: Option<PathBuf>,
    hostname: Option<String>,
    cgroup: Option<CgroupLimits>,
    cgroup_parent: String,
    state_dir: PathBuf,
    nofile: Option<u64>,
    fsize: Option<u64>,
    keep_fds: Vec<RawFd>,
    keep_env: Vec<OsString>,
    /// [`Jail::root_keeping`]'s capabilities, as a mask.
    root_caps: Option<u64>,
    bad_cap: Option<u32>,
}

impl Jail {
    /// A jail named `id` (its cgroup and directory are named after it),
    /// with `/dev/urandom` and nothing else yet; uid and gid 65534
    /// (`nobody`) until [`Jail::ids`] says otherwise.
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            uid: 65534,
            gid: 65534,
            user_ns: false,
            paths: vec![(PathBuf::from("/dev/urandom"), ResourceKind::Device)],
            netns: None,
            hostname: None,
            cgroup: None,
            cgroup_parent: DEFAULT_CGROUP_PARENT.to_string(),
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            nofile: None,
            fsize: None,
            keep_fds: Vec::new(),
            keep_env: Vec::new(),
            root_caps: None,
            bad_cap: None,
        }
    }

    /// The uid and gid the jailed process runs as (not 0; with a user
    /// namespace, the host's ids of the namespace's root).
    pub fn ids(mut self, uid: u32, gid: u32) -> Self {
        self.uid = uid;
        self.gid = gid;
        self
    }

    /// Run in a new user namespace whose root (and only id) is the host's
    /// `uid`/`gid` set with [`Jail::ids`]: the jailed process is uid 0,
    /// without capabilities, in its namespaces and that unprivileged user
    /// to the host. Devices are then bind-mounted (a user namespace may
    /// not make nodes), so the host's permissions on them must let that
    /// uid in.
    pub fn user_namespace(mut self, on: bool) -> Self {
        self.user_ns = on;
        self
    }

    /// Stay root (uid and gid 0, no supplementary groups; [`Jail::ids`]
    /// no longer applies) with only `capabilities` (numbers from
    /// `linux/capability.h`: 0 is `CAP_CHOWN`) left in the bounding,
    /// permitted and effective sets, for a process that must act as many
    /// host users: a VMM serving container roots through chitin-fs, which
    /// switches to each guest user's ids per request. Everything else
    /// applies as in an unprivileged jail, and its `/proc` holds only
    /// processes (`subset=pid`): root in the jail cannot reach the
    /// kernel's settings (`/proc/sys`, `/proc/sysrq-trigger`) there, and
    /// a seccomp filter on the whole process refuses `open_by_handle_at`
    /// (which `CAP_DAC_READ_SEARCH` would open to any file of a file
    /// system the jail has a mount of), the key syscalls (root's user
    /// keyring is uid 0's), `ptrace`, `process_vm_readv`/`writev` and
    /// other ABIs' syscalls. Only where an unprivileged uid cannot do the
    /// work.
    pub fn root_keeping(mut self, capabilities: &[u32]) -> Self {
        let mut mask = 0u64;
        for &cap in capabilities {
            match 1u64.checked_shl(cap) {
                Some(bit) => mask |= bit,
                None => self.bad_cap = Some(cap),
            }
        }
        self.root_caps = Some(mask);
        self.uid = 0;
        self.gid = 0;
        self
    }

    /// Expose a file or directory read-only at the same path.
    pub fn read_only(mut self, path: impl Into<PathBuf>) -> Self {
        self.paths.push((path.into(), ResourceKind::ReadOnly));
        self
    }

    /// Expose a file or directory writable at the same path (a disk
    /// image, a share, the directory of vsock sockets).
    pub fn writable(mut self, path: impl Into<PathBuf>) -> Self {
        self.paths.push((path.into(), ResourceKind::Writable));
        self
    }

    /// Expose a character device at the same path (`/dev/kvm`,
    /// `/dev/net/tun`), owned by the jailed ids.
    pub fn device(mut self, path: impl Into<PathBuf>) -> Self {
        self.paths.push((path.into(), ResourceKind::Device));
        self
    }

    /// Join the network namespace at `path` (`/var/run/netns/<name>`, as
    /// CNI hands it over) instead of a new, empty one.
    pub fn netns(mut self, path: impl Into<PathBuf>) -> Self {
        self.netns = Some(path.into());
        self
    }

    /// The hostname in the jail's UTS namespace (default: its id).
    pub fn hostname(mut self, name: impl Into<String>) -> Self {
        self.hostname = Some(name.into());
        self
    }

    /// A cgroup v2 for the jail with these limits.
    pub fn cgroup(mut self, limits: CgroupLimits) -> Self {
        self.cgroup = Some(limits);
        self
    }

    /// Where below the cgroup v2 root jails' cgroups are made (default
    /// [`DEFAULT_CGROUP_PARENT`]).
    pub fn cgroup_parent(mut self, parent: impl Into<String>) -> Self {
        self.cgroup_parent = parent.into();
        self
    }

    /// Where the jail's root directory is made (default
    /// [`DEFAULT_STATE_DIR`]).
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = dir.into();
        self
    }

    /// `RLIMIT_NOFILE` (soft and hard) in the jail.
    pub fn max_open_files(mut self, n: u64) -> Self {
        self.nofile = Some(n);
        self
    }

    /// `RLIMIT_FSIZE` (soft and hard): the largest file the jail may
    /// write, bytes.
    pub fn max_file_size(mut self, bytes: u64) -> Self {
        self.fsize = Some(bytes);
        self
    }

    /// Keep this fd open in the jail (a tap handed over, a socket);
    /// every other fd above stderr is closed.
    pub fn keep_fd(mut self, fd: RawFd) -> Self {
        self.keep_fds.push(fd);
        self
    }

    /// Keep this environment variable; every other one is removed.
    pub fn keep_env(mut self, name: impl Into<OsString>) -> Self {
        self.keep_env.push(name.into());
        self
    }

    /// Where the jail's cgroup is made on the host:
    /// `<cgroup v2 root>/<parent>/<id>` (see [`Jail::cgroup_parent`]),
    /// for a caller that watches or cleans up after a jail it did not
    /// enter itself, without trusting anything the jail says.
    pub fn cgroup_path(&self) -> Result<PathBuf, JailError> {
        let mut path = cgroup::v2_root()?;
        path.extend(self.cgroup_parent.split('/').filter(|p| !p.is_empty()));
        path.push(&self.id);
        Ok(path)
    }

    /// The jail's directory: `<state dir>/<id>`, whose `root` the jail's
    /// root tmpfs is mounted on.
    pub fn dir(&self) -> PathBuf {
        self.state_dir.join(&self.id)
    }

    /// Everything that can be checked before anything is changed.
    fn check(&self) -> Result<Vec<Resource>, JailError> {
        let id_ok = !self.id.is_empty()
            && self.id.len() <= 64
            && !self.id.starts_with('.')
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !id_ok {
            return Err(JailError::InvalidId(self.id.clone()));
        }
        if let Some(cap) = self.bad_cap {
            return Err(JailError::InvalidCapability(cap));
        }
        if self.root_caps.is_some() {
            if self.user_ns {
                return Err(JailError::RootInUserNamespace);
            }
        } else {
            // In a user namespace these are the host's ids of its root.
            if self.uid == 0 {
                return Err(JailError::IdNotAllowed { what: "uid" });
            }
            if self.gid == 0 {
                return Err(JailError::IdNotAllowed { what: "gid" });
            }
        }
        let mut resources: Vec<Resource> = Vec::new();
        for (path, kind) in &self.paths {
            let clean = path.is_absolute()
                && !path
                    .components()
                    .any(|c| matches!(c, Component::ParentDir | Component::CurDir));
            if !clean || path == Path::new("/") {
                return Err(JailError::InvalidPath(path.clone()));
            }
            // The report channel is line- and tab-separated.
            if path
                .as_os_str()
                .as_bytes()
                .iter()
                .any(|b| *b == b'\t' || *b == b'\n')
            {
                return Err(JailError::InvalidPath(path.clone()));
            }
            let missing = |source| JailError::PathMissing {
                path: path.clone(),
                source,
            };
            let source = std::fs::canonicalize(path).map_err(missing)?;
            let meta = std::fs::metadata(&source).map_err(missing)?;
            if resources.iter().any(|r| r.path == *path) {
                continue;
            }
            resources.push(Resource {
                path: path.clone(),
                source,
                identity: (meta.dev(), meta.ino()),
                kind: *kind,
            });
        }
        for (i, a) in resources.iter().enumerate() {
            for b in &resources[i + 1..] {
                if a.path.starts_with(&b.path) || b.path.starts_with(&a.path) {
                    return Err(JailError::Overlap(a.path.clone(), b.path.clone()));
                }
            }
            // The jail's own mounts: nothing over or inside `/proc` and
            // the cgroup view; inside its `/tmp` is fine (the mount point
            // is made in the jail's tmpfs), over it is not.
            for reserved in ["/proc", "/tmp", CGROUP_VIEW] {
                let reserved = Path::new(reserved);
                let inside_ok = reserved == Path::new("/tmp");
                if (a.path.starts_with(reserved) && !(inside_ok && a.path != reserved))
                    || reserved.starts_with(&a.path)
                {
                    return Err(JailError::Overlap(a.path.clone(), reserved.to_path_buf()));
                }
            }
        }
        if let Some(netns) = &self.netns {
            std::fs::metadata(netns).map_err(|source| JailError::PathMissing {
                path: netns.clone(),
                source,
            })?;
        }
        Ok(resources)
    }

    /// Confine the calling process as configured. Returns in the jailed
    /// process once it is confined; the calling process becomes the
    /// jail's supervisor and never returns (it exits the way the jailed
    /// process does, after removing the jail's cgroup and directory).
    /// On any error, returns in the calling process, which is unchanged.
    pub fn enter(self) -> Result<Jailed, JailError> {
        let resources = self.check()?;
        let threads = sys::thread_count().map_err(|source| JailError::Step {
            step: "count the process's threads",
            path: None,
            source,
        })?;
        if threads != 1 {
            return Err(JailError::Threads(threads));
        }
        let cgroup = match &self.cgroup {
            Some(limits) => {
                let root = cgroup::v2_root()?;
                Some(cgroup::Cgroup::create(
                    &root,
                    &self.cgroup_parent,
                    &self.id,
                    limits,
                )?)
            }
            None => None,
        };
        let dir = self.dir();
        let made = std::fs::create_dir_all(&self.state_dir)
            .and_then(|()| std::fs::create_dir(&dir))
            .and_then(|()| {
                std::fs::create_dir(dir.join("root")).inspect_err(|_| {
                    // Ours, made a moment ago: not left behind.
                    let _ = std::fs::remove_dir(&dir);
                })
            });
        if let Err(source) = made {
            if let Some(cgroup) = &cgroup {
                cgroup.remove();
            }
            return Err(match source.kind() {
                io::ErrorKind::AlreadyExists => JailError::Busy(dir),
                _ => JailError::Step {
                    step: "make the jail's directory",
                    path: Some(dir),
                    source,
                },
            });
        }
        let mut resources = resources;
        if let Some(cgroup) = &cgroup {
            // The jail's own cgroup, read-only: its limits and usage.
            let identity = std::fs::metadata(cgroup.path())
                .map(|m| (m.dev(), m.ino()))
                .unwrap_or_default();
            resources.push(Resource {
                path: PathBuf::from(CGROUP_VIEW),
                source: cgroup.path().to_path_buf(),
                identity,
                kind: ResourceKind::ReadOnly,
            });
        }
        let result = self.start(&resources, cgroup.as_ref(), &dir);
        // Only the supervisor gets here with an error (the jailed process
        // returns from `start` with Ok): clean up and report.
        if result.is_err() {
            cleanup(cgroup.as_ref(), &dir);
        }
        result
    }

    /// Fork the helper, move it into the cgroup, let it set up, and
    /// either supervise (success; never returns here) or report why not.
    fn start(
        &self,
        resources: &[Resource],
        cgroup: Option<&cgroup::Cgroup>,
        dir: &Path,
    ) -> Result<Jailed, JailError> {
        let (ours, theirs) = sys::socketpair().map_err(|source| JailError::Step {
            step: "make the report channel",
            path: None,
            source,
        })?;
        let mut forwarded = FORWARDED_SIGNALS.to_vec();
        forwarded.push(libc::SIGCHLD);
        let old_mask = sys::block_signals(&forwarded).map_err(|source| JailError::Step {
            step: "block signals",
            path: None,
            source,
        })?;
        let old_sigchld = sys::default_sigchld();
        // SAFETY: the process has one thread (checked above).
        let helper = match unsafe { sys::fork() } {
            Ok(pid) => pid,
            Err(source) => {
                sys::restore_sigchld(&old_sigchld);
                sys::restore_signals(&old_mask);
                return Err(JailError::Step {
                    step: "fork the jail's helper",
                    path: None,
                    source,
                });
            }
        };
        if helper == 0 {
            drop(ours);
            // The helper and the jailed process: `helper` returns only in
            // the jailed process.
            return Ok(self.helper(resources, dir, cgroup, Channel::new(theirs), &old_mask));
        }
        drop(theirs);
        let mut channel = Channel::new(ours);
        let failed = |line: String| {
            Fail::decode(&line)
                .map(|f| f.into_error(self.uid, self.gid))
                .unwrap_or_else(|| JailError::Lost(format!("unexpected report {line:?}")))
        };
        let setup = (|| {
            if let Some(cgroup) = cgroup {
                cgroup.add(helper)?;
            }
            if self.user_ns {
                let line = channel.line(SETUP_TIMEOUT)?;
                if line != "maps\n" {
                    return Err(failed(line));
                }
                write_id_maps(helper, self.uid, self.gid).map_err(|source| JailError::Step {
                    step: "write the id maps",
                    path: None,
                    source,
                })?;
            }
            // A helper that already failed has said so; its line follows.
            let _ = channel.send("go\n");
            let line = channel.line(SETUP_TIMEOUT)?;
            if line == "ok\n" {
                // The jailed process waits for this before it runs; if it
                // died meanwhile, supervising reports how.
                let _ = channel.send("run\n");
                return Ok(());
            }
            Err(failed(line))
        })();
        match setup {
            Ok(()) => {
                drop(channel);
                supervise(helper, cgroup, dir)
            }
            Err(e) => {
                sys::kill(helper, libc::SIGKILL);
                let _ = sys::wait(helper);
                sys::restore_sigchld(&old_sigchld);
                sys::restore_signals(&old_mask);
                Err(e)
            }
        }
    }

    /// The helper's part: namespaces, then the jailed process. Returns
    /// only in the jailed process, confined; everything else exits.
    fn helper(
        &self,
        resources: &[Resource],
        dir: &Path,
        cgroup: Option<&cgroup::Cgroup>,
        mut up: Channel,
        old_mask: &libc::sigset_t,
    ) -> Jailed {
        let fail = |up: &mut Channel, f: Fail| -> ! {
            let _ = up.send(&f.encode());
            sys::exit_now(1)
        };
        let run = |step: &'static str, r: io::Result<()>| r.map_err(|e| Fail::step(step, None, e));
        if let Err(f) = run("die with the supervisor", sys::die_with_parent()) {
            fail(&mut up, f);
        }
        if let Some(netns) = &self.netns {
            if let Err(e) = sys::setns(netns, libc::CLONE_NEWNET) {
                fail(
                    &mut up,
                    Fail::step("join the network namespace", Some(netns), e),
                );
            }
        }
        if self.user_ns {
            if let Err(f) = run("make a user namespace", sys::unshare(libc::CLONE_NEWUSER)) {
                fail(&mut up, f);
            }
            let _ = up.send("maps\n");
        }
        // Wait for the supervisor: in the cgroup, id maps written.
        match up.line(SETUP_TIMEOUT) {
            Ok(line) if line == "go\n" => {}
            _ => fail(
                &mut up,
                Fail::step("wait for the id maps", None, io::ErrorKind::TimedOut.into()),
            ),
        }
        if self.user_ns {
            // Become the namespace's root (the host's jailed ids): the
            // host's root is not mapped in it, and files it made there
            // would have no owner.
            if let Err(f) = run(
                "become the user namespace's root",
                sys::set_ids(0, 0, false),
            ) {
                fail(&mut up, f);
            }
        }
        let mut flags =
            libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        if self.netns.is_none() {
            flags |= libc::CLONE_NEWNET;
        }
        if let Err(f) = run("make the namespaces", sys::unshare(flags)) {
            fail(&mut up, f);
        }
        // SAFETY: this process has one thread (a fork of one).
        let jailed = match unsafe { sys::fork() } {
            Ok(pid) => pid,
            Err(e) => fail(&mut up, Fail::step("start the jailed process", None, e)),
        };
        if jailed != 0 {
            // The helper: nothing more to say; pass signals on and end
            // the way the jailed process ends.
            drop(up);
            let status = forward_until_exit(jailed);
            sys::exit_like(status);
        }
        match self.confine(resources, dir, up.fd()) {
            Ok(switch) => {
                // Run only once the supervisor took the report: one that
                // gave up meanwhile has cleaned up and returned an error.
                let acked = up.send("ok\n").is_ok()
                    && matches!(up.line(SETUP_TIMEOUT).as_deref(), Ok("run\n"));
                if !acked {
                    sys::exit_now(1);
                }
                drop(up);
                sys::restore_signals(old_mask);
                Jailed {
                    id: self.id.clone(),
                    uid: self.uid,
                    gid: self.gid,
                    switch,
                    cgroup: cgroup.map(|c| c.path().to_path_buf()),
                }
            }
            Err(f) => fail(&mut up, f),
        }
    }

    /// The jailed process's own steps, in order.
    fn confine(
        &self,
        resources: &[Resource],
        dir: &Path,
        report_fd: RawFd,
    ) -> Result<RootSwitch, Fail> {
        let run = |step: &'static str, r: io::Result<()>| r.map_err(|e| Fail::step(step, None, e));
        run("die with the supervisor", sys::die_with_parent())?;
        // No controlling terminal: nothing in the jail can push input into
        // the caller's terminal.
        run("leave the caller's session", sys::setsid())?;
        let new_root = dir.join("root");
        root::build(
            &new_root,
            resources,
            (self.uid, self.gid),
            self.user_ns,
            self.root_caps.is_some(),
        )?;
        let switch = root::enter(&new_root)?;
        run(
            "set the hostname",
            sys::sethostname(self.hostname.as_deref().unwrap_or(&self.id)),
        )?;
        if let Some(n) = self.nofile {
            run("set RLIMIT_NOFILE", sys::setrlimit(libc::RLIMIT_NOFILE, n))?;
        }
        if let Some(n) = self.fsize {
            run("set RLIMIT_FSIZE", sys::setrlimit(libc::RLIMIT_FSIZE, n))?;
        }
        clear_env(&self.keep_env);
        run(
            "drop the capability bounding and ambient sets",
            sys::drop_bounding_and_ambient(self.root_caps.unwrap_or(0)),
        )?;
        run("set no_new_privs", sys::no_new_privs())?;
        // The caller's keys (credentials of its session) stay outside.
        run("join a new session keyring", sys::new_session_keyring())?;
        if self.root_caps.is_some() {
            // With CAP_DAC_READ_SEARCH, open_by_handle_at opens any file
            // of a file system the jail has a mount of, past its root;
            // as uid 0, keyctl reaches root's user keyring.
            run("install the seccomp filter", sys::refuse_root_escapes())?;
        }
        // In a user namespace the jailed ids are its root, mapped to the
        // host's ids; setgroups is denied there.
        let ids = if self.user_ns {
            sys::set_ids(0, 0, false)
        } else {
            sys::set_ids(self.uid, self.gid, true)
        };
        run("drop to the jailed ids", ids)?;
        run(
            "clear the capabilities",
            sys::set_capabilities(self.root_caps.unwrap_or(0)),
        )?;
        // A change of ids clears the parent-death signal.
        run("die with the supervisor", sys::die_with_parent())?;
        for resource in resources {
            let (mode, access) = match resource.kind {
                ResourceKind::ReadOnly => (libc::R_OK, "read"),
                ResourceKind::Writable => (libc::R_OK | libc::W_OK, "write"),
                ResourceKind::Device => (libc::R_OK | libc::W_OK, "open"),
            };
            if sys::access(&resource.path, mode).is_err() {
                return Err(Fail::NoAccess {
                    path: resource.path.clone(),
                    access: access.to_string(),
                });
            }
        }
        let mut keep = self.keep_fds.clone();
        keep.push(report_fd);
        run("close inherited fds", sys::close_fds_except(&keep))?;
        Ok(switch)
    }
}

/// Remove every environment variable but `keep`.
fn clear_env(keep: &[OsString]) {
    for (name, _) in std::env::vars_os() {
        if !keep.contains(&name) {
            // The process has one thread: nothing reads the environment
            // meanwhile.
            std::env::remove_var(&name);
        }
    }
}

/// `/proc/<pid>/uid_map` and `gid_map`: the host's `uid`/`gid` as root
/// in the helper's new user namespace, and `setgroups` denied there.
fn write_id_maps(pid: libc::pid_t, uid: u32, gid: u32) -> io::Result<()> {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    std::fs::write(proc.join("uid_map"), format!("0 {uid} 1\n"))?;
    std::fs::write(proc.join("setgroups"), "deny\n")?;
    std::fs::write(proc.join("gid_map"), format!("0 {gid} 1\n"))
}

/// Pass the forwarded signals on to `child` until it ends; its wait
/// status. The signals and SIGCHLD are blocked by the caller.
fn forward_until_exit(child: libc::pid_t) -> libc::c_int {
    let mut waited = FORWARDED_SIGNALS.to_vec();
    waited.push(libc::SIGCHLD);
    loop {
        match sys::try_wait(child) {
            Ok(Some(status)) => return status,
            Ok(None) => {}
            // Not our child any more (cannot happen): treat as failed.
            Err(_) => return 1 << 8,
        }
        match sys::wait_signal(&waited) {
            Ok(libc::SIGCHLD) | Err(_) => {}
            Ok(sig) => sys::kill(child, sig),
        }
    }
}

/// The supervisor's life once the jail is up: wait for it, clean up, end
/// the same way.
fn supervise(helper: libc::pid_t, cgroup: Option<&cgroup::Cgroup>, dir: &Path) -> ! {
    let status = forward_until_exit(helper);
    cleanup(cgroup, dir);
    sys::exit_like(status)
}

/// Remove what the jail left on the host: its cgroup and its directory
/// (the mounts were in its own mount namespace and went with it).
fn cleanup(cgroup: Option<&cgroup::Cgroup>, dir: &Path) {
    if let Some(cgroup) = cgroup {
        cgroup.remove();
    }
    let _ = std::fs::remove_dir(dir.join("root"));
    let _ = std::fs::remove_dir(dir);
}

/// The supervisor's and the helpers' line channel (a socket pair):
/// each line read within a deadline, sends that never raise SIGPIPE.
struct Channel {
    file: std::fs::File,
    buf: Vec<u8>,
}

impl Channel {
    fn new(fd: OwnedFd) -> Self {
        Self {
            file: std::fs::File::from(fd),
            buf: Vec::new(),
        }
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn send(&mut self, line: &str) -> io::Result<()> {
        sys::send_all(self.fd(), line.as_bytes())
    }

    /// The next line, or why there is none.
    fn line(&mut self, timeout: Duration) -> Result<String, JailError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(end) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=end).collect();
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(JailError::Timeout(timeout));
            }
            let mut pfd = libc::pollfd {
                fd: self.file.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = libc::c_int::try_from(left.as_millis())
                .unwrap_or(libc::c_int::MAX)
                .max(1);
            // SAFETY: one valid pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(JailError::Lost(e.to_string()));
            }
            if n == 0 {
                continue;
            }
            // A report line is a step, an errno and a path.
            if self.buf.len() > 64 << 10 {
                return Err(JailError::Lost("a report line over 64 KiB".into()));
            }
            let mut chunk = [0u8; 512];
            match self.file.read(&mut chunk) {
                Ok(0) => return Err(JailError::Lost("the helper closed its report pipe".into())),
                Ok(k) => self.buf.extend_from_slice(&chunk[..k]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(JailError::Lost(e.to_string())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_cross_the_pipe_intact() {
        let fail = Fail::step(
            "bind-mount",
            Some(Path::new("/dev/kvm")),
            io::Error::from_raw_os_error(libc::EPERM),
        );
        let back = Fail::decode(&fail.encode()).unwrap();
        let err = back.into_error(1000, 1000);
        assert!(matches!(
            &err,
            JailError::Step { step: "bind-mount", path: Some(p), source }
                if p == Path::new("/dev/kvm") && source.raw_os_error() == Some(libc::EPERM)
        ));
        assert_eq!(err.to_string(), "jail set-up: cannot bind-mount /dev/kvm");
    }

    #[test]
    fn no_access_crosses_the_pipe_with_the_ids() {
        let fail = Fail::NoAccess {
            path: PathBuf::from("/srv/disk.img"),
            access: "write".into(),
        };
        let err = Fail::decode(&fail.encode()).unwrap().into_error(1000, 100);
        assert_eq!(
            err.to_string(),
            "uid 1000 gid 100 cannot write /srv/disk.img"
        );
    }

    #[test]
    fn garbage_reports_are_not_decoded() {
        assert!(Fail::decode("nonsense\n").is_none());
        assert!(Fail::decode("step\tx\tbind-mount\t\n").is_none());
    }

    #[test]
    fn bad_ids_and_paths_are_refused_before_anything_changes() {
        let err = |jail: Jail| jail.check().err().unwrap().to_string();
        assert!(err(Jail::new("a/b")).contains("jail id"));
        assert!(err(Jail::new(".x")).contains("jail id"));
        assert!(err(Jail::new("x").ids(0, 1)).contains("uid 0"));
        assert!(err(Jail::new("x").ids(1, 0)).contains("gid 0"));
        assert!(err(Jail::new("x").ids(1, 1).read_only("relative")).contains("absolute"));
        assert!(err(Jail::new("x").ids(1, 1).read_only("/a/../b")).contains("absolute"));
        assert!(err(Jail::new("x").ids(1, 1).read_only("/no/such/file")).contains("missing"));
        assert!(err(Jail::new("x")
            .ids(1, 1)
            .read_only("/etc")
            .read_only("/etc/hostname"))
        .contains("overlap"));
        assert!(err(Jail::new("x").ids(1, 1).read_only("/proc/self")).contains("overlap"));
        // Not even as the host's ids of a user namespace's root.
        assert!(err(Jail::new("x").ids(0, 0).user_namespace(true)).contains("uid 0"));
        assert!(err(Jail::new("x").ids(1, 1).read_only("/tmp/a\tb")).contains("absolute"));
    }

    #[test]
    fn a_jail_that_stays_root_keeps_only_known_capabilities() {
        let err = |jail: Jail| jail.check().err().unwrap().to_string();
        // CAP_CHOWN and CAP_DAC_OVERRIDE: root ids are taken.
        let root = Jail::new("x").root_keeping(&[0, 1]);
        assert!(root.check().is_ok());
        assert_eq!(root.root_caps, Some(0b11));
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(err(Jail::new("x").root_keeping(&[0, 64])).contains("capability 64"));
        assert!(
            err(Jail::new("x").root_keeping(&[]).user_namespace(true)).contains("user namespace")
        );
    }

    #[test]
    fn every_step_the_helpers_report_has_a_static_name() {
        // Every step literal the helpers can report (`step("..")`,
        // `run("..")`, `Fail::step("..")`, also split over lines) crosses
        // the pipe by name.
        let sources = [include_str!("lib.rs"), include_str!("root.rs")];
        let mut seen = 0;
        for source in sources {
            let code = &source[..source.find("#[cfg(test)]").unwrap_or(source.len())];
            for call in ["step(", "run("] {
                for (at, _) in code.match_indices(call) {
                    let rest = code[at + call.len()..].trim_start();
                    let Some(literal) = rest.strip_prefix('"') else {
                        continue;
                    };
                    let name = &literal[..literal.find('"').unwrap()];
                    assert_eq!(known_step(name), name, "{name:?} is not in STEPS");
                    seen += 1;
                }
            }
        }
        assert!(seen > 30, "found only {seen} steps");
        assert_eq!(known_step("something else"), "do an unknown step");
    }
}
