//! What to run in the guest: [`Command`] and where its standard streams go
//! ([`Stdio`]), shaped like `std::process::{Command, Stdio}`.

use std::ffi::OsString;
use std::fmt;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chitin_agent_protocol::{
    Attributes, ExecRequest, MountKind, MountRequest, Rlimit, WindowSize, MAX_GROUPS, MAX_MOUNTS,
    MAX_RLIMITS, MOUNT_NODEV, MOUNT_NOEXEC, MOUNT_NOSUID, MOUNT_READ_ONLY,
};

pub use chitin_agent_protocol::Capabilities;

/// The environment a [`Command`] starts with.
const DEFAULT_PATH: &str = "/bin:/sbin:/usr/bin:/usr/sbin";
/// How much of each of stdout and stderr `output` collects by default.
pub const DEFAULT_OUTPUT_LIMIT: usize = 32 << 20;

/// Where one standard stream of a guest process goes, like
/// `std::process::Stdio`.
///
/// | value                | stdin                         | stdout / stderr                        |
/// |----------------------|-------------------------------|----------------------------------------|
/// | [`Stdio::piped`]     | `Child::stdin` writes it      | `Child::stdout`/`stderr` read it; `output` collects it |
/// | [`Stdio::null`]      | `/dev/null`                   | thrown away as it comes                |
/// | [`Stdio::bytes`]     | these bytes, then EOF         | (not allowed)                          |
/// | [`Stdio::writer`]    | (not allowed)                 | copied into the writer as it comes     |
///
/// A value a stream cannot take fails `spawn`/`output` with
/// [`ExecError::InvalidStdio`](crate::ExecError::InvalidStdio).
#[derive(Clone)]
pub struct Stdio(pub(crate) StdioKind);

#[derive(Clone)]
pub(crate) enum StdioKind {
    Piped,
    Null,
    Bytes(Arc<[u8]>),
    Writer(SharedWriter),
}

/// A caller's writer, shared by every spawn of the command it was set on.
pub(crate) type SharedWriter = Arc<Mutex<dyn Write + Send>>;

impl Stdio {
    /// A pipe to or from the caller.
    pub fn piped() -> Self {
        Self(StdioKind::Piped)
    }

    /// Nothing in, or nothing kept.
    pub fn null() -> Self {
        Self(StdioKind::Null)
    }

    /// These bytes as stdin, then EOF (stdin only).
    pub fn bytes(bytes: impl Into<Vec<u8>>) -> Self {
        Self(StdioKind::Bytes(bytes.into().into()))
    }

    /// Copy the output into `writer` as it arrives (stdout and stderr
    /// only), from a thread of chitin's: the guest process's output is
    /// "inherited" by whatever the writer is (a log, a terminal). A write
    /// error stops the copying, and the rest of that output is thrown away.
    pub fn writer(writer: impl Write + Send + 'static) -> Self {
        Self(StdioKind::Writer(Arc::new(Mutex::new(writer))))
    }

    pub(crate) fn is_piped(&self) -> bool {
        matches!(self.0, StdioKind::Piped)
    }

    fn name(&self) -> &'static str {
        match self.0 {
            StdioKind::Piped => "piped",
            StdioKind::Null => "null",
            StdioKind::Bytes(_) => "bytes",
            StdioKind::Writer(_) => "writer",
        }
    }
}

impl fmt::Debug for Stdio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            StdioKind::Bytes(b) => write!(f, "Stdio::bytes({} bytes)", b.len()),
            _ => write!(f, "Stdio::{}", self.name()),
        }
    }
}

/// A signal to send a guest process ([`Child::signal`](crate::Child::signal)):
/// one of the named ones, or any Linux signal number through
/// [`Signal::new`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Signal(i32);

