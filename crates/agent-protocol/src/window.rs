//! A flow-control window shared between threads: the credit one side of a
//! stream may still spend before its peer returns some (see
//! [`crate::WINDOW`]).
//!
//! Senders [`Window::take`] credit before sending data and block while
//! there is none; whoever reads the peer's credit frames
//! [`Window::give`]s it back. [`Window::close`] wakes every waiter for
//! good, for a stream that ended or a connection that is going away.

use std::sync::{Condvar, Mutex, MutexGuard};

use crate::WINDOW;

/// Credit returned beyond [`WINDOW`]: the peer broke the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("peer returned {returned} bytes of credit with {available} of {WINDOW} unspent")]
pub struct Overflow {
    /// Credit the frame returned.
    pub returned: u32,
    /// Credit unspent before it.
    pub available: u32,
}

struct State {
    available: u32,
    closed: bool,
}

/// One direction of one stream's credit.
pub struct Window {
    state: Mutex<State>,
    changed: Condvar,
}

impl Default for Window {
    fn default() -> Self {
        Self::new()
    }
}

impl Window {
    /// A full window of [`WINDOW`] bytes.
    pub fn new() -> Self {
        Window {
            state: Mutex::new(State {
                available: WINDOW,
                closed: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Poisoning only means a holder panicked; two integers stay valid.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wait until there is credit, then take up to `max` bytes of it
    /// (`max` ≥ 1). `None` once the window is closed.
    pub fn take(&self, max: u32) -> Option<u32> {
        let mut state = self.lock();
        loop {
            if state.closed {
                return None;
            }
            if state.available > 0 {
                let n = state.available.min(max.max(1));
                state.available -= n;
                return Some(n);
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Return `n` bytes of credit. Fails, changing nothing, when that would
    /// hold more than [`WINDOW`]; credit for a closed window is ignored.
    pub fn give(&self, n: u32) -> Result<(), Overflow> {
        let mut state = self.lock();
        if state.closed {
            return Ok(());
        }
        match state.available.checked_add(n).filter(|&a| a <= WINDOW) {
            Some(a) => {
                state.available = a;
                self.changed.notify_all();
                Ok(())
            }
            None => Err(Overflow {
                returned: n,
                available: state.available,
            }),
        }
    }

    /// Wake every waiter; from now on [`Window::take`] returns `None`.
    pub fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }

    /// Credit not taken yet.
    pub fn available(&self) -> u32 {
        self.lock().available
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn take_caps_at_max_and_available() {
        let w = Window::new();
        assert_eq!(w.take(1000), Some(1000));
        assert_eq!(w.take(WINDOW), Some(WINDOW - 1000));
        assert_eq!(w.available(), 0);
    }

    #[test]
    fn give_beyond_window_errors_and_changes_nothing() {
        let w = Window::new();
        assert_eq!(w.take(10), Some(10));
        assert_eq!(
            w.give(11),
            Err(Overflow {
                returned: 11,
                available: WINDOW - 10
            })
        );
        assert_eq!(w.available(), WINDOW - 10);
        assert_eq!(
            w.give(u32::MAX),
            Err(Overflow {
                returned: u32::MAX,
                available: WINDOW - 10
            })
        );
        assert_eq!(w.give(10), Ok(()));
        assert_eq!(w.available(), WINDOW);
    }

    #[test]
    fn take_blocks_until_give() {
        let w = Arc::new(Window::new());
        assert_eq!(w.take(WINDOW), Some(WINDOW));
        let giver = {
            let w = Arc::clone(&w);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                w.give(7).unwrap();
            })
        };
        assert_eq!(w.take(100), Some(7));
        giver.join().unwrap();
    }

    #[test]
    fn close_wakes_a_blocked_take() {
        let w = Arc::new(Window::new());
        assert_eq!(w.take(WINDOW), Some(WINDOW));
        let closer = {
            let w = Arc::clone(&w);
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                w.close();
            })
        };
        assert_eq!(w.take(1), None);
        closer.join().unwrap();
        assert_eq!(w.give(1), Ok(()), "credit after close is ignored");
    }
}
