//! The host side of the exec protocol: run processes in the guest over one
//! connection to the agent.
//!
//! A [`Client`] owns one stream. One demultiplexer thread reads every frame
//! and appends it to the inbox of the [`Child`] it belongs to (waking whoever
//! waits on that child); one writer thread writes every frame the client
//! sends, so no caller ever blocks on a guest that stops reading and no
//! lock is held across a write to it. A frame not written whole within
//! [`ClientConfig::write_stall`] ends the connection
//! ([`ClientError::Stalled`]).
//!
//! Flow control is per child and per output (protocol version 3), so one
//! child never holds up another and one output never holds up the other:
//! the agent sends a child's stdout and stderr only as far as the client
//! has returned credit for each, and the client returns it only as the
//! caller *consumes* that output (reads it from [`ChildOutput`], or
//! [`Child::output`] and [`Child::collect`] take it). So the client holds
//! at most [`WINDOW`] unconsumed bytes per output of a child, whatever the
//! agent does; a child whose output nobody consumes stops on its full pipe
//! in the guest, as a process writing to an unread pipe does. Credit the
//! writer has not sent yet is kept as one count per output, so a guest that
//! stops reading cannot make the queue grow with it; stdin counts as sent
//! only once the writer has written it, so [`ChildStdin`] writes block
//! while a window's worth is queued or unacknowledged.
//!
//! Nothing the agent sends is trusted: frames are size-capped by
//! [`chitin_agent_protocol`], and output beyond the credit, credit beyond what
//! was sent, output before STARTED or after its end, or a second STARTED or
//! EXIT ends the connection as a protocol violation (the stream is shut
//! down).
//!
//! Dropping the [`Client`] shuts the stream down; the agent then kills every
//! process still running on this connection.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chitin_agent_protocol::window::Window;
use chitin_agent_protocol::{
    self as protocol, ExecRequest, ExitStatus, Frame, OutputStream, ProtocolError, MAX_CHUNK,
    VERSION, WINDOW,
};
use chitin_seccomp::{Seccomp, ThreadClass};

/// Output credit is returned to the agent in batches of at least this
/// much (it then still has three quarters of its window to go on with).
const CREDIT_BATCH: u32 = WINDOW / 4;
/// How long `spawn` waits for STARTED or ERROR.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
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
    /// The agent reported an error of the connection or of a process
    /// already running.
    #[error("agent: {0}")]
    AgentError(String),
    /// The agent could not start the requested process (no such file,
    /// bad directory, user or group).
    #[error("agent cannot start the process: {0}")]
    Refused(String),
    /// The connection is gone: the agent closed it or the guest died.
    #[error("agent connection closed")]
    Closed,
    /// The agent did not answer in time.
    #[error("agent did not answer within {0:?}")]
    Timeout(Duration),
    /// The agent stopped reading: a frame could not be written to it
    /// within this long, so the connection was closed.
    #[error("agent stopped reading its connection: a frame took over {0:?}")]
    Stalled(Duration),
    /// The caller asked for a signal number outside 1..=64.
    #[error("invalid signal number {0}: signals are 1 to 64")]
    InvalidSignal(i32),
    /// A process wrote more than the caller's limit to one output; the
    /// rest was discarded.
    #[error("the process wrote more than {limit} bytes to {stream}")]
    OutputLimit {
        /// `stdout` or `stderr`.
        stream: &'static str,
        /// The limit, in bytes.
        limit: usize,
    },
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

impl ClientError {
    /// A copy for a second waiter (an i/o error keeps only its kind and
    /// message).
    fn duplicate(&self) -> ClientError {
        match self {
            ClientError::Io(e) => ClientError::Io(io::Error::new(e.kind(), e.to_string())),
            ClientError::Protocol(m) => ClientError::Protocol(m.clone()),
            ClientError::VersionMismatch { agent } => {
                ClientError::VersionMismatch { agent: *agent }
            }
            ClientError::AgentError(m) => ClientError::AgentError(m.clone()),
            ClientError::Refused(m) => ClientError::Refused(m.clone()),
            ClientError::Closed => ClientError::Closed,
            ClientError::Timeout(d) => ClientError::Timeout(*d),
            ClientError::Stalled(d) => ClientError::Stalled(*d),
            ClientError::InvalidSignal(n) => ClientError::InvalidSignal(*n),
            ClientError::OutputLimit { stream, limit } => ClientError::OutputLimit {
                stream,
                limit: *limit,
            },
        }
    }
}

/// A byte stream the client can split into a reader and a writer.
pub trait ClientStream: Read + Write + Send + Sized + 'static {
    /// A second handle on the same stream.
    fn try_clone_stream(&self) -> io::Result<Self>;
    /// Shut both directions down, waking a blocked reader and writer.
    fn shutdown_stream(&self) -> io::Result<()>;
    /// Bound each blocking read (`None`: wait forever).
    fn set_read_timeout_stream(&self, timeout: Option<Duration>) -> io::Result<()>;
    /// Bound each blocking write (`None`: wait forever).
    fn set_write_timeout_stream(&self, timeout: Option<Duration>) -> io::Result<()>;
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
    fn set_write_timeout_stream(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(timeout)
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
    fn set_write_timeout_stream(&self, timeout: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(timeout)
    }
}

/// Deadlines of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientConfig {
    /// The whole handshake (HELLO out, HELLO back) must finish within this,
    /// however the agent spreads its bytes.
    pub handshake_timeout: Duration,
    /// A frame to the agent that is not written whole within this long
    /// ends the connection with [`ClientError::Stalled`].
    pub write_stall: Duration,
    /// The seccomp mode of the connection's writer and demultiplexer
    /// threads.
    pub seccomp: Seccomp,
    /// Host random bytes sent right after the handshake (ENTROPY): the
    /// agent mixes them into the guest kernel's pool and reseeds it before
    /// it reads any request of this connection.
    pub entropy: Option<[u8; ENTROPY_LEN]>,
}

/// Bytes of host entropy a connection hands the guest.
pub const ENTROPY_LEN: usize = 32;

impl Default for ClientConfig {
    /// 30 s for the handshake, 10 s of write stall.
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(30),
            write_stall: Duration::from_secs(10),
            seccomp: Seccomp::default(),
            entropy: None,
        }
    }
}

/// Reads from a stream with one deadline for all reads together.
struct DeadlineReader<'a, S: ClientStream> {
    stream: &'a mut S,
    deadline: Instant,
}

impl<S: ClientStream> Read for DeadlineReader<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout_stream(Some(left))?;
        self.stream.read(buf)
    }
}

/// Whether an i/o error is a read or write timeout.
fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
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

