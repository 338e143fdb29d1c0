//! The exec service: runs the processes a client asks for over one
//! connection and streams their output back.
//!
//! Per connection there is one reader (the caller's thread, running
//! [`serve`]), one writer thread that owns the write half, and for each
//! process two pipe readers plus a waiter. Everything headed for the client
//! goes through one bounded channel to the writer, so a slow client blocks
//! the pipe readers (and so the processes) instead of growing a buffer.
//!
//! When the connection ends, every process still running is killed with
//! SIGKILL (its whole process group), reaped, and every thread joined. The
//! server never panics on what the client sends: a malformed frame gets a
//! stream-0 ERROR and the connection is closed.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};

use crate::protocol::{self, ExecRequest, ExitStatus, Frame, ProtocolError, MAX_CHUNK, VERSION};

/// Frames queued for the writer: at most this many × 64 KiB are buffered.
const OUT_QUEUE: usize = 16;
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
}

/// What the embedding program does for requests the library cannot handle.
pub trait ServerHooks: Sync {
    /// SHUTDOWN arrived. The guest binary syncs and reboots here (and never
    /// returns); after a return, the server ends the connection.
    fn shutdown(&self) {}
}

/// Hooks that do nothing: SHUTDOWN just closes the connection.
pub struct NoHooks;

impl ServerHooks for NoHooks {}

/// A running process of this connection.
struct Proc {
    pid: i32,
    stdin: Option<ChildStdin>,
}

