//! Running processes in the guest through chitin's agent.
//!
//! The host side of the agent protocol (`chitin_agent_client`) over the
//! sandbox's vsock device: connect to the device's Unix socket, ask for the
//! agent's port with `CONNECT`, then speak the protocol. One connection is
//! shared by every command of a sandbox; it is opened on first use,
//! retrying while the guest is still booting, and opened again after the
//! agent closed it. When the VM stops, the connection is shut down, so
//! every command and wait still pending ends at once with
//! [`ExecError::GuestStopped`].
//!
//! Nothing of the agent crate or the transport appears in this module's
//! public types: [`Command`], [`Stdio`], [`Signal`], [`Child`] and its
//! streams, [`ExitStatus`], [`Output`] and [`ExecError`] are the facade's.

mod child;
mod command;
#[cfg(test)]
pub(crate) mod fake;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chitin_agent_client::{Client, ClientConfig, ClientError, START_TIMEOUT};
use chitin_agent_protocol::{OutputStream, VERSION};
use chitin_seccomp::{Seccomp, ThreadClass};
use chitin_vcpu::VmControl;

pub use child::{Child, ChildStderr, ChildStdin, ChildStdout, ExitStatus, Output, Signaller};
use child::{Deadline, Parts};
use command::StdioKind;
pub use command::{Capabilities, Command, Mount, Signal, Stdio, DEFAULT_OUTPUT_LIMIT};

use crate::error::ExecError;

/// The vsock port the agent listens on (reserved in the sandbox's vsock
/// device for the agent).
#[doc(inline)]
pub use chitin_agent_protocol::PORT as AGENT_PORT;
/// How long `output`/`spawn` wait for the agent to come up by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(60);

/// The facade's error for an agent client's.
pub(crate) fn from_client(error: ClientError) -> ExecError {
    match error {
        ClientError::Io(e) => ExecError::ConnectionLost(e),
        ClientError::Closed => ExecError::ConnectionLost(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "the agent closed its connection",
        )),
        ClientError::Protocol(m) => ExecError::AgentMisbehaved(m),
        ClientError::VersionMismatch { agent } => ExecError::AgentVersion {
            agent,
            host: VERSION,
        },
        ClientError::AgentError(m) => ExecError::AgentFailed(m),
        ClientError::Refused(m) => ExecError::AgentFailed(format!("refused: {m}")),
        ClientError::Timeout(d) => ExecError::AgentUnresponsive(d),
        ClientError::Stalled(d) => ExecError::AgentStalled(d),
        ClientError::OutputLimit { stream, limit } => ExecError::OutputLimit { stream, limit },
        ClientError::InvalidSignal(n) => ExecError::InvalidSignal(n),
        // A client error this facade does not know yet.
        #[allow(unreachable_patterns)]
        other => ExecError::AgentFailed(other.to_string()),
    }
}

/// Either error type, for [`explain`].
pub(crate) trait IntoExecError {
    fn into_exec(self) -> ExecError;
}

impl IntoExecError for ExecError {
    fn into_exec(self) -> ExecError {
        self
    }
}

impl IntoExecError for ClientError {
    fn into_exec(self) -> ExecError {
        from_client(self)
    }
}

/// How long a closed agent connection waits for the VM to stop before it
/// is reported as closed: a guest that resets shuts its vsock device down
/// just before the reset reaches the VMM.
const STOP_GRACE: Duration = Duration::from_millis(500);

/// An agent error because the guest stopped (or is stopping) says so.
pub(crate) fn explain(control: &VmControl, error: impl IntoExecError) -> ExecError {
    explain_within(control, error, STOP_GRACE)
}

/// [`explain`] without waiting for a stop that may be under way: for calls
/// that return at once (a signal).
pub(crate) fn explain_now(control: &VmControl, error: impl IntoExecError) -> ExecError {
    explain_within(control, error, Duration::ZERO)
}

