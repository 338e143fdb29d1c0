//! Running processes in the guest through chitin's agent.
//!
//! The host side of the agent protocol (`chitin_agent::client`) over the
//! sandbox's vsock device: connect to the device's Unix socket, ask for the
//! agent's port with `CONNECT`, then speak the protocol. One connection is
//! shared by every `exec`/`spawn` of a sandbox; it is opened on first use,
//! retrying while the guest is still booting, and opened again after the
//! agent closed it. When the VM stops, the connection is shut down, so
//! every exec and wait still pending ends at once with
//! [`ExecError::GuestStopped`].

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chitin_agent::client::{Child as AgentChild, Client, ClientConfig, START_TIMEOUT};
pub use chitin_agent::client::{ChildOutput, ChildStdin, ClientError, Output};
use chitin_agent::protocol::ExecRequest;
pub use chitin_agent::protocol::ExitStatus;
use chitin_vcpu::{ExitReason, VmControl};

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// How long `exec`/`spawn` wait for the agent to come up by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// The environment a [`Command`] starts with.
const DEFAULT_PATH: &str = "/bin:/sbin:/usr/bin:/usr/sbin";
/// How much of each of stdout and stderr `exec` collects by default.
pub const DEFAULT_OUTPUT_LIMIT: usize = 32 << 20;

/// Why a command could not be run in the guest.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecError {
    /// The sandbox was not built with `.guest(..)`: no agent runs in it.
    #[error("this sandbox runs no agent: build it with .guest(GuestImage)")]
    NoAgent,
    /// The agent did not answer before the timeout.
    #[error("the guest agent did not come up within {0:?}")]
    AgentUnreachable(Duration),
    /// The guest stopped (before or while the command ran).
    #[error("the guest stopped: {0}")]
    GuestStopped(ExitReason),
    /// The command did not finish within its timeout; it was killed.
    #[error("the command did not finish within {0:?} and was killed")]
    Timeout(Duration),
    /// The command wrote more than [`Command::output_limit`] to stdout or
    /// stderr; it was killed and the rest of its output discarded.
    #[error("the command wrote more than {limit} bytes to {stream} and was killed")]
    OutputLimit {
        /// `stdout` or `stderr`.
        stream: &'static str,
        /// The limit, in bytes.
        limit: usize,
    },
    /// The agent refused or the connection broke.
    #[error("agent request failed")]
    Agent(#[from] ClientError),
    /// Writing the command's stdin failed.
    #[error("cannot write the command's stdin")]
    Stdin(#[source] std::io::Error),
}

/// A command to run in the guest, like `std::process::Command`.
///
/// ```no_run
/// # use chitin::{Command, GuestImage, Sandbox};
/// let vm = Sandbox::builder().guest(GuestImage::default()).build()?.start()?;
/// let out = vm.exec(&Command::new("uname").arg("-a"))?;
/// assert!(out.status.success());
/// print!("{}", String::from_utf8_lossy(&out.stdout));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Command {
    request: ExecRequest,
    stdin: Option<Vec<u8>>,
    timeout: Option<Duration>,
    output_limit: usize,
}

impl Command {
    /// Run `program` (looked up in the guest's `PATH`), with
    /// `PATH=/bin:/sbin:/usr/bin:/usr/sbin` as its only environment.
    pub fn new(program: impl Into<OsString>) -> Self {
        let mut request = ExecRequest::new([program.into()]);
        request.env.push(("PATH".into(), DEFAULT_PATH.into()));
        Self {
            request,
            stdin: None,
            timeout: None,
            output_limit: DEFAULT_OUTPUT_LIMIT,
        }
    }

