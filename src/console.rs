//! Where the guest's serial console goes, and where its input comes from.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;

use chitin_devices::{BufferedSink, ReadFd};
pub use chitin_devices::{ConsoleCapture, DEFAULT_CAPTURE_LIMIT};
use chitin_seccomp::Seccomp;

use crate::devices::device_err;
use crate::error::SandboxError;

/// The most a [`Console::file`] receives by default: 64 MiB.
pub const DEFAULT_FILE_LIMIT: u64 = 64 << 20;

/// The destination of the guest's serial console output (COM1).
///
/// A guest can print without end, so every sink is bounded: a capture keeps
/// its last bytes ([`ConsoleCapture::with_limit`]), a file stops growing at
/// its limit, and output for stdout, a file or a writer is batched (written
/// out at 8 KiB, at a newline at most every 20 ms, within 20 ms in any case,
/// and when the sandbox ends) instead of one `write(2)` per byte.
pub struct Console(Sink);

enum Sink {
    Null,
    Stdout,
    Capture(ConsoleCapture),
    File(PathBuf, u64),
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

    /// Write console output to a file, created or truncated by `build()`,
    /// up to [`DEFAULT_FILE_LIMIT`] bytes.
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self::file_with_limit(path, DEFAULT_FILE_LIMIT)
    }

    /// Write at most `limit` bytes of console output to a file (then one
    /// line saying the rest was dropped).
    pub fn file_with_limit(path: impl Into<PathBuf>, limit: u64) -> Self {
        Self(Sink::File(path.into(), limit))
    }

    /// Write console output to any writer.
    pub fn writer(writer: impl Write + Send + 'static) -> Self {
        Self(Sink::Writer(Box::new(writer)))
    }

    pub(crate) fn open(self, seccomp: Seccomp) -> Result<Box<dyn Write + Send>, SandboxError> {
        let (out, limit): (Box<dyn Write + Send>, _) = match self.0 {
            Sink::Null => return Ok(Box::new(std::io::sink())),
            Sink::Capture(c) => return Ok(Box::new(c)),
            Sink::Stdout => (Box::new(std::io::stdout()), None),
            Sink::File(path, limit) => match File::create(&path) {
                Ok(f) => (Box::new(f), Some(limit)),
                Err(source) => return Err(SandboxError::ConsoleFile { path, source }),
            },
            Sink::Writer(w) => (w, None),
        };
        let sink = BufferedSink::new(out, limit, seccomp)
            .map_err(|e| device_err("console", "output thread", e))?;
        Ok(Box::new(sink))
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
            Sink::File(..) => "file",
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
