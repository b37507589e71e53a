//! Admit a hunting query against its tenant's running-time budgets, wait for
//! the exact moment the [`Ledger`] has room, or reject it with that time.
//!
//! Each running-time key (the tenant, or tenant and app) has a ledger, a
//! FIFO queue and the costs of its recent queries under one mutex. A query
//! reserves an **estimate** of its cost while it runs: the configured
//! default until the key has history, then a high percentile of the recent
//! metered costs of its own text or of the key ([`super::estimate`]). The
//! [`Reservation`] is an RAII guard that ends in
//! exactly one of three ways:
//!
//! * [`Reservation::settle`]: the metered cost (`Stats.ExecutionTime`, or the
//!   wall time for Graph) replaces the estimate;
//! * [`Reservation::release`]: nothing ran (the connection was refused, or the
//!   upstream throttled the call), so nothing is charged;
//! * dropped unsettled (the client went away, the upstream failed, the body
//!   ended without `Stats`): the cost is unknown, and the **conservative
//!   rule** charges the larger of the estimate and the time since the query
//!   was sent (until its response headers, when they came). The service may
//!   finish a query whose caller left, so this never undercharges a
//!   cancelled query that was sent; a query never sent is released.
//!
//! When the ledger says when room frees ([`Fit::At`]), the head of the queue
//! sleeps until that moment and a rejection carries that exact time. When
//! only queries in flight hold the room ([`Fit::Unknown`]), nobody can know
//! when it frees: the head waits for a completion (every settle or release
//! wakes it) up to its maximum wait, and a rejection's `Retry-After` falls
//! back to the policy's maximum wait. An optional cap on queries in flight
//! per key is waited for the same way.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::Notify;

pub use super::estimate::{EstimateBy, Estimator, QueryId, QueryText};
use super::estimate::{History, QueryIds};
use super::rejection::Drain;
use super::Reason;
use crate::metrics::Charges;
use crate::policy::Mode;
use crate::quota::ledger::{longest, nanos};
use crate::quota::{Budget, BudgetUse, Clock, Fit, KeyMap, Ledger, QuotaKey};

/// How a key's queries are admitted: the budgets of the policy, and the
/// gateway's estimate settings.
#[derive(Debug, Clone)]
pub struct Demand<'a> {
    pub budgets: &'a [Budget],
    /// How long the key's charges are kept: at least the longest window of
    /// any policy that may share the key ([`Policies::longest_budget`]), so
    /// a policy with shorter windows never forgets what another still counts.
    ///
    /// [`Policies::longest_budget`]: crate::policy::Policies::longest_budget
    pub retention: Duration,
    pub mode: Mode,
    pub max_wait: Duration,
    pub max_queue: usize,
    /// Most queries in flight at once per key; `None` for no cap.
    pub max_concurrent: Option<usize>,
    pub estimate: &'a Estimator,
    /// Its text, for an estimate by query ([`RuntimeLimiter::query_id`]).
    pub query: Option<QueryId>,
}

/// Why a query was not admitted, and when it could be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeRejection {
    pub reason: Reason,
    pub retry_after: Duration,
    /// The budget that is exhausted; `None` when the upstream holds the key
    /// or the cap on queries in flight is reached.
    pub budget: Option<Budget>,
    /// The upstream asked to pause the key's queries.
    pub held: bool,
}

struct Waiter {
    id: u64,
    wake: Arc<Notify>,
}

#[derive(Default)]
struct State {
    ledger: Ledger,
    queue: VecDeque<Waiter>,
    next_waiter: u64,
    /// No query before this time: the upstream said the running time is spent.
    hold_until: u64,
    /// Recent metered costs, for estimates.
    history: History,
    /// The estimate settings last applied, for status (`None` before any).
    estimator: Option<Estimator>,
    /// The budgets last applied, for pruning and status.
    budgets: Vec<Budget>,
    /// The retention last applied ([`Demand::retention`]).
    retention: Duration,
}

impl State {
    /// Forget charges that neither the budgets last applied nor the
    /// retention still count.
    fn prune(&mut self, guard: Duration, now: u64) {
        let keep = longest(&self.budgets).max(self.retention) + guard;
        self.ledger.prune(keep, now);
    }

    /// Take on `demand`'s budgets, retention and estimate settings, then prune.
    fn apply(&mut self, demand: &Demand<'_>, guard: Duration, now: u64) {
        self.budgets = demand.budgets.to_vec();
        self.retention = demand.retention;
        self.estimator = Some(*demand.estimate);
        self.prune(guard, now);
    }

    fn wake_head(&self) {
        if let Some(head) = self.queue.front() {
            head.wake.notify_one();
        }
    }
}

#[derive(Default)]
struct Cell(Mutex<State>);

