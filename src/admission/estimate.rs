//! What a hunting query reserves before it runs: an estimate of its cost,
//! learnt from the metered costs of earlier queries.
//!
//! Each running-time key keeps a [`History`]: its last `samples` costs, and
//! (when estimating by query) the last `samples` costs of each of its most
//! recently run query texts, at most `queries` of them. A query whose text
//! has run at least `query_runs` times reserves the `percentile`th percentile
//! of that text's own costs; any other query reserves that percentile of the
//! key's costs; a key with no history reserves the configured default.
//!
//! Why by query: a scheduled detection sends the same text again and again,
//! and its cost varies far less than the costs of a tenant's queries taken
//! together. Reserving its own high percentile rather than the tenant's
//! leaves a cheap query free to use room smaller than the tenant's dearest
//! queries, which a key-wide estimate leaves unused. The guarantee is the
//! same in kind: a query that costs more than its reservation can carry the
//! key past a budget by the difference.
//!
//! Texts are told apart by a keyed hash ([`RandomState`], random per
//! process), so nobody can make two texts collide on purpose; the history
//! holds no query text.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasher;
use std::time::Duration;

/// The least a query reserves: one whose text has cost nothing so far
/// (`Stats` said 0) still needs room, so none is admitted to a tenant whose
/// budget is spent to the nanosecond.
pub const MIN_ESTIMATE: Duration = Duration::from_millis(1);

/// Whose history a query's estimate is learnt from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EstimateBy {
    /// Every query of the key alike.
    Key,
    /// The query's own text, once it has run `query_runs` times.
    Query,
}

/// How a key's reservations are estimated (`[hunting]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimator {
    /// Before the key has any history.
    pub default: Duration,
    /// Nearest-rank percentile of recent costs, 1 to 100.
    pub percentile: u8,
    /// How many recent costs are kept, for the key and for each text.
    pub samples: usize,
    /// Whose history makes a query's estimate.
    pub by: EstimateBy,
    /// Most query texts whose costs a key keeps; the least recently run
    /// is forgotten first.
    pub queries: usize,
    /// Runs of a text before its own costs make its estimate.
    pub query_runs: usize,
}

impl Estimator {
    /// Estimates from the key's costs alone.
    pub fn by_key(default: Duration, percentile: u8, samples: usize) -> Self {
        Estimator { default, percentile, samples, by: EstimateBy::Key, queries: 0, query_runs: 1 }
    }

    /// The nearest-rank percentile of the last `samples` of `costs` (more
    /// are kept until the next cost after a reload lowered `samples`), or
    /// `None` when there are none.
    fn percentile_of(&self, costs: &VecDeque<u64>) -> Option<Duration> {
        if costs.is_empty() {
            return None;
        }
        let mut sorted: Vec<u64> = costs.iter().rev().take(self.samples.max(1)).copied().collect();
        sorted.sort_unstable();
        let rank = (usize::from(self.percentile) * sorted.len()).div_ceil(100).clamp(1, sorted.len());
        Some(Duration::from_nanos(sorted[rank - 1]))
    }
}

/// What makes a hunting query's cost: its KQL text and, for Graph, its
/// `Timespan`. Its `Debug` shows neither, so no log line can carry a query.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct QueryText<'a> {
    pub query: &'a str,
    pub timespan: Option<&'a str>,
}

impl std::fmt::Debug for QueryText<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueryText(..)")
    }
}

/// A query text as the history knows it: a keyed hash of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QueryId(u64);

/// Names query texts for one process.
#[derive(Debug, Default)]
pub struct QueryIds(RandomState);

impl QueryIds {
    pub fn of(&self, text: QueryText<'_>) -> QueryId {
        QueryId(self.0.hash_one(text))
    }
}

/// One text's recent costs.
#[derive(Debug, Default)]
struct TextCosts {
    costs: VecDeque<u64>,
    /// When it last ran, in [`History::runs`].
    last_run: u64,
}

/// One key's recent metered costs.
#[derive(Debug, Default)]
pub struct History {
    /// The key's costs, oldest first.
    recent: VecDeque<u64>,
    texts: HashMap<QueryId, TextCosts>,
    /// Metered queries so far, the texts' clock.
    runs: u64,
}

