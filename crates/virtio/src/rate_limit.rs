//! Token-bucket rate limits for device I/O: bytes per second and
//! operations per second, each with an optional one-time burst.
//!
//! A device asks [`RateLimiter::consume`] before it does one operation of
//! `bytes` bytes (a frame, a disk request). When a bucket is short the
//! answer is no, the limiter arms its timer for the moment the bucket will
//! hold enough, and the device stops taking work from the guest until the
//! timer's fd turns readable in the event loop and it calls
//! [`RateLimiter::on_timer`]. Nothing spins while throttled.
//!
//! Bucket rules:
//! - a bucket refills at its rate continuously (nanosecond resolution,
//!   no rounding drift) up to a capacity of [`BUCKET_WINDOW`] worth of
//!   tokens, and starts full;
//! - an operation larger than the capacity (a 64 KiB frame under a slow
//!   limit) is let through once the bucket is full and leaves it in debt,
//!   so the long-run rate stays exact and no operation waits forever; the
//!   debt of [`RateLimiter::consume`] is capped at [`MAX_DEBT`] of refill,
//!   that of [`RateLimiter::charge`] (an operation already done) is not;
//! - the one-time burst is spent before the bucket and never refills;
//! - both buckets must agree: an operation either takes from both or from
//!   neither.
//!
//! Time comes from a [`Clock`], so the arithmetic is unit-tested with a
//! fake one; devices use [`MonotonicClock`].

use std::fmt;
use std::io;
use std::num::NonZeroU64;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

/// How much a bucket holds: this long at its rate. Small enough that a
/// limited stream is smooth (no second-long bursts), large enough that a
/// timer wake-up lets several operations through.
pub const BUCKET_WINDOW: Duration = Duration::from_millis(100);

/// The longest an operation's debt holds a bucket empty: operations up
/// to this much refill keep the long-run rate exact, larger ones are
/// undercharged rather than stall the device for hours.
pub const MAX_DEBT: Duration = Duration::from_secs(60);

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// A source of monotonic time.
pub trait Clock: Send {
    /// Time since an arbitrary fixed start; never goes backwards.
    fn now(&self) -> Duration;
}

/// `CLOCK_MONOTONIC`, through [`Instant`].
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    start: Instant,
}

impl MonotonicClock {
    /// A clock starting now.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
        }
    }
}

impl Default for MonotonicClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for MonotonicClock {
    fn now(&self) -> Duration {
        self.start.elapsed()
    }
}

/// One limit: a steady rate per second and an optional one-time burst
/// allowed on top of it (in the same unit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    rate: NonZeroU64,
    burst: u64,
}

impl Limit {
    /// `rate` units per second, no burst.
    pub fn per_second(rate: NonZeroU64) -> Self {
        Self { rate, burst: 0 }
    }

    /// Allow `burst` units once, before the steady rate applies.
    pub fn with_burst(mut self, burst: u64) -> Self {
        self.burst = burst;
        self
    }

    /// Units per second.
    pub fn rate(&self) -> u64 {
        self.rate.get()
    }

    /// The one-time burst.
    pub fn burst(&self) -> u64 {
        self.burst
    }
}

/// What a [`RateLimiter`] limits: bytes per second, operations per second,
/// or both. The default limits nothing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Bytes per second.
    pub bandwidth: Option<Limit>,
    /// Operations per second.
    pub ops: Option<Limit>,
}

impl RateLimit {
    /// Whether this limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }
}

/// One token bucket; balances are in token-nanoseconds (tokens × 10⁹) so
/// refill is exact integer arithmetic.
#[derive(Debug)]
struct TokenBucket {
    rate: u128,
    capacity: i128,
    balance: i128,
    burst: u64,
    last: Duration,
}

impl TokenBucket {
    fn new(limit: Limit, now: Duration) -> Self {
        let rate = u128::from(limit.rate());
        let window = rate * BUCKET_WINDOW.as_nanos() / NANOS_PER_SEC;
        // At least one token, so a bucket can ever let something through.
        let capacity = to_nanos(window.max(1));
        Self {
            rate,
            capacity,
            balance: capacity,
            burst: limit.burst(),
            last: now,
        }
    }

    fn refill(&mut self, now: Duration) {
        let elapsed = now.saturating_sub(self.last).as_nanos();
        self.last = self.last.max(now);
        let added = i128::try_from(elapsed.saturating_mul(self.rate)).unwrap_or(i128::MAX);
        self.balance = self.balance.saturating_add(added).min(self.capacity);
    }