/// `now + timeout`, or `None` (no deadline) when that does not fit.
fn deadline_after(timeout: Duration) -> Option<Instant> {
    Instant::now().checked_add(timeout)
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Poisoning only means another thread panicked; the data is consistent.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Wait on `cond` until `deadline` (`None`: for ever); returns the guard
/// and whether the deadline has passed.
fn wait_until<'a, T>(
    cond: &Condvar,
    guard: MutexGuard<'a, T>,
    deadline: Option<Instant>,
) -> (MutexGuard<'a, T>, bool) {
    match deadline {
        None => (cond.wait(guard).unwrap_or_else(|e| e.into_inner()), false),
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return (guard, true);
            }
            let (guard, _) = cond
                .wait_timeout(guard, left)
                .unwrap_or_else(|e| e.into_inner());
            (guard, Instant::now() >= d)
        }
    }
}

/// A frame waiting for the writer.
enum Outgoing {
    /// An encoded frame.
    Frame(Vec<u8>),
    /// An encoded STDIN frame of stream `id` with `len` data bytes: counted
    /// as sent (creditable by the agent) once the writer takes it.
    Stdin { id: u32, len: u32, bytes: Vec<u8> },
}

/// What the writer thread has to send.
struct Outbox {
    frames: VecDeque<Outgoing>,
    /// Output credit not sent yet, per stream id and output: one count
    /// each, however often it grew.
    credit: HashMap<(u32, OutputStream), u32>,
    /// False once the client goes away or the connection ended.
    open: bool,
}

/// One child's output and end as the demultiplexer delivered them.
struct Inbox {
    /// STARTED (its pid) or the ERROR that refused the request.
    started: Option<Result<u32, String>>,
    /// Per output, see [`OutputStream::index`].
    pending: [Pending; 2],
    end: Option<Result<ExitStatus, String>>,
    /// The connection ended before everything arrived.
    closed: bool,
    /// Per output: nobody will read it, so it is credited as it arrives
    /// (both once nobody holds the child any more).
    discard: [bool; 2],
    /// The caller gave the child up: readers of its output see EOF.
    abandoned: bool,
}

/// One output of a child: received, not consumed yet.
#[derive(Default)]
struct Pending {
    data: VecDeque<u8>,
    /// Its end arrived.
    ended: bool,
    /// Consumed (or discarded) bytes whose credit has not been handed to
    /// the writer yet.
    owed: u32,
}

/// A child's inbox and the condition variable its waiters sleep on.
struct ChildShared {
    inbox: Mutex<Inbox>,
    changed: Condvar,
}

impl ChildShared {
    fn lock(&self) -> MutexGuard<'_, Inbox> {
        relock(&self.inbox)
    }
}

/// Where the demultiplexer delivers one child's frames.
struct Route {
    child: Arc<ChildShared>,
    /// STARTED arrived (a second one breaks the protocol).
    started: bool,
    /// EXIT arrived.
    exited: bool,
    /// Each output's empty end frame arrived.
    ended: [bool; 2],
    /// Credit for this child's stdin.
    stdin: Arc<Window>,
    /// STDIN bytes the writer sent that the agent has not credited.
    stdin_sent: u32,
    /// Per output, bytes received and not yet credited back to the agent.
    unacked: [u32; 2],
}

/// Routes from stream id to child, and why the connection ended.
struct Routes {
    children: HashMap<u32, Route>,
    closed: Option<ClientError>,
}

struct Shared {
    outbox: Mutex<Outbox>,
    /// Signalled when the outbox has work or closes.
    outbox_changed: Condvar,
    routes: Mutex<Routes>,
    next_id: AtomicU32,
    closing: AtomicBool,
}

impl Shared {
    /// Queue an encoded frame for the writer; never blocks on the agent.
    fn queue(&self, item: Outgoing) -> Result<(), ClientError> {
        let mut outbox = relock(&self.outbox);
        if !outbox.open {
            drop(outbox);
            return Err(self.closed_error());
        }
        outbox.frames.push_back(item);
        drop(outbox);
        self.outbox_changed.notify_one();
        Ok(())
    }

    fn send(&self, frame: &Frame) -> Result<(), ClientError> {
        self.queue(Outgoing::Frame(frame.encode()?))
    }

    fn send_stdin(&self, id: u32, data: Vec<u8>) -> Result<(), ClientError> {
        let len = data.len() as u32; // at most MAX_CHUNK
        let bytes = Frame::Stdin { id, data }.encode()?;
        self.queue(Outgoing::Stdin { id, len, bytes })
    }

    /// Return `bytes` of output credit for `stream` of child `id` (sent by
    /// the writer, merged with what is not sent yet).
    fn credit(&self, id: u32, stream: OutputStream, bytes: u32) {
        if bytes == 0 {
            return;
        }
        let mut outbox = relock(&self.outbox);
        if outbox.open {
            let owed = outbox.credit.entry((id, stream)).or_default();
            *owed = owed.saturating_add(bytes);
            drop(outbox);
            self.outbox_changed.notify_one();
        }
    }

    /// Why the connection ended, for one more caller.
    fn closed_error(&self) -> ClientError {
        match &relock(&self.routes).closed {
            Some(
                e @ (ClientError::AgentError(_)
                | ClientError::Protocol(_)
                | ClientError::Stalled(_)),
            ) => e.duplicate(),
            _ => ClientError::Closed,
        }
    }

    /// End the connection: record why (unless a reason is recorded), wake
    /// every waiter and stop the writer.
    fn close_with(&self, why: ClientError) {
        let children: Vec<Arc<ChildShared>> = {
            let mut routes = relock(&self.routes);
            if routes.closed.is_none() {
                routes.closed = Some(why);
            }
            routes
                .children
                .drain()
                .map(|(_, route)| {
                    route.stdin.close();
                    route.child
                })
                .collect()
        };
        for child in children {
            child.lock().closed = true;
            child.changed.notify_all();
        }
        relock(&self.outbox).open = false;
        self.outbox_changed.notify_all();
    }
}

/// A connection to the agent, after the version handshake.
pub struct Client<S: ClientStream> {
    shared: Arc<Shared>,
    control: S,
    writer: Option<JoinHandle<()>>,
    demux: Option<JoinHandle<()>>,
}

impl<S: ClientStream> Client<S> {
    /// [`Client::handshake_with`] the default deadlines.
    pub fn handshake(stream: S) -> Result<Self, ClientError> {
        Self::handshake_with(stream, ClientConfig::default())
    }

