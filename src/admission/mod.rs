//! Admit a request now, let it wait for the exact moment a slot frees, or
//! reject it with the exact time until one would.
//!
//! Each [`QuotaKey`] has an [`AdmissionLog`] and a queue of waiters under one
//! mutex (never held across an await). Who among the waiters (and a new
//! arrival) gets the next free slot is decided by [`fair`]: reserved
//! minimums, priority classes, weighted fair queuing between clients, caps.
//! With one client and one class that is FIFO. A request is admitted at once
//! only when it is the one chosen and every window has room. Otherwise its
//! grant time is projected exactly from the log and the waiters ranked ahead
//! ([`AdmissionLog::projected`]); if that lies within its maximum wait and the
//! queue has room it waits, else it is rejected with that time as its
//! `Retry-After`.
//!
//! Only the chosen waiter sleeps on a timer, set to the moment its slot
//! frees; the others sleep until woken, and a waiter woken that is not
//! chosen wakes the one that is. Nothing polls.
//! Keys whose logs have emptied are dropped by [`Limiter::sweep`].

pub mod estimate;
pub mod fair;
pub mod guard;
mod place;
pub mod rejection;
pub mod runtime;

use std::borrow::Cow;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::Notify;

pub use fair::{Class, Share};
use rejection::Drain;
pub use rejection::{Reason, Rejection};

use crate::policy::{Mode, Policies, Policy};
use crate::quota::{tightened, AdmissionLog, Binding, Clock, KeyMap, QuotaKey, Retention, Window, WindowUse};
use fair::{Lanes, Ticket};
use place::Place;

/// How far past its maximum wait a waiter whose slot was promised in time
/// still holds on, to absorb timer lateness.
const TIMER_SLACK: Duration = Duration::from_millis(50);

/// A call that leaves for the upstream less than this after its admission
/// keeps its admission time in the log: the guard absorbs so little. A later
/// one is restamped ([`Limiter::released`]).
const RELEASE_SLACK: Duration = Duration::from_millis(1);

/// What a key's log must keep under `policy`: enough for its `windows`
/// (tightened by a revealed limit) and for every window of the policies
/// that may share the key ([`Policy::kept`]).
fn kept(policy: &Policy, windows: &[Window], guard: Duration) -> Retention {
    Retention::for_windows(windows, guard).union(Retention::for_windows(&policy.kept, guard))
}

/// A queued request: its ticket and how to wake it.
struct Waiter {
    ticket: Ticket,
    wake: Arc<Notify>,
}

#[derive(Default)]
pub(crate) struct KeyState {
    log: AdmissionLog,
    retention: Retention,
    queue: Vec<Waiter>,
    /// The clients' tags, caps and reserves.
    lanes: Lanes,
    next_id: u64,
    /// No admission before this time: the upstream asked the key to pause.
    hold_until: u64,
    /// Lower limits the upstream revealed for this key, one per window length.
    revealed: Vec<Window>,
    /// The policy of the latest call on this key (for status reports).
    policy: u16,
    /// Waiters pushed out of the full queue for another client's newcomer
    /// ([`fair::push_out`]), not yet told.
    pushed_out: Vec<u64>,
}

