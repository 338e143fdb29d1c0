//! The exec service: runs the processes a client asks for over one
//! connection and streams their output back.
//!
//! Per connection there is one reader (the caller's thread, running
//! [`serve`]), one writer thread that owns the write half, and for each
//! process two pipe readers, a waiter, and a stdin writer when stdin is
//! piped. Everything headed for the client goes through one channel to the
//! writer.
//!
//! Flow control is per process (protocol version 2): a pipe reader reads
//! only as much output as the client has credit for, so a client that does
//! not read one process's output stops that process on its full pipe and
//! nothing else; STDIN data goes to the process's own stdin writer, queued
//! up to the client's window. The connection's reader therefore never waits
//! for a process or for the client (the writer's channel is unbounded, but
//! output in it is bounded by the windows and the rest answers the client's
//! own frames), so SIGNAL and credit always get through.
//!
//! When the connection ends, every process still running is killed with
//! SIGKILL (its whole process group), reaped, and every thread joined. The
//! server never panics on what the client sends: a malformed frame gets a
//! stream-0 ERROR and the connection is closed.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use chitin_agent_protocol::window::{Overflow, Window};

use crate::container;
use chitin_agent_protocol::{
    self as protocol, Attributes, ExecRequest, ExitStatus, Frame, OutputStream, ProtocolError,
    WindowSize, MAX_CHUNK, MAX_STRING, VERSION, WINDOW,
};

/// Most processes running at once on one connection (bounds threads).
const MAX_PROCS: usize = 256;
/// Stack of the helper threads: they only copy bytes.
const THREAD_STACK: usize = 128 << 10;
/// Highest signal number Linux accepts (`SIGRTMAX`).
const MAX_SIGNO: i32 = 64;

/// Why serving a connection stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The client sent something that is not the protocol.
    #[error("client broke the protocol")]
    Protocol(#[source] ProtocolError),
    /// The client's first frame was not HELLO.
    #[error("first frame was not HELLO")]
    NoHello,
    /// The client speaks another protocol version.
    #[error("client speaks protocol version {0}, agent speaks {VERSION}")]
    VersionMismatch(u32),
    /// A helper thread could not be started.
    #[error("cannot start a thread")]
    Thread(#[source] io::Error),
    /// The client returned more output credit than the window holds.
    #[error("client broke output flow control")]
    OutputCredit(#[source] Overflow),
    /// The host's entropy could not be mixed into the kernel's pool.
    #[error("cannot add the host's entropy: {0}")]
    Entropy(io::Error),
    /// The client asked for a signal number outside 1..=64.
    #[error("client asked for signal {0}")]
    BadSignal(i32),
    /// The client sent more stdin than its window allows.
    #[error("client sent {sent} bytes of stdin with {unacked} of {WINDOW} unacknowledged")]
    StdinOverrun {
        /// Bytes in the STDIN frame.
        sent: usize,
        /// Bytes already queued for the process.
        unacked: u32,
    },
}

/// What the embedding program does for requests the library cannot handle.
pub trait ServerHooks: Sync {
    /// SHUTDOWN arrived. The guest binary syncs and reboots here (and never
    /// returns); after a return, the server ends the connection.
    fn shutdown(&self) {}

    /// ENTROPY arrived: mix the host's random bytes into the kernel's pool
    /// and reseed it. The guest binary does ([`crate::entropy::add`]); an
    /// error ends the connection, so no command runs on unmixed state.
    fn add_entropy(&self, bytes: &[u8]) -> io::Result<()> {
        let _ = bytes;
        Ok(())
    }
}

/// Hooks that do nothing: SHUTDOWN just closes the connection.
pub struct NoHooks;

impl ServerHooks for NoHooks {}

/// Pids of the processes every connection of this program started and
/// has not reaped yet. [`spawn_orphan_reaper`] leaves these to their
/// connection's waiter. A process is added with the lock held across its
/// spawn and removed with it held across its reaping, so the reaper never
/// sees one of them unowned.
static OWNED: Mutex<BTreeSet<i32>> = Mutex::new(BTreeSet::new());

fn owned() -> MutexGuard<'static, BTreeSet<i32>> {
    // A poisoned lock only means a holder panicked; the set is still valid.
    OWNED.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long the reaper waits before looking again when it has no children,
/// or when the exited child it found belongs to a connection.
const REAPER_IDLE: Duration = Duration::from_millis(100);
const REAPER_YIELD: Duration = Duration::from_millis(5);

/// For an agent that is PID 1: reap, from a thread of its own, every exited
/// child that no connection started: processes orphaned when their parent
/// exited first (`sh -c 'daemon &'`), which the kernel hands to PID 1.
/// Without it their zombies stay until the VM stops.
///
/// Call it only in a program whose every other child is started by this
/// module: anything else it spawns and waits for would be reaped from
/// under it.
pub fn spawn_orphan_reaper() -> Result<JoinHandle<()>, ServerError> {
    spawn_named("agent-reaper", || loop {
        // SAFETY: siginfo_t is plain data; waitid fills it or fails.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid siginfo_t; WNOWAIT leaves the child
        // waitable, so a connection's waiter can still reap its own.
        let ret = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if ret != 0 {
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => {}
                // ECHILD: no children at all right now.
                _ => thread::sleep(REAPER_IDLE),
            }
            continue;
        }
        // SAFETY: waitid succeeded with WEXITED, so the kernel filled the
        // child fields of `info`.
        let pid = unsafe { info.si_pid() };
        let owned = owned();
        if pid <= 0 || owned.contains(&pid) {
            // Its connection's waiter reaps it in a moment.
            drop(owned);
            thread::sleep(REAPER_YIELD);
            continue;
        }
        // SAFETY: reaps exactly the exited child `pid`, which no connection
        // owns (checked under the lock spawns take); a null status pointer
        // is allowed.
        unsafe { libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG) };
    })
}

