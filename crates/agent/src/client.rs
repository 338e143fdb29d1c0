//! The host side of the exec protocol: run processes in the guest over one
//! connection to the agent.
//!
//! A [`Client`] owns one stream. One demultiplexer thread reads every frame
//! and hands it to the [`Child`] it belongs to; writes go through a lock on
//! the stream, so several threads can spawn, feed and signal processes at
//! once.
//!
//! Flow control is per child (protocol version 2), so one child never holds
//! up another: the agent sends a child's output only as far as the client
//! has returned credit, and the client returns it as the child's output is
//! pulled (read from either stream, or collected by [`Child::wait`] and
//! [`Child::output`]). A child nobody pulls from stops on its full pipe in
//! the guest. [`ChildStdin`] writes block while the agent has not yet
//! passed earlier stdin on to the process.
//!
//! Nothing the agent sends is trusted: frames are size-capped by
//! [`crate::protocol`], and output beyond the credit, or credit beyond the
//! window, ends the connection as a protocol violation, so a hostile guest
//! cannot grow host memory beyond [`WINDOW`] per child that the caller
//! does not collect.
//!
//! Dropping the [`Client`] shuts the stream down; the agent then kills every
//! process still running on this connection.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::protocol::{
    self, ExecRequest, ExitStatus, Frame, ProtocolError, MAX_CHUNK, VERSION, WINDOW,
};
use crate::window::Window;

/// Output credit is returned to the agent in batches of at least this
/// much (it then still has three quarters of its window to go on with).
const CREDIT_BATCH: u32 = WINDOW / 4;
/// How long `spawn` waits for STARTED or ERROR.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the handshake waits for the agent's HELLO.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a blocked reader lets others at the shared inbox.
const POLL: Duration = Duration::from_millis(20);
/// `SIGKILL` on Linux.
const SIGKILL: i32 = 9;

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The stream failed.
    #[error("agent connection i/o")]
    Io(#[source] io::Error),
    /// The agent sent something that is not the protocol.
    #[error("agent broke the protocol: {0}")]
    Protocol(String),
    /// The agent speaks another protocol version.
    #[error("agent speaks protocol version {agent}, client speaks {VERSION}")]
    VersionMismatch {
        /// The agent's version.
        agent: u32,
    },
    /// The agent refused the request (for example: no such file).
    #[error("agent: {0}")]
    AgentError(String),
    /// The connection is gone: the agent closed it or the guest died.
    #[error("agent connection closed")]
    Closed,
    /// The agent did not answer in time.
    #[error("agent did not answer within {0:?}")]
    Timeout(Duration),
}

impl From<ProtocolError> for ClientError {
    fn from(e: ProtocolError) -> Self {
        match e {
            ProtocolError::Io(e) => ClientError::Io(e),
            ProtocolError::Truncated => ClientError::Closed,
            other => ClientError::Protocol(other.to_string()),
        }
    }
}

/// A byte stream the client can split into a reader and a writer.
pub trait ClientStream: Read + Write + Send + Sized + 'static {
    /// A second handle on the same stream.
    fn try_clone_stream(&self) -> io::Result<Self>;
    /// Shut both directions down, waking a blocked reader.
    fn shutdown_stream(&self) -> io::Result<()>;
    /// Bound blocking reads (`None`: wait forever).
    fn set_read_timeout_stream(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl ClientStream for UnixStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_stream(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Both)
    }
    fn set_read_timeout_stream(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
}

impl ClientStream for TcpStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shutdown_stream(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Both)
    }
    fn set_read_timeout_stream(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(timeout)
    }
}

/// What a finished process produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// How it ended.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
}

/// What the demultiplexer hands a child.
enum Event {
    Started(u32),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(ExitStatus),
    Error(String),
}

/// Where the demultiplexer delivers one child's frames.
struct Route {
    events: Sender<Event>,
    /// STARTED arrived (a second one breaks the protocol).
    started: bool,
    /// The child was dropped or abandoned: output is thrown away and
    /// credited at once.
    discard: bool,
    /// Credit for this child's stdin.
    stdin: Arc<Window>,
    /// Output bytes received and not yet credited back to the agent.
    output_unacked: Arc<AtomicU32>,
}

/// Routes from stream id to child, and why the connection ended.
struct Routes {
    children: HashMap<u32, Route>,
    closed: Option<ClientError>,
}

