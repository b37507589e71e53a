//! Admit a request now, let it wait for the exact moment a slot frees, or
//! reject it with the exact time until one would.
//!
//! Each [`QuotaKey`] has an [`AdmissionLog`] and a FIFO queue under one
//! mutex (never held across an await). A request is admitted at once only
//! when nobody is queued ahead of it and every window has room. Otherwise its
//! grant time is projected exactly from the log and the waiters ahead
//! ([`AdmissionLog::projected`]); if that lies within its maximum wait and the
//! queue has room it waits, else it is rejected with that time as its
//! `Retry-After`.
//!
//! Only the head of a queue sleeps, on a timer set to the moment its slot
//! frees; the others sleep until they become the head. Nothing polls.
//! Keys whose logs have emptied are dropped by [`Limiter::sweep`].

mod place;
pub mod rejection;
pub mod runtime;

use std::borrow::Cow;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use dashmap::DashMap;
use prometheus::IntGauge;
use tokio::sync::Notify;

pub use rejection::{Reason, Rejection};

use crate::policy::{Mode, Policies, Policy};
use crate::quota::{tightened, AdmissionLog, Clock, QuotaKey, Retention, Window, WindowUse};
use place::Place;

/// How far past its maximum wait a waiter whose slot was promised in time
/// still holds on, to absorb timer lateness.
const TIMER_SLACK: Duration = Duration::from_millis(50);

struct Waiter {
    id: u64,
    wake: Arc<Notify>,
}

#[derive(Default)]
pub(crate) struct KeyState {
    log: AdmissionLog,
    retention: Retention,
    queue: VecDeque<Waiter>,
    next_id: u64,
    /// No admission before this time: the upstream asked the key to pause.
    hold_until: u64,
    /// A lower limit the upstream revealed for this key.
    revealed: Option<Window>,
    /// The policy of the latest call on this key (for status reports).
    policy: u16,
}

impl KeyState {
    /// The policy's windows, tightened by what the upstream revealed.
    fn windows<'a>(&self, policy: &'a Policy) -> Cow<'a, [Window]> {
        match self.revealed {
            Some(r) => Cow::Owned(tightened(&policy.windows, r)),
            None => Cow::Borrowed(&policy.windows),
        }
    }
}

/// One key's state at a moment.
#[derive(Debug, Clone)]
pub struct KeyStatus {
    pub key: QuotaKey,
    /// The policy of the latest call on the key.
    pub policy: String,
    pub windows: Vec<WindowUse>,
    pub queued: usize,
    /// Time left on an upstream hold.
    pub held_for: Option<Duration>,
}

/// An admitted call: how long it waited, each window's use after it, and
/// its place in the key's log (for a refund).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub waited: Duration,
    pub usage: Vec<WindowUse>,
    at: u64,
    /// The shared store's name for the admission (Redis), 0 when local.
    ticket: u64,
}

impl Admitted {
    /// A call admitted at clock reading `at` by a shared store, which knows
    /// it as `ticket`.
    pub fn shared(at: u64, ticket: u64, waited: Duration, usage: Vec<WindowUse>) -> Self {
        Admitted { waited, usage, at, ticket }
    }

    /// The shared store's name for the admission; 0 when it was decided locally.
    pub fn ticket(&self) -> u64 {
        self.ticket
    }

    /// The clock reading of the admission.
    pub fn at(&self) -> u64 {
        self.at
    }
}

#[derive(Default)]
pub(crate) struct KeyCell(Mutex<KeyState>);

impl KeyCell {
    fn lock(&self) -> MutexGuard<'_, KeyState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Every key's admissions and waiters.
pub struct Limiter {
    keys: DashMap<QuotaKey, Arc<KeyCell>>,
    clock: Clock,
    guard: Duration,
}

impl Limiter {
    pub fn new(guard: Duration) -> Self {
        Self::with_clock(guard, Clock::default())
    }

    /// A limiter on a given clock (the gateway shares one with the store).
    pub fn with_clock(guard: Duration, clock: Clock) -> Self {
        Limiter { keys: DashMap::new(), clock, guard }
    }