impl History {
    /// What a query of `text` reserves.
    pub fn estimate(&self, e: &Estimator, text: Option<QueryId>) -> Duration {
        let own = match (e.by, text) {
            (EstimateBy::Query, Some(id)) => self
                .texts
                .get(&id)
                .filter(|t| t.costs.len() >= e.query_runs)
                .and_then(|t| e.percentile_of(&t.costs)),
            _ => None,
        };
        own.or_else(|| e.percentile_of(&self.recent)).unwrap_or(e.default).max(MIN_ESTIMATE)
    }

    /// A query of `text` was metered at `cost` nanoseconds.
    pub fn learn(&mut self, e: &Estimator, text: Option<QueryId>, cost: u64) {
        let keep = e.samples.max(1);
        push(&mut self.recent, cost, keep);
        self.runs += 1;
        if e.by == EstimateBy::Key || e.queries == 0 {
            // Estimating by key (perhaps since a reload): no text is kept.
            self.texts.clear();
            return;
        }
        let Some(id) = text else { return };
        // Room for this text among the `queries` kept: forget the least
        // recently run others (several, after a reload lowered the limit).
        let mut t = self.texts.remove(&id).unwrap_or_default();
        while self.texts.len() >= e.queries {
            let oldest = self.texts.iter().min_by_key(|(_, t)| t.last_run).map(|(id, _)| *id);
            self.texts.remove(&oldest.expect("the map is not empty"));
        }
        t.last_run = self.runs;
        push(&mut t.costs, cost, keep);
        self.texts.insert(id, t);
    }

    /// How many texts have costs kept.
    pub fn texts(&self) -> usize {
        self.texts.len()
    }
}

