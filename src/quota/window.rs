//! Exact sliding windows over a log of admission times.
//!
//! A [`Window`] says "at most `limit` calls in any interval of length `per`".
//! An [`AdmissionLog`] holds the times of a key's recent admissions, oldest
//! first, as nanoseconds on the limiter's clock. It decides nothing by itself
//! and never reads a clock: every method takes `now`, so the maths is tested
//! under a controlled clock.
//!
//! # Guarantee
//!
//! Let `a_1 ≤ a_2 ≤ …` be the admissions recorded in a log, and let a window
//! be `(N, W)` with guard `g`. [`AdmissionLog::next_free`] never returns a
//! time earlier than `a_{i} + W + g` for the admission that would become
//! `a_{i+N}`, so every admission is at least `W + g` after the one `N` places
//! before it. Hence:
//!
//! * no interval of length `W` (open or half-open) contains more than `N`
//!   admissions, for every window of the policy at once;
//! * if each call reaches the upstream after a delay `d_i` with
//!   `d_min ≤ d_i ≤ d_min + g`, its arrival times also keep `N` per any `W`,
//!   because `(a_{i+N} + d_{i+N}) − (a_i + d_i) ≥ W + g − g = W`.
//!
//! An entry is stamped with the moment its call leaves for the upstream,
//! not the moment it was admitted, when the two differ: between them the
//! gateway may read the request's body or commit the admission to the state
//! file. [`AdmissionLog::restamp`] moves the entry then, so `d_i` is only the
//! trip to the upstream. Moving an entry later only delays the admissions
//! after it; the spacing above still holds as long as every call leaves
//! within `W + g` of its admission (an admission decided meanwhile sees the
//! entry at its admission time, which it could only have counted as free
//! `W + g` after it). A call that has not left within its shortest `W` is
//! refunded and admitted again (`Limiter::outlived`), so every call that
//! leaves does so within `W + g` of the admission it leaves under. The
//! Redis store moves its members the same way, and the state file its rows
//! ([`crate::store::Store::released`]).
//!
//! The bound is also tight: `next_free` is the earliest time at which one more
//! admission keeps the property, so no capacity is left unused beyond the
//! guard (a share of `g / (W + g)`).
//!
//! Memory: only the last `max N` entries and only entries younger than
//! `max W + g` can constrain a future admission, so [`AdmissionLog::prune`]
//! keeps at most that many.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::time::Duration;

/// At most `limit` admissions in any interval of length `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub limit: NonZeroU32,
    pub per: Duration,
}

impl Window {
    pub fn new(limit: NonZeroU32, per: Duration) -> Self {
        Window { limit, per }
    }

    fn per_nanos(&self) -> u64 {
        u64::try_from(self.per.as_nanos()).unwrap_or(u64::MAX)
    }
}

/// How long a log must remember admissions for a set of windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    /// Entries older than this (in nanoseconds) can no longer constrain.
    pub horizon: u64,
    /// Only the newest `cap` entries can constrain.
    pub cap: usize,
}

impl Retention {
    pub fn for_windows(windows: &[Window], guard: Duration) -> Self {
        let guard = u64::try_from(guard.as_nanos()).unwrap_or(u64::MAX);
        Retention {
            horizon: windows.iter().map(|w| w.per_nanos().saturating_add(guard)).max().unwrap_or(0),
            cap: windows.iter().map(|w| w.limit.get() as usize).max().unwrap_or(0),
        }
    }

    /// The retention that serves both `self` and `other` (for shared logs).
    pub fn union(self, other: Retention) -> Self {
        Retention { horizon: self.horizon.max(other.horizon), cap: self.cap.max(other.cap) }
    }
}

/// The window that decided a wait, for messages such as "maximum allowed 45 per 00:01:00".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binding {
    pub at: u64,
    pub window: Option<Window>,
}