    /// Add an argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.request.argv.push(arg.into());
        self
    }

    /// Add arguments.
    pub fn args<I: IntoIterator<Item = A>, A: Into<OsString>>(mut self, args: I) -> Self {
        self.request.argv.extend(args.into_iter().map(Into::into));
        self
    }

    /// Set an environment variable.
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        let key = key.into();
        self.request.env.retain(|(k, _)| *k != key);
        self.request.env.push((key, value.into()));
        self
    }

    /// Working directory in the guest.
    pub fn current_dir(mut self, dir: impl Into<OsString>) -> Self {
        self.request.cwd = Some(dir.into());
        self
    }

    /// Run as this user and group.
    pub fn user(mut self, uid: u32, gid: u32) -> Self {
        self.request.uid = Some(uid);
        self.request.gid = Some(gid);
        self
    }

    /// Bytes for the command's stdin (`exec`), or ask for a piped stdin
    /// (`spawn`, where `Child::stdin` then gives the writer).
    pub fn stdin(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(bytes.into());
        self.request.stdin = true;
        self
    }

    /// Pipe stdin for `spawn` without initial bytes.
    pub fn piped_stdin(mut self) -> Self {
        self.request.stdin = true;
        self
    }

    /// Kill the command if it runs longer than `timeout` (`exec` only);
    /// `exec` then returns within about twice `timeout` whatever the guest
    /// does.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Collect at most `bytes` of each of stdout and stderr (`exec` only;
    /// default [`DEFAULT_OUTPUT_LIMIT`]): a command that writes more is
    /// killed, and `exec` fails with [`ExecError::OutputLimit`]. A spawned
    /// [`Child`] needs no limit: the host holds at most a window (256 KiB)
    /// of each output that the caller has not read.
    pub fn output_limit(mut self, bytes: usize) -> Self {
        self.output_limit = bytes;
        self
    }
}

/// A process running in the guest (from `spawn`).
///
/// Its output works like a pipe's: what nobody reads is held back (at
/// most 256 KiB per output on the host, then the process waits on its
/// pipe in the guest). When the VM stops, every wait on it ends with
/// [`ExecError::GuestStopped`].
pub struct Child {
    inner: AgentChild,
    control: Arc<VmControl>,
    output_limit: usize,
}

impl Child {
    /// Its pid in the guest.
    pub fn pid(&self) -> u32 {
        self.inner.pid()
    }

    /// Its stdin, once, when the command asked for a piped stdin.
    pub fn stdin(&mut self) -> Option<ChildStdin> {
        self.inner.stdin()
    }

    /// A reader of its stdout.
    pub fn stdout(&self) -> ChildOutput {
        self.inner.stdout()
    }

    /// A reader of its stderr.
    pub fn stderr(&self) -> ChildOutput {
        self.inner.stderr()
    }

    /// Send it a signal; returns at once (the signal is queued).
    pub fn signal(&self, signo: i32) -> Result<(), ExecError> {
        self.inner
            .signal(signo)
            .map_err(|e| explain(&self.control, e))
    }

    /// Kill it (SIGKILL); returns at once.
    pub fn kill(&self) -> Result<(), ExecError> {
        self.inner.kill().map_err(|e| explain(&self.control, e))
    }

    /// Wait for it to exit (like `std::process::Child::wait`, its output
    /// is not consumed).
    pub fn wait(&self) -> Result<ExitStatus, ExecError> {
        self.inner.wait().map_err(|e| explain(&self.control, e))
    }

    /// Wait at most `timeout`; `None` if it still runs.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>, ExecError> {
        (self.inner.wait_timeout(timeout)).map_err(|e| explain(&self.control, e))
    }

    /// Wait for its exit and the end of its output, then return its status
    /// and the output not read yet: at most the command's
    /// [`Command::output_limit`] of each ([`ExecError::OutputLimit`]
    /// beyond it; the process is not killed).
    pub fn output(self) -> Result<Output, ExecError> {
        match self.inner.collect(self.output_limit, None) {
            Ok(output) => Ok(output),
            Err(ClientError::OutputLimit { stream, limit }) => {
                Err(ExecError::OutputLimit { stream, limit })
            }
            Err(e) => Err(explain(&self.control, e)),
        }
    }

    /// Stop caring about it: its output from now on is thrown away, and a
    /// stdin write blocked on it fails with `BrokenPipe`. It is not
    /// signalled.
    pub fn abandon(self) {
        self.inner.abandon();
    }
}

/// How long a closed agent connection waits for the VM to stop before it
/// is reported as closed: a guest that resets shuts its vsock device down
/// just before the reset reaches the VMM.
const STOP_GRACE: Duration = Duration::from_millis(500);

/// An agent error because the guest stopped (or is stopping) says so.
pub(crate) fn explain(control: &VmControl, error: impl Into<ExecError>) -> ExecError {
    let error = error.into();
    let reason = match &error {
        ExecError::Agent(ClientError::Closed | ClientError::Io(_)) => {
            control.wait_timeout(STOP_GRACE)
        }
        ExecError::Agent(_) => control.exit_reason(),
        _ => None,
    };
    match reason {
        Some(reason) => ExecError::GuestStopped(reason),
        None => error,
    }
}