    /// The clock admission times are read on.
    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Put back what a durable store remembered for `key` under `policy`:
    /// its admissions (clock readings, any order), an upstream hold and a
    /// revealed limit. Restoring only adds constraints, never loosens one.
    pub fn restore(
        &self,
        key: &QuotaKey,
        policy: &Policy,
        times: &[u64],
        hold_until: u64,
        revealed: Option<Window>,
    ) {
        let cell = self.cell(key);
        let mut st = cell.lock();
        st.policy = policy.id;
        if let Some(r) = revealed {
            st.revealed = Some(match st.revealed {
                Some(old) if old.per == r.per => Window::new(old.limit.min(r.limit), r.per),
                _ => r,
            });
        }
        let windows = st.windows(policy);
        st.retention = st.retention.union(Retention::for_windows(&windows, self.guard));
        let retention = st.retention;
        let mut times = times.to_vec();
        times.sort_unstable();
        for t in times {
            st.log.record(t, retention);
        }
        st.log.prune(retention, self.clock.now());
        st.hold_until = st.hold_until.max(hold_until);
    }

    /// Record an admission that a shared store made at clock reading `at`.
    pub fn record(&self, key: &QuotaKey, policy: &Policy, at: u64) {
        let cell = self.cell(key);
        let mut st = cell.lock();
        st.policy = policy.id;
        let windows = st.windows(policy);
        st.retention = st.retention.union(Retention::for_windows(&windows, self.guard));
        let retention = st.retention;
        st.log.prune(retention, at);
        st.log.record(at, retention);
    }

    /// When `key`'s upstream hold ends, as a clock reading (0 when none).
    pub fn hold_until(&self, key: &QuotaKey) -> u64 {
        self.keys.get(key).map_or(0, |c| c.lock().hold_until)
    }

    /// Every key's policy and admission times (for a store catching up).
    pub fn all_admissions(&self) -> Vec<(QuotaKey, u16, Vec<u64>)> {
        self.keys
            .iter()
            .filter_map(|e| {
                let st = e.value().lock();
                (!st.log.is_empty()).then(|| (e.key().clone(), st.policy, st.log.times()))
            })
            .collect()
    }

    /// The admission times of `key` still held (for tests and the store).
    pub fn admissions(&self, key: &QuotaKey) -> Vec<u64> {
        self.keys.get(key).map_or_else(Vec::new, |c| c.lock().log.times())
    }

    fn cell(&self, key: &QuotaKey) -> Arc<KeyCell> {
        if let Some(cell) = self.keys.get(key) {
            return cell.clone();
        }
        self.keys.entry(key.clone()).or_default().clone()
    }

    /// Admit a call for `key` under `policy`, waiting at most `max_wait`.
    /// `depth` counts this policy's waiters.
    pub async fn acquire(
        &self,
        key: &QuotaKey,
        policy: &Policy,
        max_wait: Duration,
        depth: &IntGauge,
    ) -> Result<Admitted, Rejection> {
        let cell = self.cell(key);
        let start = self.clock.now();
        let (id, wake) = {
            let mut st = cell.lock();
            st.policy = policy.id;
            let windows = st.windows(policy);
            st.retention = st.retention.union(Retention::for_windows(&windows, self.guard));
            let retention = st.retention;
            st.log.prune(retention, start);
            let from = start.max(st.hold_until);
            if st.queue.is_empty() && st.log.next_free(&windows, self.guard, from).at <= start {
                st.log.record(start, retention);
                let usage = st.log.usage(&windows, self.guard, start);
                return Ok(Admitted { waited: Duration::ZERO, at: start, usage, ticket: 0 });
            }
            let grant = st.log.projected(st.queue.len(), &windows, self.guard, from);
            let wait = Duration::from_nanos(grant.at - start);
            let reason = if policy.mode == Mode::Reject {
                Some(Reason::NoSlot)
            } else if st.queue.len() >= policy.max_queue {
                Some(Reason::QueueFull)
            } else if wait > max_wait {
                Some(Reason::WaitTooLong)
            } else {
                None
            };
            if let Some(reason) = reason {
                let usage = st.log.usage(&windows, self.guard, start);
                return Err(Rejection { reason, retry_after: wait, window: grant.window, usage });
            }
            st.next_id += 1;
            let id = st.next_id;
            let wake = Arc::new(Notify::new());
            st.queue.push_back(Waiter { id, wake: wake.clone() });
            (id, wake)
        };
        depth.inc();
        let mut place = Place { cell: cell.clone(), id, depth: depth.clone(), queued: true };
        let deadline = start + u64::try_from((max_wait + TIMER_SLACK).as_nanos()).unwrap_or(u64::MAX);
        loop {
            let now = self.clock.now();
            let slot = {
                let mut st = cell.lock();
                let position = st.queue.iter().position(|w| w.id == id).unwrap_or(0);
                let retention = st.retention;
                st.log.prune(retention, now);
                let windows = st.windows(policy);
                let grant = st.log.projected(position, &windows, self.guard, now.max(st.hold_until));
                if position == 0 && grant.at <= now {
                    st.log.record(now, retention);
                    st.queue.pop_front();
                    if let Some(next) = st.queue.front() {
                        next.wake.notify_one();
                    }
                    place.queued = false;
                    let usage = st.log.usage(&windows, self.guard, now);
                    return Ok(Admitted {
                        waited: Duration::from_nanos(now - start),
                        at: now,
                        usage,
                        ticket: 0,
                    });
                }
                if now >= deadline {
                    return Err(Rejection {
                        reason: Reason::Expired,
                        retry_after: Duration::from_nanos(grant.at - now),
                        window: grant.window,
                        usage: st.log.usage(&windows, self.guard, now),
                    });
                }
                (position == 0).then_some(grant.at)
            };
            let until = self.clock.instant(slot.map_or(deadline, |at| at.min(deadline)));
            tokio::select! {
                _ = tokio::time::sleep_until(until) => {}
                _ = wake.notified() => {}
            }
        }
    }

