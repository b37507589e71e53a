//! The limiter's clock: nanoseconds since an epoch, on tokio's clock.
//!
//! Tokio's clock is the one tests can pause and advance, so the queue's
//! timing is tested in-process without real sleeps. The quota maths itself
//! takes `now` as an argument and never reads a clock.
//!
//! Readings start at [`PAST`] rather than zero, so that admissions and
//! charges restored from a durable store, which happened before this process
//! started, still have a reading. A reading converts to and from wall-clock
//! UNIX nanoseconds ([`Clock::to_unix`], [`Clock::from_unix`]) against one
//! pair of readings taken when the clock was made.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

/// How far into the past a reading reaches: entries older than this, which
/// no window or budget of any sane length still counts, read as zero.
pub const PAST: u64 = 400 * 86_400 * 1_000_000_000;

#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
    /// Wall-clock UNIX nanoseconds at the epoch.
    unix_epoch: u64,
}

impl Default for Clock {
    fn default() -> Self {
        let unix = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        Clock { epoch: Instant::now(), unix_epoch: u64::try_from(unix.as_nanos()).unwrap_or(u64::MAX) }
    }
}

impl Clock {
    /// Nanoseconds since the epoch, plus [`PAST`].
    pub fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX).saturating_add(PAST)
    }

    /// The instant of a clock reading, for `sleep_until`; a reading before
    /// the epoch is the epoch (already past).
    pub fn instant(&self, at: u64) -> Instant {
        self.epoch + Duration::from_nanos(at.saturating_sub(PAST))
    }

    /// Wall-clock UNIX nanoseconds of a reading.
    pub fn to_unix(&self, at: u64) -> i64 {
        let unix = i128::from(self.unix_epoch) + i128::from(at) - i128::from(PAST);
        i64::try_from(unix).unwrap_or(i64::MAX)
    }

    /// The reading of a wall-clock UNIX time; zero for anything older than [`PAST`].
    pub fn from_unix(&self, unix: i64) -> u64 {
        let at = i128::from(unix) - i128::from(self.unix_epoch) + i128::from(PAST);
        u64::try_from(at.max(0)).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_convert_to_wall_clock_and_back() {
        let c = Clock::default();
        let now = c.now();
        assert_eq!(c.from_unix(c.to_unix(now)), now);
        // A day before the process started still has a reading.
        let yesterday = c.to_unix(now) - 86_400 * 1_000_000_000;
        assert_eq!(c.from_unix(yesterday), now - 86_400 * 1_000_000_000);
        assert_eq!(c.from_unix(0), 0);
    }
}