fn push(costs: &mut VecDeque<u64>, cost: u64, keep: usize) {
    costs.push_back(cost);
    while costs.len() > keep {
        costs.pop_front();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(query: &str) -> QueryText<'_> {
        QueryText { query, timespan: None }
    }

    fn ms(n: u64) -> u64 {
        n * 1_000_000
    }

    fn by_query(queries: usize, query_runs: usize) -> Estimator {
        Estimator {
            default: Duration::from_secs(7),
            percentile: 90,
            samples: 10,
            by: EstimateBy::Query,
            queries,
            query_runs,
        }
    }

    #[test]
    fn a_text_that_cost_nothing_still_reserves_a_millisecond() {
        let e = Estimator::by_key(Duration::from_secs(7), 90, 10);
        let mut h = History::default();
        for _ in 0..3 {
            h.learn(&e, None, 0);
        }
        assert_eq!(h.estimate(&e, None), MIN_ESTIMATE);
    }

    #[test]
    fn a_key_estimate_is_a_high_percentile_of_recent_costs() {
        let e = Estimator::by_key(Duration::from_secs(7), 90, 10);
        let mut h = History::default();
        assert_eq!(h.estimate(&e, None), Duration::from_secs(7));
        h.learn(&e, None, ms(3000));
        assert_eq!(h.estimate(&e, None), Duration::from_secs(3));
        // Costs 1..=12 s: the last ten (3..=12) are kept; p90 of ten is the 9th.
        for s in 1..=12 {
            h.learn(&e, None, ms(1000 * s));
        }
        assert_eq!(h.estimate(&e, None), Duration::from_secs(11));
    }

    #[test]
    fn a_text_that_ran_often_enough_reserves_its_own_costs() {
        let e = by_query(10, 3);
        let ids = QueryIds::default();
        let (cheap, dear, new) = (ids.of(text("cheap")), ids.of(text("dear")), ids.of(text("new")));
        let mut h = History::default();
        for _ in 0..3 {
            h.learn(&e, Some(dear), ms(800));
        }
        for n in 0..2 {
            h.learn(&e, Some(cheap), ms(10 + n));
        }
        // Two runs of the cheap text: not yet its own; the key's p90 is 800 ms.
        assert_eq!(h.estimate(&e, Some(cheap)), Duration::from_millis(800));
        h.learn(&e, Some(cheap), ms(12));
        assert_eq!(h.estimate(&e, Some(cheap)), Duration::from_millis(12));
        assert_eq!(h.estimate(&e, Some(dear)), Duration::from_millis(800));
        // A text never seen, or no text, reserves the key's estimate.
        assert_eq!(h.estimate(&e, Some(new)), Duration::from_millis(800));
        assert_eq!(h.estimate(&e, None), Duration::from_millis(800));
        // Estimating by key ignores the texts' costs.
        let key = Estimator { by: EstimateBy::Key, ..e };
        assert_eq!(h.estimate(&key, Some(cheap)), Duration::from_millis(800));
    }

    #[test]
    fn a_text_keeps_only_its_last_samples() {
        let e = Estimator { samples: 3, ..by_query(10, 1) };
        let id = QueryIds::default().of(text("q"));
        let mut h = History::default();
        for c in [900, 20, 30, 40] {
            h.learn(&e, Some(id), ms(c));
        }
        // 900 ms is four runs back: forgotten.
        assert_eq!(h.estimate(&e, Some(id)), Duration::from_millis(40));
    }

    #[test]
    fn the_least_recently_run_text_is_forgotten_first() {
        let e = by_query(2, 1);
        let ids = QueryIds::default();
        let (a, b, c) = (ids.of(text("a")), ids.of(text("b")), ids.of(text("c")));
        let mut h = History::default();
        h.learn(&e, Some(a), ms(100));
        h.learn(&e, Some(b), ms(200));
        h.learn(&e, Some(a), ms(100));
        // b ran least recently: c takes its place.
        h.learn(&e, Some(c), ms(300));
        assert_eq!(h.texts(), 2);
        assert_eq!(h.estimate(&e, Some(a)), Duration::from_millis(100));
        assert_eq!(h.estimate(&e, Some(c)), Duration::from_millis(300));
        // b falls back to the key's p90 of 100, 200, 100, 300.
        assert_eq!(h.estimate(&e, Some(b)), Duration::from_millis(300));
        // A lower limit after a reload forgets down to it.
        let one = by_query(1, 1);
        h.learn(&one, Some(b), ms(50));
        assert_eq!(h.texts(), 1);
        assert_eq!(h.estimate(&one, Some(b)), Duration::from_millis(50));
        assert_eq!(h.estimate(&one, Some(a)), Duration::from_millis(300));
    }

    /// After a reload lowered the limit, the text that runs keeps its
    /// costs even when it ran least recently of those kept.
    #[test]
    fn a_lower_limit_never_forgets_the_text_that_runs() {
        let three = by_query(3, 1);
        let ids = QueryIds::default();
        let (a, b, c) = (ids.of(text("a")), ids.of(text("b")), ids.of(text("c")));
        let mut h = History::default();
        for (id, cost) in [(a, 100), (b, 200), (c, 300)] {
            h.learn(&three, Some(id), ms(cost));
        }
        let two = by_query(2, 1);
        h.learn(&two, Some(a), ms(110));
        assert_eq!(h.texts(), 2);
        // a keeps both its costs (p90 of 100 and 110); b, the oldest other, went.
        assert_eq!(h.estimate(&two, Some(a)), Duration::from_millis(110));
        assert_eq!(h.estimate(&two, Some(c)), Duration::from_millis(300));
        // A query without a text teaches the key only, and forgets no text.
        h.learn(&two, None, ms(5));
        assert_eq!(h.texts(), 2);
    }

    #[test]
    fn texts_are_told_apart_and_the_same_text_is_the_same() {
        let ids = QueryIds::default();
        assert_eq!(ids.of(text("DeviceEvents | take 1")), ids.of(text("DeviceEvents | take 1")));
        assert_ne!(ids.of(text("DeviceEvents | take 1")), ids.of(text("DeviceEvents | take 2")));
        // A Timespan is part of what a query costs, and cannot be forged
        // by the end of the text.
        let with = QueryText { query: "T", timespan: Some("P7D") };
        assert_ne!(ids.of(with), ids.of(text("T")));
        assert_ne!(ids.of(with), ids.of(text("T\nP7D")));
        assert_eq!(format!("{with:?}"), "QueryText(..)");
    }

    #[test]
    fn a_reload_to_fewer_samples_or_estimates_by_key_keeps_less() {
        let e = by_query(10, 1);
        let id = QueryIds::default().of(text("q"));
        let mut h = History::default();
        for c in [900, 20, 30] {
            h.learn(&e, Some(id), ms(c));
        }
        assert_eq!(h.estimate(&e, Some(id)), Duration::from_millis(900));
        // Two samples now: the 900 ms three runs back no longer counts.
        let fewer = Estimator { samples: 2, ..e };
        assert_eq!(h.estimate(&fewer, Some(id)), Duration::from_millis(30));
        let by_key = Estimator { by: EstimateBy::Key, ..e };
        h.learn(&by_key, Some(id), ms(10));
        assert_eq!(h.texts(), 0);
    }
}