/// A process of this connection, from its spawn until its waiter is done
/// (EXIT sent, helper threads joined).
struct Proc {
    pid: i32,
    /// It has exited and been reaped (or is being reaped): its pid may be
    /// reused, so it gets no more signals.
    exited: bool,
    /// Queue to the process's stdin writer; `None` once closed (or never
    /// piped).
    stdin: Option<Sender<Vec<u8>>>,
    /// STDIN bytes received and not yet credited back to the client.
    stdin_unacked: Arc<AtomicU32>,
    /// Credit for this process's STDOUT and STDERR, one window each (see
    /// [`OutputStream::index`]).
    output: [Arc<Window>; 2],
    /// Its terminal's master side, for RESIZE.
    tty: Option<File>,
}

/// The processes of one connection, by stream id. A process is marked
/// `exited` under this lock before it is reaped, and signals are sent under
/// it only to processes not marked, so a signal can never hit a recycled
/// pid.
type ProcTable = Arc<Mutex<HashMap<u32, Proc>>>;

fn lock(table: &ProcTable) -> MutexGuard<'_, HashMap<u32, Proc>> {
    // A poisoned lock only means a helper panicked; the map is still valid.
    table.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serve one connection until the client closes it or breaks the protocol.
///
/// `reader` and `writer` are the two halves of one stream (for a socket,
/// the stream and its `try_clone`). Returns after every process of the
/// connection has been killed and reaped and every helper thread joined.
pub fn serve<R, W, H>(mut reader: R, writer: W, hooks: &H) -> Result<(), ServerError>
where
    R: Read,
    W: Write + Send + 'static,
    H: ServerHooks + ?Sized,
{
    let (tx, rx) = channel::<Frame>();
    let writer_thread = spawn_named("agent-writer", move || write_loop(writer, rx))?;
    let table: ProcTable = Arc::default();
    let mut waiters = Vec::new();
    let result = read_loop(&mut reader, &tx, &table, &mut waiters, hooks);
    if let Err(e) = &result {
        let _ = tx.send(Frame::Error {
            id: 0,
            message: bounded(e.to_string()),
        });
    }
    kill_all(&table);
    drop(tx);
    for w in waiters {
        let _ = w.join();
    }
    let _ = writer_thread.join();
    result
}

