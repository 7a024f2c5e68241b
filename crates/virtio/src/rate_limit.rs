//! Rate limits for devices: token buckets for bytes and operations per second.
//!
//! A device asks [`RateLimiter::admit`] before it takes a request; when a bucket is empty it
//! answers [`BufferAction::Throttle`](crate::BufferAction::Throttle) with the wait, the worker
//! puts the chain back in its ring and looks at that queue again when the wait is over. Nothing
//! is dropped and nothing spins. A bucket holds a tenth of a second of its rate (plus an
//! optional one-time burst); a request larger than what is left still passes when the bucket is
//! not empty, and leaves it in debt, so that the long-run rate holds for any request size.

use std::time::{Duration, Instant};

/// What a device is allowed: bytes per second and requests per second (`None`: unlimited),
/// and a one-time burst of each on top of the steady rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimit {
    /// Bytes per second.
    pub bandwidth: Option<u64>,
    /// Requests per second.
    pub ops: Option<u64>,
    /// Bytes that may pass at once at the start, beyond the rate.
    pub bandwidth_burst: u64,
    /// Requests that may pass at once at the start, beyond the rate.
    pub ops_burst: u64,
}

impl RateLimit {
    /// Whether anything is limited.
    pub fn is_limited(&self) -> bool {
        self.bandwidth.is_some() || self.ops.is_some()
    }
}

#[derive(Debug)]
struct Bucket {
    /// Tokens per second.
    rate: u64,
    /// The most tokens it holds (a tenth of a second's worth, at least one).
    capacity: i128,
    /// Tokens now; negative after a request larger than what was left.
    level: i128,
    /// One-time tokens, spent before `level`.
    burst: u64,
    /// When the last whole token was added.
    last: Instant,
}

impl Bucket {
    fn new(rate: u64, burst: u64, now: Instant) -> Bucket {
        let capacity = i128::from((rate / 10).max(1));
        Bucket {
            rate: rate.max(1),
            capacity,
            level: capacity,
            burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let ns = now.saturating_duration_since(self.last).as_nanos();
        let add = ns * u128::from(self.rate) / 1_000_000_000;
        if add == 0 {
            return;
        }
        // Advance by the time those tokens took, so fractions are not lost.
        let used = add * 1_000_000_000 / u128::from(self.rate);
        self.last += Duration::from_nanos(used.min(u128::from(u64::MAX)) as u64);
        self.level = (self.level + add.min(i128::MAX as u128) as i128).min(self.capacity);
    }

    /// How long until the bucket has a token, if it has none now.
    fn wait(&mut self, now: Instant) -> Option<Duration> {
        self.refill(now);
        if self.burst > 0 || self.level > 0 {
            return None;
        }
        let missing = (1 - self.level) as u128;
        let ns = missing * 1_000_000_000 / u128::from(self.rate) + 1;
        Some(Duration::from_nanos(ns.min(u128::from(u64::MAX)) as u64))
    }

    fn take(&mut self, n: u64) {
        let from_burst = n.min(self.burst);
        self.burst -= from_burst;
        self.level -= i128::from(n - from_burst);
    }
}

/// The buckets of one device (or queue).
#[derive(Debug, Default)]
pub struct RateLimiter {
    bandwidth: Option<Bucket>,
    ops: Option<Bucket>,
}

impl RateLimiter {
    /// A limiter for `limit`, full now.
    pub fn new(limit: &RateLimit) -> RateLimiter {
        let now = Instant::now();
        RateLimiter {
            bandwidth: limit
                .bandwidth
                .map(|r| Bucket::new(r, limit.bandwidth_burst, now)),
            ops: limit.ops.map(|r| Bucket::new(r, limit.ops_burst, now)),
        }
    }

    /// Whether it limits anything (a device can skip sizing requests when not).
    pub fn is_limited(&self) -> bool {
        self.bandwidth.is_some() || self.ops.is_some()
    }

    /// Takes one request of `bytes` if both buckets have tokens; otherwise takes nothing and
    /// says how long to wait before asking again.
    pub fn admit(&mut self, bytes: u64) -> Result<(), Duration> {
        if !self.is_limited() {
            // No clock read on the I/O path of a device without limits.
            return Ok(());
        }
        self.admit_at(bytes, Instant::now())
    }

    /// [`RateLimiter::admit`] at a given time (for tests).
    pub fn admit_at(&mut self, bytes: u64, now: Instant) -> Result<(), Duration> {
        self.ready_at(now)?;
        self.consume(bytes);
        Ok(())
    }

    /// Whether a request may start now (every bucket has tokens), taking nothing; otherwise
    /// how long to wait. For I/O whose size is known only once it is done (a receive), followed
    /// by [`RateLimiter::consume`].
    pub fn ready(&mut self) -> Result<(), Duration> {
        if !self.is_limited() {
            return Ok(());
        }
        self.ready_at(Instant::now())
    }

    fn ready_at(&mut self, now: Instant) -> Result<(), Duration> {
        let wait = [self.bandwidth.as_mut(), self.ops.as_mut()]
            .into_iter()
            .flatten()
            .filter_map(|b| b.wait(now))
            .max();
        match wait {
            Some(w) => Err(w),
            None => Ok(()),
        }
    }

    /// Takes `bytes` and one request (after [`RateLimiter::ready`], once the size is known).
    pub fn consume(&mut self, bytes: u64) {
        if let Some(b) = self.bandwidth.as_mut() {
            b.take(bytes);
        }
        if let Some(b) = self.ops.as_mut() {
            b.take(1);
        }
    }
}

#[cfg(test)]
#[path = "rate_limit_test.rs"]
mod tests;
