//! What a driver got wrong, counted per device and logged without flooding.
//!
//! A device that refuses or drops something the guest sent (a malformed
//! descriptor chain, a packet for a connection that does not exist, a
//! request it cannot parse) records it here with a short, fixed reason.
//! The counts are what an embedder reads to see why a guest's stream
//! stalled; the log line says the same with the details, at most
//! [`LOG_BURST`] lines per [`LOG_WINDOW`] per device and log level, and the
//! next line written after a pause says how many were left out. A guest
//! that sends nothing but garbage therefore costs one counter increment per
//! chain and a bounded number of log lines, and faults the protocol allows
//! (logged at debug level) never use up the warnings' allowance.
//!
//! Reasons are `&'static str` chosen by the device, so the table has as many
//! entries as the device has reasons and never grows with guest input.
//!
//! This module never decides what to do about a fault; the device does.

use std::collections::BTreeMap;
use std::fmt::Display;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Most log lines one device writes per [`LOG_WINDOW`].
pub const LOG_BURST: u32 = 10;

/// The window over which [`LOG_BURST`] lines may be written.
pub const LOG_WINDOW: Duration = Duration::from_secs(60);

/// The `log` target of every fault line, for filtering.
pub const LOG_TARGET: &str = "chitin::guest";

/// What kind of fault it is, which sets its log level and whether it
/// counts as malformed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// The driver broke the specification (a malformed chain, a credit
    /// overrun): a guest bug or a hostile guest. Logged as a warning and
    /// counted in [`GuestFaults::malformed`].
    Malformed,
    /// A device limit refused something a correct driver may ask for (a
    /// connection beyond the device's maximum). Logged as a warning.
    Limit,
    /// Something the protocol allows that the device still did not take: a
    /// packet racing a close, a request type the device does not implement.
    /// Logged at debug level.
    Allowed,
}

impl Severity {
    fn level(self) -> log::Level {
        match self {
            Severity::Malformed | Severity::Limit => log::Level::Warn,
            Severity::Allowed => log::Level::Debug,
        }
    }
}

/// A per-device fault table; cheap to clone (all clones share it) and safe
/// to read from any thread while the device records into it.
#[derive(Clone, Debug)]
pub struct GuestFaults {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    device: String,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    counts: BTreeMap<&'static str, u64>,
    malformed: u64,
    /// One allowance for warnings, one for debug lines.
    limiters: [LogLimiter; 2],
}

/// Lines allowed in the current window and lines left out since the last
/// one written.
#[derive(Debug, Default)]
struct LogLimiter {
    window_start: Option<Instant>,
    written: u32,
    suppressed: u64,
}