    /// Exchange HELLO with the agent, all of it within
    /// `config.handshake_timeout`, and start the demultiplexer and writer
    /// threads.
    pub fn handshake_with(mut stream: S, config: ClientConfig) -> Result<Self, ClientError> {
        let deadline = Instant::now()
            .checked_add(config.handshake_timeout)
            .ok_or_else(|| ClientError::Protocol("handshake timeout out of range".into()))?;
        let timeout = |e: ClientError| match e {
            ClientError::Io(e) if timed_out(&e) => ClientError::Timeout(config.handshake_timeout),
            other => other,
        };
        stream
            .set_write_timeout_stream(Some(config.handshake_timeout))
            .map_err(ClientError::Io)?;
        protocol::write_frame(&mut stream, &Frame::Hello { version: VERSION })
            .map_err(|e| timeout(e.into()))?;
        stream.flush().map_err(ClientError::Io)?;
        let mut reader = DeadlineReader {
            stream: &mut stream,
            deadline,
        };
        let reply = protocol::read_frame(&mut reader).map_err(|e| timeout(e.into()))?;
        match reply {
            Some(Frame::Hello { version: VERSION }) => {}
            Some(Frame::Hello { version }) => {
                return Err(ClientError::VersionMismatch { agent: version })
            }
            Some(Frame::Error { message, .. }) => return Err(ClientError::AgentError(message)),
            Some(_) => return Err(ClientError::Protocol("first frame was not HELLO".into())),
            None => return Err(ClientError::Closed),
        }
        if let Some(bytes) = config.entropy {
            let frame = Frame::Entropy {
                bytes: bytes.to_vec(),
            };
            protocol::write_frame(&mut stream, &frame).map_err(|e| timeout(e.into()))?;
            stream.flush().map_err(ClientError::Io)?;
        }
        stream
            .set_read_timeout_stream(None)
            .map_err(ClientError::Io)?;
        stream
            .set_write_timeout_stream(Some(config.write_stall))
            .map_err(ClientError::Io)?;
        let reader = stream.try_clone_stream().map_err(ClientError::Io)?;
        let control = stream.try_clone_stream().map_err(ClientError::Io)?;
        let shared = Arc::new(Shared {
            outbox: Mutex::new(Outbox {
                frames: VecDeque::new(),
                credit: HashMap::new(),
                open: true,
            }),
            outbox_changed: Condvar::new(),
            routes: Mutex::new(Routes {
                children: HashMap::new(),
                closed: None,
            }),
            next_id: AtomicU32::new(1),
            closing: AtomicBool::new(false),
        });
        let writer_shared = Arc::clone(&shared);
        let stall = config.write_stall;
        let writer = chitin_seccomp::spawn(
            "chitin-agent-tx",
            ThreadClass::Agent,
            config.seccomp,
            move || write_loop(stream, &writer_shared, stall),
        )
        .map_err(ClientError::Io)?;
        let demux_shared = Arc::clone(&shared);
        let demux = chitin_seccomp::spawn(
            "chitin-agent-rx",
            ThreadClass::Agent,
            config.seccomp,
            move || demux(reader, &demux_shared),
        );
        let mut client = Self {
            shared,
            control,
            writer: Some(writer),
            demux: None,
        };
        // On failure, dropping `client` stops the writer.
        client.demux = Some(demux.map_err(ClientError::Io)?);
        Ok(client)
    }

    /// Whether the connection has ended (the agent closed it, broke the
    /// protocol or stopped reading): a new one is needed.
    pub fn is_closed(&self) -> bool {
        relock(&self.shared.routes).closed.is_some()
    }

    /// Start a process; returns once the agent reports it running, or
    /// after [`START_TIMEOUT`].
    pub fn spawn(&self, request: &ExecRequest) -> Result<Child, ClientError> {
        self.spawn_timeout(request, START_TIMEOUT)
    }

    /// [`Client::spawn`], waiting at most `timeout` for the agent to
    /// report the process running. On timeout the process is killed should
    /// it start after all.
    pub fn spawn_timeout(
        &self,
        request: &ExecRequest,
        timeout: Duration,
    ) -> Result<Child, ClientError> {
        let child = Arc::new(ChildShared {
            inbox: Mutex::new(Inbox {
                started: None,
                pending: Default::default(),
                end: None,
                closed: false,
                discard: [false; 2],
                abandoned: false,
            }),
            changed: Condvar::new(),
        });
        let stdin = Arc::new(Window::new());
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
                    child: Arc::clone(&child),
                    started: false,
                    exited: false,
                    ended: [false; 2],
                    stdin: Arc::clone(&stdin),
                    stdin_sent: 0,
                    unacked: [0; 2],
                },
            );
            id
        };
        let handle = Arc::new(Handle {
            id,
            shared: Arc::clone(&self.shared),
            child,
        });
        let frame = Frame::Exec {
            id,
            request: request.clone(),
        };
        if let Err(e) = self.shared.send(&frame) {
            relock(&self.shared.routes).children.remove(&id);
            return Err(e);
        }
        let deadline = deadline_after(timeout);
        let mut inbox = handle.child.lock();
        let failure = loop {
            match &inbox.started {
                Some(Ok(pid)) => {
                    let pid = *pid;
                    drop(inbox);
                    return Ok(Child {
                        id,
                        pid,
                        shared: Arc::clone(&self.shared),
                        stdin: request.stdin.then_some(stdin),
                        handle,
                    });
                }
                Some(Err(m)) => break ClientError::Refused(m.clone()),
                None if inbox.closed => {
                    drop(inbox);
                    return Err(self.shared.closed_error());
                }
                None => {}
            }
            let (guard, late) = wait_until(&handle.child.changed, inbox, deadline);
            inbox = guard;
            if late && inbox.started.is_none() {
                drop(inbox);
                // If it starts after all, it must not run unwatched: the
                // kill follows the EXEC on the stream, so it lands.
                let _ = self.shared.send(&Frame::Signal { id, signo: SIGKILL });
                relock(&self.shared.routes).children.remove(&id);
                return Err(ClientError::Timeout(timeout));
            }
        };
        drop(inbox);
        relock(&self.shared.routes).children.remove(&id);
        Err(failure)
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
        // The writer ends once the outbox closes; a write it is in fails on
        // the shut-down stream.
        relock(&self.shared.outbox).open = false;
        self.shared.outbox_changed.notify_all();
        let _ = self.control.shutdown_stream();
        for thread in [self.writer.take(), self.demux.take()]
            .into_iter()
            .flatten()
        {
            let _ = thread.join();
        }
    }
}

/// The next thing to write: merged output credit first (it unblocks the
/// agent), then frames in order. `None` once the outbox closed.
fn next_outgoing(shared: &Shared) -> Option<Outgoing> {
    let mut outbox = relock(&shared.outbox);
    loop {
        if !outbox.open {
            return None;
        }
        if let Some(&key) = outbox.credit.keys().next() {
            let bytes = outbox.credit.remove(&key).unwrap_or(0);
            drop(outbox);
            let (id, stream) = key;
            // Counted as returned now: the agent may use it as soon as the
            // frame is out, before this thread could count it.
            if let Some(route) = relock(&shared.routes).children.get_mut(&id) {
                let unacked = &mut route.unacked[stream.index()];
                *unacked = unacked.saturating_sub(bytes);
            }
            return Frame::OutputCredit { id, stream, bytes }
                .encode()
                .ok()
                .map(Outgoing::Frame);
        }
        if let Some(item) = outbox.frames.pop_front() {
            drop(outbox);
            if let Outgoing::Stdin { id, len, .. } = &item {
                // Creditable from now on.
                if let Some(route) = relock(&shared.routes).children.get_mut(id) {
                    route.stdin_sent = route.stdin_sent.saturating_add(*len);
                }
            }
            return Some(item);
        }
        outbox = shared
            .outbox_changed
            .wait(outbox)
            .unwrap_or_else(|e| e.into_inner());
    }
}

