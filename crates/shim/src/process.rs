//! One container process (a container's init or an exec) as the task API
//! sees it: created, running, stopped; its standard streams tied to the
//! files containerd named; its exit reported once.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, SystemTime};

use chitin::{Command, ExitStatus, RemoteSandbox, Signal, Signaller, Stdio};

/// The standard streams containerd asked for (paths of FIFOs it made, or
/// `file://` URIs; empty: none) and whether a terminal was asked for.
#[derive(Clone, Debug, Default)]
pub struct Io {
    /// Where stdin comes from.
    pub stdin: String,
    /// Where stdout goes.
    pub stdout: String,
    /// Where stderr goes.
    pub stderr: String,
    /// A terminal: the process runs on a guest terminal, its output all
    /// on stdout.
    pub terminal: bool,
}

/// How a process ended: its status as containerd counts it (the exit
/// code, 128 + the signal that killed it, 255 when the VM went away
/// first) and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    /// The status.
    pub status: u32,
    /// When it was seen.
    pub at: SystemTime,
}

impl Exit {
    fn of(status: Result<ExitStatus, chitin::ExecError>) -> Self {
        let status = match status {
            Ok(ExitStatus::Code(code)) => code as u32 & 0xff,
            Ok(ExitStatus::Signal(signal)) => 128 + signal.number() as u32,
            Err(_) => 255,
        };
        Self {
            status,
            at: SystemTime::now(),
        }
    }
}

/// Where a process is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Made, not started.
    Created,
    /// Started and not yet reaped.
    Running,
    /// Ended (or killed before it started).
    Stopped,
}

/// Run once with a process's exit (publishing it).
type OnExit = Box<dyn FnOnce(Exit) + Send>;

struct Inner {
    /// The command, until a start takes it.
    command: Option<Command>,
    /// A start is in flight (the guest has not answered yet).
    starting: bool,
    /// A signal that came while starting, delivered once started.
    pending_signal: Option<Signal>,
    /// Its pid in the guest once started.
    pid: u32,
    signaller: Option<Signaller>,
    exit: Option<Exit>,
    on_exit: Option<OnExit>,
    /// Ends the stdin thread (an eventfd), while there is one.
    stdin_cancel: Option<Arc<OwnedFd>>,
    /// A SIGKILL was sent: its deadline is being watched.
    kill_watched: bool,
    /// A terminal size that came while starting, applied once started.
    pending_size: Option<(u16, u16)>,
}

/// A container's init or exec process.
pub struct Process {
    /// The streams.
    pub io: Io,
    inner: Mutex<Inner>,
    changed: Condvar,
}

/// Lock `m`, whether or not a thread panicked holding it.
pub(crate) fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long a guest may take to report the death of a process it was
/// told to SIGKILL before the shim counts it dead (137) on its own: a
/// guest that ignores kills cannot keep a pod from being deleted.
pub const KILL_GRACE: Duration = Duration::from_secs(10);

