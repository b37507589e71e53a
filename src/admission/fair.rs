//! Which waiter of a key gets its next free slot: reserved minimums first,
//! then priority classes, then weighted fair queuing between clients; caps
//! keep a client out while it has used its share of a window.
//!
//! This decides only *who* goes next. *When* the next slot frees is the
//! [`AdmissionLog`]'s exact answer, untouched, so the window guarantee of
//! [`crate::quota::window`] holds whatever the order.
//!
//! # Order
//!
//! Every waiter has a *start tag* (start-time fair queuing): a client's
//! request starts at `max(v, F)`, where `v` is the start tag of the key's
//! latest admission and `F` the finish tag of the client's previous
//! request, and finishes `SCALE / weight` later. Waiters are ranked by
//!
//! 1. whether their client is *below its reserved minimum* in every window
//!    (those first),
//! 2. priority class (interactive, normal, batch),
//! 3. start tag, then arrival.
//!
//! A waiter whose client is at its cap at the moment the slot frees is
//! passed over; when every waiter is capped, the one whose cap frees first
//! goes then.
//!
//! # Guarantees
//!
//! * One client alone keeps FIFO order (its tags only grow).
//! * Between two clients of one class that both stay backlogged, over any
//!   run of admissions `|n_a / w_a − n_b / w_b| ≤ 1 / w_a + 1 / w_b` (the
//!   start-time fair queuing bound for requests of one slot each), so
//!   weights 3:1 share slots 3:1 up to a request or two.
//! * A client that was idle starts at `v`, below every queued request with a
//!   later tag: it goes at the next free slot, behind at most one request
//!   of each other client that started at `v` too.
//! * A capped client never has more than `⌊limit × cap% / 100⌋` (at least
//!   1) admissions in any interval of a window's length.
//! * While a client with a reserved minimum has a waiter queued and is below
//!   `⌊limit × reserved% / 100⌋` admissions in every window, no other
//!   client's waiter takes a slot before it. Slots it does not ask for are
//!   not held idle.

use std::time::Duration;

use crate::quota::{AdmissionLog, Binding, Retention, Window};

/// The tag distance of one request of weight 1.
const SCALE: u64 = 1 << 20;

/// Priority classes, most urgent first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum Class {
    Interactive,
    #[default]
    Normal,
    Batch,
}

impl Class {
    pub fn parse(s: &str) -> Option<Class> {
        match s.trim().to_ascii_lowercase().as_str() {
            "interactive" => Some(Class::Interactive),
            "normal" => Some(Class::Normal),
            "batch" => Some(Class::Batch),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Class::Interactive => "interactive",
            Class::Normal => "normal",
            Class::Batch => "batch",
        }
    }
}

/// How one client shares a key with the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    /// The client's index: its lane in every key.
    pub client: u16,
    /// Relative weight among clients of the same class (≥ 1).
    pub weight: u32,
    pub class: Class,
    /// At most this percentage of each window (1–100).
    pub cap_percent: Option<u8>,
    /// At least this percentage of each window while it has demand (0: none).
    pub reserved_percent: u8,
}

impl Default for Share {
    fn default() -> Self {
        Share { client: 0, weight: 1, class: Class::Normal, cap_percent: None, reserved_percent: 0 }
    }
}

/// What ranks a request: its arrival id, client, class and start tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket {
    pub id: u64,
    pub client: u16,
    pub class: Class,
    pub start: u64,
}

/// One client's state within a key.
struct Lane {
    client: u16,
    finish: u64,
    cap: Option<u8>,
    reserved: u8,
    /// The client's admissions, kept only when it has a cap or a reserve.
    log: AdmissionLog,
}

impl Lane {
    fn counts(&self) -> bool {
        self.cap.is_some() || self.reserved > 0
    }
}

/// Every client's lane in one key, and the key's virtual time.
#[derive(Default)]
pub(crate) struct Lanes {
    lanes: Vec<Lane>,
    vtime: u64,
}

