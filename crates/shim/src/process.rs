//! One container process (a container's init or an exec) as the task API
//! sees it: created, running, stopped; its standard streams tied to the
//! files containerd named; its exit reported once.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, SystemTime};

use chitin::{Command, ExitStatus, SandboxHandle, Signal, Signaller, Stdio};

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
    /// A terminal (refused before a process is made).
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

struct Inner {
    /// The command, until a start succeeds.
    command: Option<Command>,
    /// Its pid in the guest once started.
    pid: u32,
    signaller: Option<Signaller>,
    exit: Option<Exit>,
    /// The stdin thread still waits for a writer to open the FIFO.
    stdin_opening: bool,
}

/// A container's init or exec process.
pub struct Process {
    /// The streams.
    pub io: Io,
    inner: Mutex<Inner>,
    changed: Condvar,
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

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

impl Process {
    /// A process that `command` will run, its streams as `io` says.
    pub fn new(command: Command, io: Io) -> Arc<Self> {
        Arc::new(Self {
            io,
            inner: Mutex::new(Inner {
                command: Some(command),
                pid: 0,
                signaller: None,
                exit: None,
                stdin_opening: false,
            }),
            changed: Condvar::new(),
        })
    }

    /// Created, running or stopped.
    pub fn status(&self) -> Status {
        let inner = relock(&self.inner);
        match (&inner.exit, &inner.command) {
            (Some(_), _) => Status::Stopped,
            (None, Some(_)) => Status::Created,
            (None, None) => Status::Running,
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

    /// Start it in `vm`; `on_exit` runs once, on a thread of its own,
    /// when it ends. Returns its guest pid.
    pub fn start(
        self: &Arc<Self>,
        vm: &SandboxHandle,
        on_exit: impl FnOnce(&Process, Exit) + Send + 'static,
    ) -> Result<u32, ProcessError> {
        let mut inner = relock(&self.inner);
        if inner.exit.is_some() {
            return Err(ProcessError::Exited);
        }
        let mut cmd = inner.command.clone().ok_or(ProcessError::AlreadyStarted)?;
        cmd.stdout(match open_output(&self.io.stdout)? {
            Some(file) => Stdio::writer(file),
            None => Stdio::null(),
        });
        cmd.stderr(match open_output(&self.io.stderr)? {
            Some(file) => Stdio::writer(file),
            None => Stdio::null(),
        });
        if self.io.stdin.is_empty() {
            cmd.stdin(Stdio::null());
        } else if self.io.stdin.contains("://") {
            return Err(ProcessError::StreamKind(self.io.stdin.clone()));
        } else {
            cmd.stdin(Stdio::piped());
        }
        let mut child = vm.spawn(&cmd)?;
        // The writers live on in chitin's copying threads only, so the
        // FIFOs see their end when the process's output ends.
        drop(cmd);
        inner.command = None;
        inner.pid = child.id();
        inner.signaller = Some(child.signaller());
        if let Some(stdin) = child.stdin.take() {
            inner.stdin_opening = true;
            let me = Arc::clone(self);
            thread::Builder::new()
                .name("shim-stdin".into())
                .spawn(move || me.feed_stdin(stdin))
                .map_err(|e| ProcessError::Stream {
                    path: self.io.stdin.clone(),
                    source: e,
                })?;
        }
        let pid = inner.pid;
        drop(inner);
        let me = Arc::clone(self);
        thread::Builder::new()
            .name("shim-wait".into())
            .spawn(move || {
                let exit = Exit::of(child.wait());
                drop(child);
                {
                    let mut inner = relock(&me.inner);
                    inner.exit = Some(exit);
                    inner.signaller = None;
                }
                me.changed.notify_all();
                me.release_stdin();
                on_exit(&me, exit);
            })
            .map_err(|e| ProcessError::Stream {
                path: "(waiter thread)".into(),
                source: e,
            })?;
        Ok(pid)
    }

    /// Copy the stdin FIFO into the process until EOF. Opening blocks
    /// until containerd opens its end (or [`Process::release_stdin`]).
    fn feed_stdin(&self, mut to: chitin::ChildStdin) {
        let opened = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&self.io.stdin);
        relock(&self.inner).stdin_opening = false;
        match opened {
            Ok(mut from) => {
                // Ends at EOF, or when the process is gone (BrokenPipe).
                if let Err(e) = io::copy(&mut from, &mut to) {
                    log::debug!("stdin {}: {e}", self.io.stdin);
                }
            }
            Err(e) => log::warn!("stdin {}: {e}", self.io.stdin),
        }
    }

    /// Let a stdin thread still waiting for containerd's end of the FIFO
    /// go: open and close the writing end ourselves, which it then reads
    /// as EOF. Used by CloseIO and when the process has exited.
    pub fn release_stdin(&self) {
        if !relock(&self.inner).stdin_opening {
            return;
        }
        // Non-blocking: with no reader left it fails, which is fine.
        let _ = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(&self.io.stdin);
    }

    /// Send `signal`. A process killed before it started is stopped with
    /// 128 + the signal, and `Ok(Some(exit))` says so (its exit has to be
    /// reported by the caller).
    pub fn signal(&self, signal: Signal) -> Result<Option<Exit>, ProcessError> {
        let mut inner = relock(&self.inner);
        if inner.exit.is_some() {
            return Err(ProcessError::Exited);
        }
        if let Some(s) = &inner.signaller {
            s.signal(signal)?;
            return Ok(None);
        }
        // Never started: it ends here.
        let exit = Exit {
            status: 128 + signal.number() as u32,
            at: SystemTime::now(),
        };
        inner.command = None;
        inner.exit = Some(exit);
        drop(inner);
        self.changed.notify_all();
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