impl KeyState {
    /// The policy's windows, tightened by what the upstream revealed.
    fn windows<'a>(&self, policy: &'a Policy) -> Cow<'a, [Window]> {
        self.tightened(&policy.windows)
    }

    /// The windows by which the key's waiters are ranked and capped: those
    /// of every policy that may share the key ([`Policy::kept`]), tightened
    /// by what the upstream revealed. Waiters of different policies on one
    /// key thus agree on who goes next.
    fn fair_windows<'a>(&self, policy: &'a Policy) -> Cow<'a, [Window]> {
        self.tightened(&policy.kept)
    }

    /// `windows` tightened by every limit revealed for the key.
    fn tightened<'a>(&self, windows: &'a [Window]) -> Cow<'a, [Window]> {
        if self.revealed.is_empty() {
            return Cow::Borrowed(windows);
        }
        Cow::Owned(self.revealed.iter().fold(windows.to_vec(), |w, &r| tightened(&w, r)))
    }

    /// Keep a revealed limit: the lower of it and one already revealed for
    /// its window length. Returns the limit kept for that length.
    fn keep_revealed(&mut self, window: Window) -> Window {
        match self.revealed.iter_mut().find(|r| r.per == window.per) {
            Some(r) => {
                *r = Window::new(r.limit.min(window.limit), r.per);
                *r
            }
            None => {
                self.revealed.push(window);
                window
            }
        }
    }

    /// Forget admissions that no longer constrain anything at `now`.
    fn prune(&mut self, now: u64) {
        let retention = self.retention;
        self.log.prune(retention, now);
        self.lanes.prune(retention, now);
    }

    /// The queued requests' tickets.
    fn tickets(&self) -> impl Iterator<Item = &Ticket> + Clone {
        self.queue.iter().map(|w| &w.ticket)
    }

    /// Admit `ticket` (no longer queued) at `at`, and wake whoever goes next.
    fn admit(
        &mut self,
        ticket: Ticket,
        at: u64,
        windows: &[Window],
        fair: &[Window],
        guard: Duration,
        start: u64,
    ) -> Admitted {
        let retention = self.retention;
        self.log.record(at, retention);
        self.lanes.admitted(ticket.client, ticket.start, at, retention);
        if !self.queue.is_empty() {
            let slot = self.log.next_free(windows, guard, at.max(self.hold_until)).at;
            if let Some((next, _)) = self.lanes.pick(self.tickets(), fair, guard, slot) {
                self.wake(next);
            }
        }
        let usage = self.log.usage(windows, guard, at);
        Admitted {
            waited: Duration::from_nanos(at - start),
            usage,
            at,
            stamp: at,
            decided: at,
            client: ticket.client,
            ticket: 0,
        }
    }

    /// Wake the queued request `id`.
    fn wake(&self, id: u64) {
        if let Some(w) = self.queue.iter().find(|w| w.ticket.id == id) {
            w.wake.notify_one();
        }
    }

    /// When a waiter with `ahead` ranked before it (`own` of them its
    /// client's) would be admitted: the later of its slot and its cap, with
    /// the window that decided, and whether that was the cap.
    fn grant(
        &self,
        ahead: usize,
        own: usize,
        client: u16,
        (windows, fair): (&[Window], &[Window]),
        guard: Duration,
        from: u64,
    ) -> (Binding, bool) {
        let slot = self.log.projected(ahead, windows, guard, from);
        let cap = self.lanes.cap_free(client, fair, guard, from, own);
        if cap.at > slot.at {
            (cap, true)
        } else {
            (slot, false)
        }
    }

    /// Make room in the full queue for a newcomer of `client`, if another
    /// client holds at least two more places: its latest waiter leaves the
    /// queue and is woken to answer `QueueFull`. Returns whether it did.
    fn push_out_for(&mut self, client: u16) -> bool {
        let Some(id) = fair::push_out(self.tickets(), client) else { return false };
        let i = self.queue.iter().position(|w| w.ticket.id == id).expect("a queued waiter");
        let waiter = self.queue.remove(i);
        self.pushed_out.push(id);
        waiter.wake.notify_one();
        true
    }

    /// Whether waiter `id` was pushed out (and forget it).
    fn was_pushed_out(&mut self, id: u64) -> bool {
        let found = self.pushed_out.iter().position(|&p| p == id);
        found.map(|i| self.pushed_out.swap_remove(i)).is_some()
    }

    /// Wake a waiter to re-decide who goes next; one that is not chosen
    /// passes the wake-up on to the one that is.
    fn nudge(&self) {
        if let Some(first) = self.queue.first() {
            first.wake.notify_one();
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
    /// Where the key's log has it now: `at`, or the moment its call left
    /// ([`Limiter::released`]).
    stamp: u64,
    /// When this replica learnt of the admission (clock reading): `at`, or
    /// for a shared one, when the store's answer came back. Lateness is
    /// measured from here, free of any skew to the store's clock.
    decided: u64,
    client: u16,
    /// The shared store's name for the admission (Redis), 0 when local.
    ticket: u64,
}

impl Admitted {
    /// A call admitted at clock reading `at` by a shared store, which knows
    /// it as `ticket`; this replica heard so at clock reading `decided`.
    pub fn shared(at: u64, decided: u64, ticket: u64, waited: Duration, usage: Vec<WindowUse>) -> Self {
        Admitted { waited, usage, at, stamp: at, decided, client: 0, ticket }
    }

    /// The same admission, of the client with index `client` (the lane
    /// its cap or reserve counts it in).
    pub(crate) fn of_client(self, client: u16) -> Self {
        Admitted { client, ..self }
    }

    /// The index of the client whose admission it is.
    pub(crate) fn client(&self) -> u16 {
        self.client
    }

    /// The shared store's name for the admission; 0 when it was decided locally.
    pub fn ticket(&self) -> u64 {
        self.ticket
    }

    /// The clock reading of the admission.
    pub fn at(&self) -> u64 {
        self.at
    }

    /// Where the key's logs have the admission now: [`Admitted::at`], or the
    /// moment its call left once [`Limiter::released`] found it late.
    pub fn stamp(&self) -> u64 {
        self.stamp
    }
}

#[derive(Default)]
pub(crate) struct KeyCell(Mutex<KeyState>);

impl KeyCell {
    fn lock(&self) -> MutexGuard<'_, KeyState> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `key`'s state in `keys`, created empty on first use; the read path takes
/// no write lock.
pub(crate) fn cell_of<C: Default>(keys: &KeyMap<Arc<C>>, key: &QuotaKey) -> Arc<C> {
    if let Some(cell) = keys.get(key) {
        return cell.clone();
    }
    keys.entry(key.clone()).or_default().clone()
}

/// Every key's admissions and waiters.
pub struct Limiter {
    keys: KeyMap<Arc<KeyCell>>,
    clock: Clock,
    guard: Duration,
    drain: Drain,
}

impl Limiter {
    pub fn new(guard: Duration) -> Self {
        Self::with_clock(guard, Clock::default())
    }

    /// A limiter on a given clock (the gateway shares one with the store).
    pub fn with_clock(guard: Duration, clock: Clock) -> Self {
        Limiter { keys: KeyMap::default(), clock, guard, drain: Drain::default() }
    }

    /// The gateway is stopping: from now on a call whose slot comes later
    /// than `within` from now is turned away ([`Reason::Draining`]), queued
    /// ones included; those whose slot comes sooner are still admitted.
    pub fn drain(&self, within: Duration) {
        self.drain.start(self.clock.now(), within);
        for cell in self.keys.iter() {
            for waiter in &cell.lock().queue {
                waiter.wake.notify_one();
            }
        }
    }

    /// The clock admission times are read on.
    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Put back what a durable store remembered for `key` under `policy`:
    /// its admissions (clock readings, any order), an upstream hold and the
    /// limits revealed for it. Restoring only adds constraints, never loosens
    /// one.
    pub fn restore(
        &self,
        key: &QuotaKey,
        policy: &Policy,
        times: &[u64],
        hold_until: u64,
        revealed: &[Window],
    ) {
        let cell = self.cell(key);
        let mut st = cell.lock();
        st.policy = policy.key_id;
        for &r in revealed {
            st.keep_revealed(r);
        }
        let windows = st.windows(policy);
        st.retention = st.retention.union(kept(policy, &windows, self.guard));
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
        st.policy = policy.key_id;
        let windows = st.windows(policy);
        st.retention = st.retention.union(kept(policy, &windows, self.guard));
        let retention = st.retention;
        st.log.prune(retention, at);
        st.log.record(at, retention);
    }

    /// When `key`'s upstream hold ends, as a clock reading (0 when none).
    pub fn hold_until(&self, key: &QuotaKey) -> u64 {
        self.keys.get(key).map_or(0, |c| c.lock().hold_until)
    }

    /// Every key's policy (key id) and admission times (for a store catching up).
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
        cell_of(&self.keys, key)
    }

    /// Admit a call for `key` under `policy`, waiting at most `max_wait`,
    /// as the only client. `depth` counts this policy's waiters.
    pub async fn acquire(
        &self,
        key: &QuotaKey,
        policy: &Policy,
        max_wait: Duration,
        depth: &IntGauge,
    ) -> Result<Admitted, Rejection> {
        self.acquire_as(key, policy, &Share::default(), max_wait, depth).await
    }

    /// Admit a call of the client `share` describes; its waiters are ordered
    /// among the key's other clients' by [`fair`].
    pub async fn acquire_as(
        &self,
        key: &QuotaKey,
        policy: &Policy,
        share: &Share,
        max_wait: Duration,
        depth: &IntGauge,
    ) -> Result<Admitted, Rejection> {
        let cell = self.cell(key);
        let start = self.clock.now();
        let guard = self.guard;
        let (mine, wake) = {
            let mut st = cell.lock();
            st.policy = policy.key_id;
            let windows = st.windows(policy);
            st.retention = st.retention.union(kept(policy, &windows, guard));
            st.prune(start);
            let (tag, before) = st.lanes.tag(share);
            st.next_id += 1;
            let id = st.next_id;
            let ticket = Ticket { id, client: share.client, class: share.class, start: tag };
            let from = start.max(st.hold_until);
            let slot = st.log.next_free(&windows, guard, from).at;
            let fair = st.fair_windows(policy);
            let chosen = st.lanes.pick(st.tickets().chain([&ticket]), &fair, guard, slot);
            if chosen.is_some_and(|(c, at)| c == id && at <= start) {
                return Ok(st.admit(ticket, start, &windows, &fair, guard, start));
            }
            let (ahead, own) = st.lanes.ahead(st.tickets(), &ticket, &fair, guard, start);
            let (grant, capped) = st.grant(ahead, own, share.client, (&windows, &fair), guard, from);
            let wait = Duration::from_nanos(grant.at - start);
            // A full queue is the last check: making room pushes another
            // client's waiter out, only for a newcomer that will wait.
            let reason = if policy.mode == Mode::Reject {
                Some(Reason::NoSlot)
            } else if self.drain.past(grant.at) {
                Some(Reason::Draining)
            } else if wait > max_wait {
                Some(Reason::WaitTooLong)
            } else if st.queue.len() >= policy.max_queue && !st.push_out_for(share.client) {
                Some(Reason::QueueFull)
            } else {
                None
            };
            if let Some(reason) = reason {
                st.lanes.untag(share.client, before);
                let usage = st.log.usage(&windows, guard, start);
                return Err(Rejection { reason, retry_after: wait, window: grant.window, capped, usage });
            }
            let wake = Arc::new(Notify::new());
            st.queue.push(Waiter { ticket, wake: wake.clone() });
            (ticket, wake)
        };
        let id = mine.id;
        depth.inc();
        let mut place = Place { cell: cell.clone(), id, depth: depth.clone(), queued: true };
        let deadline = start + u64::try_from((max_wait + TIMER_SLACK).as_nanos()).unwrap_or(u64::MAX);
        loop {
            let now = self.clock.now();
            let slot = {
                let mut st = cell.lock();
                st.prune(now);
                let windows = st.windows(policy);
                let from = now.max(st.hold_until);
                if st.was_pushed_out(id) {
                    // Another client's newcomer took this place in the full
                    // queue: say when this one would go, were it queued.
                    place.queued = false;
                    let fair = st.fair_windows(policy);
                    let (ahead, own) = st.lanes.ahead(st.tickets(), &mine, &fair, guard, now);
                    let (grant, capped) = st.grant(ahead, own, share.client, (&windows, &fair), guard, from);
                    return Err(Rejection {
                        reason: Reason::QueueFull,
                        retry_after: Duration::from_nanos(grant.at - now),
                        window: grant.window,
                        capped,
                        usage: st.log.usage(&windows, guard, now),
                    });
                }
                let slot = st.log.next_free(&windows, guard, from).at;
                let fair = st.fair_windows(policy);
                let chosen = st.lanes.pick(st.tickets(), &fair, guard, slot);
                let mine = chosen.filter(|&(c, _)| c == id).map(|(_, at)| at);
                match (chosen, mine) {
                    (_, Some(at)) if at <= now => {
                        place.queued = false;
                        let i = st.queue.iter().position(|w| w.ticket.id == id).expect("a queued place");
                        let ticket = st.queue.remove(i).ticket;
                        return Ok(st.admit(ticket, now, &windows, &fair, guard, start));
                    }
                    // Whoever goes next must be awake to its timer.
                    (Some((other, _)), None) => st.wake(other),
                    _ => {}
                }
                if now >= deadline || self.drain.on() {
                    let me = st.tickets().find(|t| t.id == id).copied().expect("a queued place");
                    let (ahead, own) = st.lanes.ahead(st.tickets(), &me, &fair, guard, now);
                    let (grant, capped) = st.grant(ahead, own, share.client, (&windows, &fair), guard, from);
                    // Draining, a waiter whose slot comes in time waits on.
                    let reason = if now >= deadline {
                        Some(Reason::Expired)
                    } else {
                        self.drain.past(grant.at).then_some(Reason::Draining)
                    };
                    if let Some(reason) = reason {
                        return Err(Rejection {
                            reason,
                            retry_after: Duration::from_nanos(grant.at - now),
                            window: grant.window,
                            capped,
                            usage: st.log.usage(&windows, guard, now),
                        });
                    }
                }
                mine
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
        // The next waiter may be asleep until an earlier moment: let it recompute.
        st.nudge();
    }

    /// Take back an admission whose call never reached the upstream.
    pub fn refund(&self, key: &QuotaKey, admitted: &Admitted) {
        let Some(cell) = self.keys.get(key).map(|c| c.clone()) else { return };
        let mut st = cell.lock();
        if st.log.refund(admitted.stamp) {
            st.lanes.refund(admitted.client, admitted.stamp);
            st.nudge();
        }
    }

    /// The call of `admitted` leaves for the upstream now. When that is
    /// [`RELEASE_SLACK`] or more after its admission was decided (its body
    /// was read, its admission committed to the state file, the store's
    /// answer travelled back), its entry in `key`'s log moves to now: the
    /// upstream counts the call when it arrives, so the windows age it from
    /// here, and the guard has only the trip to the upstream to cover.
    ///
    /// Returns whether the call left late: its local entry moved, or, for a
    /// shared admission, the store must move its own entry too
    /// ([`crate::store::Store::released`]); [`Admitted::stamp`] is then now.
    pub fn released(&self, key: &QuotaKey, admitted: &mut Admitted) -> bool {
        let now = self.clock.now();
        if now < admitted.decided.saturating_add(crate::quota::ledger::nanos(RELEASE_SLACK)) {
            return false;
        }
        let moved = self.keys.get(key).map(|c| c.clone()).is_some_and(|cell| {
            let mut st = cell.lock();
            // A shared admission's local copy (kept for outages) has no lane.
            let moved = st.log.restamp(admitted.stamp, now);
            if moved && admitted.ticket == 0 {
                st.lanes.restamp(admitted.client, admitted.stamp, now);
            }
            moved
        });
        // A shared admission moves in the store too, wherever its local copy
        // was: a refund from here on looks for it at its new place.
        let late = moved || admitted.ticket != 0;
        if late {
            admitted.stamp = now;
        }
        late
    }

    /// Whether the call of `admitted` has not left within the shortest of its
    /// windows since its admission was decided. The windows' guarantee
    /// (`crate::quota::window`) asks every call to leave within `W + g` of
    /// its admission: an admission decided meanwhile sees the entry where it
    /// was, and may have counted it as aged out. Such a call (its body came
    /// slowly) must be [refunded](Self::refund) and admitted again; the
    /// shortest window without the guard leaves room for a shared store's
    /// clock to differ from this one by up to `g`.
    pub fn outlived(&self, admitted: &Admitted) -> bool {
        let shortest = admitted.usage.iter().map(|u| u.window.per).min();
        shortest.is_some_and(|w| {
            self.clock.now() >= admitted.decided.saturating_add(crate::quota::ledger::nanos(w))
        })
    }

    /// Apply a limit the upstream revealed (lower than configured) to `key`
    /// from now on. Returns whether it tightened anything.
    pub fn reveal(&self, key: &QuotaKey, policy: &Policy, window: Window) -> bool {
        let cell = self.cell(key);
        let mut st = cell.lock();
        let before = st.windows(policy).into_owned();
        if tightened(&before, window) == before {
            return false;
        }
        let revealed = st.keep_revealed(window);
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
                let policy = policies.0.iter().find(|p| p.key_id == st.policy)?;
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
            st.prune(now);
            st.log.shrink();
            st.lanes.shrink();
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
#[cfg(test)]
mod tests_fair;