/// `percent` of each window, at least `floor` calls.
fn share_of(windows: &[Window], percent: u8, floor: u32) -> Vec<(u32, Window)> {
    windows
        .iter()
        .map(|w| {
            let n = u32::try_from(u64::from(w.limit.get()) * u64::from(percent) / 100).unwrap_or(u32::MAX);
            (n.max(floor), *w)
        })
        .collect()
}

/// The cap's windows: `cap%` of each, at least one call.
fn cap_windows(windows: &[Window], percent: u8) -> Vec<Window> {
    share_of(windows, percent, 1)
        .into_iter()
        .map(|(n, w)| Window::new(std::num::NonZeroU32::new(n).expect("at least 1"), w.per))
        .collect()
}

impl Lanes {
    fn lane(&self, client: u16) -> Option<&Lane> {
        self.lanes.iter().find(|l| l.client == client)
    }

    fn lane_mut(&mut self, share: &Share) -> &mut Lane {
        let i = match self.lanes.iter().position(|l| l.client == share.client) {
            Some(i) => i,
            None => {
                self.lanes.push(Lane {
                    client: share.client,
                    finish: 0,
                    cap: None,
                    reserved: 0,
                    log: AdmissionLog::new(),
                });
                self.lanes.len() - 1
            }
        };
        let lane = &mut self.lanes[i];
        lane.cap = share.cap_percent;
        lane.reserved = share.reserved_percent;
        lane
    }

    /// A new request's start tag; returns it and the lane's previous finish (for [`Lanes::untag`]).
    pub fn tag(&mut self, share: &Share) -> (u64, u64) {
        let vtime = self.vtime;
        let lane = self.lane_mut(share);
        let start = vtime.max(lane.finish);
        let before = lane.finish;
        lane.finish = start + SCALE / u64::from(share.weight.max(1));
        (start, before)
    }

    /// Take back a tag of a request that was never queued.
    pub fn untag(&mut self, client: u16, before: u64) {
        if let Some(lane) = self.lanes.iter_mut().find(|l| l.client == client) {
            lane.finish = before;
        }
    }

    /// A request of `client` with tag `start` was admitted at `at`.
    pub fn admitted(&mut self, client: u16, start: u64, at: u64, retention: Retention) {
        self.vtime = self.vtime.max(start);
        if let Some(lane) = self.lanes.iter_mut().find(|l| l.client == client) {
            if lane.counts() {
                lane.log.record(at, retention);
            }
        }
    }

    /// The queue emptied because waiters left unadmitted: forget the tags
    /// they took, so a client is not made to pay later for requests that
    /// never went.
    pub fn idle(&mut self) {
        for lane in &mut self.lanes {
            lane.finish = lane.finish.min(self.vtime);
        }
    }

    pub fn refund(&mut self, client: u16, at: u64) {
        if let Some(lane) = self.lanes.iter_mut().find(|l| l.client == client) {
            lane.log.refund(at);
        }
    }

    /// The client's admission recorded at `at` left for the upstream at `now`.
    pub fn restamp(&mut self, client: u16, at: u64, now: u64) {
        if let Some(lane) = self.lanes.iter_mut().find(|l| l.client == client) {
            lane.log.restamp(at, now);
        }
    }

    pub fn prune(&mut self, retention: Retention, now: u64) {
        for lane in &mut self.lanes {
            lane.log.prune(retention, now);
        }
    }

    /// Whether no lane holds an admission a cap or reserve still counts.
    pub fn holds_nothing(&self) -> bool {
        self.lanes.iter().all(|l| l.log.is_empty())
    }

    pub fn shrink(&mut self) {
        for lane in &mut self.lanes {
            lane.log.shrink();
        }
    }

