//! The limiter's clock: nanoseconds since an epoch, on tokio's clock.
//!
//! Tokio's clock is the one tests can pause and advance, so the queue's
//! timing is tested in-process without real sleeps. The quota maths itself
//! takes `now` as an argument and never reads a clock.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Clock { epoch: Instant::now() }
    }
}

impl Clock {
    /// Nanoseconds since the epoch.
    pub fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The instant of a clock reading, for `sleep_until`.
    pub fn instant(&self, at: u64) -> Instant {
        self.epoch + Duration::from_nanos(at)
    }
}
