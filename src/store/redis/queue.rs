//! The waiters of one key on one replica, in the order the memory store
//! gives them ([`crate::admission::fair`]): reserved minimums, priority
//! classes, weighted fair queuing between clients, caps.
//!
//! *When* a call may go is Redis's answer, shared by every replica; *who*
//! goes next among this replica's waiters is decided here. While nobody on
//! this replica waits for the key, a request asks Redis at once (many may
//! be in flight together; Redis orders them). Once some wait, only the one
//! the order chooses asks, and when Redis answers "not before t" it sleeps
//! until t, then the order is decided again: a more urgent request that
//! arrived meanwhile goes at t in its place. Nobody polls.
//!
//! Caps and reserved minimums count this replica's admissions of each
//! client: with several replicas, a client's cap applies on each replica it
//! calls.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::sync::Notify;

use super::batch::Batch;
use super::{Answer, RedisStore};
use crate::admission::fair::{Lanes, Ticket};
use crate::admission::{Admitted, Limiter, Reason, Rejection, Share};
use crate::policy::{Mode, Policy};
use crate::quota::{QuotaKey, Retention};

struct Waiter {
    ticket: Ticket,
    wake: Arc<Notify>,
}

#[derive(Default)]
struct Waiting {
    lanes: Lanes,
    retention: Retention,
    waiters: Vec<Waiter>,
    next_id: u64,
    /// The waiter asking Redis, or sleeping until the time it named.
    asking: Option<u64>,
    /// Draining: the slot Redis named to a waiter, which came after the
    /// drain's end (clock time), and the window that set it. No waiter here
    /// gets an earlier one.
    refused_from: Option<(u64, Option<crate::quota::Window>)>,
    /// Waiters pushed out of the full queue for another client's newcomer
    /// (`fair::push_out`), not yet told.
    pushed_out: Vec<u64>,
}

impl Waiting {
    fn tickets(&self) -> impl Iterator<Item = &Ticket> + Clone {
        self.waiters.iter().map(|w| &w.ticket)
    }

    /// Wake the waiter the order chooses now, unless one is asking.
    fn wake_next(&self, policy: &Policy, guard: Duration, now: u64) {
        if self.asking.is_some() {
            return;
        }
        if let Some((next, _)) = self.lanes.pick(self.tickets(), &policy.kept, guard, now) {
            if let Some(w) = self.waiters.iter().find(|w| w.ticket.id == next) {
                w.wake.notify_one();
            }
        }
    }

    /// A waiter learned that the next slot, `at`, comes after the drain:
    /// every waiter is woken to be turned away at once, not each in turn.
    fn refuse_all_from(&mut self, at: u64, window: Option<crate::quota::Window>) {
        if self.refused_from.is_none_or(|(from, _)| at < from) {
            self.refused_from = Some((at, window));
        }
        for w in &self.waiters {
            w.wake.notify_one();
        }
    }

    /// Make room in the full queue for a newcomer of `client`, if another
    /// client holds at least two more places: its latest waiter (never the
    /// one asking Redis) leaves and is woken to answer `QueueFull`.
    fn push_out_for(&mut self, client: u16) -> bool {
        let asking = self.asking;
        let candidates = self.tickets().filter(|t| Some(t.id) != asking);
        let Some(id) = crate::admission::fair::push_out(candidates, client) else { return false };
        if let Some(i) = self.waiters.iter().position(|w| w.ticket.id == id) {
            self.waiters.remove(i).wake.notify_one();
        }
        self.pushed_out.push(id);
        true
    }

    /// Take `id` out of the queue (admitted, pushed out, or gone).
    fn leave(&mut self, id: u64) {
        self.pushed_out.retain(|&p| p != id);
        self.waiters.retain(|w| w.ticket.id != id);
        if self.asking == Some(id) {
            self.asking = None;
        }
        if self.waiters.is_empty() {
            self.lanes.idle();
        }
    }
}

/// One key's waiters on this replica, its clients' lanes, and the asks
/// on their way to Redis together.
#[derive(Default)]
pub(super) struct KeyQueue {
    waiting: Mutex<Waiting>,
    pub(super) batch: Batch,
}