    /// When `client` may next be admitted under its cap, from `from`, with
    /// `extra` of its own requests going first.
    /// The binding window is the cap's.
    pub fn cap_free(
        &self,
        client: u16,
        windows: &[Window],
        guard: Duration,
        from: u64,
        extra: usize,
    ) -> Binding {
        match self.lane(client) {
            Some(Lane { cap: Some(pct), log, .. }) => {
                log.projected(extra, &cap_windows(windows, *pct), guard, from)
            }
            _ => Binding { at: from, window: None },
        }
    }

    /// Whether a lane is below its reserved minimum in every window at `now`.
    fn below_reserve(lane: &Lane, windows: &[Window], guard: Duration, now: u64) -> bool {
        if lane.reserved == 0 {
            return false;
        }
        let usage = lane.log.usage(windows, guard, now);
        share_of(windows, lane.reserved, 0).iter().zip(usage).all(|((n, _), u)| u.used < *n)
    }

    /// Each lane's standing at `now`, computed once per decision; empty
    /// (no allocation) when no lane has a cap or a reserve.
    fn standings(&self, windows: &[Window], guard: Duration, now: u64) -> Vec<Standing> {
        if !self.lanes.iter().any(Lane::counts) {
            return Vec::new();
        }
        self.lanes
            .iter()
            .map(|lane| Standing {
                client: lane.client,
                reserved: Self::below_reserve(lane, windows, guard, now),
                free: match lane.cap {
                    Some(pct) => lane.log.next_free(&cap_windows(windows, pct), guard, now).at,
                    None => now,
                },
            })
            .collect()
    }

    /// The ticket that gets the slot free at `slot`, and when it may go:
    /// the best-ranked one not capped then, or, if all are, the one whose
    /// cap frees first. Returns its id.
    pub fn pick<'t>(
        &self,
        tickets: impl IntoIterator<Item = &'t Ticket>,
        windows: &[Window],
        guard: Duration,
        slot: u64,
    ) -> Option<(u64, u64)> {
        let standings = self.standings(windows, guard, slot);
        let mut best: Option<(u64, Rank)> = None;
        let mut soonest: Option<(u64, u64)> = None;
        for t in tickets {
            let standing = Standing::of(&standings, t.client);
            if standing.free > slot {
                if soonest.is_none_or(|(_, at)| standing.free < at) {
                    soonest = Some((t.id, standing.free));
                }
                continue;
            }
            let rank = standing.rank(t);
            if best.as_ref().is_none_or(|(_, r)| rank < *r) {
                best = Some((t.id, rank));
            }
        }
        best.map(|(id, _)| (id, slot)).or(soonest)
    }

    /// How many of `queued` rank before `me`, and how many of those are its
    /// client's. Another client's waiters do not count while that client is
    /// at its cap: they cannot take the next slots, so a full backlog of a
    /// capped client never makes others look further from a slot than they are.
    pub fn ahead<'t>(
        &self,
        queued: impl IntoIterator<Item = &'t Ticket>,
        me: &Ticket,
        windows: &[Window],
        guard: Duration,
        now: u64,
    ) -> (usize, usize) {
        let standings = self.standings(windows, guard, now);
        let mine = Standing::of(&standings, me.client).rank(me);
        queued
            .into_iter()
            .filter(|t| {
                let standing = Standing::of(&standings, t.client);
                let blocked = t.client != me.client && standing.free > now;
                t.id != me.id && !blocked && standing.rank(t) < mine
            })
            .fold((0, 0), |(n, own), t| (n + 1, own + usize::from(t.client == me.client)))
    }
}