impl Signal {
    /// Hangup.
    pub const HUP: Signal = Signal(1);
    /// Interrupt (Ctrl-C).
    pub const INT: Signal = Signal(2);
    /// Quit.
    pub const QUIT: Signal = Signal(3);
    /// Kill; cannot be caught.
    pub const KILL: Signal = Signal(9);
    /// User-defined 1.
    pub const USR1: Signal = Signal(10);
    /// User-defined 2.
    pub const USR2: Signal = Signal(12);
    /// Terminate.
    pub const TERM: Signal = Signal(15);
    /// Continue a stopped process.
    pub const CONT: Signal = Signal(18);
    /// Stop; cannot be caught.
    pub const STOP: Signal = Signal(19);

    /// Signal number `number`, if Linux has it (1 to 64).
    pub fn new(number: i32) -> Option<Signal> {
        (1..=64).contains(&number).then_some(Signal(number))
    }

    /// Its Linux number.
    pub fn number(self) -> i32 {
        self.0
    }
}

/// A command to run in the guest, like `std::process::Command`: setters
/// take `&mut self`, so a command can be built in one expression or step
/// by step, and run any number of times.
///
/// ```no_run
/// # use chitin::{Command, GuestImage, Sandbox, Stdio};
/// let vm = Sandbox::builder().guest(GuestImage::default()).build()?.start()?;
/// let out = vm.output(Command::new("uname").arg("-a"))?;
/// assert!(out.status.success());
/// print!("{}", String::from_utf8_lossy(&out.stdout));
///
/// let mut cat = Command::new("cat");
/// cat.stdin(Stdio::bytes("hello")).env("LANG", "C");
/// assert_eq!(vm.output(&cat)?.stdout, b"hello");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// By default the environment is `PATH=/bin:/sbin:/usr/bin:/usr/sbin`
/// only (nothing of the host's is passed), stdin is [`Stdio::null`], and
/// stdout and stderr are [`Stdio::piped`].
#[derive(Debug, Clone)]
pub struct Command {
    pub(crate) program: OsString,
    pub(crate) args: Vec<OsString>,
    pub(crate) env: Vec<(OsString, OsString)>,
    pub(crate) cwd: Option<OsString>,
    pub(crate) uid: Option<u32>,
    pub(crate) gid: Option<u32>,
    pub(crate) stdin: Stdio,
    pub(crate) stdout: Stdio,
    pub(crate) stderr: Stdio,
    pub(crate) timeout: Option<Duration>,
    pub(crate) output_limit: usize,
    pub(crate) root: Root,
    pub(crate) hostname: Option<OsString>,
    pub(crate) mounts: Vec<Mount>,
    pub(crate) attributes: Attributes,
    pub(crate) tty: Option<WindowSize>,
}

/// A mount inside a container process's root (see [`Command::mount`]): a
/// fresh tmpfs, or a bind of a path in the guest, typically a file or
/// directory of a [`Share`](crate::Share).
///
/// ```
/// use chitin::Mount;
/// let cache = Mount::tmpfs("/cache").options("size=16m,mode=1777").nosuid().nodev();
/// let config = Mount::bind("/run/chitin/config/app.toml", "/etc/app.toml").read_only();
/// # let _ = (cache, config);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount(MountRequest);

impl Mount {
    fn new(kind: MountKind, source: OsString, destination: OsString) -> Self {
        Self(MountRequest {
            kind,
            source,
            destination,
            flags: 0,
            options: OsString::new(),
        })
    }

    /// A fresh tmpfs at `destination` (an absolute path in the container).
    pub fn tmpfs(destination: impl Into<OsString>) -> Self {
        Self::new(MountKind::Tmpfs, OsString::new(), destination.into())
    }

    /// `source`, a path in the guest, bound (with what is mounted below
    /// it) at `destination` in the container.
    pub fn bind(source: impl Into<OsString>, destination: impl Into<OsString>) -> Self {
        Self::new(MountKind::Bind, source.into(), destination.into())
    }

    /// Read-only.
    pub fn read_only(mut self) -> Self {
        self.0.flags |= MOUNT_READ_ONLY;
        self
    }