/// Write all of `bytes` within `limit`, however the peer paces its reads
/// (each write waits at most what is left).
fn write_within<S: ClientStream>(
    stream: &mut S,
    mut bytes: &[u8],
    limit: Duration,
) -> io::Result<()> {
    let deadline = deadline_after(limit);
    while !bytes.is_empty() {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left.is_some_and(|l| l.is_zero()) {
            return Err(io::ErrorKind::TimedOut.into());
        }
        stream.set_write_timeout_stream(left)?;
        match stream.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    stream.flush()
}

/// Write queued frames until the outbox closes or the stream fails; a
/// frame not written whole within `stall` (a guest that stops reading, or
/// reads a byte now and then) ends the connection.
fn write_loop<S: ClientStream>(mut stream: S, shared: &Shared, stall: Duration) {
    while let Some(item) = next_outgoing(shared) {
        let bytes = match &item {
            Outgoing::Frame(bytes) | Outgoing::Stdin { bytes, .. } => bytes,
        };
        if let Err(e) = write_within(&mut stream, bytes, stall) {
            let why = if timed_out(&e) {
                ClientError::Stalled(stall)
            } else if shared.closing.load(Ordering::Relaxed) {
                ClientError::Closed
            } else {
                ClientError::Io(e)
            };
            shared.close_with(why);
            // Wakes the demultiplexer, which then finds the reason set.
            let _ = stream.shutdown_stream();
            return;
        }
    }
}

/// Read frames and route them to children until the stream ends or breaks
/// the protocol; then end the connection.
fn demux<S: ClientStream>(mut reader: S, shared: &Shared) {
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
    shared.close_with(end);
    // The agent sees the end too (and kills what runs on the connection),
    // whatever the client's owner does next.
    let _ = reader.shutdown_stream();
}

/// What one frame does to a child's inbox.
enum Delivery {
    Started(u32),
    /// Output bytes; empty: that output ended.
    Output(OutputStream, Vec<u8>),
    Exit(ExitStatus),
    /// The stream failed; it is over.
    Error(String),
}

/// Deliver one frame from the agent; an error ends the connection.
fn route(frame: Frame, shared: &Shared) -> Result<(), ClientError> {
    let (id, delivery) = match frame {
        Frame::Started { id, pid } => (id, Delivery::Started(pid)),
        Frame::Stdout { id, data } => (id, Delivery::Output(OutputStream::Stdout, data)),
        Frame::Stderr { id, data } => (id, Delivery::Output(OutputStream::Stderr, data)),
        Frame::Exit { id, status } => (id, Delivery::Exit(status)),
        Frame::Error { id: 0, message } => return Err(ClientError::AgentError(message)),
        Frame::Error { id, message } => (id, Delivery::Error(message)),
        Frame::StdinCredit { id, bytes } => return stdin_credit(shared, id, bytes),
        other => {
            let t = other.type_byte();
            return Err(ClientError::Protocol(format!(
                "agent sent client frame type {t:#04x}"
            )));
        }
    };
    let violation = |what: String| Err(ClientError::Protocol(format!("stream {id}: {what}")));
    // Check and account under the routes lock; touch the inbox after it
    // (consumers lock the inbox, then the outbox: never the routes lock
    // held while the inbox is taken).
    let child = {
        let mut routes = relock(&shared.routes);
        let Some(route) = routes.children.get_mut(&id) else {
            // A child that ended or was given up on: a late frame.
            return Ok(());
        };
        match &delivery {
            Delivery::Started(_) if route.started => return violation("second STARTED".into()),
            Delivery::Started(_) => route.started = true,
            Delivery::Error(_) => {}
            _ if !route.started => return violation("output or EXIT before STARTED".into()),
            Delivery::Exit(_) if route.exited => return violation("second EXIT".into()),
            Delivery::Exit(_) => {
                route.exited = true;
                // Nobody reads the process's stdin any more.
                route.stdin.close();
            }
            Delivery::Output(stream, _) if route.ended[stream.index()] => {
                return violation(format!("{} after its end", stream.name()));
            }
            Delivery::Output(stream, data) if data.is_empty() => {
                route.ended[stream.index()] = true;
            }
            Delivery::Output(stream, data) => {
                let len = data.len() as u32; // at most MAX_PAYLOAD
                let unacked = &mut route.unacked[stream.index()];
                if u64::from(*unacked) + u64::from(len) > u64::from(WINDOW) {
                    return violation(format!(
                        "{len} bytes of {} with {unacked} of {WINDOW} uncredited",
                        stream.name()
                    ));
                }
                *unacked += len;
            }
        }
        let done =
            matches!(delivery, Delivery::Error(_)) || (route.exited && route.ended == [true, true]);
        let child = Arc::clone(&route.child);
        if done {
            if let Some(route) = routes.children.remove(&id) {
                route.stdin.close();
            }
        }
        child
    };
    let mut inbox = child.lock();
    match delivery {
        Delivery::Started(pid) => inbox.started = Some(Ok(pid)),
        Delivery::Output(stream, data) => {
            let discard = inbox.discard[stream.index()];
            let p = &mut inbox.pending[stream.index()];
            if data.is_empty() {
                p.ended = true;
            } else if discard {
                // Nobody will read it: thrown away and credited, so the
                // process runs on as if its output went nowhere.
                p.owed += data.len() as u32;
                if p.owed >= CREDIT_BATCH {
                    shared.credit(id, stream, std::mem::take(&mut p.owed));
                }
            } else {
                p.data.extend(data);
            }
        }
        Delivery::Exit(status) => inbox.end = Some(Ok(status)),
        Delivery::Error(message) => {
            if inbox.started.is_none() {
                inbox.started = Some(Err(message.clone()));
            }
            inbox.end = Some(Err(message));
            inbox.pending.iter_mut().for_each(|p| p.ended = true);
        }
    }
    drop(inbox);
    child.changed.notify_all();
    Ok(())
}

/// The agent passed `bytes` of stream `id`'s stdin on: give the credit
/// back, if that much was sent.
fn stdin_credit(shared: &Shared, id: u32, bytes: u32) -> Result<(), ClientError> {
    let mut routes = relock(&shared.routes);
    // Unknown stream: it already ended, so its credit is moot.
    let Some(route) = routes.children.get_mut(&id) else {
        return Ok(());
    };
    if bytes > route.stdin_sent {
        return Err(ClientError::Protocol(format!(
            "stream {id}: stdin credit for {bytes} bytes with {} sent and unacknowledged",
            route.stdin_sent
        )));
    }
    route.stdin_sent -= bytes;
    route
        .stdin
        .give(bytes)
        .map_err(|e| ClientError::Protocol(format!("stream {id}: stdin credit: {e}")))
}

/// The part of a child its handles share; when the last goes, the child's
/// output is thrown away from then on and what was held is credited.
struct Handle {
    id: u32,
    shared: Arc<Shared>,
    child: Arc<ChildShared>,
}

impl Handle {
    /// Take up to `max` bytes of one output, owing their credit (handed to
    /// the writer in batches).
    fn consume<'a>(
        &self,
        inbox: &'a mut Inbox,
        stream: OutputStream,
        max: usize,
    ) -> std::collections::vec_deque::Drain<'a, u8> {
        let p = &mut inbox.pending[stream.index()];
        let n = p.data.len().min(max);
        p.owed += n as u32; // at most WINDOW in all
        if p.owed >= CREDIT_BATCH {
            self.shared
                .credit(self.id, stream, std::mem::take(&mut p.owed));
        }
        p.data.drain(..n)
    }

    /// Throw `stream`'s output away from now on, crediting what is held.
    fn discard(&self, inbox: &mut Inbox, stream: OutputStream) {
        inbox.discard[stream.index()] = true;
        let p = &mut inbox.pending[stream.index()];
        let held = p.owed + p.data.len() as u32;
        p.owed = 0;
        p.data = VecDeque::new();
        self.shared.credit(self.id, stream, held);
    }

    /// The connection ended under a waiter: why.
    fn closed(&self) -> ClientError {
        self.shared.closed_error()
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let mut inbox = self.child.lock();
        for stream in OutputStream::BOTH {
            self.discard(&mut inbox, stream);
        }
    }
}