/// Which waiter makes room in a full queue for a newcomer of `client`: the
/// latest arrival of the client with the most waiters, when that client has
/// at least two more than `client` (so the move evens the queue out, and
/// never just trades one waiter for another). `None` when no client has.
///
/// The bound then holds per client, not first come: one client that floods
/// a key's queue can fill it only while no one else asks, and a newcomer of
/// another client gets a place (and its fair rank) by pushing out the
/// flooder's last waiter, which is answered `QueueFull` at once.
pub(crate) fn push_out<'t>(tickets: impl IntoIterator<Item = &'t Ticket>, client: u16) -> Option<u64> {
    // Per client: its waiters, and its latest one. One pass: the queue may be long.
    let mut per: std::collections::HashMap<u16, (usize, u64)> = std::collections::HashMap::new();
    for t in tickets {
        let e = per.entry(t.client).or_insert((0, 0));
        *e = (e.0 + 1, e.1.max(t.id));
    }
    let own = per.get(&client).map_or(0, |&(n, _)| n);
    let (_, &(most, latest)) = per.iter().max_by_key(|&(&c, &(n, _))| (n, std::cmp::Reverse(c)))?;
    (most >= own + 2).then_some(latest)
}

/// Not below its reserve, class, start tag, arrival: lower goes first.
type Rank = (bool, Class, u64, u64);

/// A lane's standing at one moment.
struct Standing {
    client: u16,
    /// Below its reserved minimum in every window.
    reserved: bool,
    /// When its cap lets it be admitted again.
    free: u64,
}

impl Standing {
    const NONE: Standing = Standing { client: u16::MAX, reserved: false, free: 0 };

    fn of(standings: &[Standing], client: u16) -> &Standing {
        standings.iter().find(|s| s.client == client).unwrap_or(&Standing::NONE)
    }

    fn rank(&self, t: &Ticket) -> Rank {
        (!self.reserved, t.class, t.start, t.id)
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroU32;

    use super::*;

    fn waiter(id: u64, client: u16, class: Class, start: u64) -> Ticket {
        Ticket { id, client, class, start }
    }

    fn share(client: u16, weight: u32) -> Share {
        Share { client, weight, ..Share::default() }
    }

    #[test]
    fn a_full_queue_makes_room_by_the_heaviest_clients_latest_waiter() {
        let q =
            [waiter(1, 0, Class::Normal, 0), waiter(2, 0, Class::Normal, 1), waiter(3, 1, Class::Normal, 0)];
        assert_eq!(push_out(&q, 2), Some(2), "client 0 has two, the newcomer's none");
        assert_eq!(push_out(&q, 1), None, "two against one would become one against two");
        assert_eq!(push_out(&q, 0), None, "a client never pushes out its own");
        let flood: Vec<Ticket> = (1..=5).map(|id| waiter(id, 3, Class::Batch, id)).collect();
        assert_eq!(push_out(&flood, 4), Some(5));
        assert_eq!(push_out(&[], 4), None);
    }

    #[test]
    fn weights_three_to_one_interleave_three_to_one() {
        let mut lanes = Lanes::default();
        let mut queue = Vec::new();
        for id in 0..40 {
            let s = share((id % 2) as u16, if id % 2 == 0 { 3 } else { 1 });
            queue.push(waiter(id, s.client, Class::Normal, lanes.tag(&s).0));
        }
        let w = [Window::new(NonZeroU32::new(1000).unwrap(), Duration::from_secs(1))];
        let mut order = Vec::new();
        for _ in 0..16 {
            let (id, _) = lanes.pick(&queue, &w, Duration::ZERO, 0).unwrap();
            let x = queue.remove(queue.iter().position(|t| t.id == id).unwrap());
            lanes.admitted(x.client, x.start, 0, Retention::for_windows(&w, Duration::ZERO));
            order.push(x.client);
        }
        let heavy = order.iter().filter(|&&c| c == 0).count();
        assert_eq!(heavy, 12, "{order:?}");
    }

    #[test]
    fn a_class_goes_before_a_less_urgent_one_whatever_the_tags() {
        let lanes = Lanes::default();
        let queue = vec![waiter(1, 0, Class::Batch, 0), waiter(2, 1, Class::Interactive, 5 * SCALE)];
        let w = [Window::new(NonZeroU32::new(1).unwrap(), Duration::from_secs(1))];
        assert_eq!(lanes.pick(&queue, &w, Duration::ZERO, 7), Some((2, 7)));
    }
}