/// One window's use at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowUse {
    pub window: Window,
    /// Admissions inside the window.
    pub used: u32,
    /// Until the oldest of them stops counting; zero when none counts.
    pub reset: Duration,
}

impl WindowUse {
    pub fn remaining(&self) -> u32 {
        self.window.limit.get().saturating_sub(self.used)
    }
}

/// Admission times of one key, oldest first.
#[derive(Debug, Default, Clone)]
pub struct AdmissionLog {
    times: VecDeque<u64>,
}

impl AdmissionLog {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.times.len()
    }

    pub fn is_empty(&self) -> bool {
        self.times.is_empty()
    }

    /// The recorded admission times, oldest first.
    pub fn times(&self) -> Vec<u64> {
        self.times.iter().copied().collect()
    }

    /// How much of each window is used at `now`, for rate-limit headers and
    /// status: admissions in `(now - per, now]`, and the time until the
    /// oldest of them stops counting (its slot frees, guard included).
    pub fn usage(&self, windows: &[Window], guard: Duration, now: u64) -> Vec<WindowUse> {
        let guard = u64::try_from(guard.as_nanos()).unwrap_or(u64::MAX);
        windows
            .iter()
            .map(|w| {
                let per = w.per_nanos();
                let first = self.times.partition_point(|&t| t.saturating_add(per) <= now);
                let used = self.times.len() - first;
                let reset =
                    self.times.get(first).map_or(0, |&t| t.saturating_add(per).saturating_add(guard) - now);
                WindowUse {
                    window: *w,
                    used: u32::try_from(used).unwrap_or(u32::MAX),
                    reset: Duration::from_nanos(reset),
                }
            })
            .collect()
    }

    /// The earliest time at or after `now` when one more admission keeps every
    /// window within its limit, with the window that decided it.
    pub fn next_free(&self, windows: &[Window], guard: Duration, now: u64) -> Binding {
        next_free_over(&self.times, &[], windows, guard, now)
    }

    /// When the `extra + 1`-th admission from now could go, if `extra`
    /// admissions were made first, each at its own earliest time. This is the
    /// exact grant time of a request with `extra` requests queued ahead of it.
    pub fn projected(&self, extra: usize, windows: &[Window], guard: Duration, now: u64) -> Binding {
        let mut ahead = Vec::with_capacity(extra);
        let mut binding = Binding { at: now, window: None };
        for i in 0..=extra {
            let from = ahead.last().copied().unwrap_or(now);
            binding = next_free_over(&self.times, &ahead, windows, guard, from);
            if i < extra {
                ahead.push(binding.at);
            }
        }
        binding
    }

    /// Record an admission at `at`, keeping no more entries than `retention`
    /// needs. Admissions are recorded in time order; an earlier time is
    /// clamped to the newest entry, which is conservative. The log's memory
    /// grows up to exactly `retention.cap` entries, never past it.
    pub fn record(&mut self, at: u64, retention: Retention) {
        let cap = retention.cap.max(1);
        while self.times.len() >= cap {
            self.times.pop_front();
        }
        if self.times.len() == self.times.capacity() {
            let want = (self.times.capacity() * 2).max(4).min(cap);
            self.times.reserve_exact(want.saturating_sub(self.times.len()));
        }
        let at = self.times.back().map_or(at, |&last| at.max(last));
        self.times.push_back(at);
    }

    /// Take back an admission recorded at `at` whose call never left the
    /// gateway (the upstream refused the connection). Returns whether one
    /// was found. Removing an admission only loosens the windows, so the
    /// guarantee holds for what remains.
    pub fn refund(&mut self, at: u64) -> bool {
        match self.times.iter().rposition(|&t| t == at) {
            Some(i) => {
                self.times.remove(i);
                true
            }
            None => false,
        }
    }

    /// Move the admission recorded at `at` to `now`, when its call leaves
    /// for the upstream (see the module doc). Returns whether one was found.
    /// The log stays in time order: the entry goes after every entry up to
    /// `now`.
    pub fn restamp(&mut self, at: u64, now: u64) -> bool {
        if now <= at {
            return false;
        }
        match self.times.iter().rposition(|&t| t == at) {
            Some(i) => {
                self.times.remove(i);
                let to = self.times.partition_point(|&t| t <= now);
                self.times.insert(to, now);
                true
            }
            None => false,
        }
    }

    /// Forget the entries that can no longer constrain any admission at or after `now`.
    pub fn prune(&mut self, retention: Retention, now: u64) {
        while self.times.len() > retention.cap {
            self.times.pop_front();
        }
        while let Some(&oldest) = self.times.front() {
            if oldest.saturating_add(retention.horizon) <= now {
                self.times.pop_front();
            } else {
                break;
            }
        }
    }

    /// Release the memory of an emptied log.
    pub fn shrink(&mut self) {
        if self.times.is_empty() {
            self.times = VecDeque::new();
        }
    }
}