/// A process running in the guest.
pub struct Child {
    id: u32,
    pid: u32,
    shared: Arc<Shared>,
    /// The stdin credit, until [`Child::stdin`] hands it out.
    stdin: Option<Arc<Window>>,
    handle: Arc<Handle>,
}

impl Child {
    /// The process id in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The writer for stdin, once, if the request asked for a piped stdin.
    pub fn stdin(&mut self) -> Option<ChildStdin> {
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
            handle: Arc::clone(&self.handle),
            stream: OutputStream::Stdout,
        }
    }

    /// A reader of stderr.
    pub fn stderr(&self) -> ChildOutput {
        ChildOutput {
            handle: Arc::clone(&self.handle),
            stream: OutputStream::Stderr,
        }
    }

    /// Output received and not consumed yet, per output (stdout, stderr):
    /// never more than [`WINDOW`] each.
    pub fn buffered(&self) -> [usize; 2] {
        let inbox = self.handle.child.lock();
        [0, 1].map(|i| inbox.pending[i].data.len())
    }

    /// Send signal `signo` (1..=64) to the process. Returns at once: the
    /// signal is queued for the agent.
    pub fn signal(&self, signo: i32) -> Result<(), ClientError> {
        self.signaller().signal(signo)
    }

    /// Kill the process (SIGKILL); [`Child::wait`] then reports `Signal(9)`.
    pub fn kill(&self) -> Result<(), ClientError> {
        self.signal(SIGKILL)
    }

    /// A cheap handle that signals this process from anywhere, also while
    /// another thread waits on the child.
    pub fn signaller(&self) -> Signaller {
        Signaller {
            id: self.id,
            shared: Arc::clone(&self.shared),
        }
    }

    /// Stop caring about this process: its output from now on is thrown
    /// away, and a [`ChildStdin`] write blocked on it (or any later one)
    /// fails with `BrokenPipe`. The process itself is not signalled.
    pub fn abandon(&self) {
        if let Some(route) = relock(&self.shared.routes).children.get(&self.id) {
            route.stdin.close();
        }
        // Readers of its output (other threads may hold them) see EOF now,
        // even while a grandchild keeps the process's pipes open.
        let mut inbox = self.handle.child.lock();
        inbox.abandoned = true;
        for stream in OutputStream::BOTH {
            self.handle.discard(&mut inbox, stream);
        }
        drop(inbox);
        self.handle.child.changed.notify_all();
    }

    /// Throw `stream`'s output away from now on (what is held too), as
    /// if it went to /dev/null: the process never waits on that pipe.
    pub fn discard(&self, stream: OutputStream) {
        let mut inbox = self.handle.child.lock();
        self.handle.discard(&mut inbox, stream);
    }

    /// Wait until the process has exited, like `std::process::Child::wait`:
    /// its output is not consumed, so a process whose unread output fills
    /// its window waits on its pipe (read it, or use [`Child::output`]).
    pub fn wait(&self) -> Result<ExitStatus, ClientError> {
        loop {
            // Without a deadline it returns only with the end.
            if let Some(status) = self.wait_deadline(None)? {
                return Ok(status);
            }
        }
    }

    /// [`Child::wait`] for at most `timeout`; `Ok(None)` if still running.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>, ClientError> {
        self.wait_deadline(deadline_after(timeout))
    }

    fn wait_deadline(&self, deadline: Option<Instant>) -> Result<Option<ExitStatus>, ClientError> {
        let child = &self.handle.child;
        let mut inbox = child.lock();
        loop {
            match &inbox.end {
                Some(Ok(s)) => return Ok(Some(*s)),
                Some(Err(m)) => return Err(ClientError::AgentError(m.clone())),
                None if inbox.closed => {
                    drop(inbox);
                    return Err(self.handle.closed());
                }
                None => {}
            }
            let (guard, late) = wait_until(&child.changed, inbox, deadline);
            inbox = guard;
            if late && inbox.end.is_none() {
                return Ok(None);
            }
        }
    }

    /// Wait for the exit and the end of both outputs, then return the
    /// status and all output not read yet.
    pub fn output(self) -> Result<Output, ClientError> {
        self.collect(usize::MAX, None)
    }

    /// [`Child::collect`] of both outputs.
    pub fn collect(&self, limit: usize, timeout: Option<Duration>) -> Result<Output, ClientError> {
        self.collect_some([true; 2], limit, timeout)
    }

    /// Consume the outputs `take` names (stdout, stderr) as they arrive
    /// until the process has exited and those outputs have ended (one not
    /// taken is left to its reader, and not waited for), and return them
    /// with the status. Fails with
    /// [`ClientError::OutputLimit`] as soon as one output holds more than
    /// `limit` bytes (the excess is discarded), and with
    /// [`ClientError::Timeout`] after `timeout`; either way the process
    /// runs on (kill or abandon it).
    pub fn collect_some(
        &self,
        take: [bool; 2],
        limit: usize,
        timeout: Option<Duration>,
    ) -> Result<Output, ClientError> {
        let deadline = timeout.and_then(deadline_after);
        let child = &self.handle.child;
        let mut taken: [Vec<u8>; 2] = Default::default();
        let mut inbox = child.lock();
        // Set once the deadline passed: one last look, then the timeout.
        let mut expired = false;
        loop {
            for stream in OutputStream::BOTH.into_iter().filter(|s| take[s.index()]) {
                let into = &mut taken[stream.index()];
                let room = limit - into.len();
                let over = inbox.pending[stream.index()].data.len() > room;
                into.extend(self.handle.consume(&mut inbox, stream, room));
                if over {
                    drop(self.handle.consume(&mut inbox, stream, usize::MAX));
                    return Err(ClientError::OutputLimit {
                        stream: stream.name(),
                        limit,
                    });
                }
            }
            let ended = OutputStream::BOTH
                .iter()
                .all(|s| !take[s.index()] || inbox.pending[s.index()].ended);
            match inbox.end.clone().filter(|_| ended) {
                Some(Ok(status)) => {
                    let [stdout, stderr] = taken;
                    return Ok(Output {
                        status,
                        stdout,
                        stderr,
                    });
                }
                Some(Err(m)) => return Err(ClientError::AgentError(m)),
                None if inbox.closed => {
                    drop(inbox);
                    return Err(self.handle.closed());
                }
                None if expired => {
                    return Err(ClientError::Timeout(timeout.unwrap_or_default()));
                }
                None => {}
            }
            let (guard, late) = wait_until(&child.changed, inbox, deadline);
            inbox = guard;
            expired = late;
        }
    }
}