    /// No set-user-id or set-group-id programs.
    pub fn nosuid(mut self) -> Self {
        self.0.flags |= MOUNT_NOSUID;
        self
    }

    /// No device nodes.
    pub fn nodev(mut self) -> Self {
        self.0.flags |= MOUNT_NODEV;
        self
    }

    /// No programs run from it.
    pub fn noexec(mut self) -> Self {
        self.0.flags |= MOUNT_NOEXEC;
        self
    }

    /// A tmpfs's options, as `mount -o` takes them (`size=64m,mode=1777`).
    pub fn options(mut self, options: impl Into<OsString>) -> Self {
        self.0.options = options.into();
        self
    }

    /// Where it goes in the container.
    pub fn destination(&self) -> &std::ffi::OsStr {
        &self.0.destination
    }
}

/// Which root a command runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Root {
    /// The sandbox's [`rootfs`](crate::SandboxBuilder::rootfs) if it has
    /// one, else the agent's own file system.
    Default,
    /// A container root of the command's own.
    Dir(OsString),
    /// The agent's file system, whatever the sandbox's rootfs.
    Agent,
}

impl Command {
    /// Run `program` (looked up in the guest's `PATH`).
    pub fn new(program: impl Into<OsString>) -> Self {
        Self {
            program: program.into(),
            args: Vec::new(),
            env: vec![("PATH".into(), DEFAULT_PATH.into())],
            cwd: None,
            uid: None,
            gid: None,
            stdin: Stdio::null(),
            stdout: Stdio::piped(),
            stderr: Stdio::piped(),
            timeout: None,
            output_limit: DEFAULT_OUTPUT_LIMIT,
            root: Root::Default,
            hostname: None,
            mounts: Vec::new(),
            attributes: Attributes::default(),
            tty: None,
        }
    }

    /// Add an argument.
    pub fn arg(&mut self, arg: impl Into<OsString>) -> &mut Self {
        self.args.push(arg.into());
        self
    }