struct Shared<S> {
    writer: Mutex<S>,
    routes: Mutex<Routes>,
    next_id: AtomicU32,
    closing: AtomicBool,
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Poisoning only means another thread panicked; the data is consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<S: ClientStream> Shared<S> {
    fn send(&self, frame: &Frame) -> Result<(), ClientError> {
        let bytes = frame.encode()?;
        let mut w = relock(&self.writer);
        w.write_all(&bytes).and_then(|()| w.flush()).map_err(|e| {
            if self.closing.load(Ordering::Relaxed) {
                ClientError::Closed
            } else {
                ClientError::Io(e)
            }
        })
    }

    fn closed_error(&self) -> ClientError {
        match &relock(&self.routes).closed {
            Some(ClientError::AgentError(m)) => ClientError::AgentError(m.clone()),
            Some(ClientError::Protocol(m)) => ClientError::Protocol(m.clone()),
            _ => ClientError::Closed,
        }
    }
}

/// A connection to the agent, after the version handshake.
pub struct Client<S: ClientStream> {
    shared: Arc<Shared<S>>,
    control: S,
    demux: Option<JoinHandle<()>>,
}

impl<S: ClientStream> Client<S> {
    /// Exchange HELLO with the agent (waiting up to 30 s) and start the
    /// demultiplexer thread.
    pub fn handshake(mut stream: S) -> Result<Self, ClientError> {
        protocol::write_frame(&mut stream, &Frame::Hello { version: VERSION })?;
        stream.flush().map_err(ClientError::Io)?;
        stream
            .set_read_timeout_stream(Some(HELLO_TIMEOUT))
            .map_err(ClientError::Io)?;
        let reply = protocol::read_frame(&mut stream).map_err(|e| match e {
            ProtocolError::Io(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                ClientError::Timeout(HELLO_TIMEOUT)
            }
            other => other.into(),
        })?;
        match reply {
            Some(Frame::Hello { version: VERSION }) => {}
            Some(Frame::Hello { version }) => {
                return Err(ClientError::VersionMismatch { agent: version })
            }
            Some(Frame::Error { message, .. }) => return Err(ClientError::AgentError(message)),
            Some(_) => return Err(ClientError::Protocol("first frame was not HELLO".into())),
            None => return Err(ClientError::Closed),
        }
        stream
            .set_read_timeout_stream(None)
            .map_err(ClientError::Io)?;
        let reader = stream.try_clone_stream().map_err(ClientError::Io)?;
        let control = stream.try_clone_stream().map_err(ClientError::Io)?;
        let shared = Arc::new(Shared {
            writer: Mutex::new(stream),
            routes: Mutex::new(Routes {
                children: HashMap::new(),
                closed: None,
            }),
            next_id: AtomicU32::new(1),
            closing: AtomicBool::new(false),
        });
        let demux_shared = Arc::clone(&shared);
        let demux = std::thread::Builder::new()
            .name("agent-client-demux".into())
            .spawn(move || demux(reader, &demux_shared))
            .map_err(ClientError::Io)?;
        Ok(Self {
            shared,
            control,
            demux: Some(demux),
        })
    }

    /// Start a process; returns once the agent reports it running.
    pub fn spawn(&self, request: &ExecRequest) -> Result<Child<S>, ClientError> {
        // Unbounded, but the agent's window bounds what it can hold.
        let (tx, rx) = channel();
        let stdin = Arc::new(Window::new());
        let output_unacked = Arc::new(AtomicU32::new(0));
        let id = {
            let mut routes = relock(&self.shared.routes);
            if routes.closed.is_some() {
                drop(routes);
                return Err(self.shared.closed_error());
            }
            let mut id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
            while id == 0 || routes.children.contains_key(&id) {
                id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
            }
            routes.children.insert(
                id,
                Route {
                    events: tx,
                    started: false,
                    discard: false,
                    stdin: Arc::clone(&stdin),
                    output_unacked: Arc::clone(&output_unacked),
                },
            );
            id
        };
        let frame = Frame::Exec {
            id,
            request: request.clone(),
        };
        if let Err(e) = self.shared.send(&frame) {
            relock(&self.shared.routes).children.remove(&id);
            return Err(e);
        }
        let failure = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Event::Started(pid)) => {
                let flow = Flow {
                    stdin,
                    output_unacked,
                };
                return Ok(self.child(id, pid, request.stdin, rx, flow));
            }
            Ok(Event::Error(m)) => ClientError::AgentError(m),
            Ok(_) => ClientError::Protocol("output before STARTED".into()),
            Err(RecvTimeoutError::Timeout) => {
                // If it starts after all, it must not run unwatched: the
                // kill follows the EXEC on the stream, so it lands.
                let _ = self.shared.send(&Frame::Signal { id, signo: SIGKILL });
                ClientError::Timeout(START_TIMEOUT)
            }
            Err(RecvTimeoutError::Disconnected) => self.shared.closed_error(),
        };
        relock(&self.shared.routes).children.remove(&id);
        Err(failure)
    }

    fn child(&self, id: u32, pid: u32, stdin: bool, rx: Receiver<Event>, flow: Flow) -> Child<S> {
        let shared = Arc::clone(&self.shared);
        let unacked = Arc::clone(&flow.output_unacked);
        let credit: CreditFn = Box::new(move |bytes| {
            // Lower the count before the agent can send more against it.
            unacked.fetch_sub(bytes, Ordering::AcqRel);
            // A failed send means the connection is gone; the reader will
            // find out on its own.
            let _ = shared.send(&Frame::OutputCredit { id, bytes });
        });
        let shared = Arc::clone(&self.shared);
        let release: ReleaseFn = Box::new(move |rx| {
            // Under the routes lock the demultiplexer cannot deliver, so
            // nothing lands in `rx` between the drain and the switch.
            let mut routes = relock(&shared.routes);
            if let Some(route) = routes.children.get_mut(&id) {
                route.discard = true;
            }
            rx.try_iter()
                .map(|e| match e {
                    Event::Stdout(d) | Event::Stderr(d) => d.len() as u32,
                    _ => 0,
                })
                .sum()
        });
        Child {
            id,
            pid,
            shared: Arc::clone(&self.shared),
            stdin: stdin.then(|| Arc::clone(&flow.stdin)),
            inbox: Arc::new(Mutex::new(Inbox {
                rx,
                stdout: VecDeque::new(),
                stderr: VecDeque::new(),
                end: None,
                uncredited: 0,
                credit,
                release: Some(release),
            })),
        }
    }

    /// Run a process to completion and collect its output. A piped stdin
    /// is closed right away.
    pub fn exec(&self, request: &ExecRequest) -> Result<Output, ClientError> {
        let mut child = self.spawn(request)?;
        if let Some(stdin) = child.stdin() {
            stdin.close()?;
        }
        child.output()
    }

    /// Ask the agent to stop the guest (sync, then reboot).
    pub fn shutdown(&self) -> Result<(), ClientError> {
        self.shared.send(&Frame::Shutdown)
    }
}

