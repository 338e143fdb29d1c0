//! Output sinks for the guest console.
//!
//! This module owns [`ConsoleCapture`], an in-memory ring of the last bytes
//! the guest printed, which the VMM hands to the serial device as its output
//! and the user keeps a clone of, to read or wait for output; and
//! [`BufferedSink`], which batches output for a file, stdout or any writer so
//! a guest printing byte by byte does not cost a `write(2)` per byte, and
//! caps how much reaches a file.
//!
//! Both bound what a guest can make the host hold, and neither ever fails a
//! write: the serial device runs them on a vCPU thread, where an error would
//! only lose console output, and neither runs a writer of the embedder's on
//! that thread. Capture waiters block on a condition variable
//! that every write signals, never poll with sleeps.

use std::fmt;
use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chitin_seccomp::{Seccomp, ThreadClass};

/// The most recent bytes a [`ConsoleCapture`] keeps by default: 4 MiB.
pub const DEFAULT_CAPTURE_LIMIT: usize = 4 << 20;

/// The captured bytes and how many times they were cleared, so a waiter can
/// tell that bytes it already searched are gone.
#[derive(Debug)]
struct Buffer {
    /// The last bytes written: at most twice `limit` (shown: the last
    /// `limit`).
    bytes: Vec<u8>,
    /// Bytes written and since dropped from the front, since the last clear.
    dropped: u64,
    limit: usize,
    clears: u64,
}

impl Buffer {
    /// What the capture shows: the last `limit` bytes.
    fn visible(&self) -> &[u8] {
        &self.bytes[self.bytes.len().saturating_sub(self.limit)..]
    }
}

#[derive(Debug)]
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
/// line. It keeps the last [`DEFAULT_CAPTURE_LIMIT`] bytes (or the limit
/// given to [`with_limit`](Self::with_limit)); older ones are dropped and
/// counted in [`dropped`](Self::dropped), so a guest flooding its console
/// holds at most twice the limit of host memory.
#[derive(Clone)]
pub struct ConsoleCapture {
    shared: Arc<Shared>,
}

impl Default for ConsoleCapture {
    fn default() -> Self {
        Self::with_limit(DEFAULT_CAPTURE_LIMIT)
    }
}