    /// Add arguments.
    pub fn args<I, A>(&mut self, args: I) -> &mut Self
    where
        I: IntoIterator<Item = A>,
        A: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Set an environment variable (replacing its value if set).
    pub fn env(&mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> &mut Self {
        let key = key.into();
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, value.into()));
        self
    }

    /// Set environment variables.
    pub fn envs<I, K, V>(&mut self, vars: I) -> &mut Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: Into<OsString>,
    {
        for (key, value) in vars {
            self.env(key, value);
        }
        self
    }

    /// Remove an environment variable (`PATH` too, if asked).
    pub fn env_remove(&mut self, key: impl Into<OsString>) -> &mut Self {
        let key = key.into();
        self.env.retain(|(k, _)| *k != key);
        self
    }

    /// Start from an empty environment (no `PATH` either: the program then
    /// needs a path with a `/`).
    pub fn env_clear(&mut self) -> &mut Self {
        self.env.clear();
        self
    }

    /// Working directory in the guest.
    pub fn current_dir(&mut self, dir: impl Into<OsString>) -> &mut Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Run as this user id (default: the agent's, root).
    pub fn uid(&mut self, uid: u32) -> &mut Self {
        self.uid = Some(uid);
        self
    }

    /// Run with this group id (default: the agent's, root).
    pub fn gid(&mut self, gid: u32) -> &mut Self {
        self.gid = Some(gid);
        self
    }

    /// Run as a container process with `dir` (a directory in the guest,
    /// typically a [`Share`](crate::Share)'s mount point) as its root: in
    /// mount and UTS namespaces of its own, after `pivot_root` into `dir`,
    /// with a fresh `/proc`, `/sys` (read-only), `/dev` (`null`, `zero`,
    /// `full`, `random`, `urandom`, `tty`, `pts`, `shm`) and `/tmp`.
    /// [`current_dir`](Command::current_dir), [`uid`](Command::uid),
    /// [`gid`](Command::gid) and `PATH` then apply inside it. `dir` must
    /// hold `proc`, `sys`, `dev` and `tmp` directories (not symlinks); if
    /// set-up fails the program does not run and the command exits with
    /// status 125, the failed step on its stderr (127: the program was not
    /// found, 126: it could not run). No PID namespace yet: a container
    /// process running as root can reach the agent's files through
    /// `/proc/1/root`.
    pub fn root(&mut self, dir: impl Into<OsString>) -> &mut Self {
        self.root = Root::Dir(dir.into());
        self
    }

    /// Run in the agent's own file system even in a sandbox with a
    /// [`rootfs`](crate::SandboxBuilder::rootfs).
    pub fn agent_root(&mut self) -> &mut Self {
        self.root = Root::Agent;
        self
    }

    /// The hostname of a container process (with [`Command::root`] or a
    /// sandbox rootfs; the exec is refused without a root).
    pub fn hostname(&mut self, name: impl Into<OsString>) -> &mut Self {
        self.hostname = Some(name.into());
        self
    }

    /// Mount `mount` inside the container root (with [`Command::root`]
    /// or a sandbox rootfs; the exec is refused without a root). Mounts
    /// go on in the order given, after the root's `/proc`, `/sys`, `/dev`
    /// and `/tmp`. The destination is resolved inside the root, its
    /// symlinks included, and missing directories (for a bind of a file,
    /// the file) are made; a mount that fails fails the command's set-up
    /// (status 125, the step on its stderr).
    pub fn mount(&mut self, mount: Mount) -> &mut Self {
        self.mounts.push(mount);
        self
    }

    /// Run on a new terminal of `rows` × `cols` in the guest: the
    /// process's stdin, stdout and stderr are the terminal, it leads a
    /// session of its own with the terminal as its controlling one, and
    /// what it writes comes on stdout (stderr is empty; a terminal turns
    /// `\n` into `\r\n`). [`Signaller::resize`](crate::Signaller::resize)
    /// changes the size; closing stdin does not end the terminal's input.
    pub fn tty(&mut self, rows: u16, cols: u16) -> &mut Self {
        self.tty = Some(WindowSize { rows, cols });
        self
    }

    /// Supplementary groups of a container process (with a root; none
    /// by default).
    pub fn groups(&mut self, groups: impl IntoIterator<Item = u32>) -> &mut Self {
        self.attributes.groups = groups.into_iter().collect();
        self
    }

    /// The file mode creation mask of a container process (at most
    /// `0o777`; the agent's, `0o022`, by default).
    pub fn umask(&mut self, mask: u32) -> &mut Self {
        self.attributes.umask = Some(mask);
        self
    }

    /// A resource limit of a container process: `resource` is Linux's
    /// `RLIMIT_*` number (`libc::RLIMIT_NOFILE`), `u64::MAX` unlimited.
    pub fn rlimit(&mut self, resource: u32, soft: u64, hard: u64) -> &mut Self {
        self.attributes.rlimits.push(Rlimit {
            resource,
            soft,
            hard,
        });
        self
    }

    /// The capability sets of a container process (every capability by
    /// default, as root). A root process keeps what the bounding set
    /// allows across exec; another user keeps its ambient set.
    pub fn capabilities(&mut self, caps: Capabilities) -> &mut Self {
        self.attributes.capabilities = Some(caps);
        self
    }

    /// No privileges gained through exec (set-user-id programs, file
    /// capabilities) for a container process.
    pub fn no_new_privileges(&mut self) -> &mut Self {
        self.attributes.no_new_privileges = true;
        self
    }

    /// The OOM killer's adjustment for a container process, -1000 to
    /// 1000.
    pub fn oom_score_adj(&mut self, score: i32) -> &mut Self {
        self.attributes.oom_score_adj = Some(score);
        self
    }

    /// Where stdin comes from (default [`Stdio::null`]).
    pub fn stdin(&mut self, stdin: Stdio) -> &mut Self {
        self.stdin = stdin;
        self
    }

    /// Where stdout goes (default [`Stdio::piped`]).
    pub fn stdout(&mut self, stdout: Stdio) -> &mut Self {
        self.stdout = stdout;
        self
    }

    /// Where stderr goes (default [`Stdio::piped`]).
    pub fn stderr(&mut self, stderr: Stdio) -> &mut Self {
        self.stderr = stderr;
        self
    }

    /// Bound the command's run, the wait for the agent and its start
    /// included. `output` and `status` kill it at the timeout and fail
    /// with [`ExecError::Timeout`](crate::ExecError::Timeout), returning
    /// within about twice `timeout` whatever the guest does. After
    /// `spawn`, every wait on the [`Child`](crate::Child) ends at the
    /// deadline the same way.
    pub fn timeout(&mut self, timeout: Duration) -> &mut Self {
        self.timeout = Some(timeout);
        self
    }

    /// Collect at most `bytes` of each piped output (`output` and
    /// [`Child::wait_with_output`](crate::Child::wait_with_output); default
    /// [`DEFAULT_OUTPUT_LIMIT`]): beyond it they fail with
    /// [`ExecError::OutputLimit`](crate::ExecError::OutputLimit) (`output`
    /// kills the command). Output read through `Child::stdout` needs no
    /// limit: the host holds at most a window (256 KiB) of each output that
    /// the caller has not read.
    pub fn output_limit(&mut self, bytes: usize) -> &mut Self {
        self.output_limit = bytes;
        self
    }

    /// The program.
    pub fn get_program(&self) -> &OsString {
        &self.program
    }

    /// The arguments (without the program).
    pub fn get_args(&self) -> &[OsString] {
        &self.args
    }

    /// The request for the agent; `default_root` is the sandbox's rootfs
    /// mount point, if it has one.
    pub(crate) fn request(
        &self,
        default_root: Option<&OsString>,
    ) -> Result<ExecRequest, crate::ExecError> {
        let stdin = match &self.stdin.0 {
            StdioKind::Null => false,
            StdioKind::Piped | StdioKind::Bytes(_) => true,
            StdioKind::Writer(_) => return Err(invalid("stdin", "a writer")),
        };
        for (stream, stdio) in [("stdout", &self.stdout), ("stderr", &self.stderr)] {
            if let StdioKind::Bytes(_) = stdio.0 {
                return Err(invalid(stream, "bytes"));
            }
        }
        let mut request = ExecRequest::new([&self.program]);
        request.argv.extend(self.args.iter().cloned());
        request.env = self.env.clone();
        request.cwd = self.cwd.clone();
        request.uid = self.uid;
        request.gid = self.gid;
        request.stdin = stdin;
        request.root = match &self.root {
            Root::Default => default_root.cloned(),
            Root::Dir(dir) => Some(dir.clone()),
            Root::Agent => None,
        };
        request.hostname = self.hostname.clone();
        request.mounts = self.mounts.iter().map(|m| m.0.clone()).collect();
        request.attributes = Box::new(self.attributes.clone());
        request.tty = self.tty;
        check_settings(&request)?;
        Ok(request)
    }
}