fn read_loop<R: Read, H: ServerHooks + ?Sized>(
    reader: &mut R,
    tx: &Sender<Frame>,
    table: &ProcTable,
    waiters: &mut Vec<JoinHandle<()>>,
    hooks: &H,
) -> Result<(), ServerError> {
    match protocol::read_frame(reader).map_err(ServerError::Protocol)? {
        Some(Frame::Hello { version: VERSION }) => {
            let _ = tx.send(Frame::Hello { version: VERSION });
        }
        Some(Frame::Hello { version }) => return Err(ServerError::VersionMismatch(version)),
        None => return Ok(()),
        Some(_) => return Err(ServerError::NoHello),
    }
    while let Some(frame) = protocol::read_frame(reader).map_err(ServerError::Protocol)? {
        match frame {
            Frame::Exec { id, request } => {
                waiters.retain(|w| !w.is_finished());
                if let Some(w) = start(id, &request, tx, table, waiters.len())? {
                    waiters.push(w);
                }
            }
            Frame::Stdin { id, data } => feed_stdin(id, data, table)?,
            Frame::OutputCredit { id, stream, bytes } => output_credit(id, stream, bytes, table)?,
            Frame::Signal { id, signo } => signal(id, signo, table)?,
            Frame::Resize { id, size } => resize(id, size, table),
            Frame::Shutdown => {
                hooks.shutdown();
                return Ok(());
            }
            Frame::Entropy { bytes } => hooks.add_entropy(&bytes).map_err(ServerError::Entropy)?,
            other => {
                let _ = tx.send(Frame::Error {
                    id: 0,
                    message: format!("frame type {:#04x} is agent-to-client", other.type_byte()),
                });
                return Ok(());
            }
        }
    }
    Ok(())
}

/// The most bytes of queued frames the writer joins into one write.
const WRITE_BATCH: usize = 256 * 1024;

/// Write every frame sent on `rx`. Frames already queued when the writer
/// wakes go out in one write (up to [`WRITE_BATCH`] bytes): each write to a
/// vsock socket is at least one packet, and each packet costs the VMM a
/// notification and the host a wake-up, so small frames queued together
/// (a short command's end of output and EXIT) cross as one.
fn write_loop<W: Write>(mut writer: W, rx: Receiver<Frame>) {
    let mut batch = Vec::new();
    while let Ok(first) = rx.recv() {
        batch.clear();
        let mut next = Some(first);
        while let Some(frame) = next.take() {
            // Encoding fails only on a frame the protocol cannot carry
            // (the agent bounds what it builds): what is batched still
            // goes out, then an ERROR on stream 0 that ends the connection
            // for the client, rather than a broken stream or silence.
            if let Err(e) = protocol::write_frame(&mut batch, &frame) {
                let _ = protocol::write_frame(
                    &mut batch,
                    &Frame::Error {
                        id: 0,
                        message: format!("agent cannot encode a frame: {e}"),
                    },
                );
                let _ = writer.write_all(&batch).and_then(|()| writer.flush());
                return;
            }
            if batch.len() < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        // On a write error, return: dropping `rx` makes every sender fail,
        // which stops the pipe readers; the read side then sees the close.
        if writer.write_all(&batch).is_err() || writer.flush().is_err() {
            return;
        }
    }
}

fn spawn_named<F>(name: &str, f: F) -> Result<JoinHandle<()>, ServerError>
where
    F: FnOnce() + Send + 'static,
{
    thread::Builder::new()
        .name(name.into())
        .stack_size(THREAD_STACK)
        .spawn(f)
        .map_err(ServerError::Thread)
}

fn send_error(tx: &Sender<Frame>, id: u32, message: String) {
    let _ = tx.send(Frame::Error {
        id,
        message: bounded(message),
    });
}

/// `message` cut to what an ERROR frame carries ([`MAX_STRING`] bytes, at
/// a character boundary): it may quote a client's 128 KiB argument.
fn bounded(mut message: String) -> String {
    if message.len() > MAX_STRING {
        let mut end = MAX_STRING;
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
    }
    message
}

/// A new terminal: its master side, and its slave side for the process.
struct Pty {
    master: File,
    slave: File,
}

/// Open a terminal of `size` (the guest's devpts at /dev/pts).
fn open_pty(size: WindowSize) -> io::Result<Pty> {
    let master = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open("/dev/ptmx")?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads one int, which outlives the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: TIOCGPTPEER takes open flags and returns a new fd of the
    // slave side, which nothing else owns.
    let slave = unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    };
    if slave < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new fd from the kernel, owned by nothing else.
    let slave = unsafe { File::from_raw_fd(slave) };
    resize_pty(&master, size)?;
    Ok(Pty { master, slave })
}

