//! A process running in the guest ([`Child`]), its standard streams, and
//! how it ended ([`ExitStatus`], [`Output`]), shaped like
//! `std::process::{Child, ChildStdin, ChildStdout, ChildStderr}`.

use std::fmt;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chitin_agent_client::{self as client, ClientError};
use chitin_agent_protocol as protocol;
use chitin_vcpu::VmControl;

use super::command::Signal;
use super::{explain, from_client};
use crate::error::ExecError;

/// How a guest process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// This signal killed it (the number is what the guest reported).
    Signal(Signal),
}

impl ExitStatus {
    /// True when it exited with code 0.
    pub fn success(&self) -> bool {
        *self == ExitStatus::Code(0)
    }

    /// Its exit code, if it exited.
    pub fn code(&self) -> Option<i32> {
        match self {
            ExitStatus::Code(c) => Some(*c),
            ExitStatus::Signal(_) => None,
        }
    }

    /// The signal that killed it, if one did.
    pub fn signal(&self) -> Option<Signal> {
        match self {
            ExitStatus::Signal(s) => Some(*s),
            ExitStatus::Code(_) => None,
        }
    }

    pub(crate) fn from_agent(status: protocol::ExitStatus) -> Self {
        match status {
            protocol::ExitStatus::Code(c) => ExitStatus::Code(c),
            protocol::ExitStatus::Signal(n) => ExitStatus::Signal(Signal::from_guest(n)),
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => write!(f, "killed by signal {}", s.number()),
        }
    }
}

/// What a finished guest process produced, like `std::process::Output`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// How it ended.
    pub status: ExitStatus,
    /// What it wrote to a piped stdout.
    pub stdout: Vec<u8>,
    /// What it wrote to a piped stderr.
    pub stderr: Vec<u8>,
}

impl Output {
    fn from_agent(output: client::Output) -> Self {
        Self {
            status: ExitStatus::from_agent(output.status),
            stdout: output.stdout,
            stderr: output.stderr,
        }
    }
}

/// A command's deadline: when, and the timeout it came from.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Deadline {
    pub(crate) at: Instant,
    pub(crate) timeout: Duration,
}

impl Deadline {
    pub(crate) fn left(&self) -> Duration {
        self.at.saturating_duration_since(Instant::now())
    }
}

/// How long a killed command may take to report its death before a
/// timed-out `output` stops waiting for it (at most half its timeout).
const KILL_GRACE: Duration = Duration::from_secs(5);

/// A process running in the guest, from
/// [`RunningSandbox::spawn`](crate::RunningSandbox::spawn).
///
/// Like `std::process::Child`, its piped streams are public fields, each
/// taken once. Its output works like a pipe's: what nobody reads is held
/// back (at most 256 KiB per output on the host, then the process waits
/// on its pipe in the guest). When the VM stops, every wait on it ends
/// with [`ExecError::GuestStopped`]. Dropping it neither kills nor waits
/// for the process; its piped output is thrown away from then on.
pub struct Child {
    /// Its stdin, when the command's stdin was [`Stdio::piped`](crate::Stdio::piped).
    pub stdin: Option<ChildStdin>,
    /// Its stdout, when piped.
    pub stdout: Option<ChildStdout>,
    /// Its stderr, when piped.
    pub stderr: Option<ChildStderr>,
    inner: client::Child,
    control: Arc<VmControl>,
    output_limit: usize,
    deadline: Option<Deadline>,
    /// Copies of output into a caller's writer.
    pumps: Vec<JoinHandle<()>>,
    /// The thread feeding [`Stdio::bytes`](crate::Stdio::bytes) to stdin.
    feeder: Option<JoinHandle<io::Result<()>>>,
}