impl Cell {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One key's running time at a moment.
#[derive(Debug, Clone)]
pub struct RuntimeStatus {
    pub key: QuotaKey,
    pub budgets: Vec<BudgetUse>,
    pub in_flight: usize,
    pub queued: usize,
    /// The estimate a query with no history of its own would reserve.
    pub estimate: Duration,
    pub held_for: Option<Duration>,
}

/// Where the charges of finished queries go to outlive the process (the
/// durable store). Called under no lock of the limiter's; must not block.
pub trait ChargeJournal: Send + Sync {
    /// `cost` nanoseconds were charged to `key` at clock reading `end`;
    /// `pending` names the journal's record of the query in flight, if any.
    fn charged(&self, key: &QuotaKey, pending: Option<u64>, end: u64, cost: u64);
    /// The query recorded as `pending` ended without a charge.
    fn released(&self, pending: u64);
}

/// A key, its longest budget, and its charges (`(end, cost)` as
/// [`Ledger::charges`] gives them).
pub type KeyCharges = (QuotaKey, Duration, Vec<(u64, u64)>);

/// Every running-time key's ledger and waiters.
pub struct RuntimeLimiter {
    keys: KeyMap<Arc<Cell>>,
    clock: Clock,
    guard: Duration,
    estimator: Estimator,
    ids: QueryIds,
    drain: Drain,
    journal: std::sync::OnceLock<Arc<dyn ChargeJournal>>,
}

impl RuntimeLimiter {
    pub fn new(guard: Duration, estimator: Estimator) -> Self {
        Self::with_clock(guard, estimator, Clock::default())
    }

    /// A limiter on a given clock (the gateway shares one with the store).
    pub fn with_clock(guard: Duration, estimator: Estimator, clock: Clock) -> Self {
        RuntimeLimiter {
            keys: KeyMap::default(),
            clock,
            guard,
            estimator,
            ids: QueryIds::default(),
            journal: Default::default(),
            drain: Drain::default(),
        }
    }

    /// The gateway is stopping: a query that could not start within
    /// `within` from now is turned away ([`Reason::Draining`]), queued ones included.
    pub fn drain(&self, within: Duration) {
        self.drain.start(self.clock.now(), within);
        for cell in self.keys.iter() {
            for waiter in &cell.lock().queue {
                waiter.wake.notify_one();
            }
        }
    }

    /// Send every charge from now on to `journal` as well. Set once.
    pub fn set_journal(&self, journal: Arc<dyn ChargeJournal>) {
        let _ = self.journal.set(journal);
    }

    /// Put back charges a durable store remembered for `key`: `(end, cost)`
    /// pairs in clock readings and nanoseconds, counted against `budgets`;
    /// and an upstream hold until `hold_until`.
    pub fn restore(
        &self,
        key: &QuotaKey,
        budgets: &[Budget],
        retention: Duration,
        charges: &[(u64, u64)],
        hold_until: u64,
    ) {
        let cell = self.cell(key);
        let mut st = cell.lock();
        if st.budgets.is_empty() {
            st.budgets = budgets.to_vec();
        }
        st.retention = st.retention.max(retention);
        for &(end, cost) in charges {
            st.ledger.charge(Duration::from_nanos(cost), end);
        }
        st.prune(self.guard, self.clock.now());
        st.hold_until = st.hold_until.max(hold_until);
    }

    /// When `key`'s upstream hold ends, as a clock reading (0 when none).
    pub fn hold_until(&self, key: &QuotaKey) -> u64 {
        self.keys.get(key).map_or(0, |c| c.lock().hold_until)
    }

    /// How this limiter's histories name `text`: hashed as soon as the
    /// request is read, so no query text waits in a queue twice.
    pub fn query_id(&self, text: QueryText<'_>) -> QueryId {
        self.ids.of(text)
    }

    fn cell(&self, key: &QuotaKey) -> Arc<Cell> {
        super::cell_of(&self.keys, key)
    }