/// Set a terminal's size (its foreground process group gets SIGWINCH).
fn resize_pty(master: &File, size: WindowSize) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize, which outlives the call.
    if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn command(req: &ExecRequest, pty: Option<&Pty>) -> io::Result<Command> {
    let mut cmd = match &req.root {
        // A container process: the helper sets up its namespaces, root,
        // working directory and ids, then becomes the program.
        Some(root) => {
            let spec = container::Spec {
                root: root.clone(),
                hostname: req.hostname.clone().unwrap_or_default(),
                cwd: req.cwd.clone().unwrap_or_default(),
                gid: req.gid,
                uid: req.uid,
                mounts: req.mounts.clone(),
                attributes: (*req.attributes).clone(),
            };
            let mut cmd = Command::new("/proc/self/exe");
            cmd.args(spec.helper_args()).args(&req.argv);
            cmd
        }
        None => {
            let mut cmd = Command::new(&req.argv[0]);
            cmd.args(&req.argv[1..]);
            cmd
        }
    };
    cmd.env_clear().envs(req.env.iter().map(|(k, v)| (k, v)));
    match pty {
        Some(pty) => {
            cmd.stdin(pty.slave.try_clone()?)
                .stdout(pty.slave.try_clone()?)
                .stderr(pty.slave.try_clone()?);
            // A session of its own with the terminal as its controlling
            // one: its process group is its pid too, as below.
            // SAFETY: setsid and ioctl are async-signal-safe system calls
            // that touch no memory of the parent's.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        None => {
            cmd.stdin(if req.stdin {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Own process group, so closing the connection can kill what
            // the process started too (and their pipe ends close).
            .process_group(0);
        }
    }
    if req.root.is_some() {
        return Ok(cmd);
    }
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    // SAFETY: getuid/getgid have no preconditions and cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    if let Some(g) = req.gid.filter(|&g| g != gid) {
        cmd.gid(g);
    }
    if let Some(u) = req.uid.filter(|&u| u != uid) {
        cmd.uid(u);
    }
    Ok(cmd)
}

/// Start one process; `Ok(None)` when it was refused with an ERROR frame.
fn start(
    id: u32,
    req: &ExecRequest,
    tx: &Sender<Frame>,
    table: &ProcTable,
    running: usize,
) -> Result<Option<JoinHandle<()>>, ServerError> {
    let refuse = |message: &str| {
        send_error(tx, id, message.to_string());
        Ok(None)
    };
    if id == 0 {
        return refuse("stream id 0 is reserved");
    }
    if req.argv.is_empty() {
        return refuse("empty argv");
    }
    if let Some(root) = &req.root {
        if let Err(e) = container::precheck(root) {
            return refuse(&e);
        }
        if let Some(e) = req
            .mounts
            .iter()
            .find_map(|m| container::check_mount(m).err())
        {
            return refuse(&e);
        }
    } else if req.hostname.is_some() {
        return refuse("a hostname needs a container root");
    } else if !req.mounts.is_empty() {
        return refuse("mounts need a container root");
    } else if *req.attributes != Attributes::default() {
        return refuse("groups, umask, rlimits, capabilities, no-new-privileges and an OOM score need a container root");
    }
    if running >= MAX_PROCS {
        return refuse("too many processes on this connection");
    }
    let mut procs = lock(table);
    if procs.contains_key(&id) {
        drop(procs);
        return refuse("stream id already in use");
    }
    // A terminal, and its master three times: its stdin, its stdout,
    // and its handle for RESIZE.
    let pty = req.tty.map(|size| {
        let pty = open_pty(size)?;
        let (writer, reader) = (pty.master.try_clone()?, pty.master.try_clone()?);
        Ok::<_, io::Error>((pty, writer, reader))
    });
    let (pty, tty_ends) = match pty.transpose() {
        Ok(Some((pty, writer, reader))) => (Some(pty), Some((writer, reader))),
        Ok(None) => (None, None),
        Err(e) => {
            drop(procs);
            return refuse(&format!("a terminal: {e}"));
        }
    };
    let mut owned = owned();
    let spawned = command(req, pty.as_ref()).and_then(|mut c| c.spawn());
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            drop(owned);
            drop(procs);
            let program = req.argv[0].to_string_lossy();
            return refuse(&format!("exec {program}: {e}"));
        }
    };
    let pid = child.id() as i32;
    owned.insert(pid);
    drop(owned);
    // Only the process holds the slave side now: the master reads EIO
    // (the output's end) once it and its children close it.
    let tty = pty.map(|p| p.master);
    let output = [Arc::new(Window::new()), Arc::new(Window::new())];
    let stdin_unacked = Arc::new(AtomicU32::new(0));
    // STARTED is queued before any helper exists, so it comes first.
    let _ = tx.send(Frame::Started {
        id,
        pid: pid as u32,
    });
    let mut stdin_tx = None;
    let mut helpers = Vec::new();
    let mut started = Ok(());
    // With a terminal, its stderr ends at once (the terminal carries
    // both outputs).
    let (tty_in, tty_out, tty_err) = match tty_ends {
        Some((writer, reader)) => (
            Some(Box::new(writer) as Box<dyn Write + Send>),
            Some(Box::new(reader) as Box<dyn Read + Send>),
            Some(Box::new(io::empty()) as Box<dyn Read + Send>),
        ),
        None => (None, None, None),
    };
    let stdin = match tty_in {
        Some(w) => Some(w),
        None => child
            .stdin
            .take()
            .map(|p| Box::new(p) as Box<dyn Write + Send>),
    };
    if let Some(pipe) = stdin {
        let (q_tx, q_rx) = channel();
        stdin_tx = Some(q_tx);
        started =
            feed(pipe, q_rx, id, tx.clone(), Arc::clone(&stdin_unacked)).map(|h| helpers.push(h));
    }
    let pipes = [
        tty_out.or_else(|| {
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>)
        }),
        tty_err.or_else(|| {
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>)
        }),
    ];
    let mut readers = Vec::new();
    for (pipe, stream) in pipes.into_iter().zip(OutputStream::BOTH) {
        if let (Ok(()), Some(pipe)) = (&started, pipe) {
            let window = Arc::clone(&output[stream.index()]);
            started = pump(pipe, id, tx.clone(), window, stream).map(|h| readers.push(h));
        }
    }
    if let Err(e) = started {
        // The connection ends on this error; leave nothing behind. The
        // helpers already running see their pipes close and end.
        output.iter().for_each(|w| w.close());
        drop(stdin_tx);
        drop(procs);
        abandon(child);
        return Err(e);
    }
    procs.insert(
        id,
        Proc {
            pid,
            exited: false,
            stdin: stdin_tx,
            stdin_unacked,
            output,
            tty,
        },
    );
    drop(procs);
    let (waiter_tx, waiter_table) = (tx.clone(), Arc::clone(table));
    let waiter = spawn_named("agent-wait", move || {
        // EXIT goes out as soon as the process is reaped, whatever its
        // output still waits for (credit, or something else in the group
        // holding the pipes): the readers end each output with an empty
        // frame of their own. A failed wait is reported after the output,
        // since ERROR ends the stream.
        match reap(id, child, &waiter_table) {
            Ok(status) => {
                let _ = waiter_tx.send(Frame::Exit { id, status });
                readers.into_iter().for_each(|r| drop(r.join()));
            }
            Err(message) => {
                readers.into_iter().for_each(|r| drop(r.join()));
                send_error(&waiter_tx, id, message);
            }
        }
        // A stdin writer can only still be busy on a pipe that something
        // left in the process group holds and does not read; closing the
        // connection kills the group.
        for h in helpers {
            let _ = h.join();
        }
        lock(&waiter_table).remove(&id);
    });
    match waiter {
        Ok(w) => Ok(Some(w)),
        Err(e) => {
            if let Some(p) = lock(table).remove(&id) {
                p.output.iter().for_each(|w| w.close());
            }
            // `child` moved into the closure that failed to start; it was
            // dropped unreaped, so kill and reap it by pid.
            abandon_pid(pid);
            Err(e)
        }
    }
}

