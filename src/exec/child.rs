//! A process running in the guest ([`Child`]), its standard streams, and
//! how it ended ([`ExitStatus`], [`Output`]), shaped like
//! `std::process::{Child, ChildStdin, ChildStdout, ChildStderr}`.

use std::fmt;
use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chitin_agent_client::{self as client, ClientError};
use chitin_agent_protocol::{self as protocol, OutputStream};
use chitin_vcpu::VmControl;

use super::command::Signal;
use super::{explain, explain_now, from_client, relock};
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

    /// The agent's report; a signal Linux does not have is the agent
    /// breaking the protocol.
    pub(crate) fn from_agent(status: protocol::ExitStatus) -> Result<Self, ExecError> {
        match status {
            protocol::ExitStatus::Code(c) => Ok(ExitStatus::Code(c)),
            protocol::ExitStatus::Signal(n) => Signal::new(n)
                .map(ExitStatus::Signal)
                .ok_or_else(|| ExecError::AgentMisbehaved(format!("exit by signal {n}"))),
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
    fn from_agent(output: client::Output) -> Result<Self, ExecError> {
        Ok(Self {
            status: ExitStatus::from_agent(output.status)?,
            stdout: output.stdout,
            stderr: output.stderr,
        })
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

    /// How long a command killed at this deadline may take to report its
    /// death before waits on it give up again.
    fn grace(&self) -> Duration {
        (self.timeout / 2).min(KILL_GRACE)
    }
}

/// How long a killed command may take to report its death before a
/// timed-out wait stops waiting for it (at most half its timeout).
const KILL_GRACE: Duration = Duration::from_secs(5);

/// A process running in the guest, from
/// [`RunningSandbox::spawn`](crate::RunningSandbox::spawn).
///
/// Like `std::process::Child`, its piped streams are public fields, each
/// taken once. Its output works like a pipe's: what nobody reads is held
/// back (at most 256 KiB per output on the host, then the process waits
/// on its pipe in the guest). When the VM stops, every wait on it ends
/// with [`ExecError::GuestStopped`]. Dropping it neither kills nor waits
/// for the process: piped output still in its fields is thrown away from
/// then on, while a [`Stdio::writer`](crate::Stdio::writer) goes on
/// receiving its output and [`Stdio::bytes`](crate::Stdio::bytes) goes on
/// being fed until the process ends them (exits, or closes the stream) or
/// the VM stops.
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
    /// The deadline passed and the process was killed.
    expired: bool,
    /// Copies of output into a caller's writer.
    pumps: Vec<JoinHandle<()>>,
    /// The thread feeding [`Stdio::bytes`](crate::Stdio::bytes) to stdin.
    feeder: Option<Feeder>,
}

/// A thread feeding stdin bytes, and where it leaves its error.
pub(crate) struct Feeder {
    pub(crate) thread: JoinHandle<()>,
    pub(crate) error: Arc<Mutex<Option<io::Error>>>,
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
    pub(crate) feeder: Option<Feeder>,
}

impl Child {
    pub(crate) fn new(parts: Parts) -> Self {
        Self {
            stdin: parts.stdin.map(|inner| ChildStdin { inner }),
            stdout: parts.stdout.map(|inner| ChildStdout {
                inner: Reader(Some(inner)),
            }),
            stderr: parts.stderr.map(|inner| ChildStderr {
                inner: Reader(Some(inner)),
            }),
            inner: parts.inner,
            control: parts.control,
            output_limit: parts.output_limit,
            deadline: parts.deadline,
            expired: false,
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
            .map_err(|e| explain_now(&self.control, e))
    }

    /// Kill it (SIGKILL); returns at once.
    pub fn kill(&mut self) -> Result<(), ExecError> {
        self.signal(Signal::KILL)
    }

    /// Something that signals this process from another thread while
    /// this one waits on it (a `wait` holds `&mut self`): what a runtime
    /// needs to deliver `kill` to a process it is also reaping.
    pub fn signaller(&self) -> Signaller {
        Signaller {
            inner: self.inner.signaller(),
            control: Arc::clone(&self.control),
        }
    }

    /// Close its stdin (if still here) and wait for it to exit, like
    /// `std::process::Child::wait`: output not read stays unread, so a
    /// process whose unread output fills its window waits on its pipe (read
    /// it, or use [`Child::wait_with_output`]). Output copied into a
    /// [`Stdio::writer`](crate::Stdio::writer) may still be on its way.
    /// With a [`Command::timeout`](crate::Command::timeout), it ends at the
    /// deadline (the process is killed: [`ExecError::Timeout`]), and a wait
    /// after that ends once the kill's grace has passed too.
    pub fn wait(&mut self) -> Result<ExitStatus, ExecError> {
        drop(self.stdin.take());
        loop {
            // Without a limit it returns only with the end.
            if let Some(status) = self.wait_until(None)? {
                return Ok(status);
            }
        }
    }

    /// Whether it has exited, without blocking (stdin stays open).
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>, ExecError> {
        self.wait_timeout(Duration::ZERO)
    }

    /// Wait at most `timeout` for it to exit; `None` if it still runs
    /// (stdin stays open).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>, ExecError> {
        self.wait_until(Some(timeout))
    }

    /// The latest the next wait may end: the deadline, or after it the
    /// kill's grace.
    fn limit(&self) -> Option<(Instant, Deadline)> {
        let d = self.deadline?;
        let at = if self.expired {
            d.at.checked_add(d.grace()).unwrap_or(d.at)
        } else {
            d.at
        };
        Some((at, d))
    }

    /// Wait up to `timeout` (`None`: for ever), and never past the limit.
    fn wait_until(&mut self, timeout: Option<Duration>) -> Result<Option<ExitStatus>, ExecError> {
        let limit = self.limit();
        let left = limit.map(|(at, _)| at.saturating_duration_since(Instant::now()));
        let wait = match (timeout, left) {
            (Some(t), Some(l)) => Some(t.min(l)),
            (t, l) => t.or(l),
        };
        let status = match wait {
            None => self.inner.wait().map(Some),
            Some(wait) => self.inner.wait_timeout(wait),
        }
        .map_err(|e| explain(&self.control, e))?;
        match (status, limit) {
            (Some(status), _) => ExitStatus::from_agent(status).map(Some),
            (None, Some((at, deadline))) if Instant::now() >= at => Err(self.expire(deadline)),
            (None, _) => Ok(None),
        }
    }

    /// Close its stdin (if still here), wait for its exit and the end of
    /// its output, and return its status with the piped output still held
    /// in `self.stdout` / `self.stderr` (a stream taken out of the field is
    /// left to its reader): at most the command's
    /// [`Command::output_limit`](crate::Command::output_limit) of each
    /// ([`ExecError::OutputLimit`] beyond it; the process is not killed,
    /// and what it writes to those outputs from then on is thrown away).
    pub fn wait_with_output(self) -> Result<Output, ExecError> {
        self.collect(false)
    }

    /// [`Child::wait_with_output`]; with `kill_on_limit`, a process that
    /// writes past the limit is killed, as one past its deadline is.
    pub(crate) fn collect(mut self, kill_on_limit: bool) -> Result<Output, ExecError> {
        drop(self.stdin.take());
        // The piped outputs still here are collected (and no longer
        // discarded when their reader goes); one taken out is its reader's.
        let take = [
            self.stdout.take().map(|s| s.inner.disarm()).is_some(),
            self.stderr.take().map(|s| s.inner.disarm()).is_some(),
        ];
        let left = self
            .limit()
            .map(|(at, _)| at.saturating_duration_since(Instant::now()));
        let failure = match self.inner.collect_some(take, self.output_limit, left) {
            Ok(output) => match self.finish_helpers() {
                Ok(()) => return Output::from_agent(output),
                Err(e @ ExecError::Timeout(_)) => e,
                Err(e) => return Err(e),
            },
            Err(ClientError::Timeout(_)) => {
                ExecError::Timeout(self.deadline.map_or(Duration::ZERO, |d| d.timeout))
            }
            Err(ClientError::OutputLimit { stream, limit }) if kill_on_limit => {
                ExecError::OutputLimit { stream, limit }
            }
            Err(ClientError::OutputLimit { stream, limit }) => {
                // The process runs on: what it writes to the collected
                // outputs from now on is thrown away, never held.
                for (stream, taken) in OutputStream::BOTH.into_iter().zip(take) {
                    if taken {
                        self.inner.discard(stream);
                    }
                }
                return Err(ExecError::OutputLimit { stream, limit });
            }
            Err(e) => return Err(explain(&self.control, e)),
        };
        if !self.expired {
            self.inner.kill().map_err(|e| explain(&self.control, e))?;
            let grace = self.deadline.map_or(KILL_GRACE, |d| d.grace());
            let _ = self.inner.wait_timeout(grace);
        }
        // Its output and a stdin write still blocked on it end here, even
        // while a grandchild holds its pipes.
        self.inner.abandon();
        Err(failure)
    }

    /// After the process and its collected outputs ended: wait for the
    /// copies into writers to finish (their outputs end too, unless a
    /// grandchild holds them: then up to the deadline), and report a stdin
    /// write that failed.
    fn finish_helpers(&mut self) -> Result<(), ExecError> {
        let limit = self.limit();
        for pump in self.pumps.drain(..) {
            if let Some((at, deadline)) = limit {
                while !pump.is_finished() {
                    if Instant::now() >= at {
                        return Err(ExecError::Timeout(deadline.timeout));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
            let _ = pump.join();
        }
        match self.feeder.take() {
            // The process has exited: the feeder ends on its closed stdin.
            Some(feeder) => {
                let _ = feeder.thread.join();
                match relock(&feeder.error).take() {
                    Some(e) => Err(ExecError::Stdin(e)),
                    None => Ok(()),
                }
            }
            None => Ok(()),
        }
    }

    /// Past its deadline: kill it (once), and say so. Later waits wait
    /// for its death up to the kill's grace.
    fn expire(&mut self, deadline: Deadline) -> ExecError {
        if !self.expired {
            let _ = self.inner.signal(Signal::KILL.number());
            self.expired = true;
        }
        ExecError::Timeout(deadline.timeout)
    }
}

/// Signals one guest process from any thread (see [`Child::signaller`]).
/// It names the process by the agent's id for the exec, not by its pid, so
/// a signal sent after the process was reaped never reaches another
/// process that reused the pid.
#[derive(Clone)]
pub struct Signaller {
    inner: client::Signaller,
    control: Arc<VmControl>,
}

impl fmt::Debug for Signaller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signaller").finish_non_exhaustive()
    }
}

impl Signaller {
    /// Send the process `signal`; returns at once (the signal is queued).
    pub fn signal(&self, signal: Signal) -> Result<(), ExecError> {
        self.inner
            .signal(signal.number())
            .map_err(|e| explain_now(&self.control, e))
    }

    /// Give the process's terminal ([`Command::tty`](crate::Command::tty))
    /// a new size; returns at once. A process without one ignores it.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ExecError> {
        self.inner
            .resize(rows, cols)
            .map_err(|e| explain_now(&self.control, e))
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
                let mut writer = super::relock(&to);
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

/// One output's reader; dropping it throws the rest of that output away
/// (as closing a pipe's read end would), so the process never waits on it.
struct Reader(Option<client::ChildOutput>);

impl Reader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.0 {
            Some(reader) => reader.read(buf).map_err(plain),
            None => Ok(0),
        }
    }

    /// Let go of the reader without discarding its output.
    fn disarm(mut self) {
        self.0.take();
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if let Some(reader) = self.0.take() {
            reader.discard();
        }
    }
}

/// Reads a guest process's stdout; EOF once it has ended and everything
/// is read. What is read is credited back to the agent; dropping it throws
/// the rest away (the process never waits on its stdout).
pub struct ChildStdout {
    inner: Reader,
}

/// Reads a guest process's stderr, as [`ChildStdout`] does stdout.
pub struct ChildStderr {
    inner: Reader,
}

impl Read for ChildStdout {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
}

impl Read for ChildStderr {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
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