    /// The part of `tokens` the burst does not cover.
    fn after_burst(&self, tokens: u64) -> u64 {
        tokens.saturating_sub(self.burst)
    }

    /// How long until `tokens` may be taken; zero if now.
    fn wait_for(&self, tokens: u64) -> Duration {
        let rest = self.after_burst(tokens);
        if rest == 0 {
            return Duration::ZERO;
        }
        let needed = to_nanos(u128::from(rest)).min(self.capacity);
        if self.balance >= needed {
            return Duration::ZERO;
        }
        // Both sides are token-nanoseconds; dividing by the rate gives
        // nanoseconds. Round up so the bucket is full enough on wake-up.
        let short = (needed - self.balance) as u128;
        let nanos = short.div_ceil(self.rate);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// How long until the bucket holds a whole token again (or the burst
    /// has some); zero if it does now.
    fn wait_for_credit(&self) -> Duration {
        let token = to_nanos(1);
        if self.burst > 0 || self.balance >= token {
            return Duration::ZERO;
        }
        let short = (token - self.balance) as u128;
        let nanos = short.div_ceil(self.rate);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Take `tokens`. With `capped`, the debt is at most one operation
    /// (the next one waits for a positive balance) and at most MAX_DEBT of
    /// refill: one huge operation cannot stop the device for longer.
    /// Without, the whole cost stays owed (an operation that already
    /// happened, charged after the fact, must not get a discount).
    fn take(&mut self, tokens: u64, capped: bool) {
        let from_burst = tokens.min(self.burst);
        self.burst -= from_burst;
        let rest = tokens - from_burst;
        let floor = if capped {
            -i128::try_from(self.rate.saturating_mul(MAX_DEBT.as_nanos())).unwrap_or(i128::MAX)
        } else {
            i128::MIN
        };
        self.balance = self
            .balance
            .saturating_sub(to_nanos(u128::from(rest)))
            .max(floor);
    }
}

fn to_nanos(tokens: u128) -> i128 {
    i128::try_from(tokens.saturating_mul(NANOS_PER_SEC)).unwrap_or(i128::MAX)
}

/// Why a limiter could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot create the rate limiter's timer")]
pub struct RateLimiterError(#[source] pub io::Error);

/// Bandwidth and operation buckets with the timer that ends a throttle.
pub struct RateLimiter<C: Clock = MonotonicClock> {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    clock: C,
    timer: TimerFd,
    throttled: bool,
    throttle_count: u64,
}

impl<C: Clock> fmt::Debug for RateLimiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("bandwidth", &self.bandwidth)
            .field("ops", &self.ops)
            .field("throttled", &self.throttled)
            .finish_non_exhaustive()
    }
}

impl RateLimiter<MonotonicClock> {
    /// A limiter on the monotonic clock.
    pub fn new(limit: RateLimit) -> Result<Self, RateLimiterError> {
        Self::with_clock(limit, MonotonicClock::new())
    }
}

impl<C: Clock> RateLimiter<C> {
    /// A limiter reading time from `clock`.
    pub fn with_clock(limit: RateLimit, clock: C) -> Result<Self, RateLimiterError> {
        let now = clock.now();
        Ok(Self {
            bandwidth: limit.bandwidth.map(|l| TokenBucket::new(l, now)),
            ops: limit.ops.map(|l| TokenBucket::new(l, now)),
            clock,
            timer: nonblocking_timer().map_err(RateLimiterError)?,
            throttled: false,
            throttle_count: 0,
        })
    }

    /// Take one operation of `bytes` bytes if both buckets allow it now.
    /// Otherwise take nothing, arm the timer for when they will, and
    /// return false; the caller stops until [`Self::on_timer`].
    pub fn consume(&mut self, bytes: u64) -> bool {
        if self.throttled {
            return false;
        }
        let now = self.clock.now();
        let mut wait = Duration::ZERO;
        for (bucket, tokens) in [(&mut self.bandwidth, bytes), (&mut self.ops, 1)] {
            if let Some(bucket) = bucket {
                bucket.refill(now);
                wait = wait.max(bucket.wait_for(tokens));
            }
        }
        if self.throttle_for(wait) {
            return false;
        }
        self.take(bytes, true);
        true
    }