impl fmt::Debug for Child {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Child")
            .field("id", &self.id())
            .field("stdin", &self.stdin.is_some())
            .field("stdout", &self.stdout.is_some())
            .field("stderr", &self.stderr.is_some())
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

/// The parts [`Child::new`] puts together.
pub(crate) struct Parts {
    pub(crate) inner: client::Child,
    pub(crate) control: Arc<VmControl>,
    pub(crate) output_limit: usize,
    pub(crate) deadline: Option<Deadline>,
    pub(crate) stdin: Option<client::ChildStdin>,
    pub(crate) stdout: Option<client::ChildOutput>,
    pub(crate) stderr: Option<client::ChildOutput>,
    pub(crate) pumps: Vec<JoinHandle<()>>,
    pub(crate) feeder: Option<JoinHandle<io::Result<()>>>,
}

impl Child {
    pub(crate) fn new(parts: Parts) -> Self {
        Self {
            stdin: parts.stdin.map(|inner| ChildStdin { inner }),
            stdout: parts.stdout.map(|inner| ChildStdout { inner }),
            stderr: parts.stderr.map(|inner| ChildStderr { inner }),
            inner: parts.inner,
            control: parts.control,
            output_limit: parts.output_limit,
            deadline: parts.deadline,
            pumps: parts.pumps,
            feeder: parts.feeder,
        }
    }

    /// Its pid in the guest.
    pub fn id(&self) -> u32 {
        self.inner.pid()
    }

    /// Send it `signal`; returns at once (the signal is queued).
    pub fn signal(&self, signal: Signal) -> Result<(), ExecError> {
        self.inner
            .signal(signal.number())
            .map_err(|e| explain(&self.control, e))
    }

    /// Kill it (SIGKILL); returns at once.
    pub fn kill(&mut self) -> Result<(), ExecError> {
        self.signal(Signal::KILL)
    }

    /// Close its stdin (if still here) and wait for it to exit, like
    /// `std::process::Child::wait`: output not read stays unread, so a
    /// process whose unread output fills its window waits on its pipe (read
    /// it, or use [`Child::wait_with_output`]). Output copied into a
    /// [`Stdio::writer`](crate::Stdio::writer) may still be on its way.
    pub fn wait(&mut self) -> Result<ExitStatus, ExecError> {
        drop(self.stdin.take());
        match self.deadline {
            None => self.inner.wait().map(ExitStatus::from_agent),
            Some(deadline) => match self.inner.wait_timeout(deadline.left()) {
                Ok(Some(status)) => Ok(ExitStatus::from_agent(status)),
                Ok(None) => return Err(self.expire(deadline)),
                Err(e) => Err(e),
            },
        }
        .map_err(|e| explain(&self.control, e))
    }

    /// Whether it has exited, without blocking (stdin stays open).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, ExecError> {
        self.wait_timeout(Duration::ZERO)
    }