/// The windows of a policy with a limit the upstream revealed applied: a
/// window of the same length takes the lower limit; a window of another
/// length is added. Never loosens a configured window.
pub fn tightened(windows: &[Window], revealed: Window) -> Vec<Window> {
    let mut out = windows.to_vec();
    match out.iter_mut().find(|w| w.per == revealed.per) {
        Some(w) => w.limit = w.limit.min(revealed.limit),
        None => out.push(revealed),
    }
    out
}

/// `next_free` over the log `times` followed by the hypothetical admissions `ahead`.
fn next_free_over(
    times: &VecDeque<u64>,
    ahead: &[u64],
    windows: &[Window],
    guard: Duration,
    now: u64,
) -> Binding {
    let guard = u64::try_from(guard.as_nanos()).unwrap_or(u64::MAX);
    let len = times.len() + ahead.len();
    let nth_from_end = |n: usize| -> u64 {
        let i = len - n;
        if i < times.len() {
            times[i]
        } else {
            ahead[i - times.len()]
        }
    };
    let mut binding = Binding { at: now, window: None };
    for w in windows {
        let n = w.limit.get() as usize;
        if len >= n {
            let free = nth_from_end(n).saturating_add(w.per_nanos()).saturating_add(guard);
            if free > binding.at {
                binding = Binding { at: free, window: Some(*w) };
            }
        }
    }
    binding
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MS: u64 = 1_000_000;
    const ALL: Retention = Retention { horizon: u64::MAX, cap: usize::MAX };

    fn w(limit: u32, per_ms: u64) -> Window {
        Window::new(NonZeroU32::new(limit).unwrap(), Duration::from_millis(per_ms))
    }

    /// Most admissions in any half-open interval `[s, s + per)`.
    fn max_in_any(times: &[u64], per: u64) -> usize {
        let mut best = 0;
        let mut lo = 0;
        for hi in 0..times.len() {
            while times[hi] - times[lo] >= per {
                lo += 1;
            }
            best = best.max(hi - lo + 1);
        }
        best
    }

    #[test]
    fn a_restamped_entry_moves_to_its_place_in_time_order() {
        let mut log = AdmissionLog::default();
        let retention = Retention { horizon: u64::MAX, cap: 10 };
        for at in [1, 2, 3, 5] {
            log.record(at, retention);
        }
        assert!(log.restamp(2, 4));
        assert_eq!(log.times, [1, 3, 4, 5]);
        assert!(log.restamp(1, 7), "past every other entry");
        assert_eq!(log.times, [3, 4, 5, 7]);
        assert!(!log.restamp(6, 8), "no entry at 6");
        assert!(!log.restamp(7, 7), "not later: unchanged");
        assert_eq!(log.times, [3, 4, 5, 7]);
    }

    #[test]
    fn admits_up_to_the_limit_then_waits_for_the_oldest_to_leave() {
        let windows = [w(3, 1000)];
        let guard = Duration::from_millis(10);
        let mut log = AdmissionLog::new();
        for t in [0, 100 * MS, 200 * MS] {
            assert_eq!(log.next_free(&windows, guard, t).at, t);
            log.record(t, ALL);
        }
        let b = log.next_free(&windows, guard, 300 * MS);
        assert_eq!(b.at, 1010 * MS);
        assert_eq!(b.window, Some(windows[0]));
    }

    #[test]
    fn every_window_applies_at_once() {
        let windows = [w(2, 100), w(3, 1000)];
        let guard = Duration::ZERO;
        let mut log = AdmissionLog::new();
        let mut t = 0;
        let mut grants = vec![];
        for _ in 0..5 {
            t = log.next_free(&windows, guard, t).at;
            log.record(t, ALL);
            grants.push(t / MS);
        }
        assert_eq!(grants, vec![0, 0, 100, 1000, 1000]);
    }

    #[test]
    fn projected_matches_admitting_one_by_one() {
        let windows = [w(2, 100), w(5, 1000)];
        let guard = Duration::from_millis(1);
        let mut log = AdmissionLog::new();
        log.record(0, ALL);
        let projected = log.projected(6, &windows, guard, 5 * MS).at;
        let mut t = 5 * MS;
        for _ in 0..7 {
            t = log.next_free(&windows, guard, t).at;
            log.record(t, ALL);
        }
        assert_eq!(projected, t);
    }

    #[test]
    fn prune_keeps_what_constrains_and_frees_the_rest() {
        let windows = [w(2, 100), w(3, 1000)];
        let guard = Duration::from_millis(5);
        let retention = Retention::for_windows(&windows, guard);
        assert_eq!(retention, Retention { horizon: 1005 * MS, cap: 3 });
        let mut log = AdmissionLog::new();
        for t in 0..10 {
            log.record(t * MS, ALL);
        }
        log.prune(retention, 10 * MS);
        assert_eq!(log.len(), 3);
        log.record(10 * MS, retention);
        assert_eq!(log.len(), 3, "recording keeps only what constrains");
        log.times.pop_back();
        log.prune(retention, 1013 * MS);
        assert_eq!(log.len(), 1);
        log.prune(retention, 1014 * MS);
        assert!(log.is_empty());
    }

    #[test]
    fn a_full_log_holds_exactly_its_cap() {
        let retention = Retention { horizon: u64::MAX, cap: 1500 };
        let mut log = AdmissionLog::new();
        for t in 0..5000 {
            log.record(t, retention);
        }
        assert_eq!(log.len(), 1500);
        assert!(log.times.capacity() < 1600, "capacity {}", log.times.capacity());
    }

    #[test]
    fn a_refund_frees_the_slot_it_held() {
        let windows = [w(2, 1000)];
        let mut log = AdmissionLog::new();
        log.record(0, ALL);
        log.record(10 * MS, ALL);
        assert_eq!(log.next_free(&windows, Duration::ZERO, 20 * MS).at, 1000 * MS);
        assert!(log.refund(10 * MS));
        assert!(!log.refund(10 * MS), "refunded once only");
        assert_eq!(log.next_free(&windows, Duration::ZERO, 20 * MS).at, 20 * MS);
    }

    #[test]
    fn a_revealed_limit_only_ever_tightens() {
        let configured = [w(45, 60_000), w(1500, 3_600_000)];
        assert_eq!(tightened(&configured, w(30, 60_000)), vec![w(30, 60_000), w(1500, 3_600_000)]);
        assert_eq!(tightened(&configured, w(50, 60_000)), configured.to_vec());
        assert_eq!(tightened(&configured, w(5, 1000)), vec![w(45, 60_000), w(1500, 3_600_000), w(5, 1000)]);
    }

    #[test]
    fn usage_reports_each_window() {
        let windows = [w(3, 1000), w(10, 10_000)];
        let mut log = AdmissionLog::new();
        for t in [0, 500 * MS, 900 * MS] {
            log.record(t, ALL);
        }
        let u = log.usage(&windows, Duration::from_millis(5), 1200 * MS);
        assert_eq!((u[0].used, u[0].remaining(), u[0].reset), (2, 1, Duration::from_millis(305)));
        assert_eq!((u[1].used, u[1].remaining(), u[1].reset), (3, 7, Duration::from_millis(8805)));
        let empty = AdmissionLog::new().usage(&windows, Duration::ZERO, 0);
        assert_eq!((empty[0].used, empty[0].reset), (0, Duration::ZERO));
    }

    #[test]
    fn used_counts_the_half_open_window() {
        let mut log = AdmissionLog::new();
        for t in [0, 500 * MS, 999 * MS, 1000 * MS] {
            log.record(t, ALL);
        }
        let used = |now| log.usage(&[w(10, 1000)], Duration::ZERO, now)[0].used;
        assert_eq!(used(1000 * MS), 3);
        assert_eq!(used(1500 * MS), 2);
    }

    proptest! {
        /// Requests arrive at arbitrary times; each is admitted at its own
        /// earliest time (queue mode). Whatever the arrivals, no interval of any
        /// window's length holds more than its limit, even after each call is
        /// delayed by any jitter up to the guard.
        #[test]
        fn never_more_than_n_in_any_interval(
            gaps in prop::collection::vec(0u64..400, 1..300),
            jitter in prop::collection::vec(0u64..=20, 300),
            limits in prop::collection::vec((1u32..8, 50u64..900), 1..4),
            prune_every in 1usize..20,
        ) {
            let windows: Vec<Window> = limits.iter().map(|&(n, p)| w(n, p)).collect();
            let guard = Duration::from_millis(20);
            let retention = Retention::for_windows(&windows, guard);
            let mut log = AdmissionLog::new();
            let mut now = 0;
            let mut admitted = vec![];
            for (i, gap) in gaps.iter().enumerate() {
                now = now.max(admitted.last().copied().unwrap_or(0)) + gap * MS;
                if i % prune_every == 0 {
                    log.prune(retention, now);
                }
                let at = log.next_free(&windows, guard, now).at;
                prop_assert!(at >= now);
                log.record(at, retention);
                admitted.push(at);
            }
            let arrivals: Vec<u64> = {
                let mut a: Vec<u64> = admitted.iter().zip(&jitter).map(|(t, j)| t + j * MS).collect();
                a.sort_unstable();
                a
            };
            for win in &windows {
                let per = win.per.as_nanos() as u64;
                prop_assert!(max_in_any(&admitted, per) <= win.limit.get() as usize);
                prop_assert!(max_in_any(&arrivals, per) <= win.limit.get() as usize);
            }
        }

        /// The grant is the earliest possible one: admitting one nanosecond
        /// sooner would put limit + 1 admissions within some window plus guard.
        #[test]
        fn next_free_wastes_nothing(
            gaps in prop::collection::vec(0u64..300, 1..100),
            limits in prop::collection::vec((1u32..6, 50u64..500), 1..3),
        ) {
            let windows: Vec<Window> = limits.iter().map(|&(n, p)| w(n, p)).collect();
            let guard = Duration::from_millis(3);
            let mut log = AdmissionLog::new();
            let mut now = 0;
            for gap in gaps {
                now += gap * MS;
                let b = log.next_free(&windows, guard, now);
                if b.at > now {
                    let win = b.window.expect("a wait names its window");
                    let n = win.limit.get() as usize;
                    let earlier = b.at - 1;
                    let span = win.per.as_nanos() as u64 + guard.as_nanos() as u64;
                    let inside = log.times.iter().filter(|&&t| t + span > earlier).count();
                    prop_assert!(inside >= n);
                }
                log.record(b.at, ALL);
                now = b.at;
            }
        }
    }
}