    /// Reserve running time for one query of `key`, waiting at most
    /// `demand.max_wait` (queue mode). `depth` counts waiters.
    pub async fn reserve(
        &self,
        key: &QuotaKey,
        demand: &Demand<'_>,
        depth: &IntGauge,
    ) -> Result<Reservation, RuntimeRejection> {
        let cell = self.cell(key);
        let start = self.clock.now();
        let deadline = start.saturating_add(nanos(demand.max_wait));
        let text = demand.query.filter(|_| demand.estimate.by == EstimateBy::Query);
        let asked = Asked { estimator: *demand.estimate, text, arrived: start };
        let (id, wake) = {
            let mut st = cell.lock();
            st.apply(demand, self.guard, start);
            let verdict = self.verdict(&st, demand, &asked, start);
            if st.queue.is_empty() {
                if let Verdict::Go(estimate) = verdict {
                    return Ok(self.admit(key, &cell, &mut st, asked, estimate, start));
                }
            }
            let wait = verdict.wait(start, demand.max_wait);
            let reason = if demand.mode == Mode::Reject {
                Some(Reason::NoSlot)
            } else if self.drain.on() && verdict.past(&self.drain) {
                Some(Reason::Draining)
            } else if st.queue.len() >= demand.max_queue {
                Some(Reason::QueueFull)
            } else if wait > demand.max_wait && (st.queue.is_empty() || matches!(verdict, Verdict::Held(_))) {
                // Behind others only an upstream hold is known for sure: it
                // keeps every waiter until its end.
                Some(Reason::WaitTooLong)
            } else {
                None
            };
            if let Some(reason) = reason {
                return Err(verdict.rejection(reason, start, demand.max_wait));
            }
            st.next_waiter += 1;
            let id = st.next_waiter;
            let wake = Arc::new(Notify::new());
            st.queue.push_back(Waiter { id, wake: wake.clone() });
            (id, wake)
        };
        depth.inc();
        let _place = Place { cell: cell.clone(), id, depth: depth.clone() };
        loop {
            let now = self.clock.now();
            let sleep_to = {
                let mut st = cell.lock();
                let head = st.queue.front().is_some_and(|w| w.id == id);
                st.prune(self.guard, now);
                let verdict = self.verdict(&st, demand, &asked, now);
                if head {
                    if let Verdict::Go(estimate) = verdict {
                        st.queue.pop_front();
                        st.wake_head();
                        return Ok(self.admit(key, &cell, &mut st, asked, estimate, now));
                    }
                }
                // Only the head knows when it goes; anyone knows a hold.
                let known = head || matches!(verdict, Verdict::Held(_));
                if now >= deadline {
                    let verdict = if known { verdict } else { Verdict::Unknown(None) };
                    return Err(verdict.rejection(Reason::Expired, now, demand.max_wait));
                }
                // Draining: only the head can know it starts in time.
                if self.drain.on() && (!head || verdict.past(&self.drain)) {
                    let verdict = if known { verdict } else { Verdict::Unknown(None) };
                    return Err(verdict.rejection(Reason::Draining, now, demand.max_wait));
                }
                match verdict {
                    Verdict::At(at, _) | Verdict::Held(at) if head => at.min(deadline),
                    _ => deadline,
                }
            };
            tokio::select! {
                _ = tokio::time::sleep_until(self.clock.instant(sleep_to)) => {}
                _ = wake.notified() => {}
            }
        }
    }

    fn verdict(&self, st: &State, demand: &Demand<'_>, asked: &Asked, now: u64) -> Verdict {
        if st.hold_until > now {
            return Verdict::Held(st.hold_until);
        }
        if demand.max_concurrent.is_some_and(|cap| st.ledger.in_flight() >= cap) {
            return Verdict::Unknown(None);
        }
        // An estimate above the smallest budget could never fit.
        let smallest = demand.budgets.iter().map(|b| b.limit).min().unwrap_or(Duration::MAX);
        let estimate = st.history.estimate(&asked.estimator, asked.text).min(smallest);
        match st.ledger.fit(demand.budgets, self.guard, estimate, now) {
            Fit::Now => Verdict::Go(estimate),
            Fit::At(at, b) => Verdict::At(at, b),
            Fit::Unknown(b) => Verdict::Unknown(Some(b)),
        }
    }

    fn admit(
        &self,
        key: &QuotaKey,
        cell: &Arc<Cell>,
        st: &mut State,
        asked: Asked,
        estimate: Duration,
        now: u64,
    ) -> Reservation {
        let id = st.ledger.reserve(estimate);
        let usage = st.ledger.usage(&st.budgets, self.guard, now);
        Reservation {
            usage,
            cell: cell.clone(),
            clock: self.clock,
            id,
            estimate,
            asked,
            waited: Duration::from_nanos(now - asked.arrived),
            sent: None,
            answered: None,
            done: false,
            journal: self.journal.get().map(|j| (j.clone(), key.clone())),
            pending: None,
            charges: None,
        }
    }

    /// Admit no query of `key` until `wait` from now, because the upstream
    /// said its running time is spent. A shorter hold never shortens a longer one.
    pub fn hold(&self, key: &QuotaKey, wait: Duration) {
        let until = self.clock.now().saturating_add(nanos(wait));
        let cell = self.cell(key);
        let mut st = cell.lock();
        st.hold_until = st.hold_until.max(until);
        st.wake_head();
    }