/// Kill a child whose helpers could not all start, and reap it.
fn abandon(mut child: Child) {
    let pid = child.id() as i32;
    // SAFETY: kill takes no pointers; the child is unreaped and leads its
    // own process group.
    unsafe { libc::kill(-pid, libc::SIGKILL) };
    let _ = child.kill();
    let mut owned = owned();
    let _ = child.wait();
    owned.remove(&pid);
}

/// [`abandon`] for a child whose `Child` handle is gone.
fn abandon_pid(pid: i32) {
    // SAFETY: kill takes no pointers; `pid` is our unreaped child (still in
    // OWNED, so the orphan reaper leaves it alone).
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
        libc::kill(pid, libc::SIGKILL);
    }
    let mut owned = owned();
    // SAFETY: reaps exactly our child `pid`; a null status is allowed.
    unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
    owned.remove(&pid);
}

/// Write what the client sends for one process's stdin, returning credit
/// for every chunk once it is in the pipe (or dropped because the process
/// no longer reads). The pipe closes when the queue's sender is dropped.
fn feed(
    mut pipe: Box<dyn Write + Send>,
    queue: Receiver<Vec<u8>>,
    id: u32,
    tx: Sender<Frame>,
    unacked: Arc<AtomicU32>,
) -> Result<JoinHandle<()>, ServerError> {
    spawn_named("agent-stdin", move || {
        let mut open = true;
        for data in queue {
            // EPIPE: the process closed its stdin; later bytes are dropped
            // as a pipe nobody reads would, but still credited.
            open = open && pipe.write_all(&data).is_ok();
            let n = data.len() as u32;
            unacked.fetch_sub(n, Ordering::AcqRel);
            let _ = tx.send(Frame::StdinCredit { id, bytes: n });
        }
        drop(pipe);
    })
}

