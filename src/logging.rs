//! A logger for programs that have none of their own.
//!
//! chitin logs through the [`log`] crate, so an embedder's logger receives
//! its lines (guest faults under target `chitin::guest`). A program without
//! one, such as chitin's own examples, can call [`log_to_stderr`].

use std::io::Write;

/// Writes each record as one line on stderr.
struct StderrLogger;

impl log::Log for StderrLogger {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        // One write per line, so lines of different threads do not mix;
        // a failed write to stderr has nowhere to be reported.
        let line = format!(
            "{} {}: {}\n",
            record.level(),
            record.target(),
            record.args()
        );
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {
        let _ = std::io::stderr().flush();
    }
}

static LOGGER: StderrLogger = StderrLogger;

/// Send log records up to `max` to stderr, one line each (`WARN
/// chitin::guest: vsock: ...`). Returns false, changing nothing, if the
/// program already installed a logger.
pub fn log_to_stderr(max: log::LevelFilter) -> bool {
    if log::set_logger(&LOGGER).is_err() {
        return false;
    }
    log::set_max_level(max);
    true
}