/// A sandbox's way to its agent: the shared connection, opened on first
/// use and again after it ended (the agent closed it, broke the protocol,
/// stopped reading, or the guest's vsock driver reset), and shut down when
/// the VM stops.
pub(crate) struct AgentLink {
    socket: PathBuf,
    control: Arc<VmControl>,
    client: Mutex<Option<Arc<Client<UnixStream>>>>,
    /// A second handle on the current connection's stream.
    stream: Arc<Mutex<Option<UnixStream>>>,
}

impl AgentLink {
    /// A link through the vsock device's Unix socket at `socket`. When the
    /// VM stops, the connection is shut down, so whatever still waits on
    /// the agent (an exec, a wait, a stdin write) does not wait for a
    /// guest that is gone.
    pub(crate) fn new(socket: PathBuf, control: &Arc<VmControl>) -> Self {
        let stream: Arc<Mutex<Option<UnixStream>>> = Arc::default();
        let hook = Arc::clone(&stream);
        control.on_exit(move || shut_down(&hook));
        Self {
            socket,
            control: Arc::clone(control),
            client: Mutex::new(None),
            stream,
        }
    }

    /// The connection, (re)opened if there is none that works; waits up to
    /// `timeout` for the agent (and for another caller opening it).
    pub(crate) fn client(&self, timeout: Duration) -> Result<Arc<Client<UnixStream>>, ExecError> {
        let started = Instant::now();
        let mut slot = loop {
            match self.client.try_lock() {
                Ok(slot) => break slot,
                Err(std::sync::TryLockError::Poisoned(e)) => break e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => {
                    if let Some(reason) = self.control.exit_reason() {
                        return Err(ExecError::GuestStopped(reason));
                    }
                    if started.elapsed() >= timeout {
                        return Err(ExecError::AgentUnreachable(timeout));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        };
        if let Some(client) = slot.as_ref().filter(|c| !c.is_closed()) {
            return Ok(Arc::clone(client));
        }
        // A closed client is dropped once its children are.
        slot.take();
        let left = timeout.saturating_sub(started.elapsed());
        let (client, stream) = connect(&self.socket, &self.control, left)?;
        let client = Arc::new(client);
        *self.stream.lock().unwrap_or_else(|e| e.into_inner()) = Some(stream);
        // A stop between the connect and the line above found no stream to
        // shut down.
        if let Some(reason) = self.control.exit_reason() {
            shut_down(&self.stream);
            return Err(ExecError::GuestStopped(reason));
        }
        *slot = Some(Arc::clone(&client));
        Ok(client)
    }

    /// Close the connection (its client fails what is pending).
    pub(crate) fn close(&self) {
        shut_down(&self.stream);
        self.client.lock().unwrap_or_else(|e| e.into_inner()).take();
    }

    /// Run `cmd` to completion; with a timeout, the wait for the agent is
    /// part of it.
    pub(crate) fn exec(&self, cmd: &Command) -> Result<Output, ExecError> {
        let started = Instant::now();
        let wait = cmd
            .timeout
            .map_or(DEFAULT_CONNECT_TIMEOUT, |t| t.min(DEFAULT_CONNECT_TIMEOUT));
        let client = self.client(wait)?;
        exec(&client, cmd, started).map_err(|e| explain(&self.control, e))
    }

    /// Start `cmd`.
    pub(crate) fn spawn(&self, cmd: &Command) -> Result<Child, ExecError> {
        let client = self.client(DEFAULT_CONNECT_TIMEOUT)?;
        spawn(&client, cmd, &self.control).map_err(|e| explain(&self.control, e))
    }
}

/// Shut down the stream in `slot`, if there is one: its client then fails
/// everything pending with `Closed`. Quick and non-blocking (it runs on
/// the thread that stops the VM).
fn shut_down(slot: &Mutex<Option<UnixStream>>) {
    if let Some(s) = slot.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
}

/// Open an agent connection through the vsock device's Unix socket,
/// retrying while the agent is not listening yet; everything, handshake
/// included, within `timeout`. An agent that answers but refuses (another
/// protocol version, an error) fails at once. Returns the client and a
/// second handle on its stream, to shut it down with.
pub(crate) fn connect(
    socket: &Path,
    control: &VmControl,
    timeout: Duration,
) -> Result<(Client<UnixStream>, UnixStream), ExecError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(reason) = control.exit_reason() {
            return Err(ExecError::GuestStopped(reason));
        }
        match try_connect(socket, deadline) {
            Ok(client) => return Ok(client),
            Err(Some(fatal)) => return Err(fatal),
            Err(None) => {}
        }
        if Instant::now() >= deadline {
            return Err(ExecError::AgentUnreachable(timeout));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long one connection attempt may take: between attempts the caller
/// looks whether the VM has stopped.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// One attempt: `CONNECT <port>`, `OK <n>`, then the protocol handshake,
/// all within [`ATTEMPT_TIMEOUT`] and before `deadline`. `Err(None)`: not
/// there yet (or too slow), try again.
fn try_connect(
    socket: &Path,
    deadline: Instant,
) -> Result<(Client<UnixStream>, UnixStream), Option<ExecError>> {
    let deadline = deadline.min(Instant::now() + ATTEMPT_TIMEOUT);
    let left = || deadline.saturating_duration_since(Instant::now());
    let mut stream = UnixStream::connect(socket).map_err(|_| None)?;
    stream
        .set_write_timeout(Some(left().max(Duration::from_millis(1))))
        .map_err(|_| None)?;
    writeln!(stream, "CONNECT {AGENT_PORT}").map_err(|_| None)?;
    // Read the reply byte by byte: nothing past its newline may be
    // consumed. Each read is bounded by what is left of the deadline, so a
    // guest that dribbles its answer cannot stretch it.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 64 && line.last() != Some(&b'\n') {
        let left = left();
        if left.is_zero() {
            return Err(None);
        }
        stream.set_read_timeout(Some(left)).map_err(|_| None)?;
        match stream.read(&mut byte) {
            Ok(1) => line.push(byte[0]),
            _ => return Err(None),
        }
    }
    if !line.starts_with(b"OK ") {
        return Err(None);
    }
    let config = ClientConfig {
        handshake_timeout: left().max(Duration::from_millis(1)),
        ..ClientConfig::default()
    };
    let handle = stream.try_clone().map_err(|_| None)?;
    let client = Client::handshake_with(stream, config).map_err(|e| match e {
        // The agent is there and said no: trying again changes nothing.
        e @ (ClientError::VersionMismatch { .. }
        | ClientError::AgentError(_)
        | ClientError::Protocol(_)) => Some(ExecError::Agent(e)),
        _ => None,
    })?;
    Ok((client, handle))
}

/// `exec`: spawn, feed stdin while collecting output (within the
/// command's timeout and output limit), collect.
pub(crate) fn exec(
    client: &Client<UnixStream>,
    cmd: &Command,
    started: Instant,
) -> Result<Output, ExecError> {
    // With a timeout, the wait for the agent to start the process is part
    // of it.
    let left = |t: Duration| t.saturating_sub(started.elapsed());
    let start_timeout = cmd
        .timeout
        .map_or(START_TIMEOUT, |t| left(t).min(START_TIMEOUT));
    let mut child = match client.spawn_timeout(&cmd.request, start_timeout) {
        Ok(child) => child,
        Err(ClientError::Timeout(_)) if cmd.timeout.is_some() => {
            return Err(ExecError::Timeout(cmd.timeout.unwrap_or_default()));
        }
        Err(e) => return Err(e.into()),
    };
    let stdin = child.stdin();
    std::thread::scope(move |scope| {
        // Fed from its own thread: a command that writes output before it
        // has read all of its input needs that output collected meanwhile.
        let feeder = match (stdin, &cmd.stdin) {
            (Some(stdin), Some(bytes)) => Some(scope.spawn(move || feed(stdin, bytes))),
            (Some(stdin), None) => {
                stdin.close()?;
                None
            }
            (None, _) => None,
        };
        let output = collect(child, cmd, cmd.timeout.map(left));
        let fed = feeder.map(|f| f.join());
        let output = output?;
        if let Some(Ok(Err(e))) = fed {
            return Err(ExecError::Stdin(e));
        }
        Ok(output)
    })
}

/// How long a killed command may take to report its death before `exec`
/// stops waiting for it (at most half its own timeout).
const KILL_GRACE: Duration = Duration::from_secs(5);

/// Take the child's output as it comes until it ends, within `left` of
/// the command's timeout and its output limit. Past either the child is
/// killed, given [`KILL_GRACE`] (or half the timeout, if shorter) to report
/// its death, and abandoned, which also fails a stdin write still blocked on
/// it.
fn collect(child: AgentChild, cmd: &Command, left: Option<Duration>) -> Result<Output, ExecError> {
    let failure = match child.collect(cmd.output_limit, left) {
        Ok(output) => return Ok(output),
        Err(ClientError::Timeout(_)) => ExecError::Timeout(cmd.timeout.unwrap_or_default()),
        Err(ClientError::OutputLimit { stream, limit }) => ExecError::OutputLimit { stream, limit },
        Err(e) => return Err(e.into()),
    };
    child.kill()?;
    let grace = cmd.timeout.map_or(KILL_GRACE, |t| (t / 2).min(KILL_GRACE));
    let _ = child.wait_timeout(grace)?;
    child.abandon();
    Err(failure)
}

/// Write `bytes` to a child's stdin, then close it. A process that exits
/// (or closes its stdin) before reading everything is not an error here:
/// its exit status says how it went.
fn feed(mut stdin: ChildStdin, bytes: &[u8]) -> std::io::Result<()> {
    match stdin.write_all(bytes) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(e),
        Ok(()) => stdin.close().map_err(std::io::Error::other),
    }
}

/// `spawn`: initial stdin bytes are fed, then stdin closed, by a thread
/// that ends when they are delivered or the process exits.
pub(crate) fn spawn(
    client: &Client<UnixStream>,
    cmd: &Command,
    control: &Arc<VmControl>,
) -> Result<Child, ExecError> {
    let mut inner = client.spawn(&cmd.request)?;
    if let Some(bytes) = &cmd.stdin {
        if let Some(stdin) = inner.stdin() {
            let bytes = bytes.clone();
            std::thread::Builder::new()
                .name("chitin-stdin".into())
                .spawn(move || feed(stdin, &bytes))
                .map_err(ExecError::Stdin)?;
        }
    }
    Ok(Child {
        inner,
        control: Arc::clone(control),
        output_limit: cmd.output_limit,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chitin_agent::server::{self, NoHooks};

    /// A client talking to the agent's server library over a socket pair;
    /// dropping the client makes the server kill what it started.
    fn client() -> Client<UnixStream> {
        let (host, guest) = UnixStream::pair().unwrap();
        std::thread::spawn(move || {
            let reader = guest.try_clone().unwrap();
            server::serve(reader, guest, &NoHooks)
        });
        Client::handshake(host).unwrap()
    }

    fn host_sh(script: &str) -> Command {
        Command::new("sh")
            .arg("-c")
            .arg(script)
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
    }

    /// Stops a fake device's accept thread and removes its directory.
    struct FakeDevice {
        path: PathBuf,
        stop: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Drop for FakeDevice {
        fn drop(&mut self) {
            self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
            // Wakes the accept thread, which then sees `stop`.
            let _ = UnixStream::connect(&self.path);
            if let Some(dir) = self.path.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    /// A stand-in for the vsock device's Unix socket: each connection gets
    /// `OK` to its `CONNECT` and the real agent server behind it. Returns
    /// the socket path, the guest ends of the connections made, and the
    /// guard that ends it.
    fn fake_vsock_device() -> (PathBuf, Arc<Mutex<Vec<UnixStream>>>, FakeDevice) {
        let dir = std::env::temp_dir().join(format!(
            "chitin-link-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("vsock.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let accepted: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let list = Arc::clone(&accepted);
        let stop: Arc<std::sync::atomic::AtomicBool> = Arc::default();
        let stopped = Arc::clone(&stop);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    return;
                }
                let Ok(mut stream) = stream else { return };
                let mut line = [0u8; 13];
                if stream.read_exact(&mut line).is_err() || &line != b"CONNECT 1024\n" {
                    continue;
                }
                stream.write_all(b"OK 1\n").unwrap();
                list.lock().unwrap().push(stream.try_clone().unwrap());
                std::thread::spawn(move || {
                    let reader = stream.try_clone().unwrap();
                    server::serve(reader, stream, &NoHooks)
                });
            }
        });
        let guard = FakeDevice {
            path: path.clone(),
            stop,
        };
        (path, accepted, guard)
    }

    #[test]
    fn agent_link_reconnects_after_the_agent_closes_its_connection() {
        let (path, accepted, _device) = fake_vsock_device();
        let control = Arc::new(VmControl::new());
        let link = AgentLink::new(path, &control);
        let out = link.exec(&host_sh("echo one")).unwrap();
        assert_eq!(out.stdout, b"one\n");
        // The agent goes away (its socket closes, as after a vsock reset).
        let client = link.client(DEFAULT_CONNECT_TIMEOUT).unwrap();
        let first = accepted.lock().unwrap().remove(0);
        first.shutdown(std::net::Shutdown::Both).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !client.is_closed() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(client.is_closed());
        // The next exec opens a new connection and works.
        let out = link.exec(&host_sh("echo two")).unwrap();
        assert_eq!(out.stdout, b"two\n");
        assert_eq!(accepted.lock().unwrap().len(), 1, "one new connection");
    }

    #[test]
    fn vm_stop_ends_a_pending_exec_and_wait_at_once() {
        let (path, _accepted, _device) = fake_vsock_device();
        let control = Arc::new(VmControl::new());
        let link = Arc::new(AgentLink::new(path, &control));
        let child = link.spawn(&host_sh("sleep 1000")).unwrap();
        let pending = {
            let link = Arc::clone(&link);
            std::thread::spawn(move || {
                let result = link.exec(&host_sh("sleep 1000"));
                (result, Instant::now())
            })
        };
        std::thread::sleep(Duration::from_millis(300));
        control.request_exit(ExitReason::Reset);
        let stopped = Instant::now();
        let waited = child.wait();
        let waited_at = Instant::now();
        let (result, returned_at) = pending.join().unwrap();
        assert!(
            matches!(result, Err(ExecError::GuestStopped(ExitReason::Reset))),
            "{result:?}"
        );
        assert!(matches!(
            waited,
            Err(ExecError::GuestStopped(ExitReason::Reset))
        ));
        for at in [returned_at, waited_at] {
            let after = at.saturating_duration_since(stopped);
            eprintln!("pending exec/wait returned {after:?} after the VM stopped");
            assert!(
                after < Duration::from_secs(1),
                "returned {after:?} after the stop"
            );
        }
        // And nothing new starts on a stopped VM.
        let again = link.exec(&host_sh("true"));
        assert!(
            matches!(again, Err(ExecError::GuestStopped(_))),
            "{again:?}"
        );
    }

    #[test]
    fn exec_output_over_its_limit_is_killed_with_a_typed_error() {
        let client = client();
        let cmd = host_sh("yes").output_limit(1 << 20);
        let started = Instant::now();
        let result = exec(&client, &cmd, Instant::now());
        assert!(
            matches!(
                result,
                Err(ExecError::OutputLimit {
                    stream: "stdout",
                    limit: 1_048_576
                })
            ),
            "{result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(20));
        // The connection goes on working.
        let out = exec(&client, &host_sh("echo after"), Instant::now()).unwrap();
        assert_eq!(out.stdout, b"after\n");
    }

    #[test]
    fn exec_stdin_larger_than_window_and_pipe_comes_back_intact() {
        let client = client();
        let input: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 253) as u8).collect();
        let out = exec(
            &client,
            &host_sh("cat").stdin(input.clone()),
            Instant::now(),
        )
        .unwrap();
        assert!(out.status.success());
        assert!(out.stdout == input, "got {} bytes", out.stdout.len());
    }

    #[test]
    fn exec_stdin_process_reading_part_is_not_an_error() {
        let client = client();
        let out = exec(
            &client,
            &host_sh("head -c 10").stdin(vec![b'a'; 1 << 20]),
            Instant::now(),
        )
        .unwrap();
        assert_eq!(out.stdout, vec![b'a'; 10]);
        assert!(out.status.success());
    }

    #[test]
    fn exec_timeout_returns_even_when_a_grandchild_holds_the_pipes() {
        let client = client();
        // The shell is killed at the timeout; the background sleep keeps
        // stdout open and nobody reads the 4 MiB of stdin.
        let cmd = host_sh("sleep 1000 & sleep 1000")
            .stdin(vec![0u8; 4 << 20])
            .timeout(Duration::from_secs(1));
        let started = Instant::now();
        let result = exec(&client, &cmd, Instant::now());
        assert!(matches!(result, Err(ExecError::Timeout(_))), "{result:?}");
        // Within twice the timeout: the kill's grace is half of it.
        let took = started.elapsed();
        eprintln!("exec with a 1 s timeout returned after {took:?}");
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }
}