    /// Admit nothing for `key` until `wait` from now has passed, because the
    /// upstream said so. Waiters stay queued and go when the hold ends; new
    /// requests queue or are rejected with the exact remaining time. A
    /// shorter hold never shortens a longer one.
    pub fn hold(&self, key: &QuotaKey, wait: Duration) {
        let until = self.clock.now().saturating_add(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX));
        let cell = self.cell(key);
        let mut st = cell.lock();
        st.hold_until = st.hold_until.max(until);
        // The head may be asleep until an earlier moment: let it recompute.
        if let Some(head) = st.queue.front() {
            head.wake.notify_one();
        }
    }

    /// Take back an admission whose call never reached the upstream.
    pub fn refund(&self, key: &QuotaKey, admitted: &Admitted) {
        let Some(cell) = self.keys.get(key).map(|c| c.clone()) else { return };
        let mut st = cell.lock();
        if st.log.refund(admitted.at) {
            if let Some(head) = st.queue.front() {
                head.wake.notify_one();
            }
        }
    }

    /// Apply a limit the upstream revealed (lower than configured) to `key`
    /// from now on. Returns whether it tightened anything.
    pub fn reveal(&self, key: &QuotaKey, policy: &Policy, window: Window) -> bool {
        let cell = self.cell(key);
        let mut st = cell.lock();
        let before = st.windows(policy).into_owned();
        let revealed = match st.revealed {
            Some(r) if r.per == window.per => Window::new(r.limit.min(window.limit), r.per),
            _ => window,
        };
        if tightened(&before, revealed) == before {
            return false;
        }
        st.revealed = Some(revealed);
        st.retention = st.retention.union(Retention::for_windows(&[revealed], self.guard));
        true
    }

    /// Time left on `key`'s upstream hold, if any.
    pub fn held_for(&self, key: &QuotaKey) -> Option<Duration> {
        let cell = self.keys.get(key)?.clone();
        let until = cell.lock().hold_until;
        let now = self.clock.now();
        (until > now).then(|| Duration::from_nanos(until - now))
    }

    /// Every key's state now, for status and metrics; keys in sorted order.
    pub fn snapshot(&self, policies: &Policies) -> Vec<KeyStatus> {
        let now = self.clock.now();
        let mut out: Vec<KeyStatus> = self
            .keys
            .iter()
            .filter_map(|entry| {
                let st = entry.value().lock();
                let policy = policies.0.get(usize::from(st.policy))?;
                Some(KeyStatus {
                    key: entry.key().clone(),
                    policy: policy.name.clone(),
                    windows: st.log.usage(&st.windows(policy), self.guard, now),
                    queued: st.queue.len(),
                    held_for: (st.hold_until > now).then(|| Duration::from_nanos(st.hold_until - now)),
                })
            })
            .collect();
        out.sort_by(|a, b| {
            (&a.key.tenant, &a.policy, &a.key.app).cmp(&(&b.key.tenant, &b.policy, &b.key.app))
        });
        out
    }

    /// Drop keys whose windows have emptied and that nobody waits on.
    /// Returns how many keys remain.
    pub fn sweep(&self) -> usize {
        let now = self.clock.now();
        self.keys.retain(|_, cell| {
            if Arc::strong_count(cell) > 1 {
                return true;
            }
            let Ok(mut st) = cell.0.try_lock() else { return true };
            let retention = st.retention;
            st.log.prune(retention, now);
            st.log.shrink();
            !(st.log.is_empty() && st.queue.is_empty() && st.hold_until <= now)
        });
        self.keys.len()
    }

    /// Number of keys held in memory.
    pub fn keys(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests;
