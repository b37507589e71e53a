//! The runaway-loop guard: one governor limiter per client that has one,
//! checked before a request reaches any quota queue.
//!
//! It protects the queues from a client stuck in a loop, not the upstream
//! (the exact windows do that), so governor's approximate GCRA is right
//! here. A refused request learns exactly when the next one would pass.

use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::identity::client::{Client, GuardSpec};

/// Every client's guard, by client index.
pub struct Guards {
    limiters: Vec<Option<DefaultDirectRateLimiter>>,
    clock: DefaultClock,
}

impl Guards {
    pub fn new(clients: &[Client]) -> Self {
        let limiters = clients.iter().map(|c| c.guard.map(|g| RateLimiter::direct(quota(g)))).collect();
        Guards { limiters, clock: DefaultClock::default() }
    }

    /// Let a request of client `index` pass, or say how long until one would.
    pub fn check(&self, index: u16) -> Result<(), Duration> {
        let Some(Some(limiter)) = self.limiters.get(usize::from(index)) else { return Ok(()) };
        limiter.check().map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

fn quota(g: GuardSpec) -> Quota {
    Quota::per_second(g.per_second).allow_burst(g.burst)
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;
    use crate::admission::Share;

    #[test]
    fn a_flood_is_cut_after_the_burst_and_told_when_to_return() {
        let n = |v| NonZeroU32::new(v).unwrap();
        let client = |guard| Client {
            name: "c".into(),
            key_sha256: None,
            app_id: None,
            share: Share::default(),
            guard,
        };
        let guards = Guards::new(&[client(Some(GuardSpec { per_second: n(2), burst: n(3) })), client(None)]);
        for _ in 0..3 {
            assert!(guards.check(0).is_ok());
        }
        let wait = guards.check(0).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(500), "{wait:?}");
        for _ in 0..100 {
            assert!(guards.check(1).is_ok(), "a client without a guard is never cut");
        }
    }
}