fn explain_within(control: &VmControl, error: impl IntoExecError, grace: Duration) -> ExecError {
    let error = error.into_exec();
    let reason = match &error {
        ExecError::ConnectionLost(_) if grace.is_zero() => control.exit_reason(),
        ExecError::ConnectionLost(_) => control.wait_timeout(grace),
        ExecError::AgentMisbehaved(_)
        | ExecError::AgentFailed(_)
        | ExecError::AgentStalled(_)
        | ExecError::AgentUnresponsive(_) => control.exit_reason(),
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
    /// The sandbox's rootfs mount point: the root of every command that
    /// does not choose its own.
    default_root: Option<std::ffi::OsString>,
    control: Arc<VmControl>,
    client: Mutex<Option<Arc<Client<UnixStream>>>>,
    /// A second handle on the current connection's stream.
    stream: Arc<Mutex<Option<UnixStream>>>,
    /// A second handle on the stream of a connection attempt in progress.
    attempt: Arc<Mutex<Option<UnixStream>>>,
    /// The seccomp mode of the threads a connection or command starts.
    seccomp: Seccomp,
}

impl AgentLink {
    /// A link through the vsock device's Unix socket at `socket`. When the
    /// VM stops, the connection is shut down, so whatever still waits on
    /// the agent (an exec, a wait, a stdin write) does not wait for a
    /// guest that is gone.
    pub(crate) fn new(
        socket: PathBuf,
        default_root: Option<std::ffi::OsString>,
        control: &Arc<VmControl>,
        seccomp: Seccomp,
    ) -> Self {
        let stream: Arc<Mutex<Option<UnixStream>>> = Arc::default();
        let attempt: Arc<Mutex<Option<UnixStream>>> = Arc::default();
        let hooks = [Arc::clone(&stream), Arc::clone(&attempt)];
        control.on_exit(move || hooks.iter().for_each(|slot| shut_down(slot)));
        Self {
            socket,
            default_root,
            control: Arc::clone(control),
            client: Mutex::new(None),
            stream,
            attempt,
            seccomp,
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
        let (client, stream) = connect(
            &self.socket,
            &self.control,
            left,
            &self.attempt,
            self.seccomp,
        )?;
        let client = Arc::new(client);
        *relock(&self.stream) = Some(stream);
        // A stop between the connect and the line above found no stream to
        // shut down.
        if let Some(reason) = self.control.exit_reason() {
            shut_down(&self.stream);
            return Err(ExecError::GuestStopped(reason));
        }
        *slot = Some(Arc::clone(&client));
        Ok(client)
    }

    /// Close the connection (its client fails what is pending) and any
    /// attempt to open one. Never waits for a caller opening a connection:
    /// that caller sees the VM stopped and drops what it opened.
    pub(crate) fn close(&self) {
        shut_down(&self.stream);
        shut_down(&self.attempt);
        match self.client.try_lock() {
            Ok(mut slot) => drop(slot.take()),
            Err(std::sync::TryLockError::Poisoned(e)) => drop(e.into_inner().take()),
            Err(std::sync::TryLockError::WouldBlock) => {}
        }
    }

    /// Run `cmd` to completion and collect its piped output; with a
    /// timeout, the wait for the agent is part of it.
    pub(crate) fn output(&self, cmd: &Command) -> Result<Output, ExecError> {
        self.spawn(cmd)?.collect(true)
    }

    /// Run `cmd` to completion, its piped output thrown away; its exit
    /// status.
    pub(crate) fn status(&self, cmd: &Command) -> Result<ExitStatus, ExecError> {
        let mut cmd = cmd.clone();
        if cmd.stdout.is_piped() {
            cmd.stdout(Stdio::null());
        }
        if cmd.stderr.is_piped() {
            cmd.stderr(Stdio::null());
        }
        self.output(&cmd).map(|out| out.status)
    }

    /// Start `cmd`; with a timeout, the wait for the agent and the start
    /// are part of it.
    pub(crate) fn spawn(&self, cmd: &Command) -> Result<Child, ExecError> {
        let started = Instant::now();
        let request = cmd.request(self.default_root.as_ref())?;
        // A timeout too long for the clock is no timeout.
        let deadline = cmd.timeout.and_then(|timeout| {
            let at = started.checked_add(timeout)?;
            Some(Deadline { at, timeout })
        });
        // A command's own timeout bounds the wait for the agent, however
        // long (many guests booting at once on a busy host); without one,
        // the default does.
        let wait = deadline.map_or(DEFAULT_CONNECT_TIMEOUT, |d| d.left());
        let client = self.client(wait).map_err(|e| match (e, cmd.timeout) {
            (ExecError::AgentUnreachable(_), Some(t)) if wait < DEFAULT_CONNECT_TIMEOUT => {
                ExecError::Timeout(t)
            }
            (e, _) => e,
        })?;
        spawn(&client, cmd, request, deadline, &self.control, self.seccomp)
            .map_err(|e| explain(&self.control, e))
    }
}

/// Shut down the stream in `slot`, if there is one: its client then fails
/// everything pending with `Closed`. Quick and non-blocking (it runs on
/// the thread that stops the VM).
fn shut_down(slot: &Mutex<Option<UnixStream>>) {
    if let Some(s) = relock(slot).as_ref() {
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
    attempt: &Mutex<Option<UnixStream>>,
    seccomp: Seccomp,
) -> Result<(Client<UnixStream>, UnixStream), ExecError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(reason) = control.exit_reason() {
            return Err(ExecError::GuestStopped(reason));
        }
        match try_connect(socket, deadline, attempt, control, seccomp) {
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

/// Fresh random bytes from the host's kernel generator (a request this
/// small is never cut short).
fn host_entropy() -> std::io::Result<[u8; chitin_agent_client::ENTROPY_LEN]> {
    let mut bytes = [0u8; chitin_agent_client::ENTROPY_LEN];
    // SAFETY: getrandom writes at most `bytes.len()` bytes into `bytes`,
    // which is valid for writes of that length.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    match usize::try_from(n) {
        Ok(n) if n == bytes.len() => Ok(bytes),
        Ok(n) => Err(std::io::Error::other(format!(
            "getrandom gave {n} of {} bytes",
            bytes.len()
        ))),
        Err(_) => Err(std::io::Error::last_os_error()),
    }
}

/// One attempt: `CONNECT <port>`, `OK <n>`, then the protocol handshake,
/// all within [`ATTEMPT_TIMEOUT`] and before `deadline`; the stream sits in
/// `attempt` meanwhile, so a VM stop cuts the attempt short. `Err(None)`:
/// not there yet (or too slow), try again.
fn try_connect(
    socket: &Path,
    deadline: Instant,
    attempt: &Mutex<Option<UnixStream>>,
    control: &VmControl,
    seccomp: Seccomp,
) -> Result<(Client<UnixStream>, UnixStream), Option<ExecError>> {
    let deadline = deadline.min(Instant::now() + ATTEMPT_TIMEOUT);
    let result = (|| {
        let stream = chitin_vsock::host::connect_with(socket, AGENT_PORT, deadline, |s| {
            *relock(attempt) = s.try_clone().ok();
            // A stop before the line above found no stream to shut down.
            if control.exit_reason().is_some() {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        })
        .map_err(|_| None)?;
        let config = ClientConfig {
            handshake_timeout: deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
            seccomp,
            // Every connection reseeds the guest's generator first: a
            // clone restored from a snapshot must not hand out its
            // siblings' random numbers to the commands it runs.
            entropy: Some(host_entropy().map_err(|e| Some(ExecError::HostEntropy(e)))?),
            ..ClientConfig::default()
        };
        let handle = stream.try_clone().map_err(|_| None)?;
        let client = Client::handshake_with(stream, config).map_err(|e| match e {
            // The agent is there and said no: trying again changes nothing.
            e @ (ClientError::VersionMismatch { .. }
            | ClientError::AgentError(_)
            | ClientError::Protocol(_)) => Some(from_client(e)),
            _ => None,
        })?;
        Ok((client, handle))
    })();
    relock(attempt).take();
    result
}

pub(crate) fn relock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Poisoning only means another thread panicked; the data is consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Start `cmd` (its `request`) on `client`: the start within the
/// deadline, then each stream wired as the command asks: piped streams
/// handed to the [`Child`], null outputs thrown away as they come, writer
/// outputs copied by a thread each, stdin bytes fed by a thread.
fn spawn(
    client: &Client<UnixStream>,
    cmd: &Command,
    request: chitin_agent_protocol::ExecRequest,
    deadline: Option<Deadline>,
    control: &Arc<VmControl>,
    seccomp: Seccomp,
) -> Result<Child, ExecError> {
    let start = deadline.map_or(START_TIMEOUT, |d| d.left().min(START_TIMEOUT));
    let mut inner = match client.spawn_timeout(&request, start) {
        Ok(child) => child,
        Err(ClientError::Timeout(_)) if deadline.is_some_and(|d| d.left().is_zero()) => {
            return Err(ExecError::Timeout(deadline.map_or(start, |d| d.timeout)));
        }
        Err(ClientError::Refused(reason)) => {
            return Err(ExecError::SpawnFailed {
                program: cmd.program.to_string_lossy().into_owned(),
                reason,
            })
        }
        Err(e) => return Err(from_client(e)),
    };
    let (mut piped_stdin, mut feeder, mut pumps) = (None, None, Vec::new());
    match (&cmd.stdin.0, inner.stdin()) {
        (StdioKind::Bytes(bytes), Some(stdin)) => {
            let bytes = Arc::clone(bytes);
            let error = Arc::new(Mutex::new(None));
            let slot = Arc::clone(&error);
            let thread =
                chitin_seccomp::spawn("chitin-stdin", ThreadClass::Feeder, seccomp, move || {
                    *relock(&slot) = child::feed(stdin, &bytes).err()
                });
            match thread {
                Ok(thread) => feeder = Some(child::Feeder { thread, error }),
                Err(e) => {
                    let _ = inner.kill();
                    return Err(ExecError::Thread("stdin", e));
                }
            }
        }
        (_, stdin) => piped_stdin = stdin,
    }
    let mut piped = [None, None];
    for (stream, stdio) in [
        (OutputStream::Stdout, &cmd.stdout),
        (OutputStream::Stderr, &cmd.stderr),
    ] {
        let reader = match stream {
            OutputStream::Stdout => inner.stdout(),
            OutputStream::Stderr => inner.stderr(),
        };
        match &stdio.0 {
            StdioKind::Piped => piped[stream.index()] = Some(reader),
            StdioKind::Writer(writer) => {
                let writer = Arc::clone(writer);
                let thread = chitin_seccomp::spawn(
                    "chitin-output",
                    ThreadClass::Writer,
                    seccomp,
                    move || child::pump(reader, writer),
                );
                match thread {
                    Ok(thread) => pumps.push(thread),
                    Err(e) => {
                        let _ = inner.kill();
                        return Err(ExecError::Thread(stream.name(), e));
                    }
                }
            }
            // Null (bytes were refused when the request was made).
            StdioKind::Null | StdioKind::Bytes(_) => inner.discard(stream),
        }
    }
    let [stdout, stderr] = piped;
    Ok(Child::new(Parts {
        inner,
        control: Arc::clone(control),
        output_limit: cmd.output_limit,
        deadline,
        stdin: piped_stdin,
        stdout,
        stderr,
        pumps,
        feeder,
    }))
}

#[cfg(test)]
mod tests {
    use super::fake::{fake_vsock_device, host_sh, link};
    use super::*;
    use chitin_vcpu::ExitReason;
    use std::io::{Read, Write};

    #[test]
    fn agent_link_reconnects_after_the_agent_closes_its_connection() {
        let (path, accepted, _device) = fake_vsock_device();
        let control = Arc::new(VmControl::new());
        let link = AgentLink::new(path, None, &control, Seccomp::Enforce);
        let out = link.output(&host_sh("echo one")).unwrap();
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
        let out = link.output(&host_sh("echo two")).unwrap();
        assert_eq!(out.stdout, b"two\n");
        assert_eq!(accepted.lock().unwrap().len(), 1, "one new connection");
    }

    #[test]
    fn vm_stop_ends_a_pending_exec_and_wait_at_once() {
        let (path, _accepted, _device) = fake_vsock_device();
        let control = Arc::new(VmControl::new());
        let link = Arc::new(AgentLink::new(path, None, &control, Seccomp::Enforce));
        let mut child = link.spawn(&host_sh("sleep 1000")).unwrap();
        let pending = {
            let link = Arc::clone(&link);
            std::thread::spawn(move || {
                let result = link.output(&host_sh("sleep 1000"));
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
        let again = link.output(&host_sh("true"));
        assert!(
            matches!(again, Err(ExecError::GuestStopped(_))),
            "{again:?}"
        );
    }

    #[test]
    fn exec_output_over_its_limit_is_killed_with_a_typed_error() {
        let (link, _control, _device) = link();
        let started = Instant::now();
        let result = link.output(host_sh("yes").output_limit(1 << 20));
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
        let out = link.output(&host_sh("echo after")).unwrap();
        assert_eq!(out.stdout, b"after\n");
    }

    #[test]
    fn exec_stdin_larger_than_window_and_pipe_comes_back_intact() {
        let (link, _control, _device) = link();
        let input: Vec<u8> = (0..(4u32 << 20)).map(|i| (i % 253) as u8).collect();
        let out = link
            .output(host_sh("cat").stdin(Stdio::bytes(input.clone())))
            .unwrap();
        assert!(out.status.success());
        assert!(out.stdout == input, "got {} bytes", out.stdout.len());
    }

    #[test]
    fn exec_stdin_process_reading_part_is_not_an_error() {
        let (link, _control, _device) = link();
        let out = link
            .output(host_sh("head -c 10").stdin(Stdio::bytes(vec![b'a'; 1 << 20])))
            .unwrap();
        assert_eq!(out.stdout, vec![b'a'; 10]);
        assert!(out.status.success());
    }

    #[test]
    fn exec_timeout_returns_even_when_a_grandchild_holds_the_pipes() {
        let (link, _control, _device) = link();
        // The shell is killed at the timeout; the background sleep keeps
        // stdout open and nobody reads the 4 MiB of stdin.
        let mut cmd = host_sh("sleep 1000 & sleep 1000");
        cmd.stdin(Stdio::bytes(vec![0u8; 4 << 20]))
            .timeout(Duration::from_secs(1));
        let started = Instant::now();
        let result = link.output(&cmd);
        assert!(matches!(result, Err(ExecError::Timeout(_))), "{result:?}");
        // Within twice the timeout: the kill's grace is half of it.
        let took = started.elapsed();
        eprintln!("exec with a 1 s timeout returned after {took:?}");
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }

    #[test]
    fn stdio_null_writer_and_piped_each_do_what_they_say() {
        let (link, _control, _device) = link();
        // A writer gets stderr whole while stdout is collected; a null
        // output is thrown away (the process is never held on it).
        let seen = Arc::new(Mutex::new(Vec::new()));
        struct Into(Arc<Mutex<Vec<u8>>>);
        impl Write for Into {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut cmd = host_sh("head -c 3000000 /dev/zero >&2; echo out");
        cmd.stderr(Stdio::writer(Into(Arc::clone(&seen))));
        let out = link.output(&cmd).unwrap();
        assert_eq!(out.stdout, b"out\n");
        assert!(out.stderr.is_empty());
        assert_eq!(seen.lock().unwrap().len(), 3_000_000);
        let mut cmd = host_sh("head -c 3000000 /dev/zero; echo err >&2");
        cmd.stdout(Stdio::null());
        let out = link.output(&cmd).unwrap();
        assert!(out.stdout.is_empty());
        assert_eq!(out.stderr, b"err\n");
    }

    #[test]
    fn child_streams_are_fields_taken_once() {
        let (link, _control, _device) = link();
        let mut cmd = host_sh("cat; echo done >&2");
        cmd.stdin(Stdio::piped());
        let mut child = link.spawn(&cmd).unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        stdin.write_all(b"ping").unwrap();
        drop(stdin);
        let mut got = Vec::new();
        stdout.read_to_end(&mut got).unwrap();
        assert_eq!(got, b"ping");
        assert!(child.stdin.is_none() && child.stdout.is_none());
        // What is left in the fields is what wait_with_output collects.
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            (out.stdout.as_slice(), out.stderr.as_slice()),
            (&b""[..], &b"done\n"[..])
        );
    }

    #[test]
    fn try_wait_signal_and_a_spawn_timeout() {
        let (link, _control, _device) = link();
        let mut child = link.spawn(&host_sh("sleep 1000")).unwrap();
        assert_eq!(child.try_wait().unwrap(), None);
        child.signal(Signal::TERM).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(Signal::TERM));
        assert_eq!(status.code(), None);
        // A spawned child's timeout ends its waits and kills it.
        let mut cmd = host_sh("sleep 1000");
        cmd.timeout(Duration::from_millis(300));
        let mut child = link.spawn(&cmd).unwrap();
        let started = Instant::now();
        let waited = child.wait();
        assert!(matches!(waited, Err(ExecError::Timeout(_))), "{waited:?}");
        eprintln!(
            "a spawned child's 300 ms timeout ended its wait after {:?}",
            started.elapsed()
        );
        // It was killed; a later wait sees that.
        let status = child.wait_timeout(Duration::from_secs(5)).unwrap();
        assert_eq!(status.and_then(|s| s.signal()), Some(Signal::KILL));
    }

    #[test]
    fn a_program_the_agent_cannot_start_is_spawn_failed() {
        let (link, _control, _device) = link();
        let result = link.output(&Command::new("/no/such/program"));
        assert!(
            matches!(&result, Err(ExecError::SpawnFailed { program, .. }) if program == "/no/such/program"),
            "{result:?}"
        );
    }

    #[test]
    fn null_outputs_are_not_waited_for_after_the_exit() {
        let (link, _control, _device) = link();
        // A background sleep holds both outputs open after the shell
        // exits; with nothing collected, the exit is the end.
        let mut cmd = host_sh("sleep 1000 & exit 3");
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let started = Instant::now();
        let out = link.output(&cmd).unwrap();
        assert_eq!(out.status.code(), Some(3));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_dropped_stdout_reader_never_holds_the_process() {
        let (link, _control, _device) = link();
        // 3 MB is far past the window: the process would wait on its pipe
        // if the dropped reader's output were kept.
        let mut cmd = host_sh("head -c 3000000 /dev/zero; echo done >&2");
        let mut child = link.spawn(cmd.timeout(Duration::from_secs(20))).unwrap();
        drop(child.stdout.take());
        let mut stderr = child.stderr.take().unwrap();
        assert_eq!(child.wait().unwrap().code(), Some(0));
        let mut err = String::new();
        stderr.read_to_string(&mut err).unwrap();
        assert_eq!(err, "done\n");
    }
}