/// Why a task call on a process failed.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    /// Start of a process that was started before.
    #[error("the process was already started")]
    AlreadyStarted,
    /// A signal for a process that has ended.
    #[error("the process has already exited")]
    Exited,
    /// A stream could not be opened.
    #[error("opening {path}: {source}")]
    Stream {
        /// The path or URI.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// A stream URI of a kind the shim does not handle.
    #[error("stream {0:?}: only FIFO paths and file:// URIs are supported")]
    StreamKind(String),
    /// The guest refused or failed the exec.
    #[error("{0}")]
    Exec(#[from] chitin::ExecError),
}

/// Open an output stream: a FIFO read and written by us (so opening never
/// waits for containerd, and a reader that comes and goes does not end
/// the output), or a `file://` URI, appended to.
fn open_output(target: &str) -> Result<Option<File>, ProcessError> {
    if target.is_empty() {
        return Ok(None);
    }
    let fail = |source| ProcessError::Stream {
        path: target.to_string(),
        source,
    };
    let mut opts = OpenOptions::new();
    opts.custom_flags(libc::O_CLOEXEC | libc::O_NOCTTY);
    let file = if let Some(path) = target.strip_prefix("file://") {
        opts.append(true).create(true).mode(0o640).open(path)
    } else if target.contains("://") {
        return Err(ProcessError::StreamKind(target.to_string()));
    } else {
        let fifo = std::fs::metadata(target)
            .map_err(fail)?
            .file_type()
            .is_fifo();
        if fifo {
            opts.read(true).write(true).open(target)
        } else {
            opts.append(true).open(target)
        }
    };
    file.map(Some).map_err(fail)
}

fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes flags only; a new fd nothing else owns.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: eventfd returned a new fd, owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn wake(fd: &OwnedFd) {
    let one = 1u64.to_ne_bytes();
    // SAFETY: eight bytes, valid for the call; a full counter only makes
    // the write fail, and the reader is awake then anyway.
    unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
}

impl Process {
    /// A process that `command` will run, its streams as `io` says.
    pub fn new(command: Command, io: Io) -> Arc<Self> {
        Arc::new(Self {
            io,
            inner: Mutex::new(Inner {
                command: Some(command),
                starting: false,
                pending_signal: None,
                pid: 0,
                signaller: None,
                exit: None,
                on_exit: None,
                stdin_cancel: None,
                kill_watched: false,
                pending_size: None,
            }),
            changed: Condvar::new(),
        })
    }

    /// Created, running or stopped.
    pub fn status(&self) -> Status {
        let inner = relock(&self.inner);
        if inner.exit.is_some() {
            Status::Stopped
        } else if inner.command.is_some() || inner.starting {
            Status::Created
        } else {
            Status::Running
        }
    }

    /// Its guest pid (0 before it starts).
    pub fn pid(&self) -> u32 {
        relock(&self.inner).pid
    }

    /// How it ended, if it has.
    pub fn exit(&self) -> Option<Exit> {
        relock(&self.inner).exit
    }

    /// Start it in `vm`. `on_start` runs with its guest pid once it runs,
    /// before anything can report its end; `on_exit` runs once, on a
    /// thread of its own, when it ends. No lock is held while the guest
    /// is asked to start it.
    pub fn start(
        self: &Arc<Self>,
        vm: &RemoteSandbox,
        on_start: impl FnOnce(u32),
        on_exit: impl FnOnce(Exit) + Send + 'static,
    ) -> Result<u32, ProcessError> {
        let template = {
            let mut inner = relock(&self.inner);
            if inner.exit.is_some() {
                return Err(ProcessError::Exited);
            }
            let cmd = inner.command.take().ok_or(ProcessError::AlreadyStarted)?;
            inner.starting = true;
            cmd
        };
        match self.spawn(vm, &template) {
            Ok((child, cancel)) => {
                self.run(child, cancel, on_start, Box::new(on_exit));
                Ok(self.pid())
            }
            Err(e) => {
                let mut inner = relock(&self.inner);
                inner.starting = false;
                // A size that came meanwhile is the next start's.
                let mut template = template;
                if let Some((rows, cols)) = inner.pending_size.take() {
                    template.tty(rows, cols);
                }
                match inner.pending_signal.take() {
                    // It can be started again.
                    None => inner.command = Some(template),
                    // A signal sent while starting ends it, as one sent
                    // before the start would have; its exit is reported.
                    Some(signal) => {
                        inner.on_exit = Some(Box::new(on_exit));
                        drop(inner);
                        self.finish(Exit {
                            status: 128 + signal.number() as u32,
                            at: SystemTime::now(),
                        });
                    }
                }
                Err(e)
            }
        }
    }

    /// Open the streams and have the guest start the command; the stdin
    /// thread's cancel fd is made first, so nothing can fail after the
    /// process runs but thread creation (handled by the caller).
    fn spawn(
        &self,
        vm: &RemoteSandbox,
        template: &Command,
    ) -> Result<(chitin::Child, Option<Arc<OwnedFd>>), ProcessError> {
        let mut cmd = template.clone();
        cmd.stdout(match open_output(&self.io.stdout)? {
            Some(file) => Stdio::writer(file),
            None => Stdio::null(),
        });
        cmd.stderr(match open_output(&self.io.stderr)? {
            Some(file) => Stdio::writer(file),
            None => Stdio::null(),
        });
        let cancel = if self.io.stdin.is_empty() {
            cmd.stdin(Stdio::null());
            None
        } else if self.io.stdin.contains("://") {
            return Err(ProcessError::StreamKind(self.io.stdin.clone()));
        } else {
            cmd.stdin(Stdio::piped());
            Some(Arc::new(eventfd().map_err(|source| {
                ProcessError::Stream {
                    path: self.io.stdin.clone(),
                    source,
                }
            })?))
        };
        let child = vm.spawn(&cmd)?;
        // The writers live on in chitin's copying threads only, so the
        // FIFOs see their end when the process's output ends.
        drop(cmd);
        Ok((child, cancel))
    }

    /// The process runs: record it, tell the caller, then watch it.
    fn run(
        self: &Arc<Self>,
        mut child: chitin::Child,
        cancel: Option<Arc<OwnedFd>>,
        on_start: impl FnOnce(u32),
        on_exit: OnExit,
    ) {
        let stdin = child.stdin.take();
        let pending = {
            let mut inner = relock(&self.inner);
            inner.starting = false;
            inner.pid = child.id();
            inner.signaller = Some(child.signaller());
            inner.on_exit = Some(on_exit);
            inner.stdin_cancel = cancel.clone();
            if let Some((rows, cols)) = inner.pending_size.take() {
                let _ = child.signaller().resize(rows, cols);
            }
            inner.pending_signal.take()
        };
        on_start(child.id());
        if let (Some(stdin), Some(cancel)) = (stdin, cancel) {
            let me = Arc::clone(self);
            let fed = thread::Builder::new()
                .name("shim-stdin".into())
                .spawn(move || me.feed_stdin(stdin, &cancel));
            if let Err(e) = fed {
                log::warn!("no stdin thread ({e}): its stdin is closed");
            }
        }
        let me = Arc::clone(self);
        let signaller = child.signaller();
        let waited = thread::Builder::new()
            .name("shim-wait".into())
            .spawn(move || {
                let exit = Exit::of(child.wait());
                me.finish(exit);
            });
        if let Err(e) = waited {
            // Nobody could report its end: end it now.
            log::error!(
                "no thread to wait for guest pid {} ({e}): killing it",
                self.pid()
            );
            let _ = signaller.signal(Signal::KILL);
            self.finish(Exit {
                status: 255,
                at: SystemTime::now(),
            });
        }
        if let Some(signal) = pending {
            let _ = self.signal(signal);
        }
    }

    /// Record its end (the first report wins), wake waiters, end its
    /// stdin thread, and run `on_exit`.
    fn finish(&self, exit: Exit) {
        let on_exit = {
            let mut inner = relock(&self.inner);
            if inner.exit.is_some() {
                return;
            }
            inner.exit = Some(exit);
            inner.command = None;
            inner.signaller = None;
            if let Some(cancel) = inner.stdin_cancel.take() {
                wake(&cancel);
            }
            inner.on_exit.take()
        };
        self.changed.notify_all();
        if let Some(f) = on_exit {
            f(exit);
        }
    }

    /// Copy the stdin FIFO into the process until EOF, or until
    /// [`Process::release_stdin`] or its end. The FIFO is opened without
    /// waiting for containerd's end and read only when poll says so (a
    /// FIFO nobody has opened for writing yet reads as EOF).
    fn feed_stdin(&self, mut to: chitin::ChildStdin, cancel: &OwnedFd) {
        use std::io::{Read, Write};
        let opened = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&self.io.stdin);
        let mut from = match opened {
            Ok(f) => f,
            Err(e) => return log::warn!("stdin {}: {e}", self.io.stdin),
        };
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: from.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: cancel.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two pollfds, valid for the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                break;
            }
            if fds[1].revents != 0 {
                break; // CloseIO, or the process ended
            }
            if fds[0].revents & libc::POLLIN != 0 {
                match from.read(&mut buf) {
                    Ok(0) => break,
                    // Fails once the process is gone (BrokenPipe).
                    Ok(n) => {
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            } else if fds[0].revents != 0 {
                break; // the writer left (POLLHUP), or an error
            }
        }
        // Dropping `to` is the process's EOF.
    }

    /// CloseIO: end the process's stdin now (containerd has closed its
    /// end, or wants it closed).
    pub fn release_stdin(&self) {
        if let Some(cancel) = relock(&self.inner).stdin_cancel.take() {
            wake(&cancel);
        }
    }

    /// Give its terminal a new size (`ResizePty`): before the start, the
    /// size it starts with; while starting, applied once it runs. A
    /// process without a terminal, or ended, ignores it.
    pub fn resize(&self, rows: u16, cols: u16) -> Result<(), ProcessError> {
        if !self.io.terminal {
            return Ok(());
        }
        let mut inner = relock(&self.inner);
        if let Some(s) = &inner.signaller {
            return Ok(s.resize(rows, cols)?);
        }
        let starting = inner.starting;
        match inner.command.as_mut() {
            Some(cmd) => {
                cmd.tty(rows, cols);
            }
            None if starting => inner.pending_size = Some((rows, cols)),
            None => {}
        }
        Ok(())
    }

    /// Send `signal`. One that comes while the guest is starting the
    /// process is delivered once it runs. A process killed before it
    /// started is stopped with 128 + the signal, and `Ok(Some(exit))`
    /// says so (the caller reports that exit). After a SIGKILL the guest
    /// has [`KILL_GRACE`] to report the death before the shim records it.
    pub fn signal(self: &Arc<Self>, signal: Signal) -> Result<Option<Exit>, ProcessError> {
        let mut inner = relock(&self.inner);
        if inner.exit.is_some() {
            return Err(ProcessError::Exited);
        }
        if inner.starting {
            inner.pending_signal = Some(signal);
            return Ok(None);
        }
        if let Some(s) = &inner.signaller {
            s.signal(signal)?;
            if signal == Signal::KILL && !inner.kill_watched {
                inner.kill_watched = true;
                let me = Arc::clone(self);
                let watch = thread::Builder::new()
                    .name("shim-kill".into())
                    .spawn(move || {
                        thread::sleep(KILL_GRACE);
                        if me.exit().is_none() {
                            log::warn!(
                                "guest pid {} not reported dead {KILL_GRACE:?} after SIGKILL: counted as killed",
                                me.pid()
                            );
                            me.finish(Exit {
                                status: 128 + libc::SIGKILL as u32,
                                at: SystemTime::now(),
                            });
                        }
                    });
                if watch.is_err() {
                    inner.kill_watched = false;
                }
            }
            return Ok(None);
        }
        // Never started: it ends here.
        drop(inner);
        let exit = Exit {
            status: 128 + signal.number() as u32,
            at: SystemTime::now(),
        };
        self.finish(exit);
        Ok(Some(exit))
    }

    /// Wait until it has ended.
    pub fn wait(&self) -> Exit {
        let mut inner = relock(&self.inner);
        loop {
            if let Some(exit) = inner.exit {
                return exit;
            }
            inner = self
                .changed
                .wait_timeout(inner, Duration::from_secs(60))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn fifo(path: &Path) {
        let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn exit_statuses_are_containerds() {
        assert_eq!(Exit::of(Ok(ExitStatus::Code(7))).status, 7);
        assert_eq!(Exit::of(Ok(ExitStatus::Signal(Signal::KILL))).status, 137);
        assert_eq!(
            Exit::of(Err(chitin::ExecError::GuestStopped(
                chitin::ExitReason::Stopped
            )))
            .status,
            255
        );
    }

    #[test]
    fn outputs_open_fifos_without_waiting_and_refuse_other_schemes() {
        let dir = std::env::temp_dir().join(format!("chitin-shim-io-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("out");
        fifo(&f);
        // No reader: still opens at once.
        assert!(open_output(f.to_str().unwrap()).unwrap().is_some());
        assert!(open_output("").unwrap().is_none());
        let log = dir.join("log");
        let uri = format!("file://{}", log.display());
        open_output(&uri).unwrap();
        assert!(log.is_file());
        assert!(matches!(
            open_output("binary:///usr/bin/logger"),
            Err(ProcessError::StreamKind(_))
        ));
        assert!(matches!(
            open_output(dir.join("absent").to_str().unwrap()),
            Err(ProcessError::Stream { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_process_killed_before_start_is_stopped_once() {
        let p = Process::new(Command::new("true"), Io::default());
        assert_eq!(p.status(), Status::Created);
        let exit = p.signal(Signal::TERM).unwrap().unwrap();
        assert_eq!(exit.status, 143);
        assert_eq!(p.status(), Status::Stopped);
        assert_eq!(p.wait(), exit);
        assert!(matches!(p.signal(Signal::KILL), Err(ProcessError::Exited)));
    }
}