    /// Time left on `key`'s upstream hold, if any.
    pub fn held_for(&self, key: &QuotaKey) -> Option<Duration> {
        let cell = self.keys.get(key)?.clone();
        let until = cell.lock().hold_until;
        let now = self.clock.now();
        (until > now).then(|| Duration::from_nanos(until - now))
    }

    /// Every key's state now, keys in sorted order, its use reported
    /// against `shown` ([`crate::policy::Policies::strictest_budgets`]), or
    /// against the budgets last applied to it when `shown` is empty.
    pub fn snapshot(&self, shown: &[Budget]) -> Vec<RuntimeStatus> {
        let now = self.clock.now();
        let mut out: Vec<RuntimeStatus> = self
            .keys
            .iter()
            .map(|entry| {
                let st = entry.value().lock();
                RuntimeStatus {
                    key: entry.key().clone(),
                    budgets: st.ledger.usage(
                        if shown.is_empty() { &st.budgets } else { shown },
                        self.guard,
                        now,
                    ),
                    in_flight: st.ledger.in_flight(),
                    queued: st.queue.len(),
                    estimate: st.history.estimate(st.estimator.as_ref().unwrap_or(&self.estimator), None),
                    held_for: (st.hold_until > now).then(|| Duration::from_nanos(st.hold_until - now)),
                }
            })
            .collect();
        out.sort_by(|a, b| (&a.key.tenant, &a.key.app).cmp(&(&b.key.tenant, &b.key.app)));
        out
    }

    /// Every key's longest budget and charges, for a shared store catching up.
    pub fn all_charges(&self) -> Vec<KeyCharges> {
        self.keys
            .iter()
            .filter_map(|e| {
                let st = e.value().lock();
                let longest = longest(&st.budgets).max(st.retention);
                if longest.is_zero() {
                    return None;
                }
                let charges: Vec<(u64, u64)> = st.ledger.charges().collect();
                (!charges.is_empty()).then(|| (e.key().clone(), longest, charges))
            })
            .collect()
    }

    /// Drop keys with nothing charged, reserved, queued or held.
    pub fn sweep(&self) -> usize {
        let now = self.clock.now();
        self.keys.retain(|_, cell| {
            if Arc::strong_count(cell) > 1 {
                return true;
            }
            let Ok(mut st) = cell.0.try_lock() else { return true };
            st.prune(self.guard, now);
            !(st.ledger.is_empty() && st.queue.is_empty() && st.hold_until <= now)
        });
        self.keys.len()
    }
}

/// What the ledger says for the next query of a key.
enum Verdict {
    /// It fits now, reserving this estimate.
    Go(Duration),
    /// It fits at this time.
    At(u64, Budget),
    /// Only a completion can make room (the budget, or the in-flight cap).
    Unknown(Option<Budget>),
    /// The upstream holds the key until this time.
    Held(u64),
}

impl Verdict {
    /// Whether the query could only start after the drain ends (or nobody knows when).
    fn past(&self, drain: &Drain) -> bool {
        match *self {
            Verdict::Go(_) => false,
            Verdict::At(at, _) | Verdict::Held(at) => drain.past(at),
            Verdict::Unknown(_) => true,
        }
    }

    /// The wait this verdict implies; the fallback when unknown.
    fn wait(&self, now: u64, fallback: Duration) -> Duration {
        match *self {
            Verdict::Go(_) => Duration::ZERO,
            Verdict::At(at, _) | Verdict::Held(at) => Duration::from_nanos(at.saturating_sub(now)),
            Verdict::Unknown(_) => fallback,
        }
    }

    fn rejection(&self, reason: Reason, now: u64, fallback: Duration) -> RuntimeRejection {
        let (budget, held) = match *self {
            Verdict::At(_, b) | Verdict::Unknown(Some(b)) => (Some(b), false),
            Verdict::Held(_) => (None, true),
            Verdict::Go(_) | Verdict::Unknown(None) => (None, false),
        };
        RuntimeRejection { reason, retry_after: self.wait(now, fallback), budget, held }
    }
}

/// What a query asked for: how it is estimated (and its key learns from
/// its cost), and when.
#[derive(Debug, Clone, Copy)]
struct Asked {
    estimator: Estimator,
    /// Its text, when estimating by query.
    text: Option<QueryId>,
    /// When it asked, as a clock reading.
    arrived: u64,
}

/// A query's place in its key's queue, left on drop (a client that goes away).
struct Place {
    cell: Arc<Cell>,
    id: u64,
    depth: IntGauge,
}

impl Drop for Place {
    fn drop(&mut self) {
        self.depth.dec();
        let mut st = self.cell.lock();
        if let Some(pos) = st.queue.iter().position(|w| w.id == self.id) {
            st.queue.remove(pos);
            if pos == 0 {
                st.wake_head();
            }
        }
    }
}

/// Running time reserved for one query in flight. See the module doc for
/// how it ends; it always ends.
pub struct Reservation {
    cell: Arc<Cell>,
    clock: Clock,
    id: u64,
    estimate: Duration,
    asked: Asked,
    /// Time spent queued for running time.
    pub waited: Duration,
    /// Each budget's use once this query was reserved.
    pub usage: Vec<BudgetUse>,
    sent: Option<u64>,
    answered: Option<u64>,
    done: bool,
    /// Where the charge is journaled, and the key it is charged to.
    journal: Option<(Arc<dyn ChargeJournal>, QuotaKey)>,
    /// The journal's record of this query in flight.
    pending: Option<u64>,
    /// Where the charge is counted, whatever ends the reservation.
    charges: Option<Charges>,
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reservation").field("id", &self.id).field("estimate", &self.estimate).finish()
    }
}