/// Copy one pipe into STDOUT or STDERR frames until EOF, reading only as
/// much as the client has given credit for, then send the empty frame that
/// ends that output.
fn pump<P: Read + Send + 'static>(
    mut pipe: P,
    id: u32,
    tx: Sender<Frame>,
    window: Arc<Window>,
    stream: OutputStream,
) -> Result<JoinHandle<()>, ServerError> {
    let frame = move |data| match stream {
        OutputStream::Stdout => Frame::Stdout { id, data },
        OutputStream::Stderr => Frame::Stderr { id, data },
    };
    spawn_named("agent-pipe", move || {
        let mut buf = vec![0u8; MAX_CHUNK];
        loop {
            // None: the connection is going away.
            let Some(credit) = window.take(MAX_CHUNK as u32) else {
                return;
            };
            let want = credit as usize;
            let read = loop {
                match pipe.read(&mut buf[..want]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other,
                }
            };
            let n = match read {
                Ok(n) if n > 0 => n,
                // End of file, or a pipe that failed: that output is over.
                _ => {
                    let _ = window.give(credit);
                    let _ = tx.send(frame(Vec::new()));
                    return;
                }
            };
            // Credit taken but not used goes back for the next read.
            let _ = window.give((want - n) as u32);
            if tx.send(frame(buf[..n].to_vec())).is_err() {
                return;
            }
        }
    })
}