impl LogLimiter {
    /// Whether a line may be written at `now`; if so, how many were left
    /// out before it.
    fn admit(&mut self, now: Instant) -> Option<u64> {
        let expired = self
            .window_start
            .is_none_or(|start| now.saturating_duration_since(start) >= LOG_WINDOW);
        if expired {
            self.window_start = Some(now);
            self.written = 0;
        }
        if self.written >= LOG_BURST {
            self.suppressed = self.suppressed.saturating_add(1);
            return None;
        }
        self.written += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

impl GuestFaults {
    /// An empty table for the device called `device` in log lines
    /// (`"vsock"`, `"vda"`).
    pub fn new(device: impl Into<String>) -> Self {
        GuestFaults {
            inner: Arc::new(Inner {
                device: device.into(),
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// The device's name.
    pub fn device(&self) -> &str {
        &self.inner.device
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the counters
        // inconsistent (each update is one insert), so poisoning is ignored.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Count one fault of `reason` and log it with `detail`, unless this
    /// device already logged [`LOG_BURST`] lines in this window.
    pub fn record(&self, severity: Severity, reason: &'static str, detail: &dyn Display) {
        self.record_at(Instant::now(), severity, reason, detail);
    }

    fn record_at(
        &self,
        now: Instant,
        severity: Severity,
        reason: &'static str,
        detail: &dyn Display,
    ) {
        let level = severity.level();
        let enabled = log::log_enabled!(target: LOG_TARGET, level);
        let admitted = {
            let mut state = self.state();
            let count = state.counts.entry(reason).or_insert(0);
            *count = count.saturating_add(1);
            if severity == Severity::Malformed {
                state.malformed = state.malformed.saturating_add(1);
            }
            // A line nobody would see does not use up the allowance.
            let limiter = &mut state.limiters[usize::from(level == log::Level::Debug)];
            enabled.then(|| limiter.admit(now)).flatten()
        };
        let Some(suppressed) = admitted else {
            return;
        };
        let device = &self.inner.device;
        if suppressed > 0 {
            log::log!(target: LOG_TARGET, level,
                "{device}: {reason}: {detail} ({suppressed} earlier faults not logged)");
        } else {
            log::log!(target: LOG_TARGET, level, "{device}: {reason}: {detail}");
        }
    }

    /// Faults recorded so far, all reasons.
    pub fn total(&self) -> u64 {
        self.state()
            .counts
            .values()
            .fold(0u64, |sum, n| sum.saturating_add(*n))
    }

    /// Faults recorded so far that broke the specification
    /// ([`Severity::Malformed`]).
    pub fn malformed(&self) -> u64 {
        self.state().malformed
    }

    /// [`GuestFaults::counts`] and [`GuestFaults::malformed`] read at one
    /// instant.
    pub fn snapshot(&self) -> (Vec<(&'static str, u64)>, u64) {
        let state = self.state();
        let counts = state.counts.iter().map(|(r, n)| (*r, *n)).collect();
        (counts, state.malformed)
    }

    /// Faults recorded so far for `reason`.
    pub fn count(&self, reason: &str) -> u64 {
        self.state().counts.get(reason).copied().unwrap_or(0)
    }

    /// Every reason seen so far with its count, in reason order.
    pub fn counts(&self) -> Vec<(&'static str, u64)> {
        self.state()
            .counts
            .iter()
            .map(|(reason, n)| (*reason, *n))
            .collect()
    }

    /// Warning lines left out since the last one written.
    #[cfg(test)]
    fn suppressed_warnings(&self) -> u64 {
        self.state().limiters[0].suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_counts_each_reason_separately() {
        let faults = GuestFaults::new("vsock");
        faults.record(Severity::Malformed, "short header", &"43 bytes");
        faults.record(Severity::Malformed, "short header", &"0 bytes");
        faults.record(Severity::Allowed, "no such connection", &"port 5");
        assert_eq!(faults.count("short header"), 2);
        assert_eq!(faults.count("no such connection"), 1);
        assert_eq!(faults.count("never seen"), 0);
        assert_eq!(faults.total(), 3);
        assert_eq!(faults.malformed(), 2);
        assert_eq!(
            faults.counts(),
            vec![("no such connection", 1), ("short header", 2)]
        );
    }

    #[test]
    fn clones_share_one_table() {
        let faults = GuestFaults::new("vda");
        let reader = faults.clone();
        faults.record(Severity::Malformed, "bad", &"x");
        assert_eq!(reader.total(), 1);
        assert_eq!(reader.device(), "vda");
    }

    /// Lets every record through to the limiter (it counts only lines a
    /// logger would take).
    struct TakeAll;

    impl log::Log for TakeAll {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, _: &log::Record<'_>) {}
        fn flush(&self) {}
    }

    fn take_all_logs() {
        // Only the first call in this test binary installs it.
        let _ = log::set_logger(&TakeAll);
        log::set_max_level(log::LevelFilter::Trace);
    }

    #[test]
    fn log_limiter_burst_then_suppresses_until_window_ends() {
        take_all_logs();
        let faults = GuestFaults::new("vsock");
        let t0 = Instant::now();
        // LOG_BURST lines are written, the next 5 are left out...
        for _ in 0..LOG_BURST + 5 {
            faults.record_at(t0, Severity::Malformed, "bad", &"x");
        }
        assert_eq!(faults.suppressed_warnings(), 5);
        // ...and still left out just before the window ends...
        let almost = t0 + LOG_WINDOW - Duration::from_millis(1);
        faults.record_at(almost, Severity::Malformed, "bad", &"x");
        assert_eq!(faults.suppressed_warnings(), 6);
        // ...then the first line of the next window reports them.
        faults.record_at(t0 + LOG_WINDOW, Severity::Malformed, "bad", &"x");
        assert_eq!(faults.suppressed_warnings(), 0);
        // Every fault is counted, logged or not.
        assert_eq!(faults.count("bad"), u64::from(LOG_BURST) + 7);
    }

    #[test]
    fn allowed_faults_do_not_use_up_the_warning_allowance() {
        take_all_logs();
        let faults = GuestFaults::new("vsock");
        let t0 = Instant::now();
        for _ in 0..LOG_BURST * 3 {
            faults.record_at(t0, Severity::Allowed, "no such connection", &"x");
        }
        faults.record_at(t0, Severity::Malformed, "bad", &"x");
        assert_eq!(faults.suppressed_warnings(), 0);
        assert_eq!(faults.malformed(), 1);
        assert_eq!(
            faults.snapshot(),
            (vec![("bad", 1), ("no such connection", 30)], 1)
        );
    }

    #[test]
    fn limit_faults_are_not_malformed() {
        let faults = GuestFaults::new("vsock");
        faults.record(Severity::Limit, "connection limit reached", &"x");
        assert_eq!(faults.malformed(), 0);
        assert_eq!(faults.total(), 1);
    }

    #[test]
    fn log_limiter_admit_reports_suppressed_once() {
        let mut limiter = LogLimiter::default();
        let t0 = Instant::now();
        for _ in 0..LOG_BURST {
            assert_eq!(limiter.admit(t0), Some(0));
        }
        assert_eq!(limiter.admit(t0), None);
        assert_eq!(limiter.admit(t0), None);
        assert_eq!(limiter.admit(t0 + LOG_WINDOW), Some(2));
        assert_eq!(limiter.admit(t0 + LOG_WINDOW), Some(0));
    }
}
