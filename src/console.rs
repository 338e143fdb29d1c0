//! Where the guest's serial console goes, and where its input comes from.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

pub use chitin_devices::ConsoleCapture;
use chitin_devices::ReadFd;

use crate::error::SandboxError;

/// The destination of the guest's serial console output (COM1).
pub struct Console(Sink);

enum Sink {
    Null,
    Stdout,
    Capture(ConsoleCapture),
    File(PathBuf),
    Writer(Box<dyn Write + Send>),
}

impl Console {
    /// Discard console output (the default).
    pub fn null() -> Self {
        Self(Sink::Null)
    }

    /// Write console output to the process's standard output.
    pub fn stdout() -> Self {
        Self(Sink::Stdout)
    }

    /// Capture console output in memory; keep a clone of `capture` to read it.
    pub fn capture(capture: &ConsoleCapture) -> Self {
        Self(Sink::Capture(capture.clone()))
    }

    /// Write console output to a file, created or truncated by `build()`.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self(Sink::File(path.into()))
    }

    /// Write console output to any writer.
    pub fn writer(writer: impl Write + Send + 'static) -> Self {
        Self(Sink::Writer(Box::new(writer)))
    }

    pub(crate) fn open(self) -> Result<Box<dyn Write + Send>, SandboxError> {
        Ok(match self.0 {
            Sink::Null => Box::new(std::io::sink()),
            Sink::Stdout => Box::new(std::io::stdout()),
            Sink::Capture(c) => Box::new(c),
            Sink::File(path) => match File::create(&path) {
                Ok(f) => Box::new(f),
                Err(source) => return Err(SandboxError::ConsoleFile { path, source }),
            },
            Sink::Writer(w) => w,
        })
    }
}

impl Default for Console {
    fn default() -> Self {
        Self::null()
    }
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.0 {
            Sink::Null => "null",
            Sink::Stdout => "stdout",
            Sink::Capture(_) => "capture",
            Sink::File(_) => "file",
            Sink::Writer(_) => "writer",
        };
        f.debug_tuple("Console").field(&kind).finish()
    }
}

/// A source of console input (any readable fd: stdin, a pipe, a socket).
pub struct ConsoleInput(pub(crate) Box<dyn ReadFd>);

impl ConsoleInput {
    /// Feed the guest's serial console from `source`.
    pub fn new(source: impl ReadFd + 'static) -> Self {
        Self(Box::new(source))
    }
}

impl std::fmt::Debug for ConsoleInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConsoleInput")
    }
}