/// Wait for the process to exit, mark it exited (no more signals, stdin
/// closed), then reap it. Its zombie lives only between those steps, so
/// the orphan reaper never waits long on it.
fn reap(id: u32, mut child: Child, table: &ProcTable) -> Result<ExitStatus, String> {
    let pid = child.id();
    loop {
        // SAFETY: siginfo_t is plain data; waitid fills it or fails.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid siginfo_t; WNOWAIT leaves the child
        // waitable, so the `child.wait()` below still reaps it.
        let ret =
            unsafe { libc::waitid(libc::P_PID, pid, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if ret == 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            break;
        }
    }
    if let Some(p) = lock(table).get_mut(&id) {
        p.exited = true;
        // The writer drains what is queued (into a pipe nobody may read any
        // more), then ends.
        p.stdin = None;
    }
    let mut owned = owned();
    let reaped = child.wait();
    owned.remove(&(pid as i32));
    drop(owned);
    match reaped {
        Ok(s) => Ok(match s.signal() {
            Some(sig) => ExitStatus::Signal(sig),
            None => ExitStatus::Code(s.code().unwrap_or(-1)),
        }),
        Err(e) => Err(format!("wait: {e}")),
    }
}

/// Queue STDIN bytes for the process's stdin writer; never blocks.
fn feed_stdin(id: u32, data: Vec<u8>, table: &ProcTable) -> Result<(), ServerError> {
    let mut procs = lock(table);
    // Not in the table: the process exited and its EXIT is on the way (the
    // client stops sending when it arrives). No stdin: never piped, or
    // already closed. Either way the bytes are dropped.
    let Some(p) = procs.get_mut(&id).filter(|p| !p.exited) else {
        return Ok(());
    };
    if data.is_empty() {
        p.stdin = None; // the writer drains its queue, then closes the pipe
        return Ok(());
    }
    let Some(queue) = &p.stdin else {
        return Ok(());
    };
    let unacked = p.stdin_unacked.load(Ordering::Acquire);
    if u64::from(unacked) + data.len() as u64 > u64::from(WINDOW) {
        return Err(ServerError::StdinOverrun {
            sent: data.len(),
            unacked,
        });
    }
    p.stdin_unacked
        .fetch_add(data.len() as u32, Ordering::AcqRel);
    // The writer only stops after the sender is dropped.
    let _ = queue.send(data);
    Ok(())
}

/// The client consumed output of process `id`: let that pipe's reader go on.
fn output_credit(
    id: u32,
    stream: OutputStream,
    bytes: u32,
    table: &ProcTable,
) -> Result<(), ServerError> {
    // Not in the table: its output is all sent; late credit is harmless.
    match lock(table).get(&id) {
        Some(p) => p.output[stream.index()]
            .give(bytes)
            .map_err(ServerError::OutputCredit),
        None => Ok(()),
    }
}

fn signal(id: u32, signo: i32, table: &ProcTable) -> Result<(), ServerError> {
    if !(1..=MAX_SIGNO).contains(&signo) {
        return Err(ServerError::BadSignal(signo));
    }
    let procs = lock(table);
    // Gone or exited: its EXIT is on the way, there is nobody to signal.
    if let Some(p) = procs.get(&id).filter(|p| !p.exited) {
        // SAFETY: kill takes no pointers; `p.pid` is our child and not
        // reaped (see ProcTable), so it cannot name another process. It
        // cannot fail for an unreaped child of ours.
        unsafe { libc::kill(p.pid, signo) };
    }
    Ok(())
}

/// Resize a running process's terminal; a stream without one, or gone,
/// is left alone (a late RESIZE is no error).
fn resize(id: u32, size: WindowSize, table: &ProcTable) {
    let procs = lock(table);
    if let Some(master) = procs.get(&id).and_then(|p| p.tty.as_ref()) {
        let _ = resize_pty(master, size);
    }
}

/// SIGKILL every process of the connection and its process group, close
/// their stdin and stop their pipe readers; the waiters then reap them.
fn kill_all(table: &ProcTable) {
    for p in lock(table).values_mut() {
        p.stdin = None;
        p.output.iter().for_each(|w| w.close());
        // SAFETY: kill takes no pointers. The group is the one the process
        // led (process_group(0) at spawn): its id stays taken while any
        // member lives, even after the leader is reaped. The leader itself
        // is signalled only while unreaped (see ProcTable).
        unsafe {
            libc::kill(-p.pid, libc::SIGKILL);
            if !p.exited {
                libc::kill(p.pid, libc::SIGKILL);
            }
        }
        if p.tty.is_some() {
            // A shell on a terminal puts each job in a group of its own,
            // within the session the process leads: every one goes.
            kill_session(p.pid);
        }
    }
}

/// SIGKILL every process of session `sid` (its id stays taken while any
/// member lives), a few rounds for those forked meanwhile.
fn kill_session(sid: i32) {
    for _ in 0..4 {
        let members: Vec<i32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| session_of(pid) == Some(sid))
            .collect();
        if members.is_empty() {
            return;
        }
        for pid in members {
            // SAFETY: kill takes no pointers; a member of the session is
            // ours to end (a pid gone meanwhile is ESRCH).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// The session of `pid`, from `/proc/<pid>/stat` (`pid (comm) state ppid
/// pgrp session ...`; comm may hold anything, so fields count from its
/// closing parenthesis).
fn session_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(") ")?;
    rest.split_whitespace().nth(3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_session_is_read_from_proc() {
        // SAFETY: getsid(0) reads this process's session.
        let sid = unsafe { libc::getsid(0) };
        assert_eq!(session_of(std::process::id() as i32), Some(sid));
        assert_eq!(session_of(-1), None);
    }

    /// Records each write call apart.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Writes {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().push(buf.to_vec());
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn frames(bytes: &[u8]) -> Vec<Frame> {
        let mut reader = bytes;
        std::iter::from_fn(|| protocol::read_frame(&mut reader).unwrap()).collect()
    }

    /// Hooks that record the entropy they get, and fail when told to.
    #[derive(Default)]
    struct EntropyHooks {
        got: Mutex<Vec<Vec<u8>>>,
        fail: bool,
    }

    impl ServerHooks for EntropyHooks {
        fn add_entropy(&self, bytes: &[u8]) -> io::Result<()> {
            self.got.lock().unwrap().push(bytes.to_vec());
            if self.fail {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            Ok(())
        }
    }

    /// Serve `frames` then end of stream; what the agent wrote back.
    fn serve_frames(frames: &[Frame], hooks: &EntropyHooks) -> Vec<Frame> {
        let input: Vec<u8> = frames.iter().flat_map(|f| f.encode().unwrap()).collect();
        let writes = Writes::default();
        let _ = serve(input.as_slice(), writes.clone(), hooks);
        let sent = writes.0.lock().unwrap().concat();
        super::tests::frames(&sent)
    }

    #[test]
    fn entropy_reaches_the_hook_before_the_next_frame() {
        let hooks = EntropyHooks::default();
        let hello = Frame::Hello { version: VERSION };
        let sent = serve_frames(
            &[hello.clone(), Frame::Entropy { bytes: vec![7; 32] }],
            &hooks,
        );
        assert_eq!(sent, [hello]);
        assert_eq!(*hooks.got.lock().unwrap(), [vec![7; 32]]);
    }

    #[test]
    fn entropy_that_cannot_be_added_ends_the_connection() {
        let hooks = EntropyHooks {
            fail: true,
            ..Default::default()
        };
        let sent = serve_frames(
            &[
                Frame::Hello { version: VERSION },
                Frame::Entropy { bytes: vec![1; 8] },
                Frame::Exec {
                    id: 1,
                    request: ExecRequest::new(["true"]),
                },
            ],
            &hooks,
        );
        // HELLO, then the error; the EXEC after it never ran.
        assert_eq!(sent.len(), 2, "{sent:?}");
        match &sent[1] {
            Frame::Error { id: 0, message } => {
                assert!(message.contains("entropy"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn frames_queued_together_leave_in_one_write_in_order() {
        let (tx, rx) = channel();
        let queued = [
            Frame::Started { id: 7, pid: 42 },
            Frame::Stdout {
                id: 7,
                data: Vec::new(),
            },
            Frame::Exit {
                id: 7,
                status: ExitStatus::Code(0),
            },
        ];
        for f in &queued {
            tx.send(f.clone()).unwrap();
        }
        drop(tx);
        let writes = Writes::default();
        write_loop(writes.clone(), rx);
        let writes = writes.0.lock().unwrap();
        assert_eq!(writes.len(), 1);
        assert_eq!(frames(&writes[0]), queued);
    }

    #[test]
    fn an_error_quoting_a_huge_argument_is_cut_to_fit_its_frame() {
        let (tx, rx) = channel();
        let program = "\u{e9}".repeat(MAX_STRING);
        send_error(&tx, 3, format!("exec {program}: No such file"));
        tx.send(Frame::Exit {
            id: 4,
            status: ExitStatus::Code(0),
        })
        .unwrap();
        drop(tx);
        let writes = Writes::default();
        write_loop(writes.clone(), rx);
        let writes = writes.0.lock().unwrap();
        let sent = frames(&writes.concat());
        assert_eq!(sent.len(), 2, "both frames go out");
        match &sent[0] {
            Frame::Error { id: 3, message } => {
                assert!(message.len() <= MAX_STRING && message.starts_with("exec "))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_batch_stops_growing_at_its_cap() {
        let (tx, rx) = channel();
        let chunk = vec![b'x'; MAX_CHUNK];
        let count = WRITE_BATCH / MAX_CHUNK + 2;
        for _ in 0..count {
            tx.send(Frame::Stdout {
                id: 1,
                data: chunk.clone(),
            })
            .unwrap();
        }
        drop(tx);
        let writes = Writes::default();
        write_loop(writes.clone(), rx);
        let writes = writes.0.lock().unwrap();
        assert!(writes.len() >= 2, "{} writes", writes.len());
        let cap = WRITE_BATCH + MAX_CHUNK + 64;
        assert!(writes.iter().all(|w| w.len() <= cap));
        let all: usize = writes.iter().map(|w| frames(w).len()).sum();
        assert_eq!(all, count);
    }
}