    /// For operations whose size is known only once they are done (a
    /// frame read from a tap lands in the guest before its length is
    /// known): whether one may start now. It may when every bucket holds
    /// a whole token; [`Self::charge`] then takes what it cost, which may
    /// leave a bucket in debt. Otherwise the timer is armed for when the
    /// buckets have credit again and this returns false.
    pub fn admit(&mut self) -> bool {
        if self.throttled {
            return false;
        }
        let now = self.clock.now();
        let mut wait = Duration::ZERO;
        for bucket in [&mut self.bandwidth, &mut self.ops].into_iter().flatten() {
            bucket.refill(now);
            wait = wait.max(bucket.wait_for_credit());
        }
        !self.throttle_for(wait)
    }

    /// Take one operation of `bytes` that [`Self::admit`] let start; the
    /// buckets may go into debt, for the whole cost (a 254 MiB disk request
    /// under a slow limit owes all of it), which the next `admit` waits
    /// out.
    pub fn charge(&mut self, bytes: u64) {
        let now = self.clock.now();
        for bucket in [&mut self.bandwidth, &mut self.ops].into_iter().flatten() {
            bucket.refill(now);
        }
        self.take(bytes, false);
    }

    fn take(&mut self, bytes: u64, capped: bool) {
        for (bucket, tokens) in [(&mut self.bandwidth, bytes), (&mut self.ops, 1)] {
            if let Some(bucket) = bucket {
                bucket.take(tokens, capped);
            }
        }
    }

    /// Throttle for `wait` unless it is zero; whether throttled.
    fn throttle_for(&mut self, wait: Duration) -> bool {
        if wait == Duration::ZERO {
            return false;
        }
        // A timer that cannot be armed would leave the device stopped for
        // good: stay unthrottled instead and let the operation through
        // (the limit is lost, no work is).
        if self.timer.reset(wait, None).is_err() {
            return false;
        }
        self.throttled = true;
        self.throttle_count += 1;
        true
    }

    /// Whether the limiter said no and its timer has not fired since.
    pub fn is_throttled(&self) -> bool {
        self.throttled
    }

    /// How many times an operation was held back.
    pub fn throttle_count(&self) -> u64 {
        self.throttle_count
    }

    /// The timer fd turned readable: the throttle is over. Returns whether
    /// the limiter was throttled.
    pub fn on_timer(&mut self) -> bool {
        // Drain the expiry count; EAGAIN (a spurious wake-up) is harmless.
        let _ = self.timer.wait();
        std::mem::take(&mut self.throttled)
    }

    /// The fd to watch for readability while throttled.
    pub fn timer(&self) -> &TimerFd {
        &self.timer
    }