impl<S: ClientStream> Drop for Client<S> {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Relaxed);
        let _ = self.control.shutdown_stream();
        if let Some(d) = self.demux.take() {
            let _ = d.join();
        }
    }
}

/// Read frames and route them to children until the stream ends.
fn demux<S: ClientStream>(mut reader: S, shared: &Shared<S>) {
    let end = loop {
        let frame = match protocol::read_frame(&mut reader) {
            Ok(Some(f)) => f,
            Ok(None) => break ClientError::Closed,
            Err(e) => break e.into(),
        };
        if let Err(e) = route(frame, shared) {
            break e;
        }
        if shared.closing.load(Ordering::Relaxed) {
            break ClientError::Closed;
        }
    };
    let mut routes = relock(&shared.routes);
    routes.closed = Some(end);
    for (_, route) in routes.children.drain() {
        route.stdin.close();
    }
}

/// Deliver one frame from the agent; an error ends the connection.
fn route<S: ClientStream>(frame: Frame, shared: &Shared<S>) -> Result<(), ClientError> {
    let (id, event, last) = match frame {
        Frame::Started { id, pid } => (id, Event::Started(pid), false),
        Frame::Stdout { id, data } => (id, Event::Stdout(data), false),
        Frame::Stderr { id, data } => (id, Event::Stderr(data), false),
        Frame::Exit { id, status } => (id, Event::Exit(status), true),
        Frame::Error { id: 0, message } => return Err(ClientError::AgentError(message)),
        // A stream's ERROR ends it, as EXIT does (see `Inbox::end`).
        Frame::Error { id, message } => (id, Event::Error(message), true),
        Frame::StdinCredit { id, bytes } => {
            // Unknown stream: it already ended, so its credit is moot.
            if let Some(route) = relock(&shared.routes).children.get(&id) {
                route.stdin.give(bytes).map_err(|e| {
                    ClientError::Protocol(format!("stream {id}: stdin credit: {e}"))
                })?;
            }
            return Ok(());
        }
        other => {
            let t = other.type_byte();
            return Err(ClientError::Protocol(format!(
                "agent sent client frame type {t:#04x}"
            )));
        }
    };
    let mut routes = relock(&shared.routes);
    let Some(route) = routes.children.get_mut(&id) else {
        return Ok(()); // a child that ended, or a late frame
    };
    match &event {
        Event::Started(_) if route.started => {
            return Err(ClientError::Protocol(format!(
                "stream {id}: second STARTED"
            )));
        }
        Event::Started(_) => route.started = true,
        // Empty chunks would cost an event each and count nothing.
        Event::Stdout(data) | Event::Stderr(data) if data.is_empty() => {
            return Err(ClientError::Protocol(format!(
                "stream {id}: empty output frame"
            )));
        }
        _ => {}
    }
    if let Event::Stdout(data) | Event::Stderr(data) = &event {
        let len = data.len() as u32;
        let unacked = route.output_unacked.fetch_add(len, Ordering::AcqRel);
        if u64::from(unacked) + u64::from(len) > u64::from(WINDOW) {
            return Err(ClientError::Protocol(format!(
                "stream {id}: {len} bytes of output with {unacked} of {WINDOW} uncredited"
            )));
        }
    }
    let len = match &event {
        Event::Stdout(data) | Event::Stderr(data) => data.len() as u32,
        _ => 0,
    };
    // A child that was dropped no longer receives: its output is thrown
    // away and credited at once, so the process runs on as it would with
    // its output going nowhere.
    let discarded = (route.discard || route.events.send(event).is_err()) && len > 0;
    if discarded {
        route.output_unacked.fetch_sub(len, Ordering::AcqRel);
    }
    if last {
        if let Some(route) = routes.children.remove(&id) {
            route.stdin.close();
        }
    }
    drop(routes);
    if discarded {
        shared.send(&Frame::OutputCredit { id, bytes: len })?;
    }
    Ok(())
}

/// Returns output credit to the agent for one child.
type CreditFn = Box<dyn Fn(u32) + Send>;
/// Switches a child's route to discarding and drains its channel; returns
/// the output bytes drained.
type ReleaseFn = Box<dyn FnOnce(&Receiver<Event>) -> u32 + Send>;