/// Signals one process (see [`Child::signaller`]).
#[derive(Clone)]
pub struct Signaller {
    id: u32,
    shared: Arc<Shared>,
}

impl Signaller {
    /// [`Child::signal`].
    pub fn signal(&self, signo: i32) -> Result<(), ClientError> {
        if !(1..=64).contains(&signo) {
            return Err(ClientError::InvalidSignal(signo));
        }
        self.shared.send(&Frame::Signal { id: self.id, signo })
    }

    /// Give the process's terminal (an exec with a `tty`) a new size;
    /// returns at once. A process without a terminal ignores it.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ClientError> {
        let size = protocol::WindowSize { rows, cols };
        self.shared.send(&Frame::Resize { id: self.id, size })
    }
}

/// Writes a child's stdin; dropping it (or [`ChildStdin::close`]) sends EOF.
///
/// A write blocks, like one to a full pipe, while a window's worth of
/// earlier stdin is queued or not yet passed on to the process by the
/// agent; it fails with `BrokenPipe` once the process has exited or the
/// connection is gone.
pub struct ChildStdin {
    id: u32,
    shared: Arc<Shared>,
    window: Arc<Window>,
    open: bool,
}

impl ChildStdin {
    /// Send EOF.
    pub fn close(mut self) -> Result<(), ClientError> {
        self.open = false;
        self.shared.send_stdin(self.id, Vec::new())
    }
}

impl Write for ChildStdin {
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
        self.shared
            .send_stdin(self.id, buf[..n].to_vec())
            .map_err(io::Error::other)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ChildStdin {
    fn drop(&mut self) {
        if self.open {
            let _ = self.shared.send_stdin(self.id, Vec::new());
        }
    }
}

/// Reads a child's stdout or stderr; EOF once that output has ended and
/// everything is read. What is read is credited back to the agent.
pub struct ChildOutput {
    handle: Arc<Handle>,
    stream: OutputStream,
}

impl ChildOutput {
    /// Throw this output away from now on (what is held too), as a closed
    /// read end would: the process never waits on it.
    pub fn discard(self) {
        let mut inbox = self.handle.child.lock();
        self.handle.discard(&mut inbox, self.stream);
    }
}

impl Read for ChildOutput {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let child = &self.handle.child;
        let mut inbox = child.lock();
        loop {
            let p = &inbox.pending[self.stream.index()];
            if !p.data.is_empty() || buf.is_empty() {
                let (mut n, max) = (0, buf.len());
                for (dst, src) in
                    buf.iter_mut()
                        .zip(self.handle.consume(&mut inbox, self.stream, max))
                {
                    *dst = src;
                    n += 1;
                }
                return Ok(n);
            }
            if p.ended || inbox.abandoned {
                return Ok(0);
            }
            if inbox.closed {
                drop(inbox);
                return Err(io::Error::other(self.handle.closed()));
            }
            // Waiting releases the lock: the other output's reader and
            // `wait` go on meanwhile.
            inbox = wait_until(&child.changed, inbox, None).0;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use super::*;
    use chitin_agent::server::{self, NoHooks, ServerError};

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
        chitin_testkit::fnv1a(chitin_testkit::FNV_BASIS, bytes)
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

    /// A hostile agent peer: handshake, answer STARTED to the first
    /// `execs` EXECs, then hand the stream and their ids to `script`.
    fn hostile_agent(
        execs: usize,
        config: ClientConfig,
        script: impl FnOnce(UnixStream, Vec<u32>) + Send + 'static,
    ) -> (Client<UnixStream>, Vec<Child>) {
        let (host, mut guest) = UnixStream::pair().unwrap();
        thread::spawn(move || {
            let _ = protocol::read_frame(&mut guest);
            protocol::write_frame(&mut guest, &Frame::Hello { version: VERSION }).unwrap();
            let mut ids = Vec::new();
            while ids.len() < execs {
                let Ok(Some(Frame::Exec { id, .. })) = protocol::read_frame(&mut guest) else {
                    return;
                };
                protocol::write_frame(&mut guest, &Frame::Started { id, pid: id }).unwrap();
                ids.push(id);
            }
            script(guest, ids);
        });
        let client = Client::handshake_with(host, config).unwrap();
        let children = (0..execs)
            .map(|_| client.spawn(&request(&["x"]).with_stdin()).unwrap())
            .collect();
        (client, children)
    }

    /// This process's resident memory.
    fn rss_bytes() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        // SAFETY: sysconf has no preconditions.
        pages * unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64
    }

