//! Adaptive polling: before a worker sleeps, it watches its rings for a while, so that a driver
//! submitting back to back neither waits for a thread wake-up nor exits to notify.
//!
//! The window self-tunes as QEMU's `poll-max-ns` does: a poll that finds work doubles it (up to
//! the configured maximum), one that times out halves it (down to 1/16 of the maximum), so an
//! idle device quickly stops burning CPU and a busy one keeps its window. While polling, and
//! while serving what a poll found, the backends keep the queues' notifications suppressed
//! (VRING_USED_F_NO_NOTIFY or the avail event index on split rings, the device event
//! suppression on packed rings); they enable them, and look at the rings once more, only when a
//! window ends without work.

use std::time::{Duration, Instant};

/// A self-tuning polling window.
#[derive(Debug, Clone)]
pub struct PollWindow {
    max: Duration,
    window: Duration,
    /// Time spent polling and how much of it found work (for the CPU cost report).
    spent: Duration,
}

impl PollWindow {
    /// A window of at most `max_us` microseconds; `None` for 0 (polling off).
    pub fn new(max_us: u32) -> Option<PollWindow> {
        (max_us > 0).then(|| {
            let max = Duration::from_micros(u64::from(max_us));
            PollWindow {
                max,
                window: max,
                spent: Duration::ZERO,
            }
        })
    }

    /// The current window.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// Total time spent polling so far.
    pub fn spent(&self) -> Duration {
        self.spent
    }

    /// Spins until `ready` says there is work (true) or the window ends (false), and tunes the
    /// window by the outcome.
    pub fn poll(&mut self, mut ready: impl FnMut() -> bool) -> bool {
        let start = Instant::now();
        let found = loop {
            if ready() {
                break true;
            }
            if start.elapsed() >= self.window {
                break false;
            }
            std::hint::spin_loop();
        };
        self.spent += start.elapsed();
        self.window = if found {
            (self.window * 2).min(self.max)
        } else {
            (self.window / 2).max(self.max / 16)
        };
        found
    }
}

#[cfg(test)]
#[path = "poll_test.rs"]
mod tests;