    /// The clock, for tests that move it.
    pub fn clock_mut(&mut self) -> &mut C {
        &mut self.clock
    }
}

/// A timerfd whose read never blocks: a tick may be consumed between epoll
/// reporting it and the device reading it.
pub fn nonblocking_timer() -> io::Result<TimerFd> {
    let timer = TimerFd::new().map_err(io::Error::from)?;
    let fd = timer.as_raw_fd();
    // SAFETY: fcntl on a descriptor we own; F_GETFL and F_SETFL take no
    // pointers.
    let ok = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    if ok {
        Ok(timer)
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;

    /// A clock the test moves by hand.
    #[derive(Clone, Default)]
    struct FakeClock(Arc<AtomicU64>);

    impl FakeClock {
        fn advance(&self, by: Duration) {
            self.0.fetch_add(by.as_nanos() as u64, Ordering::SeqCst);
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Duration {
            Duration::from_nanos(self.0.load(Ordering::SeqCst))
        }
    }

    fn limit(rate: u64) -> Limit {
        Limit::per_second(NonZeroU64::new(rate).unwrap())
    }

    fn limiter(limit: RateLimit) -> (RateLimiter<FakeClock>, FakeClock) {
        let clock = FakeClock::default();
        (
            RateLimiter::with_clock(limit, clock.clone()).unwrap(),
            clock,
        )
    }

    fn bandwidth(rate: u64) -> RateLimit {
        RateLimit {
            bandwidth: Some(limit(rate)),
            ops: None,
        }
    }

    /// Wait for the (real) timer, then end the throttle.
    fn expire(limiter: &mut RateLimiter<FakeClock>) {
        let mut poll = libc::pollfd {
            fd: limiter.timer().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let ready = unsafe { libc::poll(&mut poll, 1, 5_000) };
        assert_eq!(ready, 1, "the throttle timer never fired");
        assert!(limiter.on_timer());
    }

    /// Bytes the limiter lets through in `steps` steps of `step` each,
    /// offering `op` bytes at a time and ending each throttle by hand.
    fn pass(
        limiter: &mut RateLimiter<FakeClock>,
        clock: &FakeClock,
        op: u64,
        steps: u32,
        step: Duration,
    ) -> u64 {
        let mut passed = 0;
        for _ in 0..steps {
            clock.advance(step);
            limiter.on_timer();
            while limiter.consume(op) {
                passed += op;
            }
        }
        passed
    }

    #[test]
    fn admit_then_charge_holds_the_rate_over_frames_of_unknown_size() {
        // 1 MB/s; frames of 64 KiB are charged after they happened.
        let (mut limiter, clock) = limiter(bandwidth(1_000_000));
        let frame = 65_536;
        let mut passed = 0u64;
        // Ten seconds in 1 ms steps.
        for _ in 0..10_000 {
            clock.advance(Duration::from_millis(1));
            limiter.on_timer();
            while limiter.admit() {
                limiter.charge(frame);
                passed += frame;
            }
        }
        // The 100 000-byte bucket, plus 10 s of refill, plus at most the
        // one frame that took the balance into debt.
        let expected = 100_000 + 10_000_000;
        assert!(passed >= expected, "{passed}");
        assert!(passed <= expected + frame, "{passed}");
    }

    #[test]
    fn admit_waits_out_the_debt_of_a_charge_and_arms_the_timer() {
        // 1000 bytes/s: a 150-byte charge from a full 100-byte bucket
        // leaves 50 bytes of debt, which takes 50 ms (and a bit) to repay.
        let (mut limiter, clock) = limiter(bandwidth(1_000));
        assert!(limiter.admit());
        limiter.charge(150);
        assert!(!limiter.admit());
        assert_eq!(limiter.throttle_count(), 1);
        let started = Instant::now();
        expire(&mut limiter);
        assert!(started.elapsed() >= Duration::from_millis(45));
        // The fake clock has not moved: still in debt.
        assert!(!limiter.admit());
        expire(&mut limiter);
        clock.advance(Duration::from_millis(51));
        assert!(limiter.admit());
    }

    #[test]
    fn admit_counts_operations_and_spends_the_burst_first() {
        let (mut limiter, _) = limiter(RateLimit {
            bandwidth: None,
            ops: Some(limit(10).with_burst(3)),
        });
        // One op of capacity (100 ms of 10/s) and a burst of three.
        let mut admitted = 0;
        while limiter.admit() {
            limiter.charge(1 << 20);
            admitted += 1;
        }
        assert_eq!(admitted, 4);
    }

    #[test]
    fn an_unlimited_limiter_never_throttles() {
        let (mut limiter, _) = limiter(RateLimit::default());
        for _ in 0..10_000 {
            assert!(limiter.consume(1 << 20));
        }
        assert!(!limiter.is_throttled());
    }

    #[test]
    fn bandwidth_starts_full_then_holds_its_rate_exactly() {
        // 1 MB/s: the bucket holds 100 ms = 100 000 bytes.
        let (mut limiter, clock) = limiter(bandwidth(1_000_000));
        let mut first = 0;
        while limiter.consume(1_000) {
            first += 1_000;
        }
        assert_eq!(first, 100_000);
        assert!(limiter.is_throttled());
        // Ten seconds in 1 ms steps: exactly 10 MB more.
        let passed = pass(
            &mut limiter,
            &clock,
            1_000,
            10_000,
            Duration::from_millis(1),
        );
        assert_eq!(passed, 10_000_000);
    }

    #[test]
    fn the_timer_is_armed_for_when_the_tokens_are_back() {
        // 1000 bytes/s, capacity 100 bytes; spend it, then ask for 50.
        let (mut limiter, clock) = limiter(bandwidth(1_000));
        assert!(limiter.consume(100));
        assert!(!limiter.consume(50));
        // Throttled: a second ask is refused at once, the timer stays.
        assert!(!limiter.consume(1));
        assert_eq!(limiter.throttle_count(), 1);
        // 50 bytes at 1000/s is 50 ms of real timer time.
        let started = Instant::now();
        expire(&mut limiter);
        assert!(started.elapsed() >= Duration::from_millis(45));
        // The fake clock did not move, so the bucket is still short...
        assert!(!limiter.consume(50));
        limiter.on_timer();
        // ...until it does.
        clock.advance(Duration::from_millis(50));
        assert!(limiter.consume(50));
    }

    #[test]
    fn an_operation_larger_than_the_bucket_passes_when_full_and_leaves_debt() {
        // 10 000 bytes/s: capacity 1000 bytes; a 64 KiB frame.
        let (mut limiter, clock) = limiter(bandwidth(10_000));
        assert!(limiter.consume(65_536));
        // 64 536 bytes of debt: the bucket holds 1000 again 6.5536 s on.
        assert!(!limiter.consume(65_536));
        limiter.on_timer();
        clock.advance(Duration::from_millis(6_553));
        assert!(!limiter.consume(65_536));
        limiter.on_timer();
        clock.advance(Duration::from_millis(1));
        assert!(limiter.consume(65_536));
        // Over a minute of 64 KiB frames the rate stays 10 000 bytes/s,
        // give or take the one frame in flight at the end.
        let passed = pass(
            &mut limiter,
            &clock,
            65_536,
            60_000,
            Duration::from_millis(1),
        );
        let rate = passed as f64 / 60.0;
        assert!((rate - 10_000.0).abs() < 1_100.0, "rate {rate}");
    }

    #[test]
    fn the_burst_is_spent_first_and_only_once() {
        let burst = RateLimit {
            bandwidth: Some(limit(1_000).with_burst(5_000)),
            ops: None,
        };
        let (mut limiter, clock) = limiter(burst);
        // 5000 burst + 100 capacity.
        let mut first = 0;
        while limiter.consume(100) {
            first += 100;
        }
        assert_eq!(first, 5_100);
        // After a long pause only the capacity is back, not the burst.
        limiter.on_timer();
        clock.advance(Duration::from_secs(60));
        let mut second = 0;
        while limiter.consume(100) {
            second += 100;
        }
        assert_eq!(second, 100);
    }

    #[test]
    fn operations_are_limited_independently_of_their_size() {
        let ops = RateLimit {
            bandwidth: None,
            ops: Some(limit(100)),
        };
        let (mut limiter, clock) = limiter(ops);
        let passed = pass(
            &mut limiter,
            &clock,
            1 << 20,
            1_000,
            Duration::from_millis(10),
        );
        // The full bucket (10) at the start, then one per 10 ms step after
        // the first (which found the bucket full already).
        assert_eq!(passed / (1 << 20), 10 + 999);
    }

    #[test]
    fn a_refusal_spends_neither_bucket() {
        let both = RateLimit {
            bandwidth: Some(limit(1_000)),
            ops: Some(limit(10)),
        };
        let (mut limiter, _clock) = limiter(both);
        // Capacities: 100 bytes, one operation.
        assert!(limiter.consume(10));
        // Refused by the ops bucket: the bytes stay.
        assert!(!limiter.consume(10));
        assert_eq!(limiter.bandwidth.as_ref().unwrap().balance, to_nanos(90));
        assert_eq!(limiter.ops.as_ref().unwrap().balance, 0);
    }

    #[test]
    fn a_clock_that_steps_back_adds_nothing() {
        let (mut limiter, clock) = limiter(bandwidth(1_000));
        clock.advance(Duration::from_secs(1));
        assert!(limiter.consume(100));
        // The bucket last saw 1 s; the clock now says 0.
        clock.0.store(0, Ordering::SeqCst);
        assert!(!limiter.consume(100));
        limiter.on_timer();
        // Back at 1.05 s: only the 50 ms since 1 s count.
        clock.advance(Duration::from_millis(1_050));
        assert!(!limiter.consume(100));
        limiter.on_timer();
        assert!(limiter.consume(50));
    }

    #[test]
    fn huge_rates_and_sizes_do_not_overflow() {
        let huge = RateLimit {
            bandwidth: Some(limit(u64::MAX).with_burst(u64::MAX)),
            ops: Some(limit(u64::MAX)),
        };
        let (mut fast, clock) = limiter(huge);
        assert!(fast.consume(u64::MAX));
        clock.advance(Duration::from_secs(1 << 30));
        assert!(fast.consume(u64::MAX));
        // One enormous operation at 1 byte/s holds the bucket for at most
        // MAX_DEBT (plus refilling its one-byte capacity).
        let (mut slow, clock) = limiter(bandwidth(1));
        assert!(slow.consume(u64::MAX));
        assert!(!slow.consume(1));
        slow.on_timer();
        clock.advance(MAX_DEBT);
        assert!(!slow.consume(1));
        slow.on_timer();
        clock.advance(Duration::from_secs(1));
        assert!(slow.consume(1));
    }
}