impl Reservation {
    pub fn estimate(&self) -> Duration {
        self.estimate
    }

    /// The running-time key this reservation is charged to, when journaled.
    pub fn journal_key(&self) -> Option<&QuotaKey> {
        self.journal.as_ref().map(|(_, k)| k)
    }

    /// The journal recorded this query as in flight under `id`: its charge
    /// or release will name it.
    pub fn set_pending(&mut self, id: u64) {
        self.pending = Some(id);
    }

    /// Count the charge that ends this reservation in `charges`, whether
    /// metered, charged by wall time or by the rule for an unknown cost.
    pub fn count_in(&mut self, charges: Charges) {
        self.charges = Some(charges);
    }

    /// The query is being sent upstream now (from here on a drop charges).
    pub fn sent(&mut self) {
        self.sent = Some(self.clock.now());
    }

    /// The query's response headers arrived now.
    pub fn answered(&mut self) {
        self.answered = Some(self.clock.now());
    }

    /// Wall time from sending until the response headers (or until now).
    pub fn wall_time(&self) -> Duration {
        let end = self.answered.unwrap_or_else(|| self.clock.now());
        Duration::from_nanos(end.saturating_sub(self.sent.unwrap_or(end)))
    }

    /// Replace the estimate by the metered cost, and learn from it.
    pub fn settle(mut self, cost: Duration) {
        self.finish(Some(cost), true);
    }

    /// Charge a cost that was not metered (no `Stats`, an error answer).
    /// It is learnt from only when above the estimate: the text then cost
    /// at least that much, and a query that never reports `Stats` (one the
    /// service preempts, say) must not reserve its small estimate forever.
    pub fn charge(mut self, cost: Duration) {
        let above = cost > self.estimate;
        self.finish(Some(cost), above);
    }

    /// Nothing ran: release the reservation without a charge.
    pub fn release(mut self) {
        self.finish(None, false);
    }

    /// The conservative charge of a query whose cost is unknown.
    fn unknown_cost(&self) -> Option<Duration> {
        self.sent.map(|_| self.estimate.max(self.wall_time()))
    }