    #[test]
    fn agent_streaming_output_forever_gets_credit_only_for_what_is_consumed() {
        use std::sync::atomic::AtomicU64;
        let sent = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&sent);
        let (client, mut children) =
            hostile_agent(1, ClientConfig::default(), move |guest, ids| {
                // Sends on both outputs as fast as its credit allows, forever
                // (until the client goes away).
                let id = ids[0];
                let credit =
                    Arc::new([AtomicU64::new(WINDOW.into()), AtomicU64::new(WINDOW.into())]);
                let mut reader = guest.try_clone().unwrap();
                let granted = Arc::clone(&credit);
                thread::spawn(move || {
                    while let Ok(Some(frame)) = protocol::read_frame(&mut reader) {
                        if let Frame::OutputCredit { stream, bytes, .. } = frame {
                            granted[stream.index()].fetch_add(bytes.into(), Ordering::SeqCst);
                        }
                    }
                });
                let mut guest = guest;
                loop {
                    let mut idle = true;
                    for stream in OutputStream::BOTH {
                        let left = &credit[stream.index()];
                        if left.load(Ordering::SeqCst) >= MAX_CHUNK as u64 {
                            left.fetch_sub(MAX_CHUNK as u64, Ordering::SeqCst);
                            let data = vec![b'x'; MAX_CHUNK];
                            let frame = match stream {
                                OutputStream::Stdout => Frame::Stdout { id, data },
                                OutputStream::Stderr => Frame::Stderr { id, data },
                            };
                            if protocol::write_frame(&mut guest, &frame).is_err() {
                                return;
                            }
                            counter.fetch_add(MAX_CHUNK as u64, Ordering::SeqCst);
                            idle = false;
                        }
                    }
                    if idle {
                        thread::sleep(Duration::from_millis(1));
                    }
                }
            });
        let child = children.pop().unwrap();
        let rss_before = rss_bytes();
        // Waiting consumes nothing: no credit goes back, so the agent can
        // send one window per output and no more.
        assert_eq!(child.wait_timeout(Duration::from_secs(2)).unwrap(), None);
        assert_eq!(sent.load(Ordering::SeqCst), 2 * u64::from(WINDOW));
        assert_eq!(child.buffered(), [WINDOW as usize; 2]);
        // Consuming 16 MiB of stdout returns credit as it goes.
        let mut stdout = child.stdout();
        let mut buf = vec![0u8; MAX_CHUNK];
        for _ in 0..(16 << 20) / MAX_CHUNK {
            stdout.read_exact(&mut buf).unwrap();
        }
        let sent_now = sent.load(Ordering::SeqCst);
        assert!(sent_now >= 16 << 20, "{sent_now}");
        assert!(sent_now <= (16 << 20) + 3 * u64::from(WINDOW), "{sent_now}");
        assert!(child.buffered().iter().all(|&b| b <= WINDOW as usize));
        // Collecting with a limit ends as soon as one output is over it.
        let collected = within_ref(|| child.collect(1 << 20, None));
        assert!(matches!(
            collected,
            Some(Err(ClientError::OutputLimit {
                limit: 1_048_576,
                ..
            }))
        ));
        // 16 MiB went through; what stayed was never more than a window
        // per output (the bound: 128 MiB of growth of this whole test
        // process, where other tests run at the same time).
        let grown = rss_bytes().saturating_sub(rss_before);
        eprintln!(
            "streaming agent: {} bytes sent while nobody consumed, {sent_now} for 16 MiB consumed, RSS grew {grown} bytes",
            2 * WINDOW
        );
        assert!(grown < 128 << 20, "RSS grew by {grown} bytes");
        drop(child);
        drop(client);
    }

