//! A rate limit for log lines a guest can trigger over and over.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most [`LogLimiter::LINES`] lines per [`LogLimiter::WINDOW`] for one device (a malformed
/// packet per transmit, a register written out of order in a loop...); the next line allowed
/// says how many were suppressed. Shared freely: it locks inside.
#[derive(Debug)]
pub struct LogLimiter(Mutex<State>);

#[derive(Debug)]
struct State {
    window: Instant,
    lines: u32,
    suppressed: u64,
}

/// A clone starts its own window (what was logged through the original does not count).
impl Clone for LogLimiter {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl Default for LogLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl LogLimiter {
    /// Lines allowed per window.
    pub const LINES: u32 = 10;
    /// The window.
    pub const WINDOW: Duration = Duration::from_secs(10);

    /// A limiter with a fresh window.
    pub fn new() -> Self {
        LogLimiter(Mutex::new(State {
            window: Instant::now(),
            lines: 0,
            suppressed: 0,
        }))
    }

    /// Whether a line may be logged now: `Some(n)` with the lines suppressed since the last
    /// one logged, or `None` (the line is counted as suppressed).
    pub fn allow(&self) -> Option<u64> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if s.window.elapsed() >= Self::WINDOW {
            s.window = Instant::now();
            s.lines = 0;
        }
        if s.lines >= Self::LINES {
            s.suppressed += 1;
            return None;
        }
        s.lines += 1;
        Some(std::mem::take(&mut s.suppressed))
    }

    /// Logs `args` at warning level if the limit allows.
    pub fn warn(&self, args: std::fmt::Arguments) {
        if let Some(suppressed) = self.allow() {
            if suppressed > 0 {
                log::warn!("{args} ({suppressed} similar messages suppressed)");
            } else {
                log::warn!("{args}");
            }
        }
    }
}

#[cfg(test)]
#[path = "log_limit_test.rs"]
mod tests;