    fn finish(&mut self, cost: Option<Duration>, learn: bool) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        let now = self.clock.now();
        if let (Some(charges), Some(cost)) = (&self.charges, cost) {
            charges.count(cost, self.estimate);
        }
        {
            let mut st = self.cell.lock();
            match cost {
                Some(cost) => {
                    st.ledger.settle(self.id, cost, now);
                    if learn {
                        st.history.learn(&self.asked.estimator, self.asked.text, nanos(cost));
                    }
                }
                None => {
                    st.ledger.release(self.id);
                }
            }
            st.wake_head();
        }
        if let Some((journal, key)) = &self.journal {
            match cost {
                Some(cost) if !cost.is_zero() => journal.charged(key, self.pending, now, nanos(cost)),
                _ => {
                    if let Some(id) = self.pending {
                        journal.released(id);
                    }
                }
            }
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        // Charged by rule; learnt from, as `charge`, only above the estimate.
        let cost = self.unknown_cost();
        let above = cost.is_some_and(|c| c > self.estimate);
        self.finish(cost, above);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn estimator(default_ms: u64) -> Estimator {
        Estimator::by_key(Duration::from_millis(default_ms), 90, 10)
    }

    fn budgets() -> Vec<Budget> {
        vec![Budget { limit: Duration::from_secs(10), per: Duration::from_secs(60) }]
    }

    fn demand<'a>(b: &'a [Budget], e: &'a Estimator, mode: Mode, max_wait: u64) -> Demand<'a> {
        Demand {
            budgets: b,
            retention: Duration::ZERO,
            mode,
            max_wait: Duration::from_secs(max_wait),
            max_queue: 10,
            max_concurrent: None,
            estimate: e,
            query: None,
        }
    }

    fn key(t: &str) -> QuotaKey {
        QuotaKey { policy: None, tenant: t.into(), app: None }
    }

    fn gauge() -> IntGauge {
        IntGauge::new("depth", "queue depth").unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn reject_mode_gives_the_exact_time_until_running_time_frees() {
        let e = estimator(2000);
        let l = RuntimeLimiter::new(Duration::ZERO, e);
        let b = budgets();
        let d = demand(&b, &e, Mode::Reject, 0);
        let mut r = l.reserve(&key("t"), &d, &gauge()).await.unwrap();
        r.sent();
        tokio::time::advance(Duration::from_secs(9)).await;
        r.answered();
        r.settle(Duration::from_secs(9));
        // 9 s charged; the learnt estimate is now 9 s: it fits when the charge leaves the window.
        let no = l.reserve(&key("t"), &d, &gauge()).await.unwrap_err();
        assert_eq!(no.reason, Reason::NoSlot);
        assert_eq!(no.retry_after, Duration::from_secs(60));
        assert_eq!(no.budget, Some(b[0]));
        tokio::time::advance(Duration::from_secs(60)).await;
        let r = l.reserve(&key("t"), &d, &gauge()).await.unwrap();
        assert_eq!(r.estimate(), Duration::from_secs(9));
        // Another tenant is untouched.
        assert!(l.reserve(&key("u"), &d, &gauge()).await.is_ok());
    }

    /// An upstream hold keeps every waiter until its end: a query that
    /// cannot wait that long is told so at once, with the hold's end, even
    /// behind another waiter.
    #[tokio::test(start_paused = true)]
    async fn a_hold_turns_away_at_once_what_cannot_wait_for_it_queued_or_not() {
        let e = estimator(1000);
        let l = std::sync::Arc::new(RuntimeLimiter::new(Duration::ZERO, e));
        let b = budgets();
        l.hold(&key("t"), Duration::from_secs(60));
        let patient = {
            let (l, b) = (l.clone(), b.clone());
            tokio::spawn(async move {
                l.reserve(&key("t"), &demand(&b, &e, Mode::Queue, 120), &gauge()).await.is_ok()
            })
        };
        tokio::task::yield_now().await;
        let t0 = tokio::time::Instant::now();
        let no = l.reserve(&key("t"), &demand(&b, &e, Mode::Queue, 5), &gauge()).await.unwrap_err();
        assert_eq!(no.reason, Reason::WaitTooLong);
        assert_eq!(no.retry_after, Duration::from_secs(60), "the hold's end, not the caller's wait");
        assert_eq!(t0.elapsed(), Duration::ZERO, "at once");
        assert!(patient.await.unwrap(), "the patient one goes when the hold ends");
    }

    /// A text whose cost never comes from `Stats` still teaches the
    /// estimate when it costs more than it reserved: its next run reserves
    /// that, not the default again.
    #[tokio::test(start_paused = true)]
    async fn an_unmetered_charge_above_the_estimate_is_learnt() {
        let e = estimator(40);
        let l = RuntimeLimiter::new(Duration::ZERO, e);
        let b = budgets();
        let d = demand(&b, &e, Mode::Reject, 0);
        let mut r = l.reserve(&key("t"), &d, &gauge()).await.unwrap();
        assert_eq!(r.estimate(), Duration::from_millis(40));
        r.sent();
        tokio::time::advance(Duration::from_millis(800)).await;
        r.answered();
        let wall = r.wall_time();
        r.charge(wall);
        let mut r = l.reserve(&key("t"), &d, &gauge()).await.unwrap();
        assert_eq!(r.estimate(), Duration::from_millis(800), "learnt from the wall-time charge");
        // Dropped mid-query (charged by rule): above the estimate, learnt too.
        r.sent();
        tokio::time::advance(Duration::from_secs(2)).await;
        drop(r);
        let r = l.reserve(&key("t"), &d, &gauge()).await.unwrap();
        assert!(r.estimate() >= Duration::from_secs(2), "{:?}", r.estimate());
        // A quick error below the estimate teaches nothing.
        r.charge(Duration::from_millis(5));
        let r = l.reserve(&key("t"), &d, &gauge()).await.unwrap();
        assert!(r.estimate() >= Duration::from_secs(2), "{:?}", r.estimate());
    }

    /// Two policies share a tenant's ledger: one counts an hour, the other
    /// a minute. A query of the minute's policy must not forget the charge
    /// the hour's policy still counts.
    #[tokio::test(start_paused = true)]
    async fn a_policy_with_shorter_windows_keeps_what_a_sharing_policy_counts() {
        let e = estimator(1000);
        let l = RuntimeLimiter::new(Duration::ZERO, e);
        let hour = [Budget { limit: Duration::from_secs(10), per: Duration::from_secs(3600) }];
        let minute = [Budget { limit: Duration::from_secs(30), per: Duration::from_secs(60) }];
        let retention = Duration::from_secs(3600);
        let hourly = Demand { retention, ..demand(&hour, &e, Mode::Reject, 0) };
        let by_minute = Demand { retention, ..demand(&minute, &e, Mode::Reject, 0) };
        let mut r = l.reserve(&key("t"), &hourly, &gauge()).await.unwrap();
        r.sent();
        r.answered();
        r.settle(Duration::from_secs(9));
        // Past the minute: the minute's policy runs a query (and prunes).
        tokio::time::advance(Duration::from_secs(61)).await;
        let mut r = l.reserve(&key("t"), &by_minute, &gauge()).await.unwrap();
        r.sent();
        r.answered();
        r.settle(Duration::from_millis(500));
        // The hour still counts 9.5 s: a 1 s estimate does not fit in 10 s
        // until the 9 s charge leaves the hour.
        let no = l.reserve(&key("t"), &hourly, &gauge()).await.unwrap_err();
        assert_eq!(no.reason, Reason::NoSlot);
        assert_eq!(no.retry_after, Duration::from_secs(3600 - 61));
        assert_eq!(no.budget, Some(hour[0]));
    }

    /// A key two policies share is reported against the budgets it is given
    /// (every policy's strictest), not those of whichever admitted last.
    #[tokio::test(start_paused = true)]
    async fn a_shared_key_is_reported_against_the_budgets_shown() {
        let e = estimator(1000);
        let l = RuntimeLimiter::new(Duration::ZERO, e);
        let day =
            |h: u64| [Budget { limit: Duration::from_secs(h * 3600), per: Duration::from_secs(86_400) }];
        let (four, three) = (day(4), day(3));
        run(&l, &demand(&three, &e, Mode::Reject, 0), Duration::from_secs(600)).await;
        run(&l, &demand(&four, &e, Mode::Reject, 0), Duration::from_secs(600)).await;
        let remaining = |shown: &[Budget]| {
            let s = &l.snapshot(shown)[0].budgets[0];
            s.budget.limit - s.charged - s.reserved
        };
        // The 4 h policy admitted last: unshown, its budget is reported.
        assert_eq!(remaining(&[]), Duration::from_secs(4 * 3600 - 1200));
        assert_eq!(remaining(&three), Duration::from_secs(3 * 3600 - 1200));
    }

    #[tokio::test(start_paused = true)]
    async fn a_queued_query_starts_when_a_completion_frees_room() {
        let e = estimator(6000);
        let l = Arc::new(RuntimeLimiter::new(Duration::ZERO, e));
        let b = budgets();
        let mut first = l.reserve(&key("t"), &demand(&b, &e, Mode::Queue, 30), &gauge()).await.unwrap();
        first.sent();
        let waiter = {
            let (l, b, e) = (l.clone(), b.clone(), e);
            tokio::spawn(async move {
                let d = demand(&b, &e, Mode::Queue, 30);
                l.reserve(&key("t"), &d, &gauge()).await.map(|r| r.waited)
            })
        };
        tokio::task::yield_now().await;
        tokio::time::advance(Duration::from_secs(3)).await;
        assert!(!waiter.is_finished(), "6 s + 6 s reserved exceeds 10 s: it must wait");
        first.settle(Duration::from_secs(1));
        assert_eq!(waiter.await.unwrap(), Ok(Duration::from_secs(3)));
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_waits_fall_back_to_the_maximum_wait() {
        let e = estimator(8000);
        let l = RuntimeLimiter::new(Duration::ZERO, e);
        let b = budgets();
        let _running = l.reserve(&key("t"), &demand(&b, &e, Mode::Queue, 5), &gauge()).await.unwrap();
        let r = l.reserve(&key("t"), &demand(&b, &e, Mode::Reject, 5), &gauge()).await.unwrap_err();
        assert_eq!((r.reason, r.retry_after), (Reason::NoSlot, Duration::from_secs(5)));
        let before = tokio::time::Instant::now();
        let r = l.reserve(&key("t"), &demand(&b, &e, Mode::Queue, 5), &gauge()).await.unwrap_err();
        assert_eq!(r.reason, Reason::Expired);
        assert_eq!(before.elapsed(), Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_reservation_is_charged_conservatively() {
        let e = estimator(2000);
        let l = RuntimeLimiter::new(Duration::ZERO, e);
        let b = budgets();
        let d = demand(&b, &e, Mode::Queue, 5);
        // Never sent: released.
        drop(l.reserve(&key("t"), &d, &gauge()).await.unwrap());
        assert_eq!(l.snapshot(&[])[0].budgets[0].charged, Duration::ZERO);
        // Sent, then the client went away after 5 s: max(estimate, wall time).
        let mut r = l.reserve(&key("t"), &d, &gauge()).await.unwrap();
        r.sent();
        tokio::time::advance(Duration::from_secs(5)).await;
        drop(r);
        let s = &l.snapshot(&[])[0];
        assert_eq!(
            (s.budgets[0].charged, s.budgets[0].reserved, s.in_flight),
            (Duration::from_secs(5), Duration::ZERO, 0)
        );
        // The 5 s charge, above the 2 s estimate, was learnt: sent and
        // dropped at once, the next query is charged that estimate.
        assert_eq!(l.snapshot(&[])[0].estimate, Duration::from_secs(5));
        let mut r = l.reserve(&key("t"), &d, &gauge()).await.unwrap();
        r.sent();
        drop(r);
        assert_eq!(l.snapshot(&[])[0].budgets[0].charged, Duration::from_secs(10));
        // A charge of the estimate itself teaches nothing new.
        assert_eq!(l.snapshot(&[])[0].estimate, Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn the_cap_on_queries_in_flight_holds() {
        let e = estimator(100);
        let l = RuntimeLimiter::new(Duration::ZERO, e);
        let b = budgets();
        let mut d = demand(&b, &e, Mode::Reject, 3);
        d.max_concurrent = Some(1);
        let first = l.reserve(&key("t"), &d, &gauge()).await.unwrap();
        let no = l.reserve(&key("t"), &d, &gauge()).await.unwrap_err();
        assert_eq!((no.budget, no.retry_after), (None, Duration::from_secs(3)));
        first.release();
        assert!(l.reserve(&key("t"), &d, &gauge()).await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_hold_delays_every_query_of_the_key() {
        let e = estimator(100);
        let l = RuntimeLimiter::new(Duration::ZERO, e);
        let b = budgets();
        l.hold(&key("t"), Duration::from_secs(4));
        let no = l.reserve(&key("t"), &demand(&b, &e, Mode::Reject, 0), &gauge()).await.unwrap_err();
        assert!(no.held);
        assert_eq!(no.retry_after, Duration::from_secs(4));
        let r = l.reserve(&key("t"), &demand(&b, &e, Mode::Queue, 10), &gauge()).await.unwrap();
        assert_eq!(r.waited, Duration::from_secs(4));
    }

    async fn run(l: &RuntimeLimiter, d: &Demand<'_>, cost: Duration) {
        let mut r = l.reserve(&key("t"), d, &gauge()).await.unwrap();
        r.sent();
        r.answered();
        r.settle(cost);
    }

    /// A cheap query text that ran often enough fits in room too small for
    /// the key's dearest queries; a text never seen waits for the key's
    /// estimate, and so does every text when estimating by key.
    #[tokio::test(start_paused = true)]
    async fn a_known_cheap_query_uses_room_the_keys_estimate_leaves_unused() {
        let e = Estimator { by: EstimateBy::Query, queries: 10, query_runs: 2, ..estimator(1000) };
        let l = RuntimeLimiter::new(Duration::ZERO, e);
        let b = budgets();
        let id = |query| Some(l.query_id(QueryText { query, timespan: None }));
        let of = |query| Demand { query: id(query), ..demand(&b, &e, Mode::Reject, 0) };
        for (text, cost) in [("cheap", 500), ("cheap", 500), ("dear", 4000), ("dear", 4000)] {
            run(&l, &of(text), Duration::from_millis(cost)).await;
        }
        // 9 s of 10 s charged; the key's p90 is 4 s.
        assert_eq!(l.snapshot(&[])[0].estimate, Duration::from_secs(4));
        for text in ["dear", "never seen"] {
            let no = l.reserve(&key("t"), &of(text), &gauge()).await.unwrap_err();
            assert_eq!((no.reason, no.retry_after), (Reason::NoSlot, Duration::from_secs(60)), "{text}");
        }
        let by_key = Estimator { by: EstimateBy::Key, ..e };
        let d = Demand { query: id("cheap"), ..demand(&b, &by_key, Mode::Reject, 0) };
        assert!(l.reserve(&key("t"), &d, &gauge()).await.is_err(), "by key, the cheap text reserves 4 s too");
        let r = l.reserve(&key("t"), &of("cheap"), &gauge()).await.unwrap();
        assert_eq!(r.estimate(), Duration::from_millis(500));
        // With it in flight, 9.5 s are taken: one more fills the budget
        // exactly, and then none fits.
        let _r2 = l.reserve(&key("t"), &of("cheap"), &gauge()).await.unwrap();
        let no = l.reserve(&key("t"), &of("cheap"), &gauge()).await.unwrap_err();
        assert_eq!(no.reason, Reason::NoSlot);
    }
}