    /// Run `f` on this thread's data in a scoped thread; None if it did
    /// not finish within 20 s.
    fn within_ref<T: Send>(f: impl FnOnce() -> T + Send) -> Option<T> {
        thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel();
            let h = s.spawn(move || {
                let _ = tx.send(f());
            });
            let out = rx.recv_timeout(Duration::from_secs(20)).ok();
            if out.is_none() {
                panic!("did not finish within 20 s");
            }
            let _ = h.join();
            out
        })
    }

    #[test]
    fn agent_that_stops_reading_blocks_no_kill_wait_or_timeout() {
        // Longer than the waits below take, so they end before the stall.
        let stall = Duration::from_secs(2);
        let config = ClientConfig {
            write_stall: stall,
            ..ClientConfig::default()
        };
        let done = Arc::new(AtomicBool::new(false));
        let until = Arc::clone(&done);
        // After starting four processes the agent never reads again.
        let (client, mut children) = hostile_agent(4, config, move |guest, _| {
            while !until.load(Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(20));
            }
            drop(guest);
        });
        // A window of stdin each, 1 MiB in all: more than the socket
        // holds, so the client's writer blocks on the guest.
        let writers: Vec<_> = children
            .iter_mut()
            .map(|c| {
                let mut stdin = c.stdin().unwrap();
                thread::spawn(move || stdin.write_all(&vec![0u8; 4 << 20]))
            })
            .collect();
        thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        children[0].kill().unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(200),
            "kill took {:?}",
            t.elapsed()
        );
        let t = Instant::now();
        let waited = children[1].wait_timeout(Duration::from_millis(500));
        assert!(matches!(waited, Ok(None)), "{waited:?}");
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "wait took {:?}",
            t.elapsed()
        );
        let t = Instant::now();
        let collected = children[2].collect(usize::MAX, Some(Duration::from_millis(500)));
        assert!(
            matches!(collected, Err(ClientError::Timeout(_))),
            "{collected:?}"
        );
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "collect took {:?}",
            t.elapsed()
        );
        // The writer has not finished a frame within `stall`: the connection is
        // declared dead, and everything waiting on it ends.
        let t = Instant::now();
        let status = within_ref(|| children[3].wait());
        assert!(
            matches!(status, Some(Err(ClientError::Stalled(d))) if d == stall),
            "{status:?}"
        );
        assert!(
            t.elapsed() < 2 * stall,
            "stall noticed after {:?}",
            t.elapsed()
        );
        eprintln!(
            "agent that stops reading: connection ended as stalled {:?} after the wait began",
            t.elapsed()
        );
        assert!(client.is_closed());
        for w in writers {
            let err = within(move || w.join().unwrap()).unwrap().unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        }
        done.store(true, Ordering::SeqCst);
    }

    #[test]
    fn agent_reading_a_byte_now_and_then_still_counts_as_stalled() {
        let stall = Duration::from_secs(1);
        let config = ClientConfig {
            write_stall: stall,
            ..ClientConfig::default()
        };
        let done = Arc::new(AtomicBool::new(false));
        let until = Arc::clone(&done);
        // After starting a process the agent reads one byte every 100 ms:
        // every write makes progress, no frame ever completes.
        let (client, mut children) = hostile_agent(1, config, move |mut guest, _| {
            let mut byte = [0u8; 1];
            while !until.load(Ordering::SeqCst) && guest.read(&mut byte).is_ok() {
                thread::sleep(Duration::from_millis(100));
            }
        });
        let mut stdin = children[0].stdin().unwrap();
        let writer = thread::spawn(move || stdin.write_all(&vec![0u8; 4 << 20]));
        let t = Instant::now();
        let status = within_ref(|| children[0].wait());
        assert!(
            matches!(status, Some(Err(ClientError::Stalled(d))) if d == stall),
            "{status:?}"
        );
        eprintln!(
            "agent reading a byte per 100 ms: stalled after {:?}",
            t.elapsed()
        );
        assert!(client.is_closed());
        let err = within(move || writer.join().unwrap()).unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        done.store(true, Ordering::SeqCst);
    }

    #[test]
    fn handshake_with_an_agent_dribbling_hello_ends_at_its_deadline() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        thread::spawn(move || {
            let _ = protocol::read_frame(&mut guest);
            // A byte every 300 ms: each read would be quick, the whole
            // HELLO takes 2.7 s.
            let hello = Frame::Hello { version: VERSION }.encode().unwrap();
            for b in hello {
                if guest.write_all(&[b]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(300));
            }
        });
        let timeout = Duration::from_secs(1);
        let config = ClientConfig {
            handshake_timeout: timeout,
            ..ClientConfig::default()
        };
        let t = Instant::now();
        let result = Client::handshake_with(host, config);
        assert!(matches!(result, Err(ClientError::Timeout(d)) if d == timeout));
        assert!(t.elapsed() < 2 * timeout, "took {:?}", t.elapsed());
        eprintln!(
            "dribbled HELLO: handshake timed out after {:?} (deadline {timeout:?})",
            t.elapsed()
        );
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
    fn agent_output_after_its_end_is_a_protocol_error() {
        let client = fake_agent(|s, id| {
            let _ = protocol::write_frame(s, &Frame::Stderr { id, data: vec![] });
            let _ = protocol::write_frame(s, &Frame::Stderr { id, data: vec![1] });
        });
        let child = client.spawn(&request(&["x"])).unwrap();
        assert!(
            matches!(child.wait(), Err(ClientError::Protocol(m)) if m.contains("stderr after its end"))
        );
    }

    #[test]
    fn agent_second_exit_is_a_protocol_error() {
        let client = fake_agent(|s, id| {
            let exit = Frame::Exit {
                id,
                status: ExitStatus::Code(0),
            };
            let _ = protocol::write_frame(s, &exit);
            let _ = protocol::write_frame(s, &exit);
        });
        let child = client.spawn(&request(&["x"])).unwrap();
        // The first EXIT is reported; the second ends the connection.
        assert_eq!(child.wait().unwrap(), ExitStatus::Code(0));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !client.is_closed() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let again = client.spawn(&request(&["x"]));
        assert!(matches!(again, Err(ClientError::Protocol(m)) if m.contains("second EXIT")));
    }

    #[test]
    fn exit_is_reported_while_unread_output_holds_the_pipe() {
        let (client, _server) = connect();
        // Far more than a window: the process blocks on its pipe until it
        // is killed, and its EXIT must come although nobody read.
        let flood = client.spawn(&request(&["yes"])).unwrap();
        thread::sleep(Duration::from_millis(300));
        assert_eq!(
            flood.buffered()[0],
            WINDOW as usize,
            "a full window, no more"
        );
        flood.kill().unwrap();
        let status = within(move || flood.wait().unwrap());
        assert_eq!(status, Some(ExitStatus::Signal(9)));
    }

    #[test]
    fn two_readers_and_a_waiter_all_get_through() {
        let (client, _server) = connect();
        // 1 MiB to stderr first, then 1 MiB to stdout: the stdout reader
        // waits while the stderr reader must get the lock to drain, and
        // `wait` waits beside both.
        let cmd = "head -c 1048576 /dev/zero >&2; head -c 1048576 /dev/zero";
        let child = Arc::new(client.spawn(&request(&["sh", "-c", cmd])).unwrap());
        let reader = |mut out: ChildOutput| {
            thread::spawn(move || {
                let mut all = Vec::new();
                out.read_to_end(&mut all).map(|_| all.len())
            })
        };
        let (out, err) = (reader(child.stdout()), reader(child.stderr()));
        let waiter = Arc::clone(&child);
        let status = within(move || waiter.wait().unwrap());
        assert_eq!(status, Some(ExitStatus::Code(0)));
        let lens = within(move || (out.join().unwrap().unwrap(), err.join().unwrap().unwrap()));
        assert_eq!(lens, Some((1 << 20, 1 << 20)));
    }

    #[test]
    fn reading_stdout_only_is_not_held_up_by_unread_stderr() {
        let (client, _server) = connect();
        // 1 MiB to stderr that nobody reads, then a line to stdout: with
        // one window for both, stdout would never arrive.
        let cmd = "head -c 1048576 /dev/zero >&2 & echo out; wait";
        let child = client.spawn(&request(&["sh", "-c", cmd])).unwrap();
        let mut out = child.stdout();
        let line = within(move || {
            let mut line = [0u8; 4];
            out.read_exact(&mut line).map(|()| line)
        });
        assert_eq!(line.map(|l| l.ok()), Some(Some(*b"out\n")));
        child.kill().unwrap();
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
            stream: OutputStream::Stderr,
            bytes: chitin_agent_protocol::WINDOW,
        };
        protocol::write_frame(&mut host, &credit).unwrap();
        assert!(matches!(
            server.join().unwrap(),
            Err(ServerError::OutputCredit(_))
        ));
    }

    #[test]
    fn a_terminal_takes_its_size_a_resize_and_typed_input() {
        use std::io::BufRead;
        let (client, _server) = connect();
        let script =
            "test -t 0 && test -t 2 && echo tty; stty size; read l; stty size; echo got-$l";
        let mut req = request(&["sh", "-c", script]).with_stdin();
        req.tty = Some(protocol::WindowSize {
            rows: 30,
            cols: 100,
        });
        let mut child = client.spawn(&req).unwrap();
        let mut stdin = child.stdin().unwrap();
        let mut out = std::io::BufReader::new(child.stdout());
        let mut seen = String::new();
        while !seen.contains("30 100") {
            assert!(out.read_line(&mut seen).unwrap() > 0, "{seen:?}");
        }
        child.signaller().resize(40, 120).unwrap();
        stdin.write_all(b"go\n").unwrap();
        let mut rest = String::new();
        out.read_to_string(&mut rest).unwrap();
        let mut err = Vec::new();
        child.stderr().read_to_end(&mut err).unwrap();
        assert_eq!(child.wait().unwrap(), ExitStatus::Code(0));
        let text = format!("{seen}{rest}").replace('\r', "");
        // The terminal echoes the typed line; stderr is the terminal too.
        assert_eq!(text, "tty\n30 100\ngo\n40 120\ngot-go\n");
        assert!(err.is_empty());
    }

    #[test]
    fn a_resize_for_a_process_without_a_terminal_is_ignored() {
        let (client, _server) = connect();
        let child = client.spawn(&request(&["sleep", "1000"])).unwrap();
        child.signaller().resize(1, 1).unwrap();
        child.kill().unwrap();
        assert_eq!(child.wait().unwrap(), ExitStatus::Signal(9));
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
    fn exec_missing_binary_is_refused() {
        let (client, _server) = connect();
        let result = client.exec(&request(&["/nonexistent/chitin-no-such-binary"]));
        match result {
            Err(ClientError::Refused(m)) => assert!(m.contains("No such file"), "{m}"),
            other => panic!("expected Refused, got {other:?}"),
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
    fn handshake_with_entropy_sends_it_before_any_request() {
        let (host, mut guest) = UnixStream::pair().unwrap();
        let fake = thread::spawn(move || {
            let hello = protocol::read_frame(&mut guest).unwrap();
            assert_eq!(hello, Some(Frame::Hello { version: VERSION }));
            protocol::write_frame(&mut guest, &Frame::Hello { version: VERSION }).unwrap();
            let next = protocol::read_frame(&mut guest).unwrap();
            assert_eq!(
                next,
                Some(Frame::Entropy {
                    bytes: vec![9; ENTROPY_LEN]
                })
            );
            protocol::read_frame(&mut guest).unwrap()
        });
        let config = ClientConfig {
            entropy: Some([9; ENTROPY_LEN]),
            ..ClientConfig::default()
        };
        let client = Client::handshake_with(host, config).unwrap();
        client.shutdown().unwrap();
        assert_eq!(fake.join().unwrap(), Some(Frame::Shutdown));
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
