//! Why a request was not admitted, and when it could be.

use std::time::Duration;

use crate::quota::{Window, WindowUse};

/// The reason a request was turned away locally.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The policy rejects instead of queueing, and no slot is free.
    NoSlot,
    /// The key's queue is full.
    QueueFull,
    /// The slot this request would get is further away than its maximum wait.
    WaitTooLong,
    /// The request waited its whole maximum wait without getting a slot.
    Expired,
    /// The gateway is stopping and the request's slot comes after its drain time.
    Draining,
}

/// Whether the gateway is draining, and until when (on the limiter's clock).
#[derive(Debug, Default)]
pub(crate) struct Drain {
    until: std::sync::atomic::AtomicU64,
    /// Told when the drain starts, for waiters that sleep outside a limiter's queue.
    started: tokio::sync::Notify,
}

impl Drain {
    /// Drain until `within` after `now`.
    pub fn start(&self, now: u64, within: Duration) {
        let until = now.saturating_add(u64::try_from(within.as_nanos()).unwrap_or(u64::MAX)).max(1);
        self.until.store(until, std::sync::atomic::Ordering::Relaxed);
        self.started.notify_waiters();
    }

    pub fn on(&self) -> bool {
        self.until.load(std::sync::atomic::Ordering::Relaxed) != 0
    }

    /// Whether a slot at `at` comes after the drain ends.
    pub fn past(&self, at: u64) -> bool {
        let until = self.until.load(std::sync::atomic::Ordering::Relaxed);
        until != 0 && at > until
    }

    /// Resolves when the drain starts; take it before reading [`Drain::on`],
    /// so a start between the two is not missed.
    pub fn started(&self) -> std::pin::Pin<Box<tokio::sync::futures::Notified<'_>>> {
        let mut notified = Box::pin(self.started.notified());
        notified.as_mut().enable();
        notified
    }
}

/// A local rejection with the exact time until a slot would be free for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: Reason,
    /// Exact time until this request could be admitted.
    pub retry_after: Duration,
    /// The window that is full, when one is.
    pub window: Option<Window>,
    /// The wait is the client's cap, not the key's quota; `window` is the cap's.
    pub capped: bool,
    /// Each window's use when the request was turned away.
    pub usage: Vec<WindowUse>,
}

/// A wait as `Retry-After` states it: whole seconds, rounded up, at least 1,
/// so a client that waits this long finds its slot free.
pub fn whole_seconds(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let r = |ms| whole_seconds(Duration::from_millis(ms));
        assert_eq!(r(1), 1);
        assert_eq!(r(1000), 1);
        assert_eq!(r(1001), 2);
        assert_eq!(r(0), 1);
    }
}