/// The flow-control state a child shares with the demultiplexer.
struct Flow {
    stdin: Arc<Window>,
    output_unacked: Arc<AtomicU32>,
}

/// Output received but not read yet, and how the process ended.
struct Inbox {
    rx: Receiver<Event>,
    stdout: VecDeque<u8>,
    stderr: VecDeque<u8>,
    end: Option<Result<ExitStatus, String>>,
    /// Output pulled from `rx` whose credit has not gone back yet.
    uncredited: u32,
    credit: CreditFn,
    release: Option<ReleaseFn>,
}

impl Drop for Inbox {
    /// The child is gone (every handle dropped): from now on its output is
    /// thrown away as it arrives, and everything held back is credited, so
    /// the process is not left stuck on a full window.
    fn drop(&mut self) {
        if let Some(release) = self.release.take() {
            let held = release(&self.rx).saturating_add(self.uncredited);
            if held > 0 {
                (self.credit)(held);
            }
        }
    }
}

impl Inbox {
    /// Take one event, waiting up to `timeout`. `Ok(false)` on timeout.
    fn pump(&mut self, timeout: Duration) -> Result<bool, ClientError> {
        if self.end.is_some() {
            return Ok(true);
        }
        match self.rx.recv_timeout(timeout) {
            Ok(Event::Stdout(d)) => {
                self.pulled(d.len());
                self.stdout.extend(d);
            }
            Ok(Event::Stderr(d)) => {
                self.pulled(d.len());
                self.stderr.extend(d);
            }
            Ok(Event::Exit(s)) => self.end = Some(Ok(s)),
            Ok(Event::Error(m)) => self.end = Some(Err(m)),
            Ok(Event::Started(_)) => {}
            Err(RecvTimeoutError::Timeout) => return Ok(false),
            Err(RecvTimeoutError::Disconnected) => return Err(ClientError::Closed),
        }
        Ok(true)
    }

    /// `n` output bytes left the channel: credit them back in batches.
    fn pulled(&mut self, n: usize) {
        self.uncredited += n as u32; // at most WINDOW, checked on arrival
        if self.uncredited >= CREDIT_BATCH {
            (self.credit)(std::mem::take(&mut self.uncredited));
        }
    }
}

/// A process running in the guest.
pub struct Child<S: ClientStream> {
    id: u32,
    pid: u32,
    shared: Arc<Shared<S>>,
    /// The stdin credit, until [`Child::stdin`] hands it out.
    stdin: Option<Arc<Window>>,
    inbox: Arc<Mutex<Inbox>>,
}

impl<S: ClientStream> Child<S> {
    /// The process id in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The writer for stdin, once, if the request asked for a piped stdin.
    pub fn stdin(&mut self) -> Option<ChildStdin<S>> {
        self.stdin.take().map(|window| ChildStdin {
            id: self.id,
            shared: Arc::clone(&self.shared),
            window,
            open: true,
        })
    }

    /// A reader of stdout.
    pub fn stdout(&self) -> ChildOutput {
        ChildOutput {
            inbox: Arc::clone(&self.inbox),
            stderr: false,
        }
    }

    /// A reader of stderr.
    pub fn stderr(&self) -> ChildOutput {
        ChildOutput {
            inbox: Arc::clone(&self.inbox),
            stderr: true,
        }
    }

    /// Send signal `signo` (1..=64) to the process.
    pub fn signal(&self, signo: i32) -> Result<(), ClientError> {
        if !(1..=64).contains(&signo) {
            return Err(ClientError::Protocol(format!("invalid signal {signo}")));
        }
        self.shared.send(&Frame::Signal { id: self.id, signo })
    }

    /// Kill the process (SIGKILL); [`Child::wait`] then reports `Signal(9)`.
    pub fn kill(&self) -> Result<(), ClientError> {
        self.signal(SIGKILL)
    }

    /// Stop caring about this process: its output from now on is thrown
    /// away, and a [`ChildStdin`] write blocked on it (or any later one)
    /// fails with `BrokenPipe`. The process itself is not signalled.
    pub fn abandon(self) {
        if let Some(route) = relock(&self.shared.routes).children.get(&self.id) {
            route.stdin.close();
        }
        // Dropping the last handle on the inbox switches the route to
        // discarding and credits what was held.
    }

    /// Wait until the process has exited and its output is all received;
    /// output not read yet stays available to the readers.
    pub fn wait(&self) -> Result<ExitStatus, ClientError> {
        loop {
            if let Some(status) = self.wait_timeout(POLL)? {
                return Ok(status);
            }
        }
    }

    /// [`Child::wait`] for at most `timeout`; `Ok(None)` if still running.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut inbox = relock(&self.inbox);
            match &inbox.end {
                Some(Ok(s)) => return Ok(Some(*s)),
                Some(Err(m)) => return Err(ClientError::AgentError(m.clone())),
                None => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            if let Err(e) = inbox.pump(left.min(POLL)) {
                drop(inbox);
                return Err(match e {
                    ClientError::Closed => self.shared.closed_error(),
                    other => other,
                });
            }
        }
    }

    /// Wait, then return the status and all output not read yet.
    pub fn output(self) -> Result<Output, ClientError> {
        let status = self.wait()?;
        let mut inbox = relock(&self.inbox);
        Ok(Output {
            status,
            stdout: std::mem::take(&mut inbox.stdout).into(),
            stderr: std::mem::take(&mut inbox.stderr).into(),
        })
    }
}