impl KeyQueue {
    fn lock(&self) -> MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `client`'s call admitted at `at` left for the upstream at `now`: its
    /// cap and reserve count it from then.
    pub(super) fn restamp(&self, client: u16, at: u64, now: u64) {
        self.lock().lanes.restamp(client, at, now);
    }

    /// `client`'s call counted at `at` never reached the upstream.
    pub(super) fn refund(&self, client: u16, at: u64) {
        self.lock().lanes.refund(client, at);
    }

    /// Whether the queue holds nothing worth keeping: no waiter, and no
    /// client admission that a cap or reserve still counts.
    pub(super) fn is_idle(&self) -> bool {
        let st = self.lock();
        st.waiters.is_empty() && st.lanes.holds_nothing()
    }
}

/// A queued request's place; leaving it (a client that went away, an
/// error) takes the request out and hands the turn on.
struct Place<'a> {
    queue: &'a KeyQueue,
    id: u64,
    policy: &'a Policy,
    guard: Duration,
    clock: crate::quota::Clock,
    depth: IntGauge,
}

impl Place<'_> {
    /// Leave the queue and hand the turn on; `admitted` records the call
    /// (its tag and time) in its client's lane first.
    fn leave(&self, admitted: Option<(&Share, u64, &Admitted)>) {
        let mut st = self.queue.lock();
        if let Some((share, start, admitted)) = admitted {
            let retention = st.retention;
            st.lanes.admitted(share.client, start, admitted.at(), retention);
        }
        st.leave(self.id);
        st.wake_next(self.policy, self.guard, self.clock.now());
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        // Leaving twice is harmless: the second finds nothing to remove.
        self.leave(None);
        self.depth.dec();
    }
}

fn rejection(reason: Reason, retry_after: Duration, window: Option<crate::quota::Window>) -> Rejection {
    Rejection { reason, retry_after, window, capped: false, usage: Vec::new() }
}

