//! Exact sliding budgets of running time.
//!
//! A [`Budget`] says "at most `limit` of query running time in any interval
//! of length `per`" (10 minutes per hour, 4 hours per day). Running time is
//! known only after a query has run, so the [`Ledger`] of one key holds two
//! things:
//!
//! * **charges**: the metered cost of each finished query, at the moment the
//!   gateway learnt it (`end`). A charge counts against a budget until
//!   `end + per + guard`.
//! * **reservations**: an estimate for every query in flight, counted from its
//!   admission until it is replaced by its charge or released.
//!
//! Like [`super::AdmissionLog`], the ledger never reads a clock: every method
//! takes `now` (nanoseconds), so the maths is tested under a controlled clock.
//!
//! # Guarantee
//!
//! A query is admitted at `t` only when, for every budget `(B, W)`,
//! `charges counted at t + reservations + its estimate ≤ B` ([`Ledger::fit`]).
//!
//! Suppose each query's true cost is at most its reservation, and the
//! upstream charges it at some moment between its admission and the moment
//! the gateway meters it (plus the guard). Take any interval `I = [x, x + W)`
//! and the queries the upstream charges inside it; let `k` be the one
//! admitted last, at `t_k < x + W`. Every other such query `j` was admitted
//! before `t_k`; at `t_k` it was either in flight (its reservation counted)
//! or metered at `end_j ≥ x`, so its charge still counted because
//! `end_j + W + guard > x + W > t_k`. Hence everything the upstream charges in
//! `I` was counted when `k` was admitted, and the sum is at most `B`: **no
//! interval of length `W` holds more than `B` of running time**, for every
//! budget at once.
//!
//! A query that runs longer than its reservation can carry the tenant past a
//! budget by the difference; nobody can prevent that, because the service
//! charges after the query ran. The ledger then records the true cost and
//! admits nothing more until the window has drained back under the budget,
//! so the next query never reaches an exhausted tenant. Estimates are learnt
//! from a high percentile of recent costs to keep such overruns rare.
//!
//! The bound is tight: [`Ledger::fit`] returns the earliest moment at which
//! the charges still counted leave room for the estimate, so no running time
//! is left unused beyond the guard, except while reservations stand for
//! costs not yet known, and the room smaller than the next query's estimate:
//! a query whose cost nobody knows cannot safely have it, so up to one
//! estimate of the budget may stand free while a query waits (measured in
//! `docs/benchmarks.md`). When reservations alone leave no room, only a
//! completion can free it: the ledger cannot say when ([`Fit::Unknown`]).

use std::collections::VecDeque;
use std::time::Duration;

/// At most `limit` of running time in any interval of length `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    pub limit: Duration,
    pub per: Duration,
}

impl Budget {
    fn limit_nanos(&self) -> u64 {
        nanos(self.limit)
    }

    fn per_nanos(&self) -> u64 {
        nanos(self.per)
    }
}

/// The longest window of `budgets` (zero for none).
pub fn longest(budgets: &[Budget]) -> Duration {
    budgets.iter().map(|b| b.per).max().unwrap_or_default()
}

pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The charges' total, saturating: a cost the service reports is trusted,
/// however absurd, and two near `u64::MAX` nanoseconds must not wrap to
/// room in the budget.
fn sum<'c>(charges: impl Iterator<Item = &'c Charge>) -> u64 {
    charges.fold(0, |total, c| total.saturating_add(c.cost))
}

/// When a query of a given estimate fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// It fits now.
    Now,
    /// It fits at this time, if nothing else changes; the budget that decides.
    At(u64, Budget),
    /// Queries in flight hold the room it needs: only a completion frees it.
    Unknown(Budget),
}

/// One budget's use at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetUse {
    pub budget: Budget,
    /// Metered running time counted in the window now.
    pub charged: Duration,
    /// Estimates of queries in flight.
    pub reserved: Duration,
    /// Until the oldest counted charge stops counting; zero when none counts.
    pub reset: Duration,
}

impl BudgetUse {
    /// What the budget still allows now.
    pub fn remaining(&self) -> Duration {
        self.budget.limit.saturating_sub(self.charged + self.reserved)
    }
}

#[derive(Debug, Clone, Copy)]
struct Charge {
    end: u64,
    cost: u64,
}