    /// Wait at most `timeout` for it to exit; `None` if it still runs
    /// (stdin stays open).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, ExecError> {
        let wait = self.deadline.map_or(timeout, |d| d.left().min(timeout));
        match self.inner.wait_timeout(wait) {
            Ok(Some(status)) => Ok(Some(ExitStatus::from_agent(status))),
            Ok(None) => match self.deadline {
                Some(deadline) if deadline.left().is_zero() => Err(self.expire(deadline)),
                _ => Ok(None),
            },
            Err(e) => Err(explain(&self.control, e)),
        }
    }

    /// Close its stdin (if still here), wait for its exit and the end of
    /// its output, and return its status with the piped output still held
    /// in `self.stdout` / `self.stderr` (a stream taken out of the field is
    /// left to its reader): at most the command's
    /// [`Command::output_limit`](crate::Command::output_limit) of each
    /// ([`ExecError::OutputLimit`] beyond it; the process is not killed).
    pub fn wait_with_output(self) -> Result<Output, ExecError> {
        self.collect(false)
    }

    /// [`Child::wait_with_output`]; with `kill_on_limit`, a process that
    /// writes past the limit is killed, as one past its deadline is.
    pub(crate) fn collect(mut self, kill_on_limit: bool) -> Result<Output, ExecError> {
        drop(self.stdin.take());
        let take = [self.stdout.take().is_some(), self.stderr.take().is_some()];
        let left = self.deadline.map(|d| d.left());
        let failure = match self.inner.collect_some(take, self.output_limit, left) {
            Ok(output) => {
                for pump in self.pumps.drain(..) {
                    let _ = pump.join();
                }
                if let Some(Ok(Err(e))) = self.feeder.take().map(JoinHandle::join) {
                    return Err(ExecError::Stdin(e));
                }
                return Ok(Output::from_agent(output));
            }
            Err(ClientError::Timeout(_)) => {
                ExecError::Timeout(self.deadline.map_or(Duration::ZERO, |d| d.timeout))
            }
            Err(ClientError::OutputLimit { stream, limit }) if kill_on_limit => {
                ExecError::OutputLimit { stream, limit }
            }
            Err(ClientError::OutputLimit { stream, limit }) => {
                return Err(ExecError::OutputLimit { stream, limit })
            }
            Err(e) => return Err(explain(&self.control, e)),
        };
        self.inner.kill().map_err(|e| explain(&self.control, e))?;
        let grace = self
            .deadline
            .map_or(KILL_GRACE, |d| (d.timeout / 2).min(KILL_GRACE));
        let _ = self.inner.wait_timeout(grace);
        // Its output and a stdin write still blocked on it end here, even
        // while a grandchild holds its pipes.
        self.inner.abandon();
        Err(failure)
    }

    /// Past its deadline: kill it, and say so. Later waits wait for its
    /// death as for any exit.
    fn expire(&mut self, deadline: Deadline) -> ExecError {
        let _ = self.inner.signal(Signal::KILL.number());
        self.deadline = None;
        ExecError::Timeout(deadline.timeout)
    }
}

/// Copy one output into a caller's writer until it ends; after a write
/// error the rest is read and thrown away, so the process never waits on
/// that pipe.
pub(crate) fn pump(mut from: client::ChildOutput, to: super::command::SharedWriter) {
    let mut buf = vec![0u8; 64 << 10];
    let mut failed = false;
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) if !failed => {
                let mut writer = to.lock().unwrap_or_else(|e| e.into_inner());
                failed = writer.write_all(&buf[..n]).is_err() || writer.flush().is_err();
            }
            Ok(_) => {}
        }
    }
}

/// Write `bytes` to a child's stdin, then close it. A process that exits
/// (or closes its stdin) before reading everything is not an error here:
/// its exit status says how it went.
pub(crate) fn feed(mut stdin: client::ChildStdin, bytes: &[u8]) -> io::Result<()> {
    match stdin.write_all(bytes) {
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(e),
        Ok(()) => stdin
            .close()
            .map_err(|e| io::Error::other(from_client(e).to_string())),
    }
}

/// An agent client's i/o error, without the agent's types inside.
fn plain(e: io::Error) -> io::Error {
    io::Error::new(e.kind(), e.to_string())
}

/// Writes a guest process's stdin; dropping it sends EOF.
///
/// A write blocks, like one to a full pipe, while a window's worth of
/// earlier stdin is queued or not yet passed on to the process by the
/// agent; it fails with `BrokenPipe` once the process has exited or the
/// connection is gone.
pub struct ChildStdin {
    inner: client::ChildStdin,
}

impl Write for ChildStdin {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf).map_err(plain)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush().map_err(plain)
    }
}

impl fmt::Debug for ChildStdin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildStdin").finish_non_exhaustive()
    }
}

/// Reads a guest process's stdout; EOF once it has ended and everything
/// is read. What is read is credited back to the agent.
pub struct ChildStdout {
    inner: client::ChildOutput,
}

/// Reads a guest process's stderr, as [`ChildStdout`] does stdout.
pub struct ChildStderr {
    inner: client::ChildOutput,
}

impl Read for ChildStdout {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(plain)
    }
}

impl Read for ChildStderr {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(plain)
    }
}

impl fmt::Debug for ChildStdout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildStdout").finish_non_exhaustive()
    }
}

impl fmt::Debug for ChildStderr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChildStderr").finish_non_exhaustive()
    }
}