/// The processes of one connection, by stream id. A process leaves the
/// table after it exited but before it is reaped, so a signal sent while it
/// is in the table can never hit a recycled pid.
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
    let (tx, rx) = sync_channel::<Frame>(OUT_QUEUE);
    let writer_thread = spawn_named("agent-writer", move || write_loop(writer, rx))?;
    let table: ProcTable = Arc::default();
    let mut waiters = Vec::new();
    let result = read_loop(&mut reader, &tx, &table, &mut waiters, hooks);
    if let Err(e) = &result {
        let _ = tx.send(Frame::Error {
            id: 0,
            message: e.to_string(),
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
    tx: &SyncSender<Frame>,
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
            Frame::Stdin { id, data } => write_stdin(id, &data, table),
            Frame::Signal { id, signo } => signal(id, signo, tx, table),
            Frame::Shutdown => {
                hooks.shutdown();
                return Ok(());
            }
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

fn write_loop<W: Write>(mut writer: W, rx: Receiver<Frame>) {
    while let Ok(frame) = rx.recv() {
        // On a write error, return: dropping `rx` makes every sender fail,
        // which stops the pipe readers; the read side then sees the close.
        if protocol::write_frame(&mut writer, &frame).is_err() || writer.flush().is_err() {
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

fn send_error(tx: &SyncSender<Frame>, id: u32, message: String) {
    let _ = tx.send(Frame::Error { id, message });
}

fn command(req: &ExecRequest) -> Command {
    let mut cmd = Command::new(&req.argv[0]);
    cmd.args(&req.argv[1..])
        .env_clear()
        .envs(req.env.iter().map(|(k, v)| (k, v)))
        .stdin(if req.stdin {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Own process group, so closing the connection can kill what the
        // process started too (and their pipe ends close).
        .process_group(0);
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
    cmd
}

/// Start one process; `Ok(None)` when it was refused with an ERROR frame.
fn start(
    id: u32,
    req: &ExecRequest,
    tx: &SyncSender<Frame>,
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
    if running >= MAX_PROCS {
        return refuse("too many processes on this connection");
    }
    let mut procs = lock(table);
    if procs.contains_key(&id) {
        drop(procs);
        return refuse("stream id already in use");
    }
    let mut child = match command(req).spawn() {
        Ok(c) => c,
        Err(e) => {
            drop(procs);
            let program = req.argv[0].to_string_lossy();
            return refuse(&format!("exec {program}: {e}"));
        }
    };
    let pid = child.id() as i32;
    procs.insert(
        id,
        Proc {
            pid,
            stdin: child.stdin.take(),
        },
    );
    drop(procs);
    // STARTED is queued before the pipe readers exist, so it comes first.
    let _ = tx.send(Frame::Started {
        id,
        pid: pid as u32,
    });
    let readers = [
        child.stdout.take().map(|p| pump(p, id, tx.clone(), false)),
        child.stderr.take().map(|p| pump(p, id, tx.clone(), true)),
    ];
    let (tx, table) = (tx.clone(), Arc::clone(table));
    let waiter = spawn_named("agent-wait", move || {
        for r in readers.into_iter().flatten().flatten() {
            let _ = r.join();
        }
        finish(id, child, &tx, &table);
    });
    waiter.map(Some)
}

/// Copy one pipe into STDOUT or STDERR frames until EOF.
fn pump<P: Read + Send + 'static>(
    mut pipe: P,
    id: u32,
    tx: SyncSender<Frame>,
    stderr: bool,
) -> Result<JoinHandle<()>, ServerError> {
    spawn_named("agent-pipe", move || {
        let mut buf = vec![0u8; MAX_CHUNK];
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            let data = buf[..n].to_vec();
            let frame = if stderr {
                Frame::Stderr { id, data }
            } else {
                Frame::Stdout { id, data }
            };
            if tx.send(frame).is_err() {
                return;
            }
        }
    })
}

/// Wait for the process to exit without reaping it, take it out of the
/// table, then reap it and send EXIT.
fn finish(id: u32, mut child: Child, tx: &SyncSender<Frame>, table: &ProcTable) {
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
    lock(table).remove(&id);
    let status = match child.wait() {
        Ok(s) => match s.signal() {
            Some(sig) => ExitStatus::Signal(sig),
            None => ExitStatus::Code(s.code().unwrap_or(-1)),
        },
        Err(e) => {
            send_error(tx, id, format!("wait: {e}"));
            return;
        }
    };
    let _ = tx.send(Frame::Exit { id, status });
}

fn write_stdin(id: u32, data: &[u8], table: &ProcTable) {
    // Take the pipe out of the table while writing, so a blocking write does
    // not hold the lock the waiter and SIGNAL need.
    // No process or no open stdin: the process exited or closed it, and
    // its EXIT is on the way; the bytes are dropped as a pipe would.
    let Some(mut stdin) = lock(table).get_mut(&id).and_then(|p| p.stdin.take()) else {
        return;
    };
    if data.is_empty() {
        return; // dropping the pipe is the EOF
    }
    // EPIPE means the process closed its stdin: drop the pipe quietly.
    if stdin.write_all(data).is_ok() {
        if let Some(p) = lock(table).get_mut(&id) {
            p.stdin = Some(stdin);
        }
    }
}

fn signal(id: u32, signo: i32, tx: &SyncSender<Frame>, table: &ProcTable) {
    if !(1..=MAX_SIGNO).contains(&signo) {
        send_error(tx, id, format!("invalid signal {signo}"));
        return;
    }
    let procs = lock(table);
    // Not in the table: it already exited and its EXIT is on the way.
    let Some(p) = procs.get(&id) else {
        return;
    };
    // SAFETY: kill takes no pointers; `p.pid` is our unreaped child (see
    // ProcTable), so it cannot name another process.
    let ret = unsafe { libc::kill(p.pid, signo) };
    drop(procs);
    if ret != 0 {
        send_error(tx, id, format!("signal: {}", io::Error::last_os_error()));
    }
}

/// SIGKILL every process of the connection and its process group, and
/// close their stdin; the waiters then reap them.
fn kill_all(table: &ProcTable) {
    for p in lock(table).values_mut() {
        p.stdin = None;
        // SAFETY: kill takes no pointers; the pid is an unreaped child and
        // leads its own process group (process_group(0) at spawn).
        unsafe {
            libc::kill(-p.pid, libc::SIGKILL);
            libc::kill(p.pid, libc::SIGKILL);
        }
    }
}