/// Writes a child's stdin; dropping it (or [`ChildStdin::close`]) sends EOF.
///
/// A write blocks, like one to a full pipe, while the agent has not yet
/// passed a window's worth of earlier stdin on to the process; it fails
/// with `BrokenPipe` once the process has exited or the connection is gone.
pub struct ChildStdin<S: ClientStream> {
    id: u32,
    shared: Arc<Shared<S>>,
    window: Arc<Window>,
    open: bool,
}

impl<S: ClientStream> ChildStdin<S> {
    /// Send EOF.
    pub fn close(mut self) -> Result<(), ClientError> {
        self.open = false;
        self.shared.send(&Frame::Stdin {
            id: self.id,
            data: Vec::new(),
        })
    }
}

impl<S: ClientStream> Write for ChildStdin<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0); // an empty STDIN frame would mean EOF
        }
        let Some(n) = self.window.take(buf.len().min(MAX_CHUNK) as u32) else {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the process has exited or the agent connection is gone",
            ));
        };
        let n = n as usize;
        let frame = Frame::Stdin {
            id: self.id,
            data: buf[..n].to_vec(),
        };
        self.shared.send(&frame).map_err(io::Error::other)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<S: ClientStream> Drop for ChildStdin<S> {
    fn drop(&mut self) {
        if self.open {
            let _ = self.shared.send(&Frame::Stdin {
                id: self.id,
                data: Vec::new(),
            });
        }
    }
}

/// Reads a child's stdout or stderr; EOF once the process has exited and
/// everything is read.
pub struct ChildOutput {
    inbox: Arc<Mutex<Inbox>>,
    stderr: bool,
}

impl Read for ChildOutput {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut inbox = relock(&self.inbox);
            let stderr = self.stderr;
            let pending = if stderr {
                &mut inbox.stderr
            } else {
                &mut inbox.stdout
            };
            if !pending.is_empty() || buf.is_empty() {
                let n = pending.len().min(buf.len());
                for (dst, src) in buf.iter_mut().zip(pending.drain(..n)) {
                    *dst = src;
                }
                return Ok(n);
            }
            if inbox.end.is_some() {
                return Ok(0);
            }
            // Release the lock now and then so the other stream's reader
            // and `wait` can make progress.
            inbox.pump(POLL).map_err(io::Error::other)?;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use super::*;
    use crate::server::{self, NoHooks, ServerError};

    type Server = thread::JoinHandle<Result<(), ServerError>>;