/// What the agent would take for a malformed request (and close the
/// connection over), refused here with a clear error instead.
fn check_settings(request: &ExecRequest) -> Result<(), crate::ExecError> {
    let a = &request.attributes;
    let bad = |what: String| Err(crate::ExecError::InvalidCommand(what));
    if request.mounts.len() > MAX_MOUNTS {
        return bad(format!(
            "{} mounts, at most {MAX_MOUNTS}",
            request.mounts.len()
        ));
    }
    if a.groups.len() > MAX_GROUPS {
        return bad(format!("{} groups, at most {MAX_GROUPS}", a.groups.len()));
    }
    if a.rlimits.len() > MAX_RLIMITS {
        return bad(format!(
            "{} rlimits, at most {MAX_RLIMITS}",
            a.rlimits.len()
        ));
    }
    if let Some(mask) = a.umask.filter(|&m| m > 0o777) {
        return bad(format!("umask {mask:#o} is over 0o777"));
    }
    if let Some(score) = a.oom_score_adj.filter(|s| !(-1000..=1000).contains(s)) {
        return bad(format!(
            "OOM score adjustment {score} is outside -1000..=1000"
        ));
    }
    Ok(())
}

fn invalid(stream: &'static str, what: &'static str) -> crate::ExecError {
    crate::ExecError::InvalidStdio { stream, what }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_settings_are_refused_before_the_guest() {
        let ok = Command::new("x")
            .umask(0o777)
            .oom_score_adj(-1000)
            .request(None);
        assert!(ok.is_ok());
        for cmd in [
            Command::new("x").umask(0o1000).clone(),
            Command::new("x").oom_score_adj(1001).clone(),
            Command::new("x").groups(0..300).clone(),
        ] {
            assert!(matches!(
                cmd.request(None),
                Err(crate::ExecError::InvalidCommand(_))
            ));
        }
        let mut many = Command::new("x");
        for i in 0..65 {
            many.mount(Mount::tmpfs(format!("/t{i}")));
        }
        assert!(matches!(
            many.request(None),
            Err(crate::ExecError::InvalidCommand(_))
        ));
    }

    #[test]
    fn request_carries_everything_set() {
        let mut cmd = Command::new("prog");
        cmd.arg("a")
            .args(["b", "c"])
            .env("X", "1")
            .envs([("Y", "2"), ("X", "3")])
            .env_remove("Y")
            .current_dir("/tmp")
            .uid(5)
            .gid(6)
            .stdin(Stdio::bytes("in"));
        let r = cmd.request(None).unwrap();
        assert_eq!(r.argv, ["prog", "a", "b", "c"]);
        assert_eq!(
            r.env,
            [
                ("PATH".into(), DEFAULT_PATH.into()),
                ("X".into(), "3".into())
            ]
        );
        assert_eq!(r.cwd.as_deref(), Some("/tmp".as_ref()));
        assert_eq!((r.uid, r.gid, r.stdin), (Some(5), Some(6), true));
        cmd.env_clear();
        assert!(cmd.request(None).unwrap().env.is_empty());
    }

    #[test]
    fn root_is_the_commands_the_sandboxs_or_none() {
        let rootfs = OsString::from("/run/chitin/rootfs");
        let mut cmd = Command::new("ls");
        assert_eq!(cmd.request(None).unwrap().root, None);
        assert_eq!(
            cmd.request(Some(&rootfs)).unwrap().root,
            Some(rootfs.clone())
        );
        cmd.root("/mnt/other").hostname("box");
        let r = cmd.request(Some(&rootfs)).unwrap();
        assert_eq!(r.root.as_deref(), Some("/mnt/other".as_ref()));
        assert_eq!(r.hostname.as_deref(), Some("box".as_ref()));
        cmd.agent_root();
        assert_eq!(cmd.request(Some(&rootfs)).unwrap().root, None);
    }

    #[test]
    fn a_value_a_stream_cannot_take_is_a_typed_error() {
        let mut cmd = Command::new("p");
        cmd.stdout(Stdio::bytes("x"));
        assert!(matches!(
            cmd.request(None),
            Err(crate::ExecError::InvalidStdio {
                stream: "stdout",
                what: "bytes"
            })
        ));
        let mut cmd = Command::new("p");
        cmd.stdin(Stdio::writer(std::io::sink()));
        assert!(matches!(
            cmd.request(None),
            Err(crate::ExecError::InvalidStdio {
                stream: "stdin",
                ..
            })
        ));
    }

    #[test]
    fn signals_are_linux_numbers_only() {
        assert_eq!(Signal::new(9), Some(Signal::KILL));
        assert_eq!(Signal::new(0), None);
        assert_eq!(Signal::new(65), None);
        assert_eq!(Signal::new(-9), None);
        assert_eq!(Signal::TERM.number(), 15);
    }
}