/// One key's charges and reservations.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    /// Oldest first, by `end`.
    charges: VecDeque<Charge>,
    /// In-flight queries: id and estimate.
    reservations: Vec<(u64, u64)>,
    reserved: u64,
    next_id: u64,
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Queries in flight.
    pub fn in_flight(&self) -> usize {
        self.reservations.len()
    }

    /// The charges still held: `(end, cost)` in clock readings and
    /// nanoseconds, oldest first.
    pub fn charges(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.charges.iter().map(|c| (c.end, c.cost))
    }

    /// Whether nothing is charged or reserved.
    pub fn is_empty(&self) -> bool {
        self.charges.is_empty() && self.reservations.is_empty()
    }

    /// When a query with `estimate` fits every budget, at or after `now`.
    pub fn fit(&self, budgets: &[Budget], guard: Duration, estimate: Duration, now: u64) -> Fit {
        let guard = nanos(guard);
        let estimate = nanos(estimate);
        let mut at = now;
        let mut decided = None;
        for b in budgets {
            let room = b.limit_nanos().checked_sub(self.reserved.saturating_add(estimate));
            let Some(room) = room else { return Fit::Unknown(*b) };
            let expiry = |c: &Charge| c.end.saturating_add(b.per_nanos()).saturating_add(guard);
            let first = self.charges.partition_point(|c| expiry(c) <= now);
            let mut live = sum(self.charges.iter().skip(first));
            for c in self.charges.iter().skip(first) {
                if live <= room {
                    break;
                }
                live = live.saturating_sub(c.cost);
                if expiry(c) > at {
                    at = expiry(c);
                    decided = Some(*b);
                }
            }
        }
        match decided {
            Some(b) if at > now => Fit::At(at, b),
            _ => Fit::Now,
        }
    }

    /// Reserve `estimate` for a query admitted now; returns its id.
    pub fn reserve(&mut self, estimate: Duration) -> u64 {
        self.next_id += 1;
        let e = nanos(estimate);
        self.reservations.push((self.next_id, e));
        self.reserved = self.reserved.saturating_add(e);
        self.next_id
    }

    /// Replace reservation `id` by its metered `cost`, learnt at `end`.
    /// Returns false when there was no such reservation.
    pub fn settle(&mut self, id: u64, cost: Duration, end: u64) -> bool {
        if !self.release(id) {
            return false;
        }
        self.charge(cost, end);
        true
    }

    /// Record a metered `cost` learnt at `end` that no reservation stood for
    /// (a charge restored from a durable store).
    pub fn charge(&mut self, cost: Duration, end: u64) {
        let cost = nanos(cost);
        if cost > 0 {
            // Ends arrive nearly in order: search from the back.
            let pos = self.charges.iter().rposition(|c| c.end <= end).map_or(0, |p| p + 1);
            self.charges.insert(pos, Charge { end, cost });
        }
    }

    /// Drop reservation `id` without a charge. Returns false when there was none.
    pub fn release(&mut self, id: u64) -> bool {
        let Some(pos) = self.reservations.iter().position(|&(r, _)| r == id) else { return false };
        let (_, e) = self.reservations.swap_remove(pos);
        self.reserved = self.reserved.saturating_sub(e);
        true
    }

    /// Forget charges that no budget counts any more: those that ended
    /// `keep` (the longest budget any user of this ledger has, plus the
    /// guard) or longer ago.
    pub fn prune(&mut self, keep: Duration, now: u64) {
        let horizon = nanos(keep);
        while self.charges.front().is_some_and(|c| c.end.saturating_add(horizon) <= now) {
            self.charges.pop_front();
        }
    }

    /// Each budget's use at `now`.
    pub fn usage(&self, budgets: &[Budget], guard: Duration, now: u64) -> Vec<BudgetUse> {
        let guard = nanos(guard);
        budgets
            .iter()
            .map(|b| {
                let expiry = |c: &Charge| c.end.saturating_add(b.per_nanos()).saturating_add(guard);
                let first = self.charges.partition_point(|c| expiry(c) <= now);
                let charged = sum(self.charges.iter().skip(first));
                let reset = self.charges.get(first).map_or(0, |c| expiry(c) - now);
                BudgetUse {
                    budget: *b,
                    charged: Duration::from_nanos(charged),
                    reserved: Duration::from_nanos(self.reserved),
                    reset: Duration::from_nanos(reset),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const S: u64 = 1_000_000_000;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn hour() -> Vec<Budget> {
        vec![Budget { limit: secs(600), per: secs(3600) }]
    }

    #[test]
    fn an_empty_ledger_admits_up_to_the_budget() {
        let l = Ledger::new();
        assert_eq!(l.fit(&hour(), Duration::ZERO, secs(600), 0), Fit::Now);
        assert_eq!(l.fit(&hour(), Duration::ZERO, secs(601), 0), Fit::Unknown(hour()[0]));
    }

    #[test]
    fn the_wait_is_until_enough_running_time_has_left_the_window() {
        let b = hour();
        let mut l = Ledger::new();
        let a = l.reserve(secs(10));
        assert!(l.settle(a, secs(400), 100 * S));
        let c = l.reserve(secs(10));
        assert!(l.settle(c, secs(150), 200 * S));
        // 550 s counted: a 50 s query fits, a 100 s one waits for the first charge to expire.
        assert_eq!(l.fit(&b, Duration::ZERO, secs(50), 300 * S), Fit::Now);
        assert_eq!(l.fit(&b, Duration::ZERO, secs(100), 300 * S), Fit::At(3700 * S, b[0]));
        assert_eq!(l.fit(&b, secs(1), secs(100), 300 * S), Fit::At(3701 * S, b[0]));
        assert_eq!(l.fit(&b, Duration::ZERO, secs(100), 3700 * S), Fit::Now);
        // Both charges must go for 500 s.
        assert_eq!(l.fit(&b, Duration::ZERO, secs(500), 300 * S), Fit::At(3800 * S, b[0]));
    }

    #[test]
    fn absurd_costs_saturate_and_never_wrap_into_room() {
        let b = hour();
        let mut l = Ledger::new();
        // 3e10 s is past u64 nanoseconds: the charge saturates, and the next
        // one must not wrap the total back below the budget.
        let a = l.reserve(secs(1));
        assert!(l.settle(a, Duration::from_secs_f64(3e10), S));
        let c = l.reserve(secs(1));
        assert!(l.settle(c, secs(2), 2 * S));
        assert_ne!(l.fit(&b, Duration::ZERO, secs(1), 3 * S), Fit::Now);
        let used = &l.usage(&b, Duration::ZERO, 3 * S)[0];
        assert_eq!(used.remaining(), Duration::ZERO);
        // Reservations near the limit of u64 come and go without a wrap.
        let (x, y) = (l.reserve(Duration::MAX), l.reserve(Duration::MAX));
        assert!(l.release(x) && l.release(y));
        assert_eq!(l.usage(&b, Duration::ZERO, 3 * S)[0].reserved, Duration::ZERO);
    }

    #[test]
    fn reservations_hold_room_until_settled_or_released() {
        let b = hour();
        let mut l = Ledger::new();
        let a = l.reserve(secs(400));
        assert_eq!(l.fit(&b, Duration::ZERO, secs(300), 0), Fit::Unknown(b[0]));
        assert!(l.settle(a, secs(100), 10 * S));
        assert_eq!(l.fit(&b, Duration::ZERO, secs(300), 10 * S), Fit::Now);
        let c = l.reserve(secs(500));
        assert_eq!(l.in_flight(), 1);
        assert!(l.release(c));
        assert!(!l.release(c), "released twice");
        assert_eq!(l.fit(&b, Duration::ZERO, secs(500), 10 * S), Fit::Now);
    }

    #[test]
    fn every_budget_applies_at_once_and_the_tighter_decides() {
        let b = vec![
            Budget { limit: secs(600), per: secs(3600) },
            Budget { limit: secs(900), per: secs(86_400) },
        ];
        let mut l = Ledger::new();
        for h in 0..2 {
            let id = l.reserve(secs(1));
            l.settle(id, secs(450), h * 3700 * S);
        }
        // The hour is clear at 7500 s, but the day holds 900 s until the first charge is a day old.
        assert_eq!(l.fit(&b, Duration::ZERO, secs(10), 7500 * S), Fit::At(86_400 * S, b[1]));
        let u = l.usage(&b, Duration::ZERO, 7500 * S);
        assert_eq!(u[0].charged, Duration::ZERO);
        assert_eq!(u[1].charged, secs(900));
        assert_eq!(u[1].remaining(), Duration::ZERO);
        assert_eq!(u[1].reset, secs(86_400 - 7500));
    }

    #[test]
    fn pruning_keeps_what_any_budget_still_counts() {
        let b = hour();
        let mut l = Ledger::new();
        let id = l.reserve(secs(1));
        l.settle(id, secs(5), 0);
        let keep = longest(&b) + secs(1);
        l.prune(keep, 3600 * S);
        assert!(!l.is_empty());
        l.prune(keep, 3601 * S);
        assert!(l.is_empty());
    }

    /// One step of a random schedule.
    #[derive(Debug, Clone)]
    enum Op {
        /// Time passes, then a query with this estimate asks to start.
        Start { after_ms: u64, estimate_ms: u64 },
        /// The query at this index (of those running) finishes, costing this
        /// share (in %) of its estimate.
        Finish { index: usize, after_ms: u64, share: u64 },
        /// A query is dropped without a charge.
        Release { index: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u64..3000, 1u64..400).prop_map(|(after_ms, estimate_ms)| Op::Start { after_ms, estimate_ms }),
            (0usize..8, 0u64..3000, 0u64..=100).prop_map(|(index, after_ms, share)| Op::Finish {
                index,
                after_ms,
                share
            }),
            (0usize..8).prop_map(|index| Op::Release { index }),
        ]
    }

    proptest! {
        /// Whatever the order of reservations and completions, the running
        /// time of queries whose run (admission to metering) touches any
        /// interval of a budget's length never exceeds the budget, as long
        /// as no query costs more than its reservation.
        #[test]
        fn never_over_budget_in_any_interval(ops in prop::collection::vec(op(), 1..120), guard_ms in 0u64..50) {
            let ms = 1_000_000u64;
            let budgets = [
                Budget { limit: Duration::from_millis(1000), per: Duration::from_millis(5000) },
                Budget { limit: Duration::from_millis(2500), per: Duration::from_millis(20_000) },
            ];
            let guard = Duration::from_millis(guard_ms);
            let mut l = Ledger::new();
            let mut now = 0u64;
            let mut running: Vec<(u64, u64, u64)> = Vec::new(); // id, admitted, estimate
            let mut done: Vec<(u64, u64, u64)> = Vec::new(); // admitted, metered, cost
            for op in ops {
                match op {
                    Op::Start { after_ms, estimate_ms } => {
                        now += after_ms * ms;
                        let e = Duration::from_millis(estimate_ms);
                        match l.fit(&budgets, guard, e, now) {
                            Fit::Now => {
                                let id = l.reserve(e);
                                running.push((id, now, estimate_ms * ms));
                            }
                            Fit::At(t, _) => {
                                prop_assert!(t > now);
                                // Exact: it fits at t and not a nanosecond before.
                                prop_assert_eq!(l.fit(&budgets, guard, e, t), Fit::Now);
                                prop_assert_ne!(l.fit(&budgets, guard, e, t - 1), Fit::Now);
                            }
                            Fit::Unknown(_) => {
                                prop_assert!(l.reserved + e.as_nanos() as u64 > 1000 * ms);
                            }
                        }
                    }
                    Op::Finish { index, after_ms, share } => {
                        if running.is_empty() { continue; }
                        now += after_ms * ms;
                        let (id, admitted, estimate) = running.remove(index % running.len());
                        let cost = estimate * share / 100;
                        prop_assert!(l.settle(id, Duration::from_nanos(cost), now));
                        done.push((admitted, now, cost));
                    }
                    Op::Release { index } => {
                        if running.is_empty() { continue; }
                        let (id, _, _) = running.remove(index % running.len());
                        prop_assert!(l.release(id));
                    }
                }
                l.prune(longest(&budgets) + guard, now);
            }
            // Running queries may still be charged up to their estimate.
            let mut all = done.clone();
            all.extend(running.iter().map(|&(_, admitted, e)| (admitted, u64::MAX, e)));
            for b in &budgets {
                let w = b.per_nanos();
                // The worst intervals start at a metering time or end just after an admission.
                let starts = all.iter().flat_map(|&(a, m, _)| [m, (a + 1).saturating_sub(w)]);
                for x in starts {
                    let touched: u64 = all
                        .iter()
                        .filter(|&&(a, m, _)| a < x.saturating_add(w) && m >= x)
                        .map(|&(_, _, c)| c)
                        .sum();
                    prop_assert!(touched <= b.limit_nanos(), "{} > {} in [{}, +{})", touched, b.limit_nanos(), x, w);
                }
            }
        }
    }
}