impl fmt::Debug for ConsoleCapture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConsoleCapture")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl ConsoleCapture {
    /// Creates an empty capture keeping the last [`DEFAULT_CAPTURE_LIMIT`]
    /// bytes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates an empty capture keeping the last `limit` bytes (at least 1).
    pub fn with_limit(limit: usize) -> Self {
        Self {
            shared: Arc::new(Shared {
                buffer: Mutex::new(Buffer {
                    bytes: Vec::new(),
                    dropped: 0,
                    limit: limit.max(1),
                    clears: 0,
                }),
                changed: Condvar::new(),
            }),
        }
    }

    /// Bytes written since the last clear that are no longer kept.
    pub fn dropped(&self) -> u64 {
        let buffer = self.buffer();
        buffer.dropped + (buffer.bytes.len() - buffer.visible().len()) as u64
    }

    /// Locks the buffer. Bytes are appended whole under the lock, so a lock
    /// poisoned by a panicking holder still guards a consistent buffer.
    fn buffer(&self) -> MutexGuard<'_, Buffer> {
        self.shared
            .buffer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of the bytes kept: everything captured since the last clear,
    /// or its last `limit` bytes.
    pub fn contents(&self) -> Vec<u8> {
        self.buffer().visible().to_vec()
    }

    /// Number of bytes kept.
    pub fn len(&self) -> usize {
        self.buffer().visible().len()
    }

    /// Whether nothing has been captured (since the last clear).
    pub fn is_empty(&self) -> bool {
        self.buffer().bytes.is_empty()
    }

    /// Discards everything captured so far.
    pub fn clear(&self) {
        let mut buffer = self.buffer();
        buffer.bytes.clear();
        buffer.dropped = 0;
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
        // Every match starting before this position (counted from the last
        // clear, dropped bytes included) was already ruled out.
        let mut searched_to: u64 = 0;
        loop {
            if buffer.clears != clears {
                clears = buffer.clears;
                searched_to = 0;
            }
            let from = searched_to.saturating_sub(buffer.dropped) as usize;
            let unsearched = buffer.bytes.get(from..).unwrap_or_default();
            if unsearched
                .windows(needle.len())
                .any(|window| window == needle)
            {
                return true;
            }
            // The last `needle.len() - 1` bytes may start a match that ends in
            // bytes still to come.
            let end = buffer.dropped + buffer.bytes.len() as u64;
            searched_to = end.saturating_sub(needle.len() as u64 - 1);
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
        let mut buffer = self.buffer();
        let limit = buffer.limit;
        if data.len() >= limit {
            // Only its end can be kept.
            buffer.dropped += (buffer.bytes.len() + data.len() - limit) as u64;
            buffer.bytes.clear();
            buffer.bytes.extend_from_slice(&data[data.len() - limit..]);
        } else {
            buffer.bytes.extend_from_slice(data);
            // Cut the front once the buffer doubles: amortised O(1) a byte.
            if buffer.bytes.len() > 2 * limit {
                let cut = buffer.bytes.len() - limit;
                buffer.bytes.drain(..cut);
                buffer.dropped += cut as u64;
            }
        }
        drop(buffer);
        self.shared.changed.notify_all();
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Output is written out once this much is pending.
const SINK_CHUNK: usize = 8 << 10;
/// Pending output is written out at most this long after it arrived.
pub const SINK_FLUSH_DELAY: Duration = Duration::from_millis(20);
/// The most output a sink holds for its writer. A guest printing faster
/// than the writer takes it waits for room, as on a real UART.
pub const SINK_MAX_PENDING: usize = 64 << 10;
/// How long a guest waits for room before the writer is taken to be
/// stuck: from then on output is dropped (and counted) instead of waited
/// for, until the writer takes a batch again.
pub const SINK_STALL: Duration = Duration::from_secs(5);

struct SinkState {
    pending: Vec<u8>,
    /// Bytes passed to the writer so far, or being passed.
    written: u64,
    /// Most bytes passed to the writer; `None`: no cap.
    limit: Option<u64>,
    /// The cap was hit and said so.
    capped: bool,
    /// A line ended and the flush delay has passed: write out now.
    line_due: bool,
    last_flush: Instant,
    /// The writer did not take output for [`SINK_STALL`]: drop, do not
    /// wait, until it does.
    stalled: bool,
    /// Bytes dropped while stalled, not yet reported in the output.
    dropped: u64,
    closed: bool,
}

impl SinkState {
    /// Take everything pending for the writer, within the cap, with the
    /// notices of what was dropped.
    fn take_batch(&mut self) -> Vec<u8> {
        let mut data = std::mem::take(&mut self.pending);
        if self.dropped > 0 {
            let notice = format!(
                "\n[chitin: {} bytes of console output dropped: the writer was stuck]\n",
                self.dropped
            );
            data.splice(0..0, notice.into_bytes());
            self.dropped = 0;
        }
        if let Some(limit) = self.limit {
            let room = limit.saturating_sub(self.written) as usize;
            if data.len() > room {
                data.truncate(room);
                if !self.capped {
                    self.capped = true;
                    data.extend_from_slice(
                        format!(
                            "\n[chitin: console output over {limit} bytes; the rest is dropped]\n"
                        )
                        .as_bytes(),
                    );
                }
            }
        }
        self.written += data.len() as u64;
        self.line_due = false;
        self.last_flush = Instant::now();
        data
    }
}

struct SinkShared {
    state: Mutex<SinkState>,
    /// Signalled when output starts pending, a batch is due, and at close.
    changed: Condvar,
    /// Signalled when the flusher took a batch (room for a waiting guest).
    drained: Condvar,
}

impl SinkShared {
    fn lock(&self) -> MutexGuard<'_, SinkState> {
        // A holder that panicked left a consistent state: bytes and counts.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A console sink that batches output for a slower writer (a file, stdout,
/// a pipe): bytes go out when 8 KiB are pending, at a newline once
/// [`SINK_FLUSH_DELAY`] has passed since the last write-out, within that
/// delay in any case, and when the sink is dropped. `flush` is a no-op:
/// the serial device flushes after every byte, which is what this sink
/// exists to avoid.
///
/// Only the sink's own thread, `chitin-console`, calls the writer: a vCPU
/// thread writing to the sink never runs the embedder's code, and is held
/// up by a slow writer only while [`SINK_MAX_PENDING`] bytes wait, and by
/// a stuck one for at most [`SINK_STALL`]. The thread confines itself to
/// the writer seccomp class.
///
/// With a limit, at most that many bytes (and one line saying the rest was
/// dropped) reach the writer.
pub struct BufferedSink {
    shared: Arc<SinkShared>,
    flusher: Option<JoinHandle<()>>,
}

impl fmt::Debug for BufferedSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("BufferedSink")
            .field("written", &state.written)
            .field("limit", &state.limit)
            .finish_non_exhaustive()
    }
}

impl BufferedSink {
    /// Batch output for `out`, passing at most `limit` bytes to it, from a
    /// thread confined under `seccomp`.
    pub fn new(
        out: Box<dyn Write + Send>,
        limit: Option<u64>,
        seccomp: Seccomp,
    ) -> io::Result<Self> {
        let shared = Arc::new(SinkShared {
            state: Mutex::new(SinkState {
                pending: Vec::with_capacity(SINK_CHUNK),
                written: 0,
                limit,
                capped: false,
                line_due: false,
                last_flush: Instant::now(),
                stalled: false,
                dropped: 0,
                closed: false,
            }),
            changed: Condvar::new(),
            drained: Condvar::new(),
        });
        let flusher_shared = Arc::clone(&shared);
        let flusher =
            chitin_seccomp::spawn("chitin-console", ThreadClass::Writer, seccomp, move || {
                flush_loop(&flusher_shared, out)
            })?;
        Ok(Self {
            shared,
            flusher: Some(flusher),
        })
    }
}

/// Write out pending output within [`SINK_FLUSH_DELAY`] of its arrival
/// (at once for a full chunk or a due line), until the sink closes; the
/// writer is called with the lock released.
fn flush_loop(shared: &SinkShared, mut out: Box<dyn Write + Send>) {
    let mut state = shared.lock();
    loop {
        while state.pending.is_empty() && state.dropped == 0 && !state.closed {
            state = shared
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        // Let more output gather, then write it out in one go.
        let due = state.last_flush + SINK_FLUSH_DELAY;
        let ready = state.closed || state.line_due || state.pending.len() >= SINK_CHUNK;
        let wait = due.saturating_duration_since(Instant::now());
        if !ready && !wait.is_zero() {
            state = shared
                .changed
                .wait_timeout(state, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            continue;
        }
        let closed = state.closed;
        let batch = state.take_batch();
        drop(state);
        shared.drained.notify_all();
        if !batch.is_empty() {
            // Errors lose output only.
            let _ = out.write_all(&batch).and_then(|()| out.flush());
        }
        state = shared.lock();
        state.stalled = false;
        if closed && state.pending.is_empty() {
            return;
        }
    }
}

impl Write for BufferedSink {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut state = self.shared.lock();
        let mut waited = Duration::ZERO;
        while state.pending.len() + data.len() > SINK_MAX_PENDING
            && !state.pending.is_empty()
            && !state.stalled
            && !state.closed
        {
            if waited >= SINK_STALL {
                state.stalled = true;
                break;
            }
            let start = Instant::now();
            self.shared.changed.notify_one();
            state = self
                .shared
                .drained
                .wait_timeout(state, SINK_STALL - waited)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            waited += start.elapsed();
        }
        if state.stalled && state.pending.len() + data.len() > SINK_MAX_PENDING {
            state.dropped += data.len() as u64;
            return Ok(data.len());
        }
        let was_empty = state.pending.is_empty();
        state.pending.extend_from_slice(data);
        if data.contains(&b'\n') && state.last_flush.elapsed() >= SINK_FLUSH_DELAY {
            state.line_due = true;
        }
        let wake = was_empty || state.line_due || state.pending.len() >= SINK_CHUNK;
        drop(state);
        if wake {
            self.shared.changed.notify_one();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for BufferedSink {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_one();
        if let Some(flusher) = self.flusher.take() {
            let _ = flusher.join();
        }
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