impl RedisStore {
    /// The shared path; `Err` only when Redis failed.
    pub(super) async fn shared(
        self: &Arc<Self>,
        limiter: &Limiter,
        key: &QuotaKey,
        policy: &Policy,
        share: &Share,
        max_wait: Duration,
        depth: &IntGauge,
    ) -> Result<Result<Admitted, Rejection>, redis::RedisError> {
        let started = tokio::time::Instant::now();
        let guard = Duration::from_micros(self.guard_us);
        let queue = crate::admission::cell_of(&self.queues, key);
        let now = self.clock.now();
        let (ticket, before, alone, capped) = {
            let mut st = queue.lock();
            st.retention = st.retention.union(Retention::for_windows(&policy.kept, guard));
            let retention = st.retention;
            st.lanes.prune(retention, now);
            let (start, before) = st.lanes.tag(share);
            st.next_id += 1;
            let ticket = Ticket { id: st.next_id, client: share.client, class: share.class, start };
            let capped = st.lanes.cap_free(share.client, &policy.kept, guard, now, 0);
            (ticket, before, st.waiters.is_empty() && st.asking.is_none(), capped)
        };
        let untag = || queue.lock().lanes.untag(share.client, before);
        // While nobody here waits for the key, ask at once.
        if alone || policy.mode == Mode::Reject {
            if capped.at <= now {
                let number = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                match self.ask_batched(&queue, key, &policy.windows, policy.longest_kept(), number).await {
                    Ok(Answer::Admitted { at_us, counts }) => {
                        let admitted = self
                            .admitted(limiter, key, policy, (at_us, number), counts, started)
                            .of_client(share.client);
                        let mut st = queue.lock();
                        let retention = st.retention;
                        st.lanes.admitted(share.client, ticket.start, admitted.at(), retention);
                        return Ok(Ok(admitted));
                    }
                    Ok(Answer::NotBefore { wait, window }) => {
                        let reason = match policy.mode {
                            Mode::Reject => Some(Reason::NoSlot),
                            Mode::Queue if self.past_drain(wait) => Some(Reason::Draining),
                            Mode::Queue if wait > max_wait => Some(Reason::WaitTooLong),
                            Mode::Queue => None,
                        };
                        if let Some(reason) = reason {
                            untag();
                            return Ok(Err(rejection(reason, wait, window)));
                        }
                    }
                    Err(e) => {
                        untag();
                        return Err(e);
                    }
                }
            } else if policy.mode == Mode::Reject {
                untag();
                let wait = Duration::from_nanos(capped.at - now);
                return Ok(Err(Rejection { capped: true, ..rejection(Reason::NoSlot, wait, capped.window) }));
            }
        }
        // Wait among this replica's waiters for the key.
        let wake = Arc::new(Notify::new());
        {
            let mut st = queue.lock();
            if st.waiters.len() >= policy.max_queue && !st.push_out_for(share.client) {
                drop(st);
                untag();
                return Ok(Err(rejection(Reason::QueueFull, policy.max_wait, None)));
            }
            st.waiters.push(Waiter { ticket, wake: wake.clone() });
        }
        depth.inc();
        let place =
            Place { queue: &queue, id: ticket.id, policy, guard, clock: self.clock, depth: depth.clone() };
        let deadline = started + max_wait;
        loop {
            let drain_started = self.drain.started();
            let now = self.clock.now();
            // Whose turn it is: `Some(at)` when it is this request's from `at`.
            let turn = {
                let mut st = queue.lock();
                if st.pushed_out.contains(&ticket.id) {
                    // Another client's newcomer took this place (Place's
                    // drop forgets it).
                    drop(st);
                    return Ok(Err(rejection(Reason::QueueFull, policy.max_wait, None)));
                }
                if let Some((from, window)) = st.refused_from.filter(|&(from, _)| self.drain.past(from)) {
                    drop(st);
                    let wait = Duration::from_nanos(from.saturating_sub(now));
                    return Ok(Err(rejection(Reason::Draining, wait, window)));
                }
                let retention = st.retention;
                st.lanes.prune(retention, now);
                let chosen = st.lanes.pick(st.tickets(), &policy.kept, guard, now);
                match chosen {
                    Some((c, at)) if c == ticket.id && st.asking.is_none_or(|a| a == ticket.id) => {
                        if at <= now {
                            st.asking = Some(ticket.id);
                        }
                        Some(at)
                    }
                    _ => {
                        st.wake_next(policy, guard, now);
                        None
                    }
                }
            };
            match turn {
                Some(at) if at <= now => {
                    let number = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    match self.ask(key, policy, number).await? {
                        Answer::Admitted { at_us, counts } => {
                            let admitted = self
                                .admitted(limiter, key, policy, (at_us, number), counts, started)
                                .of_client(share.client);
                            place.leave(Some((share, ticket.start, &admitted)));
                            return Ok(Ok(admitted));
                        }
                        Answer::NotBefore { wait, window } => {
                            // Draining, the head learns its slot; those behind
                            // it come no sooner, so a slot past the drain turns
                            // them all away.
                            // One reading of the clock, so the slot this
                            // waiter is refused for is the one recorded.
                            let at = self
                                .clock
                                .now()
                                .saturating_add(u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX));
                            if self.drain.past(at) {
                                queue.lock().refuse_all_from(at, window);
                                return Ok(Err(rejection(Reason::Draining, wait, window)));
                            }
                            if started.elapsed() + wait > max_wait {
                                return Ok(Err(rejection(Reason::Expired, wait, window)));
                            }
                            tokio::select! {
                                _ = tokio::time::sleep(wait) => {}
                                _ = drain_started => {}
                            }
                            queue.lock().asking = None;
                        }
                    }
                }
                // Its turn, once its client's cap frees.
                Some(at) => {
                    if self.drain.past(at) {
                        let wait = Duration::from_nanos(at - now);
                        return Ok(Err(Rejection {
                            capped: true,
                            ..rejection(Reason::Draining, wait, None)
                        }));
                    }
                    let until = self.clock.instant(at).min(deadline);
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => {}
                        _ = wake.notified() => {}
                        _ = drain_started => {}
                    }
                }
                None => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(deadline) => {}
                        _ = wake.notified() => {}
                        _ = drain_started => {}
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Err(rejection(Reason::Expired, max_wait, None)));
            }
        }
    }
}