    /// A server on one end of a socket pair, in a thread.
    fn agent() -> (UnixStream, Server) {
        let (host, guest) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || {
            let reader = guest.try_clone().unwrap();
            server::serve(reader, guest, &NoHooks)
        });
        (host, server)
    }

    fn connect() -> (Client<UnixStream>, Server) {
        let (host, server) = agent();
        (Client::handshake(host).unwrap(), server)
    }

    /// `argv` with the host's usual PATH, since the environment starts empty.
    fn request(argv: &[&str]) -> ExecRequest {
        ExecRequest::new(argv).env("PATH", "/usr/local/bin:/usr/bin:/bin")
    }

    #[test]
    fn exec_echo_returns_stdout_and_success() {
        let (client, _server) = connect();
        let out = client.exec(&request(&["echo", "hello"])).unwrap();
        assert_eq!(out.status, ExitStatus::Code(0));
        assert_eq!(out.stdout, b"hello\n");
        assert!(out.stderr.is_empty());
    }

    #[test]
    fn exec_exit_3_returns_code_3() {
        let (client, _server) = connect();
        let out = client.exec(&request(&["sh", "-c", "exit 3"])).unwrap();
        assert_eq!(out.status, ExitStatus::Code(3));
    }

    #[test]
    fn exec_stderr_is_separate_from_stdout() {
        let (client, _server) = connect();
        let out = client
            .exec(&request(&["sh", "-c", "echo out; echo err >&2"]))
            .unwrap();
        assert_eq!(out.stdout, b"out\n");
        assert_eq!(out.stderr, b"err\n");
    }

    #[test]
    fn exec_env_and_cwd_apply() {
        let (client, _server) = connect();
        let req = request(&["sh", "-c", "echo $FOO; pwd"])
            .env("FOO", "bar")
            .cwd("/");
        let out = client.exec(&req).unwrap();
        assert_eq!(out.stdout, b"bar\n/\n");
    }

    #[test]
    fn exec_8_mib_stdout_arrives_intact() {
        // 8 MiB of "abcdefg\n": 128 times the 64 KiB chunk size, and a
        // multiple of the 8-byte line, so the expected bytes are exact.
        const LEN: usize = 8 << 20;
        let (client, _server) = connect();
        let cmd = format!("yes abcdefg | head -c {LEN}");
        let out = client.exec(&request(&["sh", "-c", &cmd])).unwrap();
        let expected: Vec<u8> = b"abcdefg\n".iter().copied().cycle().take(LEN).collect();
        assert_eq!(out.status, ExitStatus::Code(0));
        assert_eq!(out.stdout.len(), LEN);
        assert_eq!(fnv1a(&out.stdout), fnv1a(&expected));
    }

    fn fnv1a(bytes: &[u8]) -> u64 {
        bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    }

    #[test]
    fn spawn_cat_echoes_piped_stdin() {
        let (client, _server) = connect();
        let mut child = client.spawn(&request(&["cat"]).with_stdin()).unwrap();
        let mut stdin = child.stdin().unwrap();
        stdin.write_all(b"through the pipe").unwrap();
        stdin.close().unwrap();
        let out = child.output().unwrap();
        assert_eq!(out.stdout, b"through the pipe");
        assert_eq!(out.status, ExitStatus::Code(0));
    }

    #[test]
    fn spawn_stdout_reader_streams_before_exit() {
        let (client, _server) = connect();
        let mut child = client.spawn(&request(&["cat"]).with_stdin()).unwrap();
        let mut stdin = child.stdin().unwrap();
        stdin.write_all(b"ping\n").unwrap();
        // cat is still running: the line must arrive before any EXIT.
        let mut line = [0u8; 5];
        child.stdout().read_exact(&mut line).unwrap();
        assert_eq!(&line, b"ping\n");
        drop(stdin);
        assert_eq!(child.wait().unwrap(), ExitStatus::Code(0));
    }

    #[test]
    fn exec_16_concurrent_all_complete() {
        let (client, _server) = connect();
        thread::scope(|s| {
            let handles: Vec<_> = (0..16)
                .map(|i| {
                    let client = &client;
                    s.spawn(move || {
                        let cmd = format!("sleep 0.1; echo {i}");
                        client.exec(&request(&["sh", "-c", &cmd])).unwrap()
                    })
                })
                .collect();
            for (i, h) in handles.into_iter().enumerate() {
                let out = h.join().unwrap();
                assert_eq!(out.stdout, format!("{i}\n").as_bytes());
                assert!(out.status.success());
            }
        });
    }

    /// Run `f` in a thread; None if it did not finish within 20 s (the
    /// thread is left behind, the test fails).
    fn within<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(Duration::from_secs(20)).ok()
    }

    #[test]
    fn kill_reaches_process_not_reading_a_full_stdin() {
        let (client, _server) = connect();
        let mut child = client
            .spawn(&request(&["sleep", "1000"]).with_stdin())
            .unwrap();
        let mut stdin = child.stdin().unwrap();
        // 4 MiB is far beyond the window plus the pipe: the writer blocks.
        let writer = thread::spawn(move || stdin.write_all(&vec![b'x'; 4 << 20]));
        thread::sleep(Duration::from_millis(200));
        assert!(!writer.is_finished(), "stdin should be pushing back");
        child.kill().unwrap();
        let status = within(move || child.wait().unwrap());
        assert_eq!(status, Some(ExitStatus::Signal(9)));
        let err = writer.join().unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn unread_child_does_not_stall_other_children() {
        let (client, _server) = connect();
        let client = Arc::new(client);
        // `yes` floods stdout and nobody reads it.
        let flood = client.spawn(&request(&["yes"])).unwrap();
        thread::sleep(Duration::from_millis(200));
        let c = Arc::clone(&client);
        let out = within(move || c.exec(&request(&["echo", "still here"])).unwrap());
        assert_eq!(out.map(|o| o.stdout), Some(b"still here\n".to_vec()));
        flood.kill().unwrap();
        assert_eq!(flood.wait().unwrap(), ExitStatus::Signal(9));
    }

    #[test]
    fn stdin_4_mib_through_cat_while_reading_intact() {
        const LEN: usize = 4 << 20;
        let (client, _server) = connect();
        let mut child = client.spawn(&request(&["cat"]).with_stdin()).unwrap();
        let mut stdin = child.stdin().unwrap();
        let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
        let expected = fnv1a(&data);
        let writer = thread::spawn(move || {
            stdin.write_all(&data).unwrap();
            stdin.close().unwrap();
        });
        let mut back = Vec::new();
        child.stdout().read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        assert_eq!(back.len(), LEN);
        assert_eq!(fnv1a(&back), expected);
        assert_eq!(child.wait().unwrap(), ExitStatus::Code(0));
    }

    #[test]
    fn dropped_child_keeps_running_to_its_exit() {
        let (client, _server) = connect();
        // 2 MiB of output nobody receives, then a marker file: the process
        // must not stall on its pipe after its Child is dropped.
        let dir = std::env::temp_dir().join(format!("chitin-agent-drop-{}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let cmd = format!("head -c 2097152 /dev/zero; touch {}", dir.display());
        let child = client.spawn(&request(&["sh", "-c", &cmd])).unwrap();
        // By now a whole window of output waits, unpulled, in the client:
        // dropping the child must credit it, or the process stalls.
        thread::sleep(Duration::from_millis(300));
        drop(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !dir.exists() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        assert!(dir.exists(), "the dropped child stalled");
        let _ = std::fs::remove_file(&dir);
    }

    /// A real server with one process, `req`, started as stream 1 by raw
    /// frames (so a test can then send what no `Client` would).
    fn agent_running(req: ExecRequest) -> (UnixStream, Server) {
        let (mut host, server) = agent();
        protocol::write_frame(&mut host, &Frame::Hello { version: VERSION }).unwrap();
        let _ = protocol::read_frame(&mut host).unwrap();
        let exec = Frame::Exec {
            id: 1,
            request: req,
        };
        protocol::write_frame(&mut host, &exec).unwrap();
        (host, server)
    }

    /// A fake agent: handshake, take one EXEC, answer STARTED, then run
    /// `script` on the stream.
    fn fake_agent(
        script: impl FnOnce(&mut UnixStream, u32) + Send + 'static,
    ) -> Client<UnixStream> {
        let (host, mut guest) = UnixStream::pair().unwrap();
        thread::spawn(move || {
            let _ = protocol::read_frame(&mut guest);
            protocol::write_frame(&mut guest, &Frame::Hello { version: VERSION }).unwrap();
            let Ok(Some(Frame::Exec { id, .. })) = protocol::read_frame(&mut guest) else {
                return;
            };
            protocol::write_frame(&mut guest, &Frame::Started { id, pid: 1 }).unwrap();
            script(&mut guest, id);
            // Keep the stream open until the client gives up.
            let _ = protocol::read_frame(&mut guest);
            while let Ok(Some(_)) = protocol::read_frame(&mut guest) {}
        });
        Client::handshake(host).unwrap()
    }

    #[test]
    fn agent_output_beyond_window_is_a_protocol_error() {
        let client = fake_agent(|s, id| {
            for _ in 0..(WINDOW as usize / MAX_CHUNK + 1) {
                let data = vec![0u8; MAX_CHUNK];
                let _ = protocol::write_frame(s, &Frame::Stdout { id, data });
            }
        });
        let child = client.spawn(&request(&["x"])).unwrap();
        // Nobody pulls, so no credit goes back: the last chunk overruns.
        thread::sleep(Duration::from_millis(200));
        assert!(matches!(child.wait(), Err(ClientError::Protocol(m)) if m.contains("uncredited")));
    }

    #[test]
    fn agent_second_started_is_a_protocol_error() {
        let client = fake_agent(|s, id| {
            let _ = protocol::write_frame(s, &Frame::Started { id, pid: 2 });
        });
        let child = client.spawn(&request(&["x"])).unwrap();
        assert!(
            matches!(child.wait(), Err(ClientError::Protocol(m)) if m.contains("second STARTED"))
        );
    }

    #[test]
    fn agent_empty_output_frame_is_a_protocol_error() {
        let client = fake_agent(|s, id| {
            let data = Vec::new();
            let _ = protocol::write_frame(s, &Frame::Stderr { id, data });
        });
        let child = client.spawn(&request(&["x"])).unwrap();
        assert!(
            matches!(child.wait(), Err(ClientError::Protocol(m)) if m.contains("empty output"))
        );
    }

    #[test]
    fn abandon_fails_a_blocked_stdin_write() {
        let (client, _server) = connect();
        let mut child = client
            .spawn(&request(&["sleep", "1000"]).with_stdin())
            .unwrap();
        let mut stdin = child.stdin().unwrap();
        let writer = thread::spawn(move || stdin.write_all(&vec![b'x'; 4 << 20]));
        thread::sleep(Duration::from_millis(200));
        assert!(!writer.is_finished(), "stdin should be pushing back");
        child.abandon();
        let written = within(move || writer.join().unwrap());
        let err = written.expect("the write stayed blocked").unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn serve_signal_number_out_of_range_errors_and_closes() {
        let (mut host, server) = agent_running(request(&["sleep", "1000"]));
        let signal = Frame::Signal { id: 1, signo: 65 };
        protocol::write_frame(&mut host, &signal).unwrap();
        assert!(matches!(
            server.join().unwrap(),
            Err(ServerError::BadSignal(65))
        ));
    }

    #[test]
    fn agent_stdin_credit_beyond_window_is_a_protocol_error() {
        let client = fake_agent(|s, id| {
            let _ = protocol::write_frame(s, &Frame::StdinCredit { id, bytes: 1 });
        });
        let child = client.spawn(&request(&["x"]).with_stdin()).unwrap();
        assert!(
            matches!(child.wait(), Err(ClientError::Protocol(m)) if m.contains("stdin credit"))
        );
    }

    #[test]
    fn serve_stdin_beyond_window_errors_and_closes() {
        let (mut host, server) = agent_running(request(&["sleep", "1000"]).with_stdin());
        // sleep never reads: once its pipe is full, the agent credits
        // nothing more, and 2 MiB is far beyond the window plus the pipe.
        // Writes fail once the agent has closed the connection.
        for _ in 0..32 {
            let stdin = Frame::Stdin {
                id: 1,
                data: vec![0; MAX_CHUNK],
            };
            if protocol::write_frame(&mut host, &stdin).is_err() {
                break;
            }
        }
        assert!(matches!(
            server.join().unwrap(),
            Err(ServerError::StdinOverrun { .. })
        ));
    }

    #[test]
    fn serve_output_credit_beyond_window_errors_and_closes() {
        let (mut host, server) = agent_running(request(&["sleep", "1000"]));
        // A whole window more than was ever sent: beyond the window however
        // much credit the pipe readers hold at that moment (1 byte was not,
        // once they had taken theirs, and the test hung).
        let credit = Frame::OutputCredit {
            id: 1,
            bytes: crate::protocol::WINDOW,
        };
        protocol::write_frame(&mut host, &credit).unwrap();
        assert!(matches!(
            server.join().unwrap(),
            Err(ServerError::OutputCredit(_))
        ));
    }

    #[test]
    fn kill_sleep_reports_signal_9() {
        let (client, _server) = connect();
        let child = client.spawn(&request(&["sleep", "1000"])).unwrap();
        child.kill().unwrap();
        assert_eq!(child.wait().unwrap(), ExitStatus::Signal(9));
    }

    #[test]
    fn wait_timeout_running_process_returns_none() {
        let (client, _server) = connect();
        let child = client.spawn(&request(&["sleep", "1000"])).unwrap();
        let status = child.wait_timeout(Duration::from_millis(100)).unwrap();
        assert_eq!(status, None);
        child.kill().unwrap();
    }

    #[test]
    fn exec_missing_binary_returns_agent_error() {
        let (client, _server) = connect();
        let result = client.exec(&request(&["/nonexistent/chitin-no-such-binary"]));
        match result {
            Err(ClientError::AgentError(m)) => assert!(m.contains("No such file"), "{m}"),
            other => panic!("expected AgentError, got {other:?}"),
        }
        // The connection is still usable afterwards.
        assert!(client.exec(&request(&["true"])).unwrap().status.success());
    }

    #[test]
    fn drop_client_kills_running_child() {
        let (client, server) = connect();
        let child = client.spawn(&request(&["sleep", "1000"])).unwrap();
        let pid = child.pid() as i32;
        drop(child);
        drop(client);
        // serve() returns only after killing and reaping its processes.
        server.join().unwrap().unwrap();
        // SAFETY: signal 0 only checks whether the pid exists.
        let ret = unsafe { libc::kill(pid, 0) };
        assert_eq!(ret, -1);
        assert_eq!(io::Error::last_os_error().raw_os_error(), Some(libc::ESRCH));
    }

    #[test]
    fn handshake_agent_other_version_returns_mismatch() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let fake = thread::spawn(move || {
            let hello = protocol::read_frame(&mut guest).unwrap();
            assert_eq!(hello, Some(Frame::Hello { version: VERSION }));
            let other = VERSION + 1;
            protocol::write_frame(&mut guest, &Frame::Hello { version: other }).unwrap();
        });
        let result = Client::handshake(host);
        assert!(matches!(
            result,
            Err(ClientError::VersionMismatch { agent }) if agent == VERSION + 1
        ));
        fake.join().unwrap();
    }

    #[test]
    fn serve_other_client_version_sends_error_and_closes() {
        let (mut host, server) = agent();
        let other = VERSION - 1;
        protocol::write_frame(&mut host, &Frame::Hello { version: other }).unwrap();
        let reply = protocol::read_frame(&mut host).unwrap();
        assert!(matches!(reply, Some(Frame::Error { id: 0, .. })));
        assert!(protocol::read_frame(&mut host).unwrap().is_none());
        assert!(matches!(
            server.join().unwrap(),
            Err(ServerError::VersionMismatch(v)) if v == other
        ));
    }

    #[test]
    fn serve_malformed_frame_sends_error_and_closes() {
        let (mut host, server) = agent();
        protocol::write_frame(&mut host, &Frame::Hello { version: VERSION }).unwrap();
        assert!(matches!(
            protocol::read_frame(&mut host).unwrap(),
            Some(Frame::Hello { .. })
        ));
        // Length 5, type 0x7f: an unknown frame type.
        host.write_all(&[5, 0, 0, 0, 0x7f, 0, 0, 0, 0]).unwrap();
        let reply = protocol::read_frame(&mut host).unwrap();
        assert!(matches!(reply, Some(Frame::Error { id: 0, .. })));
        assert!(matches!(
            server.join().unwrap(),
            Err(ServerError::Protocol(ProtocolError::UnknownType(0x7f)))
        ));
    }

    #[test]
    fn serve_duplicate_id_returns_error_for_second() {
        let (mut host, _server) = agent();
        protocol::write_frame(&mut host, &Frame::Hello { version: VERSION }).unwrap();
        protocol::read_frame(&mut host).unwrap();
        let exec = Frame::Exec {
            id: 5,
            request: request(&["sleep", "1000"]),
        };
        protocol::write_frame(&mut host, &exec).unwrap();
        assert!(matches!(
            protocol::read_frame(&mut host).unwrap(),
            Some(Frame::Started { id: 5, .. })
        ));
        protocol::write_frame(&mut host, &exec).unwrap();
        assert!(matches!(
            protocol::read_frame(&mut host).unwrap(),
            Some(Frame::Error { id: 5, .. })
        ));
    }
}
