//! Output sinks for the guest console.
//!
//! This module owns [`ConsoleCapture`], an in-memory buffer the VMM hands to
//! the serial device as its output and the user keeps a clone of, to read or
//! wait for what the guest printed.
//!
//! It must never poll with sleeps (waiters block on a condition variable that
//! every write signals) and never fail a write: the serial device runs it on a
//! vCPU thread, where an error would only lose console output.

use std::fmt;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// The captured bytes and how many times they were cleared, so a waiter can
/// tell that bytes it already searched are gone.
#[derive(Debug, Default)]
struct Buffer {
    bytes: Vec<u8>,
    clears: u64,
}

#[derive(Debug, Default)]
struct Shared {
    buffer: Mutex<Buffer>,
    /// Signalled after every write and clear.
    changed: Condvar,
}

/// An in-memory capture of console output, shared between the VMM and the
/// user.
///
/// Clones share one buffer (an `Arc` inside), so cloning is cheap: give one
/// clone to [`SerialDevice::new`](crate::SerialDevice::new) as the output sink
/// and keep another to read the output or [`wait_for`](Self::wait_for) a
/// line. The buffer grows without bound until [`clear`](Self::clear)ed.
#[derive(Clone, Default)]
pub struct ConsoleCapture {
    shared: Arc<Shared>,
}

impl fmt::Debug for ConsoleCapture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsoleCapture")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl ConsoleCapture {
    /// Creates an empty capture.
    pub fn new() -> Self {
        Self::default()
    }

    /// Locks the buffer. Bytes are appended whole under the lock, so a lock
    /// poisoned by a panicking holder still guards a consistent buffer.
    fn buffer(&self) -> MutexGuard<'_, Buffer> {
        self.shared
            .buffer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of every byte captured so far.
    pub fn contents(&self) -> Vec<u8> {
        self.buffer().bytes.clone()
    }

    /// Number of bytes captured.
    pub fn len(&self) -> usize {
        self.buffer().bytes.len()
    }

    /// Whether nothing has been captured (since the last clear).
    pub fn is_empty(&self) -> bool {
        self.buffer().bytes.is_empty()
    }

    /// Discards everything captured so far.
    pub fn clear(&self) {
        let mut buffer = self.buffer();
        buffer.bytes.clear();
        buffer.clears = buffer.clears.wrapping_add(1);
        drop(buffer);
        self.shared.changed.notify_all();
    }

    /// Blocks until the captured bytes contain `needle` or `timeout` passes;
    /// returns whether `needle` was found. An empty needle is found at once.
    ///
    /// Each wake-up searches only the bytes that arrived since the previous
    /// one, so waiting on a long, byte-by-byte console stays linear.
    pub fn wait_for(&self, needle: &[u8], timeout: Duration) -> bool {
        if needle.is_empty() {
            return true;
        }
        // A timeout too large to represent waits forever.
        let deadline = Instant::now().checked_add(timeout);
        let mut buffer = self.buffer();
        let mut clears = buffer.clears;
        // Every match starting before this index was already ruled out.
        let mut searched_to = 0;
        loop {
            if buffer.clears != clears {
                clears = buffer.clears;
                searched_to = 0;
            }
            let unsearched = buffer.bytes.get(searched_to..).unwrap_or_default();
            if unsearched
                .windows(needle.len())
                .any(|window| window == needle)
            {
                return true;
            }
            // The last `needle.len() - 1` bytes may start a match that ends in
            // bytes still to come.
            searched_to = buffer.bytes.len().saturating_sub(needle.len() - 1);
            buffer = match deadline {
                None => self
                    .shared
                    .changed
                    .wait(buffer)
                    .unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let remaining = deadline.saturating_duration_since(Instant::now());
                    if remaining.is_zero() {
                        return false;
                    }
                    self.shared
                        .changed
                        .wait_timeout(buffer, remaining)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0
                }
            };
        }
    }
}

impl Write for ConsoleCapture {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buffer().bytes.extend_from_slice(data);
        self.shared.changed.notify_all();
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::thread;

    use super::*;

    /// Long enough that a writer thread always gets to run first on a loaded
    /// CI machine; the test returns as soon as the needle arrives.
    const LONG_TIMEOUT: Duration = Duration::from_secs(10);
    /// Short, since the test must wait for all of it.
    const SHORT_TIMEOUT: Duration = Duration::from_millis(50);

    #[test]
    fn capture_write_appends_to_shared_buffer() {
        // Arrange
        let capture = ConsoleCapture::new();
        let mut writer = capture.clone();

        // Act
        writer.write_all(b"hello ").unwrap();
        writer.write_all(b"world").unwrap();

        // Assert
        assert_eq!(capture.contents(), b"hello world");
        assert_eq!(capture.len(), 11);
        assert!(!capture.is_empty());
    }

    #[test]
    fn capture_clear_empties_buffer() {
        // Arrange
        let capture = ConsoleCapture::new();
        capture.clone().write_all(b"boot").unwrap();

        // Act
        capture.clear();

        // Assert
        assert!(capture.is_empty());
        assert_eq!(capture.contents(), b"");
    }

    #[test]
    fn capture_wait_for_present_needle_returns_at_once() {
        // Arrange
        let capture = ConsoleCapture::new();
        capture.clone().write_all(b"login: ").unwrap();

        // Act: a zero timeout still finds bytes already there.
        let found = capture.wait_for(b"login", Duration::ZERO);

        // Assert
        assert!(found);
    }

    #[test]
    fn capture_wait_for_needle_written_by_other_thread_succeeds() {
        // Arrange: the needle arrives byte by byte, as from a UART, after
        // some unrelated output.
        let capture = ConsoleCapture::new();
        let mut writer = capture.clone();
        let producer = thread::spawn(move || {
            for &byte in b"Linux version 6.1\nready\n" {
                writer.write_all(&[byte]).unwrap();
            }
        });

        // Act
        let found = capture.wait_for(b"ready", LONG_TIMEOUT);

        // Assert
        producer.join().unwrap();
        assert!(found);
    }

    #[test]
    fn capture_wait_for_missing_needle_times_out() {
        // Arrange
        let capture = ConsoleCapture::new();
        capture.clone().write_all(b"kernel panic").unwrap();
        let start = Instant::now();

        // Act
        let found = capture.wait_for(b"ready", SHORT_TIMEOUT);

        // Assert
        assert!(!found);
        assert!(start.elapsed() >= SHORT_TIMEOUT);
    }

    #[test]
    fn capture_wait_for_needle_after_clear_is_found() {
        // Arrange: the needle is written after the buffer was cleared under a
        // waiter that had already searched the old bytes.
        let capture = ConsoleCapture::new();
        capture.clone().write_all(b"0123456789").unwrap();
        let other = capture.clone();
        let producer = thread::spawn(move || {
            other.clear();
            other.clone().write_all(b"ok").unwrap();
        });

        // Act
        let found = capture.wait_for(b"ok", LONG_TIMEOUT);

        // Assert
        producer.join().unwrap();
        assert!(found);
    }

    #[test]
    fn capture_wait_for_empty_needle_succeeds() {
        // Arrange
        let capture = ConsoleCapture::new();

        // Act
        let found = capture.wait_for(b"", Duration::ZERO);

        // Assert
        assert!(found);
    }

    #[test]
    fn capture_wait_for_huge_timeout_does_not_overflow() {
        // Arrange
        let capture = ConsoleCapture::new();
        capture.clone().write_all(b"ready").unwrap();

        // Act
        let found = capture.wait_for(b"ready", Duration::MAX);

        // Assert
        assert!(found);
    }
}
