//! Running processes in the guest through chitin's agent.
//!
//! The host side of the agent protocol (`chitin_agent::client`) over the
//! sandbox's vsock device: connect to the device's Unix socket, ask for the
//! agent's port with `CONNECT`, then speak the protocol. One connection is
//! shared by every `exec`/`spawn` of a sandbox; it is opened on first use,
//! retrying while the guest is still booting.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use chitin_agent::client::{Child as AgentChild, ChildStdin as AgentStdin, Client};
pub use chitin_agent::client::{ChildOutput, ClientError, Output};
use chitin_agent::protocol::ExecRequest;
pub use chitin_agent::protocol::ExitStatus;
use chitin_vcpu::{ExitReason, VmControl};

/// The vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// How long `exec`/`spawn` wait for the agent to come up by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// The environment a [`Command`] starts with.
const DEFAULT_PATH: &str = "/bin:/sbin:/usr/bin:/usr/sbin";

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

    /// Kill the command if it runs longer than `timeout` (`exec` only).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// A process running in the guest (from `spawn`).
pub struct Child {
    inner: AgentChild<UnixStream>,
}

impl Child {
    /// Its pid in the guest.
    pub fn pid(&self) -> u32 {
        self.inner.pid()
    }

    /// Its stdin, once, when the command asked for a piped stdin.
    pub fn stdin(&mut self) -> Option<AgentStdin<UnixStream>> {
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

    /// Send it a signal.
    pub fn signal(&self, signo: i32) -> Result<(), ExecError> {
        Ok(self.inner.signal(signo)?)
    }

    /// Kill it (SIGKILL).
    pub fn kill(&self) -> Result<(), ExecError> {
        Ok(self.inner.kill()?)
    }

    /// Wait for it to exit.
    pub fn wait(&self) -> Result<ExitStatus, ExecError> {
        Ok(self.inner.wait()?)
    }

    /// Wait at most `timeout`; `None` if it still runs.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>, ExecError> {
        Ok(self.inner.wait_timeout(timeout)?)
    }

    /// Wait, then return its status and the output not read yet.
    pub fn output(self) -> Result<Output, ExecError> {
        Ok(self.inner.output()?)
    }
}

/// Open an agent connection through the vsock device's Unix socket,
/// retrying while the agent is not listening yet.
pub(crate) fn connect(
    socket: &Path,
    control: &VmControl,
    timeout: Duration,
) -> Result<Client<UnixStream>, ExecError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(reason) = control.exit_reason() {
            return Err(ExecError::GuestStopped(reason));
        }
        if let Some(client) = try_connect(socket) {
            return Ok(client);
        }
        if Instant::now() >= deadline {
            return Err(ExecError::AgentUnreachable(timeout));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One attempt: `CONNECT <port>`, `OK <n>`, then the protocol handshake.
fn try_connect(socket: &Path) -> Option<Client<UnixStream>> {
    let mut stream = UnixStream::connect(socket).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    writeln!(stream, "CONNECT {AGENT_PORT}").ok()?;
    // Read the reply byte by byte: nothing past its newline may be consumed.
    let mut reader = BufReader::with_capacity(1, stream.try_clone().ok()?);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    if !line.starts_with("OK ") {
        return None;
    }
    stream.set_read_timeout(None).ok()?;
    Client::handshake(stream).ok()
}

/// `exec`: spawn, feed stdin while collecting output, wait (with the
/// command's timeout), collect.
pub(crate) fn exec(client: &Client<UnixStream>, cmd: &Command) -> Result<Output, ExecError> {
    let mut child = client.spawn(&cmd.request)?;
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
        let output = collect(child, cmd.timeout);
        let fed = feeder.map(|f| f.join());
        let output = output?;
        if let Some(Ok(Err(e))) = fed {
            return Err(ExecError::Stdin(e));
        }
        Ok(output)
    })
}

/// How long a timed-out command may take to report its death after the
/// kill before `exec` stops waiting for it.
const KILL_GRACE: Duration = Duration::from_secs(5);

/// Wait for the child (killing it after `timeout`) and take its output.
/// A killed child that does not report back within [`KILL_GRACE`] (say a
/// grandchild keeps its output open) is abandoned, which also fails a
/// stdin write still blocked on it.
fn collect(child: AgentChild<UnixStream>, timeout: Option<Duration>) -> Result<Output, ExecError> {
    if let Some(timeout) = timeout {
        if child.wait_timeout(timeout)?.is_none() {
            child.kill()?;
            if child.wait_timeout(KILL_GRACE)?.is_none() {
                child.abandon();
            }
            return Err(ExecError::Timeout(timeout));
        }
    }
    Ok(child.output()?)
}

/// Write `bytes` to a child's stdin, then close it. A process that exits
/// (or closes its stdin) before reading everything is not an error here:
/// its exit status says how it went.
fn feed(mut stdin: AgentStdin<UnixStream>, bytes: &[u8]) -> std::io::Result<()> {
    match stdin.write_all(bytes) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(e),
        Ok(()) => stdin.close().map_err(std::io::Error::other),
    }
}

/// `spawn`: initial stdin bytes are fed, then stdin closed, by a thread
/// that ends when they are delivered or the process exits.
pub(crate) fn spawn(client: &Client<UnixStream>, cmd: &Command) -> Result<Child, ExecError> {
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
    Ok(Child { inner })
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

    #[test]
    fn exec_stdin_larger_than_window_and_pipe_comes_back_intact() {
        let client = client();
        let input: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 253) as u8).collect();
        let out = exec(&client, &host_sh("cat").stdin(input.clone())).unwrap();
        assert!(out.status.success());
        assert!(out.stdout == input, "got {} bytes", out.stdout.len());
    }

    #[test]
    fn exec_stdin_process_reading_part_is_not_an_error() {
        let client = client();
        let out = exec(&client, &host_sh("head -c 10").stdin(vec![b'a'; 1 << 20])).unwrap();
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
            .timeout(Duration::from_millis(300));
        let started = Instant::now();
        let result = exec(&client, &cmd);
        assert!(matches!(result, Err(ExecError::Timeout(_))), "{result:?}");
        assert!(started.elapsed() < Duration::from_secs(30));
    }
}
